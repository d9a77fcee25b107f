"""Top-level test configuration.

``tests/core`` runs in the pack's own environment (CPU torch, no ComfyUI). ``tests/comfyui`` needs a
ComfyUI checkout and ComfyUI's environment (its torch + torchvision): it is collected only when pytest
runs inside that environment with ``ZEROCON_IN_COMFYUI=1``; from the pack's environment
``tests/test_comfyui_integration.py`` launches it in a subprocess (or skips, saying why).
"""

import os

collect_ignore = [] if os.environ.get("ZEROCON_IN_COMFYUI") == "1" else ["comfyui"]
