"""The checks every flow-matching MM-DiT family (SD3, Flux, Chroma, Qwen-Image) runs before naming its ``ModelFamily``."""

from __future__ import annotations

from .adapter import FamilyAdapter
from .model_family import ModelFamily, prediction_type, unsupported

#: What extra input channels usually are (the end of the extra-channels error).
FILL_NOTE = " (fill / inpainting)"


def unet_config(base) -> dict:
    """The model config's ``unet_config`` (a copy; empty when there is none)."""
    return dict(getattr(getattr(base, "model_config", None), "unet_config", {}) or {})


def check_flow_network(adapter: FamilyAdapter, model, base, packed: int = 1, channels_note: str = FILL_NOTE) -> None:
    """``UnsupportedModelError`` for a variant of the family ZeroCon cannot run, in order: extra input channels
    (fill / inpainting), another latent format, sampling other than flow matching.

    ``packed``: latent cells per input of the network's config (Chroma's ``in_channels`` count the channels of a
    2 x 2 patch: 4), so its ``in_channels`` must be ``packed`` x the family's latent channels; ``channels_note``
    ends the extra-channels error."""
    name = adapter.name
    channels = adapter.latent_channels * packed
    config = unet_config(base)
    if config.get("in_channels", channels) != channels:
        raise unsupported(f"a {name} variant with {config.get('in_channels')} input channels{channels_note}")
    if not adapter.has_latent_format(base.latent_format):
        raise unsupported(f"a {name} network with the {type(base.latent_format).__name__} latent format")
    ptype = prediction_type(model.get_model_object("model_sampling"))
    if ptype != "flow":
        raise unsupported(f"a {name} network sampled as {ptype}-prediction (ZeroCon needs its flow sampling)")


def flow_family(adapter: FamilyAdapter, model, base, packed: int = 1, channels_note: str = FILL_NOTE) -> ModelFamily:
    """The plain flow-matching ``ModelFamily`` of ``adapter`` (real CFG), once ``check_flow_network`` passed: a
    family module's ``detect`` when it has no checks of its own."""
    check_flow_network(adapter, model, base, packed=packed, channels_note=channels_note)
    return ModelFamily(name=adapter.name, prediction_type="flow", latent_channels=adapter.latent_channels)


def txt_in_width(base) -> int:
    """The conditioning width a network with a ``txt_in`` projection takes (its input features: Qwen-Image's 3584,
    Flux.2's stacked LLM layers), for ``FamilyAdapter.context_width``."""
    return int(base.diffusion_model.txt_in.in_features)
