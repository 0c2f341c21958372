//! `ubd bench`: drive the device in process (no NBD) and measure it, in the
//! spirit of `qemu-img bench`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use nix::errno::Errno;
use serde::Serialize;
use ubd::device::{Command, Device, DeviceOptions, Flags, Reply, Request, Sink};

use super::units::{format_size, parse_size};
use super::{BackingDir, CacheArg, Outcome, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

/// Measure the device: IOPS, throughput and latency, in process.
///
/// Drives the same device `ubd serve` uses, without NBD, with one submitting
/// thread keeping QUEUE_DEPTH requests in flight, and prints IOPS, MB/s and
/// completion latency percentiles.
///
/// WRITE PATTERNS CHANGE THE IMAGE: run them on a scratch overlay (e.g. one
/// made with `ubd create --backing BASE scratch.cow`), never on one you keep.
///
/// Examples:
///   ubd bench --pattern randread --block-size 4K --queue-depth 32 --time 10 vm.cow
///   ubd bench --pattern write --block-size 1M --queue-depth 8 --count 1000 scratch.cow
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Access pattern.
    #[arg(short, long, value_enum, default_value = "randread")]
    pattern: Pattern,
    /// Bytes per request (e.g. 4K, 1M).
    #[arg(short = 'b', long, value_parser = parse_size, default_value = "4K")]
    block_size: u64,
    /// Requests kept in flight.
    #[arg(short, long, default_value_t = 32)]
    queue_depth: usize,
    /// Seconds to run (unless --count is given).
    #[arg(short, long, value_parser = parse_seconds, default_value_t = 10.0)]
    time: f64,
    /// Stop after this many requests instead of after --time.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Send a FLUSH after every N writes (0: never).
    #[arg(long, default_value_t = 0)]
    flush_interval: u64,
    /// Percentage of reads in randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmix_read: u8,
    /// Host page cache use.
    #[arg(long, value_enum, default_value_t)]
    cache: CacheArg,
    /// Buffer pool size (preallocated): at least 128K, rounded down to a
    /// multiple of 128K.
    #[arg(long, value_parser = super::parse_pool_size, default_value = "64M")]
    pool_size: u64,
    /// Fault injection: every buffer allocation takes the pool's reserve path.
    #[arg(long)]
    fail_alloc: bool,
    /// Use this backing file instead of the one the overlay names.
    #[arg(long, value_name = "PATH")]
    backing: Option<PathBuf>,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay or raw image to drive.
    file: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    filename: String,
    pattern: Pattern,
    block_size: u64,
    queue_depth: usize,
    cache: &'static str,
    requests: u64,
    flushes: u64,
    errors: u64,
    seconds: f64,
    iops: f64,
    mb_per_s: f64,
    lat_us_p50: f64,
    lat_us_p90: f64,
    lat_us_p99: f64,
    lat_us_p999: f64,
    lat_us_max: f64,
    /// Peak resident memory of this process, bytes (VmHWM).
    peak_rss: u64,
    pool_reserve_allocs: u64,
}

/// xorshift64*: offsets that differ between runs only with the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// What the next request is: its offset and whether it writes.
#[derive(Debug, Clone, Copy)]
struct Next {
    slot: usize,
    offset: u64,
    write: bool,
}

/// The load generator's state, shared by the submitting thread and the
/// completion callback.
struct State {
    rng: Rng,
    seq_next: u64,
    issued: Vec<Instant>,
    latencies: Vec<u32>,
    submitted: u64,
    completed: u64,
    errors: u64,
    flushes: u64,
    in_flight: u64,
    writes_since_flush: u64,
    /// Requests the callback could not issue without waiting: the submitting
    /// thread issues them.
    handoff: VecDeque<Next>,
    /// FLUSHes due: the submitting thread sends them.
    flushes_due: u64,
}

/// A closed loop, as fio's io_uring engine runs one: each completion issues
/// the next request at once, from the completion callback, when that needs no
/// waiting (`try_alloc`, `try_submit`); otherwise the submitting thread does.
struct Load {
    dev: Arc<Device>,
    pattern: Pattern,
    bs: u64,
    blocks: u64,
    rwmix_read: u8,
    flush_interval: u64,
    count: Option<u64>,
    deadline: Instant,
    state: Mutex<State>,
    wake: Condvar,
    me: std::sync::Weak<Load>,
}

const FLUSH_TOKEN: u64 = u64::MAX;

impl Load {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Picks the next request for `slot`, if the run goes on; counts it.
    fn plan(&self, st: &mut State, slot: usize, now: Instant) -> Option<Next> {
        let more = match self.count {
            Some(n) => st.submitted < n,
            None => now < self.deadline,
        };
        if !more {
            return None;
        }
        let offset = match self.pattern {
            Pattern::Read | Pattern::Write => {
                let o = (st.seq_next % self.blocks) * self.bs;
                st.seq_next += 1;
                o
            }
            _ => (st.rng.next() % self.blocks) * self.bs,
        };
        let write = match self.pattern {
            Pattern::Write | Pattern::Randwrite => true,
            Pattern::Randrw => st.rng.next() % 100 >= u64::from(self.rwmix_read),
            _ => false,
        };
        st.submitted += 1;
        st.in_flight += 1;
        st.issued[slot] = Instant::now();
        if write {
            st.writes_since_flush += 1;
            if self.flush_interval > 0 && st.writes_since_flush >= self.flush_interval {
                st.writes_since_flush = 0;
                st.flushes_due += 1;
            }
        }
        Some(Next {
            slot,
            offset,
            write,
        })
    }

    fn request(&self, n: Next, data: ubd::engine::bufpool::Chunks) -> Request {
        Request {
            command: if n.write {
                Command::Write
            } else {
                Command::Read
            },
            offset: n.offset,
            len: self.bs,
            flags: Flags::default(),
            data: Some(data),
            token: n.slot as u64,
        }
    }

    fn sink(&self) -> Option<Arc<dyn Sink>> {
        self.me.upgrade().map(|l| l as Arc<dyn Sink>)
    }

    /// Issues `n` from the completion callback if that needs no waiting.
    fn try_issue(&self, n: Next) -> bool {
        let (Some(data), Some(sink)) = (self.dev.try_alloc(n.offset, self.bs), self.sink()) else {
            return false;
        };
        self.dev.try_submit(self.request(n, data), sink).is_ok()
    }

    /// Issues `n` from the submitting thread, waiting for memory if needed.
    fn issue(&self, n: Next) {
        let Some(sink) = self.sink() else { return };
        match self.dev.alloc(n.offset, self.bs) {
            Ok(data) => self.dev.submit(self.request(n, data), sink),
            Err(e) => sink.complete(n.slot as u64, Err(e)),
        }
    }

    fn flush(&self) {
        let Some(sink) = self.sink() else { return };
        self.lock().in_flight += 1;
        self.dev.submit(
            Request {
                command: Command::Flush,
                offset: 0,
                len: 0,
                flags: Flags::default(),
                data: None,
                token: FLUSH_TOKEN,
            },
            sink,
        );
    }
}

impl Sink for Load {
    fn complete(&self, token: u64, result: Result<Reply, Errno>) {
        let now = Instant::now();
        // A READ's buffers go back to the pool first.
        let ok = result.is_ok();
        drop(result);
        let next = {
            let mut st = self.lock();
            st.in_flight -= 1;
            st.errors += u64::from(!ok);
            if token == FLUSH_TOKEN {
                st.flushes += 1;
                None
            } else {
                let slot = token as usize;
                st.completed += 1;
                let ns = now.duration_since(st.issued[slot]).as_nanos();
                st.latencies.push(u32::try_from(ns).unwrap_or(u32::MAX));
                self.plan(&mut st, slot, now)
            }
        };
        let handed = match next {
            Some(n) if !self.try_issue(n) => {
                self.lock().handoff.push_back(n);
                true
            }
            _ => false,
        };
        let st = self.lock();
        if handed || st.flushes_due > 0 || st.in_flight == 0 {
            self.wake.notify_one();
        }
    }
}

/// `--time`: seconds, from 0 to a billion (about 32 years).
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(t) if (0.0..=1e9).contains(&t) => Ok(t),
        _ => Err(format!("{text:?} is not a number of seconds from 0 to 1e9")),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn run(args: Args) -> Outcome {
    if args.queue_depth == 0 || args.block_size == 0 {
        return Err("--queue-depth and --block-size must be at least 1".into());
    }
    let writes = !matches!(args.pattern, Pattern::Read | Pattern::Randread);
    let opts = DeviceOptions {
        read_only: !writes,
        backing: args.backing.clone(),
        backing_dir: args.backing_dir.dir.clone(),
        cache: args.cache.mode(),
        pool_size: args.pool_size as usize,
        max_requests: args.queue_depth.max(4) + 1,
        queue_depth: (args.queue_depth as u32 * 4).clamp(64, 4096),
        ..DeviceOptions::default()
    };
    let dev = Arc::new(
        Device::open(&args.file, &opts).map_err(|e| super::pool_size_error(e, opts.pool_size))?,
    );
    dev.pool().set_fail_ordinary(args.fail_alloc);
    let bs = args.block_size;
    if bs > dev.capacity() {
        return Err(format!(
            "{}: --block-size {} is larger than the device ({})",
            args.file.display(),
            format_size(bs),
            format_size(dev.capacity())
        )
        .into());
    }
    if bs > dev.max_io() {
        return Err(format!(
            "{}: --block-size {} is larger than the largest request ({}); raise --pool-size",
            args.file.display(),
            format_size(bs),
            format_size(dev.max_io())
        )
        .into());
    }
    let start = Instant::now();
    let load = Arc::new_cyclic(|me| Load {
        dev: dev.clone(),
        pattern: args.pattern,
        bs,
        blocks: dev.capacity() / bs,
        rwmix_read: args.rwmix_read,
        flush_interval: args.flush_interval,
        count: args.count,
        deadline: start + Duration::from_secs_f64(args.time),
        state: Mutex::new(State {
            rng: Rng(args.seed.max(1)),
            seq_next: 0,
            issued: vec![start; args.queue_depth],
            latencies: Vec::with_capacity(1 << 20),
            submitted: 0,
            completed: 0,
            errors: 0,
            flushes: 0,
            in_flight: 0,
            writes_since_flush: 0,
            handoff: VecDeque::with_capacity(args.queue_depth),
            flushes_due: 0,
        }),
        wake: Condvar::new(),
        me: me.clone(),
    });
    for slot in 0..args.queue_depth {
        let next = load.plan(&mut load.lock(), slot, Instant::now());
        match next {
            Some(n) => load.issue(n),
            None => break,
        }
    }
    loop {
        let (work, flush) = {
            let mut st = load.lock();
            while st.handoff.is_empty() && st.flushes_due == 0 && st.in_flight > 0 {
                st = load.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.in_flight == 0 && st.handoff.is_empty() && st.flushes_due == 0 {
                break;
            }
            let flushes = std::mem::take(&mut st.flushes_due);
            (st.handoff.pop_front(), flushes)
        };
        for _ in 0..flush {
            load.flush();
        }
        if let Some(n) = work {
            load.issue(n);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let reserve_allocs = dev.pool().stats().reserve_allocs;
    dev.close()?;
    let mut st = load.lock();
    st.latencies.sort_unstable();
    let (completed, errors) = (st.completed, st.errors);
    let report = Report {
        filename: args.file.to_string_lossy().into_owned(),
        pattern: args.pattern,
        block_size: bs,
        queue_depth: args.queue_depth,
        cache: args.cache.name(),
        requests: completed,
        flushes: st.flushes,
        errors,
        seconds,
        iops: completed as f64 / seconds,
        mb_per_s: (completed * bs) as f64 / seconds / 1e6,
        lat_us_p50: percentile(&st.latencies, 0.50),
        lat_us_p90: percentile(&st.latencies, 0.90),
        lat_us_p99: percentile(&st.latencies, 0.99),
        lat_us_p999: percentile(&st.latencies, 0.999),
        lat_us_max: st.latencies.last().map_or(0.0, |&v| f64::from(v) / 1000.0),
        peak_rss: peak_rss(),
        pool_reserve_allocs: reserve_allocs,
    };
    drop(st);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => {
            println!(
                "{:?} {} qd{} cache={} on {}: {} requests in {:.2} s ({} errors, {} flushes)",
                report.pattern,
                format_size(bs),
                report.queue_depth,
                report.cache,
                report.filename,
                report.requests,
                report.seconds,
                report.errors,
                report.flushes
            );
            println!(
                "  {:.0} IOPS, {:.1} MB/s; latency us: p50 {:.1}, p90 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
                report.iops,
                report.mb_per_s,
                report.lat_us_p50,
                report.lat_us_p90,
                report.lat_us_p99,
                report.lat_us_p999,
                report.lat_us_max
            );
            println!(
                "  peak resident memory {}; pool reserve allocations {}",
                format_size(report.peak_rss),
                report.pool_reserve_allocs
            );
        }
    }
    Ok(if errors > 0 { 1 } else { 0 })
}
