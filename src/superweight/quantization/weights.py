"""Block-wise round-to-nearest fake quantization of a model's linear weights.

:func:`quantize_tensor` quantizes and dequantizes one tensor and returns a new one;
:func:`quantize_weights_` does it in place for every linear weight of a model and then
writes the super weights back; :func:`quantized_weights` is the temporary form, which
restores the original weights bit-exactly on exit. The formulas are in
:mod:`superweight.quantization.blockwise`.

Which weights: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output embeddings
(``lm_head``) and any projection that shares its weight with the input embeddings.
Embeddings and norms are not linear layers and are never touched. A ``filter_fn`` on
module names replaces this rule.

Blocks are taken over the weight in ``nn.Linear`` layout ``[out, in]``, flattened row
by row, for every architecture: GPT-2's ``Conv1D`` weight is transposed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from superweight.adapters import get_adapter
from superweight.coordinates import SuperWeight, check_in_range
from superweight.quantization import blockwise
from superweight.quantization.backup import TensorBackup
from superweight.quantization.config import WeightQuantConfig

log = logging.getLogger(__name__)

ModuleFilter = Callable[[str], bool]


# -- one tensor --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorQuantStats:
    """Block layout and clipped count of one quantized tensor."""

    numel: int
    num_blocks: int
    block_size: int
    """Elements of a full block."""
    remainder: int
    """Elements of the final, shorter block; 0 when the blocks divide the tensor."""
    clipped: int

    def to_dict(self) -> dict[str, int]:
        """Return the fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)


def block_views(tensor: torch.Tensor, block_size: int | str) -> list[torch.Tensor]:
    """Return 2-D views of a contiguous tensor whose rows are its quantization blocks.

    ``"tensor"`` gives one row, ``"channel"`` one row per index of dim 0, and an integer
    B gives ``numel // B`` rows of B elements plus, when B does not divide ``numel``,
    one row with the remaining elements.

    >>> [tuple(v.shape) for v in block_views(torch.zeros(3, 5), 4)]
    [(3, 4), (1, 3)]
    """
    if not tensor.is_contiguous():
        raise ValueError("block_views needs a contiguous tensor; call .contiguous() first")
    flat = tensor.view(-1)
    numel = flat.numel()
    if numel == 0:
        return []
    if block_size == "tensor":
        return [flat.view(1, numel)]
    if block_size == "channel":
        rows = tensor.shape[0] if tensor.dim() >= 2 else 1
        return [flat.view(rows, -1)]
    full = numel // block_size
    views = []
    if full:
        views.append(flat[: full * block_size].view(full, block_size))
    if full * block_size < numel:
        views.append(flat[full * block_size :].view(1, -1))
    return views


def _quantize_into(
    src: torch.Tensor,
    out: torch.Tensor,
    config: WeightQuantConfig,
    codes: torch.Tensor | None = None,
    pool: blockwise.WorkerPool | None = None,
) -> tuple[TensorQuantStats, list[blockwise.BlockResult]]:
    """Quantize contiguous ``src`` into ``out`` (which may be ``src``); see ``quantize_rows``."""
    sources = block_views(src, config.block_size)
    targets = block_views(out, config.block_size)
    code_views = block_views(codes, config.block_size) if codes is not None else [None] * len(sources)
    numel = src.numel()

    pool = pool or blockwise.WorkerPool(1, src.device)

    tensor_threshold = None
    if config.clip == "tensor_top" and numel:
        tensor_threshold = blockwise.tensor_top_threshold(src.view(1, -1), config.clip_value, pool.workspace())

    results = [
        blockwise.quantize_rows(
            source, target, config, tensor_threshold=tensor_threshold, codes=code_view, pool=pool
        )
        for source, target, code_view in zip(sources, targets, code_views)
    ]
    if config.block_size == "tensor":
        block_size = numel
    elif config.block_size == "channel":
        block_size = sources[0].shape[1] if sources else 0
    else:
        block_size = config.block_size
    remainder = numel % block_size if isinstance(config.block_size, int) and block_size else 0
    stats = TensorQuantStats(
        numel=numel,
        num_blocks=sum(view.shape[0] for view in sources),
        block_size=block_size,
        remainder=remainder,
        clipped=int(sum(int(result.clipped.sum()) for result in results)),
    )
    return stats, results


@torch.no_grad()
def quantize_tensor(weight: torch.Tensor, config: WeightQuantConfig) -> tuple[torch.Tensor, TensorQuantStats]:
    """Quantize and dequantize a tensor block by block; return a new tensor and its stats.

    The result has the input's shape, dtype and device. Arithmetic is float32, and the
    result is rounded to the input dtype at the end. Blocks follow the flattened tensor
    (use the ``nn.Linear`` layout ``[out, in]`` for weights). Super weights are not
    handled here; see :func:`quantize_weights_`.

    >>> w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    >>> quantize_tensor(w, WeightQuantConfig(bits=2, block_size=4))[0]
    tensor([[0., 1., 2., 3.]])
    """
    if not weight.is_floating_point():
        raise ValueError(f"quantize_tensor needs a floating-point tensor, not {weight.dtype}")
    src = weight.detach().contiguous()
    out = torch.empty_like(src)
    with blockwise.single_threaded() as threads, blockwise.WorkerPool(threads, src.device) as pool:
        stats, _ = _quantize_into(src, out, config, pool=pool)
    return out, stats


# -- a model -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatrixReport:
    """Quantization result of one weight matrix."""

    name: str
    """Module name, e.g. ``model.layers.2.mlp.down_proj``."""
    shape: tuple[int, ...]
    """Shape in ``nn.Linear`` layout ``[out, in]``."""
    numel: int
    num_blocks: int
    clipped: int
    """Elements whose |w| exceeded the clipping threshold of their block."""
    restored: int
    """Super weights written back after quantization."""

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serializable dict."""
        data = dataclasses.asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """The weight matrices a quantization run changed, with its settings."""

    config: WeightQuantConfig
    matrices: tuple[MatrixReport, ...]
    super_weights: tuple[SuperWeight, ...]
    """Super weights passed in; they are restored only with ``config.keep_super_weights``."""
    seconds: float
    """Wall time of the quantization."""

    @property
    def numel(self) -> int:
        return sum(matrix.numel for matrix in self.matrices)

    @property
    def clipped(self) -> int:
        return sum(matrix.clipped for matrix in self.matrices)

    @property
    def restored(self) -> int:
        return sum(matrix.restored for matrix in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict: config, totals, super weights and matrices."""
        return {
            "config": self.config.to_dict(),
            "num_matrices": len(self.matrices),
            "numel": self.numel,
            "clipped": self.clipped,
            "restored": self.restored,
            "seconds": self.seconds,
            "super_weights": [sw.to_dict() for sw in self.super_weights],
            "matrices": [matrix.to_dict() for matrix in self.matrices],
        }


def is_linear(module: nn.Module) -> bool:
    """Return whether ``module`` is an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def default_weight_filter(model: nn.Module) -> ModuleFilter:
    """Return the default rule: every linear layer except output and tied embeddings."""
    excluded: set[int] = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        excluded.add(id(output))
    input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    input_weight = getattr(input_embeddings, "weight", None)
    names = {
        name
        for name, module in model.named_modules()
        if id(module) in excluded or (input_weight is not None and getattr(module, "weight", None) is input_weight)
    }
    return lambda name: name not in names


def linear_modules(model: nn.Module, filter_fn: ModuleFilter | None = None) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` of the linear layers selected for quantization, in model order.

    A weight shared by several modules is listed once, under its first name.
    """
    keep = filter_fn if filter_fn is not None else default_weight_filter(model)
    selected, seen = [], set()
    for name, module in model.named_modules():
        if not is_linear(module) or not keep(name):
            continue
        weight = module.weight
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        selected.append((name, module))
    return selected


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _is_conv1d(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def _super_weight_entries(
    model: nn.Module, super_weights: Iterable[SuperWeight]
) -> dict[int, list[tuple[SuperWeight, tuple[int, int]]]]:
    """Map ``id(weight)`` to its super weights and their indices in the stored tensor."""
    super_weights = sorted(set(super_weights))
    if not super_weights:
        return {}
    adapter = get_adapter(model)
    check_in_range(super_weights, model, adapter)
    entries: dict[int, list[tuple[SuperWeight, tuple[int, int]]]] = {}
    for sw in super_weights:
        weight = adapter.down_proj_module(model, sw.layer).weight
        entries.setdefault(id(weight), []).append((sw, adapter.weight_index(sw.row, sw.col)))
    return entries


@torch.no_grad()
def quantize_matrix_(
    weight: torch.Tensor,
    config: WeightQuantConfig,
    *,
    conv1d: bool = False,
    codes: torch.Tensor | None = None,
    pool: blockwise.WorkerPool | None = None,
) -> tuple[TensorQuantStats, list[blockwise.BlockResult]]:
    """Quantize a stored linear weight in place, with blocks in ``nn.Linear`` layout.

    ``conv1d`` marks a GPT-2 ``Conv1D`` weight (stored ``[in, out]``), which is
    transposed into a temporary copy first. ``codes`` (uint8, ``[out, in]``) receives
    the integer levels. Returns the stats and the per-block parameters of each 2-D
    block view (see :func:`block_views`).
    """
    if conv1d:
        linear = weight.t().contiguous()
        result = _quantize_into(linear, linear, config, codes, pool)
        weight.copy_(linear.t())
        return result
    if weight.is_contiguous():
        return _quantize_into(weight, weight, config, codes, pool)
    work = weight.contiguous()
    result = _quantize_into(work, work, config, codes, pool)
    weight.copy_(work)
    return result


@torch.no_grad()
def quantize_weights_(
    model: nn.Module,
    config: WeightQuantConfig,
    super_weights: Iterable[SuperWeight] = (),
    filter_fn: ModuleFilter | None = None,
    *,
    backup: TensorBackup | None = None,
) -> QuantizationReport:
    """Fake-quantize every selected linear weight of ``model`` in place.

    With ``config.keep_super_weights`` the super weights get their original values
    back afterwards, multiplied by ``config.restore_factor`` (a factor of 1 restores
    them bit-exactly). ``filter_fn(name)`` replaces the default module selection of
    :func:`default_weight_filter`. ``backup``, when given, saves each weight before it
    changes, so :meth:`TensorBackup.restore` undoes the call.
    """
    super_weights = tuple(sorted(set(super_weights)))
    entries = _super_weight_entries(model, super_weights)
    if config.keep_super_weights and not super_weights:
        log.warning("keep_super_weights is set but no super weights were given; nothing will be restored")

    started = time.perf_counter()
    matrices = []
    placed = set()
    with blockwise.single_threaded() as threads, blockwise.WorkerPool(threads, _model_device(model)) as pool:
        for name, module in linear_modules(model, filter_fn):
            weight = module.weight
            if backup is not None:
                backup.save(weight)
            originals = [(index, weight.data[index].clone()) for _, index in entries.get(id(weight), [])]
            conv1d = _is_conv1d(module)
            stats, _ = quantize_matrix_(weight.data, config, conv1d=conv1d, pool=pool)

            restored = 0
            if config.keep_super_weights:
                for index, value in originals:
                    weight.data[index] = value if config.restore_factor == 1 else value * config.restore_factor
                    restored += 1
            placed.add(id(weight))
            shape = tuple(weight.shape[::-1]) if conv1d else tuple(weight.shape)
            matrices.append(MatrixReport(name, shape, stats.numel, stats.num_blocks, stats.clipped, restored))
            log.debug("quantized %s %s: %d clipped, %d restored", name, shape, stats.clipped, restored)

    missing = [sw for key, items in entries.items() if key not in placed for sw, _ in items]
    if missing:
        log.warning(
            "super weights %s are in matrices that were not quantized (filtered out); they keep their values",
            ", ".join(sw.to_spec() for sw in missing),
        )
    seconds = time.perf_counter() - started
    report = QuantizationReport(config, tuple(matrices), super_weights, seconds)
    log.info(
        "quantized %d matrices (%s) in %.2f s: %d clipped, %d super weights restored",
        len(matrices), config.describe(), seconds, report.clipped, report.restored,
    )
    return report


@contextlib.contextmanager
def quantized_weights(
    model: nn.Module,
    config: WeightQuantConfig,
    super_weights: Iterable[SuperWeight] = (),
    filter_fn: ModuleFilter | None = None,
) -> Iterator[QuantizationReport]:
    """Quantize the weights inside a ``with`` block and restore them exactly on exit.

    The originals are kept as one CPU copy of the quantized weights; they come back
    also when the block, or the quantization itself, raises.

    >>> # with quantized_weights(model, WeightQuantConfig(bits=4)) as report:
    >>> #     evaluate_perplexity(model, tokenizer, "wiki-sample")
    """
    backup = TensorBackup()
    try:
        yield quantize_weights_(model, config, super_weights, filter_fn, backup=backup)
    finally:
        backup.restore()
