"""Reversible edits of super weights.

Each edit has an in-place form ending in ``_`` that returns what is needed to undo it,
and a context-manager form that restores the original tensors bit-exactly on exit, also
when the block raises.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from superweight.adapters import Adapter, get_adapter
from superweight.coordinates import SuperWeight, check_in_range

log = logging.getLogger(__name__)

# (parameter, index into the stored tensor, original value as a 0-d tensor)
WeightBackup = list[tuple[torch.Tensor, tuple[int, int], torch.Tensor]]


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
        weight[index] = original


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
