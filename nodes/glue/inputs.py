"""Inputs shared by several ZeroCon nodes, declared once so that the nodes cannot drift apart.

Each function returns fresh ``io.*.Input`` objects (or a list of them, to splice into a schema's inputs
with ``*``). Names, defaults and ranges are part of saved workflows: ComfyUI's frontend stores widget
values by position, so changing a name, a default or the order of inputs breaks workflows already saved.
"""

from __future__ import annotations

from comfy_api.latest import io

from ...zerocon_core.method.sampler import AUTO_STEP_SIZE, STEP_MODES
from .loaders import DEVICES, DTYPES, ModelSource, model_names

#: The menu every ZeroCon node is listed under.
CATEGORY = "image/translation/zerocon"
#: A chain of guidance terms (a tuple of ``zerocon_core.method.guidance.GuidanceTerm``).
GUIDANCE = io.Custom("ZEROCON_GUIDANCE")

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def seed_input(tooltip: str) -> io.Int.Input:
    """The ``seed`` widget (0 .. 2**64 - 1, with ComfyUI's control-after-generate); ``tooltip`` says what it seeds."""
    return io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True, tooltip=tooltip)


def steps_input(tooltip: str) -> io.Int.Input:
    """The ``steps`` widget: DDIM steps of the full schedule, default 50 (pix2pix-zero's and DiffuseIT's)."""
    return io.Int.Input("steps", default=50, min=1, max=1000, tooltip=tooltip)


def cfg_input(default: float, tooltip: str) -> io.Float.Input:
    """The ``cfg`` widget: classifier-free guidance scale, 0 .. 30."""
    return io.Float.Input("cfg", default=default, min=0.0, max=30.0, step=0.1, round=0.01, tooltip=tooltip)


def step_inputs(method: str = "pix2pix-zero") -> list:
    """``step_mode`` and ``step_size``: how the guidance gradient becomes a step on the latent.

    ``method``: whose step "raw" is (named in the tooltip). Default "auto" (``zerocon_core.method.sampler``).
    """
    return [
        io.Combo.Input(
            "step_mode",
            options=list(STEP_MODES),
            default="auto",
            tooltip="auto (default, no tuning): each step moves the latent by step_size of its own size, the "
            "guidance terms sharing it by their weights (ratios: 1 = as hard as cross-attention); the same on "
            f"every model. raw: the latent moves by weight x gradient ({method}'s step; the weights are step "
            "sizes that depend on the model). normalized: the raw direction rescaled to RMS step_size.",
        ),
        io.Float.Input(
            "step_size",
            default=AUTO_STEP_SIZE,
            min=0.0,
            max=10.0,
            step=0.001,
            round=0.0001,
            tooltip=f"auto: how far each step moves the latent, as a fraction of its size ({AUTO_STEP_SIZE:g} = "
            f"{100 * AUTO_STEP_SIZE:g}%): raise it if the edit loses the source's structure, lower it if the "
            "result gets noisy. normalized: the step's RMS. Ignored in raw mode.",
        ),
    ]


def window_inputs() -> list:
    """``start`` and ``end``: the fraction of the steps a guidance term is active in, ``start <= i/N < end``."""
    bounds = {
        "start": (0.0, "First step (as a fraction of the steps) at which this guidance is active."),
        "end": (1.0, "Guidance stops before this fraction of the steps (1 = until the last step)."),
    }
    return [
        io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)
        for name, (default, tooltip) in bounds.items()
    ]


def previous_input() -> io.Input:
    """The optional ``previous`` guidance chain a guidance node appends its term(s) to."""
    return GUIDANCE.Input(
        "previous",
        optional=True,
        tooltip="Guidance terms to add to (chain several guidance nodes); none = start a new chain.",
    )


def chain_inputs() -> list:
    """The last inputs of every guidance term node: its window (``window_inputs``) and ``previous``."""
    return [*window_inputs(), previous_input()]


def guidance_output(what: str = "this term") -> io.Output:
    """A guidance term node's output: the chain with ``what`` ("this term", "these terms") added."""
    return GUIDANCE.Output(display_name="guidance", tooltip=f"The guidance chain with {what} added.")


def loader_inputs(source: ModelSource, default: str, tips: dict[str, str], precisions=tuple(DTYPES), precision="fp32"):
    """A model loader's widgets, in order: ``model`` (the folders of ``source``, ``default`` selected),
    ``precision`` (``precisions``, ``precision`` selected), ``device`` and ``allow_download``; ``tips``: their
    tooltips by input name."""
    return [
        io.Combo.Input("model", options=model_names(source), default=default, tooltip=tips["model"]),
        io.Combo.Input("precision", options=list(precisions), default=precision, tooltip=tips["precision"]),
        io.Combo.Input("device", options=list(DEVICES), default="auto", tooltip=tips["device"]),
        io.Boolean.Input("allow_download", default=True, tooltip=tips["allow_download"]),
    ]


#: Words users type in the node search (ComfyUI 0.33's ``search_aliases``) besides the display name.
SEARCH_ALIASES = {
    "ZeroConBLIPLoader": ["caption model", "image captioning", "blip"],
    "ZeroConBLIPCaption": ["caption image", "describe image", "img2txt", "interrogate"],
    "ZeroConEncodePrompts": ["prompt batch", "encode captions", "text encode list"],
    "ZeroConEditDirection": ["pix2pix-zero", "edit direction", "cat to dog", "text edit", "zerocon"],
    "ZeroConApplyEditDirection": ["pix2pix-zero", "edit conditioning", "apply direction"],
    "ZeroConSaveEditDirection": ["save direction", "export edit direction"],
    "ZeroConLoadEditDirection": ["load direction", "import edit direction"],
    "ZeroConDDIMInversion": ["invert image", "unsample", "inversion", "rf inversion", "image to noise"],
    "ZeroConGuidedSampler": ["pix2pix-zero", "zerocon", "structure preserving edit", "image translation", "img2img"],
    "ZeroConGuider": ["pix2pix-zero guider", "zerocon guider", "guided edit"],
    "ZeroConGuidedDDIMSampler": ["pix2pix-zero sampler", "zerocon sampler", "guided ddim"],
    "ZeroConCrossAttentionGuidance": ["attention guidance", "cross attention loss", "pix2pix-zero"],
    "ZeroConPatchNCEGuidance": ["contrastive guidance", "cut loss", "structure guidance", "patchnce"],
    "ZeroConDINOLoader": ["dino vit", "dino model"],
    "ZeroConDinoStructureGuidance": ["diffuseit", "structure loss", "self-similarity"],
    "ZeroConDinoStyleGuidance": ["diffuseit", "style transfer", "reference image", "appearance"],
    "ZeroConDiffuseITSampler": ["diffuseit", "style transfer", "image translation", "reference style"],
    "ZeroConCLIPMetricLoader": ["clip score model", "metrics"],
    "ZeroConEditMetrics": ["clip score", "psnr", "ssim", "evaluate edit", "metrics"],
}


def schema(**fields) -> io.Schema:
    """``io.Schema`` with this node's search aliases, keeping only the fields this ComfyUI's Schema has (0.3.64 has
    no ``search_aliases``; newer fields are left out there rather than refused)."""
    known = getattr(io.Schema, "__dataclass_fields__", {})
    fields.setdefault("search_aliases", SEARCH_ALIASES.get(fields.get("node_id"), []))
    return io.Schema(**{k: v for k, v in fields.items() if k in known})
