"""Reversible edits of super weights.

Each edit has an in-place form ending in ``_`` that returns what is needed to undo it,
and a context-manager form that restores the original tensors bit-exactly on exit, also
when the block raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from superweight.adapters import Adapter, get_adapter
from superweight.coordinates import SuperWeight, check_in_range

log = logging.getLogger(__name__)

# (parameter, index into the stored tensor or a tensor of flat indices, original values)
WeightBackup = list[tuple[torch.Tensor, tuple[int, int] | torch.Tensor, torch.Tensor]]


def _check_factor(factor: float) -> None:
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor < 0:
        raise ValueError(f"scaling factor {factor!r} is invalid; use a finite number >= 0 (0 prunes)")


@torch.no_grad()
def scale_super_weights_(
    model: nn.Module, super_weights: Iterable[SuperWeight], factor: float, adapter: Adapter | None = None
) -> WeightBackup:
    """Multiply each super weight by ``factor`` in place (0 prunes it).

    Returns a backup for :func:`restore_weights_`. A coordinate listed twice is scaled once.
    """
    _check_factor(factor)
    adapter = adapter or get_adapter(model)
    super_weights = sorted(set(super_weights))
    check_in_range(super_weights, model, adapter)
    backup: WeightBackup = []
    for sw in super_weights:
        weight = adapter.down_proj_module(model, sw.layer).weight
        index = adapter.weight_index(sw.row, sw.col)
        backup.append((weight, index, weight[index].clone()))
        weight[index] = weight[index] * factor
    return backup


@torch.no_grad()
def restore_weights_(backup: WeightBackup) -> None:
    """Write back the values saved by an in-place edit, last edit first."""
    for weight, index, original in reversed(backup):
        if isinstance(index, torch.Tensor):  # flat indices
            weight.view(-1)[index] = original
        else:
            weight[index] = original


def _flat_index(index: tuple[int, int], cols: int) -> int:
    return index[0] * cols + index[1]


@contextlib.contextmanager
def scaled_super_weights(
    model: nn.Module, super_weights: Iterable[SuperWeight], factor: float, adapter: Adapter | None = None
) -> Iterator[nn.Module]:
    """Scale super weights inside a ``with`` block; the original values come back on exit."""
    backup = scale_super_weights_(model, super_weights, factor, adapter)
    try:
        yield model
    finally:
        restore_weights_(backup)


def pruned_super_weights(model: nn.Module, super_weights: Iterable[SuperWeight], adapter: Adapter | None = None):
    """Zero super weights inside a ``with`` block."""
    return scaled_super_weights(model, super_weights, 0.0, adapter)


# -- restoring the super activation -------------------------------------------------


@contextlib.contextmanager
def restored_super_activations(
    model: nn.Module,
    super_weights: Iterable[SuperWeight],
    *,
    threshold: float = 0.5,
    adapter: Adapter | None = None,
) -> Iterator[nn.Module]:
    """Prune super weights but write the original super activation back.

    On every forward pass inside the block the model first runs unedited, with hooks
    that record each super weight's down-projection output in channel ``row``. The
    super-activation positions are those whose ``|value|`` is at least ``threshold``
    times the sequence's largest ``|value|`` in that channel: for real models, the first
    token and a few delimiter tokens. Every sequence has at least one such position, so
    a sequence without a super activation gets its own largest value written back, which
    is the unedited model's value there. Then the super weights are zeroed and the same
    forward runs again with hooks that overwrite channel ``row`` at those positions
    with the recorded values. Positions are found per sequence, so a batch
    with padding restores each sequence at its own positions; masked positions are
    never selected. The model's weights are restored on exit.

    The cost is one extra forward pass per call, as the original activation depends on
    the input and cannot be cached across inputs.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r} is invalid; use a fraction in (0, 1]")
    adapter = adapter or get_adapter(model)
    super_weights = sorted(set(super_weights))
    check_in_range(super_weights, model, adapter)
    rows_by_layer: dict[int, list[int]] = {}
    for sw in super_weights:
        rows_by_layer.setdefault(sw.layer, []).append(sw.row)

    original_forward = model.forward
    state = {"mode": "record", "captured": {}, "mask": None}

    def make_hook(layer: int):
        rows = sorted(set(rows_by_layer[layer]))

        def hook(module, args, output):
            shape = output.shape
            flat = output.reshape(-1, shape[-1]) if output.dim() == 2 else output
            if state["mode"] == "record":
                state["captured"][layer] = flat[..., rows].detach().clone()
                return None
            recorded = state["captured"][layer]
            positions = state["positions"][layer]
            patched = flat.clone()
            patched[..., rows] = torch.where(positions, recorded, patched[..., rows])
            return patched.reshape(shape)

        return hook

    def forward(*args, **kwargs):
        attention_mask = kwargs.get("attention_mask")
        state["mode"] = "record"
        state["captured"] = {}
        with torch.no_grad():
            original_forward(*args, **kwargs)
        state["positions"] = {
            layer: _super_activation_positions(values, attention_mask, threshold)
            for layer, values in state["captured"].items()
        }
        state["mode"] = "restore"
        with scaled_super_weights(model, super_weights, 0.0, adapter):
            return original_forward(*args, **kwargs)

    handles = [
        adapter.down_proj_module(model, layer).register_forward_hook(make_hook(layer)) for layer in rows_by_layer
    ]
    # An instance-level forward may already exist (accelerate's device-map hooks, or a
    # nested restore); it is put back on exit instead of falling back to the class's.
    previous_forward = vars(model).get("forward")
    model.forward = forward
    try:
        yield model
    finally:
        if previous_forward is None:
            del model.forward
        else:
            model.forward = previous_forward
        for handle in handles:
            handle.remove()


def _super_activation_positions(values: torch.Tensor, attention_mask: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """Return a bool mask, shaped like ``values`` [..., tokens, rows], of super-activation positions."""
    magnitude = values.abs()
    if attention_mask is not None and magnitude.dim() == 3:
        magnitude = magnitude * attention_mask.to(magnitude.dtype).unsqueeze(-1)
    peak = magnitude.amax(dim=-2, keepdim=True)  # per sequence and row
    return (magnitude >= threshold * peak) & (peak > 0)


# -- pruning weight outliers --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutlierPruneReport:
    """How many weights were zeroed in each matrix."""

    fraction: float
    zeroed: dict[str, int]
    kept_super_weights: tuple[SuperWeight, ...]

    @property
    def total(self) -> int:
        return sum(self.zeroed.values())

    def to_dict(self) -> dict:
        return {
            "fraction": self.fraction, "total_zeroed": self.total, "zeroed_per_matrix": dict(self.zeroed),
            "kept_super_weights": [sw.to_dict() for sw in self.kept_super_weights],
        }


def select_linear_modules(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    kinds: Iterable[str] | None = None,
    adapter: Adapter | None = None,
) -> dict[str, nn.Module]:
    """Return the linear projections (attention and MLP) inside the chosen decoder layers.

    ``kinds`` filters by the module's own name, e.g. ``{"down_proj"}`` or ``{"q_proj",
    "k_proj"}``; ``None`` or ``{"all"}`` keeps every projection. Embeddings, norms and
    ``lm_head`` are never inside decoder layers, so they are never selected.
    """
    adapter = adapter or get_adapter(model)
    decoder_layers = adapter.decoder_layers(model)
    layer_ids = range(len(decoder_layers)) if layers is None else list(layers)
    kinds = None if kinds is None or "all" in set(kinds) else set(kinds)
    layer_names = {id(layer): name for name, layer in model.named_modules() if any(layer is l for l in decoder_layers)}
    selected: dict[str, nn.Module] = {}
    available: set[str] = set()
    for index in layer_ids:
        if not 0 <= index < len(decoder_layers):
            raise ValueError(f"layer {index} does not exist; the model has {len(decoder_layers)} layers")
        layer = decoder_layers[index]
        prefix = layer_names[id(layer)]
        for name, module in layer.named_modules():
            if not _is_linear(module):
                continue
            kind = name.rsplit(".", 1)[-1]
            available.add(kind)
            if kinds is None or kind in kinds:
                selected[f"{prefix}.{name}"] = module
    if kinds is not None and not kinds & available:
        raise ValueError(f"module kinds {sorted(kinds)} match nothing; available: {sorted(available)} or 'all'")
    return selected


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@torch.no_grad()
def prune_outliers_(
    model: nn.Module,
    fraction: float,
    *,
    layers: Iterable[int] | None = None,
    kinds: Iterable[str] | None = None,
    keep_super_weights: Iterable[SuperWeight] = (),
    adapter: Adapter | None = None,
) -> tuple[OutlierPruneReport, WeightBackup]:
    """Zero the top ``fraction`` of ``|w|`` in each selected weight matrix, in place.

    Each matrix loses ``ceil(fraction * numel)`` weights (at least one), the largest by
    magnitude, and ``torch.topk`` breaks ties at the threshold. ``keep_super_weights``
    keep their values, which matches the "Prune non-SW" ablation of Yu et al. (2024):
    zero the top 1e-6 of every matrix in all layers, then put the super weights back.
    Returns the report and a backup for :func:`restore_weights_`.
    """
    if not isinstance(fraction, float | int) or not math.isfinite(fraction) or not 0 < fraction < 1:
        raise ValueError(f"outlier fraction {fraction!r} is invalid; use a number in (0, 1), e.g. 1e-6")
    adapter = adapter or get_adapter(model)
    keep = sorted(set(keep_super_weights))
    check_in_range(keep, model, adapter)
    keep_modules = {id(adapter.down_proj_module(model, sw.layer)): sw for sw in keep}
    zeroed: dict[str, int] = {}
    backup: WeightBackup = []
    for name, module in select_linear_modules(model, layers, kinds, adapter).items():
        weight = module.weight
        count = max(1, math.ceil(fraction * weight.numel()))
        flat = weight.view(-1)  # parameters are contiguous; a view writes through
        flat_indices = flat.detach().abs().topk(count).indices
        if id(module) in keep_modules:
            protected = torch.tensor(
                [_flat_index(adapter.weight_index(sw.row, sw.col), weight.shape[1]) for sw in keep
                 if adapter.down_proj_module(model, sw.layer) is module],
                dtype=flat_indices.dtype,
            )
            flat_indices = flat_indices[~torch.isin(flat_indices, protected)]
        backup.append((weight, flat_indices, flat[flat_indices].clone()))
        flat[flat_indices] = 0
        indices = flat_indices
        zeroed[name] = len(indices)
    report = OutlierPruneReport(fraction=float(fraction), zeroed=zeroed, kept_super_weights=tuple(keep))
    log.info("pruned %d outlier weights in %d matrices (fraction %g)", report.total, len(zeroed), fraction)
    return report, backup


@contextlib.contextmanager
def pruned_outliers(model: nn.Module, fraction: float, **kwargs) -> Iterator[OutlierPruneReport]:
    """Zero weight outliers inside a ``with`` block; see :func:`prune_outliers_`."""
    report, backup = prune_outliers_(model, fraction, **kwargs)
    try:
        yield report
    finally:
        restore_weights_(backup)
