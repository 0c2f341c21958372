#!/usr/bin/python3
"""STARTTLS cases byte for byte, one per sub-command, for tests/nbd_tls.rs.

    tls.py CASE SOCKET BASE CA

SOCKET is the server's Unix socket, BASE a file holding what the default
export reads as, CA the certificate authority that signed the server's
certificate (for "localhost"). The client is tests/nbd_hostile/rawnbd.py, its
socket wrapped in python's ssl module once the server acknowledges STARTTLS.
Each case prints one line per check and ends with `PASS CASE`; a wrong answer
raises (exit status 1) saying what was sent, expected and received.
"""

import os
import select
import ssl
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nbd_hostile"))

import rawnbd as R  # noqa: E402
from hostile import expect_rep, fail, log  # noqa: E402
from rawnbd import Conn  # noqa: E402


class Ctx:
    def __init__(self, sock, base, ca):
        self.sock = sock
        self.ca = ca
        with open(base, "rb") as f:
            self.base = f.read()

    def starttls(self, c, what):
        rep, _ = c.option(R.OPT_STARTTLS)
        expect_rep(rep, R.REP_ACK, what)
        tls = ssl.create_default_context(cafile=self.ca)
        # An end without close_notify raises (ssl.SSLEOFError) instead of
        # reading as a clean end: a cut-off session fails the case.
        c.sock = tls.wrap_socket(c.sock, server_hostname="localhost", suppress_ragged_eofs=False)
        log("ok: TLS up (%s, %s)" % (c.sock.version(), c.sock.cipher()[0]))

    def expect_base(self, c, offset, length, what):
        got = c.read(offset, length)
        if got != self.base[offset : offset + length]:
            fail("%s: READ [%d, +%d) differs from the export's data" % (what, offset, length))
        log("ok: %s: READ [%d, +%d) matches" % (what, offset, length))


def case_required(ctx):
    """Before STARTTLS every option but STARTTLS and ABORT gets ERR_TLS_REQD
    (even unknown ones); after it, the handshake and transmission work."""
    c = Conn(ctx.sock)
    c.greet()
    for opt, data, name in [
        (R.OPT_LIST, b"", "LIST"),
        (R.OPT_STRUCTURED_REPLY, b"", "STRUCTURED_REPLY"),
        (R.OPT_INFO, Conn.go_data(), "INFO"),
        (R.OPT_GO, Conn.go_data(), "GO"),
        (R.OPT_SET_META_CONTEXT, Conn.meta_data(b"", [b"base:allocation"]), "SET_META_CONTEXT"),
        (99, b"xyz", "unknown option 99"),
    ]:
        rep, _ = c.option(opt, data)
        expect_rep(rep, R.REP_ERR_TLS_REQD, "%s before STARTTLS" % name)
    ctx.starttls(c, "STARTTLS")
    rep, _ = c.option(R.OPT_STARTTLS)
    expect_rep(rep, R.REP_ERR_INVALID, "STARTTLS once TLS is up")
    names = c.list_exports()
    if names != [b""]:
        fail("LIST over TLS: %r" % names)
    log("ok: LIST over TLS names the default export")
    c.negotiate_structured()
    size, _ = c.go()
    if size != len(ctx.base):
        fail("GO over TLS: size %d, expected %d" % (size, len(ctx.base)))
    # Reads far apart and one larger than a TLS record (16 KiB) and the
    # bridge's chunk (64 KiB); several in flight at once.
    reads = [(0, 4096), (len(ctx.base) - 8192, 8192), (3 << 20, 1 << 20)]
    cookies = [c.send_req(R.CMD_READ, off, n) for off, n in reads]
    for ck, (off, n) in zip(cookies, reads):
        r = c.wait(ck)
        if r.error or bytes(r.data) != ctx.base[off : off + n]:
            fail("pipelined READ [%d, +%d) over TLS: %r" % (off, n, r))
    log("ok: three pipelined READs over TLS match")
    data = bytes((i * 7) & 0xFF for i in range(200000))
    c.write(5 << 20, data)
    got = c.read(5 << 20, len(data))
    if got != data:
        fail("READ after WRITE over TLS differs")
    log("ok: WRITE of %d bytes over TLS reads back" % len(data))
    c.disc()
    got = c.read_to_eof()
    if got:
        fail("DISC over TLS: %d bytes after it" % len(got))
    log("ok: DISC over TLS ends the session")
    c.close()

    c = Conn(ctx.sock)
    c.greet()
    c.send_opt(R.OPT_EXPORT_NAME, b"")
    got = c.read_to_eof()
    if got:
        fail("EXPORT_NAME before STARTTLS: expected the connection closed, got %r" % got[:64])
    log("ok: EXPORT_NAME before STARTTLS -> connection closed")
    c.close()

    c = Conn(ctx.sock)
    c.greet()
    rep, _ = c.option(R.OPT_ABORT)
    expect_rep(rep, R.REP_ACK, "ABORT before STARTTLS")
    c.close()


def case_state_reset(ctx):
    """With TLS optional: what was negotiated in the clear does not survive
    the upgrade."""
    c = Conn(ctx.sock)
    c.greet()
    rep, _ = c.option(R.OPT_STRUCTURED_REPLY)
    expect_rep(rep, R.REP_ACK, "STRUCTURED_REPLY in the clear")
    rep, _ = c.option(R.OPT_SET_META_CONTEXT, Conn.meta_data(b"", [b"base:allocation"]))
    expect_rep(rep, R.REP_ACK, "SET_META_CONTEXT in the clear")
    ctx.starttls(c, "STARTTLS after options in the clear")
    rep, _ = c.option(R.OPT_SET_META_CONTEXT, Conn.meta_data(b"", [b"base:allocation"]))
    expect_rep(rep, R.REP_ERR_INVALID, "SET_META_CONTEXT over TLS before STRUCTURED_REPLY")
    c.negotiate_structured()
    log("ok: STRUCTURED_REPLY again over TLS -> ACK")
    size, _ = c.go()
    ctx.expect_base(c, 1 << 20, 65536, "over TLS after the reset")
    c.disc()
    c.close()


def case_garbage(ctx):
    """Bytes that are not TLS after the STARTTLS ACK: the server ends that
    session (a TLS alert at most), and a proper TLS client is served."""
    c = Conn(ctx.sock)
    c.greet()
    rep, _ = c.option(R.OPT_STARTTLS)
    expect_rep(rep, R.REP_ACK, "STARTTLS")
    c.send(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 64)
    got = c.read_to_eof()
    # A TLS alert record starts with content type 21.
    if not got or got[0] != 21:
        fail("after non-TLS bytes: expected a TLS alert, got %r" % got[:32])
    log("ok: non-TLS bytes after STARTTLS -> closed (%d bytes of alert)" % len(got))
    c.close()

    c = Conn(ctx.sock)
    c.greet()
    rep, _ = c.option(R.OPT_STARTTLS)
    expect_rep(rep, R.REP_ACK, "STARTTLS, then a hang-up mid-handshake")
    c.send(bytes.fromhex("160301"))  # the start of a record header
    c.close()
    log("ok: hung up in the middle of the TLS handshake")

    c = Conn(ctx.sock)
    c.greet()
    ctx.starttls(c, "STARTTLS for a well-behaved client")
    c.negotiate_structured()
    c.go()
    ctx.expect_base(c, 0, 65536, "a fresh TLS connection after the bad ones")
    c.disc()
    c.close()


class BioSocket:
    """A TLS session run through memory BIOs over a plain socket, so that the
    client can put its first handshake bytes on the wire whenever it likes.
    Reads and writes like a socket for rawnbd.Conn."""

    def __init__(self, raw, tls, incoming, outgoing):
        self.raw, self.tls, self.incoming, self.outgoing = raw, tls, incoming, outgoing

    def _flush(self):
        data = self.outgoing.read()
        if data:
            self.raw.sendall(data)

    def _fill(self):
        chunk = self.raw.recv(1 << 16)
        if chunk:
            self.incoming.write(chunk)
        else:
            self.incoming.write_eof()

    def _until_done(self, step):
        while True:
            try:
                result = step()
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def handshake(self):
        self._until_done(self.tls.do_handshake)

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[self._until_done(lambda: self.tls.write(view)) :]

    def recv(self, n):
        try:
            return self._until_done(lambda: self.tls.read(n))
        except ssl.SSLZeroReturnError:
            return b""

    def close(self):
        self.raw.close()


def case_pipelined_hello(ctx):
    """A client that sends its ClientHello right behind STARTTLS, before the
    server's reply, in one write: the server hands what it read past the
    option to the TLS session, however much. The hello is over 4 KiB here
    (a long ALPN list, which the server ignores)."""
    c = Conn(ctx.sock)
    c.greet()
    tls = ssl.create_default_context(cafile=ctx.ca)
    tls.set_alpn_protocols(["x-ubd-%02d-" % i + "p" * 240 for i in range(24)])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = tls.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        session.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if len(hello) <= 4096:
        fail("the ClientHello is %d bytes, meant to be over 4 KiB" % len(hello))
    c.send(struct.pack(">QII", R.IHAVEOPT, R.OPT_STARTTLS, 0) + hello)
    rep, _ = c.read_final(R.OPT_STARTTLS)
    expect_rep(rep, R.REP_ACK, "STARTTLS with a %d-byte ClientHello behind it" % len(hello))
    c.sock = BioSocket(c.sock, session, incoming, outgoing)
    c.sock.handshake()
    log("ok: TLS up with a %d-byte ClientHello sent before the STARTTLS reply (%s)" % (len(hello), session.version()))
    c.negotiate_structured()
    c.go()
    ctx.expect_base(c, 0, 65536, "after the pipelined ClientHello")
    c.disc()
    c.close()


class Slow:
    """A socket whose reads come at most 16 KiB (one TLS record) at a time,
    5 ms apart: a client on a slow link (about 3 MB/s), still reading when
    the server would like to be gone."""

    def __init__(self, sock):
        self.sock = sock

    def recv(self, n):
        time.sleep(0.005)
        return self.sock.recv(min(n, 16384))

    def __getattr__(self, name):
        return getattr(self.sock, name)


def case_shutdown_in_flight(ctx):
    """Connects over TLS, sends a READ of the whole export, says `ready`
    without reading the reply, and then reads it slowly (the test stops the
    server meanwhile): it must arrive whole, and then the session's
    close_notify."""
    c = Conn(ctx.sock)
    c.greet()
    ctx.starttls(c, "STARTTLS")
    c.negotiate_structured()
    size, _ = c.go()
    cookie = c.send_req(R.CMD_READ, 0, size)
    # Once the reply has begun, the server has read the READ: it is in
    # flight (a request still on its way in when the server stops is not
    # read, and the connection ends under it).
    if not select.select([c.sock], [], [], 60)[0]:
        fail("no reply to the READ began within 60 s")
    log("ready")
    # Not a timing assumption: the reply must arrive however it is read.
    time.sleep(1)
    c.sock = Slow(c.sock)
    r = c.wait(cookie)
    if r.error or bytes(r.data) != ctx.base[:size]:
        fail("a READ in flight at the shutdown: %r" % r)
    log("ok: the READ in flight at the shutdown arrived whole")
    got = c.read_to_eof()
    if got:
        fail("at shutdown: %d unexpected bytes" % len(got))
    log("ok: the server ended the TLS session with a close_notify")
    c.close()


def case_after_disc(ctx):
    """READ then DISC, the reply read only in part; then more bytes (which
    no one will read now) before the rest: the whole reply still arrives,
    and then the close_notify. (The bytes after DISC break the protocol;
    they stand for any input the server's side no longer takes.)"""
    c = Conn(ctx.sock)
    c.greet()
    ctx.starttls(c, "STARTTLS")
    c.negotiate_structured()
    size, _ = c.go()
    length = 4 << 20
    c.send_req(R.CMD_READ, 0, length, cookie=7, track=False)
    c.disc()
    # All of the reply (4 MiB of data in chunks) but 400 KiB first: more
    # than the client's socket holds, so the TLS bridge is left holding
    # some, and less than all the buffers on the way, so the device's side
    # can send its last bytes and close.
    head = c.recv_exact(length - 400 * 1024)
    # Meanwhile the server has sent its last bytes and closed its side.
    time.sleep(0.5)
    try:
        c.send_req(R.CMD_WRITE, 0, 4096, payload=bytes(4096), cookie=8, track=False)
    except OSError:
        pass  # the server may have ended the session already
    got = head + c.read_to_eof()
    # The structured reply's chunks: OFFSET_DATA pieces, the last one DONE.
    data, at, done = bytearray(length), 0, False
    while not done:
        if at + 20 > len(got):
            fail("after DISC: the reply stops at byte %d" % len(got))
        magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", got[at : at + 20])
        payload = got[at + 20 : at + 20 + n]
        if magic != R.STRUCTURED_MAGIC or cookie != 7 or len(payload) != n:
            fail("after DISC: a bad or cut-off chunk at byte %d" % at)
        if rtype == R.RT_OFFSET_DATA:
            (off,) = struct.unpack(">Q", payload[:8])
            data[off : off + n - 8] = payload[8:]
        elif rtype != R.RT_NONE:
            fail("after DISC: chunk type %d" % rtype)
        done = bool(flags & R.REPLY_FLAG_DONE)
        at += 20 + n
    if at != len(got) or bytes(data) != ctx.base[:length]:
        fail("after DISC: %d bytes after the reply, or its data differs" % (len(got) - at))
    log("ok: the reply to a READ before DISC arrived whole, then the close_notify")
    c.close()


def main():
    if len(sys.argv) != 5:
        sys.exit("usage: tls.py CASE SOCKET BASE CA")
    case, sock, base, ca = sys.argv[1:]
    fn = globals().get("case_" + case)
    if fn is None:
        sys.exit("unknown case %r" % case)
    fn(Ctx(sock, base, ca))
    print("PASS %s" % case, flush=True)


if __name__ == "__main__":
    main()
