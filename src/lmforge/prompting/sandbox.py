"""Run untrusted Python (the `python` tool) in a separate, limited process.

Layers, outermost first, each standing where the one before fails: (1) a new network namespace
(`unshare(CLONE_NEWNET)`; where the kernel refuses, the audit hook refuses sockets instead and
`SandboxResult.network` says which held); (2) a throw-away uid when run as root, so RLIMIT_NPROC
applies and every process of that uid can be killed afterwards; (3) setrlimit limits, a
wall-clock timeout on the process group and an output cap; (4) `python -I -S` in an empty
temporary directory with a stripped environment and a PEP 578 audit hook refusing files outside
it, exec/spawn/system/subprocess and ctypes. An audit hook alone is no security boundary; here it
sits inside the OS limits (docs/prompting.md, *The Python sandbox*).
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000

# runs before the user's code (read from stdin): installs the audit hook, then executes the code
PRELUDE = r'''
import sys, os
import math, cmath, json, re, itertools, collections, fractions, decimal, statistics, random, datetime, string, \
    functools, operator, heapq, bisect, textwrap, unicodedata, copy, dataclasses, typing, enum, socket, encodings.idna
if sys.argv[1] != "-":  # root: drop to the throw-away uid (the modules above stay loaded)
    os.setgroups([])
    os.setgid(int(sys.argv[1]))
    os.setuid(int(sys.argv[1]))
code = sys.stdin.read()
sys.stdin.close()
_cwd = os.path.realpath(os.getcwd())
_read_roots = tuple(os.path.realpath(p) for p in sys.argv[2:])
_refused_events = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "socket.connect",
                   "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "os.startfile", "pty.spawn")
_refused_imports = ("ctypes", "_ctypes", "_posixsubprocess", "mmap")
def _inside(path, roots):
    p = os.path.realpath(path)
    return any(p == r or p.startswith(r + os.sep) for r in roots)
def _hook(event, args):
    if event == "open":
        path, mode = args[0], args[1]
        if isinstance(path, int):
            return
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if isinstance(mode, int):
            writing = bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if _inside(path, (_cwd,)) or (not writing and _inside(path, _read_roots)):
            return
        raise PermissionError(f"sandbox: access to {path!r} is not allowed (only the working directory)")
    if event in ("os.listdir", "os.scandir", "os.chdir") and args and args[0] is not None:
        path = args[0]
        if isinstance(path, int):
            raise PermissionError("sandbox: directory file descriptors are not allowed")
        if not _inside(os.fsdecode(path) if isinstance(path, bytes) else path, (_cwd,)):
            raise PermissionError(f"sandbox: access to {path!r} is not allowed (only the working directory)")
    elif event.startswith(_refused_events) or event == "sys.addaudithook":
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event == "import" and args[0] and args[0].split(".")[0] in _refused_imports:
        raise ImportError(f"sandbox: import of {args[0]} is not allowed")
sys.addaudithook(_hook)
del _hook
exec(compile(code, "<python tool>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds, then the process group is killed
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20  # address space
    max_processes: int = 16  # for the sandbox's own uid (when we are root), else for ours
    max_file_bytes: int = 1 * 2**20
    max_open_files: int = 64
    max_output: int = 64 * 2**10  # stdout + stderr bytes


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    output_truncated: bool
    network: str  # "namespace" (no network at all) | "audit-hook" (the fallback)
    killed: bool  # by the timeout, the output limit or a signal (CPU, memory)


def _libc_unshare(flags: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _preexec(limits: SandboxLimits, netns_ok: list):
    """Runs in the child between fork and exec: a new session, the namespace, the limits. The
    uid is dropped by the prelude after Python started (its files may be unreadable to that uid)."""
    def setup():
        os.setsid()
        if _libc_unshare(CLONE_NEWNET):
            os.write(netns_ok[1], b"1")
        os.close(netns_ok[1])
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return setup


def _processes_of(uid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                for line in (d / "status").read_text().splitlines():
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(d.name))
                        break
            except (OSError, ValueError):
                continue
    return pids


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb keeps forking)."""
    for _ in range(100):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in the sandbox; returns what it printed and how it ended. Never raises for
    anything the code does."""
    limits = limits or SandboxLimits()
    root = os.geteuid() == 0
    uid = random.SystemRandom().randrange(200_000, 2**31 - 2) if root else None
    workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    read_roots = sorted({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")} | {os.path.join(sys.base_prefix, "lib")})
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    r, w = os.pipe()
    killed = timed_out = truncated = False
    out, err = bytearray(), bytearray()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", PRELUDE, str(uid) if uid is not None else "-", *read_roots], cwd=workdir, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_preexec(limits, [r, w]), pass_fds=(w,), close_fds=True)
        os.close(w)
        w = None
        network = "namespace" if os.read(r, 1) == b"1" else "audit-hook"
        try:
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + limits.timeout
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        open_streams = 2
        while open_streams:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = killed = True
                break
            for key, _ in sel.select(timeout=min(left, 0.1)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                key.data.extend(chunk)
                if len(out) + len(err) > limits.max_output:
                    truncated = killed = True
                    open_streams = 0
                    break
        sel.close()
        if killed:
            _kill_group(proc.pid)
        try:
            returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = killed = True
            _kill_group(proc.pid)
            returncode = proc.wait()
        _kill_group(proc.pid)  # children left in the group
        if uid is not None:
            kill_uid(uid)  # and any that left the group
        proc.stdout.close()
        proc.stderr.close()
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
        shutil.rmtree(workdir, ignore_errors=True)
    if returncode is not None and returncode < 0:
        killed = True
    cap = limits.max_output
    return SandboxResult(bytes(out[:cap]).decode("utf-8", "replace"), bytes(err[: max(0, cap - len(out))]).decode("utf-8", "replace"),
                         returncode, timed_out, truncated, network, killed)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
