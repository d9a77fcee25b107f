"""Which ComfyUI versions ComfyUI-ZeroCon runs on, and a clear message on the others.

The nodes use ComfyUI's V3 node API (``comfy_api.latest``: ``io.ComfyNode``, ``io.Custom``, ``ui.PreviewText``,
the ``comfy_entrypoint`` / ``ComfyExtension`` registration; ComfyUI 0.3.48 and later) and, for gradients through
attention layers whose kernels have no backward, ``comfy.ldm.modules.attention.wrap_attn`` with the
``optimized_attention_override`` transformer option (ComfyUI 0.3.60 and later). The supported range is what CI
tests: ComfyUI 0.3.64 and 0.33.0 (versions between and after are handled by feature detection, not version
numbers). ``MIN_COMFYUI`` must equal ``requires-comfyui`` in pyproject.toml (a test checks it).

On an older ComfyUI the pack is not loaded the way it expects: before 0.3.48 ComfyUI never calls
``comfy_entrypoint`` and only says "Skip ... due to the lack of NODE_CLASS_MAPPINGS"; a workflow then shows the
frontend's missing-nodes dialog with no reason. ``log_if_unsupported()`` (called when the pack is imported and
again from the entry point) puts the reason in ComfyUI's log as one error line, without a stack trace.

This module imports nothing from ComfyUI at import time and nothing heavy ever (``comfyui_version`` is a one-line
module at the ComfyUI root; ``comfy_api`` is only looked up with ``importlib.util.find_spec``).
"""

from __future__ import annotations

import importlib.util
import logging
import re

logger = logging.getLogger("zerocon")

MIN_COMFYUI = (0, 3, 64)
MIN_COMFYUI_TEXT = ".".join(map(str, MIN_COMFYUI))
UPDATE_HINT = "update ComfyUI (git pull in the ComfyUI folder, or ComfyUI-Manager > Update ComfyUI) and restart it"


def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """``"0.3.64"`` / ``"v0.3.58"`` / ``"0.3.65-dev+abc"`` -> ``(0, 3, 64)``...; None when not a version."""
    if not text:
        return None
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def comfyui_version() -> str | None:
    """The running ComfyUI's version string (``comfyui_version.__version__``), or None when it has none."""
    try:
        import comfyui_version  # a one-line module at the ComfyUI root (0.3.x)

        return str(getattr(comfyui_version, "__version__", "")) or None
    except Exception:  # noqa: BLE001 - not inside ComfyUI, or a very old one
        return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def problem(version: str | None = None, has_v3_api: bool | None = None) -> str | None:
    """Why this ComfyUI cannot run ZeroCon (None when it can). Arguments default to the running ComfyUI."""
    if version is None and has_v3_api is None and not _has_module("comfy"):
        return None  # not inside ComfyUI (the library, the tests): nothing to check
    if version is None:
        version = comfyui_version()
    if has_v3_api is None:
        has_v3_api = _has_module("comfy_api.latest")
    parsed = parse_version(version)
    if parsed is not None and parsed < MIN_COMFYUI:
        return (
            f"ComfyUI-ZeroCon needs ComfyUI >= {MIN_COMFYUI_TEXT}, but this ComfyUI is {version}: {UPDATE_HINT}. "
            "The ZeroCon nodes are not loaded (workflows using them show them as missing)."
        )
    if not has_v3_api:
        found = f" (this ComfyUI is {version})" if version else ""
        return (
            f"ComfyUI-ZeroCon needs ComfyUI >= {MIN_COMFYUI_TEXT} with the V3 node API (comfy_api.latest), which "
            f"this ComfyUI does not have{found}: {UPDATE_HINT}. The ZeroCon nodes are not loaded."
        )
    return None


_logged = False


def log_if_unsupported() -> bool:
    """Log the reason once at ERROR level (no stack trace) if this ComfyUI is unsupported; True if supported."""
    global _logged
    why = problem()
    if why is None:
        return True
    if not _logged:
        logger.error("%s", why)
        _logged = True
    return False
