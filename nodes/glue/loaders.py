"""What the model-folder loader nodes share (BLIP, DINO, CLIP metric): find, download, place, wrap.

A model lives in ``ComfyUI/models/<key>/<name>/`` in transformers ``save_pretrained`` layout (the folders
``nodes/glue/paths.py`` registers). ``resolve_folder`` finds it, checks it with the engine's
``check_model_folder`` and, for a name listed in ``ModelSource.known``, downloads the Hugging Face
repository once when allowed and online, in one weight format (safetensors; PyTorch ``.bin`` only when the
repository has no safetensors). An interrupted download is completed the same way. The loaded model travels
wrapped in a ComfyUI ``ModelPatcher``, so ComfyUI's memory manager puts it on its device when a node needs
it and can unload it when the UNet needs the memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ...zerocon_core.common.model_folders import ModelFolder, ModelFolderError, check_model_folder, hub_offline
from . import paths

logger = logging.getLogger("zerocon")

DEVICES = ("auto", "cpu", "gpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Files taken from a hub repository (it may also hold .bin / .h5 / msgpack / onnx copies of the weights).
DOWNLOAD_PATTERNS = ("*.json", "*.txt", "*.safetensors")
FALLBACK_PATTERNS = DOWNLOAD_PATTERNS + ("*.bin",)  # a repository without safetensors weights


@dataclass(frozen=True)
class ModelSource:
    """One kind of model folder as a loader node sees it.

    key: the ``folder_paths`` key (``paths.BLIP`` ...). node: the node's display name, which starts every
    error. folder: the engine's description of a complete folder. known: folder name -> Hugging Face
    repository, the names that may be downloaded (listed first in the node's menu).
    """

    key: str
    node: str
    folder: ModelFolder
    known: dict[str, str] = field(default_factory=dict)


class ZeroConModel:
    """What travels on a ZEROCON_BLIP / ZEROCON_DINO / ZEROCON_CLIP_METRIC link: the loaded model (``model``),
    the patcher ComfyUI manages it by, and the name it was loaded by."""

    def __init__(self, model: Any, patcher: Any, name: str):
        self.model = model
        self.patcher = patcher
        self.name = name

    def load(self) -> None:
        """Ask ComfyUI to put the model on its load device (unloading other models if needed)."""
        if self.patcher is not None:
            mm.load_models_gpu([self.patcher], force_full_load=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _Holder(torch.nn.Module):
    """Container so ModelPatcher can set its bookkeeping attributes (``device``...) without touching the
    transformers model, whose ``device`` is a read-only property."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model


def patcher_for(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """A ComfyUI ``ModelPatcher`` managing ``module`` between ``load_device`` and ``offload_device``."""
    return comfy.model_patcher.ModelPatcher(_Holder(module), load_device=load_device, offload_device=offload_device)


def unwrap(value: Any) -> Any:
    """The model inside a ZeroConModel link value (after loading it to its device), or ``value`` itself."""
    if isinstance(value, ZeroConModel):
        value.load()
        return value.model
    return value


def devices(device: str, text_encoder: bool = False) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a device choice. cpu: always the CPU; gpu: ComfyUI's main device;
    auto: the main device, or ComfyUI's text-encoder device when ``text_encoder``. Offloaded where ComfyUI
    offloads text encoders (``text_encoder``) or UNets."""
    cpu = torch.device("cpu")
    if device == "cpu":
        return cpu, cpu
    offload = mm.text_encoder_offload_device() if text_encoder else mm.unet_offload_device()
    if device == "auto" and text_encoder:
        return mm.text_encoder_device(), offload
    return mm.get_torch_device(), offload


def dtype(precision: str, load_device: torch.device) -> torch.dtype:
    """The torch dtype of a precision choice; ``auto``: fp16 where ComfyUI would use it on ``load_device``."""
    if precision in DTYPES:
        return DTYPES[precision]
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; expected auto or one of {sorted(DTYPES)}")
    return torch.float16 if mm.should_use_fp16(load_device, prioritize_performance=False) else torch.float32


def model_names(source: ModelSource) -> list[str]:
    """The downloadable names first, then every local model folder under ``source.key``."""
    return list(source.known) + [n for n in paths.model_folders(source.key) if n not in source.known]


def _error(source: ModelSource, name: str, folder: str, state: str, missing: list[str] | None = None):
    repo = source.known.get(name, source.folder.model_id)  # name the model the user picked, not the default
    lacks = f" It lacks {', '.join(missing)}." if missing else ""
    hint = " or run once online with allow_download on" if name in source.known else ""
    return FileNotFoundError(
        f"{source.node}: no {source.folder.kind} in {folder} ({state}).{lacks} Put the files of the Hugging Face "
        f"model '{repo}' (https://huggingface.co/{repo}) in that folder{hint}."
    )


def _download(repo: str, folder: str, required: ModelFolder) -> None:
    """Download ``repo``'s config, tokenizer and weight files into ``folder`` (one weight format)."""
    from huggingface_hub import snapshot_download

    logger.info("ZeroCon: downloading %s to %s", repo, folder)
    snapshot_download(repo_id=repo, local_dir=folder, allow_patterns=list(DOWNLOAD_PATTERNS))
    try:
        check_model_folder(folder, required, repo)
    except ModelFolderError:  # no safetensors weights in that repository: take the PyTorch ones
        snapshot_download(repo_id=repo, local_dir=folder, allow_patterns=list(FALLBACK_PATTERNS))


def resolve_folder(source: ModelSource, name: str, allow_download: bool) -> str:
    """The local folder of model ``name`` under ``source.key``, downloading a known model once when allowed
    and online. Raises ValueError for a name that is not a plain folder name, FileNotFoundError naming the
    folder and the repository to put there otherwise."""
    if not name or name in (".", "..") or os.path.basename(name) != name or os.path.isabs(name):
        raise ValueError(f"{source.node}: {name!r} is not a folder name under models/{source.key}")
    folder = paths.find_model_folder(source.key, name) or paths.download_folder(source.key, name)
    repo = source.known.get(name, source.folder.model_id)
    try:
        return check_model_folder(folder, source.folder, repo)
    except ModelFolderError as exc:
        logger.debug("ZeroCon: %s", exc)
        missing = exc.missing
    state = "the folder is missing" if missing is None else "the folder is incomplete"
    if name not in source.known:
        raise _error(source, name, folder, state, missing)
    if not allow_download:
        raise _error(source, name, folder, f"{state} and allow_download is off")
    if hub_offline():
        raise _error(source, name, folder, f"{state} and HF_HUB_OFFLINE is set")
    try:
        _download(repo, folder, source.folder)
    except Exception as exc:
        raise _error(source, name, folder, f"{state} and downloading it failed: {exc}") from exc
    try:
        return check_model_folder(folder, source.folder, repo)
    except ModelFolderError as exc:
        raise _error(source, name, folder, "the folder is still incomplete after downloading", exc.missing) from exc
