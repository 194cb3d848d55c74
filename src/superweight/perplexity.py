"""Measure the perplexity of a causal LM on a text source with fixed-length windows.

The protocol is the one of the GPTQ evaluation code (IST-DASLab/gptq):

1. The whole text is tokenized once into one token stream, with the tokenizer's
   default special tokens (``add_special_tokens=True``). A Llama tokenizer thus
   prepends one BOS to the stream, and SmolLM2's prepends nothing. Windows after the
   first do not get their own BOS, as in GPTQ.
2. The stream is cut into windows of ``seqlen`` tokens that start every ``stride``
   tokens (``stride = seqlen`` by default, so windows do not overlap). Tokens after
   the last full window are dropped, so every window has the same length.
3. Within each window, token ``p`` is predicted from tokens ``0..p-1`` of that window.
   The first window scores positions ``1..seqlen-1``. A later window scores only its
   last ``stride`` positions (the standard sliding-window protocol of the
   transformers docs), which were not scored by an earlier window. With
   ``stride = seqlen`` every window scores ``seqlen - 1`` positions, as in GPTQ.
4. The perplexity is ``exp`` of the mean negative log-likelihood over all scored
   tokens, computed in float32 from the logits.

Sources may cap the number of windows: the ``c4`` source evaluates 256 windows as in
SparseGPT and Wanda.

The numbers are token perplexities, so they depend on the tokenizer. They are not
comparable with the ``wikitext`` task of lm-evaluation-harness 0.4, which reports word
perplexity over detokenized documents evaluated one by one.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from superweight.text_sources import TextSource, load_text

log = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048

# Log-softmax is computed on at most this many logits at a time (64 MiB in float32),
# so memory stays bounded for large vocabularies and low-precision models.
_LOSS_CHUNK_ELEMENTS = 1 << 24

_TOKEN_CACHE_SIZE = 8
_token_cache: collections.OrderedDict[tuple[str, str], torch.Tensor] = collections.OrderedDict()

# Config attributes that hold the maximum context length, by model family.
_CONTEXT_LENGTH_ATTRIBUTES = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on one text source, with the settings that produced it."""

    perplexity: float
    nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    source: str
    source_sha256: str
    num_tokens: int
    """Number of scored (predicted) tokens."""
    num_windows: int
    seqlen: int
    stride: int
    """Step between window starts; equal to ``seqlen`` for non-overlapping windows."""
    stream_tokens: int
    """Length of the whole token stream, including tokens not evaluated."""

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)


# -- tokenization ---------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Return a sha256 that changes whenever the tokenizer would split text differently."""
    digest = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # A fast tokenizer's JSON covers normalizer, pre-tokenizer, model and the
        # post-processor that adds special tokens.
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
        for attribute in ("add_bos_token", "add_eos_token"):
            digest.update(repr(getattr(tokenizer, attribute, None)).encode())
    return digest.hexdigest()


def _token_stream(tokenizer: Any, source: TextSource) -> torch.Tensor:
    """Return the cached 1-D int64 token stream of a source. Callers must not modify it."""
    key = (tokenizer_fingerprint(tokenizer), source.sha256)
    cached = _token_cache.get(key)
    if cached is not None:
        _token_cache.move_to_end(key)
        return cached

    # verbose=False silences the warning about sequences longer than model_max_length,
    # which does not apply because the stream is cut into windows.
    encoding = tokenizer(source.text, add_special_tokens=True, return_attention_mask=False, verbose=False)
    tokens = torch.tensor(encoding["input_ids"], dtype=torch.long)
    log.debug("tokenized %s into %d tokens", source.name, tokens.numel())

    _token_cache[key] = tokens
    if len(_token_cache) > _TOKEN_CACHE_SIZE:
        _token_cache.popitem(last=False)
    return tokens


def tokenize_source(tokenizer: Any, source: str | TextSource) -> torch.Tensor:
    """Tokenize a text source into one 1-D int64 token stream, as the evaluator does.

    Results are kept in a small in-process cache keyed by the tokenizer's fingerprint
    and the text's sha256. The returned tensor is a copy.
    """
    if isinstance(source, str):
        source = load_text(source)
    return _token_stream(tokenizer, source).clone()


# -- windows --------------------------------------------------------------------------


def sliding_windows(
    tokens: torch.Tensor,
    seqlen: int,
    stride: int | None = None,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Cut a 1-D token stream into full windows of ``seqlen`` tokens, ``stride`` apart.

    Returns a ``(num_windows, seqlen)`` view of ``tokens``. Tokens after the last full
    window are dropped.

    >>> sliding_windows(torch.arange(10), seqlen=4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> sliding_windows(torch.arange(10), seqlen=4, stride=3).tolist()
    [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    """
    stride = seqlen if stride is None else stride
    _check_window_settings(seqlen, stride, max_windows)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    if tokens.numel() < seqlen:
        raise ValueError(
            f"the text has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            f"pass seqlen <= {tokens.numel()} or use a longer text"
        )
    windows = tokens.unfold(0, seqlen, stride)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows


def scored_positions(window_index: int, seqlen: int, stride: int) -> range:
    """Return the positions of a window whose tokens are scored.

    >>> scored_positions(0, seqlen=4, stride=2)
    range(1, 4)
    >>> scored_positions(1, seqlen=4, stride=2)
    range(2, 4)
    >>> scored_positions(1, seqlen=4, stride=4)
    range(1, 4)
    """
    if window_index == 0:
        return range(1, seqlen)
    return range(max(1, seqlen - stride), seqlen)


def _check_window_settings(seqlen: int, stride: int, max_windows: int | None) -> None:
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if not isinstance(stride, int) or not 1 <= stride <= seqlen:
        raise ValueError(f"stride must be an integer in [1, seqlen={seqlen}], got {stride!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")


def context_length(model: Any) -> int | None:
    """Return the maximum sequence length of a transformers model, or None if unknown."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attribute in _CONTEXT_LENGTH_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- evaluation -----------------------------------------------------------------------


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    source: str | TextSource,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Compute the perplexity of a causal LM on a text source.

    ``source`` is a name or path for :func:`~superweight.text_sources.load_text`, or a
    loaded :class:`~superweight.text_sources.TextSource`. ``seqlen`` is capped at the
    model's context length. ``stride`` (default ``seqlen``) is the step between window
    starts; with ``stride < seqlen`` windows overlap and each window after the first
    scores only its last ``stride`` tokens. ``max_windows`` evaluates only the first
    windows, and a source's own cap (256 for ``c4``) applies as well. Inputs go to
    ``device``, by default the device of the model's input embeddings. The model is
    run in eval mode and its previous mode is restored afterwards.
    """
    if isinstance(source, str):
        source = load_text(source)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    stride = seqlen if stride is None else stride
    _check_window_settings(seqlen, stride, max_windows)

    model_context = context_length(model)
    if model_context is not None and seqlen > model_context:
        log.warning(
            "seqlen %d exceeds the model's context length %d; using seqlen %d",
            seqlen, model_context, model_context,
        )
        stride = min(stride, model_context)
        seqlen = model_context
    if source.max_windows is not None and (max_windows is None or max_windows > source.max_windows):
        log.info("source %s evaluates at most %d windows", source.name, source.max_windows)
        max_windows = source.max_windows

    tokens = _token_stream(tokenizer, source)
    windows = sliding_windows(tokens, seqlen, stride, max_windows)
    num_windows = windows.shape[0]
    if device is None:
        device = model.get_input_embeddings().weight.device
    log.info(
        "evaluating perplexity on %s: %d windows of %d tokens, stride %d, from a stream of %d tokens",
        source.name, num_windows, seqlen, stride, tokens.numel(),
    )

    was_training = model.training
    model.eval()
    try:
        nll_sum, num_scored = _sum_window_nll(model, windows, stride, batch_size, device, progress, source.name)
    finally:
        if was_training:
            model.train()

    nll = nll_sum / num_scored
    result = PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        source=source.name,
        source_sha256=source.sha256,
        num_tokens=num_scored,
        num_windows=num_windows,
        seqlen=seqlen,
        stride=stride,
        stream_tokens=tokens.numel(),
    )
    log.info("perplexity on %s: %.4f (%d tokens)", source.name, result.perplexity, num_scored)
    return result


@torch.inference_mode()
def _sum_window_nll(
    model: Any,
    windows: torch.Tensor,
    stride: int,
    batch_size: int,
    device: str | torch.device,
    progress: bool,
    label: str,
) -> tuple[float, int]:
    """Return the summed NLL (nats) and count of the scored tokens of all windows."""
    num_windows, seqlen = windows.shape
    nll_sum = 0.0
    num_scored = 0

    with tqdm(total=num_windows, desc=f"perplexity {label}", unit="window", disable=not progress) as bar:
        for batch_start in range(0, num_windows, batch_size):
            input_ids = windows[batch_start : batch_start + batch_size].to(device)
            logits = model(input_ids=input_ids, use_cache=False).logits
            chunk_rows = max(1, _LOSS_CHUNK_ELEMENTS // logits.shape[-1])
            # With a device_map the logits may live on another device than the inputs.
            targets = input_ids.to(logits.device)
            batch_nll = torch.zeros((), dtype=torch.float64, device=logits.device)

            for row in range(input_ids.shape[0]):
                positions = scored_positions(batch_start + row, seqlen, stride)
                # Logits at position p - 1 predict the token at position p. Slicing one
                # row keeps the slice contiguous, so only the float32 cast can copy.
                row_logits = logits[row, positions.start - 1 : positions.stop - 1]
                row_targets = targets[row, positions.start : positions.stop]
                for chunk_start in range(0, len(positions), chunk_rows):
                    chunk = slice(chunk_start, chunk_start + chunk_rows)
                    loss = F.cross_entropy(row_logits[chunk].float(), row_targets[chunk], reduction="sum")
                    batch_nll += loss.double()
                num_scored += len(positions)

            nll_sum += batch_nll.item()
            del logits
            bar.update(input_ids.shape[0])

    return nll_sum, num_scored
