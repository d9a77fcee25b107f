"""DiffuseIT (Kwon & Ye, ICLR 2023): DINO-ViT structure and style terms, the semantic-divergence and range
terms, its noised start and first-step resampling, and its sampler. Imports ``common`` and ``method``.

The names of the former ``zerocon_core.diffuseit`` module (now ``diffuseit.guidance``) are still readable
here, looked up on first use.
"""

import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    guidance = importlib.import_module(f"{__name__}.guidance")
    try:
        return getattr(guidance, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
