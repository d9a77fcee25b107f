"""The engine's ``Denoiser`` over a ComfyUI model inside a running sampler.

``ComfyDenoiser`` predicts through ComfyUI's own conditioning path, ``comfy.samplers.calc_cond_batch``
(areas, hooks, ControlNets, model wrappers and patches all apply; it returns x0, and
``eps = (x - x0) / sigma`` holds for eps- and v-prediction alike). Captures use per-call patches on a
*copy* of the sampler's ``model_options``, so nothing is ever registered on the user's MODEL:

- cross-attention probabilities: an ``attn2`` *replace* patch on the guided layers only, computing
  ``softmax(q k^T / sqrt(d))`` per head in float32 and returning ``probs @ v`` (or the output of a replace
  patch that was already there, e.g. IPAdapter's); every other layer keeps ComfyUI's fast attention;
- self-attention features: an ``attn1_output_patch`` (after ``to_out``) that records the chosen layers.

On Flux and SD3 (MM-DiT) the same two captures come from the joint attention and the image-token outputs
of the guided blocks through ``nodes.glue.dit_capture`` (block replace patches, an attention override, a wrapper).
Both leave here in float32 whatever the model's dtype (an fp16 / bf16 UNet hands the patches half-precision
activations), so the losses never run in half precision.

Rows are split per conditioning with ``transformer_options["cond_or_uncond"]`` (calc_cond_batch batches
several conds into one forward). ``autograd_session()`` makes the inference-tensor weights usable by
autograd and restores them on exit (``weights.autograd_weights``). Grad-enabled forwards take ComfyUI's
differentiable model paths (``grad_paths.torch_paths``: no comfy-kitchen op without a backward) and route every
attention kernel that has no backward (flash, sage, INT8...) to PyTorch SDPA via ``optimized_attention_override``
(an override already on the model keeps running, unless its output carries no gradient: it ignored the kernel
it was handed); forwards without grad keep the user's kernel. Every forward checks ComfyUI's interrupt at each attention
call, and every backward when it reaches one, so Cancel takes effect within one layer at any image size.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any, ContextManager, Iterator, Sequence

import torch
from torch import Tensor

from ...zerocon_core.method.denoiser import CaptureRequest, LayerInfo, Prediction
from ..glue import dit_capture, grad_paths, joint_capture
from ..glue.weights import autograd_weights

logger = logging.getLogger("zerocon")

BLOCK_NAMES = {"input": "down", "middle": "mid", "output": "up"}
#: Attention kernels that have a backward; anything else is replaced by SDPA in grad-enabled forwards.
DIFFERENTIABLE_KERNELS = frozenset({"attention_basic", "attention_pytorch", "attention_xformers"})


def layer_name(block: str, number: int, index: int, kind: str) -> str:
    """ComfyUI-style layer id, e.g. ``output.3.0.attn2`` (block, block id, index inside the transformer)."""
    return f"{block}.{number}.{index}.{'attn2' if kind == 'cross' else 'attn1'}"


def enumerate_layers(diffusion_model: torch.nn.Module) -> list[tuple[LayerInfo, tuple[str, int, int]]]:
    """All attn1/attn2 layers of an openaimodel ``UNetModel`` in forward order, with their patch keys.

    The level is the downsampling level of the block (0 = latent resolution), followed through the
    UNet's Downsample / Upsample modules.
    """
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    out: list[tuple[LayerInfo, tuple[str, int, int]]] = []

    def visit(block_module, block: str, number: int, level: int) -> None:
        index = 0
        for mod in block_module.modules():
            if isinstance(mod, BasicTransformerBlock):
                for kind, attr in (("self", "attn1"), ("cross", "attn2")):
                    if getattr(mod, attr, None) is not None:
                        info = LayerInfo(layer_name(block, number, index, kind), kind, BLOCK_NAMES[block], level)
                        out.append((info, (block, number, index)))
                index += 1

    level = 0
    for i, blk in enumerate(diffusion_model.input_blocks):
        visit(blk, "input", i, level)
        if any(isinstance(m, Downsample) for m in blk.modules()):
            level += 1
    visit(diffusion_model.middle_block, "middle", 0, level)
    for i, blk in enumerate(diffusion_model.output_blocks):
        visit(blk, "output", i, level)
        if any(isinstance(m, Upsample) for m in blk.modules()):
            level -= 1
    return out


class _Recorder:
    """Collects captures per (layer, conditioning index) during one ``calc_cond_batch`` call."""

    def __init__(self) -> None:
        self.probs: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
        self.features: dict[tuple[str, int], list[Tensor]] = defaultdict(list)

    @staticmethod
    def _split(t: Tensor, extra_options: dict) -> Iterator[tuple[int, Tensor]]:
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        for idx, part in zip(chunks, t.chunk(len(chunks))):
            yield idx, part

    def add_probs(self, name: str, probs: Tensor, extra_options: dict) -> None:
        for idx, part in self._split(probs, extra_options):
            self.probs[(name, idx)].append(part)

    def add_features(self, name: str, feat: Tensor, extra_options: dict) -> None:
        for idx, part in self._split(feat, extra_options):
            self.features[(name, idx)].append(part)

    @staticmethod
    def _collect(parts: list[Tensor], what: str, name: str) -> Tensor:
        if len(parts) == 1:
            return parts[0]
        if len({tuple(p.shape) for p in parts}) != 1:
            raise ValueError(
                f"ZeroCon: the conditioning gave {what} of different shapes at layer {name} "
                "(area or masked conditioning is not supported by guided sampling)"
            )
        return torch.stack(parts).mean(0)  # several entries in one CONDITIONING: averaged, as their x0s are


def _token_lengths(cond: Any) -> set[int]:
    lengths = set()
    for entry in cond or []:
        c = (entry.get("model_conds") or {}).get("c_crossattn") if isinstance(entry, dict) else None
        t = getattr(c, "cond", None)
        if isinstance(t, Tensor) and t.ndim == 3:
            lengths.add(int(t.shape[1]))
    return lengths


def _fold_tokens(probs: Tensor, lengths: set[int]) -> Tensor:
    """Undo ComfyUI's context repetition (conds of different lengths are repeated to a common length).

    Repeating the keys k times splits each token's probability into k equal parts; summing them back is exact.
    """
    if len(lengths) != 1:
        return probs
    (own,) = lengths
    total = probs.shape[-1]
    if total > own and total % own == 0:
        return probs.unflatten(-1, (total // own, own)).sum(-2)
    return probs


def _check_interrupt() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def _interrupt_in_backward(grad: Tensor) -> None:
    _check_interrupt()


def _passing_attention_override(previous):
    """An ``optimized_attention_override`` for forwards without grad: checks ComfyUI's interrupt at every attention
    call (so Cancel stops a long forward), then runs exactly what would have run without it."""

    def override(func, *args, **kwargs):
        _check_interrupt()
        return func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)

    if getattr(previous, "container_function", None) is not None:
        override.container_function = previous.container_function
    return override


def _differentiable_attention_override(previous, bypassed: set, on_bypass=None):
    """An ``optimized_attention_override`` for grad-enabled forwards.

    Routes kernels without a backward to PyTorch SDPA, then hands the call to an override that was already there
    (``previous``). Where that one's output cannot carry a gradient back to q, k, v (it ignored the kernel it was
    handed and returned none at all, or one through an op without a backward such as comfy-kitchen's INT8
    attention), the call is recomputed with SDPA, ``on_bypass(name)`` is told and its id joins ``bypassed``: later
    calls skip it. Checks ComfyUI's interrupt at each call and again when the backward reaches the call's output."""
    from comfy.ldm.modules import attention

    sdpa = getattr(attention.attention_pytorch, "__wrapped__", attention.attention_pytorch)

    def override(func, *args, **kwargs):
        _check_interrupt()
        if getattr(func, "__name__", "") not in DIFFERENTIABLE_KERNELS:
            func = sdpa
        if previous is None or id(previous) in bypassed:
            out = func(*args, **kwargs)
        else:
            out = previous(func, *args, **kwargs)
            if not grad_paths.differentiable(out, args[:3]):
                bypassed.add(id(previous))
                if on_bypass is not None:
                    on_bypass(getattr(previous, "__qualname__", type(previous).__name__))
                out = func(*args, **kwargs)
        if out.requires_grad:
            out.register_hook(_interrupt_in_backward)
        return out

    return override


class ComfyDenoiser:
    """``zerocon_core.method.denoiser.Denoiser`` over a ComfyUI ``BaseModel`` inside a running sampler.

    - ``model``: the BaseModel being sampled (``guider.inner_model``);
    - ``model_options``: the sampler's model options (``extra_args["model_options"]``), never mutated;
    - ``model_sampling``: the active model_sampling (object patches included); default the model's;
    - ``autograd_modules``: modules whose weights must take part in autograd (default: the model; the
      sampler adds ControlNets and other models it loaded).

    The model's family adapter (``families``) picks the capture code: UNet attention patches or an MM-DiT's
    block patches (Flux, SD3 MMDiT: ``dit_capture``), and whether gradient passes take ComfyUI's torch paths.
    ``chunking``: query / key chunk sizes of the DiT text-probability computation.
    """

    def __init__(
        self,
        model,
        model_options: dict | None = None,
        *,
        model_sampling=None,
        autograd_modules: Sequence[torch.nn.Module] | None = None,
    ) -> None:
        from . import capture_code, needs_torch_paths, prediction_type

        self.model = model
        self.model_options = model_options or {}
        ms = model_sampling if model_sampling is not None else model.model_sampling
        self.model_sampling = ms
        #: The model's training sigmas, ascending (alphas_cumprod = 1 / (1 + sigma^2)).
        self.sigma_table = ms.sigmas.detach().to("cpu", torch.float64).clone()
        self.prediction_type = prediction_type(ms)
        self.autograd_modules = list(autograd_modules) if autograd_modules is not None else [model]
        self.dit_type = capture_code(model)  # the family adapter's capture code: None (UNet), "flux", "mmdit"
        self.torch_paths = needs_torch_paths(model)
        self.chunking = dit_capture.Chunking()
        self._layers: list[tuple[LayerInfo, tuple]] | None = None
        self._warned_no_override = False
        self._warned_override_fallback = False
        self._graph_checked = False
        self._bypassed: set[int] = set()  # ids of attention overrides that gradient passes skip

    # -- Denoiser protocol -------------------------------------------------------------------------

    def layers(self) -> list[LayerInfo]:
        return [info for info, _ in self._layer_table()]

    def predict(
        self, x: Tensor, sigma: Tensor, conds: Sequence[Any], capture: CaptureRequest | None = None
    ) -> list[Prediction]:
        import comfy.samplers

        conds = list(conds)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).detach()
        if sigma.is_inference() and not torch.is_inference_mode_enabled():
            sigma = sigma.clone()  # autograd may save it (eps = (x - x0) / sigma); inference tensors cannot be saved
        timestep = sigma * x.new_ones([x.shape[0]])
        recorder = _Recorder() if capture else None
        grad = torch.is_grad_enabled()
        options = self._options(capture, recorder, grad=grad, latent_shape=x.shape)
        with grad_paths.torch_paths() if grad and self.torch_paths else contextlib.nullcontext():
            x0s = comfy.samplers.calc_cond_batch(self.model, conds, x, timestep, options)
        if grad and x.requires_grad and not self._graph_checked:
            self._graph_checked = True
            self._check_graph(x0s, recorder)
        out = []
        for i, x0 in enumerate(x0s):
            eps = (x - x0) / sigma
            probs: dict[str, Tensor] = {}
            features: dict[str, Tensor] = {}
            if capture:
                lengths = _token_lengths(conds[i])
                for name in capture.probs:
                    parts = recorder.probs.get((name, i))
                    if not parts:
                        raise RuntimeError(f"ZeroCon: no cross-attention captured at {name} for conditioning #{i}")
                    probs[name] = _fold_tokens(_Recorder._collect(parts, "attention maps", name), lengths)
                for name in capture.features:
                    parts = recorder.features.get((name, i))
                    if not parts:
                        raise RuntimeError(
                            f"ZeroCon: no self-attention features captured at {name} for conditioning #{i}"
                        )
                    features[name] = _Recorder._collect(parts, "features", name)
            out.append(Prediction(eps, probs, features))
        return out

    def autograd_session(self) -> ContextManager[None]:
        return autograd_weights(self.autograd_modules)

    def _check_graph(self, x0s: Sequence[Tensor], recorder: _Recorder | None) -> None:
        """Refuse, with a clear error, a first guidance forward whose graph holds an op without a backward."""
        outputs = list(x0s)
        if recorder is not None:
            outputs += [t for parts in (*recorder.probs.values(), *recorder.features.values()) for t in parts]
        op = grad_paths.opaque_op(outputs)
        if op is not None:
            raise RuntimeError(
                f"ZeroCon: the guidance forward of {type(self.model.diffusion_model).__name__} ran {op}, an op with "
                "no backward, so no gradient can reach the latent; this ComfyUI has no differentiable path for it "
                "that ZeroCon knows of (run without guidance, or report the model and ComfyUI version)"
            )

    # -- internals ---------------------------------------------------------------------------------

    def _layer_table(self) -> list[tuple[LayerInfo, tuple]]:
        if self._layers is None:
            dm = self.model.diffusion_model
            self._layers = self._dit_capture().enumerate_layers(dm) if self.dit_type else enumerate_layers(dm)
        return self._layers

    def _dit_capture(self):
        """The capture module of this DiT: ``joint_capture`` for single-stream joint attention ("lumina"),
        ``dit_capture`` for the MM-DiTs' block patches."""
        return joint_capture if self.dit_type == "lumina" else dit_capture

    def _options(
        self, capture: CaptureRequest | None, recorder: _Recorder | None, grad: bool, latent_shape=None
    ) -> dict:
        """A copy of the sampler's model_options with this call's patches; the original is untouched."""
        import comfy.model_patcher

        options = dict(self.model_options)
        to = dict(options.get("transformer_options", {}))
        options["transformer_options"] = to
        if grad:
            options.pop("multigpu_clones", None)  # ComfyUI's multi-GPU path runs under no_grad: one device here
        self._route_attention(to, grad)
        if self.dit_type:
            dm = self.model.diffusion_model
            self._dit_capture().install(
                options, dm, self._layer_table(), capture, recorder, latent_shape, self.chunking, grad=grad
            )
            return options
        if not capture:
            return options
        keys = {info.name: key for info, key in self._layer_table()}
        unknown = sorted((set(capture.probs) | set(capture.features)) - set(keys))
        if unknown:
            raise ValueError(f"ZeroCon: unknown attention layers {unknown}")
        existing = to.get("patches_replace", {}).get("attn2", {})
        for name in sorted(capture.probs):
            block, number, index = keys[name]
            prior = existing.get((block, number, index)) or existing.get((block, number))
            patch = _CrossAttentionCapture(name, recorder, prior)
            comfy.model_patcher.set_model_options_patch_replace(options, patch, "attn2", block, number, index)
        if capture.features:
            wanted = {keys[name]: name for name in capture.features}
            to = options["transformer_options"]
            patches = dict(to.get("patches", {}))
            patches["attn1_output_patch"] = list(patches.get("attn1_output_patch", [])) + [
                _SelfAttentionCapture(wanted, recorder)
            ]
            to["patches"] = patches
        return options

    def _route_attention(self, to: dict, grad: bool) -> None:
        """Installs this call's attention override: interrupt checks, and in grad passes kernels with a backward."""
        from comfy.ldm.modules import attention

        if hasattr(attention, "wrap_attn"):
            previous = to.get("optimized_attention_override")
            if grad:
                to["optimized_attention_override"] = _differentiable_attention_override(
                    previous, self._bypassed, self._warn_bypass
                )
            else:
                to["optimized_attention_override"] = _passing_attention_override(previous)
        elif (
            grad
            and getattr(attention.optimized_attention, "__name__", "") not in DIFFERENTIABLE_KERNELS
            and not self._warned_no_override
        ):
            self._warned_no_override = True
            logger.warning(
                "ZeroCon: this ComfyUI cannot route attention per call and the active kernel (%s) may have no "
                "backward; if guidance fails, start ComfyUI with --use-pytorch-cross-attention",
                attention.optimized_attention.__name__,
            )

    def _warn_bypass(self, name: str) -> None:
        if not self._warned_override_fallback:
            self._warned_override_fallback = True
            logger.warning(
                "ZeroCon: the model's attention override (%s) returns an output that carries no gradient (it does not "
                "run the kernel it is handed); guidance passes use PyTorch attention instead (other passes keep it)",
                name,
            )


class _CrossAttentionCapture:
    """attn2 replace patch: records per-head softmax probabilities (float32) and returns the attention output."""

    def __init__(self, name: str, recorder: _Recorder, prior=None) -> None:
        self.name = name
        self.recorder = recorder
        self.prior = prior

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        heads = int(extra_options["n_heads"])
        b, hw, inner = q.shape
        dim_head = inner // heads
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1), v.expand(b, -1, -1)
        qh = q.float().reshape(b, hw, heads, dim_head).transpose(1, 2)
        kh = k.float().reshape(b, k.shape[1], heads, dim_head).transpose(1, 2)
        probs = (qh @ kh.transpose(-1, -2) * dim_head**-0.5).softmax(dim=-1)  # (B, heads, HW, T)
        self.recorder.add_probs(self.name, probs, extra_options)
        if self.prior is not None:
            return self.prior(q, k, v, extra_options)
        vh = v.float().reshape(b, v.shape[1], heads, dim_head).transpose(1, 2)
        return (probs @ vh).transpose(1, 2).reshape(b, hw, inner).to(q.dtype)


class _SelfAttentionCapture:
    """attn1_output_patch: records the chosen layers' outputs (after to_out) as (B, C, H, W); returns them unchanged."""

    def __init__(self, wanted: dict[tuple[str, int, int], str], recorder: _Recorder) -> None:
        self.wanted = wanted
        self.recorder = recorder

    def __call__(self, n: Tensor, extra_options: dict) -> Tensor:
        block = extra_options.get("block")
        if block is None:
            return n
        name = self.wanted.get((block[0], block[1], extra_options.get("block_index", 0)))
        if name is not None:
            shape = extra_options.get("activations_shape")
            b, hw, c = n.shape
            if shape is not None and int(shape[-2]) * int(shape[-1]) == hw:
                h, w = int(shape[-2]), int(shape[-1])
            else:
                raise RuntimeError(f"ZeroCon: cannot tell the spatial size of layer {name} ({hw} tokens)")
            feat = n.transpose(1, 2).reshape(b, c, h, w).float()  # fp16/bf16 models: the losses run in float32
            self.recorder.add_features(name, feat, extra_options)
        return n
