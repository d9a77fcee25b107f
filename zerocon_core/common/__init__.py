"""Plumbing every part uses: the ``zerocon`` logger, the model folders, image files and VAE latents,
and the old import paths of moved modules.
"""
