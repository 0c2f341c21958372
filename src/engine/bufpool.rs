//! The buffer pool (mempool): every I/O buffer of the device comes from here.
//!
//! **What it owns.** One anonymous memmap2 arena, prefaulted (`populate`) and
//! optionally `mlock`ed, cut into `chunks` equal chunks of `chunk_size` bytes (a
//! power of two, at least 4096 and at least the host page size, so every chunk is
//! page-aligned and fit for O_DIRECT). The ring code registers the whole arena as
//! ONE fixed buffer, index [`FIXED_BUF_INDEX`], from [`BufPool::arena`]; this
//! module never touches io_uring. Its free list is a `Vec<u32>` whose capacity is
//! reserved once in [`BufPool::new`], and a [`Chunks`] keeps its indices inline, so
//! neither allocating nor freeing touches the heap.
//!
//! **Invariant 4, forward progress under memory pressure.** A request asks for all
//! the chunks it needs at once (`1..=max_request_chunks`) and must never ask again
//! while it holds chunks (kernel mempool rule: only in-flight I/O, which holds no
//! pending allocation, returns chunks). The ordinary path (`try_alloc`, and the
//! first attempt of `alloc`) succeeds only when nobody is waiting and at least
//! `reserve` chunks stay free. Otherwise `alloc` takes a ticket in a strict FIFO
//! line; only the head of the line is served, and it may use the reserve. Since
//! `reserve >= max_request_chunks`, the head can always be satisfied once in-flight
//! I/O returns its chunks, and nothing behind it overtakes it (not even a smaller
//! request). A ticket, once taken, is always served: `alloc` has no timeout and
//! no cancellation. [`BufPool::set_fail_ordinary`] is fault injection in the
//! spirit of the kernel's `fail_mempool_alloc`: it makes the ordinary path fail so
//! every allocation goes through the line and the reserve.
//!
//! **Invariant 3, nothing is torn down while I/O is pending.** Ownership rule: a
//! `Chunks` handed to the kernel is moved into its op table entry and dropped only
//! at the op's terminal completion, so a buffer the kernel may still write into is
//! never freed, reused or handed out again. If a drain cannot finish, the owner
//! leaks it with `mem::forget`; each `Chunks` holds an `Arc` of the pool, so the
//! arena then simply stays mapped. The arena is unmapped only when the last
//! [`BufPool`] handle and the last `Chunks` are gone; the ring should hold a
//! `BufPool` handle so it is dropped (and unregistered) before the arena.
//! Chunks are never shrunk, `madvise`d or unmapped while out of the free list.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use memmap2::{MmapOptions, MmapRaw};

/// The largest `reserve` (and so the largest request) a pool accepts.
pub const MAX_REQUEST_CHUNKS: usize = 64;
/// The fixed-buffer index under which the ring registers the arena.
pub const FIXED_BUF_INDEX: u16 = 0;
/// The byte freed chunks are filled with when `poison_on_free` is set.
pub const POISON: u8 = 0xA5;
/// Waiters sleep on `wake[ticket % WAKE_SLOTS]`, so a wake-up reaches the head of
/// the line (and at most the few waiters sharing its slot), not the whole line.
const WAKE_SLOTS: usize = 64;

/// How to build a [`BufPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes per chunk: a power of two, at least 4096 and the page size.
    pub chunk_size: usize,
    /// Number of chunks in the arena.
    pub chunks: usize,
    /// Chunks kept for the head of the line; also the largest request (`1..=64`).
    pub reserve: usize,
    /// `mlock` the arena (needs RLIMIT_MEMLOCK room or CAP_IPC_LOCK).
    pub lock_memory: bool,
    /// Fill freed chunks with [`POISON`], so a use after free shows as bad data.
    pub poison_on_free: bool,
}

/// Errors of the buffer pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid buffer pool configuration: {0}")]
    Config(String),
    #[error("cannot map a {bytes}-byte buffer arena")]
    Map {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot lock the {bytes}-byte buffer arena into RAM \
         (raise RLIMIT_MEMLOCK or run with CAP_IPC_LOCK)"
    )]
    Lock {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("a request for {n} buffer chunks is outside 1..={max}")]
    RequestSize { n: usize, max: usize },
}

/// A snapshot of the pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub free: usize,
    pub in_use: usize,
    /// Requests in the line (including its head).
    pub waiting: usize,
    /// Allocations served through the line, whose head may use the reserve.
    pub reserve_allocs: u64,
    /// Allocations served by the ordinary path.
    pub ordinary_allocs: u64,
}

struct State {
    /// Free chunk indices; capacity `chunks`, reserved once, never exceeded.
    free: Vec<u32>,
    /// The next ticket to hand out, and the ticket at the head of the line.
    next_ticket: u64,
    serving: u64,
    reserve_allocs: u64,
    ordinary_allocs: u64,
}

impl State {
    fn waiting(&self) -> usize {
        (self.next_ticket - self.serving) as usize
    }
}

struct Inner {
    map: MmapRaw,
    chunk_size: usize,
    chunks: usize,
    reserve: usize,
    poison: bool,
    fail_ordinary: AtomicBool,
    state: Mutex<State>,
    wake: [Condvar; WAKE_SLOTS],
    /// Called after chunks are freed while `want_free` is set (then cleared):
    /// an event loop that cannot sleep in the line sleeps elsewhere.
    on_free: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    want_free: AtomicBool,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The critical sections only move indices and counters and cannot
        // panic halfway, so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_head(&self, ticket: u64) {
        self.wake[(ticket % WAKE_SLOTS as u64) as usize].notify_all();
    }

    fn chunk_ptr(&self, index: u32) -> *mut u8 {
        // `index < chunks`, so the offset stays inside the arena; wrapping_add
        // only computes the address, it dereferences nothing.
        self.map
            .as_mut_ptr()
            .wrapping_add(index as usize * self.chunk_size)
    }
}

/// A cheap, clonable handle to the pool. See the module docs.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<Inner>,
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (size, reserve) = (self.inner.chunk_size, self.inner.reserve);
        write!(
            f,
            "BufPool({size}-byte chunks, reserve {reserve}, {:?})",
            self.stats()
        )
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a system constant; it has no memory-safety
    // preconditions (it is `unsafe` only because it is an FFI call).
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(4096)
}

impl BufPool {
    /// Validates `cfg`, maps (and optionally locks) the arena, and frees every chunk.
    pub fn new(cfg: PoolConfig) -> Result<BufPool, PoolError> {
        let bad = |msg: String| Err(PoolError::Config(msg));
        let min_chunk = page_size();
        if !cfg.chunk_size.is_power_of_two() || cfg.chunk_size < min_chunk {
            return bad(format!(
                "chunk size {} is not a power of two of at least {min_chunk} bytes",
                cfg.chunk_size
            ));
        }
        let Some(count) = u32::try_from(cfg.chunks).ok().filter(|&c| c > 0) else {
            return bad(format!("chunk count {} is outside 1..=2^32-1", cfg.chunks));
        };
        if cfg.reserve == 0 || cfg.reserve > MAX_REQUEST_CHUNKS {
            return bad(format!(
                "reserve {} (also the largest request) is outside 1..={MAX_REQUEST_CHUNKS}",
                cfg.reserve
            ));
        }
        if cfg.reserve > cfg.chunks {
            return bad(format!(
                "reserve {} is larger than the pool ({} chunks)",
                cfg.reserve, cfg.chunks
            ));
        }
        let Some(bytes) = cfg
            .chunk_size
            .checked_mul(cfg.chunks)
            .filter(|&b| b <= isize::MAX as usize)
        else {
            return bad(format!(
                "{} chunks of {} bytes overflow",
                cfg.chunks, cfg.chunk_size
            ));
        };
        let map = MmapOptions::new()
            .len(bytes)
            .map_anon()
            .map_err(|source| PoolError::Map { bytes, source })?;
        // Transparent huge pages where the host allows them: a 1 MiB transfer
        // then needs a few physical segments instead of 256 pages (virtio-blk
        // splits requests past ~254 segments). Then prefault the whole arena.
        let _ = map.advise(memmap2::Advice::HugePage);
        let map = match map.advise(memmap2::Advice::PopulateWrite) {
            Ok(()) => map,
            // Before Linux 5.14: prefault with MAP_POPULATE instead.
            Err(_) => MmapOptions::new()
                .len(bytes)
                .populate()
                .map_anon()
                .map_err(|source| PoolError::Map { bytes, source })?,
        };
        let map = MmapRaw::from(map);
        if cfg.lock_memory {
            map.lock()
                .map_err(|source| PoolError::Lock { bytes, source })?;
        }
        // Reversed so that chunk 0 is handed out first.
        let free: Vec<u32> = (0..count).rev().collect();
        let state = State {
            free,
            next_ticket: 0,
            serving: 0,
            reserve_allocs: 0,
            ordinary_allocs: 0,
        };
        Ok(BufPool {
            inner: Arc::new(Inner {
                map,
                chunk_size: cfg.chunk_size,
                chunks: cfg.chunks,
                reserve: cfg.reserve,
                poison: cfg.poison_on_free,
                fail_ordinary: AtomicBool::new(false),
                state: Mutex::new(state),
                wake: std::array::from_fn(|_| Condvar::new()),
                on_free: Mutex::new(None),
                want_free: AtomicBool::new(false),
            }),
        })
    }

    /// Chunks in the pool.
    pub fn chunks(&self) -> usize {
        self.inner.chunks
    }

    pub fn chunk_size(&self) -> usize {
        self.inner.chunk_size
    }

    /// The largest `n` that `alloc` accepts; equal to the reserve.
    pub fn max_request_chunks(&self) -> usize {
        self.inner.reserve
    }

    /// The arena's base address and length, for `register_buffers` (one iovec,
    /// registered as [`FIXED_BUF_INDEX`]). The address is valid while any handle
    /// or `Chunks` of this pool is alive.
    pub fn arena(&self) -> (*mut u8, usize) {
        (self.inner.map.as_mut_ptr(), self.inner.map.len())
    }

    /// The byte offset of `ptr` in the arena, or `None` if it points outside.
    pub fn offset_of(&self, ptr: *const u8) -> Option<usize> {
        let off = (ptr as usize).checked_sub(self.inner.map.as_ptr() as usize)?;
        (off < self.inner.map.len()).then_some(off)
    }

    /// Fault injection: while on, the ordinary path always fails.
    pub fn set_fail_ordinary(&self, on: bool) {
        self.inner.fail_ordinary.store(on, Ordering::Relaxed);
    }

    pub fn fail_ordinary(&self) -> bool {
        self.inner.fail_ordinary.load(Ordering::Relaxed)
    }

    /// Chunks free now.
    pub fn free_chunks(&self) -> usize {
        self.inner.state().free.len()
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state();
        PoolStats {
            free: st.free.len(),
            in_use: self.inner.chunks - st.free.len(),
            waiting: st.waiting(),
            reserve_allocs: st.reserve_allocs,
            ordinary_allocs: st.ordinary_allocs,
        }
    }

    /// The ordinary path: succeeds only if fault injection is off, nobody is
    /// waiting (no overtaking) and at least `reserve` chunks stay free. Never
    /// sleeps (beyond the short critical section of the pool's mutex).
    pub fn try_alloc(&self, n: usize) -> Option<Chunks> {
        if n == 0 || n > self.inner.reserve || self.fail_ordinary() {
            return None;
        }
        let mut st = self.inner.state();
        self.try_ordinary(&mut st, n)
    }

    /// Allocates `n` chunks, waiting in a strict FIFO line if the ordinary path
    /// fails; the head of the line may use the reserve. The caller must hold no
    /// other `Chunks` of this pool while it waits (invariant 4).
    pub fn alloc(&self, n: usize) -> Result<Chunks, PoolError> {
        let inner = &*self.inner;
        if n == 0 || n > inner.reserve {
            return Err(PoolError::RequestSize {
                n,
                max: inner.reserve,
            });
        }
        let mut st = inner.state();
        if !self.fail_ordinary() {
            if let Some(chunks) = self.try_ordinary(&mut st, n) {
                return Ok(chunks);
            }
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let slot = (ticket % WAKE_SLOTS as u64) as usize;
        while st.serving != ticket || st.free.len() < n {
            st = inner.wake[slot]
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let chunks = self.take(&mut st, n);
        st.reserve_allocs += 1;
        st.serving += 1;
        let next = (st.waiting() > 0).then_some(st.serving);
        drop(st);
        if let Some(next) = next {
            // The new head may already be satisfiable with what is left.
            inner.wake_head(next);
        }
        Ok(chunks)
    }

    /// The head of the line's allocation, without waiting, for an event
    /// loop that keeps its own FIFO line of requests waiting for memory and
    /// calls this only for the first of them: like `alloc`'s head, it may use
    /// the reserve. Fails while a thread waits in the pool's own line (that
    /// thread is ahead) or while fewer than `n` chunks are free; then
    /// [`BufPool::notify_free`] says when to try again.
    pub fn try_alloc_head(&self, n: usize) -> Option<Chunks> {
        if n == 0 || n > self.inner.reserve {
            return None;
        }
        let mut st = self.inner.state();
        if st.waiting() > 0 || st.free.len() < n {
            return None;
        }
        st.reserve_allocs += 1;
        Some(self.take(&mut st, n))
    }

    /// Sets what to call when chunks are freed after a [`BufPool::notify_free`].
    pub fn set_on_free(&self, f: Option<Box<dyn Fn() + Send + Sync>>) {
        *self
            .inner
            .on_free
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = f;
    }

    /// Asks for one call of the `on_free` function at the next free. The
    /// caller checks for memory again after asking, so no free is missed.
    pub fn notify_free(&self) {
        self.inner.want_free.store(true, Ordering::SeqCst);
    }

    fn try_ordinary(&self, st: &mut State, n: usize) -> Option<Chunks> {
        if st.waiting() > 0 || st.free.len() < n + self.inner.reserve {
            return None;
        }
        st.ordinary_allocs += 1;
        Some(self.take(st, n))
    }

    /// Moves `n <= st.free.len()` indices from the free list into a `Chunks`.
    fn take(&self, st: &mut State, n: usize) -> Chunks {
        let start = st.free.len() - n;
        let mut idx = [0u32; MAX_REQUEST_CHUNKS];
        idx[..n].copy_from_slice(&st.free[start..]);
        st.free.truncate(start);
        Chunks {
            pool: Arc::clone(&self.inner),
            idx,
            len: n,
        }
    }
}

/// Up to `max_request_chunks` chunks owned by one request; returned on drop.
/// Indices live inline, so creating and dropping one never allocates.
pub struct Chunks {
    pool: Arc<Inner>,
    idx: [u32; MAX_REQUEST_CHUNKS],
    len: usize,
}

impl fmt::Debug for Chunks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunks")
            .field("indices", &&self.idx[..self.len])
            .finish()
    }
}

impl Chunks {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a request holds at least one chunk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total bytes: `len() * chunk_size`.
    pub fn bytes(&self) -> usize {
        self.len * self.pool.chunk_size
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.pool.chunk_size
    }

    /// The pool index of chunk `i`. Panics if `i >= len()`.
    pub fn index(&self, i: usize) -> u32 {
        self.idx[..self.len][i]
    }

    /// Byte offset of chunk `i` in the arena (the registered fixed buffer).
    pub fn offset(&self, i: usize) -> usize {
        self.index(i) as usize * self.pool.chunk_size
    }

    /// Address of chunk `i` (`chunk_size` bytes, page-aligned), for SQEs.
    /// Panics if `i >= len()`.
    pub fn ptr(&self, i: usize) -> *mut u8 {
        self.pool.chunk_ptr(self.index(i))
    }

    /// Chunk `i` as bytes. Panics if `i >= len()`.
    pub fn chunk(&self, i: usize) -> &[u8] {
        let ptr = self.ptr(i);
        // SAFETY: `ptr` is the start of `chunk_size` bytes inside the arena,
        // which stays mapped while `self.pool` (an Arc) lives. The pool hands each
        // index to one `Chunks` at a time (it leaves the free list in `take` and
        // returns only in our `Drop`), so no other Rust reference aliases it; the
        // kernel does not write it while we lend it, because a `Chunks` in flight
        // is owned by its op table entry until the terminal CQE (the ring's
        // SAFETY at push upholds that). The borrow of `self` bounds the slice.
        unsafe { std::slice::from_raw_parts(ptr, self.pool.chunk_size) }
    }

    /// Chunk `i` as mutable bytes. Panics if `i >= len()`.
    pub fn chunk_mut(&mut self, i: usize) -> &mut [u8] {
        let ptr = self.ptr(i);
        // SAFETY: as in `chunk`; in addition `&mut self` makes this the only
        // reference into the chunk for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.pool.chunk_size) }
    }

    /// Copies `src` into the chunk sequence from byte 0; returns bytes copied
    /// (less than `src.len()` only if `src` is longer than `bytes()`).
    pub fn copy_from(&mut self, src: &[u8]) -> usize {
        self.copy_from_at(0, src)
    }

    /// Copies `src` into the chunk sequence starting at byte `offset`.
    pub fn copy_from_at(&mut self, offset: usize, src: &[u8]) -> usize {
        let mut done = 0;
        for (i, at, from) in self.spans(offset, src.len()) {
            self.chunk_mut(i)[at].copy_from_slice(&src[from.clone()]);
            done = from.end;
        }
        done
    }

    /// Copies the chunk sequence from byte 0 into `dst`; returns bytes copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        self.copy_to_at(0, dst)
    }

    /// Copies from byte `offset` of the chunk sequence into `dst`.
    pub fn copy_to_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for (i, at, to) in self.spans(offset, dst.len()) {
            dst[to.clone()].copy_from_slice(&self.chunk(i)[at]);
            done = to.end;
        }
        done
    }

    /// Cuts bytes `offset..offset + len` (clipped to `bytes()`) into pieces
    /// `(chunk, range in the chunk, range in the caller's buffer)`.
    fn spans(&self, offset: usize, len: usize) -> impl Iterator<Item = Spans> + use<> {
        let cs = self.pool.chunk_size;
        let end = offset.saturating_add(len).min(self.bytes());
        let mut pos = offset;
        std::iter::from_fn(move || {
            (pos < end).then(|| {
                let (i, off) = (pos / cs, pos % cs);
                let n = (cs - off).min(end - pos);
                pos += n;
                (i, off..off + n, pos - n - offset..pos - offset)
            })
        })
    }
}

type Spans = (usize, Range<usize>, Range<usize>);

impl Drop for Chunks {
    fn drop(&mut self) {
        let inner = &*self.pool;
        let idx = &self.idx[..self.len];
        if inner.poison {
            for &i in idx {
                // SAFETY: we still own chunk `i` exclusively (it is not back on
                // the free list yet), the arena is mapped (we hold the Arc), and
                // no kernel op uses it: a Chunks is dropped only at its op's
                // terminal completion (ownership rule, module docs), else leaked.
                unsafe { std::ptr::write_bytes(inner.chunk_ptr(i), POISON, inner.chunk_size) };
            }
        }
        let mut st = inner.state();
        // Within the capacity reserved in `new`: no allocation.
        st.free.extend_from_slice(idx);
        let head = (st.waiting() > 0).then_some(st.serving);
        drop(st);
        if let Some(head) = head {
            inner.wake_head(head);
        }
        if inner.want_free.swap(false, Ordering::SeqCst)
            && let Some(f) = inner
                .on_free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
        {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    fn pool(chunks: usize, reserve: usize) -> BufPool {
        BufPool::new(PoolConfig {
            chunk_size: 4096,
            chunks,
            reserve,
            lock_memory: false,
            poison_on_free: true,
        })
        .unwrap()
    }

    /// Polls `cond`; the deadline only turns a hang into a failure.
    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "stuck waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn config_and_request_size_are_validated() {
        let cfg = |chunk_size, chunks, reserve| PoolConfig {
            chunk_size,
            chunks,
            reserve,
            lock_memory: true,
            poison_on_free: false,
        };
        let bad = [(1000, 8, 4), (2048, 8, 4), (4096, 0, 4), (4096, 8, 0)];
        let more_bad = [(4096, 8, 9), (4096, 100, 65), (4096, usize::MAX / 2, 4)];
        for (size, n, reserve) in bad.into_iter().chain(more_bad) {
            let res = BufPool::new(cfg(size, n, reserve));
            assert!(
                matches!(res, Err(PoolError::Config(_))),
                "{size} {n} {reserve}"
            );
        }
        let p = BufPool::new(cfg(4096, 8, 4)).unwrap(); // also mlocks 32 KiB
        assert_eq!((p.chunk_size(), p.max_request_chunks()), (4096, 4));
        for n in [0, 5] {
            let res = p.alloc(n);
            assert!(matches!(res, Err(PoolError::RequestSize { max: 4, .. })));
            assert!(p.try_alloc(n).is_none());
        }
    }

    #[test]
    fn handles_cross_threads() {
        fn check<T: Send + Sync>() {}
        check::<Chunks>();
        check::<BufPool>();
    }

    #[test]
    fn counts_alignment_data_and_poison() {
        let p = pool(8, 3);
        let mut a = p.try_alloc(3).unwrap();
        let mut b = p.try_alloc(2).unwrap(); // leaves exactly the reserve
        assert!(
            p.try_alloc(1).is_none(),
            "try_alloc dipped into the reserve"
        );
        let c = p.alloc(3).unwrap(); // through the line: the head may use the reserve
        let s = p.stats();
        assert_eq!((s.free, s.in_use, s.waiting), (0, 8, 0));
        assert_eq!((s.ordinary_allocs, s.reserve_allocs), (2, 1));

        let (base, len) = p.arena();
        assert_eq!(len, 8 * 4096);
        let mut starts = HashSet::new();
        for ch in [&a, &b, &c] {
            assert_eq!(ch.bytes(), ch.len() * 4096);
            for i in 0..ch.len() {
                let addr = ch.ptr(i) as usize;
                assert_eq!(addr % 4096, 0);
                assert_eq!(p.offset_of(ch.ptr(i)), Some(ch.offset(i)));
                assert!(ch.offset(i) + 4096 <= len);
                assert!(starts.insert(addr), "chunk handed out twice");
            }
        }
        // 8 distinct chunk-aligned starts of chunk_size bytes: disjoint, all used.
        assert_eq!(starts.len(), 8);
        assert_eq!(p.offset_of(base.wrapping_add(len)), None);

        let pattern: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        assert_eq!(a.copy_from(&pattern), pattern.len());
        b.chunk_mut(0).fill(0x11);
        assert_eq!(b.copy_from_at(4090, &[7; 10]), 10); // straddles chunks 0 and 1
        drop(c);
        let mut out = vec![0; 3 * 4096];
        assert_eq!(a.copy_to(&mut out), out.len());
        assert_eq!(out, pattern);
        let mut straddle = [0; 12];
        assert_eq!(b.copy_to_at(4089, &mut straddle), 12);
        assert_eq!(straddle, [0x11, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);

        let freed = a.ptr(2);
        drop(a);
        // SAFETY: the pool (and so the arena) is alive, and nothing else uses
        // the freed chunk in this single-threaded test.
        let after = unsafe { std::slice::from_raw_parts(freed, 4096) };
        assert!(
            after.iter().all(|&x| x == POISON),
            "freed chunk not poisoned"
        );
        drop(b);
        let s = p.stats();
        assert_eq!((s.free, s.in_use, s.waiting), (8, 0, 0));
    }

    #[test]
    fn try_alloc_never_overtakes_a_waiter() {
        let p = pool(8, 2);
        // A phantom waiter at the head of the line: the only way to see a waiter
        // while plenty is free, since a real head takes what it can at once.
        p.inner.state().next_ticket += 1;
        assert!(p.try_alloc(1).is_none(), "try_alloc overtook a waiter");
        let q = p.clone();
        let later = thread::spawn(move || q.alloc(1).map(|c| c.len()));
        wait_until("second waiter", || p.stats().waiting == 2);
        p.inner.state().serving += 1; // the phantom leaves the line
        p.inner.wake_head(1);
        assert_eq!(later.join().unwrap().unwrap(), 1);
        assert_eq!(p.stats().waiting, 0);
        assert!(p.try_alloc(1).is_some());
    }

    #[test]
    fn the_head_without_waiting_may_use_the_reserve_and_hears_of_frees() {
        let p = pool(8, 4);
        let a = p.try_alloc(4).unwrap();
        // 4 free, all of them the reserve: the ordinary path refuses.
        assert!(p.try_alloc(1).is_none());
        let b = p.try_alloc_head(3).unwrap();
        assert!(p.try_alloc_head(2).is_none(), "only one chunk is free");
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        p.set_on_free(Some(Box::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        })));
        drop(b);
        assert_eq!(woken.load(Ordering::SeqCst), 0, "nobody asked");
        p.notify_free();
        drop(a);
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        // A thread waiting in the pool's own line comes first.
        p.inner.state().next_ticket += 1;
        assert!(p.try_alloc_head(1).is_none(), "overtook a waiter");
        p.inner.state().serving += 1;
        assert!(p.try_alloc_head(1).is_some());
        let s = p.stats();
        assert_eq!(s.reserve_allocs, 2);
        p.set_on_free(None);
    }

    #[test]
    fn fault_injection_forces_the_reserve_path() {
        let p = pool(8, 4);
        p.set_fail_ordinary(true);
        assert!(p.fail_ordinary());
        assert!(p.try_alloc(1).is_none());
        let c = p.alloc(4).unwrap();
        let s = p.stats();
        assert_eq!((s.ordinary_allocs, s.reserve_allocs), (0, 1));
        drop(c);
        p.set_fail_ordinary(false);
        assert!(p.try_alloc(4).is_some());
    }

    #[test]
    fn line_is_strictly_fifo() {
        let p = pool(8, 4);
        let h1 = p.alloc(1).unwrap();
        let h3 = p.alloc(3).unwrap();
        let h4 = p.alloc(4).unwrap();
        assert_eq!(p.stats().free, 0);
        let (tx, rx) = mpsc::channel();
        let spawn = |name: &'static str, n: usize| {
            let (p, tx) = (p.clone(), tx.clone());
            thread::spawn(move || {
                let c = p.alloc(n).unwrap();
                tx.send((name, c.len())).unwrap();
            })
        };
        let a = spawn("A", 4);
        wait_until("A in line", || p.stats().waiting == 1);
        let b = spawn("B", 1);
        wait_until("B in line", || p.stats().waiting == 2);
        drop(h1);
        // B asks for 1 and 1 is free, but A is ahead. A fast failure for a buggy
        // pool; a correct one can never fail this however slow the machine is.
        thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "B overtook A");
        assert_eq!((p.stats().free, p.stats().waiting), (1, 2));
        drop(h3);
        assert_eq!(rx.recv().unwrap(), ("A", 4));
        assert_eq!(rx.recv().unwrap(), ("B", 1));
        a.join().unwrap();
        b.join().unwrap();
        drop(h4);
        assert_eq!(p.stats().free, 8);
    }

    /// 8 threads x 5k cycles of alloc(1..=4), write, hold (sometimes handed to
    /// a completer that drops it later, like in-flight I/O), verify, drop.
    fn stress(fail_ordinary: bool) -> PoolStats {
        const THREADS: u64 = 8;
        const CYCLES: u64 = 5000;
        let p = pool(8, 4);
        p.set_fail_ordinary(fail_ordinary);
        let (done_tx, done_rx) = mpsc::channel();
        let q = p.clone();
        thread::spawn(move || {
            let (io_tx, io_rx) = mpsc::channel::<(Chunks, u64)>();
            let completer = thread::spawn(move || {
                let mut in_flight = std::collections::VecDeque::new();
                loop {
                    // Blocks only empty-handed; when idle, the oldest op "completes".
                    let op = if in_flight.is_empty() {
                        match io_rx.recv() {
                            Ok(op) => Some(op),
                            Err(_) => break,
                        }
                    } else {
                        io_rx.try_recv().ok()
                    };
                    let idle = op.is_none();
                    in_flight.extend(op);
                    if idle || in_flight.len() > 2 {
                        let (c, tag) = in_flight.pop_front().unwrap();
                        verify(&c, tag); // and drop, like a terminal CQE
                    }
                }
            });
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (p, io_tx) = (q.clone(), io_tx.clone());
                    thread::spawn(move || {
                        let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                        for cycle in 0..CYCLES {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            let mut c = p.alloc(1 + (rng % 4) as usize).unwrap();
                            let tag = (t << 32) | cycle;
                            fill(&mut c, tag);
                            if rng & 16 == 0 {
                                io_tx.send((c, tag)).unwrap();
                            } else {
                                thread::yield_now();
                                verify(&c, tag);
                            }
                        }
                    })
                })
                .collect();
            drop(io_tx);
            for w in workers {
                w.join().unwrap();
            }
            completer.join().unwrap();
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("stress run deadlocked (or a thread panicked)");
        let s = p.stats();
        assert_eq!((s.free, s.in_use, s.waiting), (8, 0, 0));
        assert_eq!(s.ordinary_allocs + s.reserve_allocs, THREADS * CYCLES);
        s
    }

    fn expected(tag: u64, i: usize) -> Vec<u8> {
        let mut v = vec![(tag as u8) ^ (tag >> 32) as u8 ^ i as u8; 4096];
        v[..8].copy_from_slice(&tag.to_le_bytes());
        v
    }

    fn fill(c: &mut Chunks, tag: u64) {
        for i in 0..c.len() {
            c.chunk_mut(i).copy_from_slice(&expected(tag, i));
        }
    }

    fn verify(c: &Chunks, tag: u64) {
        for i in 0..c.len() {
            assert!(
                c.chunk(i) == &expected(tag, i)[..],
                "chunk {i} of {tag:#x} corrupted"
            );
        }
    }

    #[test]
    fn forward_progress_with_fault_injection() {
        let s = stress(true);
        assert_eq!(s.ordinary_allocs, 0);
        assert!(s.reserve_allocs > 0);
    }

    #[test]
    fn forward_progress_without_fault_injection() {
        stress(false);
    }
}
