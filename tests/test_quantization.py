"""Tests of super-weight-aware quantization on random tensors and tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

from superweight.coordinates import SuperWeight
from superweight.quantization import (
    ActivationQuantConfig,
    WeightQuantConfig,
    fake_quantize_per_tensor,
    fake_quantize_per_token,
    fake_quantize_per_token_holding_out,
    linear_modules,
    load_quantized_,
    parse_block_size,
    parse_clip,
    parse_manual_quantize,
    quantize_activations_,
    quantize_tensor,
    quantize_weights_,
    quantized_weights,
    save_quantized,
    search_zscore,
    simulated_w8a8,
    smooth_,
    super_activation_channels,
)
from superweight.quantization import blockwise
from superweight.quantization.activations import super_activation_mask
from superweight.quantization.backup import TensorBackup
from superweight.quantization.blockwise import nf_levels
from superweight.quantization.smoothquant import smoothing_scales
from superweight.adapters import get_adapter
from tiny_models import CONFIGS, assert_bit_identical, make_model, plant_super_weight, state_snapshot

SUPER_WEIGHT = SuperWeight(1, 5, 7)


# -- a plain reference, written from the definitions ---------------------------------------


def reference_threshold(values: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor | None:
    """Clipping threshold on |w| of one block (or tensor), from sorted values and float64 moments."""
    absolute = values.abs()
    n = absolute.numel()
    if config.clip == "zscore":
        wide = absolute.double()
        std = wide.std() if n > 1 else torch.zeros((), dtype=torch.float64)
        return (wide.mean() + config.clip_value * std).float()
    if config.clip in ("block_top", "tensor_top"):
        k = math.floor(config.clip_value * n)
        return None if k == 0 else absolute.sort(descending=True).values[k]
    if config.clip == "iqr":
        ordered = absolute.sort().values.double()

        def quantile(p: float) -> torch.Tensor:
            position = p * (n - 1)
            lower = math.floor(position)
            upper = min(lower + 1, n - 1)
            return ordered[lower] + (position - lower) * (ordered[upper] - ordered[lower])

        q1, q3 = quantile(0.25), quantile(0.75)
        return (q3 + config.clip_value * (q3 - q1)).float()
    return None


def reference_block(block: torch.Tensor, config: WeightQuantConfig, threshold: torch.Tensor | None) -> torch.Tensor:
    """Round-to-nearest of one block: s = (2^b - 1) / (max - min), q = round((w - min) s), w' = q / s + min."""
    if threshold is not None:
        block = torch.clamp(block, -threshold, threshold)
    lo, hi = block.min(), block.max()
    span = hi - lo
    if config.format == "int":
        levels = 2**config.bits if config.scale_shift else 2**config.bits - 1
        scale = torch.tensor(float(levels)) / span if span > 0 else torch.tensor(1.0)
        if config.scale_shift:
            q = torch.clamp(torch.floor((block - lo) * scale), max=2**config.bits - 1)
            return (q + 0.5) / scale + lo
        return torch.round((block - lo) * scale) / scale + lo
    levels = nf_levels(config.format)
    scale = torch.tensor(2.0) / span if span > 0 else torch.tensor(1.0)
    x = (block - lo) * scale - 1
    nearest = (x[:, None] - levels[None, :]).abs().argmin(1)
    return (levels[nearest] + 1) / scale + lo


def reference_quantize(weight: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    flat = weight.float().reshape(-1)
    if config.block_size == "tensor":
        blocks = [flat]
    elif config.block_size == "channel":
        blocks = list(flat.view(weight.shape[0], -1))
    else:
        blocks = list(flat.split(config.block_size))
    tensor_threshold = reference_threshold(flat, config) if config.clip == "tensor_top" else None
    out = []
    for block in blocks:
        if config.clip == "tensor_top":
            threshold = tensor_threshold
        else:
            threshold = reference_threshold(block, config)
        out.append(reference_block(block, config, threshold))
    return torch.cat(out).view(weight.shape).to(weight.dtype)


def weights_with_outliers(rows: int = 48, cols: int = 200, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    weight[3, 7] = 0.9
    weight[rows // 2, cols // 2] = -0.5
    weight[rows - 1, 3] = 0.3
    return weight


CLIPS = [
    ("none", None),
    ("zscore", 3.0),
    ("zscore", 9.0),
    ("block_top", 0.01),
    ("block_top", 0.2),
    ("tensor_top", 1e-3),
    ("iqr", 1.5),
]
# 4096 splits 9600 elements into 2 blocks and a 1408-element remainder; 7 leaves 3.
BLOCK_SIZES = ["tensor", "channel", 4096, 1000, 64, 7]


@pytest.fixture(params=["fused", "torch"])
def kernel(request, monkeypatch):
    """Run a test with the compiled CPU kernels and again with the torch kernels."""
    monkeypatch.setattr(blockwise, "USE_FUSED", request.param == "fused")
    return request.param


def test_float32_cpu_uses_fused_kernels(monkeypatch):
    calls = []
    original = blockwise.fused.quantize_rows

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(blockwise.fused, "quantize_rows", spy)
    quantize_tensor(weights_with_outliers(), WeightQuantConfig(block_size=1000))
    assert calls == [(9, 1000), (1, 600)]
    quantize_tensor(weights_with_outliers().bfloat16(), WeightQuantConfig(block_size=1000))
    assert len(calls) == 2  # bfloat16 takes the torch kernels


@pytest.mark.parametrize("fmt, scale_shift", [("int", False), ("int", True), ("nf4", False), ("nf3", False)])
@pytest.mark.parametrize("clip, value", CLIPS)
def test_quantize_tensor_matches_reference(kernel, fmt, scale_shift, clip, value):
    weight = weights_with_outliers()
    for block_size in BLOCK_SIZES:
        config = WeightQuantConfig(format=fmt, block_size=block_size, clip=clip, clip_value=value,
                                   scale_shift=scale_shift)
        result, stats = quantize_tensor(weight, config)
        expected = reference_quantize(weight, config)
        mismatched = int((result != expected).sum())
        assert mismatched == 0, f"{config.describe()}: {mismatched} elements differ"
        assert stats.numel == weight.numel()


@pytest.mark.parametrize("clip, value", CLIPS)
def test_segmented_rows_match_reference(monkeypatch, clip, value):
    # The torch kernels process rows longer than a chunk in column segments; shrink the chunk to test it.
    monkeypatch.setattr(blockwise, "USE_FUSED", False)
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 256)
    weight = weights_with_outliers(rows=24, cols=100)
    for fmt in ("int", "nf4"):
        for block_size in ("tensor", 1000, 700):
            config = WeightQuantConfig(format=fmt, block_size=block_size, clip=clip, clip_value=value)
            result, _ = quantize_tensor(weight, config)
            assert torch.equal(result, reference_quantize(weight, config)), config.describe()


def test_bfloat16_matches_reference():
    weight = weights_with_outliers().bfloat16()
    for clip, value in CLIPS:
        config = WeightQuantConfig(format="int", block_size=1000, clip=clip, clip_value=value)
        result, _ = quantize_tensor(weight, config)
        assert result.dtype == torch.bfloat16
        assert torch.equal(result, reference_quantize(weight, config)), config.describe()


def test_iqr_with_extreme_outlier_matches_reference(kernel):
    # q1 sits below 2^-16 of the block's max |w|, outside the histogram window.
    weight = weights_with_outliers()
    weight[0, 0] = 1e4
    config = WeightQuantConfig(block_size=1000, clip="iqr")
    result, _ = quantize_tensor(weight, config)
    assert torch.equal(result, reference_quantize(weight, config))


def test_constant_block_is_reproduced(kernel):
    weight = torch.full((4, 64), 0.25)
    for fmt in ("int", "nf4", "nf3"):
        result, _ = quantize_tensor(weight, WeightQuantConfig(format=fmt, block_size=64))
        assert torch.equal(result, weight)


def test_block_views_remainder():
    stats = quantize_tensor(torch.randn(3, 5), WeightQuantConfig(block_size=4))[1]
    assert (stats.num_blocks, stats.block_size, stats.remainder) == (4, 4, 3)


@pytest.mark.parametrize("fmt, bits", [("int", 2), ("int", 3), ("int", 4), ("int", 8), ("nf4", 4), ("nf3", 3)])
def test_distinct_values_per_block(fmt, bits):
    weight = torch.randn(16, 512)
    result, _ = quantize_tensor(weight, WeightQuantConfig(bits=bits, format=fmt, block_size=1024))
    for block in result.view(-1, 1024):
        assert block.unique().numel() <= 2**bits


def rounding_slack(block: torch.Tensor) -> float:
    """Float32 rounding of ``q / s + lo``: a few units in the last place of the block's largest |w|."""
    return 4 * torch.finfo(torch.float32).eps * float(block.abs().max())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("seed", range(5))
def test_int_error_within_half_step(bits, seed):
    weight = torch.randn(32, 300, generator=torch.Generator().manual_seed(seed))
    result, _ = quantize_tensor(weight, WeightQuantConfig(bits=bits, block_size=1200))
    for original, quantized in zip(weight.view(-1, 1200), result.view(-1, 1200)):
        step = (original.max() - original.min()) / (2**bits - 1)
        assert float((original - quantized).abs().max()) <= float(step) / 2 + rounding_slack(original)


@pytest.mark.parametrize("seed", range(5))
def test_scale_shift_error_within_half_bin(seed):
    weight = torch.randn(32, 300, generator=torch.Generator().manual_seed(seed))
    result, _ = quantize_tensor(weight, WeightQuantConfig(bits=4, block_size=1200, scale_shift=True))
    for original, quantized in zip(weight.view(-1, 1200), result.view(-1, 1200)):
        half_bin = (original.max() - original.min()) / 2**4 / 2
        assert float((original - quantized).abs().max()) <= float(half_bin) + rounding_slack(original)


@pytest.mark.parametrize("fmt", ["nf4", "nf3"])
def test_nf_error_within_half_gap(fmt):
    weight = torch.randn(32, 300, generator=torch.Generator().manual_seed(0))
    levels = nf_levels(fmt)
    largest_gap = float((levels[1:] - levels[:-1]).max())
    result, _ = quantize_tensor(weight, WeightQuantConfig(format=fmt, block_size=1200))
    for original, quantized in zip(weight.view(-1, 1200), result.view(-1, 1200)):
        bound = largest_gap / 2 * float(original.max() - original.min()) / 2
        assert float((original - quantized).abs().max()) <= bound + rounding_slack(original)


def test_clipped_count_is_reported():
    weight = weights_with_outliers()
    _, stats = quantize_tensor(weight, WeightQuantConfig(block_size="tensor", clip="tensor_top", clip_value=2e-4))
    assert stats.clipped == math.floor(2e-4 * weight.numel())
    _, stats = quantize_tensor(weight, WeightQuantConfig(block_size="tensor", clip="block_top", clip_value=1e-5))
    assert stats.clipped == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_rejected(kernel, bad):
    weight = torch.randn(8, 64)
    weight[2, 3] = bad
    for clip, value in CLIPS:
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantize_tensor(weight, WeightQuantConfig(block_size=64, clip=clip, clip_value=value))


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(bits=1), "1"),
        (dict(bits=9), "9"),
        (dict(block_size=0), "0"),
        (dict(block_size=-4), "-4"),
        (dict(block_size="rows"), "rows"),
        (dict(format="nf4", bits=5), "5"),
        (dict(format="nf5"), "nf5"),
        (dict(clip="percentile"), "percentile"),
        (dict(clip="zscore", clip_value=0.0), "0.0"),
        (dict(clip="zscore", clip_value=-2.0), "-2.0"),
        (dict(clip="iqr", clip_value=-1.0), "-1.0"),
        (dict(clip="block_top", clip_value=1.0), "1.0"),
        (dict(clip="tensor_top", clip_value=0.0), "0.0"),
        (dict(format="nf4", scale_shift=True), "nf4"),
        (dict(restore_factor=float("nan")), "nan"),
    ],
)
def test_invalid_config_names_value(kwargs, shown):
    with pytest.raises(ValueError) as error:
        WeightQuantConfig(**kwargs)
    assert shown in str(error.value)


def test_config_defaults():
    assert WeightQuantConfig(format="nf3").bits == 3
    assert WeightQuantConfig(clip="block_top").clip_value == 1e-5
    assert WeightQuantConfig(clip="none", clip_value=3.0).clip_value is None


def test_parse_clip():
    assert parse_clip("zscore:9").value == 9.0
    assert parse_clip("zscore:auto").auto
    assert parse_clip("iqr").value is None
    for bad in ("zscore:nine", "block_top:2", "iqr:auto", "median:3", "none:1"):
        with pytest.raises(ValueError, match=bad.split(":")[-1]):
            parse_clip(bad)


def test_parse_block_size():
    assert parse_block_size("256x256") == 65536
    assert parse_block_size("channel") == "channel"
    with pytest.raises(ValueError, match="-5"):
        parse_block_size("-5")


def test_parse_manual_quantize():
    config = parse_manual_quantize("clip_4_65536_z_9_False_False", 1.0)
    assert (config.bits, config.block_size, config.clip, config.clip_value) == (4, 65536, "zscore", 9.0)
    assert config.keep_super_weights and config.restore_factor == 1.0
    config = parse_manual_quantize("clip_4_tensor_bp_1e-5_False_False", 1.5)
    assert (config.block_size, config.clip, config.clip_value, config.restore_factor) == ("tensor", "block_top", 1e-5, 1.5)
    assert parse_manual_quantize("clip_4_1048576_tp_1e-6_False_False").clip == "tensor_top"
    config = parse_manual_quantize("minmax_3_channel_no_0_True_False")
    assert (config.bits, config.block_size, config.clip, config.scale_shift) == (3, "channel", "none", True)
    assert not config.keep_super_weights
    assert parse_manual_quantize("minmax_4_16384_no_0_False_True").format == "nf4"


@pytest.mark.parametrize(
    "spec, shown",
    [
        ("clip_4_65536_z_9_False", "6 fields"),
        ("awq_4_65536_z_9_False_False", "awq"),
        ("clip_four_65536_z_9_False_False", "four"),
        ("clip_4_big_z_9_False_False", "big"),
        ("clip_4_65536_q_9_False_False", "'q'"),
        ("clip_4_65536_z_nine_False_False", "nine"),
        ("clip_4_65536_z_9_yes_False", "yes"),
        ("clip_5_65536_z_9_False_True", "5 bits"),
        ("clip_4_65536_z_-1_False_False", "-1"),
    ],
)
def test_parse_manual_quantize_rejects(spec, shown):
    with pytest.raises(ValueError) as error:
        parse_manual_quantize(spec)
    assert shown in str(error.value)


# -- models ------------------------------------------------------------------------------------


@pytest.fixture
def llama():
    model = make_model("llama")
    plant_super_weight(model, SUPER_WEIGHT.layer, SUPER_WEIGHT.row, SUPER_WEIGHT.col)
    return model


def test_quantize_weights_skips_embeddings_and_head(llama):
    names = [name for name, _ in linear_modules(llama)]
    assert "lm_head" not in names
    assert len(names) == 7 * llama.config.num_hidden_layers
    only_mlp = [name for name, _ in linear_modules(llama, lambda name: ".mlp." in name)]
    assert len(only_mlp) == 3 * llama.config.num_hidden_layers


def test_tied_head_is_not_quantized():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    )
    embedding = model.get_input_embeddings().weight.clone()
    quantize_weights_(model, WeightQuantConfig(bits=2, block_size=256))
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_super_weight_restored_exactly(llama):
    stored = llama.model.layers[1].mlp.down_proj.weight
    original = stored[SUPER_WEIGHT.row, SUPER_WEIGHT.col].clone()
    config = WeightQuantConfig(bits=3, block_size=1024, clip="zscore", clip_value=3.0, keep_super_weights=True)
    report = quantize_weights_(llama, config, [SUPER_WEIGHT])
    assert torch.equal(stored[SUPER_WEIGHT.row, SUPER_WEIGHT.col], original)
    assert report.restored == 1
    assert report.clipped > 0
    down = next(m for m in report.matrices if m.name == "model.layers.1.mlp.down_proj")
    assert down.restored == 1 and down.clipped > 0


def test_super_weight_restored_with_factor(llama):
    stored = llama.model.layers[1].mlp.down_proj.weight
    original = stored[SUPER_WEIGHT.row, SUPER_WEIGHT.col].clone()
    config = WeightQuantConfig(bits=4, block_size=1024, keep_super_weights=True, restore_factor=2.0)
    quantize_weights_(llama, config, [SUPER_WEIGHT])
    assert torch.equal(stored[SUPER_WEIGHT.row, SUPER_WEIGHT.col], original * 2.0)


def test_super_weight_quantized_without_keep(llama):
    stored = llama.model.layers[1].mlp.down_proj.weight
    original = stored[SUPER_WEIGHT.row, SUPER_WEIGHT.col].clone()
    report = quantize_weights_(llama, WeightQuantConfig(bits=2, block_size=1024, clip="zscore", clip_value=3.0),
                               [SUPER_WEIGHT])
    assert report.restored == 0
    assert not torch.equal(stored[SUPER_WEIGHT.row, SUPER_WEIGHT.col], original)


def test_gpt2_conv1d_blocks_follow_linear_layout():
    model = make_model("gpt2")
    layer = model.transformer.h[0].mlp.c_fc
    expected, _ = quantize_tensor(layer.weight.t(), WeightQuantConfig(bits=4, block_size=1000))
    quantize_weights_(model, WeightQuantConfig(bits=4, block_size=1000))
    assert torch.equal(layer.weight, expected.t())


def test_context_manager_restores_bit_identical(llama):
    snapshot = state_snapshot(llama)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference = llama(ids).logits
    config = WeightQuantConfig(format="nf3", block_size=512, clip="iqr", keep_super_weights=True)
    with quantized_weights(llama, config, [SUPER_WEIGHT]) as report:
        with torch.no_grad():
            quantized = llama(ids).logits
        assert report.numel > 0
    assert not torch.equal(quantized, reference)
    assert_bit_identical(llama, snapshot)
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, reference)


def test_context_manager_restores_on_exception(llama):
    snapshot = state_snapshot(llama)
    with pytest.raises(RuntimeError, match="inside"):
        with quantized_weights(llama, WeightQuantConfig(bits=2)):
            raise RuntimeError("inside the block")
    assert_bit_identical(llama, snapshot)


def test_context_manager_restores_when_quantization_fails(llama):
    with torch.no_grad():
        llama.model.layers[3].mlp.up_proj.weight[0, 0] = float("inf")
    snapshot = state_snapshot(llama)
    with pytest.raises(ValueError, match="infinite"):
        with quantized_weights(llama, WeightQuantConfig(bits=2)):
            pass
    assert_bit_identical(llama, snapshot)


def test_report_to_dict(llama):
    report = quantize_weights_(llama, WeightQuantConfig(keep_super_weights=True), [SUPER_WEIGHT])
    data = report.to_dict()
    assert data["restored"] == 1
    assert data["config"]["bits"] == 4
    assert data["super_weights"] == [{"layer": 1, "row": 5, "col": 7}]
    assert data["matrices"][0]["shape"] == [64, 64]


@pytest.mark.parametrize("fmt, bits, scale_shift, clip", [
    ("nf4", 4, False, "zscore"), ("nf3", 3, False, "iqr"), ("int", 4, False, "block_top"), ("int", 3, True, "zscore"),
])
def test_packed_round_trip_is_bit_identical(kernel, llama, tmp_path, fmt, bits, scale_shift, clip):
    clip_value = {"zscore": 3.0, "iqr": 1.5, "block_top": 0.01}[clip]
    config = WeightQuantConfig(format=fmt, bits=bits, block_size=1000, clip=clip, clip_value=clip_value,
                               scale_shift=scale_shift, keep_super_weights=True, restore_factor=1.5)
    report = save_quantized(llama, config, tmp_path, [SUPER_WEIGHT])
    fresh = copy.deepcopy(llama)
    assert load_quantized_(fresh, tmp_path) == config
    quantize_weights_(llama, config, [SUPER_WEIGHT])
    for (name, tensor), loaded in zip(llama.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(tensor, loaded), name
    assert report.size_bytes < report.original_bytes / 5


def test_load_quantized_rejects_other_model(llama, tmp_path):
    save_quantized(llama, WeightQuantConfig(bits=4), tmp_path)
    other = make_model("gpt2")
    with pytest.raises(ValueError, match="not a linear layer"):
        load_quantized_(other, tmp_path)


# -- z-score search ------------------------------------------------------------------------


def test_search_zscore_matches_direct_error(llama):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    config = WeightQuantConfig(bits=3, block_size=512, keep_super_weights=True)
    result = search_zscore(llama, None, config, candidates=(2.0, 4.0, 30.0), super_weights=[SUPER_WEIGHT],
                           calibration_ids=ids)

    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
             for name, module in linear_modules(llama)]
    with torch.no_grad():
        llama(ids)
    for hook in hooks:
        hook.remove()
    for z in (2.0, 4.0, 30.0):
        quantized = copy.deepcopy(llama)
        quantize_weights_(quantized, WeightQuantConfig(bits=3, block_size=512, clip="zscore", clip_value=z,
                                                       keep_super_weights=True), [SUPER_WEIGHT])
        direct = 0.0
        with torch.no_grad():
            for name, module in linear_modules(llama):
                x = inputs[name].reshape(-1, inputs[name].shape[-1])
                q = quantized.get_submodule(name).weight
                direct += float(((x @ module.weight.T - x @ q.T) ** 2).sum())
        assert result.errors[z] == pytest.approx(direct, rel=1e-3)
    assert result.best_z == min(result.errors, key=result.errors.get)
    assert result.config.clip_value == result.best_z


def test_search_zscore_rejects_bad_candidates(llama):
    with pytest.raises(ValueError, match="-1"):
        search_zscore(llama, None, WeightQuantConfig(), candidates=(-1.0,), calibration_ids=torch.zeros(1, 4).long())


# -- activations --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_levels_and_error(bits):
    x = torch.randn(5, 7, 96) * torch.linspace(0.1, 10, 7)[None, :, None]
    result = fake_quantize_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    levels = result / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert float(levels.abs().max()) <= qmax + 1e-3
    assert bool(((x - result).abs() <= scale / 2 * (1 + 1e-5)).all())


def test_per_token_zero_token_stays_zero():
    x = torch.zeros(2, 8)
    x[1] = torch.randn(8)
    result = fake_quantize_per_token(x)
    assert torch.equal(result[0], x[0])


def test_per_tensor_levels():
    weight = torch.randn(32, 16)
    result = fake_quantize_per_tensor(weight, 8)
    scale = weight.abs().max() / 127
    assert torch.allclose(result / scale, (result / scale).round(), atol=1e-3)
    assert float((weight - result).abs().max()) <= float(scale) / 2 * (1 + 1e-5)


def test_holding_out_keeps_super_activation():
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 17] = 900.0
    x[2, 4, 17] = -700.0
    x[1, :, 17] = 0.0  # never the largest value of a token of x[1]
    channels = torch.tensor([17])
    result = fake_quantize_per_token_holding_out(x, channels)
    assert result[0, 0, 17].item() == 900.0
    assert result[2, 4, 17].item() == -700.0
    # The other values of those tokens are quantized with a scale set by the rest.
    rest = x[0, 0].clone()
    rest[17] = rest.median()
    scale = rest.abs().max() / 127
    others = torch.cat([torch.arange(17), torch.arange(18, 64)])
    assert bool(((result[0, 0, others] - x[0, 0, others]).abs() <= scale / 2 * (1 + 1e-5)).all())
    # A token whose channel 17 is not its largest value is quantized as usual.
    assert torch.equal(result[1], fake_quantize_per_token(x[1]))


def test_super_activation_mask_rule():
    x = torch.tensor([[1.0, 5.0, -2.0], [1.0, 0.5, -2.0]])
    assert super_activation_mask(x, torch.tensor([1])).flatten().tolist() == [True, False]


def test_super_activation_channels(llama):
    channels = super_activation_channels(llama, [SUPER_WEIGHT])
    assert channels["model.layers.1.mlp.down_proj"] == (SUPER_WEIGHT.col,)
    assert channels["model.layers.2.self_attn.q_proj"] == (SUPER_WEIGHT.row,)
    assert channels["model.layers.3.mlp.up_proj"] == (SUPER_WEIGHT.row,)
    assert "model.layers.1.self_attn.q_proj" not in channels
    assert "model.layers.2.self_attn.o_proj" not in channels


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_residual_readers_every_architecture(model_type):
    model = make_model(model_type)
    adapter = get_adapter(model)
    assert adapter.residual_readers, f"{model_type}: no residual readers"
    channels = super_activation_channels(model, [SuperWeight(0, 3, 5)])
    readers = [name for name in channels if not name.endswith(adapter.down_proj)]
    # Every reader of every later layer, each a linear layer whose inputs get the row.
    assert len(readers) == len(adapter.residual_readers) * (adapter.num_layers(model) - 1)
    linear_names = {name for name, _ in linear_modules(model)}
    assert set(readers) <= linear_names


@pytest.mark.parametrize("variant", ["rtn", "sa_aware", "smoothquant"])
def test_w8a8_restores_bit_identical(llama, variant):
    config = {
        "rtn": ActivationQuantConfig(),
        "sa_aware": ActivationQuantConfig(keep_super_activations=True),
        "smoothquant": ActivationQuantConfig(smoothquant_alpha=0.85),
    }[variant]
    ids = torch.randint(0, 256, (2, 16))
    snapshot = state_snapshot(llama)
    with torch.no_grad():
        reference = llama(ids).logits
    with simulated_w8a8(llama, config, [SUPER_WEIGHT], calibration_ids=torch.randint(0, 256, (2, 32))) as report:
        assert llama.config._attn_implementation.startswith("superweight_w8a8_")
        with torch.no_grad():
            quantized = llama(ids).logits
    assert report.to_dict()["variant"] == variant
    assert not torch.equal(quantized, reference)
    assert llama.config._attn_implementation == "sdpa"
    assert_bit_identical(llama, snapshot)
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, reference)


def test_w8a8_restores_on_exception(llama):
    snapshot = state_snapshot(llama)
    with pytest.raises(RuntimeError, match="inside"):
        with simulated_w8a8(llama):
            raise RuntimeError("inside the block")
    assert_bit_identical(llama, snapshot)
    assert llama.config._attn_implementation == "sdpa"
    assert all(not module._forward_pre_hooks for module in llama.modules())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_w8a8_attention_keeps_mask(implementation):
    # At 16 bits the simulation is nearly lossless, so any change of masking would show.
    model = make_model("llama")
    model.set_attn_implementation(implementation)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    config = ActivationQuantConfig(weight_bits=16, activation_bits=16)
    with simulated_w8a8(model, config) as report:
        assert report.attention_implementations == (implementation,)
        with torch.no_grad():
            quantized = model(ids, attention_mask=mask).logits
    assert torch.allclose(quantized[mask.bool()], reference[mask.bool()], atol=1e-3)


def test_w8a8_needs_super_weights_for_sa_aware(llama):
    with pytest.raises(ValueError, match="super_weights"):
        quantize_activations_(llama, ActivationQuantConfig(keep_super_activations=True))


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(weight_bits=1), "1"),
        (dict(activation_bits=32), "32"),
        (dict(smoothquant_alpha=1.5), "1.5"),
        (dict(smoothquant_alpha=0.5, keep_super_activations=True), "keep_super_activations"),
        (dict(calibration_tokens=0), "0"),
    ],
)
def test_invalid_activation_config(kwargs, shown):
    with pytest.raises(ValueError) as error:
        ActivationQuantConfig(**kwargs)
    assert shown in str(error.value)


# -- SmoothQuant ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("smooth_down_proj", [False, True])
def test_smoothquant_keeps_float_output(model_type, smooth_down_proj):
    model = make_model(model_type)
    plant_super_weight(model, 1, 5, 7)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
    backup = TensorBackup()
    report = smooth_(model, None, 0.85, calibration_ids=torch.randint(0, 256, (2, 32)),
                     smooth_down_proj=smooth_down_proj, backup=backup)
    with torch.no_grad():
        smoothed = model(ids).logits
    assert report.max_scale != report.min_scale
    assert torch.allclose(smoothed, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    backup.restore()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_smoothing_scale_formula():
    activation = torch.tensor([8.0, 0.5, 0.0])
    weights = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])]
    scales = smoothing_scales(activation, weights, 0.75)
    expected = torch.tensor([8.0**0.75 / 4.0**0.25, 0.5**0.75 / 2.0**0.25, 1e-5**0.75 / 0.5**0.25])
    assert torch.allclose(scales, expected)


def test_smoothquant_rejects_unsupported_model():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        smooth_(model, None, 0.85, calibration_ids=torch.zeros(1, 8).long())


# -- the real default model ---------------------------------------------------------------------

# Super weights of SmolLM2-135M found by superweight.detect (layer, row, col).
SMOLLM2_SUPER_WEIGHTS = [SuperWeight(11, 507, 1229), SuperWeight(11, 507, 1487)]


@pytest.mark.slow
def test_default_model_int8_keeps_perplexity(default_model):
    from superweight.perplexity import evaluate_perplexity

    model, tokenizer = default_model.model, default_model.tokenizer
    snapshot = state_snapshot(model)

    def perplexity() -> float:
        return evaluate_perplexity(model, tokenizer, "wiki-sample", seqlen=128, max_windows=1, progress=False).perplexity

    reference = perplexity()
    with quantized_weights(model, WeightQuantConfig(bits=8, block_size=65536, keep_super_weights=True),
                           SMOLLM2_SUPER_WEIGHTS) as report:
        quantized = perplexity()
    assert report.restored == 2
    assert quantized == pytest.approx(reference, rel=0.05)
    assert_bit_identical(model, snapshot)


@pytest.mark.slow
def test_default_model_sa_aware_w8a8(default_model):
    from superweight.perplexity import evaluate_perplexity, tokenize_source
    from superweight.quantization import calibration_batch

    model, tokenizer = default_model.model, default_model.tokenizer
    batch = calibration_batch(tokenizer, "wiki-sample", num_tokens=256, seqlen=128)
    assert tuple(batch.shape) == (2, 128)
    assert torch.equal(batch[1], tokenize_source(tokenizer, "wiki-sample")[128:256])

    snapshot = state_snapshot(model)
    config = ActivationQuantConfig(keep_super_activations=True)
    with simulated_w8a8(model, config, SMOLLM2_SUPER_WEIGHTS, tokenizer=tokenizer) as report:
        result = evaluate_perplexity(model, tokenizer, "wiki-sample", seqlen=128, max_windows=1, progress=False)
    assert report.held_out_channels["model.layers.11.mlp.down_proj"] == (1229, 1487)
    assert report.held_out_channels["model.layers.12.self_attn.q_proj"] == (507,)
    assert math.isfinite(result.perplexity)
    assert_bit_identical(model, snapshot)
