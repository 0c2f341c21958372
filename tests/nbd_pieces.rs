//! Requests larger than the device takes at once: with a 1 MiB pool the
//! server cuts a 32 MiB READ or WRITE into dozens of device requests, and
//! the reply must still be exactly the data, with simple replies, structured
//! replies (a chunk per piece) and DF (one chunk), over many connections.

mod common;

use std::process::Command;

use common::server::Server;
use common::{pseudo_random_bytes, run, sha256_hex, ubd};

const SCRIPT: &str = r#"
import nbd, sys, hashlib
uri, base = sys.argv[1], sys.argv[2]
want = open(base, 'rb').read()
M = 1 << 20

def df_read(h, n, off):
    """A READ with DF: the reply must be one data chunk."""
    out, seen = bytearray(n), []
    def chunk(buf, o, status, err):
        assert status == nbd.READ_DATA, status
        out[o - off:o - off + len(buf)] = buf
        seen.append(len(buf))
        return 0
    h.pread_structured(n, off, chunk, flags=nbd.CMD_FLAG_DF)
    assert seen == [n], seen
    return bytes(out)

def chunked_read(h, n, off):
    """A structured READ without DF: chunks cover the range exactly once."""
    out, seen = bytearray(n), []
    def chunk(buf, o, status, err):
        assert status == nbd.READ_DATA, status
        out[o - off:o - off + len(buf)] = buf
        seen.append((o, len(buf)))
        return 0
    h.pread_structured(n, off, chunk)
    seen.sort()
    pos = off
    for o, l in seen:
        assert o == pos, (o, pos)
        pos += l
    assert pos == off + n
    return bytes(out), len(seen)

for structured in (False, True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    for off, n in ((1000, 32 * M), (0, 32 * M), (5 * M + 3, 7 * M + 11)):
        assert h.pread(n, off) == want[off:off + n], (structured, off, n)
        if structured:
            assert df_read(h, n, off) == want[off:off + n], (off, n)
            got, chunks = chunked_read(h, n, off)
            assert got == want[off:off + n], (off, n)
            assert chunks > 1, chunks
    # A 32 MiB write at an odd offset, then read back in odd pieces.
    data = bytes((i * 7 + 3) & 0xff for i in range(256)) * (32 * M // 256)
    off = 17 * M + 77
    h.pwrite(data, off)
    h.flush()
    back = b''.join(h.pread(min(3 * M + 1, len(data) - i), off + i)
                    for i in range(0, len(data), 3 * M + 1))
    assert back == data, structured
    want = want[:off] + data + want[off + len(data):]
    # Many large requests in flight at once on one connection.
    bufs = [nbd.Buffer(8 * M) for _ in range(6)]
    cookies = [h.aio_pread(bufs[i], i * 8 * M) for i in range(6)]
    # A completed command is retired by the first call that reports it.
    left = set(cookies)
    while left:
        left = {c for c in left if not h.aio_command_completed(c)}
        if left:
            h.poll(-1)
    for i in range(6):
        assert bufs[i].to_bytearray() == want[i * 8 * M:(i + 1) * 8 * M], i
    h.shutdown()
print(hashlib.sha256(want).hexdigest())
"#;

#[test]
fn requests_larger_than_the_pool_are_cut_into_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.img");
    let cow = tmp.path().join("o.cow");
    std::fs::write(&base, pseudo_random_bytes(7, 64 << 20)).unwrap();
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    let before = sha256_hex(&std::fs::read(&base).unwrap());
    let server = Server::start(
        &tmp.path().join("s.sock"),
        &[cow.as_os_str(), "--pool-size".as_ref(), "1M".as_ref()],
    );
    let out = run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(server.uri())
        .arg(&base));
    let (status, stderr) = server.stop();
    assert!(status.success(), "server exit {status}: {stderr}");
    // What the client last saw equals the overlay's content after restart.
    let raw = tmp.path().join("out.raw");
    run(ubd().args(["convert", "-O", "raw"]).arg(&cow).arg(&raw));
    assert_eq!(sha256_hex(&std::fs::read(&raw).unwrap()), out.trim());
    assert_eq!(sha256_hex(&std::fs::read(&base).unwrap()), before);
}
