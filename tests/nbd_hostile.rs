//! Odd and hostile NBD input to `ubd serve` (issue 4, `../shared/docs/nbd.md`):
//! each test sends one kind of bad input, checks the answer nbd.md asks for,
//! and then checks that the server still serves a second, well-behaved
//! connection, that it stops cleanly on SIGTERM, that the overlay it served is
//! still clean and that the backing image was never touched.
//!
//! The clients are python3 scripts in `tests/nbd_hostile/`: `rawnbd.py`, a
//! small NBD client over a raw Unix socket that can send any bytes, and
//! `hostile.py`, one sub-command per case, which also drives libnbd (python3
//! module `nbd`, with strict mode off so that it sends what it is told). A
//! script prints one `ok:` line per check and `PASS CASE` at the end, or exits
//! non-zero with what was sent, what was expected and what came back.
//!
//! Needs `python3-libnbd`, `libnbd-bin` (nbdinfo, nbdcopy) and `qemu-utils`
//! (qemu-nbd); fails naming the package when one is missing. Nothing here
//! asserts on timing; socket time-outs in the scripts only turn a hang into a
//! failure.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use common::server::Server;
use common::{base_and_overlay, nbdinfo_json, output, run, sha256_hex, tool, ubd};

/// Size of the export: room for a 32 MiB WRITE (the maximum payload) and
/// for the regions the cases write to.
const SIZE: usize = 64 << 20;
const MIB: usize = 1 << 20;

/// The python3 that has the libnbd bindings (`import nbd`).
fn python() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    assert!(
        python.is_file(),
        "/usr/bin/python3 not found; install `python3` and `python3-libnbd`"
    );
    let out = output(Command::new(&python).args(["-c", "import nbd"]));
    assert!(
        out.status.success(),
        "/usr/bin/python3 cannot `import nbd`; install `python3-libnbd`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    python
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbd_hostile/hostile.py")
}

/// SHA-256 and modification time of a file, to prove a backing file untouched.
fn fingerprint(path: &Path) -> (String, SystemTime) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mtime = fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (sha256_hex(&data), mtime)
}

/// A pseudo-random backing image, an empty overlay over it, and `ubd serve`
/// on the overlay.
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    cow: PathBuf,
    base_data: Vec<u8>,
    base_before: (String, SystemTime),
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let (base, cow, base_data) = base_and_overlay(dir.path(), 0x6e62_6468_6f73_7469, SIZE);
        let base_before = fingerprint(&base);
        Fixture {
            dir,
            base,
            cow,
            base_data,
            base_before,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    fn serve(&self, extra: &[&str]) -> Server {
        let mut args: Vec<&std::ffi::OsStr> = vec![self.cow.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        Server::start(&self.socket(), &args)
    }

    /// Runs `hostile.py CASE SOCKET BASE`.
    fn run_case(&self, case: &str, server: &Server) -> Output {
        output(
            Command::new(python())
                .arg(script())
                .arg(case)
                .arg(server.socket())
                .arg(&self.base),
        )
    }
}

/// Checks that a fresh, well-behaved client (nbdinfo, then nbdcopy of the
/// whole export) gets the right size and the right data in `unchanged`
/// (byte ranges that must still read as the backing image).
fn assert_still_serves(fx: &Fixture, server: &Server, unchanged: &[(usize, usize)], what: &str) {
    let info = nbdinfo_json(&server.uri());
    let export = info["exports"]
        .as_array()
        .and_then(|e| e.first())
        .unwrap_or_else(|| panic!("after {what}: nbdinfo --json lists no export: {info}"));
    assert_eq!(
        export["export-size"].as_u64(),
        Some(SIZE as u64),
        "after {what}: export size in {info}"
    );
    let copy = fx.dir.path().join("copy.raw");
    run(Command::new(tool("nbdcopy", "libnbd-bin"))
        .arg(server.uri())
        .arg(&copy));
    let data = fs::read(&copy).expect("read the nbdcopy output");
    fs::remove_file(&copy).expect("remove the nbdcopy output");
    assert_eq!(
        data.len(),
        SIZE,
        "after {what}: nbdcopy copied a wrong size"
    );
    for &(start, end) in unchanged {
        if let Some(at) = (start..end).find(|&i| data[i] != fx.base_data[i]) {
            panic!("after {what}: byte {at} of the export differs from the backing image");
        }
    }
}

/// Peak resident memory of a process in KiB (`VmHWM`), from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// Runs one hostile case end to end: serve, run the script, check that the
/// server still serves (with `unchanged` ranges reading as the backing
/// image), stop it with SIGTERM (exit 0), check the overlay and the backing
/// image. Returns the script's stdout.
fn hostile_case(case: &str, extra: &[&str], unchanged: &[(usize, usize)]) -> String {
    hostile_case_and_log(case, extra, unchanged).0
}

/// [`hostile_case`], returning the server's log (stderr) too.
fn hostile_case_and_log(
    case: &str,
    extra: &[&str],
    unchanged: &[(usize, usize)],
) -> (String, String) {
    let fx = Fixture::new();
    let server = fx.serve(extra);
    let out = fx.run_case(case, &server);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let (status, stderr) = server.stop();
        panic!(
            "hostile.py {case} failed ({})\n--- its stdout ---\n{stdout}\n--- its stderr ---\n{}\n\
             --- server (exit {status}) stderr ---\n{stderr}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
        );
    }
    assert!(
        stdout.contains(&format!("PASS {case}")),
        "hostile.py {case} exited 0 without PASS:\n{stdout}"
    );
    assert_still_serves(&fx, &server, unchanged, case);
    // No client may make the server hold anything like the lengths it claimed.
    let peak = peak_rss_kib(server.pid());
    assert!(
        peak < 1 << 20,
        "after {case}: the server's peak RSS is {peak} KiB (>= 1 GiB)"
    );
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "after {case}: ubd serve exited with {status} on SIGTERM\nstderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "after {case}: ubd serve panicked\nstderr:\n{stderr}"
    );
    assert!(
        !fx.socket().exists(),
        "after {case}: ubd serve left its socket file behind"
    );
    let check = output(ubd().arg("check").arg(&fx.cow));
    assert!(
        check.status.success(),
        "after {case}: `ubd check` of the served overlay: {}\n{}{}",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        fingerprint(&fx.base),
        fx.base_before,
        "after {case}: the backing image changed (content or mtime)"
    );
    (stdout, stderr)
}

const WHOLE: &[(usize, usize)] = &[(0, SIZE)];

#[test]
fn unknown_options_get_err_unsup_and_the_connection_goes_on() {
    // Also STARTTLS (ERR_POLICY), LIST with data, meta contexts before
    // structured replies, unknown exports by GO, INFO and EXPORT_NAME, ABORT,
    // and libnbd's option mode.
    hostile_case("unknown_options", &[], WHOLE);
}

#[test]
fn option_lengths_of_2_gib_end_the_connection_without_being_read() {
    hostile_case("option_lengths", &[], WHOLE);
}

#[test]
fn names_over_4096_bytes_are_refused_and_the_connection_goes_on() {
    // Also option data whose inner lengths overrun it: ERR_INVALID.
    hostile_case("long_names", &[], WHOLE);
}

#[test]
fn bad_option_magic_and_unknown_client_flags_close_the_connection() {
    hostile_case("bad_option_magic", &[], WHOLE);
}

#[test]
fn a_failed_set_meta_context_leaves_no_context_selected() {
    hostile_case("failed_set_meta_context", &[], WHOLE);
}

#[test]
fn list_meta_context_replies_carry_context_id_0() {
    hostile_case("list_meta_context", &[], WHOLE);
}

#[test]
fn unknown_commands_get_einval_and_the_connection_goes_on() {
    hostile_case("unknown_commands", &[], WHOLE);
}

#[test]
fn unknown_and_misplaced_flags_get_einval() {
    hostile_case("unknown_flags", &[], WHOLE);
}

#[test]
fn requests_past_the_end_and_wrapping_past_2_64_are_refused() {
    // READ, TRIM, CACHE, BLOCK_STATUS: EINVAL; WRITE, WRITE_ZEROES: ENOSPC
    // after their payload; nothing lands near the end.
    hostile_case("past_end", &[], WHOLE);
}

#[test]
fn zero_length_requests_are_answered() {
    hostile_case("zero_length", &[], WHOLE);
}

#[test]
fn a_write_header_claiming_1_gib_gets_einval_and_a_disconnect() {
    // Also 32 MiB + 1 and 4 GiB - 1; exactly 32 MiB is written and read back.
    hostile_case("write_too_big", &[], WHOLE);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    hostile_case("bad_request_magic", &[], WHOLE);
}

#[test]
fn a_disconnect_in_the_middle_of_a_header_harms_nothing() {
    hostile_case("disconnect_mid_message", &[], WHOLE);
}

#[test]
fn a_disconnect_in_the_middle_of_a_write_payload_writes_nothing() {
    // Also clients that hang up with READ replies unread.
    let (_, log) = hostile_case_and_log("disconnect_mid_payload", &[], WHOLE);
    // The refused WRITE's end is logged with the bytes it still owed.
    assert!(
        log.contains("refused request's payload (64536 bytes of it still to come)"),
        "{log}"
    );
}

#[test]
fn clients_stalled_mid_handshake_header_or_payload_hold_up_no_one() {
    hostile_case("stalled_clients", &[], WHOLE);
}

#[test]
fn clients_stalled_mid_payload_holding_the_whole_pool_hold_up_no_one() {
    hostile_case("stalled_payloads_fill_the_pool", &[], WHOLE);
}

#[test]
fn a_handshake_that_takes_too_long_in_all_is_closed() {
    let (_, log) = hostile_case_and_log("slow_handshake", &["--handshake-limit", "2"], WHOLE);
    // The cut is logged as such, and not again as a failed handshake.
    let cut = log
        .lines()
        .find(|l| l.contains("handshake took too long"))
        .unwrap_or_else(|| panic!("no cut in the log:\n{log}"));
    let id = cut
        .split_whitespace()
        .find(|w| w.starts_with("id="))
        .unwrap();
    assert!(
        !log.lines()
            .any(|l| l.contains("handshake failed") && l.split_whitespace().any(|w| w == id)),
        "{log}"
    );
}

#[test]
fn clients_that_never_read_their_replies_hold_up_no_one() {
    let out = hostile_case("unread_replies", &[], WHOLE);
    assert!(
        out.contains("ok: a fresh connection works after 3 clients"),
        "{out}"
    );
}

#[test]
fn a_client_that_never_reads_its_replies_is_not_read_without_bound() {
    hostile_case("unanswered_requests", &[], WHOLE);
}

#[test]
fn disc_with_requests_in_flight_finishes_them_first() {
    // The script writes 16 x 256 KiB from 4 MiB (libnbd aio) and 8 x 256 KiB
    // from 9 MiB (raw), and checks them itself from a fresh connection.
    let out = hostile_case(
        "disc_in_flight",
        &[],
        &[
            (0, 4 * MIB),
            (4 * MIB + 16 * 256 * 1024, 9 * MIB),
            (11 * MIB, SIZE),
        ],
    );
    assert!(
        out.contains("ok: every write sent before DISC landed"),
        "{out}"
    );
}

#[test]
fn disc_with_any_flags_is_a_disconnect_without_a_reply() {
    hostile_case("disc_with_flags", &[], WHOLE);
}

#[test]
fn extended_headers_work_and_qemu_nbd_lists_the_export() {
    let fx = Fixture::new();
    let server = fx.serve(&[]);
    // qemu-nbd -L negotiates extended headers when the server offers them.
    let list = run(Command::new(tool("qemu-nbd", "qemu-utils"))
        .arg("-L")
        .arg("-k")
        .arg(server.socket()));
    assert!(
        list.contains("exports available: 1"),
        "qemu-nbd -L:\n{list}"
    );
    assert!(list.contains("export: ''"), "qemu-nbd -L:\n{list}");
    assert!(
        list.contains(&format!("size:  {SIZE}")),
        "qemu-nbd -L:\n{list}"
    );
    assert!(
        list.contains("transaction size: 64-bit"),
        "qemu-nbd -L did not negotiate extended headers:\n{list}"
    );
    assert!(list.contains("base:allocation"), "qemu-nbd -L:\n{list}");
    assert!(
        list.contains("qemu:allocation-depth"),
        "qemu-nbd -L:\n{list}"
    );
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status}:\n{stderr}"
    );
    drop(fx);

    // Raw 32-byte requests and 32-byte replies, good and bad.
    hostile_case("extended_headers", &[], WHOLE);
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let out = hostile_case("read_only", &["--read-only"], WHOLE);
    assert!(out.contains("ok: READ_ONLY advertised"), "{out}");
}

#[test]
fn a_read_only_export_leaves_the_overlay_untouched() {
    let fx = Fixture::new();
    let before = fingerprint(&fx.cow);
    let server = fx.serve(&["--read-only"]);
    let out = fx.run_case("read_only", &server);
    let (status, stderr) = server.stop();
    assert!(
        out.status.success(),
        "hostile.py read_only failed:\n{}{}\nserver stderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        status.success(),
        "ubd serve exited with {status}:\n{stderr}"
    );
    assert_eq!(
        fingerprint(&fx.cow).0,
        before.0,
        "a --read-only server changed the overlay's content"
    );
}

#[test]
fn a_handshake_pipelined_with_the_first_requests_loses_nothing() {
    hostile_case("pipelined_handshake", &[], WHOLE);
}

/// hostile.py running a case that talks with the test: it prints a line
/// when the test is to act, and reads what the test says on its stdin.
struct Dialogue {
    case: &'static str,
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
    /// Its output so far.
    seen: String,
}

impl Dialogue {
    fn start(case: &'static str, fx: &Fixture, server: &Server) -> Dialogue {
        let mut child = Command::new(python())
            .arg(script())
            .arg(case)
            .arg(server.socket())
            .arg(&fx.base)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hostile.py");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Dialogue {
            case,
            child,
            stdout,
            seen: String::new(),
        }
    }

    /// Reads its output up to a line that starts with `prefix`.
    fn wait_for(&mut self, prefix: &str) {
        loop {
            let mut line = String::new();
            let n = self
                .stdout
                .read_line(&mut line)
                .expect("read hostile.py's output");
            self.seen.push_str(&line);
            if n == 0 {
                let mut err = String::new();
                let _ = self
                    .child
                    .stderr
                    .take()
                    .expect("piped")
                    .read_to_string(&mut err);
                let _ = self.child.wait();
                panic!(
                    "hostile.py {} ended before {prefix}:\n{}\n{err}",
                    self.case, self.seen
                );
            }
            if line.starts_with(prefix) {
                return;
            }
        }
    }

    /// Sends `said` (nothing: just closes its stdin), reads the rest of its
    /// output and checks that it passed.
    fn finish(mut self, said: &[u8], server_log: &str) -> String {
        let mut stdin = self.child.stdin.take().expect("piped stdin");
        // A script that failed is gone: its output below says why.
        let _ = stdin.write_all(said);
        drop(stdin);
        let mut rest = String::new();
        self.stdout
            .read_to_string(&mut rest)
            .expect("read hostile.py's output");
        let out = self.child.wait_with_output().expect("wait for hostile.py");
        let all = format!("{}{rest}", self.seen);
        assert!(
            out.status.success() && rest.contains(&format!("PASS {}", self.case)),
            "hostile.py {} failed ({}):\n{all}\n{}\nserver:\n{server_log}",
            self.case,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        all
    }
}

#[test]
fn sigterm_with_stalled_clients_exits_0_and_keeps_acknowledged_writes() {
    let fx = Fixture::new();
    let server = fx.serve(&[]);
    let mut script = Dialogue::start("sigterm_stalled", &fx, &server);
    script.wait_for("READY");
    // Clients sit half-way through a handshake, a request header and a
    // WRITE payload, and one is idle: the server must still stop.
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status} on SIGTERM with stalled clients\nstderr:\n{stderr}"
    );
    assert!(
        !fx.socket().exists(),
        "ubd serve left its socket file behind"
    );
    script.finish(b"", &stderr);
    run(ubd().arg("check").arg(&fx.cow));

    // The WRITE acknowledged before SIGTERM is there after a restart; the
    // stalled, half-sent WRITE is not.
    let server = fx.serve(&[]);
    let copy = fx.dir.path().join("after.raw");
    run(Command::new(tool("nbdcopy", "libnbd-bin"))
        .arg(server.uri())
        .arg(&copy));
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status}:\n{stderr}"
    );
    let data = fs::read(&copy).expect("read the copy");
    let written = 7 * MIB..7 * MIB + 65536;
    assert!(
        data[written.clone()].iter().all(|&b| b == 0x42),
        "the WRITE acknowledged before SIGTERM is not in the overlay after a restart"
    );
    assert!(
        data[..written.start] == fx.base_data[..written.start]
            && data[written.end..] == fx.base_data[written.end..],
        "outside the acknowledged WRITE the export differs from the backing image after SIGTERM and restart"
    );
    assert_eq!(
        fingerprint(&fx.base),
        fx.base_before,
        "the backing image changed (content or mtime)"
    );
}

#[test]
fn sigterm_under_writes_answers_every_request_read_and_keeps_each_write_answered_ok() {
    let fx = Fixture::new();
    let server = fx.serve(&[]);
    let mut script = Dialogue::start("sigterm_busy", &fx, &server);
    script.wait_for("READY");
    // SIGTERM while the client writes; the server drains and exits 0.
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status} on SIGTERM under writes\nstderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("cutting them"),
        "the client had to be cut:\n{stderr}"
    );
    script.wait_for("ok: ");
    run(ubd().arg("check").arg(&fx.cow));
    let server = fx.serve(&[]);
    println!("{}", script.finish(b"GO\n", "(the restarted server)"));
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status}:\n{stderr}"
    );
    assert_eq!(
        fingerprint(&fx.base),
        fx.base_before,
        "the backing image changed (content or mtime)"
    );
}

#[test]
fn thousands_of_pipelined_requests_are_each_answered_once() {
    hostile_case("deep_pipeline", &[], WHOLE);
}

/// An overlay whose bitmap marks every other sector (a damaged or hostile
/// file can; a client could write it so), and BLOCK_STATUS over all of it.
/// Each answer holds a bounded number of extents from the start of the range
/// asked about, so the server's memory does not grow with that range (one
/// request over 1 GiB of it took some 70 MiB, and the worker's time with
/// it, while every other request waited); nbdinfo, which asks again from
/// where each answer ends, still maps the whole export right.
#[test]
fn block_status_over_a_fragmented_overlay_is_answered_in_bounded_pieces() {
    const LEN: u64 = 1 << 30;
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let base = dir.path().join("base.img");
    let cow = dir.path().join("frag.cow");
    fs::File::create(&base)
        .and_then(|f| f.set_len(LEN))
        .expect("make a sparse backing file");
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    let info = common::ubd_info(&cow);
    let (bitmap, bitmap_len) = (
        info["bitmap_offset"].as_u64().unwrap(),
        info["bitmap_length"].as_u64().unwrap(),
    );
    assert_eq!(bitmap_len, LEN / 512 / 8);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&cow).unwrap();
        f.write_all_at(&vec![0x55; bitmap_len as usize], bitmap)
            .expect("write the bitmap");
    }
    let socket = dir.path().join("frag.sock");
    let server = Server::start(&socket, &[cow.as_os_str()]);
    let probe = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(sys.argv[1])
def ask(offset, length):
    got = []
    def cb(meta, off, ents, err):
        if meta == "qemu:allocation-depth":
            got.extend(zip(ents[0::2], ents[1::2]))
        return 0
    h.block_status(length, offset, cb)
    return got
ask(0, 4096)
print("warm", flush=True)
sys.stdin.readline()
ents = ask(0, (1 << 30) - 512)
total = sum(n for n, _ in ents)
bad = [e for e in ents[:-1] if e[0] != 512]
states = sorted(set(s for _, s in ents))
print("extents", len(ents), "covering", total, "odd", len(bad), "states", states)
again = ask(total, 4096)
print("next", again[:2])
"#;
    let mut child = Command::new(python())
        .args(["-c", probe])
        .arg(server.uri())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "warm");
    let before = peak_rss_kib(server.pid());
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "the probe failed: {rest}");
    let grew = peak_rss_kib(server.pid()).saturating_sub(before);
    assert!(
        grew < 16 << 10,
        "one BLOCK_STATUS grew the server's peak memory by {grew} KiB:\n{rest}"
    );
    // extents N covering B odd 0 states [1, 2] / next [(512, s)]
    let words: Vec<&str> = rest.split_whitespace().collect();
    let n: u64 = words[1].parse().unwrap();
    let covered: u64 = words[3].parse().unwrap();
    assert!(
        n > 1 && covered == n * 512 && covered < LEN - 512,
        "one answer is not a bounded prefix of alternate sectors:\n{rest}"
    );
    assert!(rest.contains("odd 0 states [1, 2]"), "{rest}");
    assert!(
        rest.contains("next [(512, "),
        "asked again from its end: {rest}"
    );

    // nbdinfo asks again from where each answer ends: the whole export.
    let totals = run(Command::new(tool("nbdinfo", "libnbd-bin"))
        .arg("--map=qemu:allocation-depth")
        .arg("--totals")
        .arg(server.uri()));
    for want in [
        "536870912  50.0%   1 local",
        "536870912  50.0%   2 backing depth 2",
    ] {
        assert!(totals.contains(want), "nbdinfo --totals:\n{totals}");
    }
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status}:\n{stderr}"
    );
}
