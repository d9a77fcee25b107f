"""ComfyUI adapters of ComfyUI-ZeroCon (the only code in the pack that imports ``comfy`` / ``folder_paths``).

Every ``*_nodes.py`` module exports ``NODES: list[type[io.ComfyNode]]``. ``collect_nodes`` imports each
one under its own guard, so one broken or optional module (missing dependency, older ComfyUI) costs
only its own nodes and leaves a warning on the ``zerocon`` logger instead of an "IMPORT FAILED" for
the whole pack.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger("zerocon")

# Node modules in menu order. tests/comfyui/test_registration.py checks that every nodes/*_nodes.py is listed.
NODE_MODULES = (
    "blip_nodes",
    "prompt_nodes",
    "direction_nodes",
    "sampling_nodes",
    "guidance_nodes",
    "dino_nodes",
    "diffuseit_nodes",
    "metrics_nodes",
)


def collect_nodes() -> list:
    """The node classes of every node module that imports; failures are logged, not raised."""
    found: list = []
    seen: dict[str, str] = {}
    for name in NODE_MODULES:
        qualified = f"{__name__}.{name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            if exc.name == qualified:  # the module is not part of this install
                logger.debug("ZeroCon: no module nodes/%s.py", name)
            else:
                logger.warning("ZeroCon: nodes/%s.py not loaded, missing dependency %r: %s", name, exc.name, exc)
            continue
        except Exception:
            logger.warning("ZeroCon: nodes/%s.py failed to import; its nodes are unavailable", name, exc_info=True)
            continue
        for node in getattr(module, "NODES", ()):
            try:
                node_id = node.GET_SCHEMA().node_id
            except Exception:
                logger.warning(
                    "ZeroCon: %s.%s has an invalid schema; skipped",
                    name,
                    getattr(node, "__name__", node),
                    exc_info=True,
                )
                continue
            if node_id in seen:
                logger.warning(
                    "ZeroCon: node id %s defined in both %s and %s; keeping the first", node_id, seen[node_id], name
                )
                continue
            seen[node_id] = name
            found.append(node)
    logger.info("ZeroCon: %d nodes registered", len(found))
    return found
