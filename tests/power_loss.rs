//! Power loss, simulated: the states a host crash could leave, checked
//! against the FLUSH and FUA contract (issue 7, part 2).
//!
//! A SIGKILL keeps the page cache and the disk's cache; a power cut keeps
//! only what was synced. So the device runs with a recorder beneath it (in
//! the spirit of dm-log-writes and CrashMonkey) that logs every write, hole
//! punch and sync the ring submits, and every completion, in one timeline
//! with the client's own marks (a request's start, its reply, a FLUSH's start
//! and end). From the log the test builds crash states: pick a moment; what a
//! sync that completed before it had covered (ops completed before the sync
//! was submitted) is on disk; every other op submitted before the moment may
//! have reached the disk whole, not at all, or sector by sector (the host
//! persists them in any order). Each state is written out as an overlay,
//! opened read-only, read whole and checked:
//!
//! - a write, trim or write-zeroes acknowledged before the start of a FLUSH
//!   that completed, and a FUA write acknowledged, is there;
//! - every sector holds one of its versions from the newest such committed
//!   op on (its state after that op, or after a later op that touched it),
//!   or, with none committed, its state at the start or after any op;
//! - the backing file is never written.
//!
//! Each run's log is also checked whole for invariant 7 itself: no bitmap
//! write sets a bit before the sector's data was synced
//! (`bitmap_follows_data`), which a sampled crash state catches only when the
//! cut falls in the window.
//!
//! Four threads, each on its own region (so every sector's ops come in one
//! order), issue writes (sector-aligned and partial), FUA writes, trims,
//! write-zeroes and FLUSHes, one at a time each. This is the test that would
//! have caught UML setting bitmap bits before the data is durable (a sector
//! marked present over a hole reads zeros) and UML's FLUSH doing nothing.
//!
//! `UBD_POWER_STATES` sets the number of crash states (default 300),
//! `UBD_POWER_SEED` the seed (default: from the clock; it is printed).

mod common;

use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use common::pseudo_random_bytes;
use ubd::device::{Device, DeviceOptions, Event, Flags, Recorder, Role};
use ubd::image::{Cache, create_overlay};
use ubd_cow::{Geometry, Header};

const SECTOR: usize = 512;
const BASE_LEN: usize = 4 << 20;
const THREADS: usize = 4;
const REGION: usize = BASE_LEN / THREADS;
const OPS_PER_THREAD: usize = 60;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a client op did.
#[derive(Debug, Clone)]
enum Kind {
    /// Bytes at an offset (aligned or not); `fua` when sent with FUA.
    Write {
        data: Vec<u8>,
        fua: bool,
    },
    Trim,
    Zero,
}

#[derive(Debug, Clone)]
struct ClientOp {
    offset: usize,
    len: usize,
    kind: Kind,
}

/// Marks the client puts in the recorder's log.
const MARK_START: u64 = 1 << 56;
const MARK_ACK: u64 = 2 << 56;
const MARK_FLUSH_START: u64 = 3 << 56;
const MARK_FLUSH_DONE: u64 = 4 << 56;
const MARK_ID: u64 = (1 << 56) - 1;

/// Runs the workload on `cow`; returns the client ops and the log.
fn run_workload(cow: &Path, cache: Cache, seed: u64) -> (Vec<ClientOp>, Vec<Event>) {
    let recorder = Arc::new(Recorder::new());
    let dev = Device::open(
        cow,
        &DeviceOptions {
            cache,
            pool_size: 8 << 20,
            recorder: Some(recorder.clone()),
            ..DeviceOptions::default()
        },
    )
    .expect("open the overlay");
    let ops: Mutex<Vec<ClientOp>> = Mutex::new(Vec::new());
    let flushes = Mutex::new(0u64);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (dev, ops, flushes, rec) = (&dev, &ops, &flushes, &recorder);
            s.spawn(move || {
                let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                let base = t * REGION;
                for _ in 0..OPS_PER_THREAD {
                    let pick = rng.below(100);
                    if pick < 12 {
                        let f = {
                            let mut n = flushes.lock().unwrap();
                            *n += 1;
                            *n
                        };
                        rec.mark(MARK_FLUSH_START | f);
                        dev.flush().expect("flush");
                        rec.mark(MARK_FLUSH_DONE | f);
                        continue;
                    }
                    let (offset, len) = if pick < 50 {
                        // Sector-aligned, 512 B..32 KiB.
                        let len = (1 + rng.below(64) as usize) * SECTOR;
                        let at = rng.below(((REGION - len) / SECTOR) as u64) as usize * SECTOR;
                        (base + at, len)
                    } else {
                        // Anywhere, any length up to 9 KiB.
                        let len = 1 + rng.below(9 << 10) as usize;
                        (base + rng.below((REGION - len) as u64) as usize, len)
                    };
                    let kind = match pick {
                        12..=69 => Kind::Write {
                            data: pseudo_random_bytes(rng.next(), len),
                            fua: false,
                        },
                        70..=79 => Kind::Write {
                            data: pseudo_random_bytes(rng.next(), len),
                            fua: true,
                        },
                        // Trims and zeroes are whole sectors here.
                        80..=89 => Kind::Trim,
                        _ => Kind::Zero,
                    };
                    let (offset, len) = match kind {
                        Kind::Write { .. } => (offset, len),
                        _ => (
                            offset / SECTOR * SECTOR,
                            len.next_multiple_of(SECTOR)
                                .min(base + REGION - offset / SECTOR * SECTOR),
                        ),
                    };
                    let id = {
                        let mut ops = ops.lock().unwrap();
                        ops.push(ClientOp {
                            offset,
                            len,
                            kind: kind.clone(),
                        });
                        ops.len() as u64 - 1
                    };
                    rec.mark(MARK_START | id);
                    match &kind {
                        Kind::Write { data, fua } => dev
                            .write_at(
                                offset as u64,
                                data,
                                Flags {
                                    fua: *fua,
                                    ..Flags::default()
                                },
                            )
                            .expect("write"),
                        Kind::Trim => dev.trim(offset as u64, len as u64).expect("trim"),
                        Kind::Zero => dev
                            .write_zeroes(offset as u64, len as u64, Flags::default())
                            .expect("write zeroes"),
                    }
                    rec.mark(MARK_ACK | id);
                }
            });
        }
    });
    // No final flush: the log ends with writes still unsynced.
    drop(dev);
    (ops.into_inner().unwrap(), recorder.events())
}

/// Where each event of interest sits in the log.
struct Timeline {
    start: HashMap<u64, usize>,
    ack: HashMap<u64, usize>,
    flushes: Vec<(usize, usize)>,
    /// Ring ops: index of submission, of completion (if any).
    ring_done: HashMap<u64, usize>,
    /// Completed syncs: (submitted at, completed at).
    syncs: Vec<(usize, usize)>,
}

fn timeline(events: &[Event]) -> Timeline {
    let mut t = Timeline {
        start: HashMap::new(),
        ack: HashMap::new(),
        flushes: Vec::new(),
        ring_done: HashMap::new(),
        syncs: Vec::new(),
    };
    let mut flush_start = HashMap::new();
    let mut sync_start = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Mark(m) => {
                let id = m & MARK_ID;
                match m & !MARK_ID {
                    MARK_START => drop(t.start.insert(id, i)),
                    MARK_ACK => drop(t.ack.insert(id, i)),
                    MARK_FLUSH_START => drop(flush_start.insert(id, i)),
                    MARK_FLUSH_DONE => t.flushes.push((flush_start[&id], i)),
                    _ => panic!("unknown mark {m:#x}"),
                }
            }
            Event::Sync { op, role } => {
                assert_eq!(*role, Role::Main, "a sync of the backing file");
                sync_start.insert(*op, i);
            }
            Event::Done { op } => {
                t.ring_done.insert(*op, i);
                if let Some(&s) = sync_start.get(op) {
                    t.syncs.push((s, i));
                }
            }
            Event::Write { role, .. } | Event::Zero { role, .. } => {
                assert_eq!(*role, Role::Main, "the backing file was written: {e:?}");
            }
        }
    }
    t
}

/// The overlay a power cut at event `cut` could leave: `initial` plus what
/// was durable, plus a random part of the rest.
fn crash_state(
    initial: &[u8],
    events: &[Event],
    t: &Timeline,
    cut: usize,
    rng: &mut Rng,
) -> Vec<u8> {
    // Ops that completed before the submission of a sync that completed
    // before the cut are on disk.
    let covered_before = t
        .syncs
        .iter()
        .filter(|&&(_, done)| done < cut)
        .map(|&(start, _)| start)
        .max()
        .unwrap_or(0);
    let mut file = initial.to_vec();
    let mode = rng.below(3);
    for e in &events[..cut] {
        let (op, offset, bytes): (u64, usize, Option<&[u8]>) = match e {
            Event::Write {
                op, offset, data, ..
            } => (*op, *offset as usize, Some(data)),
            Event::Zero { op, offset, .. } => (*op, *offset as usize, None),
            _ => continue,
        };
        let len = match (e, bytes) {
            (_, Some(b)) => b.len(),
            (Event::Zero { len, .. }, None) => *len as usize,
            _ => 0,
        };
        let durable = t.ring_done.get(&op).is_some_and(|&d| d < covered_before);
        // Not durable: all, nothing, or each sector by chance.
        let keep = |rng: &mut Rng| durable || (mode == 0) || (mode == 2 && rng.below(2) == 0);
        let mut at = 0;
        while at < len {
            let n = (SECTOR - (offset + at) % SECTOR).min(len - at);
            if keep(rng) {
                let dst = &mut file[offset + at..offset + at + n];
                match bytes {
                    Some(b) => dst.copy_from_slice(&b[at..at + n]),
                    None => dst.fill(0),
                }
            }
            at += n;
        }
    }
    file
}

/// Every state each sector passed through, from the start, in order; and the
/// index of its newest committed state at `cut`.
fn check(
    ops: &[ClientOp],
    t: &Timeline,
    base: &[u8],
    cut: usize,
    got: &[u8],
) -> Result<usize, String> {
    let committed = |id: u64, op: &ClientOp| {
        let Some(&ack) = t.ack.get(&id) else {
            return false;
        };
        if ack >= cut {
            return false;
        }
        matches!(op.kind, Kind::Write { fua: true, .. })
            || t.flushes.iter().any(|&(s, d)| ack < s && d < cut)
    };
    // The model of the live device: which sectors the overlay holds, and
    // which bytes may read as zeros instead of `live` (a trim of a sector
    // never written, whose MiB the overlay may hold a copy of).
    let mut present = vec![false; BASE_LEN / SECTOR];
    let mut live = base.to_vec();
    let mut may_be_zero = vec![false; BASE_LEN];
    // Per sector: versions (bytes, and which of them may be zeros), and the
    // newest committed version.
    type Version = (Vec<u8>, Vec<bool>);
    let mut versions: HashMap<usize, (Vec<Version>, usize)> = HashMap::new();
    let mut order: Vec<(usize, u64)> = t
        .start
        .iter()
        .filter(|&(_, &i)| i < cut)
        .map(|(&id, &i)| (i, id))
        .collect();
    order.sort();
    for (_, id) in order {
        let op = &ops[id as usize];
        let sectors = op.offset / SECTOR..(op.offset + op.len).div_ceil(SECTOR);
        for s in sectors.clone() {
            versions.entry(s).or_insert_with(|| {
                let at = s * SECTOR..(s + 1) * SECTOR;
                (vec![(base[at].to_vec(), vec![false; SECTOR])], 0)
            });
        }
        match &op.kind {
            Kind::Write { data, .. } => {
                live[op.offset..op.offset + op.len].copy_from_slice(data);
                may_be_zero[op.offset..op.offset + op.len].fill(false);
                sectors.clone().for_each(|s| present[s] = true);
            }
            Kind::Zero => {
                live[op.offset..op.offset + op.len].fill(0);
                sectors.clone().for_each(|s| present[s] = true);
            }
            // A trim punches the overlay's sectors (they read zeros); the
            // backing file's stay, or read zeros where the overlay held a
            // copy of them.
            Kind::Trim => {
                for s in sectors.clone() {
                    let at = s * SECTOR..(s + 1) * SECTOR;
                    if present[s] {
                        live[at].fill(0);
                    } else {
                        may_be_zero[at].fill(true);
                    }
                }
            }
        }
        let is_committed = committed(id, op);
        for s in sectors {
            let v = versions.get_mut(&s).expect("entry made above");
            let at = s * SECTOR..(s + 1) * SECTOR;
            v.0.push((live[at.clone()].to_vec(), may_be_zero[at].to_vec()));
            if is_committed {
                v.1 = v.0.len() - 1;
            }
        }
    }
    let mut checked = 0;
    for s in 0..BASE_LEN / SECTOR {
        let sector = &got[s * SECTOR..(s + 1) * SECTOR];
        match versions.get(&s) {
            None => {
                if sector != &base[s * SECTOR..(s + 1) * SECTOR] {
                    return Err(format!("sector {s}: no op touched it, but it changed"));
                }
            }
            Some((vs, from)) => {
                let fits = |(bytes, mz): &Version| {
                    sector == &bytes[..]
                        || (mz.contains(&true)
                            && sector
                                .iter()
                                .zip(bytes.iter().zip(mz))
                                .all(|(g, (b, z))| g == b || (*z && *g == 0)))
                };
                if !vs[*from..].iter().any(fits) {
                    let zeros = sector.iter().all(|&b| b == 0);
                    return Err(format!(
                        "sector {s} (byte {}): matches none of its {} versions from the newest \
                         committed one (version {from}){}",
                        s * SECTOR,
                        vs.len() - from,
                        if zeros { "; it reads zeros" } else { "" }
                    ));
                }
                if *from > 0 {
                    checked += 1;
                }
            }
        }
    }
    Ok(checked)
}

/// Invariant 7 read off a log, for every bit and not only at the moments a
/// crash state samples: a bitmap write may set a sector's bit only once a
/// write or zeroing of that sector's data has completed and a sync
/// submitted after that completion has completed, all before the bitmap
/// write was submitted. `initial` is the overlay before the log began.
/// Returns the number of newly set bits checked.
fn bitmap_follows_data(events: &[Event], initial: &[u8]) -> Result<usize, String> {
    let header = Header::parse(initial).map_err(|e| format!("the overlay's header: {e}"))?;
    let g = Geometry::new(&header).map_err(|e| format!("the overlay's geometry: {e}"))?;
    let bitmap_at = g.bitmap_offset..g.bitmap_offset + g.bitmap_len;
    let mut bitmap = initial[bitmap_at.start as usize..bitmap_at.end as usize].to_vec();
    let mut durable = vec![false; g.sectors as usize];
    // The sectors an op covers whole.
    let data_sectors = |offset: u64, len: u64| -> Range<u64> {
        let start = offset - g.data_offset;
        start.div_ceil(SECTOR as u64)..((start + len) / SECTOR as u64).min(g.sectors)
    };
    // The device's zero fill of a MiB ahead of a first small write into it
    // is no sector's data: no bit may point at it. Clients here write less
    // than a MiB at a time, so a whole MiB of zeros at a MiB boundary is a
    // fill. (A copy of the backing's MiB is data, and is not zeros.)
    const MIB: u64 = 1 << 20;
    let zero_fill = |offset: u64, data: &[u8]| {
        (offset - g.data_offset) % MIB == 0
            && data.len() as u64 == MIB
            && data.iter().all(|&b| b == 0)
    };
    // Data ops submitted and not completed; completed and not yet synced
    // (with where they completed); syncs in flight (where submitted).
    let mut in_flight: HashMap<u64, Range<u64>> = HashMap::new();
    let mut unsynced: Vec<(usize, Range<u64>)> = Vec::new();
    let mut syncs: HashMap<u64, usize> = HashMap::new();
    let mut checked = 0;
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Write {
                op, offset, data, ..
            } if *offset >= g.data_offset && !zero_fill(*offset, data) => {
                in_flight.insert(*op, data_sectors(*offset, data.len() as u64));
            }
            Event::Zero {
                op, offset, len, ..
            } if *offset >= g.data_offset => {
                in_flight.insert(*op, data_sectors(*offset, *len));
            }
            Event::Write { offset, data, .. } if bitmap_at.contains(offset) => {
                let from = (offset - bitmap_at.start) as usize;
                for (k, &new) in data.iter().enumerate() {
                    let Some(old) = bitmap.get_mut(from + k) else {
                        return Err(format!("event {i}: a bitmap write past the bitmap"));
                    };
                    let set = new & !*old;
                    for bit in (0..8).filter(|b| set & (1 << b) != 0) {
                        let sector = (from + k) * 8 + bit;
                        if !durable.get(sector).copied().unwrap_or(false) {
                            return Err(format!(
                                "event {i}: a bitmap write sets the bit of sector {sector} \
                                 (device byte {}) before its data was synced",
                                sector * SECTOR
                            ));
                        }
                        checked += 1;
                    }
                    *old = new;
                }
            }
            Event::Sync { op, .. } => drop(syncs.insert(*op, i)),
            Event::Done { op } => {
                if let Some(sectors) = in_flight.remove(op) {
                    unsynced.push((i, sectors));
                }
                if let Some(submitted) = syncs.remove(op) {
                    unsynced.retain(|(done, sectors)| {
                        if *done < submitted {
                            sectors.clone().for_each(|s| durable[s as usize] = true);
                        }
                        *done >= submitted
                    });
                }
            }
            _ => {}
        }
    }
    Ok(checked)
}

fn read_state(dir: &Path, state: &[u8]) -> Vec<u8> {
    let path = dir.join("state.cow");
    fs::write(&path, state).expect("write the crash state");
    let dev = Device::open(
        &path,
        &DeviceOptions {
            read_only: true,
            cache: Cache::Writeback,
            pool_size: 8 << 20,
            ..DeviceOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("a crash state does not open: {e}"));
    let mut got = vec![0u8; BASE_LEN];
    dev.read_at(0, &mut got).expect("read the crash state");
    dev.close().expect("close");
    got
}

#[test]
fn every_power_cut_keeps_what_flush_and_fua_promised() {
    let states: usize = std::env::var("UBD_POWER_STATES")
        .ok()
        .map(|v| v.parse().expect("UBD_POWER_STATES"))
        .unwrap_or(300);
    let seed = std::env::var("UBD_POWER_SEED")
        .ok()
        .map(|v| v.parse().expect("UBD_POWER_SEED"))
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("UBD_POWER_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.img");
    let base = pseudo_random_bytes(seed, BASE_LEN);
    fs::write(&base_path, &base).unwrap();
    let base_mtime = fs::metadata(&base_path).unwrap().modified().unwrap();

    let (mut total, mut committed_sectors, mut runs) = (0usize, 0usize, 0u64);
    while total < states {
        // Alternate direct I/O and the page cache; a fresh overlay each run.
        let cache = if runs % 2 == 0 {
            Cache::None
        } else {
            Cache::Writeback
        };
        let cow = dir.path().join("vm.cow");
        let _ = fs::remove_file(&cow);
        create_overlay(&cow, &base_path, false).expect("create the overlay");
        let initial = fs::read(&cow).unwrap();
        let (ops, events) = run_workload(&cow, cache, seed.wrapping_add(runs));
        if let Err(why) = bitmap_follows_data(&events, &initial) {
            panic!("run {runs}, {cache:?}, seed {seed}: {why}");
        }
        let t = timeline(&events);
        // Every completed sync, and moments picked at random.
        let mut cuts: Vec<usize> = t.syncs.iter().map(|&(_, d)| d + 1).collect();
        let mut rng = Rng(seed ^ runs.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1);
        for _ in 0..cuts.len() {
            cuts.push(1 + rng.below(events.len() as u64) as usize);
        }
        cuts.push(events.len());
        for &cut in &cuts {
            for _ in 0..3 {
                if total >= states {
                    break;
                }
                let state = crash_state(&initial, &events, &t, cut, &mut rng);
                let got = read_state(dir.path(), &state);
                match check(&ops, &t, &base, cut, &got) {
                    Ok(n) => committed_sectors += n,
                    Err(why) => panic!(
                        "crash state at event {cut} of {} (run {runs}, {cache:?}, seed {seed}): \
                         {why}",
                        events.len()
                    ),
                }
                total += 1;
            }
        }
        runs += 1;
    }
    println!(
        "{total} crash states from {runs} runs: 0 violations; {committed_sectors} committed \
         sector versions verified"
    );
    assert!(
        committed_sectors > 0,
        "no state held a committed write: the test checked nothing"
    );
    assert_eq!(fs::read(&base_path).unwrap(), base, "the base changed");
    assert_eq!(
        fs::metadata(&base_path).unwrap().modified().unwrap(),
        base_mtime
    );
}

/// A base of `len` random bytes (from `seed`) in `dir`, and a fresh overlay
/// over it; returns the overlay's path.
fn fresh_overlay(dir: &Path, seed: u64, len: usize) -> std::path::PathBuf {
    let base = dir.join("base.img");
    fs::write(&base, pseudo_random_bytes(seed, len)).unwrap();
    let cow = dir.join("cow.img");
    create_overlay(&cow, &base, false).unwrap();
    cow
}

/// The device on `cow` with a recorder beneath it.
fn open_recorded(cow: &Path, cache: Cache) -> (Device, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::new());
    let dev = Device::open(
        cow,
        &DeviceOptions {
            cache,
            recorder: Some(recorder.clone()),
            ..DeviceOptions::default()
        },
    )
    .unwrap();
    (dev, recorder)
}

/// A FLUSH costs one sync where its writes set no new bit (a rewrite, or a
/// write into a MiB the overlay holds a copy of), and two where they do;
/// with direct I/O and through the page cache.
#[test]
fn a_flush_needs_a_bitmap_write_only_for_new_bits() {
    for cache in [Cache::None, Cache::Writeback] {
        let dir = tempfile::tempdir().unwrap();
        let cow = fresh_overlay(dir.path(), 5, BASE_LEN);
        let (dev, recorder) = open_recorded(&cow, cache);
        // Syncs issued by one write and the FLUSH after it.
        let syncs = |offset: u64| {
            let before = recorder.events().len();
            dev.write_at(offset, &[0x5c; 4096], Flags::default())
                .unwrap();
            dev.flush().unwrap();
            recorder.events()[before..]
                .iter()
                .filter(|e| matches!(e, Event::Sync { .. }))
                .count()
        };
        const MIB: u64 = 1 << 20;
        let what = |w: &str| format!("{w}, {cache:?}");
        // No FLUSH came yet: the write sets its own bits only.
        assert_eq!(syncs(MIB), 2, "{}", what("a first write"));
        assert_eq!(syncs(MIB), 1, "{}", what("a rewrite"));
        assert_eq!(syncs(MIB + 8192), 2, "{}", what("a first write next to it"));
        // Now the first write into MiB 2 copies it: its bits are all set.
        assert_eq!(
            syncs(2 * MIB + 4096),
            2,
            "{}",
            what("the write that copies its MiB")
        );
        assert_eq!(
            syncs(2 * MIB + 65536),
            1,
            "{}",
            what("a first write into the copy")
        );
        assert_eq!(syncs(3 * MIB - 4096), 1, "{}", what("another one"));
        dev.close().unwrap();
    }
}

/// The MiB copy (a small first write after a FLUSH reads its MiB from the
/// backing, writes it over the overlay, and sets the whole MiB's bits once
/// that write completes) with flush rounds running all the while: no round
/// may write a copied MiB's bits before the copy is synced. Two writers make
/// a copy of each MiB of a 32 MiB disk while a third thread flushes without
/// pause; the whole log is checked, bit by bit, with direct I/O and through
/// the page cache.
#[test]
fn flush_rounds_beside_mib_copies_claim_no_bit_early() {
    const MIB: usize = 1 << 20;
    const MIBS: usize = 32;
    for cache in [Cache::None, Cache::Writeback] {
        let dir = tempfile::tempdir().unwrap();
        let cow = fresh_overlay(dir.path(), 11, MIBS * MIB);
        let initial = fs::read(&cow).unwrap();
        let (dev, recorder) = open_recorded(&cow, cache);
        // Copies start once the session has seen a FLUSH.
        dev.flush().unwrap();
        let writing = AtomicUsize::new(2);
        // A writer that stops, even by a panic, lets the flusher stop.
        struct Done<'a>(&'a AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let rounds = std::thread::scope(|s| {
            for t in 0..2 {
                let (dev, writing) = (&dev, &writing);
                s.spawn(move || {
                    let _done = Done(writing);
                    for m in (t..MIBS).step_by(2) {
                        let at = (m * MIB + 8192) as u64;
                        dev.write_at(at, &[m as u8; 4096], Flags::default())
                            .expect("write");
                    }
                });
            }
            let mut rounds = 0u64;
            while writing.load(Ordering::SeqCst) > 0 {
                dev.flush().expect("flush");
                rounds += 1;
            }
            rounds
        });
        dev.flush().unwrap();
        dev.close().unwrap();
        let events = recorder.events();
        // Every MiB was copied: one whole-MiB write of the backing's data.
        let copies = events
            .iter()
            .filter(|e| {
                matches!(e, Event::Write { data, .. }
                    if data.len() == MIB && data.iter().any(|&b| b != 0))
            })
            .count();
        assert_eq!(copies, MIBS, "{cache:?}: MiB copies made");
        let checked = bitmap_follows_data(&events, &initial)
            .unwrap_or_else(|why| panic!("{cache:?}, {rounds} FLUSHes beside the copies: {why}"));
        // Each copy's MiB ends up claimed, and the check saw it happen.
        assert_eq!(checked, MIBS * MIB / SECTOR, "{cache:?}: bits set");
        println!("{cache:?}: {MIBS} copies, {rounds} FLUSHes beside them, {checked} bits checked");
    }
}

/// The invariant-7 check itself, on logs made up by hand: it passes a bit
/// set after its data was written and synced, and fails each way of setting
/// it early, so a loosened check cannot pass the runs above unnoticed.
#[test]
fn the_bitmap_check_fails_each_early_bit_in_a_made_up_log() {
    let dir = tempfile::tempdir().unwrap();
    let cow = fresh_overlay(dir.path(), 6, BASE_LEN);
    let initial = fs::read(&cow).unwrap();
    let header = Header::parse(&initial).unwrap();
    let g = Geometry::new(&header).unwrap();
    let (data, bitmap) = (g.data_offset, g.bitmap_offset);
    let write = |op, offset, bytes: Vec<u8>| Event::Write {
        op,
        role: Role::Main,
        offset,
        data: bytes,
    };
    let sync = |op| Event::Sync {
        op,
        role: Role::Main,
    };
    let done = |op| Event::Done { op };
    // Sector 3's data (at the start of its own sector, not a MiB boundary)
    // and the bitmap byte that sets its bit.
    let sector3 = || write(1, data + 3 * SECTOR as u64, vec![0xa5; SECTOR]);
    let bit3 = |op| write(op, bitmap, vec![1 << 3]);

    let good = [sector3(), done(1), sync(2), done(2), bit3(3), done(3)];
    assert_eq!(bitmap_follows_data(&good, &initial), Ok(1));
    let zeroed = [
        Event::Zero {
            op: 1,
            role: Role::Main,
            offset: data + 3 * SECTOR as u64,
            len: SECTOR as u64,
        },
        done(1),
        sync(2),
        done(2),
        bit3(3),
    ];
    assert_eq!(bitmap_follows_data(&zeroed, &initial), Ok(1));
    // A bitmap byte rewritten with bits already set checks nothing new.
    let again = [sector3(), done(1), sync(2), done(2), bit3(3), bit3(4)];
    assert_eq!(bitmap_follows_data(&again, &initial), Ok(1));

    let early: [(&str, Vec<Event>); 8] = [
        ("no data at all", vec![bit3(3)]),
        (
            "only the sector before it written",
            vec![
                write(1, data + 2 * SECTOR as u64, vec![0xa5; SECTOR]),
                done(1),
                sync(2),
                done(2),
                bit3(3),
            ],
        ),
        (
            "only the sector after it written",
            vec![
                write(1, data + 4 * SECTOR as u64, vec![0xa5; SECTOR]),
                done(1),
                sync(2),
                done(2),
                bit3(3),
            ],
        ),
        (
            "data not yet done",
            vec![sector3(), sync(2), done(2), bit3(3)],
        ),
        (
            "the sync submitted before the data was done",
            vec![sector3(), sync(2), done(1), done(2), bit3(3)],
        ),
        (
            "the sync not yet done",
            vec![sector3(), done(1), sync(2), bit3(3), done(2)],
        ),
        (
            "a partial write of the sector",
            vec![
                write(1, data + 3 * SECTOR as u64 + 1, vec![0xa5; SECTOR - 1]),
                done(1),
                sync(2),
                done(2),
                bit3(3),
            ],
        ),
        (
            "only the zero fill of its MiB",
            vec![
                write(1, data, vec![0; 1 << 20]),
                done(1),
                sync(2),
                done(2),
                bit3(3),
            ],
        ),
    ];
    for (case, log) in early {
        let got = bitmap_follows_data(&log, &initial);
        assert!(
            got.as_ref()
                .is_err_and(|why| why.contains("sets the bit of sector 3")),
            "{case}: the check gave {got:?}"
        );
    }
}
