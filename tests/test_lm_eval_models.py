"""The hf-outlier and superweight harness models, their argument parsing and the lm-eval command."""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.registry import get_model

import superweight.lm_eval_models
from superweight import tasks
from superweight.cli import main as superweight_main
from superweight.evaluation import InterventionSpec
from superweight.lm_eval import harness_argv
from superweight.lm_eval_models import (
    HFOutlierLM,
    SuperWeightLM,
    hf_outlier_spec,
    parse_layers,
    parse_outlier_method,
    parse_restore_and_scale,
    parse_super_weights,
)
from tiny_folder_model import PLANTED, save_tiny_folder_model
from tiny_models import state_snapshot

# The task list of the research code's README commands.
README_TASKS = "winogrande,arc_challenge,arc_easy,piqa,sciq,hellaswag,lambada_openai"


@pytest.fixture(scope="module")
def tiny_folder(default_model, tmp_path_factory) -> str:
    return str(save_tiny_folder_model(default_model.tokenizer, tmp_path_factory.mktemp("tiny_folder")))


def _down_proj_weight(lm, layer):
    return lm.model.model.layers[layer].mlp.down_proj.weight


def test_doctests():
    assert doctest.testmod(superweight.lm_eval_models).failed == 0


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "restore", "expected"),
    [
        ("manual_scaling_SO_0.0", False, InterventionSpec(scale_factor=0.0)),
        ("manual_scaling_SO_1.5", False, InterventionSpec(scale_factor=1.5)),
        ("removeSW_restoreSA", False, InterventionSpec(restore_super_activation=True)),
        ("search_percentage_1e-6_0-32_all", 1.0,
         InterventionSpec(prune_outliers=1e-6, outlier_layers=tuple(range(32)), keep_super_weights=True)),
        ("search_percentage_1e-6_0-32_all", 0.0, InterventionSpec(prune_outliers=1e-6, outlier_layers=tuple(range(32)))),
        ("search_percentage_1e-6_0-32_all", "True",
         InterventionSpec(prune_outliers=1e-6, outlier_layers=tuple(range(32)), keep_super_weights=True)),
        ("search_percentage_5e-7_2-4_down", 2.0,
         InterventionSpec(prune_outliers=5e-7, outlier_layers=(2, 3), outlier_kinds=("down_proj",),
                          keep_super_weights=True, scale_factor=2.0)),
        (None, 1.5, InterventionSpec(scale_factor=1.5)),
        (None, False, InterventionSpec()),
    ],
)
def test_hf_outlier_spec(method, restore, expected):
    assert hf_outlier_spec(method, restore) == expected


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("manual_scaling_SO_abc", "scaling factor 'abc' is not a finite number"),
        ("manual_scaling_SO_-1", "scaling factor '-1' is not a finite number"),
        ("search_percentage_2_0-32_all", r"fraction '2' must be a number in \(0, 1\)"),
        ("search_percentage_abc_0-32_all", r"fraction 'abc' must be a number in \(0, 1\)"),
        ("search_percentage_1e-6_5-5_all", "layer range 5-5 is empty"),
        ("search_percentage_1e-6_a-b_all", "layer range a-b is not two integers"),
        ("search_percentage_1e-6_0_all", "malformed"),
        ("search_topk_1e-6_0-32_all", "criterion 'topk' is not supported"),
        ("prune_everything", "'prune_everything' is not supported"),
        ("", "is invalid"),
    ],
)
def test_parse_outlier_method_errors(method, message):
    with pytest.raises(ValueError, match=message):
        parse_outlier_method(method)


def test_search_range_clamped_to_model_layers(caplog):
    spec = hf_outlier_spec("search_percentage_1e-6_0-32_all", 1.0, num_layers=30)
    assert spec.outlier_layers == tuple(range(30))
    assert "ends past the model's 30 layers" in caplog.text
    assert hf_outlier_spec("search_percentage_1e-6_4-8_all", 1.0, num_layers=30).outlier_layers == (4, 5, 6, 7)
    with pytest.raises(ValueError, match="starts past the model's last layer 29"):
        hf_outlier_spec("search_percentage_1e-6_30-32_all", 1.0, num_layers=30)


@pytest.mark.parametrize(
    ("method", "restore"), [("manual_scaling_SO_0.0", 1.0), ("removeSW_restoreSA", True)]
)
def test_conflicting_super_weight_edits(method, restore):
    with pytest.raises(ValueError, match="restore_and_scale_GO"):
        hf_outlier_spec(method, restore)


def test_parse_small_arguments():
    assert parse_restore_and_scale(False) is None
    assert parse_restore_and_scale(0) is None
    assert parse_restore_and_scale("1.0") == 1.0
    with pytest.raises(ValueError, match="restore_and_scale_GO='maybe'"):
        parse_restore_and_scale("maybe")
    with pytest.raises(ValueError, match="restore_and_scale_GO=nan"):
        parse_restore_and_scale(math.nan)
    assert parse_super_weights("11:507:1229;11:507:1487") == parse_super_weights("11:507:1229 11:507:1487")
    assert parse_super_weights(None) is None
    with pytest.raises(ValueError, match="malformed"):
        parse_super_weights("11:507")
    assert parse_layers("0-3") == (0, 1, 2)
    with pytest.raises(ValueError, match="outlier_layers='x-y'"):
        parse_layers("x-y")


def test_arguments_rejected_before_loading():
    # The model path does not exist; the argument errors must come first.
    factory = get_model("hf-outlier")
    with pytest.raises(ValueError, match="manual_scaling_SO_abc"):
        factory.create_from_arg_string("pretrained=./missing,outlier_method=manual_scaling_SO_abc", {"device": "cpu"})
    with pytest.raises(ValueError, match="does not accept model argument.*run_ppl"):
        factory.create_from_arg_string("pretrained=./missing,run_ppl=True", {"device": "cpu"})
    with pytest.raises(ValueError, match="'minmax_4' has 2 fields"):
        factory.create_from_arg_string("pretrained=./missing,manual_quantize=minmax_4", {})
    with pytest.raises(ValueError, match="with outlier_method='removeSW_restoreSA' is not supported"):
        factory.create_from_arg_string(
            "pretrained=./missing,manual_quantize=minmax_4_tensor_no_0_False_False,outlier_method=removeSW_restoreSA", {}
        )
    with pytest.raises(ValueError, match="prune_outliers=2.0"):
        get_model("superweight").create_from_arg_string("pretrained=./missing,prune_outliers=2", {})


# -- the models on a tiny folder model ---------------------------------------------------


def test_hf_outlier_edits_in_place_and_undoes(tiny_folder):
    lm = get_model("hf-outlier").create_from_arg_string(
        f"pretrained={tiny_folder},outlier_method=manual_scaling_SO_0.0,dtype=float32,super_weights=1:5:17",
        {"device": "cpu", "batch_size": 2},
    )
    assert isinstance(lm, HFOutlierLM)
    weight = _down_proj_weight(lm, PLANTED.layer)
    assert weight[PLANTED.row, PLANTED.col].item() == 0.0
    info = lm.get_model_info()["superweight"]
    assert info["super_weights"] == ["1:5:17"]
    assert info["intervention"]["interventions"]["scale_factor"] == 0.0
    json.dumps(info)
    lm.remove_edits()
    assert weight[PLANTED.row, PLANTED.col].item() != 0.0


def test_hf_outlier_search_keeps_super_weight(tiny_folder):
    lm = HFOutlierLM(
        pretrained=tiny_folder, outlier_method="search_percentage_1e-6_0-32_all", restore_and_scale_GO=1.0,
        super_weights="1:5:17", device="cpu",
    )
    assert lm.intervention.outlier_layers == (0, 1, 2, 3)
    assert lm.intervention.keep_super_weights
    outliers = lm.edit_info["intervention"]["outliers"]
    # ceil(1e-6 * numel) = 1 weight per matrix, except the planted super weight's matrix,
    # whose largest weight is the kept super weight.
    assert outliers["zeroed_per_matrix"]["model.layers.1.mlp.down_proj"] == 0
    assert outliers["zeroed_per_matrix"]["model.layers.0.mlp.down_proj"] == 1
    assert _down_proj_weight(lm, PLANTED.layer)[PLANTED.row, PLANTED.col].item() == pytest.approx(40.0)


def test_manual_quantize_restores_super_weight(tiny_folder):
    # The README's block-quantization arguments: INT4 over whole tensors, the super weight
    # written back at 1.0 times its original value.
    lm = get_model("hf-outlier").create_from_arg_string(
        f"pretrained={tiny_folder},manual_quantize=minmax_4_tensor_no_0_False_False,restore_and_scale_GO=1.0,"
        "trust_remote_code=True,dtype=float32,super_weights=1:5:17",
        {"device": "cpu", "batch_size": 4},
    )
    weight = _down_proj_weight(lm, PLANTED.layer)
    assert weight[PLANTED.row, PLANTED.col].item() == pytest.approx(40.0)
    assert len(weight.unique()) <= 16 + 1
    report = lm.edit_info["quantization"]
    assert report["restored"] == 1
    json.dumps(lm.get_model_info()["superweight"])


def test_remove_sw_restore_sa_wraps_forward(tiny_folder):
    lm = HFOutlierLM(pretrained=tiny_folder, outlier_method="removeSW_restoreSA", super_weights="1:5:17",
                     device="cpu")
    assert "forward" in vars(lm.model)
    snapshot = state_snapshot(lm.model)
    lm.remove_edits()
    assert "forward" not in vars(lm.model)
    assert all(snapshot[name].equal(value) for name, value in lm.model.state_dict().items())


def test_superweight_model_through_simple_evaluate(tiny_folder):
    lm = SuperWeightLM(pretrained=tiny_folder, super_weights="1:5:17", scale="0.5", device="cpu", batch_size=4)
    assert _down_proj_weight(lm, PLANTED.layer)[PLANTED.row, PLANTED.col].item() == pytest.approx(20.0)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=tasks.resolve_tasks(["piqa"], offline=True), task_manager=tasks.task_manager(offline=True),
        limit=2, log_samples=False,
    )
    assert output["results"]["superweight_piqa"]["acc,none"] in (0.0, 0.5, 1.0)
    assert output["config"]["superweight"]["intervention"]["description"] == "super weights x0.5"


# -- the lm-eval command ------------------------------------------------------------------


def test_harness_argv_maps_tasks_offline():
    argv = ["--model", "hf-outlier", "--tasks", "winogrande,arc_challenge", "wikitext", "--limit", "5"]
    mapped = harness_argv(argv, offline=True)
    assert mapped[:6] == ["--model", "hf-outlier", "--tasks", "superweight_winogrande,superweight_arc_challenge",
                          "wikitext", "--limit"]
    assert mapped[-2] == "--include_path"
    assert Path(mapped[-1], "superweight_winogrande.yaml").is_file()
    assert harness_argv(["--tasks=piqa", "-t", "sciq"], offline=True)[:3] == [
        "--tasks=superweight_piqa", "-t", "superweight_sciq"]
    assert harness_argv(argv, offline=False) == argv
    assert harness_argv(["ls", "tasks"], offline=True) == ["ls", "tasks"]
    with pytest.raises(ValueError, match="--include_path is already set"):
        harness_argv(["--tasks", "piqa", "--include_path", "/tmp"], offline=True)


def test_lm_eval_command_readme_arguments(tiny_folder, tmp_path):
    # The research README's command, with a tiny model, explicit coordinates, CPU and --limit.
    status = superweight_main([
        "lm-eval", "--model", "hf-outlier",
        "--model_args", f"pretrained={tiny_folder},outlier_method=search_percentage_1e-6_0-32_all,"
        "restore_and_scale_GO=1.0,dtype=float32,super_weights=1:5:17",
        "--tasks", "winogrande,arc_challenge", "--device", "cpu", "--batch_size", "16", "--limit", "2",
        "--output_path", str(tmp_path / "outputs"),
    ])
    assert status == 0
    (results_file,) = (tmp_path / "outputs").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert set(results["results"]) == {"superweight_winogrande", "superweight_arc_challenge"}
    edit = results["config"]["superweight"]
    assert edit["outlier_method"] == "search_percentage_1e-6_0-32_all"
    assert edit["intervention"]["interventions"]["keep_super_weights"] is True


def test_module_entry_point_reaches_harness():
    # `python -m superweight.lm_eval` must reach the top-level lm_eval, not this package.
    completed = subprocess.run([sys.executable, "-m", "superweight.lm_eval", "--help"], capture_output=True,
                               text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: lm-eval")


def test_lm_eval_command_reports_bad_arguments(tiny_folder, capsys):
    status = superweight_main([
        "lm-eval", "--model", "hf-outlier", "--model_args", f"pretrained={tiny_folder},outlier_method=manual_scaling_SO_abc",
        "--tasks", "piqa", "--device", "cpu", "--limit", "1",
    ])
    assert status == 2
    assert "manual_scaling_SO_abc" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_readme_command(tmp_path):
    # The README's "Prune non-SW" command unchanged except model, device and --limit.
    status = superweight_main([
        "lm-eval", "--model", "hf-outlier",
        "--model_args", "pretrained=smollm2-135m,outlier_method=search_percentage_1e-6_0-32_all,"
        "restore_and_scale_GO=1.0,dtype=float32",
        "--tasks", README_TASKS, "--device", "cpu", "--batch_size", "16", "--limit", "2",
        "--output_path", str(tmp_path / "outputs"),
    ])
    assert status == 0
    (results_file,) = (tmp_path / "outputs").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert len(results["results"]) == 7
    edit = results["config"]["superweight"]
    assert edit["super_weights"] == ["11:507:1229", "11:507:1487"]
    assert edit["super_weights_source"].startswith("directory")
    assert edit["intervention"]["interventions"]["outlier_layers"] == list(range(30))
