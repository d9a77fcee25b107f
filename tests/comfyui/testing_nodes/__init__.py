"""TEST-ONLY ComfyUI node pack: puts tiny seeded models and images into a graph, and captures results.

Loaded by the integration tests with ComfyUI's own ``nodes.load_custom_node`` (never shipped, never
installed). The tiny builders come from the sibling test modules ``tiny_models.py`` (UNets) and
``tiny_clip.py`` (CLIP, VAE), loaded by file path so this pack works whatever its import name.

- ``ZeroConTest_TinyCheckpoint``: MODEL, CLIP, VAE of a tiny SD1.5-, SDXL-, SD3- or Flux-dev-shaped model with its
  text encoders (like a checkpoint loader).
- ``ZeroConTest_TinyFlowCheckpoint``: MODEL and VAE of a tiny Flux (schnell- or dev-like), SD3 or Flux.2 Klein model.
- ``ZeroConTest_FlowConditioning``: a seeded fake Flux / SD3 CONDITIONING (optionally with Flux-dev's guidance).
- ``ZeroConTest_Image``: a seeded smooth random IMAGE batch.
- ``ZeroConTest_Capture``: an output node that stores whatever reaches it in ``CAPTURED[key]`` (in-process
  runs) and reports a JSON summary of it as its UI output (server runs: ``/history``).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from comfy_api.latest import ComfyExtension, io

_HERE = os.path.dirname(os.path.realpath(__file__))  # real path: the server test links this folder
CAPTURED: dict[str, object] = {}


def _sibling(name: str):
    """Import ``tests/comfyui/<name>.py`` once, as top-level ``name`` (the name pytest gives it too)."""
    path = os.path.join(os.path.dirname(_HERE), f"{name}.py")
    mod = sys.modules.get(name)
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "") or "") == path:
        return mod
    if os.path.dirname(_HERE) not in sys.path:
        sys.path.append(os.path.dirname(_HERE))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_CACHE: dict[tuple, tuple] = {}


def _schema(name: str, title: str, **fields) -> io.Schema:
    """The schema of the test node ``ZeroConTest_<name>`` ("ZeroCon Test <title>", category testing/zerocon)."""
    return io.Schema(
        node_id=f"ZeroConTest_{name}", display_name=f"ZeroCon Test {title}", category="testing/zerocon", **fields
    )


class TinyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "TinyCheckpoint",
            "Tiny Checkpoint",
            inputs=[
                io.Combo.Input(
                    "kind", options=["sd15", "sdxl", "sd3", "flux_dev"], default="sd15", tooltip="Model family shape."
                ),
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed of the random weights."),
            ],
            outputs=[io.Model.Output("model_out"), io.Clip.Output("clip_out"), io.Vae.Output("vae_out")],
        )

    @classmethod
    def execute(cls, kind, seed):
        key = (kind, seed)
        if key not in _CACHE:
            tiny_models = _sibling("tiny_models")
            tiny_clip = _sibling("tiny_clip")
            if kind == "sd3":  # the tiny SD3 CLIP: 4096-wide joint sequence, pooled CLIP-L 32 + CLIP-G 32
                parts = (tiny_models.sd3(seed, context_dim=4096, pooled_dim=64), tiny_clip.sd3_clip(seed=seed))
                _CACHE[key] = (*parts, tiny_models.flow_vae(seed))
            elif kind == "flux_dev":  # the tiny Flux CLIP: 4096-wide T5 sequence, CLIP-L pooled 32
                parts = (tiny_models.flux_dev(seed, context_dim=4096, pooled_dim=32), tiny_clip.flux_clip(seed))
                _CACHE[key] = (*parts, tiny_models.flow_vae(seed))
            else:
                model = tiny_models.sd15(seed) if kind == "sd15" else tiny_models.sdxl(seed)
                clip = tiny_clip.clip("sd1" if kind == "sd15" else "sdxl", seed)
                _CACHE[key] = (model, clip, tiny_clip.vae(seed))
        return io.NodeOutput(*_CACHE[key])


class TinyFlowCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "TinyFlowCheckpoint",
            "Tiny Flow Checkpoint",
            inputs=[
                io.Combo.Input(
                    "kind", options=["flux", "flux_dev", "sd3", "flux2"], default="flux", tooltip="Model family."
                ),
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed of the random weights."),
            ],
            outputs=[io.Model.Output("model_out"), io.Vae.Output("vae_out")],
        )

    @classmethod
    def execute(cls, kind, seed):
        key = ("flow", kind, seed)
        if key not in _CACHE:
            tiny_models, families = _sibling("tiny_models"), _sibling("tiny_families")
            if kind == "flux2":  # Flux.2 Klein: 128-channel latents at 16x, its own VAE
                _CACHE[key] = (families.flux2(seed, klein=True), families.flux2_vae(seed))
            else:
                build = {"flux": tiny_models.flux, "flux_dev": tiny_models.flux_dev, "sd3": tiny_models.sd3}[kind]
                _CACHE[key] = (build(seed), tiny_models.flow_vae(seed))
        return io.NodeOutput(*_CACHE[key])


class FlowConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "FlowConditioning",
            "Flow Conditioning",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=100.0, tooltip="Flux-dev guidance; 0 = none."),
            ],
            outputs=[io.Conditioning.Output("conditioning")],
        )

    @classmethod
    def execute(cls, seed, guidance):
        cond = _sibling("tiny_models").flow_conditioning(seed, guidance=guidance or None)
        return io.NodeOutput(cond)


class TestImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "Image",
            "Image",
            inputs=[
                io.Int.Input("width", default=64, min=8, max=1024, tooltip="Width."),
                io.Int.Input("height", default=64, min=8, max=1024, tooltip="Height."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Images."),
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed."),
            ],
            outputs=[io.Image.Output("image")],
        )

    @classmethod
    def execute(cls, width, height, batch_size, seed):
        gen = torch.Generator().manual_seed(seed)
        low = torch.rand(batch_size, 3, max(height // 8, 1), max(width // 8, 1), generator=gen)
        img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        return io.NodeOutput(img.permute(0, 2, 3, 1).contiguous().clamp(0, 1))


class Capture(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "Capture",
            "Capture",
            is_output_node=True,
            is_input_list=True,
            inputs=[
                io.AnyType.Input("value", tooltip="Anything."),
                io.String.Input("key", default="out", tooltip="Where to store it in CAPTURED."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, value, key):
        CAPTURED[key[0]] = value if len(value) > 1 else value[0]
        return io.NodeOutput(ui={"zerocon_capture": [{"key": key[0], "items": [summary(v) for v in value]}]})


def summary(value) -> dict:
    """A JSON-able description of a captured value."""
    if isinstance(value, dict) and "samples" in value:
        value = value["samples"]
    if isinstance(value, torch.Tensor):
        v = value.detach().float()
        return {
            "type": "tensor",
            "shape": list(v.shape),
            "finite": bool(torch.isfinite(v).all()),
            "min": float(v.min()),
            "max": float(v.max()),
            "mean": float(v.mean()),
            "std": float(v.std()),
        }
    if isinstance(value, str):
        return {"type": "str", "text": value}
    return {"type": type(value).__name__}


class TestingExtension(ComfyExtension):
    async def get_node_list(self):
        return [TinyCheckpoint, TinyFlowCheckpoint, FlowConditioning, TestImage, Capture]


async def comfy_entrypoint():
    return TestingExtension()
