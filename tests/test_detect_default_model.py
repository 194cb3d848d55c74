"""Detection on the real default model, SmolLM2-135M (a dequantized Q4_1 GGUF)."""

import json

import pytest
import torch

from superweight.api import detect_loaded
from superweight.cli import main
from superweight.detect import DetectionConfig, text_perplexity
from superweight.interventions import pruned_super_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def verified_report(default_model):
    return detect_loaded(default_model, DetectionConfig(verify=True))


def _real_text_ids(tokenizer, tokens=1024):
    from superweight.text_sources import load_text

    text = load_text("wiki-sample").text
    return tokenizer(text[:20000], return_tensors="pt").input_ids[:, :tokens]


def test_confirmed_super_weights_collapse_perplexity(default_model, verified_report):
    confirmed = verified_report.super_weights
    assert confirmed, "no confirmed super weight"
    assert all(sw.layer < 15 for sw in confirmed)
    ids = _real_text_ids(default_model.tokenizer)
    base = text_perplexity(default_model.model, ids)

    with pruned_super_weights(default_model.model, confirmed):
        pruned = text_perplexity(default_model.model, ids)

    assert pruned / base > 10


def test_late_spikes_are_not_confirmed(verified_report):
    late = [c for c in verified_report.candidates if c.depth > 0.9]
    assert late, "the default model spikes in its last layers; expected them as candidates"
    for candidate in late:
        assert candidate.status == "rejected"
        assert candidate.perplexity_ratio < verified_report.config.confirm_ratio


def test_persistence_separates_super_weight_from_late_spike(verified_report):
    by_layer = {c.layer: c for c in verified_report.candidates}
    assert by_layer[11].persistence > 0.9
    assert by_layer[28].persistence < 0.1


def test_verified_json_lists_only_confirmed(verified_report):
    data = verified_report.to_dict()
    assert data["super_weights"] == [{"layer": 11, "row": 507, "col": 1229}, {"layer": 11, "row": 507, "col": 1487}]
    assert {c["status"] for c in data["candidates"]} == {"confirmed", "rejected"}


def test_agrees_with_directory(verified_report):
    assert verified_report.directory["agrees"]
    assert verified_report.provenance["model_sha256"] == verified_report.provenance["model_sha256"].lower()


def test_model_bit_identical_after_detection(default_model):
    snapshot = {k: v.clone() for k, v in default_model.model.state_dict().items()}
    detect_loaded(default_model, DetectionConfig(verify=True, max_iterations=2))
    for name, tensor in default_model.model.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), name


def test_cli_json(capsys, tmp_path):
    output = tmp_path / "report.json"
    assert main(["-q", "detect", "--json", "--output", str(output)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(output.read_text())
    assert data["model"] == "smollm2-135m"
    assert {"layer": 11, "row": 507, "col": 1229} == {k: data["super_weights"][0][k] for k in ("layer", "row", "col")}
    assert len(data["layers"]) == 30
    provenance = data["provenance"]
    assert provenance["prompt"] == "Apple Inc. is a worldwide tech company."
    assert provenance["dtype"] == "float32"
    assert provenance["versions"]["torch"]
    assert len(provenance["model_sha256"]) == 64


def test_cli_bad_input_exit_code(capsys):
    assert main(["detect", "./does/not/exist"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["detect", "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
