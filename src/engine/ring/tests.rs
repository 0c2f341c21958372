use super::*;
use crate::engine::aligned::AlignedBuf;
use std::io::Write;

fn ring_over(data: &[u8]) -> (tempfile::NamedTempFile, Ring<AlignedBuf>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap(),
    );
    let ring = Ring::new(8, 4, vec![file], 0, None).unwrap();
    (f, ring)
}

fn op(kind: OpKind, offset: u64, len: u64, slot: Option<u32>, tag: u64) -> Op {
    Op {
        kind,
        file: 0,
        offset,
        len,
        buf: slot.map(|slot| BufRef {
            slot,
            segment: 0,
            offset: 0,
        }),
        tag,
    }
}

fn collect(ring: &mut Ring<AlignedBuf>) -> Vec<Completion> {
    let mut out = Vec::new();
    ring.drain(&mut |c| out.push(c)).unwrap();
    out
}

#[test]
fn writes_then_reads_back_and_stops_short_at_eof() {
    let (_f, mut ring) = ring_over(&[0u8; 8192]);
    let mut buf = AlignedBuf::new(4096, 4096).unwrap();
    buf.as_mut_slice().fill(0x5A);
    ring.attach(0, buf).unwrap();
    ring.push(op(OpKind::Write, 4096, 4096, Some(0), 1))
        .unwrap();
    // Busy: neither readable nor detachable while the write is in flight.
    assert!(ring.buf(0).is_none() && ring.detach(0).is_none());
    ring.push(op(OpKind::Fdatasync, 0, 0, None, 2)).unwrap();
    let done = collect(&mut ring);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(ring.detach(0).is_some());
    ring.attach(1, AlignedBuf::new(8192, 4096).unwrap())
        .unwrap();
    ring.push(op(OpKind::Read, 2048, 8192, Some(1), 3)).unwrap();
    let done = collect(&mut ring);
    assert_eq!(done[0].tag, 3);
    assert_eq!(done[0].result, Ok(6144));
    let data = ring.buf(1).unwrap().as_slice();
    assert!(data[..2048].iter().all(|&b| b == 0));
    assert!(data[2048..6144].iter().all(|&b| b == 0x5A));
}

/// Two buffers as one set of two segments.
#[derive(Debug)]
struct Pair([AlignedBuf; 2]);

// SAFETY: two distinct heap allocations owned by the value.
unsafe impl BufSet for Pair {
    fn segments(&self) -> usize {
        2
    }
    fn segment(&self, i: usize) -> (*mut u8, usize) {
        self.0[i.min(1)].segment(0)
    }
}

#[test]
fn an_op_spans_segments_with_vectored_io() {
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&data).unwrap();
    let file = Arc::new(std::fs::File::open(f.path()).unwrap());
    let mut ring: Ring<Pair> = Ring::new(8, 1, vec![file], 0, None).unwrap();
    let pair = Pair([
        AlignedBuf::new(4096, 4096).unwrap(),
        AlignedBuf::new(4096, 4096).unwrap(),
    ]);
    ring.attach(0, pair).unwrap();
    // 6144 bytes from offset 1024: 3072 into the first, 3072 into the second.
    let mut read = op(OpKind::Read, 1024, 6144, Some(0), 1);
    read.buf = Some(BufRef {
        slot: 0,
        segment: 0,
        offset: 1024,
    });
    ring.push(read).unwrap();
    let mut done = Vec::new();
    ring.drain(&mut |c| done.push(c)).unwrap();
    assert_eq!(done[0].result, Ok(6144));
    let pair = ring.detach(0).unwrap();
    assert_eq!(&pair.0[0].as_slice()[1024..], &data[1024..4096]);
    assert_eq!(&pair.0[1].as_slice()[..3072], &data[4096..7168]);
    // Past the last segment: EINVAL.
    ring.attach(0, pair).unwrap();
    let mut long = op(OpKind::Read, 0, 8193, Some(0), 2);
    long.buf = Some(BufRef {
        slot: 0,
        segment: 0,
        offset: 0,
    });
    ring.push(long).unwrap();
    let mut done = Vec::new();
    ring.drain(&mut |c| done.push(c)).unwrap();
    assert_eq!(done[0].result, Err(libc::EINVAL));
}

#[test]
fn bad_ops_complete_with_an_error() {
    let (_f, mut ring) = ring_over(&[0u8; 512]);
    ring.attach(0, AlignedBuf::new(512, 512).unwrap()).unwrap();
    ring.push(op(OpKind::Read, 0, 1024, Some(0), 1)).unwrap();
    ring.push(op(OpKind::Read, 0, 512, None, 2)).unwrap();
    let mut bad_file = op(OpKind::Fsync, 0, 0, None, 3);
    bad_file.file = 7;
    ring.push(bad_file).unwrap();
    ring.push(op(OpKind::Read, 0, 512, Some(3), 4)).unwrap();
    let mut done = collect(&mut ring);
    done.sort_by_key(|c| c.tag);
    let errs: Vec<_> = done.iter().map(|c| c.result).collect();
    assert_eq!(
        errs,
        vec![
            Err(libc::EINVAL),
            Err(libc::EFAULT),
            Err(libc::EBADF),
            Err(libc::EFAULT)
        ]
    );
    assert!(ring.attach(0, AlignedBuf::new(1, 1).unwrap()).is_err());
    assert!(ring.attach(9, AlignedBuf::new(1, 1).unwrap()).is_err());
}

/// A transfer of no bytes names no memory: it completes with 0, and is
/// not handed to the kernel with the address of some other op's buffer
/// (or none, which a fixed-buffer op refuses with EFAULT).
#[test]
fn transfers_of_no_bytes_complete_with_zero() {
    let (_f, mut ring) = ring_over(&[0u8; 4096]);
    ring.attach(0, AlignedBuf::new(4096, 4096).unwrap())
        .unwrap();
    ring.push(op(OpKind::Write, 0, 0, Some(0), 1)).unwrap();
    ring.push(op(OpKind::Read, 512, 0, Some(0), 2)).unwrap();
    let mut done = collect(&mut ring);
    done.sort_by_key(|c| c.tag);
    let results: Vec<_> = done.iter().map(|c| c.result).collect();
    assert_eq!(results, vec![Ok(0), Ok(0)]);
}

#[test]
fn the_table_bounds_ops_in_flight() {
    let (_f, mut ring) = ring_over(&[0u8; 512]);
    let room = ring.room();
    assert!(room >= 1);
    for tag in 0..room as u64 {
        ring.push(op(OpKind::Nop, 0, 0, None, tag)).unwrap();
    }
    let refused = ring.push(op(OpKind::Nop, 0, 0, None, 99)).unwrap_err();
    assert_eq!(refused.tag, 99);
    assert_eq!(collect(&mut ring).len(), room);
    assert_eq!(ring.in_flight(), 0);
    ring.push(refused).unwrap();
    assert_eq!(collect(&mut ring).len(), 1);
}

#[test]
fn socket_ops_receive_some_receive_all_and_send_all() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut ring: Ring<AlignedBuf> = Ring::new(8, 3, Vec::new(), 2, None).unwrap();
    let sock = ring
        .add_file(Arc::new(std::fs::File::from(std::os::fd::OwnedFd::from(
            ours,
        ))))
        .unwrap();
    let stream_op = |kind, slot, len, tag| Op {
        kind,
        file: sock,
        offset: 0,
        len,
        buf: Some(BufRef {
            slot,
            segment: 0,
            offset: 0,
        }),
        tag,
    };
    // A receive completes with what has arrived.
    theirs.write_all(b"hello").unwrap();
    ring.attach(0, AlignedBuf::new(4096, 4096).unwrap())
        .unwrap();
    ring.push(stream_op(OpKind::Recv, 0, 4096, 1)).unwrap();
    let done = collect(&mut ring);
    assert_eq!(done[0].result, Ok(5));
    assert_eq!(&ring.buf(0).unwrap().as_slice()[..5], b"hello");
    // A receive-all waits for every byte, across several sends.
    ring.attach(1, AlignedBuf::new(8192, 4096).unwrap())
        .unwrap();
    ring.push(stream_op(OpKind::RecvAll, 1, 6000, 2)).unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..6 {
            theirs.write_all(&[7u8; 1000]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        theirs
    });
    let done = collect(&mut ring);
    let mut theirs = writer.join().unwrap();
    assert_eq!(done[0].result, Ok(6000));
    assert!(
        ring.buf(1).unwrap().as_slice()[..6000]
            .iter()
            .all(|&b| b == 7)
    );
    // A send puts out every byte; the file stays while ops use it.
    let mut out = AlignedBuf::new(1 << 20, 4096).unwrap();
    out.as_mut_slice().fill(9);
    ring.attach(2, out).unwrap();
    ring.push(stream_op(OpKind::Send, 2, 1 << 20, 3)).unwrap();
    assert_eq!(ring.file_ops(sock), 1);
    assert!(ring.remove_file(sock).is_none());
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 1 << 20];
        theirs.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 9));
        theirs
    });
    let done = collect(&mut ring);
    assert_eq!(done[0].result, Ok(1 << 20));
    let theirs = reader.join().unwrap();
    // The peer's close ends a receive-all short, and a receive with 0.
    drop(theirs);
    ring.push(stream_op(OpKind::RecvAll, 1, 100, 4)).unwrap();
    ring.push(stream_op(OpKind::Recv, 0, 100, 5)).unwrap();
    let mut done = collect(&mut ring);
    done.sort_by_key(|c| c.tag);
    assert_eq!((done[0].result, done[1].result), (Ok(0), Ok(0)));
    assert!(ring.remove_file(sock).is_some());
    let again = ring.add_file(Arc::new(tempfile::tempfile().unwrap()));
    assert_eq!(again.ok(), Some(sock), "a freed index is reused");
}

#[test]
fn a_waker_ends_a_wait() {
    let (_f, mut ring) = ring_over(&[0u8; 512]);
    let waker = ring.waker();
    let t = std::thread::spawn(move || {
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            waker.wake();
        }
    });
    // Returns once woken, with nothing completed.
    let n = ring.run(true, &mut |_| {}).unwrap();
    assert_eq!(n, 0);
    t.join().unwrap();
}

#[test]
fn a_wait_limit_ends_a_wait_with_or_without_the_kernels_timed_wait() {
    for timed in [true, false] {
        let (_f, mut ring) = ring_over(&[0u8; 512]);
        // Without: as on kernels before 5.11, a timer op bounds the wait.
        ring.timed_enter &= timed;
        ring.set_wait_limit(Some(Duration::from_millis(20)));
        // A watchdog wakes the ring if a wait is not bounded (and keeps
        // waking it, so the test ends), and says so.
        let waker = ring.waker();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let dog = std::thread::spawn(move || {
            let mut hung = false;
            let mut patience = Duration::from_secs(60);
            while rx.recv_timeout(patience).is_err() {
                hung = true;
                patience = Duration::from_millis(100);
                waker.wake();
            }
            hung
        });
        // Three waits in a row: the timer is armed again after it fired.
        for _ in 0..3 {
            ring.announce_sleep();
            assert_eq!(ring.run(true, &mut |_| {}).unwrap(), 0);
        }
        tx.send(()).unwrap();
        assert!(
            !dog.join().unwrap(),
            "a wait was not bounded (timed: {timed})"
        );
        // The limit lifted, the ring still completes ops as before.
        ring.set_wait_limit(None);
        ring.attach(0, AlignedBuf::new(512, 512).unwrap()).unwrap();
        ring.push(op(OpKind::Read, 0, 512, Some(0), 7)).unwrap();
        let done = collect(&mut ring);
        assert_eq!((done.len(), done[0].tag, done[0].result), (1, 7, Ok(512)));
    }
}
