"""Simulated W8A8: 8-bit weights and activations, quantized and dequantized in place.

What is quantized (all symmetric, absmax scaled, computed in the model's dtype):

- weights of every selected linear layer (see :func:`~superweight.quantization.weights.
  default_weight_filter`), per tensor;
- the input of each of those layers (q/k/v/o and gate/up/down in a Llama block), per
  token: one scale per position over the hidden dimension;
- the query, key and value states that enter the attention matmuls, per token over
  all heads. This uses a registered transformers attention function that quantizes
  q, k and v and then calls the model's own implementation (``sdpa``, ``eager``, ...).

The super-activation-aware variant keeps super activations out of the per-token
quantization: a value is replaced by the median of its token's activations, the token
is quantized and dequantized, and the original value is written back unquantized. A
super weight ``layer L, [row, col]`` makes two kinds of activations huge:

- the input of layer L's down-projection in channel ``col``, which the super weight
  multiplies (the large input channel of the detection plot);
- the residual stream in channel ``row`` after layer L, the super activation itself.
  Later layers read it through a norm, so channel ``row`` of the inputs of their
  residual-reading projections (q/k/v and gate/up in a Llama block) carries it.

Those (layer, projection, channel) triples get the treatment. At one token, a value of
such a channel counts as a super activation when its magnitude exceeds that of every
other channel of the token, i.e. when it alone would set the token's scale.

Everything is removable: :func:`simulated_w8a8` restores the weights, hooks and
attention implementation on exit, leaving the model bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from superweight.adapters import get_adapter
from superweight.coordinates import SuperWeight, check_in_range
from superweight.quantization.backup import TensorBackup
from superweight.quantization.weights import ModuleFilter, linear_modules

log = logging.getLogger(__name__)

ATTENTION_KEY_PREFIX = "superweight_w8a8_"
"""Prefix of the attention implementations registered with transformers, one per wrapped
implementation (``superweight_w8a8_sdpa``, ...)."""


# -- quantizers ---------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is invalid; use an integer from 2 to 16, e.g. 8")
    return 2 ** (bits - 1) - 1


def fake_quantize_per_tensor(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize and dequantize with one symmetric scale ``max|w| / (2^(bits-1) - 1)``.

    >>> fake_quantize_per_tensor(torch.tensor([0.4, -1.0, 0.26]), bits=3)
    tensor([ 0.3333, -1.0000,  0.3333])
    """
    qmax = _check_bits(bits)
    scale = weight.abs().amax() / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(weight / scale).clamp_(-qmax, qmax).mul_(scale)


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8, dims: int | tuple[int, ...] = -1) -> torch.Tensor:
    """Quantize and dequantize with a symmetric scale per token, reduced over ``dims``.

    Each token's scale is ``max|x| / (2^(bits-1) - 1)`` over ``dims`` (the hidden
    dimension by default); an all-zero token stays zero.

    >>> fake_quantize_per_token(torch.tensor([[1.0, 0.4], [0.0, 0.0]]), bits=3)
    tensor([[1.0000, 0.3333],
            [0.0000, 0.0000]])
    """
    qmax = _check_bits(bits)
    scale = x.abs().amax(dim=dims, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).clamp_(-qmax, qmax).mul_(scale)


def super_activation_mask(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Return a mask of the super activations in ``x[..., channels]``, shaped ``[..., len(channels)]``.

    A value counts when its magnitude exceeds that of every channel not in ``channels``
    at the same token.
    """
    others = x.abs().index_fill(-1, channels, 0).amax(-1, keepdim=True)
    return x.index_select(-1, channels).abs() > others


def fake_quantize_per_token_holding_out(x: torch.Tensor, channels: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize per token while holding super activations in ``channels`` out.

    Held-out values are replaced by the median of their token's activations before
    quantization and written back unchanged afterwards; see :func:`super_activation_mask`.

    >>> x = torch.tensor([[0.1, -0.2, 50.0, 0.3]])
    >>> fake_quantize_per_token_holding_out(x, torch.tensor([2]), bits=8)[0, 2].item()
    50.0
    """
    is_super = super_activation_mask(x, channels)
    original = x.index_select(-1, channels)
    median = x.median(dim=-1, keepdim=True).values
    replaced = x.index_copy(-1, channels, torch.where(is_super, median, original))
    result = fake_quantize_per_token(replaced, bits)
    return result.index_copy_(-1, channels, torch.where(is_super, original, result.index_select(-1, channels)))


# -- configuration and report ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActivationQuantConfig:
    """Simulated W{weight_bits}A{activation_bits} quantization."""

    weight_bits: int = 8
    """Bits of the per-tensor symmetric weight quantization."""
    activation_bits: int = 8
    """Bits of the per-token symmetric activation quantization."""
    quantize_attention: bool = True
    """Also quantize the query, key and value states that enter the attention matmuls."""
    keep_super_activations: bool = False
    """Hold super activations out of the activation quantization (needs super weights)."""
    smoothquant_alpha: float | None = None
    """Apply SmoothQuant with this migration strength before quantizing (0.85 in the
    super weight paper); ``None`` disables it."""
    calibration_source: str = "wiki-sample"
    """Text source of the SmoothQuant calibration activations."""
    calibration_tokens: int = 2048
    """Calibration tokens for SmoothQuant."""

    def __post_init__(self) -> None:
        _check_bits(self.weight_bits)
        _check_bits(self.activation_bits)
        alpha = self.smoothquant_alpha
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
                raise ValueError(f"smoothquant_alpha={alpha!r} is invalid; use a number in [0, 1], e.g. 0.85")
            if self.keep_super_activations:
                raise ValueError(
                    "keep_super_activations and smoothquant_alpha are separate variants; set only one of them"
                )
        if isinstance(self.calibration_tokens, bool) or not isinstance(self.calibration_tokens, int) or (
            self.calibration_tokens < 1
        ):
            raise ValueError(f"calibration_tokens={self.calibration_tokens!r} is invalid; use a positive integer")

    @property
    def variant(self) -> str:
        """``rtn``, ``sa_aware`` or ``smoothquant``."""
        if self.keep_super_activations:
            return "sa_aware"
        return "smoothquant" if self.smoothquant_alpha is not None else "rtn"

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ActivationQuantReport:
    """Record of the changes :func:`quantize_activations_` made to a model."""

    config: ActivationQuantConfig
    linear_layers: tuple[str, ...]
    """Layers whose weights and inputs are quantized."""
    attention_implementations: tuple[str, ...]
    """Attention implementations wrapped to quantize q, k and v (empty when off)."""
    held_out_channels: dict[str, tuple[int, ...]]
    """Input channels held out of the quantization, per layer (super-activation-aware)."""
    super_weights: tuple[SuperWeight, ...]
    smoothquant: dict[str, Any] | None
    """The SmoothQuant report, when it was applied."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict."""
        return {
            "config": self.config.to_dict(),
            "variant": self.config.variant,
            "num_linear_layers": len(self.linear_layers),
            "linear_layers": list(self.linear_layers),
            "attention_implementations": list(self.attention_implementations),
            "held_out_channels": {name: list(channels) for name, channels in self.held_out_channels.items()},
            "super_weights": [sw.to_dict() for sw in self.super_weights],
            "smoothquant": self.smoothquant,
        }


# -- where super activations are -----------------------------------------------------------


def super_activation_channels(model: nn.Module, super_weights: Iterable[SuperWeight]) -> dict[str, tuple[int, ...]]:
    """Return the input channels that carry super activations, per linear layer name.

    For a super weight ``layer L, [row, col]``: channel ``col`` of layer L's
    down-projection input, and channel ``row`` of the residual-reading projections of
    every later layer (see the module docstring).
    """
    super_weights = sorted(set(super_weights))
    if not super_weights:
        return {}
    adapter = get_adapter(model)
    check_in_range(super_weights, model, adapter)
    if not adapter.residual_readers:
        raise ValueError(
            f"super-activation-aware quantization does not know the residual-reading projections of model "
            f"type {model.config.model_type!r}; register an adapter with residual_readers "
            "(see superweight.adapters.register_adapter)"
        )
    names = {id(module): name for name, module in model.named_modules()}
    layers = adapter.decoder_layers(model)
    channels: dict[str, set[int]] = {}
    for sw in super_weights:
        down = names[id(adapter.down_proj_module(model, sw.layer))]
        channels.setdefault(down, set()).add(sw.col)
        for later in range(sw.layer + 1, len(layers)):
            for relative in adapter.residual_readers:
                module = layers[later].get_submodule(relative)
                channels.setdefault(names[id(module)], set()).add(sw.row)
    return {name: tuple(sorted(values)) for name, values in channels.items()}


# -- attention ------------------------------------------------------------------------------

# id(config) -> activation bits, for the configs whose attention is being quantized.
_ATTENTION_BITS: dict[int, int] = {}


def _original_attention(module: nn.Module, implementation: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        # transformers keeps each model's eager attention in its modeling module.
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise ValueError(
                f"{type(module).__name__} has no module-level eager_attention_forward; load the model with "
                "attn_implementation='sdpa' or pass quantize_attention=False"
            )
        return function
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _attention_key(implementation: str) -> str:
    """Register (once) the quantizing wrapper of ``implementation`` and return its key."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    key = ATTENTION_KEY_PREFIX + implementation
    if key in ALL_ATTENTION_FUNCTIONS:
        return key

    def quantized_attention(module, query, key_states, value, attention_mask, **kwargs):
        bits = _ATTENTION_BITS.get(id(module.config))
        if bits is None:
            raise RuntimeError(
                f"attention implementation {key!r} is set but superweight's W8A8 simulation is not active; "
                f"restore the model's attention implementation to {implementation!r}"
            )
        # [batch, heads, tokens, head_dim]: one scale per token over all heads.
        query = fake_quantize_per_token(query, bits, dims=(1, 3))
        key_states = fake_quantize_per_token(key_states, bits, dims=(1, 3))
        value = fake_quantize_per_token(value, bits, dims=(1, 3))
        original = _original_attention(module, implementation)
        return original(module, query, key_states, value, attention_mask, **kwargs)

    AttentionInterface.register(key, quantized_attention)
    # The wrapper takes the same attention mask as the implementation it wraps.
    if implementation in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(key, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return key


def _attention_configs(model: nn.Module) -> list[Any]:
    """Return the distinct configs of the model's submodules that choose an attention function."""
    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or getattr(config, "_attn_implementation", None) is None:
            continue
        seen.add(id(config))
        configs.append(config)
    return configs


# -- applying and removing ----------------------------------------------------------------------


class ActivationQuantHandle:
    """Undo information of :func:`quantize_activations_`; :meth:`remove` restores the model."""

    def __init__(self, report: ActivationQuantReport, backup: TensorBackup, hooks: list, configs: list) -> None:
        self.report = report
        self._backup = backup
        self._hooks = hooks
        self._configs = configs

    def remove(self) -> None:
        """Remove the hooks, restore the attention implementation and the original weights."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for config, implementation in self._configs:
            config._attn_implementation_internal = implementation
            _ATTENTION_BITS.pop(id(config), None)
        self._configs = []
        self._backup.restore()


def _input_hook(bits: int, channels: tuple[int, ...]):
    held_out = torch.tensor(channels, dtype=torch.long) if channels else None

    def hook(module: nn.Module, args: tuple):
        x = args[0]
        if held_out is None:
            quantized = fake_quantize_per_token(x, bits)
        else:
            quantized = fake_quantize_per_token_holding_out(x, held_out.to(x.device), bits)
        return (quantized, *args[1:])

    return hook


@torch.no_grad()
def quantize_activations_(
    model: nn.Module,
    config: ActivationQuantConfig = ActivationQuantConfig(),
    super_weights: Iterable[SuperWeight] = (),
    tokenizer: Any = None,
    filter_fn: ModuleFilter | None = None,
    calibration_ids: torch.Tensor | None = None,
) -> ActivationQuantHandle:
    """Set up simulated W8A8 on ``model`` in place; return a handle whose ``remove()`` undoes it.

    With ``config.smoothquant_alpha`` the model is smoothed first, calibrated on
    ``config.calibration_source`` read with ``tokenizer`` (or on ``calibration_ids``);
    with ``config.keep_super_activations`` the super weights' activations are held out
    (needs ``super_weights``).
    """
    super_weights = tuple(sorted(set(super_weights)))
    if config.keep_super_activations and not super_weights:
        raise ValueError("keep_super_activations needs the model's super weights; pass super_weights=[...]")
    held_out = super_activation_channels(model, super_weights) if config.keep_super_activations else {}
    if config.smoothquant_alpha is not None and tokenizer is None and calibration_ids is None:
        raise ValueError("SmoothQuant needs calibration text; pass the model's tokenizer or calibration_ids")

    backup = TensorBackup()
    hooks: list = []
    switched: list = []
    try:
        smoothquant = None
        if config.smoothquant_alpha is not None:
            from superweight.quantization.smoothquant import smooth_

            smoothquant = smooth_(
                model, tokenizer, config.smoothquant_alpha,
                source=config.calibration_source, num_tokens=config.calibration_tokens,
                calibration_ids=calibration_ids, backup=backup,
            ).to_dict()

        layers = linear_modules(model, filter_fn)
        for name, module in layers:
            backup.save(module.weight)
            module.weight.copy_(fake_quantize_per_tensor(module.weight, config.weight_bits))
            hooks.append(module.register_forward_pre_hook(_input_hook(config.activation_bits, held_out.get(name, ()))))
        unused = sorted(set(held_out) - {name for name, _ in layers})
        if unused:
            log.warning("held-out channels of %s are unused: those layers are not quantized", ", ".join(unused))

        if config.quantize_attention:
            for attention_config in _attention_configs(model):
                implementation = attention_config._attn_implementation
                key = _attention_key(implementation)
                switched.append((attention_config, implementation))
                _ATTENTION_BITS[id(attention_config)] = config.activation_bits
                attention_config._attn_implementation_internal = key
    except BaseException:
        ActivationQuantHandle(None, backup, hooks, switched).remove()
        raise

    report = ActivationQuantReport(
        config=config,
        linear_layers=tuple(name for name, _ in layers),
        attention_implementations=tuple(implementation for _, implementation in switched),
        held_out_channels=held_out,
        super_weights=super_weights,
        smoothquant=smoothquant,
    )
    log.info(
        "W%dA%d simulation (%s) on %d linear layers; attention %s",
        config.weight_bits, config.activation_bits, config.variant, len(layers),
        ", ".join(report.attention_implementations) or "not quantized",
    )
    return ActivationQuantHandle(report, backup, hooks, switched)


@contextlib.contextmanager
def simulated_w8a8(
    model: nn.Module,
    config: ActivationQuantConfig = ActivationQuantConfig(),
    super_weights: Iterable[SuperWeight] = (),
    tokenizer: Any = None,
    filter_fn: ModuleFilter | None = None,
    calibration_ids: torch.Tensor | None = None,
) -> Iterator[ActivationQuantReport]:
    """Simulate W8A8 inside a ``with`` block; the model is bit-identical afterwards.

    >>> # with simulated_w8a8(model, ActivationQuantConfig(keep_super_activations=True),
    >>> #                     super_weights=[SuperWeight(2, 3968, 7003)]) as report:
    >>> #     evaluate_perplexity(model, tokenizer, "wiki-sample")
    """
    handle = quantize_activations_(model, config, super_weights, tokenizer, filter_fn, calibration_ids)
    try:
        yield handle.report
    finally:
        handle.remove()
