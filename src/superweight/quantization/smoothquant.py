"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

For a group of linear layers that read the same input ``X`` (through a norm), input
channel ``j`` gets the smoothing scale

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

where ``max|X_j|`` is taken over calibration tokens and ``max|W_j|`` over column ``j``
of all the group's weights. The norm's weight (and bias) is divided by ``s`` and the
columns of each linear weight are multiplied by it. The unquantized model thus computes
the same function up to float rounding, while the activations entering the layers are
flatter and quantize better. Both maxima are clamped at 1e-5 first, as in the SmoothQuant
reference code.

Supported are architectures with a Llama block (:data:`SMOOTHQUANT_MODEL_TYPES`):
``input_layernorm`` feeding ``self_attn.{q,k,v}_proj``, ``post_attention_layernorm``
feeding ``mlp.{gate,up}_proj``, and RMSNorms that multiply by their weight. With
``smooth_down_proj`` the down-projection is smoothed as well, folding ``1/s`` into the
rows of ``mlp.up_proj`` (the down-projection's input is ``act(gate) * up``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from superweight.adapters import get_adapter
from superweight.quantization.backup import TensorBackup
from superweight.quantization.calibration import (
    DEFAULT_CALIBRATION_SEQLEN,
    DEFAULT_CALIBRATION_SOURCE,
    DEFAULT_CALIBRATION_TOKENS,
    resolve_calibration,
    run_calibration,
)

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.85
"""The migration strength of the super weight paper's SmoothQuant baseline."""

# Gemma adds 1 to its norm weights and OLMo's norms have no weight, so folding does not
# apply to them as written here.
SMOOTHQUANT_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

_MIN_MAGNITUDE = 1e-5


@dataclasses.dataclass(frozen=True)
class SmoothingGroup:
    """Linear layers that read one input, and the module whose output scale absorbs ``1/s``."""

    layer: int
    source: str
    """Name of the norm (or linear layer) whose output rows are divided by ``s``."""
    targets: tuple[str, ...]
    """Names of the linear layers whose weight columns are multiplied by ``s``."""


@dataclasses.dataclass(frozen=True)
class SmoothQuantReport:
    """Settings and effect of a SmoothQuant run."""

    alpha: float
    groups: tuple[SmoothingGroup, ...]
    num_tokens: int
    source: str
    max_scale: float
    min_scale: float

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict."""
        return {
            "alpha": self.alpha,
            "num_groups": len(self.groups),
            "groups": [dataclasses.asdict(group) for group in self.groups],
            "num_tokens": self.num_tokens,
            "source": self.source,
            "max_scale": self.max_scale,
            "min_scale": self.min_scale,
        }


def smoothing_groups(model: nn.Module, smooth_down_proj: bool = False) -> list[SmoothingGroup]:
    """Return the smoothing groups of every decoder layer of a supported model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SMOOTHQUANT_MODEL_TYPES:
        raise ValueError(
            f"SmoothQuant is not supported for model type {model_type!r}; supported: "
            f"{', '.join(SMOOTHQUANT_MODEL_TYPES)} (Llama blocks with multiplicative RMSNorm weights). "
            "Use the plain or super-activation-aware W8A8 variant instead"
        )
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    groups = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        prefix = names[id(layer)] + "."
        groups.append(SmoothingGroup(index, prefix + "input_layernorm",
                                     tuple(prefix + f"self_attn.{p}_proj" for p in ("q", "k", "v"))))
        groups.append(SmoothingGroup(index, prefix + "post_attention_layernorm",
                                     (prefix + "mlp.gate_proj", prefix + "mlp.up_proj")))
        if smooth_down_proj:
            groups.append(SmoothingGroup(index, prefix + "mlp.up_proj", (prefix + "mlp.down_proj",)))
    return groups


def smoothing_scales(
    activation_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float
) -> torch.Tensor:
    """Return float32 ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input channel.

    ``activation_max`` is ``max|X_j|`` over calibration tokens; ``weights`` are
    ``nn.Linear``-layout ``[out, in]`` weights reading that input.

    >>> smoothing_scales(torch.tensor([4.0, 1.0]), [torch.tensor([[1.0, 4.0]])], 0.5)
    tensor([2.0000, 0.5000])
    """
    weight_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    activation = activation_max.float().clamp(min=_MIN_MAGNITUDE)
    weight_max = weight_max.to(activation.device).clamp(min=_MIN_MAGNITUDE)
    return activation.pow(alpha) / weight_max.pow(1 - alpha)


@torch.no_grad()
def collect_activation_max(model: nn.Module, names: Sequence[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return ``max|X_j|`` over all calibration tokens of each named layer's input."""
    modules = dict(model.named_modules())
    maxima: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            current = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            maxima[name] = current if name not in maxima else torch.maximum(maxima[name], current)

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
        run_calibration(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


@torch.no_grad()
def smooth_(
    model: nn.Module,
    tokenizer: Any,
    alpha: float = DEFAULT_ALPHA,
    *,
    source: str = DEFAULT_CALIBRATION_SOURCE,
    num_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    seqlen: int = DEFAULT_CALIBRATION_SEQLEN,
    smooth_down_proj: bool = False,
    calibration_ids: torch.Tensor | None = None,
    backup: TensorBackup | None = None,
) -> SmoothQuantReport:
    """Fold SmoothQuant scales into the model's norms and linear weights, in place.

    Calibration activations come from the first ``num_tokens`` tokens of ``source``, or
    from ``calibration_ids`` when given (``tokenizer`` may then be ``None``).
    ``backup``, when given, saves every tensor before it changes.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"SmoothQuant alpha={alpha!r} is invalid; use a number in [0, 1], e.g. 0.85")
    groups = smoothing_groups(model, smooth_down_proj)
    modules = dict(model.named_modules())
    batch, source = resolve_calibration(tokenizer, calibration_ids, source, num_tokens, seqlen)
    # All targets of a group read the same input, so the first target's input is recorded.
    maxima = collect_activation_max(model, [group.targets[0] for group in groups], batch)

    largest, smallest = 0.0, float("inf")
    for group in groups:
        targets = [modules[name] for name in group.targets]
        scales = smoothing_scales(maxima[group.targets[0]], [t.weight for t in targets], alpha)
        source_module = modules[group.source]
        _divide_output_(source_module, scales, backup)
        for target in targets:
            if backup is not None:
                backup.save(target.weight)
            target.weight.mul_(scales.to(target.weight)[None, :])
        largest = max(largest, float(scales.max()))
        smallest = min(smallest, float(scales.min()))

    log.info("SmoothQuant alpha=%g folded into %d groups (scales %.3g .. %.3g)", alpha, len(groups), smallest, largest)
    return SmoothQuantReport(alpha, tuple(groups), batch.numel(), source, largest, smallest)


def _divide_output_(module: nn.Module, scales: torch.Tensor, backup: TensorBackup | None) -> None:
    """Divide output channel ``j`` of a norm or linear layer by ``scales[j]``."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"{type(module).__name__} has no weight to fold SmoothQuant scales into")
    tensors = [weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
    for tensor in tensors:
        if backup is not None:
            backup.save(tensor)
        factor = scales.to(tensor)
        # An nn.Linear weight is [out, in]: scale its rows. A norm weight is [hidden].
        tensor.div_(factor[:, None] if tensor.dim() == 2 else factor)
