"""Real low-bit storage of block-quantized linear weights, in safetensors.

:func:`save_quantized` writes, for every selected linear layer of an unquantized model,

- ``<name>.codes``: uint8, the integer level of each weight in ``nn.Linear`` layout,
  flattened row by row; two 4-bit codes per byte (low nibble first) when
  ``bits <= 4``, one code per byte otherwise;
- ``<name>.lo`` and ``<name>.scale``: float32 per block, the ``lo`` and ``s`` of
  :mod:`superweight.quantization.blockwise`. float32 (4 bytes more per block than
  float16) makes the loaded weights bit-identical to :func:`quantize_weights_`;
- ``<name>.super_index`` / ``<name>.super_value``: the side table of restored super
  weights (stored-tensor indices and values in the weight dtype).

The settings and each layer's shape, layout and dtype are in the file's metadata.
Everything else of the model (embeddings, norms, ``lm_head``) is not stored: load into a
model built from the original checkpoint with :func:`load_quantized_`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from superweight.coordinates import SuperWeight
from superweight.quantization import blockwise
from superweight.quantization.config import WeightQuantConfig
from superweight.quantization.weights import (
    ModuleFilter,
    _super_weight_entries,
    block_views,
    is_linear,
    linear_modules,
    quantize_matrix_,
)

log = logging.getLogger(__name__)

FILE_NAME = "quantized_weights.safetensors"
METADATA_KEY = "superweight.quantization"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PackedReport:
    """Location and size of saved quantized weights."""

    path: str
    size_bytes: int
    """Size of the safetensors file on disk."""
    original_bytes: int
    """Bytes of the same weights in the model's dtype."""
    numel: int
    num_matrices: int

    @property
    def bits_per_weight(self) -> float:
        """File bits per stored weight, including per-block parameters and metadata."""
        return 8 * self.size_bytes / max(self.numel, 1)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict."""
        return {**dataclasses.asdict(self), "bits_per_weight": self.bits_per_weight}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes into bytes: two per byte (low nibble first) when ``bits <= 4``.

    >>> pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 4)
    tensor([33,  3], dtype=torch.uint8)
    """
    flat = codes.reshape(-1)
    if bits > 4:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Invert :func:`pack_codes`, returning ``numel`` uint8 codes."""
    if bits > 4:
        return packed[:numel].clone()
    codes = torch.stack([packed & 0x0F, packed >> 4], 1).reshape(-1)
    return codes[:numel]


def dequantize_codes(codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    """Return float32 weights from codes (flattened ``nn.Linear`` layout) and per-block ``lo``, ``s``.

    Uses the same float32 operations as the fake quantization, so the result is
    bit-identical to it.
    """
    values = codes.to(torch.float32)
    if config.format != "int":
        levels = blockwise.nf_levels(config.format)
    start = 0
    for view in block_views(values, config.block_size):
        rows = view.shape[0]
        block_lo = lo[start : start + rows, None]
        block_scale = scale[start : start + rows, None]
        start += rows
        if config.format != "int":
            table = (levels + 1)[None, :] / block_scale + block_lo
            view.copy_(torch.gather(table, 1, view.long()))
        elif config.scale_shift:
            view.add_(0.5).div_(block_scale).add_(block_lo)
        else:
            view.div_(block_scale).add_(block_lo)
    return values


@torch.no_grad()
def save_quantized(
    model: nn.Module,
    config: WeightQuantConfig,
    directory: str | os.PathLike,
    super_weights: Iterable[SuperWeight] = (),
    filter_fn: ModuleFilter | None = None,
) -> PackedReport:
    """Quantize the selected linear weights of an unquantized model and save them packed.

    The model is not changed. With ``config.keep_super_weights`` the super weights are
    stored in a side table with their restored values.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = _super_weight_entries(model, super_weights)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    numel = original_bytes = 0
    with blockwise.single_threaded() as threads, blockwise.WorkerPool(threads, torch.device("cpu")) as pool:
        for name, module in linear_modules(model, filter_fn):
            stored = module.weight.detach()
            conv1d = not isinstance(module, nn.Linear)
            # A copy: quantize_matrix_ works in place and the model must stay unchanged.
            linear = (stored.t() if conv1d else stored).to("cpu", torch.float32, copy=True).contiguous()
            codes = torch.empty(linear.shape, dtype=torch.uint8)
            _, results = quantize_matrix_(linear, config, codes=codes, pool=pool)
            tensors[f"{name}.codes"] = pack_codes(codes, config.bits)
            tensors[f"{name}.lo"] = torch.cat([r.lo for r in results])
            tensors[f"{name}.scale"] = torch.cat([r.scale for r in results])
            if config.keep_super_weights and entries.get(id(module.weight)):
                indices = [index for _, index in entries[id(module.weight)]]
                values = torch.stack([stored[index] for index in indices]).cpu()
                if config.restore_factor != 1:
                    values = values * config.restore_factor
                tensors[f"{name}.super_index"] = torch.tensor(indices, dtype=torch.int64)
                tensors[f"{name}.super_value"] = values.contiguous()
            layers[name] = {
                "shape": list(linear.shape),
                "layout": "conv1d" if conv1d else "linear",
                "dtype": str(stored.dtype).removeprefix("torch."),
            }
            numel += stored.numel()
            original_bytes += stored.numel() * stored.element_size()

    metadata = {"version": FORMAT_VERSION, "config": config.to_dict(), "layers": layers}
    path = directory / FILE_NAME
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    (directory / "quantization.json").write_text(json.dumps(metadata, indent=2) + "\n")
    report = PackedReport(str(path), path.stat().st_size, original_bytes, numel, len(layers))
    log.info(
        "saved %d quantized matrices to %s: %.1f MiB (%.2f bits per weight; %.1f MiB unquantized)",
        report.num_matrices, path, report.size_bytes / 2**20, report.bits_per_weight, original_bytes / 2**20,
    )
    return report


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Return the settings and layer list stored by :func:`save_quantized`."""
    from safetensors import safe_open

    path = Path(directory) / FILE_NAME
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a folder written by save_quantized")
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata; it was not written by save_quantized")
    metadata = json.loads(raw)
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {metadata.get('version')!r}; this code reads {FORMAT_VERSION}")
    return metadata


@torch.no_grad()
def load_quantized_(model: nn.Module, directory: str | os.PathLike) -> WeightQuantConfig:
    """Write the dequantized weights saved by :func:`save_quantized` into ``model`` in place.

    ``model`` must have the architecture of the saved model; every saved layer must exist
    with the saved shape. Returns the quantization settings.
    """
    from safetensors.torch import load_file

    metadata = read_metadata(directory)
    config = WeightQuantConfig(**metadata["config"])
    tensors = load_file(str(Path(directory) / FILE_NAME))
    modules = dict(model.named_modules())
    for name, info in metadata["layers"].items():
        module = modules.get(name)
        if module is None or not is_linear(module):
            raise ValueError(f"saved layer {name!r} is not a linear layer of this model; load the matching model")
        shape = tuple(info["shape"])
        stored = module.weight
        conv1d = info["layout"] == "conv1d"
        if (tuple(stored.shape[::-1]) if conv1d else tuple(stored.shape)) != shape:
            raise ValueError(f"layer {name!r} has shape {tuple(stored.shape)}, but {shape} was saved")
        count = shape[0] * shape[1]
        codes = unpack_codes(tensors[f"{name}.codes"], config.bits, count)
        values = dequantize_codes(codes, tensors[f"{name}.lo"], tensors[f"{name}.scale"], config).view(shape)
        stored.copy_(values.t() if conv1d else values)
        if f"{name}.super_index" in tensors:
            for index, value in zip(tensors[f"{name}.super_index"].tolist(), tensors[f"{name}.super_value"]):
                stored[tuple(index)] = value
    log.info("loaded %d quantized matrices (%s)", len(metadata["layers"]), config.describe())
    return config
