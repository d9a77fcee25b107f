"""VP diffusion vs flow matching: the few formulas that differ, in one place (docs/method.md §9b).

The engine works in ComfyUI's sigma space for both: a latent ``x`` at level ``sigma`` and the prediction
``eps := (x - x0) / sigma``, so that ``x + (sigma_next - sigma) * eps`` is the Euler (= DDIM, eta 0) step of
ComfyUI's ``euler`` / ``ddim`` samplers for every family. What the numbers *mean* differs:

- **VP** (SD1.x, SD2.x, SDXL; prediction types "eps" and "v"): ``x = x0 + sigma * n`` with ``n`` the Gaussian
  noise; ``eps`` is that noise; the model's input latent is ``z = x / sqrt(1 + sigma^2)``.
- **flow** (rectified flow: SD3/SD3.5, Flux; prediction type "flow"): ``x = (1 - t) x0 + t n`` with ``t = sigma``
  in [0, 1]; ``eps`` is the velocity ``v = n - x0``; the model's input latent is ``x`` itself.

Every function takes the denoiser's ``prediction_type`` ("eps", "v" or "flow"); an unknown one is a
``ValueError`` naming the accepted values. Noise levels are compared across families by signal-to-noise
ratio: ``SNR = 1 / sigma^2`` (VP) and ``((1 - t) / t)^2`` (flow), i.e. a flow level ``t`` is the VP level
``t / (1 - t)`` (``vp_sigma``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedule import vp_scale

#: Prediction types of VP models (predictions are converted to eps by the host) and of flow-matching models.
VP_TYPES = ("eps", "v")
FLOW = "flow"
PREDICTION_TYPES = VP_TYPES + (FLOW,)


def is_flow(prediction_type: str) -> bool:
    """True for flow-matching models ("flow"), False for VP ones ("eps", "v"); ``ValueError`` otherwise."""
    if prediction_type == FLOW:
        return True
    if prediction_type in VP_TYPES:
        return False
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def input_scale(sigma, prediction_type: str):
    """``c`` with model-input latent ``= c * x``: ``1 / sqrt(1 + sigma^2)`` (VP, ``sqrt(alpha_bar)``), 1 (flow)."""
    if is_flow(prediction_type):
        return sigma * 0 + 1 if isinstance(sigma, Tensor) else 1.0
    return vp_scale(sigma)


def signal_scale(sigma, prediction_type: str):
    """``a`` in ``x = a * x0 + sigma * n``: 1 (VP, sigma space), ``1 - sigma`` (flow)."""
    if is_flow(prediction_type):
        return 1.0 - sigma
    return sigma * 0 + 1 if isinstance(sigma, Tensor) else 1.0


def noise_level(sigma, prediction_type: str):
    """Standard deviation of the noise in the model-input latent: ``sigma / sqrt(1 + sigma^2)`` (VP,
    ``sqrt(1 - alpha_bar)``), ``sigma`` (flow)."""
    return sigma * input_scale(sigma, prediction_type)


def forward_noise(x0: Tensor, noise: Tensor, sigma, prediction_type: str) -> Tensor:
    """The latent at level ``sigma`` for clean ``x0`` and noise ``noise``: ``a * x0 + sigma * noise``.

    As ComfyUI's ``model_sampling.noise_scaling`` (EPS: ``x0 + sigma n``; CONST: ``(1 - sigma) x0 + sigma n``)."""
    return signal_scale(sigma, prediction_type) * x0 + sigma * noise


def implied_noise(x: Tensor, eps: Tensor, sigma, prediction_type: str) -> Tensor:
    """The Gaussian noise ``n`` a prediction implies: ``eps`` itself (VP), ``x + (1 - sigma) * v`` (flow:
    ``x = (1 - t) x0 + t n`` and ``v = n - x0`` give ``n = x + (1 - t) v``)."""
    if is_flow(prediction_type):
        return x + (1.0 - sigma) * eps
    return eps


def eps_from_noise(x: Tensor, noise: Tensor, sigma, prediction_type: str) -> Tensor:
    """Inverse of ``implied_noise`` at the same ``x``: ``noise`` (VP), ``(noise - x) / (1 - sigma)`` (flow;
    ``ValueError`` at sigma >= 1, where the noise is ``x`` and fixes no velocity)."""
    if is_flow(prediction_type):
        if float(sigma) >= 1.0:
            raise ValueError(f"the velocity cannot be recovered from the noise at sigma {float(sigma)} >= 1")
        return (noise - x) / (1.0 - sigma)
    return noise


def vp_sigma(sigma, prediction_type: str):
    """The VP sigma of the same signal-to-noise ratio: ``sigma`` (VP), ``t / (1 - t)`` (flow; inf at t = 1)."""
    if is_flow(prediction_type):
        if isinstance(sigma, Tensor):
            return sigma / (1.0 - sigma)
        return math.inf if sigma >= 1.0 else sigma / (1.0 - sigma)
    return sigma


def sigma_from_vp(vp: float, prediction_type: str) -> float:
    """Inverse of ``vp_sigma``: the model's level with the SNR of VP sigma ``vp`` (flow: ``vp / (1 + vp)``)."""
    if is_flow(prediction_type):
        return vp / (1.0 + vp)
    return vp


def renoise_coefficients(sigma_from: float, sigma_to: float, prediction_type: str) -> tuple[float, float]:
    """``(k, s)`` of the exact forward transition from level ``sigma_from`` up to ``sigma_to``:
    ``x_to = k * x_from + s * n`` with fresh noise ``n`` gives ``x_to = a(to) x0 + sigma_to * n'``.

    ``k = a(to) / a(from)``, ``s = sqrt(sigma_to^2 - k^2 sigma_from^2)``: VP ``(1, sqrt(to^2 - from^2))``; flow
    ``k = (1 - to) / (1 - from)``. ``ValueError`` when going down in noise."""
    sf, st = float(sigma_from), float(sigma_to)
    if st < sf:
        raise ValueError(f"renoise goes up in noise: sigma_to ({st}) < sigma_from ({sf})")
    k = float(signal_scale(st, prediction_type)) / float(signal_scale(sf, prediction_type))
    return k, math.sqrt(max(st * st - k * k * sf * sf, 0.0))


def renoise(
    x: Tensor,
    sigma_from: Tensor | float,
    sigma_to: Tensor | float,
    generator: torch.Generator,
    prediction_type: str = "eps",
) -> Tensor:
    """Exact forward transition from level ``sigma_from`` up to ``sigma_to`` (>= it): ``k x + s eps``.

    VP: ``x + sqrt(to^2 - from^2) * eps``, in VP terms ``z_to = sqrt(a_to / a_from) z_from + sqrt(1 - a_to / a_from)
    eps``: DiffuseIT's one-step re-noise between resampling iterations (docs/method.md §9; the original uses the
    respaced beta of the *next* index, an off-by-one; we use the exact transition). Flow: ``k = (1 - to) /
    (1 - from)``, ``s = sqrt(to^2 - k^2 from^2)`` (``parameterization.renoise_coefficients``). ``eps`` is drawn on
    the CPU from ``generator``.
    """
    k, s = renoise_coefficients(float(sigma_from), float(sigma_to), prediction_type)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return (x if k == 1.0 else k * x) + s * eps


def noise_blend(x: Tensor, x0: Tensor, sigma, prediction_type: str) -> Tensor:
    """DiffuseIT's noise-blended estimate ``f * x0 + (1 - f) * z`` (its ``--use_noise_aug_all``), with ``z`` the
    model-input latent and ``f`` its noise level (``noise_level``)."""
    f = noise_level(sigma, prediction_type)
    return f * x0 + (1 - f) * (input_scale(sigma, prediction_type) * x)


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` unchanged, or the ``ValueError`` of ``is_flow``."""
    is_flow(prediction_type)
    return prediction_type


__all__ = [
    "FLOW",
    "PREDICTION_TYPES",
    "VP_TYPES",
    "check_prediction_type",
    "eps_from_noise",
    "forward_noise",
    "implied_noise",
    "input_scale",
    "is_flow",
    "noise_blend",
    "noise_level",
    "renoise",
    "renoise_coefficients",
    "sigma_from_vp",
    "signal_scale",
    "vp_sigma",
]
