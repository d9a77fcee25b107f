"""Real-browser end-to-end tests of the shipped workflows (tests/comfyui/test_browser_workflows.py) and tools.

- ``comfy_server``: start / stop a real ComfyUI (``main.py --cpu``, 127.0.0.1, temp base directory).
- ``frontend`` + ``page.js``: drive ComfyUI's frontend in Debian's headless Chromium with Playwright.
- ``checkpoints`` / ``model_files``: random-weight checkpoints ComfyUI detects as SD1.5 / SDXL, tiny BLIP / DINO /
  CLIP-metric folders, all cached outside the repository.
- ``harness``: the session and one workflow run; ``roundtrip``: graph comparison.
- ``workflow_specs`` + ``build_workflows``: the shipped example_workflows/*.json, built in the real frontend (by hand),
  laid out from the nodes' sizes measured on every frontend and renderer given (classic canvas, Vue "Nodes 2.0").
- ``render_docs``: docs/workflows/*.png and example_workflows/*.jpg thumbnails (by hand).

Scripts run from the repository root with ComfyUI's Python, e.g.
``~/venvs/comfy/bin/python tests/comfyui/browser/render_docs.py``.
"""
