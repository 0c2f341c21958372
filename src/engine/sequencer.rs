//! The per-device ticket sequencer: a fair FIFO ticket lock.
//!
//! **Owns** the device's two request counters and the queue of threads waiting
//! for their turn. **Keeps** invariant 5 of docs/design.md: *submissions reach the
//! host in ticket order*. A request takes a [`Ticket`] when it enters the device;
//! the holder of ticket `t` runs its submission section (it may wait inside it and
//! keep its place: nobody behind it overtakes), hands its first op to the engine,
//! and drops the ticket so that `t + 1` may go.
//!
//! **Seed design.** UML ubd kept two atomics, `started` and `submitted`, plus a
//! wait queue. Here `next` *is* `started` (tickets handed out) and `serving` *is*
//! `submitted` (tickets released; `serving == t` means `t` is at the head of the
//! line), and the wait queue is the kernel's futex queue on `serving`: ticket `t`
//! sleeps with `FUTEX_WAIT_BITSET` bit `1 << (t % 32)`, and releasing `t - 1` wakes
//! exactly that bit. Both counters wrap at 2^32; since 32 divides 2^32 a ticket's
//! bit is the same on both sides of the wrap. [`Sequencer::try_enter`] is the
//! non-sleeping variant for callers that must not block.
//!
//! **Memory rule.** The device takes a request's pool buffers *before* its
//! ticket (io-uring-notes rule (a)): a request that waits for memory waits in
//! the pool's own FIFO line, where it keeps its place and the head may use the
//! reserve, so nothing behind it overtakes it there; its submission section
//! then only hands the request to the worker and never waits for memory. The
//! reason: memory is returned by the in-flight I/O of requests already handed
//! over, never by later tickets, so a ticket holder that waited for memory
//! while others held buffers and waited in [`Sequencer::enter`] could
//! deadlock. Never take a ticket on the completion path.
//!
//! A ticket, once taken, is always served: [`Ticket`]'s `Drop` releases it on the
//! normal path, on an error path and while unwinding from a panic. Leaking one
//! (`mem::forget`) stalls the device forever.
//!
//! In loom test builds (`--cfg loom`; loom is a dev-dependency, so only under
//! `cfg(test)`) the atomics are loom's and the futex is a model built from
//! loom's `Mutex` and `Condvar` with the same semantics (value check atomic with
//! queueing, a wake per bit), so loom also checks that no wakeup is ever lost.

#[cfg(all(test, loom))]
use loom::{hint::spin_loop, sync::atomic::AtomicU32, sync::atomic::fence};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
#[cfg(not(all(test, loom)))]
use std::{hint::spin_loop, sync::atomic::AtomicU32, sync::atomic::fence};

/// Busy-wait iterations before sleeping on the futex.
const SPIN: u32 = if cfg!(all(test, loom)) { 1 } else { 64 };

/// The futex bit ticket `t` sleeps on.
const fn bit(t: u32) -> u32 {
    1 << (t % 32)
}

/// A per-device FIFO ticket lock (see the module docs).
#[derive(Debug)]
pub struct Sequencer {
    /// `started`: the next ticket to hand out.
    next: AtomicU32,
    /// `submitted`: the ticket at the head of the line (all before it released).
    serving: AtomicU32,
    /// loom's futex model: one wake counter per bit, guarded like a hash bucket.
    #[cfg(all(test, loom))]
    wakes: loom::sync::Mutex<[u32; 32]>,
    #[cfg(all(test, loom))]
    woken: loom::sync::Condvar,
}

/// Proof of being at the head of the line. Dropping it releases the ticket and
/// wakes the next holder, whether on the normal path, an error path or a panic.
#[derive(Debug)]
#[must_use = "dropping a Ticket releases it at once"]
pub struct Ticket<'a>(&'a Sequencer, u32);

impl Sequencer {
    /// An idle sequencer whose first ticket is 0.
    #[cfg(not(all(test, loom)))]
    pub const fn new() -> Sequencer {
        Sequencer {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
        }
    }

    /// An idle sequencer whose first ticket is 0.
    #[cfg(all(test, loom))]
    pub fn new() -> Sequencer {
        Sequencer::starting_at(0)
    }

    /// An idle sequencer whose first ticket is `t` (tests cross the wrap with it).
    #[cfg(test)]
    fn starting_at(t: u32) -> Sequencer {
        Sequencer {
            next: AtomicU32::new(t),
            serving: AtomicU32::new(t),
            #[cfg(all(test, loom))]
            wakes: loom::sync::Mutex::new([0; 32]),
            #[cfg(all(test, loom))]
            woken: loom::sync::Condvar::new(),
        }
    }

    /// Takes the next ticket and waits until every earlier ticket has been released.
    pub fn enter(&self) -> Ticket<'_> {
        let t = self.next.fetch_add(1, Relaxed);
        // Acquire (here and below) pairs with the Release store in `release`:
        // everything the previous holder did happens-before this holder's section.
        for _ in 0..SPIN {
            if self.serving.load(Acquire) == t {
                return Ticket(self, t);
            }
            spin_loop();
        }
        loop {
            // Dekker, waiter side: our `fetch_add` on `next`, this fence, then
            // the load of `serving`. See `release` for the other half.
            fence(SeqCst);
            let seen = self.serving.load(Acquire);
            if seen == t {
                return Ticket(self, t);
            }
            // Returns on a wake, a spurious wake (e.g. for ticket t +/- 32),
            // EINTR or EAGAIN (`serving != seen`): the loop re-checks each time.
            self.sleep(seen, bit(t));
        }
    }

    /// Takes a ticket only if no one holds or waits for one now; never sleeps.
    pub fn try_enter(&self) -> Option<Ticket<'_>> {
        // Acquire: as in `enter`. Idle means `next == serving`; a stale `s`
        // makes the CAS fail (it could succeed wrongly only if 2^32 tickets
        // went by between these two lines). Never takes a ticket it might abandon.
        let s = self.serving.load(Acquire);
        let idle = self
            .next
            .compare_exchange(s, s.wrapping_add(1), Relaxed, Relaxed);
        idle.ok().map(|_| Ticket(self, s))
    }

    /// Tickets taken so far (wrapping): the seed's `started`.
    pub fn started(&self) -> u32 {
        self.next.load(Relaxed)
    }

    /// Tickets released so far (wrapping): the seed's `submitted`.
    pub fn submitted(&self) -> u32 {
        self.serving.load(Relaxed)
    }

    /// Releases ticket `t` (the current head) and wakes ticket `t + 1` if it may sleep.
    fn release(&self, t: u32) {
        let n = t.wrapping_add(1);
        self.serving.store(n, Release);
        // Dekker, releaser side: store `serving`, fence, load `next`. The two
        // SeqCst fences are totally ordered. If ours comes first, the waiter's
        // load after its fence sees `serving == n` and it does not sleep. If
        // the waiter's comes first, our load sees its `fetch_add`, so
        // `next != n` and we wake it: either it is already queued on the futex,
        // or the kernel's own check (atomic with queueing) sees `serving != seen`
        // and returns EAGAIN. When `next == n` nobody holds ticket `n` yet, and
        // whoever takes it will see `serving == n`: the syscall is skipped.
        fence(SeqCst);
        if self.next.load(Relaxed) != n {
            self.wake(bit(n));
        }
    }

    /// `futex(&serving, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, bits)`.
    #[cfg(not(all(test, loom)))]
    fn futex(&self, op: i32, val: u32, bits: u32) -> libc::c_long {
        let (addr, op) = (self.serving.as_ptr(), op | libc::FUTEX_PRIVATE_FLAG);
        let no_timeout = std::ptr::null::<libc::timespec>();
        // SAFETY: `serving` is a live, aligned AtomicU32 borrowed for the whole
        // call (a releasing Ticket borrows the Sequencer for 'a, so it outlives
        // the wake even if the next holder finishes first: invariant 1). WAIT
        // only reads it, atomically with queueing us; WAKE uses the address
        // only as a key; the null timeout means none and uaddr2 (0) is unused.
        // Invariant 5 rests on the protocol argued in `release`, not on this call.
        unsafe { libc::syscall(libc::SYS_futex, addr, op, val, no_timeout, 0usize, bits) }
    }

    #[cfg(not(all(test, loom)))]
    fn sleep(&self, seen: u32, bits: u32) {
        // -1 with EAGAIN (value changed) or EINTR just means: re-check.
        let r = self.futex(libc::FUTEX_WAIT_BITSET, seen, bits);
        let e = || std::io::Error::last_os_error().raw_os_error();
        debug_assert!(
            r == 0 || matches!(e(), Some(libc::EAGAIN | libc::EINTR)),
            "futex: {:?}",
            e()
        );
    }

    /// Wakes every waiter on `bits` (i32::MAX): tickets t and t + 32 share a
    /// bit, so waking just one could wake the wrong one and lose the wakeup.
    #[cfg(not(all(test, loom)))]
    fn wake(&self, bits: u32) {
        self.futex(libc::FUTEX_WAKE_BITSET, i32::MAX as u32, bits);
    }

    /// loom model of FUTEX_WAIT_BITSET: the value check is atomic with queueing
    /// (the mutex plays the hash-bucket lock); woken by a wake of its bit.
    #[cfg(all(test, loom))]
    fn sleep(&self, seen: u32, bits: u32) {
        let i = bits.trailing_zeros() as usize;
        let mut wakes = self.wakes.lock().unwrap();
        if self.serving.load(Relaxed) != seen {
            return; // EAGAIN
        }
        let start = wakes[i];
        while wakes[i] == start {
            wakes = self.woken.wait(wakes).unwrap();
        }
    }

    /// loom model of FUTEX_WAKE_BITSET waking every waiter on the bit.
    #[cfg(all(test, loom))]
    fn wake(&self, bits: u32) {
        self.wakes.lock().unwrap()[bits.trailing_zeros() as usize] += 1;
        self.woken.notify_all();
    }
}

impl Default for Sequencer {
    fn default() -> Self {
        Sequencer::new()
    }
}

impl Ticket<'_> {
    /// This ticket's number (wrapping u32).
    pub fn number(&self) -> u32 {
        self.1
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::{Sequencer, Ticket};
    use loom::{cell::UnsafeCell, sync::Arc, thread};

    /// A sequencer and a log only a ticket holder touches. loom's `UnsafeCell`
    /// fails the model if two sections are not ordered by happens-before, so
    /// it checks mutual exclusion and the Acquire/Release pairing; the log's
    /// contents check ticket order. loom's futex model also reports any lost
    /// wakeup as a deadlock.
    struct Shared(Sequencer, UnsafeCell<Vec<u32>>);

    // SAFETY: the log is accessed only while holding a ticket or after every
    // thread was joined; that exclusion is what these tests check.
    unsafe impl Sync for Shared {}

    impl Shared {
        fn section(&self, t: &Ticket<'_>) {
            // SAFETY: the caller holds ticket `t`, which excludes every other access.
            self.1.with_mut(|log| unsafe { (*log).push(t.number()) });
        }
    }

    /// Runs `f` under loom (3 preemptions unless LOOM_MAX_PREEMPTIONS says
    /// otherwise) from ticket `first`; `f` returns how many sections it ran.
    fn check(first: u32, f: impl Fn(&Arc<Shared>) -> u32 + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound.get_or_insert(3);
        b.check(move || {
            let s = Arc::new(Shared(
                Sequencer::starting_at(first),
                UnsafeCell::new(Vec::new()),
            ));
            let len = f(&s);
            // SAFETY: every other thread has been joined.
            let log = s.1.with_mut(|log| unsafe { (*log).clone() });
            let want: Vec<u32> = (0..len).map(|i| first.wrapping_add(i)).collect();
            assert_eq!(log, want, "critical sections out of ticket order");
            let end = first.wrapping_add(len);
            assert_eq!((s.0.started(), s.0.submitted()), (end, end));
        });
    }

    fn spawn(s: &Arc<Shared>, f: fn(&Shared)) -> thread::JoinHandle<()> {
        let s = s.clone();
        thread::spawn(move || f(&s))
    }

    fn enter(s: &Shared) {
        s.section(&s.0.enter());
    }

    #[test]
    fn three_threads_run_in_ticket_order() {
        // Start just below the wrap so the model also crosses zero.
        check(u32::MAX - 1, |s| {
            let hs = [spawn(s, enter), spawn(s, enter)];
            enter(s);
            hs.into_iter().for_each(|h| h.join().unwrap());
            3
        });
    }

    #[test]
    fn try_enter_mixed_with_enter() {
        check(0, |s| {
            let hs = [spawn(s, enter), spawn(s, enter)];
            let won = s.0.try_enter().map(|t| s.section(&t)).is_some();
            hs.into_iter().for_each(|h| h.join().unwrap());
            2 + u32::from(won)
        });
    }

    /// A holder that fails drops its ticket on the way out. (A panic cannot be
    /// modelled: loom runs every model thread on one OS thread, so
    /// `std::thread::panicking()` leaks into the others and poisons loom's own
    /// mutex. `tests::panicking_holder_releases_its_ticket` covers unwinding
    /// with the real futex; `Drop` runs the same code either way.)
    #[test]
    fn ticket_dropped_on_error_path_is_released() {
        fn fails(s: &Shared) -> Result<(), &'static str> {
            let t = s.0.enter();
            s.section(&t);
            Err("no pool memory") // `t` is dropped on the way out
        }
        check(0, |s| {
            let hs = [spawn(s, |s| assert!(fails(s).is_err())), spawn(s, enter)];
            enter(s);
            hs.into_iter().for_each(|h| h.join().unwrap());
            3
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Sequencer;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
    use std::sync::{Barrier, Mutex, mpsc};
    use std::thread;
    use std::time::{Duration, Instant};

    /// Runs `f` on its own thread and fails if it hangs (no timing asserts).
    fn within(secs: u64, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let h = thread::spawn(f);
        thread::spawn(move || tx.send(h.join()));
        match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(r) => r.unwrap_or_else(|e| std::panic::resume_unwind(e)),
            Err(_) => panic!("hung for {secs} s"),
        }
    }

    /// `threads` threads enter `per` times each (thread 0 tries `try_enter`
    /// first every other time), checking that sections never overlap and run
    /// in strict ticket order. All threads first queue behind a gate ticket, so
    /// they contend from the start. Returns how many `try_enter`s won.
    fn run(seq: &Sequencer, threads: usize, per: usize) -> usize {
        let log: Vec<AtomicU32> = (0..threads * per).map(|_| AtomicU32::new(0)).collect();
        let (pos, won, inside) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicBool::new(false),
        );
        let gate = seq.enter();
        thread::scope(|s| {
            for i in 0..threads {
                let (log, pos, inside, won) = (&log, &pos, &inside, &won);
                s.spawn(move || {
                    for k in 0..per {
                        let tried = (i == 0 && k % 2 == 0).then(|| seq.try_enter()).flatten();
                        won.fetch_add(usize::from(tried.is_some()), Relaxed);
                        let t = tried.unwrap_or_else(|| seq.enter());
                        assert!(!inside.swap(true, Relaxed), "two sections overlap");
                        // Load then store, not fetch_add: a lost update shows a race.
                        let p = pos.load(Relaxed);
                        log[p].store(t.number(), Relaxed);
                        pos.store(p + 1, Relaxed);
                        inside.store(false, Relaxed);
                    }
                });
            }
            while seq.started().wrapping_sub(gate.number()) <= threads as u32 {
                thread::yield_now();
            }
            drop(gate);
        });
        assert_eq!(pos.load(Relaxed), log.len());
        let first = seq.started().wrapping_sub(log.len() as u32);
        for (i, t) in log.iter().enumerate() {
            let want = first.wrapping_add(i as u32);
            assert_eq!(t.load(Relaxed), want, "section {i} out of ticket order");
        }
        assert_eq!(seq.started(), seq.submitted());
        won.load(Relaxed)
    }

    #[test]
    fn stress_strict_ticket_order() {
        within(120, || {
            let seq = Sequencer::new();
            let won = run(&seq, 8, 20_000);
            assert_eq!(seq.started(), 160_001); // and the gate ticket
            eprintln!("stress: 8 x 20000 sections in strict ticket order, {won} via try_enter");
        });
    }

    #[test]
    fn counters_wrap_around_zero() {
        within(120, || {
            let seq = Sequencer::starting_at(u32::MAX - 1000);
            run(&seq, 4, 500);
            assert_eq!(seq.started(), 1000); // 2001 tickets from u32::MAX - 1000
        });
    }

    /// Is thread `tid` blocked in the futex syscall right now?
    fn in_futex(tid: i32) -> bool {
        let nr = libc::SYS_futex.to_string();
        std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
            .is_ok_and(|s| s.split_whitespace().next() == Some(nr.as_str()))
    }

    /// More than 32, so some waiters share a futex bit.
    const WAITERS: usize = 40;

    #[test]
    fn waiters_sleep_on_the_futex_and_wake_in_order() {
        within(60, || {
            let (seq, order) = (Sequencer::new(), Mutex::new(Vec::new()));
            let head = seq.enter();
            let (tx, rx) = mpsc::channel();
            thread::scope(|s| {
                for _ in 0..WAITERS {
                    let (seq, order, tx) = (&seq, &order, tx.clone());
                    s.spawn(move || {
                        // SAFETY: gettid has no preconditions.
                        tx.send(unsafe { libc::gettid() }).unwrap();
                        let t = seq.enter();
                        order.lock().unwrap().push(t.number());
                    });
                }
                let tids: Vec<i32> = rx.iter().take(WAITERS).collect();
                // Hold at least 50 ms, and until every waiter sleeps in the kernel.
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(50)
                    || !tids.iter().all(|&t| in_futex(t))
                {
                    thread::sleep(Duration::from_millis(5));
                }
                assert_eq!(seq.started(), 1 + WAITERS as u32);
                assert!(seq.try_enter().is_none(), "overtook the queue");
                drop(head);
            });
            assert_eq!(*order.lock().unwrap(), Vec::from_iter(1..=WAITERS as u32));
            assert_eq!(seq.submitted(), 1 + WAITERS as u32);
        });
    }

    #[test]
    fn panicking_holder_releases_its_ticket() {
        within(60, || {
            let (seq, held) = (Sequencer::new(), Barrier::new(2));
            thread::scope(|s| {
                let panicker = s.spawn(|| {
                    let _t = seq.enter();
                    held.wait();
                    while seq.started() < 2 {
                        thread::yield_now(); // let the next ticket queue behind us
                    }
                    panic!("holder fails in its submission section (this test expects it)");
                });
                held.wait();
                assert_eq!(seq.enter().number(), 1); // was queued behind the panic
                assert!(panicker.join().is_err());
            });
            // The error path: `?` drops the ticket on the way out.
            let fails = |seq: &Sequencer| -> Result<(), ()> {
                let _t = seq.enter();
                Err(())
            };
            assert!(fails(&seq).is_err());
            assert_eq!(seq.enter().number(), 3);
            assert_eq!((seq.started(), seq.submitted()), (4, 4));
        });
    }

    #[test]
    fn try_enter_only_when_idle() {
        let seq = Sequencer::default();
        let t = seq.try_enter().expect("idle sequencer");
        assert_eq!(t.number(), 0);
        assert!(seq.try_enter().is_none());
        let elsewhere = thread::scope(|s| s.spawn(|| seq.try_enter().is_none()).join());
        assert!(elsewhere.unwrap());
        drop(t);
        assert_eq!(seq.try_enter().map(|t| t.number()), Some(1));
        assert_eq!(seq.enter().number(), 2);
        let wrap = Sequencer::starting_at(u32::MAX);
        assert_eq!(wrap.try_enter().map(|t| t.number()), Some(u32::MAX));
        assert_eq!(wrap.try_enter().map(|t| t.number()), Some(0));
        assert_eq!((wrap.started(), wrap.submitted()), (1, 1));
    }
}
