#!/usr/bin/env python3
"""Helper of bench/run: reads fio's JSON and writes the report.

  run_report.py fio-row FIO_JSON WORKLOAD SERVER REP SEQ CPU_TICKS CLK_TCK
      prints one CSV row of runs.csv (CPU_TICKS empty: no server process)
  run_report.py report --runs RUNS_CSV --meta META_TSV --md OUT.md --csv OUT.csv
                       --servers a,b,... --workloads a,b,...
      writes the markdown (a table per workload, then the targets) and the CSV
"""

import argparse
import csv
import json
import statistics
import sys

LABELS = {
    "ubd-none": "ubd serve --cache none",
    "ubd-writeback": "ubd serve --cache writeback",
    "qemu-nbd-none": "qemu-nbd qcow2 --cache=none --aio=io_uring",
    "qemu-nbd-writeback": "qemu-nbd qcow2 --cache=writeback --aio=io_uring",
    "nbdkit-cow": "nbdkit --filter=cow file cache=none (its overlay is an unlinked temporary file, gone when nbdkit exits)",
    "nbd-server-cow": "nbd-server copyonwrite = true (a buffered diff file per connection, deleted when it ends; a process per connection)",
    "nbdkit-null": "nbdkit null (reference: transport only)",
    "disk": "fio io_uring O_DIRECT on the raw file (reference: no NBD; reads the base, writes a preallocated copy of it)",
    "disk-fresh": "fio io_uring O_DIRECT on a fresh sparse file (reference: no NBD; on the workloads that only write to a fresh overlay, what writing new blocks costs the host)",
}
PEERS = ["qemu-nbd-none", "qemu-nbd-writeback", "nbdkit-cow", "nbd-server-cow"]
BUFFERED_PEERS = ["qemu-nbd-writeback", "nbdkit-cow", "nbd-server-cow"]
METRICS = ["iops", "mbps", "p50_us", "p99_us", "cpu_us_per_io"]

# The targets of the `ubd serve` issue (issue 4), as issue 5 restates them.
# (workload, what, required ratio)
RATIO_TARGETS = [
    ("randread-qd32", "4K random read QD32", 1.6),
    ("randread-qd1", "4K random read QD1", 1.2),
    ("randwrite-qd32-first", "4K random write QD32, first touch", 1.5),
    ("randwrite-qd32-rewrite", "4K random write QD32, rewrite", 1.4),
    ("read-1m-qd8", "1M sequential read QD8", 1.8),
    ("write-1m-qd8", "1M sequential write QD8", 1.8),
    ("randrw-70-30-qd32", "4K 70/30 random read/write QD32", 1.5),
    ("randwrite-fsync-qd1", "4K random write + FLUSH after each", 2.0),
]
CPU_LIMIT_US = 12.0
CPU_TARGETS = [
    ("randread-qd32", "4K random read QD32"),
    ("randwrite-qd32-first", "4K random write QD32, first touch"),
    ("randwrite-qd32-rewrite", "4K random write QD32, rewrite"),
    ("randrw-70-30-qd32", "4K 70/30 random read/write QD32"),
]
MULTI_CONN_TARGETS = [
    ("randread-4x8", "randread-qd32", "4K random read: 4 connections x QD8 vs 1 x QD32"),
    ("randread-4x32", "randread-qd32", "4K random read: 4 connections x QD32 vs 1 x QD32"),
    (
        "randwrite-4x8-first",
        "randwrite-qd32-first",
        "4K random write, first touch: 4 connections x QD8 vs 1 x QD32",
    ),
]
WRITEBACK_TARGETS = [
    ("randread-qd32", "4K random read QD32"),
    ("randwrite-qd32-first", "4K random write QD32, first touch"),
    ("randwrite-qd32-rewrite", "4K random write QD32, rewrite"),
]


def load_fio(path):
    with open(path) as f:
        text = f.read()
    # fio's nbd engine may print a line before the JSON.
    return json.loads(text[text.index("{") :])


def fio_row(args):
    path, workload, server, rep, seq, ticks, clk_tck = args
    doc = load_fio(path)
    jobs = doc["jobs"]
    if any(j.get("error") for j in jobs):
        sys.exit(f"fio reported an error in {path}")
    iops = mbps = 0.0
    ios = 0
    p50 = p99 = 0.0
    for j in jobs:  # one with group_reporting
        m = j["mixed"]
        iops += m["iops"]
        mbps += m["bw_bytes"] / 1e6
        ios += m["total_ios"]
        pct = m["clat_ns"].get("percentile", {})
        p50 = max(p50, pct.get("50.000000", 0) / 1000)
        p99 = max(p99, pct.get("99.000000", 0) / 1000)
    if ios == 0:
        sys.exit(f"fio did no I/O in {path}")
    cpu = ""
    if ticks != "":
        cpu = f"{int(ticks) / int(clk_tck) * 1e6 / ios:.2f}"
    print(
        f"{workload},{server},{rep},{seq},{iops:.0f},{mbps:.1f},{p50:.1f},{p99:.1f},{ios},{cpu}"
    )


def read_meta(path):
    meta = {"note": []}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            if key == "note":
                meta["note"].append(value)
            else:
                meta[key] = value
    return meta


def fmt(x, digits=0):
    if x is None:
        return "-"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def summarize(rows):
    """{(workload, server): {metric: (median, min, max)}, plus runs}"""
    groups = {}
    for r in rows:
        groups.setdefault((r["workload"], r["server"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        s = {"runs": len(rs)}
        for m in METRICS:
            vals = [float(r[m]) for r in rs if r[m] != ""]
            s[m] = (statistics.median(vals), min(vals), max(vals)) if vals else None
        out[key] = s
    return out


def med(summary, workload, server, metric="iops"):
    s = summary.get((workload, server))
    if not s or s[metric] is None:
        return None
    return s[metric][0]


def best_of(summary, workload, candidates):
    best = None
    for c in candidates:
        v = med(summary, workload, c)
        if v is not None and (best is None or v > best[1]):
            best = (c, v)
    return best


def ratio_verdict(value, need):
    if value is None:
        return "not measured", ""
    if value >= need:
        return "**met**", f"+{value - need:.2f}x above the target ({(value / need - 1) * 100:.0f}%)"
    return (
        "**missed**",
        f"short by {need - value:.2f}x: ubd needs {(need / value - 1) * 100:.0f}% more",
    )


def report(a):
    meta = read_meta(a.meta)
    with open(a.runs) as f:
        rows = list(csv.DictReader(f))
    servers = a.servers.split(",")
    workloads = a.workloads.split(",")
    summary = summarize(rows)
    titles = {}
    for k, v in meta.items():
        if k.startswith("workload:"):
            title, _, fio = v.partition("|")
            titles[k[len("workload:") :]] = (title, fio)

    md = []
    md.append(f"# fio over NBD: ubd serve against qemu-nbd, nbdkit and nbd-server ({meta['date'][:10]})")
    md.append("")
    if meta.get("quick") == "1":
        md.append("**Quick mode: a smoke test of the script; these numbers mean nothing.**")
        md.append("")
    md.append(f"- Command: `{meta['command']}`")
    md.append(f"- Date: {meta['date']}")
    md.append(f"- Machine: {meta['machine']}")
    md.append(f"- Versions: {meta['versions']}")
    md.append(f"- Base: {meta['base']}, read-only; every server exports a fresh copy-on-write overlay over it, started fresh for each run")
    md.append(f"- Transport: {meta['transport']}; fio `--ioengine=nbd` (one connection per job)")
    md.append(
        f"- Runs: {meta['reps']} per server and workload, {meta['time']} s each "
        "(first-touch cases stop earlier when one pass over the device is done); "
        "servers interleaved A B C, then C B A"
    )
    md.append(f"- Page cache: {meta['caches']}")
    for s in servers:
        v = meta.get(f"verify:{s}")
        if v:
            md.append(f"- Checked before measuring, {s}: {v}")
    md.append(f"- Base file unchanged at the end: {meta['base_unchanged']}")
    for n in meta["note"]:
        md.append(f"- Note: {n}")
    md.append("")
    md.append("Servers:")
    md.append("")
    for s in servers:
        md.append(f"- `{s}`: {LABELS.get(s, s)}")
    md.append("")
    md.append(
        "Each cell is the median of the runs; IOPS and CPU show the spread (min-max). "
        "p50/p99 are fio's completion latency (reads and writes together). CPU is the "
        "server process's user + system time, with its reaped children's (from "
        "/proc/PID/stat, just before and after the fio run), per I/O. *vs best peer*: IOPS "
        "over the best median of qemu-nbd (either cache mode), nbdkit's cow filter and "
        "nbd-server for that workload; *vs disk*: over fio on the raw file without NBD. "
        "Where disk-fresh ran (fio on a fresh sparse file), a line under the table gives "
        "each server over it: what first touch of new blocks allows on this host."
    )
    md.append("")

    for w in workloads:
        title, fio = titles.get(w, (w, ""))
        md.append(f"## {title}")
        md.append("")
        md.append(f"`{w}`: {fio}")
        md.append("")
        best = best_of(summary, w, PEERS)
        disk = med(summary, w, "disk")
        md.append("| server | IOPS (min-max) | MB/s | p50 us | p99 us | CPU us/IO (min-max) | vs best peer | vs disk |")
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in servers:
            st = summary.get((w, s))
            if not st:
                continue
            i = st["iops"]
            c = st["cpu_us_per_io"]
            cpu = "-" if c is None else f"{c[0]:.1f} ({c[1]:.1f}-{c[2]:.1f})"
            vs_peer = None if best is None else i[0] / best[1]
            vs_disk = None if not disk else i[0] / disk
            md.append(
                f"| {s} | {fmt(i[0])} ({fmt(i[1])}-{fmt(i[2])}) | {fmt(st['mbps'][0], 1)} "
                f"| {fmt(st['p50_us'][0], 1)} | {fmt(st['p99_us'][0], 1)} | {cpu} "
                f"| {fmt_ratio(vs_peer)} | {fmt_ratio(vs_disk)} |"
            )
        if best is not None:
            md.append("")
            md.append(f"Best peer: {best[0]}.")
        fresh = med(summary, w, "disk-fresh")
        if fresh:
            against = [
                f"{s} {fmt_ratio(summary[(w, s)]['iops'][0] / fresh)}"
                for s in servers
                if s not in ("disk", "disk-fresh", "nbdkit-null") and (w, s) in summary
            ]
            if against:
                md.append("")
                md.append(f"Against first touch on the host (disk-fresh): {', '.join(against)}.")
        md.append("")

    # Targets.
    if meta.get("tls") == "1":
        md.append("## Issue 4's targets, as ratios in this run (set for plain NBD; this run used TLS)")
    else:
        md.append("## Targets (issue 4's, as ratios in this run)")
    md.append("")
    md.append("| target | measured | required | verdict | by how much | spread |")
    md.append("|---|---:|---:|---|---|---|")
    targets_met = targets_missed = 0

    def add(what, measured, need, verdict, how, spread):
        nonlocal targets_met, targets_missed
        if "met" in verdict and "missed" not in verdict:
            targets_met += 1
        elif "missed" in verdict:
            targets_missed += 1
        md.append(f"| {what} | {measured} | {need} | {verdict} | {how} | {spread} |")

    def ratio_spread(w1, s1, w2, s2):
        a = summary.get((w1, s1))
        b = summary.get((w2, s2))
        if not a or not b:
            return ""
        lo = a["iops"][1] / b["iops"][2]
        hi = a["iops"][2] / b["iops"][1]
        return f"{lo:.2f}x-{hi:.2f}x (worst-best pairing)"

    for w, what, need in RATIO_TARGETS:
        u = med(summary, w, "ubd-none")
        q = med(summary, w, "qemu-nbd-none")
        r = None if u is None or not q else u / q
        verdict, how = ratio_verdict(r, need)
        add(
            f"{what}: ubd-none / qemu-nbd-none",
            fmt_ratio(r),
            f">= {need:.1f}x",
            verdict,
            how,
            ratio_spread(w, "ubd-none", w, "qemu-nbd-none"),
        )
    for w, what in CPU_TARGETS:
        c = med(summary, w, "ubd-none", "cpu_us_per_io")
        q = med(summary, w, "qemu-nbd-none", "cpu_us_per_io")
        qtext = "" if q is None else f"qemu-nbd-none: {q:.1f} us"
        if c is None:
            verdict, how = "not measured", ""
        elif c <= CPU_LIMIT_US:
            verdict, how = "**met**", f"{CPU_LIMIT_US - c:.1f} us under the limit"
        else:
            verdict = "**missed**"
            how = f"{c - CPU_LIMIT_US:.1f} us over the limit ({(c / CPU_LIMIT_US - 1) * 100:.0f}% more)"
        add(
            f"server CPU per I/O, {what}: ubd-none",
            "-" if c is None else f"{c:.1f} us",
            f"<= {CPU_LIMIT_US:.0f} us",
            verdict,
            how,
            qtext,
        )
    for w4, w1, what in MULTI_CONN_TARGETS:
        u4 = med(summary, w4, "ubd-none")
        u1 = med(summary, w1, "ubd-none")
        r = None if u4 is None or not u1 else u4 / u1
        verdict, how = ratio_verdict(r, 1.0)
        add(f"{what}: ubd-none", fmt_ratio(r), ">= 1.0x", verdict, how, ratio_spread(w4, "ubd-none", w1, "ubd-none"))
    for w, what in WRITEBACK_TARGETS:
        u = med(summary, w, "ubd-writeback")
        best = best_of(summary, w, BUFFERED_PEERS)
        r = None if u is None or best is None else u / best[1]
        verdict, how = ratio_verdict(r, 1.0)
        peer = "best buffered peer" if best is None else best[0]
        add(
            f"{what}: ubd-writeback / {peer}",
            fmt_ratio(r),
            ">= 1.0x",
            verdict,
            how,
            "" if best is None else ratio_spread(w, "ubd-writeback", w, best[0]),
        )
    md.append("")
    md.append(
        f"{targets_met} met, {targets_missed} missed. Ratios are of median IOPS; "
        "the buffered peers are qemu-nbd --cache=writeback, nbdkit's cow filter "
        "(its overlay is a buffered temporary file) and nbd-server's copyonwrite mode "
        "(a buffered diff file per connection, deleted when the connection ends)."
    )
    md.append("")

    with open(a.md, "w") as f:
        f.write("\n".join(md))

    with open(a.csv, "w", newline="") as f:
        wr = csv.writer(f)
        head = ["workload", "server", "runs"]
        for m in METRICS:
            head += [f"{m}_median", f"{m}_min", f"{m}_max"]
        head += ["best_peer", "ratio_best_peer", "ratio_disk", "ratio_disk_fresh"]
        wr.writerow(head)
        for w in workloads:
            best = best_of(summary, w, PEERS)
            disk = med(summary, w, "disk")
            fresh = med(summary, w, "disk-fresh")
            for s in servers:
                st = summary.get((w, s))
                if not st:
                    continue
                row = [w, s, st["runs"]]
                for m in METRICS:
                    row += ["", "", ""] if st[m] is None else [f"{v:.2f}" for v in st[m]]
                i = st["iops"][0]
                row += [
                    "" if best is None else best[0],
                    "" if best is None else f"{i / best[1]:.3f}",
                    "" if not disk else f"{i / disk:.3f}",
                    "" if not fresh else f"{i / fresh:.3f}",
                ]
                wr.writerow(row)


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "fio-row":
        if len(sys.argv) != 9:
            sys.exit(__doc__)
        fio_row(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("command", choices=["report"])
    p.add_argument("--runs", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--servers", required=True)
    p.add_argument("--workloads", required=True)
    report(p.parse_args())


if __name__ == "__main__":
    main()
