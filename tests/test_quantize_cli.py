"""`superweight quantize` end to end on the default model, and its argument errors."""

import json

import pytest

from superweight.cli import main
from superweight.quantization.experiments import activation_quant_configurations, weight_quant_configurations


def test_weight_quant_configurations_pair_rtn_and_aware():
    configurations = weight_quant_configurations([65536, "tensor"], clip_value=9.0)
    assert [c.name for c in configurations] == ["rtn-65536", "sw-aware-65536", "rtn-tensor", "sw-aware-tensor"]
    aware = configurations[1].settings["config"]
    assert aware["keep_super_weights"] is True
    assert aware["clip"] == "zscore"
    assert configurations[0].settings["config"]["clip"] == "none"
    assert not configurations[0].needs_super_weights


def test_activation_quant_configurations():
    names = [c.name for c in activation_quant_configurations()]
    assert names == ["fp", "w8a8-rtn", "smoothquant", "sa-aware"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "9"], "bits=9 is invalid"),
        (["--block-size", "0"], "block_size"),
        (["--format", "nf4", "--bits", "3"], "format 'nf4' has 4-bit levels"),
        (["--clip", "median:3"], "unknown method 'median'"),
        (["--clip", "zscore:0"], "zscore z=0.0 is invalid"),
        (["--clip", "block_top:2"], "fraction=2.0 is invalid"),
        (["--no-weights"], "leaves nothing to quantize"),
        (["--keep-super-activations"], "need --activations int8"),
    ],
)
def test_bad_arguments(capsys, argv, message):
    assert main(["quantize", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_keeps_super_weights_and_saves(tmp_path, capsys):
    saved = tmp_path / "model"
    argv = ["-q", "quantize", "--block-size", "1048576", "--clip", "zscore:9", "--keep-super-weights",
            "--perplexity", "wiki-sample", "--seqlen", "128", "--max-windows", "1", "--json",
            "--save", str(saved)]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weights"]["restored"] == 2
    assert data["weights"]["clipped"] > 0
    assert data["super_weights_source"].startswith("directory")
    assert data["perplexity"]["wiki-sample"]["num_windows"] == 1
    assert data["provenance"]["weight_config"]["block_size"] == 1048576
    assert (saved / "model.safetensors").is_file()

    from superweight.models import load_model

    reloaded = load_model(str(saved), device="cpu")
    weight = reloaded.model.model.layers[11].mlp.down_proj.weight
    assert weight[507, 1229].item() == pytest.approx(5.875732421875)
    assert main(["quantize", "--save", str(saved)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
