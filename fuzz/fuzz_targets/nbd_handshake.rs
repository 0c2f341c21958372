//! The handshake must never panic or hang, whatever bytes a client sends.
//! The input's first byte picks the server's TLS setting (its value modulo
//! 3: none, so STARTTLS gets ERR_POLICY; offered; required, so every option
//! but STARTTLS and ABORT gets ERR_TLS_REQD). The rest is the client's side
//! of a connection (its flags, then options in any order, with any lengths,
//! and after STARTTLS whatever TLS records it likes), sent to `negotiate`
//! over a socket pair; a thread reads the replies. The server has two
//! exports (the default and "second") of one small read-only image. A
//! TLS session cannot complete (the server's keys are random), so what is
//! fuzzed past STARTTLS is the ClientHello and the bridge's ends.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use ubd::device::{Device, DeviceOptions};
use ubd::nbd::export::{Export, Exports};
use ubd::nbd::handshake::negotiate;
use ubd::nbd::stream::{Input, Stream};
use ubd::nbd::tls::{Tls, TlsMode};

fn exports() -> &'static Exports {
    static EXPORTS: OnceLock<Exports> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ubd-fuzz-handshake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz image's directory");
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).expect("write the fuzz image");
        let options = DeviceOptions {
            read_only: true,
            pool_size: 4 << 20,
            ..DeviceOptions::default()
        };
        let device = Arc::new(Device::open(&image, &options).expect("open the fuzz image"));
        // The device keeps the file open; nothing is left behind.
        let _ = std::fs::remove_dir_all(&dir);
        let export = |name: &str, description: &str| {
            Arc::new(Export {
                name: name.to_string(),
                description: description.to_string(),
                device: device.clone(),
            })
        };
        Exports::new(vec![export("", "the default"), export("second", "")])
    })
}

/// The two TLS settings, with certificates that `scripts/tls-certs` makes
/// once per process.
fn tls() -> &'static [Tls; 2] {
    static TLS: OnceLock<[Tls; 2]> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("ubd-fuzz-handshake-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tls-certs");
        let made = Command::new(&script)
            .arg(&dir)
            .output()
            .expect("run scripts/tls-certs");
        assert!(
            made.status.success(),
            "scripts/tls-certs failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let load =
            |mode| Tls::load(&dir.join("server"), mode, false).expect("load the certificates");
        let tls = [load(TlsMode::On), load(TlsMode::Require)];
        let _ = std::fs::remove_dir_all(&dir);
        tls
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&setting, data)) = data.split_first() else {
        return;
    };
    let tls = match setting % 3 {
        0 => None,
        n => Some(&tls()[n as usize - 1]),
    };
    let exports = exports();
    let (mut client, server) = UnixStream::pair().expect("socket pair");
    let mut replies = client.try_clone().expect("clone the client's socket");
    // The replies are read until the handshake closes its end, so the
    // server never writes to a closed socket.
    let reader = std::thread::spawn(move || {
        let _ = std::io::copy(&mut replies, &mut std::io::sink());
    });
    // The handshake reads at most what was sent: the client's end is shut
    // after it, so a handshake that wants more ends with an error (and one
    // that waits anyway is a hang libFuzzer reports). A write the server
    // refused to read (it closed first) is no failure; its SIGPIPE, which
    // libFuzzer's main does not ignore, is blocked on this thread.
    let writer = {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let pipe = SigSet::from(Signal::SIGPIPE);
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&pipe), None).expect("block SIGPIPE");
            let _ = client.write_all(&data);
            let _ = client.shutdown(Shutdown::Write);
        })
    };
    let mut input = Input::new(Stream::Unix(server));
    let _ = negotiate(&mut input, exports, tls, "fuzz");
    input.close();
    writer.join().expect("the writer");
    reader.join().expect("the reader");
});
