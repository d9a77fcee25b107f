"""ComfyUI entry point of ComfyUI-ZeroCon (V3 node schema).

ComfyUI imports this folder as a package under a path-derived name and calls ``comfy_entrypoint``.
Importing this module only checks ComfyUI's version (``nodes/glue/compat.py``: one error line in ComfyUI's
log on a too-old ComfyUI, instead of a stack trace); no ComfyUI, torch or transformers import happens until
ComfyUI calls the entry point, and every node module is imported there under its own guard, so a
missing optional dependency disables only the nodes that need it (logged on the ``zerocon`` logger).

Only relative imports are used: ComfyUI has its own top-level ``nodes`` module, so this pack's
``nodes/`` package is never imported as ``nodes``. There is deliberately no ``NODE_CLASS_MAPPINGS``
here (ComfyUI would then ignore the V3 entry point). ``WEB_DIRECTORY`` holds the one frontend script: it shows
a node's text result (``ui.PreviewText``: captions, metric summaries, "saved ..." messages) on the node.
"""

WEB_DIRECTORY = "./web"

if __package__:  # ComfyUI imports the folder as a package; pytest may import this file on its own
    from .nodes.glue.compat import log_if_unsupported as _zerocon_supported

    _zerocon_supported()  # an old ComfyUI never calls comfy_entrypoint: say why in its log (one error line)


async def comfy_entrypoint():
    """Return the pack's ``ComfyExtension`` (called by ComfyUI's ``nodes.load_custom_node``)."""
    from comfy_api.latest import ComfyExtension

    from .nodes import collect_nodes
    from .nodes.glue.compat import log_if_unsupported as _zerocon_supported

    class ZeroConExtension(ComfyExtension):
        async def get_node_list(self):
            return collect_nodes() if _zerocon_supported() else []

    return ZeroConExtension()
