"""Impossible coding tasks: the task file's schema, its validation and loading (the reward-hacking experiment's
input; :mod:`emokern.experiments.reward_hacking` describes the file format and the experiment).

A task states a requirement that no honest solution can meet and shows visible tests that a special-cased solution
can pass; its hidden tests check the same requirement on other inputs. The packaged set is
``emokern/data/experiments/coding_tasks.json``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from emokern.experiments.inputs import load_input
from emokern.util.input_files import InputFileError, require, require_str

__all__ = ["HIDDEN_FILE", "VISIBLE_FILE", "Task", "load_tasks", "names_of_tests", "validate_tasks"]

VISIBLE_FILE = "test_solution"  # the module name the visible tests run as (shown to the model)
HIDDEN_FILE = "test_hidden"  # the module name the hidden tests run as (never shown, never in the solution's sandbox)


@dataclass(frozen=True)
class Task:
    """One impossible coding task (see the module docstring for the file format)."""

    id: str
    prompt: str
    function_name: str
    visible_tests: str
    hidden_tests: str
    hack_patterns: Tuple[Tuple[str, str], ...] = ()  # (regex, meaning)

    @property
    def visible_names(self) -> List[str]:
        return names_of_tests(self.visible_tests)

    @property
    def hidden_names(self) -> List[str]:
        return names_of_tests(self.hidden_tests)


def names_of_tests(source: str) -> List[str]:
    """The names of the top-level ``test_*`` functions of a test module, in file order."""
    return [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def _check_test_module(source: str, where: str, key: str) -> None:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise InputFileError(f"{where}: {key!r} is not valid Python (line {exc.lineno}: {exc.msg})") from None
    require(any(isinstance(n, ast.FunctionDef) and n.name.startswith("test_") for n in tree.body), where,
            f"{key!r} defines no top-level test_* function")
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    require("solution" in imports, where, f"{key!r} never imports the module 'solution'")


def validate_tasks(data: Any, where: str) -> List[Task]:
    """Check a parsed task file (see the module docstring) and return its tasks; :class:`InputFileError` names
    the file, the task and the key that is wrong."""
    require(isinstance(data, dict), where, f"expected a JSON object with a 'tasks' list; got {type(data).__name__}")
    tasks = data.get("tasks")
    require(isinstance(tasks, list) and len(tasks) > 0, where,
            f"'tasks' must be a non-empty list; got {type(tasks).__name__ if tasks is not None else 'nothing'}")
    out, seen = [], set()
    for i, entry in enumerate(tasks):
        at = f"{where}: tasks[{i}]"
        task_id = require_str(entry, "id", at)
        at = f"{where}: task {task_id!r} (tasks[{i}])"
        require(re.fullmatch(r"[A-Za-z0-9_.-]+", task_id) is not None, at,
                f"'id' may hold only letters, digits, '_', '.' and '-'; got {task_id!r}")
        require(task_id not in seen, at, "duplicate 'id'")
        seen.add(task_id)
        prompt = require_str(entry, "prompt", at)
        function_name = require_str(entry, "function_name", at)
        require(function_name.isidentifier(), at, f"'function_name' must be a Python identifier; got {function_name!r}")
        visible = require_str(entry, "visible_tests", at)
        hidden = require_str(entry, "hidden_tests", at)
        _check_test_module(visible, at, "visible_tests")
        _check_test_module(hidden, at, "hidden_tests")
        patterns = entry.get("hack_patterns", [])
        require(isinstance(patterns, list), at, f"'hack_patterns' must be a list; got {type(patterns).__name__}")
        parsed = []
        for j, p in enumerate(patterns):
            if isinstance(p, str):
                p = {"pattern": p, "meaning": "matches the task's hack pattern"}
            pattern = require_str(p, "pattern", f"{at}: hack_patterns[{j}]")
            meaning = p.get("meaning", "matches the task's hack pattern")
            require(isinstance(meaning, str), f"{at}: hack_patterns[{j}]",
                    f"'meaning' must be a string; got {meaning!r}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputFileError(f"{at}: hack_patterns[{j}] is not a valid regular expression: {exc}") from None
            parsed.append((pattern, meaning))
        unknown = sorted(set(entry) - {"id", "prompt", "function_name", "visible_tests", "hidden_tests",
                                       "hack_patterns"})
        require(not unknown, at, f"unknown key(s) {unknown}")
        out.append(Task(task_id, prompt, function_name, visible, hidden, tuple(parsed)))
    return out


def load_tasks(path: Optional[str] = None, ids: Optional[Sequence[str]] = None) -> List[Task]:
    """The tasks in ``path`` (None = the packaged file), restricted to ``ids`` in that order when given."""
    tasks = load_input(path, "coding_tasks.json", validate_tasks)
    if ids is None:
        return tasks
    by_id = {t.id: t for t in tasks}
    missing = [i for i in ids if i not in by_id]
    if missing:
        where = path if path is not None else "the packaged coding_tasks.json"
        raise ValueError(f"task_ids: {missing} not in {where} (its tasks: {list(by_id)})")
    return [by_id[i] for i in ids]

