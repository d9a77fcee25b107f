"""Whole graphs on tiny Flux (schnell- and dev-like), SD3 and Flux.2 Klein models through ComfyUI's own executor, in-process
(as ``test_graph.py``): image -> VAE Encode (16-channel; Flux.2's 128-channel) -> ZeroCon DDIM Inversion -> ZeroCon Guided Sampler ->
VAE Decode, and image -> VAE Encode -> DINO Structure Guidance -> ZeroCon DiffuseIT Sampler -> VAE Decode.

The models and their conditionings enter through the TEST-ONLY pack (``ZeroConTest_TinyFlowCheckpoint``,
``ZeroConTest_FlowConditioning``: Flux / SD3 text encoders are not part of this test). No guidance terms that need
attention captures: those come with the DiT captures; the DINO terms need none.
"""

from __future__ import annotations

import pytest
import torch
from test_diffuseit_graph import DINO_NAME, _structure, graph_env  # noqa: F401  (fixture: both packs, a tiny DINO, PNGs)
from test_graph import execute_in_process, guided_sampler_node, inversion_node

SIZE = 64  # pixels; latent 8 x 8 x 16
GUIDANCE = {"flux": 0.0, "flux_dev": 3.5, "sd3": 0.0, "flux2": 0.0}
CFG = {"flux": 1.0, "flux_dev": 1.0, "sd3": 4.0, "flux2": 2.0}
#: Latent channels and pixels per latent cell of each kind's VAE (Flux.2: 128 at 16x).
LATENT = {"flux": (16, 8), "flux_dev": (16, 8), "sd3": (16, 8), "flux2": (128, 16)}


def _has_flux2() -> bool:
    import tiny_families

    return tiny_families.has_flux2()


FLUX2 = pytest.param("flux2", marks=pytest.mark.skipif(not _has_flux2(), reason="this ComfyUI has no Flux.2"))


def _base(kind: str) -> dict:
    return {
        "ckpt": {"class_type": "ZeroConTest_TinyFlowCheckpoint", "inputs": {"kind": kind, "seed": 0}},
        "image": {"class_type": "LoadImage", "inputs": {"image": "source.png"}},
        "latent": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 1]}},
        "source": {"class_type": "ZeroConTest_FlowConditioning", "inputs": {"seed": 1, "guidance": GUIDANCE[kind]}},
        "edited": {"class_type": "ZeroConTest_FlowConditioning", "inputs": {"seed": 2, "guidance": GUIDANCE[kind]}},
    }


def _capture(graph: dict, node: str, output: int, key: str) -> None:
    graph[f"decode_{key}"] = {"class_type": "VAEDecode", "inputs": {"samples": [node, output], "vae": ["ckpt", 1]}}
    graph[f"cap_{key}"] = {"class_type": "ZeroConTest_Capture", "inputs": {"value": [f"decode_{key}", 0], "key": key}}
    graph[f"cap_{key}_latent"] = {
        "class_type": "ZeroConTest_Capture",
        "inputs": {"value": [node, output], "key": f"{key}_latent"},
    }


def inversion_graph(kind: str) -> dict:
    g = _base(kind)
    # no regulariser: on 8 x 8 latents its steps are far larger than at real sizes
    g["invert"] = inversion_node(3, regularize=False)
    g["sample"] = guided_sampler_node(CFG[kind])
    _capture(g, "sample", 0, "edit")
    _capture(g, "sample", 1, "reconstruction")
    g["cap_x_t"] = {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["invert", 0], "key": "x_t"}}
    return g


def diffuseit_graph(kind: str, weight: float = 1.0) -> dict:
    g = _base(kind)
    g["dino"] = {
        "class_type": "ZeroConDINOLoader",
        "inputs": {"model": DINO_NAME, "precision": "fp32", "device": "cpu", "allow_download": False},
    }
    g["structure"] = _structure("image", weight=weight, vae=["ckpt", 1])
    g["sample"] = {
        "class_type": "ZeroConDiffuseITSampler",
        "inputs": {
            "model": ["ckpt", 0],
            "positive": ["edited", 0],
            "negative": ["source", 0],
            "latent": ["latent", 0],
            "guidance": ["structure", 0],
            "steps": 6,
            "cfg": CFG[kind],
            "strength": -1.0,
            "resample": 2,
            "seed": 3,
            "step_mode": "raw",
            "step_size": 0.02,
        },
    }
    _capture(g, "sample", 0, "edit")
    return g


@pytest.mark.parametrize("kind", ["flux", "flux_dev", "sd3", FLUX2])
def test_inversion_and_guided_sampler_graph(graph_env, kind):  # noqa: F811
    captured = graph_env
    captured.clear()
    execute_in_process(inversion_graph(kind))
    edit, recon = captured["edit"], captured["reconstruction"]
    assert edit.shape == recon.shape == (1, SIZE, SIZE, 3)
    assert torch.isfinite(edit).all() and edit.min() >= 0 and edit.max() <= 1
    x_t = captured["x_t"]["samples"]
    channels, scale = LATENT[kind]
    assert x_t.shape == (1, channels, SIZE // scale, SIZE // scale) and torch.isfinite(x_t).all()
    z, z_ref = captured["edit_latent"]["samples"], captured["reconstruction_latent"]["samples"]
    assert float((z - z_ref).abs().max()) > 1e-3  # the edited conditioning changed something


@pytest.mark.parametrize("kind", ["flux", "sd3", FLUX2])
def test_diffuseit_graph(graph_env, kind):  # noqa: F811
    captured = graph_env
    captured.clear()
    execute_in_process(diffuseit_graph(kind))
    edit, z = captured["edit"], captured["edit_latent"]["samples"]
    execute_in_process(diffuseit_graph(kind, weight=0.0))
    z0 = captured["edit_latent"]["samples"]
    assert edit.shape == (1, SIZE, SIZE, 3) and torch.isfinite(edit).all()
    channels, scale = LATENT[kind]
    assert z.shape == z0.shape == (1, channels, SIZE // scale, SIZE // scale)
    assert float((z - z0).abs().max()) > 1e-4, "DINO guidance did not move the latent"
