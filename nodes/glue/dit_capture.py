"""Captures on MM-DiT joint attention (Flux double / single blocks, SD3 joint blocks, Qwen-Image double-stream
blocks) for ``ComfyDenoiser``.

Everything goes through ComfyUI's extension points on a per-call *copy* of the sampler's model_options:

- a ``patches_replace["dit"]`` block patch on each guided block tags a copy of the block's
  ``transformer_options`` (so the attention override knows which block it runs in, where the text and
  image tokens sit in the joint sequence) and records the block's image-token output (PatchNCE features,
  reshaped to the latent's patch grid ``(B, C, H/p, W/p)``);
- an ``optimized_attention_override`` that, in a tagged block's joint attention only, computes the
  text-to-image probabilities ``softmax_j(q_i . k_j / sqrt(d))[image rows, text columns]`` with the
  normaliser over *all* keys (text, image and any extra tokens) from the q and k the model hands its
  attention kernel (after Flux's RoPE and both models' QK-norm), then lets the attention output be
  computed by the kernel as usual (the user's kernel; SDPA in grad passes when it has no backward). The mask,
  ``scale`` and grouped-query keys are read as ComfyUI's kernels read them (Qwen-Image's (B, 1, L) text mask);
- for Flux, a ``DIFFUSION_MODEL`` wrapper that notes the text length (single blocks only see txt + img
  concatenated).

The probabilities are computed in chunks of queries and keys by ``TextProbabilities`` (a custom autograd
function that keeps only the output, q, k and the per-row log-sum-exp, and recomputes chunks in backward),
so no ``(heads, L, L)`` matrix is ever held: peak extra memory per guided block is the output
``B * heads * N_img * T_txt * 4`` bytes plus the row normalisers and one chunk (``capture_bytes``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ...zerocon_core.method.denoiser import CaptureRequest, LayerInfo
from .weights import ACTIVE_SAVED_TENSOR_HOOKS

#: transformer_options key holding the running guided block's ``_BlockContext``.
TAG = "zerocon_dit_block"
#: Key of our DIFFUSION_MODEL wrapper.
WRAPPER_KEY = "zerocon_dit_capture"
#: Default chunk sizes: queries x keys per chunk (per batch row and head).
QUERY_CHUNK = 256
KEY_CHUNK = 1024


@dataclass(frozen=True)
class Chunking:
    """Chunk sizes for the text-probability computation (queries and keys per chunk)."""

    queries: int = QUERY_CHUNK
    keys: int = KEY_CHUNK

    def __post_init__(self) -> None:
        if self.queries < 1 or self.keys < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {self.queries} x {self.keys}")


# -- model structure ---------------------------------------------------------------------------------------


def _flux_block_networks() -> tuple[type, ...]:
    """The network classes built from Flux's double / single stream blocks with Flux's ``patches_replace["dit"]``
    keys and args: ComfyUI's Flux (and subclasses) and, where this ComfyUI has it, Chroma (not a Flux subclass;
    its blocks get their modulations as ``vec``)."""
    from comfy.ldm.flux.model import Flux

    try:
        from comfy.ldm.chroma.model import Chroma
    except ImportError:
        return (Flux,)
    return (Flux, Chroma)


def dit_type(diffusion_model) -> str | None:
    """ "flux" for a network of Flux's blocks (Flux and subclasses, Chroma), "mmdit" for ComfyUI's SD3 MMDiT,
    "qwen" for its Qwen-Image network (where this ComfyUI has one), None for anything else."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    if isinstance(diffusion_model, _flux_block_networks()):
        return "flux"
    if isinstance(diffusion_model, MMDiT):
        return "mmdit"
    if _is_qwen_image(diffusion_model):
        return "qwen"
    return None


def _is_qwen_image(diffusion_model) -> bool:
    try:
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    except ImportError:  # a ComfyUI without Qwen-Image
        return False
    return isinstance(diffusion_model, QwenImageTransformer2DModel)


def _names(block: str, index: int) -> tuple[str, str]:
    return f"{block}.{index}.img2txt", f"{block}.{index}.img"


def enumerate_layers(diffusion_model) -> list[tuple[LayerInfo, tuple[str, int]]]:
    """Capture points of a Flux / MMDiT in forward order, each with its ``patches_replace["dit"]`` key.

    Per block: a "cross" layer (text-to-image attention probabilities) and a "self" layer (image-token
    output); ``LayerInfo.level`` is the block's index in its stack.
    """
    kind = dit_type(diffusion_model)
    if kind == "flux":
        stacks = [("double", "double_block", len(diffusion_model.double_blocks)),
                  ("single", "single_block", len(diffusion_model.single_blocks))]  # fmt: skip
    elif kind == "qwen":  # Qwen-Image: double-stream blocks only ([txt; img] joint attention)
        stacks = [("double", "double_block", len(diffusion_model.transformer_blocks))]
    else:
        stacks = [("joint", "double_block", len(diffusion_model.joint_blocks))]
    out = []
    for block, patch_kind, count in stacks:
        for i in range(count):
            cross, feat = _names(block, i)
            out.append((LayerInfo(cross, "cross", block, i), (patch_kind, i)))
            out.append((LayerInfo(feat, "self", block, i), (patch_kind, i)))
    return out


def patch_grid(diffusion_model, latent_shape) -> tuple[int, int]:
    """Rows and columns of the image-token grid for a latent of ``latent_shape`` (B, C, H, W)."""
    p = diffusion_model.patch_size
    ph, pw = (p, p) if isinstance(p, int) else tuple(p)[-2:]
    return math.ceil(int(latent_shape[-2]) / ph), math.ceil(int(latent_shape[-1]) / pw)


def capture_bytes(
    batch: int,
    heads: int,
    image_tokens: int,
    text_tokens: int,
    total_tokens: int,
    chunk: Chunking | None = None,
    *,
    backward: bool = False,
    head_dim: int = 128,
) -> int:
    """Peak extra memory (bytes) of one guided block's probability capture (``TextProbabilities``).

    With ``bh = batch * heads``, N image, T text, L total tokens, a ``cq x ck`` chunk, d the head size,
    all float32:

    - forward: the output ``bh*N*T`` + row normalisers ``bh*N`` + one score chunk ``bh*cq*max(ck, T)``;
    - backward (besides the incoming gradient, which the loss makes): dq ``bh*N*d`` and dk ``bh*L*d``, the
      row terms ``bh*N``, and the working set: a probability chunk ``bh*cq*ck``, its text part
      ``bh*cq*min(T, ck)`` and the chunk's dk product ``bh*ck*d``. (Autograd then scatters dq into the whole
      q, ``bh*L*d``, after the chunks are gone.)

    A dense softmax over all keys would hold ``bh*L*L`` for the scores alone.
    """
    chunk = chunk or Chunking()
    cq, ck = min(chunk.queries, image_tokens), min(chunk.keys, total_tokens)
    bh = batch * heads
    if backward:
        working = bh * cq * (ck + min(text_tokens, ck)) + bh * ck * head_dim
        return 4 * (bh * (image_tokens + total_tokens) * head_dim + bh * image_tokens + working)

    return 4 * (bh * image_tokens * text_tokens + bh * image_tokens + bh * cq * max(ck, text_tokens))


# -- the probabilities ---------------------------------------------------------------------------------------


def _work(t: Tensor) -> Tensor:
    """float32, or float64 for float64 inputs (so the math can be checked in double precision)."""
    return t if t.dtype == torch.float64 else t.float()


def _scores(q: Tensor, k: Tensor, scale: float, mask: Tensor | None, rows: slice, cols: slice) -> Tensor:
    """``q k^T * scale (+ mask)`` for one chunk in the working dtype, built in place (one chunk-sized tensor).
    A mask with one row (a per-key mask, broadcast over the queries) applies to every row."""
    s = _work(q) @ _work(k).transpose(-1, -2)
    s.mul_(scale)
    if mask is not None:
        m = mask[..., cols] if mask.shape[-2] == 1 else mask[..., rows, cols]  # a key mask for every query
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(m.to(s.dtype))
    return s


class TextProbabilities(torch.autograd.Function):
    """``softmax(q k^T * scale + mask)`` over all keys, returned for the key columns ``text`` only.

    ``q``: (B, H, N, d) image-token queries; ``k``: (B, H, L, d) all keys; ``mask``: None, or a boolean /
    additive mask broadcastable to (B, H, N, L) (already sliced to the image rows); ``text``: a slice of
    key columns; a mask with one row (a key mask, ``kernel_mask``) holds for every query. Returns (B, H, N, T)
    float32 (float64 for float64 inputs). Chunked over queries and keys (``chunk``); backward recomputes the chunks from q, k and the saved per-row log-sum-exp (``FlashAttention``-style), so memory stays at
    the output plus one chunk. Gradients flow to q and k (not to the mask).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, mask: Tensor | None, text: slice, scale: float, chunk: Chunking):
        b, h, n, _ = q.shape
        big_l = k.shape[-2]
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_empty((b, h, n, text.stop - text.start), dtype=wd)
        lse = q.new_empty((b, h, n), dtype=wd)
        for r0 in range(0, n, chunk.queries):
            rows = slice(r0, min(n, r0 + chunk.queries))
            qr = q[:, :, rows]
            shape = (b, h, rows.stop - rows.start)
            m = torch.full(shape, float("-inf"), dtype=wd, device=q.device)
            shift = torch.zeros(shape, dtype=wd, device=q.device)  # finite running max (online LSE)
            acc = torch.zeros(shape, dtype=wd, device=q.device)
            for c0 in range(0, big_l, chunk.keys):
                cols = slice(c0, min(big_l, c0 + chunk.keys))
                s = _scores(qr, k[:, :, cols], scale, mask, rows, cols)
                m = torch.maximum(m, s.amax(-1))
                new_shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                acc = acc * (shift - new_shift).exp() + s.sub_(new_shift.unsqueeze(-1)).exp_().sum(-1)
                shift = new_shift
                del s  # one chunk alive at a time
            lse[:, :, rows] = acc.log() + shift
            out[:, :, rows] = (
                _scores(qr, k[:, :, text], scale, mask, rows, text).sub_(lse[:, :, rows].unsqueeze(-1)).exp_()
            )
        ctx.save_for_backward(q, k, lse, out, mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        ctx.text, ctx.scale, ctx.chunk = text, scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, lse, out, mask = ctx.saved_tensors
        mask = mask if ctx.has_mask else None
        text, scale, chunk = ctx.text, ctx.scale, ctx.chunk
        n, big_l = q.shape[-2], k.shape[-2]
        grad = grad.to(out.dtype)
        # d loss / d s_ij = p_ij (g_ij [j text] - c_i), c_i = sum_t g_it p_it (the softmax's Jacobian over all keys)
        c = torch.empty(out.shape[:-1], dtype=out.dtype, device=out.device)
        for r0 in range(0, n, chunk.queries):
            rows = slice(r0, min(n, r0 + chunk.queries))
            c[:, :, rows] = (grad[:, :, rows] * out[:, :, rows]).sum(-1)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device) if ctx.needs_input_grad[0] else None
        dk = torch.zeros(k.shape, dtype=out.dtype, device=k.device) if ctx.needs_input_grad[1] else None
        for r0 in range(0, n, chunk.queries):
            rows = slice(r0, min(n, r0 + chunk.queries))
            qr = _work(q[:, :, rows])
            for c0 in range(0, big_l, chunk.keys):
                cols = slice(c0, min(big_l, c0 + chunk.keys))
                kc = _work(k[:, :, cols])
                p = _scores(qr, kc, scale, mask, rows, cols).sub_(lse[:, :, rows].unsqueeze(-1)).exp_()
                lo, hi = max(cols.start, text.start), min(cols.stop, text.stop)
                text_part = None
                if lo < hi:
                    text_part = p[..., lo - c0 : hi - c0] * grad[:, :, rows, lo - text.start : hi - text.start]
                ds = p.mul_(-c[:, :, rows].unsqueeze(-1))  # in place: ds = scale * p * (g - c)
                if text_part is not None:
                    ds[..., lo - c0 : hi - c0] += text_part
                ds.mul_(scale)
                if dq is not None:
                    dq[:, :, rows] += ds @ kc
                if dk is not None:
                    dk[:, :, cols] += ds.transpose(-1, -2) @ qr
                del p, ds, text_part  # one chunk alive at a time
        return (
            dq.to(q.dtype) if dq is not None else None,
            dk.to(k.dtype) if dk is not None else None,
            None,
            None,
            None,
            None,
        )


def kernel_mask(mask: Tensor | None, image: slice) -> Tensor | None:
    """The attention kernel's ``mask`` as (B or 1, H or 1, rows, L), read as ComfyUI's kernels read it, its query
    rows cut to ``image`` (where it has a row per query; a row of 1 is broadcast over the queries).

    ComfyUI's kernels take (L, L) as one mask for every batch row and head, (B, Lq, L) as one per batch row
    (``unsqueeze(1)``: broadcast over the heads), so a T5 padding mask (B, 1, L) holds one key mask per batch row
    for every query; 4-D masks are used as they are."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask if mask.shape[-2] == 1 else mask[..., image, :]


def text_probabilities(
    q: Tensor,
    k: Tensor,
    image: slice,
    text: slice,
    mask: Tensor | None = None,
    chunk: Chunking | None = None,
    scale: float | None = None,
) -> Tensor:
    """Image-query x text-key attention probabilities (B, H, N_img, T) float32, softmax over all L keys.

    ``q``: (B, H, L, d) and ``k``: (B, H or H / g, L, d) as the attention kernel receives them (RoPE applied;
    grouped-query keys are repeated per query head, as SDPA's ``enable_gqa`` does); ``image`` / ``text``: slices
    of the joint sequence; ``mask``: the kernel's mask or None, read as ComfyUI's kernels read it (2-D: (Lq, L);
    3-D: (B, Lq or 1, L); 4-D: (B, H, Lq or 1, L)); ``scale``: the kernel's scale (default ``d ** -0.5``).
    Differentiable w.r.t. q and k.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if k.shape[1] != q.shape[1]:
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"ZeroCon: {q.shape[1]} query heads cannot share {k.shape[1]} key heads")
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    mask = kernel_mask(mask, image)
    return TextProbabilities.apply(q[:, :, image], k, mask, text, scale, chunk or Chunking())


# -- per-call patches -----------------------------------------------------------------------------------------


@dataclass
class _BlockContext:
    """What the attention override needs inside one guided block's forward."""

    probs_name: str | None
    total: int  # joint sequence length (to recognise the joint attention call)
    image: slice
    text: slice
    done: bool = False


class _CallState:
    """Per-``predict`` state: the recorder, the grid, the text length seen by the Flux wrapper."""

    def __init__(self, recorder, grid: tuple[int, int], chunk: Chunking) -> None:
        self.recorder = recorder
        self.grid = grid
        self.chunk = chunk
        self.context_len: int | None = None

    @property
    def grid_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class _BlockPatch:
    """``patches_replace["dit"]`` patch for one guided block: tags the attention, records the image output."""

    def __init__(self, state: _CallState, model_type: str, block: str, module, probs_name, features_name, prior):
        self.state = state
        self.model_type = model_type
        self.block = block  # "double" / "single" / "joint"
        self.module = module
        self.probs_name = probs_name
        self.features_name = features_name
        self.prior = prior
        self.registers = getattr(module, "registers", 0)

    def _layout(self, args: dict) -> tuple[int, slice, slice]:
        """(joint length, image-row slice, text-column slice) of the block's joint attention."""
        n = self.state.grid_tokens
        if self.model_type == "mmdit":
            t = 0 if args.get("txt") is None else int(args["txt"].shape[1])
            return t + int(args["img"].shape[1]), slice(t, t + n), slice(self.registers, t)
        if self.block == "double":
            t, n_img = int(args["txt"].shape[1]), int(args["img"].shape[1])
            if getattr(self.module, "flipped_img_txt", False):
                return t + n_img, slice(0, n), slice(n_img, n_img + t)
            return t + n_img, slice(t, t + n), slice(0, t)
        t = self.state.context_len
        if t is None:
            raise RuntimeError("ZeroCon: the Flux text length was not seen before a single-stream block")
        return int(args["img"].shape[1]), slice(t, t + n), slice(0, t)

    def __call__(self, args: dict, extra: dict) -> dict:
        total, image, text = self._layout(args)
        to = dict(args.get("transformer_options") or {})
        to[TAG] = _BlockContext(self.probs_name, total, image, text)
        args = dict(args, transformer_options=to)
        original = self._original(extra["original_block"])
        with _saved_inputs_copied(args) if self.model_type == "flux" and torch.is_grad_enabled() else nullcontext():
            out = self.prior(args, {**extra, "original_block": original}) if self.prior else original(args)
        if self.features_name is not None:
            img = out["img"]
            start = image.start if self.block == "single" else 0  # double / joint: the image stream alone
            tokens = img[:, start : start + self.state.grid_tokens]
            b, _, c = tokens.shape
            # a copy: the next blocks add to this output in place (Flux single blocks, ControlNet)
            feat = tokens.transpose(1, 2).reshape(b, c, *self.state.grid).contiguous()
            self.state.recorder.add_features(self.features_name, feat, to)
        return out

    def _original(self, comfy_original: Callable) -> Callable:
        if self.model_type != "mmdit":
            return comfy_original
        module, checkpoint = self.module.block, self.module.checkpoint

        def run(args: dict) -> dict:  # as the unpatched path runs it (ComfyUI's replace path always checkpoints)
            txt, img = module(
                args["txt"], args["img"], c=args["vec"], use_checkpoint=checkpoint,
                transformer_options=args["transformer_options"],
            )  # fmt: skip
            return {"txt": txt, "img": img}

        return run


@contextmanager
def _saved_inputs_copied(args: dict):
    """Autograd saves a copy of any tensor sharing storage with the block's inputs.

    ComfyUI's Flux blocks add to their inputs in place (``txt += ...`` in double blocks, ``x += ...`` in
    single blocks) after a LayerNorm saved them for backward, which makes stock Flux non-differentiable
    ("modified by an inplace operation"). Copying what is saved from those storages (one ``(B, L, C)``
    tensor per save) keeps the block's forward unchanged and its backward exact.
    """
    storages = {t.untyped_storage().data_ptr() for t in (args.get("img"), args.get("txt")) if isinstance(t, Tensor)}
    # PyTorch runs only the innermost hooks: hand everything else to the autograd session's (per-layer cast
    # weights recast in the backward, ``weights.ACTIVE_SAVED_TENSOR_HOOKS``)
    outer_pack, outer_unpack = ACTIVE_SAVED_TENSOR_HOOKS.get() or (_same, _same)

    def pack(t: Tensor):
        return t.clone() if t.untyped_storage().data_ptr() in storages else outer_pack(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, outer_unpack):
        yield


def _same(t):
    return t


def kernel_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(q, k, mask)`` of an attention kernel call ``(q, k, v, heads, [mask], ...)`` as ComfyUI makes it, q and k
    as (B, H, L, d) (grouped-query keys keep their fewer heads of the same size)."""
    q, k, heads = args[0], args[1], int(args[3]) if len(args) > 3 else int(kwargs["heads"])
    if not kwargs.get("skip_reshape", False):
        b, length, inner = q.shape
        d = inner // heads
        q = q.reshape(b, length, heads, d).transpose(1, 2)
        k = k.reshape(b, k.shape[1], k.shape[-1] // d, d).transpose(1, 2)
    return q, k, kwargs.get("mask", args[4] if len(args) > 4 else None)


def _capture_override(state: _CallState, previous):
    """``optimized_attention_override``: text probabilities in tagged joint attentions, then the usual kernel."""

    def override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        block = to.get(TAG)
        if block is not None and block.probs_name is not None and not block.done:
            q, k, mask = kernel_inputs(args, kwargs)
            if k.shape[-2] == block.total:  # the joint attention (SD3.5's extra image-only attention is not)
                block.done = True
                probs = text_probabilities(
                    q, k, block.image, block.text, mask, state.chunk, scale=kwargs.get("scale")
                )  # fmt: skip
                state.recorder.add_probs(block.probs_name, probs, to)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    return override


def _context_wrapper(state: _CallState):
    def wrapper(executor, x, timestep, context, *args, **kwargs):
        state.context_len = int(context.shape[1])
        return executor(x, timestep, context, *args, **kwargs)

    return wrapper


def install(
    options: dict,
    diffusion_model,
    table: list[tuple[LayerInfo, tuple[str, int]]],
    capture: CaptureRequest,
    recorder,
    latent_shape,
    chunk: Chunking | None = None,
    grad: bool = False,
) -> None:
    """Add this call's DiT capture patches to ``options`` (a per-call copy whose transformer_options dict is
    already its own); nested dicts are copied before they change. ``grad``: a grad-enabled forward (Flux
    then gets a block patch on every block: ``_saved_inputs_copied``). Nothing is added for an empty
    ``capture`` outside grad passes."""
    import comfy.patcher_extension

    model_type = dit_type(diffusion_model)
    if not capture and not (grad and model_type == "flux"):
        return
    capture = capture or CaptureRequest()
    by_name = {info.name: (info, key) for info, key in table}
    unknown = sorted((set(capture.probs) | set(capture.features)) - set(by_name))
    if unknown:
        raise ValueError(f"ZeroCon: unknown attention layers {unknown}")
    grid = patch_grid(diffusion_model, latent_shape) if latent_shape is not None else (0, 0)
    state = _CallState(recorder, grid, chunk or Chunking())
    wanted: dict[tuple[str, int], dict[str, Any]] = {}
    for name in capture.probs:
        info, key = by_name[name]
        wanted.setdefault(key, {"block": info.block})["probs"] = name
    for name in capture.features:
        info, key = by_name[name]
        wanted.setdefault(key, {"block": info.block})["features"] = name

    if grad and model_type == "flux":  # every block, to make Flux differentiable (_saved_inputs_copied)
        for info, key in table:
            wanted.setdefault(key, {"block": info.block})

    to = options["transformer_options"]
    replace = dict(to.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    for key, w in wanted.items():
        module = _block_module(diffusion_model, model_type, key)
        dit[key] = _BlockPatch(state, model_type, w["block"], module, w.get("probs"), w.get("features"), dit.get(key))
    replace["dit"] = dit
    to["patches_replace"] = replace
    if capture.probs:
        to["optimized_attention_override"] = _capture_override(state, to.get("optimized_attention_override"))
    if model_type == "flux":
        wrappers = dict(to.get("wrappers", {}))
        dm = dict(wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}))
        dm[WRAPPER_KEY] = [_context_wrapper(state)]
        wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL] = dm
        to["wrappers"] = wrappers


class _MMDiTBlock:
    """A joint block with how the unpatched forward runs it (checkpointing, register tokens)."""

    def __init__(self, block, checkpoint: bool, registers: int) -> None:
        self.block = block
        self.checkpoint = checkpoint
        self.registers = registers


def _block_module(diffusion_model, model_type: str, key: tuple[str, int]):
    kind, i = key
    if model_type == "qwen":
        return diffusion_model.transformer_blocks[i]
    if model_type == "mmdit":
        return _MMDiTBlock(
            diffusion_model.joint_blocks[i],
            bool(getattr(diffusion_model, "use_checkpoint", False)),
            int(getattr(diffusion_model, "register_length", 0) or 0),
        )
    return (diffusion_model.double_blocks if kind == "double_block" else diffusion_model.single_blocks)[i]
