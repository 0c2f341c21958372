//! The device against a plain `Vec<u8>` model: random requests, many in
//! flight, partial sectors, trims, zeroes, flushes, close and reopen; with the
//! pool's fault injection on and off and with a pool so small that requests
//! are split. Plus overlapping writes to one sector, and teardown with
//! hundreds of requests in flight.

mod common;

use std::fs;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use ubd::device::{
    Command, Device, DeviceOptions, Event, Flags, Recorder, Reply, Request, Role, Sink, Waiter,
};
use ubd::image::{Cache, create_overlay};

const SECTOR: usize = 512;

struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    cow: PathBuf,
    base_data: Vec<u8>,
    base_mtime: SystemTime,
}

fn fixture(size: usize, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let base_data = common::pseudo_random_bytes(seed, size);
    fs::write(&base, &base_data).unwrap();
    let base_mtime = fs::metadata(&base).unwrap().modified().unwrap();
    let cow = dir.path().join("cow.img");
    create_overlay(&cow, &base, false).unwrap();
    Fixture {
        _dir: dir,
        base,
        cow,
        base_data,
        base_mtime,
    }
}

impl Fixture {
    /// The backing file is never written: same bytes, same mtime.
    fn assert_base_untouched(&self) {
        assert!(
            fs::read(&self.base).unwrap() == self.base_data,
            "base changed"
        );
        assert_eq!(
            fs::metadata(&self.base).unwrap().modified().unwrap(),
            self.base_mtime
        );
    }
}

fn model_of(f: &Fixture) -> Model {
    let mut data = f.base_data.clone();
    data.resize(f.base_data.len().next_multiple_of(SECTOR), 0);
    let sectors = data.len() / SECTOR;
    Model {
        may_be_zero: vec![false; data.len()],
        data,
        present: vec![false; sectors],
    }
}

/// What the device should hold, and which sectors the overlay has.
struct Model {
    data: Vec<u8>,
    /// Bytes that may read as zeros instead: a TRIM left them, in sectors
    /// that were never written but may hold the backing's data in the
    /// overlay (the first write into their MiB copied it there).
    may_be_zero: Vec<bool>,
    present: Vec<bool>,
}

impl Model {
    fn sectors(r: &Range<usize>) -> Range<usize> {
        r.start / SECTOR..r.end.div_ceil(SECTOR)
    }

    fn write(&mut self, r: Range<usize>, bytes: &[u8]) {
        self.data[r.clone()].copy_from_slice(bytes);
        self.may_be_zero[r.clone()].fill(false);
        for s in Self::sectors(&r) {
            self.present[s] = true;
        }
    }

    fn zero(&mut self, r: Range<usize>) {
        self.data[r.clone()].fill(0);
        for s in Self::sectors(&r) {
            self.present[s] = true;
        }
    }

    /// Whole present sectors read as zeros after a trim; the rest is kept,
    /// or reads as zeros where the overlay held a copy of it.
    fn trim(&mut self, r: Range<usize>) {
        for s in r.start.div_ceil(SECTOR)..r.end / SECTOR {
            let bytes = s * SECTOR..(s + 1) * SECTOR;
            if self.present[s] {
                self.data[bytes].fill(0);
            } else {
                self.may_be_zero[bytes].fill(true);
            }
        }
    }

    /// The first byte where `got`, read at `at`, is not what the model allows.
    fn mismatch(&self, at: usize, got: &[u8]) -> Option<usize> {
        let want = &self.data[at..at + got.len()];
        got.iter()
            .zip(want)
            .enumerate()
            .position(|(i, (g, w))| g != w && !(*g == 0 && self.may_be_zero[at + i]))
    }
}

#[derive(Debug, Clone)]
enum Step {
    Read(Range<usize>),
    Write(Range<usize>, u8, bool),
    Zero(Range<usize>, bool),
    Trim(Range<usize>),
    Flush,
}

impl Step {
    fn range(&self) -> Option<&Range<usize>> {
        match self {
            Step::Read(r) | Step::Write(r, ..) | Step::Zero(r, _) | Step::Trim(r) => Some(r),
            Step::Flush => None,
        }
    }
    fn changes(&self) -> bool {
        !matches!(self, Step::Read(_) | Step::Flush)
    }
}

fn range(size: usize) -> impl Strategy<Value = Range<usize>> {
    // Mostly small and unaligned, sometimes large (to split across chunks).
    let len = prop_oneof![1usize..1500, 1usize..70_000, 200_000usize..400_000];
    (0..size, len).prop_map(move |(start, len)| start..(start + len).min(size))
}

fn step(size: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => range(size).prop_map(Step::Read),
        6 => (range(size), 1u8..=255, any::<bool>()).prop_map(|(r, v, fua)| Step::Write(r, v, fua)),
        1 => (range(size), any::<bool>()).prop_map(|(r, nh)| Step::Zero(r, nh)),
        1 => range(size).prop_map(Step::Trim),
        1 => Just(Step::Flush),
    ]
}

/// Splits steps into batches whose ranges do not share a sector with a
/// changing step of the same batch, so the batch's outcome is the same in any
/// order.
fn batches(steps: Vec<Step>, width: usize) -> Vec<Vec<Step>> {
    let mut out: Vec<Vec<Step>> = Vec::new();
    let mut current: Vec<Step> = Vec::new();
    for s in steps {
        let clash = |t: &Step| match (s.range(), t.range()) {
            (Some(a), Some(b)) if s.changes() || t.changes() => {
                let (a, b) = (Model::sectors(a), Model::sectors(b));
                a.start < b.end && b.start < a.end
            }
            _ => false,
        };
        if current.len() >= width || current.iter().any(clash) {
            out.push(std::mem::take(&mut current));
        }
        current.push(s);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn run_step(dev: &Device, s: &Step) -> Option<(Range<usize>, Vec<u8>)> {
    match s {
        Step::Read(r) => {
            let mut buf = vec![0u8; r.len()];
            dev.read_at(r.start as u64, &mut buf).unwrap();
            Some((r.clone(), buf))
        }
        Step::Write(r, v, fua) => {
            let flags = Flags {
                fua: *fua,
                ..Flags::default()
            };
            dev.write_at(r.start as u64, &vec![*v; r.len()], flags)
                .unwrap();
            None
        }
        Step::Zero(r, no_hole) => {
            let flags = Flags {
                no_hole: *no_hole,
                ..Flags::default()
            };
            dev.write_zeroes(r.start as u64, r.len() as u64, flags)
                .unwrap();
            None
        }
        Step::Trim(r) => {
            dev.trim(r.start as u64, r.len() as u64).unwrap();
            None
        }
        Step::Flush => {
            dev.flush().unwrap();
            None
        }
    }
}

fn apply(model: &mut Model, s: &Step) {
    match s {
        Step::Read(_) | Step::Flush => {}
        Step::Write(r, v, _) => model.write(r.clone(), &vec![*v; r.len()]),
        Step::Zero(r, _) => model.zero(r.clone()),
        Step::Trim(r) => model.trim(r.clone()),
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// The whole device reads as `model` allows; `what` names the case in a
/// failure.
fn assert_reads(dev: &Device, model: &Model, what: &str) {
    let mut got = vec![0u8; model.data.len()];
    dev.read_at(0, &mut got).unwrap();
    if let Some(at) = model.mismatch(0, &got) {
        panic!("{what}differs at {at}");
    }
}

fn opts(small_pool: bool, cache: Cache) -> DeviceOptions {
    let mut o = DeviceOptions {
        cache,
        poison_on_free: true,
        ..DeviceOptions::default()
    };
    if small_pool {
        // 8 chunks of 64 KiB: requests over ~256 KiB are split.
        o.pool_size = 512 << 10;
        o.chunk_size = 64 << 10;
        o.max_requests = 8;
        o.queue_depth = 16;
    }
    o
}

fn check_model(
    steps: Vec<Step>,
    reopen_every: usize,
    fail_alloc: bool,
    small_pool: bool,
    cache: Cache,
) -> Result<(), TestCaseError> {
    const SIZE: usize = 1_500_000 + 123;
    let f = fixture(SIZE, 7);
    let mut model = model_of(&f);
    let o = opts(small_pool, cache);
    let mut dev = Device::open(&f.cow, &o).unwrap();
    dev.pool().set_fail_ordinary(fail_alloc);
    for (i, batch) in batches(steps, 6).into_iter().enumerate() {
        if reopen_every > 0 && i % reopen_every == reopen_every - 1 {
            dev.close().unwrap();
            drop(dev);
            dev = Device::open(&f.cow, &o).unwrap();
            dev.pool().set_fail_ordinary(fail_alloc);
        }
        // Reads see the state before the batch's changes: they never share
        // a sector with them.
        let reads: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|s| scope.spawn(|| run_step(&dev, s)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, got) in reads.into_iter().flatten() {
            let bad = model.mismatch(r.start, &got);
            prop_assert!(bad.is_none(), "read {r:?} differs at +{bad:?}");
        }
        for s in &batch {
            apply(&mut model, s);
        }
    }
    dev.close().unwrap();
    drop(dev);
    let dev = Device::open(&f.cow, &o).unwrap();
    let mut all = vec![0u8; model.data.len()];
    dev.read_at(0, &mut all).unwrap();
    let bad = model.mismatch(0, &all);
    prop_assert!(bad.is_none(), "after reopen differs at {bad:?}");
    drop(dev);
    let check = common::output(common::ubd().arg("check").arg(&f.cow));
    prop_assert!(check.status.success(), "{:?}", check);
    f.assert_base_untouched();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 64, .. ProptestConfig::default() })]

    #[test]
    fn model_direct_io(steps in prop::collection::vec(step(1_500_123), 1..60), reopen in 0usize..5) {
        check_model(steps, reopen, false, false, Cache::None)?;
    }

    #[test]
    fn model_writeback_with_fault_injection(steps in prop::collection::vec(step(1_500_123), 1..60), reopen in 0usize..5) {
        check_model(steps, reopen, true, false, Cache::Writeback)?;
    }

    #[test]
    fn model_small_pool_with_fault_injection(steps in prop::collection::vec(step(1_500_123), 1..60), reopen in 0usize..5) {
        check_model(steps, reopen, true, true, Cache::None)?;
    }
}

/// Counts completions; keeps the data of each.
#[derive(Default)]
struct Collect {
    done: AtomicUsize,
    errors: AtomicUsize,
}

impl Sink for Collect {
    fn complete(&self, _token: u64, result: Result<Reply, nix::errno::Errno>) {
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        self.done.fetch_add(1, Ordering::SeqCst);
    }
}

/// Many requests in flight write overlapping, partial ranges around one
/// sector; the result must be the outcome of some serial order of them:
/// at every byte, the last writer in that order.
#[test]
fn overlapping_writes_equal_a_serial_order() {
    let f = fixture(64 << 10, 3);
    let dev = Arc::new(Device::open(&f.cow, &DeviceOptions::default()).unwrap());
    let area = 4 * SECTOR..8 * SECTOR;
    for round in 0..20u64 {
        let writers: Vec<(Range<usize>, u8)> = (0..24u8)
            .map(|w| {
                let seed = round * 1000 + u64::from(w);
                let r = common::pseudo_random_bytes(seed, 4);
                let a = area.start + usize::from(u16::from_le_bytes([r[0], r[1]])) % area.len();
                let b = area.start + usize::from(u16::from_le_bytes([r[2], r[3]])) % area.len();
                (a.min(b)..a.max(b) + 1, w + 1)
            })
            .collect();
        let sink = Arc::new(Collect::default());
        for (token, (r, v)) in writers.iter().enumerate() {
            let mut data = dev.alloc(r.start as u64, r.len() as u64).unwrap();
            data.copy_from_at(r.start % SECTOR, &vec![*v; r.len()]);
            dev.submit(
                Request {
                    command: Command::Write,
                    offset: r.start as u64,
                    len: r.len() as u64,
                    flags: Flags::default(),
                    data: Some(data),
                    token: token as u64,
                },
                sink.clone(),
            );
        }
        while sink.done.load(Ordering::SeqCst) < writers.len() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.errors.load(Ordering::SeqCst), 0);
        let mut got = vec![0u8; area.len()];
        dev.read_at(area.start as u64, &mut got).unwrap();
        // Constraints: at byte p holding v, every other writer covering p
        // came before v's writer. A serial order exists iff they are acyclic.
        let n = writers.len();
        let mut before = vec![vec![false; n]; n];
        for (i, &byte) in got.iter().enumerate() {
            let p = area.start + i;
            let covering: Vec<usize> = (0..n).filter(|&w| writers[w].0.contains(&p)).collect();
            if covering.is_empty() {
                continue;
            }
            let last = covering.iter().find(|&&w| writers[w].1 == byte);
            let Some(&last) = last else {
                panic!("round {round}: byte {p} is {byte}, written by none of {covering:?}");
            };
            for &w in &covering {
                if w != last {
                    before[w][last] = true;
                }
            }
        }
        // Kahn's algorithm.
        let mut indegree: Vec<usize> = (0..n)
            .map(|j| (0..n).filter(|&i| before[i][j]).count())
            .collect();
        let mut ready: Vec<usize> = (0..n).filter(|&j| indegree[j] == 0).collect();
        let mut seen = 0;
        while let Some(i) = ready.pop() {
            seen += 1;
            for j in 0..n {
                if before[i][j] {
                    indegree[j] -= 1;
                    if indegree[j] == 0 {
                        ready.push(j);
                    }
                }
            }
        }
        assert_eq!(seen, n, "round {round}: no serial order gives this result");
    }
    dev.close().unwrap();
    f.assert_base_untouched();
}

/// Closing with hundreds of requests in flight neither hangs nor frees a
/// buffer the kernel may still use: the pool poisons freed chunks, so a use
/// after free would show as 0xA5 in the data read back.
#[test]
fn close_with_hundreds_in_flight() {
    let f = fixture(4 << 20, 5);
    for cache in [Cache::None, Cache::Writeback] {
        let o = DeviceOptions {
            cache,
            poison_on_free: true,
            ..DeviceOptions::default()
        };
        let dev = Device::open(&f.cow, &o).unwrap();
        let sink = Arc::new(Collect::default());
        let mut expect = model_of(&f);
        let total = 400usize;
        for i in 0..total {
            let offset = (i * 9973 * SECTOR) % (4 << 20);
            let len = 4096.min((4 << 20) - offset);
            let v = (i % 250) as u8 + 1;
            let (command, data) = if i % 3 == 0 {
                (Command::Read, dev.alloc(offset as u64, len as u64).unwrap())
            } else {
                let mut d = dev.alloc(offset as u64, len as u64).unwrap();
                d.copy_from_at(0, &vec![v; len]);
                expect.write(offset..offset + len, &vec![v; len]);
                (Command::Write, d)
            };
            dev.submit(
                Request {
                    command,
                    offset: offset as u64,
                    len: len as u64,
                    flags: Flags::default(),
                    data: Some(data),
                    token: i as u64,
                },
                sink.clone(),
            );
        }
        close_within_a_minute(dev);
        assert_eq!(
            sink.done.load(Ordering::SeqCst),
            total,
            "every request ended"
        );
        assert_eq!(sink.errors.load(Ordering::SeqCst), 0);
        let dev = Device::open(&f.cow, &o).unwrap();
        let mut all = vec![0u8; expect.data.len()];
        dev.read_at(0, &mut all).unwrap();
        assert!(
            all == expect.data,
            "{cache:?}: differs at {:?}",
            first_difference(&all, &expect.data)
        );
        dev.close().unwrap();
    }
    f.assert_base_untouched();
}

/// Closes `dev` from another thread; fails the test if close fails or
/// takes over a minute (a hang).
fn close_within_a_minute(dev: Device) {
    let (tx, rx) = std::sync::mpsc::channel();
    let closer = std::thread::spawn(move || {
        let r = dev.close();
        let _ = tx.send(r.is_ok());
        dev
    });
    let closed = rx.recv_timeout(Duration::from_secs(60));
    assert_eq!(closed, Ok(true), "close hung or failed");
    drop(closer.join().unwrap());
}

/// A first write into a MiB where the backing file has only a hole copies
/// nothing: the hole stays the backing's, and only the written sectors become
/// the overlay's. A MiB with some backing data is copied whole. With direct
/// I/O and through the page cache.
#[test]
fn a_first_write_over_a_backing_hole_copies_nothing() {
    first_write_over_a_backing_hole(Cache::None);
    first_write_over_a_backing_hole(Cache::Writeback);
}

fn first_write_over_a_backing_hole(cache: Cache) {
    use std::os::unix::fs::FileExt;
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    // MiB 0: data; MiB 1: a hole; MiB 2: a hole, then data from 512 KiB on.
    let mut base_data = vec![0u8; 3 * MIB];
    let random = common::pseudo_random_bytes(21, 2 * MIB);
    base_data[..MIB].copy_from_slice(&random[..MIB]);
    base_data[2 * MIB + MIB / 2..].copy_from_slice(&random[MIB..MIB + MIB / 2]);
    {
        let file = fs::File::create(&base).unwrap();
        file.set_len(base_data.len() as u64).unwrap();
        file.write_all_at(&base_data[..MIB], 0).unwrap();
        let tail = 2 * MIB + MIB / 2;
        file.write_all_at(&base_data[tail..], tail as u64).unwrap();
        file.sync_all().unwrap();
        let hole = ubd::image::next_data(&file, MIB as u64, 2 * MIB as u64);
        assert_eq!(
            hole,
            2 * MIB as u64,
            "the file system under {} reports no holes (SEEK_DATA)",
            dir.path().display()
        );
    }
    let cow = dir.path().join("cow.img");
    create_overlay(&cow, &base, false).unwrap();
    let f = Fixture {
        base_mtime: fs::metadata(&base).unwrap().modified().unwrap(),
        _dir: dir,
        base,
        cow,
        base_data,
    };
    let mut model = model_of(&f);
    let dev = Device::open(&f.cow, &opts(false, cache)).unwrap();
    // A FLUSH first: from now on first writes copy.
    dev.flush().unwrap();
    for mib in 0..3 {
        let p = mib * MIB + 8 * SECTOR;
        let byte = 0xB0 + mib as u8;
        dev.write_at(p as u64, &[byte; 4096], Flags::default())
            .unwrap();
        model.write(p..p + 4096, &[byte; 4096]);
    }
    assert_reads(&dev, &model, &format!("{cache:?}: "));
    // Runs of (length, depth), adjacent runs of one depth merged.
    let depths = |dev: &Device| {
        let mut runs: Vec<(u64, u8)> = Vec::new();
        for e in dev.block_status(0, dev.capacity()).unwrap() {
            match runs.last_mut() {
                Some(last) if last.1 == e.depth => last.0 += e.len,
                _ => runs.push((e.len, e.depth)),
            }
        }
        runs
    };
    // MiB 0 copied; in MiB 1 only the 4 KiB written after its first 8
    // sectors, the rest left to the backing's hole; MiB 2 copied.
    let (mib, head) = (MIB as u64, 8 * SECTOR as u64);
    let expect = vec![
        (mib, 1),
        (head, 2),
        (4096, 1),
        (mib - head - 4096, 2),
        (mib, 1),
    ];
    assert_eq!(depths(&dev), expect, "{cache:?}");
    dev.flush().unwrap();
    dev.close().unwrap();
    let dev = Device::open(&f.cow, &opts(false, cache)).unwrap();
    assert_reads(&dev, &model, &format!("{cache:?}, after reopening: "));
    assert_eq!(depths(&dev), expect, "after reopening, {cache:?}");
    dev.close().unwrap();
    f.assert_base_untouched();
}

/// Close right after small first writes into many MiBs, once a FLUSH made
/// them copy their MiB from the backing: close waits for the copies and
/// their fills (no write is left in flight, none lands after), and every
/// byte reads back after reopening. Tried until a copy was seen in flight
/// when close was called. With direct I/O and through the page cache.
#[test]
fn close_with_copies_in_flight() {
    close_with_copies(Cache::None);
    close_with_copies(Cache::Writeback);
}

fn close_with_copies(cache: Cache) {
    const MIB: usize = 1 << 20;
    const MIBS: usize = 24;
    const CLOSE: u64 = 1;
    const CLOSED: u64 = 2;
    let mut seen = false;
    for attempt in 0..10 {
        let f = fixture(MIBS * MIB, 40 + attempt);
        let recorder = Arc::new(Recorder::new());
        let o = DeviceOptions {
            recorder: Some(recorder.clone()),
            ..opts(false, cache)
        };
        let dev = Device::open(&f.cow, &o).unwrap();
        let mut model = model_of(&f);
        dev.flush().unwrap();
        let sink = Arc::new(Collect::default());
        for mib in 0..MIBS {
            let offset = mib * MIB + 8 * SECTOR;
            let byte = 1 + mib as u8;
            let mut data = dev.alloc(offset as u64, 4096).unwrap();
            data.copy_from_at(0, &[byte; 4096]);
            model.write(offset..offset + 4096, &[byte; 4096]);
            let request = Request {
                command: Command::Write,
                offset: offset as u64,
                len: 4096,
                flags: Flags::default(),
                data: Some(data),
                token: mib as u64,
            };
            dev.submit(request, sink.clone());
        }
        recorder.mark(CLOSE);
        close_within_a_minute(dev);
        recorder.mark(CLOSED);
        assert_eq!(
            sink.done.load(Ordering::SeqCst),
            MIBS,
            "every request ended"
        );
        assert_eq!(sink.errors.load(Ordering::SeqCst), 0);
        // Every write close let through completed before close returned.
        let events = recorder.events();
        let closed_at = events.iter().position(|e| *e == Event::Mark(CLOSED));
        let (before, after) = events.split_at(closed_at.unwrap());
        let mut open = std::collections::BTreeSet::new();
        for e in before {
            match e {
                Event::Write { op, .. } | Event::Zero { op, .. } | Event::Sync { op, .. } => {
                    open.insert(*op);
                }
                Event::Done { op } => {
                    open.remove(op);
                }
                Event::Mark(_) => {}
            }
        }
        assert!(open.is_empty(), "ops still in flight after close: {open:?}");
        assert_eq!(after, &[Event::Mark(CLOSED)], "ops after close returned");
        // A copy's fill (a MiB of the backing's data) in flight at close.
        let close_at = events.iter().position(|e| *e == Event::Mark(CLOSE));
        let copies: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Write { op, role, data, .. }
                    if *role == Role::Main && data.len() == MIB && data.iter().any(|b| *b != 0) =>
                {
                    Some(*op)
                }
                _ => None,
            })
            .collect();
        let late = events[close_at.unwrap()..].iter().any(
            |e| matches!(e, Event::Write { op, .. } | Event::Done { op } if copies.contains(op)),
        );
        seen |= late;
        let dev = Device::open(&f.cow, &o).unwrap();
        assert_reads(&dev, &model, &format!("{cache:?}, after reopening: "));
        dev.close().unwrap();
        f.assert_base_untouched();
        if seen {
            break;
        }
    }
    assert!(
        seen,
        "{cache:?}: no copy was in flight when close was called"
    );
}

/// A raw image is a device too: capacity is its length, writes land in place.
#[test]
fn raw_image_with_a_ragged_end() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    let data = common::pseudo_random_bytes(11, 100_000);
    fs::write(&raw, &data).unwrap();
    let dev = Device::open(&raw, &DeviceOptions::default()).unwrap();
    assert_eq!(dev.capacity(), 100_000);
    let mut model = data.clone();
    dev.write_at(99_990, &[9u8; 10], Flags::default()).unwrap();
    model[99_990..].fill(9);
    dev.write_at(
        1,
        &[8u8; 700],
        Flags {
            fua: true,
            ..Flags::default()
        },
    )
    .unwrap();
    model[1..701].fill(8);
    let mut got = vec![0u8; 100_000];
    dev.read_at(0, &mut got).unwrap();
    assert!(got == model);
    // Past the end: EINVAL for reads, ENOSPC for writes.
    let waiter = Arc::new(Waiter::default());
    let too_far = dev.alloc(99_999, 2).unwrap();
    dev.submit(
        Request {
            command: Command::Write,
            offset: 99_999,
            len: 2,
            flags: Flags::default(),
            data: Some(too_far),
            token: 0,
        },
        waiter.clone(),
    );
    assert_eq!(waiter.wait().unwrap_err(), nix::errno::Errno::ENOSPC);
    dev.close().unwrap();
    assert_eq!(fs::read(&raw).unwrap(), model);
}

/// Block status reports where data lives: overlay, backing, and the zero
/// tail; after write-zeroes, a hole in the overlay.
#[test]
fn block_status_follows_the_bitmap() {
    let f = fixture(1_000_000, 2);
    let dev = Device::open(&f.cow, &DeviceOptions::default()).unwrap();
    dev.write_at(8192, &[1u8; 8192], Flags::default()).unwrap();
    dev.write_zeroes(65536, 4096, Flags::default()).unwrap();
    let e = dev.block_status(0, dev.capacity()).unwrap();
    let total: u64 = e.iter().map(|x| x.len).sum();
    assert_eq!(total, dev.capacity());
    let mut at = 0;
    let mut seen = Vec::new();
    for x in &e {
        seen.push((at, x.len, x.depth, x.zero));
        at += x.len;
    }
    assert_eq!(seen[0], (0, 8192, 2, false));
    assert_eq!(seen[1], (8192, 8192, 1, false));
    assert_eq!(seen[2], (16384, 65536 - 16384, 2, false));
    assert_eq!(seen[3], (65536, 4096, 1, true));
    dev.close().unwrap();
    f.assert_base_untouched();
}

/// WRITE_ZEROES inside one sector keeps the sector's other bytes, wherever
/// in the sector it lies (it once took the bytes after a zeroed head of a
/// sector from a stale scratch buffer). Partial writes elsewhere come
/// between, so the scratch buffer holds other data each time.
#[test]
fn write_zeroes_inside_one_sector_keeps_the_rest_of_it() {
    let f = fixture(64 * 1024, 3);
    for cache in [Cache::None, Cache::Writeback] {
        let dev = Device::open(&f.cow, &opts(false, cache)).unwrap();
        let mut model = model_of(&f);
        let mut got = vec![0u8; model.data.len()];
        dev.read_at(0, &mut got).unwrap();
        model.data.copy_from_slice(&got);
        // (start in the sector, length): head, tail, middle, near-whole.
        let cases = [(0, 100), (0, 511), (412, 100), (1, 511), (100, 300), (1, 1)];
        for (i, &(at, len)) in cases.iter().enumerate() {
            let sector = (8 + 2 * i) * SECTOR;
            let v = 0x40 + i as u8;
            dev.write_at(sector as u64, &[v; SECTOR], Flags::default())
                .unwrap();
            model.write(sector..sector + SECTOR, &[v; SECTOR]);
            let other = 40 * SECTOR + 3;
            dev.write_at(other as u64, &[!v; 10], Flags::default())
                .unwrap();
            model.write(other..other + 10, &[!v; 10]);
            let r = sector + at..sector + at + len;
            dev.write_zeroes(r.start as u64, len as u64, Flags::default())
                .unwrap();
            model.zero(r);
        }
        assert_reads(&dev, &model, &format!("{cache:?}: "));
        dev.close().unwrap();
    }
    f.assert_base_untouched();
}

/// The first small write into a MiB of the overlay may fill that MiB with
/// zeros first (direct I/O): never where an earlier session left data, and
/// never under writes in flight or after a TRIM punched part of it.
#[test]
fn first_writes_into_a_mib_keep_what_is_there() {
    const MIB: usize = 1 << 20;
    let f = fixture(4 * MIB, 5);
    let mut model = model_of(&f);
    let at = |mib: usize, sector: usize| mib * MIB + sector * SECTOR;
    // Session 1: a write into MiB 1 and one into MiB 2, made durable.
    let dev = Device::open(&f.cow, &opts(false, Cache::None)).unwrap();
    for (i, p) in [at(1, 5), at(2, 1000)].into_iter().enumerate() {
        let v = vec![0xA0 + i as u8; 4096];
        dev.write_at(p as u64, &v, Flags::default()).unwrap();
        model.write(p..p + v.len(), &v);
    }
    dev.flush().unwrap();
    dev.close().unwrap();
    // Session 2: small first writes into the same MiBs and into fresh ones,
    // many at once; a TRIM in MiB 3 between writes there.
    let dev = Arc::new(Device::open(&f.cow, &opts(false, Cache::None)).unwrap());
    let mut handles = Vec::new();
    for (i, p) in [at(1, 900), at(2, 8), at(3, 16), at(3, 600), at(0, 40)]
        .into_iter()
        .enumerate()
    {
        let v = vec![0xB0 + i as u8; 4096];
        model.write(p..p + v.len(), &v);
        let dev = dev.clone();
        handles.push(std::thread::spawn(move || {
            dev.write_at(p as u64, &v, Flags::default()).unwrap();
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let t = at(3, 1024)..at(3, 1032);
    dev.trim(t.start as u64, t.len() as u64).unwrap();
    model.trim(t);
    let p = at(3, 1500);
    dev.write_at(p as u64, &[0xC0; 4096], Flags::default())
        .unwrap();
    model.write(p..p + 4096, &[0xC0; 4096]);
    assert_reads(&dev, &model, "");
    dev.flush().unwrap();
    Arc::try_unwrap(dev).ok().unwrap().close().unwrap();
    let dev = Device::open(&f.cow, &opts(false, Cache::None)).unwrap();
    assert_reads(&dev, &model, "after reopening, ");
    dev.close().unwrap();
    f.assert_base_untouched();
}

/// Once a FLUSH came, a small first write into an empty MiB (direct I/O)
/// fills that MiB with the backing's data and makes it the overlay's, bits
/// and all, so later writes there set no new bits; before that, only the
/// written sectors are the overlay's. Zeroings into such a MiB, submitted
/// just before or after that first write, keep their zeros: the fill never
/// lands over them. The last MiB is partly past the backing file's end.
/// Through the page cache too.
#[test]
fn a_first_write_copies_its_mib_under_zeroings_in_flight() {
    first_write_copies_under_zeroings(Cache::None);
    first_write_copies_under_zeroings(Cache::Writeback);
}

fn first_write_copies_under_zeroings(cache: Cache) {
    const MIB: usize = 1 << 20;
    let size = 3 * MIB + 300_000;
    let f = fixture(size, 9);
    let mut model = model_of(&f);
    let dev = Device::open(&f.cow, &opts(false, cache)).unwrap();
    let at = |mib: usize, sector: usize| (mib * MIB + sector * SECTOR) as u64;
    let write = |offset: u64, byte: u8| {
        let mut data = dev.alloc(offset, 4096).unwrap();
        data.copy_from_at(0, &[byte; 4096]);
        Request {
            command: Command::Write,
            offset,
            len: 4096,
            flags: Flags::default(),
            data: Some(data),
            token: 0,
        }
    };
    let zero = |offset: u64| Request {
        command: Command::WriteZeroes,
        offset,
        len: 65536,
        flags: Flags::default(),
        data: None,
        token: 0,
    };
    // No FLUSH yet: no copy.
    let p = at(2, 16);
    dev.write_at(p, &[0xA4; 4096], Flags::default()).unwrap();
    model.write(p as usize..p as usize + 4096, &[0xA4; 4096]);
    dev.flush().unwrap();
    // MiB 0: the write first, then the zeroing; MiB 1: the other way round.
    // Each pair reaches the worker together.
    let pairs = [
        (write(at(0, 8), 0xA1), zero(at(0, 256))),
        (zero(at(1, 256)), write(at(1, 8), 0xA2)),
    ];
    for (a, b) in pairs {
        let (wa, wb) = (Arc::new(Waiter::default()), Arc::new(Waiter::default()));
        dev.submit_quiet(a, wa.clone());
        dev.submit_quiet(b, wb.clone());
        dev.kick();
        wa.wait().unwrap();
        wb.wait().unwrap();
    }
    for mib in 0..2 {
        let (w, z) = (at(mib, 8) as usize, at(mib, 256) as usize);
        model.write(w..w + 4096, &[0xA1 + mib as u8; 4096]);
        model.zero(z..z + 65536);
    }
    // MiB 3 ends 300,000 bytes in, at the backing's end.
    let p = at(3, 100);
    dev.write_at(p, &[0xA3; 4096], Flags::default()).unwrap();
    model.write(p as usize..p as usize + 4096, &[0xA3; 4096]);
    assert_reads(&dev, &model, &format!("{cache:?}: "));
    // MiB 3 is the overlay's, all of it; MiB 2 only where written.
    let depths = |dev: &Device| {
        let e = dev
            .block_status(at(2, 0), dev.capacity() - at(2, 0))
            .unwrap();
        e.iter().map(|x| (x.len, x.depth)).collect::<Vec<_>>()
    };
    let rest = MIB as u64 - at(0, 16) - 4096;
    let expect = vec![
        (at(0, 16), 2),
        (4096, 1),
        (rest, 2),
        (dev.capacity() - at(3, 0), 1),
    ];
    assert_eq!(depths(&dev), expect, "{cache:?}");
    dev.flush().unwrap();
    dev.close().unwrap();
    let dev = Device::open(&f.cow, &opts(false, cache)).unwrap();
    assert_reads(&dev, &model, &format!("{cache:?}, after reopening: "));
    assert_eq!(depths(&dev), expect, "after reopening, {cache:?}");
    dev.close().unwrap();
    f.assert_base_untouched();
}

/// A WRITE of no bytes succeeds and changes nothing, on an overlay and on a
/// raw image, like a READ of no bytes (it failed with EFAULT: the ring handed
/// the kernel a fixed-buffer write of 0 bytes at no address).
#[test]
fn a_write_of_no_bytes_succeeds() {
    let f = fixture(1 << 20, 9);
    let raw = f._dir.path().join("raw.img");
    fs::write(&raw, &f.base_data).unwrap();
    for path in [&f.cow, &raw] {
        let dev = Device::open(path, &opts(false, Cache::None)).unwrap();
        for offset in [0u64, 4096, 100, 1 << 20] {
            let data = dev.alloc(offset, 0).unwrap();
            let reply = dev.call(Request {
                command: Command::Write,
                offset,
                len: 0,
                flags: Flags::default(),
                data: Some(data),
                token: 0,
            });
            assert!(reply.is_ok(), "{}: at {offset}: {reply:?}", path.display());
        }
        let mut all = vec![0u8; 1 << 20];
        dev.read_at(0, &mut all).unwrap();
        assert!(all == f.base_data, "a write of no bytes changed data");
        dev.close().unwrap();
    }
    f.assert_base_untouched();
}

/// A read-only device wrote nothing, so it syncs nothing when it closes: a
/// reader (`map`, `compare`, a read-only export) never fails at the end on
/// a file whose fdatasync fails, such as one on a file system without it.
#[test]
fn a_read_only_device_syncs_nothing_when_it_closes() {
    let f = fixture(1 << 20, 61);
    for (path, cache) in [(&f.cow, Cache::None), (&f.base, Cache::Writeback)] {
        let recorder = Arc::new(Recorder::new());
        let o = DeviceOptions {
            read_only: true,
            recorder: Some(recorder.clone()),
            ..opts(false, cache)
        };
        let dev = Device::open(path, &o).unwrap();
        let got = dev.call(Request {
            command: Command::Read,
            offset: 4096,
            len: 4096,
            flags: Flags::default(),
            data: Some(dev.alloc(4096, 4096).unwrap()),
            token: 1,
        });
        assert!(got.is_ok(), "{}: {got:?}", path.display());
        dev.close().unwrap();
        let syncs = recorder
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::Sync { .. }))
            .count();
        assert_eq!(syncs, 0, "{}: a read-only device synced", path.display());
    }
}

/// A pool smaller than one chunk is refused, not run on one chunk; a pool
/// that is not a whole number of chunks is rounded down to one.
#[test]
fn a_pool_smaller_than_one_chunk_is_refused() {
    let f = fixture(1 << 20, 62);
    let chunk = DeviceOptions::default().chunk_bytes();
    for pool_size in [0, 4096, chunk - 1] {
        let o = DeviceOptions {
            pool_size,
            ..opts(false, Cache::None)
        };
        let err = Device::open(&f.cow, &o).map(|_| ()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "a pool of {pool_size} bytes is smaller than one {chunk}-byte chunk"
            )),
            "{pool_size}: {msg}"
        );
    }
    let o = DeviceOptions {
        pool_size: chunk + chunk / 2,
        ..opts(false, Cache::None)
    };
    let dev = Device::open(&f.cow, &o).unwrap();
    assert_eq!(dev.pool().chunks(), 1);
    dev.close().unwrap();
}

/// Writes submitted by other threads while the device closes: each one
/// the device answered with success is still there after the close, once
/// the overlay is opened again (the close's last flush round covers it, or
/// the write is refused). Each write sets a new bitmap bit.
#[test]
fn a_write_answered_while_the_device_closes_survives_the_close() {
    const THREADS: usize = 16;
    const ROUNDS: usize = 100;
    const PER_ROUND: usize = 32;
    const REGION: usize = ROUNDS * PER_ROUND * SECTOR;
    let f = fixture(THREADS * REGION, 11);
    for round in 0..ROUNDS {
        let dev = Arc::new(Device::open(&f.cow, &DeviceOptions::default()).unwrap());
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    let v = (round * 16 + t) as u8 | 1;
                    for k in 0..PER_ROUND {
                        let at = (t * REGION + (round * PER_ROUND + k) * SECTOR) as u64;
                        if dev.write_at(at, &[v; SECTOR], Flags::default()).is_err() {
                            break;
                        }
                        acked.push(at);
                    }
                    (v, acked)
                })
            })
            .collect();
        // Threads that keep the CPUs busy, so that writers are preempted
        // between their check of the device and their hand-over.
        let spin = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let hogs: Vec<_> = (0..6)
            .map(|_| {
                let spin = spin.clone();
                std::thread::spawn(move || {
                    while spin.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1 + (round % 3) as u64));
        dev.close().unwrap();
        spin.store(false, Ordering::Relaxed);
        for h in hogs {
            h.join().unwrap();
        }
        let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        drop(dev);
        let dev = Device::open(&f.cow, &DeviceOptions::default()).unwrap();
        for (v, acked) in results {
            for at in acked {
                let mut got = [0u8; SECTOR];
                dev.read_at(at, &mut got).unwrap();
                assert!(
                    got.iter().all(|&b| b == v),
                    "round {round}: a write of {v:#x} at {at} answered OK is gone after the \
                     close (reads {:#x})",
                    got[0]
                );
            }
        }
        dev.close().unwrap();
    }
}

/// An overlay whose file ends before its data area does (allowed when
/// opened: nothing there is marked written) takes a WRITE_ZEROES past its
/// end, which the device answers OK: the range then reads as zeros, not as
/// a failure.
#[test]
fn write_zeroes_past_the_end_of_a_short_overlay_file_reads_back_as_zeros() {
    let f = fixture(4 << 20, 13);
    let full = fs::metadata(&f.cow).unwrap().len();
    // The last 2 MiB of the data area are not in the file.
    fs::OpenOptions::new()
        .write(true)
        .open(&f.cow)
        .unwrap()
        .set_len(full - (2 << 20))
        .unwrap();
    for no_hole in [false, true] {
        let dev = Device::open(&f.cow, &DeviceOptions::default()).unwrap();
        let at = (3 << 20) + if no_hole { 65536 } else { 0 };
        let flags = Flags {
            no_hole,
            ..Flags::default()
        };
        dev.write_zeroes(at, 65536, flags).unwrap();
        let mut got = vec![1u8; 65536];
        let read = dev.read_at(at, &mut got);
        assert!(
            read.is_ok() && got.iter().all(|&b| b == 0),
            "no_hole {no_hole}: a WRITE_ZEROES answered OK reads back as {read:?}"
        );
        dev.close().unwrap();
    }
}
