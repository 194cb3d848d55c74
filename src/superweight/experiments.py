"""Resumable experiments: one model, several edits, each evaluated and saved on its own.

An experiment is a list of :class:`Configuration` objects. Each names an edit as a
context-manager factory ``apply(loaded, super_weights)``; :func:`run_experiment` loads
the model once, and for each configuration enters ``apply``, measures perplexity and
zero-shot accuracy (:func:`superweight.evaluation.measure`) and leaves it, which undoes
the edit. Results go to a folder::

    DIR/manifest.json   {"experiment", "model", "settings", "configurations", "provenance"}
    DIR/runs/<name>.json one finished configuration: {"name", "label", "settings",
                        "perplexity", "tasks", "average_accuracy", "super_weights", "provenance", ...}
    DIR/results.json    the manifest plus "runs" (finished configurations, in order)
    DIR/table.md        a markdown table of the finished configurations

Every file is written atomically. A rerun with the same settings skips configurations
whose run file exists, so an interrupted experiment resumes and loses only the
configuration it was in. A rerun with other settings raises ValueError unless
``force=True``, which deletes the old run files first.

Example, for another ablation::

    configs = [intervention_configuration("x0", "x0", InterventionSpec(scale_factor=0.0))]
    run_experiment("my-ablation", configs, model="smollm2-135m", output_dir="results/x",
                   evaluation=EvaluationSettings(tasks=("arc_easy",), limit=100))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from superweight.coordinates import SuperWeight
from superweight.evaluation import DEFAULT_OUTLIER_FRACTION, DEFAULT_SEED, InterventionSpec, applied, measure
from superweight.models import LoadedModel
from superweight.perplexity import DEFAULT_SEQLEN
from superweight.provenance import provenance, write_json_atomic, write_text_atomic
from superweight.tasks import OFFLINE_TASKS

log = logging.getLogger(__name__)

ApplyFactory = Callable[[LoadedModel, Sequence[SuperWeight]], contextlib.AbstractContextManager[Any]]

DEFAULT_PERPLEXITY_SOURCES = ("wiki-sample", "c4-sample")
DEFAULT_FACTORS = (0.0, 0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0)
"""Super weight scaling factors of the sensitivity study (the research code's sensitivity script)."""

# Column headers in the order of Table 1 of Yu et al. (2024).
TASK_HEADERS = {
    "arc_challenge": "ARC-c",
    "arc_easy": "ARC-e",
    "hellaswag": "Hella",
    "lambada_openai": "Lamb",
    "piqa": "PIQA",
    "sciq": "SciQ",
    "winogrande": "Wino",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One edit of an experiment, evaluated and saved as ``runs/<name>.json``."""

    name: str
    """File-safe identifier (letters, digits, ``.``, ``_``, ``-``)."""
    label: str
    """Row label in the table."""
    settings: Mapping[str, Any]
    """JSON-ready parameters of the edit; a rerun skips the run only if they are equal."""
    apply: ApplyFactory
    """Return a context manager that applies the edit to ``loaded.model`` and undoes it on exit."""
    needs_super_weights: bool = True
    """False when ``apply`` does not use super weight coordinates (so none are resolved)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"configuration name {self.name!r} is invalid; use letters, digits, '.', '_' or '-' "
                "(it names the file runs/<name>.json)"
            )


def intervention_configuration(
    name: str, label: str, spec: InterventionSpec, settings: Mapping[str, Any] | None = None
) -> Configuration:
    """Return a configuration that applies an :class:`InterventionSpec` (settings: the spec's fields)."""

    def apply(loaded: LoadedModel, super_weights: Sequence[SuperWeight]):
        return applied(loaded.model, spec, super_weights)

    return Configuration(
        name=name, label=label, settings=dict(settings) if settings is not None else spec.to_dict(),
        apply=apply, needs_super_weights=spec.needs_super_weights,
    )


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """Measurements taken for every configuration of an experiment."""

    perplexity: tuple[str, ...] = DEFAULT_PERPLEXITY_SOURCES
    """Text sources for :func:`superweight.perplexity.evaluate_perplexity`."""
    tasks: tuple[str, ...] = OFFLINE_TASKS
    """Zero-shot tasks (paper names), evaluated through lm-evaluation-harness."""
    limit: int | float | None = None
    """Examples per task (lm_eval ``--limit``); None evaluates the whole split."""
    seqlen: int = DEFAULT_SEQLEN
    """Perplexity window length in tokens."""
    max_windows: int | None = None
    """Perplexity windows per source; None evaluates the whole text."""
    batch_size: int = 1
    """Batch size for perplexity windows and harness requests; not part of the resume key."""
    seed: int = DEFAULT_SEED
    """Seed passed to lm_eval for Python, numpy, torch and few-shot sampling."""

    def __post_init__(self) -> None:
        for name in ("perplexity", "tasks"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.perplexity and not self.tasks:
            raise ValueError("nothing to evaluate; set perplexity sources or tasks")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, (int, float))
                                       or self.limit <= 0):
            raise ValueError(f"limit={self.limit!r} is invalid; use a positive number of examples per task")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} is invalid; use a positive integer")

    def resume_key(self) -> dict[str, Any]:
        """Return the settings that must match for a rerun to reuse finished runs."""
        data = dataclasses.asdict(self)
        data.pop("batch_size")
        data["perplexity"] = list(self.perplexity)
        data["tasks"] = list(self.tasks)
        return data


# -- the runner ----------------------------------------------------------------------------


def _normalized(value: Any) -> Any:
    """Return ``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def run_experiment(
    experiment: str,
    configurations: Sequence[Configuration],
    *,
    model: str | LoadedModel,
    output_dir: str | Path,
    evaluation: EvaluationSettings = EvaluationSettings(),
    settings: Mapping[str, Any] | None = None,
    super_weights: Sequence[SuperWeight] | None = None,
    load_options: Mapping[str, Any] | None = None,
    force: bool = False,
    offline: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate each configuration on one model, saving and resuming per configuration.

    ``model`` is a model spec for :func:`superweight.models.load_model` (loaded with
    ``load_options`` only if some configuration still has to run) or a loaded model.
    ``settings`` adds experiment-level parameters (such as the factors of a sweep) to the
    resume key. ``super_weights`` overrides the coordinates; otherwise they are resolved
    once with :func:`superweight.api.resolve_super_weights`. Returns the content of
    ``results.json``.
    """
    if not configurations:
        raise ValueError(f"experiment {experiment!r} has no configurations")
    names = [config.name for config in configurations]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"experiment {experiment!r} repeats configuration names {duplicates}; names must be unique")

    model_spec = model.spec if isinstance(model, LoadedModel) else model
    load_options = dict(load_options or {})
    explicit = sorted(set(super_weights)) if super_weights else None
    full_settings = _normalized({
        **evaluation.resume_key(),
        "dtype": load_options.get("dtype") if not isinstance(model, LoadedModel)
        else str(model.dtype).removeprefix("torch."),
        "super_weights": [sw.to_spec() for sw in explicit] if explicit else None,
        **(settings or {}),
    })
    manifest = {
        "experiment": experiment,
        "model": model_spec,
        "settings": full_settings,
        "configurations": names,
        "provenance": provenance(batch_size=evaluation.batch_size, load_options=load_options),
    }

    output = Path(output_dir)
    runs_dir = output / "runs"
    manifest = _open_folder(output, manifest, force)

    state: dict[str, Any] = {"loaded": model if isinstance(model, LoadedModel) else None, "super_weights": None}

    def loaded_model() -> LoadedModel:
        if state["loaded"] is None:
            from superweight.models import load_model

            state["loaded"] = load_model(model_spec, **load_options)
        return state["loaded"]

    def resolved_super_weights() -> tuple[list[SuperWeight], str]:
        if state["super_weights"] is None:
            from superweight.api import resolve_super_weights

            state["super_weights"] = resolve_super_weights(loaded_model(), explicit)
        return state["super_weights"]

    runs: list[dict[str, Any]] = []
    for index, config in enumerate(configurations, 1):
        path = runs_dir / f"{config.name}.json"
        expected = _normalized(dict(config.settings))
        if path.is_file():
            run = json.loads(path.read_text(encoding="utf-8"))
            if run.get("settings") != expected:
                raise ValueError(
                    f"{path} was computed with settings {run.get('settings')!r}, but configuration "
                    f"{config.name!r} now has {expected!r}; pass --force (force=True) to recompute, "
                    "or write to a new --output folder"
                )
            log.info("[%d/%d] %s: already finished, skipped (%s)", index, len(configurations), config.name, path)
            runs.append(run)
            continue

        log.info("[%d/%d] %s: %s", index, len(configurations), config.name, config.label)
        loaded = loaded_model()
        sws, source = resolved_super_weights() if config.needs_super_weights else ([], None)
        started = time.perf_counter()
        with config.apply(loaded, sws) as details:
            result = measure(
                loaded, perplexity=evaluation.perplexity, tasks=evaluation.tasks, limit=evaluation.limit,
                batch_size=evaluation.batch_size, seqlen=evaluation.seqlen, max_windows=evaluation.max_windows,
                seed=evaluation.seed, offline=offline, progress=progress,
            )
        run = {
            "name": config.name,
            "label": config.label,
            "settings": expected,
            "perplexity": result["perplexity"],
            "tasks": result["tasks"],
            "average_accuracy": result["average_accuracy"],
            "super_weights": [sw.to_dict() for sw in sws],
            "super_weights_source": source,
            "intervention": _jsonable_details(details),
            "lm_eval_tasks": result["lm_eval_tasks"],
            "split_notes": result["split_notes"],
            "provenance": provenance(
                **loaded.provenance(), experiment=experiment, seconds=round(time.perf_counter() - started, 1),
                batch_size=evaluation.batch_size, seed=evaluation.seed, limit=evaluation.limit,
            ),
        }
        write_json_atomic(path, run)
        runs.append(run)
        log.info("%s: %s", config.name, _summary(run))
        _write_summary(output, manifest, runs)

    return _write_summary(output, manifest, runs)


def _jsonable_details(details: Any) -> Any:
    if details is None or isinstance(details, (dict, list, str, int, float, bool)):
        return details
    if hasattr(details, "to_dict"):
        return details.to_dict()
    return None


def _open_folder(output: Path, manifest: dict[str, Any], force: bool) -> dict[str, Any]:
    """Check an existing result folder against ``manifest``, or start one. Returns the manifest in use."""
    manifest_path = output / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        keys = ("experiment", "model", "configurations")
        differences = [f"{key}: {old.get(key)!r} -> {manifest.get(key)!r}" for key in keys
                       if old.get(key) != manifest.get(key)]
        differences += _differences(old.get("settings", {}), manifest["settings"])
        if not differences:
            log.info("resuming the experiment in %s", output)
            return old
        if not force:
            raise ValueError(
                f"{output} contains a {old.get('experiment')!r} experiment with other settings "
                f"({'; '.join(differences)}); write to a new --output folder, or pass --force to delete "
                "its runs and start over"
            )
        log.warning("--force: deleting the runs in %s (%s)", output, "; ".join(differences))
    if force:
        for stale in [*(output / "runs").glob("*.json"), output / "results.json", output / "table.md"]:
            if stale.is_file():
                stale.unlink()
    write_json_atomic(manifest_path, manifest)
    return manifest


def _write_summary(output: Path, manifest: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    results = {**manifest, "runs": runs}
    write_json_atomic(output / "results.json", results)
    write_text_atomic(output / "table.md", render_table(manifest, runs))
    return results


def _summary(run: Mapping[str, Any]) -> str:
    parts = [f"{source} ppl {_format_perplexity(values['perplexity'])}" for source, values in run["perplexity"].items()]
    if run.get("average_accuracy") is not None:
        parts.append(f"avg acc {100 * run['average_accuracy']:.2f}")
    return ", ".join(parts) or "done"


# -- the table -----------------------------------------------------------------------------


def _format_perplexity(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else str(value)
    return f"{value:.2f}" if value < 1e4 else f"{value:,.0f}"


def ordered_tasks(tasks: Sequence[str]) -> list[str]:
    """Return ``tasks`` in the column order of Table 1 of Yu et al. (2024), unknown tasks last."""
    order = list(TASK_HEADERS)
    return sorted(tasks, key=lambda task: (order.index(task) if task in order else len(order), task))



def _window_note(runs: Sequence[Mapping[str, Any]], sources: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Say how many of each source's windows --max-windows left in, from the first run that has it."""
    parts = []
    for source in sources:
        result = next((run["perplexity"][source] for run in runs if source in run.get("perplexity", {})), None)
        if result is None:
            continue
        stride = result.get("stride") or result["seqlen"]
        available = max(0, (result["stream_tokens"] - result["seqlen"]) // stride + 1)
        evaluated = result["num_windows"]
        if evaluated >= available:
            parts.append(f"{source}: all {evaluated} {'window' if evaluated == 1 else 'windows'}")
        else:
            parts.append(f"{source}: the first {evaluated} of {available} windows")
    windows = settings["max_windows"]
    return f"Perplexity with --max-windows {windows}: " + ("; ".join(parts) or "no source finished yet") + "."

def render_table(manifest: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    """Render finished runs as a markdown table: accuracy (%) per task, their mean, perplexities."""
    settings = manifest.get("settings", {})
    tasks = ordered_tasks(settings.get("tasks", []))
    sources = list(settings.get("perplexity", []))
    header = ["", *(TASK_HEADERS.get(task, task) for task in tasks)]
    if tasks:
        header.append("AVG")
    header += [f"ppl {source}" for source in sources]
    lines = [
        f"# {manifest.get('experiment')}: {manifest.get('model')}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for run in runs:
        cells = [str(run.get("label", run.get("name")))]
        for task in tasks:
            acc = run.get("tasks", {}).get(task, {}).get("acc")
            cells.append("-" if acc is None else f"{100 * acc:.2f}")
        if tasks:
            average = run.get("average_accuracy")
            cells.append("-" if average is None else f"{100 * average:.2f}")
        for source in sources:
            cells.append(_format_perplexity(run.get("perplexity", {}).get(source, {}).get("perplexity")))
        lines.append("| " + " | ".join(cells) + " |")

    finished = {run.get("name") for run in runs}
    missing = [name for name in manifest.get("configurations", []) if name not in finished]
    notes = ["", "Accuracy in % (lm_eval `acc`, zero-shot); AVG is their mean. Perplexity: windows of "
             f"{settings.get('seqlen')} tokens (GPTQ protocol) on the named text sources."]
    if sources and settings.get("max_windows") is not None:
        notes.append(_window_note(runs, sources, settings))
    if settings.get("limit") is not None:
        notes.append(f"Evaluated with --limit {settings['limit']:g}: the first {settings['limit']:g} examples of "
                     "each task, not the full splits, so accuracies carry a large sampling error.")
    split_notes = {}
    for run in runs:
        split_notes.update(run.get("split_notes") or {})
    notes += [f"{task}: {note}" for task, note in sorted(split_notes.items())]
    if missing:
        notes.append(f"Not finished yet: {', '.join(missing)}.")
    return "\n".join(lines + notes) + "\n"


# -- Table 1 and the sensitivity sweep ---------------------------------------------------


def table1_configurations(outlier_fraction: float = DEFAULT_OUTLIER_FRACTION) -> list[Configuration]:
    """Return the four rows of Table 1 of Yu et al. (2024): Original, Prune SW, Prune non-SW, Prune SW +SA.

    "Prune non-SW" zeroes the top ``outlier_fraction`` of ``|w|`` in every linear weight
    matrix of every decoder layer, then puts the super weights back.
    """
    return [
        intervention_configuration("original", "Original", InterventionSpec()),
        intervention_configuration("prune-sw", "Prune SW", InterventionSpec(scale_factor=0.0)),
        intervention_configuration(
            "prune-non-sw", "Prune non-SW",
            InterventionSpec(prune_outliers=outlier_fraction, keep_super_weights=True),
        ),
        intervention_configuration(
            "prune-sw-restore-sa", "Prune SW, +SA", InterventionSpec(restore_super_activation=True)
        ),
    ]


def sensitivity_configurations(factors: Sequence[float] = DEFAULT_FACTORS) -> list[Configuration]:
    """Return one configuration per super weight scaling factor, named ``scale-<factor>``."""
    configurations = []
    for factor in factors:
        spec = InterventionSpec(scale_factor=factor)
        configurations.append(
            intervention_configuration(f"scale-{spec.scale_factor:g}", f"x{spec.scale_factor:g}", spec,
                                       settings={"factor": spec.scale_factor})
        )
    return configurations


def run_table1(
    model: str | LoadedModel,
    output_dir: str | Path,
    *,
    evaluation: EvaluationSettings = EvaluationSettings(),
    outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
    **options: Any,
) -> dict[str, Any]:
    """Run Table 1 (see :func:`table1_configurations`); ``options`` go to :func:`run_experiment`."""
    return run_experiment(
        "table1", table1_configurations(outlier_fraction), model=model, output_dir=output_dir,
        evaluation=evaluation, settings={"outlier_fraction": outlier_fraction}, **options,
    )


def run_sensitivity(
    model: str | LoadedModel,
    output_dir: str | Path,
    *,
    factors: Sequence[float] = DEFAULT_FACTORS,
    evaluation: EvaluationSettings = EvaluationSettings(),
    **options: Any,
) -> dict[str, Any]:
    """Run the scaling sweep (see :func:`sensitivity_configurations`); ``options`` go to :func:`run_experiment`."""
    configurations = sensitivity_configurations(factors)
    return run_experiment(
        "sensitivity", configurations, model=model, output_dir=output_dir, evaluation=evaluation,
        settings={"factors": [config.settings["factor"] for config in configurations]}, **options,
    )
