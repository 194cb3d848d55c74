"""The super weight as a value: a layer and an ``[row, col]`` position in its down-projection."""

from __future__ import annotations

import dataclasses
import re

_SPEC = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


@dataclasses.dataclass(frozen=True, order=True)
class SuperWeight:
    """One scalar ``layers[layer].<down_proj>.weight[row, col]`` in ``nn.Linear`` convention.

    ``row`` is the output channel (where the super activation appears) and ``col`` the
    input channel. For GPT-2's ``Conv1D``, which stores ``[in, out]``, the stored index
    is ``[col, row]``; :meth:`superweight.adapters.Adapter.weight_index` maps it.
    """

    layer: int
    row: int
    col: int

    def __post_init__(self) -> None:
        for name in ("layer", "row", "col"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SuperWeight.{name}={value!r} is invalid; use an integer >= 0")

    @classmethod
    def parse(cls, spec: str) -> "SuperWeight":
        """Parse ``"LAYER:ROW:COL"``, e.g. ``"2:3968:7003"``.

        >>> SuperWeight.parse("2:3968:7003")
        SuperWeight(layer=2, row=3968, col=7003)
        """
        match = _SPEC.match(spec)
        if match is None:
            raise ValueError(
                f"super weight {spec!r} is malformed; write LAYER:ROW:COL with integers, e.g. 2:3968:7003"
            )
        return cls(*(int(group) for group in match.groups()))

    def __str__(self) -> str:
        return f"layer {self.layer} [{self.row}, {self.col}]"

    def to_spec(self) -> str:
        return f"{self.layer}:{self.row}:{self.col}"

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def check_in_range(super_weights, model, adapter=None) -> None:
    """Raise ``ValueError`` naming the first coordinate that does not exist in ``model``."""
    from superweight.adapters import get_adapter

    adapter = adapter or get_adapter(model)
    num_layers = adapter.num_layers(model)
    for sw in super_weights:
        if sw.layer >= num_layers:
            raise ValueError(
                f"super weight {sw.to_spec()}: layer {sw.layer} does not exist; "
                f"the model has {num_layers} layers (0..{num_layers - 1})"
            )
        rows, cols = adapter.down_proj_shape(model, sw.layer)
        if sw.row >= rows or sw.col >= cols:
            raise ValueError(
                f"super weight {sw.to_spec()} is out of range: layer {sw.layer}'s down-projection "
                f"has shape [{rows}, {cols}] (rows = output channels, cols = input channels)"
            )
