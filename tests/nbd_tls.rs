//! TLS in `ubd serve` (`STARTTLS`, `../shared/docs/nbd.md`), with real
//! clients: libnbd's tools (GnuTLS) over a Unix socket and over TCP, qemu-io
//! and qemu-img with a `tls-creds-x509` object, and a byte-for-byte client
//! (`tests/nbd_tls/tls.py`, python's ssl module) for what the tools never
//! send. The certificates are made for each test by `scripts/tls-certs`: a
//! CA, a server certificate for "localhost", 127.0.0.1 and ::1 signed by it, a
//! client certificate signed by it, and a client certificate from a second
//! CA the server never saw.
//!
//! Needs `openssl`, `libnbd-bin`, `python3-libnbd` (for /usr/bin/python3),
//! `qemu-utils`; fails naming the package when one is missing.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::server::{Server, serve_refused};
use common::{
    base_and_overlay, nbdinfo_json, output, pseudo_random_bytes, run, run_bytes, sha256_hex, tool,
};
use serde_json::Value;

const SIZE: usize = 16 << 20;
const MIB: usize = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    cow: PathBuf,
    base_data: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let (base, cow, base_data) = base_and_overlay(dir.path(), 0x746c_735f_6261_7365, SIZE);
        make_certificates(dir.path());
        Fixture {
            dir,
            base,
            cow,
            base_data,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The server's certificate directory.
    fn server_dir(&self) -> PathBuf {
        self.path("server")
    }

    fn socket(&self) -> PathBuf {
        self.path("nbd.sock")
    }

    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec![
            self.cow.as_os_str().to_owned(),
            "--tls-certificates".into(),
            self.server_dir().into_os_string(),
        ];
        args.extend(extra.iter().map(|a| a.into()));
        Server::start(&self.socket(), &args)
    }

    /// An NBD URI for the default export over the Unix socket; `certs` is
    /// the client's certificate directory (TLS) or `None` (plain).
    fn uri(&self, certs: Option<&str>) -> String {
        let socket = self.socket();
        match certs {
            Some(dir) => format!(
                "nbds+unix:///?socket={}&tls-certificates={}",
                socket.display(),
                self.path(dir).display()
            ),
            None => format!("nbd+unix:///?socket={}", socket.display()),
        }
    }

    /// Runs `tls.py CASE SOCKET BASE CA` and checks it passed.
    fn case(&self, case: &str) -> String {
        let out = output(
            Command::new(python())
                .arg(script())
                .arg(case)
                .arg(self.socket())
                .arg(&self.base)
                .arg(self.path("server/ca-cert.pem")),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains(&format!("PASS {case}")),
            "tls.py {case} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// In `dir`, with `scripts/tls-certs`: `server/` (ca-cert.pem,
/// server-cert.pem, server-key.pem, as the server and qemu-nbd read them),
/// `client/` (ca-cert.pem only, as libnbd reads it), `client-auth/` (with a
/// client certificate the CA signed) and `client-rogue/` (with one a second
/// CA signed, which the server never saw).
fn make_certificates(dir: &Path) {
    let tls_certs = |to: &Path| {
        let out = output(
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tls-certs")).arg(to),
        );
        assert!(
            out.status.success(),
            "scripts/tls-certs {} failed:\n{}",
            to.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (pki, rogue) = (dir.join("pki"), dir.join("pki-rogue"));
    tls_certs(&pki);
    tls_certs(&rogue);
    let place = |sub: &str, files: &[PathBuf]| {
        fs::create_dir_all(dir.join(sub)).unwrap();
        for from in files {
            fs::copy(from, dir.join(sub).join(from.file_name().unwrap())).unwrap();
        }
    };
    place(
        "server",
        &["ca-cert.pem", "server-cert.pem", "server-key.pem"].map(|f| pki.join("server").join(f)),
    );
    place("client", &[pki.join("ca/ca-cert.pem")]);
    place(
        "client-auth",
        &["ca-cert.pem", "client-cert.pem", "client-key.pem"].map(|f| pki.join("client").join(f)),
    );
    place(
        "client-rogue",
        &[
            pki.join("ca/ca-cert.pem"),
            rogue.join("client/client-cert.pem"),
            rogue.join("client/client-key.pem"),
        ],
    );
}

/// The python3 that has the libnbd bindings, used for the raw client too.
fn python() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    assert!(
        python.is_file(),
        "/usr/bin/python3 not found; install `python3`"
    );
    python
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbd_tls/tls.py")
}

/// `nbdinfo URI` that must fail; returns its stderr.
fn nbdinfo_fails(uri: &str) -> String {
    let out = output(Command::new(tool("nbdinfo", "libnbd-bin")).arg(uri));
    assert!(
        !out.status.success(),
        "nbdinfo {uri} succeeded, expected a refusal:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// nbdinfo's JSON says the connection used TLS (or did not) and the export
/// has the right size.
fn assert_info(info: &Value, tls: bool, what: &str) {
    assert_eq!(info["TLS"], Value::Bool(tls), "{what}: TLS in {info:#}");
    assert_eq!(
        info["exports"][0]["export-size"].as_u64(),
        Some(SIZE as u64),
        "{what}: export size in {info:#}"
    );
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("its address").port()
}

/// qemu's `--object` and `--image-opts` for the export over TLS.
fn qemu_tls_args(fx: &Fixture) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            fx.path("client").display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
            fx.socket().display()
        ),
    ]
}

#[test]
fn required_tls_serves_libnbd_and_qemu_and_refuses_plain_clients() {
    let fx = Fixture::new();
    let port = free_port().to_string();
    let server = fx.serve(&["--bind", "127.0.0.1", "--port", &port]);

    assert_info(
        &nbdinfo_json(&fx.uri(Some("client"))),
        true,
        "nbdinfo over the Unix socket",
    );
    let tcp = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        fx.path("client").display()
    );
    assert_info(&nbdinfo_json(&tcp), true, "nbdinfo over TCP");

    // A plain client gets no further than the option haggling.
    nbdinfo_fails(&fx.uri(None));
    nbdinfo_fails(&format!("nbd://127.0.0.1:{port}/"));

    // qemu-io writes a pattern and flushes through TLS, and reads it back.
    let qemu_io = tool("qemu-io", "qemu-utils");
    let out = run(Command::new(&qemu_io).args(qemu_tls_args(&fx)).args([
        "-c",
        "write -P 0x5a 1M 2M",
        "-c",
        "aio_write -P 0x3c 6M 64k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x5a 1M 2M",
        "-c",
        "read -P 0x3c 6M 64k",
    ]));
    assert!(
        out.matches("bytes at offset").count() >= 4 && !out.contains("Pattern verification failed"),
        "qemu-io over TLS:\n{out}"
    );

    // nbdcopy with 4 TLS connections reads back exactly that.
    let copy = fx.path("copy.raw");
    run(Command::new(tool("nbdcopy", "libnbd-bin"))
        .arg("--connections=4")
        .arg(fx.uri(Some("client")))
        .arg(&copy));
    let mut want = fx.base_data.clone();
    want[MIB..3 * MIB].fill(0x5a);
    want[6 * MIB..6 * MIB + 65536].fill(0x3c);
    assert_eq!(
        sha256_hex(&fs::read(&copy).unwrap()),
        sha256_hex(&want),
        "nbdcopy over TLS: the export's contents"
    );

    // qemu-img compares the export with the same bytes, over TLS.
    fs::write(fx.path("want.raw"), &want).unwrap();
    let out = output(
        Command::new(tool("qemu-img", "qemu-utils"))
            .arg("compare")
            .args(qemu_tls_args(&fx))
            .arg(format!(
                "driver=raw,file.driver=file,file.filename={}",
                fx.path("want.raw").display()
            )),
    );
    assert!(
        out.status.success(),
        "qemu-img compare over TLS:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Byte for byte: ERR_TLS_REQD before STARTTLS, EXPORT_NAME refused by a
    // hang-up, pipelined requests over TLS.
    fx.case("required");

    let (status, stderr) = server.stop();
    assert!(status.success(), "server exit {status}:\n{stderr}");
    assert!(!fx.socket().exists(), "the socket file is left behind");
    assert!(stderr.contains("TLS required"), "stderr:\n{stderr}");
}

#[test]
fn optional_tls_serves_both_and_forgets_what_was_negotiated_in_the_clear() {
    let fx = Fixture::new();
    let server = fx.serve(&["--tls", "on"]);
    assert_info(&nbdinfo_json(&fx.uri(None)), false, "a plain client");
    assert_info(&nbdinfo_json(&fx.uri(Some("client"))), true, "a TLS client");
    let out = fx.case("state_reset");
    assert!(out.contains("ERR_INVALID"), "{out}");
    // Data written in the clear reads back over TLS.
    let data = pseudo_random_bytes(7, 2 * MIB);
    fs::write(fx.path("in.raw"), &data).unwrap();
    run(Command::new(tool("nbdcopy", "libnbd-bin"))
        .arg(fx.path("in.raw"))
        .arg(fx.uri(None)));
    let back = run_bytes(
        Command::new(tool("nbdcopy", "libnbd-bin"))
            .arg(fx.uri(Some("client")))
            .arg("-"),
    );
    assert_eq!(back.len(), SIZE);
    assert!(
        back[..2 * MIB] == data[..],
        "written in the clear, read over TLS"
    );
    assert!(
        back[2 * MIB..] == fx.base_data[2 * MIB..],
        "the rest is the backing's"
    );
    let (status, stderr) = server.stop();
    assert!(status.success(), "server exit {status}:\n{stderr}");
}

#[test]
fn verify_peer_serves_only_clients_with_a_certificate_from_the_ca() {
    let fx = Fixture::new();
    let server = fx.serve(&["--tls-verify-peer"]);
    let without = nbdinfo_fails(&fx.uri(Some("client")));
    let rogue = nbdinfo_fails(&fx.uri(Some("client-rogue")));
    assert_info(
        &nbdinfo_json(&fx.uri(Some("client-auth"))),
        true,
        "a client with a certificate from the CA",
    );
    let (status, stderr) = server.stop();
    assert!(status.success(), "server exit {status}:\n{stderr}");
    // The server says why it turned the other two away.
    assert!(
        stderr.matches("TLS session ended").count() >= 2,
        "no reason logged for the refused clients:\nserver:\n{stderr}\nno certificate:\n{without}\nrogue:\n{rogue}"
    );
}

/// Threads of process `pid`, not counting the kernel's io_uring workers
/// (`iou-wrk-*`, which come and go with the disk I/O).
fn threads(pid: u32) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            !comm.starts_with("iou-")
        })
        .count()
}

/// Each thread of `pid`: its name and where it waits.
fn thread_list(pid: u32) -> String {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    dir.filter_map(Result::ok)
        .map(|t| {
            let read = |f: &str| fs::read_to_string(t.path().join(f)).unwrap_or_default();
            format!("{} ({})", read("comm").trim(), read("wchan").trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn bad_tls_input_harms_no_one_and_shutdown_ends_tls_sessions() {
    let fx = Fixture::new();
    let mut server = Some(fx.serve(&[]));
    let pid = server.as_ref().expect("server").pid();
    let idle_threads = threads(pid);
    fx.case("garbage");
    fx.case("pipelined_hello");
    fx.case("after_disc");
    // Every connection's threads, the TLS bridges' too, end with it.
    let start = std::time::Instant::now();
    while threads(pid) > idle_threads {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{} threads 20 s after the bad clients left, {idle_threads} before: {}",
            threads(pid),
            thread_list(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // A READ of the whole export in flight, not yet read by the client,
    // when the server is stopped: SIGTERM still ends in exit 0, and the
    // client, reading slowly, gets the whole reply and then the session's
    // close_notify.
    let mut client = Command::new(python())
        .arg(script())
        .arg("shutdown_in_flight")
        .arg(fx.socket())
        .arg(&fx.base)
        .arg(fx.path("server/ca-cert.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tls.py shutdown_in_flight");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("read tls.py's output");
        seen.push(line.clone());
        if line == "ready" {
            break;
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("ready"), "{seen:?}");
    let (status, stderr) = server.take().expect("server").stop();
    assert!(status.success(), "server exit {status}:\n{stderr}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let done = client.wait_with_output().expect("wait for tls.py");
    assert!(
        done.status.success() && rest.iter().any(|l| l == "PASS shutdown_in_flight"),
        "tls.py shutdown_in_flight: {seen:?} {rest:?}\n{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

#[test]
fn tls_settings_are_checked_before_serving() {
    let fx = Fixture::new();
    let cow = fx.cow.to_str().unwrap();
    let socket = fx.path("refused.sock");
    let (code, stderr) = serve_refused(&socket, &[cow, "--tls", "require"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--tls-certificates"), "{stderr}");
    let dir = fx.server_dir();
    let (code, stderr) = serve_refused(
        &socket,
        &[
            cow,
            "--tls",
            "off",
            "--tls-certificates",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--tls off contradicts"), "{stderr}");

    let missing = fx.path("nowhere");
    let (code, stderr) = serve_refused(
        &socket,
        &[cow, "--tls-certificates", missing.to_str().unwrap()],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&missing.join("server-cert.pem").display().to_string()),
        "the error names the missing file: {stderr}"
    );

    // A key that is not the certificate's.
    let wrong = fx.path("wrong");
    fs::create_dir_all(&wrong).unwrap();
    fs::copy(
        fx.path("server/server-cert.pem"),
        wrong.join("server-cert.pem"),
    )
    .unwrap();
    fs::copy(
        fx.path("client-auth/client-key.pem"),
        wrong.join("server-key.pem"),
    )
    .unwrap();
    let (code, stderr) = serve_refused(
        &socket,
        &[cow, "--tls-certificates", wrong.to_str().unwrap()],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(wrong.to_str().unwrap()), "{stderr}");
}

/// In `dir` (made), `server-cert.pem` for the fixture's server key, signed
/// by the fixture's CA with the validity `start`..`end` (openssl's
/// `YYYYMMDDHHMMSSZ`), and a copy of the server key and the CA certificate.
fn certificate_dated(fx: &Fixture, dir: &Path, start: &str, end: &str) {
    signed_certificate(fx, dir, start, end, true);
}

/// [`certificate_dated`], and with `v3` false an X.509 v1 certificate (no
/// extensions), as `openssl x509 -req` without `-extfile` makes before
/// OpenSSL 3.2.
fn signed_certificate(fx: &Fixture, dir: &Path, start: &str, end: &str, v3: bool) {
    fs::create_dir_all(dir).unwrap();
    let work = dir.join("ca-work");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("index.txt"), "").unwrap();
    fs::write(work.join("serial"), "01\n").unwrap();
    fs::write(
        work.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nserial = serial\n\
         new_certs_dir = .\ndefault_md = sha256\npolicy = p\nunique_subject = no\n\
         [p]\ncommonName = supplied\n\
         [x]\nbasicConstraints = CA:FALSE\nsubjectAltName = DNS:localhost\n",
    )
    .unwrap();
    let extensions: &[&str] = if v3 { &["-extensions", "x"] } else { &[] };
    for f in ["server-key.pem", "ca-cert.pem"] {
        fs::copy(fx.server_dir().join(f), dir.join(f)).unwrap();
    }
    let openssl = tool("openssl", "openssl");
    run(Command::new(&openssl)
        .current_dir(&work)
        .args(["req", "-new", "-subj", "/CN=localhost", "-key"])
        .arg(dir.join("server-key.pem"))
        .arg("-out")
        .arg(work.join("req.csr")));
    run(Command::new(&openssl)
        .current_dir(&work)
        .args([
            "ca", "-batch", "-notext", "-config", "ca.cnf", "-in", "req.csr",
        ])
        .args(extensions)
        .args(["-startdate", start, "-enddate", end, "-cert"])
        .arg(fx.path("pki/ca/ca-cert.pem"))
        .arg("-keyfile")
        .arg(fx.path("pki/ca/ca-key.pem"))
        .arg("-out")
        .arg(dir.join("server-cert.pem")));
    if !v3 {
        // OpenSSL 3.2 and later make v3 certificates only (`ca`, `req` and
        // `x509` alike): take the version and the extensions out here. The
        // signature no longer matches, which loading the files never checks.
        let cert = dir.join("server-cert.pem");
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap();
        fs::write(&cert, pem("CERTIFICATE", &as_v1(&der))).unwrap();
    }
}

/// The DER element at the start of `der`: its tag, the whole element, and
/// its contents.
fn der_element(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (der[0], der[1]);
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        let len = der[2..2 + n]
            .iter()
            .fold(0, |len, &b| len << 8 | usize::from(b));
        (len, 2 + n)
    };
    (tag, &der[..head + len], &der[head..head + len])
}

/// A DER element of `tag` around `contents`.
fn der_wrap(tag: u8, contents: &[u8]) -> Vec<u8> {
    let n = contents.len();
    let mut out = vec![tag];
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// The certificate `der` as X.509 v1: its to-be-signed part without the
/// version, the unique identifiers and the extensions.
fn as_v1(der: &[u8]) -> Vec<u8> {
    let (_, _, cert) = der_element(der);
    let (_, tbs_whole, tbs) = der_element(cert);
    let rest = &cert[tbs_whole.len()..];
    let mut fields = Vec::new();
    let mut at = tbs;
    while !at.is_empty() {
        let (tag, whole, _) = der_element(at);
        if !matches!(tag, 0xa0..=0xa3) {
            fields.extend_from_slice(whole);
        }
        at = &at[whole.len()..];
    }
    let mut body = der_wrap(0x30, &fields);
    body.extend_from_slice(rest);
    der_wrap(0x30, &body)
}

/// A PEM block of `label` holding `der`.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[test]
fn a_certificate_out_of_its_dates_is_named_with_its_date_at_start() {
    let fx = Fixture::new();
    // The certificates of the day: no warning about dates.
    let server = fx.serve(&[]);
    let (status, stderr) = server.stop();
    assert!(status.success(), "server exit {status}:\n{stderr}");
    assert!(
        !stderr.contains("WARN"),
        "a warning for a certificate valid today:\n{stderr}"
    );

    for (name, start, end, says, date) in [
        (
            "expired",
            "20200101000000Z",
            "20210101000000Z",
            "expired",
            "2021-01-01T00:00:00Z",
        ),
        (
            "future",
            "20991231235959Z",
            "21000101000000Z",
            "not valid before",
            "2099-12-31T23:59:59Z",
        ),
    ] {
        let dir = fx.path(name);
        certificate_dated(&fx, &dir, start, end);
        let mut args = vec![
            fx.cow.as_os_str().to_owned(),
            "--tls-certificates".into(),
            dir.clone().into_os_string(),
        ];
        // The CA's own certificate is checked too, when it is used.
        args.push("--tls-verify-peer".into());
        let server = Server::start(&fx.socket(), &args);
        let (status, stderr) = server.stop();
        assert!(status.success(), "server exit {status}:\n{stderr}");
        let cert = dir.join("server-cert.pem").display().to_string();
        let line = stderr
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&cert))
            .unwrap_or_else(|| panic!("{name}: no warning naming {cert}:\n{stderr}"));
        assert!(
            line.contains(says) && line.contains(date),
            "{name}: the warning should say {says:?} and {date}:\n{line}"
        );
        assert!(
            !stderr.contains("ca-cert.pem"),
            "{name}: a warning about the CA, which is valid:\n{stderr}"
        );
    }
}

#[test]
fn a_private_key_other_users_can_read_is_named_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let dir = fx.path("open-key");
    fs::create_dir_all(&dir).unwrap();
    for f in ["server-cert.pem", "server-key.pem", "ca-cert.pem"] {
        fs::copy(fx.server_dir().join(f), dir.join(f)).unwrap();
    }
    let key = dir.join("server-key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let args = [
        fx.cow.as_os_str().to_owned(),
        "--tls-certificates".into(),
        dir.clone().into_os_string(),
    ];
    let server = Server::start(&fx.socket(), &args);
    let (status, stderr) = server.stop();
    assert!(status.success(), "server exit {status}:\n{stderr}");
    let key = key.display().to_string();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&key) && l.contains("chmod 600")),
        "no warning naming {key}:\n{stderr}"
    );
}

#[test]
fn unusable_key_and_certificate_files_get_an_error_saying_what_is_wrong() {
    let fx = Fixture::new();
    let cow = fx.cow.to_str().unwrap();
    let socket = fx.path("refused.sock");
    let openssl = tool("openssl", "openssl");
    let refused = |dir: &Path| {
        let (code, stderr) =
            serve_refused(&socket, &[cow, "--tls-certificates", dir.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{stderr}");
        stderr
    };
    let with_server_files = |name: &str| {
        let dir = fx.path(name);
        fs::create_dir_all(&dir).unwrap();
        for f in ["server-cert.pem", "server-key.pem", "ca-cert.pem"] {
            fs::copy(fx.server_dir().join(f), dir.join(f)).unwrap();
        }
        dir
    };

    // A key with a passphrase, in both PEM forms openssl writes.
    for (name, args) in [
        ("pkcs8", &["pkcs8", "-topk8", "-passout", "pass:x"][..]),
        ("legacy", &["ec", "-aes256", "-passout", "pass:x"][..]),
    ] {
        let dir = with_server_files(name);
        let key = dir.join("server-key.pem");
        run(Command::new(&openssl)
            .args(args)
            .arg("-in")
            .arg(fx.server_dir().join("server-key.pem"))
            .arg("-out")
            .arg(&key));
        let stderr = refused(&dir);
        assert!(
            stderr.contains(&key.display().to_string()) && stderr.contains("encrypted"),
            "{name}: the error should name {} and say it is encrypted: {stderr}",
            key.display()
        );
    }

    // No key at all: the certificate where the key should be.
    let dir = with_server_files("nokey");
    let key = dir.join("server-key.pem");
    fs::copy(dir.join("server-cert.pem"), &key).unwrap();
    let stderr = refused(&dir);
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("no private key"),
        "{stderr}"
    );

    // A certificate cut off before its END line.
    let dir = with_server_files("cut");
    let cert = dir.join("server-cert.pem");
    let text = fs::read(&cert).unwrap();
    fs::write(&cert, &text[..text.len() / 2]).unwrap();
    let stderr = refused(&dir);
    assert!(
        stderr.contains(&cert.display().to_string()) && stderr.contains("END"),
        "the error should name {} and its missing END line: {stderr}",
        cert.display()
    );

    // An X.509 v1 certificate, which rustls does not take.
    let dir = fx.path("v1");
    signed_certificate(&fx, &dir, "20200101000000Z", "20991231235959Z", false);
    let cert = dir.join("server-cert.pem");
    let text = run(Command::new(&openssl)
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert));
    assert!(
        text.contains("Version: 1 (0x0)"),
        "not a v1 certificate:\n{text}"
    );
    let stderr = refused(&dir);
    assert!(
        stderr.contains(&cert.display().to_string()) && stderr.contains("v1"),
        "the error should name {} and say it is v1: {stderr}",
        cert.display()
    );

    // A key that is not the certificate's: both files named.
    let dir = with_server_files("mismatch");
    let key = dir.join("server-key.pem");
    fs::copy(fx.path("client-auth/client-key.pem"), &key).unwrap();
    let stderr = refused(&dir);
    assert!(
        stderr.contains(&key.display().to_string())
            && stderr.contains(&dir.join("server-cert.pem").display().to_string())
            && stderr.contains("not the private key"),
        "{stderr}"
    );

    // The CA's certificate written before the server's own: the order named.
    let dir = with_server_files("ca-first");
    let cert = dir.join("server-cert.pem");
    let chain = [
        fs::read(dir.join("ca-cert.pem")).unwrap(),
        fs::read(&cert).unwrap(),
    ]
    .concat();
    fs::write(&cert, chain).unwrap();
    let stderr = refused(&dir);
    assert!(
        stderr.contains(&cert.display().to_string())
            && stderr.contains("must come first")
            && stderr.contains("certificate 2"),
        "{stderr}"
    );
}
