"""What a family adapter states: one ``FamilyAdapter`` per model family, built from small settings objects.

A family module (``sd_unet.py``, ``sd3.py``, ``flux.py``...) exports ``ADAPTERS``, a tuple of these objects;
the registry (``registry.py``) finds the modules and asks each adapter whether it claims a MODEL. ComfyUI
classes are named by their dotted path (``"comfy.supported_models.SD15"``) and looked up when needed, so a
ComfyUI without one of them simply has no model of that class (feature detection, never version numbers).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ...zerocon_core.text.text_layout import LAYOUTS

#: Pixels per latent cell (the VAE's downscale factor): 8 for every family supported today.
LATENT_SCALE = 8
#: The capture codes an adapter can name: UNet attn2 / attn1 patches (``comfy_denoiser``) or the MM-DiT block
#: patches of ``dit_capture`` for Flux's double / single blocks ("flux"), SD3's joint blocks ("mmdit") or
#: Qwen-Image's double-stream blocks ("qwen"), or ``joint_capture``'s single-stream joint attention of Z-Image /
#: Lumina 2's NextDiT ("lumina").
CAPTURE_CODES = ("unet", "flux", "mmdit", "qwen", "lumina")


def comfy_class(path: str | None) -> type | None:
    """The ComfyUI class at dotted ``path`` (``"comfy.model_base.Flux"``), or None when this ComfyUI lacks it."""
    if not path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def is_instance(obj: Any, path: str) -> bool:
    """``isinstance(obj, <the class at path>)``; False when this ComfyUI has no such class."""
    cls = comfy_class(path)
    return cls is not None and isinstance(obj, cls)


@dataclass(frozen=True)
class Recognition:
    """How a family is recognised from ComfyUI's own model objects, never from tensor shapes.

    ``config``: the model config class (``comfy.supported_models``; subclasses such as SSD-1B's are included).
    ``model_base``: when given, the exact ``comfy.model_base`` class (Flux's subclasses, Chroma, Flux.2,
    LongCat, are other models). ``network``: when given, the class the diffusion network must be an instance of.
    """

    config: str
    model_base: str | None = None
    network: str | None = None

    def claims(self, base: Any) -> bool:
        """Whether the BaseModel ``base`` (``ModelPatcher.model``) is of this family by its classes."""
        if not is_instance(getattr(base, "model_config", None), self.config):
            return False
        if self.model_base is not None and type(base) is not comfy_class(self.model_base):
            return False
        return self.network is None or is_instance(getattr(base, "diffusion_model", None), self.network)


@dataclass(frozen=True)
class GuidedLayers:
    """The default guided layers (what the layer spec "auto" selects; the rule is ``zerocon_core.method.denoiser``'s
    ``default_layers``): the blocks the cross-attention maps and the PatchNCE features come from and, on an
    MM-DiT, how many blocks are picked, spread over the second half of those blocks (None: all of them)."""

    cross: tuple[str, ...]
    features: tuple[str, ...]
    cross_count: int | None = None
    feature_count: int | None = None


@dataclass(frozen=True)
class GradientPasses:
    """What a gradient pass through the family's network needs.

    ``torch_paths``: ComfyUI's differentiable torch paths (``grad_paths.torch_paths``), because its comfy-kitchen
    ops (RoPE, fused norms, INT8 linears) have no backward. ``rope``: the attention applies RoPE (Flux), one of
    those ops, so ``torch_paths`` is required. Attention kernels without a backward are routed to SDPA in every
    family (``comfy_denoiser``)."""

    torch_paths: bool = True
    rope: bool = False

    def __post_init__(self) -> None:
        if self.rope and not self.torch_paths:
            raise ValueError("a network with RoPE needs ComfyUI's torch paths in gradient passes")


@dataclass(frozen=True)
class FamilyAdapter:
    """One model family, as the ZeroCon nodes see it.

    - ``name``: ``ModelFamily.name``; ``rank``: its place in the registry and in the "supported" sentence, which
      names it as ``label`` ("ZeroCon supports ... models only") and ``load_label`` ("Load a ... checkpoint");
    - ``recognition``: its ComfyUI classes; ``refused_configs``: config subclasses refused (variants that need
      extra image inputs);
    - ``latent_format`` (exact ``comfy.latent_formats`` class), ``latent_channels``, ``latent_scale``;
      ``frame_axis``: its image latents are (B, C, 1, H, W) (a video latent format with one frame, as ComfyUI
      samples Qwen-Image), else (B, C, H, W); ``context_width(base)``: the width of the conditioning its network
      takes, read from the network (None: not checked);
    - ``native_size``: side in pixels of its training images, ``native_sizes`` where the prediction type
      changes it (SD2.x 768-v); ``tiny_decoder``: ComfyUI's name of its TAESD;
    - ``capture``: the capture code (``CAPTURE_CODES``); ``guided_layers``: its default guided layers;
    - ``text_layout``: its ``zerocon_core.text.text_layout`` layout name; ``gradient``: its gradient-pass needs;
    - ``detect(adapter, model, base)``: the family's checks (its clear errors) and its ``ModelFamily``.
    """

    name: str
    rank: int
    label: str
    load_label: str
    recognition: Recognition
    latent_format: str
    latent_channels: int
    native_size: int
    tiny_decoder: str
    capture: str
    guided_layers: GuidedLayers
    text_layout: str
    detect: Callable[[FamilyAdapter, Any, Any], Any] = field(compare=False, repr=False)
    refused_configs: tuple[str, ...] = ()
    native_sizes: tuple[tuple[str, int], ...] = ()
    latent_scale: int = LATENT_SCALE
    gradient: GradientPasses = GradientPasses()
    frame_axis: bool = False
    context_width: Callable[[Any], int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.capture not in CAPTURE_CODES:
            raise ValueError(f"{self.name}: capture must be one of {CAPTURE_CODES}, got {self.capture!r}")
        if self.text_layout not in LAYOUTS:
            raise ValueError(f"{self.name}: text layout must be one of {LAYOUTS}, got {self.text_layout!r}")

    def latent_shape_text(self) -> str:
        """The image latent's shape as the errors name it: "(B, 16, H, W)", or "(B, 16, 1, H, W)" with a frame axis."""
        return f"(B, {self.latent_channels}, {'1, ' if self.frame_axis else ''}H, W)"

    def takes_latent_shape(self, shape) -> bool:
        """Whether a latent of ``shape`` is an image latent of this family (channels, and the frame axis of 1)."""
        shape = tuple(shape)
        if self.frame_axis:
            return len(shape) == 5 and shape[1] == self.latent_channels and shape[2] == 1
        return len(shape) == 4 and shape[1] == self.latent_channels

    @property
    def dit_type(self) -> str | None:
        """``dit_capture``'s network kind ("flux", "mmdit"), None for the UNet capture code."""
        return None if self.capture == "unet" else self.capture

    def native(self, prediction_type: str) -> int:
        """Side, in pixels, of the square images the family was trained at, for ``prediction_type``."""
        return dict(self.native_sizes).get(prediction_type, self.native_size)

    def claims(self, base: Any) -> bool:
        """Whether this adapter recognises the BaseModel ``base`` (its classes; nothing else is checked)."""
        return self.recognition.claims(base)

    def has_latent_format(self, latent_format: Any) -> bool:
        """Whether ``latent_format`` is exactly the family's latent format class (not a subclass of it)."""
        return type(latent_format) is comfy_class(self.latent_format)

    def refused_config(self, config: Any) -> bool:
        """Whether ``config`` is one of the family's refused variants."""
        return any(is_instance(config, path) for path in self.refused_configs)
