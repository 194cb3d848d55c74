"""Calibration text for quantization, and the search for the z-score clipping threshold.

:func:`search_zscore` picks z for ``clip="zscore"`` by the reconstruction error of the
linear layers' outputs on calibration text, as the super weight paper chose it. The
error of one linear layer with float input ``X`` (``[tokens, in]``), weight ``W`` and
quantized weight ``Q`` is ``||X W^T - X Q^T||_F^2``. The search minimizes its sum over
all quantized layers. Every layer is scored on the inputs of the unquantized model,
captured in one forward pass, so no layer's score depends on how the others were
quantized.

The error is computed from the Gram matrix ``G = X^T X``:
``||X D^T||^2 = sum_r d_r G d_r^T`` over the rows ``d_r`` of ``D = W - Q``. Rows whose
quantized values equal those of plain RTN are scored once; for each z only the other
rows (those in blocks where clipping changed the block's range) are scored again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from superweight.coordinates import SuperWeight
from superweight.quantization import blockwise
from superweight.quantization.config import WeightQuantConfig
from superweight.quantization.weights import ModuleFilter, _quantize_into, _super_weight_entries, linear_modules

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SOURCE = "wiki-sample"
DEFAULT_CALIBRATION_TOKENS = 2048
DEFAULT_CALIBRATION_SEQLEN = 512
DEFAULT_Z_CANDIDATES: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 16.0, 24.0)


def calibration_batch(
    tokenizer: Any,
    source: str = DEFAULT_CALIBRATION_SOURCE,
    num_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    seqlen: int = DEFAULT_CALIBRATION_SEQLEN,
) -> torch.Tensor:
    """Return the first tokens of a text source as ``[num_tokens // seqlen, seqlen]`` ids.

    ``seqlen`` is capped at ``num_tokens``; ``num_tokens // seqlen`` full windows are
    used. The text is tokenized as by the perplexity evaluator
    (:func:`superweight.perplexity.tokenize_source`).
    """
    from superweight.perplexity import tokenize_source

    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"calibration num_tokens={num_tokens!r} is invalid; use a positive integer, e.g. 2048")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"calibration seqlen={seqlen!r} is invalid; use a positive integer, e.g. 512")
    seqlen = min(seqlen, num_tokens)
    windows = num_tokens // seqlen
    tokens = tokenize_source(tokenizer, source)
    if tokens.numel() < windows * seqlen:
        raise ValueError(
            f"calibration source {source!r} has {tokens.numel()} tokens, fewer than the {windows * seqlen} "
            "requested; lower num_tokens or pass a longer source"
        )
    return tokens[: windows * seqlen].view(windows, seqlen)


def resolve_calibration(
    tokenizer: Any,
    calibration_ids: torch.Tensor | None,
    source: str,
    num_tokens: int,
    seqlen: int,
) -> tuple[torch.Tensor, str]:
    """Return the calibration batch ``[windows, seqlen]`` and a name for its source.

    Explicit ``calibration_ids`` (1-D or 2-D token ids) take precedence over reading
    ``num_tokens`` tokens of ``source`` with ``tokenizer``.
    """
    if calibration_ids is not None:
        if calibration_ids.dim() not in (1, 2) or calibration_ids.numel() == 0 or calibration_ids.is_floating_point():
            raise ValueError(
                f"calibration_ids must be a non-empty 1-D or 2-D tensor of token ids, not shape "
                f"{tuple(calibration_ids.shape)} {calibration_ids.dtype}"
            )
        batch = calibration_ids.long()
        return (batch[None] if batch.dim() == 1 else batch), "calibration_ids"
    if tokenizer is None:
        raise ValueError("calibration needs text: pass the model's tokenizer or calibration_ids")
    return calibration_batch(tokenizer, source, num_tokens, seqlen), source


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter (CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def run_calibration(model: nn.Module, batch: torch.Tensor, batch_size: int | None = None) -> None:
    """Run the model on calibration ids (hooks collect what they need), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)
        step = batch.shape[0] if batch_size is None else max(1, batch_size)
        for start in range(0, batch.shape[0], step):
            model(input_ids=batch[start : start + step].to(device), use_cache=False)
    finally:
        model.train(was_training)


# -- z-score search ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZScoreSearchResult:
    """The z chosen for z-score clipping, with the error of every candidate."""

    best_z: float
    errors: dict[float, float]
    """Summed squared output error of all quantized linear layers, per candidate z."""
    rtn_error: float
    """The same error without clipping (plain RTN), for comparison."""
    num_tokens: int
    source: str
    config: WeightQuantConfig
    """The configuration searched, with ``clip_value`` set to ``best_z``."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict."""
        return {
            "best_z": self.best_z,
            "errors": {f"{z:g}": error for z, error in self.errors.items()},
            "rtn_error": self.rtn_error,
            "num_tokens": self.num_tokens,
            "source": self.source,
            "config": self.config.to_dict(),
        }


class _ErrorAccumulator:
    """Forward pre-hooks that add each linear layer's output error per candidate."""

    def __init__(
        self,
        candidates: Sequence[float],
        config: WeightQuantConfig,
        super_weights: dict[int, list],
        pool: blockwise.WorkerPool,
    ) -> None:
        self.candidates = list(candidates)
        self.rtn_config = dataclasses.replace(config, clip="none", clip_value=None)
        self.configs = [dataclasses.replace(config, clip="zscore", clip_value=z) for z in self.candidates]
        self.super_weights = super_weights
        self.keep = config.keep_super_weights
        self.factor = config.restore_factor
        self.pool = pool
        self.errors = [0.0] * len(self.candidates)
        self.rtn_error = 0.0
        self._last_input: torch.Tensor | None = None
        self._last_gram: torch.Tensor | None = None

    def _gram(self, inputs: torch.Tensor) -> torch.Tensor:
        # q/k/v (and gate/up) receive the same tensor object: compute its Gram matrix once.
        if inputs is not self._last_input:
            flat = inputs.reshape(-1, inputs.shape[-1]).float()
            self._last_input = inputs
            self._last_gram = flat.T @ flat
        return self._last_gram

    def _quantized(self, weight: torch.Tensor, stored: torch.Tensor, config: WeightQuantConfig, conv1d: bool):
        quantized = weight.clone()
        with blockwise.single_threaded():
            _quantize_into(quantized, quantized, config, pool=self.pool)
        if self.keep:
            for _, index in self.super_weights.get(id(stored), []):
                row, col = (index[1], index[0]) if conv1d else index
                quantized[row, col] = weight[row, col] * self.factor
        return quantized

    def hook(self, module: nn.Module, args: tuple) -> None:
        gram = self._gram(args[0])
        stored = module.weight
        conv1d = not isinstance(module, nn.Linear)
        weight = (stored.t() if conv1d else stored).detach().float().contiguous()

        rtn = self._quantized(weight, stored, self.rtn_config, conv1d)
        difference = weight - rtn
        row_errors = ((difference @ gram) * difference).sum(1).double()
        self.rtn_error += float(row_errors.sum())
        for position, config in enumerate(self.configs):
            quantized = self._quantized(weight, stored, config, conv1d)
            changed = (quantized != rtn).any(1).nonzero().flatten()
            error = float(row_errors.sum())
            if changed.numel():
                rows = weight[changed] - quantized[changed]
                error += float(((rows @ gram) * rows).sum(1).double().sum() - row_errors[changed].sum())
            self.errors[position] += error


def search_zscore(
    model: nn.Module,
    tokenizer: Any,
    config: WeightQuantConfig,
    candidates: Iterable[float] = DEFAULT_Z_CANDIDATES,
    *,
    super_weights: Iterable[SuperWeight] = (),
    filter_fn: ModuleFilter | None = None,
    source: str = DEFAULT_CALIBRATION_SOURCE,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    seqlen: int = DEFAULT_CALIBRATION_SEQLEN,
    calibration_ids: torch.Tensor | None = None,
) -> ZScoreSearchResult:
    """Choose z for z-score clipping by the layers' output reconstruction error.

    ``config`` gives every other setting (bits, format, block size, super weight
    restoration); its clipping fields are ignored. Calibration uses the first
    ``calibration_tokens`` tokens of ``source``, or ``calibration_ids`` when given
    (``tokenizer`` may then be ``None``). The model is not changed. Ties go to the
    larger z, which clips less.
    """
    candidates = sorted({float(z) for z in candidates})
    if not candidates:
        raise ValueError("search_zscore needs at least one candidate z, e.g. candidates=(6, 9, 12)")
    for z in candidates:
        if not math.isfinite(z) or z <= 0:
            raise ValueError(f"z-score candidate {z!r} is invalid; use finite numbers > 0")
    batch, source = resolve_calibration(tokenizer, calibration_ids, source, calibration_tokens, seqlen)
    entries = _super_weight_entries(model, super_weights)

    handles = []
    with blockwise.WorkerPool(torch.get_num_threads(), model_device(model)) as pool:
        accumulator = _ErrorAccumulator(candidates, config, entries, pool)
        try:
            for _, module in linear_modules(model, filter_fn):
                handles.append(module.register_forward_pre_hook(accumulator.hook))
            run_calibration(model, batch)
        finally:
            for handle in handles:
                handle.remove()

    errors = dict(zip(candidates, accumulator.errors))
    best = min(reversed(candidates), key=lambda z: errors[z])
    log.info(
        "z-score search on %d tokens of %s: best z = %g (error %.4g; plain RTN %.4g)",
        batch.numel(), source, best, errors[best], accumulator.rtn_error,
    )
    return ZScoreSearchResult(
        best_z=best,
        errors=errors,
        rtn_error=accumulator.rtn_error,
        num_tokens=batch.numel(),
        source=source,
        config=dataclasses.replace(config, clip="zscore", clip_value=best),
    )
