"""lm-evaluation-harness models whose super weights are edited before evaluation.

Importing this module registers two models with ``lm_eval.api.registry``:

``superweight``
    Readable arguments, e.g. ``--model superweight --model_args
    pretrained=smollm2-135m,scale=0.0`` or ``prune_outliers=1e-6,keep_super_weights=true``.
``hf-outlier``
    The ``--model_args`` of the research code of Yu et al. (2024), "The Super Weight in
    Large Language Models" (``outlier_method=...``,
    ``restore_and_scale_GO=...``), so that their lm-eval commands run unchanged.

Both load the model with :func:`superweight.models.load_model` (so ``pretrained`` is any
model form: catalog name, hub id, local folder or ``.gguf`` file), apply the edit in
place or through forward hooks, and hand the in-memory model to lm_eval's ``HFLM``.
Super weights come from ``super_weights="L:R:C;L:R:C"`` or else from
:func:`superweight.api.resolve_super_weights` (the directory, then detection).

``hf-outlier`` arguments, parsed only here:

``outlier_method=manual_scaling_SO_<factor>``
    Multiply the super weights by ``factor`` (0 prunes them).
``outlier_method=removeSW_restoreSA``
    Prune the super weights and write the original super activation back. The research
    code restores it at the one position per sequence where ``|activation|`` peaks; this
    package restores every position within half of that peak (see
    :func:`superweight.interventions.restored_super_activations`).
``outlier_method=search_percentage_<fraction>_<first>-<end>_<kind>``
    Zero the top ``fraction`` of ``|w|`` in each linear weight matrix of decoder layers
    ``first`` to ``end - 1`` (``end`` is exclusive, as in the research code's
    ``range(first, end)``). An ``end`` past the model's last layer is clamped with a
    warning, since the research code silently skips missing layers: ``0-32`` on a
    30-layer model selects layers 0-29. ``kind`` is ``all``, a module name such as
    ``down_proj`` or ``q_proj``, or ``down`` for ``down_proj``.
``restore_and_scale_GO=<factor>|True|False``
    After the outlier edit, set each super weight to its original value times
    ``factor`` (``True`` means 1.0). ``False`` or ``0``/``0.0`` leaves the weights as the
    outlier edit left them, as the research code does for any false value. With
    ``search_percentage_1e-6_0-32_all``, ``1.0`` is the "Prune non-SW" row of Table 1 and
    ``0.0`` prunes all outliers including the super weights. Without ``outlier_method``
    it scales the super weights.
``manual_quantize=<method>_<bits>_<block>_<clip>_<value>_<scaleshift>_<normalfloat>``
    Round-to-nearest block quantization of every linear weight, parsed by
    :func:`superweight.quantization.parse_manual_quantize` (e.g.
    ``clip_4_65536_z_9_False_False``). With it, ``restore_and_scale_GO`` writes the
    super weights back after rounding (original value times the factor), and
    ``outlier_method`` is not accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from superweight.coordinates import SuperWeight
from superweight.evaluation import InterventionSpec, applied
from superweight.quantization import WeightQuantConfig

log = logging.getLogger(__name__)

# HFLM arguments that still apply when HFLM wraps an already loaded model. Others
# (revision, parallelize, peft, gguf_file, ...) only act while HFLM loads a model itself.
_HFLM_PASSTHROUGH = frozenset({
    "batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "add_bos_token",
    "prefix_token_id", "softmax_dtype", "mixed_precision_dtype", "think_end_token", "enable_thinking",
    "chat_template_args", "backend",
})
_LOADER_ARGUMENTS = ("dtype", "device", "trust_remote_code", "revision", "device_map")


# -- parsing the research code's strings ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutlierMethod:
    """A parsed ``outlier_method`` string of the research code."""

    kind: str
    """``manual_scaling``, ``remove_sw_restore_sa`` or ``search``."""
    scale_factor: float | None = None
    fraction: float | None = None
    first_layer: int | None = None
    end_layer: int | None = None
    """Exclusive end of the layer range."""
    module_kind: str | None = None
    """``all`` or a module name such as ``down_proj``."""


_SEARCH = re.compile(r"^search_(?P<criterion>[^_]+)_(?P<fraction>[^_]+)_(?P<first>[^_-]+)-(?P<end>[^_]+)_(?P<kind>.+)$")
_SEARCH_EXAMPLE = "search_percentage_1e-6_0-32_all"


def parse_outlier_method(method: str) -> OutlierMethod:
    """Parse an ``outlier_method`` string of the research code.

    >>> parse_outlier_method("manual_scaling_SO_0.5").scale_factor
    0.5
    >>> parse_outlier_method("search_percentage_1e-6_0-32_all").end_layer
    32
    """
    if not isinstance(method, str) or not method.strip():
        raise ValueError(
            f"outlier_method={method!r} is invalid; use manual_scaling_SO_<factor>, removeSW_restoreSA "
            f"or search_percentage_<fraction>_<first>-<end>_<kind>"
        )
    method = method.strip()
    if method.startswith("manual_scaling_SO_"):
        text = method.removeprefix("manual_scaling_SO_")
        factor = _parse_float(text)
        if factor is None or not math.isfinite(factor) or factor < 0:
            raise ValueError(
                f"outlier_method={method!r}: scaling factor {text!r} is not a finite number >= 0; "
                "write manual_scaling_SO_<factor>, e.g. manual_scaling_SO_0.0 to prune the super weights"
            )
        return OutlierMethod("manual_scaling", scale_factor=factor)
    if method == "removeSW_restoreSA":
        return OutlierMethod("remove_sw_restore_sa")
    if method.startswith("search_"):
        return _parse_search(method)
    raise ValueError(
        f"outlier_method={method!r} is not supported; use manual_scaling_SO_<factor>, removeSW_restoreSA or "
        f"search_percentage_<fraction>_<first>-<end>_<kind> (e.g. {_SEARCH_EXAMPLE})"
    )


def _parse_search(method: str) -> OutlierMethod:
    match = _SEARCH.match(method)
    if match is None:
        raise ValueError(
            f"outlier_method={method!r} is malformed; write search_percentage_<fraction>_<first>-<end>_<kind>, "
            f"e.g. {_SEARCH_EXAMPLE} (layers first..end-1, kind all or a module name such as down_proj)"
        )
    if match["criterion"] != "percentage":
        raise ValueError(
            f"outlier_method={method!r}: search criterion {match['criterion']!r} is not supported; "
            f"use percentage, e.g. {_SEARCH_EXAMPLE}"
        )
    fraction = _parse_float(match["fraction"])
    if fraction is None or not math.isfinite(fraction) or not 0 < fraction < 1:
        raise ValueError(
            f"outlier_method={method!r}: fraction {match['fraction']!r} must be a number in (0, 1), e.g. 1e-6"
        )
    try:
        first, end = int(match["first"]), int(match["end"])
    except ValueError:
        raise ValueError(
            f"outlier_method={method!r}: layer range {match['first']}-{match['end']} is not two integers; "
            "write <first>-<end> with end exclusive, e.g. 0-32"
        ) from None
    if first < 0 or end <= first:
        raise ValueError(
            f"outlier_method={method!r}: layer range {first}-{end} is empty; the end is exclusive, "
            f"so use e.g. {first}-{first + 1} for layer {first} alone"
        )
    kind = "down_proj" if match["kind"] == "down" else match["kind"]
    return OutlierMethod("search", fraction=fraction, first_layer=first, end_layer=end, module_kind=kind)


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_restore_and_scale(value: Any) -> float | None:
    """Parse ``restore_and_scale_GO``: the factor to set super weights to, or None for no change.

    Any false value (``False``, ``0``, ``0.0``, ``"False"``, ``None``) means no change, as
    in the research code; ``True`` means 1.0.

    >>> parse_restore_and_scale(True), parse_restore_and_scale("0.0"), parse_restore_and_scale(1.5)
    (1.0, None, 1.5)
    """
    if value is None or isinstance(value, bool):
        return 1.0 if value else None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false", "none", ""):
            return 1.0 if text.lower() == "true" else None
        parsed = _parse_float(text)
        if parsed is None:
            raise ValueError(
                f"restore_and_scale_GO={value!r} is invalid; use a factor such as 1.0, or True/False"
            )
        value = parsed
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"restore_and_scale_GO={value!r} is invalid; use a finite factor >= 0, or True/False")
    return float(value) if value else None


def hf_outlier_spec(
    outlier_method: str | None, restore_and_scale_GO: Any = False, num_layers: int | None = None
) -> InterventionSpec:
    """Translate the research code's ``hf-outlier`` arguments into an :class:`InterventionSpec`.

    ``num_layers`` (the model's decoder layer count) validates and clamps the layer range
    of a ``search_...`` method; without it the range is used as written.
    """
    method = parse_outlier_method(outlier_method) if outlier_method is not None else None
    restore = parse_restore_and_scale(restore_and_scale_GO)
    if method is None:
        return InterventionSpec(scale_factor=restore)
    if method.kind == "manual_scaling":
        if restore is not None:
            raise ValueError(
                f"outlier_method={outlier_method!r} and restore_and_scale_GO={restore_and_scale_GO!r} both set the "
                "super weights; pass only one of them"
            )
        return InterventionSpec(scale_factor=method.scale_factor)
    if method.kind == "remove_sw_restore_sa":
        if restore is not None:
            raise ValueError(
                f"outlier_method=removeSW_restoreSA prunes the super weights, so restore_and_scale_GO="
                f"{restore_and_scale_GO!r} contradicts it; drop restore_and_scale_GO"
            )
        return InterventionSpec(restore_super_activation=True)
    first, end = method.first_layer, method.end_layer
    if num_layers is not None:
        if first >= num_layers:
            raise ValueError(
                f"outlier_method={outlier_method!r}: layer range {first}-{end} starts past the model's last "
                f"layer {num_layers - 1}; use a range within 0-{num_layers} (end exclusive)"
            )
        if end > num_layers:
            log.warning(
                "outlier_method %s: layer range %d-%d ends past the model's %d layers; using layers %d-%d",
                outlier_method, first, end, num_layers, first, num_layers - 1,
            )
            end = num_layers
    return InterventionSpec(
        prune_outliers=method.fraction,
        outlier_layers=tuple(range(first, end)),
        outlier_kinds=None if method.module_kind == "all" else (method.module_kind,),
        # Setting each super weight to original * factor after pruning equals keeping it
        # through the pruning and then scaling it by factor.
        keep_super_weights=restore is not None,
        scale_factor=restore if restore not in (None, 1.0) else None,
    )


# -- parsing the readable arguments ----------------------------------------------------


def parse_super_weights(value: Any) -> list[SuperWeight] | None:
    """Parse ``"L:R:C;L:R:C"`` (``;`` or whitespace between coordinates) into super weights."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValueError(f"super_weights={value!r} is invalid; write LAYER:ROW:COL;LAYER:ROW:COL, e.g. 2:3968:7003")
    return [SuperWeight.parse(item) for item in re.split(r"[;\s]+", value.strip()) if item]


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}={value!r} is invalid; use true or false")


def _parse_optional_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        parsed = _parse_float(value.strip())
        if parsed is None:
            raise ValueError(f"{name}={value!r} is not a number")
        return parsed
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is not a number")
    return float(value)


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """Parse ``outlier_layers``: ``"<first>-<end>"`` (end exclusive), ``"i;j;k"`` or one integer.

    >>> parse_layers("2-5"), parse_layers("1;3"), parse_layers(4)
    ((2, 3, 4), (1, 3), (4,))
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    text = str(value).strip()
    range_match = re.fullmatch(r"(\d+)-(\d+)", text)
    if range_match:
        first, end = int(range_match[1]), int(range_match[2])
        if end <= first:
            raise ValueError(f"outlier_layers={value!r} is empty; <first>-<end> excludes end, e.g. 0-32")
        return tuple(range(first, end))
    try:
        return tuple(int(item) for item in re.split(r"[;\s]+", text) if item)
    except ValueError:
        raise ValueError(
            f"outlier_layers={value!r} is invalid; write <first>-<end> (end exclusive) or i;j;k"
        ) from None


def parse_kinds(value: Any) -> tuple[str, ...] | None:
    """Parse ``outlier_kinds``: ``all`` or module names separated by ``;``, e.g. ``q_proj;k_proj``."""
    if value is None:
        return None
    kinds = tuple(item for item in re.split(r"[;\s]+", str(value).strip()) if item)
    if not kinds or "all" in kinds:
        return None
    return tuple("down_proj" if kind == "down" else kind for kind in kinds)


# -- the harness models --------------------------------------------------------------------


class _EditedHFLM(HFLM):
    """HFLM around a model loaded by superweight and edited in place before evaluation."""

    registered_name = "superweight"

    def _build(
        self,
        pretrained: str,
        make_spec,
        super_weights: Any,
        loader_args: dict[str, Any],
        harness_args: dict[str, Any],
        extra_info: dict[str, Any],
        quantization: WeightQuantConfig | None = None,
    ) -> None:
        from superweight.api import resolve_super_weights
        from superweight.adapters import get_adapter
        from superweight.models import load_model

        unknown = sorted(set(harness_args) - _HFLM_PASSTHROUGH)
        if unknown:
            raise ValueError(
                f"{self.registered_name} does not accept model argument(s) {', '.join(unknown)}; "
                f"it accepts {', '.join(sorted(self.accepted_arguments()))}"
            )
        if not isinstance(pretrained, str) or not pretrained.strip():
            raise ValueError(
                f"{self.registered_name} needs pretrained=<model>: a catalog name, hub id, folder or .gguf file"
            )
        explicit = parse_super_weights(super_weights)
        make_spec(None)  # validate the arguments before the model loads
        loaded = load_model(
            pretrained,
            dtype=loader_args.get("dtype"),
            device=loader_args.get("device"),
            trust_remote_code=_parse_bool("trust_remote_code", loader_args.get("trust_remote_code", False)),
            device_map=loader_args.get("device_map"),
            revision=loader_args.get("revision"),
        )
        spec = make_spec(get_adapter(loaded.model).num_layers(loaded.model))
        if spec.needs_super_weights or (quantization is not None and quantization.keep_super_weights):
            sws, source = resolve_super_weights(loaded, explicit)
        else:
            sws, source = (sorted(set(explicit)), "explicit") if explicit else ([], None)

        quantization_report = None
        if quantization is not None:
            from superweight.quantization import quantize_weights_

            # In place and without a backup, because a copy would double the model's memory.
            quantization_report = quantize_weights_(loaded.model, quantization, super_weights=sws).to_dict()
        stack = contextlib.ExitStack()
        details = stack.enter_context(applied(loaded.model, spec, sws))
        try:
            super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **harness_args)
        except BaseException:
            stack.close()
            raise
        self._edit_stack = stack
        self.loaded = loaded
        self.intervention = spec
        self.super_weights = sws
        self.edit_info = {
            **extra_info,
            "model": loaded.provenance(),
            "intervention": details,
            "quantization": quantization_report,
            "super_weights": [sw.to_spec() for sw in sws],
            "super_weights_source": source,
        }
        log.info(
            "%s: %s on %s (super weights %s from %s)", self.registered_name, spec.describe(), pretrained,
            [sw.to_spec() for sw in sws], source,
        )

    @classmethod
    def accepted_arguments(cls) -> set[str]:
        """Return the model argument names this model accepts."""
        raise NotImplementedError

    def remove_edits(self) -> None:
        """Undo the intervention: restore the edited weights and remove hooks.

        A ``manual_quantize`` quantization stays, because it is applied without a backup.
        """
        self._edit_stack.close()

    def get_model_info(self) -> dict:
        """Return HFLM's model info plus the edit, model source and super weights."""
        info = super().get_model_info()
        info["model_sha"] = self.loaded.sha256 or ""
        info["superweight"] = self.edit_info
        return info


@register_model("superweight")
class SuperWeightLM(_EditedHFLM):
    """Evaluate a model with an :class:`~superweight.evaluation.InterventionSpec` applied.

    ``--model_args`` (all optional except ``pretrained``): ``super_weights=L:R:C;L:R:C``,
    ``scale=<factor>``, ``restore_super_activation=true``, ``prune_outliers=<fraction>``,
    ``keep_super_weights=true``, ``outlier_layers=<first>-<end>`` (end exclusive) or
    ``i;j;k``, ``outlier_kinds=down_proj;q_proj``, ``dtype``, ``device``,
    ``trust_remote_code``, ``revision``, ``device_map``.
    """

    registered_name = "superweight"

    def __init__(
        self,
        pretrained: str,
        super_weights: str | None = None,
        scale: float | str | None = None,
        restore_super_activation: bool | str = False,
        prune_outliers: float | str | None = None,
        keep_super_weights: bool | str = False,
        outlier_layers: str | int | None = None,
        outlier_kinds: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool | str = False,
        revision: str | None = None,
        device_map: str | None = None,
        **harness_args: Any,
    ) -> None:
        spec = InterventionSpec(
            scale_factor=_parse_optional_float("scale", scale),
            restore_super_activation=_parse_bool("restore_super_activation", restore_super_activation),
            prune_outliers=_parse_optional_float("prune_outliers", prune_outliers),
            keep_super_weights=_parse_bool("keep_super_weights", keep_super_weights),
            outlier_layers=parse_layers(outlier_layers),
            outlier_kinds=parse_kinds(outlier_kinds),
        )
        self._build(
            pretrained,
            lambda num_layers: spec,
            super_weights,
            {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code,
             "revision": revision, "device_map": device_map},
            harness_args,
            {"registered_model": "superweight"},
        )

    @classmethod
    def accepted_arguments(cls) -> set[str]:
        return {
            "pretrained", "super_weights", "scale", "restore_super_activation", "prune_outliers",
            "keep_super_weights", "outlier_layers", "outlier_kinds", *_LOADER_ARGUMENTS, *_HFLM_PASSTHROUGH,
        }


@register_model("hf-outlier")
class HFOutlierLM(_EditedHFLM):
    """Accept the ``--model_args`` of the research code's ``hf-outlier`` model.

    See the module docstring for ``outlier_method`` and ``restore_and_scale_GO``.
    ``super_weights=L:R:C;L:R:C`` overrides the coordinates, which otherwise come from
    the directory of known super weights or from detection.
    """

    registered_name = "hf-outlier"

    def __init__(
        self,
        pretrained: str,
        outlier_method: str | None = None,
        restore_and_scale_GO: bool | float | str | None = False,
        manual_quantize: str | None = None,
        super_weights: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool | str = False,
        revision: str | None = None,
        device_map: str | None = None,
        **harness_args: Any,
    ) -> None:
        quantization = None
        if manual_quantize is not None:
            from superweight.quantization import parse_manual_quantize

            if outlier_method is not None:
                raise ValueError(
                    f"manual_quantize={manual_quantize!r} with outlier_method={outlier_method!r} is not supported; "
                    "pass one of them"
                )
            # restore_and_scale_GO belongs to the quantization: the super weights get their
            # original values times the factor back after rounding.
            quantization = parse_manual_quantize(manual_quantize, parse_restore_and_scale(restore_and_scale_GO) or False)

        def make_spec(num_layers: int | None) -> InterventionSpec:
            if quantization is not None:
                return InterventionSpec()
            return hf_outlier_spec(outlier_method, restore_and_scale_GO, num_layers)

        self._build(
            pretrained,
            make_spec,
            super_weights,
            {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code,
             "revision": revision, "device_map": device_map},
            harness_args,
            {"registered_model": "hf-outlier", "outlier_method": outlier_method,
             "restore_and_scale_GO": restore_and_scale_GO, "manual_quantize": manual_quantize},
            quantization,
        )

    @classmethod
    def accepted_arguments(cls) -> set[str]:
        return {
            "pretrained", "outlier_method", "restore_and_scale_GO", "manual_quantize", "super_weights",
            *_LOADER_ARGUMENTS, *_HFLM_PASSTHROUGH,
        }


def registered_names() -> Sequence[str]:
    """Return the lm_eval model names this module registers."""
    return ("superweight", "hf-outlier")
