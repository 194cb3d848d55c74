"""Load evaluation text by name or from a file, with its provenance.

Named sources:

``wiki-sample``
    Wikipedia articles shipped as ``wiki.utf8`` in the PyPI package ``exllamav2``
    (calibration data of the exllamav2 quantizer). The file is WikiExtractor output:
    each article is wrapped in ``<doc id=... url=... title=...>`` and ``</doc>`` lines,
    and its first line is the title. The markup is removed, articles that contain
    only a title are skipped, and the rest are joined with a blank line.
``c4-sample``
    C4 web documents shipped as ``c4.utf8`` in the same package, one document per
    line; the lines are joined with a blank line.
``wikitext2``
    The WikiText-2 test split (``wikitext``, ``wikitext-2-raw-v1``) through
    ``datasets``; its rows are joined with ``"\\n\\n"`` as in the GPTQ evaluation.
``c4``
    The first 1,100 documents of the C4 validation shard
    ``en/c4-validation.00000-of-00008.json.gz`` (``allenai/c4``) joined with a space.
    Only the first 256 windows of the token stream are evaluated. This is the C4
    evaluation of SparseGPT and Wanda, called ``c4-new`` in the GPTQ repository.
    GPTQ's older ``c4`` evaluation instead draws 256 random windows from random
    documents, which depends on the tokenizer and is not reproduced here.

Any other string is read as a path: a ``.txt`` file is used whole, and a ``.jsonl``
file contributes the ``text`` field of each line, joined with a blank line.

The exllamav2 package is located with ``importlib.util.find_spec``, which does not
execute it: importing ``exllamav2`` would try to build its native extension.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EXLLAMAV2_REQUIREMENT = "exllamav2==0.3.2"
_EXLLAMAV2_DATA_DIR = ("conversion", "standard_cal_data")

# sha256 of the files in exllamav2 0.3.2. Golden perplexities depend on these bytes,
# so a different package version is logged as a warning.
_EXLLAMAV2_FILE_SHA256 = {
    "wiki.utf8": "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
    "c4.utf8": "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
}

WIKITEXT2_DATASET = ("wikitext", "wikitext-2-raw-v1")
C4_DATASET = "allenai/c4"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_NUM_DOCUMENTS = 1100
C4_MAX_WINDOWS = 256

FILE_SUFFIXES = (".txt", ".jsonl")
OFFLINE_SOURCES = ("wiki-sample", "c4-sample")


class TextSourceUnavailable(ValueError):
    """A known text source cannot be loaded here, for example offline without a cache."""


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Evaluation text with where it came from."""

    name: str
    """Source name as passed to :func:`load_text` (a registry name or a file path)."""
    text: str = dataclasses.field(repr=False)
    sha256: str
    """sha256 of ``text`` encoded as UTF-8."""
    description: str
    """Provenance: the files or dataset read, their sha256 where known, and how they were joined."""
    official: bool
    """True for the standard benchmark splits (``wikitext2``, ``c4``), whose numbers
    compare with published ones."""
    origin: str
    """The file path or dataset id the text was read from."""
    max_windows: int | None = None
    """Cap on evaluation windows set by the source's protocol (256 for ``c4``)."""

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        name: str,
        description: str = "",
        official: bool = False,
        origin: str = "",
        max_windows: int | None = None,
    ) -> TextSource:
        """Wrap an in-memory string, computing its sha256."""
        if not text.strip():
            raise ValueError(f"text source {name!r} contains no text")
        return cls(
            name=name,
            text=text,
            sha256=_sha256_text(text),
            description=description or f"in-memory text {name!r}",
            official=official,
            origin=origin or "<memory>",
            max_windows=max_windows,
        )

    def provenance(self) -> dict[str, object]:
        """Return the fields worth saving next to a result (everything except the text)."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "description": self.description,
            "official": self.official,
            "origin": self.origin,
            "num_chars": len(self.text),
            "max_windows": self.max_windows,
        }


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- exllamav2 samples ----------------------------------------------------------------


def exllamav2_data_file(filename: str) -> Path:
    """Locate a calibration text file of the ``exllamav2`` package without importing it."""
    # find_spec on a top-level name reads the import system's metadata only, so
    # exllamav2/__init__.py (and its native extension build) never runs.
    spec = importlib.util.find_spec("exllamav2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location, *_EXLLAMAV2_DATA_DIR, filename)
        if path.is_file():
            return path
    where = ", ".join(locations) if locations else "package not installed"
    raise TextSourceUnavailable(
        f"text file {filename!r} of the exllamav2 package was not found ({where}); "
        f"install it as data with `pip install --no-deps {EXLLAMAV2_REQUIREMENT}`"
    )


def _read_exllamav2_file(filename: str) -> tuple[Path, str, str]:
    """Return the path, text and sha256 of a calibration file of exllamav2."""
    path = exllamav2_data_file(filename)
    data = path.read_bytes()
    file_sha256 = hashlib.sha256(data).hexdigest()
    expected = _EXLLAMAV2_FILE_SHA256[filename]
    if file_sha256 != expected:
        log.warning(
            "%s has sha256 %s, not the %s of %s; perplexities will differ from the "
            "recorded golden values",
            path, file_sha256, expected, EXLLAMAV2_REQUIREMENT,
        )
    return path, data.decode("utf-8"), file_sha256


def split_wikiextractor_articles(raw: str) -> list[str]:
    """Split WikiExtractor output into articles (title line first), dropping the markup.

    Articles that contain only a title line are dropped.

    >>> raw = '<doc id="1" title="A">\\nA\\n\\nBody.\\n</doc>\\n<doc id="2" title="B">\\nB\\n\\n</doc>\\n'
    >>> split_wikiextractor_articles(raw)
    ['A\\n\\nBody.']
    """
    articles = []
    for chunk in raw.split("</doc>"):
        chunk = chunk.strip()
        if not chunk:
            continue
        if chunk.startswith("<doc "):
            header_end = chunk.find("\n")
            chunk = chunk[header_end + 1 :].strip() if header_end >= 0 else ""
        if "\n" not in chunk:
            continue
        articles.append(chunk)
    return articles


def _load_wiki_sample() -> TextSource:
    path, raw, file_sha256 = _read_exllamav2_file("wiki.utf8")
    articles = split_wikiextractor_articles(raw)
    text = "\n\n".join(articles)
    return TextSource(
        name="wiki-sample",
        text=text,
        sha256=_sha256_text(text),
        description=(
            f"{len(articles)} Wikipedia articles from wiki.utf8 of {EXLLAMAV2_REQUIREMENT} "
            f"(file sha256 {file_sha256}); <doc> markup "
            "removed, title-only articles skipped, joined with a blank line"
        ),
        official=False,
        origin=str(path),
    )


def _load_c4_sample() -> TextSource:
    path, raw, file_sha256 = _read_exllamav2_file("c4.utf8")
    documents = [line.strip() for line in raw.splitlines() if line.strip()]
    text = "\n\n".join(documents)
    return TextSource(
        name="c4-sample",
        text=text,
        sha256=_sha256_text(text),
        description=(
            f"{len(documents)} C4 documents from c4.utf8 of {EXLLAMAV2_REQUIREMENT} "
            f"(file sha256 {file_sha256}), one per line, "
            "joined with a blank line"
        ),
        official=False,
        origin=str(path),
    )


# -- datasets splits ------------------------------------------------------------------


def _load_dataset(name: str, *args, **kwargs):
    # Imported here: datasets takes about a second to import and the offline
    # sources do not need it.
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except OSError as error:
        # Offline mode, an unreachable hub and a missing cache all surface as
        # OSError subclasses (ConnectionError, FileNotFoundError, HfHubHTTPError).
        raise TextSourceUnavailable(
            f"text source {name!r} could not be loaded through datasets ({error}); it needs "
            "the Hugging Face hub or a local datasets cache. Offline, use one of "
            f"{', '.join(OFFLINE_SOURCES)} or a .txt/.jsonl file"
        ) from error


def _load_wikitext2() -> TextSource:
    dataset = _load_dataset("wikitext2", *WIKITEXT2_DATASET, split="test")
    text = "\n\n".join(dataset["text"])
    return TextSource(
        name="wikitext2",
        text=text,
        sha256=_sha256_text(text),
        description=(
            f"{len(dataset)} rows of the test split of {'/'.join(WIKITEXT2_DATASET)}, "
            'joined with "\\n\\n" as in the GPTQ evaluation'
        ),
        official=True,
        origin="/".join(WIKITEXT2_DATASET),
    )


def _load_c4() -> TextSource:
    dataset = _load_dataset(
        "c4",
        C4_DATASET,
        data_files={"validation": C4_VALIDATION_FILE},
        split="validation",
    )
    documents = dataset[:C4_NUM_DOCUMENTS]["text"]
    text = " ".join(documents)
    return TextSource(
        name="c4",
        text=text,
        sha256=_sha256_text(text),
        description=(
            f"first {len(documents)} documents of {C4_DATASET} {C4_VALIDATION_FILE} joined "
            f"with a space; the first {C4_MAX_WINDOWS} windows are evaluated (the C4 "
            "evaluation of SparseGPT and Wanda, c4-new in GPTQ)"
        ),
        official=True,
        origin=f"{C4_DATASET}/{C4_VALIDATION_FILE}",
        max_windows=C4_MAX_WINDOWS,
    )


# -- files ----------------------------------------------------------------------------


def _load_txt(path: Path, name: str) -> TextSource:
    text = _read_text_file(path)
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} contains no text")
    return TextSource(
        name=name,
        text=text,
        sha256=_sha256_text(text),
        description=f"whole text of {path}",
        official=False,
        origin=str(path.resolve()),
    )


def _load_jsonl(path: Path, name: str) -> TextSource:
    raw = _read_text_file(path)
    documents = []
    for line_number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number} is not valid JSON: {error.msg}") from error
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(
                f"{path}:{line_number} has no 'text' field; each line of a .jsonl text "
                'source must be an object like {"text": "..."}'
            )
        if not isinstance(record["text"], str):
            raise ValueError(
                f"{path}:{line_number} field 'text' is {type(record['text']).__name__}, "
                "expected a string"
            )
        documents.append(record["text"])
    text = "\n\n".join(documents)
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} contains no text")
    return TextSource(
        name=name,
        text=text,
        sha256=_sha256_text(text),
        description=f"'text' field of {len(documents)} lines of {path}, joined with a blank line",
        official=False,
        origin=str(path.resolve()),
    )


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8: {error}") from error


# -- registry -------------------------------------------------------------------------

# Named sources are cached: a TextSource is immutable and the dataset splits are slow
# to load. Files are read on every call because they may change.
SOURCES: dict[str, Callable[[], TextSource]] = {
    "wiki-sample": functools.cache(_load_wiki_sample),
    "c4-sample": functools.cache(_load_c4_sample),
    "wikitext2": functools.cache(_load_wikitext2),
    "c4": functools.cache(_load_c4),
}


def available_sources() -> list[str]:
    """Return the names accepted by :func:`load_text` besides file paths."""
    return list(SOURCES)


def load_text(source: str) -> TextSource:
    """Load a named text source or a ``.txt``/``.jsonl`` file.

    Raises :class:`TextSourceUnavailable` when a named source cannot be loaded here,
    and ``ValueError`` for an unknown name or an unreadable file.
    """
    if source in SOURCES:
        return SOURCES[source]()

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"text file {source!r} does not exist")
        if suffix == ".txt":
            return _load_txt(path, source)
        return _load_jsonl(path, source)
    if path.is_file():
        raise ValueError(
            f"text file {source!r} has an unsupported suffix {path.suffix!r}; "
            f"use one of {', '.join(FILE_SUFFIXES)}"
        )
    raise ValueError(
        f"unknown text source {source!r}; use one of {', '.join(SOURCES)}, "
        f"or a path to a {' or '.join(FILE_SUFFIXES)} file"
    )
