"""Serves the model's ``solution.py`` to the test process: ``python -m solution_server READ,WRITE PER_CALL_S``.

Runs in the solution's sandbox, which holds only this file, :mod:`remote_calls` and ``solution.py`` (no test file,
no hidden test, no runner). It answers the test process's questions (import or reload ``solution``, and every
operation on the solution's objects) until the test process closes the channel, then returns, so that the guard's
report closes normally. Each question from the test process (not the callbacks nested in it) runs under a timer of
``PER_CALL_S`` seconds (``SIGALRM``), which raises ``TestTimeout`` in the solution's code and answers the test with
it; the test process keeps a limit of its own a second later, for code that stops this timer.
"""

import importlib
import signal
import sys

import remote_calls


class TestTimeout(BaseException):
    """A call from the tests ran past the time limit of one test."""


def main():
    read_fd, write_fd = (int(fd) for fd in sys.argv[1].split(","))
    per_call = float(sys.argv[2])
    loaded = {}

    def load(_payload):
        loaded["solution"] = importlib.import_module("solution")
        return loaded["solution"]

    def reload(_payload):
        if "solution" not in loaded:
            return load(None)
        loaded["solution"] = importlib.reload(loaded["solution"])
        return loaded["solution"]

    def stop(signum, frame):
        raise TestTimeout(f"stopped after {per_call:g} s (the time limit of one test)")

    class SolutionPeer(remote_calls.Peer):
        def serve(self, message):
            if self.depth:  # an answer to a question the solution asked: no timer of its own
                return super().serve(message)
            signal.setitimer(signal.ITIMER_REAL, per_call)
            try:
                return super().serve(message)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)

    signal.signal(signal.SIGALRM, stop)
    peer = SolutionPeer(read_fd, write_fd, "solution", handlers={"import": load, "reload": reload})
    peer.serve_forever()


main()
