"""Whole DiffuseIT graphs run through ComfyUI's own executor, in-process (as ``test_graph.py``).

- image-guided: LoadImage (source, reference) + tiny SD1.5-shaped checkpoint -> VAE Encode -> ZeroCon DINO
  Loader (a tiny random DINO written to a temporary models/dino/<name>) -> DINO Structure + DINO Style
  Guidance (reference IMAGE) -> DiffuseIT Sampler -> VAE Decode;
- text-guided: the target prompt (CLIP Text Encode) conditions the sampler, DINO Structure Guidance only,
  decoding with the cheap tiny decoder: stock Load VAE "taesd" (random TAESD weights written to a temporary
  models/vae_approx) while VAE Encode / Decode use the checkpoint's VAE;
- references of other sizes and aspect ratios than the source (and a structure image larger than the
  encoded one) are accepted: the terms resize them.

Each graph also samples once with the guidance weight at 0 (same seed, same start), so the tests can tell
that the DINO losses moved the result. The node-level behaviour (errors, weights left untouched, seeding,
composition with the ZeroCon Guided Sampler) is in ``test_diffuseit_nodes.py``; this file checks that the
nodes work as a graph: validation, ComfyUI's IMAGE/LATENT/VAE links, its caching and inference mode.
Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import copy
import sys

import pytest
import torch
from conftest import REPO
from test_graph import TESTING_NODES, execute_in_process
from test_metrics_node import save_tiny_dino

SIZE = 64  # pixels; latent 8 x 8 with the tiny 8x VAE
DINO_NAME = "tiny-dino"
#: PNGs written to the temporary input directory: name -> (width, height, seed).
IMAGES = {
    "source.png": (SIZE, SIZE, 1),
    "reference.png": (SIZE, SIZE, 2),
    "reference_small.png": (56, 40, 3),
    "reference_large.png": (128, 96, 4),
    "source_large.png": (2 * SIZE, 2 * SIZE, 1),
}


def _save_random_taesd(folder, seed: int = 0) -> None:
    """taesd_encoder / taesd_decoder .safetensors of ComfyUI's TAESD with seeded random weights (its layers
    are created uninitialised), where Load VAE lists them as "taesd"."""
    import comfy.taesd.taesd
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        model = comfy.taesd.taesd.TAESD()
        for p in model.parameters():
            if p.ndim > 1:  # He init: fan-in = in channels x kernel
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.zero_()
        for part in ("encoder", "decoder"):
            sd = {k: v.contiguous() for k, v in getattr(model, f"taesd_{part}").state_dict().items()}
            save_file(sd, str(folder / f"taesd_{part}.safetensors"))


def _write_png(path, width: int, height: int, seed: int) -> None:
    """A smooth seeded RGB image (the large source is the same pattern as ``source.png``, upscaled)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=gen)
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    arr = (img[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def graph_env(tmp_path_factory):
    """Both node packs loaded, a tiny DINO in a temporary models/dino, PNGs in a temporary input directory;
    yields the capture dict of the test-only pack. ComfyUI's folder settings are restored afterwards."""
    import folder_paths

    import nodes as comfy_nodes

    assert asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
    assert asyncio.run(comfy_nodes.load_custom_node(str(TESTING_NODES)))
    base = tmp_path_factory.mktemp("diffuseit_graph")
    save_tiny_dino(base / "models" / "dino" / DINO_NAME)
    _save_random_taesd(base / "models" / "vae_approx")
    (base / "input").mkdir()
    for name, (w, h, seed) in IMAGES.items():
        _write_png(base / "input" / name, w, h, seed)
    saved = {k: copy.deepcopy(folder_paths.folder_names_and_paths[k]) for k in ("dino", "vae_approx")}
    saved_input = folder_paths.get_input_directory()
    for key in saved:
        folder_paths.add_model_folder_path(key, str(base / "models" / key), is_default=True)
    folder_paths.filename_list_cache.clear()
    folder_paths.set_input_directory(str(base / "input"))
    capture_cls = comfy_nodes.NODE_CLASS_MAPPINGS["ZeroConTest_Capture"]
    try:
        yield sys.modules[capture_cls.__module__].CAPTURED
    finally:
        folder_paths.folder_names_and_paths.update(saved)
        folder_paths.set_input_directory(saved_input)
        folder_paths.filename_list_cache.clear()


def _sampler(latent, guidance, steps: int = 6, strength: float = 0.5, resample: int = 2, seed: int = 3) -> dict:
    return {
        "class_type": "ZeroConDiffuseITSampler",
        "inputs": {
            "model": ["ckpt", 0],
            "positive": ["positive", 0],
            "negative": ["negative", 0],
            "latent": [latent, 0],
            "guidance": [guidance, 0],
            "steps": steps,
            "cfg": 3.0,
            "strength": strength,
            "resample": resample,
            "seed": seed,
            "step_mode": "raw",
            "step_size": 0.02,
        },
    }


def _chained(class_type: str, inputs: dict, previous: str | None) -> dict:
    """A guidance-term node of ``class_type`` on ``inputs``, after the term node ``previous`` (if any)."""
    if previous:
        inputs["previous"] = [previous, 0]
    return {"class_type": class_type, "inputs": inputs}


def _structure(
    image: str, weight: float = 1.0, dino_size: int = 32, previous: str | None = None, vae: list | None = None
) -> dict:
    inputs = {
        "model": ["ckpt", 0],
        "vae": vae or ["ckpt", 2],
        "dino": ["dino", 0],
        "image": [image, 0],
        "weight": weight,
        "lambda_ssim": 1000.0,
        "lambda_contrastive": 200.0,
        "lambda_semantic": 100.0,
        "lambda_range": 200.0,
        "dino_size": dino_size,
        "noise_blend": False,
        "start": 0.0,
        "end": 1.0,
    }
    return _chained("ZeroConDinoStructureGuidance", inputs, previous)


def _style(reference: str, weight: float = 1.0, dino_size: int = 32, previous: str | None = None) -> dict:
    inputs = {
        "model": ["ckpt", 0],
        "vae": ["ckpt", 2],
        "dino": ["dino", 0],
        "reference": [reference, 0],
        "weight": weight,
        "lambda_cls": 2000.0,
        "lambda_pixel": 3000.0,
        "dino_size": dino_size,
        "start": 0.0,
        "end": 1.0,
    }
    return _chained("ZeroConDinoStyleGuidance", inputs, previous)


def _base(positive: str, negative: str = "") -> dict:
    """Checkpoint, DINO, the source image and its latent, the two prompts."""
    return {
        "ckpt": {"class_type": "ZeroConTest_TinyCheckpoint", "inputs": {"kind": "sd15", "seed": 0}},
        "dino": {
            "class_type": "ZeroConDINOLoader",
            "inputs": {"model": DINO_NAME, "precision": "fp32", "device": "cpu", "allow_download": False},
        },
        "source": {"class_type": "LoadImage", "inputs": {"image": "source.png"}},
        "latent": {"class_type": "VAEEncode", "inputs": {"pixels": ["source", 0], "vae": ["ckpt", 2]}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["ckpt", 1]}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
    }


def _outputs(graph: dict, sample: str, key: str) -> None:
    """VAE Decode ``sample`` and capture the image under ``key`` and the latent under ``key + '_latent'``."""
    graph[f"decode_{key}"] = {"class_type": "VAEDecode", "inputs": {"samples": [sample, 0], "vae": ["ckpt", 2]}}
    graph[f"cap_{key}"] = {"class_type": "ZeroConTest_Capture", "inputs": {"value": [f"decode_{key}", 0], "key": key}}
    graph[f"cap_{key}_latent"] = {
        "class_type": "ZeroConTest_Capture",
        "inputs": {"value": [sample, 0], "key": f"{key}_latent"},
    }


def image_guided_graph(reference: str = "reference.png", structure_image: str = "source") -> dict:
    """DiffuseIT image-guided (style transfer): structure from the source, style from ``reference``, DiffuseIT's
    defaults (auto strength = its noise level, 10 resampling repeats, DINO at 224 px)."""
    g = _base("a photo")
    g["reference"] = {"class_type": "LoadImage", "inputs": {"image": reference}}
    g["structure"] = _structure(structure_image, dino_size=224)
    g["style"] = _style("reference", dino_size=224, previous="structure")
    g["sample"] = _sampler("latent", "style", steps=8, strength=-1.0, resample=10)
    g["structure_off"] = _structure(structure_image, weight=0.0, dino_size=224)
    g["style_off"] = _style("reference", weight=0.0, dino_size=224, previous="structure_off")
    g["sample_off"] = _sampler("latent", "style_off", steps=8, strength=-1.0, resample=10)
    _outputs(g, "sample", "edit")
    _outputs(g, "sample_off", "plain")
    g["cap_guidance"] = {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["style", 0], "key": "guidance"}}
    return g


def text_guided_graph() -> dict:
    """DiffuseIT text-guided: the target prompt conditions the model; DINO structure losses keep the layout.
    The guidance decodes with TAESD (the cheap option); the source is encoded and the result decoded with the
    checkpoint's VAE."""
    g = _base("a watercolor painting of a fox", "blurry")
    g["taesd"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    g["structure"] = _structure("source", vae=["taesd", 0])
    g["sample"] = _sampler("latent", "structure")
    g["structure_off"] = _structure("source", weight=0.0, vae=["taesd", 0])
    g["sample_off"] = _sampler("latent", "structure_off")
    _outputs(g, "sample", "edit")
    _outputs(g, "sample_off", "plain")
    g["cap_guidance"] = {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["structure", 0], "key": "guidance"}}
    return g


def _executed(server) -> set[str]:
    return {d["node"] for e, d in server.messages if e == "executing" and d.get("node")}


def _check_pair(captured: dict) -> None:
    """The guided and the weight-0 results: decoded images of the source's size in [0, 1], finite latents of the
    source latent's shape, and different (the DINO losses moved the latent)."""
    edit, plain = captured["edit"], captured["plain"]
    assert edit.shape == plain.shape == (1, SIZE, SIZE, 3)
    assert torch.isfinite(edit).all() and edit.min() >= 0 and edit.max() <= 1
    z, z0 = captured["edit_latent"]["samples"], captured["plain_latent"]["samples"]
    assert z.shape == z0.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert torch.isfinite(z).all() and torch.isfinite(z0).all()
    assert (z - z0).abs().max() > 1e-4 * z0.abs().max(), "DINO guidance did not move the latent"


def test_image_guided_diffuseit_graph(graph_env):
    captured = graph_env
    captured.clear()
    server = execute_in_process(image_guided_graph())
    assert {"dino", "source", "reference", "latent", "structure", "style", "sample", "decode_edit"} <= _executed(server)
    _check_pair(captured)
    terms = captured["guidance"]
    assert [type(t).__name__ for t in terms] == [
        "DinoStructureGuidance",
        "SemanticDivergenceGuidance",
        "RangeGuidance",
        "DinoStyleGuidance",
    ]
    assert all(t.decode.vae.first_stage_model is terms[0].decode.vae.first_stage_model for t in terms)


def test_text_guided_diffuseit_graph(graph_env):
    captured = graph_env
    captured.clear()
    server = execute_in_process(text_guided_graph())
    assert {"dino", "taesd", "positive", "negative", "latent", "structure", "sample", "decode_edit"} <= _executed(
        server
    )
    _check_pair(captured)
    terms = captured["guidance"]
    assert [type(t).__name__ for t in terms] == ["DinoStructureGuidance", "SemanticDivergenceGuidance", "RangeGuidance"]
    assert all(type(t.decode.vae.first_stage_model).__name__ == "TAESD" for t in terms)  # the tiny decoder


@pytest.mark.parametrize(
    "reference, structure_image",
    [
        ("reference_small.png", "source"),  # smaller, landscape 56 x 40
        ("reference_large.png", "source_large"),
    ],  # larger, 128 x 96; structure from a 2x copy of the source
)
def test_images_of_other_sizes_are_resized(graph_env, reference, structure_image):
    captured = graph_env
    captured.clear()
    graph = image_guided_graph(reference, structure_image)
    if structure_image != "source":
        graph[structure_image] = {"class_type": "LoadImage", "inputs": {"image": f"{structure_image}.png"}}
    for key in ("structure", "style", "structure_off", "style_off"):  # 32 px DINO: fast, and a non-square grid
        graph[key]["inputs"]["dino_size"] = 32
    for key in ("sample", "sample_off"):
        graph[key]["inputs"].update(steps=6, strength=0.5, resample=2)
    execute_in_process(graph)
    _check_pair(captured)
    structure, style = captured["guidance"][0], captured["guidance"][-1]
    w, h, _ = IMAGES[reference]
    assert style.reference.shape == (1, 3, h, w)  # the terms got the images as loaded and resized them
    w, h, _ = IMAGES[f"{structure_image}.png"]
    assert structure.source.shape == (1, 3, h, w)
