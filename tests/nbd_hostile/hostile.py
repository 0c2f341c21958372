#!/usr/bin/python3
"""Hostile and odd NBD clients, one case per sub-command, for tests/nbd_hostile.rs.

    hostile.py CASE SOCKET BASE

SOCKET is the server's Unix socket; BASE is a file holding what the default
export reads as when the case starts (the export is exactly as long).

Each case sends its odd input, checks the answer ../shared/docs/nbd.md asks
for, and checks that the server still answers properly. It prints one line per
check and ends with `PASS CASE`; on a wrong answer it raises (exit status 1)
with a message saying what was sent, what was expected and what came back.
Nothing here depends on timing: socket time-outs only turn a hang into a
failure.
"""

import errno
import os
import select
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rawnbd as R  # noqa: E402
from rawnbd import Closed, Conn, ProtocolError, errno_name, rep_name  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
U64 = 1 << 64


class Ctx:
    def __init__(self, sock, base):
        self.sock = sock
        self.base_path = base
        with open(base, "rb") as f:
            self.base = f.read()
        self.size = len(self.base)

    def expect_data(self, c, offset, length, what):
        got = c.read(offset, length)
        want = self.base[offset : offset + length]
        if got != want:
            first = next(i for i in range(length) if got[i] != want[i])
            fail("%s: READ [%d, +%d) differs from the expected data at byte %d" % (what, offset, length, offset + first))


def fail(msg):
    raise ProtocolError(msg)


def log(msg):
    print(msg, flush=True)


def expect_errno(reply, allowed, what):
    if isinstance(allowed, int):
        allowed = (allowed,)
    if reply.error not in allowed:
        fail(
            "%s: expected %s, got %s (%r)"
            % (what, "/".join(errno_name(a) for a in allowed), errno_name(reply.error), reply)
        )
    log("ok: %s -> %s" % (what, errno_name(reply.error)))


def expect_rep(rep, allowed, what):
    if isinstance(allowed, int):
        allowed = (allowed,)
    if rep not in allowed:
        fail("%s: expected %s, got %s" % (what, "/".join(rep_name(a) for a in allowed), rep_name(rep)))
    log("ok: %s -> %s" % (what, rep_name(rep)))


def expect_closed(c, what, allow_bytes=False):
    """The server must close `c`; returns what it sent first."""
    got = c.read_to_eof()
    if got and not allow_bytes:
        fail("%s: expected the server to close the connection without a reply, got %d bytes %r" % (what, len(got), got[:64]))
    log("ok: %s -> connection closed (%d bytes before EOF)" % (what, len(got)))
    c.close()
    return got


def send_maybe_closed(c, send):
    """Sends something the server may already have hung up on."""
    try:
        send()
    except (BrokenPipeError, ConnectionResetError):
        pass


def still_serves(ctx, what):
    """A fresh, well-behaved connection: handshake, a read checked against
    BASE, a LIST."""
    c = Conn(ctx.sock)
    c.greet()
    names = c.list_exports()
    if b"" not in names:
        fail("after %s: LIST does not name the default export: %r" % (what, names))
    c.negotiate_structured()
    size, _ = c.go()
    if size != ctx.size:
        fail("after %s: export size %d, expected %d" % (what, size, ctx.size))
    ctx.expect_data(c, 0, 65536, "after %s" % what)
    c.disc()
    c.close()
    log("ok: a fresh connection works after %s" % what)


def negotiated(ctx, extended):
    """A connection past its greeting, with extended headers or structured
    replies negotiated."""
    c = Conn(ctx.sock)
    c.greet()
    if extended:
        c.negotiate_extended()
    else:
        c.negotiate_structured()
    return c


def libnbd_handle(ctx, strict=0):
    import nbd

    h = nbd.NBD()
    h.set_strict_mode(strict)
    h.connect_unix(ctx.sock)
    return h


def libnbd_errno(fn, *args, **kwargs):
    """Runs a libnbd call; returns 0 on success or the errno of nbd.Error."""
    import nbd

    try:
        fn(*args, **kwargs)
        return 0
    except nbd.Error as e:
        # libnbd gives the errno as its name ("EINVAL").
        return getattr(errno, e.errno or "", -1)


# --------------------------------------------------------------------------
# Handshake phase
# --------------------------------------------------------------------------


def case_unknown_options(ctx):
    c = Conn(ctx.sock)
    c.greet()
    for opt in (0, R.OPT_PEEK_EXPORT, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF):
        for data in (b"", b"unknown option data"):
            rep, _ = c.option(opt, data)
            expect_rep(rep, R.REP_ERR_UNSUP, "unknown option %d with %d data bytes" % (opt, len(data)))
    # Exactly 64 KiB of data is still within the cap: skipped, answered.
    rep, _ = c.option(0x4242, b"\xa5" * 65536)
    expect_rep(rep, R.REP_ERR_UNSUP, "unknown option with 64 KiB of data")
    rep, _ = c.option(R.OPT_STARTTLS)
    expect_rep(rep, R.REP_ERR_POLICY, "STARTTLS without TLS configured")
    rep, _ = c.option(R.OPT_LIST, b"junk")
    expect_rep(rep, R.REP_ERR_INVALID, "LIST with data")
    rep, _ = c.option(R.OPT_STRUCTURED_REPLY, b"x")
    expect_rep(rep, R.REP_ERR_INVALID, "STRUCTURED_REPLY with data")
    meta = Conn.meta_data(b"", [b"base:allocation"])
    rep, _ = c.option(R.OPT_SET_META_CONTEXT, meta)
    expect_rep(rep, R.REP_ERR_INVALID, "SET_META_CONTEXT before STRUCTURED_REPLY")
    # nbd.md asks ERR_INVALID; proto.md lets LIST_META_CONTEXT be answered
    # before structured replies (qemu-nbd does), so either is accepted.
    rep, _ = c.option(R.OPT_LIST_META_CONTEXT, meta)
    expect_rep(rep, (R.REP_ERR_INVALID, R.REP_ACK), "LIST_META_CONTEXT before STRUCTURED_REPLY")
    rep, _ = c.info_or_go(R.OPT_GO, b"no-such-export")
    expect_rep(rep, R.REP_ERR_UNKNOWN, "GO for an unknown export")
    rep, _ = c.info_or_go(R.OPT_INFO, b"no-such-export")
    expect_rep(rep, R.REP_ERR_UNKNOWN, "INFO for an unknown export")
    # The same connection goes on: LIST, then GO and a checked read.
    names = c.list_exports()
    if b"" not in names:
        fail("LIST after the unknown options does not name the default export: %r" % names)
    log("ok: LIST on the same connection: %r" % names)
    c.go()
    ctx.expect_data(c, 0, 4096, "READ on the connection that sent unknown options")
    c.disc()
    c.close()

    # ABORT gets an ACK (or at worst a close), and nothing else.
    c = Conn(ctx.sock)
    c.greet()
    c.send_opt(R.OPT_ABORT)
    try:
        rep, _ = c.read_opt_reply(R.OPT_ABORT)
        expect_rep(rep, R.REP_ACK, "ABORT")
    except Closed:
        log("ok: ABORT -> closed without ACK")
    c.close()

    # ABORT with data: proto.md says the server MUST reply ACK and SHOULD
    # ignore the data; then the session ends.
    c = Conn(ctx.sock)
    c.greet()
    c.send_opt(R.OPT_ABORT, b"unexpected abort data")
    rep, _ = c.read_opt_reply(R.OPT_ABORT)
    expect_rep(rep, R.REP_ACK, "ABORT with 21 data bytes")
    expect_closed(c, "after ABORT with data")

    # EXPORT_NAME for an unknown export: the server can only close.
    c = Conn(ctx.sock)
    c.greet()
    c.send_opt(R.OPT_EXPORT_NAME, b"no-such-export")
    expect_closed(c, "EXPORT_NAME for an unknown export")

    # EXPORT_NAME for the default export works (NO_ZEROES: 10 bytes).
    c = Conn(ctx.sock)
    c.greet()
    c.send_opt(R.OPT_EXPORT_NAME, b"")
    size, _ = struct.unpack(">QH", c.recv_exact(10))
    if size != ctx.size:
        fail("EXPORT_NAME: size %d, expected %d" % (size, ctx.size))
    ctx.expect_data(c, 4096, 4096, "READ after EXPORT_NAME")
    c.disc()
    c.close()
    log("ok: EXPORT_NAME \"\" enters transmission")

    # libnbd in option mode: unknown export names, LIST, INFO.
    import nbd

    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(ctx.sock)
    seen = []
    h.opt_list(lambda name, desc: seen.append(name))
    if "" not in seen:
        fail("libnbd opt_list: %r" % seen)
    h.set_export_name("no-such-export")
    e = libnbd_errno(h.opt_info)
    if e == 0:
        fail("libnbd opt_info of an unknown export succeeded")
    h.set_export_name("")
    h.opt_info()
    if h.get_size() != ctx.size:
        fail("libnbd opt_info size %d" % h.get_size())
    h.opt_go()
    if h.pread(512, 0) != ctx.base[:512]:
        fail("libnbd read after opt mode differs")
    h.shutdown()
    log("ok: libnbd opt mode: list, info of unknown and known export, go")

    still_serves(ctx, "unknown options")


def case_option_lengths(ctx):
    # Option data lengths far over the 64 KiB cap: the server must hang up
    # without reading (or allocating) them.
    for opt, length in (
        (R.OPT_GO, 0x80000000),
        (R.OPT_INFO, 0xFFFFFFFF),
        (R.OPT_LIST, 0x80000000),
        (R.OPT_EXPORT_NAME, 0x80000000),
        (R.OPT_SET_META_CONTEXT, 0x80000000),
        (0x4242, 0x80000000),
        (0x4242, 0xFFFFFFFF),
        (R.OPT_GO, 65537),
    ):
        c = Conn(ctx.sock)
        c.greet()
        send_maybe_closed(c, lambda: c.send_opt(opt, b"\0" * 64, length=length))
        got = expect_closed(c, "option %d claiming %d data bytes" % (opt, length), allow_bytes=True)
        # At most an error reply may precede the close.
        if got:
            if len(got) < 20 or struct.unpack(">Q", got[:8])[0] != R.REPLY_MAGIC:
                fail("option %d claiming %d bytes: the server sent %r before closing" % (opt, length, got[:40]))
            rep = struct.unpack(">I", got[12:16])[0]
            if not rep & R.ERR_BIT:
                fail("option %d claiming %d bytes: the server answered %s" % (opt, length, rep_name(rep)))
    still_serves(ctx, "option lengths of 2 GiB")


def case_long_names(ctx):
    c = Conn(ctx.sock)
    c.greet()
    for opt, n in ((R.OPT_GO, 4097), (R.OPT_INFO, 8192), (R.OPT_GO, 60000)):
        rep, _ = c.info_or_go(opt, b"n" * n)
        expect_rep(
            rep,
            (R.REP_ERR_TOO_BIG, R.REP_ERR_UNKNOWN, R.REP_ERR_INVALID),
            "%s with a %d-byte name" % ("GO" if opt == R.OPT_GO else "INFO", n),
        )
    # Names that are not valid strings (NUL, bad UTF-8) or just unknown.
    for name in (b"\x00", b"\xff\xfe", b"a\x00b", b"/", b"%2f"):
        rep, _ = c.info_or_go(R.OPT_INFO, name)
        expect_rep(rep, (R.REP_ERR_INVALID, R.REP_ERR_UNKNOWN), "INFO for the name %r" % name)
    # 4096 bytes is a legal length for a name, just not one that exists.
    rep, _ = c.info_or_go(R.OPT_INFO, b"m" * 4096)
    expect_rep(rep, R.REP_ERR_UNKNOWN, "INFO with a 4096-byte unknown name")

    # Lengths inside the option that do not fit it: parse strictly, answer
    # ERR_INVALID, go on.
    bad = [
        ("GO whose name length exceeds the option", R.OPT_GO, Conn.go_data(b"abc", name_len=0xFFFFFFFF)),
        ("GO whose name length is one past the data", R.OPT_GO, Conn.go_data(b"", name_len=3)),
        ("INFO claiming 1000 info requests it lacks", R.OPT_INFO, Conn.go_data(b"", ninfo=1000)),
        ("GO with an odd trailing byte", R.OPT_GO, Conn.go_data(b"", infos=(3,)) + b"\x00"),
        ("GO too short for its header", R.OPT_GO, b"\x00\x00"),
    ]
    for what, opt, data in bad:
        rep, _ = c.option(opt, data)
        expect_rep(rep, R.REP_ERR_INVALID, what)

    c.negotiate_structured()
    # Meta context queries: an oversize export name or query is an error or
    # ignored, never fatal.
    for what, data in (
        ("SET_META_CONTEXT with a 5000-byte export name", Conn.meta_data(b"e" * 5000, [b"base:allocation"])),
        ("SET_META_CONTEXT with a 5000-byte query", Conn.meta_data(b"", [b"base:" + b"q" * 5000])),
        ("LIST_META_CONTEXT with a 5000-byte query", Conn.meta_data(b"", [b"x" * 5000])),
    ):
        opt = R.OPT_LIST_META_CONTEXT if what.startswith("LIST") else R.OPT_SET_META_CONTEXT
        rep, replies = c.option(opt, data)
        if rep == R.REP_ACK:
            if replies:
                fail("%s: the server selected %r" % (what, replies))
            log("ok: %s -> ACK, nothing selected" % what)
        else:
            expect_rep(rep, (R.REP_ERR_TOO_BIG, R.REP_ERR_INVALID, R.REP_ERR_UNKNOWN), what)
    for what, data in (
        ("SET_META_CONTEXT whose query count overruns", Conn.meta_data(b"", [])[:-4] + struct.pack(">I", 7)),
        ("SET_META_CONTEXT whose query length overruns", Conn.meta_data(b"", [])[:-4] + struct.pack(">II", 1, 0xFFFFFFF0) + b"base:"),
        ("SET_META_CONTEXT whose name length overruns", struct.pack(">I", 0xFFFFFFFF) + b"x" * 8),
    ):
        rep, _ = c.option(R.OPT_SET_META_CONTEXT, data)
        expect_rep(rep, R.REP_ERR_INVALID, what)
    c.set_meta([b"base:allocation"])
    if list(c.contexts.values()) != [b"base:allocation"]:
        fail("SET_META_CONTEXT base:allocation selected %r" % c.contexts)
    c.go()
    ctx.expect_data(c, 0, 4096, "READ on the connection that sent long names")
    cid = next(iter(c.contexts))
    r = c.cmd(R.CMD_BLOCK_STATUS, 0, 65536)
    expect_errno(r, 0, "BLOCK_STATUS after the odd meta context queries")
    if [x for x, _ in r.block_status] != [cid]:
        fail("BLOCK_STATUS answered contexts %r, expected [%d]" % (r.block_status, cid))
    c.disc()
    c.close()

    # EXPORT_NAME cannot answer an error: an unknown, oversize name closes.
    c = Conn(ctx.sock)
    c.greet()
    c.send_opt(R.OPT_EXPORT_NAME, b"z" * 5000)
    expect_closed(c, "EXPORT_NAME with a 5000-byte name")
    still_serves(ctx, "names over 4096 bytes")


def case_bad_option_magic(ctx):
    c = Conn(ctx.sock)
    c.greet()
    c.send_opt(R.OPT_LIST, magic=0x4948415645455054)
    expect_closed(c, "an option with bad magic", allow_bytes=True)

    c = Conn(ctx.sock)
    c.greet()
    send_maybe_closed(c, lambda: c.send(b"\xff" * 16))
    expect_closed(c, "sixteen bytes of 0xff instead of an option", allow_bytes=True)

    # Client flags with a bit the server did not offer: it must close.
    c = Conn(ctx.sock)
    c.greet(client_flags=R.FLAG_FIXED_NEWSTYLE | R.FLAG_NO_ZEROES | (1 << 7))
    send_maybe_closed(c, lambda: c.send_opt(R.OPT_LIST))
    expect_closed(c, "client flags with an unknown bit")

    c = Conn(ctx.sock)
    c.greet(client_flags=0xFFFFFFFF)
    send_maybe_closed(c, lambda: c.send_opt(R.OPT_LIST))
    expect_closed(c, "client flags 0xffffffff")

    # A valid option after a good one, then garbage: the good one is answered.
    c = Conn(ctx.sock)
    c.greet()
    names = c.list_exports()
    send_maybe_closed(c, lambda: c.send(b"GARBAGE!" + b"\0" * 8))
    expect_closed(c, "garbage after a LIST", allow_bytes=True)
    log("ok: LIST before the garbage answered %r" % names)
    still_serves(ctx, "bad option magic")


def case_failed_set_meta_context(ctx):
    # proto.md: SET_META_CONTEXT "replaces all previously-set metadata
    # contexts (including when this command fails)". So base:allocation,
    # then a SET_META_CONTEXT that fails, leaves no context: BLOCK_STATUS
    # is then EINVAL.
    truncated = Conn.meta_data(b"", [])[:-4] + struct.pack(">I", 1)
    failing = (
        ("a truncated query list", truncated, R.REP_ERR_INVALID),
        ("a 5000-byte query", Conn.meta_data(b"", [b"base:" + b"q" * 5000]), R.REP_ERR_TOO_BIG),
        ("a query that is not UTF-8", Conn.meta_data(b"", [b"base:\xff\xfe"]), R.REP_ERR_INVALID),
        ("an unknown export", Conn.meta_data(b"no-such-export", [b"base:allocation"]), R.REP_ERR_UNKNOWN),
    )
    for extended in (False, True):
        kind = "extended" if extended else "structured"
        for what, data, want in failing:
            c = negotiated(ctx, extended)
            c.set_meta([b"base:allocation"])
            if list(c.contexts.values()) != [b"base:allocation"]:
                fail("%s: SET_META_CONTEXT base:allocation selected %r" % (kind, c.contexts))
            rep, _ = c.option(R.OPT_SET_META_CONTEXT, data)
            expect_rep(rep, want, "%s: SET_META_CONTEXT with %s after base:allocation" % (kind, what))
            c.go()
            r = c.cmd(R.CMD_BLOCK_STATUS, 0, 65536)
            if r.block_status:
                fail("%s: BLOCK_STATUS after a failed SET_META_CONTEXT (%s) answered contexts %r"
                     % (kind, what, [cid for cid, _ in r.block_status]))
            expect_errno(r, R.EINVAL, "%s: BLOCK_STATUS after a failed SET_META_CONTEXT (%s)" % (kind, what))
            ctx.expect_data(c, 0, 4096, "%s: READ after the refused BLOCK_STATUS" % kind)
            c.disc()
            c.close()
    still_serves(ctx, "failed SET_META_CONTEXT")


def case_list_meta_context(ctx):
    # proto.md: in LIST_META_CONTEXT replies "the metadata context ID ... is
    # reserved and SHOULD be set to zero"; SET_META_CONTEXT gives real ones.
    for extended in (False, True):
        kind = "extended" if extended else "structured"
        c = negotiated(ctx, extended)
        for queries, want in (
            ([], [b"base:allocation", b"qemu:allocation-depth"]),
            ([b"base:"], [b"base:allocation"]),
            ([b"qemu:allocation-depth"], [b"qemu:allocation-depth"]),
        ):
            rep, replies = c.option(R.OPT_LIST_META_CONTEXT, Conn.meta_data(b"", queries))
            expect_rep(rep, R.REP_ACK, "%s: LIST_META_CONTEXT %r" % (kind, queries))
            listed = []
            for t, data in replies:
                if t != R.REP_META_CONTEXT:
                    fail("%s: LIST_META_CONTEXT sent a %s reply" % (kind, rep_name(t)))
                (cid,) = struct.unpack(">I", data[:4])
                if cid != 0:
                    fail("%s: LIST_META_CONTEXT %r listed %r with context id %d, not 0" % (kind, queries, data[4:], cid))
                listed.append(data[4:])
            if sorted(listed) != want:
                fail("%s: LIST_META_CONTEXT %r listed %r, expected %r" % (kind, queries, listed, want))
            log("ok: %s: LIST_META_CONTEXT %r listed %r, each with id 0" % (kind, queries, listed))
        chosen = c.set_meta([b"base:allocation", b"qemu:allocation-depth"])
        if sorted(chosen.values()) != [b"base:allocation", b"qemu:allocation-depth"] or 0 in chosen:
            fail("%s: SET_META_CONTEXT chose %r" % (kind, chosen))
        c.go()
        r = c.cmd(R.CMD_BLOCK_STATUS, 0, 65536)
        expect_errno(r, 0, "%s: BLOCK_STATUS after LIST and SET_META_CONTEXT" % kind)
        if sorted(cid for cid, _ in r.block_status) != sorted(chosen):
            fail("%s: BLOCK_STATUS answered contexts %r, chosen %r" % (kind, r.block_status, chosen))
        c.disc()
        c.close()
    still_serves(ctx, "LIST_META_CONTEXT")


# --------------------------------------------------------------------------
# Transmission phase
# --------------------------------------------------------------------------


def case_unknown_commands(ctx):
    for structured in (False, True):
        c = R.connect_go(ctx.sock, structured=structured)
        kind = "structured" if structured else "simple"
        for cmd in (R.CMD_RESIZE, 9, 42, 0x7FFF, 0xFFFF):
            r = c.cmd(cmd, 0, 4096)
            expect_errno(r, R.EINVAL, "%s: unknown command %d" % (kind, cmd))
            ctx.expect_data(c, 0, 4096, "%s: READ after unknown command %d" % (kind, cmd))
        # Several unknown commands in flight with a read between them.
        cookies = [c.send_req(77, i * 4096, 4096) for i in range(4)]
        rd = c.send_req(R.CMD_READ, 8192, 4096)
        for k in cookies:
            expect_errno(c.wait(k), R.EINVAL, "%s: pipelined unknown command" % kind)
        r = c.wait(rd)
        if r.error or bytes(r.data) != ctx.base[8192 : 8192 + 4096]:
            fail("%s: the READ pipelined with unknown commands failed: %r" % (kind, r))
        c.disc()
        c.close()
    still_serves(ctx, "unknown commands")


def case_unknown_flags(ctx):
    # Simple replies: DF is not valid without structured replies.
    c = R.connect_go(ctx.sock)
    expect_errno(c.cmd(R.CMD_READ, 0, 4096, R.CF_DF), R.EINVAL, "simple: READ with DF")
    expect_errno(c.cmd(R.CMD_READ, 0, 4096, 1 << 9), R.EINVAL, "simple: READ with unknown flag bit 9")
    ctx.expect_data(c, 0, 4096, "simple: READ after flag errors")
    c.disc()
    c.close()

    c = R.connect_go(ctx.sock, structured=True, meta=[b"base:allocation"])
    tf = c.tflags
    cases = [
        (R.CMD_READ, 1 << 9, "READ with unknown flag bit 9"),
        (R.CMD_READ, 1 << 15, "READ with unknown flag bit 15"),
        (R.CMD_READ, R.CF_NO_HOLE, "READ with NO_HOLE"),
        (R.CMD_READ, R.CF_REQ_ONE, "READ with REQ_ONE"),
        (R.CMD_READ, R.CF_FAST_ZERO, "READ with FAST_ZERO"),
        (R.CMD_READ, R.CF_PAYLOAD_LEN, "READ with PAYLOAD_LEN (no extended headers)"),
        (R.CMD_FLUSH, 1 << 12, "FLUSH with unknown flag bit 12"),
        (R.CMD_TRIM, R.CF_REQ_ONE, "TRIM with REQ_ONE"),
        (R.CMD_TRIM, R.CF_DF, "TRIM with DF"),
        (R.CMD_BLOCK_STATUS, R.CF_DF, "BLOCK_STATUS with DF"),
        (R.CMD_BLOCK_STATUS, R.CF_NO_HOLE, "BLOCK_STATUS with NO_HOLE"),
        (R.CMD_WRITE_ZEROES, R.CF_DF, "WRITE_ZEROES with DF"),
        (R.CMD_WRITE_ZEROES, R.CF_REQ_ONE, "WRITE_ZEROES with REQ_ONE"),
        (R.CMD_CACHE, 1 << 10, "CACHE with unknown flag bit 10"),
    ]
    for cmd, flags, what in cases:
        r = c.cmd(cmd, MiB, 4096, flags)
        expect_errno(r, R.EINVAL, "structured: " + what)
    # A WRITE with a bad flag: EINVAL, its payload consumed, nothing written.
    for flags, what in (
        (1 << 9, "unknown flag bit 9"),
        (R.CF_NO_HOLE, "NO_HOLE"),
        (R.CF_DF, "DF"),
        (R.CF_REQ_ONE, "REQ_ONE"),
    ):
        r = c.cmd(R.CMD_WRITE, MiB, 8192, flags, b"\xee" * 8192)
        expect_errno(r, R.EINVAL, "structured: WRITE with " + what)
    ctx.expect_data(c, MiB, 8192, "READ where the rejected WRITEs pointed")
    # proto.md: FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA
    # has been negotiated, in which case the server MUST accept all commands
    # with this bit set (even by ignoring the bit)".
    fua_wrong = []
    if tf & R.TF_SEND_FUA:
        for cmd, off, n in (
            (R.CMD_READ, 0, 4096),
            (R.CMD_FLUSH, 0, 0),
            (R.CMD_CACHE, 0, 4096),
            (R.CMD_BLOCK_STATUS, 0, 4096),
            (R.CMD_WRITE, MiB, 4096),
            (R.CMD_WRITE_ZEROES, 5 * MiB, 4096),
            (R.CMD_TRIM, 6 * MiB, 4096),
        ):
            payload = ctx.base[off : off + n] if cmd == R.CMD_WRITE else b""
            r = c.cmd(cmd, off, n, R.CF_FUA, payload)
            name = R.CMD_NAMES[cmd]
            if r.error:
                fua_wrong.append("%s with FUA -> %s" % (name, errno_name(r.error)))
            else:
                log("ok: structured: %s with FUA -> OK" % name)
        # Put back what WRITE_ZEROES and TRIM changed.
        c.write(5 * MiB, ctx.base[5 * MiB : 5 * MiB + 4096])
        c.write(6 * MiB, ctx.base[6 * MiB : 6 * MiB + 4096])
    c.disc()
    c.close()

    # The same through libnbd with strict mode off: it sends what it is told.
    h = libnbd_handle(ctx)
    e = libnbd_errno(h.pread, 4096, 0, 1 << 9)
    if e != R.EINVAL:
        fail("libnbd: READ with flag bit 9 gave errno %d, expected EINVAL" % e)
    log("ok: libnbd READ with unknown flag -> EINVAL")
    if h.pread(4096, 0) != ctx.base[:4096]:
        fail("libnbd: READ after the flag error differs")
    h.shutdown()
    still_serves(ctx, "unknown flags")
    if fua_wrong:
        fail(
            "SEND_FUA is advertised, so every command must accept FUA (proto.md), but: "
            + "; ".join(fua_wrong)
        )


def case_past_end(ctx):
    S = ctx.size
    offsets = [
        (S, 512, "at the end"),
        (S - 512, 1024, "straddling the end"),
        (S + 4096, 4096, "past the end"),
        (S + 1, 0, "zero length past the end"),
        (1 << 63, 512, "at 2^63"),
        (U64 - 512, 1024, "wrapping past 2^64"),
        (U64 - 4096, 8192, "wrapping past 2^64 to a valid-looking end"),
        (U64 - 1, 1, "at 2^64-1"),
        (S - 4096, 0xFFFFF000, "a 4 GiB length from inside"),
    ]
    for structured in (False, True):
        kind = "structured" if structured else "simple"
        meta = [b"base:allocation"] if structured else ()
        c = R.connect_go(ctx.sock, structured=structured, meta=meta)
        tf = c.tflags
        for off, n, what in offsets:
            r = c.cmd(R.CMD_READ, off, n)
            expect_errno(r, R.EINVAL, "%s: READ %s (offset %d length %d)" % (kind, what, off, n))
            if tf & R.TF_SEND_TRIM:
                r = c.cmd(R.CMD_TRIM, off, n)
                expect_errno(r, R.EINVAL, "%s: TRIM %s" % (kind, what))
            if tf & R.TF_SEND_CACHE:
                r = c.cmd(R.CMD_CACHE, off, n)
                expect_errno(r, R.EINVAL, "%s: CACHE %s" % (kind, what))
            if structured:
                r = c.cmd(R.CMD_BLOCK_STATUS, off, n)
                expect_errno(r, R.EINVAL, "%s: BLOCK_STATUS %s" % (kind, what))
            if tf & R.TF_SEND_WRITE_ZEROES:
                r = c.cmd(R.CMD_WRITE_ZEROES, off, n)
                expect_errno(r, R.ENOSPC, "%s: WRITE_ZEROES %s" % (kind, what))
            if n <= 65536:
                r = c.cmd(R.CMD_WRITE, off, n, 0, b"\xab" * n)
                expect_errno(r, R.ENOSPC, "%s: WRITE %s (payload sent)" % (kind, what))
            ctx.expect_data(c, S - 8192, 8192, "%s: the last 8 KiB after %s" % (kind, what))
        c.disc()
        c.close()

    # libnbd with strict mode off checks the framing of what comes back.
    h = libnbd_handle(ctx)
    for fn, args, want, what in (
        (h.pread, (1024, S - 512), R.EINVAL, "pread straddling the end"),
        (h.pread, (1024, U64 - 512), R.EINVAL, "pread wrapping past 2^64"),
        (h.pwrite, (b"\xcd" * 1024, S - 512), R.ENOSPC, "pwrite straddling the end"),
        (h.pwrite, (b"\xcd" * 1024, U64 - 512), R.ENOSPC, "pwrite wrapping past 2^64"),
        (h.zero, (4096, S), R.ENOSPC, "zero past the end"),
        (h.trim, (4096, S), R.EINVAL, "trim past the end"),
    ):
        e = libnbd_errno(fn, *args)
        if e != want:
            fail("libnbd %s: errno %s, expected %s" % (what, errno_name(e), errno_name(want)))
        log("ok: libnbd %s -> %s" % (what, errno_name(e)))
    if h.pread(8192, S - 8192) != ctx.base[S - 8192 :]:
        fail("libnbd: the last 8 KiB changed")
    h.shutdown()
    still_serves(ctx, "requests past the end")


def case_zero_length(ctx):
    for structured in (False, True):
        kind = "structured" if structured else "simple"
        meta = [b"base:allocation"] if structured else ()
        c = R.connect_go(ctx.sock, structured=structured, meta=meta)
        reqs = [
            (R.CMD_READ, 0, "READ at 0"),
            (R.CMD_READ, ctx.size, "READ at the end"),
            (R.CMD_WRITE, 4096, "WRITE"),
            (R.CMD_WRITE, ctx.size, "WRITE at the end"),
            (R.CMD_FLUSH, 0, "FLUSH"),
            (R.CMD_TRIM, 4096, "TRIM"),
            (R.CMD_WRITE_ZEROES, 4096, "WRITE_ZEROES"),
            (R.CMD_CACHE, 4096, "CACHE"),
        ]
        if structured:
            reqs.append((R.CMD_BLOCK_STATUS, 4096, "BLOCK_STATUS"))
        for cmd, off, what in reqs:
            r = c.cmd(cmd, off, 0)
            expect_errno(r, (0, R.EINVAL), "%s: zero-length %s" % (kind, what))
            if cmd == R.CMD_READ and r.error == 0 and r.data:
                fail("%s: zero-length READ returned %d bytes" % (kind, len(r.data)))
        # Pipelined zero-length requests around a real one.
        ks = [c.send_req(R.CMD_READ, 0, 0) for _ in range(8)]
        rd = c.send_req(R.CMD_READ, 0, 4096)
        ks += [c.send_req(R.CMD_WRITE, 0, 0) for _ in range(8)]
        for k in ks:
            expect_errno(c.wait(k), (0, R.EINVAL), "%s: pipelined zero-length request" % kind)
        r = c.wait(rd)
        if r.error or bytes(r.data) != ctx.base[:4096]:
            fail("%s: the READ among zero-length requests failed: %r" % (kind, r))
        ctx.expect_data(c, 4096, 8192, "%s: data where the zero-length writes pointed" % kind)
        c.disc()
        c.close()

    h = libnbd_handle(ctx)
    for fn, args, what in (
        (h.pread, (0, 0), "pread"),
        (h.pwrite, (b"", 0), "pwrite"),
        (h.trim, (0, 0), "trim"),
        (h.zero, (0, 0), "zero"),
        (h.cache, (0, 0), "cache"),
    ):
        e = libnbd_errno(fn, *args)
        if e not in (0, R.EINVAL):
            fail("libnbd zero-length %s: errno %s" % (what, errno_name(e)))
        log("ok: libnbd zero-length %s -> %s" % (what, errno_name(e)))
    if h.pread(4096, 0) != ctx.base[:4096]:
        fail("libnbd: data changed after zero-length requests")
    h.shutdown()
    still_serves(ctx, "zero-length requests")


def case_write_too_big(ctx):
    # A WRITE header claiming 1 GiB: EINVAL, then the connection ends (the
    # payload is never read, so framing is lost).
    for length, what in ((GiB, "1 GiB"), ((32 << 20) + 1, "32 MiB + 1"), (0xFFFFFFFF, "4 GiB - 1")):
        for structured in (False, True):
            kind = "structured" if structured else "simple"
            c = R.connect_go(ctx.sock, structured=structured)
            k = c.cookie()
            send_maybe_closed(c, lambda: c.send_req(R.CMD_WRITE, 0, length, 0, b"\x5a" * 65536, cookie=k))
            try:
                r = c.wait(k)
            except Closed as e:
                fail("%s: WRITE header claiming %s: the server closed without replying EINVAL (%s)" % (kind, what, e))
            expect_errno(r, R.EINVAL, "%s: WRITE header claiming %s" % (kind, what))
            expect_closed(c, "%s: after the WRITE claiming %s" % (kind, what))
    # Nothing of the rejected payload landed.
    c = R.connect_go(ctx.sock)
    ctx.expect_data(c, 0, 65536, "the start of the disk after the oversize WRITEs")
    # Exactly 32 MiB is accepted, written and read back.
    payload = bytes((i * 7 + 3) & 0xFF for i in range(256)) * ((32 << 20) // 256)
    off = 4096 if ctx.size >= (32 << 20) + 8192 else None
    if off is not None:
        c.write(off, payload)
        if c.read(off, 32 << 20) != payload:
            fail("a 32 MiB WRITE did not read back")
        log("ok: a 32 MiB WRITE and READ")
        # Restore so later checks against BASE still hold.
        c.write(off, ctx.base[off : off + (32 << 20)])
    # A READ over the maximum payload is refused, the connection goes on.
    r = c.cmd(R.CMD_READ, 0, (32 << 20) + 4096)
    expect_errno(r, (R.EINVAL, R.EOVERFLOW), "READ of 32 MiB + 4 KiB")
    ctx.expect_data(c, 0, 4096, "READ after the oversize READ")
    c.disc()
    c.close()
    still_serves(ctx, "a WRITE header claiming 1 GiB")


def case_bad_request_magic(ctx):
    # A bystander connection, idle through the whole thing, must not notice.
    bystander = R.connect_go(ctx.sock, structured=True)
    ctx.expect_data(bystander, 0, 4096, "bystander before")

    for magic, what in (
        (0x12345678, "magic 0x12345678"),
        (R.SIMPLE_MAGIC, "a reply magic"),
        (0, "zero magic"),
    ):
        c = R.connect_go(ctx.sock)
        send_maybe_closed(c, lambda: c.send_req(R.CMD_READ, 0, 4096, magic=magic, track=False))
        # An error reply before closing is harmless (qemu-nbd sends one).
        expect_closed(c, "a request with " + what, allow_bytes=True)

    # An extended (32-byte) request on a connection that did not negotiate it.
    c = R.connect_go(ctx.sock)
    send_maybe_closed(c, lambda: c.send_req(R.CMD_READ, 0, 4096, extended=True, track=False))
    expect_closed(c, "an extended request without EXTENDED_HEADERS", allow_bytes=True)

    # A good READ then a bad header in the same write: the READ may or may
    # not be answered, but correctly, and then the connection ends.
    c = R.connect_go(ctx.sock)
    good = c.request_bytes(R.CMD_READ, 0, 65536, 0, 1)
    bad = c.request_bytes(R.CMD_READ, 0, 4096, 0, 2, magic=0xDEADBEEF)
    c.pending[1] = (R.CMD_READ, 65536, 0)
    c.send(good + bad)
    got = expect_closed(c, "bad magic after a good READ", allow_bytes=True)
    if len(got) >= 16:
        magic, err, cookie = struct.unpack(">IIQ", got[:16])
        if magic != R.SIMPLE_MAGIC:
            fail("the reply before the close has magic 0x%08x" % magic)
        if cookie == 1 and err == 0 and got[16 : 16 + 65536] != ctx.base[:65536]:
            fail("the READ before the bad magic was answered with wrong data")
        log("ok: before closing the server answered cookie %d with %s" % (cookie, errno_name(err)))

    # A bad magic in the middle of a WRITE stream (the payload length lies).
    c = R.connect_go(ctx.sock)
    c.send(c.request_bytes(R.CMD_WRITE, MiB, 16, 0, 5) + b"\x11" * 16)  # good
    send_maybe_closed(c, lambda: c.send(b"\x99" * 28))
    got = expect_closed(c, "28 bytes of garbage as a request", allow_bytes=True)
    if len(got) >= 16:
        magic, err, cookie = struct.unpack(">IIQ", got[:16])
        if magic != R.SIMPLE_MAGIC or (cookie == 5 and err != 0):
            fail("the WRITE before the garbage was answered %r" % got[:16])
    # Put back what the good WRITE wrote (it may or may not have landed).
    bystander.write(MiB, ctx.base[MiB : MiB + 16])

    ctx.expect_data(bystander, 0, 65536, "bystander after the bad magic on other connections")
    ctx.expect_data(bystander, 2 * MiB, 4096, "bystander again")
    bystander.disc()
    bystander.close()
    still_serves(ctx, "bad request magic")


def case_disconnect_mid_message(ctx):
    # Handshake phase: close at every awkward point.
    c = Conn(ctx.sock)
    c.close()
    c = Conn(ctx.sock)
    c.recv_exact(5)
    c.close()
    c = Conn(ctx.sock)
    c.greet(client_flags=None)
    c.send(b"\x00\x00")  # half the client flags
    c.close()
    c = Conn(ctx.sock)
    c.greet()
    c.send(struct.pack(">QI", R.IHAVEOPT, R.OPT_GO)[:10])  # half an option header
    c.close()
    c = Conn(ctx.sock)
    c.greet()
    c.send(struct.pack(">QII", R.IHAVEOPT, R.OPT_GO, 100) + b"\0" * 20)  # short option data
    c.close()
    c = Conn(ctx.sock)
    c.greet()
    c.send(struct.pack(">QII", R.IHAVEOPT, R.OPT_GO, 100) + b"\0" * 20)
    c.shut_wr()
    expect_closed(c, "EOF in the middle of option data")
    log("ok: hung up at five points of the handshake")

    # Transmission: half a request header, with and without half-close.
    for half_close in (False, True):
        c = R.connect_go(ctx.sock)
        c.send(c.request_bytes(R.CMD_READ, 0, 4096, 0, 1)[:13])
        if half_close:
            c.shut_wr()
            expect_closed(c, "EOF in the middle of a request header")
        c.close()
    # A structured connection with reads in flight, then half a header.
    c = R.connect_go(ctx.sock, structured=True)
    for i in range(16):
        c.send_req(R.CMD_READ, i * MiB % ctx.size, MiB)
    c.send(c.request_bytes(R.CMD_WRITE, 0, 4096, 0, 99)[:20])
    c.close()
    log("ok: hung up in the middle of request headers")
    still_serves(ctx, "a disconnect in the middle of a header")


def case_disconnect_mid_payload(ctx):
    target = 2 * MiB
    # WRITE header for 64 KiB, then part of the payload, then gone.
    for sent, half_close in ((0, False), (1000, False), (65535, False), (1000, True), (65535, True)):
        c = R.connect_go(ctx.sock)
        c.send(c.request_bytes(R.CMD_WRITE, target, 65536, 0, 1) + b"\xee" * sent)
        if half_close:
            c.shut_wr()
            got = expect_closed(c, "EOF after %d of 65536 payload bytes" % sent, allow_bytes=True)
            if got:
                # A reply to the truncated WRITE can only be an error.
                magic, err = struct.unpack(">II", got[:8])
                if magic != R.SIMPLE_MAGIC or err == 0:
                    fail("the truncated WRITE was answered %r" % got[:16])
        c.close()
    # A WRITE past the end, refused once its payload is read: gone after
    # 1000 of its 65536 bytes (the log says how many were still to come).
    c = R.connect_go(ctx.sock)
    c.send(c.request_bytes(R.CMD_WRITE, ctx.size, 65536, 0, 1) + b"\xee" * 1000)
    c.close()
    # The same with a big write already in flight before it.
    c = R.connect_go(ctx.sock, structured=True)
    k = c.send_req(R.CMD_WRITE, 3 * MiB, MiB, 0, ctx.base[3 * MiB : 4 * MiB])
    c.send(c.request_bytes(R.CMD_WRITE, target, MiB, 0, 2) + b"\xee" * 300000)
    c.close()
    log("ok: hung up in the middle of WRITE payloads")

    # Reads whose replies nobody reads: the server's writes hit a closed socket.
    for n in (8, 64):
        c = R.connect_go(ctx.sock)
        for i in range(n):
            c.send_req(R.CMD_READ, (i * MiB) % (ctx.size - MiB), MiB)
        c.close()
    c = R.connect_go(ctx.sock, structured=True)
    for i in range(32):
        c.send_req(R.CMD_READ, (i * MiB) % (ctx.size - MiB), MiB)
    c.shut_wr()
    c.recv_exact(100)
    c.close()
    log("ok: hung up with READ replies unread")

    c = R.connect_go(ctx.sock)
    ctx.expect_data(c, target, MiB, "the range the truncated WRITEs aimed at")
    c.disc()
    c.close()
    still_serves(ctx, "a disconnect in the middle of a WRITE payload")


def stalled_writes_leave(ctx, stalled, what):
    # The stalled clients hang up: nothing of the WRITEs at 2 MiB they left
    # unfinished was written, and the server still serves.
    for c in stalled:
        c.close()
    c = R.connect_go(ctx.sock)
    ctx.expect_data(c, 2 * MiB, 32 * MiB, "the range the stalled WRITEs aimed at")
    c.disc()
    c.close()
    still_serves(ctx, what)


def case_stalled_clients(ctx):
    # Clients that stop half-way and stay connected must not hold up anyone
    # else: one that never reads the greeting, one in the middle of its
    # flags, of an option header, of option data, of a request header, and
    # of WRITE payloads (up to 32 MiB ones).
    stalled = []
    c = Conn(ctx.sock)
    stalled.append(c)
    c = Conn(ctx.sock)
    c.greet(client_flags=None)
    c.send(b"\x00")
    stalled.append(c)
    c = Conn(ctx.sock)
    c.greet()
    c.send(struct.pack(">QI", R.IHAVEOPT, R.OPT_GO)[:9])
    stalled.append(c)
    c = Conn(ctx.sock)
    c.greet()
    c.send(struct.pack(">QII", R.IHAVEOPT, R.OPT_GO, 50) + b"\0" * 7)
    stalled.append(c)
    c = R.connect_go(ctx.sock)
    c.send(c.request_bytes(R.CMD_READ, 0, 4096, 0, 1)[:11])
    stalled.append(c)
    for i in range(4):
        c = R.connect_go(ctx.sock, structured=True)
        c.send(c.request_bytes(R.CMD_WRITE, 2 * MiB, 32 * MiB, 0, 1) + b"\xee" * 100000)
        stalled.append(c)
    log("ok: %d stalled clients connected" % len(stalled))

    # Meanwhile, well-behaved clients: raw, libnbd, several in a row.
    for i in range(3):
        still_serves(ctx, "%d stalled clients (round %d)" % (len(stalled), i))
    h = libnbd_handle(ctx)
    if h.pread(MiB, 3 * MiB) != ctx.base[3 * MiB : 4 * MiB]:
        fail("libnbd read beside stalled clients differs")
    h.pwrite(ctx.base[5 * MiB : 6 * MiB], 5 * MiB)
    h.shutdown()
    log("ok: libnbd beside stalled clients")
    stalled_writes_leave(ctx, stalled, "stalled clients went away")


def unread_by_server(c):
    """Bytes `c` sent that the server has not read yet (SIOCOUTQ)."""
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(c.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def case_stalled_payloads_fill_the_pool(ctx):
    # Clients that each send a 32 MiB WRITE's header and a little of its
    # payload, then nothing, and stay connected: each holds the buffers of
    # the piece whose payload the server is receiving (an eighth of the
    # default 64 MiB pool, the largest piece). Eight of them hold the whole
    # pool, reserve included. A well-behaved client must still be served
    # while they stay (nbd.md: one client's bad input never affects another
    # connection), at the latest once the server cuts them, as it cuts
    # clients that read none of their replies while others wait for memory.
    stalled = []
    for i in range(8):
        c = R.connect_go(ctx.sock, structured=True)
        c.send(c.request_bytes(R.CMD_WRITE, 2 * MiB, 32 * MiB, 0, 1) + b"\xee" * 100000)
        stalled.append(c)
    # Each holds its buffers once the server has read what it sent.
    deadline = time.monotonic() + 60
    while any(unread_by_server(c) for c in stalled):
        if time.monotonic() > deadline:
            fail("the server did not read the stalled clients' first payload bytes")
        time.sleep(0.05)
    log("ok: %d clients stalled in the middle of 32 MiB WRITE payloads" % len(stalled))
    c = Conn(ctx.sock, timeout=60)
    c.greet()
    c.negotiate_structured()
    c.go()
    try:
        ctx.expect_data(c, 0, 4096, "beside clients stalled in WRITE payloads")
    except (socket.timeout, TimeoutError):
        fail(
            "while 8 clients stalled in the middle of 32 MiB WRITE payloads, a 4 KiB READ "
            "of a well-behaved client got no reply in 60 s (the pool is theirs)"
        )
    c.disc()
    c.close()
    log("ok: a READ beside clients stalled in WRITE payloads was answered")
    stalled_writes_leave(ctx, stalled, "clients stalled in WRITE payloads went away")


def case_slow_handshake(ctx):
    # A client that sends its handshake a byte at a time, each well within
    # any per-read time-out, may not hold its connection (and a slot of
    # --max-connections) for ever: the server is run with
    # --handshake-limit 2 and closes it once the whole handshake took that
    # long.
    c = Conn(ctx.sock)
    c.recv_exact(18)
    c.send(struct.pack(">I", R.FLAG_FIXED_NEWSTYLE | R.FLAG_NO_ZEROES))
    # LIST after LIST, each sent a byte at a time and answered.
    trickle = struct.pack(">QII", R.IHAVEOPT, R.OPT_LIST, 0)
    start = time.monotonic()
    closed = None
    for i in range(60):
        try:
            c.sock.sendall(trickle[i % len(trickle) : i % len(trickle) + 1])
            r, _, _ = select.select([c.sock], [], [], 0.5)
            if r and not c.sock.recv(4096, socket.MSG_PEEK):
                closed = "EOF"
                break
            if r:
                # The LIST reply: the handshake goes on; read it.
                c.sock.recv(4096)
        except OSError as e:
            closed = str(e)
            break
    if closed is None:
        fail("a handshake sent a byte every 0.5 s was still open after %.0f s" % (time.monotonic() - start))
    log("ok: a slow handshake was closed after %.1f s (%s)" % (time.monotonic() - start, closed))
    c.close()
    still_serves(ctx, "a slow handshake")


def case_unread_replies(ctx):
    # Clients that send many large READs and never read the replies: the
    # server's writes to them block. That must not hold up other connections
    # (nbd.md: one client's bad input never affects another connection). Each
    # such client holds at most half of what the others leave free, so three
    # of them leave an eighth of the pool: the well-behaved client is served
    # while they are still connected, not once the server cuts them (after
    # 10 s without a reply taken).
    hogs = []
    for _ in range(3):
        hog = R.connect_go(ctx.sock)
        hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hogs.append(hog)

    def flood(hog):
        try:
            for i in range(256):
                hog.send_req(R.CMD_READ, (i * MiB) % (ctx.size - MiB), MiB, track=False)
        except OSError:
            pass

    flooders = [threading.Thread(target=flood, args=(h,), daemon=True) for h in hogs]
    for f in flooders:
        f.start()
    try:
        for i in range(2):
            still_serves(
                ctx, "3 clients that leave 256 x 1 MiB READ replies unread (round %d)" % i
            )
    except (socket.timeout, TimeoutError):
        fail(
            "while 3 clients had up to 256 x 1 MiB READ replies unread each, a well-behaved "
            "client's request got no reply (starved until they go away)"
        )
    # A client the server has cut polls POLLHUP (the server closed it).
    poller = select.poll()
    for hog in hogs:
        poller.register(hog.sock, select.POLLIN)
    cut = [fd for fd, ev in poller.poll(0) if ev & (select.POLLHUP | select.POLLERR)]
    if cut:
        fail(
            "%d of the clients with unread replies were cut before the well-behaved client "
            "was served: it waited for the cut" % len(cut)
        )
    # shutdown() wakes a flooder's blocked send; close() alone would not.
    for hog in hogs:
        hog.sock.shutdown(socket.SHUT_RDWR)
    for f in flooders:
        f.join()
    for hog in hogs:
        hog.close()
    still_serves(ctx, "the clients with unread replies went away")


def case_unanswered_requests(ctx):
    # A client that sends requests whose replies need no device request
    # (unknown commands: EINVAL) and never reads them: the server stops
    # reading it rather than keep its replies without bound, and serves
    # others meanwhile. Sent without blocking until the server has read
    # nothing for 2 s, or 2 GiB went in.
    c = R.connect_go(ctx.sock, structured=True)
    blob = c.request_bytes(99, 0, 0, 0, 7) * 32768
    limit = 2 << 30
    c.sock.setblocking(False)
    sent, rest, idle_since = 0, memoryview(blob), None
    while sent < limit:
        try:
            n = c.sock.send(rest)
        except BlockingIOError:
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            elif now - idle_since > 2:
                break
            time.sleep(0.01)
            continue
        sent += n
        idle_since = None
        rest = rest[n:] if n < len(rest) else memoryview(blob)
    if sent >= limit:
        fail("the server read 2 GiB of requests from a client that reads none of its replies")
    log("ok: the server stopped reading a client that reads no replies, after %d MiB" % (sent >> 20))
    still_serves(ctx, "a client with %d MiB of requests whose replies it does not read" % (sent >> 20))
    c.close()


def case_pipelined_handshake(ctx):
    # A client may send its flags, its options and its first requests in one
    # write without waiting for answers (each option's reply is not needed
    # to frame the next). Bytes the server reads ahead while it parses the
    # handshake must not be lost when transmission starts.
    c = Conn(ctx.sock)
    c.recv_exact(18)
    c.structured = True
    blob = struct.pack(">I", R.FLAG_FIXED_NEWSTYLE | R.FLAG_NO_ZEROES)
    blob += struct.pack(">QII", R.IHAVEOPT, R.OPT_STRUCTURED_REPLY, 0)
    go = Conn.go_data(b"", (R.INFO_BLOCK_SIZE,))
    blob += struct.pack(">QII", R.IHAVEOPT, R.OPT_GO, len(go)) + go
    for i in range(4):
        c.pending[i + 1] = (R.CMD_READ, 4096, i * 4096)
        blob += c.request_bytes(R.CMD_READ, i * 4096, 4096, 0, i + 1)
    c.send(blob)
    rep, _ = c.read_final(R.OPT_STRUCTURED_REPLY)
    expect_rep(rep, R.REP_ACK, "pipelined STRUCTURED_REPLY")
    rep, _ = c.read_final(R.OPT_GO)
    expect_rep(rep, R.REP_ACK, "pipelined GO")
    for i in range(4):
        r = c.wait(i + 1)
        if r.error or bytes(r.data) != ctx.base[i * 4096 : (i + 1) * 4096]:
            fail("READ %d sent with the handshake answered wrongly: %r" % (i, r))
    log("ok: four READs sent in the same write as the handshake answered")
    c.disc()
    c.close()

    # The same with EXPORT_NAME, which has no option reply at all.
    c = Conn(ctx.sock)
    c.recv_exact(18)
    blob = struct.pack(">I", R.FLAG_FIXED_NEWSTYLE | R.FLAG_NO_ZEROES)
    blob += struct.pack(">QII", R.IHAVEOPT, R.OPT_EXPORT_NAME, 0)
    c.pending[7] = (R.CMD_READ, 65536, 8192)
    blob += c.request_bytes(R.CMD_READ, 8192, 65536, 0, 7)
    c.send(blob)
    size, _ = struct.unpack(">QH", c.recv_exact(10))
    if size != ctx.size:
        fail("pipelined EXPORT_NAME: size %d" % size)
    r = c.wait(7)
    if r.error or bytes(r.data) != ctx.base[8192 : 8192 + 65536]:
        fail("the READ sent with EXPORT_NAME answered wrongly: %r" % r)
    log("ok: a READ sent in the same write as EXPORT_NAME answered")
    c.disc()
    c.close()
    still_serves(ctx, "pipelined handshakes")


def case_sigterm_stalled(ctx):
    # Connections in every awkward state, and one acknowledged WRITE; then
    # READY, and the test sends SIGTERM. The server must exit (0) without
    # waiting for these clients; the test closes our stdin once it has.
    stalled = []
    c = Conn(ctx.sock)
    stalled.append(c)
    c = Conn(ctx.sock)
    c.greet()
    c.send(b"\x00" * 5)
    stalled.append(c)
    c = R.connect_go(ctx.sock)
    stalled.append(c)
    c = R.connect_go(ctx.sock, structured=True)
    c.send(c.request_bytes(R.CMD_WRITE, 2 * MiB, MiB, 0, 1) + b"\xee" * 1000)
    stalled.append(c)
    w = R.connect_go(ctx.sock)
    w.write(7 * MiB, b"\x42" * 65536)
    stalled.append(w)
    log("READY")
    sys.stdin.read()
    for c in stalled:
        c.read_to_eof()
        c.close()
    log("ok: every connection was closed by the stopping server")


def case_sigterm_busy(ctx):
    # A client writing 4 KiB blocks, 16 in flight, when the server is told
    # to stop (the test sends SIGTERM after READY). Every request the server
    # read is answered, OK or ESHUTDOWN; on the first ESHUTDOWN the client
    # sends no more and, once the rest are answered, sends DISC (as the NBD
    # spec says it must). The server may also close between requests, when
    # nothing is owed. A second client sat in the middle of a request
    # header: once the socket file is gone it sends the rest, and that
    # request must get ESHUTDOWN. Then the test restarts the server and
    # says GO: every block answered OK holds its data, and no other block
    # changed.
    late = R.connect_go(ctx.sock, structured=True)
    late_req = late.request_bytes(R.CMD_READ, 0, 4096, 0, 99)
    late.send(late_req[:10])
    c = R.connect_go(ctx.sock, structured=True)
    n, region = 4096, 2 * MiB
    inflight, last_ok = {}, {}
    i = ok = refused = 0
    ready = stopping = closed = False
    while True:
        try:
            while not stopping and len(inflight) < 16:
                cookie = c.send_req(R.CMD_WRITE, region + (i % n) * 4096, 4096, payload=pattern(i, 4096))
                inflight[cookie] = i
                i += 1
        except TimeoutError:
            fail("the server stopped reading without closing the connection")
        except (OSError, R.Closed):
            # The server read no more: a request cut short here was not read
            # whole, so not applied. Its replies may still be there to read.
            stopping = True
        if not inflight:
            break
        try:
            r = c.wait_any()
        except TimeoutError:
            fail("the server neither answered nor closed the connection after SIGTERM")
        except (OSError, R.Closed) as e:
            # Closed between requests: what was not answered was not read.
            if not ready:
                fail("the connection ended before SIGTERM: %r" % e)
            closed = True
            break
        j = inflight.pop(r.cookie)
        if r.error == 0:
            ok += 1
            last_ok[j % n] = j
        elif r.error == R.ESHUTDOWN:
            refused += 1
            stopping = True
        else:
            fail("WRITE %d answered %s while the server stopped" % (j, R.errno_name(r.error)))
        if not ready and ok >= 100:
            log("READY")
            ready = True
    if not closed:
        try:
            c.disc()
            c.read_to_eof()
        except (OSError, R.Closed):
            closed = True
    c.close()
    if closed:
        log("ok: the server closed the connection when nothing was owed (%d writes OK)" % ok)
    else:
        log("ok: %d writes OK, then %d refused with ESHUTDOWN, all answered before DISC" % (ok, refused))
    deadline = time.monotonic() + 60
    while os.path.exists(ctx.sock):
        if time.monotonic() > deadline:
            fail("the socket file is still there a minute after SIGTERM")
        time.sleep(0.01)
    late.pending[99] = (R.CMD_READ, 4096, 0)
    late.send(late_req[10:])
    r = late.wait(99)
    if r.error != R.ESHUTDOWN:
        fail("a request completed after the socket file went: %r, expected ESHUTDOWN" % r)
    late.disc()
    late.read_to_eof()
    late.close()
    log("ok: a request completed after the stop got ESHUTDOWN, and DISC closed that connection")
    if sys.stdin.readline().strip() != "GO":
        fail("no GO from the test")
    c = R.connect_go(ctx.sock)
    got = b"".join(c.read(region + k * MiB, MiB) for k in range(n * 4096 // MiB))
    for b in range(n):
        want = pattern(last_ok[b], 4096) if b in last_ok else ctx.base[region + b * 4096 : region + (b + 1) * 4096]
        if got[b * 4096 : (b + 1) * 4096] != want:
            fail("block %d after the restart: not what the last write answered OK left there" % b)
    c.disc()
    c.close()
    log("ok: after the restart every write answered OK is there, and nothing else changed")


def case_deep_pipeline(ctx):
    # Thousands of requests sent in one go while the replies are read
    # concurrently: every one answered once, with the right data.
    c = R.connect_go(ctx.sock, structured=True)
    n = 5000
    span = ctx.size - 4096
    blob = []
    for i in range(n):
        off = (i * 4096 * 7) % span
        c.pending[i + 1] = (R.CMD_READ, 4096, off)
        blob.append(c.request_bytes(R.CMD_READ, off, 4096, 0, i + 1))
    sender = threading.Thread(target=c.send, args=(b"".join(blob),))
    sender.start()
    seen = set()
    for _ in range(n):
        r = c.wait_any()
        if r.cookie in seen:
            fail("cookie %d answered twice" % r.cookie)
        seen.add(r.cookie)
        if r.error or bytes(r.data) != ctx.base[r.offset : r.offset + 4096]:
            fail("pipelined READ at %d answered wrongly: %r" % (r.offset, r))
    sender.join()
    log("ok: %d pipelined READs answered" % n)
    c.disc()
    c.close()
    still_serves(ctx, "a deep pipeline")


def pattern(i, n):
    return bytes([(i * 37 + 1) & 0xFF]) * n


def case_disc_in_flight(ctx):
    import nbd

    # libnbd: queue writes and reads, then shutdown (DISC) at once.
    h = libnbd_handle(ctx, strict=nbd.STRICT_MASK)
    base_off = 4 * MiB
    n = 16
    size = 256 * 1024
    bufs = []
    for i in range(n):
        b = nbd.Buffer.from_bytearray(bytearray(pattern(i, size)))
        bufs.append(b)
        h.aio_pwrite(b, base_off + i * size)
    reads = []
    for i in range(4):
        b = nbd.Buffer(65536)
        reads.append((b, i * 65536, h.aio_pread(b, i * 65536)))
    log("libnbd: %d commands in flight before shutdown" % h.aio_in_flight())
    try:
        h.shutdown()
    except nbd.Error as e:
        fail("libnbd shutdown with requests in flight failed: %s" % e)
    log("ok: libnbd shutdown with requests in flight")
    del h

    # Raw: writes, reads and a FLUSH, then DISC, all in one go; every reply
    # must come back, then the connection closes.
    c = R.connect_go(ctx.sock)
    raw_off = 9 * MiB
    msgs = []
    expected = {}
    for i in range(8):
        k = c.cookie()
        c.pending[k] = (R.CMD_WRITE, size, raw_off + i * size)
        msgs.append(c.request_bytes(R.CMD_WRITE, raw_off + i * size, size, 0, k) + pattern(100 + i, size))
        expected[k] = "write"
    for i in range(4):
        k = c.cookie()
        c.pending[k] = (R.CMD_READ, 65536, MiB + i * 65536)
        msgs.append(c.request_bytes(R.CMD_READ, MiB + i * 65536, 65536, 0, k))
        expected[k] = ("read", MiB + i * 65536)
    k = c.cookie()
    c.pending[k] = (R.CMD_FLUSH, 0, 0)
    msgs.append(c.request_bytes(R.CMD_FLUSH, 0, 0, 0, k))
    expected[k] = "flush"
    msgs.append(c.request_bytes(R.CMD_DISC, 0, 0, 0, c.cookie()))
    blob = b"".join(msgs)
    sender = threading.Thread(target=c.send, args=(blob,))
    sender.start()
    # proto.md: the server "MUST handle all outstanding requests" and then
    # close. Whether it sends their replies is not spelled out (qemu-nbd
    # drops some), so replies may be missing, but those sent must be right,
    # and the writes must have landed (checked below).
    replies = {}
    try:
        while len(replies) < len(expected):
            r = c.wait_any()
            replies[r.cookie] = r
    except Closed:
        pass
    sender.join()
    missing = sorted(str(w) for k, w in expected.items() if k not in replies)
    log("%d of %d requests in flight before DISC answered; unanswered: %s" % (len(replies), len(expected), missing))
    for k, r in replies.items():
        what = expected[k]
        if r.error:
            fail("request %r in flight before DISC failed: %s" % (what, errno_name(r.error)))
        if isinstance(what, tuple):
            off = what[1]
            if bytes(r.data) != ctx.base[off : off + 65536]:
                fail("READ at %d in flight before DISC returned wrong data" % off)
    if len(replies) == len(expected):
        expect_closed(c, "after DISC")

    # From a fresh connection: every write sent before DISC landed.
    c = R.connect_go(ctx.sock)
    for i in range(n):
        if c.read(base_off + i * size, size) != pattern(i, size):
            fail("libnbd aio_pwrite %d (offset %d), issued before DISC, did not land" % (i, base_off + i * size))
    for i in range(8):
        if c.read(raw_off + i * size, size) != pattern(100 + i, size):
            fail("raw WRITE %d (offset %d), sent before DISC, did not land" % (i, raw_off + i * size))
    log("ok: every write sent before DISC landed")
    c.disc()
    c.close()
    still_serves(ctx, "DISC with requests in flight")


def case_disc_with_flags(ctx):
    # proto.md: "There is no reply to an NBD_CMD_DISC". A DISC carrying a
    # flag it has no use for is still a disconnect: the WRITE sent before it
    # is finished, and the server closes without a reply to the DISC. The
    # client shuts its side after the DISC, so a server that answered the
    # DISC and read on sees EOF and closes: nothing waits on a time-out.
    off = 13 * MiB
    cases = (
        ("simple", {}, R.CF_REQ_ONE, 0),
        ("structured", {"structured": True}, 1 << 9, 0),
        ("extended", {"extended": True}, R.CF_REQ_ONE | R.CF_DF, 0),
        ("extended", {"extended": True}, R.CF_PAYLOAD_LEN, 1 << 40),
    )
    for i, (kind, how, flags, length) in enumerate(cases):
        what = "%s: DISC with flags 0x%x and length %d" % (kind, flags, length)
        c = R.connect_go(ctx.sock, **how)
        data = pattern(200 + i, 65536)
        k, d = c.cookie(), c.cookie()
        c.pending[k] = (R.CMD_WRITE, len(data), off + i * 65536)
        # Tracked only so that a reply to it can be read and reported.
        c.pending[d] = (R.CMD_DISC, length, 0)
        c.send(
            c.request_bytes(R.CMD_WRITE, off + i * 65536, len(data), 0, k)
            + data
            + c.request_bytes(R.CMD_DISC, 0, length, flags, d)
        )
        c.shut_wr()
        got = {}
        try:
            while True:
                r = c.wait_any()
                got[r.cookie] = r
        except Closed:
            pass
        c.close()
        if d in got:
            fail("%s: the server answered the DISC: %r" % (what, got[d]))
        if k in got:
            expect_errno(got[k], 0, "%s: the WRITE sent before the DISC" % kind)
        log("ok: %s -> closed, no reply to the DISC" % what)
    c = R.connect_go(ctx.sock)
    for i in range(len(cases)):
        if c.read(off + i * 65536, 65536) != pattern(200 + i, 65536):
            fail("the WRITE sent before DISC %d did not land" % i)
    log("ok: every WRITE sent before a DISC with flags landed")
    # Put back the base data for the checks that follow.
    c.write(off, ctx.base[off : off + len(cases) * 65536])
    c.disc()
    c.close()
    still_serves(ctx, "DISC with flags")


def case_extended_headers(ctx):
    c = Conn(ctx.sock)
    c.greet()
    c.negotiate_extended()
    log("ok: EXTENDED_HEADERS -> ACK")
    # The extension: a server that cannot go back to structured replies
    # answers ERR_EXT_HEADER_REQD; extended headers stay on.
    rep, _ = c.option(R.OPT_STRUCTURED_REPLY)
    expect_rep(rep, R.REP_ERR_EXT_HEADER_REQD, "extended: STRUCTURED_REPLY after EXTENDED_HEADERS")
    c.set_meta([b"base:allocation"])
    c.go()
    if c.size != ctx.size:
        fail("extended: size %d" % c.size)
    ctx.expect_data(c, 0, 65536, "extended: READ")
    data = bytes(range(256)) * 32
    c.write(3 * MiB, data)
    if c.read(3 * MiB, len(data)) != data:
        fail("extended: WRITE did not read back")
    c.write(3 * MiB, ctx.base[3 * MiB : 3 * MiB + len(data)])
    log("ok: extended WRITE and READ")
    r = c.cmd(R.CMD_BLOCK_STATUS, 0, ctx.size)
    expect_errno(r, 0, "extended: BLOCK_STATUS")
    if not r.block_status or any(t != R.RT_BLOCK_STATUS_EXT for _, t, _ in r.chunks if t != R.RT_NONE):
        fail("extended: BLOCK_STATUS did not answer with BLOCK_STATUS_EXT chunks: %r" % r)
    total = sum(l for l, _ in r.block_status[0][1])
    if total == 0 or total > ctx.size:
        fail("extended: BLOCK_STATUS descriptors cover %d bytes" % total)
    log("ok: extended BLOCK_STATUS: %d descriptors" % len(r.block_status[0][1]))
    for off, n, want, what in (
        (0, 1 << 33, (R.EINVAL, R.EOVERFLOW), "READ with an 8 GiB length"),
        (ctx.size, 512, R.EINVAL, "READ at the end"),
        (U64 - 512, 1024, R.EINVAL, "READ wrapping past 2^64"),
        (0, U64 - 1, (R.EINVAL, R.EOVERFLOW), "READ with a length of 2^64-1"),
    ):
        expect_errno(c.cmd(R.CMD_READ, off, n), want, "extended: " + what)
    expect_errno(c.cmd(42, 0, 4096), R.EINVAL, "extended: unknown command")
    # Every reply header carries the request's offset (rawnbd checks it);
    # these come from different places in the server.
    ctx.expect_data(c, 4096, 16 * MiB, "extended: a 16 MiB READ at 4096, cut into pieces")
    r = c.cmd(R.CMD_READ, 4096, 16 * MiB, R.CF_DF)
    if r.error or bytes(r.data) != ctx.base[4096 : 4096 + 16 * MiB]:
        fail("extended: a 16 MiB READ at 4096 with DF: %r" % r)
    expect_errno(c.cmd(42, 12345, 4096), R.EINVAL, "extended: unknown command at offset 12345")
    expect_errno(c.cmd(R.CMD_READ, 8192, 0), (0, R.EINVAL), "extended: zero-length READ at 8192")
    expect_errno(c.cmd(R.CMD_FLUSH, 0, 0, 1 << 9), R.EINVAL, "extended: FLUSH with unknown flag bit 9")
    expect_errno(
        c.cmd(R.CMD_WRITE, 4096, 512, R.CF_REQ_ONE, b"\x77" * 512), R.EINVAL, "extended: WRITE at 4096 with REQ_ONE"
    )
    r = c.cmd(R.CMD_BLOCK_STATUS, 20480, 65536)
    expect_errno(r, 0, "extended: BLOCK_STATUS at 20480")
    log("ok: extended: every reply header carried its request's offset")
    expect_errno(c.cmd(R.CMD_WRITE_ZEROES, U64 - 4096, 8192), R.ENOSPC, "extended: WRITE_ZEROES wrapping past 2^64")
    expect_errno(
        c.cmd(R.CMD_WRITE, ctx.size - 512, 1024, 0, b"\x77" * 1024), R.ENOSPC, "extended: WRITE straddling the end"
    )
    expect_errno(c.cmd(R.CMD_READ, 0, 0), (0, R.EINVAL), "extended: zero-length READ")
    ctx.expect_data(c, ctx.size - 4096, 4096, "extended: the end after the errors")
    c.disc()
    c.close()

    # A compact request on an extended connection is bad magic.
    c = R.connect_go(ctx.sock, extended=True)
    # Two of them, so that a server reading whole 32-byte headers gets one.
    for _ in range(2):
        send_maybe_closed(c, lambda: c.send_req(R.CMD_READ, 0, 4096, extended=False, track=False))
    expect_closed(c, "a compact request after EXTENDED_HEADERS", allow_bytes=True)

    # A 1 GiB WRITE on an extended connection: EINVAL, then closed.
    c = R.connect_go(ctx.sock, extended=True)
    k = c.cookie()
    send_maybe_closed(c, lambda: c.send_req(R.CMD_WRITE, 0, GiB, 0, b"\x5a" * 4096, cookie=k))
    try:
        r = c.wait(k)
    except Closed as e:
        fail("extended: WRITE claiming 1 GiB: closed without replying EINVAL (%s)" % e)
    expect_errno(r, R.EINVAL, "extended: WRITE claiming 1 GiB")
    expect_closed(c, "extended: after the WRITE claiming 1 GiB")

    # A 64-bit WRITE length (beyond 32 bits): the same.
    c = R.connect_go(ctx.sock, extended=True)
    k = c.cookie()
    send_maybe_closed(c, lambda: c.send_req(R.CMD_WRITE, 0, 1 << 40, 0, b"\x5a" * 4096, cookie=k))
    try:
        r = c.wait(k)
    except Closed as e:
        fail("extended: WRITE claiming 1 TiB: closed without replying EINVAL (%s)" % e)
    expect_errno(r, R.EINVAL, "extended: WRITE claiming 1 TiB")
    expect_closed(c, "extended: after the WRITE claiming 1 TiB")
    still_serves(ctx, "extended headers")


def case_read_only(ctx):
    c = R.connect_go(ctx.sock, structured=True)
    if not c.tflags & R.TF_READ_ONLY:
        fail("a --read-only export does not advertise READ_ONLY: flags 0x%x" % c.tflags)
    log("ok: READ_ONLY advertised")
    expect_errno(c.cmd(R.CMD_WRITE, 0, 4096, 0, b"\x42" * 4096), R.EPERM, "read-only: WRITE")
    # FUA need not be advertised on a read-only export; if it is not, the
    # flag itself is invalid and EINVAL is a fair answer too.
    fua_ok = (R.EPERM,) if c.tflags & R.TF_SEND_FUA else (R.EPERM, R.EINVAL)
    expect_errno(c.cmd(R.CMD_WRITE, 0, 4096, R.CF_FUA, b"\x42" * 4096), fua_ok, "read-only: WRITE with FUA")
    expect_errno(c.cmd(R.CMD_WRITE_ZEROES, 0, 4096), R.EPERM, "read-only: WRITE_ZEROES")
    expect_errno(c.cmd(R.CMD_TRIM, 0, 4096), R.EPERM, "read-only: TRIM")
    expect_errno(c.cmd(R.CMD_WRITE, 8192, 65536, 0, b"\x42" * 65536), R.EPERM, "read-only: a 64 KiB WRITE")
    ctx.expect_data(c, 0, 8192, "read-only: READ after the refused writes")
    r = c.cmd(R.CMD_FLUSH, 0, 0)
    expect_errno(r, (0, R.EPERM, R.EINVAL), "read-only: FLUSH")
    c.disc()
    c.close()

    h = libnbd_handle(ctx)
    if not h.is_read_only():
        fail("libnbd: is_read_only() is false")
    for fn, args, what in (
        (h.pwrite, (b"\x42" * 4096, 4096), "pwrite"),
        (h.zero, (4096, 4096), "zero"),
        (h.trim, (4096, 4096), "trim"),
    ):
        e = libnbd_errno(fn, *args)
        if e != R.EPERM:
            fail("libnbd read-only %s: errno %s, expected EPERM" % (what, errno_name(e)))
        log("ok: libnbd read-only %s -> EPERM" % what)
    if h.pread(8192, 0) != ctx.base[:8192]:
        fail("read-only export changed")
    h.shutdown()
    still_serves(ctx, "writes to a read-only export")


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: hostile.py CASE SOCKET BASE")
    case, sock, base = sys.argv[1:]
    fn = globals().get("case_" + case)
    if fn is None:
        sys.exit("unknown case %r" % case)
    fn(Ctx(sock, base))
    print("PASS %s" % case, flush=True)


if __name__ == "__main__":
    main()
