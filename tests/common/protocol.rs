//! A [`Protocol`] for device tests that serve connections: every input is
//! answered with what its closure says; it sends nothing, owes nothing, and
//! is drained at any time.

use nix::errno::Errno;
use ubd::device::{ConnCx, Protocol, Reply, SendBuf, Step};

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
