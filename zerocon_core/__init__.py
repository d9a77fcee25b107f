"""ZeroCon engine: training-free image translation (pix2pix-zeroCon, DiffuseIT) on Stable Diffusion.

Host-independent: depends on torch (and lazily on transformers / diffusers), never on ComfyUI.
Conventions used throughout (k-diffusion's): latents live in *sigma space*, ``x = x0 + sigma * eps``,
where ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``. A VP ("diffusers") latent ``z`` at the same level is
``z = x / sqrt(1 + sigma**2)``. DDIM with eta = 0 is then an Euler step: ``x' = x + (sigma' - sigma) * eps``.
Flow-matching models (SD3, Flux) use the same space with ``x = (1 - sigma) x0 + sigma * noise``: ``eps`` is then
the velocity and the same step is the flow ODE's Euler step (``parameterization`` holds what differs).
"""

__version__ = "0.1.0"

from .common import moved as _moved

#: Modules that moved into folders (0.1.0 -> now): the old path still imports the same module.
MOVED = {
    "log": "common.log",
    "model_folders": "common.model_folders",
    "images": "common.images",
    "denoiser": "method.denoiser",
    "schedule": "method.schedule",
    "parameterization": "method.parameterization",
    "losses": "method.losses",
    "guidance": "method.guidance",
    "replay": "method.replay",
    "inversion": "method.inversion",
    "sampler": "method.sampler",
    "auto_weights": "method.auto_weights",
    "diagnostics": "method.diagnostics",
    "direction": "text.direction",
    "text_layout": "text.text_layout",
    "prompts": "text.prompts",
    "captioning": "text.captioning",
    "diffuseit_losses": "diffuseit.losses",
    "diffuseit_start": "diffuseit.start",
    "dino": "diffuseit.dino",
    "metrics": "evaluation.metrics",
    "piebench": "evaluation.piebench",
    "lpips": "evaluation.lpips",
    "evaluate": "evaluation.evaluate",
    "sd_models": "diffusers_host.sd_models",
    "denoiser_diffusers": "diffusers_host.denoiser",
    "pipeline": "diffusers_host.pipeline",
    "cli": "diffusers_host.cli",
}
_moved.install(__name__, MOVED)
__getattr__ = _moved.old_attribute(__name__, MOVED)
