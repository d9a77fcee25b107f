"""Progress bars, latent previews and interrupts for the ZeroCon nodes.

The engine reports steps through plain callbacks; ComfyUI's samplers report through k-diffusion's
callback dict, which ``KSAMPLER`` turns into the guider's ``callback(step, x0, x, total)`` (the one
``latent_preview.prepare_callback`` builds: UI progress bar + preview image). These adapters connect the two
and add the console bar (tqdm, as k-diffusion's samplers print for the stock KSampler), which ComfyUI leaves
to the sampler function. ``WorkProgress`` does the same for work that is not sampling (encoding sentences).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

CONSOLE_SAMPLING = "ZeroCon sampling"
CONSOLE_INVERSION = "ZeroCon inversion"


def node_callback(model, steps: int, x0_output: dict | None = None):
    """ComfyUI's standard sampling callback for a node: progress bar over ``steps`` plus latent previews."""
    import latent_preview

    return latent_preview.prepare_callback(model, steps, x0_output)


def progress_enabled() -> bool:
    """False when ComfyUI runs with its progress bars disabled."""
    import comfy.utils

    return bool(getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True))


def console_enabled(disable: bool | None = None) -> bool:
    """Whether to print a console bar: ``not disable``, or ComfyUI's setting when ``disable`` is None."""
    return progress_enabled() if disable is None else not disable


def console_bar(total: int, desc: str, unit: str = "it", disable: bool | None = None):
    """A tqdm console bar over ``total`` units, or None when progress bars are off (``disable``, or ComfyUI's
    ``--disable-progress-bars`` when ``disable`` is None)."""
    if not console_enabled(disable):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=True)


class ConsoleSteps:
    """The console bar of a step loop: ``step(i, n)`` after step ``i`` of ``n`` (0-based); the bar opens at the
    first step and closes after the last (a repeated step, as in DiffuseIT's resampling, does not advance it)."""

    def __init__(self, desc: str, disable: bool | None = None):
        self.desc, self.disable, self.bar = desc, disable, None

    def step(self, i: int, n: int) -> None:
        if self.bar is None:
            self.bar = console_bar(n, self.desc, disable=self.disable)
            if self.bar is None:
                self.disable = True
                return
        self.bar.update(max(0, i + 1 - self.bar.n))
        if i + 1 >= n:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def sampling_callback(
    k_callback, sigmas: Tensor, disable: bool | None = None, desc: str = CONSOLE_SAMPLING
) -> Callable[[int, int, Tensor, Tensor], None] | None:
    """Adapt the engine's ``callback(i, n, x, x0)`` to a k-diffusion callback (a dict per step), and print the
    console bar (``disable``: KSAMPLER's flag; None: ComfyUI's setting). None when there is nothing to do."""
    if k_callback is None and not console_enabled(disable):
        return None
    console = ConsoleSteps(desc, disable)

    def callback(i: int, n: int, x: Tensor, x0: Tensor) -> None:
        if k_callback is not None:
            k_callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
        console.step(i, n)

    return callback


def inversion_callback(
    k_callback, sigmas: Tensor, disable: bool | None = None, desc: str = CONSOLE_INVERSION
) -> Callable[[int, int, Tensor], None] | None:
    """Adapt ``ddim_invert``'s ``callback(i, n, x)``; the preview shows the latent being inverted, at unit
    scale (``x / sqrt(1 + sigma^2)``, what a VP sampler would hold) so that it does not saturate. Prints the
    console bar as ``sampling_callback`` does."""
    if k_callback is None and not console_enabled(disable):
        return None
    console = ConsoleSteps(desc, disable)

    def callback(i: int, n: int, x: Tensor) -> None:
        if k_callback is not None:
            s = sigmas[i + 1]
            k_callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": x / (1.0 + s * s).sqrt()})
        console.step(i, n)

    return callback


class WorkProgress:
    """``progress(done, total)`` for work counted in units (sentences...): ComfyUI's progress bar on the running
    node (``comfy.utils.ProgressBar``), a console bar, and a Cancel check at every update (raises ComfyUI's
    ``InterruptProcessingException``). Use as a context manager so that the console bar is closed."""

    def __init__(self, desc: str, unit: str = "it"):
        self.desc, self.unit = desc, unit
        self.ui = None
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        import comfy.utils

        check_interrupt()
        if self.ui is None:
            self.ui = comfy.utils.ProgressBar(total)
            self.bar = console_bar(total, self.desc, self.unit) if total > 0 else None
        self.ui.update_absolute(done, total)
        if self.bar is not None:
            self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "WorkProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_interrupt() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
