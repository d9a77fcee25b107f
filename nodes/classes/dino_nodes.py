"""DINO ViT loader node (ZEROCON_DINO).

A DINO model lives in ``ComfyUI/models/dino/<name>/`` in transformers ``save_pretrained`` layout (the
files of https://huggingface.co/facebook/dino-vitb8). ``dino-vitb8`` is listed even before it exists and
is downloaded from Hugging Face on first use when allowed and online; otherwise the error names the folder
to fill and the model id (``nodes/glue/loaders.py``).
"""

from __future__ import annotations

from comfy_api.latest import io

from ...zerocon_core.diffuseit import dino
from ..glue import loaders, paths
from ..glue.inputs import CATEGORY, loader_inputs, schema
from ..glue.loaders import DTYPES, ZeroConModel, patcher_for

Dino = io.Custom("ZEROCON_DINO")

DEFAULT_DINO = "dino-vitb8"
SOURCE = loaders.ModelSource(
    key=paths.DINO, node="ZeroCon DINO Loader", folder=dino.DINO_FOLDER, known={DEFAULT_DINO: dino.DINO_MODEL_ID}
)
KNOWN_DINO = SOURCE.known
PRECISIONS = tuple(DTYPES)


#: The loader's tooltips by input name.
LOADER_TIPS = {
    "model": f"Folder under models/dino holding a DINO ViT (config.json + weights of {dino.DINO_MODEL_ID}). '{DEFAULT_DINO}' is listed even before it is downloaded.",
    "precision": "Weight precision. fp32 is exact and small enough (ViT-B/8: 86M parameters); fp16/bf16 halve the memory on a GPU.",
    "device": "Where DINO runs. auto/gpu: ComfyUI's main device (offloaded when idle); cpu: always the CPU.",
    "allow_download": f"If the folder is missing, download '{DEFAULT_DINO}' once from Hugging Face ({dino.DINO_MODEL_ID}); never when HF_HUB_OFFLINE=1.",
}


class ZeroConDINOLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConDINOLoader",
            display_name="ZeroCon DINO Loader",
            category=CATEGORY,
            description=(
                "Loads a DINO ViT (transformers layout) from ComfyUI/models/dino/<name>: the structure and style "
                f"features of DiffuseIT and the structure metric of ZeroCon Edit Metrics. '{DEFAULT_DINO}' "
                f"({dino.DINO_MODEL_ID}) is downloaded on first use when allowed and online."
            ),
            inputs=loader_inputs(SOURCE, DEFAULT_DINO, LOADER_TIPS),
            outputs=[Dino.Output("dino", display_name="dino", tooltip="The loaded DINO ViT.")],
        )

    @classmethod
    def execute(cls, model, precision, device, allow_download) -> io.NodeOutput:
        folder = loaders.resolve_folder(SOURCE, model, allow_download)
        load_device, offload_device = loaders.devices(device)
        vit = dino.load_dino(folder, device=offload_device, dtype=DTYPES[precision])
        return io.NodeOutput(ZeroConModel(vit, patcher_for(vit, load_device, offload_device), model))


NODES = [ZeroConDINOLoader]
