"""Runs NBD requests one after another on one libnbd connection and prints
one line per request: `ok`, or `err NAME` with the errno libnbd reported.

Usage: ops.py SOCKET [--export NAME] OP...   where OP is
  w:OFFSET:LEN:SEED    write LEN bytes of the pattern SEED at OFFSET
  r:OFFSET:LEN:SEED    read, and compare with the pattern SEED (`bad` if not)
  f                    flush
Patterns: byte i of pattern SEED at device offset p is (p * 7 + SEED) % 251
+ 1, so every seed's bytes differ from zeros and from other seeds'.
"""

import errno
import sys

import nbd


def pattern(seed, offset, length):
    if seed == 0:
        return bytes(length)
    return bytes(((offset + i) * 7 + seed) % 251 + 1 for i in range(length))


def main():
    h = nbd.NBD()
    ops = sys.argv[2:]
    if ops[:1] == ["--export"]:
        h.set_export_name(ops[1])
        ops = ops[2:]
    h.connect_unix(sys.argv[1])
    for spec in ops:
        parts = spec.split(":")
        try:
            if parts[0] == "f":
                h.flush()
                print("ok")
                continue
            off, length, seed = (int(x) for x in parts[1:4])
            if parts[0] == "w":
                h.pwrite(pattern(seed, off, length), off)
                print("ok")
            else:
                got = h.pread(length, off)
                print("ok" if got == pattern(seed, off, length) else "bad")
        except nbd.Error as e:
            print("err", e.errno or "?")
        sys.stdout.flush()
    h.shutdown()


if __name__ == "__main__":
    main()
