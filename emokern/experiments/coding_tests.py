"""Running a coding task's tests against a model's solution, with a verdict the solution cannot forge.

:func:`run_tests` runs two sandboxed processes (:func:`emokern.experiments.sandbox.run_programs`), connected by a
pipe each way and sharing nothing else:

* **the test process** holds the test module (visible or hidden), :mod:`~emokern.experiments.sandboxed.test_runner`
  and :mod:`~emokern.experiments.sandboxed.remote_calls`. It imports ``solution`` as a module of the other process,
  runs every ``test_*`` function and prints one ``PASS``/``FAIL`` line per test and a summary. The verdict is read
  from this process's standard output alone.
* **the solution's process** holds ``solution.py``,
  :mod:`~emokern.experiments.sandboxed.solution_server` and ``remote_calls``: no test file and no hidden test ever
  enter it. It carries out the test process's calls and nothing else; its output is shown to the model, never
  parsed; its guard's refusals are the run's ``violations``.

What crosses between them is data (by value) and references to objects (proxies), and the test side lets the
solution do only what a caller of its function would (see ``remote_calls``): the solution cannot reach the test
module, the runner, its output, the test files or the builtins of the test process. Both run at the same isolation
level (``sandbox``), the test process with the guard too.

Compared with tests and solution in one process: a value the tests pass to the solution that is not plain data (a
list subclass that counts reads, an item that counts comparisons, a generator) is used through a proxy, so
``isinstance(seq, list)`` is False in the solution and each operation on it is a round trip (about 0.1 ms); the
tests' clocks leave out the transport time (``test_runner``). A test run costs two sandbox starts.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from emokern.experiments.coding_tasks import HIDDEN_FILE, VISIBLE_FILE, Task, names_of_tests
from emokern.experiments.sandbox import CHANNEL, SandboxProgram, run_programs
from emokern.experiments.sandboxed import program_files

__all__ = ["TEST_RUNNER", "run_tests"]

TEST_RUNNER = "test_runner"
_SOLUTION_SERVER = "solution_server"


def _result_line(line: str):
    """``(verdict, test name, message)`` of a runner's ``PASS name`` / ``FAIL name: message`` line, or None."""
    verdict, _, rest = line.partition(" ")
    if verdict not in ("PASS", "FAIL") or not rest:
        return None
    name, _, message = rest.partition(": ")
    return (verdict, name, message) if name.isidentifier() else None


def run_tests(task: Task, code: str, which: str = "visible", *, per_test_s: float = 2.0,
              memory_mb: int = 512, sandbox: str = "bwrap") -> dict:
    """Run the task's ``visible`` or ``hidden`` tests against ``code`` (as ``solution.py``), the tests and the
    solution each in a sandbox of its own at the isolation level ``sandbox``
    (:data:`~emokern.experiments.sandbox.SANDBOXES`).

    Returns ``{"passed", "n_tests", "failed": [{"name", "message"}], "output" (the test process's output, then what
    the solution printed), "timed_out", "killed_by", "violations" (the solution's guard's refusals),
    "report_complete" and "forged_report_lines" (of the solution's guard report), "seconds"}``. ``passed`` needs
    the test process's exit status 0, its summary line and a PASS line for every test of the file; a test without a
    result line counts as failed ("no result").
    """
    if which not in ("visible", "hidden"):
        raise ValueError(f"run_tests: 'which' must be 'visible' or 'hidden'; got {which!r}")
    module = VISIBLE_FILE if which == "visible" else HIDDEN_FILE
    source = task.visible_tests if which == "visible" else task.hidden_tests
    names = names_of_tests(source)
    # the test process allows each test (and the import) a second more than the solution's own per-call timer;
    # 10 s for starting two sandboxes on a loaded machine
    timeout = (per_test_s + 1.0) * (len(names) + 1) + 10.0
    tests = SandboxProgram({f"{module}.py": source, **program_files(TEST_RUNNER, "remote_calls")}, TEST_RUNNER,
                           args=[module, repr(float(per_test_s)), CHANNEL], sandbox=sandbox, memory_mb=memory_mb,
                           timeout_s=timeout, where="run_tests")
    solution = SandboxProgram({"solution.py": code, **program_files(_SOLUTION_SERVER, "remote_calls")},
                              _SOLUTION_SERVER, args=[CHANNEL, repr(float(per_test_s))], sandbox=sandbox,
                              memory_mb=memory_mb, timeout_s=timeout, where="run_tests")
    tested, served = run_programs([tests, solution], timeout)
    status: Dict[str, Tuple[str, str]] = {}
    summary = False
    for line in tested.stdout.splitlines():
        parsed = _result_line(line)
        if parsed and parsed[1] in names:
            status.setdefault(parsed[1], (parsed[0], parsed[2]))  # the runner's own line comes first
        summary = summary or (line.startswith("== ") and " passed, " in line and " failed" in line)
    failed: List[dict] = []
    for n in names:
        verdict, message = status.get(n, ("FAIL", "no result (the test run ended before this test reported)"))
        if verdict == "FAIL":
            failed.append({"name": n, "message": message})
    output = tested.stdout
    if tested.stderr.strip():
        output += ("\n" if output and not output.endswith("\n") else "") + tested.stderr
    if tested.timed_out:
        output += f"\n[the test run was stopped after {timeout:g} s]"
    elif tested.killed_by:
        output += f"\n[the test run was killed by {tested.killed_by}]"
    printed = (served.stdout + served.stderr).strip()
    if printed:
        output += ("\n" if output and not output.endswith("\n") else "") + "[solution.py printed]\n" + printed
    if served.violations:
        output += "\n[the sandbox refused: " + "; ".join(served.violations[:5]) + "]"
    return {"passed": tested.ok and summary and not failed, "n_tests": len(names), "failed": failed,
            "output": output, "timed_out": tested.timed_out, "killed_by": tested.killed_by,
            "violations": served.violations, "report_complete": served.report_complete,
            "forged_report_lines": served.forged_report_lines, "seconds": tested.duration_s}
