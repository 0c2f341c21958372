//! Wake-ups that race the worker going to sleep. The worker checks for work,
//! announces that it is about to sleep, checks once more and sleeps; a
//! `stop_connections` or `close` whose wake-up came before the announcement
//! wrote none, so only the second check finds it. Each test lands its stop or
//! close there: the worker flushes its sinks' batches between the two
//! checks, and the test's sink takes its time over that. A lost wake-up
//! leaves the worker asleep for good, which the watchdog reports.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::device::{Scripted, raw_device};
use nix::errno::Errno;
use ubd::device::{Command, ConnEnd, Device, Flags, Reply, Request, Sink, Step};

/// How long a stop or close may take before the worker counts as asleep for
/// good (a hang, not a speed limit: each takes well under a second).
const WATCHDOG: Duration = Duration::from_secs(30);

mod common;

/// Rounds of each test: the test's close or stop lands in the worker's
/// window when its thread starts within the sink's 5 ms, nearly always.
const ROUNDS: u64 = 20;

/// Runs `f` on a thread and returns its result, or fails the test when it
/// does not return within the watchdog.
fn within_watchdog<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WATCHDOG)
        .unwrap_or_else(|_| panic!("{what}: no end after {WATCHDOG:?}: a wake-up was lost"))
}

/// A sink whose first `flush` (which the worker calls just before it
/// announces its sleep) tells the test and then takes a while, so that a
/// close the test starts then lands where only the worker's second look at
/// its flags can find it.
struct SlowFlush {
    tell: Mutex<Option<mpsc::Sender<()>>>,
    ended: Mutex<Option<Result<(), Errno>>>,
}

impl Sink for SlowFlush {
    fn complete(&self, _token: u64, result: Result<Reply, Errno>) {
        *self.ended.lock().unwrap() = Some(result.map(drop));
    }

    fn flush(&self) {
        let Some(tell) = self.tell.lock().unwrap().take() else {
            return;
        };
        let _ = tell.send(());
        let until = Instant::now() + Duration::from_millis(5);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}

/// Reads a block through `dev` with a [`SlowFlush`] sink, and runs `then`
/// while the sink holds the worker between its two checks; returns how the
/// read ended once `then` has returned.
fn while_the_worker_settles<T>(
    dev: &Device,
    round: u64,
    then: impl FnOnce() -> T,
) -> (T, Arc<SlowFlush>) {
    let (tx, rx) = mpsc::channel();
    let sink = Arc::new(SlowFlush {
        tell: Mutex::new(Some(tx)),
        ended: Mutex::new(None),
    });
    let offset = (round % 256) * 4096;
    dev.submit(
        Request {
            command: Command::Read,
            offset,
            len: 4096,
            flags: Flags::default(),
            data: Some(dev.alloc(offset, 4096).unwrap()),
            token: round,
        },
        sink.clone(),
    );
    // The read is answered and the worker is about to sleep.
    rx.recv().unwrap();
    (then(), sink)
}

fn read_ended_well(sink: &SlowFlush, round: u64) {
    let ended = *sink.ended.lock().unwrap();
    assert_eq!(ended, Some(Ok(())), "round {round}: the read");
}

#[test]
fn a_stop_that_races_the_worker_to_sleep_is_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let dev = raw_device(&dir);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let done = dev.serve(
            OwnedFd::from(ours),
            Vec::new(),
            Box::new(Scripted(|| Step::NeedInput)),
        );
        let ((), sink) = while_the_worker_settles(&dev, round, || dev.stop_connections());
        let end = within_watchdog(
            &format!("round {round}: the stopped connection"),
            move || done.wait(),
        );
        assert_eq!(end, ConnEnd::Stopped, "round {round}");
        read_ended_well(&sink, round);
        drop(theirs);
        within_watchdog(&format!("round {round}: close"), move || dev.close()).unwrap();
    }
}

#[test]
fn a_close_that_races_the_worker_to_sleep_is_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let dev = raw_device(&dir);
        let dev = Arc::new(dev);
        let closing = dev.clone();
        let (closed, sink) = while_the_worker_settles(&dev, round, move || {
            within_watchdog(&format!("round {round}: close"), move || closing.close())
        });
        closed.unwrap();
        read_ended_well(&sink, round);
    }
}
