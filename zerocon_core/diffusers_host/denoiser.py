"""The ``Denoiser`` over a diffusers ``UNet2DConditionModel`` (library use, CLI, tests).

The UNet is a VP model: it sees ``z = x / sqrt(1 + sigma^2)`` and a timestep, and predicts eps or v.
``DiffusersDenoiser`` converts from and to the engine's sigma space (see ``zerocon_core/__init__.py``).
Attention capture is done by attention processors installed once on the UNet (``close()`` restores the
previous ones); layers not being captured run ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.log import logger
from ..method.denoiser import CaptureRequest, LayerInfo, Prediction, no_session
from ..method.schedule import sd_alphas_cumprod, sigma_from_alpha_bar, timestep_from_sigma, vp_scale

_PREDICTION_TYPES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
#: Timesteps this close to an integer are snapped to it (float32 copies of table sigmas).
_SNAP = 1e-3


@dataclass
class TextCond:
    """A text conditioning for a diffusers UNet.

    ``embeds``: encoder hidden states, (1 or B, T, D). ``added_cond_kwargs``: extra UNet inputs, e.g. SDXL's
    ``{"text_embeds": (1|B, 1280), "time_ids": (1|B, 6)}``; None for SD1.x/2.x. Tensors with a leading
    dimension of 1 are broadcast to the latent batch B.
    """

    embeds: Tensor
    added_cond_kwargs: dict[str, Tensor] | None = None


class _CaptureState:
    """What the processors record during one ``predict`` call (reset afterwards)."""

    def __init__(self) -> None:
        self.probs_names: frozenset[str] = frozenset()
        self.feature_names: frozenset[str] = frozenset()
        self.level_sizes: list[tuple[int, int]] = []
        self.probs: dict[str, Tensor] = {}
        self.features: dict[str, Tensor] = {}

    def start(self, request: CaptureRequest | None, height: int, width: int, levels: int) -> None:
        self.probs_names = request.probs if request else frozenset()
        self.feature_names = request.features if request else frozenset()
        sizes = [(height, width)]
        for _ in range(levels):
            h, w = sizes[-1]
            sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
        self.level_sizes = sizes
        self.probs, self.features = {}, {}

    def reset(self) -> None:
        self.start(None, 0, 0, 0)
        self.level_sizes = []

    def spatial(self, level: int, seq_len: int) -> tuple[int, int]:
        """(H, W) of a token sequence of length ``seq_len`` at ``level`` (ceil-halving, as stride-2 convs)."""
        if 0 <= level < len(self.level_sizes):
            h, w = self.level_sizes[level]
            if h * w == seq_len:
                return h, w
        for h, w in self.level_sizes:
            if h * w == seq_len:
                return h, w
        raise RuntimeError(
            f"cannot tell the spatial shape of {seq_len} tokens at level {level}; sizes {self.level_sizes}"
        )


class _ZeroConAttnProcessor:
    """Attention processor for one ``Attention`` module: fast SDPA, or explicit probabilities when captured.

    ``name`` is the layer id reported by ``DiffusersDenoiser.layers()`` (None: never captured).
    """

    def __init__(self, state: _CaptureState, name: str | None, level: int) -> None:
        self.state = state
        self.name = name
        self.level = level

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            b4, c4, h4, w4 = shape4
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = _heads(attn, hidden_states, encoder_hidden_states, batch)
        out = self._attend(attn, query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        out = self._keep_features(out, shape4, batch)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, attn, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """Attention (B, heads, HW, d); in float32 (float64 for float64 inputs) with the probabilities
        (B, heads, HW, T) kept in the state when this layer's are wanted, else SDPA."""
        st = self.state
        if not (self.name is not None and self.name in st.probs_names):
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
        cd = torch.float64 if query.dtype == torch.float64 else torch.float32
        scores = (query.to(cd) @ key.to(cd).transpose(-1, -2)) * attn.scale
        if mask is not None:
            scores = scores + mask.to(cd)
        probs = scores.softmax(dim=-1)  # (B, heads, HW, T)
        st.probs[self.name] = probs
        return (probs @ value.to(cd)).to(query.dtype)

    def _keep_features(self, out: Tensor, shape4: torch.Size | None, batch: int) -> Tensor:
        """The output back in its input's layout; kept as (B, C, h, w) in the state when this layer's are wanted."""
        st = self.state
        want_feat = self.name is not None and self.name in st.feature_names
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
            if want_feat:
                st.features[self.name] = out
        elif want_feat:
            h, w = st.spatial(self.level, out.shape[1])
            st.features[self.name] = out.transpose(1, 2).reshape(batch, out.shape[-1], h, w)
        return out


def _heads(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None, batch: int):
    """Query (B, heads, HW, d), key and value (B, heads, T, d) of a diffusers ``Attention`` (self-attention
    when ``encoder_hidden_states`` is None), with its q / k norms applied."""
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _alphas_from_config(config: Any) -> tuple[Tensor, str | None]:
    """alphas_cumprod (float64) and prediction type from a diffusers scheduler or its config."""
    if hasattr(config, "alphas_cumprod"):  # a scheduler instance
        pred = getattr(config, "config", {}).get("prediction_type") if hasattr(config, "config") else None
        return config.alphas_cumprod.detach().double().cpu(), pred
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler_config must be a diffusers scheduler or its config mapping, got {type(config)}")
    from diffusers import DDIMScheduler  # lazy: diffusers is heavy

    cfg = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    sched = DDIMScheduler.from_config(cfg)
    return sched.alphas_cumprod.detach().double().cpu(), cfg.get("prediction_type")


def _expand(t: Tensor, b: int, what: str) -> Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ValueError(f"{what} has batch {t.shape[0]}; expected 1 or the latent batch {b}")


class DiffusersDenoiser:
    """``Denoiser`` (zerocon_core.method.denoiser) over a diffusers ``UNet2DConditionModel``.

    - ``alphas_cumprod``: the training schedule alpha_bar[t], shape (T,); or ``scheduler_config``: a diffusers
      scheduler or its config (``scheduler.config``). Neither: SD's scaled_linear 0.00085..0.012, T = 1000.
    - ``prediction_type``: "eps"/"epsilon" or "v"/"v_prediction"; default from the scheduler config, else eps.
    - ``device``/``dtype``: if given, the UNet is moved there; default: where the UNet is.

    The UNet's weights are set to not require grad, and its attention processors are replaced once
    (``close()`` puts the previous ones back). Conditionings are ``TextCond``.
    """

    def __init__(
        self,
        unet,
        alphas_cumprod: Tensor | None = None,
        *,
        scheduler_config: Any = None,
        prediction_type: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        cfg_pred = None
        if alphas_cumprod is None and scheduler_config is not None:
            alphas_cumprod, cfg_pred = _alphas_from_config(scheduler_config)
        elif alphas_cumprod is None:
            alphas_cumprod = sd_alphas_cumprod()
        ab = torch.as_tensor(alphas_cumprod).detach().double().cpu()
        if ab.ndim != 1 or len(ab) < 2 or not bool(((ab > 0) & (ab < 1)).all()):
            raise ValueError(
                "alphas_cumprod must be a 1-D schedule with values in (0, 1) (zero-terminal-SNR is unsupported)"
            )
        ptype = prediction_type or cfg_pred or "eps"
        if ptype not in _PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {ptype!r}; expected eps/epsilon or v/v_prediction")
        cfg = getattr(unet, "config", None)
        if cfg is not None and getattr(cfg, "in_channels", None) != getattr(cfg, "out_channels", None):
            raise ValueError(
                f"UNet has {cfg.in_channels} input and {cfg.out_channels} output channels (inpainting or learned-"
                "variance UNet?); only plain text-to-image UNets are supported"
            )
        if device is not None or dtype is not None:
            unet.to(device=device, dtype=dtype)
        unet.requires_grad_(False)
        self.unet = unet
        self.alphas_cumprod = ab
        self.sigma_table = sigma_from_alpha_bar(ab)
        self.prediction_type = _PREDICTION_TYPES[ptype]
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._state = _CaptureState()
        self._layers, self._num_levels = self._scan_layers()
        self._original_processors = dict(unet.attn_processors)
        self._install()

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> DiffusersDenoiser:
        """From a diffusers pipeline with ``unet`` and ``scheduler``."""
        return cls(pipe.unet, scheduler_config=pipe.scheduler, **kwargs)

    # -- layers ---------------------------------------------------------------------------------------------

    def _scan_layers(self) -> tuple[list[LayerInfo], int]:
        down = list(getattr(self.unet, "down_blocks", []))
        up = list(getattr(self.unet, "up_blocks", []))
        down_levels, n = [], 0
        for blk in down:
            down_levels.append(n)
            n += getattr(blk, "downsamplers", None) is not None
        up_levels, m = [], n
        for blk in up:
            up_levels.append(m)
            m -= getattr(blk, "upsamplers", None) is not None
        infos = []
        for name, module in self.unet.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in ("attn1", "attn2") or not hasattr(module, "set_processor"):
                continue
            parts = name.split(".")
            if parts[0] == "down_blocks":
                block, level = "down", down_levels[int(parts[1])]
            elif parts[0] == "up_blocks":
                block, level = "up", up_levels[int(parts[1])]
            elif parts[0] == "mid_block":
                block, level = "mid", n
            else:
                continue
            infos.append(LayerInfo(name, "self" if leaf == "attn1" else "cross", block, max(level, 0)))
        order = {"down": 0, "mid": 1, "up": 2}  # forward order (modules register up_blocks before mid_block)
        infos.sort(key=lambda info: order[info.block])  # stable: keeps module order within a block
        return infos, n

    def layers(self) -> list[LayerInfo]:
        """Every ``attn1`` ("self") and ``attn2`` ("cross") layer of the UNet, in forward order (down, mid, up).

        ``name`` is the module path (e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``); ``level``
        counts the downsamplers before the layer (SD1.x at 512 px: 0 = 64x64, 1 = 32x32, 2 = 16x16, 3 = 8x8).
        """
        return list(self._layers)

    def _install(self) -> None:
        levels = {info.name: info.level for info in self._layers}
        procs = {}
        for key in self.unet.attn_processors:
            module_name = key[: -len(".processor")]
            name = module_name if module_name in levels else None
            procs[key] = _ZeroConAttnProcessor(self._state, name, levels.get(module_name, 0))
        self.unet.set_attn_processor(procs)

    def close(self) -> None:
        """Put back the attention processors the UNet had before (the denoiser is unusable afterwards)."""
        if self._original_processors:
            self.unet.set_attn_processor(dict(self._original_processors))
            self._original_processors = {}

    def autograd_session(self):
        """Nothing to do: diffusers weights work with autograd as they are (and never require grad)."""
        return no_session()

    # -- prediction -----------------------------------------------------------------------------------------

    def timestep(self, sigma: Tensor | float) -> float:
        """Continuous training timestep for a noise level ``sigma``: exact integers for table sigmas (values
        within 1e-3 of an integer are snapped, so float32 copies of table sigmas map exactly)."""
        s = torch.as_tensor(sigma).detach().double().cpu().reshape(())
        t = float(timestep_from_sigma(s, self.sigma_table))
        r = round(t)
        return float(r) if abs(t - r) < _SNAP else t

    def predict(
        self, x: Tensor, sigma: Tensor, conds: Sequence[TextCond], capture: CaptureRequest | None = None
    ) -> list[Prediction]:
        """eps (sigma space, shaped like ``x`` (B, C, H, W), dtype of ``x``) for each conditioning.

        ``sigma`` is a 0-d (or 1-element) noise level. All conditionings run in one UNet forward (batch
        ``len(conds) * B``) when their shapes agree, else one forward each. Captures keep their graph to ``x``.
        """
        if not conds:
            raise ValueError("predict needs at least one conditioning")
        for c in conds:
            if not isinstance(c, TextCond):
                raise TypeError(f"DiffusersDenoiser conditionings must be TextCond, got {type(c).__name__}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be a single noise level, got shape {tuple(sigma.shape)}")
        sigma = sigma.reshape(())
        t = self.timestep(sigma)
        z = x * vp_scale(sigma)
        preds: list[Prediction | None] = [None] * len(conds)
        state = self._state
        try:
            for group in self._groups(conds):
                state.start(capture, x.shape[-2], x.shape[-1], self._num_levels)
                out = self._forward(z, t, [conds[i] for i in group])
                b = x.shape[0]
                for k, i in enumerate(group):
                    sl = slice(k * b, (k + 1) * b)
                    o = out[sl].to(x.dtype)
                    eps = o if self.prediction_type == "eps" else vp_scale(sigma) * (o + sigma * z)
                    preds[i] = Prediction(
                        eps,
                        {n: p[sl] for n, p in state.probs.items()},
                        {n: f[sl] for n, f in state.features.items()},
                    )
                missing = (
                    (capture.probs - state.probs.keys()) | (capture.features - state.features.keys())
                    if capture
                    else set()
                )
                if missing:
                    raise ValueError(f"requested layers were not captured (unknown names?): {sorted(missing)}")
        finally:
            state.reset()
        return preds  # type: ignore[return-value]

    @staticmethod
    def _groups(conds: Sequence[TextCond]) -> list[list[int]]:
        def sig(c: TextCond):
            added = tuple(sorted((k, tuple(v.shape[1:])) for k, v in (c.added_cond_kwargs or {}).items()))
            return tuple(c.embeds.shape[1:]), added

        first = sig(conds[0])
        if all(sig(c) == first for c in conds):
            return [list(range(len(conds)))]
        logger.debug("conditionings differ in shape: one UNet forward per conditioning")
        return [[i] for i in range(len(conds))]

    def _forward(self, z: Tensor, t: float, conds: Sequence[TextCond]) -> Tensor:
        """One UNet forward of ``z`` (B, C, H, W) repeated per conditioning; returns (len(conds) * B, C, H, W)."""
        b, n = z.shape[0], len(conds)
        dev, dt = self.device, self.dtype
        zin = z.to(device=dev, dtype=dt).repeat(n, 1, 1, 1)
        emb = torch.cat([_expand(c.embeds, b, "embeds") for c in conds]).to(device=dev, dtype=dt)
        added = None
        if conds[0].added_cond_kwargs:
            added = {
                key: torch.cat([_expand(c.added_cond_kwargs[key], b, key) for c in conds]).to(device=dev, dtype=dt)
                for key in conds[0].added_cond_kwargs
            }
        ts = torch.full((n * b,), t, dtype=torch.float32, device=dev)
        out = self.unet(zin, ts, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]
        return out.to(z.device)


__all__ = ["DiffusersDenoiser", "TextCond"]
