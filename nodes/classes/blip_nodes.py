"""BLIP nodes: load a BLIP captioning model from models/blip, caption an IMAGE batch.

The model runs through ``zerocon_core.text.captioning`` (transformers, imported only when a node executes).
The loaded model is wrapped in a ComfyUI ``ModelPatcher`` (as ``comfy/clip_vision.py`` does for CLIP
vision), so ComfyUI's memory manager moves it to the GPU to caption and can unload it when the UNet
needs the memory.

Caption output: one STRING holding one caption per image, one per line (``zerocon_core.text.prompts``), not a
ComfyUI list, so the nodes after it run once for the whole batch (a list output would run them once per
caption, each over the whole batch). With one image it is the caption itself, for CLIP Text Encode; with a
batch, ZeroCon Encode Prompts turns the lines into one CONDITIONING with one row per image.
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
from comfy_api.latest import io, ui

from ...zerocon_core.text import captioning
from ...zerocon_core.text.prompts import join_prompts
from ..glue import loaders, paths
from ..glue.inputs import CATEGORY, loader_inputs, schema

logger = logging.getLogger("zerocon")

Blip = io.Custom("ZEROCON_BLIP")

DEFAULT_MODEL = "blip-image-captioning-base"
SOURCE = loaders.ModelSource(
    key=paths.BLIP,
    node="ZeroCon BLIP Loader",
    folder=captioning.BLIP_FOLDER,
    known={  # folder name -> Hugging Face repository that may be downloaded into models/blip/<folder name>
        "blip-image-captioning-base": "Salesforce/blip-image-captioning-base",
        "blip-image-captioning-large": "Salesforce/blip-image-captioning-large",
    },
)
KNOWN_MODELS = SOURCE.known
PRECISIONS = ("auto", *loaders.DTYPES)
DEVICES = loaders.DEVICES


#: The loader's tooltips by input name.
LOADER_TIPS = {
    "model": "Folder under models/blip holding a BLIP captioning model (config.json, weights, tokenizer and processor files). The two Salesforce models are listed even before they are downloaded.",
    "precision": "Weight precision. auto: fp16 on a GPU that supports it, else fp32. Use fp32 on CPU.",
    "device": "Where to run BLIP. auto: ComfyUI's text-encoder device; gpu: the main GPU; cpu: always the CPU.",
    "allow_download": f"If the model folder is missing, download it once from Hugging Face (only '{DEFAULT_MODEL}' and 'blip-image-captioning-large'; never when HF_HUB_OFFLINE=1).",
}


class ZeroConBlip(loaders.ZeroConModel):
    """What travels on a ZEROCON_BLIP link: the loaded captioner (``blip``, a ``captioning.Blip``), the patcher
    ComfyUI manages it by, and its name."""

    @property
    def blip(self) -> captioning.Blip:
        return self.model


class ZeroConBLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConBLIPLoader",
            display_name="ZeroCon BLIP Loader",
            category=CATEGORY,
            description=(
                "Loads a BLIP image-captioning model (transformers layout) from ComfyUI/models/blip/<name>. "
                f"'{DEFAULT_MODEL}' is downloaded from Hugging Face ({KNOWN_MODELS[DEFAULT_MODEL]}) on first use "
                "when allowed and online; otherwise the error says which folder to fill."
            ),
            inputs=loader_inputs(SOURCE, DEFAULT_MODEL, LOADER_TIPS, PRECISIONS, "auto"),
            outputs=[
                Blip.Output("blip", display_name="blip", tooltip="The loaded BLIP captioner, for ZeroCon BLIP Caption.")
            ],
        )

    @classmethod
    def execute(cls, model, precision, device, allow_download) -> io.NodeOutput:
        folder = loaders.resolve_folder(SOURCE, model, allow_download)
        load_device, offload_device = loaders.devices(device, text_encoder=True)
        blip = captioning.load_blip(folder, device=offload_device, dtype=loaders.dtype(precision, load_device))
        return io.NodeOutput(ZeroConBlip(blip, loaders.patcher_for(blip.model, load_device, offload_device), model))


class ZeroConBLIPCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
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
