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

**The bwrap level** is built in :mod:`emokern.experiments.bwrap`, whose docstring lists each of its walls: never
the host's root (run as root, the sandbox is uid 65534 on the host), new namespaces (user, mount, PID, network, IPC,
UTS: no network at all) with every capability dropped and the interpreter as the PID namespace's process 1, killed
through a pidfd at the end with everything in its namespace; an empty, read-only root with read-only binds of only
what the interpreter needs and no ``/proc`` or ``/sys``; a fresh tmpfs of ``workdir_mb`` MiB at :data:`WORKDIR` as the
working directory, which vanishes with the namespace; and a seccomp filter (:func:`seccomp_filter`) that refuses with
``EPERM`` the system calls the namespaces do not isolate (creating processes and threads, ``ptrace``, mounts, new
namespaces, memory outside the address space and more) and every socket family but ``AF_UNIX``.

**Two programs** (:func:`run_programs`): a second sandbox beside the first, connected by a pipe each way and sharing
nothing else, is how :mod:`emokern.experiments.coding_tests` keeps the tests out of the model code's process.

**The guard's report** is a pipe from the audit hook to the host. Every line after the first is numbered and signed
with a key that the host makes for the run and hands over through a second pipe, which the bootstrap reads and closes
before any untrusted line runs; the host reads the report line by line and keeps only lines whose signature and
number are right (:class:`SandboxResult`: ``violations``, ``forged_report_lines``), so lines the code writes to the
descriptor itself are dropped and a flood of them cannot push the real ones out. A run that ends normally closes the
report with a signed count (``report_complete``); after ``os._exit``, a fatal signal, the timeout, or a descriptor
the code replaced, the report says it is incomplete. The guard is not a wall (below): code that defeats it can also
silence its report, which the kernel's walls make harmless.

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
  - (while it decides, garbage collection is off, so that a ``gc`` callback of the code's cannot run in the middle
    of a check, e.g. to change the working directory between the path check and the call);
  - files: writing, creating, deleting, renaming or changing the mode of anything outside the working directory;
    reading or listing anything outside the working directory and the standard library (plus ``/dev/null`` and
    ``/dev/urandom``); making links (``os.link``, ``os.symlink``);
  - native code and introspection of the guard itself: ``ctypes`` (``dlopen``/``dlsym``/raw memory), importing
    ``ctypes`` or sub-interpreters, ``gc.get_objects``/``get_referrers``/``get_referents``, ``sys.settrace`` and
    ``sys.setprofile``, ``sys._current_frames``.

  The hook runs with its own copy of the builtins and calls no module function the code could replace (only
  ``posix.getcwd``, the report's writer and ``gc``'s switches, captured before the code ran), so monkeypatching
  ``os.path`` or ``builtins`` does not change its decisions.

**What the guard is not.** The audit hook is a Python-level guard, not a kernel sandbox. It stops the ordinary APIs and
the mistakes and naive attempts of model-written code; Python code written to defeat it can (for example by
re-creating a native module through ``_imp``, through a bug in an extension module, or by writing over its own
memory, or by writing a C extension into its directory and importing it). ``RLIMIT_NPROC`` is not enforced for
root, and ``"python-guard"`` runs the code as the caller (root in CI), so there the hook is all that stops a fork bomb;
under ``"bwrap"`` the seccomp filter stops it, and the code is never root.
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

**Overhead.** ``benchmarks/bench_sandbox.py`` measures the wall-clock time of one test run
(:func:`~emokern.experiments.coding_tests.run_tests`: two sandboxed programs) under each level, interleaved. On this
project's 2-core AMD EPYC (bubblewrap 0.8.0, 20 interleaved repetitions, while other jobs loaded the machine), one
run of a three-test candidate took 276 ms (median) under ``"bwrap"`` and 192 ms under ``"python-guard"`` (paired
difference 59 ms), nothing next to the seconds a model takes to write the candidate; the start-up probe, one program,
182 ms once per run.

(Over 600 lines on purpose: this docstring is the sandbox's security specification, and the child's start, pipes,
limits and signed report are one mechanism, read and reviewed together.)
"""

from __future__ import annotations

import hashlib
import hmac
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

from emokern.experiments.bwrap import (GUARD_WARNING, INSTALL_HINT, SANDBOX_UID, SANDBOXES, USERNS_HINT,
                                       UTIL_LINUX_HINT, WEAKER_HINT, WORKDIR, SandboxUnavailable, base_install_path,
                                       base_interpreter, bwrap_arguments, check_sandbox_name, find_bwrap,
                                       launch_command, runs_as_root, sandbox_info, seccomp_filter)
from emokern.experiments.sandboxed import program_files

__all__ = ["CHANNEL", "MAX_VIOLATIONS", "SANDBOXES", "WORKDIR", "SandboxProgram", "SandboxResult", "SandboxUnavailable",
           "WeakSandboxWarning", "check_isolation", "run_in_sandbox", "run_programs", "sandbox_info", "seccomp_filter"]

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

# The guard (sandboxed/guard.py) and the child's first code (sandboxed/bootstrap.py), as text: both run only in the
# child (see those files).
_HOOK_SOURCE = program_files("guard")["guard.py"]
_BOOTSTRAP = (program_files("bootstrap")["bootstrap.py"]
              .replace("@STARTED@", _STARTED).replace("@LIMIT@", str(MAX_VIOLATIONS)))


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
            refused reaches the code as an ``OSError``, which only its own output shows. Only lines signed with
            the run's key count (see ``_BOOTSTRAP``): the guard's report is as trustworthy as the guard, and what the
            code writes to the report descriptor itself is dropped.
        report_complete: the report ended with the guard's signed closing line (the module returned or raised).
            False after ``os._exit``, a fatal signal or the timeout, or when the code replaced the report
            descriptor; then ``n_violations`` counts only the refusals reported before.
        forged_report_lines: lines on the report descriptor that the guard did not sign (written by the code).
        host_uid: the uid the host's kernel gave the sandboxed process (under bwrap, read from the host's
            ``/proc/<pid>/status`` right after the start: :data:`~emokern.experiments.bwrap.SANDBOX_UID` when the
            caller is root, else the caller's); None under ``"python-guard"`` (the caller's own uid).
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
    report_complete: bool = False
    forged_report_lines: int = 0
    host_uid: Optional[int] = None

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
        timeout_s: wall-clock limit; then the process group (under bwrap: the sandbox's PID 1, and with it every
            process of its namespace) is killed (``timed_out``); the call returns within ``timeout_s + 1`` seconds.
            The CPU-time limit is ``ceil(timeout_s) + 1`` seconds.
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
    program = SandboxProgram(files, module, args=args, sandbox=sandbox, memory_mb=memory_mb,
                             file_size_mb=file_size_mb, workdir_mb=workdir_mb, max_open_files=max_open_files,
                             max_output=max_output, audit_hook=audit_hook, timeout_s=timeout_s,
                             where="run_in_sandbox")
    if sandbox == "python-guard":
        warnings.warn(GUARD_WARNING, WeakSandboxWarning, stacklevel=2)
    return run_programs([program], timeout_s)[0]


# Written in a program's arguments where the descriptors of its channel go (see run_programs): "READ,WRITE".
CHANNEL = "@emokern-channel@"


@dataclass
class SandboxProgram:
    """One program to run in a sandbox: the arguments of :func:`run_in_sandbox` less the timeout, which
    :func:`run_programs` applies to the first program. ``timeout_s`` here sets only the CPU-time limit
    (``ceil(timeout_s) + 1`` seconds). An argument equal to :data:`CHANNEL` is replaced by ``"READ,WRITE"``, the
    descriptors of the program's end of the channel between two programs."""

    files: Mapping[str, str]
    module: str
    args: Sequence[str] = ()
    sandbox: str = "bwrap"
    memory_mb: int = 512
    file_size_mb: int = 16
    workdir_mb: int = 64
    max_open_files: int = 64
    max_output: int = 8192
    audit_hook: bool = True
    timeout_s: float = 5.0
    where: str = "SandboxProgram"

    def __post_init__(self):
        where = self.where
        for name in ("timeout_s", "memory_mb", "file_size_mb", "workdir_mb", "max_open_files", "max_output"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise ValueError(f"{where}: {name} must be a positive number; got {value!r}")
        check_sandbox_name(where, self.sandbox)
        if not isinstance(self.audit_hook, bool):
            raise ValueError(f"{where}: audit_hook must be True or False; got {self.audit_hook!r}")
        if not self.audit_hook and self.sandbox != "bwrap":
            raise ValueError(f"{where}: audit_hook=False needs sandbox='bwrap' (without the hook, "
                             f"'python-guard' would not hold the code at all); got sandbox={self.sandbox!r}")
        self.paths = {name: _check_name(name) for name in self.files}
        if not all(part.isidentifier() for part in self.module.split(".")):
            raise ValueError(f"{where}: module must be a dotted Python module name; got {self.module!r}")
        self.data = {name: source.encode("utf-8") for name, source in self.files.items()}
        size = sum(map(len, self.data.values()))
        if size > self.workdir_mb * (1 << 20):
            raise ValueError(f"{where}: the files ({size} bytes) do not fit in workdir_mb={self.workdir_mb!r} MiB")
        self.limits = _rlimits(self)


def _rlimits(program: SandboxProgram) -> dict:
    """The resource limits the bootstrap sets (hard = soft) before any untrusted line runs."""
    return {
        "RLIMIT_CPU": int(math.ceil(program.timeout_s)) + 1,
        "RLIMIT_AS": int(program.memory_mb * (1 << 20)),
        "RLIMIT_FSIZE": int(program.file_size_mb * (1 << 20)),
        "RLIMIT_NOFILE": int(program.max_open_files),
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": 0,
    }


def run_programs(programs: Sequence[SandboxProgram], timeout_s: float, *,
                 grace_s: float = 0.5) -> List[SandboxResult]:
    """Run one program, or two connected ones, each in a sandbox of its own, and return their results in order.

    With two, a pipe runs each way between them: the first program's :data:`CHANNEL` argument becomes
    ``"READ,WRITE"`` of its end and the second's of the other end; neither sees the other's files, output or report.
    The first program sets the pace: it has ``timeout_s``; when it ends, the second gets ``grace_s`` to end by itself
    (it sees end-of-file on its channel), then it is killed, as both are at the timeout. The call returns within
    ``timeout_s + 1`` seconds (more only when a start-up is slower than that).
    """
    if not 1 <= len(programs) <= 2:
        raise ValueError(f"run_programs: one or two programs; got {len(programs)}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"run_programs: timeout_s must be a positive number; got {timeout_s!r}")
    channels: List[Tuple[int, int]] = []
    opened: List[int] = []
    if len(programs) == 2:
        a_read, b_write = os.pipe()
        b_read, a_write = os.pipe()
        opened += [a_read, b_write, b_read, a_write]
        channels = [(a_read, a_write), (b_read, b_write)]
    running: List[_Sandboxed] = []
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        for i, program in enumerate(programs):
            channel = channels[i] if channels else None
            running.append(_Sandboxed(program, channel))
        for fd in opened:  # each program holds its own copies now: end-of-file reaches the other when one ends
            os.close(fd)
        opened = []
        first = running[0]
        first.wait(deadline)
        first.stop()
        if len(running) == 2:
            running[1].wait(min(deadline, time.monotonic() + grace_s))
            running[1].stop()
        # every sandbox is dead now; the readers see end-of-file at once, bounded for a stray descriptor
        return [proc.collect(max(0.05, started + timeout_s + 0.9 - time.monotonic())) for proc in running]
    finally:
        for fd in opened:
            os.close(fd)
        for proc in running:
            proc.cleanup()


class _Sandboxed:
    """One sandboxed program from its start to its result: started by the constructor, then ``wait``, ``stop``,
    ``collect``, and always ``cleanup``."""

    def __init__(self, program: SandboxProgram, channel: Optional[Tuple[int, int]]):
        self.program = program
        self.sandbox = program.sandbox
        self.timed_out = False
        self.workdir: Optional[str] = None
        self.stage_dir: Optional[str] = None
        self.pidfd: Optional[int] = None
        self.host_uid: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.report_read: Optional[int] = None
        self.info: Optional[_ChildInfo] = None
        self.key = os.urandom(32)
        self.started = time.perf_counter()
        args = [",".join(map(str, channel)) if a == CHANNEL and channel else a for a in program.args]
        hook = _HOOK_SOURCE if program.audit_hook else ""
        extra = tuple(channel) if channel else ()
        fds: List[int] = []  # the host's copies of what the command inherits, closed once it has started
        try:
            self.report_read, report_write = os.pipe()
            key_read, key_write = os.pipe()
            fds += [report_write, key_read]
            _write_all(key_write, self.key)
            os.close(key_write)

            def interpreter(workdir: str) -> List[str]:
                return [base_interpreter(), "-I", "-S", "-B", "-c", _BOOTSTRAP, workdir, str(report_write),
                        str(key_read), json.dumps(program.limits), program.module, *args, hook]

            info_read = None
            if self.sandbox == "python-guard":
                self.workdir = os.path.realpath(tempfile.mkdtemp(prefix="emokern-sandbox-"))
                for name, blob in program.data.items():
                    target = Path(self.workdir, program.paths[name])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(blob)
                command, cwd, workdir = interpreter(self.workdir), self.workdir, self.workdir
            else:
                bwrap = find_bwrap()
                files_in = []
                for name, blob in program.data.items():
                    # bwrap copies each file from a memfd into the tmpfs (--file): nothing is written on the host's disk
                    fd = os.memfd_create("emokern-sandbox-file", os.MFD_CLOEXEC)
                    fds.append(fd)
                    _write_all(fd, blob)
                    os.lseek(fd, 0, os.SEEK_SET)
                    files_in.append((fd, str(program.paths[name])))
                seccomp = seccomp_filter()
                seccomp_fd = None
                if seccomp is not None:
                    seccomp_fd = os.memfd_create("emokern-sandbox-seccomp", os.MFD_CLOEXEC)
                    fds.append(seccomp_fd)
                    _write_all(seccomp_fd, seccomp)
                    os.lseek(seccomp_fd, 0, os.SEEK_SET)
                info_read, info_write = os.pipe()
                fds.append(info_write)
                if runs_as_root():
                    self.stage_dir = tempfile.mkdtemp(prefix="emokern-stage-")
                command = launch_command(
                    bwrap, lambda sources: bwrap_arguments(files_in, seccomp_fd, program.workdir_mb, info_write,
                                                            sources),
                    interpreter(WORKDIR), self.stage_dir)
                cwd, workdir = "/", WORKDIR
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
            self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         pass_fds=(*fds, *extra), start_new_session=True)
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.cleanup()
            raise
        for fd in fds:
            os.close(fd)
        self.readers = [_CappedReader(self.proc.stdout.fileno(), program.max_output),
                        _CappedReader(self.proc.stderr.fileno(), program.max_output),
                        _ReportReader(self.report_read, self.key)]
        for reader in self.readers:
            reader.start()
        if info_read is not None:
            self.info = _ChildInfo(info_read, self)
            self.info.start()

    def wait(self, deadline: float) -> None:
        """Wait for the program to end by itself until ``deadline`` (``time.monotonic``); past it, ``timed_out``."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True

    def stop(self) -> None:
        """Kill whatever is left: under bwrap the sandbox's PID 1 (its namespace dies with it: every process in it,
        whatever it did to its parent-death signal or session), then the launcher's process group."""
        self.duration = time.perf_counter() - self.started
        if self.info is not None:
            self.info.join(timeout=1.0)
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        _kill_group(self.proc.pid)
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def collect(self, join_s: float) -> SandboxResult:
        for reader in self.readers:
            # a descendant that escaped the namespace could still hold a pipe open: do not wait for it forever
            reader.join(timeout=join_s)
        self.proc.stdout.close()
        self.proc.stderr.close()
        out, err, report = self.readers
        stderr = err.kept.decode("utf-8", "replace")
        code = self.proc.returncode
        # no code ran; a start slower than the timeout (a loaded machine) is reported as a timeout, not an error
        if not report.started and not self.timed_out:
            raise _not_started(self.sandbox, code, stderr)
        killed_by = signal.Signals(-code).name if code < 0 else None
        if self.sandbox == "bwrap" and code > 128 and _signal_name(code - 128):
            killed_by = _signal_name(code - 128)  # bwrap's PID 1 passes a signal death on as 128 + n
        memory = ("MemoryError" in stderr
                  or (not self.timed_out and killed_by in ("SIGSEGV", "SIGABRT", "SIGKILL")))
        return SandboxResult(
            exit_code=None if killed_by else code, timed_out=self.timed_out, killed_by=killed_by,
            memory_exceeded=memory, stdout=out.kept.decode("utf-8", "replace"), stderr=stderr,
            stdout_truncated=out.total > len(out.kept), stderr_truncated=err.total > len(err.kept),
            stdout_bytes=out.total, stderr_bytes=err.total, duration_s=round(self.duration, 4),
            sandbox=self.sandbox, violations=report.violations, n_violations=report.refusals,
            report_complete=report.complete, forged_report_lines=report.forged, host_uid=self.host_uid)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:  # an error left it running: it dies here
            self.stop()
        if self.report_read is not None:
            try:
                os.close(self.report_read)
            except OSError:
                pass
            self.report_read = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.workdir is not None:
            _remove_tree(self.workdir)
            self.workdir = None
        if self.stage_dir is not None:
            # empty on the host: the stage's mounts lived in the launcher's own mount namespace, gone with it
            try:
                os.rmdir(self.stage_dir)
            except OSError:
                pass
            self.stage_dir = None


class _ChildInfo(threading.Thread):
    """Reads bwrap's ``--info-fd`` JSON (``{"child-pid": N}``: the sandbox's PID 1 as the host numbers it), opens a
    pidfd on it at once (so that a reused pid is never signalled) and reads the uid the host gave it."""

    def __init__(self, fd: int, owner: "_Sandboxed"):
        super().__init__(daemon=True)
        self.fd, self.owner = fd, owner

    def run(self) -> None:
        data = b""
        try:
            while True:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    break
                data += chunk
                try:
                    pid = int(json.loads(data)["child-pid"])
                except (ValueError, KeyError, TypeError):
                    continue
                self.owner.pidfd = os.pidfd_open(pid)
                self.owner.host_uid = _host_uid(pid)
                break
        except OSError:
            pass
        finally:
            os.close(self.fd)


def _host_uid(pid: int) -> Optional[int]:
    """The real uid of host process ``pid`` (its ``/proc/<pid>/status``), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _ReportReader(threading.Thread):
    """Reads the guard's report pipe to its end, checking each line as it comes (see ``_BOOTSTRAP``): the first line
    must be the started line; after it a line counts when its MAC (keyed BLAKE2b of ``"<number> <text>"`` under the
    run's key) is right and its number is the next one. Any other line is forged (written by the code) and only
    counted, so that a flood of them can neither fill the host's memory nor push the real lines out.

    After ``join``: ``started``, ``violations`` (the reported refusals, at most :data:`MAX_VIOLATIONS`),
    ``refusals`` (the closing line's count, else the number reported), ``complete`` (the closing line came) and
    ``forged``."""

    _MAX_LINE = 8192  # a longer line is no line of the guard's (its refusal details are cut to 200 characters each)

    def __init__(self, fd: int, key: bytes):
        super().__init__(daemon=True)
        self.fd, self.key = fd, key
        self.started, self.complete = False, False
        self.violations: List[str] = []
        self.refusals, self.forged, self.expected = 0, 0, 0
        self._total: Optional[int] = None

    def run(self) -> None:
        pending, skipping = b"", False
        try:
            while True:
                chunk = os.read(self.fd, _READ_CHUNK)
                if not chunk:
                    break
                pending += chunk
                while True:
                    end = pending.find(b"\n")
                    if end < 0:
                        if len(pending) > self._MAX_LINE:  # an endless line: drop it up to its newline
                            if not skipping:
                                self.forged += 1
                            pending, skipping = b"", True
                        break
                    line, pending = pending[:end], pending[end + 1:]
                    if skipping:
                        skipping = False
                    else:
                        self._line(line)
        except OSError:
            pass
        if pending and not skipping:
            self.forged += 1  # an unfinished line
        self.complete = self._total is not None
        self.refusals = self._total if self.complete else len(self.violations)

    def _line(self, line: bytes) -> None:
        if not self.started:
            if line == _STARTED.encode():
                self.started = True
                return
            self.forged += 1
            return
        mac, _, data = line.partition(b" ")
        number, _, body = data.partition(b" ")
        good = (len(line) <= self._MAX_LINE and self._total is None and number == str(self.expected).encode()
                and hmac.compare_digest(mac, hashlib.blake2b(data, key=self.key, digest_size=16).hexdigest().encode()))
        if not good:
            self.forged += 1
            return
        self.expected += 1
        text = body.decode("utf-8", "replace")
        if text.startswith("V ") and len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(text[2:])
        elif text.startswith("END "):
            self._total = int(text[4:])


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
            hint = f"this sandbox needs bubblewrap 0.8 or later (--disable-userns, --size): {INSTALL_HINT}"
        elif any(word in said for word in ("namespace", "uid map", "gid map", "ermission denied", "not permitted")):
            hint = USERNS_HINT
        else:
            hint = WEAKER_HINT
        return SandboxUnavailable(f"sandbox='bwrap': bubblewrap could not set up the sandbox (exit status {code}): "
                                  f"{said}; {hint}")
    if sandbox == "bwrap" and runs_as_root() and ("unshare:" in said or "mount:" in said or "setpriv:" in said):
        return SandboxUnavailable(f"sandbox='bwrap': the launcher could not drop to uid {SANDBOX_UID} (exit status "
                                  f"{code}): {said}; {UTIL_LINUX_HINT}")
    return SandboxUnavailable(f"sandbox={sandbox!r}: the interpreter {base_interpreter()} did not start in the sandbox "
                              f"(exit status {code}): {said}")


# ----------------------------------------------------------------------------------------------------------------------
# The start-up probe
# ----------------------------------------------------------------------------------------------------------------------

def check_isolation(sandbox: str = "bwrap") -> dict:
    """Check that a level isolates, here and now, and return what to record: :func:`sandbox_info` plus ``"probe"``.

    A probe program runs in the sandbox and tries to connect to a server this process listens on at 127.0.0.1, and
    to write a file in a fresh host directory and one in the standard library (read-only under bwrap). Under
    ``"bwrap"`` it runs without the audit hook, so that the kernel's walls are tested on their own; under
    ``"python-guard"`` the hook is all there is. Every attempt must fail in the probe and leave no trace on the host
    (no connection accepted, no file created; a file that appears anyway is deleted). Run it once per run: it
    costs one sandboxed run.

    Returns:
        :func:`sandbox_info` with ``"probe"``: ``{attempt: "refused: <the exception the probe got>"}``; under
        ``"bwrap"`` its ``"host_uid"`` is the uid the host's kernel gave the probe (a run as the host's root is a
        hole).

    Raises:
        ValueError: an unknown level. SandboxUnavailable: the sandbox did not start, or an attempt got through.
    """
    info = sandbox_info(sandbox)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outside = tempfile.mkdtemp(prefix="emokern-probe-")
    # writable by anyone (the sandbox runs as another uid when the caller is root): only the sandbox's walls, not
    # the directory's permissions, may stand between the probe and this directory
    os.chmod(outside, 0o777)
    targets = {"write_outside": os.path.join(outside, "escaped.txt"),
               "write_stdlib": os.path.join(os.path.realpath(base_install_path("stdlib")), f"emokern-probe-{os.getpid()}")}
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        args = [str(listener.getsockname()[1])] + [f"{name}={path}" for name, path in targets.items()]
        result = run_in_sandbox(program_files("probe"), "probe", args=args, sandbox=sandbox, timeout_s=20,
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
        if sandbox == "bwrap":
            info["host_uid"] = result.host_uid  # as the host's kernel saw the probe, not as predicted
            if result.host_uid == 0:
                holes.append("the sandboxed process ran as the host's root")
        if holes:
            raise SandboxUnavailable(f"sandbox={sandbox!r} does not isolate here: {'; '.join(holes)}")
    finally:
        listener.close()
        shutil.rmtree(outside, ignore_errors=True)
    return {**info, "probe": found}
