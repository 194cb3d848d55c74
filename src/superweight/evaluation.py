"""Evaluate an edited model: perplexity and zero-shot accuracy through lm-evaluation-harness.

An :class:`InterventionSpec` describes one of the edits that Yu et al. (2024), "The Super
Weight in Large Language Models", ablate: scale or prune the super weights, prune the other
weight outliers, or restore the super activation.
:func:`applied` applies it to a model for the duration of a ``with`` block, and
:func:`evaluate` measures the edited model and returns a JSON-ready dict::

    loaded = load_model("smollm2-135m")
    super_weights, source = resolve_super_weights(loaded)
    result = evaluate(loaded, InterventionSpec(scale_factor=0.0), super_weights,
                      perplexity=["wiki-sample"], tasks=["arc_easy"], limit=100)
    result["perplexity"]["wiki-sample"]["perplexity"], result["average_accuracy"]

Zero-shot tasks run through the real harness (``lm_eval.simple_evaluate``) on the
in-memory model, so the edit is evaluated without saving a copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from superweight.coordinates import SuperWeight
from superweight.interventions import pruned_outliers, restored_super_activations, scaled_super_weights
from superweight.models import LoadedModel
from superweight.perplexity import DEFAULT_SEQLEN, evaluate_perplexity
from superweight.provenance import provenance

log = logging.getLogger(__name__)

DEFAULT_SEED = 1234
"""Seed for Python, numpy, torch and few-shot sampling in lm_eval (its own CLI default)."""

DEFAULT_OUTLIER_FRACTION = 1e-6
"""Fraction of weights pruned per matrix in the "Prune non-SW" ablation of Yu et al. (2024)."""


@dataclasses.dataclass(frozen=True)
class InterventionSpec:
    """An edit of a model's weights or activations, applied by :func:`applied`.

    The default spec changes nothing (the original model).
    """

    scale_factor: float | None = None
    """Multiply every super weight by this factor; 0 prunes them. None leaves them alone."""
    restore_super_activation: bool = False
    """Prune the super weights but write their original super activation back at the
    down-projection output (the "Prune SW, +SA" row of Yu et al. 2024, Table 1)."""
    prune_outliers: float | None = None
    """Zero this fraction of the largest ``|w|`` in every selected linear weight matrix,
    in (0, 1); the "Prune non-SW" ablation of Yu et al. (2024) uses 1e-6."""
    keep_super_weights: bool = False
    """With ``prune_outliers``: put the super weights back after pruning ("Prune non-SW")."""
    outlier_layers: tuple[int, ...] | None = None
    """Decoder layers whose matrices ``prune_outliers`` selects; None selects all."""
    outlier_kinds: tuple[str, ...] | None = None
    """Module names ``prune_outliers`` selects, e.g. ``("down_proj",)``; None selects all."""

    def __post_init__(self) -> None:
        factor = self.scale_factor
        if factor is not None:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
                raise ValueError(
                    f"scale_factor={factor!r} is invalid; use a finite number >= 0 (0 prunes the super weights)"
                )
            object.__setattr__(self, "scale_factor", float(factor))
        fraction = self.prune_outliers
        if fraction is not None:
            if (
                isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                or not math.isfinite(fraction) or not 0 < fraction < 1
            ):
                raise ValueError(f"prune_outliers={fraction!r} is invalid; use a fraction in (0, 1), e.g. 1e-6")
            object.__setattr__(self, "prune_outliers", float(fraction))
        if fraction is None:
            for name in ("keep_super_weights", "outlier_layers", "outlier_kinds"):
                if getattr(self, name):
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} needs prune_outliers (on the command line: "
                        "--prune-outliers FRACTION); set a fraction such as 1e-6"
                    )
        if self.outlier_layers is not None:
            layers = tuple(self.outlier_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"outlier_layers={self.outlier_layers!r} is invalid; use layer indices >= 0")
            object.__setattr__(self, "outlier_layers", layers)
        if self.outlier_kinds is not None:
            kinds = tuple(self.outlier_kinds)
            if not kinds or not all(isinstance(kind, str) and kind for kind in kinds):
                raise ValueError(f"outlier_kinds={self.outlier_kinds!r} is invalid; use module names such as 'down_proj'")
            object.__setattr__(self, "outlier_kinds", kinds)

    @property
    def is_identity(self) -> bool:
        """True when the spec leaves the model unchanged."""
        return (
            (self.scale_factor is None or self.scale_factor == 1.0)
            and not self.restore_super_activation
            and self.prune_outliers is None
        )

    @property
    def needs_super_weights(self) -> bool:
        """True when applying the spec needs super weight coordinates."""
        return self.scale_factor is not None or self.restore_super_activation or self.keep_super_weights

    def describe(self) -> str:
        """Return a short human-readable summary, e.g. ``"super weights x0"``."""
        parts = []
        if self.prune_outliers is not None:
            where = []
            if self.outlier_layers is not None:
                where.append(f"layers {_format_layers(self.outlier_layers)}")
            if self.outlier_kinds is not None:
                where.append("/".join(self.outlier_kinds))
            kept = ", super weights kept" if self.keep_super_weights else ""
            parts.append(f"top {self.prune_outliers:g} outliers pruned{' in ' + ' '.join(where) if where else ''}{kept}")
        if self.scale_factor is not None and self.scale_factor != 1.0:
            parts.append(f"super weights x{self.scale_factor:g}")
        if self.restore_super_activation:
            parts.append("super weights pruned, super activation restored")
        return "; ".join(parts) or "original"

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        for name in ("outlier_layers", "outlier_kinds"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InterventionSpec:
        """Build a spec from :meth:`to_dict` output."""
        data = dict(data)
        for name in ("outlier_layers", "outlier_kinds"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


def _format_layers(layers: Sequence[int]) -> str:
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(layer) for layer in layers)


@contextlib.contextmanager
def applied(
    model: nn.Module, spec: InterventionSpec, super_weights: Sequence[SuperWeight] = ()
) -> Iterator[dict[str, Any]]:
    """Apply ``spec`` to ``model`` inside a ``with`` block and undo it on exit.

    The edits compose in a fixed order:

    1. ``prune_outliers``: zero the top fraction of ``|w|`` per selected matrix, then put
       the super weights back if ``keep_super_weights``.
    2. ``scale_factor``: multiply the super weights as they are after step 1 (a super
       weight pruned in step 1 stays 0).
    3. ``restore_super_activation``: wrap the forward pass so that it records the
       down-projection output of the model as edited by steps 1 and 2, zeroes the super
       weights and writes the recorded super activation back.

    Weights are restored bit-exactly and hooks removed on exit, also when the block
    raises. Yields a dict describing what was applied (``interventions``, ``outliers``:
    the per-matrix prune counts or None).
    """
    super_weights = sorted(set(super_weights))
    if spec.needs_super_weights and not super_weights:
        raise ValueError(
            f"intervention {spec.describe()!r} needs super weight coordinates, but none were given; "
            "pass them (LAYER:ROW:COL) or resolve them with superweight.api.resolve_super_weights"
        )
    details: dict[str, Any] = {"interventions": spec.to_dict(), "description": spec.describe(), "outliers": None}
    with contextlib.ExitStack() as stack:
        if spec.prune_outliers is not None:
            report = stack.enter_context(
                pruned_outliers(
                    model, spec.prune_outliers, layers=spec.outlier_layers, kinds=spec.outlier_kinds,
                    keep_super_weights=super_weights if spec.keep_super_weights else (),
                )
            )
            details["outliers"] = report.to_dict()
        if spec.scale_factor is not None and spec.scale_factor != 1.0:
            stack.enter_context(scaled_super_weights(model, super_weights, spec.scale_factor))
        if spec.restore_super_activation:
            stack.enter_context(restored_super_activations(model, super_weights))
        if not spec.is_identity:
            log.info("applied: %s", spec.describe())
        yield details


# -- measuring -------------------------------------------------------------------------


def _split_sources(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [item.strip() for item in value if item.strip()]


def measure(
    loaded: LoadedModel,
    *,
    perplexity: str | Sequence[str] = (),
    tasks: str | Sequence[str] = (),
    limit: int | float | None = None,
    batch_size: int = 1,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    seed: int = DEFAULT_SEED,
    offline: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the model as it is now: perplexity per text source and zero-shot tasks.

    Returns ``perplexity`` (source -> :meth:`PerplexityResult.to_dict`), ``tasks``
    (paper task name -> metric -> value, with ``<metric>_stderr`` entries and
    ``num_samples``), ``average_accuracy`` (mean ``acc`` over the tasks that report it,
    or None), ``lm_eval_tasks`` (the harness task names used) and ``split_notes`` (how
    offline data differs from the official split, for the tasks where it does).
    Unknown tasks raise ValueError before anything runs.
    """
    from superweight import tasks as task_registry

    sources = _split_sources(perplexity)
    task_names = _split_sources(tasks)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; use a positive integer")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit={limit!r} is invalid; use a positive number of examples per task")
    offline = task_registry.is_offline(offline) if task_names else bool(offline)
    harness_names = task_registry.resolve_tasks(task_names, offline=offline) if task_names else []

    result: dict[str, Any] = {"perplexity": {}, "tasks": {}, "average_accuracy": None,
                              "lm_eval_tasks": harness_names, "split_notes": {}}
    for source in sources:
        started = time.perf_counter()
        measured = evaluate_perplexity(
            loaded.model, loaded.tokenizer, source, seqlen=seqlen, batch_size=batch_size,
            max_windows=max_windows, progress=progress,
        )
        result["perplexity"][source] = {**measured.to_dict(), "seconds": round(time.perf_counter() - started, 2)}

    if harness_names:
        started = time.perf_counter()
        result["tasks"] = _run_harness(loaded, harness_names, limit, batch_size, seed, offline)
        result["task_seconds"] = round(time.perf_counter() - started, 2)
        if offline:
            for name in task_names:
                note = task_registry.split_notes(name)
                if note:
                    result["split_notes"][task_registry.official_task_name(name)] = note
        result["average_accuracy"] = average_accuracy(result["tasks"])
    return result


def average_accuracy(task_metrics: dict[str, dict[str, Any]]) -> float | None:
    """Return the mean ``acc`` over tasks that report one, or None if none does.

    >>> average_accuracy({"piqa": {"acc": 0.5}, "sciq": {"acc": 0.7}, "x": {"ppl": 3.0}})
    0.6
    """
    values = [metrics["acc"] for metrics in task_metrics.values() if isinstance(metrics.get("acc"), (int, float))]
    return round(sum(values) / len(values), 12) if values else None


def _run_harness(
    loaded: LoadedModel, harness_names: list[str], limit: int | float | None, batch_size: int, seed: int,
    offline: bool,
) -> dict[str, dict[str, Any]]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from superweight import tasks as task_registry

    # HFLM takes the in-memory model as is; it runs on the model's own device.
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=harness_names,
        task_manager=task_registry.task_manager(offline=offline),
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    return harness_metrics(output)


def harness_metrics(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Convert ``lm_eval.simple_evaluate`` output to paper task -> metric -> value.

    lm_eval keys metrics as ``"acc,none"`` and ``"acc_stderr,none"``; the filter suffix is
    dropped. A stderr that lm_eval could not compute (``"N/A"``) becomes None.
    """
    from superweight import tasks as task_registry

    metrics: dict[str, dict[str, Any]] = {}
    samples = output.get("n-samples", {})
    for harness_name, values in output["results"].items():
        try:
            name = task_registry.official_task_name(harness_name)
        except ValueError:
            name = harness_name
        entry: dict[str, Any] = {}
        for key, value in values.items():
            # Metrics are keyed "<metric>,<filter>"; other keys (alias, name, sample_len) are not metrics.
            metric, comma, _filter = key.partition(",")
            if not comma:
                continue
            entry[metric] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if harness_name in samples:
            entry["num_samples"] = samples[harness_name].get("effective")
        entry["lm_eval_task"] = harness_name
        metrics[name] = entry
    return metrics


def evaluate(
    loaded: LoadedModel,
    spec: InterventionSpec,
    super_weights: Sequence[SuperWeight] = (),
    *,
    perplexity: str | Sequence[str] = (),
    tasks: str | Sequence[str] = (),
    limit: int | float | None = None,
    batch_size: int = 1,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    seed: int = DEFAULT_SEED,
    offline: bool | None = None,
    super_weights_source: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Apply ``spec``, measure perplexity and zero-shot accuracy, and undo the edit.

    Returns the dict of :func:`measure` plus ``interventions`` (what :func:`applied`
    did), ``super_weights`` (the coordinates used) and ``provenance`` (model, versions,
    seed, limit and settings). ``tasks`` are paper task names (see
    :data:`superweight.tasks.OFFLINE_TASKS`); with the hub offline they run on the
    offline data of :mod:`superweight.tasks`.
    """
    if not _split_sources(perplexity) and not _split_sources(tasks):
        raise ValueError("nothing to evaluate; pass perplexity sources (e.g. wiki-sample) or tasks (e.g. arc_easy)")
    super_weights = sorted(set(super_weights))
    with applied(loaded.model, spec, super_weights) as details:
        result = measure(
            loaded, perplexity=perplexity, tasks=tasks, limit=limit, batch_size=batch_size, seqlen=seqlen,
            max_windows=max_windows, seed=seed, offline=offline, progress=progress,
        )
    return {
        **result,
        "interventions": details,
        "super_weights": [sw.to_dict() for sw in super_weights],
        "provenance": provenance(
            **loaded.provenance(),
            interventions=spec.to_dict(),
            super_weights=[sw.to_spec() for sw in super_weights],
            super_weights_source=super_weights_source,
            seed=seed,
            limit=limit,
            batch_size=batch_size,
            seqlen=seqlen,
            max_windows=max_windows,
        ),
    }
