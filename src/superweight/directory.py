"""A directory of known super weights, matched by exact model id (case-insensitive).

The data file ``data/known_super_weights.json`` lists, per model, the coordinates
and where they come from. Ids are never matched by substring: ``meta-llama/Llama-2-7b-chat-hf``
is not ``meta-llama/Llama-2-7b-hf``, and a user reported that the base model's
coordinates do not degrade the chat model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from typing import Any

from superweight.coordinates import SuperWeight


@dataclasses.dataclass(frozen=True)
class DirectoryEntry:
    """Known super weights of one model."""

    model: str
    super_weights: tuple[SuperWeight, ...]
    source: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "super_weights": [sw.to_dict() for sw in self.super_weights],
            "source": self.source,
            "note": self.note,
        }


@functools.cache
def load_directory() -> dict[str, DirectoryEntry]:
    """Return the directory keyed by lower-cased model id."""
    raw = json.loads(resources.files("superweight").joinpath("data/known_super_weights.json").read_text())
    entries = {}
    for item in raw["models"]:
        entry = DirectoryEntry(
            model=item["model"],
            super_weights=tuple(SuperWeight(*coords) for coords in item["super_weights"]),
            source=item["source"],
            note=item.get("note"),
        )
        entries[entry.model.lower()] = entry
    return entries


def lookup(model_id: str) -> DirectoryEntry | None:
    """Return the entry whose id equals ``model_id`` ignoring case, or ``None``."""
    return load_directory().get(model_id.strip().lower())


def compare(entry: DirectoryEntry | None, found: list[SuperWeight]) -> dict[str, Any] | None:
    """Compare detected super weights with the directory's; ``None`` when the model is not listed.

    ``agrees`` is true when every known super weight was found; ``extra`` lists what was
    found beyond them (for unverified detection, late-layer spikes usually land here).
    """
    if entry is None:
        return None
    known = set(entry.super_weights)
    detected = set(found)
    return {
        "model": entry.model,
        "source": entry.source,
        "known": [sw.to_dict() for sw in sorted(known)],
        "matched": [sw.to_dict() for sw in sorted(known & detected)],
        "missing": [sw.to_dict() for sw in sorted(known - detected)],
        "extra": [sw.to_dict() for sw in sorted(detected - known)],
        "agrees": known <= detected,
    }
