"""Run untrusted Python (a model's code and a test file) in a separate, limited process: :func:`run_in_sandbox`.

Linux only (it relies on ``setrlimit`` limits that other systems lack or treat differently, such as
``RLIMIT_AS``).

What the child process gets:

* **Its own process and process group.** ``python -I -S -B`` (isolated mode: no ``PYTHON*`` variables, no user
  site, the working directory not on ``sys.path``; no site-packages at all, so only the standard library imports).
  It starts a new session, so on a timeout the whole group is killed with ``SIGKILL``; the group is killed again
  after a normal exit, which ends anything the code left running in it.
* **A fresh temporary working directory** holding only the given files. It is the process's cwd, ``HOME`` and
  ``TMPDIR``, and it is deleted afterwards. The environment holds only ``PATH``, ``HOME``, ``TMPDIR`` and ``LANG``.
* **Resource limits** (``setrlimit``): CPU seconds (``RLIMIT_CPU``: the timeout rounded up, plus one second),
  address space (``RLIMIT_AS``, ``memory_mb``: a large allocation raises ``MemoryError``), written file size
  (``RLIMIT_FSIZE``), open files (``RLIMIT_NOFILE``), no core dumps, and no new processes or threads
  (``RLIMIT_NPROC = 0``; the kernel does not apply it to root, see below). They are
  set by the bootstrap in the child before any untrusted line runs, not in a ``preexec_fn``: the host is
  multi-threaded (torch, the output readers), where Python documents ``preexec_fn`` as unsafe. Hard and soft limits
  are equal, so the code cannot raise them again.
* **An audit hook** (:pep:`578`, ``sys.addaudithook``; once added it cannot be removed) that refuses, raising
  ``PermissionError``, and reports each refusal in :attr:`SandboxResult.violations`:

  - creating processes: ``os.fork``, ``os.forkpty``, ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``,
    ``subprocess.Popen``, and importing ``_posixsubprocess`` (its ``fork_exec`` raises no audit event of its own),
    so ``subprocess`` and ``multiprocessing`` cannot start anything;
  - signalling other processes: ``os.kill``, ``os.killpg``, ``signal.pthread_kill``;
  - the network: creating any socket (``socket.__new__``), ``connect``, ``bind``, ``sendto``, name look-ups;
  - files: writing, creating, deleting, renaming or changing the mode of anything outside the working directory;
    reading or listing anything outside the working directory and the standard library (plus ``/dev/null`` and
    ``/dev/urandom``); making links (``os.link``, ``os.symlink``);
  - native code and introspection of the guard itself: ``ctypes`` (``dlopen``/``dlsym``/raw memory), importing
    ``ctypes`` or sub-interpreters, ``gc.get_objects``/``get_referrers``/``get_referents``, ``sys.settrace`` and
    ``sys.setprofile``, ``sys._current_frames``.

  The hook runs with its own copy of the builtins and calls no module function the code could replace (only
  ``posix.getcwd`` and ``posix.write``, captured before the code ran), so monkeypatching ``os.path`` or
  ``builtins`` does not change its decisions.

**What this is not.** The audit hook is a Python-level guard, not a kernel sandbox. It stops the ordinary APIs and
the mistakes and naive attempts of model-written code; Python code written to defeat it can (for example by
re-creating a native module through ``_imp``, or through a bug in an extension module). ``RLIMIT_NPROC`` is not
enforced for root (CI runs as root), so there the hook is what stops a fork bomb. Nothing here isolates the
filesystem or the network at the kernel level: run code from a capable, adversarial model inside a container or a
VM (no network, read-only mounts) and treat this module as the inner layer.

**Output.** stdout and stderr are read by threads in chunks; the first ``max_output`` bytes of each are kept and
the rest is read and discarded (so a flood cannot exhaust the host's memory, and the child never blocks on a full
pipe), with :attr:`SandboxResult.stdout_truncated` set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import List, Mapping, Optional, Sequence

__all__ = ["SandboxResult", "run_in_sandbox"]

MAX_VIOLATIONS = 100  # refusals reported in detail; more are counted
_READ_CHUNK = 65536

# The guard, executed in the child inside a private namespace (its own copy of the builtins) before any untrusted
# code runs. `make_hook` returns the audit hook; nothing in the child's modules keeps a reference to it.
_HOOK_SOURCE = r'''
def make_hook(workdir, read_roots, read_files, report_fd, write, getcwd, write_flags, limit):
    process_events = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
        "os.startfile", "os.kill", "os.killpg", "signal.pthread_kill"})
    network_events = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostname", "socket.getnameinfo"})
    guard_events = frozenset({
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "os.link", "os.symlink"})
    blocked_imports = frozenset({
        "_posixsubprocess", "ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters"})
    write_path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.truncate": (0,), "os.utime": (0,),
        "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
    read_path_events = {"os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,)}
    reported = [0]

    def absolute(path):
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        if type(path) is not str:
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "" or part == ".":
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(part)
        return "/" + "/".join(parts)

    def under(path, roots):
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def describe(value):
        kind = type(value)
        if kind is str or kind is bytes or kind is int or kind is float or kind is bool or value is None:
            text = repr(value)
            return text if len(text) <= 200 else text[:200] + "..."
        return "<" + type.__dict__["__name__"].__get__(type(value)) + ">"

    def refuse(event, args):
        detail = ", ".join(describe(a) for a in args)
        reported[0] += 1
        # the first `limit` refusals in full, then one "+" each, so that a loop of refusals cannot flood the pipe
        line = (event + "(" + detail + ")").replace("\n", " ") + "\n" if reported[0] <= limit else "+"
        try:
            write(report_fd, line.encode("utf-8", "replace"))
        except OSError:
            pass
        raise PermissionError("sandbox: " + event + "(" + detail + ") is not allowed")

    def check_path(event, args, path, writing):
        if type(path) is int:  # an open file descriptor: it was opened through this hook
            return
        where = absolute(path)
        if where is None:
            refuse(event, args)
        if writing:
            if not under(where, (workdir,)):
                refuse(event, args)
        elif not (under(where, read_roots) or where in read_files):
            refuse(event, args)

    def hook(event, args):
        if event in process_events or event in network_events or event in guard_events:
            refuse(event, args)
        elif event == "import":
            if type(args[0]) is not str or args[0] in blocked_imports:
                refuse(event, args[:1])
        elif event == "open":
            path, flags = args[0], args[2]
            writing = type(flags) is int and (flags & write_flags) != 0
            check_path(event, args, path, writing)
        elif event in write_path_events:
            for i in write_path_events[event]:
                check_path(event, args, args[i], True)
        elif event in read_path_events:
            for i in read_path_events[event]:
                check_path(event, args, args[i], False)

    return hook
'''

# The child's first code: limits, the guard, then the untrusted module as __main__ (argv: workdir, report fd, the
# rlimits as JSON, the module, its arguments).
_BOOTSTRAP = r'''
import sys
def _start():
    import builtins, json, os, posix, resource, runpy
    workdir, report_fd, limits, module = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    read_roots = tuple(sorted({workdir} | {p for p in sys.path if p and p.startswith("/")}))
    read_files = frozenset({"/dev/null", "/dev/urandom", "/dev/random"})
    flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    private = {"__builtins__": dict(vars(builtins))}
    exec(sys.argv[-1], private)
    sys.addaudithook(private["make_hook"](workdir, read_roots, read_files, report_fd, posix.write, posix.getcwd,
                                          flags, %d))
    del private
    sys.argv = [module] + sys.argv[5:-1]
    sys.path.insert(0, workdir)
    return runpy, module
_runpy, _module = _start()
del _start
_runpy.run_module(_module, run_name="__main__", alter_sys=True)
''' % MAX_VIOLATIONS


@dataclass
class SandboxResult:
    """What happened to one sandboxed run.

    Attributes:
        exit_code: the process's exit status, or None when a signal ended it (then ``killed_by``).
        timed_out: the wall-clock timeout expired and the process group was killed.
        killed_by: the name of the signal that ended the process (``"SIGKILL"`` after a timeout, ``"SIGXCPU"``
            when the CPU limit was hit, ``"SIGXFSZ"`` for the file-size limit), else None.
        memory_exceeded: a guess: ``MemoryError`` in stderr, or death by ``SIGSEGV``/``SIGABRT``/``SIGKILL``
            without a timeout (what allocations failing under ``RLIMIT_AS`` in native code usually look like).
        stdout, stderr: the first ``max_output`` bytes of each, decoded as UTF-8 (errors replaced).
        stdout_truncated, stderr_truncated: more was written than was kept.
        stdout_bytes, stderr_bytes: how many bytes were written in all.
        duration_s: wall-clock seconds from start to the end of the process.
        violations: the audit events the guard refused, in order, as ``event(arguments)`` (the first
            ``MAX_VIOLATIONS``; ``n_violations`` counts them all).
    """

    exit_code: Optional[int]
    timed_out: bool
    killed_by: Optional[str]
    memory_exceeded: bool
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    stdout_bytes: int
    stderr_bytes: int
    duration_s: float
    violations: List[str] = field(default_factory=list)
    n_violations: int = 0

    @property
    def ok(self) -> bool:
        """The process exited by itself with status 0."""
        return self.exit_code == 0 and not self.timed_out

    def to_dict(self) -> dict:
        return asdict(self)


class _CappedReader(threading.Thread):
    """Reads a pipe to its end, keeping the first ``cap`` bytes and counting the rest."""

    def __init__(self, fd: int, cap: int):
        super().__init__(daemon=True)
        self.fd, self.cap = fd, cap
        self.kept = bytearray()
        self.total = 0

    def run(self) -> None:
        try:
            while True:
                chunk = os.read(self.fd, _READ_CHUNK)
                if not chunk:
                    break
                self.total += len(chunk)
                room = self.cap - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]
        except OSError:
            pass


def _check_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or str(path) in (".", ""):
        raise ValueError(f"files: names must be relative paths inside the working directory; got {name!r}")
    return path


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str) -> None:
    def make_writable(func, target, _exc):
        # the code may have taken write permission away from its own files or folders
        parent = os.path.dirname(target)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
        if os.path.lexists(target) and not os.path.islink(target):
            os.chmod(target, os.stat(target).st_mode | stat.S_IRWXU)
        func(target)

    shutil.rmtree(path, onerror=make_writable)


def run_in_sandbox(files: Mapping[str, str], module: str, *, args: Sequence[str] = (), timeout_s: float = 5.0,
                   memory_mb: int = 512, file_size_mb: int = 16, max_open_files: int = 64,
                   max_output: int = 8192) -> SandboxResult:
    """Write ``files`` into a fresh temporary directory and run ``python -m module args...`` there, limited.

    Args:
        files: ``{relative path: source text}`` (UTF-8), e.g. ``{"solution.py": ..., "test_solution.py": ...}``.
        module: the module to run as ``__main__`` (a file among ``files``, without ``.py``).
        args: its command-line arguments (``sys.argv[1:]``).
        timeout_s: wall-clock limit; then the process group is killed (``timed_out``). The CPU-time limit is
            ``ceil(timeout_s) + 1`` seconds.
        memory_mb: address-space limit (``RLIMIT_AS``); the interpreter itself needs about 30 MiB.
        file_size_mb: largest file the code may write (``RLIMIT_FSIZE``; beyond it the process gets ``SIGXFSZ``).
        max_open_files: ``RLIMIT_NOFILE``.
        max_output: bytes of stdout and of stderr kept (each).

    Returns:
        A :class:`SandboxResult`. The temporary directory is deleted before this returns.

    Raises:
        ValueError: a file name that is absolute or leaves the directory, or a non-positive limit.
    """
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("file_size_mb", file_size_mb),
                        ("max_open_files", max_open_files), ("max_output", max_output)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"run_in_sandbox: {name} must be a positive number; got {value!r}")
    paths = {name: _check_name(name) for name in files}
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"run_in_sandbox: module must be a dotted Python module name; got {module!r}")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="emokern-sandbox-"))
    try:
        for name, source in files.items():
            target = Path(workdir, paths[name])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source, encoding="utf-8")
        return _run(workdir, module, list(args), timeout_s, memory_mb, file_size_mb, max_open_files, max_output)
    finally:
        _remove_tree(workdir)


def _run(workdir: str, module: str, args: List[str], timeout_s: float, memory_mb: int, file_size_mb: int,
         max_open_files: int, max_output: int) -> SandboxResult:
    limits = {
        "RLIMIT_CPU": int(math.ceil(timeout_s)) + 1,
        "RLIMIT_AS": int(memory_mb * (1 << 20)),
        "RLIMIT_FSIZE": int(file_size_mb * (1 << 20)),
        "RLIMIT_NOFILE": int(max_open_files),
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": 0,
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    report_read, report_write = os.pipe()
    command = [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, workdir, str(report_write), json.dumps(limits),
               module, *args, _HOOK_SOURCE]
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(report_write,), start_new_session=True)
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
    readers = [_CappedReader(proc.stdout.fileno(), max_output), _CappedReader(proc.stderr.fileno(), max_output),
               _CappedReader(report_read, 1 << 20)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        proc.wait()
    finally:
        duration = time.perf_counter() - started
        _kill_group(proc.pid)  # whatever the code left running in its group
    for reader in readers:
        # a descendant that left the process group may still hold a pipe open: do not wait for it forever
        reader.join(timeout=5.0)
    proc.stdout.close()
    proc.stderr.close()
    os.close(report_read)
    out, err, report = readers
    stderr = err.kept.decode("utf-8", "replace")
    code = proc.returncode
    killed_by = signal.Signals(-code).name if code < 0 else None
    # detailed lines first, then one "+" per further refusal (some of them maybe beyond what was kept)
    detailed, _, more = report.kept.decode("utf-8", "replace").rpartition("\n")
    report_lines = detailed.splitlines()
    memory = ("MemoryError" in stderr
              or (not timed_out and killed_by in ("SIGSEGV", "SIGABRT", "SIGKILL")))
    return SandboxResult(
        exit_code=None if code < 0 else code, timed_out=timed_out, killed_by=killed_by, memory_exceeded=memory,
        stdout=out.kept.decode("utf-8", "replace"), stderr=stderr, stdout_truncated=out.total > len(out.kept),
        stderr_truncated=err.total > len(err.kept), stdout_bytes=out.total, stderr_bytes=err.total,
        duration_s=round(duration, 4), violations=report_lines,
        n_violations=len(report_lines) + len(more) + report.total - len(report.kept))
