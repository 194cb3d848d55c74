"""Draw the figures of the super weight paper for any supported causal LM.

The paper is Yu et al. (2024), "The Super Weight in Large Language Models"
(arXiv 2411.07191), and figure and table numbers below are its own. Each figure has a
function that measures (``residual_maxima``, ``down_proj_activations``,
``next_token_probabilities``) and one that draws (``*_figure``). A drawing function returns
a :class:`FigureResult`: the matplotlib ``Figure`` and the data it plots, so a caller can
check the plot against the measurement or save the numbers next to the image.

========================  =============================================================
figure                    what it shows
========================  =============================================================
``detection``             per layer, max |down_proj input| and |output|; candidates and
                          super weights marked with ``[row, col]`` (paper Fig. 3)
``residual``              per layer, max |residual stream| for the original model and
                          three ablations (paper Fig. 4)
``activations``           heat map of |down_proj output| over (token, channel) at a super
                          weight's layer: the super activation is one bright cell
``stopwords``             mean next-token probability of the top tokens over LAMBADA
                          prompts, with and without the super weights (paper Fig. 5)
``sensitivity``           accuracy and perplexity against the super weight scaling factor,
                          read from a ``superweight reproduce sensitivity`` folder (Fig. 6)
``weight-quant``          accuracy and perplexity against the quantization block size,
                          RTN against super-weight-aware RTN, read from a
                          ``superweight reproduce weight-quant`` folder (Fig. 7)
========================  =============================================================

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``, so
no global backend or figure registry is touched and nothing needs a display.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import nn
from tqdm.auto import tqdm

from superweight.adapters import get_adapter
from superweight.coordinates import SuperWeight
from superweight.detect import DEFAULT_PROMPT, DetectionReport
from superweight.interventions import pruned_outliers, pruned_super_weights, restored_super_activations

log = logging.getLogger(__name__)

# -- style ----------------------------------------------------------------------------

# Okabe-Ito colors: distinguishable with the common forms of color blindness.
COLORS = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "purple": "#CC79A7",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "gray": "#7F7F7F",
    "black": "#000000",
}

STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.1,
    "pdf.fonttype": 42,  # embed TrueType, so text in the PDF stays selectable
}

FORMATS = ("png", "pdf", "svg")
DEFAULT_DPI = 150


def _styled(draw: Callable[..., FigureResult]) -> Callable[..., FigureResult]:
    """Run a drawing function under :data:`STYLE`, leaving the caller's rcParams untouched."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> FigureResult:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def _title(figure: Figure, what: str, model_label: str | None, settings: str | None) -> str:
    title = f"{model_label}: {what}" if model_label else what
    if settings:
        title += f"\n{settings}"
    figure.suptitle(title, fontsize=STYLE["figure.titlesize"])
    return title


# -- the result type ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FigureResult:
    """A drawn figure and the data it plots.

    ``data`` contains plain Python values (lists, numbers, strings) in the order they are
    plotted, so it can be written as JSON next to the image.
    """

    name: str
    figure: Figure
    data: dict[str, Any]
    caption: str

    def save(self, directory: str | os.PathLike, formats: Sequence[str] = ("png",), *,
             stem: str | None = None, dpi: int = DEFAULT_DPI) -> list[Path]:
        """Write the figure as ``directory/<stem>.<format>`` for each format; return the paths.

        Each file is written to a temporary name in the same folder and renamed, so an
        interrupted run never leaves a truncated image.
        """
        formats = check_formats(formats)
        directory = check_output_dir(directory)
        paths = []
        for fmt in formats:
            path = directory / f"{stem or self.name}.{fmt}"
            tmp = directory / f".{path.name}.{os.getpid()}.tmp"
            try:
                # os.open with mode 0o666 lets the umask set the permissions, as open() would.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                with os.fdopen(fd, "wb") as handle:
                    self._write(handle, fmt, dpi)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            paths.append(path)
            log.info("wrote %s", path)
        return paths

    def to_bytes(self, fmt: str = "png", dpi: int = DEFAULT_DPI) -> bytes:
        """Render the figure into memory in format ``fmt``."""
        buffer = io.BytesIO()
        self._write(buffer, check_formats([fmt])[0], dpi)
        return buffer.getvalue()

    def _write(self, handle, fmt: str, dpi: int) -> None:
        # PNG and PDF embed the matplotlib version and a date by default; drop them so
        # the same data gives the same bytes.
        metadata = {"Software": None} if fmt == "png" else {"Creator": None, "Producer": None, "CreationDate": None} if fmt == "pdf" else {"Date": None, "Creator": None}
        with matplotlib.rc_context(STYLE):
            self.figure.savefig(handle, format=fmt, dpi=dpi, metadata=metadata)


def check_formats(formats: Iterable[str] | str) -> list[str]:
    """Return the image formats of a list or a comma-separated string, validated."""
    if isinstance(formats, str):
        formats = formats.split(",")
    cleaned = [fmt.strip().lower().lstrip(".") for fmt in formats if fmt.strip()]
    bad = [fmt for fmt in cleaned if fmt not in FORMATS]
    if bad or not cleaned:
        raise ValueError(f"image format(s) {bad or list(formats)!r} are not supported; use a comma-separated list of {', '.join(FORMATS)}")
    return list(dict.fromkeys(cleaned))


def check_output_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and check that files can be written into it.

    Raises ``ValueError`` naming the folder and the reason (a file in the way, no
    permission), so a long computation does not end on an unwritable path.
    """
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} is an existing file; pass a folder with --output")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".superweight-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(
            f"cannot write to output folder {str(path)!r}: {error.strerror or error}; "
            "choose a folder you can write to with --output"
        ) from None
    return path


# -- tokens -------------------------------------------------------------------------


def token_text(tokenizer: Any, token_id: int) -> str:
    """Return the text of one token id, decoded where the tokenizer can decode."""
    decode = getattr(tokenizer, "decode", None)
    if decode is not None:
        try:
            return decode([int(token_id)])
        except (TypeError, ValueError, KeyError, IndexError):
            pass
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def display_token(text: str) -> str:
    """Make a token readable as a tick label: spaces as ␣, newlines and tabs escaped.

    >>> display_token(" the")
    '␣the'
    >>> display_token("\\n")
    '\\\\n'
    >>> display_token("\\x0b")
    '\\\\x0b'
    """
    escapes = {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "␣"}
    # Other control and format characters have no glyph in the figure font.
    shown = "".join(
        escapes.get(ch, f"\\x{ord(ch):02x}" if unicodedata.category(ch) in ("Cc", "Cf") else ch) for ch in text
    )
    return shown if shown else "∅"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, return_tensors="pt").input_ids[0].tolist()]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- detection (paper Fig. 3) -----------------------------------------------------------

_MARK_STYLES = {
    # status: (legend label, marker, color, filled)
    "confirmed": ("super weight (causal test confirmed)", "*", COLORS["vermillion"], True),
    "known": ("super weight (known, from the directory)", "*", COLORS["vermillion"], True),
    "candidate": ("candidate, not verified", "o", COLORS["orange"], False),
    "rejected": ("candidate rejected by the causal test", "X", COLORS["gray"], True),
}
_MARK_RANK = {"confirmed": 0, "known": 1, "candidate": 2, "rejected": 3}


def _mark_status(report: DetectionReport, sw: SuperWeight, status: str) -> str:
    if report.config.verify:
        return status
    known = {SuperWeight(**d) for d in (report.directory or {}).get("known", [])}
    return "known" if sw in known else "candidate"


@_styled
def detection_figure(report: DetectionReport, *, log_scale: bool = False, model_label: str | None = None) -> FigureResult:
    """Draw per-layer max |down_proj input| and |output| of the unedited model (paper Fig. 3).

    Layers with candidates are marked and annotated with ``[row, col]``: confirmed or known
    super weights as stars, unverified candidates as circles, rejected ones as crosses.
    Candidates found in later detection passes, after earlier ones were zeroed, are
    marked at their layer on these first-pass curves.
    """
    stats = report.layers
    layers = [s.layer for s in stats]
    max_input = [float(s.max_input) for s in stats]
    max_output = [float(s.max_output) for s in stats]
    residual = [s.residual_max_output for s in stats]
    has_residual = all(value is not None for value in residual)
    model_label = model_label or _report_label(report)

    marks = []
    for c in report.candidates:
        marks.append({**c.super_weight.to_dict(), "status": _mark_status(report, c.super_weight, c.status),
                      "super_activation": float(c.super_activation), "iteration": c.iteration})

    figure, (ax_in, ax_out) = _new_figure(11, 4.4, ncols=2)
    ax_in.plot(layers, max_input, marker="o", markersize=3, color=COLORS["blue"], label="max |input|")
    ax_out.plot(layers, max_output, marker="o", markersize=3, color=COLORS["blue"], label="max |down_proj output|")
    if has_residual:
        ax_out.plot(layers, [float(v) for v in residual], linestyle="--", color=COLORS["sky"],
                    label="max |post-MLP norm output| (enters the residual)")
    ax_in.set_title("down_proj input (MLP hidden activation)")
    ax_out.set_title("down_proj output")
    ax_in.set_ylabel("max |activation| over tokens and channels")
    for ax in (ax_in, ax_out):
        ax.set_xlabel("layer")
        ax.set_yscale("log" if log_scale else "linear")
        ax.set_xlim(-0.5, max(layers) + 1)

    by_layer: dict[int, list[dict[str, Any]]] = {}
    for mark in marks:
        by_layer.setdefault(mark["layer"], []).append(mark)
    used_status = set()
    for layer, group in sorted(by_layer.items()):
        best = min(group, key=lambda m: _MARK_RANK[m["status"]])["status"]
        used_status.add(best)
        _, marker, color, filled = _MARK_STYLES[best]
        # The input panel names the channel of the largest input, the output panel the coordinates.
        coordinates = [f"[{m['row']}, {m['col']}]" + (" (rejected)" if m["status"] == "rejected" else "") for m in group]
        labels = {ax_in: [f"channel {stats[layer].input_channel}"], ax_out: coordinates}
        for ax, values in ((ax_in, max_input), (ax_out, max_output)):
            ax.plot([layer], [values[layer]], linestyle="none", marker=marker, markersize=13, clip_on=False,
                    markerfacecolor=color if filled else "none", markeredgecolor=color, markeredgewidth=1.5, zorder=5)
            text = "\n".join([f"layer {layer}", *labels[ax]])
            _annotate_point(ax, layer, values[layer], text, color, len(layers))

    handles = [Line2D([], [], color=COLORS["blue"], marker="o", markersize=3, label="max over tokens and channels")]
    if has_residual:
        handles.append(Line2D([], [], color=COLORS["sky"], linestyle="--", label="after the post-MLP norm"))
    for status in sorted(used_status, key=_MARK_RANK.get):
        label, marker, color, filled = _MARK_STYLES[status]
        handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=10, label=label,
                              markerfacecolor=color if filled else "none", markeredgecolor=color))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))

    settings = f"prompt {report.config.prompt!r}"
    title = _title(figure, "max |activation| of each layer's MLP down-projection", model_label, settings)

    def listing(status: tuple[str, ...]) -> str:
        return ", ".join(str(SuperWeight(m["layer"], m["row"], m["col"])) for m in marks if m["status"] in status)

    caption = (
        f"{title.splitlines()[0]}. Coordinates are [row, col] = [output channel, input channel] of "
        "down_proj.weight (nn.Linear convention). "
    )
    if report.config.verify:
        caption += (f"Confirmed by the causal test (perplexity with the weight zeroed): {listing(('confirmed',)) or 'none'}; "
                    f"rejected: {listing(('rejected',)) or 'none'}.")
    else:
        caption += (f"Known super weights (directory): {listing(('known',)) or 'none'}; other candidates, not "
                    f"causally tested: {listing(('candidate',)) or 'none'}. Run with --verify to test them.")
    data = {
        "layers": layers, "max_input": max_input, "input_channel": [s.input_channel for s in stats],
        "max_output": max_output, "output_channel": [s.output_channel for s in stats],
        "residual_max_output": [float(v) for v in residual] if has_residual else None,
        "marks": marks, "log_scale": log_scale, "prompt": report.config.prompt, "model": model_label,
        "verified": report.config.verify,
    }
    return FigureResult("detection", figure, data, caption)


_LABEL_BOX = {"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}


def _report_label(report: DetectionReport) -> str | None:
    return report.provenance.get("model")


def _annotate_point(ax, x: float, y: float, text: str, color: str, num_x: int) -> None:
    # Labels near the right edge point left so they stay inside the axes.
    right_side = x > 0.6 * num_x
    ax.annotate(
        text, xy=(x, y), xytext=(-10 if right_side else 10, -2), textcoords="offset points",
        ha="right" if right_side else "left", va="top", fontsize=8, color=color,
        bbox=_LABEL_BOX, zorder=6,
    )


# -- residual stream (paper Fig. 4) -----------------------------------------------------

ResidualCondition = Literal["original", "sw-removed", "outliers-removed", "outliers-removed-sw-kept", "sa-restored"]

RESIDUAL_CONDITIONS: dict[str, tuple[str, str]] = {
    # name: (legend label, color)
    "original": ("original", COLORS["blue"]),
    "sw-removed": ("super weights removed", COLORS["vermillion"]),
    "outliers-removed": ("all weight outliers removed (super weights not protected)", COLORS["purple"]),
    "outliers-removed-sw-kept": ("other weight outliers removed, super weights kept", COLORS["green"]),
    "sa-restored": ("super weights removed, super activation restored", COLORS["orange"]),
}
DEFAULT_RESIDUAL_CONDITIONS: tuple[str, ...] = ("original", "sw-removed", "outliers-removed", "outliers-removed-sw-kept")


@dataclasses.dataclass(frozen=True)
class ResidualMaxima:
    """Per layer, the largest |value| of the residual stream after that decoder layer."""

    prompt: str
    super_weights: tuple[SuperWeight, ...]
    outlier_fraction: float
    maxima: dict[str, list[float]]
    """Condition name to max |hidden state| after each layer, over tokens and channels."""
    channels: dict[str, list[int]]
    """Condition name to the channel of that maximum, per layer."""
    tokens: dict[str, list[int]]
    """Condition name to the token position of that maximum, per layer."""
    outliers_zeroed: dict[str, int]
    """Condition name to the number of weights zeroed by outlier pruning (outlier conditions only)."""
    super_weights_zeroed: dict[str, list[SuperWeight]]
    """Condition name to the super weights that are zero while it runs."""

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.maxima.values())))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["super_weights"] = [sw.to_dict() for sw in self.super_weights]
        out["super_weights_zeroed"] = {c: [sw.to_dict() for sw in sws] for c, sws in self.super_weights_zeroed.items()}
        return out


def _layer_output_maxima(model: nn.Module, input_ids: torch.Tensor) -> list[tuple[float, int, int]]:
    """Run the model once and return (max |h|, token, channel) of each decoder layer's output."""
    layers = get_adapter(model).decoder_layers(model)
    found: list[tuple[float, int, int] | None] = [None] * len(layers)

    def make_hook(index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            magnitude = hidden.detach().reshape(-1, hidden.shape[-1]).abs().float()
            flat = int(magnitude.argmax())
            token, channel = divmod(flat, magnitude.shape[-1])
            found[index] = (float(magnitude.reshape(-1)[flat]), token, channel)

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(item is None for item in found):
        raise RuntimeError("a decoder layer's forward hook did not run; check the adapter's layer path")
    return found  # type: ignore[return-value]


def residual_maxima(
    model: nn.Module,
    tokenizer: Any,
    super_weights: Iterable[SuperWeight],
    *,
    prompt: str = DEFAULT_PROMPT,
    outlier_fraction: float = 1e-6,
    conditions: Sequence[str] = DEFAULT_RESIDUAL_CONDITIONS,
) -> ResidualMaxima:
    """Measure max |residual stream| after every decoder layer under each condition.

    Conditions (see :data:`RESIDUAL_CONDITIONS`): ``original``; ``sw-removed`` (super
    weights zeroed); ``outliers-removed`` (the top ``outlier_fraction`` of |w| zeroed in
    every linear layer of the decoder, super weights included when they are among them);
    ``outliers-removed-sw-kept`` (the same, with the super weights put back, "Prune
    non-SW" in Table 1 of the paper); ``sa-restored`` (super weights zeroed, their super activation
    written back). The model is restored after each condition.
    """
    super_weights = tuple(sorted(set(super_weights)))
    unknown = [c for c in conditions if c not in RESIDUAL_CONDITIONS]
    if unknown or not conditions:
        raise ValueError(f"residual conditions {unknown or list(conditions)!r} are invalid; choose from {', '.join(RESIDUAL_CONDITIONS)}")
    if not super_weights and any(c != "original" for c in conditions):
        raise ValueError("no super weights given; pass the model's super weights (see superweight.api.resolve_super_weights)")
    input_ids = torch.tensor([_encode(tokenizer, prompt)], device=_model_device(model))
    if input_ids.shape[1] == 0:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens; use a longer prompt")

    adapter = get_adapter(model)

    def zero_super_weights() -> list[SuperWeight]:
        return [sw for sw in super_weights
                if adapter.down_proj_module(model, sw.layer).weight[adapter.weight_index(sw.row, sw.col)].item() == 0]

    measured: dict[str, list[tuple[float, int, int]]] = {}
    zeroed: dict[str, int] = {}
    sw_zeroed: dict[str, list[SuperWeight]] = {}
    for condition in conditions:
        if condition == "original":
            measured[condition] = _layer_output_maxima(model, input_ids)
            sw_zeroed[condition] = zero_super_weights()
        elif condition == "sw-removed":
            with pruned_super_weights(model, super_weights):
                measured[condition] = _layer_output_maxima(model, input_ids)
                sw_zeroed[condition] = zero_super_weights()
        elif condition == "sa-restored":
            # The weights are zeroed only inside each forward pass of this context.
            with restored_super_activations(model, super_weights):
                measured[condition] = _layer_output_maxima(model, input_ids)
            sw_zeroed[condition] = list(super_weights)
        else:
            keep = super_weights if condition == "outliers-removed-sw-kept" else ()
            with pruned_outliers(model, outlier_fraction, keep_super_weights=keep) as report:
                measured[condition] = _layer_output_maxima(model, input_ids)
                sw_zeroed[condition] = zero_super_weights()
            zeroed[condition] = report.total
        log.debug("residual maxima for %s: %s", condition, [round(m[0], 1) for m in measured[condition]])

    return ResidualMaxima(
        prompt=prompt, super_weights=super_weights, outlier_fraction=float(outlier_fraction),
        maxima={c: [m[0] for m in values] for c, values in measured.items()},
        channels={c: [m[2] for m in values] for c, values in measured.items()},
        tokens={c: [m[1] for m in values] for c, values in measured.items()},
        outliers_zeroed=zeroed, super_weights_zeroed=sw_zeroed,
    )


@_styled
def residual_figure(maxima: ResidualMaxima, *, log_scale: bool = False, model_label: str | None = None) -> FigureResult:
    """Draw max |residual stream| per layer for each condition (paper Fig. 4)."""
    figure, (ax,) = _new_figure(8, 4.6)
    layers = list(range(maxima.num_layers))
    for condition, values in maxima.maxima.items():
        label, color = RESIDUAL_CONDITIONS[condition]
        if condition in maxima.outliers_zeroed:
            label += f" ({maxima.outliers_zeroed[condition]:,} weights)"
        style = "--" if condition == "outliers-removed-sw-kept" else "-"
        ax.plot(layers, values, marker="o", markersize=3, linestyle=style, color=color, label=label)
    sw_layers = sorted({sw.layer for sw in maxima.super_weights})
    for layer in sw_layers:
        ax.axvline(layer, color=COLORS["gray"], linestyle=":", linewidth=1)
    if sw_layers:
        # Label the super weight layers on a top axis, where no curve can hide the text.
        top = ax.secondary_xaxis("top")
        top.set_xticks(sw_layers, labels=[f"super weight\nlayer {layer}" for layer in sw_layers], fontsize=8)
    ax.set_xlabel("layer (residual stream after the decoder layer)")
    ax.set_ylabel("max |hidden state| over tokens and channels")
    ax.set_yscale("log" if log_scale else "linear")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    figure.legend(loc="outside lower center", ncols=2)

    sws = ", ".join(str(sw) for sw in maxima.super_weights)
    settings = f"prompt {maxima.prompt!r}; outliers = top {maxima.outlier_fraction:g} of |w| per linear layer"
    title = _title(figure, "the super activation in the residual stream", model_label, settings)
    caption = (
        f"{title.splitlines()[0]}. Super weights: {sws}. Outlier pruning zeroes the largest "
        f"{maxima.outlier_fraction:g} fraction of |w| (at least one weight) in every attention and MLP "
        "projection of every decoder layer."
    )
    if "outliers-removed" in maxima.super_weights_zeroed:
        hit = maxima.super_weights_zeroed["outliers-removed"]
        caption += (f" Unprotected, it zeroes {len(hit)} of the {len(maxima.super_weights)} super weights"
                    + (f" ({', '.join(map(str, hit))})." if hit else "."))
    data = {**maxima.to_dict(), "layers": layers, "labels": {c: RESIDUAL_CONDITIONS[c][0] for c in maxima.maxima},
            "log_scale": log_scale, "model": model_label}
    return FigureResult("residual", figure, data, caption)


# -- activation heat map ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerActivations:
    """Signed down-projection output of one layer for one prompt, shape ``[tokens, channels]``."""

    layer: int
    module: str
    prompt: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    values: np.ndarray

    def peak(self) -> tuple[int, int, float]:
        """Return ``(token, channel, signed value)`` of the largest |value|."""
        token, channel = np.unravel_index(int(np.abs(self.values).argmax()), self.values.shape)
        return int(token), int(channel), float(self.values[token, channel])


def down_proj_activations(model: nn.Module, tokenizer: Any, layer: int, *, prompt: str = DEFAULT_PROMPT) -> LayerActivations:
    """Record the output of ``layers[layer]``'s MLP down-projection for ``prompt``."""
    adapter = get_adapter(model)
    module = adapter.down_proj_module(model, layer)
    ids = _encode(tokenizer, prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens; use a longer prompt")
    captured: list[torch.Tensor] = []

    def hook(mod, args, output):
        y = output if isinstance(output, torch.Tensor) else output[0]
        captured.append(y.detach().reshape(-1, y.shape[-1]).float().cpu())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids], device=_model_device(model)), use_cache=False)
    finally:
        handle.remove()
    return LayerActivations(
        layer=layer, module=adapter.down_proj_name(model, layer), prompt=prompt, token_ids=tuple(ids),
        tokens=tuple(token_text(tokenizer, i) for i in ids), values=captured[-1].numpy(),
    )


def _max_pool_columns(values: np.ndarray, max_columns: int) -> tuple[np.ndarray, int]:
    """Max-pool columns into at most ``max_columns`` bins, so a one-column spike survives drawing.

    >>> _max_pool_columns(np.array([[1.0, 5.0, 2.0, 0.0, 3.0]]), 3)
    (array([[5., 2., 3.]]), 2)
    """
    columns = values.shape[1]
    width = max(1, math.ceil(columns / max_columns))
    if width == 1:
        return values, 1
    padded = np.pad(values, ((0, 0), (0, (-columns) % width)), constant_values=0)
    return padded.reshape(values.shape[0], -1, width).max(axis=2), width


@_styled
def activations_figure(
    activations: LayerActivations, *, super_weights: Iterable[SuperWeight] = (), model_label: str | None = None,
    max_columns: int = 768,
) -> FigureResult:
    """Draw |down_proj output| over (token, channel) as a heat map with a log color scale.

    A panel above the heat map shows each channel's max over tokens, where the super
    activation appears as one peak. The largest entry is circled and annotated; it is
    the super activation when the layer contains a super weight. Models with more than
    ``max_columns`` channels are shown max-pooled over groups of adjacent channels, so
    no spike disappears when the image is drawn.
    """
    magnitude = np.abs(activations.values)
    image, bin_width = _max_pool_columns(magnitude, max_columns)
    vmax = float(magnitude.max())
    positive = magnitude[magnitude > 0]
    # Five decades below the peak show the ordinary activations without washing out the spike.
    vmin = max(float(positive.min()) if positive.size else 1e-6, vmax * 1e-5, 1e-12)
    num_tokens = magnitude.shape[0]
    columns = np.arange(image.shape[1])
    profile = image.max(axis=0)

    figure = Figure(figsize=(11, min(3.6 + 0.28 * num_tokens, 11)), layout="constrained")
    ax_top, ax = figure.subplots(2, 1, sharex=True, height_ratios=[1, max(2.0, num_tokens / 4)])
    ax_top.plot(columns, profile, color=COLORS["blue"], linewidth=1)
    ax_top.set_yscale("log")
    ax_top.set_ylabel("max |activation|\nover tokens")
    ax.grid(False)
    shown = ax.imshow(np.clip(image, vmin, None), aspect="auto", cmap="magma", interpolation="nearest",
                      norm=LogNorm(vmin=vmin, vmax=max(vmax, vmin * 10)),
                      extent=(-0.5, image.shape[1] - 0.5, num_tokens - 0.5, -0.5))
    colorbar = figure.colorbar(shown, ax=[ax_top, ax], pad=0.01, aspect=30)
    colorbar.set_label("|activation| (log scale)")

    step = max(1, math.ceil(num_tokens / 40))
    ticks = list(range(0, num_tokens, step))
    ax.set_yticks(ticks, labels=[f"{display_token(activations.tokens[i])}  {i}" for i in ticks])
    ax.set_ylabel("token (text, position)")
    ax.set_xlabel("output channel" + (f" (max over bins of {bin_width} channels)" if bin_width > 1 else ""))
    ax.set_xlim(-0.5, image.shape[1] - 0.5)

    token, channel, value = activations.peak()
    x = channel // bin_width
    left = x > image.shape[1] / 2
    ax.plot([x], [token], linestyle="none", marker="o", markersize=16, markerfacecolor="none",
            markeredgecolor=COLORS["sky"], markeredgewidth=2)
    ax_top.plot([x], [profile[x]], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
                markeredgecolor=COLORS["vermillion"], markeredgewidth=1.5)
    token_label = display_token(activations.tokens[token])
    ax.annotate(
        f"largest |activation|: {value:+,.1f}\ntoken {token_label!r} (position {token}), channel {channel}",
        xy=(x, token), xytext=(-40 if left else 40, 0), textcoords="offset points", va="center",
        ha="right" if left else "left", fontsize=9, color=COLORS["black"],
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": COLORS["gray"], "alpha": 0.95},
        arrowprops={"arrowstyle": "->", "color": COLORS["sky"], "linewidth": 1.5},
    )
    rows = sorted({sw.row for sw in super_weights if sw.layer == activations.layer})
    rows_text = f"; super weight row(s) {', '.join(map(str, rows))}" if rows else ""
    settings = f"{activations.module} output, prompt {activations.prompt!r}{rows_text}"
    title = _title(figure, f"|activation| at layer {activations.layer}", model_label, settings)
    caption = (
        f"{title.splitlines()[0]}: output of {activations.module} for each token (rows) and channel "
        f"(columns), log color scale; the top panel shows each channel's max over tokens. The largest "
        f"|value|, {abs(value):,.1f}, is at token {token_label!r} (position {token}), channel {channel}."
    )
    data = {
        "layer": activations.layer, "module": activations.module, "prompt": activations.prompt,
        "tokens": list(activations.tokens), "token_ids": list(activations.token_ids),
        "values": magnitude.tolist(), "image": image.tolist(), "channel_max": profile.tolist(),
        "bin_width": bin_width, "peak": {"token": token, "channel": channel, "value": value},
        "color_range": [vmin, vmax], "super_weight_rows": rows, "model": model_label,
    }
    return FigureResult("activations", figure, data, caption)


# -- stop words (paper Fig. 5) -------------------------------------------------------------

# English function words. A token is a stop word when its stripped, lower-cased text is in
# this set, or when it is made only of punctuation, symbols and whitespace.
STOP_WORDS = frozenset("""
a an the this that these those some any no every each all both either neither
i me my mine myself you your yours yourself he him his himself she her hers herself it its itself
we us our ours ourselves they them their theirs themselves one who whom whose which what
am is are was were be been being have has had having do does did doing will would shall should
can could may might must ought
and but or nor so yet for if then than because as while although though unless until since
of at by with about against between into through during before after above below to from up down
in out on off over under again further once here there when where why how
not only own same too very just also s t d ll m re ve don didn doesn isn wasn aren weren
""".split())


def is_stop_word(text: str) -> bool:
    """Return whether a token's text is an English function word, punctuation or whitespace.

    >>> [is_stop_word(t) for t in (" the", ".", ",\\n", ".\u201d", " cat", "")]
    [True, True, True, True, False, True]
    """
    stripped = text.strip().lower()
    # Unicode categories P* (punctuation) and S* (symbols) also cover curly quotes and dashes.
    return stripped in STOP_WORDS or all(unicodedata.category(ch)[0] in "PS" for ch in stripped)


def lambada_prompts(num_prompts: int = 500) -> list[str]:
    """Return the first ``num_prompts`` LAMBADA (OpenAI test split) passages without their last word.

    Reads the offline copy rebuilt by :func:`superweight.tasks.rebuilt_split`.
    """
    from superweight import tasks

    if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts!r} is invalid; use an integer >= 1")
    prompts = []
    with open(tasks.rebuilt_split("lambada_openai"), encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            prompts.append(text.rsplit(" ", 1)[0])
            if len(prompts) == num_prompts:
                break
    if len(prompts) < num_prompts:
        raise ValueError(f"num_prompts={num_prompts} is more than the {len(prompts)} LAMBADA passages; use at most {len(prompts)}")
    return prompts


@dataclasses.dataclass(frozen=True)
class NextTokenProbabilities:
    """Next-token distributions averaged over prompts, with and without the super weights."""

    original: np.ndarray
    """Mean over prompts of the softmax at each prompt's last position, shape ``[vocab]``."""
    removed: np.ndarray
    """The same with the super weights zeroed."""
    super_weights: tuple[SuperWeight, ...]
    num_prompts: int
    num_tokens: int
    """Prompt tokens fed per condition, padding excluded."""


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _last_token_probabilities(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              lengths: torch.Tensor, use_logits_to_keep: bool) -> torch.Tensor:
    last = lengths - 1
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    positions = torch.unique(last)
    if use_logits_to_keep:
        # Project only the positions some sequence ends at onto the vocabulary.
        kwargs["logits_to_keep"] = positions
        logits = model(**kwargs).logits
    else:
        logits = model(**kwargs).logits[:, positions]
    index = torch.searchsorted(positions, last)
    chosen = logits[torch.arange(len(lengths), device=logits.device), index].float()
    return torch.softmax(chosen, dim=-1)


def _clone_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone_output(item) for item in output)
    return output


@contextlib.contextmanager
def _recorded_output(module: nn.Module) -> Iterator[dict[str, Any]]:
    """Keep a copy of ``module``'s output of each forward pass in the yielded dict, under ``"output"``."""
    record: dict[str, Any] = {}

    def hook(mod, args, output):
        # A copy, because a later layer may update its input in place.
        record["output"] = _clone_output(output)

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextlib.contextmanager
def _replayed_layers(layers: Sequence[nn.Module], output: Any) -> Iterator[None]:
    """Skip the computation of ``layers`` inside the block: each returns ``output``.

    Only the last of them feeds the rest of the model, so when ``output`` is what the
    last one returned on the same input, the model's result is unchanged.
    """
    def replay(*args: Any, **kwargs: Any) -> Any:
        return output

    try:
        for layer in layers:
            layer.forward = replay
        yield
    finally:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward  # back to the class's forward


def next_token_probabilities(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    super_weights: Iterable[SuperWeight],
    *,
    batch_size: int = 16,
    max_tokens: int = 1024,
    progress: bool = True,
) -> NextTokenProbabilities:
    """Average the next-token distribution at each prompt's end, with and without the super weights.

    Prompts are sorted by length and batched with right padding and an attention mask,
    so each batch pads little. Prompts longer than ``max_tokens`` keep their last
    ``max_tokens`` tokens. Each batch runs twice, unedited and with the super weights
    zeroed; the weights are restored after every batch. The decoder layers before the
    first super weight's layer compute the same in both passes, so the second pass
    reuses their output instead of running them again.
    """
    super_weights = tuple(sorted(set(super_weights)))
    if not prompts:
        raise ValueError("no prompts given; pass at least one, e.g. lambada_prompts(500)")
    if not super_weights:
        raise ValueError("no super weights given; pass the model's super weights (see superweight.api.resolve_super_weights)")
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch_size={batch_size!r} and max_tokens={max_tokens!r} must be integers >= 1")
    device = _model_device(model)
    encoded = [_encode(tokenizer, p)[-max_tokens:] for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) tokenizes to no tokens; remove it")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    use_logits_to_keep = _accepts_logits_to_keep(model)
    decoder_layers = get_adapter(model).decoder_layers(model)
    shared = decoder_layers[: min(sw.layer for sw in super_weights)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))

    sums = {"original": None, "removed": None}
    num_tokens = 0
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="next-token probabilities", unit="batch", disable=not progress):
        lengths = torch.tensor([len(encoded[i]) for i in batch], device=device)
        width = int(lengths.max())
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, i in enumerate(batch):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i], device=device)
            attention_mask[row, : len(encoded[i])] = 1
        num_tokens += int(lengths.sum())
        if shared:
            with _recorded_output(shared[-1]) as prefix:
                original = _last_token_probabilities(model, input_ids, attention_mask, lengths, use_logits_to_keep)
            with pruned_super_weights(model, super_weights), _replayed_layers(shared, prefix["output"]):
                removed = _last_token_probabilities(model, input_ids, attention_mask, lengths, use_logits_to_keep)
        else:
            original = _last_token_probabilities(model, input_ids, attention_mask, lengths, use_logits_to_keep)
            with pruned_super_weights(model, super_weights):
                removed = _last_token_probabilities(model, input_ids, attention_mask, lengths, use_logits_to_keep)
        probabilities = {"original": original, "removed": removed}
        for key, value in probabilities.items():
            total = value.double().sum(dim=0).cpu()
            sums[key] = total if sums[key] is None else sums[key] + total
    return NextTokenProbabilities(
        original=(sums["original"] / len(prompts)).numpy(), removed=(sums["removed"] / len(prompts)).numpy(),
        super_weights=super_weights, num_prompts=len(prompts), num_tokens=num_tokens,
    )


def top_tokens(probabilities: NextTokenProbabilities, top_k: int = 10) -> tuple[list[int], list[int]]:
    """Return the ``top_k`` most probable tokens of the original model, then those of the
    model without super weights that are not already listed, each group by its own probability."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} is invalid; use an integer >= 1")
    original = np.argsort(-probabilities.original, kind="stable")[:top_k].tolist()
    removed = [i for i in np.argsort(-probabilities.removed, kind="stable")[:top_k].tolist() if i not in original]
    return original, removed


def format_ratio(ratio: float) -> str:
    """Format a probability ratio compactly: two significant digits, powers of ten when far from 1.

    >>> [format_ratio(r) for r in (2.04, 0.075, 123.4, 1.4e8, 6.9e-06, float("inf"))]
    ['×2', '×0.075', '×120', '×1.4e8', '×6.9e-6', 'from 0']
    """
    if not math.isfinite(ratio):
        return "from 0"
    if 0.01 <= ratio < 1000:
        return f"×{float(f'{ratio:.2g}'):g}"
    mantissa, exponent = f"{ratio:.1e}".split("e")
    return f"×{mantissa.removesuffix('.0')}e{int(exponent)}"


@_styled
def stopwords_figure(
    probabilities: NextTokenProbabilities, tokenizer: Any, *, top_k: int = 10, log_scale: bool = False,
    model_label: str | None = None,
) -> FigureResult:
    """Draw mean next-token probabilities of the top tokens with and without the super weights (Fig. 5).

    The left group shows the original model's ``top_k`` tokens, the right group the
    tokens that enter the top ``top_k`` once the super weights are removed. Stop words
    and punctuation are shaded and set in bold; the ratio removed / original is written
    above each pair of bars.
    """
    top_original, top_removed = top_tokens(probabilities, top_k)
    ids = top_original + top_removed
    texts = [token_text(tokenizer, i) for i in ids]
    original = [float(probabilities.original[i]) for i in ids]
    removed = [float(probabilities.removed[i]) for i in ids]
    ratios = [r / o if o > 0 else math.inf for o, r in zip(original, removed)]
    stop = [is_stop_word(t) for t in texts]
    # A gap of one bar slot separates the two groups.
    x = np.array([i if i < len(top_original) else i + 1 for i in range(len(ids))], dtype=float)

    figure, (ax,) = _new_figure(max(8.0, 0.55 * (len(ids) + 1) + 2.5), 5.0)
    width = 0.4
    for xi, is_stop in zip(x, stop):
        if is_stop:
            ax.axvspan(xi - 0.5, xi + 0.5, color=COLORS["gray"], alpha=0.15, linewidth=0)
    ax.bar(x - width / 2, original, width, color=COLORS["blue"], label="original")
    ax.bar(x + width / 2, removed, width, color=COLORS["vermillion"], label="super weights removed")
    for xi, o, r, ratio in zip(x, original, removed, ratios):
        ax.annotate(format_ratio(ratio), xy=(xi, max(o, r)), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels=[display_token(t) for t in texts], rotation=45, ha="right", rotation_mode="anchor")
    for label, is_stop in zip(ax.get_xticklabels(), stop):
        if is_stop:
            label.set_fontweight("bold")
    ax.set_xlim(-0.6, x[-1] + 0.6)
    ax.set_yscale("log" if log_scale else "linear")
    ax.margins(y=0.15)
    group_label = {"xycoords": ("data", "axes fraction"), "ha": "center", "va": "bottom", "fontsize": 9}
    ax.annotate(f"top {top_k} of the original model", xy=((len(top_original) - 1) / 2, 1.01), **group_label)
    if top_removed:
        ax.axvline(len(top_original), color=COLORS["gray"], linewidth=1)
        ax.annotate("new in the top without super weights", xy=((x[len(top_original)] + x[-1]) / 2, 1.01), **group_label)
    ax.set_ylabel("mean next-token probability" + (" (log scale)" if log_scale else ""))
    ax.set_xlabel("next token (␣ = space)")
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(color=COLORS["gray"], alpha=0.3, label="stop word or punctuation (bold)"))
    handles.append(Line2D([], [], linestyle="none", marker="$×$", color=COLORS["black"], label="ratio removed / original"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))

    sws = ", ".join(str(sw) for sw in probabilities.super_weights)
    settings = f"{probabilities.num_prompts} LAMBADA prompts (last word removed); removed: {sws}"
    title = _title(figure, "next-token probability with and without the super weights", model_label, settings)
    stop_ratios = [f"{display_token(t)!r} {format_ratio(r)}" for t, r, s in zip(texts, ratios, stop) if s]
    content_ratios = [f"{display_token(t)!r} {format_ratio(r)}" for t, r, s in zip(texts, ratios, stop) if not s]
    caption = (
        f"{title.splitlines()[0]}, averaged over {probabilities.num_prompts} LAMBADA prompts. "
        f"Probability ratio removed / original for stop words and punctuation: "
        f"{', '.join(stop_ratios) or 'none among these tokens'}; for other tokens: "
        f"{', '.join(content_ratios) or 'none among these tokens'}."
    )
    data = {
        "token_ids": ids, "tokens": texts, "original": original, "removed": removed, "ratio": ratios,
        "stop_word": stop, "group": ["original top"] * len(top_original) + ["new without super weights"] * len(top_removed),
        "num_prompts": probabilities.num_prompts, "num_tokens": probabilities.num_tokens,
        "super_weights": [sw.to_dict() for sw in probabilities.super_weights], "top_k": top_k,
        "log_scale": log_scale, "model": model_label,
    }
    return FigureResult("stopwords", figure, data, caption)


# -- result folders of `superweight reproduce` ---------------------------------------------

EXPERIMENTS: dict[str, str] = {
    "table1": "prune the super weight, other outliers, or restore the super activation (paper Table 1)",
    "sensitivity": "scale the super weights by a factor (paper Fig. 6)",
    "weight-quant": "round-to-nearest weight quantization, plain and super-weight-aware (paper Fig. 7)",
    "activation-quant": "W8A8 activation quantization, plain and super-activation-aware",
}


def reproduce_command(experiment: str, model: str = "MODEL", output: str = "DIR") -> str:
    """Return the command line that writes a result folder of ``experiment``."""
    return f"superweight reproduce {experiment} {model} --output {output}"


class ResultFolderError(ValueError):
    """A result folder is missing, unreadable or of another experiment; the message names the command to run."""


@dataclasses.dataclass(frozen=True)
class ResultFolder:
    """A folder written by ``superweight reproduce EXPERIMENT``: its manifest and finished runs."""

    path: Path
    experiment: str
    model: str | None
    settings: dict[str, Any]
    configurations: tuple[str, ...]
    runs: dict[str, dict[str, Any]]
    """Finished runs by configuration name, in manifest order."""
    missing: tuple[str, ...]
    """Configurations listed in the manifest that have no ``runs/<name>.json`` yet."""
    provenance: dict[str, Any]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ResultFolderError(f"{path} is not valid JSON ({error}); rerun the experiment that wrote it") from None


def _check_experiment(path: Path, experiment: Any, expected: str, model: str | None) -> None:
    """Raise :class:`ResultFolderError` unless the folder at ``path`` contains an ``expected`` experiment."""
    if experiment != expected:
        raise ResultFolderError(
            f"{str(path)!r} contains a {experiment!r} experiment, but this needs a {expected!r} experiment; "
            f"write one with `{reproduce_command(expected, model or 'MODEL')}`"
        )


def load_result_folder(path: str | os.PathLike, expected: str | None = None) -> ResultFolder:
    """Read a result folder; with ``expected``, raise unless it contains that experiment."""
    folder = Path(path).expanduser()
    wanted = expected or "EXPERIMENT"

    if not folder.is_dir():
        raise ResultFolderError(
            f"result folder {str(folder)!r} does not exist; write one with `{reproduce_command(wanted, output=str(folder))}`"
        )
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ResultFolderError(
            f"{str(folder)!r} has no manifest.json, so it is not a folder written by `superweight reproduce`; "
            f"write one with `{reproduce_command(wanted, output=str(folder))}`"
        )
    manifest = _read_json(manifest_path)
    experiment = manifest.get("experiment")

    if expected is not None:
        _check_experiment(folder, experiment, expected, manifest.get("model"))

    configurations = tuple(manifest.get("configurations") or ())
    run_dir = folder / "runs"
    runs: dict[str, dict[str, Any]] = {}
    for name in configurations:
        run_path = run_dir / f"{name}.json"
        if run_path.is_file():
            runs[name] = _read_json(run_path)
    # Runs that the manifest does not list come last, by name.
    extra = sorted(p for p in run_dir.glob("*.json") if p.stem not in runs) if run_dir.is_dir() else []
    for run_path in extra:
        runs[run_path.stem] = _read_json(run_path)
    return ResultFolder(
        path=folder, experiment=str(experiment), model=manifest.get("model"), settings=dict(manifest.get("settings") or {}),
        configurations=configurations, runs=runs, missing=tuple(n for n in configurations if n not in runs),
        provenance=dict(manifest.get("provenance") or {}),
    )


def _percent(value: float) -> float:
    # lm_eval reports accuracy as a fraction; result files may store percent.
    return 100.0 * value if abs(value) <= 1.0 else value


def run_accuracy(run: dict[str, Any]) -> tuple[float | None, float | None]:
    """Return a run's average zero-shot accuracy and its standard error, in percent.

    The average is the mean of the tasks' ``acc`` when the run lists tasks, else its
    ``average_accuracy``. The standard error assumes independent tasks:
    ``sqrt(sum se_i^2) / n``.

    >>> run_accuracy({"tasks": {"a": {"acc": 0.5, "acc_stderr": 0.03}, "b": {"acc": 0.7, "acc_stderr": 0.04}}})
    (60.0, 2.5)
    """
    accs = [t["acc"] for t in (run.get("tasks") or {}).values() if isinstance(t, dict) and t.get("acc") is not None]
    if accs:
        errors = [t.get("acc_stderr") for t in run["tasks"].values() if isinstance(t, dict) and t.get("acc") is not None]
        mean = _percent(sum(accs) / len(accs)) if all(abs(a) <= 1 for a in accs) else sum(_percent(a) for a in accs) / len(accs)
        stderr = None
        if all(isinstance(e, (int, float)) for e in errors):
            stderr = math.sqrt(sum(_percent(e) ** 2 for e in errors)) / len(errors)
        return round(mean, 10), None if stderr is None else round(stderr, 10)
    average = run.get("average_accuracy")
    return (None, None) if average is None else (_percent(float(average)), None)


def run_perplexities(run: dict[str, Any]) -> dict[str, float]:
    """Return a run's perplexity per text source."""
    out = {}
    for source, value in (run.get("perplexity") or {}).items():
        number = value.get("perplexity") if isinstance(value, dict) else value
        if isinstance(number, (int, float)):
            out[source] = float(number)
    return out


def _folder_label(folder: ResultFolder, model_label: str | None) -> str:
    return model_label or folder.model or folder.path.name


def _perplexity_axis(ax) -> None:
    """Put ``ax``'s y axis on a log scale labelled with plain numbers (20, 50, 100, not 2×10¹)."""
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    # matplotlib's LogFormatter writes plain numbers and labels minor ticks only when
    # the axis spans few decades, so labels never crowd.
    ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))


@_styled
def sensitivity_figure(folder: ResultFolder, *, model_label: str | None = None) -> FigureResult:
    """Draw average accuracy and perplexity against the super weight scaling factor (Fig. 6)."""
    _check_experiment(folder.path, folder.experiment, "sensitivity", folder.model)
    points = []
    skipped = []
    for name, run in folder.runs.items():
        factor = (run.get("settings") or {}).get("factor")
        if not isinstance(factor, (int, float)):
            skipped.append(name)
            continue
        points.append((float(factor), name, run))
    if not points:
        raise ResultFolderError(f"{str(folder.path)!r} has no finished run with settings.factor; wait for the runs or rerun the experiment")
    if skipped:
        log.warning("skipping runs without settings.factor: %s", skipped)
    points.sort(key=lambda p: p[0])
    factors = [p[0] for p in points]
    accuracy = [run_accuracy(p[2]) for p in points]
    sources = sorted({s for p in points for s in run_perplexities(p[2])})
    perplexity = {s: [run_perplexities(p[2]).get(s) for p in points] for s in sources}
    has_accuracy = any(a[0] is not None for a in accuracy)

    panels = int(has_accuracy) + int(bool(sources))
    if panels == 0:
        raise ResultFolderError(f"runs in {str(folder.path)!r} contain neither task accuracy nor perplexity")
    figure, axes = _new_figure(5.2 * panels, 4.2, ncols=panels)
    panel = iter(axes)
    if has_accuracy:
        ax = next(panel)
        xs = [f for f, a in zip(factors, accuracy) if a[0] is not None]
        ys = [a[0] for a in accuracy if a[0] is not None]
        errors = [a[1] or 0.0 for a in accuracy if a[0] is not None]
        ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", color=COLORS["blue"], capsize=3,
                    label="average zero-shot accuracy")
        ax.set_ylabel("average zero-shot accuracy (%)")
        ax.set_title("accuracy")
    if sources:
        ax_ppl = next(panel)
        palette = [COLORS["vermillion"], COLORS["green"], COLORS["purple"], COLORS["orange"]]
        for (source, values), color in zip(perplexity.items(), palette):
            points = [(f, v) for f, v in zip(factors, values) if v is not None]
            if points:
                ax_ppl.plot(*zip(*points), marker="o", color=color, label=source)
        _perplexity_axis(ax_ppl)
        ax_ppl.set_title("perplexity")
        ax_ppl.legend(loc="best")
    for ax in axes:
        ax.axvline(1.0, color=COLORS["gray"], linestyle=":", linewidth=1)
        ax.annotate("original (×1)", xy=(1.0, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=8, color=COLORS["gray"])
        ax.set_xlabel("super weight scaling factor")

    label = _folder_label(folder, model_label)
    title = _title(figure, "scaling the super weights", label,
                   f"{len(points)} scaling factors, result folder {folder.path.name!r}")
    data = {
        "factors": factors, "configurations": [p[1] for p in points],
        "accuracy": [a[0] for a in accuracy], "accuracy_stderr": [a[1] for a in accuracy],
        "perplexity": perplexity, "skipped": skipped, "missing": list(folder.missing), "model": label,
    }
    best = max((p for p in zip(factors, data["accuracy"]) if p[1] is not None), key=lambda p: p[1], default=None)
    caption = f"{title.splitlines()[0]}: average zero-shot accuracy and perplexity against the scaling factor of the super weights."
    if best is not None:
        caption += f" Highest accuracy {best[1]:.2f}% at ×{best[0]:g}."
    return FigureResult("sensitivity", figure, data, caption)


_METHOD_LABELS = {"rtn": "RTN", "sw-aware": "super-weight-aware RTN"}
_BASELINE_METHODS = {None, "none", "original", "fp16", "bf16", "float", "unquantized"}


_NAMED_BLOCKS = {"channel": "per\nchannel", "tensor": "whole\ntensor"}


def block_size_label(block_size: int | str) -> str:
    """Return a tick label for a block size: ``n²`` for squares of integers, else the count.

    >>> [block_size_label(b) for b in (16384, 65536, 32768, "tensor")]
    ['128²', '256²', '32,768', 'whole\\ntensor']
    """
    if isinstance(block_size, str):
        return _NAMED_BLOCKS.get(block_size, block_size)
    root = math.isqrt(int(block_size))
    return f"{root}²" if root * root == int(block_size) else f"{int(block_size):,}"


@_styled
def weight_quant_figure(folder: ResultFolder, *, model_label: str | None = None) -> FigureResult:
    """Draw accuracy and perplexity against the quantization block size, one line per method (Fig. 7)."""
    _check_experiment(folder.path, folder.experiment, "weight-quant", folder.model)
    baseline = None
    by_method: dict[str, dict[int | str, dict[str, Any]]] = {}
    for name, run in folder.runs.items():
        settings = run.get("settings") or {}
        method = settings.get("method")
        block = settings.get("block_size")
        if method in _BASELINE_METHODS or block is None:
            baseline = run
            continue
        by_method.setdefault(str(method), {})[block] = run
    # Numeric sizes ascending, then named ones ("channel" before "tensor").
    named_order = list(_NAMED_BLOCKS)
    blocks = sorted({b for runs in by_method.values() for b in runs},
                    key=lambda b: (1, named_order.index(b) if b in named_order else len(named_order), str(b))
                    if isinstance(b, str) else (0, b, ""))
    if not blocks:
        raise ResultFolderError(f"{str(folder.path)!r} has no finished quantized run with settings.block_size and method")
    x = list(range(len(blocks)))
    methods = sorted(by_method, key=lambda m: (m != "rtn", m))
    accuracy = {m: [run_accuracy(by_method[m][b])[0] if b in by_method[m] else None for b in blocks] for m in methods}
    sources = sorted({s for runs in by_method.values() for r in runs.values() for s in run_perplexities(r)})
    perplexity = {m: {s: [run_perplexities(by_method[m][b]).get(s) if b in by_method[m] else None for b in blocks]
                      for s in sources} for m in methods}
    has_accuracy = any(v is not None for values in accuracy.values() for v in values)
    panels = int(has_accuracy) + int(bool(sources))
    if panels == 0:
        raise ResultFolderError(f"runs in {str(folder.path)!r} contain neither task accuracy nor perplexity")

    figure, axes = _new_figure(5.4 * panels, 4.4, ncols=panels)
    palette = [COLORS["blue"], COLORS["vermillion"], COLORS["green"], COLORS["purple"]]
    panel = iter(axes)
    base_accuracy = run_accuracy(baseline)[0] if baseline else None
    base_perplexity = run_perplexities(baseline) if baseline else {}
    if has_accuracy:
        ax = next(panel)
        for method, color in zip(methods, palette):
            points = [(xi, v) for xi, v in zip(x, accuracy[method]) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=color, label=_METHOD_LABELS.get(method, method))
        if base_accuracy is not None:
            ax.axhline(base_accuracy, color=COLORS["gray"], linestyle="--", linewidth=1)
        # A row of zeros would otherwise get an axis around 0 with negative accuracies; the
        # small margin below 0 keeps markers at 0 whole.
        top = max(10.0, 1.1 * max([v for values in accuracy.values() for v in values if v is not None]
                                  + [base_accuracy or 0.0]))
        ax.set_ylim(-0.03 * top, top)
        ax.set_ylabel("average zero-shot accuracy (%)")
        ax.set_title("accuracy")
    styles = ["-", "--", ":", "-."]
    if sources:
        ax_ppl = next(panel)
        for method, color in zip(methods, palette):
            for source, style in zip(sources, styles):
                values = perplexity[method][source]
                points = [(xi, v) for xi, v in zip(x, values) if v is not None]
                if points:
                    ax_ppl.plot(*zip(*points), marker="o", color=color, linestyle=style)
        for source, style in zip(sources, styles):
            if source in base_perplexity:
                ax_ppl.axhline(base_perplexity[source], color=COLORS["gray"], linestyle=style, linewidth=1)
        _perplexity_axis(ax_ppl)
        ax_ppl.set_title("perplexity")
    # One legend for both panels: color is the method, line style the text source.
    handles = [Line2D([], [], color=color, marker="o", label=_METHOD_LABELS.get(method, method))
               for method, color in zip(methods, palette)]
    if baseline is not None:
        handles.append(Line2D([], [], color=COLORS["gray"], linewidth=1, label="unquantized"))
    if len(sources) > 1:
        handles += [Line2D([], [], color=COLORS["black"], linestyle=style, label=f"perplexity on {source}")
                    for source, style in zip(sources, styles)]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5))
    for ax in axes:
        ax.set_xticks(x, labels=[block_size_label(b) for b in blocks])
        ax.set_xlabel("block size (weights per block)")

    bits = folder.settings.get("bits") or next((r.get("settings", {}).get("bits") for rs in by_method.values() for r in rs.values()
                                                 if r.get("settings", {}).get("bits")), None)
    label = _folder_label(folder, model_label)
    settings = (f"INT{bits} " if bits else "") + "round-to-nearest, asymmetric min-max per block"
    title = _title(figure, "weight quantization against block size", label, settings)
    data = {
        "block_sizes": blocks, "block_labels": [block_size_label(b) for b in blocks], "methods": methods,
        "accuracy": accuracy, "perplexity": perplexity, "baseline_accuracy": base_accuracy,
        "baseline_perplexity": base_perplexity, "bits": bits, "missing": list(folder.missing), "model": label,
    }
    caption = (f"{title.splitlines()[0]}: average zero-shot accuracy and perplexity against block size for "
               f"{', '.join(_METHOD_LABELS.get(m, m) for m in methods)}.")
    return FigureResult("weight-quant", figure, data, caption)


# -- registry -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """One figure the command line can draw."""

    name: str
    description: str
    experiment: str | None = None
    """The ``superweight reproduce`` experiment whose result folder it reads; ``None`` when it runs a model."""


FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        FigureSpec("detection", "per layer, max |down_proj input| and |output|, super weights marked (paper Fig. 3)"),
        FigureSpec("residual", "per layer, max |residual stream| with super weights or outliers removed (paper Fig. 4)"),
        FigureSpec("activations", "heat map of |down_proj output| over tokens and channels at a super weight's layer"),
        FigureSpec("stopwords", "mean next-token probability of top tokens with and without the super weights (paper Fig. 5)"),
        FigureSpec("sensitivity", "accuracy and perplexity against the super weight scaling factor (paper Fig. 6)", "sensitivity"),
        FigureSpec("weight-quant", "accuracy and perplexity against quantization block size, RTN vs super-weight-aware (paper Fig. 7)",
                   "weight-quant"),
    )
}
MODEL_FIGURES = tuple(name for name, spec in FIGURES.items() if spec.experiment is None)


def figure_spec(name: str) -> FigureSpec:
    """Return the spec of figure ``name``; raise ``ValueError`` listing the names otherwise."""
    try:
        return FIGURES[name]
    except KeyError:
        raise ValueError(f"unknown figure {name!r}; choose one of {', '.join(FIGURES)}") from None


RESULT_FIGURES: dict[str, Callable[..., FigureResult]] = {
    "sensitivity": sensitivity_figure,
    "weight-quant": weight_quant_figure,
}


# -- drawing a model figure end to end ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FigureOptions:
    """Settings of the figures that run a model."""

    log_scale: bool = False
    """Logarithmic y axis on line and bar plots (the heat map's color scale is always logarithmic)."""
    prompt: str = DEFAULT_PROMPT
    """Text fed to the model for ``detection``, ``residual`` and ``activations``."""
    num_prompts: int = 500
    """LAMBADA prompts averaged by ``stopwords``."""
    batch_size: int = 16
    """Prompts per forward pass in ``stopwords``."""
    top_k: int = 10
    """``stopwords`` shows the original model's top-k tokens, then those that enter the top k without the super weights."""
    layer: int | None = None
    """Layer of the ``activations`` heat map; default: the first super weight's layer."""
    verify: bool = False
    """Run the causal test in ``detection`` (about two forward passes of a few hundred tokens per candidate)."""
    outlier_fraction: float = 1e-6
    """Fraction of |w| per linear layer that ``residual`` prunes as outliers."""

    def __post_init__(self) -> None:
        for name in ("num_prompts", "batch_size", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use an integer >= 1")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer={self.layer!r} is invalid; use an integer >= 0")
        if not 0 < self.outlier_fraction < 1:
            raise ValueError(f"outlier_fraction={self.outlier_fraction!r} is invalid; use a number in (0, 1), e.g. 1e-6")
        if not self.prompt or not self.prompt.strip():
            raise ValueError("prompt is empty; pass some text, e.g. 'Apple Inc. is a worldwide tech company.'")


def model_label(loaded: Any) -> str:
    """Return ``"<model> (<dtype>)"`` for figure titles."""
    return f"{loaded.spec} ({str(loaded.dtype).removeprefix('torch.')})"


def draw_model_figure(
    name: str,
    loaded: Any,
    options: FigureOptions | None = None,
    *,
    report: DetectionReport | None = None,
    super_weights: Sequence[SuperWeight] | None = None,
    progress: bool = True,
) -> FigureResult:
    """Measure and draw figure ``name`` (one of :data:`MODEL_FIGURES`) for a loaded model.

    ``report`` reuses a detection for ``detection``; ``super_weights`` skips resolving
    them (directory entry, else detection with the causal test).
    """
    from superweight.api import detect_loaded, resolve_super_weights
    from superweight.detect import DetectionConfig

    spec = figure_spec(name)
    if spec.experiment is not None:
        raise ValueError(
            f"figure {name!r} reads a result folder, not a model; pass the folder written by "
            f"`{reproduce_command(spec.experiment)}`"
        )
    options = options or FigureOptions()
    label = model_label(loaded)
    model, tokenizer = loaded.model, loaded.tokenizer

    if name == "detection":
        report = report or detect_loaded(loaded, DetectionConfig(prompt=options.prompt, verify=options.verify))
        return detection_figure(report, log_scale=options.log_scale, model_label=label)

    def resolve() -> list[SuperWeight]:
        if super_weights:
            return list(super_weights)
        found, source = resolve_super_weights(loaded, config=DetectionConfig(prompt=options.prompt, verify=True))
        log.info("super weights from %s: %s", source, ", ".join(map(str, found)))
        return found

    if name == "residual":
        maxima = residual_maxima(model, tokenizer, resolve(), prompt=options.prompt,
                                 outlier_fraction=options.outlier_fraction)
        return residual_figure(maxima, log_scale=options.log_scale, model_label=label)
    if name == "activations":
        found = resolve() if options.layer is None or super_weights else []
        layer = options.layer if options.layer is not None else min(sw.layer for sw in found)
        activations = down_proj_activations(model, tokenizer, layer, prompt=options.prompt)
        return activations_figure(activations, super_weights=found, model_label=label)
    prompts = lambada_prompts(options.num_prompts)
    probabilities = next_token_probabilities(model, tokenizer, prompts, resolve(), batch_size=options.batch_size,
                                             progress=progress)
    return stopwords_figure(probabilities, tokenizer, top_k=options.top_k, log_scale=options.log_scale, model_label=label)


def draw_results_figure(name: str, path: str | os.PathLike, *, model_label: str | None = None) -> FigureResult:
    """Draw figure ``name`` (``sensitivity`` or ``weight-quant``) from a ``superweight reproduce`` folder."""
    spec = figure_spec(name)
    if spec.experiment is None:
        raise ValueError(f"figure {name!r} runs a model; pass a model (catalog name, hub id, folder or .gguf), not a result folder")
    folder = load_result_folder(path, expected=spec.experiment)
    return RESULT_FIGURES[name](folder, model_label=model_label)
