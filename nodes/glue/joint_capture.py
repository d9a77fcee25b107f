"""Captures on single-stream joint attention (Z-Image / Lumina 2's ``NextDiT``) for ``ComfyDenoiser``.

``NextDiT`` runs one stream of joint attention over ``[caption; image]`` tokens in its main layers, after a
context refiner (caption tokens alone) and a noise refiner (image tokens alone). Its main layers take no
``patches_replace["dit"]`` patch on every path; what ComfyUI offers instead, and what this module uses, on a
per-call *copy* of the sampler's model_options:

- a ``DIFFUSION_MODEL`` wrapper that notes the caption length of this forward (``context``'s tokens) and, from
  the model's ``pad_tokens_multiple``, the joint sequence's layout: the caption padded to ``Pc`` tokens, then the
  image's ``N`` grid tokens padded to ``Pi``; the text columns are the caption's real tokens, the image rows the
  grid's;
- an ``optimized_attention_override`` that, in a main layer (``transformer_options["block_type"] == "double"``,
  whose ``block_index`` ComfyUI sets before each layer) and only in its joint attention (all ``Pc + Pi`` keys; the
  refiners' attentions have fewer), computes the text probabilities with ``dit_capture.text_probabilities``
  (softmax over all keys, the kernel's mask, ``scale`` and grouped-query keys honoured), then calls the kernel;
- a ``patches["double_block"]`` post-hook (ComfyUI calls it after each main layer with the image tokens' view)
  that records the layer's image-token output on the patch grid (PatchNCE features) and changes nothing.
"""

from __future__ import annotations

import math

from ...zerocon_core.method.denoiser import CaptureRequest, LayerInfo
from .dit_capture import Chunking, kernel_inputs, patch_grid, text_probabilities

#: Key of our DIFFUSION_MODEL wrapper.
WRAPPER_KEY = "zerocon_joint_capture"
#: Our layer names' block part: the main layers' joint attention.
BLOCK = "joint"


def is_joint_stream(diffusion_model) -> bool:
    """Whether the network is ComfyUI's ``NextDiT`` (Z-Image, Lumina 2), where this ComfyUI has one."""
    try:
        from comfy.ldm.lumina.model import NextDiT
    except ImportError:
        return False
    return isinstance(diffusion_model, NextDiT)


def enumerate_layers(diffusion_model) -> list[tuple[LayerInfo, int]]:
    """Capture points in forward order, each with its main-layer index: per layer a "cross" layer (text-to-image
    probabilities) and a "self" layer (image-token output); ``LayerInfo.level`` is the layer's index."""
    out = []
    for i in range(len(diffusion_model.layers)):
        out.append((LayerInfo(f"{BLOCK}.{i}.img2txt", "cross", BLOCK, i), i))
        out.append((LayerInfo(f"{BLOCK}.{i}.img", "self", BLOCK, i), i))
    return out


def _padded(n: int, multiple: int | None) -> int:
    return n if not multiple else int(math.ceil(n / multiple)) * multiple


class _CallState:
    """Per-``predict`` state: what to capture, the grid, and this forward's token layout."""

    def __init__(self, recorder, grid, chunk: Chunking, probs: dict[int, str], features: dict[int, str], multiple):
        self.recorder = recorder
        self.grid = grid
        self.chunk = chunk
        self.probs = probs
        self.features = features
        self.multiple = multiple
        self.total: int | None = None
        self.image: slice | None = None
        self.text: slice | None = None
        self.done: set[int] = set()

    @property
    def grid_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def layout(self, caption_tokens: int) -> None:
        """Set this forward's joint layout from its caption length; forget the layers captured so far."""
        caption = _padded(caption_tokens, self.multiple) if caption_tokens else (self.multiple or 0)
        image = _padded(self.grid_tokens, self.multiple)
        self.total = caption + image
        self.image = slice(caption, caption + self.grid_tokens)
        self.text = slice(0, caption_tokens)
        self.done = set()


def _wrapper(state: _CallState):
    def wrapper(executor, x, timesteps, context, *args, **kwargs):
        if kwargs.get("ref_latents") or kwargs.get("siglip_feats"):
            raise ValueError(
                "ZeroCon: Z-Image reference images (Omni: reference latents in the conditioning) are not supported "
                "by the guided samplers' captures; remove the reference latents, or sample without guidance"
            )
        state.layout(0 if context is None else int(context.shape[1]))
        return executor(x, timesteps, context, *args, **kwargs)

    return wrapper


def _override(state: _CallState, previous):
    """``optimized_attention_override``: text probabilities in a wanted main layer's joint attention, then the
    kernel (``previous`` override, else ComfyUI's)."""

    def override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        index = to.get("block_index")
        if to.get("block_type") == "double" and index in state.probs and index not in state.done:
            q, k, mask = kernel_inputs(args, kwargs)
            if state.total is not None and k.shape[-2] == state.total:  # not a refiner's attention
                state.done.add(index)
                probs = text_probabilities(q, k, state.image, state.text, mask, state.chunk, kwargs.get("scale"))
                state.recorder.add_probs(state.probs[index], probs, to)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    return override


class _FeaturePatch:
    """``patches["double_block"]`` post-hook: records a wanted main layer's image-token output (a copy)."""

    def __init__(self, state: _CallState) -> None:
        self.state = state

    def __call__(self, args: dict) -> dict:
        name = self.state.features.get(args.get("block_index"))
        if name is not None:
            tokens = args["img"][:, : self.state.grid_tokens]
            b, _, c = tokens.shape
            feat = tokens.transpose(1, 2).reshape(b, c, *self.state.grid).contiguous()
            self.state.recorder.add_features(name, feat, args.get("transformer_options") or {})
        return {}


def install(
    options: dict,
    diffusion_model,
    table: list[tuple[LayerInfo, int]],
    capture: CaptureRequest,
    recorder,
    latent_shape,
    chunk: Chunking | None = None,
    grad: bool = False,
) -> None:
    """Add this call's capture patches to ``options`` (a per-call copy whose transformer_options dict is already
    its own); nested dicts and lists are copied before they change. Nothing is added for an empty ``capture``.
    ``grad`` is accepted for the capture interface's sake (nothing differs in gradient passes)."""
    import comfy.patcher_extension

    if not capture:
        return
    by_name = {info.name: index for info, index in table}
    unknown = sorted((set(capture.probs) | set(capture.features)) - set(by_name))
    if unknown:
        raise ValueError(f"ZeroCon: unknown attention layers {unknown}")
    grid = patch_grid(diffusion_model, latent_shape) if latent_shape is not None else (0, 0)
    state = _CallState(
        recorder,
        grid,
        chunk or Chunking(),
        {by_name[n]: n for n in capture.probs},
        {by_name[n]: n for n in capture.features},
        getattr(diffusion_model, "pad_tokens_multiple", None),
    )
    to = options["transformer_options"]
    if capture.probs:
        to["optimized_attention_override"] = _override(state, to.get("optimized_attention_override"))
    if capture.features:
        patches = dict(to.get("patches", {}))
        patches["double_block"] = list(patches.get("double_block", [])) + [_FeaturePatch(state)]
        to["patches"] = patches
    wrappers = dict(to.get("wrappers", {}))
    dm = dict(wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}))
    dm[WRAPPER_KEY] = [_wrapper(state)]
    wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL] = dm
    to["wrappers"] = wrappers
