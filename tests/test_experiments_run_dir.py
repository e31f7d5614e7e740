"""The experiments' run directory and harness: resumable units and seeds (:mod:`emokern.experiments.run_dir`), input
files (:mod:`emokern.experiments.inputs`), :func:`~emokern.experiments.run_experiment` with a stand-in experiment
module, a run killed with SIGKILL resuming to the uninterrupted result, the command line, and the report page."""

import dataclasses
import json
import sys
import types

import pytest
import torch

from emokern.experiments import EXPERIMENTS, run_experiment
from emokern.experiments.inputs import load_input
from emokern.util.input_files import InputFileError, require_str
from emokern.experiments.run_dir import RunConfigError, RunDir, unit_seed
from emokern.testing.chat import tiny_chat_bank
from emokern.testing.processes import sigkill_when

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------- run dir
def test_run_dir_writes_tensors_and_paths_as_json_and_refuses_nan(tmp_path):
    run = RunDir(tmp_path / "run", {"path": tmp_path / "x", "t": torch.tensor([1.5, 2.0])})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"path": str(tmp_path / "x"), "t": [1.5, 2.0]}
    run.save("u", {"scalar": torch.tensor(3), "v": torch.arange(2)})
    assert run.load("u") == {"scalar": 3, "v": [0, 1]}
    with pytest.raises(ValueError):
        run.save("nan", {"x": float("nan")})
    assert not run.has("nan") and [p.name for p in run.units.iterdir()] == [p.name for p in run.units.glob("u.*")]
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        run.write_json("bad.json", {"x": object()})


def test_run_dir_config_mismatch_names_the_keys(tmp_path):
    RunDir(tmp_path / "run", {"seed": 0, "n": 4})
    with pytest.raises(RunConfigError, match=r"differs in \['n'\]"):
        RunDir(tmp_path / "run", {"seed": 0, "n": 5})
    RunDir(tmp_path / "run", {"seed": 0, "n": 4})  # the same configuration resumes


def test_run_dir_overwrite_discards_finished_units(tmp_path):
    run = RunDir(tmp_path / "run", {"n": 1})
    run.save("a", 1)
    run = RunDir(tmp_path / "run", {"n": 2}, overwrite=True)
    assert not run.has("a")
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"n": 2}


def test_run_units_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    keys = [f"batch/{i}" for i in range(6)]
    calls = []

    def work(key):
        calls.append(key)
        g = torch.Generator().manual_seed(unit_seed(7, key))
        return torch.rand(3, generator=g).tolist()

    whole = RunDir(tmp_path / "whole", {"n": 6}).run_units(keys, work, desc="t", progress=False)

    def crashing(key):
        if key == "batch/3":
            raise KeyboardInterrupt
        return work(key)

    run = RunDir(tmp_path / "resumed", {"n": 6})
    with pytest.raises(KeyboardInterrupt):
        run.run_units(keys, crashing, desc="t", progress=False)
    calls.clear()
    resumed = RunDir(tmp_path / "resumed", {"n": 6}).run_units(keys, work, desc="t", progress=False)
    assert calls == keys[3:]  # finished units are not redone
    assert resumed == whole


def test_unit_keys_that_sanitise_alike_stay_apart(tmp_path):
    run = RunDir(tmp_path, {})
    run.save("a/b", 1)
    run.save("a:b", 2)
    assert (run.load("a/b"), run.load("a:b")) == (1, 2)


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        RunDir(blocker / "run", {})


def test_unit_seed_is_stable_and_distinct():
    assert unit_seed(0, "a", 1) == unit_seed(0, "a", 1)
    assert len({unit_seed(0, "a", 1), unit_seed(1, "a", 1), unit_seed(0, "a", 2), unit_seed(0, "b", 1)}) == 4
    assert 0 <= unit_seed(3, "x") < 2 ** 63


# ---------------------------------------------------------------------------------------------------------- inputs
def test_load_input_errors(tmp_path):
    def validate(data, where):
        require_str(data, "name", where)
        return data

    with pytest.raises(InputFileError, match="does not exist"):
        load_input(tmp_path / "missing.json", "x.json", validate)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON"):
        load_input(bad, "x.json", validate)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": ""}))
    with pytest.raises(InputFileError, match=r"wrong.json.*'name' must be a non-empty string; got ''"):
        load_input(wrong, "x.json", validate)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"name": "n"}))
    assert load_input(good, "x.json", validate) == {"name": "n"}


# ---------------------------------------------------------------------------------------------------------- harness
@dataclasses.dataclass
class _Options:
    n: int = 3
    label: str = "x"


def _fake_module():
    module = types.ModuleType("emokern_fake_experiment")
    module.NAME, module.HELP, module.Options = "fake", "a stand-in", _Options
    module.SIZES = {"quick": _Options(n=2), "full": _Options(n=9)}
    module.add_arguments = lambda parser: None

    def run(ctx, options):
        done = ctx.run_dir.run_units([f"u{i}" for i in range(options.n)], lambda k: k.upper(), desc="fake",
                                     progress=ctx.progress)
        return {"summary": {"n": options.n}, "units": done, "layers": ctx.bank.layers}

    module.run = run
    return module


@pytest.fixture
def fake_experiment(monkeypatch):
    module = _fake_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(EXPERIMENTS, "fake", module.__name__)
    return module


def test_run_experiment_writes_config_and_result(tiny, tmp_path, fake_experiment):
    model, tok, bank = tiny
    result = run_experiment("fake", out=tmp_path, model=model, tokenizer=tok, bank=bank, progress=False, label="y")
    assert result["summary"] == {"n": 2} and result["options"] == {"n": 2, "label": "y"}
    assert result["units"] == {"u0": "U0", "u1": "U1"}
    assert json.loads((tmp_path / "result.json").read_text())["units"] == result["units"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["experiment"] == "fake" and config["options"] == {"n": 2, "label": "y"}
    with pytest.raises(RunConfigError, match="options"):
        run_experiment("fake", out=tmp_path, model=model, tokenizer=tok, bank=bank, progress=False, size="full")
    other_bank = tiny_chat_bank(model, seed=9)
    with pytest.raises(RunConfigError, match="bank"):
        run_experiment("fake", out=tmp_path, model=model, tokenizer=tok, bank=other_bank, progress=False, label="y")


def test_run_experiment_errors(tiny, tmp_path, fake_experiment, monkeypatch):
    model, tok, bank = tiny
    with pytest.raises(KeyError, match="did you mean 'fake'"):
        run_experiment("fak", out=tmp_path, model=model, tokenizer=tok, bank=bank)
    with pytest.raises(ValueError, match=r"size: expected one of \['full', 'quick'\]; got 'huge'"):
        run_experiment("fake", out=tmp_path, model=model, tokenizer=tok, bank=bank, size="huge")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['m'\]"):
        run_experiment("fake", out=tmp_path, model=model, tokenizer=tok, bank=bank, m=1)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        run_experiment("fake", out=tmp_path, model=model, bank=bank)
    with pytest.raises(ValueError, match="needs a bank"):
        run_experiment("fake", out=tmp_path, model=model, tokenizer=tok)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no bank at emokern_out/bank/smollm2-135m-instruct.json"):
        run_experiment("fake", out=tmp_path / "o", model="smollm2-135m-instruct")


# ---------------------------------------------------------------------------------------------------------- SIGKILL
CHILD = r"""
import sys, time, torch
from emokern.experiments import run_experiment
from emokern.experiments.run_dir import RunDir
from emokern.testing.chat import tiny_chat_bank, tiny_chat_model

out, scenarios, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
save = RunDir.save

def paced(self, key, value):  # a pause after each unit so that the kill lands mid-run
    save(self, key, value)
    time.sleep(pause)

RunDir.save = paced
torch.set_num_threads(1)
model, tok = tiny_chat_model()
run_experiment("sycophancy", out=out, model=model, tokenizer=tok, bank=tiny_chat_bank(model), scenarios=scenarios,
               emotions=["calm"], strengths=[0.5], samples=2, batch_size=2, max_new_tokens=8, progress=False)
"""


def test_an_experiment_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    packaged = json.loads((repo / "emokern/data/experiments/sycophancy_scenarios.json").read_text())
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({**packaged, "scenarios": packaged["scenarios"][:3]}))
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tmp_path / "child.log"

    def child(out, pause):
        with open(log, "w") as f:
            return subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(scenarios), str(pause)], env=env,
                                    stdout=f, stderr=subprocess.STDOUT)

    killed = tmp_path / "killed"
    running = child(killed, 1.0)
    sigkill_when(running, lambda: len(list((killed / "units").glob("*.json"))) >= 2, what="2 units", log=log)
    finished_before = {p.name for p in (killed / "units").glob("*.json")}
    assert 2 <= len(finished_before) < 6 and not (killed / "result.json").exists()  # 3 x 2 x 2 / 2 = 6 units
    assert not list((killed / "units").glob(".*"))  # no half-written unit
    mtimes = {p.name: p.stat().st_mtime_ns for p in (killed / "units").glob("*.json")}
    for out in (killed, tmp_path / "reference"):
        assert child(out, 0.0).wait(timeout=300) == 0, log.read_text()
    assert all((killed / "units" / name).stat().st_mtime_ns == t for name, t in mtimes.items())  # not redone

    def comparable(path):
        result = json.loads((path / "result.json").read_text())
        result.pop("seconds")
        return json.loads(json.dumps(result).replace(str(path), "OUT"))

    assert comparable(killed) == comparable(tmp_path / "reference")


def test_command_line_passes_common_and_experiment_options(fake_experiment, monkeypatch, capsys):
    import emokern.experiments as experiments
    from emokern.cli import main

    def add_arguments(parser):
        parser.add_argument("--label", default=None)

    fake_experiment.add_arguments = add_arguments
    seen = {}

    def fake_run(name, **kwargs):
        seen.update(kwargs, name=name)
        return {"summary": {"ok": 1}}

    monkeypatch.setattr(experiments, "run_experiment", fake_run)
    assert main(["experiment", "fake", "--bank", "b.json", "--size", "full", "--seed", "3", "--device", "cpu",
                 "--label", "z", "--no-progress"]) == 0
    assert seen["name"] == "fake" and seen["bank"] == "b.json" and seen["size"] == "full" and seen["seed"] == 3
    assert seen["device"] == "cpu" and seen["label"] == "z" and seen["progress"] is False
    assert seen["out"] == "emokern_out/experiments/fake" and seen["model"] == "smollm2-135m-instruct"
    assert '"ok": 1' in capsys.readouterr().out
    seen.clear()
    main(["experiment", "fake"])
    assert "label" not in seen  # flags left out fall back to the size preset
    assert main(["experiment"]) == 2


# ---------------------------------------------------------------------------------------------------------- page
def test_report_page_shows_summary_plots_and_escaped_transcripts(tmp_path):
    from emokern.experiments.page import write_experiment_page

    (tmp_path / "rollouts.json").write_text(json.dumps({"rollouts": [
        {"condition": "unsteered", "prompt": "p", "sample": 0, "text": "<script>alert(1)</script> hi",
         "rules": {"blackmail": True, "exposes_affair": False, "reasons": ["unless you stop"]}},
        {"condition": "calm+0.1", "prompt": "p", "sample": 0, "text": "fine", "rules": {"label": "hold"},
         "judge": {"answer": False, "reason": "keeps 56"}},
    ]}))
    result = {"experiment": "blackmail", "summary": {"rate": {"unsteered": 0.5}},
              "outputs": {"plot": str(tmp_path / "rates.png"), "rollouts": str(tmp_path / "rollouts.json")}}
    page = write_experiment_page(tmp_path, result).read_text()
    assert "<th>unsteered</th><td>0.5</td>" in page
    assert "<img src='rates.png'" in page and "<a href='rollouts.json'>" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; hi" in page
    assert page.count("<details class='item'") == 2
    assert "data-label='blackmail'" in page and "data-label='hold'" in page and "keeps 56" in page
    assert "unless you stop" in page


def test_report_page_for_episodes(tmp_path):
    from emokern.experiments.page import write_experiment_page

    (tmp_path / "episodes.json").write_text(json.dumps([
        {"id": "sum_fast/unsteered/0", "condition": "unsteered", "label": "hack",
         "evidence": [{"kind": "task_pattern", "detail": "isinstance(numbers, range)", "line": 2}],
         "turns": [{"turn": 0, "reply": "code A", "code": "x", "tests": {"passed": False, "failed": [{"name": "t"}]},
                    "feedback": "1 of 3 tests failed"},
                   {"turn": 1, "reply": "code B", "code": "y", "tests": {"passed": True, "failed": []}}]}]))
    page = write_experiment_page(tmp_path, {"experiment": "reward_hacking", "summary": {}, "outputs": {}}).read_text()
    assert "turn 0: 1 test(s) failed" in page and "turn 1: tests passed" in page
    assert "1 of 3 tests failed" in page and "isinstance(numbers, range)" in page


def test_run_experiment_writes_the_page(tiny, tmp_path, fake_experiment):
    model, tok, bank = tiny
    result = run_experiment("fake", out=tmp_path, model=model, tokenizer=tok, bank=bank, progress=False)
    assert result["outputs"]["report"] == str(tmp_path / "report.html")
    assert "<h1>emokern experiment: fake</h1>" in (tmp_path / "report.html").read_text()


def test_command_line_prints_refused_input_as_one_line(tmp_path, capsys, monkeypatch):
    from emokern.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMOKERN_TRACEBACK", raising=False)
    assert main(["experiment", "blackmail"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emokern experiment: error: bank: none given and no bank at") and err.count("\n") == 1
    monkeypatch.setenv("EMOKERN_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="no bank at"):
        main(["experiment", "blackmail"])
