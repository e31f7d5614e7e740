"""Tests of emokern.experiments.sandbox: each escape attempt is contained, reported with a reason, and leaves the host
unchanged, at every isolation level it applies to.

Three walls are tested: ``bwrap`` (namespaces, seccomp and the audit hook: the default), ``python-guard`` (the audit
hook and rlimits alone) and ``kernel-only`` (bwrap without the audit hook, so that the kernel's walls are seen on
their own). Under the guard the reason is the refused audit event in ``violations``; under the kernel alone it is the
``OSError`` the code got, which the programs here print. The bwrap tests need bubblewrap and user namespaces, as CI
has them (``.ci/run`` installs bubblewrap); without them they fail with the :class:`SandboxUnavailable` message.

Timeouts are 1-2 s so that the file runs in well under a minute.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest

import emokern
from emokern.experiments import bwrap as bw
from emokern.experiments import sandbox as sb
from emokern.experiments.sandbox import (MAX_VIOLATIONS, WORKDIR, SandboxUnavailable, WeakSandboxWarning,
                                         check_isolation, run_in_sandbox, sandbox_info)
from emokern.core.models import cache_root

# the weaker level warns on every use; test_python_guard_warns checks that it does
pytestmark = pytest.mark.filterwarnings("ignore::emokern.experiments.sandbox.WeakSandboxWarning")

LEVELS = ["bwrap", "python-guard"]
WALLS = {"bwrap": {"sandbox": "bwrap"}, "python-guard": {"sandbox": "python-guard"},
         "kernel-only": {"sandbox": "bwrap", "audit_hook": False}}
GUARDED = ["bwrap", "python-guard"]  # the walls with the audit hook

# Prepended to the escape programs: attempt(name, action) prints "name refused ExceptionType errno" or "name ALLOWED".
ATTEMPT = '''import os, sys
def attempt(name, action):
    try:
        action()
    except BaseException as exc:
        print(name, "refused", type(exc).__name__, getattr(exc, "errno", None), flush=True)
    else:
        print(name, "ALLOWED", flush=True)
'''


def _outcomes(result) -> dict:
    """``{name: (outcome, exception type, errno)}`` from the lines ``ATTEMPT`` printed."""
    found = {}
    for line in result.stdout.splitlines():
        parts = line.split(" ")
        if len(parts) == 4 and parts[1] == "refused":
            found[parts[0]] = ("refused", parts[2], None if parts[3] == "None" else int(parts[3]))
        elif len(parts) == 2 and parts[1] == "ALLOWED":
            found[parts[0]] = ("ALLOWED", None, None)
    return found


def _check_refused(result, wall: str, names, kernel_errnos, events=()):
    """Every attempt in ``names`` was refused: under the guard with its PermissionError and a reported violation
    (one starting with each of ``events``), under the kernel alone with an OSError whose errno is in
    ``kernel_errnos``."""
    found = _outcomes(result)
    assert set(found) >= set(names), (result.stdout, result.stderr)
    for name in names:
        outcome, kind, number = found[name]
        assert outcome == "refused", (name, found[name])
        if wall in GUARDED:
            assert kind == "PermissionError" and number is None, (name, found[name])
        else:
            assert number in kernel_errnos, (name, found[name])
    if wall in GUARDED:
        for event in events:
            assert any(v.startswith(event) for v in result.violations), (event, result.violations)
    else:
        assert result.violations == []


def _processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def _processes_with(marker: str) -> list:
    """Host processes whose command line holds ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if marker.encode() in Path("/proc", name, "cmdline").read_bytes():
                    found.append(int(name))
            except OSError:
                pass
    return found


def _sandbox_dirs() -> set:
    return {p.name for p in Path(tempfile.gettempdir()).glob("emokern-sandbox-*")}


@pytest.fixture(params=LEVELS)
def level(request) -> str:
    return request.param


@pytest.fixture(params=list(WALLS))
def wall(request) -> str:
    return request.param


@pytest.fixture
def host_places(tmp_path):
    """Host places the code must not reach: a secret file in the home directory, a file of the project checkout, a
    secret file in the model cache, /etc/shadow, and a temporary directory; ``{name: path}``, and for each directory
    a file name nothing may create (``"<name>_target"``). The secrets (and any directory made for them) are removed
    afterwards."""
    cache = cache_root()
    created = next((p for p in reversed([cache, *cache.parents]) if not p.exists()), None)  # the topmost one made
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"emokern-sandbox-test-{os.getpid()}"
    places = {"home": Path.home() / f".{tag}", "cache": cache / f".{tag}", "tmp": tmp_path / "secret.txt"}
    for name, path in places.items():
        path.write_text(f"secret-{name}")
    places["checkout"] = Path(emokern.__file__).resolve()
    places["shadow"] = Path("/etc/shadow")
    targets = {f"{name}_target": places[name].parent / f"{tag}-escaped" for name in ("home", "cache", "tmp", "checkout",
                                                                                     "shadow")}
    targets["stdlib_target"] = Path(os.__file__).resolve().parent / f"{tag}-escaped"
    yield {**places, **targets}
    for path in [places["home"], places["cache"], *targets.values()]:
        if path.exists():
            path.unlink()
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


@pytest.fixture
def world_readable_dir():
    """A fresh directory that the sandbox's unprivileged uid can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="emokern-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _host_unchanged(places: dict) -> None:
    for name in ("home", "cache", "tmp"):
        assert places[name].read_text() == f"secret-{name}"
    for name, path in places.items():
        if name.endswith("_target"):
            assert not path.exists(), f"the sandbox created {path}"


# ----------------------------------------------------------------------------------------------------------------------
# Ordinary runs, at both levels
# ----------------------------------------------------------------------------------------------------------------------

def test_normal_script_passes_and_its_output_comes_back(level):
    result = run_in_sandbox({"main.py": "import sys\nprint('hello', sys.argv[1:])\nprint('oops', file=sys.stderr)\n"},
                            "main", args=["a", "b"], sandbox=level, timeout_s=5)
    assert result.ok and result.exit_code == 0 and result.sandbox == level
    assert result.stdout == "hello ['a', 'b']\n"
    assert result.stderr == "oops\n"
    assert not result.timed_out and result.killed_by is None and not result.memory_exceeded
    assert result.violations == [] and result.n_violations == 0
    assert not result.stdout_truncated and result.stdout_bytes == len(result.stdout)


def test_exit_status_and_uncaught_exception_are_reported(level):
    result = run_in_sandbox({"main.py": "raise ValueError('broken')\n"}, "main", sandbox=level, timeout_s=5)
    assert result.exit_code == 1 and not result.ok
    assert "ValueError: broken" in result.stderr
    assert run_in_sandbox({"main.py": "import sys\nsys.exit(3)\n"}, "main", sandbox=level, timeout_s=5).exit_code == 3


def test_reading_and_writing_inside_the_working_directory_is_allowed(level):
    code = ("import os\n"
            "print(open('data.txt').read())\n"
            "os.mkdir('sub')\n"
            "with open('sub/out.txt', 'w') as f:\n    f.write('written')\n"
            "print(sorted(os.listdir('.')), open('sub/out.txt').read(), os.environ['HOME'] == os.getcwd())\n")
    result = run_in_sandbox({"main.py": code, "data.txt": "given", "pkg/nested.txt": "deep"}, "main", sandbox=level,
                            timeout_s=5)
    assert result.ok, result.stderr
    assert result.stdout == "given\n['data.txt', 'main.py', 'pkg', 'sub'] written True\n"
    assert result.violations == []


def test_writing_outside_the_working_directory_is_refused(tmp_path, level):
    targets = [tmp_path / "absolute.txt", Path("/tmp") / f"emokern-escape-{os.getpid()}.txt"]
    code = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('bad')\nexcept PermissionError as e:\n    print('refused')"
                     for t in targets)
    code += "\nopen('../relative-escape.txt', 'w').write('bad')\n"
    result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=5)
    assert result.stdout == "refused\nrefused\n"
    assert "PermissionError" in result.stderr and result.exit_code == 1
    assert [v.split("(")[0] for v in result.violations] == ["open", "open", "open"]
    assert str(targets[0]) in result.violations[0] and "../relative-escape.txt" in result.violations[2]
    for t in targets:
        assert not t.exists()
    assert not list(Path("/tmp").glob("relative-escape.txt"))


def test_deleting_renaming_and_linking_outside_are_refused(tmp_path, level):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    code = (f"import os, shutil\n"
            f"for attempt in (lambda: os.remove({str(victim)!r}), lambda: os.rename({str(victim)!r}, 'x'),\n"
            f"                lambda: shutil.rmtree({str(tmp_path)!r}), lambda: os.symlink({str(victim)!r}, 'l'),\n"
            f"                lambda: os.chmod({str(victim)!r}, 0)):\n"
            f"    try:\n        attempt()\n    except PermissionError:\n        print('refused')\n")
    result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=5)
    assert result.stdout == "refused\n" * 5, result.stderr
    assert [v.split("(")[0] for v in result.violations] == ["os.remove", "os.rename", "shutil.rmtree", "os.symlink",
                                                            "os.chmod"]
    assert victim.read_text() == "precious"


def test_reading_host_files_is_refused(level):
    result = run_in_sandbox({"main.py": "print(open('/etc/hostname').read())\n"}, "main", sandbox=level, timeout_s=5)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.violations == ["open('/etc/hostname', 'r', 524288)"]


def test_sockets_are_refused(level):
    # a listening socket on the host: a connection from the sandbox would be accepted by it
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
        result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=5)
        assert result.exit_code == 1 and "connected" not in result.stdout
        assert result.violations and result.violations[0].startswith(("socket.getaddrinfo", "socket.__new__"))
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_fork_bomb_is_contained(level):
    before = _processes()
    code = ("import os\n"
            "for _ in range(5000):\n"
            "    try:\n        os.fork()\n    except PermissionError:\n        pass\n"
            "while True:\n    os.fork()\n")
    start = time.perf_counter()
    result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=2)
    assert time.perf_counter() - start < 10
    assert result.exit_code == 1 and not result.timed_out
    assert result.violations[0] == "os.fork()"
    assert len(result.violations) == MAX_VIOLATIONS and result.n_violations == 5001
    assert _processes() <= before + 2  # other processes on the machine come and go; a fork bomb adds thousands


@pytest.mark.parametrize("code, event", [
    ("import subprocess\nsubprocess.run(['touch', 'x'])\n", "import('_posixsubprocess')"),
    ("import os\nos.system('touch x')\n", "os.system(b'touch x')"),
    ("import os\nos.execv('/bin/true', ['true'])\n", "os.exec("),
    ("import os\nos.posix_spawn('/bin/true', ['true'], {})\n", "os.posix_spawn("),
    ("import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\n", "import('_posixsubprocess')"),
    ("import os\nos.fork()\n", "os.fork()"),
    ("import ctypes\n", "import('ctypes')"),
    ("import os, signal\nos.kill(1, signal.SIGTERM)\n", "os.kill(1, 15)"),
])
def test_starting_processes_and_native_code_are_refused(code, event, level):
    result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=5)
    assert result.exit_code == 1, result.stderr
    assert result.violations and result.violations[0].startswith(event)
    assert "PermissionError" in result.stderr


def test_infinite_loop_is_killed_at_the_timeout(level):
    start = time.perf_counter()
    result = run_in_sandbox({"main.py": "print('started', flush=True)\nwhile True:\n    pass\n"}, "main",
                            sandbox=level, timeout_s=1)
    elapsed = time.perf_counter() - start
    assert result.timed_out and result.killed_by == "SIGKILL" and result.exit_code is None
    assert result.stdout == "started\n"
    assert 1.0 <= result.duration_s < 2.0 and elapsed < 4.0
    assert not result.memory_exceeded


def test_huge_allocation_fails_and_is_reported(level):
    result = run_in_sandbox({"main.py": "block = bytearray(4 * 1024 ** 3)\nprint('allocated')\n"}, "main",
                            sandbox=level, timeout_s=5, memory_mb=256)
    assert result.exit_code == 1 and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr and result.memory_exceeded


def test_output_flood_is_truncated_without_filling_host_memory(level):
    tracemalloc.start()
    try:
        result = run_in_sandbox({"main.py": "import sys\nchunk = 'x' * 1_000_000\n"
                                            "for _ in range(100):\n    sys.stdout.write(chunk)\n"
                                            "sys.stderr.write('e' * 50_000)\n"},
                                "main", sandbox=level, timeout_s=10, max_output=8192)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok
    assert result.stdout == "x" * 8192 and result.stdout_truncated and result.stdout_bytes == 100_000_000
    assert result.stderr == "e" * 8192 and result.stderr_truncated and result.stderr_bytes == 50_000
    assert peak < 4 * 1024 * 1024  # read in 64 KiB chunks and dropped: nowhere near the 100 MB written


def test_file_size_limit_stops_a_disk_filler(level):
    code = "with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(b'0' * (1 << 20))\n"
    result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=5, file_size_mb=2)
    assert not result.ok
    assert result.killed_by == "SIGXFSZ" or "File too large" in result.stderr


def test_the_guard_survives_monkeypatching(tmp_path, level):
    target = tmp_path / "escape.txt"
    code = ("import builtins, os, os.path\n"
            "os.path.abspath = os.path.realpath = os.path.normpath = lambda p: os.getcwd() + '/ok'\n"
            "builtins.isinstance = lambda *a: True\n"
            f"open({str(target)!r}, 'w').write('bad')\n")
    result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=5)
    assert result.exit_code == 1 and result.violations
    assert not target.exists()


def test_the_working_directory_is_removed_afterwards(level):
    before = _sandbox_dirs()
    code = "import os\nprint(os.getcwd())\nos.mkdir('d')\nopen('d/f.txt', 'w').write('x')\nos.chmod('d', 0)\n"
    result = run_in_sandbox({"main.py": code}, "main", sandbox=level, timeout_s=5)
    workdir = result.stdout.strip()
    if level == "bwrap":
        assert workdir == WORKDIR  # a tmpfs in the sandbox's mount namespace: nothing on the host's disk
    else:
        assert Path(workdir).name.startswith("emokern-sandbox-")
        assert not os.path.exists(workdir)
    timed_out = run_in_sandbox({"main.py": "while True:\n    pass\n"}, "main", sandbox=level, timeout_s=1)
    assert timed_out.timed_out
    assert _sandbox_dirs() <= before


def test_environment_is_stripped(monkeypatch, level):
    monkeypatch.setenv("EMOKERN_SECRET_FOR_TEST", "host-value")
    result = run_in_sandbox({"main.py": "import os, sys\nprint(sorted(os.environ), sys.flags.isolated)\n"}, "main",
                            sandbox=level, timeout_s=5)
    names = ["HOME", "LANG", "PATH", "PWD", "TMPDIR"] if level == "bwrap" else ["HOME", "LANG", "PATH", "TMPDIR"]
    assert result.stdout == f"{names} 1\n"


def test_python_guard_warns_and_bwrap_does_not():
    with pytest.warns(WeakSandboxWarning, match="not a security boundary"):
        run_in_sandbox({"main.py": "pass\n"}, "main", sandbox="python-guard")
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakSandboxWarning)
        assert run_in_sandbox({"main.py": "pass\n"}, "main").ok


@pytest.mark.parametrize("kwargs, message", [
    (dict(files={"/etc/x.py": ""}, module="x"), "relative paths"),
    (dict(files={"../x.py": ""}, module="x"), "relative paths"),
    (dict(files={"x.py": ""}, module="x; rm"), "dotted Python module name"),
    (dict(files={"x.py": ""}, module="x", timeout_s=0), "timeout_s must be a positive number"),
    (dict(files={"x.py": ""}, module="x", memory_mb=float("nan")), "memory_mb must be a positive number"),
    (dict(files={"x.py": ""}, module="x", sandbox="docker"), r"sandbox must be one of \['bwrap', 'python-guard'\]; "
                                                              r"got 'docker'"),
    (dict(files={"x.py": ""}, module="x", sandbox="python-guard", audit_hook=False),
     "audit_hook=False needs sandbox='bwrap'"),
    (dict(files={"x.py": ""}, module="x", audit_hook=0), "audit_hook must be True or False; got 0"),
    (dict(files={"x.py": "x" * (2 << 20)}, module="x", workdir_mb=1), r"do not fit in workdir_mb=1 MiB"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_in_sandbox(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Escapes, at every wall they apply to
# ----------------------------------------------------------------------------------------------------------------------

def test_reading_secrets_of_the_host_is_refused(host_places, wall):
    reads = {name: str(host_places[name]) for name in ("shadow", "home", "checkout", "cache", "tmp")}
    code = ATTEMPT + "".join(f"attempt('read_{name}', lambda: print(open({path!r}).read()))\n"
                             for name, path in reads.items())
    # a listing of the home directory must not show the secret (under bwrap it may exist, empty but for the mount
    # points of the Python installation when that lives in it, as pyenv's does)
    code += (f"attempt('list_home', lambda: print('SECRET LISTED' if {host_places['home'].name!r} in "
             f"os.listdir({str(Path.home())!r}) else 'not listed'))\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS[wall])
    _check_refused(result, wall, [f"read_{name}" for name in reads], {errno.ENOENT},
                   events=[f"open({path!r}" for path in reads.values()])
    assert "secret-" not in result.stdout and "SECRET LISTED" not in result.stdout
    if wall in GUARDED:
        assert _outcomes(result)["list_home"][1] == "PermissionError"
    _host_unchanged(host_places)


def test_writing_to_the_host_is_refused(host_places, wall):
    targets = {name: str(path) for name, path in host_places.items() if name.endswith("_target")}
    code = ATTEMPT + "".join(f"attempt({name!r}, lambda: open({path!r}, 'w').write('escaped'))\n"
                             for name, path in targets.items())
    code += "".join(f"attempt('remove_{name}', lambda: os.remove({str(host_places[name])!r}))\n"
                    for name in ("home", "cache", "tmp"))
    code += f"attempt('rename_home', lambda: os.rename({str(host_places['home'])!r}, 'stolen'))\n"
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS[wall])
    # the kernel: the directory is not there (ENOENT), or it is a read-only mount point (EROFS), or a rename would
    # cross from it into the working directory's tmpfs (EXDEV)
    _check_refused(result, wall, list(targets) + ["remove_home", "remove_cache", "remove_tmp", "rename_home"],
                   {errno.ENOENT, errno.EROFS, errno.EXDEV},
                   events=[f"open({path!r}" for path in targets.values()] + ["os.remove", "os.rename"])
    _host_unchanged(host_places)


def test_connecting_to_a_server_on_the_hosts_loopback_fails(wall):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        code = ATTEMPT + (
            f"import socket\n"
            f"attempt('tcp', lambda: socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1))\n"
            f"def send():\n"
            f"    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    s.sendto(b'escaped', ('127.0.0.1', {udp.getsockname()[1]}))\n"
            f"attempt('udp', send)\n")
        result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS[wall])
        # the kernel: seccomp refuses an AF_INET socket (and the sandbox's own loopback has no such server)
        _check_refused(result, wall, ["tcp", "udp"], {errno.EAFNOSUPPORT},
                       events=["socket.getaddrinfo", "socket.__new__"])
        if wall in GUARDED:
            assert _outcomes(result)["udp"][:2] == ("refused", "PermissionError")
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(64)
    finally:
        tcp.close()
        udp.close()


def test_fork_bomb_and_threads_meet_the_seccomp_filter():
    """Without the audit hook (which refuses os.fork first at the other walls), seccomp refuses every way to start a
    process or a thread with EPERM, even as root (where RLIMIT_NPROC does not apply)."""
    before = _processes()
    code = ATTEMPT + ("import threading\n"
                      "attempt('fork', os.fork)\n"
                      "attempt('posix_spawn', lambda: os.posix_spawn('/usr/bin/true', ['true'], {}))\n"
                      "attempt('thread', lambda: threading.Thread(target=print).start())\n"
                      "for _ in range(2000):\n"
                      "    try:\n        os.fork()\n    except PermissionError:\n        pass\n"
                      "while True:\n    os.fork()\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=2, **WALLS["kernel-only"])
    found = _outcomes(result)
    assert found["fork"] == ("refused", "PermissionError", errno.EPERM)
    assert found["posix_spawn"][0] == "refused" and found["posix_spawn"][2] in (errno.EPERM, errno.ENOENT)
    assert found["thread"][:2] == ("refused", "RuntimeError")  # "can't start new thread"
    assert result.exit_code == 1 and "PermissionError: [Errno 1] Operation not permitted" in result.stderr
    assert _processes() <= before + 2


def test_ctypes_is_refused_by_the_guard_and_harmless_to_the_kernel(wall):
    code = ATTEMPT + ("import ctypes\n"
                      "libc = ctypes.CDLL(None, use_errno=True)\n"
                      "def call(name, *args):\n"
                      "    def go():\n"
                      "        if getattr(libc, name)(*args) == -1:\n"
                      "            raise OSError(ctypes.get_errno(), name)\n"
                      "    return go\n"
                      "attempt('unshare', call('unshare', 0x10000000))\n"  # CLONE_NEWUSER
                      "attempt('mount', call('mount', b'none', b'/sandbox', b'tmpfs', 0, None))\n"
                      "attempt('ptrace', call('ptrace', 16, 1, 0, 0))\n"  # PTRACE_ATTACH
                      "attempt('personality', call('personality', 0x0040000))\n"  # ADDR_NO_RANDOMIZE
                      "attempt('chroot', call('chroot', b'/sandbox'))\n"
                      "attempt('fork', call('fork'))\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS[wall])
    if wall in GUARDED:
        assert result.exit_code == 1 and result.violations[0] == "import('ctypes')"
        assert _outcomes(result) == {}
    else:
        _check_refused(result, wall, ["unshare", "mount", "ptrace", "personality", "chroot", "fork"], {errno.EPERM})


def test_proc_mem_and_the_parents_proc_entries_are_out_of_reach(wall):
    host = os.getpid()  # an ancestor of the sandboxed process (its parent under python-guard)
    code = ATTEMPT + (f"print('PARENT', os.getppid())\n"
                      f"attempt('self_mem', lambda: open('/proc/self/mem', 'r+b', buffering=0).close())\n"
                      f"attempt('parent_mem', lambda: open('/proc/%d/mem' % os.getppid(), 'rb').read(1))\n"
                      f"attempt('parent_environ', lambda: print(open('/proc/%d/environ' % os.getppid()).read()))\n"
                      f"attempt('host_environ', lambda: print(open('/proc/{host}/environ').read()))\n"
                      f"attempt('host_cwd', lambda: print(os.listdir('/proc/{host}/cwd')))\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS[wall])
    if wall in GUARDED:
        _check_refused(result, wall, ["self_mem", "parent_mem", "parent_environ", "host_environ", "host_cwd"], set(),
                       events=["open('/proc/self/mem'", f"open('/proc/{host}/environ'", f"os.listdir('/proc/{host}"])
    else:
        # the parent is outside the PID namespace (getppid() is 0), and the sandbox has no /proc at all: not even
        # its own memory is reachable through it
        assert "PARENT 0\n" in result.stdout
        _check_refused(result, wall, ["self_mem", "parent_mem", "parent_environ", "host_environ", "host_cwd"],
                       {errno.ENOENT})
    assert "PATH=" not in result.stdout


def test_signalling_or_killing_the_parent_and_other_processes_fails(wall):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = ATTEMPT + (f"import signal\n"
                          f"attempt('victim', lambda: os.kill({victim.pid}, signal.SIGKILL))\n"
                          f"attempt('host', lambda: os.kill({os.getpid()}, signal.SIGTERM))\n"
                          f"attempt('group', lambda: os.killpg({os.getpgid(0)}, signal.SIGTERM))\n"
                          f"print('still running')\n")
        result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS[wall])
        # the kernel: no host process is in the sandbox's PID namespace
        _check_refused(result, wall, ["victim", "host", "group"], {errno.ESRCH},
                       events=[f"os.kill({victim.pid}, 9)", f"os.kill({os.getpid()}, 15)", "os.killpg("])
        assert "still running" in result.stdout
        time.sleep(0.1)
        assert victim.poll() is None  # alive
    finally:
        victim.kill()
        victim.wait()


def test_no_process_is_left_behind_after_the_timeout(wall):
    marker = f"emokern-leftover-{os.getpid()}-{wall}"
    code = ATTEMPT + ("import time\n"
                      "def detach():\n"
                      "    if os.fork() == 0:\n"
                      "        os.setsid()\n"
                      "        time.sleep(60)\n"
                      "attempt('detach', detach)\n"
                      "while True:\n    pass\n")
    result = run_in_sandbox({"main.py": code}, "main", args=[marker], timeout_s=1, **WALLS[wall])
    assert result.timed_out
    _check_refused(result, wall, ["detach"], {errno.EPERM}, events=["os.fork()"])
    time.sleep(0.2)
    assert _processes_with(marker) == []


def test_without_seccomp_the_pid_namespace_still_ends_every_process(monkeypatch):
    """The PID namespace on its own: with the filter taken away, a process that forks, leaves the session and sleeps
    is gone after the timeout (where fork works at all: as root; else RLIMIT_NPROC refuses it)."""
    monkeypatch.setattr(sb, "seccomp_filter", lambda: None)
    real = sb._rlimits
    monkeypatch.setattr(sb, "_rlimits", lambda program: {k: v for k, v in real(program).items() if k != "RLIMIT_NPROC"})
    marker = f"emokern-pidns-{os.getpid()}"
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            "print('forked', flush=True)\n"
            "while True:\n    pass\n")
    result = run_in_sandbox({"main.py": code}, "main", args=[marker], timeout_s=1, **WALLS["kernel-only"])
    assert result.timed_out
    assert result.stdout == "forked\n"
    time.sleep(0.2)
    assert _processes_with(marker) == []


def test_a_10_gb_file_is_stopped(wall):
    code = ATTEMPT + ("def seek_write():\n"
                      "    with open('a.bin', 'wb', buffering=0) as f:\n"
                      "        f.seek(10 << 30)\n"
                      "        f.write(b'x')\n"
                      "def truncate():\n"
                      "    with open('b.bin', 'wb') as f:\n"
                      "        f.truncate(10 << 30)\n"
                      "def fallocate():\n"
                      "    fd = os.open('c.bin', os.O_WRONLY | os.O_CREAT)\n"
                      "    try:\n"
                      "        os.posix_fallocate(fd, 0, 10 << 30)\n"
                      "    finally:\n"
                      "        os.close(fd)\n"
                      "def sequential():\n"
                      "    with open('d.bin', 'wb', buffering=0) as f:\n"
                      "        for _ in range(10 << 10):\n"
                      "            f.write(b'0' * (1 << 20))\n"
                      "def many_files():\n"
                      "    for i in range(10 << 10):\n"
                      "        with open('many%d.bin' % i, 'wb', buffering=0) as f:\n"
                      "            f.write(b'0' * (3 << 19))\n"
                      "for name in sys.argv[1:]:\n"
                      "    attempt(name, globals()[name])\n"
                      "print('TOTAL', sum(os.path.getsize(n) for n in os.listdir('.')))\n")
    attempts = ["seek_write", "truncate", "fallocate", "sequential"]
    if WALLS[wall]["sandbox"] == "bwrap":
        # only bwrap bounds all files together (its tmpfs); python-guard would fill the host's disk until the timeout
        attempts.append("many_files")
    before = _sandbox_dirs()
    result = run_in_sandbox({"main.py": code}, "main", args=attempts, timeout_s=10, file_size_mb=2, workdir_mb=8,
                            **WALLS[wall])
    found = _outcomes(result)
    assert all(found[name][:2] == ("refused", "OSError") for name in attempts), found
    assert {name: found[name][2] for name in attempts} == {
        name: errno.ENOSPC if name == "many_files" else errno.EFBIG for name in attempts}
    total = int(result.stdout.split("TOTAL ")[1])
    assert total <= 8 << 20
    assert _sandbox_dirs() <= before


def test_a_symlink_planted_in_the_working_directory_leads_nowhere(host_places, wall):
    links = {"link_shadow": "/etc/shadow", "link_home": str(host_places["home"]),
             "link_checkout": str(host_places["checkout"]), "link_cache": str(host_places["cache"]),
             "link_host_root": f"/proc/{os.getpid()}/root/etc/hostname", "link_home_dir": str(Path.home()),
             "link_host_root_dir": f"/proc/{os.getpid()}/root"}
    code = ATTEMPT + "".join(f"attempt('plant_{name}', lambda: os.symlink({target!r}, {name!r}))\n"
                             for name, target in links.items())
    reads = [name for name in links if not name.endswith("_dir")]
    code += "".join(f"attempt('read_{name}', lambda: print(open({name!r}).read()))\n" for name in reads)
    escaped = f"emokern-escaped-{os.getpid()}"
    written = [Path.home() / escaped, Path("/tmp") / escaped]  # where the writes through links would land
    code += (f"attempt('write_through', lambda: open('link_home_dir/{escaped}', 'w').write('x'))\n"
             f"attempt('write_host_root', lambda: open('link_host_root_dir/tmp/{escaped}', 'w').write('x'))\n")
    try:
        result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS[wall])
        landed = [str(p) for p in written if p.exists()]
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    found = _outcomes(result)
    if wall in GUARDED:
        _check_refused(result, wall, [f"plant_{name}" for name in links], set(), events=["os.symlink("])
    else:
        # planted inside the tmpfs, the links resolve in the sandbox's own root, where none of their targets is
        assert all(found[f"plant_{name}"][0] == "ALLOWED" for name in links), found
    # at every wall: the link is not there (the guard refused it) or its target is not
    assert all(found[f"read_{name}"] == ("refused", "FileNotFoundError", errno.ENOENT) for name in reads), found
    for name in ("write_through", "write_host_root"):
        assert found[name][0] == "refused" and found[name][2] in (errno.ENOENT, errno.EROFS), found[name]
    assert "secret-" not in result.stdout and "root:" not in result.stdout
    assert landed == []
    _host_unchanged(host_places)


def test_no_host_file_descriptor_reaches_the_sandbox():
    leak = open(__file__, "rb")  # an open file of the host process
    try:
        os.set_inheritable(leak.fileno(), True)
        code = ("import os\nfds = []\nfor fd in range(1024):\n    try:\n        os.fstat(fd)\n"
                "    except OSError:\n        continue\n    fds.append(fd)\nprint(fds)\n")
        result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS["kernel-only"])
        fds = ast.literal_eval(result.stdout)
        # stdin, stdout, stderr and the guard's report pipe (the report key's pipe is closed before the code runs)
        assert len(fds) == 4 and fds[:3] == [0, 1, 2], fds
    finally:
        leak.close()


# ----------------------------------------------------------------------------------------------------------------------
# Availability, the probe, the seccomp program
# ----------------------------------------------------------------------------------------------------------------------

def test_no_bubblewrap_is_refused_with_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as info:
            run_in_sandbox({"main.py": "pass\n"}, "main")
        with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
            check_isolation("bwrap")
    assert "sandbox='python-guard'" in str(info.value) and "--sandbox python-guard" in str(info.value)
    assert not [w for w in caught if issubclass(w.category, WeakSandboxWarning)]  # no silent fallback


@pytest.mark.parametrize("says, hint", [
    # where unprivileged user namespaces are off
    ("bwrap: No permissions to creating new namespace, likely because the kernel does not allow non-privileged "
     "user namespaces.", "user.max_user_namespaces"),
    ("bwrap: setting up uid map: Permission denied", "user.max_user_namespaces"),
    # a bubblewrap older than 0.8
    ("bwrap: Unknown option --disable-userns", "bubblewrap 0.8 or later"),
])
def test_a_bwrap_that_cannot_set_up_is_refused_with_what_to_do(monkeypatch, world_readable_dir, says, hint):
    tmp_path = world_readable_dir
    fake = tmp_path / "bwrap"
    fake.write_text(f"#!/bin/sh\necho '{says}' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable) as info:
        run_in_sandbox({"main.py": "print('ran')\n"}, "main")
    message = str(info.value)
    assert "bubblewrap could not set up the sandbox (exit status 1): " + says in message
    assert hint in message and "sandbox='python-guard'" in message


def test_an_interpreter_that_does_not_start_is_the_sandboxs_failure(monkeypatch):
    """A run whose code never started is not a failing program: the sandbox is broken, and that is an error."""
    real = bw._python_paths()
    monkeypatch.setattr(bw, "_python_paths", lambda: tuple(p for p in real if not os.path.isdir(p)))  # no stdlib
    with pytest.raises(SandboxUnavailable, match="did not start in the sandbox"):
        run_in_sandbox({"main.py": "pass\n"}, "main")
    monkeypatch.setattr(bw, "_python_paths", lambda: ())  # not even the interpreter
    with pytest.raises(SandboxUnavailable, match="bubblewrap could not set up the sandbox.*execvp"):
        run_in_sandbox({"main.py": "pass\n"}, "main")


def test_check_isolation_records_the_level_and_the_probe(level):
    record = check_isolation(level)
    assert record["sandbox"] == level and record["kernel_isolation"] == (level == "bwrap")
    assert set(record["probe"]) == {"network", "write_outside", "write_stdlib"}
    assert all(v.startswith("refused: ") for v in record["probe"].values())
    if level == "bwrap":
        assert record["bwrap"].startswith("bubblewrap ")
        assert record["seccomp"] is None or "clone" in record["seccomp"]["denied"]
        assert not any(p == str(Path.home()) or p.startswith(str(Path(emokern.__file__).resolve().parents[1]))
                       for p in record["read_only"])
        assert "Address family not supported" in record["probe"]["network"]  # seccomp: no AF_INET socket
        assert record["host_uid"] != 0 and record["proc"] is None
        assert record["seccomp"] is None or record["seccomp"]["socket_families"] == ["AF_UNIX"]
    else:
        assert "not a security boundary" in record["warning"]
        assert all("PermissionError: sandbox:" in v for v in record["probe"].values())
    assert sandbox_info(level).items() <= record.items()


@pytest.mark.parametrize("hole, found", [
    (["--share-net"], "reached the host's 127.0.0.1"),
    (["--bind", tempfile.gettempdir(), tempfile.gettempdir()], "created"),
])
def test_the_probe_finds_a_hole(monkeypatch, hole, found):
    """Each wall taken away on its own is found by the probe (the network namespace needs the socket filter gone
    too: with it, no AF_INET socket is made at all)."""
    if hole == ["--share-net"]:
        monkeypatch.setattr(sb, "seccomp_filter", lambda: None)
    real = bw.bwrap_arguments

    def with_hole(*args):
        options = real(*args)
        at = options.index("--hostname") + 2  # after the namespace options, before the root is made read-only
        return options[:at] + hole + options[at:]

    monkeypatch.setattr(sb, "bwrap_arguments", with_hole)  # where run_in_sandbox looks it up
    with pytest.raises(SandboxUnavailable, match=found) as info:
        check_isolation("bwrap")
    assert "does not isolate here" in str(info.value)
    assert not list(Path(tempfile.gettempdir()).glob("emokern-probe-*/escaped.txt"))


def _run_bpf(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """Evaluate the filter's classic BPF on ``seccomp_data`` {nr, arch, ip, args} (the four instructions it uses)."""
    data = struct.pack("=IIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    pc, acc = 0, 0
    ops = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    while True:
        code, jt, jf, k = ops[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


@pytest.mark.parametrize("arch", sorted(bw._SECCOMP_ARCHES))
def test_the_seccomp_program_refuses_the_listed_calls_and_allows_the_rest(monkeypatch, arch):
    monkeypatch.setattr(bw, "_seccomp_arch", lambda: arch)
    program = bw.seccomp_filter()
    audit_arch, column = bw._SECCOMP_ARCHES[arch]
    denied = {row[column] for row in bw._DENIED_SYSCALLS.values() if row[column] is not None}
    sockets = {row[column] for row in bw._SOCKET_SYSCALLS.values()}
    for nr in range(460):
        expected = 0x00050001 if nr in denied else 0x00050000 | errno.EAFNOSUPPORT if nr in sockets else 0x7FFF0000
        assert _run_bpf(program, audit_arch, nr, arg0=socket.AF_INET) == expected, nr
    for nr in sockets:
        assert _run_bpf(program, audit_arch, nr, arg0=socket.AF_UNIX) == 0x7FFF0000
        for family in (socket.AF_INET6, 40, socket.AF_NETLINK, socket.AF_PACKET, 0, 255):  # 40: AF_VSOCK
            assert _run_bpf(program, audit_arch, nr, arg0=family) == 0x00050000 | errno.EAFNOSUPPORT, family
        assert _run_bpf(program, audit_arch, nr, arg0=(1 << 32) | socket.AF_INET) == 0x00050000 | errno.EAFNOSUPPORT
    other = next(a for a, _ in bw._SECCOMP_ARCHES.values() if a != audit_arch)
    assert _run_bpf(program, other, 0) == 0x80000000  # another ABI is killed
    assert _run_bpf(program, 0x40000003, 0) == 0x80000000  # i386
    if arch == "x86_64":
        assert _run_bpf(program, audit_arch, 0x40000000 + 56) == 0x00050001  # x32


def test_the_syscall_table_matches_libseccomp():
    name = ctypes.util.find_library("seccomp")
    if name is None:
        pytest.skip("libseccomp is not installed: nothing to compare the table with")
    lib = ctypes.CDLL(name)
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    for arch, (audit_arch, column) in bw._SECCOMP_ARCHES.items():
        for call, row in {**bw._DENIED_SYSCALLS, **bw._SOCKET_SYSCALLS}.items():
            number = lib.seccomp_syscall_resolve_name_arch(audit_arch, call.encode())
            assert (number if number >= 0 else None) == row[column], (arch, call, number)


def test_bwrap_runs_the_base_interpreter_and_mounts_no_home_project_or_venv():
    interpreter = bw.base_interpreter()
    assert os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)
    checkout = str(Path(emokern.__file__).resolve().parents[1])
    mounted = bw._python_paths()
    assert interpreter in mounted
    for path in mounted:
        assert not path.startswith(sys.prefix + "/") or sys.prefix == sys.base_prefix, path  # nothing of a venv
        assert path != str(Path.home()) and path != checkout


# ----------------------------------------------------------------------------------------------------------------------
# Host root, leftovers, socket families, the report (each at the kernel-only wall and at the default level; where a
# fix can be taken away in a test, the attack is also shown to get through without it)
# ----------------------------------------------------------------------------------------------------------------------

KERNEL_WALLS = ["bwrap", "kernel-only"]
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
# the sysctls the escape used, and other global knobs; opened for writing only, never written
KNOBS = {"core_pattern": "/proc/sys/kernel/core_pattern", "drop_caches": "/proc/sys/vm/drop_caches",
         "panic": "/proc/sys/kernel/panic", "hostname": "/proc/sys/kernel/hostname",
         "ip_forward": "/proc/sys/net/ipv4/ip_forward", "sysrq": "/proc/sysrq-trigger",
         "uevent_helper": "/sys/kernel/uevent_helper", "modprobe": "/proc/sys/kernel/modprobe"}


@pytest.fixture(params=KERNEL_WALLS)
def kernel_wall(request) -> str:
    return request.param


def _open_for_writing_program(knobs: dict) -> str:
    return ATTEMPT + "".join(f"attempt({name!r}, lambda: os.close(os.open({path!r}, os.O_WRONLY)))\n"
                             for name, path in knobs.items())


def test_no_kernel_knob_can_be_opened_for_writing_and_the_hosts_core_pattern_is_unchanged(kernel_wall):
    before = CORE_PATTERN.read_text()
    result = run_in_sandbox({"main.py": _open_for_writing_program(KNOBS)}, "main", timeout_s=5, **WALLS[kernel_wall])
    # no /proc and no /sys in the sandbox: the knobs are not there to open
    _check_refused(result, kernel_wall, list(KNOBS), {errno.ENOENT}, events=["open('/proc/sys/kernel/core_pattern'"])
    assert CORE_PATTERN.read_text() == before


def test_mounting_a_proc_of_its_own_is_refused():
    code = ATTEMPT + ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "def mount_proc():\n"
                      "    if libc.mount(b'proc', b'/sandbox', b'proc', 0, None) == -1:\n"
                      "        raise OSError(ctypes.get_errno(), 'mount')\n"
                      "attempt('mount_proc', mount_proc)\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS["kernel-only"])
    _check_refused(result, "kernel-only", ["mount_proc"], {errno.EPERM})


@pytest.mark.skipif(os.geteuid() != 0, reason="the fix is for a caller that is root")
def test_with_a_proc_and_no_uid_drop_the_knobs_open_for_writing(monkeypatch):
    """The fix taken away (bwrap started by root, a /proc mounted): core_pattern opens for writing from inside (it is
    closed again without a write). With the fix, the test above finds nothing to open."""
    real = bw.bwrap_arguments
    monkeypatch.setattr(sb, "runs_as_root", lambda: False)
    monkeypatch.setattr(bw, "runs_as_root", lambda: False)
    monkeypatch.setattr(sb, "bwrap_arguments", lambda *a: ["--proc", "/proc"] + real(*a))
    before = CORE_PATTERN.read_text()
    result = run_in_sandbox({"main.py": _open_for_writing_program({"core_pattern": KNOBS["core_pattern"]})}, "main",
                            timeout_s=5, **WALLS["kernel-only"])
    assert _outcomes(result)["core_pattern"] == ("ALLOWED", None, None)
    assert result.host_uid == 0
    assert CORE_PATTERN.read_text() == before


def _uid_seen_by_the_host(marker: str, run) -> tuple:
    """Run ``run()`` in a thread and read the real uid of the host process whose command line holds ``marker``."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", run()))
    thread.start()
    uid = None
    try:
        for _ in range(100):
            found = [pid for pid in _processes_with(marker)  # the interpreter, not the launcher or bwrap
                     if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == bw.base_interpreter().encode()]
            if found:
                uid = sb._host_uid(found[0])
                if uid is not None:
                    break
            time.sleep(0.05)
    finally:
        thread.join()
    return uid, box["result"]


def test_the_host_sees_the_sandboxed_process_as_an_unprivileged_uid(kernel_wall):
    marker = f"emokern-uid-{os.getpid()}-{kernel_wall}"
    code = "import os, sys, time\nprint(os.getuid(), os.geteuid())\ntime.sleep(1.5)\n"
    uid, result = _uid_seen_by_the_host(marker, lambda: run_in_sandbox(
        {"main.py": code}, "main", args=[marker], timeout_s=10, **WALLS[kernel_wall]))
    expected = bw.SANDBOX_UID if os.geteuid() == 0 else os.geteuid()
    assert uid == expected and result.host_uid == expected and uid != 0
    assert result.stdout == f"{expected} {expected}\n"  # and the same inside: its uid 0 is nobody's


@pytest.mark.skipif(os.geteuid() != 0, reason="the fix is for a caller that is root")
def test_without_the_uid_drop_the_sandbox_runs_as_host_root(monkeypatch):
    monkeypatch.setattr(sb, "runs_as_root", lambda: False)
    monkeypatch.setattr(bw, "runs_as_root", lambda: False)
    marker = f"emokern-uid-reverted-{os.getpid()}"
    uid, result = _uid_seen_by_the_host(marker, lambda: run_in_sandbox(
        {"main.py": "import time\ntime.sleep(1.5)\n"}, "main", args=[marker], timeout_s=10, **WALLS["kernel-only"]))
    assert uid == 0 and result.host_uid == 0
    # and the start-up probe refuses to go on
    with pytest.raises(SandboxUnavailable, match="ran as the host's root"):
        check_isolation("bwrap")


SOCKET_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "vsock": 40, "netlink": socket.AF_NETLINK,
                   "packet": socket.AF_PACKET, "alg": 38, "bluetooth": 31}


def _socket_program(families: dict) -> str:
    return ATTEMPT + "import socket\n" + "".join(
        f"attempt({name!r}, lambda: socket.socket({family}, socket.SOCK_DGRAM if {family} == 16 else "
        f"socket.SOCK_RAW if {family} == 17 else socket.SOCK_SEQPACKET if {family} == 38 else socket.SOCK_STREAM))\n"
        for name, family in families.items()) + "attempt('unix', lambda: socket.socketpair())\n"


def test_only_unix_sockets_can_be_made(kernel_wall):
    result = run_in_sandbox({"main.py": _socket_program(SOCKET_FAMILIES)}, "main", timeout_s=5, **WALLS[kernel_wall])
    _check_refused(result, kernel_wall, list(SOCKET_FAMILIES), {errno.EAFNOSUPPORT}, events=["socket.__new__"])
    if kernel_wall == "kernel-only":
        assert _outcomes(result)["unix"] == ("ALLOWED", None, None)


def test_without_the_socket_rule_a_vsock_socket_is_made(monkeypatch):
    monkeypatch.setattr(bw, "_SOCKET_SYSCALLS", {})
    result = run_in_sandbox({"main.py": _socket_program({"vsock": 40})}, "main", timeout_s=5, **WALLS["kernel-only"])
    assert _outcomes(result)["vsock"] == ("ALLOWED", None, None)


def test_a_unix_socket_of_the_host_is_out_of_reach():
    """An abstract AF_UNIX socket belongs to a network namespace: the host's is not the sandbox's."""
    name = f"\0emokern-abstract-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(name)
        server.listen(1)
        server.setblocking(False)
        code = ATTEMPT + (f"import socket\n"
                          f"attempt('abstract', lambda: socket.socket(socket.AF_UNIX).connect({name!r}))\n")
        result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS["kernel-only"])
        _check_refused(result, "kernel-only", ["abstract"], {errno.ECONNREFUSED})
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


_ORPHAN = ATTEMPT + '''import time
def reset_parent_death_signal():
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG, 0
        raise OSError(ctypes.get_errno(), "prctl")
attempt("pdeathsig", reset_parent_death_signal)
while True:
    time.sleep(0.05)
'''


def test_a_process_that_resets_its_parent_death_signal_does_not_outlive_the_run(kernel_wall):
    marker = f"emokern-orphan-{os.getpid()}-{kernel_wall}"
    start = time.monotonic()
    result = run_in_sandbox({"main.py": _ORPHAN}, "main", args=[marker], timeout_s=2, **WALLS[kernel_wall])
    elapsed = time.monotonic() - start
    assert result.timed_out and elapsed < 3.0, elapsed  # within the timeout + 1 s
    if kernel_wall == "kernel-only":
        assert _outcomes(result)["pdeathsig"] == ("ALLOWED", None, None)
    time.sleep(0.2)
    assert _processes_with(marker) == []


def test_without_the_kill_of_the_namespace_the_orphan_survives(monkeypatch):
    """The fix taken away (the sandbox's PID 1 not killed through its pidfd): the bwrap launcher dies at the timeout,
    the process that reset its parent-death signal lives on as an orphan (killed here by the test)."""
    def read_without_a_pidfd(self):
        while os.read(self.fd, 4096):
            pass
        os.close(self.fd)

    monkeypatch.setattr(sb._ChildInfo, "run", read_without_a_pidfd)
    marker = f"emokern-orphan-reverted-{os.getpid()}"
    try:
        run_in_sandbox({"main.py": _ORPHAN}, "main", args=[marker], timeout_s=1, **WALLS["kernel-only"])
        time.sleep(0.3)
        assert _processes_with(marker) != []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, 9)


def test_memory_beyond_the_address_space_limit_is_refused():
    """memfds, System V shared memory and POSIX message queues hold memory that RLIMIT_AS does not count: seccomp
    refuses them (the working directory's tmpfs is bounded by workdir_mb, /dev is read-only, there is no /dev/shm)."""
    code = ATTEMPT + ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "def call(name, *args):\n"
                      "    def go():\n"
                      "        if getattr(libc, name)(*args) == -1:\n"
                      "            raise OSError(ctypes.get_errno(), name)\n"
                      "    return go\n"
                      "attempt('memfd', lambda: os.memfd_create('hold'))\n"
                      "attempt('shmget', call('shmget', 0, 600 << 20, 0o1600))\n"  # IPC_PRIVATE, IPC_CREAT | 0600
                      "attempt('mq_open', call('mq_open', b'/hold', 0o102, 0o600, None))\n"
                      "attempt('dev_shm', lambda: open('/dev/shm/hold', 'wb'))\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, **WALLS["kernel-only"])
    found = _outcomes(result)
    _check_refused(result, "kernel-only", ["memfd", "shmget", "mq_open"], {errno.EPERM})
    assert found["dev_shm"][0] == "refused" and found["dev_shm"][2] in (errno.ENOENT, errno.EROFS)


# The code finds the report descriptor (the one pipe it was given) and writes lines shaped like the guard's.
_FORGER = ATTEMPT + '''import stat
pipes = []
for fd in range(3, 64):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            pipes.append(fd)
    except OSError:
        pass
print("PIPES", pipes, flush=True)
for fd in pipes:
    for i in range(20000):
        os.write(fd, b"%032x %d V open('/etc/forged', 'r', 524288)\\n" % (i, i))
    os.write(fd, b"V open('/etc/forged-plain')\\n+++\\n")
attempt("real", lambda: open("/etc/passwd"))
'''


def test_forged_report_lines_never_reach_the_record(kernel_wall):
    result = run_in_sandbox({"main.py": _FORGER}, "main", timeout_s=10, **WALLS[kernel_wall])
    pipes = ast.literal_eval(result.stdout.split("PIPES ")[1].split("\n")[0])
    assert len(pipes) == 1  # the report descriptor, found
    assert not any("forged" in v for v in result.violations)
    # 1.2 MB of forged lines: all dropped, none pushing the real ones out
    assert result.forged_report_lines == 20002 and result.report_complete
    if kernel_wall == "bwrap":
        assert len(result.violations) == 1 and result.violations[0].startswith("open('/etc/passwd'")
        assert result.n_violations == 1
    else:
        assert result.violations == [] and result.n_violations == 0


def test_hiding_the_report_is_seen():
    code = ATTEMPT + ('''import stat
for fd in range(3, 64):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.dup2(os.open("/dev/null", os.O_RDONLY), fd)
    except OSError:
        pass
attempt("hidden", lambda: open("/etc/passwd"))
''')
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5)
    assert _outcomes(result)["hidden"][:2] == ("refused", "PermissionError")
    assert result.violations == [] and not result.report_complete  # the refusal is lost, and that is seen


def test_os_exit_leaves_the_report_open():
    result = run_in_sandbox({"main.py": "import os\nos._exit(0)\n"}, "main", timeout_s=5)
    assert result.exit_code == 0 and not result.report_complete and result.forged_report_lines == 0


def test_no_stage_directory_or_mount_is_left_on_the_host():
    before = {p.name for p in Path(tempfile.gettempdir()).glob("emokern-stage-*")}
    run_in_sandbox({"main.py": "print('ok')\n"}, "main", timeout_s=5)
    assert {p.name for p in Path(tempfile.gettempdir()).glob("emokern-stage-*")} <= before
    assert "emokern-stage" not in Path("/proc/self/mounts").read_text()


_HIDDEN_VAULT = "from solution import access_code\n\ndef test_vault():\n    assert access_code() == '207751938640'\n"
_CHEATING_SOLUTION = '''import atexit, importlib.util, os, re, sys
def access_code():
    spec = importlib.util.find_spec("test_hidden")
    found = re.findall(r"\\d{12}", spec.loader.get_source("test_hidden")) if spec else []
    return found[0] if found else "000000000000"
def forge():
    sys.__stdout__.write("PASS test_vault\\n== 1 passed, 0 failed ==\\n")
    sys.__stdout__.flush()
    os._exit(0)
atexit.register(forge)
'''


# The driver of the run as an unprivileged user: the sandbox's two modules and its child programs loaded from a copy
# (they need only the standard library), the attacks above run through them, the findings printed as JSON.
_UNPRIVILEGED_DRIVER = r'''
import json, os, sys, time, types
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emokern.experiments import sandbox as sb
found = {"uid": os.getuid()}
marker = "emokern-unprivileged-orphan-" + sys.argv[1]
r = sb.run_in_sandbox({"main.py": "import os, time\nprint(os.getuid())\ntime.sleep(0.5)\n"}, "main", timeout_s=10,
                      audit_hook=False)
found["host_uid"], found["inside_uid"] = r.host_uid, int(r.stdout)
r = sb.run_in_sandbox({"main.py": sys.argv[2]}, "main", timeout_s=10, audit_hook=False)
found["knobs"] = r.stdout
r = sb.run_in_sandbox({"main.py": sys.argv[3]}, "main", timeout_s=10, audit_hook=False)
found["sockets"] = r.stdout
start = time.monotonic()
r = sb.run_in_sandbox({"main.py": sys.argv[4]}, "main", args=[marker], timeout_s=2, audit_hook=False)
found["orphan_seconds"] = time.monotonic() - start
time.sleep(0.3)
found["orphan_left"] = [p for p in os.listdir("/proc") if p.isdigit() and os.path.exists("/proc/" + p + "/cmdline")
                        and marker.encode() in open("/proc/" + p + "/cmdline", "rb").read()]
r = sb.run_in_sandbox({"main.py": sys.argv[5]}, "main", timeout_s=10)
found["forged"], found["violations"], found["complete"] = r.forged_report_lines, r.violations, r.report_complete
# the two-process test run with a cheating solution (forged output at exit, the hidden test read by the import system)
from emokern.experiments.sandboxed import program_files
tests = sb.SandboxProgram({"test_hidden.py": sys.argv[6], **program_files("test_runner", "remote_calls")},
                          "test_runner", args=["test_hidden", "2.0", sb.CHANNEL], timeout_s=20)
solution = sb.SandboxProgram({"solution.py": sys.argv[7], **program_files("solution_server", "remote_calls")},
                             "solution_server", args=[sb.CHANNEL, "2.0"], timeout_s=20)
tested, served = sb.run_programs([tests, solution], 20)
found["verdict"], found["tests_uid"], found["solution_uid"] = tested.stdout, tested.host_uid, served.host_uid
print(json.dumps(found))
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="this run as root starts the unprivileged run; run as a user, the "
                                              "whole file is that run")
def test_the_walls_hold_when_run_as_an_unprivileged_user():
    """The same attacks, with emokern itself run as an unprivileged user (uid 65534 here): the sandbox is that
    user's, the knobs are out of reach, only AF_UNIX sockets are made, the orphan is gone, forged lines dropped."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that an unprivileged user can run")
    source = Path(bw.__file__).parent
    root = Path(tempfile.mkdtemp(prefix="emokern-unprivileged-"))
    try:
        package = root / "emokern" / "experiments"
        package.mkdir(parents=True)
        (root / "emokern" / "__init__.py").write_text("")
        (package / "__init__.py").write_text("")
        for name in ("bwrap.py", "sandbox.py"):
            shutil.copy(source / name, package / name)
        shutil.copytree(source / "sandboxed", package / "sandboxed", ignore=shutil.ignore_patterns("__pycache__"))
        (root / "driver.py").write_text(_UNPRIVILEGED_DRIVER)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        out = subprocess.run(["setpriv", f"--reuid={bw.SANDBOX_UID}", f"--regid={bw.SANDBOX_GID}", "--clear-groups",
                              python, "-I", "-B", str(root / "driver.py"), str(os.getpid()),
                              _open_for_writing_program(KNOBS), _socket_program(SOCKET_FAMILIES), _ORPHAN, _FORGER,
                              _HIDDEN_VAULT, _CHEATING_SOLUTION],
                             capture_output=True, text=True, timeout=120, cwd=str(root),
                             env={"PATH": "/usr/bin:/bin", "HOME": str(root)})
        assert out.returncode == 0, out.stderr
        found = json.loads(out.stdout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert found["uid"] == found["host_uid"] == found["inside_uid"] == bw.SANDBOX_UID
    knobs = {line.split(" ")[0]: line.split(" ")[1:] for line in found["knobs"].splitlines()}
    assert set(knobs) == set(KNOBS) and all(v[0] == "refused" for v in knobs.values()), knobs
    sockets = dict(line.split(" ", 1) for line in found["sockets"].splitlines())
    assert all(sockets[name].startswith(f"refused OSError {errno.EAFNOSUPPORT}") for name in SOCKET_FAMILIES)
    assert sockets["unix"] == "ALLOWED"
    assert found["orphan_seconds"] < 3.0 and found["orphan_left"] == []
    assert found["forged"] == 20002 and found["complete"] and len(found["violations"]) == 1
    assert found["verdict"].splitlines()[-1] == "== 0 passed, 1 failed ==", found["verdict"]
    assert found["tests_uid"] == found["solution_uid"] == bw.SANDBOX_UID


def test_a_gc_callback_cannot_move_the_working_directory_during_a_check(level):
    """The guard's check of a relative path reads the working directory; a gc callback that ran inside the hook
    could change it between the check and the call (the check sees the working directory, the call a standard-library
    directory). The hook runs with garbage collection off, so the write lands where it was checked."""
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    escaped = Path(stdlib).parents[2] / f"emokern-gc-escaped-{os.getpid()}"  # where "../../../<name>" would land
    code = ATTEMPT + (f"import gc\n"
                      f"os.makedirs('a/b/c')\n"
                      f"os.chdir('a/b/c')\n"
                      f"moved = []\n"
                      f"def move(phase, info):\n"
                      f"    if phase != 'start' or moved:\n        return\n"
                      f"    frame, names = sys._getframe(1), set()\n"
                      f"    while frame is not None:\n"
                      f"        names.add(frame.f_code.co_name)\n        frame = frame.f_back\n"
                      f"    if 'check_path' in names:  # inside the guard's check, after it read the directory\n"
                      f"        moved.append(1)\n"
                      f"        os.chdir({stdlib!r})\n"
                      f"gc.callbacks.append(move)\n"
                      f"gc.set_threshold(1)\n"
                      f"try:\n"
                      f"    open('../../../{escaped.name}', 'w').write('x')\n"
                      f"except Exception as exc:\n"
                      f"    print('write refused', type(exc).__name__, None)\n"
                      f"else:\n"
                      f"    print('write ALLOWED')\n"
                      f"gc.callbacks.clear()\n"
                      f"print('CWD', os.getcwd())\n")
    try:
        result = run_in_sandbox({"main.py": code}, "main", timeout_s=10, sandbox=level)
        assert not escaped.exists()
    finally:
        escaped.unlink(missing_ok=True)
    assert _outcomes(result)["write"] == ("ALLOWED", None, None)  # inside the working directory, as checked
    assert result.stdout.splitlines()[-1].endswith("/a/b/c")  # the callback never ran inside the check
