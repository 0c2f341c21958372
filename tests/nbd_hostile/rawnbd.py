"""A small, deliberately permissive NBD client over a raw Unix socket.

It speaks just enough of the fixed-newstyle handshake and the transmission
phase (simple, structured and extended replies) to send well-formed and
malformed traffic byte for byte, for tests/nbd_hostile.rs. It trusts nothing
the server sends: every reply is checked against what was asked, and any
surprise raises ProtocolError.

Numbers are those of the NBD protocol document (doc/proto.md of the
NetworkBlockDevice/nbd project).
"""

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
ERR_BIT = 1 << 31
REP_ERR_UNSUP = ERR_BIT | 1
REP_ERR_POLICY = ERR_BIT | 2
REP_ERR_INVALID = ERR_BIT | 3
REP_ERR_PLATFORM = ERR_BIT | 4
REP_ERR_TLS_REQD = ERR_BIT | 5
REP_ERR_UNKNOWN = ERR_BIT | 6
REP_ERR_SHUTDOWN = ERR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = ERR_BIT | 8
REP_ERR_TOO_BIG = ERR_BIT | 9
REP_ERR_EXT_HEADER_REQD = ERR_BIT | 10

REP_NAMES = {
    REP_ACK: "ACK",
    REP_SERVER: "SERVER",
    REP_INFO: "INFO",
    REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP",
    REP_ERR_POLICY: "ERR_POLICY",
    REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM",
    REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "ERR_TOO_BIG",
    REP_ERR_EXT_HEADER_REQD: "ERR_EXT_HEADER_REQD",
}


def rep_name(rep):
    return REP_NAMES.get(rep, "0x%08x" % rep)


INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
    CMD_RESIZE: "RESIZE",
}

# Command flags.
CF_FUA = 1 << 0
CF_NO_HOLE = 1 << 1
CF_DF = 1 << 2
CF_REQ_ONE = 1 << 3
CF_FAST_ZERO = 1 << 4
CF_PAYLOAD_LEN = 1 << 5

# Reply chunk types.
RT_NONE = 0
RT_OFFSET_DATA = 1
RT_OFFSET_HOLE = 2
RT_BLOCK_STATUS = 5
RT_BLOCK_STATUS_EXT = 6
RT_ERROR = (1 << 15) | 1
RT_ERROR_OFFSET = (1 << 15) | 2
REPLY_FLAG_DONE = 1

# Errno values on the wire.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
ERRNO_NAMES = {
    0: "OK",
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}


def errno_name(e):
    return ERRNO_NAMES.get(e, str(e))


# Generous: only there so that a hung server fails the test instead of
# hanging it. Nothing is asserted about how long anything takes.
TIMEOUT = 120


class ProtocolError(AssertionError):
    pass


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class Reply:
    """One complete reply (simple, or all chunks of a structured one)."""

    def __init__(self, cookie, cmd, length, offset):
        self.cookie = cookie
        self.cmd = cmd
        self.length = length
        self.offset = offset
        self.simple = None
        self.error = 0
        self.errors = []  # (errno, message, offset or None)
        self.chunks = []  # (flags, type, offset-or-None, payload-summary)
        self.data = None  # bytearray for reads
        self.data_covered = []  # (offset, length) ranges covered by data/hole
        self.block_status = []  # (context id, [(length, flags)])

    def __repr__(self):
        return "Reply(%s cookie=%d error=%s chunks=%r)" % (
            CMD_NAMES.get(self.cmd, self.cmd),
            self.cookie,
            errno_name(self.error),
            self.chunks[:8],
        )


class Conn:
    def __init__(self, path, timeout=TIMEOUT):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        self.extended = False
        self.size = None
        self.tflags = None
        self.pending = {}  # cookie -> (cmd, length, offset)
        self.partial = {}  # cookie -> Reply (structured, not done yet)
        self.done = {}  # cookie -> Reply
        self.next_cookie = 1
        self.contexts = {}  # id -> name
        self.handshake_flags = None

    # ----- bytes -----
    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed("connection reset after %d of %d bytes: %s" % (len(buf), n, e))
            if not chunk:
                raise Closed("EOF after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def read_to_eof(self, limit=1 << 26):
        """Reads until the server closes; returns what it sent. Raises
        ProtocolError if the server sends more than `limit` bytes or the
        socket times out (the connection stayed open)."""
        buf = bytearray()
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                return bytes(buf)
            except socket.timeout:
                raise ProtocolError(
                    "expected the server to close the connection, but it stayed open "
                    "(%d bytes received meanwhile)" % len(buf)
                )
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                raise ProtocolError("server sent more than %d bytes, expected it to close" % limit)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def shut_wr(self):
        self.sock.shutdown(socket.SHUT_WR)

    # ----- handshake -----
    def greet(self, client_flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        hello = self.recv_exact(18)
        magic, opt, hflags = struct.unpack(">QQH", hello)
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise ProtocolError("bad greeting %r" % hello)
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("server does not offer FIXED_NEWSTYLE: 0x%x" % hflags)
        self.handshake_flags = hflags
        if client_flags is not None:
            self.send(struct.pack(">I", client_flags))
        return hflags

    def send_opt(self, opt, data=b"", length=None, magic=IHAVEOPT):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + data)

    def read_opt_reply(self, expect_opt=None):
        hdr = self.recv_exact(20)
        magic, opt, rep, length = struct.unpack(">QIII", hdr)
        if magic != REPLY_MAGIC:
            raise ProtocolError("bad option reply magic 0x%x (header %r)" % (magic, hdr))
        if expect_opt is not None and opt != expect_opt:
            raise ProtocolError("option reply for option %d, expected %d" % (opt, expect_opt))
        if length > 1 << 20:
            raise ProtocolError("option reply claims %d bytes" % length)
        data = self.recv_exact(length)
        return rep, data

    def option(self, opt, data=b"", length=None):
        """Sends one option and reads replies until the final one (ACK or an
        error). Returns (final reply type, [(type, data)...] before it)."""
        self.send_opt(opt, data, length)
        return self.read_final(opt)

    def read_final(self, opt):
        before = []
        while True:
            rep, data = self.read_opt_reply(opt)
            if rep == REP_ACK or rep & ERR_BIT:
                if rep & ERR_BIT:
                    before.append((rep, data))
                return rep, before
            before.append((rep, data))
            if len(before) > 100000:
                raise ProtocolError("endless option replies")

    def list_exports(self):
        rep, replies = self.option(OPT_LIST)
        if rep != REP_ACK:
            raise ProtocolError("LIST answered %s" % rep_name(rep))
        names = []
        for t, data in replies:
            if t != REP_SERVER:
                raise ProtocolError("LIST sent a %s reply" % rep_name(t))
            (n,) = struct.unpack(">I", data[:4])
            if 4 + n > len(data):
                raise ProtocolError("LIST SERVER reply overruns: %r" % data)
            names.append(data[4 : 4 + n])
        return names

    def negotiate_structured(self):
        rep, _ = self.option(OPT_STRUCTURED_REPLY)
        if rep != REP_ACK:
            raise ProtocolError("STRUCTURED_REPLY answered %s" % rep_name(rep))
        self.structured = True

    def negotiate_extended(self):
        rep, _ = self.option(OPT_EXTENDED_HEADERS)
        if rep != REP_ACK:
            raise ProtocolError(
                "EXTENDED_HEADERS answered %s (extended headers are in scope, issue 4)" % rep_name(rep)
            )
        self.extended = True
        self.structured = True

    @staticmethod
    def meta_data(name, queries):
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q
        return data

    def set_meta(self, queries, name=b""):
        rep, replies = self.option(OPT_SET_META_CONTEXT, self.meta_data(name, queries))
        if rep != REP_ACK:
            raise ProtocolError("SET_META_CONTEXT answered %s" % rep_name(rep))
        for t, data in replies:
            if t != REP_META_CONTEXT:
                raise ProtocolError("SET_META_CONTEXT sent a %s reply" % rep_name(t))
            (cid,) = struct.unpack(">I", data[:4])
            self.contexts[cid] = data[4:]
        return dict(self.contexts)

    @staticmethod
    def go_data(name=b"", infos=(), name_len=None, ninfo=None):
        if name_len is None:
            name_len = len(name)
        if ninfo is None:
            ninfo = len(infos)
        data = struct.pack(">I", name_len) + name + struct.pack(">H", ninfo)
        for i in infos:
            data += struct.pack(">H", i)
        return data

    def info_or_go(self, opt, name=b"", infos=(INFO_BLOCK_SIZE,)):
        """INFO or GO; returns (final reply type, {info type: data})."""
        rep, replies = self.option(opt, self.go_data(name, infos))
        got = {}
        for t, data in replies:
            if t == REP_INFO:
                (it,) = struct.unpack(">H", data[:2])
                got[it] = data[2:]
            elif not t & ERR_BIT:
                raise ProtocolError("%d sent a %s reply" % (opt, rep_name(t)))
        if rep == REP_ACK:
            if INFO_EXPORT not in got:
                raise ProtocolError("INFO/GO ACKed without INFO_EXPORT")
            size, tflags = struct.unpack(">QH", got[INFO_EXPORT])
            if opt == OPT_GO:
                self.size, self.tflags = size, tflags
        return rep, got

    def go(self, name=b"", infos=(INFO_BLOCK_SIZE,)):
        rep, got = self.info_or_go(OPT_GO, name, infos)
        if rep != REP_ACK:
            raise ProtocolError("GO %r answered %s" % (name[:40], rep_name(rep)))
        return self.size, self.tflags

    # ----- transmission -----
    def cookie(self):
        c = self.next_cookie
        self.next_cookie += 1
        return c

    def request_bytes(self, cmd, offset, length, flags=0, cookie=None, magic=None, extended=None):
        if extended is None:
            extended = self.extended
        if extended:
            if magic is None:
                magic = EXT_REQUEST_MAGIC
            return struct.pack(">IHHQQQ", magic, flags, cmd, cookie, offset, length)
        if magic is None:
            magic = REQUEST_MAGIC
        return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)

    def send_req(self, cmd, offset, length, flags=0, payload=b"", cookie=None, magic=None, extended=None, track=True):
        """Sends one request (and `payload`, which may differ from `length`
        on purpose). Returns its cookie."""
        if cookie is None:
            cookie = self.cookie()
        if track:
            self.pending[cookie] = (cmd, length, offset)
        self.send(self.request_bytes(cmd, offset, length, flags, cookie, magic, extended) + payload)
        return cookie

    def _read_one_message(self):
        """Reads one simple reply or one structured/extended chunk; files it."""
        head = self.recv_exact(4)
        (magic,) = struct.unpack(">I", head)
        if magic == SIMPLE_MAGIC:
            rest = self.recv_exact(12)
            err, cookie = struct.unpack(">IQ", rest)
            if cookie not in self.pending:
                raise ProtocolError("simple reply for unknown cookie %d (error %d)" % (cookie, err))
            cmd, length, offset = self.pending.pop(cookie)
            r = Reply(cookie, cmd, length, offset)
            r.simple = True
            r.error = err
            if cmd == CMD_READ and err == 0:
                if self.structured:
                    raise ProtocolError("simple reply with data for READ after structured replies were negotiated")
                r.data = bytearray(self.recv_exact(length))
            self.done[cookie] = r
            return
        if magic == STRUCTURED_MAGIC:
            if not self.structured or self.extended:
                raise ProtocolError("structured reply chunk on a connection that did not negotiate it (extended=%s)" % self.extended)
            rest = self.recv_exact(16)
            flags, rtype, cookie, plen = struct.unpack(">HHQI", rest)
            coff = None
        elif magic == EXT_REPLY_MAGIC:
            if not self.extended:
                raise ProtocolError("extended reply chunk on a connection without extended headers")
            rest = self.recv_exact(28)
            flags, rtype, cookie, coff, plen = struct.unpack(">HHQQQ", rest)
        else:
            raise ProtocolError("bad reply magic 0x%08x" % magic)
        if cookie not in self.pending:
            raise ProtocolError("reply chunk type %d for unknown cookie %d" % (rtype, cookie))
        if plen > (32 << 20) + 4096:
            raise ProtocolError("reply chunk claims %d payload bytes" % plen)
        payload = self.recv_exact(plen)
        cmd, length, offset = self.pending[cookie]
        if coff is not None and coff != offset:
            # The extension: the header's offset "MUST match the request".
            raise ProtocolError(
                "extended reply chunk type %d for %s cookie %d carries offset %d, not the request's %d"
                % (rtype, CMD_NAMES.get(cmd, cmd), cookie, coff, offset)
            )
        r = self.partial.get(cookie)
        if r is None:
            r = self.partial[cookie] = Reply(cookie, cmd, length, offset)
            r.simple = False
            if cmd == CMD_READ:
                r.data = bytearray(length) if length <= (64 << 20) else None
        r.chunks.append((flags, rtype, plen))
        self._chunk(r, rtype, payload)
        if flags & REPLY_FLAG_DONE:
            del self.partial[cookie]
            del self.pending[cookie]
            self._finish(r)
            self.done[cookie] = r

    def _chunk(self, r, rtype, p):
        if rtype == RT_NONE:
            if p:
                raise ProtocolError("NONE chunk with %d payload bytes" % len(p))
        elif rtype in (RT_OFFSET_DATA, RT_OFFSET_HOLE):
            if r.cmd != CMD_READ:
                raise ProtocolError("data chunk in the reply to %s" % CMD_NAMES.get(r.cmd))
            if rtype == RT_OFFSET_DATA:
                if len(p) < 8:
                    raise ProtocolError("short OFFSET_DATA chunk")
                (off,) = struct.unpack(">Q", p[:8])
                data = p[8:]
                n = len(data)
            else:
                if self.extended:
                    off, n = struct.unpack(">QQ", p)
                else:
                    off, n = struct.unpack(">QI", p)
                data = None
            if n == 0:
                raise ProtocolError("zero-length %s chunk" % ("OFFSET_DATA" if data is not None else "OFFSET_HOLE"))
            if off < r.offset or off + n > r.offset + r.length:
                raise ProtocolError(
                    "chunk [%d, +%d) outside the request [%d, +%d)" % (off, n, r.offset, r.length)
                )
            for o, l in r.data_covered:
                if off < o + l and o < off + n:
                    raise ProtocolError("overlapping read chunks")
            r.data_covered.append((off, n))
            if r.data is not None:
                rel = off - r.offset
                r.data[rel : rel + n] = data if data is not None else bytes(n)
        elif rtype in (RT_BLOCK_STATUS, RT_BLOCK_STATUS_EXT):
            if r.cmd != CMD_BLOCK_STATUS:
                raise ProtocolError("block status chunk in the reply to %s" % CMD_NAMES.get(r.cmd))
            if rtype == RT_BLOCK_STATUS_EXT:
                if not self.extended:
                    raise ProtocolError("BLOCK_STATUS_EXT without extended headers")
                cid, count = struct.unpack(">II", p[:8])
                body = p[8:]
                if len(body) != 16 * count:
                    raise ProtocolError("BLOCK_STATUS_EXT count %d, %d bytes" % (count, len(body)))
                descs = [struct.unpack(">QQ", body[i : i + 16]) for i in range(0, len(body), 16)]
            else:
                if self.extended:
                    raise ProtocolError("32-bit BLOCK_STATUS chunk with extended headers")
                (cid,) = struct.unpack(">I", p[:4])
                body = p[4:]
                if len(body) % 8 or not body:
                    raise ProtocolError("BLOCK_STATUS chunk of %d descriptor bytes" % len(body))
                descs = [struct.unpack(">II", body[i : i + 8]) for i in range(0, len(body), 8)]
            if any(l == 0 for l, _ in descs):
                raise ProtocolError("zero-length block status descriptor")
            r.block_status.append((cid, descs))
        elif rtype in (RT_ERROR, RT_ERROR_OFFSET):
            if len(p) < 6:
                raise ProtocolError("short error chunk")
            err, mlen = struct.unpack(">IH", p[:6])
            msg = p[6 : 6 + mlen]
            off = None
            if rtype == RT_ERROR_OFFSET:
                if len(p) != 6 + mlen + 8:
                    raise ProtocolError("ERROR_OFFSET chunk of %d bytes, message %d" % (len(p), mlen))
                (off,) = struct.unpack(">Q", p[6 + mlen :])
            elif len(p) != 6 + mlen:
                raise ProtocolError("ERROR chunk of %d bytes, message %d" % (len(p), mlen))
            if err == 0:
                raise ProtocolError("error chunk with errno 0")
            r.errors.append((err, msg, off))
            if not r.error:
                r.error = err
        elif rtype & (1 << 15):
            # An unknown error chunk type: its payload starts like ERROR's.
            err = struct.unpack(">I", p[:4])[0] if len(p) >= 4 else EIO
            r.errors.append((err, b"", None))
            r.error = r.error or err
        else:
            raise ProtocolError("unknown non-error chunk type %d" % rtype)

    def _finish(self, r):
        if r.cmd == CMD_READ and not r.error:
            covered = sum(l for _, l in r.data_covered)
            if covered != r.length:
                raise ProtocolError(
                    "successful READ [%d, +%d) covered only %d bytes" % (r.offset, r.length, covered)
                )

    def wait(self, cookie):
        """Reads messages until the reply to `cookie` is complete."""
        while cookie not in self.done:
            if cookie not in self.pending:
                raise ProtocolError("waiting for cookie %d that was never sent" % cookie)
            self._read_one_message()
        return self.done.pop(cookie)

    def wait_any(self):
        while not self.done:
            self._read_one_message()
        cookie = next(iter(self.done))
        return self.done.pop(cookie)

    def cmd(self, cmd, offset, length, flags=0, payload=None):
        if payload is None:
            payload = b""
        return self.wait(self.send_req(cmd, offset, length, flags, payload))

    def read(self, offset, length, flags=0):
        r = self.cmd(CMD_READ, offset, length, flags)
        if r.error:
            raise ProtocolError("READ [%d, +%d) failed: %s" % (offset, length, errno_name(r.error)))
        return bytes(r.data)

    def write(self, offset, data, flags=0):
        r = self.cmd(CMD_WRITE, offset, len(data), flags, data)
        if r.error:
            raise ProtocolError("WRITE [%d, +%d) failed: %s" % (offset, len(data), errno_name(r.error)))

    def disc(self):
        self.send_req(CMD_DISC, 0, 0, track=False)


def connect_go(path, structured=False, extended=False, meta=(), name=b""):
    c = Conn(path)
    c.greet()
    if extended:
        c.negotiate_extended()
    elif structured:
        c.negotiate_structured()
    if meta:
        c.set_meta(list(meta), name)
    c.go(name)
    return c
