"""Run untrusted Python (a model's code and a test file) in a separate, isolated process: :func:`run_in_sandbox`.

Linux only. Two isolation levels, chosen by name with ``sandbox=``; nothing ever falls back from one to the other:

* ``"bwrap"`` (the default): the process runs under bubblewrap (``bwrap``; Debian's ``bubblewrap`` package) in its
  own namespaces, read-only mounts of only what the interpreter needs, a fresh tmpfs as its directory and a seccomp
  filter; inside that, the Python guard below is a second wall. This is the level for code from a capable model.
* ``"python-guard"``: the Python guard alone: a separate process with rlimits and an audit hook. It is not a security
  boundary; it runs only when asked for by name, with a :class:`WeakSandboxWarning`.

When bwrap is not on ``PATH`` or cannot create its namespaces here (user namespaces not permitted), ``"bwrap"``
raises :class:`SandboxUnavailable`, whose message says what to install or which option accepts the weaker guard.
:func:`check_isolation` runs a probe once (a program that tries the network and writes outside its directory; both
must fail) and returns what an experiment records in its result: :func:`sandbox_info` and the probe's findings.

**The bwrap level** is built in :mod:`emokern.experiments.bwrap`, whose docstring lists each of its walls: new
namespaces (user, mount, PID, network, IPC, UTS: no network at all) with every capability dropped and the interpreter
as the PID namespace's process 1; an empty, read-only root with read-only binds of only what the interpreter needs;
a fresh tmpfs of ``workdir_mb`` MiB at :data:`WORKDIR` as the working directory, which vanishes with the namespace;
and a seccomp filter (:func:`seccomp_filter`) that refuses with ``EPERM`` the system calls the namespaces do not
isolate (creating processes and threads, ``ptrace``, mounts, new namespaces and more).

**The Python guard** (the inner wall under ``"bwrap"``, the only one under ``"python-guard"``). The child process:

* **Its own process and process group.** ``python -I -S -B`` (isolated mode: no ``PYTHON*`` variables, no user
  site, the working directory not on ``sys.path``; no site-packages at all, so only the standard library imports),
  run by the base interpreter. It starts a new session, so on a timeout the whole group is killed with ``SIGKILL``;
  the group is killed again after a normal exit, which ends anything the code left running in it.
* **A fresh temporary working directory** holding only the given files (``"python-guard"``: a directory under the
  host's temporary directory, deleted afterwards). It is the process's cwd, ``HOME`` and ``TMPDIR``.
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

**What the guard is not.** The audit hook is a Python-level guard, not a kernel sandbox. It stops the ordinary APIs and
the mistakes and naive attempts of model-written code; Python code written to defeat it can (for example by
re-creating a native module through ``_imp``, through a bug in an extension module, or by writing over its own
memory through ``/proc/self/mem``). ``RLIMIT_NPROC`` is not enforced for root (CI runs as root), so under
``"python-guard"`` the hook is all that stops a fork bomb there; under ``"bwrap"`` the seccomp filter stops it.
Nothing in the guard isolates the filesystem or the network at the kernel level: that is what ``"bwrap"`` adds.

**Exit status.** Under bwrap, a signal that ends the program reaches the caller as bwrap's exit status 128 + n:
:attr:`SandboxResult.killed_by` reads an exit status above 128 as that signal, so a program that itself exits with
such a status is reported as killed by it. As its namespace's PID 1, the program ignores the signals it sends
itself without a handler (the kernel protects a namespace's init): ``os.kill(os.getpid(), SIGKILL)`` returns, and
``os.abort()`` ends in ``SIGSEGV`` instead of ``SIGABRT``; signals of the kernel (faults, limits) and the
timeout's ``SIGKILL`` act as usual.

**Output.** stdout and stderr are read by threads in chunks; the first ``max_output`` bytes of each are kept and
the rest is read and discarded (so a flood cannot exhaust the host's memory, and the child never blocks on a full
pipe), with :attr:`SandboxResult.stdout_truncated` set.

**Overhead.** ``benchmarks/bench_sandbox.py`` measures the wall-clock time of one run under each level, interleaved.
On this project's 2-core AMD EPYC (bubblewrap 0.8.0, one thread, 40 interleaved repetitions), one run of a
three-test candidate took 68.2 ms (median) under ``"bwrap"`` and 67.8 ms under ``"python-guard"``: bwrap adds
2.0 ms per run (median of the paired differences), well under a millisecond per test, and nothing next to the
seconds a model takes to write the candidate. The start-up probe costs 69 ms once per run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import List, Mapping, Optional, Sequence, Tuple

from emokern.experiments.bwrap import (_GUARD_WARNING, _INSTALL, _USERNS, _WEAKER, SANDBOXES, WORKDIR,
                                       SandboxUnavailable, _base_path, _bwrap, _bwrap_arguments, _check_sandbox,
                                       _interpreter, sandbox_info, seccomp_filter)

__all__ = ["MAX_VIOLATIONS", "SANDBOXES", "WORKDIR", "SandboxResult", "SandboxUnavailable", "WeakSandboxWarning",
           "check_isolation", "run_in_sandbox", "sandbox_info", "seccomp_filter"]

MAX_VIOLATIONS = 100  # refusals reported in detail; more are counted
_READ_CHUNK = 65536
# The first line the bootstrap writes on the report pipe, before any untrusted code runs: a run without it never
# got as far as the code, so its failure is the sandbox's (bwrap could not set up, the interpreter did not start).
_STARTED = "emokern-sandbox: started"


class WeakSandboxWarning(UserWarning):
    """Code runs under ``sandbox="python-guard"``: an audit hook and rlimits, not a security boundary."""


# ----------------------------------------------------------------------------------------------------------------------
# The child
# ----------------------------------------------------------------------------------------------------------------------

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

# The child's first code: the started line, limits, the guard (unless its source, the last argument, is empty),
# then the untrusted module as __main__ (argv: workdir, report fd, the rlimits as JSON, the module, its arguments).
_BOOTSTRAP = r'''
import sys
def _start():
    import posix
    posix.write(int(sys.argv[2]), b"%s\n")
    import builtins, json, os, resource, runpy
    workdir, report_fd, limits, module = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if sys.argv[-1]:
        read_roots = tuple(sorted({workdir} | {p for p in sys.path if p and p.startswith("/")}))
        read_files = frozenset({"/dev/null", "/dev/urandom", "/dev/random"})
        flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        private = {"__builtins__": dict(vars(builtins))}
        exec(sys.argv[-1], private)
        sys.addaudithook(private["make_hook"](workdir, read_roots, read_files, report_fd, posix.write,
                                              posix.getcwd, flags, %d))
        del private
    sys.argv = [module] + sys.argv[5:-1]
    sys.path.insert(0, workdir)
    return runpy, module
_runpy, _module = _start()
del _start
_runpy.run_module(_module, run_name="__main__", alter_sys=True)
''' % (_STARTED, MAX_VIOLATIONS)


@dataclass
class SandboxResult:
    """What happened to one sandboxed run.

    Attributes:
        exit_code: the process's exit status, or None when a signal ended it (then ``killed_by``).
        timed_out: the wall-clock timeout expired and the process group (under bwrap: the sandbox) was killed.
        killed_by: the name of the signal that ended the process (``"SIGKILL"`` after a timeout, ``"SIGXCPU"``
            when the CPU limit was hit, ``"SIGXFSZ"`` for the file-size limit), else None.
        memory_exceeded: a guess: ``MemoryError`` in stderr, or death by ``SIGSEGV``/``SIGABRT``/``SIGKILL``
            without a timeout (what allocations failing under ``RLIMIT_AS`` in native code usually look like).
        stdout, stderr: the first ``max_output`` bytes of each, decoded as UTF-8 (errors replaced).
        stdout_truncated, stderr_truncated: more was written than was kept.
        stdout_bytes, stderr_bytes: how many bytes were written in all.
        duration_s: wall-clock seconds from start to the end of the process.
        sandbox: the isolation level it ran under (one of :data:`SANDBOXES`).
        violations: the audit events the guard refused, in order, as ``event(arguments)`` (the first
            ``MAX_VIOLATIONS``; ``n_violations`` counts them all). Empty without the audit hook: what the kernel
            refused reaches the code as an ``OSError``, which only its own output shows.
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
    sandbox: str
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


def run_in_sandbox(files: Mapping[str, str], module: str, *, args: Sequence[str] = (), sandbox: str = "bwrap",
                   timeout_s: float = 5.0, memory_mb: int = 512, file_size_mb: int = 16, workdir_mb: int = 64,
                   max_open_files: int = 64, max_output: int = 8192, audit_hook: bool = True) -> SandboxResult:
    """Put ``files`` in a fresh working directory and run ``python -m module args...`` there, isolated and limited.

    Args:
        files: ``{relative path: source text}`` (UTF-8), e.g. ``{"solution.py": ..., "test_solution.py": ...}``.
        module: the module to run as ``__main__`` (a file among ``files``, without ``.py``).
        args: its command-line arguments (``sys.argv[1:]``).
        sandbox: ``"bwrap"`` (namespaces, seccomp and the guard) or ``"python-guard"`` (the guard alone, not a
            security boundary: it warns with :class:`WeakSandboxWarning`); see the module docstring.
        timeout_s: wall-clock limit; then the process group (under bwrap: the whole sandbox) is killed
            (``timed_out``). The CPU-time limit is ``ceil(timeout_s) + 1`` seconds.
        memory_mb: address-space limit (``RLIMIT_AS``); the interpreter itself needs about 30 MiB.
        file_size_mb: largest file the code may write (``RLIMIT_FSIZE``; beyond it the process gets ``SIGXFSZ``).
        workdir_mb: ``"bwrap"``: the size of the working directory's tmpfs, all files together (beyond it writes
            fail with ``ENOSPC``); the given files must fit in it. ``"python-guard"`` writes to the host's disk,
            where only ``file_size_mb`` bounds each file.
        max_open_files: ``RLIMIT_NOFILE``.
        max_output: bytes of stdout and of stderr kept (each).
        audit_hook: False runs without the guard's audit hook, so that only the kernel's walls hold the code; only
            with ``"bwrap"``. For the start-up probe and for tests of the outer wall on its own.

    Returns:
        A :class:`SandboxResult`. The working directory is gone before this returns.

    Raises:
        ValueError: a file name that is absolute or leaves the directory, a non-positive limit, files larger than
            ``workdir_mb``, an unknown ``sandbox``, or ``audit_hook=False`` without ``"bwrap"``.
        SandboxUnavailable: ``"bwrap"`` without bwrap on ``PATH``, or the sandbox did not start (bwrap could not
            create its namespaces, the interpreter did not start inside it).
    """
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("file_size_mb", file_size_mb),
                        ("workdir_mb", workdir_mb), ("max_open_files", max_open_files), ("max_output", max_output)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"run_in_sandbox: {name} must be a positive number; got {value!r}")
    _check_sandbox("run_in_sandbox", sandbox)
    if not isinstance(audit_hook, bool):
        raise ValueError(f"run_in_sandbox: audit_hook must be True or False; got {audit_hook!r}")
    if not audit_hook and sandbox != "bwrap":
        raise ValueError(f"run_in_sandbox: audit_hook=False needs sandbox='bwrap' (without the hook, "
                         f"'python-guard' would not hold the code at all); got sandbox={sandbox!r}")
    paths = {name: _check_name(name) for name in files}
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"run_in_sandbox: module must be a dotted Python module name; got {module!r}")
    data = {name: source.encode("utf-8") for name, source in files.items()}
    if sum(map(len, data.values())) > workdir_mb * (1 << 20):
        raise ValueError(f"run_in_sandbox: the files ({sum(map(len, data.values()))} bytes) do not fit in "
                         f"workdir_mb={workdir_mb!r} MiB")
    limits = {
        "RLIMIT_CPU": int(math.ceil(timeout_s)) + 1,
        "RLIMIT_AS": int(memory_mb * (1 << 20)),
        "RLIMIT_FSIZE": int(file_size_mb * (1 << 20)),
        "RLIMIT_NOFILE": int(max_open_files),
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": 0,
    }
    hook = _HOOK_SOURCE if audit_hook else ""
    if sandbox == "python-guard":
        warnings.warn(_GUARD_WARNING, WeakSandboxWarning, stacklevel=2)
        workdir = os.path.realpath(tempfile.mkdtemp(prefix="emokern-sandbox-"))
        try:
            for name, blob in data.items():
                target = Path(workdir, paths[name])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(blob)
            return _run(sandbox, lambda report_fd: [_interpreter(), "-I", "-S", "-B", "-c", _BOOTSTRAP, workdir,
                                                    str(report_fd), json.dumps(limits), module, *args, hook],
                        workdir, workdir, (), timeout_s, max_output)
        finally:
            _remove_tree(workdir)
    bwrap = _bwrap()
    fds: List[int] = []
    try:
        files_in = []
        for name, blob in data.items():
            # bwrap copies each file from a memfd into the tmpfs (--file), so nothing is written on the host's disk
            fd = os.memfd_create("emokern-sandbox-file", os.MFD_CLOEXEC)
            fds.append(fd)
            _write_all(fd, blob)
            os.lseek(fd, 0, os.SEEK_SET)
            files_in.append((fd, str(paths[name])))
        program = seccomp_filter()
        seccomp_fd = None
        if program is not None:
            seccomp_fd = os.memfd_create("emokern-sandbox-seccomp", os.MFD_CLOEXEC)
            fds.append(seccomp_fd)
            _write_all(seccomp_fd, program)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
        options = _bwrap_arguments(files_in, seccomp_fd, workdir_mb)
        return _run(sandbox, lambda report_fd: [bwrap, *options, "--", _interpreter(), "-I", "-S", "-B", "-c",
                                                _BOOTSTRAP, WORKDIR, str(report_fd), json.dumps(limits), module,
                                                *args, hook],
                    "/", WORKDIR, tuple(fds), timeout_s, max_output)
    finally:
        for fd in fds:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _signal_name(number: int) -> Optional[str]:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def _not_started(sandbox: str, code: int, stderr: str) -> SandboxUnavailable:
    said = stderr.strip()[-1000:] or "(nothing on stderr)"
    if sandbox == "bwrap" and stderr.lstrip().startswith("bwrap:"):
        if "nknown option" in said:
            hint = f"this sandbox needs bubblewrap 0.8 or later (--disable-userns, --size): {_INSTALL}"
        elif any(word in said for word in ("namespace", "uid map", "gid map", "ermission denied", "not permitted")):
            hint = _USERNS
        else:
            hint = _WEAKER
        return SandboxUnavailable(f"sandbox='bwrap': bubblewrap could not set up the sandbox (exit status {code}): "
                                  f"{said}; {hint}")
    return SandboxUnavailable(f"sandbox={sandbox!r}: the interpreter {_interpreter()} did not start in the sandbox "
                              f"(exit status {code}): {said}")


def _run(sandbox: str, command, cwd: str, workdir: str, pass_fds: Tuple[int, ...], timeout_s: float,
         max_output: int) -> SandboxResult:
    """Start ``command(report_fd)`` in a new session, read its output, kill it at the timeout, and report.

    ``workdir``: the working directory as the child sees it (its ``HOME`` and ``TMPDIR``); ``cwd``: where the host
    starts the command. ``pass_fds``: further descriptors the command inherits (bwrap's memfds).
    """
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    report_read, report_write = os.pipe()
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(command(report_write), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(report_write, *pass_fds),
                                start_new_session=True)
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
    text = report.kept.decode("utf-8", "replace")
    if not text.startswith(_STARTED + "\n"):
        # no code ran; a start slower than the timeout (a loaded machine) is reported as a timeout, not an error
        if not timed_out:
            raise _not_started(sandbox, code, stderr)
    else:
        text = text[len(_STARTED) + 1:]
    killed_by = signal.Signals(-code).name if code < 0 else None
    if sandbox == "bwrap" and code > 128 and _signal_name(code - 128):
        killed_by = _signal_name(code - 128)  # bwrap's PID 1 passes a signal death on as 128 + n
    # detailed lines first, then one "+" per further refusal (some of them maybe beyond what was kept)
    detailed, _, more = text.rpartition("\n")
    report_lines = detailed.splitlines()
    memory = ("MemoryError" in stderr
              or (not timed_out and killed_by in ("SIGSEGV", "SIGABRT", "SIGKILL")))
    return SandboxResult(
        exit_code=None if killed_by else code, timed_out=timed_out, killed_by=killed_by, memory_exceeded=memory,
        stdout=out.kept.decode("utf-8", "replace"), stderr=stderr, stdout_truncated=out.total > len(out.kept),
        stderr_truncated=err.total > len(err.kept), stdout_bytes=out.total, stderr_bytes=err.total,
        duration_s=round(duration, 4), sandbox=sandbox, violations=report_lines,
        n_violations=len(report_lines) + len(more) + report.total - len(report.kept))


# ----------------------------------------------------------------------------------------------------------------------
# The start-up probe
# ----------------------------------------------------------------------------------------------------------------------

# Tries to reach a server the host listens on at 127.0.0.1 (argv[1]: its port) and to write each target (argv[2:]:
# NAME=PATH, outside its directory); prints {"network" | NAME: "allowed" | "refused: <exception>"} as JSON.
_PROBE = r'''
import json
import socket
import sys

found = {}


def attempt(name, action):
    try:
        action()
    except Exception as exc:
        found[name] = "refused: " + type(exc).__name__ + ": " + str(exc)
    else:
        found[name] = "allowed"


def connect():
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2):
        pass


def writer(path):
    def write():
        with open(path, "w") as f:
            f.write("escaped")
    return write


attempt("network", connect)
for target in sys.argv[2:]:
    name, _, path = target.partition("=")
    attempt(name, writer(path))
print(json.dumps(found))
'''


def check_isolation(sandbox: str = "bwrap") -> dict:
    """Check that a level isolates, here and now, and return what to record: :func:`sandbox_info` plus ``"probe"``.

    A probe program runs in the sandbox and tries to connect to a server this process listens on at 127.0.0.1, and
    to write a file in a fresh host directory and one in the standard library (read-only under bwrap). Under
    ``"bwrap"`` it runs without the audit hook, so that the kernel's walls are tested on their own; under
    ``"python-guard"`` the hook is all there is. Every attempt must fail in the probe and leave no trace on the host
    (no connection accepted, no file created; a file that appears anyway is deleted). Run it once per run: it
    costs one sandboxed run.

    Returns:
        :func:`sandbox_info` with ``"probe"``: ``{attempt: "refused: <the exception the probe got>"}``.

    Raises:
        ValueError: an unknown level. SandboxUnavailable: the sandbox did not start, or an attempt got through.
    """
    info = sandbox_info(sandbox)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outside = tempfile.mkdtemp(prefix="emokern-probe-")
    targets = {"write_outside": os.path.join(outside, "escaped.txt"),
               "write_stdlib": os.path.join(os.path.realpath(_base_path("stdlib")), f"emokern-probe-{os.getpid()}")}
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        args = [str(listener.getsockname()[1])] + [f"{name}={path}" for name, path in targets.items()]
        result = run_in_sandbox({"probe.py": _PROBE}, "probe", args=args, sandbox=sandbox, timeout_s=20,
                                audit_hook=sandbox != "bwrap")
        holes = []
        try:
            listener.accept()[0].close()
            holes.append("a connection from the sandbox reached the host's 127.0.0.1")
        except BlockingIOError:
            pass
        for target in targets.values():
            if os.path.lexists(target):
                os.remove(target)
                holes.append(f"the sandbox created {target} on the host")
        try:
            found = json.loads(result.stdout)
        except ValueError:
            raise SandboxUnavailable(f"sandbox={sandbox!r}: the isolation probe did not report (exit status "
                                     f"{result.exit_code}, killed by {result.killed_by}): "
                                     f"{result.stderr.strip()[-1000:]}") from None
        holes += [f"{name}: allowed" for name, outcome in found.items() if not outcome.startswith("refused")]
        if holes:
            raise SandboxUnavailable(f"sandbox={sandbox!r} does not isolate here: {'; '.join(holes)}")
    finally:
        listener.close()
        shutil.rmtree(outside, ignore_errors=True)
    return {**info, "probe": found}
