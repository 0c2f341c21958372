#!/usr/bin/python3
"""Runs a command with io_uring_setup failing, as a container's default
seccomp profile (or the sysctl kernel.io_uring_disabled) makes it fail.

    deny.py ERRNO COMMAND [ARG...]

A seccomp filter (x86_64 and the generic syscall table: io_uring_setup is
425 in both) returns ERRNO for io_uring_setup and allows everything else.
"""
import ctypes
import os
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
RET_ERRNO, RET_ALLOW = 0x00050000, 0x7FFF0000
IO_URING_SETUP = 425

errno = int(sys.argv[1])
program = [
    (LD_W_ABS, 0, 0, 0),  # the syscall number
    (JEQ_K, 0, 1, IO_URING_SETUP),
    (RET_K, 0, 0, RET_ERRNO | errno),
    (RET_K, 0, 0, RET_ALLOW),
]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))


class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


fprog = Fprog(len(program), ctypes.cast(code, ctypes.c_void_p))
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit(f"deny.py: PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}")
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit(f"deny.py: PR_SET_SECCOMP: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[2], sys.argv[2:])
