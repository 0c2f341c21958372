//! Invariant 5 across the two ways requests enter a device: a request handed
//! to `Device::submit` (ticket t) and a request a served connection reads
//! (ticket t + 1) reach the host in ticket order. And invariant 1 for served
//! connections: the owner hears a connection's end only once the device has
//! let go of its protocol, whether the connection closed or the worker failed.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use common::device::{Scripted, raw_device};
use nix::errno::Errno;
use ubd::device::{
    Command, ConnCx, ConnEnd, Device, DeviceOptions, Event, Flags, Protocol, Recorder, Reply,
    Request, Role, SendBuf, Step, Waiter,
};

mod common;

const A: u64 = 64 << 10;
const B: u64 = 512 << 10;

/// A protocol that, when first asked for input, has another thread hand the
/// device a WRITE at `A` (the earlier ticket), then submits its own WRITE at
/// `B` (the later ticket), then closes.
struct Probe {
    dev: Arc<Device>,
    step: u32,
    other: Arc<Waiter>,
    ended: Arc<Mutex<Vec<Result<(), Errno>>>>,
}

impl Protocol for Probe {
    fn input(&mut self, _input: &[u8], cx: &mut ConnCx<'_>) -> Step {
        self.step += 1;
        match self.step {
            1 => {
                // Another thread submits now: its ticket comes first.
                let (dev, sink) = (self.dev.clone(), self.other.clone());
                std::thread::spawn(move || {
                    let mut data = dev.alloc(A, 4096).unwrap();
                    data.copy_from_at(0, &[0xAA; 4096]);
                    dev.submit_quiet(
                        Request {
                            command: Command::Write,
                            offset: A,
                            len: 4096,
                            flags: Flags::default(),
                            data: Some(data),
                            token: 1,
                        },
                        sink,
                    );
                })
                .join()
                .unwrap();
                let mut data = cx.alloc(B, 4096).unwrap();
                data.copy_from_at(0, &[0xBB; 4096]);
                Step::Submit {
                    consumed: 0,
                    req: Request {
                        command: Command::Write,
                        offset: B,
                        len: 4096,
                        flags: Flags::default(),
                        data: Some(data),
                        token: 2,
                    },
                    payload: 0,
                }
            }
            _ => Step::Close {
                consumed: 0,
                why: None,
            },
        }
    }

    fn complete(
        &mut self,
        _token: u64,
        result: Result<Reply, Errno>,
        _out: &mut SendBuf,
    ) -> Option<String> {
        self.ended.lock().unwrap().push(result.map(drop));
        None
    }

    fn input_ended(&mut self, _out: &mut SendBuf) {}
    fn skipped(&mut self, _out: &mut SendBuf) {}
    fn stop(&mut self) {}
    fn drained(&self) -> bool {
        true
    }
}

#[test]
fn a_submitted_request_and_a_connections_later_one_reach_the_host_in_ticket_order() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let recorder = Arc::new(Recorder::new());
    let dev = Arc::new(
        Device::open(
            &raw,
            &DeviceOptions {
                recorder: Some(recorder.clone()),
                ..DeviceOptions::default()
            },
        )
        .unwrap(),
    );
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let other = Arc::new(Waiter::default());
    let ended = Arc::new(Mutex::new(Vec::new()));
    let done = dev.serve(
        OwnedFd::from(ours),
        Vec::new(),
        Box::new(Probe {
            dev: dev.clone(),
            step: 0,
            other: other.clone(),
            ended: ended.clone(),
        }),
    );
    done.wait();
    // The connection's request has ended; the other one ends too.
    dev.kick();
    assert!(other.wait().is_ok());
    assert_eq!(*ended.lock().unwrap(), vec![Ok(())]);
    let writes: Vec<u64> = recorder
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Write {
                role: Role::Main,
                offset,
                ..
            } => Some(*offset),
            _ => None,
        })
        .collect();
    assert_eq!(
        writes,
        vec![A, B],
        "the write with the later ticket reached the host first"
    );
    let dev = Arc::try_unwrap(dev).unwrap();
    dev.close().unwrap();
}

/// Holds `Arc<()>` like a protocol holding the owner's things, and takes a
/// while to let go of it when dropped.
struct SlowRelease(Option<Arc<()>>);

impl Drop for SlowRelease {
    fn drop(&mut self) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        self.0.take();
    }
}

/// A protocol holding `held` that closes at once, or, when `waits`, waits
/// for input that never comes.
fn slow_to_drop(held: &Arc<()>, waits: bool) -> Box<dyn Protocol> {
    let guard = SlowRelease(Some(held.clone()));
    Box::new(Scripted(move || {
        let _holds = &guard;
        if waits {
            Step::NeedInput
        } else {
            Step::Close {
                consumed: 0,
                why: None,
            }
        }
    }))
}

/// When `serve`'s owner hears that a connection ended, the device has let
/// go of the connection's protocol (and whatever the protocol holds, such as
/// the owner's `Arc<Device>`): invariant 1. It used to be dropped just after
/// the end was told, so the owner's `Arc::try_unwrap` of the device could
/// fail now and then (the test above, 1 run in some 60).
#[test]
fn a_connections_protocol_is_gone_when_its_end_is_heard() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(&dir);
    let held = Arc::new(());
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let done = dev.serve(OwnedFd::from(ours), Vec::new(), slow_to_drop(&held, false));
    done.wait();
    assert_eq!(
        Arc::strong_count(&held),
        1,
        "the connection's end was told while the device still held its protocol"
    );
    dev.close().unwrap();
    assert_eq!(
        dev.failure(),
        None,
        "a device closed in order counts as failed"
    );
}

/// The same when the worker fails: every connection's protocol is gone
/// before its owner hears that the connection broke (invariant 1). Here the
/// worker fails by a panic in another connection's protocol; the failing
/// worker used to tell the owners first and drop the protocols after.
#[test]
fn a_failing_worker_lets_go_of_each_protocol_before_its_end_is_heard() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(&dir);
    let (told, heard) = std::sync::mpsc::channel();
    dev.on_failure(Box::new(move || told.send(()).unwrap()));
    let held = Arc::new(());
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let waiting = dev.serve(OwnedFd::from(ours), Vec::new(), slow_to_drop(&held, true));
    let (ours, _theirs2) = UnixStream::pair().unwrap();
    let failing = dev.serve(
        OwnedFd::from(ours),
        Vec::new(),
        Box::new(Scripted(|| -> Step {
            panic!("a protocol failed on the worker's thread (as this test means it to)")
        })),
    );
    let end = waiting.wait();
    assert!(matches!(end, ConnEnd::Broken(_)), "{end:?}");
    assert_eq!(
        Arc::strong_count(&held),
        1,
        "a connection's end was told while the failing device still held its protocol"
    );
    assert!(matches!(failing.wait(), ConnEnd::Broken(_)));
    // A panic counts as a failure: those who asked hear of it.
    heard
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the failure hook did not run");
    assert_eq!(dev.failure().as_deref(), Some("its worker thread panicked"));
    assert!(
        dev.close().is_err(),
        "the worker's failure was not reported"
    );
}
