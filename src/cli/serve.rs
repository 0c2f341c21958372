//! `ubd serve`: export overlays and raw images over NBD.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};
use ubd::device::{Device, DeviceOptions};
use ubd::engine::daemon::{self, Forked, Ready};
use ubd::nbd::export::{Export, Exports};
use ubd::nbd::server::{self, Listener};
use ubd::nbd::tls::{Tls, TlsMode};

use super::units::format_size;
use super::{BackingDir, CacheArg, Outcome};

/// The port NBD servers listen on by default.
const NBD_PORT: u16 = 10809;

/// Serve an overlay (or a raw image) over NBD until stopped.
///
/// Listens on a Unix socket (--socket; by default FILE.sock beside the first
/// export), or on TCP when asked (--bind / --port; then on a Unix socket too
/// only if --socket names one). With systemd socket
/// activation (LISTEN_FDS) it uses the sockets it was given instead. Any
/// number of clients may connect, one after another and at once; they share
/// one device per export, so a FLUSH on one connection covers writes
/// acknowledged on every other.
///
/// SIGTERM or SIGINT: finish what clients started, flush, remove the socket
/// file and exit 0. A second server on the same overlay fails at once (the
/// overlay is locked while served). If an export's device fails while
/// served (the host's io_uring fails under it), the server stops in the same
/// way and exits 1, naming the file, so a supervisor can restart it.
///
/// TLS (--tls-certificates DIR): clients upgrade with STARTTLS, and must
/// unless --tls on. DIR holds server-cert.pem and server-key.pem (and
/// ca-cert.pem for --tls-verify-peer), as for qemu-nbd and nbdkit.
///
/// Examples:
///   ubd serve vm.cow --socket /run/vm.sock
///   ubd serve --export a=one.cow --export b=two.cow --socket /tmp/nbd.sock
///   ubd serve base.img --read-only --bind 127.0.0.1 --port 10809
///   ubd serve vm.cow --bind 0.0.0.0 --tls-certificates /etc/pki/ubd/server
///
/// Then, for example: nbdinfo 'nbd+unix:///?socket=/run/vm.sock'.
/// Logging: RUST_LOG=debug (default info), to stderr.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The overlay or raw image to serve (the default export).
    file: Option<PathBuf>,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address to listen on (with --port; default port 10809).
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// TCP port to listen on (on 127.0.0.1 unless --bind says otherwise).
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// NAME: the export name of FILE. NAME=FILE: one more export (repeatable).
    #[arg(long = "export", value_name = "NAME|NAME=FILE")]
    exports: Vec<String>,
    /// Serve read-only: writes fail with EPERM, and the overlay is opened
    /// read-only.
    #[arg(long)]
    read_only: bool,
    /// Host page cache use for the overlay and backing file.
    #[arg(long, value_enum, default_value_t)]
    cache: CacheArg,
    /// Buffer pool per export (preallocated and registered with io_uring):
    /// at least 128K, rounded down to a multiple of 128K.
    #[arg(long, value_parser = super::parse_pool_size, default_value = "64M")]
    pool_size: u64,
    /// Use this backing file instead of the one the overlay names (one
    /// export only).
    #[arg(long, value_name = "PATH")]
    backing: Option<PathBuf>,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Write the server's pid here once it is serving; removed at exit.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Go on in the background once the sockets are ready: the command
    /// exits 0 when clients can connect, or non-zero with the error when the
    /// server cannot start. Logs are dropped then unless --log-file.
    #[arg(long)]
    fork: bool,
    /// Append the log here instead of writing it to stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Clients connected at once, at most.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a client may take over its whole handshake before it is
    /// disconnected (0: no limit).
    #[arg(long, value_name = "SECONDS", default_value_t = server::HANDSHAKE_LIMIT.as_secs())]
    handshake_limit: u64,
    /// Microseconds the server polls for the next completion before it
    /// sleeps, while clients have had at most two requests in flight lately
    /// (a client at queue depth 1 then gets its reply without a thread
    /// wake-up in the way); 0 turns polling off.
    #[arg(long, value_name = "US", default_value_t = 50)]
    poll_us: u64,
    /// Keep the overlay to the sectors clients wrote: a small first write
    /// into a MiB does not copy that MiB from the backing file, even once a
    /// client has flushed (maps stay exact; a FLUSH after a first write into
    /// a MiB then costs two syncs instead of one).
    #[arg(long)]
    no_copy_up: bool,
    /// Directory with the server's TLS certificate and key (server-cert.pem,
    /// server-key.pem; ca-cert.pem for --tls-verify-peer). Turns TLS on.
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// off: no TLS; on: clients may upgrade with STARTTLS; require: they must
    /// before anything else (the default with --tls-certificates).
    #[arg(long, value_enum)]
    tls: Option<TlsArg>,
    /// With TLS, accept only clients whose certificate DIR/ca-cert.pem
    /// signed.
    #[arg(long)]
    tls_verify_peer: bool,
    /// Testing aid: the buffer pool's fault injection (every buffer
    /// allocation takes the reserve path, as under memory pressure).
    #[arg(long)]
    fail_alloc: bool,
}

/// `--tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TlsArg {
    Off,
    On,
    Require,
}

/// What to serve and how, from `ubd serve` or `ubd demo`.
pub struct Plan {
    /// (export name, file), the first is the default export.
    pub exports: Vec<(String, PathBuf)>,
    pub socket: Option<PathBuf>,
    pub tcp: Option<(String, u16)>,
    /// `--socket`, `--bind` or `--port` was given (not just the default
    /// socket): socket activation ignores them, and says so.
    pub listen_asked: bool,
    pub device: DeviceOptions,
    pub pid_file: Option<PathBuf>,
    pub max_connections: usize,
    pub handshake_limit: std::time::Duration,
    /// Switch on the buffer pool's fault injection on every export.
    pub fail_alloc: bool,
    /// Printed on stdout once clients can connect (after the URIs).
    pub banner: Option<String>,
    /// `STARTTLS`, when offered.
    pub tls: Option<Arc<Tls>>,
    /// `--fork`: serve from a child process; the command returns once it
    /// serves.
    pub fork: bool,
    /// `--log-file`: the log goes there, not to stderr.
    pub log_file: Option<PathBuf>,
}

pub fn run(args: Args) -> Outcome {
    let mut exports = Vec::new();
    let mut default_name = None;
    for spec in &args.exports {
        match spec.split_once('=') {
            Some((name, file)) if !file.is_empty() => {
                exports.push((name.to_string(), PathBuf::from(file)));
            }
            Some(_) => return Err(format!("--export {spec}: give NAME=FILE").into()),
            None if default_name.is_some() => {
                return Err("--export NAME (without =FILE) may be given once".into());
            }
            None => default_name = Some(spec.clone()),
        }
    }
    match (&args.file, default_name) {
        (Some(file), name) => exports.insert(0, (name.unwrap_or_default(), file.clone())),
        (None, Some(name)) => {
            return Err(format!("--export {name} names FILE, but no FILE was given").into());
        }
        (None, None) => {}
    }
    if exports.is_empty() {
        return Err("nothing to serve: give FILE or --export NAME=FILE".into());
    }
    if args.backing.is_some() && exports.len() > 1 {
        return Err("--backing applies to one export; serve the others separately".into());
    }
    let tcp = match (args.bind, args.port) {
        (Some(addr), port) => Some((addr, port.unwrap_or(NBD_PORT))),
        (None, Some(port)) => Some(("127.0.0.1".to_string(), port)),
        (None, None) => None,
    };
    let mode = match (args.tls, &args.tls_certificates) {
        (Some(TlsArg::Off), None) if !args.tls_verify_peer => None,
        (Some(TlsArg::Off), _) => {
            return Err("--tls off contradicts --tls-certificates and --tls-verify-peer".into());
        }
        (None, None) if args.tls_verify_peer => {
            return Err("--tls-verify-peer needs --tls-certificates DIR".into());
        }
        (None, None) => None,
        (Some(_), None) => return Err("--tls on|require needs --tls-certificates DIR".into()),
        (Some(TlsArg::On), Some(_)) => Some(TlsMode::On),
        (Some(TlsArg::Require) | None, Some(_)) => Some(TlsMode::Require),
    };
    let tls = match (mode, &args.tls_certificates) {
        (Some(mode), Some(dir)) => Some(Arc::new(Tls::load(dir, mode, args.tls_verify_peer)?)),
        _ => None,
    };
    let socket = match (&args.socket, &tcp) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(default_socket(&exports[0].1)),
    };
    let listen_asked = args.socket.is_some() || tcp.is_some();
    serve(Plan {
        exports,
        socket,
        tcp,
        listen_asked,
        device: DeviceOptions {
            read_only: args.read_only,
            backing: args.backing,
            backing_dir: args.backing_dir.dir,
            cache: args.cache.mode(),
            pool_size: args.pool_size as usize,
            max_connections: args.max_connections.max(1),
            poll: std::time::Duration::from_micros(args.poll_us),
            copy_up: !args.no_copy_up,
            ..DeviceOptions::default()
        },
        pid_file: args.pid_file,
        max_connections: args.max_connections.max(1),
        handshake_limit: std::time::Duration::from_secs(args.handshake_limit),
        fail_alloc: args.fail_alloc,
        banner: None,
        tls,
        fork: args.fork,
        log_file: args.log_file,
    })
}

/// `FILE.sock` beside FILE.
fn default_socket(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sock");
    file.with_file_name(name)
}

/// Logging for the image tool's other commands: warnings and errors (a
/// device error names its file and offset), to stderr, without timestamps.
pub fn init_tool_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .without_time()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Starts logging at RUST_LOG's level (default info), to stderr or appended
/// to `file`.
pub fn init_logging(file: Option<&Path>) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("{}: cannot open the log file: {e}", path.display()))?;
            fmt.with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .try_init()
        }
        None => fmt
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    Ok(())
}

/// Opens the exports, listens, serves until SIGTERM or SIGINT, then drains,
/// closes the devices (which flushes them) and cleans up.
pub fn serve(plan: Plan) -> Outcome {
    init_logging(plan.log_file.as_deref())?;
    // Before --fork: the command's stderr is still the user's.
    for warning in plan.tls.iter().flat_map(|t| t.warnings()) {
        tracing::warn!("{warning}");
    }
    // Before any thread starts (the signal handler's, the devices'
    // workers): only a single-threaded process forks whole.
    let ready = if plan.fork {
        if Listener::activated() {
            return Err("--fork cannot be used with socket activation (LISTEN_FDS)".into());
        }
        match daemon::fork_when_ready()? {
            Forked::Parent(code) => return Ok(u8::try_from(code).unwrap_or(1)),
            Forked::Child(ready) => Some(ready),
        }
    } else {
        None
    };
    let mut names = std::collections::HashSet::new();
    let mut files = std::collections::HashMap::new();
    for (name, file) in &plan.exports {
        if !names.insert(name.as_str()) {
            return Err(format!("export name {name:?} is given twice").into());
        }
        // One file, two writable exports: each would have its own device
        // over it (read-only, they share it, as two servers may).
        if !plan.device.read_only
            && let Ok(m) = std::fs::metadata(file)
        {
            use std::os::unix::fs::MetadataExt;
            if let Some(other) = files.insert((m.dev(), m.ino()), name.as_str()) {
                return Err(format!(
                    "{}: the same file is given for exports {other:?} and {name:?}",
                    file.display()
                )
                .into());
            }
        }
        if name.len() > 4096 || name.contains('\0') {
            return Err(format!("{}: export name too long or with a NUL", file.display()).into());
        }
    }
    // Signals first, so none between opening and serving is lost.
    let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?);
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (stop, stopping) = (stop.clone(), stopping.clone());
        ctrlc::set_handler(move || {
            stopping.store(true, Ordering::SeqCst);
            let _ = stop.write(1);
        })?;
    }
    let mut exports = Vec::new();
    for (name, file) in &plan.exports {
        let device = Device::open(file, &plan.device)
            .map_err(|e| super::pool_size_error(e, plan.device.pool_size))?;
        device.pool().set_fail_ordinary(plan.fail_alloc);
        if plan.fail_alloc {
            tracing::warn!(export = %name, "--fail-alloc: every buffer allocation takes the reserve path");
        }
        let backing = match device.backing_file() {
            Some(b) => b.display().to_string(),
            None => "none (a raw image)".to_string(),
        };
        tracing::info!(
            export = %name,
            file = %file.display(),
            backing = %backing,
            size = %format_size(device.capacity()),
            read_only = device.read_only(),
            "opened"
        );
        exports.push(Arc::new(Export {
            name: name.clone(),
            description: format!("ubd: {}", file.display()),
            device: Arc::new(device),
        }));
    }
    let exports = Exports::new(exports);
    let listeners = match Listener::from_activation()? {
        Some(l) => {
            if plan.listen_asked {
                tracing::warn!("socket-activated: --socket, --bind and --port are ignored");
            }
            l
        }
        None => {
            let mut l = Vec::new();
            if let Some(path) = &plan.socket {
                l.push(Listener::unix(path)?);
            }
            if let Some((addr, port)) = &plan.tcp {
                l.push(Listener::tcp(addr, *port)?);
            }
            l
        }
    };
    let result = serve_on(&plan, &exports, &listeners, &stop, ready);
    let mut code = 0;
    for export in exports.iter() {
        if let Err(e) = export.device.close() {
            tracing::error!(export = %export.name, "closing: {}", ubd::error_chain(&e));
            code = 1;
        }
    }
    if let Some(p) = &plan.pid_file {
        let _ = std::fs::remove_file(p);
    }
    result?;
    if stopping.load(Ordering::SeqCst) {
        tracing::info!("stopped");
    }
    Ok(code)
}

fn serve_on(
    plan: &Plan,
    exports: &Exports,
    listeners: &[Listener],
    stop: &EventFd,
    ready: Option<Ready>,
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(p) = &plan.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("{}: cannot write the pid file: {e}", p.display()))?;
    }
    if let Some(tls) = &plan.tls {
        let how = match tls.mode() {
            TlsMode::On => "offered",
            TlsMode::Require => "required",
        };
        tracing::info!("TLS {how}");
    }
    let tls_required = matches!(plan.tls.as_ref().map(|t| t.mode()), Some(TlsMode::Require));
    for l in listeners {
        for export in exports.iter() {
            let uri = l.uri(tls_required, &export.name);
            let what = match export.name.as_str() {
                "" => "the default export".to_string(),
                name => format!("export {name:?}"),
            };
            println!("ubd: serving {what} at {uri}");
        }
    }
    if let Some(banner) = &plan.banner {
        println!("{banner}");
    }
    if let Some(ready) = ready {
        ready
            .serving()
            .map_err(|e| format!("--fork: telling the parent the server is up: {e}"))?;
    }
    server::run(
        exports,
        listeners,
        stop,
        plan.max_connections,
        plan.handshake_limit,
        plan.tls.clone(),
    )?;
    Ok(())
}
