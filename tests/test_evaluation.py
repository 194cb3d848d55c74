"""Intervention specs, their composition, and evaluation through the real lm-evaluation-harness."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch

import superweight.evaluation
from superweight.coordinates import SuperWeight
from superweight.evaluation import InterventionSpec, applied, evaluate, harness_metrics, measure
from superweight.models import load_model
from tiny_folder_model import PLANTED, save_tiny_folder_model, write_text
from tiny_models import assert_bit_identical, make_model, plant_super_weight, state_snapshot

SW = SuperWeight(1, 5, 17)


@pytest.fixture
def model():
    model = make_model("llama")
    plant_super_weight(model, SW.layer, SW.row, SW.col)
    return model


@pytest.fixture(scope="module")
def tiny_loaded(default_model, tmp_path_factory):
    folder = save_tiny_folder_model(default_model.tokenizer, tmp_path_factory.mktemp("tiny_folder"))
    return load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return str(write_text(tmp_path_factory.mktemp("text")))


def test_doctests():
    assert doctest.testmod(superweight.evaluation).failed == 0


# -- the spec ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [-1.0, math.nan, math.inf, True, "0.5"])
def test_spec_rejects_bad_factor(factor):
    with pytest.raises(ValueError, match="scale_factor"):
        InterventionSpec(scale_factor=factor)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 2.0, -1e-6, math.nan])
def test_spec_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=f"prune_outliers={fraction!r}"):
        InterventionSpec(prune_outliers=fraction)


@pytest.mark.parametrize("field", [{"keep_super_weights": True}, {"outlier_layers": (0,)},
                                   {"outlier_kinds": ("down_proj",)}])
def test_spec_outlier_options_need_fraction(field):
    with pytest.raises(ValueError, match="needs prune_outliers"):
        InterventionSpec(**field)


def test_spec_round_trip_and_description():
    spec = InterventionSpec(prune_outliers=1e-6, keep_super_weights=True, outlier_layers=range(0, 4),
                            outlier_kinds=["down_proj"], scale_factor=2)
    assert spec.outlier_layers == (0, 1, 2, 3)
    assert spec.scale_factor == 2.0
    assert InterventionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.describe() == "top 1e-06 outliers pruned in layers 0-3 down_proj, super weights kept; super weights x2"
    assert InterventionSpec().describe() == "original"
    assert InterventionSpec().is_identity
    assert InterventionSpec(scale_factor=1.0).is_identity
    assert not InterventionSpec(scale_factor=0.0).is_identity


# -- composing the edits -------------------------------------------------------------------


def _down_proj(model, layer):
    return model.model.layers[layer].mlp.down_proj


def test_applied_needs_super_weights(model):
    with pytest.raises(ValueError, match="needs super weight coordinates"):
        with applied(model, InterventionSpec(scale_factor=0.0), []):
            pass


def test_applied_prunes_then_scales_kept_weight(model):
    snapshot = state_snapshot(model)
    original = _down_proj(model, SW.layer).weight[SW.row, SW.col].item()
    spec = InterventionSpec(prune_outliers=0.01, keep_super_weights=True, scale_factor=2.0)

    with applied(model, spec, [SW]) as details:
        weight = _down_proj(model, SW.layer).weight
        assert weight[SW.row, SW.col].item() == 2 * original
        zeroed = details["outliers"]["zeroed_per_matrix"]["model.layers.1.mlp.down_proj"]
        assert int((weight == 0).sum()) == zeroed
        assert details["outliers"]["kept_super_weights"] == [SW.to_dict()]

    assert_bit_identical(model, snapshot)


def test_applied_pruned_super_weight_stays_zero_when_scaled(model):
    # Without keep_super_weights the planted weight, the largest |w| of its matrix, is
    # pruned first; scaling afterwards keeps it at 0.
    snapshot = state_snapshot(model)
    with applied(model, InterventionSpec(prune_outliers=0.01, scale_factor=3.0), [SW]):
        assert _down_proj(model, SW.layer).weight[SW.row, SW.col].item() == 0.0
    assert_bit_identical(model, snapshot)


def _super_activation(model, ids):
    # Keeps the last call's output: with the restore hook, the forward runs twice and the
    # second (edited) pass is the one that produces the logits.
    captured = {}

    def hook(module, args, output):
        captured["row"] = output[..., SW.row].detach().clone()

    handle = _down_proj(model, SW.layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return captured["row"]


def test_applied_restores_activation_of_scaled_model(model):
    # The super activation is recorded after scaling: with x2 and the restore hook, the
    # down-projection output at the super-activation position is the x2 model's.
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    original = _super_activation(model, ids)
    with applied(model, InterventionSpec(scale_factor=2.0), [SW]):
        scaled = _super_activation(model, ids)
    position = int(scaled.abs().argmax())

    snapshot = state_snapshot(model)
    with applied(model, InterventionSpec(scale_factor=2.0, restore_super_activation=True), [SW]):
        restored = _super_activation(model, ids)
        assert "forward" in vars(model)
    assert "forward" not in vars(model)
    assert_bit_identical(model, snapshot)

    assert not torch.allclose(scaled[0, position], original[0, position])
    torch.testing.assert_close(restored[0, position], scaled[0, position])


def test_applied_undoes_everything_on_error(model):
    snapshot = state_snapshot(model)
    spec = InterventionSpec(prune_outliers=0.01, keep_super_weights=True, scale_factor=0.0,
                            restore_super_activation=True)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(model, spec, [SW]):
            raise RuntimeError("boom")
    assert_bit_identical(model, snapshot)
    assert "forward" not in vars(model)


# -- harness output ------------------------------------------------------------------------


def test_harness_metrics_keeps_only_metrics():
    output = {
        "results": {
            "superweight_arc_easy": {"alias": "x", "name": None, "sample_len": 4, "acc,none": 0.5,
                                     "acc_stderr,none": 0.25, "acc_norm,none": 0.75, "acc_norm_stderr,none": "N/A"},
            "superweight_lambada_openai": {"acc,none": 0.0, "perplexity,none": 1234.5},
        },
        "n-samples": {"superweight_arc_easy": {"original": 2376, "effective": 4}},
    }
    metrics = harness_metrics(output)
    assert set(metrics) == {"arc_easy", "lambada_openai"}
    assert metrics["arc_easy"] == {"acc": 0.5, "acc_stderr": 0.25, "acc_norm": 0.75, "acc_norm_stderr": None,
                                   "num_samples": 4, "lm_eval_task": "superweight_arc_easy"}
    assert metrics["lambada_openai"]["perplexity"] == 1234.5
    assert superweight.evaluation.average_accuracy(metrics) == 0.25


# -- evaluation through the harness on a tiny folder model ------------------------------


def test_measure_unknown_task(tiny_loaded):
    with pytest.raises(ValueError, match="unknown task 'arc_hard'"):
        measure(tiny_loaded, tasks=["arc_easy", "arc_hard"], offline=True)


def test_evaluate_rejects_empty_request(tiny_loaded):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(tiny_loaded, InterventionSpec(), [])


def test_evaluate_json_fields(tiny_loaded, text_file):
    snapshot = state_snapshot(tiny_loaded.model)
    result = evaluate(
        tiny_loaded, InterventionSpec(scale_factor=0.0), [PLANTED], perplexity=[text_file],
        tasks=["arc_easy", "lambada_openai"], limit=2, seqlen=64, offline=True, progress=False,
        super_weights_source="explicit",
    )
    assert_bit_identical(tiny_loaded.model, snapshot)
    json.dumps(result)

    ppl = result["perplexity"][text_file]
    assert ppl["perplexity"] > 1
    assert ppl["num_windows"] >= 2
    assert ppl["seqlen"] == 64

    assert set(result["tasks"]) == {"arc_easy", "lambada_openai"}
    arc = result["tasks"]["arc_easy"]
    assert 0 <= arc["acc"] <= 1
    assert "acc_stderr" in arc
    assert arc["num_samples"] == 2
    assert arc["lm_eval_task"] == "superweight_arc_easy"
    assert "perplexity" in result["tasks"]["lambada_openai"]
    expected_average = (arc["acc"] + result["tasks"]["lambada_openai"]["acc"]) / 2
    assert result["average_accuracy"] == pytest.approx(expected_average)
    assert set(result["split_notes"]) == {"lambada_openai"}

    assert result["super_weights"] == [PLANTED.to_dict()]
    assert result["interventions"]["description"] == "super weights x0"
    provenance = result["provenance"]
    assert provenance["interventions"]["scale_factor"] == 0.0
    assert provenance["super_weights"] == [PLANTED.to_spec()]
    assert provenance["super_weights_source"] == "explicit"
    assert provenance["seed"] == 1234
    assert provenance["limit"] == 2
    assert provenance["versions"]["lm_eval"]
    assert provenance["model_type"] == "llama"


def test_evaluate_pruning_planted_weight_raises_perplexity(tiny_loaded, text_file):
    kwargs = dict(perplexity=[text_file], seqlen=64, progress=False)
    original = evaluate(tiny_loaded, InterventionSpec(), [], **kwargs)
    pruned = evaluate(tiny_loaded, InterventionSpec(scale_factor=0.0), [PLANTED], **kwargs)
    again = evaluate(tiny_loaded, InterventionSpec(), [], **kwargs)
    assert pruned["perplexity"][text_file]["perplexity"] != original["perplexity"][text_file]["perplexity"]
    assert again["perplexity"][text_file]["perplexity"] == original["perplexity"][text_file]["perplexity"]


@pytest.mark.slow
def test_default_model_super_weight_pruning(default_model):
    from superweight.api import resolve_super_weights

    super_weights, source = resolve_super_weights(default_model)
    assert source.startswith("directory")
    kwargs = dict(perplexity=["wiki-sample"], tasks=["arc_easy"], limit=2, seqlen=128, max_windows=2,
                  offline=True, progress=False)
    original = evaluate(default_model, InterventionSpec(), super_weights, **kwargs)
    pruned = evaluate(default_model, InterventionSpec(scale_factor=0.0), super_weights, **kwargs)
    original_ppl = original["perplexity"]["wiki-sample"]["perplexity"]
    pruned_ppl = pruned["perplexity"]["wiki-sample"]["perplexity"]
    assert pruned_ppl > 2 * original_ppl
    assert original["tasks"]["arc_easy"]["num_samples"] == 2
