"""Interventions do exactly what their definitions say and are fully reversible."""

import math

import pytest
import torch

from superweight.coordinates import SuperWeight
from superweight.interventions import (
    prune_outliers_,
    pruned_outliers,
    pruned_super_weights,
    restore_weights_,
    restored_super_activations,
    scale_super_weights_,
    scaled_super_weights,
    select_linear_modules,
)
from tiny_models import assert_bit_identical, make_model, plant_super_weight, state_snapshot

SW = SuperWeight(1, 5, 17)


@pytest.fixture
def model():
    model = make_model("llama")
    plant_super_weight(model, SW.layer, SW.row, SW.col)
    return model


def _ids(batch=1, tokens=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, tokens), generator=generator)


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
def test_scale_multiplies_exactly_one_weight(model, factor):
    snapshot = state_snapshot(model)
    name = "model.layers.1.mlp.down_proj.weight"

    with scaled_super_weights(model, [SW], factor):
        edited = model.state_dict()[name]
        expected = snapshot[name].clone()
        expected[SW.row, SW.col] *= factor
        assert torch.equal(edited, expected)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]
        assert changed == ([name] if factor != 1 else [])

    assert_bit_identical(model, snapshot)


def test_scale_gpt2_conv1d_uses_transposed_index():
    model = make_model("gpt2")
    snapshot = state_snapshot(model)
    with pruned_super_weights(model, [SuperWeight(2, 7, 100)]):
        assert model.transformer.h[2].mlp.c_proj.weight[100, 7].item() == 0.0
    assert_bit_identical(model, snapshot)


def test_restored_after_exception(model):
    snapshot = state_snapshot(model)
    with pytest.raises(KeyError):
        with pruned_outliers(model, 0.01, keep_super_weights=[SW]):
            with scaled_super_weights(model, [SW], 3.0):
                with restored_super_activations(model, [SW]):
                    model(_ids())
                    raise KeyError("inside")
    assert_bit_identical(model, snapshot)
    assert "forward" not in vars(model)
    assert not model.model.layers[1].mlp.down_proj._forward_hooks


def test_in_place_variant_persists_until_restored(model):
    snapshot = state_snapshot(model)
    backup = scale_super_weights_(model, [SW], 0.0)
    assert model.model.layers[1].mlp.down_proj.weight[SW.row, SW.col].item() == 0.0
    restore_weights_(backup)
    assert_bit_identical(model, snapshot)


@pytest.mark.parametrize("factor", [-1.0, float("nan"), float("inf")])
def test_bad_factor(model, factor):
    with pytest.raises(ValueError, match="scaling factor .* is invalid"):
        scale_super_weights_(model, [SW], factor)


def test_out_of_range_coordinates(model):
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        scale_super_weights_(model, [SuperWeight(7, 0, 0)], 0.0)
    with pytest.raises(ValueError, match="out of range"):
        scale_super_weights_(model, [SuperWeight(1, 0, 500)], 0.0)


def test_prune_outliers_zeroes_top_fraction_per_matrix(model):
    snapshot = state_snapshot(model)
    fraction = 0.01

    with pruned_outliers(model, fraction) as report:
        for name, count in report.zeroed.items():
            original = snapshot[name + ".weight"]
            expected_count = max(1, math.ceil(fraction * original.numel()))
            assert count == expected_count
            edited = model.state_dict()[name + ".weight"]
            zeroed = (edited == 0) & (original != 0)
            assert int(zeroed.sum()) == expected_count
            threshold = original.abs().flatten().topk(expected_count).values.min()
            assert bool((original[zeroed].abs() >= threshold).all())
        names = set(report.zeroed)
        assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
        assert len(names) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers

    assert_bit_identical(model, snapshot)


def test_prune_outliers_keeps_super_weight(model):
    with pruned_outliers(model, 1e-3, keep_super_weights=[SW]) as report:
        assert model.model.layers[1].mlp.down_proj.weight[SW.row, SW.col].item() == 40.0
        assert report.kept_super_weights == (SW,)
    with pruned_outliers(model, 1e-3):
        assert model.model.layers[1].mlp.down_proj.weight[SW.row, SW.col].item() == 0.0


def test_prune_outliers_layer_and_kind_selection(model):
    with pruned_outliers(model, 0.01, layers=[0, 1], kinds=["down_proj"]) as report:
        assert sorted(report.zeroed) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="match nothing; available"):
        select_linear_modules(model, kinds=["c_proj"])
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        select_linear_modules(model, layers=[9])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 2.0, float("nan")])
def test_bad_fraction(model, fraction):
    with pytest.raises(ValueError, match="outlier fraction .* is invalid"):
        prune_outliers_(model, fraction)


def test_interventions_compose(model):
    """Outliers pruned with the super weight kept, then the super weight scaled."""
    snapshot = state_snapshot(model)
    with pruned_outliers(model, 0.01, keep_super_weights=[SW]):
        with scaled_super_weights(model, [SW], 2.0):
            assert model.model.layers[1].mlp.down_proj.weight[SW.row, SW.col].item() == 80.0
            assert (model.model.layers[0].mlp.down_proj.weight == 0).sum() >= 1
    assert_bit_identical(model, snapshot)


def _down_proj_outputs(model, input_ids, attention_mask=None):
    captured = {}
    down = model.model.layers[SW.layer].mlp.down_proj
    handle = down.register_forward_hook(lambda m, a, o: captured.update(y=o.detach().clone()))
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    handle.remove()
    return captured["y"], logits


def test_restore_super_activation_with_padding_batch(model):
    tokenizer_pad = 0
    ids = _ids(batch=3, tokens=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    ids[mask == 0] = tokenizer_pad
    original, original_logits = _down_proj_outputs(model, ids, mask)

    with restored_super_activations(model, [SW]) as edited_model:
        restored, restored_logits = _down_proj_outputs(edited_model, ids, mask)
        assert model.model.layers[1].mlp.down_proj.weight[SW.row, SW.col].item() == 40.0  # pruned only per call
    with pruned_super_weights(model, [SW]):
        pruned, _ = _down_proj_outputs(model, ids, mask)

    channel = original[..., SW.row].abs() * mask
    peak = channel.amax(dim=1, keepdim=True)
    positions = (channel >= 0.5 * peak) & (mask == 1)
    assert positions.any(dim=1).all()
    # At super-activation positions the original value is written back exactly...
    assert torch.equal(restored[..., SW.row][positions], original[..., SW.row][positions])
    # ...everywhere else the model runs with the super weight pruned.
    assert torch.equal(restored[..., SW.row][~positions], pruned[..., SW.row][~positions])
    other = [c for c in range(original.shape[-1]) if c != SW.row]
    assert torch.equal(restored[..., other], pruned[..., other])
    assert not torch.equal(pruned[..., SW.row][positions], original[..., SW.row][positions])


def test_restore_keeps_existing_instance_forward(model):
    wrapped = model.forward

    def instance_forward(*args, **kwargs):
        return wrapped(*args, **kwargs)

    model.forward = instance_forward
    with restored_super_activations(model, [SW]):
        model(_ids())
    assert vars(model)["forward"] is instance_forward
