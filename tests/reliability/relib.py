"""Helpers shared by the reliability drivers: run `ubd serve`, wait for it,
sample its memory and file descriptors."""

import ctypes
import os
import signal
import socket
import subprocess
import time


class ServerError(Exception):
    pass


def _die_with_parent():
    """In the child: SIGKILL when the driver dies, so no server outlives it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Server:
    """`ubd serve FILE --socket SOCK ARGS...`, stderr to LOG."""

    def __init__(self, ubd, image, sock, log, args=(), prefix=()):
        self.sock = sock
        self.log = log
        if os.path.exists(sock):
            os.unlink(sock)  # left by a killed server
        cmd = list(prefix) + [ubd, "serve", image, "--socket", sock] + list(args)
        self.cmd = " ".join(cmd)
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent
            )
        self.pid = self.proc.pid

    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def wait_ready(self, limit=30.0):
        """Waits until the socket accepts a connection."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ServerError("%s exited with %s before serving:\n%s" % (self.cmd, self.proc.returncode, self.stderr()))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.sock)
                return
            except OSError:
                pass
            finally:
                s.close()
            if time.monotonic() - start > limit:
                raise ServerError("%s did not accept connections within %.0f s" % (self.cmd, limit))
            time.sleep(0.01)

    def kill(self):
        """SIGKILL, reaped."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, limit=60.0):
        """SIGTERM; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ServerError("%s did not exit within %.0f s of SIGTERM" % (self.cmd, limit))

    def stderr(self):
        try:
            with open(self.log, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""


def rss_kib(pid):
    """VmRSS of `pid` in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ServerError("no VmRSS for pid %d" % pid)


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def random_file(path, size, seed):
    """A file of `size` pseudo-random bytes; returns them."""
    import random

    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data
