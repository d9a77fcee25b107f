"""Guidance term nodes: each appends one ``zerocon_core.method.guidance`` term to a ZEROCON_GUIDANCE chain.

A ZEROCON_GUIDANCE link carries a tuple of ``GuidanceTerm`` objects (``zerocon_core.method.guidance.chain``);
the guided samplers sum ``weight * loss`` of the terms active at a step and take one gradient step on the
latent.

Weights: a negative weight (the default, -1) means **auto**, resolved by the sampler once the model and
the step mode are known, by the engine's one rule (``zerocon_core.method.auto_weights``, shared with the pipeline
and the CLI). In step mode "auto" (the samplers' default) a weight is a unitless ratio, how hard the term
pulls next to the others, and auto is the term's default ratio (cross-attention 1, PatchNCE 1). In "raw" /
"normalized" it is a step size, and auto is the term's default step (cross-attention 0.1, PatchNCE 0.5) for
eps-prediction models (SD1.x, SD2-base, SDXL) and a tenth of it for v-prediction models (SD2-768-v), whose
gradients are about ten times larger (pix2pix-zero advises 0.01 or less for SD2: docs/method.md §5). Weight
0 disables a term; any positive value is used as given.
"""

from __future__ import annotations

from comfy_api.latest import io

from ...zerocon_core.method import auto_weights
from ...zerocon_core.method.denoiser import parse_layer_spec
from ...zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance, chain
from ..families import ModelFamily
from ..glue.inputs import CATEGORY, chain_inputs, guidance_output, schema

AUTO = auto_weights.AUTO
AUTO_TIP = (
    "-1 = auto (no tuning needed). With the sampler's step_mode auto (default) a weight is a ratio: how hard "
    "this term pulls next to the others (1 = as hard as cross-attention). With step_mode raw it is the step size "
    "(auto: the default step for this model family). 0 disables the term."
)
LAYER_TIP = (
    "Which layers. UNet (SD1.x/SD2.x/SDXL): 'all', or blocks from down/mid/up separated by commas, optionally "
    "':levels' (0 = latent resolution, 1 = half...), e.g. 'up', 'down,up', 'up:0,1'. MM-DiT (Flux, SD3.5): "
    "'auto' (the family's default blocks; the UNet words mean the same there), or blocks by number, e.g. "
    "'double:9,18', 'single:37', 'joint:12,18'."
)


def resolve_weights(terms, family: ModelFamily, step_mode: str) -> tuple[GuidanceTerm, ...]:
    """Auto (negative) weights resolved for the MODEL's family and the sampler's ``step_mode`` by
    ``zerocon_core.method.auto_weights.resolve_weights``."""
    return auto_weights.resolve_weights(terms, family.prediction_type, step_mode=step_mode)


def _check_layers(spec: str) -> str:
    """``spec`` once it parses as a layer spec (else the ``ValueError`` naming the accepted syntax)."""
    parse_layer_spec(spec)
    return spec


def _weight_input() -> io.Float.Input:
    """A guidance term's ``weight``: -1 auto (``AUTO_TIP``), 0 off, else as given."""
    return io.Float.Input("weight", default=AUTO, min=-1.0, max=10.0, step=0.001, round=0.0001, tooltip=AUTO_TIP)


def _layers_input(default: str, note: str) -> io.String.Input:
    """A guidance term's ``layers`` spec (``LAYER_TIP`` and ``note``)."""
    return io.String.Input("layers", default=default, tooltip=f"{LAYER_TIP} {note}")


def _patch_sizes(text: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; ``ValueError`` for anything but integers separated by commas."""
    try:
        return tuple(int(p) for p in str(text).replace(" ", "").split(",") if p)
    except ValueError as exc:
        raise ValueError(f"patch sizes must be integers separated by commas, like '1,2'; got {text!r}") from exc


class ZeroConCrossAttentionGuidance(io.ComfyNode):
    """pix2pix-zero's cross-attention guidance (keeps the edit's attention maps on the source's)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConCrossAttentionGuidance",
            display_name="ZeroCon Cross-Attention Guidance",
            category=CATEGORY,
            description=(
                "pix2pix-zero's cross-attention guidance: at each step the edit's cross-attention maps are pulled "
                "towards those of the source reconstruction by one gradient step on the latent. Auto weight: ratio 1 "
                "with the sampler's step_mode auto (the reference the other terms' ratios are measured against); "
                "with step_mode raw, a step of 0.1 for eps-prediction models (SD1.x, SD2-base, SDXL), 0.01 for "
                "v-prediction (SD2-768-v)."
            ),
            inputs=[
                _weight_input(),
                _layers_input("all", "pix2pix-zero uses all."),
                *chain_inputs(),
            ],
            outputs=[guidance_output()],
        )

    @classmethod
    def execute(cls, weight, layers, start, end, previous=None) -> io.NodeOutput:
        term = CrossAttentionGuidance(weight=float(weight), layers=_check_layers(layers), start=start, end=end)
        return io.NodeOutput(chain(previous, term))


class ZeroConPatchNCEGuidance(io.ComfyNode):
    """zeroCon's patch-wise contrastive (CUT PatchNCE) guidance on UNet self-attention features."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConPatchNCEGuidance",
            display_name="ZeroCon PatchNCE Guidance",
            category=CATEGORY,
            description=(
                "zeroCon's patch-wise contrastive loss (CUT PatchNCE) between the edit's and the source's UNet "
                "self-attention outputs: each edited patch is pulled towards the source patch at the same place "
                "and away from the others. Layers, patch sizes, count and temperature are our defaults (the paper "
                "does not give them). Auto weight: ratio 1 (pulls as hard as cross-attention) with the sampler's step_mode "
                "auto; with step_mode raw, a step of 0.5 for eps-prediction models, 0.05 for v-prediction (calibrated "
                "to pull about as hard as the cross-attention term)."
            ),
            inputs=[
                _weight_input(),
                _layers_input("up", "Default: the up blocks."),
                io.Int.Input(
                    "patches",
                    default=256,
                    min=2,
                    max=4096,
                    tooltip="Locations sampled per layer and patch size (shared by the edit and the source).",
                ),
                io.Float.Input(
                    "tau",
                    default=0.07,
                    min=0.001,
                    max=10.0,
                    step=0.001,
                    tooltip="Temperature of the contrastive softmax (CUT uses 0.07).",
                ),
                io.String.Input(
                    "patch_sizes",
                    default="1,2",
                    tooltip="Patch sizes in feature pixels, comma-separated: each size p average-pools the "
                    "features p x p before sampling.",
                ),
                *chain_inputs(),
                io.Int.Input(
                    "location_seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    optional=True,
                    tooltip="Picks the sampled locations (a fixed function of this seed, the step and the layer, so "
                    "DDIM Inversion records exactly the ones the sampler compares; change it for other locations).",
                ),
            ],
            outputs=[guidance_output()],
        )

    @classmethod
    def execute(
        cls, weight, layers, patches, tau, patch_sizes, start, end, previous=None, location_seed=0
    ) -> io.NodeOutput:
        sizes = _patch_sizes(patch_sizes)
        term = PatchNCEGuidance(
            weight=float(weight),
            layers=_check_layers(layers),
            num_patches=int(patches),
            tau=float(tau),
            patch_sizes=sizes,
            start=start,
            end=end,
            seed=int(location_seed),
        )
        return io.NodeOutput(chain(previous, term))


NODES = [ZeroConCrossAttentionGuidance, ZeroConPatchNCEGuidance]
