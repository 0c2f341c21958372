//! TLS (`STARTTLS`): the server's certificate, and a bridge thread per
//! connection that upgrades.
//!
//! Once `STARTTLS` is acknowledged, the client's socket goes to a bridge
//! thread, which runs the TLS session (rustls) and passes the plaintext
//! through one end of a Unix socket pair. The handshake and then the
//! transmission phase go on over the other end exactly as over a plain
//! connection, so the device's worker moves a TLS client's requests through
//! its ring like any other's. A TLS connection costs one more thread and a
//! plaintext copy through the pair; the host kernel has no kernel TLS to hand
//! the session to.
//!
//! The bridge half-closes as the two sides do: a client that stops sending
//! (or a shutdown that closes the read side of its socket) becomes an end of
//! input on the pair, while the replies to what it started still go out; the
//! server's end of the pair closing becomes a TLS `close_notify`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;

use super::stream::{Input, Stream};
use super::x509;

/// The server's certificate chain in the certificates directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key in the certificates directory.
pub const SERVER_KEY: &str = "server-key.pem";
/// The certificate authority that signs clients' certificates.
pub const CA_CERT: &str = "ca-cert.pem";

/// Bytes moved per read or write, each way: ciphertext read from the
/// client's socket at once (rustls itself reads 4 KiB at a time), plaintext
/// held for the pair, and what the session may hold encrypted.
const CHUNK: usize = 128 * 1024;
/// Stack of a bridge thread (rustls's handshake needs more than the
/// connection threads' 128 KiB).
const BRIDGE_STACK: usize = 512 * 1024;

/// Whether clients may or must upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `STARTTLS` is offered; plain connections are served too.
    On,
    /// Every option but `STARTTLS` and `ABORT` is refused until TLS is up.
    Require,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: String },
    #[error("{}: {what}", dir.display())]
    Config { dir: PathBuf, what: String },
}

/// The server's TLS configuration.
pub struct Tls {
    config: Arc<ServerConfig>,
    mode: TlsMode,
    /// Certificates that are not valid now, each naming its file and date.
    warnings: Vec<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

/// The certificates in the PEM file `path` (at least one).
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |what: String| TlsError::File {
        path: path.to_path_buf(),
        what,
    };
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read certificates: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {}", pem_error(&e))))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".to_string()));
    }
    Ok(certs)
}

/// The private key in the PEM file `path`.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |what: String| TlsError::File {
        path: path.to_path_buf(),
        what,
    };
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read the private key: {e}")))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        // rustls reads no encrypted key, and would call one "no items"
        // (PKCS #8) or a base64 error (openssl's legacy form).
        let lossy = String::from_utf8_lossy(&text);
        if lossy.contains("ENCRYPTED PRIVATE KEY") || lossy.contains("Proc-Type: 4,ENCRYPTED") {
            return bad(
                "the private key is encrypted (it has a passphrase); ubd reads \
                 unencrypted keys only: `openssl pkey -in KEY -out NEW` writes one \
                 (keep it private: mode 600)"
                    .to_string(),
            );
        }
        bad(match e {
            pem::Error::NoItemsFound => "no private key in the file (a PEM block \
                 BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)"
                .to_string(),
            e => format!("cannot read the private key: {}", pem_error(&e)),
        })
    })
}

/// A PEM error in words (rustls's own shows the marker as a list of bytes).
fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "no \"-----END {}-----\" line: the file is cut off",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("bad BEGIN line {:?}", String::from_utf8_lossy(line))
        }
        e => e.to_string(),
    }
}

/// A warning for each certificate of `certs` (read from `path`) that is not
/// valid at `now` (Unix seconds); `consequence` says what that breaks.
fn date_warnings(
    path: &Path,
    certs: &[CertificateDer<'_>],
    now: i64,
    consequence: &str,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for (i, cert) in certs.iter().enumerate() {
        let Some(v) = x509::validity(cert) else {
            continue;
        };
        let which = match certs.len() {
            1 => String::new(),
            n => format!(" (certificate {} of {n})", i + 1),
        };
        let file = path.display();
        if now > v.not_after.0 {
            warnings.push(format!(
                "{file}{which}: the certificate expired on {}; {consequence}",
                v.not_after.1
            ));
        } else if now < v.not_before.0 {
            warnings.push(format!(
                "{file}{which}: the certificate is not valid before {} (is this \
                 machine's clock right?); until then {consequence}",
                v.not_before.1
            ));
        }
    }
    warnings
}

/// Which certificate of `chain` after the first (counting from 1) `key`
/// belongs to, if any: a chain written CA first.
fn key_owner(
    chain: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
    provider: &rustls::crypto::CryptoProvider,
) -> Option<usize> {
    let key = provider.key_provider.load_private_key(key).ok()?;
    chain.iter().enumerate().skip(1).find_map(|(i, cert)| {
        rustls::sign::CertifiedKey::new(vec![cert.clone()], key.clone())
            .keys_match()
            .is_ok()
            .then_some(i + 1)
    })
}

/// A warning when the private key's file is open to other users: whoever
/// can read it can pass for the server.
fn key_mode_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{}: the private key is open to other users (mode {mode:03o}); \
             make it private: chmod 600 {}",
            path.display(),
            path.display()
        )
    })
}

impl Tls {
    /// Loads `dir`'s `server-cert.pem` and `server-key.pem` (the layout
    /// qemu-nbd's and nbdkit's certificate directories have). With
    /// `verify_peer`, clients must present a certificate that `ca-cert.pem`
    /// signed.
    pub fn load(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<Tls, TlsError> {
        let config_error = |what: String| TlsError::Config {
            dir: dir.to_path_buf(),
            what,
        };
        let cert_path = dir.join(SERVER_CERT);
        let certs = load_certs(&cert_path)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut warnings = date_warnings(
            &cert_path,
            &certs,
            now,
            "clients that check it will refuse the server",
        );
        let key_path = dir.join(SERVER_KEY);
        let key = load_key(&key_path)?;
        warnings.extend(key_mode_warning(&key_path));
        // ring, not rustls's default aws-lc-rs, which would add a large C
        // build to every build of the project; ring lacks only the
        // post-quantum key exchanges, and clients fall back to X25519 or
        // ECDHE on the NIST curves.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(e.to_string()))?;
        let builder = if verify_peer {
            let mut roots = RootCertStore::empty();
            let ca_path = dir.join(CA_CERT);
            let cas = load_certs(&ca_path)?;
            warnings.extend(date_warnings(
                &ca_path,
                &cas,
                now,
                "client certificates will not verify against it",
            ));
            for cert in cas {
                roots.add(cert).map_err(|e| TlsError::File {
                    path: ca_path.clone(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| config_error(format!("client verification: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let v1 = x509::version(&certs[0]) == Some(1);
        let (chain, key_copy) = (certs.clone(), key.clone_key());
        let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                match key_owner(&chain, key_copy, &provider) {
                    Some(n) => TlsError::File {
                        path: cert_path.clone(),
                        what: format!(
                            "the server's certificate must come first, then the ones that \
                             signed it: {} is the private key of certificate {n} here, \
                             not of the first",
                            key_path.display()
                        ),
                    },
                    None => TlsError::File {
                        path: key_path.clone(),
                        what: format!("not the private key of {}", cert_path.display()),
                    },
                }
            }
            rustls::Error::InvalidCertificate(_) if v1 => TlsError::File {
                path: cert_path.clone(),
                what: "an X.509 v1 certificate (one without extensions), which rustls \
                       does not accept: make a v3 one, with a subjectAltName for the \
                       server's names (scripts/tls-certs does; `openssl x509 -req` \
                       needs -extfile for it)"
                    .to_string(),
            },
            e => config_error(format!("{SERVER_CERT} and {SERVER_KEY}: {e}")),
        })?;
        // No TLS 1.3 session tickets: an NBD connection lasts, and resuming
        // one saves nothing worth a ticket per connection.
        config.send_tls13_tickets = 0;
        Ok(Tls {
            config: Arc::new(config),
            mode,
            warnings,
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// What is wrong with the certificates but does not stop the server
    /// (one that is expired or not valid yet), a line each naming the file
    /// and the date.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Upgrades `input`'s connection after `STARTTLS` was acknowledged: the
    /// client's socket (and whatever was read from it past the option) goes
    /// to a new bridge thread, and `input` reads the plaintext from then on.
    /// `label` names the connection in the bridge's log lines.
    pub fn upgrade(&self, input: &mut Input, label: String) -> io::Result<()> {
        let mut conn = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(CHUNK));
        let (plain, ours) = UnixStream::pair()?;
        plain.set_read_timeout(input.stream().read_timeout()?)?;
        ours.set_nonblocking(true)?;
        let net = input.stream().try_clone()?;
        net.set_nonblocking(true)?;
        let bridge = Bridge {
            conn,
            net,
            plain: ours,
            // Bytes read past the option go to the session first.
            cipher: Window::holding(&input.take_buffered()),
            inbound: Window::new(),
            outbound: Window::new(),
            net_closed: false,
            net_eof: false,
            plain_shut: false,
            plain_eof: false,
        };
        let thread = std::thread::Builder::new()
            .name("ubd-tls".to_string())
            .stack_size(BRIDGE_STACK)
            .spawn(move || match bridge.run() {
                Ok(()) => tracing::debug!(conn = %label, "TLS session closed"),
                Err(why) => tracing::info!(conn = %label, "TLS session ended: {why}"),
            })?;
        // The bridge owns the client's socket now (through its own handle);
        // the handshake goes on over the plaintext end.
        input.replace_stream(Stream::Unix(plain), thread);
        Ok(())
    }
}

/// One TLS session between the client's socket (`net`) and the plaintext
/// end of the pair (`plain`).
struct Bridge {
    conn: ServerConnection,
    net: Stream,
    plain: UnixStream,
    /// Read from the client's socket, not yet in the session.
    cipher: Window,
    /// Plaintext from the client, not yet in `plain`.
    inbound: Window,
    /// Plaintext for the client, not yet taken by the session.
    outbound: Window,
    /// The client's socket reached its end.
    net_closed: bool,
    /// No more plaintext will come from the client.
    net_eof: bool,
    /// `plain`'s write side is shut (the client's end passed on).
    plain_shut: bool,
    /// The server's side closed (or broke) its end of the pair.
    plain_eof: bool,
}

/// Why `Bridge::pump` stopped the session.
enum Stop {
    /// Writing to the client's socket found it hung up.
    ClientGone(String),
    Failed(String),
}

impl From<String> for Stop {
    fn from(why: String) -> Stop {
        Stop::Failed(why)
    }
}

impl Bridge {
    fn run(mut self) -> Result<(), String> {
        loop {
            match self.pump() {
                Ok(true) => continue,
                Ok(false) => {}
                // The client hung up without waiting for the close_notify
                // that follows the server's end: nothing is lost.
                Err(Stop::ClientGone(_)) if self.plain_eof => return Ok(()),
                Err(Stop::ClientGone(why) | Stop::Failed(why)) => return Err(why),
            }
            if self.plain_eof && self.outbound.is_empty() && !self.conn.wants_write() {
                return Ok(());
            }
            self.wait()?;
        }
    }

    /// Decrypts what the client's socket delivered; a TLS error is sent to
    /// the client as an alert (best effort) and ends the session.
    fn process(&mut self) -> Result<(), String> {
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.conn.write_tls(&mut self.net);
            return Err(format!("TLS: {e}"));
        }
        Ok(())
    }

    /// Moves what can move without blocking; true when something did.
    fn pump(&mut self) -> Result<bool, Stop> {
        let mut moved = false;
        // The client's socket into `cipher`, in large reads.
        if !self.net_closed && self.cipher.is_empty() && self.conn.wants_read() {
            match self.net.read(self.cipher.space()) {
                Ok(0) => {
                    // An empty read tells the session the socket ended.
                    let _ = self.conn.read_tls(&mut io::empty());
                    self.net_closed = true;
                    moved = true;
                }
                Ok(n) => {
                    self.cipher.filled(n);
                    moved = true;
                }
                Err(e) if retry(&e) => {}
                Err(e) => return Err(format!("reading the client's socket: {e}").into()),
            }
        }
        // `cipher` through the session into `inbound`, while it has room:
        // the session takes a record at a time and holds its plaintext
        // until that is read.
        while !self.net_eof && self.inbound.has_space() {
            let mut fed = false;
            if !self.cipher.is_empty() && self.conn.wants_read() {
                let n = self
                    .conn
                    .read_tls(&mut self.cipher.data())
                    .map_err(|e| format!("TLS: {e}"))?;
                self.cipher.consume(n);
                self.process()?;
                fed = n > 0;
            }
            let got = match self.conn.reader().read(self.inbound.space()) {
                Ok(n) => {
                    // 0: the close_notify came.
                    self.net_eof = n == 0;
                    n
                }
                Err(e) if retry(&e) => 0,
                // The client closed its socket without a close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.net_eof = true;
                    0
                }
                Err(e) => return Err(format!("TLS: {e}").into()),
            };
            self.inbound.filled(got);
            if got == 0 && !fed && !self.net_eof {
                break;
            }
            moved = true;
        }
        // `inbound` into the pair.
        if !self.inbound.is_empty() {
            match self.plain.write(self.inbound.data()) {
                Ok(n) => {
                    self.inbound.consume(n);
                    moved = true;
                }
                Err(e) if retry(&e) => {}
                Err(_) => {
                    // The server's side takes nothing more: drop the
                    // client's input, but still send what it wrote until its
                    // end closes.
                    self.inbound.clear();
                    self.net_eof = true;
                    moved = true;
                }
            }
        }
        if self.net_eof && self.inbound.is_empty() && !self.plain_shut {
            let _ = self.plain.shutdown(Shutdown::Write);
            self.plain_shut = true;
            moved = true;
        }
        // The pair into `outbound`.
        if !self.plain_eof && self.outbound.is_empty() {
            match self.plain.read(self.outbound.space()) {
                Ok(n @ 1..) => {
                    self.outbound.filled(n);
                    moved = true;
                }
                Err(e) if retry(&e) => {}
                // Closed, or broken: the session ends with a close_notify.
                Ok(0) | Err(_) => {
                    self.plain_eof = true;
                    self.conn.send_close_notify();
                    moved = true;
                }
            }
        }
        // `outbound` into the session.
        if !self.outbound.is_empty() {
            let n = self
                .conn
                .writer()
                .write(self.outbound.data())
                .map_err(|e| format!("TLS: {e}"))?;
            self.outbound.consume(n);
            moved = moved || n > 0;
        }
        // The session into the client's socket.
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.net) {
                Ok(_) => moved = true,
                Err(e) if retry(&e) => break,
                Err(e) => {
                    let why = format!("writing the client's socket: {e}");
                    return Err(match e.kind() {
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                            Stop::ClientGone(why)
                        }
                        _ => Stop::Failed(why),
                    });
                }
            }
        }
        Ok(moved)
    }

    /// Sleeps until one of the sockets can do what the bridge waits for.
    fn wait(&self) -> Result<(), String> {
        let mut net = PollFlags::empty();
        if !self.net_closed && self.cipher.is_empty() && self.conn.wants_read() {
            net |= PollFlags::POLLIN;
        }
        if self.conn.wants_write() {
            net |= PollFlags::POLLOUT;
        }
        let mut plain = PollFlags::empty();
        if !self.plain_eof && self.outbound.is_empty() {
            plain |= PollFlags::POLLIN;
        }
        if !self.inbound.is_empty() {
            plain |= PollFlags::POLLOUT;
        }
        // A socket the bridge waits on for nothing stays out of the set:
        // its hang-up would wake the poll at once, again and again.
        let mut fds = [
            PollFd::new(self.net.as_fd(), net),
            PollFd::new(self.plain.as_fd(), plain),
        ];
        let fds = match (net.is_empty(), plain.is_empty()) {
            (false, false) => &mut fds[..],
            (false, true) => &mut fds[..1],
            (true, false) => &mut fds[1..],
            (true, true) => return Err("stalled: nothing left to wait for".to_string()),
        };
        match poll(fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(format!("poll: {e}")),
        }
    }
}

/// A buffer of `CHUNK` bytes of which `buf[at..end]` holds data not yet
/// passed on; allocated (and zeroed) once.
struct Window {
    buf: Box<[u8]>,
    at: usize,
    end: usize,
}

impl Window {
    fn new() -> Window {
        Window::holding(&[])
    }

    /// A window holding `data` (more than `CHUNK` bytes make it larger).
    fn holding(data: &[u8]) -> Window {
        let mut buf = vec![0; CHUNK.max(data.len())].into_boxed_slice();
        buf[..data.len()].copy_from_slice(data);
        Window {
            buf,
            at: 0,
            end: data.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.at == self.end
    }

    fn has_space(&self) -> bool {
        self.is_empty() || self.end < self.buf.len()
    }

    /// The data not yet passed on.
    fn data(&self) -> &[u8] {
        &self.buf[self.at..self.end]
    }

    /// Where more data goes (the whole buffer once it is empty).
    fn space(&mut self) -> &mut [u8] {
        if self.is_empty() {
            self.clear();
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written into [`Window::space`].
    fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// `n` bytes of [`Window::data`] were passed on.
    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.end);
    }

    fn clear(&mut self) {
        self.at = 0;
        self.end = 0;
    }
}

/// An error that means "not now".
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
