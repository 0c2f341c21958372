//! The block device: a COW overlay over a backing file, or a raw image, driven
//! through one io_uring ring by one worker thread.
//!
//! A caller (an NBD connection, `ubd bench`, a test) takes pool buffers for a
//! READ or WRITE with [`Device::alloc`] (the pool's FIFO line and reserve keep
//! invariant 4), fills a WRITE's buffers, and hands the request to
//! [`Device::submit`]. `submit` takes a ticket from the device's sequencer and,
//! holding it, appends the request to the worker's intake, so requests reach
//! the worker, and their first ops the host, in ticket order (invariant 5).
//! The worker plans each request into ops, holds range locks for changes
//! (invariant 2), sets bitmap bits only after data completes and writes them
//! to disk only inside the flush protocol (invariant 7), and reports each
//! request's end to the caller's [`Sink`] after everything it owned is back
//! (invariant 1). [`Device::close`] (or dropping the device) stops intake,
//! finishes every request, flushes, and only then releases the ring, the
//! buffers and the files (invariant 3).
//!
//! Request data layout: byte `i` of a READ or WRITE of `offset..offset + len`
//! sits at byte `offset % 512 + i` of its buffers, so every sector of the
//! request is sector-aligned in memory.

mod conn;
mod failure;
mod flush;
mod intake;
mod locks;
mod log_every;
mod plan;
mod request;
mod status;
mod worker;

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use thiserror::Error;

use crate::engine::bufpool::{BufPool, Chunks, PoolConfig, PoolError};
pub use crate::engine::record::{Event, Fault, Faults, OpClass, Recorder, Role};
use crate::engine::ring::Waker;
use crate::engine::sequencer::Sequencer;
use crate::image::{self, Cache, ImageError};

pub use crate::engine::sendbuf::SendBuf;
pub use conn::{ConnCx, ConnDone, ConnEnd, Protocol, Step};
pub use intake::Intake;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    /// Everything acknowledged before it is durable when it completes.
    Flush,
    /// The range may read as zeros afterwards; space is given back.
    Trim,
    WriteZeroes,
    /// Prefetch the range into the host's cache.
    Cache,
    /// Where the range's data lives: see [`Extent`]. The answer may end
    /// before the range does (see [`Device::block_status`]).
    BlockStatus,
}

/// Request flags, as NBD has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    /// Durable before the reply.
    pub fua: bool,
    /// WRITE_ZEROES: allocate, do not punch a hole.
    pub no_hole: bool,
    /// WRITE_ZEROES: fail with ENOTSUP rather than write zeros slowly. The
    /// device always zeroes with `fallocate` (fast), so it never has to.
    pub fast_zero: bool,
}

/// One request to the device.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub offset: u64,
    pub len: u64,
    pub flags: Flags,
    /// READ and WRITE: buffers from [`Device::alloc`] for this range.
    pub data: Option<Chunks>,
    /// The caller's token, given back with the reply.
    pub token: u64,
}

/// Where a range of the device reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// 1: the overlay (or a raw image); 2: the backing file; 0: neither (the
    /// zero tail past the backing file's end).
    pub depth: u8,
    /// Known to read as zeros (a hole, or past the end).
    pub zero: bool,
}

/// A request's successful end.
// `Chunks` keeps its indices inline so that no request allocates; boxing it
// to shrink the enum would bring that allocation back.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Reply {
    Done,
    /// A READ's buffers, data at byte `offset % 512`.
    Data(Chunks),
    Extents(Vec<Extent>),
}

/// Receives each request's end. Called on the device's worker thread: it
/// must not block for long.
pub trait Sink: Send + Sync {
    fn complete(&self, token: u64, result: Result<Reply, Errno>);

    /// Like `complete`, but the worker calls [`Sink::flush`] before it next
    /// sleeps, so a sink may hold back its wake-ups and let one wake-up carry
    /// a whole batch of completions.
    fn complete_batched(&self, token: u64, result: Result<Reply, Errno>) {
        self.complete(token, result);
    }

    /// The end of a batch of `complete_batched` calls.
    fn flush(&self) {}
}

/// How to open a device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub read_only: bool,
    /// Use this backing file instead of the one the overlay names.
    pub backing: Option<PathBuf>,
    /// Read a backing file only from inside this directory (see
    /// [`image::OpenOptions::backing_dir`]).
    pub backing_dir: Option<PathBuf>,
    pub cache: Cache,
    /// Bytes of buffer pool (preallocated, registered with the ring).
    pub pool_size: usize,
    /// Bytes per pool chunk; one op moves at most one chunk.
    pub chunk_size: usize,
    /// Ring entries: ops in flight at most.
    pub queue_depth: u32,
    /// Requests the worker works on at once.
    pub max_requests: usize,
    /// Client connections the worker serves at once ([`Device::serve`]).
    pub max_connections: usize,
    /// While connections have had at most two requests in flight lately,
    /// the worker polls this long for a completion before it sleeps (zero:
    /// never).
    pub poll: Duration,
    /// Retry a lock another process holds for this long.
    pub lock_wait: Duration,
    /// Once a FLUSH or FUA write came, a small first write into an empty MiB
    /// of the overlay copies the backing's data over that MiB first and
    /// makes all of it the overlay's, so a FLUSH after later writes there
    /// costs one sync, not two. Off, only written sectors become the
    /// overlay's (tools that build the smallest overlay).
    pub copy_up: bool,
    /// Poison pool chunks when they are freed (tests: use after free shows).
    pub poison_on_free: bool,
    /// Tests: log every write and sync the device issues (power-loss states).
    pub recorder: Option<Arc<Recorder>>,
    /// Tests: make chosen disk ops fail (EIO from below, say).
    pub faults: Option<Arc<Faults>>,
}

impl Default for DeviceOptions {
    fn default() -> DeviceOptions {
        DeviceOptions {
            read_only: false,
            backing: None,
            backing_dir: None,
            cache: Cache::None,
            pool_size: 64 << 20,
            chunk_size: 128 << 10,
            queue_depth: 256,
            max_requests: 256,
            max_connections: 256,
            poll: Duration::from_micros(50),
            lock_wait: Duration::from_secs(2),
            copy_up: true,
            poison_on_free: false,
            recorder: None,
            faults: None,
        }
    }
}

impl DeviceOptions {
    /// Bytes per pool chunk as [`Device::open`] uses them: `chunk_size` made
    /// a power of two of at least 4096. Also the smallest pool that works.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_size.max(4096).next_power_of_two()
    }
}

/// Why a device could not be opened or used.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{}: cannot set up io_uring", path.display())]
    Ring {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} of {len} bytes at offset {offset}: {errno}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        errno: Errno,
    },
    #[error("the device's worker thread failed")]
    Worker,
}

/// An open block device. Cheap to share behind an `Arc`.
pub struct Device {
    capacity: u64,
    read_only: bool,
    max_io: u64,
    pool: BufPool,
    seq: Arc<Sequencer>,
    intake: Arc<Intake>,
    waker: Waker,
    closing: Arc<AtomicBool>,
    stop_conns: Arc<AtomicBool>,
    worker: Mutex<Option<JoinHandle<Result<(), Errno>>>>,
    failure: Arc<failure::FailureWatch>,
    path: PathBuf,
    backing: Option<PathBuf>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Device {
    /// Opens `path` (an overlay or a raw image) and starts its worker.
    pub fn open(path: &Path, opts: &DeviceOptions) -> Result<Device, DeviceError> {
        let img = image::open(
            path,
            &image::OpenOptions {
                read_only: opts.read_only,
                backing: opts.backing.clone(),
                backing_dir: opts.backing_dir.clone(),
                cache: opts.cache,
                lock_wait: opts.lock_wait,
            },
        )?;
        let chunk_size = opts.chunk_bytes();
        if opts.pool_size < chunk_size {
            return Err(PoolError::Config(format!(
                "a pool of {} bytes is smaller than one {chunk_size}-byte chunk",
                opts.pool_size
            ))
            .into());
        }
        // A pool that is not a whole number of chunks is rounded down.
        let chunks = opts.pool_size / chunk_size;
        // The largest request takes up to 64 chunks; keep the reserve (the
        // head of the line's guarantee) at most half the pool.
        let reserve = (chunks / 2).clamp(1, crate::engine::bufpool::MAX_REQUEST_CHUNKS);
        let pool = BufPool::new(PoolConfig {
            chunk_size,
            chunks,
            reserve,
            lock_memory: false,
            poison_on_free: opts.poison_on_free,
        })?;
        // One sector of alignment slack on each side of a request.
        let max_io = (reserve * chunk_size) as u64 - 1024;
        let (capacity, read_only) = (img.capacity, img.read_only);
        let backing = img.overlay.as_ref().map(|o| o.backing.path.clone());
        let intake = Arc::new(Intake::default());
        let closing = Arc::new(AtomicBool::new(false));
        let stop_conns = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(Sequencer::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let failure = Arc::new(failure::FailureWatch::default());
        let spawn = {
            let setup = worker::Setup {
                pool: pool.clone(),
                seq: seq.clone(),
                intake: intake.clone(),
                closing: closing.clone(),
                stop_conns: stop_conns.clone(),
                depth: opts.queue_depth,
                max_requests: opts.max_requests.max(1),
                max_conns: opts.max_connections,
                max_io,
                poll: opts.poll,
                copy_up: opts.copy_up,
                recorder: opts.recorder.clone(),
                faults: opts.faults.clone(),
            };
            let path = path.to_path_buf();
            let (failure, closing) = (failure.clone(), closing.clone());
            std::thread::Builder::new()
                .name("ubd-device".into())
                .spawn(move || {
                    // The ring is made on the thread that uses it.
                    let worker = worker::Worker::new(img, setup);
                    match worker {
                        Ok(w) => {
                            let _ = tx.send(Ok(w.waker()));
                            // Fires on a panic too; the worker, dropped
                            // first, has ended every request and connection.
                            let mut guard = failure::FailGuard {
                                watch: &failure,
                                failed: None,
                            };
                            let result = w.run();
                            if let Err(e) = result
                                && !closing.load(Ordering::SeqCst)
                            {
                                guard.failed = Some(format!("io_uring failed: {}", e.desc()));
                            }
                            result
                        }
                        Err(source) => {
                            let _ = tx.send(Err(DeviceError::Ring { path, source }));
                            Ok(())
                        }
                    }
                })
        };
        let handle = spawn.map_err(|source| DeviceError::Ring {
            path: path.to_path_buf(),
            source,
        })?;
        let waker = match rx.recv() {
            Ok(Ok(waker)) => waker,
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => return Err(DeviceError::Worker),
        };
        Ok(Device {
            capacity,
            read_only,
            max_io,
            pool,
            seq,
            intake,
            waker,
            closing,
            stop_conns,
            worker: Mutex::new(Some(handle)),
            failure,
            path: path.to_path_buf(),
            backing,
        })
    }

    /// The overlay (or raw image) the device was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing file reads go to, fully resolved (symlinks and `..`);
    /// `None` for a raw image.
    pub fn backing_file(&self) -> Option<&Path> {
        self.backing.as_deref()
    }

    /// The device's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The largest READ or WRITE one request may carry.
    pub fn max_io(&self) -> u64 {
        self.max_io
    }

    /// The device's buffer pool (stats, fault injection).
    pub fn pool(&self) -> &BufPool {
        &self.pool
    }

    fn chunks_for(&self, offset: u64, len: u64) -> Result<usize, Errno> {
        chunks_for(offset, len, self.max_io, self.pool.chunk_size())
    }

    /// Buffers for a READ or WRITE of `len` bytes at `offset`; waits in the
    /// pool's line while in-flight I/O returns memory.
    pub fn alloc(&self, offset: u64, len: u64) -> Result<Chunks, Errno> {
        let n = self.chunks_for(offset, len)?;
        self.pool.alloc(n).map_err(|_| Errno::EINVAL)
    }

    /// Like [`Device::alloc`], but never waits.
    pub fn try_alloc(&self, offset: u64, len: u64) -> Option<Chunks> {
        let n = self.chunks_for(offset, len).ok()?;
        self.pool.try_alloc(n)
    }

    /// Checks a request against the device; the errno NBD wants otherwise.
    fn validate(&self, req: &Request) -> Result<(), Errno> {
        check_request(req, self.capacity, self.read_only, self.max_io)?;
        if self.closing.load(Ordering::SeqCst) {
            return Err(Errno::ESHUTDOWN);
        }
        Ok(())
    }

    /// Serves a client's connection on the device's worker: its requests
    /// go through the device's ring with the socket I/O (see
    /// [`Protocol`]). `buffered` holds bytes already read from it. The
    /// returned handle says when the connection has ended; the device then
    /// has closed its handle on the socket.
    pub fn serve(
        &self,
        socket: OwnedFd,
        buffered: Vec<u8>,
        protocol: Box<dyn Protocol>,
    ) -> Arc<ConnDone> {
        let done = Arc::new(ConnDone::default());
        let nc = conn::NewConn {
            socket,
            buffered,
            protocol,
            done: done.clone(),
        };
        if self.closing.load(Ordering::SeqCst) {
            done.set(ConnEnd::Broken("the device is closing".into()));
        } else if let Err(nc) = self.intake.push_conn(nc) {
            nc.done
                .set(ConnEnd::Broken("the device's worker is gone".into()));
        } else {
            self.waker.wake();
        }
        done
    }

    /// Winds the served connections down (a server shutting down): each
    /// answers the requests it reads from now on with ESHUTDOWN, finishes
    /// the ones it started, and closes once nothing is owed and no request
    /// is partly received, unless it refused one (then it waits for the
    /// client to end it; the server cuts it after a grace). Connections
    /// served later start wound down.
    pub fn stop_connections(&self) {
        self.stop_conns.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Runs `hook` (once, on the worker's thread, so it must not block)
    /// when the device's worker fails while the device is open: the host's
    /// io_uring failed under it, or it panicked. At once if it has failed.
    /// The device then ends every request with an error and serves nothing.
    pub fn on_failure(&self, hook: Box<dyn FnOnce() + Send>) {
        self.failure.on_failure(hook);
    }

    /// Why the device's worker failed while the device was open, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.failure()
    }

    /// Hands `req` to the device; `sink` hears its end. Requests enter in
    /// ticket order; a request the device refuses ends at once.
    pub fn submit(&self, req: Request, sink: Arc<dyn Sink>) {
        self.submit_quiet(req, sink);
        self.kick();
    }

    /// Like [`Device::submit`], but leaves waking the worker to a later
    /// [`Device::kick`], so a caller with several requests in hand pays for
    /// one wake-up. The caller must `kick` before it waits for anything.
    pub fn submit_quiet(&self, req: Request, sink: Arc<dyn Sink>) {
        if let Err(errno) = self.validate(&req) {
            sink.complete(req.token, Err(errno));
            return;
        }
        let ticket = self.seq.enter();
        self.intake.push(req, sink);
        drop(ticket);
    }

    /// Wakes the worker for requests handed over with `submit_quiet`.
    pub fn kick(&self) {
        self.waker.wake();
    }

    /// Like [`Device::submit`], but gives the request back instead of waiting
    /// for its turn when other requests are entering.
    // The request comes back by value: boxing it would allocate per try.
    #[allow(clippy::result_large_err)]
    pub fn try_submit(&self, req: Request, sink: Arc<dyn Sink>) -> Result<(), Request> {
        if let Err(errno) = self.validate(&req) {
            sink.complete(req.token, Err(errno));
            return Ok(());
        }
        let Some(ticket) = self.seq.try_enter() else {
            return Err(req);
        };
        self.intake.push(req, sink);
        drop(ticket);
        self.waker.wake();
        Ok(())
    }

    /// Stops intake, finishes every request, flushes, and releases the ring,
    /// the pool and the files. Returns the first error of the final flush.
    pub fn close(&self) -> Result<(), DeviceError> {
        self.closing.store(true, Ordering::SeqCst);
        self.waker.wake();
        let handle = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match handle.map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(errno))) => Err(DeviceError::Io {
                op: "final flush",
                offset: 0,
                len: 0,
                errno,
            }),
            Some(Err(_)) => Err(DeviceError::Worker),
        }
    }

    /// Runs one request and waits for its end (for tests, tools and the
    /// command line; servers use `submit`).
    pub fn call(&self, req: Request) -> Result<Reply, Errno> {
        let waiter = Arc::new(Waiter::default());
        self.submit(req, waiter.clone());
        waiter.wait()
    }

    fn call_simple(
        &self,
        command: Command,
        offset: u64,
        len: u64,
        flags: Flags,
    ) -> Result<(), DeviceError> {
        let op = match command {
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write zeroes",
            Command::Cache => "cache",
            _ => "request",
        };
        self.call(Request {
            command,
            offset,
            len,
            flags,
            data: None,
            token: 0,
        })
        .map(drop)
        .map_err(|errno| DeviceError::Io {
            op,
            offset,
            len,
            errno,
        })
    }

    /// `(device offset, range of the caller's buffer)` pieces of at most
    /// `max_io` bytes covering `len` bytes at `offset`.
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (u64, Range<usize>)> {
        let max = self.max_io as usize;
        (0..len)
            .step_by(max.max(1))
            .map(move |done| (offset + done as u64, done..(done + max).min(len)))
    }

    /// Reads `buf.len()` bytes at `offset`, in pieces of at most `max_io`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        for (at, range) in self.pieces(offset, buf.len()) {
            let n = range.len();
            let io_err = |errno| DeviceError::Io {
                op: "read",
                offset: at,
                len: n as u64,
                errno,
            };
            let data = self.alloc(at, n as u64).map_err(io_err)?;
            let reply = self
                .call(Request {
                    command: Command::Read,
                    offset: at,
                    len: n as u64,
                    flags: Flags::default(),
                    data: Some(data),
                    token: 0,
                })
                .map_err(io_err)?;
            let Reply::Data(chunks) = reply else {
                return Err(io_err(Errno::EIO));
            };
            chunks.copy_to_at((at % 512) as usize, &mut buf[range]);
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, in pieces of at most `max_io`.
    pub fn write_at(&self, offset: u64, buf: &[u8], flags: Flags) -> Result<(), DeviceError> {
        for (at, range) in self.pieces(offset, buf.len()) {
            let n = range.len();
            let io_err = |errno| DeviceError::Io {
                op: "write",
                offset: at,
                len: n as u64,
                errno,
            };
            let mut data = self.alloc(at, n as u64).map_err(io_err)?;
            data.copy_from_at((at % 512) as usize, &buf[range]);
            self.call(Request {
                command: Command::Write,
                offset: at,
                len: n as u64,
                flags,
                data: Some(data),
                token: 0,
            })
            .map_err(io_err)?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), DeviceError> {
        self.call_simple(Command::Flush, 0, 0, Flags::default())
    }

    pub fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.call_simple(Command::Trim, offset, len, Flags::default())
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, flags: Flags) -> Result<(), DeviceError> {
        self.call_simple(Command::WriteZeroes, offset, len, flags)
    }

    pub fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.call_simple(Command::Cache, offset, len, Flags::default())
    }

    /// Where `offset..offset + len` reads from, as runs from `offset` on:
    /// at most some 65,000 of them, so over a fragmented range they may end
    /// early (ask again from there).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let reply = self
            .call(Request {
                command: Command::BlockStatus,
                offset,
                len,
                flags: Flags::default(),
                data: None,
                token: 0,
            })
            .map_err(|errno| DeviceError::Io {
                op: "block status",
                offset,
                len,
                errno,
            })?;
        match reply {
            Reply::Extents(e) => Ok(e),
            _ => Ok(Vec::new()),
        }
    }
}

/// Pool chunks a READ or WRITE of `len` bytes at `offset` needs (with its
/// data at byte `offset % 512`), or EINVAL past `max_io`.
pub(crate) fn chunks_for(
    offset: u64,
    len: u64,
    max_io: u64,
    chunk_size: usize,
) -> Result<usize, Errno> {
    if len > max_io {
        return Err(Errno::EINVAL);
    }
    let bytes = (offset % 512 + len).next_multiple_of(512).max(512);
    Ok(bytes.div_ceil(chunk_size as u64) as usize)
}

/// Checks a request against a device of `capacity` bytes; the errno NBD
/// wants otherwise.
pub(crate) fn check_request(
    req: &Request,
    capacity: u64,
    read_only: bool,
    max_io: u64,
) -> Result<(), Errno> {
    let writes = matches!(
        req.command,
        Command::Write | Command::WriteZeroes | Command::Trim
    );
    if writes && read_only {
        return Err(Errno::EPERM);
    }
    if req.offset > capacity || req.len > capacity - req.offset {
        return Err(if writes { Errno::ENOSPC } else { Errno::EINVAL });
    }
    if matches!(req.command, Command::Read | Command::Write) {
        let need = (req.offset % 512 + req.len).next_multiple_of(512);
        match &req.data {
            Some(c) if c.bytes() as u64 >= need && req.len <= max_io => {}
            _ => return Err(Errno::EINVAL),
        }
    }
    Ok(())
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A one-shot sink a thread can wait on.
#[derive(Default)]
pub struct Waiter {
    result: Mutex<Option<Result<Reply, Errno>>>,
    ready: Condvar,
}

impl Waiter {
    /// Blocks until the request ends.
    pub fn wait(&self) -> Result<Reply, Errno> {
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = slot.take() {
                return result;
            }
            slot = self
                .ready
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Sink for Waiter {
    fn complete(&self, _token: u64, result: Result<Reply, Errno>) {
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(result);
        self.ready.notify_one();
    }
}
