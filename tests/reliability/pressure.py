#!/usr/bin/python3
"""32 MiB requests at queue depth 16 on 16 connections against a server
whose buffer pool is tiny and fails every ordinary allocation.

    pressure.py --uri URI --size BYTES [--rounds 1] [--conns 16] [--depth 16]

Connection i owns region i of the device (size / conns bytes, at least
64 MiB). The data written at region offset q is always B[s_i + q], with B
one random buffer shared by every connection and s_i a per-connection
shift, so overlapping writes in flight carry the same bytes and the outcome
is known whatever order the server runs them in; every write is sent out of
B without a copy, which keeps client memory small.

Per connection and round:
1. DEPTH writes of 32 MiB (odd and sector-aligned offsets) all in flight;
2. DEPTH more requests with DEPTH in flight: READ_DEPTH 32 MiB reads, each
   checked against the expected bytes, and the rest 32 MiB writes that
   rewrite bytes already written (so the reads know what they must see);
3. the whole region read back (READ_DEPTH in flight) and checked.
Bytes never written must read as the base (all zeros here).

Client memory: B (region + 32 MiB) plus conns x READ_DEPTH read buffers of
32 MiB: about 2.1 GiB with the defaults. Writes need no buffer of their own;
reads do, so reads are capped at READ_DEPTH = 4 of the 16 in flight.
(python3-libnbd 1.14 never releases a buffer given to aio_pread or
aio_pwrite: read buffers are reused, and a write's buffer is a view of B.)

Prints one line per round and last `RESULT {json}`; exit status 1 on a
mismatch or an error reply. Nothing here times anything.
"""

import argparse
import json
import os
import random
import select
import sys
import time

import nbd

MIB = 1 << 20
REQ = 32 * MIB
READ_DEPTH = 4
ZEROS = memoryview(bytes(REQ))


class Failure(Exception):
    pass


class Conn:
    def __init__(self, uri, index, region, shift):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.index = index
        self.lo, self.hi = region
        self.shift = shift
        self.inflight = 0
        self.reads = 0
        self.done = 0
        self.free_bufs = [nbd.Buffer(REQ) for _ in range(READ_DEPTH)]


class Pressure:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.region = args.size // args.conns // 512 * 512
        if self.region < 2 * REQ:
            raise SystemExit("each connection needs a region of at least 64 MiB")
        self.pattern = self.rng.randbytes(self.region + REQ)
        self.view = memoryview(self.pattern)
        self.conns = []
        self.written = []  # per connection: sorted, merged list of [lo, hi)
        self.errors = []
        self.bytes_written = 0
        self.bytes_read = 0
        self.requests = 0
        self.peak_inflight = 0

    # expected contents
    def mismatch(self, c, off, got):
        """The first byte of got (read at off) that differs from what
        connection c's region holds there, as (offset, got, want), or None."""
        end = off + len(got)
        at = off
        spans = [(lo, hi) for lo, hi in self.written[c.index] if lo < end and off < hi]
        for lo, hi in spans + [(end, end)]:
            lo, hi = max(lo, off), min(hi, end)
            if at < lo and got[at - off : lo - off] != ZEROS[: lo - at]:
                p = at + next(i for i in range(lo - at) if got[at - off + i] != 0)
                return p, got[p - off], 0
            q = lo - c.lo
            want = self.view[c.shift + q : c.shift + q + (hi - lo)]
            if lo < hi and got[lo - off : hi - off] != want:
                i = next(i for i in range(hi - lo) if got[lo - off + i] != want[i])
                return lo + i, got[lo - off + i], want[i]
            at = max(at, hi)
        return None

    def mark_written(self, c, off, length):
        spans = self.written[c.index] + [[off, off + length]]
        spans.sort()
        merged = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.written[c.index] = merged

    def pick_offset(self, c):
        room = self.region - REQ
        if self.rng.random() < 0.5:
            return c.lo + self.rng.randrange(room // 512 + 1) * 512
        return c.lo + self.rng.randrange(room + 1)

    # requests
    def write(self, c, off):
        q = off - c.lo

        def done(err, c=c, off=off):
            c.inflight -= 1
            c.done += 1
            if err.value != 0:
                self.errors.append("connection %d: WRITE of 32 MiB at %d failed: %s" % (c.index, off, os.strerror(err.value)))
            return 1

        c.h.aio_pwrite(nbd.Buffer.from_buffer(self.view[c.shift + q : c.shift + q + REQ]), off, completion=done)
        c.inflight += 1
        self.requests += 1
        self.bytes_written += REQ

    def read(self, c, off):
        buf = c.free_bufs.pop()

        def done(err, c=c, off=off, buf=buf):
            c.inflight -= 1
            c.reads -= 1
            c.done += 1
            if err.value != 0:
                self.errors.append("connection %d: READ of 32 MiB at %d failed: %s" % (c.index, off, os.strerror(err.value)))
            else:
                bad = self.mismatch(c, off, memoryview(buf.to_buffer()))
                if bad:
                    self.errors.append("connection %d: READ of 32 MiB at %d: byte %d reads %d, expected %d" % ((c.index, off) + bad))
            c.free_bufs.append(buf)
            return 1

        c.h.aio_pread(buf, off, completion=done)
        c.inflight += 1
        c.reads += 1
        self.requests += 1
        self.bytes_read += REQ

    def pump(self, until):
        """Runs every connection's state machine until until() is true."""
        poller = select.poll()
        fds = {c.h.aio_get_fd(): c for c in self.conns}
        deadline = time.monotonic() + self.args.stall
        last_done = -1
        while not until():
            done = sum(c.done for c in self.conns)
            if done != last_done:
                last_done = done
                deadline = time.monotonic() + self.args.stall
            elif time.monotonic() > deadline:
                raise Failure("no request completed for %d s: %d in flight" % (self.args.stall, sum(c.inflight for c in self.conns)))
            self.peak_inflight = max(self.peak_inflight, sum(c.inflight for c in self.conns))
            for fd, c in fds.items():
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
                if c.h.aio_is_dead():
                    raise Failure("connection %d died" % c.index)
                d = c.h.aio_get_direction()
                ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
                if ev:
                    poller.register(fd, ev)
            for fd, ev in poller.poll(1000):
                c = fds[fd]
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    c.h.aio_notify_read()
                elif ev & select.POLLOUT:
                    c.h.aio_notify_write()
            if self.errors:
                raise Failure(self.errors[0])

    def round(self, r):
        depth = self.args.depth
        # 1. DEPTH writes in flight on every connection.
        for c in self.conns:
            for _ in range(depth):
                off = self.pick_offset(c)
                self.write(c, off)
                self.mark_written(c, off, REQ)
        self.pump(lambda: all(c.inflight == 0 for c in self.conns))
        # 2. Reads and writes mixed, DEPTH in flight; reads see only bytes
        # that no write in flight changes (they rewrite what is there).
        todo = {c.index: depth for c in self.conns}

        def refill():
            for c in self.conns:
                while c.inflight < depth and todo[c.index] > 0:
                    todo[c.index] -= 1
                    if c.reads < READ_DEPTH:
                        self.read(c, self.pick_offset(c))
                    else:
                        # Inside a span already written (each is >= 32 MiB).
                        lo, hi = self.rng.choice(self.written[c.index])
                        self.write(c, lo + self.rng.randrange(hi - REQ - lo + 1))
            return all(c.inflight == 0 for c in self.conns) and not any(todo.values())

        self.pump(refill)
        # 3. The whole region read back.
        for c in self.conns:
            c.pending = list(range(c.lo, c.hi, REQ))

        def read_back():
            for c in self.conns:
                while c.pending and c.reads < READ_DEPTH:
                    self.read(c, min(c.pending.pop(), c.hi - REQ))
            return all(c.inflight == 0 and not c.pending for c in self.conns)

        self.pump(read_back)
        print(
            "round %d: %d requests, %.1f GiB written, %.1f GiB read, peak %d in flight"
            % (r + 1, self.requests, self.bytes_written / (1 << 30), self.bytes_read / (1 << 30), self.peak_inflight),
            flush=True,
        )

    def main(self):
        t0 = time.monotonic()
        try:
            for i in range(self.args.conns):
                lo = i * self.region
                c = Conn(self.args.uri, i, (lo, lo + self.region), self.rng.randrange(REQ))
                self.conns.append(c)
                self.written.append([])
            for r in range(self.args.rounds):
                self.round(r)
        except (Failure, nbd.Error) as e:
            print("FAILED: %s" % e, flush=True)
            for e in self.errors[1:10]:
                print("also: " + e)
            return 1
        for c in self.conns:
            c.h.shutdown()
        result = dict(
            connections=self.args.conns,
            depth=self.args.depth,
            rounds=self.args.rounds,
            requests=self.requests,
            bytes_written=self.bytes_written,
            bytes_read=self.bytes_read,
            peak_in_flight=self.peak_inflight,
            errors=len(self.errors),
            seconds=round(time.monotonic() - t0, 1),
        )
        print("RESULT " + json.dumps(result), flush=True)
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", required=True)
    p.add_argument("--size", type=int, required=True, help="the export's size")
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stall", type=int, default=120, help="fail when no request completes for this long (s)")
    sys.exit(Pressure(p.parse_args()).main())


if __name__ == "__main__":
    main()
