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

/// The counter sees every thread: the tests take turns.
static SERIAL: Mutex<()> = Mutex::new(());

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
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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

/// The same through NBD: a connection served on the device's worker, driven
/// by fio from another process, allocates nothing per request once warm.
#[test]
fn steady_state_nbd_requests_do_not_allocate() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use ubd::nbd::export::{Export, Exports};
    use ubd::nbd::server::{self, Listener};

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    fs::write(&base, common::pseudo_random_bytes(2, 64 << 20)).unwrap();
    let cow = dir.path().join("cow.img");
    create_overlay(&cow, &base, false).unwrap();
    let device = Arc::new(Device::open(&cow, &DeviceOptions::default()).unwrap());
    let socket = dir.path().join("nbd.sock");
    let listener = Listener::unix(&socket).unwrap();
    let exports = Exports::new(vec![Arc::new(Export {
        name: String::new(),
        description: String::new(),
        device,
    })]);
    let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            server::run(
                &exports,
                &[listener],
                &stop,
                4,
                server::HANDSHAKE_LIMIT,
                None,
            )
            .unwrap()
        })
    };
    // Reads, writes (some not sector-aligned) and flushes for 8 s; the
    // middle 4 s are counted.
    let fio = std::process::Command::new(common::tool("fio", "fio"))
        .args([
            "--name=steady",
            "--ioengine=nbd",
            "--rw=randrw",
            "--bs=4k,1536",
            "--iodepth=16",
            "--fsync=50",
            "--time_based",
            "--runtime=8",
            "--size=48m",
        ])
        .arg(format!("--uri=nbd+unix:///?socket={}", socket.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fio");
    std::thread::sleep(std::time::Duration::from_secs(2));
    ALLOC.start();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let allocations = ALLOC.stop();
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stop.write(1).unwrap();
    server.join().unwrap();
    assert_eq!(allocations, 0, "heap allocations in 4 s of NBD requests");
}
