"""Runs a test module against the solution served by another process: ``python -m test_runner MODULE PER_TEST_S
READ,WRITE``.

Runs in the test sandbox, which holds the test module, this file and :mod:`remote_calls`, never ``solution.py``.
``import solution`` (or ``from solution import f``) gives a module whose attributes are the solution's objects in the
other process (:class:`remote_calls.Proxy`); ``importlib.reload`` reloads it there. Every ``test_*`` function of the
module runs in file order under a limit of ``PER_TEST_S`` + 1 seconds (the solution's process stops each call at
``PER_TEST_S``), and prints ``PASS name`` or ``FAIL name: message`` with the frames of the test file and of
``solution.py``, then ``== P passed, F failed ==``. Only this process writes these lines: the host reads them from
its standard output, which the solution's process does not share.

The tests' clocks (``time.perf_counter``, ``monotonic``, ``time`` and their ``_ns`` forms) leave out the time spent
moving data between the processes (:attr:`remote_calls.Peer.transport_s`), so that a test that times a call sees the
call itself, as it would in one process.
"""

import importlib
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time
import traceback

import remote_calls


_MAX_MESSAGE = 1000  # characters of one failure's message


class TestTimeout(BaseException):
    pass


def _stop(signum, frame):
    raise TestTimeout()


class _Solution(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``solution`` as a module of the other process."""

    def __init__(self, peer):
        self.peer = peer

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "solution":
            return None
        return importlib.machinery.ModuleSpec("solution", self, origin="solution.py (in the solution's process)")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        remote = self.peer.request("reload" if "__remote__" in vars(module) else "import", None)
        module.__remote__ = remote
        module.__getattr__ = lambda name: getattr(remote, name)


def _virtual_clock(peer):
    """Replace the time module's clocks with ones that leave out the transport time."""
    def minus(real):
        return lambda: real() - peer.transport_s

    def minus_ns(real):
        return lambda: real() - int(peer.transport_s * 1e9)

    for name in ("perf_counter", "monotonic", "time"):
        setattr(time, name, minus(getattr(time, name)))
        setattr(time, name + "_ns", minus_ns(getattr(time, name + "_ns")))


def _clean(text):
    # file names relative to the working directory, so that the output does not depend on where it ran
    return text.replace(os.getcwd() + os.sep, "")


def _indented(text):
    """``text`` with every line after the first indented: text that came from the solution (a message, the repr of a
    value it returned, its traceback) can never stand at the start of a line, where the verdict lines are."""
    return "\n    ".join(text.splitlines())


def _frames(exc, files):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.basename(f.filename) in files]
    text = "".join(f'  File "{os.path.basename(f.filename)}", line {f.lineno}, in {f.name}\n    {f.line}\n'
                   for f in frames[-4:])
    remote = getattr(exc, "remote_traceback", "")
    return text + "".join("  " + line.lstrip(" ") + "\n" if not line.startswith("  ") else line + "\n"
                          for line in remote.splitlines())


def _message(exc):
    if isinstance(exc, remote_calls.ChannelBroken):
        return f"the solution's process stopped answering: {exc}"
    text = _clean("".join(traceback.format_exception_only(type(exc), exc)).strip())
    if len(text) > _MAX_MESSAGE:  # a huge repr in a message would push the later tests' lines out of the output
        text = text[:_MAX_MESSAGE] + f" [... {len(text) - _MAX_MESSAGE} more characters]"
    return _indented(text)


def main():
    name, per_test = sys.argv[1], float(sys.argv[2])
    read_fd, write_fd = (int(fd) for fd in sys.argv[3].split(","))
    files = {name + ".py"}
    peer = remote_calls.Peer(read_fd, write_fd, "tests", exceptions={"TestTimeout": TestTimeout})
    signal.signal(signal.SIGALRM, _stop)
    try:
        # only the server's own code answers these (solution.py is imported later): no timer but the host's
        peer.calibrate()
    except BaseException as exc:
        print(f"ERROR starting the solution's process: {_message(exc)}")
        print("== 0 passed, 0 failed (the tests could not be run) ==")
        return 1
    _virtual_clock(peer)
    sys.meta_path.insert(0, _Solution(peer))
    try:
        signal.setitimer(signal.ITIMER_REAL, per_test + 1)  # importing the tests imports solution.py over there
        try:
            module = importlib.import_module(name)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as exc:
        if isinstance(exc, TestTimeout):
            exc = TestTimeout(f"stopped after {per_test:g} s (the time limit of one test)")
        print(f"ERROR importing {name}.py: {_message(exc)}")
        print(_frames(exc, files), end="")
        print("== 0 passed, 0 failed (the tests could not be loaded) ==")
        return 1
    tests = [(k, v) for k, v in vars(module).items()
             if k.startswith("test_") and callable(v) and getattr(v, "__module__", None) == name]
    passed = failed = 0
    for test_name, test in tests:
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test + 1)
            try:
                test()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except TestTimeout:
            failed += 1
            print(f"FAIL {test_name}: stopped after {per_test:g} s (the time limit of one test)")
        except BaseException as exc:
            failed += 1
            print(f"FAIL {test_name}: {_message(exc)}")
            print(_frames(exc, files), end="")
        else:
            passed += 1
            print(f"PASS {test_name}")
    print(f"== {passed} passed, {failed} failed ==")
    return 0 if tests and failed == 0 else 1


sys.exit(main())  # the channel closes with the process; the solution's process then ends by itself
