"""The programs of a coding-task test run, copied into the sandboxes as files (they are not imported by the host).

* :mod:`remote_calls`: the wire between the test process and the solution's process (values, proxies, calls);
* :mod:`test_runner`: runs a test module's tests in the test sandbox;
* :mod:`solution_server`: serves ``solution.py`` in the solution's sandbox;
* :mod:`bootstrap` and :mod:`guard`: the first code of every sandboxed child and its audit hook
  (:mod:`emokern.experiments.sandbox`);
* :mod:`probe`: the isolation probe of :func:`emokern.experiments.sandbox.check_isolation`;
* ``stage.sh``: not sandboxed, the shell script that stages the Python installation before a root caller drops
  privileges (:func:`emokern.experiments.bwrap.launch_command`).

:func:`program_files` returns the Python programs' sources by file name; :mod:`emokern.experiments.coding_tests`
and :mod:`emokern.experiments.sandbox` run them.
"""

from pathlib import Path
from typing import Dict

_HERE = Path(__file__).resolve().parent


def program_files(*names: str) -> Dict[str, str]:
    """``{"<name>.py": source}`` for each named program (``"remote_calls"``, ``"test_runner"``,
    ``"solution_server"``, ``"bootstrap"``, ``"guard"``, ``"probe"``)."""
    return {f"{name}.py": (_HERE / f"{name}.py").read_text(encoding="utf-8") for name in names}
