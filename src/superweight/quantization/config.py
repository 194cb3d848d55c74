"""Settings of block-wise round-to-nearest weight quantization, and their parsers.

:class:`WeightQuantConfig` is the one description of a weight quantization run. It is
built directly, from the CLI's ``--clip`` syntax (:func:`parse_clip`), or from the
option strings of the super weight authors' research code
(:func:`parse_manual_quantize`, e.g. ``clip_4_65536_z_9_False_False``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

log = logging.getLogger(__name__)

Format = Literal["int", "nf4", "nf3"]
ClipMethod = Literal["none", "zscore", "block_top", "tensor_top", "iqr"]

FORMATS: tuple[str, ...] = ("int", "nf4", "nf3")
CLIP_METHODS: tuple[str, ...] = ("none", "zscore", "block_top", "tensor_top", "iqr")
BLOCK_KINDS: tuple[str, ...] = ("tensor", "channel")

# Used when a clipping method is given without a value. z = 9, 1e-5 and 1e-6 are the
# values of the authors' block-quantization scripts; k = 1.5 is Tukey's fence.
DEFAULT_CLIP_VALUES: dict[str, float] = {"zscore": 9.0, "block_top": 1e-5, "tensor_top": 1e-6, "iqr": 1.5}

_NF_BITS = {"nf4": 4, "nf3": 3}


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig:
    """Block-wise round-to-nearest (RTN) fake quantization of linear weights.

    >>> WeightQuantConfig(bits=4, block_size=16384, clip="zscore").clip_value
    9.0
    >>> WeightQuantConfig(format="nf3").bits
    3
    """

    bits: int | None = None
    """Bits per weight, 2-8. ``None`` means 4 for ``int`` and ``nf4``, 3 for ``nf3``."""
    format: Format = "int"
    """``int``: asymmetric min-max levels ``min + q (max - min) / (2^bits - 1)``.
    ``nf4`` / ``nf3``: the 16 / 8 normal-float levels, stretched from [-1, 1] onto
    [min, max] of each block."""
    block_size: int | str = 65536
    """``"tensor"`` (one block per matrix), ``"channel"`` (one block per output channel,
    i.e. per row in ``nn.Linear`` layout), or B: runs of B contiguous elements of the
    flattened ``nn.Linear``-layout matrix. A final run shorter than B is its own block."""
    clip: ClipMethod = "none"
    """Outlier clipping of |w| before computing each block's min and max: ``zscore``
    (mean + z std of |w| per block), ``block_top`` (largest fraction per block),
    ``tensor_top`` (largest fraction per matrix), ``iqr`` (q3 + k (q3 - q1) of |w| per
    block), or ``none``."""
    clip_value: float | None = None
    """z, fraction or k of the clipping method; ``None`` takes the method's default
    (z = 9, 1e-5, 1e-6, k = 1.5)."""
    scale_shift: bool = False
    """For ``int`` only: split [min, max] into 2^bits equal bins and dequantize to the
    bin centers instead of putting levels on min and max (see ``blockwise``)."""
    keep_super_weights: bool = False
    """Write the super weights' original values back after quantization."""
    restore_factor: float = 1.0
    """Multiplier of each super weight's original value when it is written back."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is invalid; use one of {', '.join(FORMATS)}")

        bits = self.bits
        if bits is None:
            bits = _NF_BITS.get(self.format, 4)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits={self.bits!r} is invalid; use an integer from 2 to 8")
        if self.format in _NF_BITS and bits != _NF_BITS[self.format]:
            raise ValueError(
                f"format {self.format!r} has {_NF_BITS[self.format]}-bit levels but bits={bits}; "
                f"pass bits={_NF_BITS[self.format]} or use format='int' for {bits}-bit integers"
            )
        object.__setattr__(self, "bits", bits)

        block = self.block_size
        if isinstance(block, str):
            if block not in BLOCK_KINDS:
                raise ValueError(
                    f"block_size {block!r} is invalid; use 'tensor', 'channel' or a positive integer"
                )
        elif isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise ValueError(f"block_size={block!r} is invalid; use a positive integer, 'tensor' or 'channel'")

        if self.clip not in CLIP_METHODS:
            raise ValueError(f"clip method {self.clip!r} is unknown; use one of {', '.join(CLIP_METHODS)}")
        value = self.clip_value
        if self.clip == "none":
            value = None
        elif value is None:
            value = DEFAULT_CLIP_VALUES[self.clip]
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"clip_value={value!r} is invalid; use a finite number")
        else:
            value = float(value)
        if self.clip in ("zscore", "iqr") and value <= 0:
            name = "z" if self.clip == "zscore" else "k"
            raise ValueError(f"{self.clip} {name}={value!r} is invalid; use a number > 0, e.g. 9 for zscore, 1.5 for iqr")
        if self.clip in ("block_top", "tensor_top") and not 0 < value < 1:
            raise ValueError(f"{self.clip} fraction={value!r} is invalid; use a fraction in (0, 1), e.g. 1e-5")
        object.__setattr__(self, "clip_value", value)

        if self.scale_shift and self.format != "int":
            raise ValueError(
                f"scale_shift applies to format='int' only, not {self.format!r}; drop scale_shift"
            )
        factor = self.restore_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"restore_factor={factor!r} is invalid; use a finite number (1 restores unchanged)")

    @property
    def levels(self) -> int:
        """Number of quantization levels per block."""
        return 2**self.bits

    def describe(self) -> str:
        """Return a short human-readable summary, e.g. ``int4 B=65536 zscore:9``."""
        name = f"int{self.bits}" if self.format == "int" else self.format
        clip = "" if self.clip == "none" else f" {self.clip}:{self.clip_value:g}"
        shift = " scale-shift" if self.scale_shift else ""
        keep = f" keep-SW x{self.restore_factor:g}" if self.keep_super_weights else ""
        return f"{name} B={self.block_size}{clip}{shift}{keep}"

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)


# -- CLI syntax -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """A parsed ``--clip`` option: a method and a value, or a request to search z."""

    method: ClipMethod
    value: float | None
    """The method's parameter; ``None`` for ``none``, the default, or ``zscore:auto``."""
    auto: bool = False
    """``zscore:auto``: choose z with :func:`superweight.quantization.search_zscore`."""


def parse_clip(spec: str) -> ClipSpec:
    """Parse ``METHOD[:VALUE]``: ``none``, ``zscore:9``, ``zscore:auto``, ``block_top:1e-5``,
    ``tensor_top:1e-6`` or ``iqr:1.5``.

    >>> parse_clip("zscore:auto")
    ClipSpec(method='zscore', value=None, auto=True)
    >>> parse_clip("block_top:1e-5").value
    1e-05
    """
    method, _, raw = spec.strip().partition(":")
    method = method.strip()
    raw = raw.strip()
    if method not in CLIP_METHODS:
        raise ValueError(
            f"clip {spec!r} is invalid: unknown method {method!r}; use one of {', '.join(CLIP_METHODS)}, "
            "e.g. zscore:9, zscore:auto, block_top:1e-5, tensor_top:1e-6, iqr:1.5"
        )
    if method == "none":
        if raw:
            raise ValueError(f"clip {spec!r} is invalid: 'none' takes no value; write 'none'")
        return ClipSpec("none", None)
    if raw == "auto":
        if method != "zscore":
            raise ValueError(f"clip {spec!r} is invalid: only zscore supports 'auto'; pass a number")
        return ClipSpec("zscore", None, auto=True)
    if not raw:
        return ClipSpec(method, None)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"clip {spec!r} is invalid: {raw!r} is not a number; write e.g. {method}:"
                         f"{DEFAULT_CLIP_VALUES[method]:g}") from None
    # Validate the value now, with the same rules as the config.
    WeightQuantConfig(clip=method, clip_value=value)
    return ClipSpec(method, value)


def parse_block_size(spec: str | int) -> int | str:
    """Parse ``tensor``, ``channel`` or a positive integer (``65536`` or ``256x256``)."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        value: int | str = spec
    else:
        text = str(spec).strip().lower()
        if text in BLOCK_KINDS:
            return text
        try:
            if "x" in text:
                rows, cols = text.split("x")
                value = int(rows) * int(cols)
            else:
                value = int(text)
        except ValueError:
            raise ValueError(
                f"block size {spec!r} is invalid; use 'tensor', 'channel', an integer such as 65536, or 256x256"
            ) from None
    WeightQuantConfig(block_size=value)
    return value


# -- the research code's option strings -----------------------------------------------

_RESEARCH_CLIP = {"no": "none", "z": "zscore", "bp": "block_top", "tp": "tensor_top", "iqr": "iqr"}
_RESEARCH_BOOL = {"True": True, "False": False}


def parse_manual_quantize(spec: str, restore_and_scale_go: float | bool = False) -> WeightQuantConfig:
    """Parse a ``manual_quantize`` string of the super weight authors' research code.

    The string has seven underscore-separated fields,
    ``METHOD_BITS_BLOCK_CLIP_VALUE_SCALESHIFT_NORMALFLOAT``, read as follows (from the
    authors' ``outliers/model.py`` and ``outliers/functional/quantization.py``):

    - ``METHOD``: ``minmax`` (plain RTN; the clipping fields are ignored) or ``clip``
      (clip outliers, then RTN). Their ``awq`` method is not supported here.
    - ``BITS``: integer bits.
    - ``BLOCK``: ``tensor``, ``channel`` or an integer number of contiguous elements.
    - ``CLIP``: ``no``, ``z`` (z-score), ``bp`` (top fraction per block), ``tp`` (top
      fraction per tensor) or ``iqr``.
    - ``VALUE``: z, fraction or k as a float, or ``None``.
    - ``SCALESHIFT``: ``True`` / ``False``, the bin-center INT variant.
    - ``NORMALFLOAT``: ``True`` selects NF levels (NF4 at 4 bits, NF3 at 3 bits).

    ``restore_and_scale_go`` is the research code's separate ``restore_and_scale_GO``
    option: a true value writes the super weights back multiplied by it.

    NOTE: three definitions differ from the research code on purpose. A tensor whose
    size is not a multiple of BLOCK gets blocks of BLOCK plus one shorter block, where
    the research code quantizes the whole tensor as one block. ``tp`` clips
    ``floor(f n)`` elements, one more than the research code when ``f n >= 1``.
    ``SCALESHIFT`` uses exact
    bin centers (see ``blockwise``).

    >>> parse_manual_quantize("clip_4_65536_z_9_False_False", 1.0).describe()
    'int4 B=65536 zscore:9 keep-SW x1'
    >>> parse_manual_quantize("minmax_4_tensor_no_0_False_True").describe()
    'nf4 B=tensor'
    """
    fields = spec.strip().split("_")
    if len(fields) != 7:
        raise ValueError(
            f"manual_quantize string {spec!r} has {len(fields)} fields; expected 7, "
            "METHOD_BITS_BLOCK_CLIP_VALUE_SCALESHIFT_NORMALFLOAT, e.g. clip_4_65536_z_9_False_False"
        )
    method, bits_text, block_text, clip_text, value_text, shift_text, nf_text = fields

    if method not in ("minmax", "clip"):
        raise ValueError(f"manual_quantize method {method!r} in {spec!r} is not supported; use minmax or clip")
    try:
        bits = int(bits_text)
    except ValueError:
        raise ValueError(f"manual_quantize bits {bits_text!r} in {spec!r} is not an integer; e.g. 4") from None
    block_size = parse_block_size(block_text)
    if clip_text not in _RESEARCH_CLIP:
        raise ValueError(
            f"manual_quantize clip kind {clip_text!r} in {spec!r} is unknown; use one of {', '.join(_RESEARCH_CLIP)}"
        )
    if value_text == "None":
        clip_value = None
    else:
        try:
            clip_value = float(value_text)
        except ValueError:
            raise ValueError(
                f"manual_quantize clip value {value_text!r} in {spec!r} is not a number or None"
            ) from None
    flags = []
    for name, text in (("scale-shift", shift_text), ("normal-float", nf_text)):
        if text not in _RESEARCH_BOOL:
            raise ValueError(f"manual_quantize {name} flag {text!r} in {spec!r} is invalid; write True or False")
        flags.append(_RESEARCH_BOOL[text])
    scale_shift, normal_float = flags

    clip = _RESEARCH_CLIP[clip_text]
    if method == "minmax" and clip != "none":
        log.warning("%s: method minmax ignores clipping %s_%s, as the research code does", spec, clip_text, value_text)
        clip, clip_value = "none", None
    if clip == "none":
        clip_value = None

    if normal_float:
        if bits not in (3, 4):
            raise ValueError(f"manual_quantize {spec!r} asks for normal-float at {bits} bits; only 3 and 4 exist")
        fmt = f"nf{bits}"
        if scale_shift:
            log.warning("%s: scale-shift is ignored for normal-float levels, as in the research code", spec)
            scale_shift = False
    else:
        fmt = "int"

    # As in the research code, any true value restores; a number also scales.
    keep = bool(restore_and_scale_go)
    factor = 1.0 if isinstance(restore_and_scale_go, bool) or not keep else float(restore_and_scale_go)
    return WeightQuantConfig(
        bits=bits,
        format=fmt,
        block_size=block_size,
        clip=clip,
        clip_value=clip_value,
        scale_shift=scale_shift,
        keep_super_weights=keep,
        restore_factor=factor,
    )
