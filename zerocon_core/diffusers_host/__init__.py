"""The command line's host: diffusers model loading, the core's Denoiser over a diffusers UNet, the
pix2pix-zeroCon pipeline and the CLI. The top layer: nothing in the core imports it.
"""
