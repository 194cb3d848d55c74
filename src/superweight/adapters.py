"""Architecture adapters: where each model family keeps its MLP down-projection.

All architecture knowledge lives in one table keyed by ``config.model_type``. An
adapter names

- the decoder layers (a dotted path from the top-level model to an ``nn.ModuleList``),
- the MLP down-projection inside a layer,
- the layout of its weight: ``"linear"`` (``nn.Linear``, ``[out, in]``) or ``"conv1d"``
  (GPT-2's ``Conv1D``, ``[in, out]``),
- and, where the architecture normalizes the MLP output before adding it to the residual
  stream (Gemma 2/3 and OLMo 2 use ``post_feedforward_layernorm``), the module whose
  output actually enters the residual stream.

Coordinates are always reported in ``nn.Linear`` convention: ``row`` is the output
channel, ``col`` the input channel, whatever the storage layout.

Register an adapter for a new architecture with :func:`register_adapter`::

    register_adapter(Adapter(model_types=("mymodel",), layers="model.blocks",
                             down_proj="ffn.w2"))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

WeightLayout = Literal["linear", "conv1d"]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How to find the MLP down-projection of one architecture family."""

    model_types: tuple[str, ...]
    """Values of ``config.model_type`` this adapter serves."""
    layers: str | tuple[str, ...]
    """Dotted path(s) from the model to its decoder layers; the first that exists wins."""
    down_proj: str
    """Dotted path from a decoder layer to its MLP down-projection."""
    layout: WeightLayout = "linear"
    """Storage layout of the down-projection weight."""
    residual_output: str | None = None
    """Module (relative to a layer) whose output enters the residual stream, when it is
    not the down-projection itself (a norm applied after the MLP)."""
    residual_readers: tuple[str, ...] = ()
    """Projections (relative to a layer) that read the residual stream through a norm.
    Super-activation-aware W8A8 keeps the super activation out of their input quantization."""

    def __post_init__(self) -> None:
        if not self.model_types:
            raise ValueError("Adapter.model_types is empty; name at least one config.model_type")
        if self.layout not in ("linear", "conv1d"):
            raise ValueError(f"Adapter.layout={self.layout!r} is invalid; use 'linear' or 'conv1d'")

    # -- module access -------------------------------------------------------------

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the model's decoder layers."""
        paths = (self.layers,) if isinstance(self.layers, str) else self.layers
        for path in paths:
            module = _get_submodule(model, path)
            if module is not None:
                return module
        raise ValueError(
            f"model of type {type(model).__name__} has none of the layer paths {paths}; "
            "fix the adapter registered for its model_type"
        )

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def down_proj_module(self, model: nn.Module, layer: int) -> nn.Module:
        """Return the MLP down-projection of decoder layer ``layer``."""
        layers = self.decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(
                f"layer {layer} does not exist: the model has {len(layers)} layers (0..{len(layers) - 1})"
            )
        module = _get_submodule(layers[layer], self.down_proj)
        if module is None:
            raise ValueError(
                f"layer {layer} has no module {self.down_proj!r}; fix the adapter for "
                f"model types {self.model_types}"
            )
        return module

    def residual_output_module(self, model: nn.Module, layer: int) -> nn.Module | None:
        """Return the module after the down-projection whose output enters the residual."""
        if self.residual_output is None:
            return None
        module = _get_submodule(self.decoder_layers(model)[layer], self.residual_output)
        if module is None:
            raise ValueError(f"layer {layer} has no module {self.residual_output!r}")
        return module

    def down_proj_name(self, model: nn.Module, layer: int) -> str:
        """Return the fully qualified module name of a layer's down-projection."""
        target = self.down_proj_module(model, layer)
        for name, module in model.named_modules():
            if module is target:
                return name
        raise ValueError(f"down-projection of layer {layer} is not a submodule of the model")

    def iter_down_projs(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        for layer in range(self.num_layers(model)):
            yield layer, self.down_proj_module(model, layer)

    # -- shapes and coordinates ----------------------------------------------------

    def down_proj_shape(self, model: nn.Module, layer: int) -> tuple[int, int]:
        """Return ``(out_features, in_features)`` of a down-projection."""
        weight = self.down_proj_module(model, layer).weight
        rows, cols = weight.shape
        return (cols, rows) if self.layout == "conv1d" else (rows, cols)

    def weight_index(self, row: int, col: int) -> tuple[int, int]:
        """Map ``nn.Linear`` coordinates to an index into the stored weight tensor."""
        return (col, row) if self.layout == "conv1d" else (row, col)


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


_LLAMA_LIKE = ("model.layers", "model.language_model.layers")

ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, overwrite: bool = False) -> None:
    """Register ``adapter`` for each of its model types.

    Raises ``ValueError`` when a model type already has an adapter, unless ``overwrite``.
    """
    for model_type in adapter.model_types:
        if model_type in ADAPTERS and not overwrite:
            raise ValueError(
                f"model type {model_type!r} already has an adapter; pass overwrite=True to replace it"
            )
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

for _adapter in (
    Adapter(
        ("llama", "mistral", "qwen2", "qwen3", "olmo", "gemma", "stablelm", "smollm3"),
        layers=_LLAMA_LIKE,
        down_proj="mlp.down_proj",
        residual_readers=(*_QKV, "mlp.gate_proj", "mlp.up_proj"),
    ),
    Adapter(
        ("phi3",),
        layers=_LLAMA_LIKE,
        down_proj="mlp.down_proj",
        residual_readers=("self_attn.qkv_proj", "mlp.gate_up_proj"),
    ),
    # Gemma 2/3 and OLMo 2 normalize the MLP output before the residual add.
    Adapter(
        ("gemma2", "gemma3", "gemma3_text", "olmo2"),
        layers=_LLAMA_LIKE,
        down_proj="mlp.down_proj",
        residual_output="post_feedforward_layernorm",
        residual_readers=(*_QKV, "mlp.gate_proj", "mlp.up_proj"),
    ),
    Adapter(("starcoder2",), layers="model.layers", down_proj="mlp.c_proj", residual_readers=(*_QKV, "mlp.c_fc")),
    Adapter(("gpt2",), layers="transformer.h", down_proj="mlp.c_proj", layout="conv1d",
            residual_readers=("attn.c_attn", "mlp.c_fc")),
    Adapter(("gpt_neox",), layers="gpt_neox.layers", down_proj="mlp.dense_4h_to_h",
            residual_readers=("attention.query_key_value", "mlp.dense_h_to_4h")),
    Adapter(("falcon",), layers="transformer.h", down_proj="mlp.dense_4h_to_h",
            residual_readers=("self_attention.query_key_value", "mlp.dense_h_to_4h")),
    Adapter(("opt",), layers="model.decoder.layers", down_proj="fc2", residual_readers=(*_QKV, "fc1")),
):
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    """Return the adapter for a model (by its ``config.model_type``) or a model type."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise ValueError(
                f"{type(model_or_type).__name__} has no config.model_type; pass a Hugging Face "
                "PreTrainedModel or register an adapter and pass its model type"
            )
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"no adapter for model type {model_type!r}; supported: {', '.join(supported_model_types())}. "
            "Register one with superweight.adapters.register_adapter(Adapter(model_types=("
            f"{model_type!r},), layers='model.layers', down_proj='mlp.down_proj'))"
        ) from None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Return the weight of a linear-like module (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__} has no 2-D weight; it is not a linear projection")
    return weight
