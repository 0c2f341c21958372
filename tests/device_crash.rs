//! Crash consistency under SIGKILL: the FLUSH and FUA contract and invariant 7
//! (the on-disk bitmap never claims data that is not durable).
//!
//! The parent test re-executes this test binary as a child (`--exact
//! child_workload`, with [`ENV_DIR`] naming the work directory). The child
//! opens an overlay over a 16 MiB random base and runs [`THREADS`] writer
//! threads, each on its own 4 MiB region (so every byte has one writer and
//! the expected contents are unambiguous): sector-aligned writes of
//! 512 B..64 KiB, partial-sector writes at odd offsets and lengths, 1 in 10
//! FUA, and a FLUSH after about 1 in 12. Before each write it logs an intent
//! line, after it an ack line, and around each FLUSH a start line (with the
//! number of acks logged so far) and a completion line. Log lines are single
//! write(2)s under one mutex, so their order in the file is the order of the
//! events, and a SIGKILL keeps them (the page cache survives a process kill).
//! Even runs use direct I/O, odd ones the page cache.
//!
//! Each run sends 2 in 5 writes to a zone of the region no earlier run wrote
//! (see [`Zone`]), so there are always sectors whose first write races the
//! kill: once a sector's bit is on disk, a flush that loses bits can no longer
//! show.
//!
//! The parent kills the child with SIGKILL after a random 50..400 ms, opens
//! the overlay read-only and checks every byte. A write is *committed* when
//! it is a completed FUA write or was acked before the start of a FLUSH that
//! completed. Bytes no write of the run covered must be unchanged. Where a
//! committed write `c` is the newest committed write over a byte, the byte
//! must hold `c`'s value or the value of a write intended after `c`; with no
//! committed write, its value at the start of the run or that of a write
//! intended in the run. Then, sector by sector (the contract speaks of
//! sectors: a partial-sector write is a read-merge-write of whole sectors),
//! each sector must equal one of its versions: its state after the newest
//! committed write touching it, or after some later write touching it. The
//! on-disk bitmap must mark every sector a committed write touched and never
//! lose a bit. `ubd check` must pass after every kill. The next child runs on
//! the same overlay, whose contents as read become the next run's starting
//! state. At the end the base file must have the bytes and mtime it started
//! with.
//!
//! A SIGKILL leaves the page cache and the disk's cache alone, so this test
//! cannot see a missing fdatasync (only a host crash would); it sees bitmap
//! bits written too early or not at all, FLUSH or FUA answered too soon, and
//! torn or misplaced data.
//!
//! `UBD_CRASH_KILLS` sets the number of kills (default 25), `UBD_CRASH_SEED`
//! the seed (default: from the clock; it is printed).

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use ubd::device::{Device, DeviceOptions, Flags};
use ubd::image::{Cache, create_overlay};

/// Set (to the work directory) only in the child.
const ENV_DIR: &str = "UBD_CRASH_CHILD_DIR";
/// The child's run number (part of every write's content).
const ENV_RUN: &str = "UBD_CRASH_CHILD_RUN";
/// The child's PRNG seed.
const ENV_SEED: &str = "UBD_CRASH_CHILD_SEED";

/// The zone of the run's fresh writes and the end of its other writes,
/// relative to each thread's region: `"start len end"`.
const ENV_ZONE: &str = "UBD_CRASH_CHILD_ZONE";

const SECTOR: u64 = 512;
const BASE_LEN: u64 = 16 << 20;
const THREADS: u64 = 4;
/// Each writer thread's region: `t * REGION..(t + 1) * REGION`.
const REGION: u64 = BASE_LEN / THREADS;
/// Smallest zone of fresh writes per run.
const MIN_ZONE: u64 = 128 << 10;
const MAX_WRITE: u64 = 64 << 10;
/// A child that is never killed stops by itself after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(20);
/// How long the child may take to open the device (the killed one's ring
/// teardown releases the overlay's lock a little after it is gone).
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), near enough.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Identifies write `i` of thread `t` in run `run`.
fn write_tag(run: u64, t: u64, i: u64) -> u64 {
    (run << 40) | (t << 32) | i
}

/// The byte write `tag` puts at device offset `p`: never 0, so a hole or a
/// zeroed sector never passes for written data.
fn content(tag: u64, p: u64) -> u8 {
    1 + (mix(tag ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93)) % 255) as u8
}

fn device_options(read_only: bool, cache: Cache) -> DeviceOptions {
    DeviceOptions {
        read_only,
        cache,
        pool_size: 8 << 20,
        lock_wait: LOCK_WAIT,
        ..DeviceOptions::default()
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={value:?}: {e}")))
}

// ---------------------------------------------------------------- the child

/// The child's event log: one line per write(2), in event order.
struct Log {
    inner: Mutex<(File, u64)>,
}

impl Log {
    fn create(path: &Path) -> Log {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Log {
            inner: Mutex::new((file, 0)),
        }
    }

    fn line(&self, line: &str) {
        let mut guard = self.inner.lock().expect("log lock");
        guard
            .0
            .write_all(format!("{line}\n").as_bytes())
            .expect("write the log");
    }

    fn ack(&self, t: u64, i: u64) {
        let mut guard = self.inner.lock().expect("log lock");
        guard.1 += 1;
        guard
            .0
            .write_all(format!("A {t} {i}\n").as_bytes())
            .expect("write the log");
    }

    /// Logs the start of a FLUSH with the number of acks logged before it.
    fn flush_start(&self, t: u64, k: u64) {
        let mut guard = self.inner.lock().expect("log lock");
        let acks = guard.1;
        guard
            .0
            .write_all(format!("S {t} {k} {acks}\n").as_bytes())
            .expect("write the log");
    }
}

#[derive(Debug, Clone, Copy)]
struct WriteSpec {
    offset: u64,
    len: u64,
    fua: bool,
}

/// Where a run writes, relative to each thread's region: "fresh" writes go
/// to `zone` (a part of the region that earlier runs did not write, while
/// there is one), the others anywhere in `0..window_end`. Without fresh
/// sectors every bitmap bit would be set after the first few runs, and a
/// flush that fails to write bits would go unseen.
#[derive(Debug, Clone, Copy)]
struct Zone {
    start: u64,
    len: u64,
    window_end: u64,
}

impl Zone {
    /// Run `run` of `kills`: the region is cut into zones of at least
    /// [`MIN_ZONE`], one per run; when they run out they are used again.
    fn of_run(run: u64, kills: u64) -> Zone {
        let len = (REGION / kills.max(1)).max(MIN_ZONE) / SECTOR * SECTOR;
        let zones = REGION / len;
        let start = run % zones * len;
        let window_end = if run < zones { start + len } else { REGION };
        Zone {
            start,
            len,
            window_end,
        }
    }

    fn to_env(self) -> String {
        format!("{} {} {}", self.start, self.len, self.window_end)
    }

    fn from_env(value: &str) -> Zone {
        let f: Vec<u64> = value
            .split(' ')
            .map(|f| {
                f.parse()
                    .unwrap_or_else(|e| panic!("{ENV_ZONE}={value:?}: {e}"))
            })
            .collect();
        let [start, len, window_end] = f[..] else {
            panic!("{ENV_ZONE}={value:?}: want three numbers");
        };
        Zone {
            start,
            len,
            window_end,
        }
    }
}

/// Thread `t`'s next write, inside its region: 2 in 5 fresh (in the run's
/// zone), the others anywhere written so far; mostly small and sector-aligned,
/// some up to 64 KiB, 1 in 5 at an odd offset and length; 1 in 10 FUA.
fn pick_write(rng: &mut Rng, t: u64, zone: Zone) -> WriteSpec {
    let (from, to) = if rng.below(5) < 2 {
        (zone.start, zone.start + zone.len)
    } else {
        (0, zone.window_end)
    };
    let room = to - from;
    let kind = rng.below(10);
    let (offset, len) = if kind < 2 {
        let max = if rng.below(2) == 0 { 700 } else { 5000 };
        let len = 1 + rng.below(max.min(room));
        (from + rng.below(room - len + 1), len)
    } else {
        let max_sectors = if kind == 2 { MAX_WRITE / SECTOR } else { 8 };
        let len = ((1 + rng.below(max_sectors)) * SECTOR).min(room);
        (from + rng.below((room - len) / SECTOR + 1) * SECTOR, len)
    };
    WriteSpec {
        offset: t * REGION + offset,
        len,
        fua: rng.below(10) == 0,
    }
}

/// One writer thread: writes (logging intent and ack), and a FLUSH after
/// about 1 in 12 of them (logging its start, with the acks before it, and its
/// end).
fn writer(dev: &Device, log: &Log, seed: u64, run: u64, t: u64, zone: Zone, deadline: Instant) {
    let mut rng = Rng::new(seed ^ mix(t + 1));
    let mut flushes = 0;
    let mut i = 0;
    while Instant::now() < deadline {
        let w = pick_write(&mut rng, t, zone);
        let tag = write_tag(run, t, i);
        let data: Vec<u8> = (w.offset..w.offset + w.len)
            .map(|p| content(tag, p))
            .collect();
        log.line(&format!(
            "I {t} {i} {} {} {}",
            w.offset,
            w.len,
            u8::from(w.fua)
        ));
        let flags = Flags {
            fua: w.fua,
            ..Flags::default()
        };
        dev.write_at(w.offset, &data, flags)
            .unwrap_or_else(|e| panic!("write {i} of thread {t} ({w:?}): {e}"));
        log.ack(t, i);
        i += 1;
        if rng.below(12) == 0 {
            log.flush_start(t, flushes);
            dev.flush()
                .unwrap_or_else(|e| panic!("flush {flushes} of thread {t}: {e}"));
            log.line(&format!("F {t} {flushes}"));
            flushes += 1;
        }
    }
}

/// The child: runs the workload until killed. Returns at once in an ordinary
/// test run (no [`ENV_DIR`]).
#[test]
fn child_workload() {
    let Some(dir) = std::env::var_os(ENV_DIR).map(PathBuf::from) else {
        return;
    };
    let run = env_u64(ENV_RUN).expect("the parent sets the run number");
    let seed = env_u64(ENV_SEED).expect("the parent sets the seed");
    let zone = Zone::from_env(&std::env::var(ENV_ZONE).expect("the parent sets the zone"));
    let log = Log::create(&dir.join(format!("log-{run}")));
    let cow = dir.join("cow.img");
    let dev = Device::open(&cow, &device_options(false, child_cache(run)))
        .unwrap_or_else(|e| panic!("open {}: {}", cow.display(), ubd::error_chain(&e)));
    log.line(&format!("O {run}"));
    let deadline = Instant::now() + CHILD_LIFETIME;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (dev, log) = (&dev, &log);
            s.spawn(move || writer(dev, log, seed, run, t, zone, deadline));
        }
    });
    dev.close().expect("close the device");
    log.line("C");
}

/// Odd runs use the page cache, even ones direct I/O.
fn child_cache(run: u64) -> Cache {
    if run % 2 == 0 {
        Cache::None
    } else {
        Cache::Writeback
    }
}

// --------------------------------------------------------------- the parent

/// One write of a run, as the log tells it.
#[derive(Debug, Clone)]
struct Logged {
    offset: u64,
    len: u64,
    fua: bool,
    acked: bool,
    committed: bool,
    tag: u64,
}

impl Logged {
    fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }

    fn describe(&self, i: usize) -> String {
        format!(
            "write {i} [{}..{}) len {}{}{}",
            self.offset,
            self.offset + self.len,
            self.len,
            if self.fua { " fua" } else { "" },
            match (self.acked, self.committed) {
                (_, true) => " committed",
                (true, false) => " acked",
                (false, false) => " in flight",
            }
        )
    }
}

#[derive(Debug, Default)]
struct RunLog {
    opened: bool,
    /// Per thread, in intent order.
    writes: Vec<Vec<Logged>>,
    flushes_completed: u64,
}

/// Parses a run's log. A last line without its newline (cut by the kill) is
/// ignored: its event did not happen yet.
fn parse_log(path: &Path, run: u64) -> RunLog {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(at) => &text[..=at],
        None => "",
    };
    let mut log = RunLog {
        writes: vec![Vec::new(); THREADS as usize],
        ..RunLog::default()
    };
    // Acked writes in ack order, and flush starts: (thread, seq) -> acks before.
    let mut acked: Vec<(usize, usize)> = Vec::new();
    let mut starts: Vec<((u64, u64), usize)> = Vec::new();
    let mut covered = 0usize;
    for (n, line) in complete.lines().enumerate() {
        let bad = || -> ! { panic!("{}:{}: malformed line {line:?}", path.display(), n + 1) };
        let mut words = line.split(' ');
        let kind = words.next().unwrap_or_default();
        let fields: Vec<u64> = words.map(|f| f.parse().unwrap_or_else(|_| bad())).collect();
        let thread = match fields.first() {
            Some(&t) if t < THREADS => t as usize,
            _ => usize::MAX,
        };
        match (kind, fields.as_slice()) {
            ("O", [r]) if *r == run => log.opened = true,
            ("I", [_, i, offset, len, fua]) if thread < THREADS as usize => {
                assert_eq!(
                    *i as usize,
                    log.writes[thread].len(),
                    "{}:{}: writes of thread {thread} out of order",
                    path.display(),
                    n + 1
                );
                let region = thread as u64 * REGION..(thread as u64 + 1) * REGION;
                if *len == 0 || !region.contains(offset) || offset + len > region.end {
                    bad();
                }
                log.writes[thread].push(Logged {
                    offset: *offset,
                    len: *len,
                    fua: *fua == 1,
                    acked: false,
                    committed: false,
                    tag: write_tag(run, thread as u64, *i),
                });
            }
            ("A", [_, i]) if thread < THREADS as usize => {
                let Some(w) = log.writes[thread].get_mut(*i as usize) else {
                    bad()
                };
                w.acked = true;
                w.committed |= w.fua;
                acked.push((thread, *i as usize));
            }
            ("S", [t, k, acks]) => {
                assert_eq!(
                    *acks as usize,
                    acked.len(),
                    "{}:{}: ack count",
                    path.display(),
                    n + 1
                );
                starts.push(((*t, *k), acked.len()));
            }
            ("F", [t, k]) => {
                let Some(&(_, before)) = starts.iter().find(|(id, _)| *id == (*t, *k)) else {
                    bad()
                };
                covered = covered.max(before);
                log.flushes_completed += 1;
            }
            ("C", []) => {}
            _ => bad(),
        }
    }
    for &(t, i) in &acked[..covered] {
        log.writes[t][i].committed = true;
    }
    log
}

/// Totals over all runs, to show the test is not vacuous.
#[derive(Debug, Default)]
struct Stats {
    intended: usize,
    acked: usize,
    committed: usize,
    fua: usize,
    flushes: u64,
    /// Sectors found holding a version newer than their committed one.
    newer_sectors: usize,
    /// Sectors found at their committed version although a later write
    /// touched them.
    older_sectors: usize,
    /// Sectors the runs touched that were not marked on disk before.
    fresh_sectors: usize,
    /// Of those, the ones marked after the kill.
    fresh_marked: usize,
}

/// Checks one run: `before` is the device at the run's start, `found` after
/// the kill, and the same for the on-disk bitmap's bits. Returns the
/// violations, described.
fn check_run(
    before: &[u8],
    found: &[u8],
    bits_before: &[bool],
    bits_after: &[bool],
    log: &RunLog,
    stats: &mut Stats,
) -> Vec<String> {
    let mut violations = Vec::new();
    for (t, writes) in log.writes.iter().enumerate() {
        stats.intended += writes.len();
        stats.acked += writes.iter().filter(|w| w.acked).count();
        stats.committed += writes.iter().filter(|w| w.committed).count();
        stats.fua += writes.iter().filter(|w| w.fua && w.acked).count();
        let region = t as u64 * REGION..(t as u64 + 1) * REGION;
        check_bytes(before, found, writes, region.clone(), &mut violations);
        check_bits(bits_before, bits_after, writes, stats, &mut violations);
        if violations.is_empty() {
            check_sectors(before, found, writes, region, stats, &mut violations);
        }
    }
    if let Some(s) = (0..bits_before.len()).find(|&s| bits_before[s] && !bits_after[s]) {
        violations.push(format!("sector {s}: its on-disk bit was cleared"));
    }
    stats.flushes += log.flushes_completed;
    violations
}

/// The sectors a write touches (partial ones included).
fn sectors_of(w: &Logged) -> std::ops::Range<usize> {
    (w.offset / SECTOR) as usize..(w.offset + w.len).div_ceil(SECTOR) as usize
}

/// The on-disk bitmap marks every sector a committed write touched. Counts
/// the run's first writes to sectors.
fn check_bits(
    bits_before: &[bool],
    bits_after: &[bool],
    writes: &[Logged],
    stats: &mut Stats,
    violations: &mut Vec<String>,
) {
    let mut fresh = BTreeSet::new();
    for (j, w) in writes.iter().enumerate() {
        for s in sectors_of(w).filter(|&s| !bits_before[s]) {
            fresh.insert(s);
        }
        if !w.committed {
            continue;
        }
        if let Some(s) = sectors_of(w).find(|&s| !bits_after[s]) {
            violations.push(format!(
                "sector {s}: the on-disk bitmap does not mark it, yet {} touched it",
                w.describe(j)
            ));
        }
    }
    stats.fresh_sectors += fresh.len();
    stats.fresh_marked += fresh.iter().filter(|&&s| bits_after[s]).count();
}

/// Byte by byte: bytes no write of the run covered keep their value; the
/// others hold the value of the newest committed write over the byte (or the
/// run's starting value), or of any write intended after it.
fn check_bytes(
    before: &[u8],
    found: &[u8],
    writes: &[Logged],
    region: std::ops::Range<u64>,
    violations: &mut Vec<String>,
) {
    // The union of the writes' ranges, as disjoint spans.
    let mut ranges: Vec<_> = writes.iter().map(Logged::range).collect();
    ranges.sort_unstable_by_key(|r| (r.start, r.end));
    let mut spans: Vec<std::ops::Range<u64>> = Vec::new();
    for r in ranges {
        match spans.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => spans.push(r),
        }
    }
    let mut at = region.start;
    for span in spans
        .iter()
        .cloned()
        .chain(std::iter::once(region.end..region.end))
    {
        let gap = at as usize..span.start as usize;
        if found[gap.clone()] != before[gap.clone()] {
            for p in gap.filter(|&p| found[p] != before[p]).take(8) {
                let s = p / SECTOR as usize;
                let sector_writes: Vec<String> = writes
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| sectors_of(w).contains(&s))
                    .map(|(j, w)| w.describe(j))
                    .collect();
                violations.push(format!(
                    "byte at offset {p} (sector {s}) is {}, acceptable {{{}}}: no write of the \
                     run covers the byte; writes touching its sector: [{}]",
                    found[p],
                    before[p],
                    sector_writes.join("; ")
                ));
            }
        }
        check_span(before, found, writes, span.clone(), violations);
        at = span.end;
    }
}

/// [`check_bytes`] over one span of the union of the writes' ranges.
fn check_span(
    before: &[u8],
    found: &[u8],
    writes: &[Logged],
    span: std::ops::Range<u64>,
    violations: &mut Vec<String>,
) {
    let at = |p: u64| (p - span.start) as usize;
    let inside = |w: &&Logged| span.contains(&w.offset);
    // Newest committed write over each byte (-1: none).
    let mut last_commit = vec![-1i64; (span.end - span.start) as usize];
    for (j, w) in writes.iter().enumerate().filter(|(_, w)| w.committed) {
        if inside(&w) {
            last_commit[at(w.offset)..at(w.offset + w.len)].fill(j as i64);
        }
    }
    let committed_value = |p: u64| match last_commit[at(p)] {
        -1 => before[p as usize],
        j => content(writes[j as usize].tag, p),
    };
    let mut ok: Vec<bool> = span
        .clone()
        .map(|p| found[p as usize] == committed_value(p))
        .collect();
    for (j, w) in writes.iter().enumerate().filter(|(_, w)| inside(w)) {
        for p in w.range() {
            if j as i64 > last_commit[at(p)] && found[p as usize] == content(w.tag, p) {
                ok[at(p)] = true;
            }
        }
    }
    for p in span.clone().filter(|&p| !ok[at(p)]).take(8) {
        let newest = last_commit[at(p)];
        let mut acceptable = BTreeSet::new();
        let mut why = vec![match newest {
            -1 => format!("{} from before the run", before[p as usize]),
            j => format!(
                "{} from committed {}",
                committed_value(p),
                writes[j as usize].describe(j as usize)
            ),
        }];
        acceptable.insert(committed_value(p));
        for (j, w) in writes.iter().enumerate() {
            if j as i64 > newest && w.range().contains(&p) {
                acceptable.insert(content(w.tag, p));
                why.push(format!(
                    "{} from later {}",
                    content(w.tag, p),
                    w.describe(j)
                ));
            }
        }
        violations.push(format!(
            "byte at offset {p} (sector {}) is {}, acceptable {acceptable:?}: {}",
            p / SECTOR,
            found[p as usize],
            why.join("; ")
        ));
    }
}

/// Sector by sector: the sector's state after its newest committed write (or
/// at the run's start), or after some later write touching it.
fn check_sectors(
    before: &[u8],
    found: &[u8],
    writes: &[Logged],
    region: std::ops::Range<u64>,
    stats: &mut Stats,
    violations: &mut Vec<String>,
) {
    let first = region.start / SECTOR;
    let sectors = ((region.end - region.start) / SECTOR) as usize;
    let mut touching: Vec<Vec<usize>> = vec![Vec::new(); sectors];
    for (j, w) in writes.iter().enumerate() {
        for s in w.offset / SECTOR..(w.offset + w.len).div_ceil(SECTOR) {
            touching[(s - first) as usize].push(j);
        }
    }
    for (k, js) in touching.iter().enumerate() {
        if js.is_empty() {
            continue;
        }
        let s = first + k as u64;
        let bytes = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        let apply = |sector: &mut [u8], w: &Logged| {
            let from = w.offset.max(s * SECTOR);
            let to = (w.offset + w.len).min((s + 1) * SECTOR);
            for p in from..to {
                sector[p as usize - bytes.start] = content(w.tag, p);
            }
        };
        let newest = js.iter().copied().filter(|&j| writes[j].committed).max();
        let mut version = before[bytes.clone()].to_vec();
        for &j in js.iter().filter(|&&j| Some(j) <= newest) {
            apply(&mut version, &writes[j]);
        }
        let got = &found[bytes.clone()];
        if got == version.as_slice() {
            if js.iter().any(|&j| Some(j) > newest) {
                stats.older_sectors += 1;
            }
            continue;
        }
        let mut candidates = vec![version.clone()];
        for &j in js.iter().filter(|&&j| Some(j) > newest) {
            apply(&mut version, &writes[j]);
            candidates.push(version.clone());
        }
        if candidates.iter().any(|c| c.as_slice() == got) {
            stats.newer_sectors += 1;
            continue;
        }
        let history: Vec<String> = js.iter().map(|&j| writes[j].describe(j)).collect();
        let diffs: Vec<String> = candidates
            .iter()
            .map(|c| {
                let n = c.iter().zip(got).filter(|(a, b)| a != b).count();
                let at = c.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
                format!("{n} bytes differ, first at +{at}")
            })
            .collect();
        violations.push(format!(
            "sector {s} (offset {}) matches none of its versions (from the newest committed \
             write on): [{}]; writes touching it: {}",
            s * SECTOR,
            diffs.join(", "),
            history.join("; ")
        ));
        if violations.len() >= 8 {
            return;
        }
    }
}

/// Reads the whole device through a read-only `Device`.
fn read_device(cow: &Path) -> Vec<u8> {
    let dev = Device::open(cow, &device_options(true, Cache::None)).unwrap_or_else(|e| {
        panic!(
            "reopen {} after the kill: {}",
            cow.display(),
            ubd::error_chain(&e)
        )
    });
    assert_eq!(dev.capacity(), BASE_LEN, "capacity");
    let mut data = vec![0u8; BASE_LEN as usize];
    dev.read_at(0, &mut data)
        .unwrap_or_else(|e| panic!("read the device: {}", ubd::error_chain(&e)));
    dev.close().expect("close the read-only device");
    data
}

/// The overlay's on-disk bitmap, one flag per sector.
fn disk_bits(cow: &Path) -> Vec<bool> {
    let file = fs::read(cow).unwrap_or_else(|e| panic!("read {}: {e}", cow.display()));
    let header = ubd_cow::Header::parse(&file).expect("the overlay's header");
    let g = ubd_cow::Geometry::new(&header).expect("the overlay's geometry");
    let bitmap = &file[g.bitmap_offset as usize..(g.bitmap_offset + g.bitmap_len) as usize];
    (0..g.sectors as usize)
        .map(|s| bitmap[s / 8] & (1 << (s % 8)) != 0)
        .collect()
}

fn fingerprint(path: &Path) -> (String, SystemTime) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mtime = fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (common::sha256_hex(&data), mtime)
}

fn child_output(dir: &Path, run: u64) -> String {
    let read = |name: String| fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!(
        "--- child stdout ---\n{}\n--- child stderr ---\n{}",
        read(format!("child-{run}.out")),
        read(format!("child-{run}.err"))
    )
}

fn spawn_child(dir: &Path, run: u64, seed: u64, zone: Zone) -> Child {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = File::create(dir.join(format!("child-{run}.out"))).expect("child stdout file");
    let err = File::create(dir.join(format!("child-{run}.err"))).expect("child stderr file");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child_workload",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ENV_DIR, dir)
    .env(ENV_RUN, run.to_string())
    .env(ENV_SEED, seed.to_string())
    .env(ENV_ZONE, zone.to_env())
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    // SAFETY: the closure runs between fork and exec and only calls prctl(2),
    // which is async-signal-safe; it does not allocate or take locks.
    unsafe {
        cmd.pre_exec(|| {
            // The child dies with the test (the spawning thread lives as long).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("start the child")
}

/// Waits until the child's log says the device is open.
fn wait_open(child: &mut Child, log: &Path, dir: &Path, run: u64) {
    let start = Instant::now();
    loop {
        if fs::read_to_string(log).is_ok_and(|t| t.starts_with("O ")) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "run {run}: the child exited ({status}) before opening the device\n{}",
                child_output(dir, run)
            );
        }
        if start.elapsed() > OPEN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "run {run}: the child did not open the device within {OPEN_TIMEOUT:?}\n{}",
                child_output(dir, run)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn crash_consistency_under_sigkill() {
    let kills = env_u64("UBD_CRASH_KILLS").unwrap_or(25);
    let seed = env_u64("UBD_CRASH_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed:#x} (UBD_CRASH_SEED={seed:#x} repeats the writes; kill times vary)");
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let base = dir.path().join("base.img");
    let cow = dir.path().join("cow.img");
    let base_data = common::pseudo_random_bytes(seed, BASE_LEN as usize);
    fs::write(&base, &base_data).expect("write the base");
    create_overlay(&cow, &base, false).expect("create the overlay");
    let base_before = fingerprint(&base);

    let mut rng = Rng::new(seed ^ 0x6b69_6c6c);
    let mut current = base_data;
    let mut bits = vec![false; (BASE_LEN / SECTOR) as usize];
    let mut stats = Stats::default();
    for run in 0..kills {
        let log_path = dir.path().join(format!("log-{run}"));
        let zone = Zone::of_run(run, kills);
        let mut child = spawn_child(dir.path(), run, mix(seed ^ run), zone);
        wait_open(&mut child, &log_path, dir.path(), run);
        let delay = Duration::from_millis(50 + rng.below(351));
        std::thread::sleep(delay);
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "run {run}: the child exited ({status}) before the kill\n{}",
                child_output(dir.path(), run)
            );
        }
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("wait for the child");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "run {run}: the child ended with {status}, not by the kill\n{}",
            child_output(dir.path(), run)
        );

        let found = read_device(&cow);
        let bits_after = disk_bits(&cow);
        let check = common::output(common::ubd().arg("check").arg(&cow));
        assert!(
            check.status.success(),
            "run {run}: `ubd check` after the kill: {}\n{}{}",
            check.status,
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = parse_log(&log_path, run);
        assert!(log.opened, "run {run}: the log has no open line");
        let violations = check_run(&current, &found, &bits, &bits_after, &log, &mut stats);
        if !violations.is_empty() {
            // Keep the work directory (overlay, base, logs) for a post-mortem.
            let kept = dir.keep();
            panic!(
                "run {run} (seed {seed:#x}, {} cache, killed after {delay:?}): {} violation(s):\n\
                 {}\n(overlay, base and logs kept in {})",
                if child_cache(run) == Cache::None {
                    "direct"
                } else {
                    "page"
                },
                violations.len(),
                violations[..violations.len().min(20)].join("\n"),
                kept.display()
            );
        }
        current = found;
        bits = bits_after;
    }

    assert_eq!(
        fingerprint(&base),
        base_before,
        "the backing file changed (content or mtime)"
    );
    println!(
        "writes: {} intended, {} acked, {} committed ({} FUA); {} flushes; sectors found newer \
         than committed: {}, at committed despite later writes: {}; first writes to {} \
         sectors, {} of them marked on disk after the kill; {} of {} sectors marked at the end",
        stats.intended,
        stats.acked,
        stats.committed,
        stats.fua,
        stats.flushes,
        stats.newer_sectors,
        stats.older_sectors,
        stats.fresh_sectors,
        stats.fresh_marked,
        bits.iter().filter(|&&b| b).count(),
        bits.len()
    );
    println!("kills: {kills}, violations: 0 ({:.1?})", started.elapsed());
}
