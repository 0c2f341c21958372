#!/usr/bin/env python3
"""How a disk completes reads: bursts, and how soon the next reads arrive.

Reads `perf script` output of block:block_rq_issue and block:block_rq_complete
(from `bench/bursts`) and prints one markdown row for one device:

    bursts.py LABEL DEV PERF_SCRIPT_TEXT [--depth N] [--gap US]

DEV is MAJ,MIN as the tracepoints print it (254,0). A burst is a run of
completions with less than --gap microseconds between neighbours. For the
bursts that carried --depth reads (all a client keeps in flight), the row
gives how long before the burst its first and its last read had been issued
(medians), and how long after it the next --depth reads reached the disk
(the first and the last of them, medians).
"""

import argparse
import re
import statistics
import sys

LINE = re.compile(
    r"\s(\d+\.\d+):\s+block:(block_rq_issue|block_rq_complete):\s+(\d+,\d+)\s+(\S+)\s"
    r".*?(\d+) \+ (\d+)"
)


def parse(path, dev):
    """(time in us, 'i' or 'c', sector) of the device's reads, in time order."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if not m or m.group(3) != dev or "R" not in m.group(4):
                continue
            t = float(m.group(1)) * 1e6
            kind = "i" if m.group(2) == "block_rq_issue" else "c"
            events.append((t, kind, int(m.group(5))))
    events.sort()
    return events


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def analyse(events, depth, gap):
    issued = {}  # sector -> issue time of the read in flight there
    inflight = 0
    last_t = None
    weight = {}  # reads on the disk -> us spent so
    completions = []  # (time, issue time)
    issues = []
    for t, kind, sector in events:
        if last_t is not None:
            weight[inflight] = weight.get(inflight, 0.0) + (t - last_t)
        last_t = t
        if kind == "i":
            issued[sector] = t
            issues.append(t)
            inflight += 1
        elif sector in issued:
            completions.append((t, issued.pop(sector)))
            inflight = max(0, inflight - 1)
    bursts = []
    for t, it in completions:
        if bursts and t - bursts[-1][-1][0] < gap:
            bursts[-1].append((t, it))
        else:
            bursts.append([(t, it)])
    full = [b for b in bursts if len(b) >= depth]
    first_before, last_before, next_first, next_last = [], [], [], []
    j = 0
    for b in full:
        at = b[0][0]
        first_before.append(at - min(it for _, it in b))
        last_before.append(at - max(it for _, it in b))
        # The next `depth` issues after the burst began.
        while j < len(issues) and issues[j] < at:
            j += 1
        nxt = issues[j : j + depth]
        if len(nxt) == depth:
            next_first.append(nxt[0] - at)
            next_last.append(nxt[-1] - at)
    total = sum(weight.values()) or 1.0
    return {
        "reads": len(completions),
        "bursts": len(bursts),
        "full": len(full),
        "idle": weight.get(0, 0.0) / total,
        "all": sum(v for k, v in weight.items() if k >= depth) / total,
        "first": median(first_before),
        "last": median(last_before),
        "next_first": median(next_first),
        "next_last": median(next_last),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("label")
    p.add_argument("dev")
    p.add_argument("script")
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--gap", type=float, default=20.0)
    p.add_argument("--header", action="store_true")
    a = p.parse_args()
    if a.header:
        print(
            f"| reads from | reads traced | bursts | with all {a.depth} | "
            f"time with 0 on the disk | with {a.depth} | first read of a full burst "
            f"issued, us before it | its last | next {a.depth} on the disk, us after it: "
            f"first | last |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    r = analyse(parse(a.script, a.dev), a.depth, a.gap)
    if r["reads"] == 0:
        sys.exit(f"bursts.py: no reads of device {a.dev} in {a.script}")
    us = [
        "-" if r[k] != r[k] else f"{r[k]:.0f}"  # NaN: no full burst
        for k in ("first", "last", "next_first", "next_last")
    ]
    print(
        f"| {a.label} | {r['reads']} | {r['bursts']} | {r['full']} | {r['idle']:.0%} | "
        f"{r['all']:.0%} | {' | '.join(us)} |"
    )


if __name__ == "__main__":
    main()
