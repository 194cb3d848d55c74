"""Detection on tiny random models with a planted super weight, one per architecture."""

import dataclasses

import pytest
import torch

from superweight.adapters import Adapter, get_adapter, register_adapter, supported_model_types, ADAPTERS
from superweight.coordinates import SuperWeight
from superweight.detect import DetectionConfig, NumericalOverflowError, detect_super_weights
from tiny_models import CONFIGS, ByteTokenizer, assert_bit_identical, make_model, plant_super_weight, state_snapshot

PLANTED = SuperWeight(layer=1, row=5, col=17)
PROMPT = "Apple Inc. is a worldwide tech company."


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_detect_finds_planted_weight(model_type):
    model = make_model(model_type)
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    snapshot = state_snapshot(model)

    report = detect_super_weights(model, ByteTokenizer(), prompt=PROMPT)

    first_pass = [c.super_weight for c in report.candidates if c.iteration == 0]
    assert first_pass == [PLANTED]
    candidate = report.candidates[0]
    adapter = get_adapter(model)
    weight = adapter.down_proj_module(model, PLANTED.layer).weight
    assert candidate.value == weight[adapter.weight_index(PLANTED.row, PLANTED.col)].item() == 40.0
    assert abs(candidate.super_activation) > 50  # random weights give outputs below 5
    assert candidate.module.endswith(adapter.down_proj)
    assert_bit_identical(model, snapshot)


def test_gpt2_conv1d_reports_linear_convention():
    model = make_model("gpt2")
    plant_super_weight(model, 2, 7, 100)
    conv = model.transformer.h[2].mlp.c_proj
    assert conv.weight.shape == (128, 64)  # Conv1D stores [in, out]
    assert conv.weight[100, 7].item() == 40.0

    report = detect_super_weights(model, ByteTokenizer(), prompt=PROMPT, max_iterations=1)

    assert [c.super_weight for c in report.candidates] == [SuperWeight(2, 7, 100)]
    assert "Conv1D" in report.to_dict()["coordinates"]


def test_post_norm_architectures_report_both_outputs():
    model = make_model("gemma2")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)

    report = detect_super_weights(model, ByteTokenizer(), prompt=PROMPT, max_iterations=1)

    stats = report.layers[PLANTED.layer]
    assert stats.residual_max_output is not None
    assert stats.residual_channel == PLANTED.row
    assert stats.output_channel == PLANTED.row
    assert stats.residual_max_output != stats.max_output
    assert all(s.residual_max_output is not None for s in report.layers)


def test_detect_iterates_past_first_weight():
    model = make_model("llama")
    plant_super_weight(model, 1, 5, 17)
    plant_super_weight(model, 1, 5, 40, value=30.0)  # a second, weaker weight feeding the same row

    report = detect_super_weights(model, ByteTokenizer(), prompt=PROMPT, max_iterations=3)

    found = [(c.super_weight, c.iteration) for c in report.candidates]
    assert (SuperWeight(1, 5, 17), 0) in found or (SuperWeight(1, 5, 40), 0) in found
    assert {SuperWeight(1, 5, 17), SuperWeight(1, 5, 40)} <= {sw for sw, _ in found}
    assert len(report.steps) >= 2


def test_per_layer_statistics_match_manual_computation():
    model = make_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    tokenizer = ByteTokenizer()
    captured = {}
    down = model.model.layers[PLANTED.layer].mlp.down_proj
    handle = down.register_forward_hook(lambda m, a, o: captured.update(x=a[0][0].clone(), y=o[0].clone()))
    with torch.no_grad():
        model(**tokenizer(PROMPT))
    handle.remove()

    report = detect_super_weights(model, tokenizer, prompt=PROMPT, max_iterations=1)

    stats = report.layers[PLANTED.layer]
    y, x = captured["y"], captured["x"]
    assert stats.max_output == pytest.approx(y.abs().max().item(), rel=1e-6)
    token = int(y.abs().max(dim=1).values.argmax())
    assert stats.token == token
    assert stats.input_channel == int(x[token].abs().argmax())
    assert stats.max_input == pytest.approx(x[token].abs().max().item(), rel=1e-6)


def test_model_unchanged_when_forward_raises():
    model = make_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    snapshot = state_snapshot(model)
    calls = {"n": 0}

    def fail_on_second_pass(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:  # the second pass runs with the found weight zeroed
            raise RuntimeError("boom")

    handle = model.model.layers[3].register_forward_hook(fail_on_second_pass)
    with pytest.raises(RuntimeError, match="boom"):
        detect_super_weights(model, ByteTokenizer(), prompt=PROMPT)
    handle.remove()

    assert_bit_identical(model, snapshot)
    for layer in model.model.layers:
        assert not layer.mlp.down_proj._forward_hooks


def test_float16_overflow_names_layer():
    model = make_model("llama", dtype=torch.float16)
    plant_super_weight(model, 2, 5, 17, gain=300.0, value=60000.0)

    with pytest.raises(NumericalOverflowError, match=r"layer 2 .*bfloat16 or float32"):
        detect_super_weights(model, ByteTokenizer(), prompt=PROMPT)


def test_verify_confirms_planted_and_rejects_noise():
    model = make_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)

    report = detect_super_weights(model, ByteTokenizer(), prompt=PROMPT, verify=True, confirm_ratio=1.5)

    by_weight = {c.super_weight: c for c in report.candidates}
    assert by_weight[PLANTED].perplexity_ratio is not None
    # A random tiny model has no language ability to lose, so the causal test decides
    # from the numbers alone; the planted weight must change perplexity most.
    assert report.candidates[0].group_perplexity_ratio == max(c.group_perplexity_ratio for c in report.candidates)


@pytest.mark.parametrize(
    "field, value",
    [("prompt", ""), ("prompt", "   "), ("max_iterations", 0), ("spike_ratio", 0.0), ("min_spike", float("nan"))],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field if field != "prompt" else "prompt is empty"):
        DetectionConfig(**{field: value})


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError) as error:
        get_adapter("mamba")
    message = str(error.value)
    assert "no adapter for model type 'mamba'" in message
    assert "llama" in message
    assert "gpt2" in message
    assert "register_adapter" in message


def test_register_adapter_for_new_model_type():
    model = make_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    model.config.model_type = "my_llama"
    try:
        register_adapter(Adapter(("my_llama",), layers="model.layers", down_proj="mlp.down_proj"))
        report = detect_super_weights(model, ByteTokenizer(), prompt=PROMPT, max_iterations=1)
        assert [c.super_weight for c in report.candidates] == [PLANTED]
        with pytest.raises(ValueError, match="already has an adapter"):
            register_adapter(Adapter(("my_llama",), layers="model.layers", down_proj="mlp.down_proj"))
    finally:
        ADAPTERS.pop("my_llama", None)


def test_required_architectures_supported():
    required = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "gemma", "gemma2", "gemma3",
                "gpt2", "gpt_neox", "falcon", "opt", "stablelm", "starcoder2"}
    assert required <= set(supported_model_types())


def test_report_json_has_documented_fields():
    model = make_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)

    data = detect_super_weights(model, ByteTokenizer(), prompt=PROMPT, max_iterations=1).to_dict()

    assert data["super_weights"] == [dataclasses.asdict(PLANTED)]
    sw = data["candidates"][0]
    for key in ("layer", "row", "col", "value", "super_activation", "token", "module", "persistence", "depth"):
        assert key in sw
    assert (sw["layer"], sw["row"], sw["col"]) == dataclasses.astuple(PLANTED)
    layer = data["layers"][PLANTED.layer]
    for key in ("max_input", "input_channel", "max_output", "output_channel"):
        assert key in layer
    assert data["config"]["prompt"] == PROMPT
