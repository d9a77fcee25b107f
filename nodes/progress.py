"""Progress bar, latent previews and interrupts for the ZeroCon samplers.

The engine reports steps through plain callbacks; ComfyUI's samplers report through k-diffusion's
callback dict, which ``KSAMPLER`` turns into the guider's ``callback(step, x0, x, total)`` (the one
``latent_preview.prepare_callback`` builds: progress bar + preview image). These adapters connect the two.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def node_callback(model, steps: int, x0_output: dict | None = None):
    """ComfyUI's standard sampling callback for a node: progress bar over ``steps`` plus latent previews."""
    import latent_preview

    return latent_preview.prepare_callback(model, steps, x0_output)


def progress_enabled() -> bool:
    """False when ComfyUI runs with its progress bars disabled."""
    import comfy.utils

    return bool(getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True))


def sampling_callback(k_callback, sigmas: Tensor) -> Callable[[int, int, Tensor, Tensor], None] | None:
    """Adapt the engine's ``callback(i, n, x, x0)`` to a k-diffusion callback (a dict per step)."""
    if k_callback is None:
        return None

    def callback(i: int, n: int, x: Tensor, x0: Tensor) -> None:
        k_callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})

    return callback


def inversion_callback(k_callback, sigmas: Tensor) -> Callable[[int, int, Tensor], None] | None:
    """Adapt ``ddim_invert``'s ``callback(i, n, x)``; the preview shows the latent being inverted, at unit
    scale (``x / sqrt(1 + sigma^2)``, what a VP sampler would hold) so that it does not saturate."""
    if k_callback is None:
        return None

    def callback(i: int, n: int, x: Tensor) -> None:
        s = sigmas[i + 1]
        k_callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": x / (1.0 + s * s).sqrt()})

    return callback


def check_interrupt() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
