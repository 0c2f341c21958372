//! Listeners and connections: accept clients on Unix and TCP sockets (or on
//! sockets systemd passed in), run each connection's handshake on its own
//! thread, hand the connection to its export's device for the transmission
//! phase (the thread then waits for its end), and shut down cleanly when
//! asked.
//!
//! Shutdown (invariant 3): stop accepting, remove the socket files we made,
//! close the read side of every connection so no new request starts, let
//! each connection answer what it started, and only then return, so the
//! caller can close the devices (which drains and flushes them).

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};
use thiserror::Error;

use super::export::Exports;
use super::handshake::{self, HandshakeError};
use super::stream::{Input, Stream};
use super::tls::Tls;
use super::transmission::{self, End};

/// How long a client may take over its whole handshake, by default.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(60);
/// After an accept error that would repeat at once (out of descriptors),
/// how long the listeners rest, and how often the error is logged.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
/// At shutdown, how long a client told of it (ESHUTDOWN) gets to send DISC
/// before nothing more is read from it.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Then, how long connections get to answer what they started before
/// their sockets are cut entirely.
const DRAIN_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("{}: {what}", path.display())]
    Socket {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: another server is listening on this socket", .0.display())]
    SocketInUse(PathBuf),
    #[error("cannot listen on {addr}")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("LISTEN_FDS: {0}")]
    Activation(String),
    #[error("waiting for connections")]
    Poll(#[source] io::Error),
    /// Each failed export's file, and why it failed.
    #[error("{}; the server stopped", device_failures(failed))]
    DeviceFailed { failed: Vec<(String, String)> },
}

fn device_failures(failed: &[(String, String)]) -> String {
    let each: Vec<String> = failed
        .iter()
        .map(|(file, why)| format!("{file}: the device failed: {why}"))
        .collect();
    each.join("; ")
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// `path` is removed at shutdown, or when the listener is dropped, if
    /// we created it and it is still ours (`file`: its device and inode).
    Unix {
        listener: UnixListener,
        path: Option<PathBuf>,
        file: Option<(u64, u64)>,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on a Unix socket at `path`. A stale socket file (nobody
    /// listening) is replaced; a live one is an error.
    pub fn unix(path: &Path) -> Result<Listener, ServerError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse(path.to_path_buf()));
            }
            let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            });
            if !is_socket {
                return Err(ServerError::Socket {
                    path: path.to_path_buf(),
                    what: "exists and is not a socket",
                    source: io::Error::other("refusing to replace it (is --socket mistyped?)"),
                });
            }
            std::fs::remove_file(path).map_err(|source| ServerError::Socket {
                path: path.to_path_buf(),
                what: "cannot remove the stale socket",
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Socket {
            path: path.to_path_buf(),
            what: "cannot listen",
            source,
        })?;
        let file = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Listener::Unix {
            listener,
            path: Some(path.to_path_buf()),
            file,
        })
    }

    /// Listens on TCP `addr:port`.
    pub fn tcp(addr: &str, port: u16) -> Result<Listener, ServerError> {
        let text = if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        };
        TcpListener::bind(&text)
            .map(Listener::Tcp)
            .map_err(|source| ServerError::Tcp { addr: text, source })
    }

    /// Whether systemd passed this process sockets (`LISTEN_PID` is us,
    /// `LISTEN_FDS` > 0).
    pub fn activated() -> bool {
        crate::engine::inherit::listen_fds().is_some()
    }

    /// The sockets systemd passed, or `None` when the process was not
    /// socket-activated (or they were taken already).
    pub fn from_activation() -> Result<Option<Vec<Listener>>, ServerError> {
        let Some(fds) = crate::engine::inherit::take_listen_fds() else {
            return Ok(None);
        };
        let mut listeners = Vec::new();
        for (fd, owned) in fds {
            let owned =
                owned.ok_or_else(|| ServerError::Activation(format!("fd {fd} is not open")))?;
            let addr = getsockname::<SockaddrStorage>(owned.as_raw_fd())
                .map_err(|e| ServerError::Activation(format!("fd {fd} is not a socket: {e}")))?;
            // A listening stream socket (systemd's Accept=no), not a
            // connection or a datagram socket.
            let stream = getsockopt(&owned, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
            let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
            if !stream || !listening {
                return Err(ServerError::Activation(format!(
                    "fd {fd} is not a listening stream socket (with systemd, Accept=no)"
                )));
            }
            let listener = match addr.family() {
                Some(AddressFamily::Unix) => Listener::Unix {
                    listener: UnixListener::from(owned),
                    path: None,
                    file: None,
                },
                Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                    Listener::Tcp(TcpListener::from(owned))
                }
                other => {
                    return Err(ServerError::Activation(format!(
                        "fd {fd} is a socket of family {other:?}, not Unix or TCP"
                    )));
                }
            };
            listeners.push(listener);
        }
        Ok(Some(listeners))
    }

    /// Where clients reach export `export` on it, as an NBD URI; `tls`: the
    /// connection must use TLS (the `nbds` schemes).
    pub fn uri(&self, tls: bool, export: &str) -> String {
        match self {
            Listener::Unix { listener, path, .. } => {
                let path = path
                    .clone()
                    .or_else(|| {
                        listener
                            .local_addr()
                            .ok()
                            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                    })
                    .unwrap_or_default();
                // Absolute, for a client in another directory, unless that
                // is too long for a socket address (108 bytes).
                let path = std::path::absolute(&path)
                    .ok()
                    .filter(|p| p.as_os_str().len() < 108)
                    .unwrap_or(path);
                super::uri::unix(tls, &path, export)
            }
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => super::uri::tcp(tls, a, export),
                Err(_) => format!("nbd{}://?", if tls { "s" } else { "" }),
            },
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Unix { listener, .. } => listener.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }

    /// Removes the socket file we created, unless another has replaced it
    /// (a server started after this one stopped listening).
    fn remove(&self) {
        if let Listener::Unix {
            path: Some(p),
            file: Some(id),
            ..
        } = self
        {
            let ours = std::fs::symlink_metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == *id);
            if ours {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Drop for Listener {
    /// A server that fails after it started listening (a second listener,
    /// the pid file) leaves no socket file behind.
    fn drop(&mut self) {
        self.remove();
    }
}

/// Where a connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In its handshake, which must end by then (if there is a limit).
    Handshake(Option<Instant>),
    /// Its handshake ran out of time, and its socket was shut down.
    Cut,
    Serving,
}

/// The live connections, so shutdown can reach their sockets.
#[derive(Default)]
struct Registry {
    streams: Mutex<HashMap<u64, (Stream, Phase)>>,
}

impl Registry {
    fn shutdown_all(&self, how: Shutdown) {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        for (s, _) in streams.values() {
            let _ = s.shutdown(how);
        }
    }

    /// Ends the connections still in their handshake.
    fn shutdown_handshakes(&self) {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        for (s, _) in streams
            .values()
            .filter(|(_, phase)| *phase != Phase::Serving)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Ends the handshakes that ran past their time; returns when the next
    /// one still going does.
    fn cut_slow_handshakes(&self, now: Instant) -> Option<Instant> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next: Option<Instant> = None;
        for (id, (s, phase)) in streams.iter_mut() {
            match *phase {
                Phase::Handshake(Some(t)) if t <= now => {
                    tracing::info!(id, peer = %s.peer(), "handshake took too long: closing");
                    let _ = s.shutdown(Shutdown::Both);
                    // Closed: no need to look at it again.
                    *phase = Phase::Cut;
                }
                Phase::Handshake(Some(t)) => next = Some(next.map_or(t, |n| n.min(t))),
                Phase::Handshake(None) | Phase::Cut | Phase::Serving => {}
            }
        }
        next
    }

    /// Whether connection `id`'s handshake was cut for taking too long.
    fn was_cut(&self, id: u64) -> bool {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams
            .get(&id)
            .is_some_and(|(_, phase)| *phase == Phase::Cut)
    }

    fn serving(&self, id: u64) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = streams.get_mut(&id) {
            entry.1 = Phase::Serving;
        }
    }

    fn len(&self) -> usize {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A connection's place in the registry, given up on drop.
struct Entry {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.registry
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Serves `exports` on `listeners` until `stop` is signalled, or an
/// export's device fails (an error then), and drains every connection.
/// Accepts at most `max_connections` at once (more are closed at once, with
/// a log line); a connection still in its handshake after
/// `handshake_limit` is closed.
pub fn run(
    exports: &Exports,
    listeners: &[Listener],
    stop: &EventFd,
    max_connections: usize,
    handshake_limit: Duration,
    tls: Option<Arc<Tls>>,
) -> Result<(), ServerError> {
    for l in listeners {
        l.set_nonblocking().map_err(ServerError::Poll)?;
    }
    // A failed device ends every request and connection with an error:
    // stop, as on a signal, so that whoever runs the server hears of it
    // (and may restart it) rather than clients being turned away.
    let failed = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(|e| ServerError::Poll(e.into()))?,
    );
    for export in exports.iter() {
        let failed = failed.clone();
        export.device.on_failure(Box::new(move || {
            let _ = failed.write(1);
        }));
    }
    let registry = Arc::new(Registry::default());
    let ids = AtomicU64::new(0);
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut resting = false;
    let mut accept_failed: Option<Instant> = None;
    let result = loop {
        let now = Instant::now();
        let next_cut = registry.cut_slow_handshakes(now);
        // Resting after an accept error: the listeners are not polled.
        let mut fds: Vec<PollFd<'_>> = listeners
            .iter()
            .filter(|_| !resting)
            .map(|l| PollFd::new(l.fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(failed.as_fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
        let wake = match (resting, next_cut) {
            (true, Some(t)) => Some(t.min(now + ACCEPT_BACKOFF)),
            (true, None) => Some(now + ACCEPT_BACKOFF),
            (false, t) => t,
        };
        let timeout = match wake {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
        };
        resting = false;
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Err(ServerError::Poll(e.into())),
        }
        let signalled = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let (stopping, failing) = match fds.as_slice() {
            [.., f, s] => (signalled(s), signalled(f)),
            _ => (false, false),
        };
        if failing {
            let mut failed = Vec::new();
            for e in exports.iter() {
                if let Some(why) = e.device.failure() {
                    let file = e.device.path().display().to_string();
                    tracing::error!(export = %e.name, "{file}: the device failed: {why}; stopping the server");
                    failed.push((file, why));
                }
            }
            break Err(ServerError::DeviceFailed { failed });
        }
        if stopping {
            break Ok(());
        }
        let ready: Vec<bool> = fds
            .iter()
            .take(fds.len() - 2)
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        threads.retain(|t| !t.is_finished());
        for (l, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            let stream = match l.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // The client went before it was accepted.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of descriptors or memory: the listener stays
                    // readable, so rest rather than spin, and say so now
                    // and then.
                    if accept_failed.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
                        tracing::warn!("accepting a connection: {e}; trying again shortly");
                        accept_failed = Some(Instant::now());
                    }
                    resting = true;
                    continue;
                }
            };
            if registry.len() >= max_connections {
                tracing::warn!(
                    "refusing a connection from {}: {max_connections} are open",
                    stream.peer()
                );
                continue;
            }
            let id = ids.fetch_add(1, Ordering::Relaxed);
            // No limit when zero, or too far off to count.
            let by = (!handshake_limit.is_zero())
                .then(|| Instant::now().checked_add(handshake_limit))
                .flatten();
            match spawn_connection(
                id,
                stream,
                by,
                exports.clone(),
                registry.clone(),
                tls.clone(),
            ) {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!("cannot start a connection thread: {e}"),
            }
        }
    };
    // Each connection answers what it read, refuses what comes next with
    // ESHUTDOWN, and closes once nothing is owed; handshakes end at once.
    // (Before the socket files go: a client that sees them gone is then
    // refused.)
    for export in exports.iter() {
        export.device.stop_connections();
    }
    for l in listeners {
        l.remove();
    }
    registry.shutdown_handshakes();
    let wait = |grace: Duration| {
        let deadline = Instant::now() + grace;
        while registry.len() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait(STOP_GRACE);
    if registry.len() > 0 {
        // Clients that were told and did not leave: nothing more is read
        // from them, and what they sent before is answered.
        tracing::info!(
            "{} connections still open after {STOP_GRACE:?}; reading no more from them",
            registry.len()
        );
        registry.shutdown_all(Shutdown::Read);
        wait(DRAIN_GRACE);
    }
    if registry.len() > 0 {
        tracing::warn!(
            "{} connections did not finish within {DRAIN_GRACE:?}; cutting them",
            registry.len()
        );
        registry.shutdown_all(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
    result
}

/// Stack of a connection's thread, which only negotiates and then waits for
/// the device's worker to serve the connection: small, as a process under a
/// data limit pays for every stack it maps.
const CONN_STACK: usize = 128 * 1024;

fn spawn_connection(
    id: u64,
    stream: Stream,
    handshake_by: Option<Instant>,
    exports: Exports,
    registry: Arc<Registry>,
    tls: Option<Arc<Tls>>,
) -> io::Result<JoinHandle<()>> {
    let handle = stream.try_clone()?;
    registry
        .streams
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, (handle, Phase::Handshake(handshake_by)));
    let spawned = std::thread::Builder::new()
        .name(format!("ubd-nbd-{id}"))
        .stack_size(CONN_STACK)
        .spawn({
            let registry = registry.clone();
            move || {
                // Leaves the registry however the connection ends (a panic too).
                let entry = Entry { registry, id };
                connection(&entry, stream, &exports, tls.as_deref());
            }
        });
    if spawned.is_err() {
        registry
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
    spawned
}

fn connection(entry: &Entry, stream: Stream, exports: &Exports, tls: Option<&Tls>) {
    let id = entry.id;
    let peer = stream.peer();
    let mut input = Input::new(stream);
    let label = format!("{id} ({peer})");
    let session = match handshake::negotiate(&mut input, exports, tls, &label) {
        Ok(s) => s,
        Err(HandshakeError::Aborted) => {
            tracing::debug!(id, %peer, "the client ended the handshake");
            input.close();
            return;
        }
        // The cut was logged; what the handshake met then follows from it.
        Err(e) if entry.registry.was_cut(id) => {
            tracing::debug!(id, %peer, "after the cut, the handshake ended: {e}");
            input.close();
            return;
        }
        Err(e) => {
            tracing::info!(id, %peer, "handshake failed: {e}");
            input.close();
            return;
        }
    };
    entry.registry.serving(id);
    tracing::info!(
        id,
        %peer,
        export = %session.export.name,
        style = ?session.style,
        tls = session.tls,
        "connection open"
    );
    let (socket, buffered, bridge) = input.into_parts();
    let export = &session.export.name;
    match transmission::serve(socket, buffered, &session, id) {
        End::Disconnect | End::Closed => tracing::info!(id, %peer, %export, "connection closed"),
        End::Stopped => {
            tracing::info!(id, %peer, %export, "connection closed: the server is shutting down")
        }
        End::Broken(why) => tracing::warn!(id, %peer, %export, "connection closed: {why}"),
    }
    // The worker has closed its end; the bridge still sends what it left
    // there. The connection stays registered until then, so shutdown waits
    // for it and can cut its socket.
    if let Some(bridge) = bridge {
        let _ = bridge.join();
    }
}
