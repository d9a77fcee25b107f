"""ComfyUI adapters of ComfyUI-ZeroCon (the only code in the pack that imports ``comfy`` / ``folder_paths``).

Folders: ``glue/`` (ComfyUI glue: paths, loaders, inputs, progress, the gradient-pass capture), ``families/``
(one adapter per model family, and the core's Denoiser over a ComfyUI model) and ``classes/`` (the node
classes). Imports go only that way: classes -> families -> glue.

Every ``classes/*_nodes.py`` module exports ``NODES: list[type[io.ComfyNode]]``. ``collect_nodes`` imports each
one under its own guard, so one broken or optional module (missing dependency, older ComfyUI) costs
only its own nodes and leaves a warning on the ``zerocon`` logger instead of an "IMPORT FAILED" for
the whole pack.
"""

from __future__ import annotations

import importlib
import logging

from ..zerocon_core.common import moved as _moved

logger = logging.getLogger("zerocon")

#: Modules that moved into folders: the old path (``nodes.sampling_nodes``) still imports the same module.
MOVED = {
    "compat": "glue.compat",
    "paths": "glue.paths",
    "progress": "glue.progress",
    "loaders": "glue.loaders",
    "inputs": "glue.inputs",
    "grad_paths": "glue.grad_paths",
    "weights": "glue.weights",
    "dit_capture": "glue.dit_capture",
    "joint_capture": "glue.joint_capture",
    "comfy_denoiser": "families.comfy_denoiser",
    "blip_nodes": "classes.blip_nodes",
    "diffuseit_nodes": "classes.diffuseit_nodes",
    "dino_nodes": "classes.dino_nodes",
    "direction_nodes": "classes.direction_nodes",
    "guidance_nodes": "classes.guidance_nodes",
    "metrics_nodes": "classes.metrics_nodes",
    "prompt_nodes": "classes.prompt_nodes",
    "sampling_nodes": "classes.sampling_nodes",
}

_moved.install(__name__, MOVED)
__getattr__ = _moved.old_attribute(__name__, MOVED)

# Node modules in menu order (in nodes/classes/). tests/comfyui/test_registration.py checks that every one is listed.
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
        qualified = f"{__name__}.classes.{name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            if exc.name == qualified:  # the module is not part of this install
                logger.debug("ZeroCon: no module nodes/classes/%s.py", name)
            else:
                logger.warning(
                    "ZeroCon: nodes/classes/%s.py not loaded, missing dependency %r: %s", name, exc.name, exc
                )
            continue
        except Exception:
            logger.warning(
                "ZeroCon: nodes/classes/%s.py failed to import; its nodes are unavailable", name, exc_info=True
            )
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
