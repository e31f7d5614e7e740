"""Tests of emokern.experiments.sandbox: each escape attempt is contained, reported, and leaves the host unharmed.

Timeouts are 1-2 s so that the file runs in well under 30 s.
"""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
from pathlib import Path

import pytest

from emokern.experiments.sandbox import MAX_VIOLATIONS, run_in_sandbox


def _processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def _sandbox_dirs() -> set:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("emokern-sandbox-*")}


def test_normal_script_passes_and_its_output_comes_back():
    result = run_in_sandbox({"main.py": "import sys\nprint('hello', sys.argv[1:])\nprint('oops', file=sys.stderr)\n"},
                            "main", args=["a", "b"], timeout_s=5)
    assert result.ok and result.exit_code == 0
    assert result.stdout == "hello ['a', 'b']\n"
    assert result.stderr == "oops\n"
    assert not result.timed_out and result.killed_by is None and not result.memory_exceeded
    assert result.violations == [] and result.n_violations == 0
    assert not result.stdout_truncated and result.stdout_bytes == len(result.stdout)


def test_exit_status_and_uncaught_exception_are_reported():
    result = run_in_sandbox({"main.py": "raise ValueError('broken')\n"}, "main", timeout_s=5)
    assert result.exit_code == 1 and not result.ok
    assert "ValueError: broken" in result.stderr
    assert run_in_sandbox({"main.py": "import sys\nsys.exit(3)\n"}, "main", timeout_s=5).exit_code == 3


def test_reading_and_writing_inside_the_working_directory_is_allowed():
    code = ("import os\n"
            "print(open('data.txt').read())\n"
            "os.mkdir('sub')\n"
            "with open('sub/out.txt', 'w') as f:\n    f.write('written')\n"
            "print(sorted(os.listdir('.')), open('sub/out.txt').read(), os.environ['HOME'] == os.getcwd())\n")
    result = run_in_sandbox({"main.py": code, "data.txt": "given"}, "main", timeout_s=5)
    assert result.ok, result.stderr
    assert result.stdout == "given\n['data.txt', 'main.py', 'sub'] written True\n"
    assert result.violations == []


def test_writing_outside_the_working_directory_is_refused(tmp_path):
    targets = [tmp_path / "absolute.txt", Path("/tmp") / f"emokern-escape-{os.getpid()}.txt"]
    code = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('bad')\nexcept PermissionError as e:\n    print('refused')"
                     for t in targets)
    code += "\nopen('../relative-escape.txt', 'w').write('bad')\n"
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5)
    assert result.stdout == "refused\nrefused\n"
    assert "PermissionError" in result.stderr and result.exit_code == 1
    assert [v.split("(")[0] for v in result.violations] == ["open", "open", "open"]
    assert str(targets[0]) in result.violations[0] and "../relative-escape.txt" in result.violations[2]
    for t in targets:
        assert not t.exists()
    assert not list(Path("/tmp").glob("relative-escape.txt"))


def test_deleting_renaming_and_linking_outside_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    code = (f"import os, shutil\n"
            f"for attempt in (lambda: os.remove({str(victim)!r}), lambda: os.rename({str(victim)!r}, 'x'),\n"
            f"                lambda: shutil.rmtree({str(tmp_path)!r}), lambda: os.symlink({str(victim)!r}, 'l'),\n"
            f"                lambda: os.chmod({str(victim)!r}, 0)):\n"
            f"    try:\n        attempt()\n    except PermissionError:\n        print('refused')\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5)
    assert result.stdout == "refused\n" * 5, result.stderr
    assert [v.split("(")[0] for v in result.violations] == ["os.remove", "os.rename", "shutil.rmtree", "os.symlink",
                                                            "os.chmod"]
    assert victim.read_text() == "precious"


def test_reading_host_files_is_refused():
    result = run_in_sandbox({"main.py": "print(open('/etc/hostname').read())\n"}, "main", timeout_s=5)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.violations == ["open('/etc/hostname', 'r', 524288)"]


def test_sockets_are_refused():
    # a listening socket on the host: a connection from the sandbox would be accepted by it
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
        result = run_in_sandbox({"main.py": code}, "main", timeout_s=5)
        assert result.exit_code == 1 and "connected" not in result.stdout
        assert result.violations and result.violations[0].startswith(("socket.getaddrinfo", "socket.__new__"))
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_fork_bomb_is_contained():
    before = _processes()
    code = ("import os\n"
            "for _ in range(5000):\n"
            "    try:\n        os.fork()\n    except PermissionError:\n        pass\n"
            "while True:\n    os.fork()\n")
    start = time.perf_counter()
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=2)
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
def test_starting_processes_and_native_code_are_refused(code, event):
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5)
    assert result.exit_code == 1, result.stderr
    assert result.violations and result.violations[0].startswith(event)
    assert "PermissionError" in result.stderr


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.perf_counter()
    result = run_in_sandbox({"main.py": "print('started', flush=True)\nwhile True:\n    pass\n"}, "main", timeout_s=1)
    elapsed = time.perf_counter() - start
    assert result.timed_out and result.killed_by == "SIGKILL" and result.exit_code is None
    assert result.stdout == "started\n"
    assert 1.0 <= result.duration_s < 2.0 and elapsed < 4.0
    assert not result.memory_exceeded


def test_huge_allocation_fails_and_is_reported():
    result = run_in_sandbox({"main.py": "block = bytearray(4 * 1024 ** 3)\nprint('allocated')\n"}, "main",
                            timeout_s=5, memory_mb=256)
    assert result.exit_code == 1 and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr and result.memory_exceeded


def test_output_flood_is_truncated_without_filling_host_memory():
    tracemalloc.start()
    try:
        result = run_in_sandbox({"main.py": "import sys\nchunk = 'x' * 1_000_000\n"
                                            "for _ in range(100):\n    sys.stdout.write(chunk)\n"
                                            "sys.stderr.write('e' * 50_000)\n"},
                                "main", timeout_s=10, max_output=8192)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok
    assert result.stdout == "x" * 8192 and result.stdout_truncated and result.stdout_bytes == 100_000_000
    assert result.stderr == "e" * 8192 and result.stderr_truncated and result.stderr_bytes == 50_000
    assert peak < 4 * 1024 * 1024  # read in 64 KiB chunks and dropped: nowhere near the 100 MB written


def test_file_size_limit_stops_a_disk_filler():
    code = "with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(b'0' * (1 << 20))\n"
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5, file_size_mb=2)
    assert not result.ok
    assert result.killed_by == "SIGXFSZ" or "File too large" in result.stderr


def test_the_guard_survives_monkeypatching(tmp_path):
    target = tmp_path / "escape.txt"
    code = ("import builtins, os, os.path\n"
            "os.path.abspath = os.path.realpath = os.path.normpath = lambda p: os.getcwd() + '/ok'\n"
            "builtins.isinstance = lambda *a: True\n"
            f"open({str(target)!r}, 'w').write('bad')\n")
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5)
    assert result.exit_code == 1 and result.violations
    assert not target.exists()


def test_the_working_directory_is_removed_afterwards():
    before = _sandbox_dirs()
    code = "import os\nprint(os.getcwd())\nos.mkdir('d')\nopen('d/f.txt', 'w').write('x')\nos.chmod('d', 0)\n"
    result = run_in_sandbox({"main.py": code}, "main", timeout_s=5)
    workdir = result.stdout.strip()
    assert Path(workdir).name.startswith("emokern-sandbox-")
    assert not os.path.exists(workdir)
    timed_out = run_in_sandbox({"main.py": "while True:\n    pass\n"}, "main", timeout_s=1)
    assert timed_out.timed_out
    assert _sandbox_dirs() <= before


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("EMOKERN_SECRET_FOR_TEST", "host-value")
    result = run_in_sandbox({"main.py": "import os, sys\nprint(sorted(os.environ), sys.flags.isolated)\n"}, "main",
                            timeout_s=5)
    assert result.stdout == "['HOME', 'LANG', 'PATH', 'TMPDIR'] 1\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(files={"/etc/x.py": ""}, module="x"), "relative paths"),
    (dict(files={"../x.py": ""}, module="x"), "relative paths"),
    (dict(files={"x.py": ""}, module="x; rm"), "dotted Python module name"),
    (dict(files={"x.py": ""}, module="x", timeout_s=0), "timeout_s must be a positive number"),
    (dict(files={"x.py": ""}, module="x", memory_mb=float("nan")), "memory_mb must be a positive number"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_in_sandbox(**kwargs)
