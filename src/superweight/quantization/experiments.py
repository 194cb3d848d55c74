"""The quantization experiments of Yu et al. (2024), on the resumable experiment runner.

``weight-quant``: per block size, plain round-to-nearest (RTN) against super-weight-aware
RTN (clip outliers, quantize, then write the super weights back in full precision).
``activation-quant``: full precision, W8A8 RTN, SmoothQuant and super-activation-aware
W8A8 RTN.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from superweight.coordinates import SuperWeight
from superweight.experiments import Configuration, EvaluationSettings, run_experiment
from superweight.models import LoadedModel
from superweight.quantization.activations import ActivationQuantConfig, simulated_w8a8
from superweight.quantization.config import WeightQuantConfig
from superweight.quantization.weights import quantized_weights

DEFAULT_BLOCK_SIZES: tuple[int | str, ...] = (16384, 65536, 262144, 1048576, "tensor")


def weight_quant_configurations(
    block_sizes: Sequence[int | str] = DEFAULT_BLOCK_SIZES,
    *,
    bits: int = 4,
    format: str = "int",
    clip: str = "zscore",
    clip_value: float | None = None,
) -> list[Configuration]:
    """Return, per block size, an RTN and a super-weight-aware RTN configuration."""
    configurations = []
    for block_size in block_sizes:
        plain = WeightQuantConfig(bits=bits, format=format, block_size=block_size)
        aware = dataclasses.replace(plain, clip=clip, clip_value=clip_value, keep_super_weights=True)
        for method, config in (("rtn", plain), ("sw-aware", aware)):
            configurations.append(
                Configuration(
                    name=f"{method}-{block_size}",
                    label=f"{'SW-aware RTN' if method == 'sw-aware' else 'RTN'}, B={block_size}",
                    settings={"block_size": block_size, "method": method, "config": config.to_dict()},
                    apply=_weight_apply(config),
                    needs_super_weights=method == "sw-aware",
                )
            )
    return configurations


def _weight_apply(config: WeightQuantConfig):
    def apply(loaded: LoadedModel, super_weights: Sequence[SuperWeight]):
        return quantized_weights(loaded.model, config, super_weights if config.keep_super_weights else ())

    return apply


def activation_quant_configurations(smoothquant_alpha: float = 0.85) -> list[Configuration]:
    """Return the four rows of the W8A8 comparison: FP, RTN, SmoothQuant, SA-aware RTN."""
    variants = [
        ("fp", "Full precision", None),
        ("w8a8-rtn", "W8A8 RTN", ActivationQuantConfig()),
        ("smoothquant", f"SmoothQuant (alpha {smoothquant_alpha:g})", ActivationQuantConfig(smoothquant_alpha=smoothquant_alpha)),
        ("sa-aware", "SA-aware W8A8 RTN", ActivationQuantConfig(keep_super_activations=True)),
    ]
    return [
        Configuration(
            name=name, label=label,
            settings={"variant": name, "config": None if config is None else config.to_dict()},
            apply=_activation_apply(config),
            needs_super_weights=config is not None and config.keep_super_activations,
        )
        for name, label, config in variants
    ]


def _activation_apply(config: ActivationQuantConfig | None):
    def apply(loaded: LoadedModel, super_weights: Sequence[SuperWeight]):
        if config is None:
            return contextlib.nullcontext()
        return simulated_w8a8(loaded.model, config, super_weights, tokenizer=loaded.tokenizer)

    return apply


def run_weight_quant(
    model: str | LoadedModel,
    output_dir: str | Path,
    *,
    block_sizes: Sequence[int | str] = DEFAULT_BLOCK_SIZES,
    evaluation: EvaluationSettings = EvaluationSettings(),
    bits: int = 4,
    format: str = "int",
    clip: str = "zscore",
    clip_value: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run RTN vs super-weight-aware RTN per block size; ``options`` go to :func:`run_experiment`."""
    configurations = weight_quant_configurations(block_sizes, bits=bits, format=format, clip=clip, clip_value=clip_value)
    settings = {"block_sizes": list(block_sizes), "bits": bits, "format": format, "clip": clip, "clip_value": clip_value}
    return run_experiment(
        "weight-quant", configurations, model=model, output_dir=output_dir, evaluation=evaluation,
        settings=settings, **options,
    )


def run_activation_quant(
    model: str | LoadedModel,
    output_dir: str | Path,
    *,
    smoothquant_alpha: float = 0.85,
    evaluation: EvaluationSettings = EvaluationSettings(tasks=()),
    **options: Any,
) -> dict[str, Any]:
    """Run FP, W8A8 RTN, SmoothQuant and SA-aware RTN; ``options`` go to :func:`run_experiment`."""
    return run_experiment(
        "activation-quant", activation_quant_configurations(smoothquant_alpha), model=model,
        output_dir=output_dir, evaluation=evaluation, settings={"smoothquant_alpha": smoothquant_alpha}, **options,
    )
