//! Helpers for tests that drive a [`Device`] in the test's own process.

use nix::errno::Errno;
use ubd::device::{ConnCx, Device, DeviceOptions, Protocol, Reply, SendBuf, Step};

/// A device over a 1 MiB raw image of zeros in `dir` (made on first use).
pub fn raw_device(dir: &tempfile::TempDir) -> Device {
    let raw = dir.path().join("raw.img");
    if !raw.exists() {
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    }
    Device::open(&raw, &DeviceOptions::default()).unwrap()
}

/// A [`Protocol`] for tests that serve connections: every input is answered
/// with what its closure says; it sends nothing, owes nothing, and is
/// drained at any time.
pub struct Scripted<F>(pub F);

impl<F: FnMut() -> Step + Send> Protocol for Scripted<F> {
    fn input(&mut self, _input: &[u8], _cx: &mut ConnCx<'_>) -> Step {
        (self.0)()
    }

    fn complete(
        &mut self,
        _token: u64,
        _result: Result<Reply, Errno>,
        _out: &mut SendBuf,
    ) -> Option<String> {
        None
    }

    fn input_ended(&mut self, _out: &mut SendBuf) {}
    fn skipped(&mut self, _out: &mut SendBuf) {}
    fn stop(&mut self) {}
    fn drained(&self) -> bool {
        true
    }
}
