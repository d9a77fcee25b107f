"""BLIP nodes: load a BLIP captioning model from models/blip, caption an IMAGE batch.

The model runs through ``zerocon_core.captioning`` (transformers, imported only when a node executes).
The loaded model is wrapped in a ComfyUI ``ModelPatcher`` (as ``comfy/clip_vision.py`` does for CLIP
vision), so ComfyUI's memory manager moves it to the GPU to caption and can unload it when the UNet
needs the memory.

Caption output: one STRING holding one caption per image, one per line (``zerocon_core.prompts``), not a
ComfyUI list, so the nodes after it run once for the whole batch (a list output would run them once per
caption, each over the whole batch). With one image it is the caption itself, for CLIP Text Encode; with a
batch, ZeroCon Encode Prompts turns the lines into one CONDITIONING with one row per image.
"""

from __future__ import annotations

import logging
import os

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy_api.latest import io, ui

from ..zerocon_core import captioning
from ..zerocon_core.prompts import join_prompts
from . import paths
from .paths import offline

logger = logging.getLogger("zerocon")

CATEGORY = "image/translation/zerocon"
Blip = io.Custom("ZEROCON_BLIP")

DEFAULT_MODEL = "blip-image-captioning-base"
# Folder name -> Hugging Face repository that may be downloaded into models/blip/<folder name>.
KNOWN_MODELS = {
    "blip-image-captioning-base": "Salesforce/blip-image-captioning-base",
    "blip-image-captioning-large": "Salesforce/blip-image-captioning-large",
}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "gpu")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ZeroConBlip:
    """What travels on a ZEROCON_BLIP link: the loaded captioner and the patcher ComfyUI manages it by."""

    def __init__(self, blip: captioning.Blip, patcher, name: str):
        self.blip = blip
        self.patcher = patcher
        self.name = name

    def load(self) -> None:
        """Ask ComfyUI to put the model on its load device (unloading other models if needed)."""
        mm.load_models_gpu([self.patcher], force_full_load=True)

    def __repr__(self) -> str:
        return f"ZeroConBlip({self.name!r}, {self.blip.folder!r}, {self.patcher.load_device}, {self.blip.dtype})"


class _BlipModule(torch.nn.Module):
    """Container so ModelPatcher can set its bookkeeping attributes (``device``...) without touching the
    transformers model, whose ``device`` is a read-only property."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.blip = model


def _devices(device: str) -> tuple[torch.device, torch.device]:
    cpu = torch.device("cpu")
    if device == "cpu":
        return cpu, cpu
    if device == "gpu":
        return mm.get_torch_device(), mm.text_encoder_offload_device()
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def _dtype(precision: str, load_device: torch.device) -> torch.dtype:
    if precision in _DTYPES:
        return _DTYPES[precision]
    return torch.float16 if mm.should_use_fp16(load_device, prioritize_performance=False) else torch.float32


def _model_names() -> list[str]:
    """The default model first, then the other downloadable ones, then every local model folder."""
    names = list(KNOWN_MODELS)
    names += [n for n in paths.model_folders(paths.BLIP) if n not in KNOWN_MODELS]
    return names


def _missing(folder: str, name: str, why: str) -> FileNotFoundError:
    repo = KNOWN_MODELS.get(name, captioning.BLIP_MODEL_ID)
    hint = " or run once online with allow_download on" if name in KNOWN_MODELS else ""
    return FileNotFoundError(
        f"ZeroCon BLIP Loader: no BLIP model in {folder} ({why}). Put the files of the Hugging Face model "
        f"'{repo}' (https://huggingface.co/{repo}) in that folder{hint}."
    )


def _download(name: str, folder: str) -> None:
    repo = KNOWN_MODELS[name]
    logger.info("ZeroCon: downloading %s to %s", repo, folder)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=repo, local_dir=folder)
    except Exception as exc:
        raise _missing(folder, name, f"downloading it failed: {exc}") from exc


def resolve_folder(name: str, allow_download: bool) -> str:
    """The local folder of BLIP model ``name``, downloading a known model once when allowed and online."""
    if not name or name in (".", "..") or os.path.basename(name) != name or os.path.isabs(name):
        raise ValueError(f"ZeroCon BLIP Loader: {name!r} is not a folder name under models/blip")
    folder = paths.find_model_folder(paths.BLIP, name) or paths.download_folder(paths.BLIP, name)
    try:
        captioning.check_blip_folder(folder)
        return folder
    except FileNotFoundError as exc:
        logger.debug("ZeroCon: %s", exc)
        state = "incomplete" if os.path.isdir(folder) else "missing"
    if name not in KNOWN_MODELS:
        raise _missing(folder, name, f"the folder is {state}")
    if not allow_download:
        raise _missing(folder, name, f"the folder is {state} and allow_download is off")
    if offline():
        raise _missing(folder, name, f"the folder is {state} and HF_HUB_OFFLINE is set")
    _download(name, folder)
    try:
        captioning.check_blip_folder(folder)
    except FileNotFoundError as exc:
        raise _missing(folder, name, f"still incomplete after downloading: {exc}") from exc
    return folder


class ZeroConBLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroConBLIPLoader",
            display_name="ZeroCon BLIP Loader",
            category=CATEGORY,
            description=(
                "Loads a BLIP image-captioning model (transformers layout) from ComfyUI/models/blip/<name>. "
                f"'{DEFAULT_MODEL}' is downloaded from Hugging Face ({KNOWN_MODELS[DEFAULT_MODEL]}) on first use "
                "when allowed and online; otherwise the error says which folder to fill."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=_model_names(),
                    default=DEFAULT_MODEL,
                    tooltip="Folder under models/blip holding a BLIP captioning model (config.json, weights, tokenizer and processor files). The two Salesforce models are listed even before they are downloaded.",
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip="Weight precision. auto: fp16 on a GPU that supports it, else fp32. Use fp32 on CPU.",
                ),
                io.Combo.Input(
                    "device",
                    options=list(DEVICES),
                    default="auto",
                    tooltip="Where to run BLIP. auto: ComfyUI's text-encoder device; gpu: the main GPU; cpu: always the CPU.",
                ),
                io.Boolean.Input(
                    "allow_download",
                    default=True,
                    tooltip=f"If the model folder is missing, download it once from Hugging Face (only '{DEFAULT_MODEL}' and 'blip-image-captioning-large'; never when HF_HUB_OFFLINE=1).",
                ),
            ],
            outputs=[
                Blip.Output("blip", display_name="blip", tooltip="The loaded BLIP captioner, for ZeroCon BLIP Caption.")
            ],
        )

    @classmethod
    def execute(cls, model, precision, device, allow_download) -> io.NodeOutput:
        folder = resolve_folder(model, allow_download)
        load_device, offload_device = _devices(device)
        dtype = _dtype(precision, load_device)
        blip = captioning.load_blip(folder, device=offload_device, dtype=dtype)
        patcher = comfy.model_patcher.ModelPatcher(
            _BlipModule(blip.model), load_device=load_device, offload_device=offload_device
        )
        return io.NodeOutput(ZeroConBlip(blip, patcher, model))


class ZeroConBLIPCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroConBLIPCaption",
            display_name="ZeroCon BLIP Caption",
            category=CATEGORY,
            description=(
                "Captions each image with BLIP (the source prompt of pix2pix-zero). Outputs one STRING with one "
                "caption per image, one per line: one image gives its caption, for CLIP Text Encode; for a batch, "
                "encode the lines with ZeroCon Encode Prompts (one conditioning row per image), so the edit runs once "
                "for the whole batch."
            ),
            inputs=[
                Blip.Input("blip", tooltip="A BLIP captioner from ZeroCon BLIP Loader."),
                io.Image.Input(
                    "image", tooltip="The image(s) to caption; every image of the batch gets its own caption."
                ),
                io.String.Input(
                    "prefix",
                    default="a photography of",
                    tooltip="Text the caption starts from (pix2pix-zero uses 'a photography of'); removed from the output. Empty: unconditional captioning.",
                ),
                io.Int.Input(
                    "max_new_tokens",
                    default=30,
                    min=1,
                    max=256,
                    tooltip="Longest caption, in tokens generated after the prefix.",
                ),
                io.Int.Input(
                    "min_new_tokens",
                    default=0,
                    min=0,
                    max=128,
                    tooltip="Shortest caption, in tokens generated after the prefix. Raise it if captions come out empty or too short.",
                ),
                io.Int.Input(
                    "num_beams",
                    default=3,
                    min=1,
                    max=16,
                    tooltip="Beam-search width (pix2pix-zero: 3). 1 is greedy decoding, faster.",
                ),
            ],
            outputs=[
                io.String.Output(
                    "caption",
                    display_name="caption",
                    tooltip="The captions (prefix removed), one line per image in batch order; for a batch, encode "
                    "them with ZeroCon Encode Prompts.",
                )
            ],
        )

    @classmethod
    def execute(cls, blip, image, prefix, max_new_tokens, min_new_tokens, num_beams) -> io.NodeOutput:
        if not isinstance(blip, ZeroConBlip):
            raise TypeError(
                f"ZeroCon BLIP Caption: expected a BLIP from ZeroCon BLIP Loader, got {type(blip).__name__}"
            )
        if image.ndim != 4 or image.shape[0] == 0:
            raise ValueError(f"ZeroCon BLIP Caption: expected an IMAGE batch (B, H, W, C), got {tuple(image.shape)}")
        blip.load()
        captions: list[str] = []
        step = 8
        for i in range(0, image.shape[0], step):
            mm.throw_exception_if_processing_interrupted()
            captions += captioning.caption(
                blip.blip,
                image[i : i + step],
                prefix=prefix,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_beams=num_beams,
                strip_prefix=True,
                allow_empty=True,
            )
        empty = [i for i, text in enumerate(captions) if not text.strip()]
        if empty:
            which = f"image {empty[0]}" if len(empty) == 1 else f"images {empty}"
            raise ValueError(
                f"ZeroCon BLIP Caption: BLIP ({blip.name}) returned an empty caption for {which} of {len(captions)} "
                f"(prefix {prefix!r}). Raise min_new_tokens, change the prefix, or type the source prompt by hand."
            )
        for i, text in enumerate(captions):
            logger.info("ZeroCon BLIP caption %d: %s", i, text)
        if len(captions) > 1:
            logger.info(
                "ZeroCon BLIP Caption: %d captions, one per line; ZeroCon Encode Prompts gives each image its own "
                "(CLIP Text Encode would read them as one prompt)",
                len(captions),
            )
        text = join_prompts(captions)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES: list[type[io.ComfyNode]] = [ZeroConBLIPLoader, ZeroConBLIPCaption]
