#!/usr/bin/python3
"""SIGKILL `ubd serve` under a multi-connection NBD workload and check what
survives.

    crash.py --ubd PATH --dir DIR [--kills 25] [--seed S] [--size 32M]

An overlay over a random base is served; CONNS libnbd connections each own a
region of the device (so every byte has one writer) and keep DEPTH requests
in flight: writes (sector-aligned and at odd offsets and lengths, some FUA),
TRIMs, WRITE_ZEROES (with and without NO_HOLE, some FUA) and FLUSHes. Requests
in flight on one connection never overlap, so the requests touching any byte
are ordered: each completed before the next was sent. At a random moment the
server gets SIGKILL; it is restarted, the whole device is read back, and each
byte is checked:

- a write or zero is *committed* when it is an acknowledged FUA request, or
  was acknowledged before a FLUSH (on any connection: CAN_MULTI_CONN) was
  sent that then completed;
- a byte's candidates start as its value at the start of the run; a
  committed write or zero replaces them with its value; any other write or
  zero (acknowledged or in flight) adds its value; a TRIM adds zero (it may
  leave the old value or read as zeros);
- the byte must hold one of its candidates. Bytes no request touched must
  be unchanged.

The contents read become the next run's starting state. Every EPOCH kills
the overlay is made afresh, and each run sends 2 in 5 requests to a zone of
its region no earlier run of the epoch wrote, so there are always sectors
whose first write (and bitmap bit) races the kill. Even runs use
--cache none, odd ones --cache writeback. `ubd check` must pass after every
kill.

Prints `kills N, violations V`, details of violations, totals, and last a
line `RESULT {json}`. Exit status 1 when there was a violation, 2 when the
run itself failed.
"""

import argparse
import errno
import json
import os
import random
import select
import subprocess
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from relib import Server, ServerError, random_file  # noqa: E402

SECTOR = 512
CONNS = 4
DEPTH = 8
EPOCH = 8
MAX_DETAILS = 20


class Failure(Exception):
    """The run could not go on (not a model violation)."""


class Op:
    __slots__ = ("kind", "off", "len", "fua", "data", "sent", "acked", "error")

    def __init__(self, kind, off, length, fua, data, sent):
        self.kind = kind  # "W" write, "Z" zero, "T" trim, "F" flush
        self.off = off
        self.len = length
        self.fua = fua
        self.data = data
        self.sent = sent
        self.acked = None  # event number of the reply
        self.error = None

    def describe(self, committed):
        state = "committed" if committed else ("acked" if self.acked is not None else "in flight")
        return "%s [%d, +%d)%s %s" % (
            {"W": "write", "Z": "zero", "T": "trim", "F": "flush"}[self.kind],
            self.off,
            self.len,
            " fua" if self.fua else "",
            state,
        )


class Run:
    """One connection's share of one run."""

    def __init__(self, rng, region, zone, window):
        self.rng = rng
        self.region = region
        self.zone = zone
        self.window = window
        self.ops = []
        self.inflight = []


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def pick_range(rng, lo, hi, kind, long_lengths):
    """Offset and length inside [lo, hi)."""
    room = hi - lo
    r = rng.random()
    if kind == "W" and r < 0.65:
        # Sector-aligned: mostly small, some up to 256 KiB.
        sectors = rng.randint(1, 8) if rng.random() < 0.8 else rng.randint(1, 512)
        length = min(sectors * SECTOR, room // SECTOR * SECTOR)
        off = lo + rng.randrange((room - length) // SECTOR + 1) * SECTOR
        return off, length
    # Any offset and length: partial sectors at either end.
    length = rng.randint(1, 700) if r < 0.85 else rng.choice(long_lengths)
    length = min(length, room)
    return lo + rng.randrange(room - length + 1), length


class Bank:
    """Write payloads: python3-libnbd 1.14 never releases a buffer passed to
    aio_pwrite, so writes reuse these (a few per length, slices of one random
    block without zero bytes) instead of leaking their data."""

    BLOCK = 1 << 20
    VARIANTS = 4

    def __init__(self, rng):
        self.rng = rng
        self.view = memoryview(rng.randbytes(self.BLOCK).replace(b"\0", b"\x01"))
        self.by_len = {}

    def get(self, length):
        """(nbd.Buffer, its bytes) of `length` bytes."""
        have = self.by_len.setdefault(length, [])
        if len(have) < self.VARIANTS:
            at = self.rng.randrange(self.BLOCK - length + 1)
            data = self.view[at : at + length]
            have.append((nbd.Buffer.from_buffer(data), data))
        return self.rng.choice(have)


class Crash:
    def __init__(self, args):
        self.args = args
        self.dir = args.dir
        self.size = args.size
        self.region = self.size // CONNS // SECTOR * SECTOR
        self.zone_len = self.region // EPOCH // SECTOR * SECTOR
        self.rng = random.Random(args.seed)
        self.event = 0
        self.violations = []
        self.violation_count = 0
        self.totals = dict(
            ops=0,
            acked=0,
            committed=0,
            fua_acked=0,
            flushes_completed=0,
            in_flight_at_kill=0,
            durable_bytes=0,
            newer_bytes=0,
        )
        self.base_path = os.path.join(self.dir, "base.img")
        self.cow = os.path.join(self.dir, "disk.cow")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.log = os.path.join(self.dir, "serve.log")
        self.base = random_file(self.base_path, self.size, args.seed)
        self.bank = Bank(random.Random(self.rng.getrandbits(64)))
        self.long_lengths = [self.rng.randint(701, 70000) for _ in range(256)]

    def tick(self):
        self.event += 1
        return self.event

    def ubd(self, *argv):
        r = subprocess.run([self.args.ubd] + list(argv), capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr

    def fresh_overlay(self):
        if os.path.exists(self.cow):
            os.unlink(self.cow)
        code, out = self.ubd("create", "--backing", self.base_path, self.cow)
        if code != 0:
            raise Failure("ubd create: " + out)

    def serve(self, run):
        cache = "none" if run % 2 == 0 else "writeback"
        server = Server(self.args.ubd, self.cow, self.sock, self.log, ["--cache", cache])
        server.wait_ready()
        return server

    def read_all(self, server):
        h = nbd.NBD()
        h.connect_uri(server.uri())
        out = bytearray()
        step = 4 << 20
        for off in range(0, self.size, step):
            out += h.pread(min(step, self.size - off), off)
        h.shutdown()
        return bytes(out)

    # -- the workload

    def submit(self, h, run):
        rng = run.rng
        r = rng.random()
        if r < 0.04:
            op = Op("F", 0, 0, False, None, 0)
        else:
            kind = "W" if r < 0.66 else ("Z" if r < 0.83 else "T")
            for _ in range(20):
                if rng.random() < 0.4:
                    lo, hi = run.zone
                else:
                    lo, hi = run.window
                off, length = pick_range(rng, lo, hi, kind, self.long_lengths)
                if all(off + length <= o.off or o.off + o.len <= off for o in run.inflight):
                    break
            else:
                return False
            if kind != "W" and rng.random() < 0.5:
                length = min(length + rng.randrange(256 << 10), hi - off)
                if any(off < o.off + o.len and o.off < off + length for o in run.inflight):
                    return False
            fua = rng.random() < (0.125 if kind != "T" else 0.1)
            buf = data = None
            if kind == "W":
                buf, data = self.bank.get(length)
            op = Op(kind, off, length, fua, data, 0)
        flags = nbd.CMD_FLAG_FUA if op.fua else 0

        def done(err, op=op, run=run):
            op.acked = self.tick()
            op.error = err.value
            if err.value != 0:
                op.acked = None
            run.inflight.remove(op)
            return 1

        op.sent = self.tick()
        run.ops.append(op)
        run.inflight.append(op)
        if op.kind == "F":
            h.aio_flush(completion=done)
        elif op.kind == "W":
            h.aio_pwrite(buf, op.off, completion=done, flags=flags)
        elif op.kind == "Z":
            if rng.random() < 0.5:
                flags |= nbd.CMD_FLAG_NO_HOLE
            h.aio_zero(op.len, op.off, completion=done, flags=flags)
        else:
            h.aio_trim(op.len, op.off, completion=done, flags=flags)
        return True

    def workload(self, server, k, epoch_run):
        handles, runs = [], []
        zone_start = epoch_run * self.zone_len
        for c in range(CONNS):
            h = nbd.NBD()
            h.connect_uri(server.uri())
            if not h.can_multi_conn() or not h.can_fua() or not h.can_trim() or not h.can_zero():
                raise Failure("the server does not advertise MULTI_CONN, FUA, TRIM and WRITE_ZEROES")
            base = c * self.region
            handles.append(h)
            runs.append(
                Run(
                    random.Random(self.rng.getrandbits(64)),
                    (base, base + self.region),
                    (base + zone_start, base + zone_start + self.zone_len),
                    (base, base + zone_start + self.zone_len),
                )
            )
        delay = self.rng.uniform(0.02, 0.5) if self.rng.random() < 0.9 else self.rng.uniform(0.5, 2.0)
        kill_at = time.monotonic() + delay
        killed = False
        limit = time.monotonic() + delay + 60
        poller = select.poll()
        fds = {h.aio_get_fd(): h for h in handles}
        while True:
            now = time.monotonic()
            if now > limit:
                raise Failure("run %d: requests still in flight 60 s after the kill" % k)
            if not killed and now >= kill_at:
                for run in runs:
                    self.totals["in_flight_at_kill"] += len(run.inflight)
                server.kill()
                killed = True
            if not killed:
                for h, run in zip(handles, runs):
                    while len(run.inflight) < DEPTH and self.submit(h, run):
                        pass
            live = [h for h, run in zip(handles, runs) if run.inflight and not h.aio_is_dead()]
            if killed and not live:
                break
            for fd, h in fds.items():
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
                if h.aio_is_dead() or h.aio_is_closed():
                    continue
                d = h.aio_get_direction()
                ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | (
                    select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0
                )
                if ev:
                    poller.register(fd, ev)
            timeout = 100 if killed else max(0, min(100, int((kill_at - now) * 1000) + 1))
            for fd, ev in poller.poll(timeout):
                h = fds[fd]
                try:
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        h.aio_notify_read()
                    elif ev & select.POLLOUT:
                        h.aio_notify_write()
                except nbd.Error as e:
                    if not killed:
                        raise Failure("run %d: connection failed before the kill: %s" % (k, e))
        for h, run in zip(handles, runs):
            if run.inflight:
                # A dead handle retires its commands; none may stay pending.
                raise Failure("run %d: %d requests never completed" % (k, len(run.inflight)))
            for op in run.ops:
                if op.error not in (None, 0) and op.error not in (errno.ENOTCONN, errno.ESHUTDOWN, errno.EPIPE, errno.ECONNRESET):
                    self.violation("run %d: %s failed with %s" % (k, op.describe(False), errno.errorcode.get(op.error, op.error)))
        return runs

    # -- the model

    def violation(self, text):
        self.violation_count += 1
        if len(self.violations) < MAX_DETAILS:
            self.violations.append(text)

    def check(self, k, runs, before, found):
        flush_mark = 0  # newest send event of a completed flush
        for run in runs:
            for op in run.ops:
                if op.kind == "F" and op.acked is not None:
                    flush_mark = max(flush_mark, op.sent)
                    self.totals["flushes_completed"] += 1

        def committed(op):
            return op.acked is not None and op.kind != "F" and (op.fua or op.acked < flush_mark)

        covered = []
        for run in runs:
            ops = [op for op in run.ops if op.kind != "F"]
            self.totals["ops"] += len(run.ops)
            self.totals["acked"] += sum(1 for op in run.ops if op.acked is not None)
            self.totals["committed"] += sum(1 for op in ops if committed(op))
            self.totals["fua_acked"] += sum(1 for op in ops if op.fua and op.acked is not None)
            self.check_region(k, run.region, ops, committed, before, found)
            covered.append(run.region)
        # Bytes outside every region (the tail) never change.
        end = max(r[1] for r in covered)
        if found[end:] != before[end:]:
            self.violation("run %d: bytes past the last region changed" % k)

    def check_region(self, k, region, ops, committed, before, found):
        lo, hi = region
        # Segments of the region between request boundaries: every byte of
        # a segment is touched by the same requests.
        points = {lo, hi}
        for op in ops:
            points.add(op.off)
            points.add(op.off + op.len)
        points = sorted(points)
        starts = sorted(range(len(ops)), key=lambda i: ops[i].off)
        ends = sorted(range(len(ops)), key=lambda i: ops[i].off + ops[i].len)
        active = set()
        si = ei = 0
        for a, b in zip(points, points[1:]):
            while si < len(starts) and ops[starts[si]].off <= a:
                active.add(starts[si])
                si += 1
            while ei < len(ends) and ops[ends[ei]].off + ops[ends[ei]].len <= a:
                active.discard(ends[ei])
                ei += 1
            got = found[a:b]
            if not active:
                if got != before[a:b]:
                    p = a + next(i for i in range(b - a) if got[i] != before[a + i])
                    self.report(k, p, found[p : p + 1], [(before[p : p + 1], "its value before the run")], [])
                continue
            touching = [ops[i] for i in sorted(active)]
            cands = [(before[a:b], "its value before the run")]
            pinned = False
            zero = bytes(b - a)
            for op in touching:
                value = zero if op.kind != "W" else bytes(op.data[a - op.off : b - op.off])
                what = op.describe(committed(op))
                if op.kind == "T":
                    cands.append((zero, what))
                    pinned = False
                elif committed(op):
                    cands = [(value, what)]
                    pinned = True
                else:
                    cands.append((value, what))
                    pinned = False
            if pinned:
                self.totals["durable_bytes"] += b - a
            if any(got == c for c, _ in cands):
                if got != cands[0][0]:
                    self.totals["newer_bytes"] += b - a
                continue
            self.fine_check(k, a, b, got, cands, touching, committed)

    def fine_check(self, k, a, b, got, cands, touching, committed):
        """Sector pieces, then bytes, of a segment that matches no candidate
        as a whole (an unflushed request may have landed in part)."""
        at = a
        while at < b:
            nxt = min(b, (at // SECTOR + 1) * SECTOR)
            piece = got[at - a : nxt - a]
            if not any(piece == c[at - a : nxt - a] for c, _ in cands):
                for p in range(at, nxt):
                    if not any(got[p - a] == c[p - a] for c, _ in cands):
                        self.report(k, p, got[p - a : p - a + 1], [(c[p - a : p - a + 1], w) for c, w in cands], touching, committed)
                        return
            at = nxt

    def report(self, k, a, got, cands, touching, committed=None):
        self.violation(
            "run %d: byte %d (sector %d) reads %d; acceptable: %s; requests touching it: [%s]"
            % (
                k,
                a,
                a // SECTOR,
                got[0],
                "; ".join("%d (%s)" % (c[0], w) for c, w in cands),
                "; ".join(op.describe(committed(op)) for op in touching) if touching else "none",
            )
        )

    # -- the loop

    def main(self):
        kills = self.args.kills
        server = None
        state = None
        t0 = time.monotonic()
        try:
            for k in range(kills):
                epoch_run = k % EPOCH
                if epoch_run == 0:
                    if server is not None:
                        status = server.stop()
                        if status != 0:
                            raise Failure("ubd serve exited with %s on SIGTERM:\n%s" % (status, server.stderr()))
                    self.fresh_overlay()
                    state = self.base
                    server = self.serve(k)
                runs = self.workload(server, k, epoch_run)
                code, out = self.ubd("check", self.cow)
                if code != 0:
                    self.violation("run %d: ubd check after the kill: exit %d: %s" % (k, code, out.strip()))
                server = self.serve(k + 1)
                found = self.read_all(server)
                before_count = self.violation_count
                self.check(k, runs, state, found)
                state = found
                if self.args.verbose or self.violation_count != before_count:
                    ops = sum(len(r.ops) for r in runs)
                    print("kill %d: %d requests, %d violations" % (k + 1, ops, self.violation_count - before_count), flush=True)
            if server is not None:
                status = server.stop()
                if status != 0:
                    raise Failure("ubd serve exited with %s on SIGTERM:\n%s" % (status, server.stderr()))
        except (Failure, ServerError, nbd.Error) as e:
            if server is not None and server.proc.poll() is None:
                server.kill()
            print("FAILED: %s" % e, flush=True)
            if server is not None:
                print("server stderr (tail):\n%s" % server.stderr())
            return 2
        t = self.totals
        print("kills %d, violations %d" % (kills, self.violation_count))
        for v in self.violations:
            print("violation: " + v)
        print(
            "requests %d, acked %d, committed %d (FUA %d acked), flushes completed %d, in flight at the kills %d"
            % (t["ops"], t["acked"], t["committed"], t["fua_acked"], t["flushes_completed"], t["in_flight_at_kill"])
        )
        print(
            "bytes pinned by a committed request and checked: %d (%d sectors); bytes found newer than their start value: %d"
            % (t["durable_bytes"], t["durable_bytes"] // SECTOR, t["newer_bytes"])
        )
        result = dict(t, kills=kills, violations=self.violation_count, seconds=round(time.monotonic() - t0, 1), seed=self.args.seed)
        print("RESULT " + json.dumps(result), flush=True)
        return 1 if self.violation_count else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ubd", required=True)
    p.add_argument("--dir", required=True, help="work directory (on a disk that takes O_DIRECT)")
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--size", type=parse_size, default=32 << 20)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    print("crash.py: seed %d, %d kills, %d MiB, %d connections x %d in flight" % (args.seed, args.kills, args.size >> 20, CONNS, DEPTH), flush=True)
    sys.exit(Crash(args).main())


if __name__ == "__main__":
    main()
