"""DINO ViT loader node (ZEROCON_DINO), plus the model-folder helpers the metrics nodes share.

A DINO model lives in ``ComfyUI/models/dino/<name>/`` in transformers ``save_pretrained`` layout (the
files of https://huggingface.co/facebook/dino-vitb8). ``dino-vitb8`` is listed even before it exists and
is downloaded from Hugging Face on first use when allowed and online; otherwise the error names the folder
to fill and the model id. The model is wrapped in a ComfyUI ``ModelPatcher`` so ComfyUI's memory manager
puts it on the GPU when a node needs it and can unload it when the UNet needs the memory.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy_api.latest import io

from ..zerocon_core import dino
from . import paths
from .paths import offline

logger = logging.getLogger("zerocon")

CATEGORY = "image/translation/zerocon"
Dino = io.Custom("ZEROCON_DINO")

DEFAULT_DINO = "dino-vitb8"
# Folder name -> Hugging Face repository that may be downloaded into models/dino/<folder name>.
KNOWN_DINO = {"dino-vitb8": dino.DINO_MODEL_ID}
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "gpu")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Weights are taken as safetensors when the repository has them (it may also hold .bin / .h5 / msgpack copies).
_PATTERNS = ["*.json", "*.txt", "*.safetensors"]


class _Holder(torch.nn.Module):
    """Container so ModelPatcher can set its bookkeeping attributes without touching the transformers model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model


class ZeroConModel:
    """What travels on a ZEROCON_DINO / ZEROCON_CLIP_METRIC link: the loaded model (``model``: a
    transformers ``ViTModel`` / a ``metrics.ClipMetric``), the patcher ComfyUI manages it by, its name."""

    def __init__(self, model: Any, patcher: Any, name: str):
        self.model = model
        self.patcher = patcher
        self.name = name

    def load(self) -> None:
        """Ask ComfyUI to put the model on its load device (unloading other models if needed)."""
        if self.patcher is not None:
            mm.load_models_gpu([self.patcher], force_full_load=True)

    def __repr__(self) -> str:
        return f"ZeroConModel({self.name!r})"


def unwrap(value: Any) -> Any:
    """The model inside a ZeroConModel link value (after loading it to its device), or ``value`` itself."""
    if isinstance(value, ZeroConModel):
        value.load()
        return value.model
    return value


def devices(device: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a device choice: auto (ComfyUI's main device), gpu or cpu."""
    cpu = torch.device("cpu")
    if device == "cpu":
        return cpu, cpu
    return mm.get_torch_device(), mm.unet_offload_device()


def model_names(key: str, known: dict[str, str]) -> list[str]:
    """The downloadable names first, then every local model folder under ``key``."""
    return list(known) + [n for n in paths.model_folders(key) if n not in known]


def resolve_folder(
    key: str, name: str, known: dict[str, str], check: Callable[[str], None], allow_download: bool, node: str
) -> str:
    """The local folder of model ``name`` under ``key``: checked with ``check`` (raises FileNotFoundError),
    downloading a ``known`` model once when allowed and online."""
    if not name or name in (".", "..") or os.path.basename(name) != name or os.path.isabs(name):
        raise ValueError(f"{node}: {name!r} is not a folder name under models/{key}")
    folder = paths.find_model_folder(key, name) or paths.download_folder(key, name)
    if name in known:  # name the model the user picked in the error, not the default one
        check = functools.partial(check, model_id=known[name])
    try:
        check(folder)
        return folder
    except FileNotFoundError as exc:
        why = str(exc)
    if name not in known:
        raise FileNotFoundError(f"{node}: {why}")
    if not allow_download:
        raise FileNotFoundError(f"{node}: {why} (allow_download is off)")
    if offline():
        raise FileNotFoundError(f"{node}: {why} (not downloaded: HF_HUB_OFFLINE is set)")
    repo = known[name]
    logger.info("ZeroCon: downloading %s to %s", repo, folder)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=repo, local_dir=folder, allow_patterns=_PATTERNS)
        try:
            check(folder)
        except FileNotFoundError:  # no safetensors in that repository: take the PyTorch weights
            snapshot_download(repo_id=repo, local_dir=folder, allow_patterns=_PATTERNS + ["*.bin"])
    except Exception as exc:
        raise FileNotFoundError(f"{node}: downloading {repo} to {folder} failed: {exc}. {why}") from exc
    check(folder)
    return folder


def patcher_for(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    return comfy.model_patcher.ModelPatcher(_Holder(module), load_device=load_device, offload_device=offload_device)


class ZeroConDINOLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroConDINOLoader",
            display_name="ZeroCon DINO Loader",
            category=CATEGORY,
            description=(
                "Loads a DINO ViT (transformers layout) from ComfyUI/models/dino/<name>: the structure and style "
                f"features of DiffuseIT and the structure metric of ZeroCon Edit Metrics. '{DEFAULT_DINO}' "
                f"({dino.DINO_MODEL_ID}) is downloaded on first use when allowed and online."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=model_names(paths.DINO, KNOWN_DINO),
                    default=DEFAULT_DINO,
                    tooltip=f"Folder under models/dino holding a DINO ViT (config.json + weights of {dino.DINO_MODEL_ID}). '{DEFAULT_DINO}' is listed even before it is downloaded.",
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="fp32",
                    tooltip="Weight precision. fp32 is exact and small enough (ViT-B/8: 86M parameters); fp16/bf16 halve the memory on a GPU.",
                ),
                io.Combo.Input(
                    "device",
                    options=list(DEVICES),
                    default="auto",
                    tooltip="Where DINO runs. auto/gpu: ComfyUI's main device (offloaded when idle); cpu: always the CPU.",
                ),
                io.Boolean.Input(
                    "allow_download",
                    default=True,
                    tooltip=f"If the folder is missing, download '{DEFAULT_DINO}' once from Hugging Face ({dino.DINO_MODEL_ID}); never when HF_HUB_OFFLINE=1.",
                ),
            ],
            outputs=[Dino.Output("dino", display_name="dino", tooltip="The loaded DINO ViT.")],
        )

    @classmethod
    def execute(cls, model, precision, device, allow_download) -> io.NodeOutput:
        folder = resolve_folder(
            paths.DINO, model, KNOWN_DINO, dino.check_dino_folder, allow_download, "ZeroCon DINO Loader"
        )
        load_device, offload_device = devices(device)
        vit = dino.load_dino(folder, device=offload_device, dtype=_DTYPES[precision])
        return io.NodeOutput(ZeroConModel(vit, patcher_for(vit, load_device, offload_device), model))


NODES = [ZeroConDINOLoader]
