//! The device's read/write path makes no heap allocation per request once it
//! is warm: buffers come from the pool, request state from fixed tables.

mod common;

use std::collections::VecDeque;
use std::fs;
use std::sync::{Arc, Condvar, Mutex};

use nix::errno::Errno;
use ubd::device::{Command, Device, DeviceOptions, Flags, Reply, Request, Sink};
use ubd::engine::alloc_count::CountingAlloc;
use ubd::image::create_overlay;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// Completion tokens, in a queue whose capacity is reserved up front.
struct Done {
    queue: Mutex<VecDeque<(u64, bool)>>,
    ready: Condvar,
}

impl Sink for Done {
    fn complete(&self, token: u64, result: Result<Reply, Errno>) {
        let ok = result.is_ok();
        drop(result);
        let mut q = self.queue.lock().unwrap();
        q.push_back((token, ok));
        self.ready.notify_one();
    }
}

/// Runs `n` requests, `depth` in flight: 4 KiB reads and writes at
/// pseudo-random offsets (some unaligned), and a FLUSH every 64.
fn drive(dev: &Device, done: &Arc<Done>, n: u64, depth: u64, seed: &mut u64) {
    let sink: Arc<dyn Sink> = done.clone();
    let blocks = dev.capacity() / 4096 - 1;
    let mut issue = |i: u64| {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        if i % 64 == 63 {
            dev.submit(
                Request {
                    command: Command::Flush,
                    offset: 0,
                    len: 0,
                    flags: Flags::default(),
                    data: None,
                    token: i,
                },
                sink.clone(),
            );
            return;
        }
        let offset = (*seed % blocks) * 4096 + if i % 5 == 0 { 100 } else { 0 };
        let data = dev.alloc(offset, 4096).unwrap();
        let command = if *seed % 2 == 0 {
            Command::Read
        } else {
            Command::Write
        };
        dev.submit(
            Request {
                command,
                offset,
                len: 4096,
                flags: Flags {
                    fua: i % 97 == 0,
                    ..Flags::default()
                },
                data: Some(data),
                token: i,
            },
            sink.clone(),
        );
    };
    let (mut issued, mut finished) = (0u64, 0u64);
    while issued < depth.min(n) {
        issue(issued);
        issued += 1;
    }
    while finished < n {
        let (token, ok) = {
            let mut q = done.queue.lock().unwrap();
            loop {
                if let Some(item) = q.pop_front() {
                    break item;
                }
                q = done.ready.wait(q).unwrap();
            }
        };
        assert!(ok, "request {token} failed");
        finished += 1;
        if issued < n {
            issue(issued);
            issued += 1;
        }
    }
}

#[test]
fn steady_state_requests_do_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    fs::write(&base, common::pseudo_random_bytes(1, 16 << 20)).unwrap();
    let cow = dir.path().join("cow.img");
    create_overlay(&cow, &base, false).unwrap();
    let dev = Device::open(&cow, &DeviceOptions::default()).unwrap();
    let done = Arc::new(Done {
        queue: Mutex::new(VecDeque::with_capacity(1024)),
        ready: Condvar::new(),
    });
    // The counter sees allocations on any thread.
    ALLOC.start();
    std::thread::spawn(|| drop(std::hint::black_box(vec![1u8; 10])))
        .join()
        .unwrap();
    assert!(ALLOC.stop() >= 1, "the counting allocator counts");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    // Warm up: tables and queues reach their working sizes.
    drive(&dev, &done, 4000, 32, &mut seed);
    ALLOC.start();
    drive(&dev, &done, 10_000, 32, &mut seed);
    let allocations = ALLOC.stop();
    dev.close().unwrap();
    assert_eq!(allocations, 0, "heap allocations during 10,000 requests");
}
