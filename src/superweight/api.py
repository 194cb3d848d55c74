"""Entry points that work on a :class:`~superweight.models.LoadedModel` and record provenance."""

from __future__ import annotations

import logging

from superweight import directory
from superweight.coordinates import SuperWeight
from superweight.detect import DetectionConfig, DetectionReport, detect_super_weights
from superweight.models import LoadedModel
from superweight.provenance import provenance

log = logging.getLogger(__name__)


def detect_loaded(loaded: LoadedModel, config: DetectionConfig | None = None) -> DetectionReport:
    """Detect super weights of a loaded model, with provenance and the directory comparison."""
    config = config or DetectionConfig()
    report = detect_super_weights(loaded.model, loaded.tokenizer, config)
    report.provenance = provenance(**loaded.provenance(), prompt=config.prompt)
    report.directory = directory.compare(directory.lookup(loaded.spec), report.super_weights)
    return report


def resolve_super_weights(
    loaded: LoadedModel, explicit: list[SuperWeight] | None = None, config: DetectionConfig | None = None
) -> tuple[list[SuperWeight], str]:
    """Return the super weights to use and where they came from.

    Explicit coordinates win; else the directory entry for the model id; else detection
    with the causal test, keeping confirmed candidates.
    """
    if explicit:
        return sorted(set(explicit)), "explicit"
    entry = directory.lookup(loaded.spec)
    if entry is not None:
        log.info("using the directory's super weights for %s: %s", entry.model, [str(sw) for sw in entry.super_weights])
        return list(entry.super_weights), f"directory ({entry.source})"
    log.info("%s is not in the directory; running detection with the causal test", loaded.spec)
    report = detect_super_weights(loaded.model, loaded.tokenizer, config or DetectionConfig(verify=True))
    found = report.super_weights
    if not found:
        raise ValueError(
            f"detection found no confirmed super weight in {loaded.spec}; pass coordinates with "
            "--super-weight LAYER:ROW:COL or lower --spike-ratio / --confirm-ratio"
        )
    log.info("detected super weights: %s", [str(sw) for sw in found])
    return found, "detect --verify"
