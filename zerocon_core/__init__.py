"""ZeroCon engine: training-free image translation (pix2pix-zeroCon, DiffuseIT) on Stable Diffusion.

Host-independent: depends on torch (and lazily on transformers / diffusers), never on ComfyUI.
Conventions used throughout (k-diffusion's): latents live in *sigma space*, ``x = x0 + sigma * eps``,
where ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``. A VP ("diffusers") latent ``z`` at the same level is
``z = x / sqrt(1 + sigma**2)``. DDIM with eta = 0 is then an Euler step: ``x' = x + (sigma' - sigma) * eps``.
Flow-matching models (SD3, Flux) use the same space with ``x = (1 - sigma) x0 + sigma * noise``: ``eps`` is then
the velocity and the same step is the flow ODE's Euler step (``parameterization`` holds what differs).
"""

__version__ = "0.1.0"
