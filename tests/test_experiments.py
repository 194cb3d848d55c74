"""Resumable experiment folders, the Table 1 and sensitivity configurations, and the eval/reproduce commands."""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from superweight.cli import main as superweight_main
from superweight.evaluation import InterventionSpec, applied
from superweight.experiments import (
    Configuration,
    EvaluationSettings,
    render_table,
    run_experiment,
    run_sensitivity,
    run_table1,
    sensitivity_configurations,
    table1_configurations,
)
from superweight.models import load_model
from tiny_folder_model import PLANTED, save_tiny_folder_model, write_text
from tiny_models import assert_bit_identical, state_snapshot


@pytest.fixture(scope="module")
def tiny_folder(default_model, tmp_path_factory) -> str:
    return str(save_tiny_folder_model(default_model.tokenizer, tmp_path_factory.mktemp("tiny_folder")))


@pytest.fixture(scope="module")
def tiny_loaded(tiny_folder):
    return load_model(tiny_folder, device="cpu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    return str(write_text(tmp_path_factory.mktemp("text")))


@pytest.fixture
def perplexity_only(text_file) -> EvaluationSettings:
    return EvaluationSettings(perplexity=(text_file,), tasks=(), seqlen=64, max_windows=1)


class Counter:
    """Configurations whose edit scales the planted super weight and counts each use."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[str] = []
        self.fail_on = fail_on

    def configuration(self, name: str, factor: float) -> Configuration:
        spec = InterventionSpec(scale_factor=factor)

        @contextlib.contextmanager
        def apply(loaded, super_weights):
            self.calls.append(name)
            with applied(loaded.model, spec, super_weights):
                if name == self.fail_on:
                    raise KeyboardInterrupt
                yield None

        return Configuration(name, f"x{factor:g}", {"factor": factor}, apply)

    def configurations(self) -> list[Configuration]:
        return [self.configuration("a", 1.0), self.configuration("b", 0.0), self.configuration("c", 2.0)]


def _run(counter, loaded, output, evaluation, **kwargs):
    return run_experiment("counting", counter.configurations(), model=loaded, output_dir=output,
                          evaluation=evaluation, super_weights=[PLANTED], progress=False, **kwargs)


def test_folder_format(tiny_loaded, tmp_path, perplexity_only, text_file):
    counter = Counter()
    results = _run(counter, tiny_loaded, tmp_path, perplexity_only)
    assert counter.calls == ["a", "b", "c"]

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["experiment"] == "counting"
    assert manifest["model"] == tiny_loaded.spec
    assert manifest["configurations"] == ["a", "b", "c"]
    assert manifest["settings"]["perplexity"] == [text_file]
    assert manifest["settings"]["super_weights"] == ["1:5:17"]
    assert "versions" in manifest["provenance"]

    run = json.loads((tmp_path / "runs" / "b.json").read_text())
    assert {"name", "label", "settings", "perplexity", "tasks", "average_accuracy", "super_weights",
            "provenance"} <= set(run)
    assert run["settings"] == {"factor": 0.0}
    assert run["label"] == "x0"
    assert run["perplexity"][text_file]["perplexity"] > 1
    assert run["tasks"] == {}
    assert run["average_accuracy"] is None
    assert run["super_weights"] == [PLANTED.to_dict()]

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [r["name"] for r in saved["runs"]] == ["a", "b", "c"]
    assert saved["experiment"] == "counting"
    table = (tmp_path / "table.md").read_text()
    assert "| x0 |" in table
    assert table.index("| x1 |") < table.index("| x0 |") < table.index("| x2 |")


def test_rerun_skips_finished(tiny_loaded, tmp_path, perplexity_only):
    _run(Counter(), tiny_loaded, tmp_path, perplexity_only)
    before = (tmp_path / "runs" / "a.json").read_text()
    counter = Counter()
    _run(counter, tiny_loaded, tmp_path, perplexity_only)
    assert counter.calls == []
    assert (tmp_path / "runs" / "a.json").read_text() == before


def test_interrupted_run_resumes(tiny_loaded, tmp_path, perplexity_only):
    snapshot = state_snapshot(tiny_loaded.model)
    with pytest.raises(KeyboardInterrupt):
        _run(Counter(fail_on="b"), tiny_loaded, tmp_path, perplexity_only)
    assert_bit_identical(tiny_loaded.model, snapshot)
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["a.json"]
    assert "Not finished yet: b, c." in (tmp_path / "table.md").read_text()

    counter = Counter()
    results = _run(counter, tiny_loaded, tmp_path, perplexity_only)
    assert counter.calls == ["b", "c"]
    assert [r["name"] for r in results["runs"]] == ["a", "b", "c"]


def test_changed_settings_need_force(tiny_loaded, tmp_path, perplexity_only, text_file):
    _run(Counter(), tiny_loaded, tmp_path, perplexity_only)
    other = EvaluationSettings(perplexity=(text_file,), tasks=(), seqlen=32, max_windows=1)
    with pytest.raises(ValueError, match=r"seqlen: 64 -> 32.*--force"):
        _run(Counter(), tiny_loaded, tmp_path, other)

    counter = Counter()
    _run(counter, tiny_loaded, tmp_path, other, force=True)
    assert counter.calls == ["a", "b", "c"]
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["seqlen"] == 32


def test_changed_configuration_settings_rejected(tiny_loaded, tmp_path, perplexity_only):
    _run(Counter(), tiny_loaded, tmp_path, perplexity_only)
    counter = Counter()
    changed = counter.configurations()
    changed[1] = counter.configuration("b", 0.5)
    with pytest.raises(ValueError, match=r"runs/b.json was computed with settings \{'factor': 0.0\}"):
        run_experiment("counting", changed, model=tiny_loaded, output_dir=tmp_path, evaluation=perplexity_only,
                       super_weights=[PLANTED], progress=False)


def test_configuration_names_checked(tiny_loaded, tmp_path, perplexity_only):
    with pytest.raises(ValueError, match="name 'a/b' is invalid"):
        Counter().configuration("a/b", 1.0)
    twice = [Counter().configuration("a", 1.0), Counter().configuration("a", 2.0)]
    with pytest.raises(ValueError, match=r"repeats configuration names \['a'\]"):
        run_experiment("x", twice, model=tiny_loaded, output_dir=tmp_path, evaluation=perplexity_only)


def test_table1_rows(tiny_loaded, tmp_path, perplexity_only, text_file):
    assert [c.name for c in table1_configurations()] == ["original", "prune-sw", "prune-non-sw", "prune-sw-restore-sa"]
    results = run_table1(tiny_loaded, tmp_path, evaluation=perplexity_only, super_weights=[PLANTED], progress=False)
    runs = {run["name"]: run for run in results["runs"]}
    assert results["settings"]["outlier_fraction"] == 1e-6
    assert runs["prune-non-sw"]["settings"]["keep_super_weights"] is True
    assert runs["prune-non-sw"]["intervention"]["outliers"]["total_zeroed"] > 0
    assert runs["prune-sw"]["settings"]["scale_factor"] == 0.0
    assert runs["prune-sw-restore-sa"]["settings"]["restore_super_activation"] is True
    ppl = {name: run["perplexity"][text_file]["perplexity"] for name, run in runs.items()}
    assert ppl["prune-sw"] != ppl["original"]
    table = (tmp_path / "table.md").read_text()
    for label in ("Original", "Prune SW", "Prune non-SW", "Prune SW, +SA"):
        assert f"| {label} |" in table


def test_sensitivity_with_tasks(tiny_loaded, tmp_path, text_file):
    assert [c.name for c in sensitivity_configurations([0, 0.5, 2])] == ["scale-0", "scale-0.5", "scale-2"]
    evaluation = EvaluationSettings(perplexity=(text_file,), tasks=("arc_easy",), limit=2, seqlen=64, max_windows=1)
    results = run_sensitivity(tiny_loaded, tmp_path, factors=[0, 1], evaluation=evaluation,
                              super_weights=[PLANTED], offline=True, progress=False)
    assert results["settings"]["factors"] == [0.0, 1.0]
    run = results["runs"][0]
    assert run["settings"] == {"factor": 0.0}
    assert run["tasks"]["arc_easy"]["num_samples"] == 2
    assert run["average_accuracy"] == run["tasks"]["arc_easy"]["acc"]
    table = (tmp_path / "table.md").read_text()
    assert "|  | ARC-e | AVG | ppl " in table
    assert "--limit 2" in table
    assert re.search(r"Perplexity with --max-windows 1: \S+: the first 1 of \d+ windows\.", table)


def test_render_table_formats_large_perplexity():
    manifest = {"experiment": "t", "model": "m", "configurations": ["a"],
                "settings": {"tasks": ["sciq", "arc_challenge"], "perplexity": ["wiki"], "seqlen": 2048, "limit": None}}
    run = {"name": "a", "label": "A", "tasks": {"arc_challenge": {"acc": 0.4181}, "sciq": {"acc": 0.946}},
           "average_accuracy": 0.6821, "perplexity": {"wiki": {"perplexity": 1211.11}}}
    table = render_table(manifest, [run])
    assert "|  | ARC-c | SciQ | AVG | ppl wiki |" in table
    assert "| A | 41.81 | 94.60 | 68.21 | 1211.11 |" in table
    run["perplexity"]["wiki"]["perplexity"] = 76365.4
    assert "76,365" in render_table(manifest, [run])


# -- commands ------------------------------------------------------------------------------


def test_reproduce_command_resumes(tiny_folder, tmp_path, text_file):
    argv = ["reproduce", "sensitivity", tiny_folder, "--factors", "0,1", "--tasks", "", "--perplexity", text_file,
            "--seqlen", "64", "--max-windows", "1", "--super-weight", "1:5:17", "--output", str(tmp_path)]
    assert superweight_main(argv) == 0
    first = (tmp_path / "runs" / "scale-0.json").read_text()
    assert superweight_main(argv) == 0
    assert (tmp_path / "runs" / "scale-0.json").read_text() == first
    changed = [*argv[:4], "0,2", *argv[5:]]
    assert superweight_main(changed) == 2


def test_reproduce_command_unknown_task(tiny_folder, tmp_path, capsys):
    assert superweight_main(["reproduce", "table1", tiny_folder, "--tasks", "arc_easy,mmlu", "--output", str(tmp_path)]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()


def test_eval_command_json(tiny_folder, tmp_path, text_file, capsys):
    output = tmp_path / "eval.json"
    status = superweight_main(["eval", tiny_folder, "--super-weight", "1:5:17", "--scale-super-weights", "0",
                               "--perplexity", text_file, "--seqlen", "64", "--max-windows", "1", "--json",
                               "--output", str(output)])
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert printed["provenance"]["super_weights"] == ["1:5:17"]
    assert printed["interventions"]["interventions"]["scale_factor"] == 0.0
    assert printed["perplexity"][text_file]["num_windows"] == 1


def test_eval_command_table(tiny_folder, text_file, capsys):
    status = superweight_main(["eval", tiny_folder, "--super-weight", "1:5:17", "--prune-outliers", "1e-3",
                               "--keep-super-weights", "--perplexity", text_file, "--seqlen", "64",
                               "--max-windows", "1"])
    assert status == 0
    out = capsys.readouterr().out
    assert "outlier weights zeroed" in out
    assert "Perplexity" in out


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--prune-outliers", "2"], "prune_outliers=2.0"), (["--scale-super-weights", "-1"], "scale_factor=-1.0"),
     (["--keep-super-weights"], "needs prune_outliers"), ([], "nothing to evaluate")],
)
def test_eval_command_errors(tiny_folder, capsys, options, message):
    assert superweight_main(["eval", tiny_folder, *options, *(["--perplexity", "wiki-sample"] if options else [])]) == 2
    assert message in capsys.readouterr().err


def test_render_table_says_which_windows_ran():
    manifest = {"experiment": "t", "model": "m", "configurations": ["a"],
                "settings": {"tasks": [], "perplexity": ["wiki", "c4"], "seqlen": 2048, "max_windows": 38, "limit": None}}
    window = {"seqlen": 2048, "stride": 2048, "num_tokens": 38 * 2047, "num_windows": 38}
    run = {"name": "a", "label": "A", "tasks": {}, "perplexity": {
        "wiki": {**window, "perplexity": 17.9, "stream_tokens": 446933},
        "c4": {**window, "perplexity": 29.3, "stream_tokens": 78306},
    }}
    table = render_table(manifest, [run])
    assert "Perplexity with --max-windows 38: wiki: the first 38 of 218 windows; c4: all 38 windows." in table
