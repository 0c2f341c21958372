//! The handshake must answer any bytes a client sends with replies or an
//! error, never a panic or a hang. The input is the client's side of a
//! connection (its flags, then options in any order, with any lengths), sent
//! to `negotiate` over a socket pair; a thread reads the replies. The server
//! has two exports (the default and "second") of one small read-only image,
//! and no TLS, so STARTTLS gets ERR_POLICY.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ubd::device::{Device, DeviceOptions};
use ubd::nbd::export::{Export, Exports};
use ubd::nbd::handshake::negotiate;
use ubd::nbd::stream::{Input, Stream};

fn exports() -> &'static Exports {
    static EXPORTS: OnceLock<Exports> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        // A write to a socket the handshake closed must fail, not kill the
        // process (a Rust main ignores SIGPIPE; libFuzzer's main does not).
        // SAFETY: setting a signal's disposition to ignore, before any thread
        // of ours starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
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

fuzz_target!(|data: &[u8]| {
    let exports = exports();
    let (mut client, server) = UnixStream::pair().expect("socket pair");
    let mut replies = client.try_clone().expect("clone the client's socket");
    let reader = std::thread::spawn(move || {
        let mut sink = [0u8; 1 << 16];
        while matches!(replies.read(&mut sink), Ok(n) if n > 0) {}
    });
    // The handshake reads at most what was sent: the client's end is shut
    // after it, so a handshake that wants more ends with an error. A write
    // the server refused to read (it closed first) is no failure.
    let writer = {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = client.write_all(&data);
            let _ = client.shutdown(Shutdown::Write);
        })
    };
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut input = Input::new(Stream::Unix(server));
    let _ = negotiate(&mut input, exports, None, "fuzz");
    input.close();
    writer.join().expect("the writer");
    reader.join().expect("the reader");
});
