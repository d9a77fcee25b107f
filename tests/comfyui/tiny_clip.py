"""Tiny randomly initialised text-side models for the ComfyUI integration tests. No downloads, no hub.

- ``clip("sd1" | "sdxl")``: a ComfyUI ``comfy.sd.CLIP`` built from ComfyUI's own classes
  (``SD1ClipModel`` / ``SDXLClipModel`` with their bundled tokenizers) and small text-model configs passed
  the way ComfyUI passes per-model config overrides (``model_options["clip_l_model_config"]``...). Widths
  match ``tiny_models``: SD1 context 64; SDXL l 32 + g 32 = 64 context, pooled 32.
- ``sd3_clip(l=True, g=True, t5=True)`` / ``flux_clip()``: ``comfy.sd.CLIP`` objects of ComfyUI's SD3 and Flux
  text encoders (``sd3_clip.SD3ClipModel`` / ``flux.FluxClipModel``): tiny CLIP-L / CLIP-G as above and a
  one-layer T5 that is 4096 wide (ComfyUI pads SD3's CLIP part to 4096 and joins the T5 tokens to it, so the
  width is fixed) with a tiny vocabulary. Its tokenizer is ComfyUI's T5 tokenizer class (``T5TokenizerFast`` in
  ``sd1_clip.SDTokenizer``, same padding rules: min length 77 for SD3, 256 for Flux) over a vocabulary file
  written by the test (``t5_tokenizer_folder``); CLIP-L / CLIP-G use ComfyUI's bundled tokenizers.
- ``vae()``: a ``comfy.sd.VAE`` (AutoencoderKL, 8x downscale, 4 latent channels, 32 channels wide).
- ``save_blip(folder)``: a tiny transformers BLIP captioner (``BlipForConditionalGeneration`` +
  ``BlipProcessor`` with a 20-word BERT vocabulary) saved with ``save_pretrained``; ``mode="empty"`` makes
  it end every caption at once (empty caption), ``mode="words"`` never lets it emit special tokens.

Everything is built under ``torch.inference_mode()`` like ComfyUI's loader nodes, with seeded weights
(``comfy.ops`` leaves weights uninitialised).
"""

from __future__ import annotations

import os

import torch

try:  # keep the widths in step with the tiny UNets (same folder, on sys.path under pytest)
    from tiny_models import CONTEXT_DIM, POOLED_DIM
except ImportError:  # pragma: no cover - loaded by path from testing_nodes without tests/comfyui on sys.path
    CONTEXT_DIM, POOLED_DIM = 64, 32

SDXL_L_WIDTH = CONTEXT_DIM - POOLED_DIM  # l + g = context; g's pooled output is g wide
SDXL_G_WIDTH = POOLED_DIM


def _text_config(width: int, layers: int = 3, act: str = "quick_gelu") -> dict:
    return {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_attention_heads": 2,
        "num_hidden_layers": layers,  # >= 3: SDXL uses the penultimate layer (layer_idx -2)
        "projection_dim": width,
        "hidden_act": act,
    }


def _init_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        elif name.endswith("weight"):  # layer / group norms
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))


class _Target:
    """What ComfyUI's loaders pass to ``comfy.sd.CLIP``: ``params``, ``clip`` class, ``tokenizer`` class."""

    def __init__(self, clip_cls, tokenizer_cls):
        self.params = {}
        self.clip = clip_cls
        self.tokenizer = tokenizer_cls


def clip(kind: str = "sd1", seed: int = 0, width: int | None = None):
    """A tiny ComfyUI CLIP: ``"sd1"`` (one "l" encoder, 64 wide) or ``"sdxl"`` ("l" 32 + "g" 32, pooled 32).

    ``width`` overrides the SD1 encoder's width (a CLIP that does not fit the tiny UNets).
    """
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip

    if kind == "sd1":
        target = _Target(comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer)
        options = {"clip_l_model_config": _text_config(width or CONTEXT_DIM)}
    elif kind == "sdxl":
        target = _Target(comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer)
        options = {
            "clip_l_model_config": _text_config(SDXL_L_WIDTH),
            "clip_g_model_config": _text_config(SDXL_G_WIDTH, act="gelu"),
        }
    else:
        raise ValueError(f"unknown tiny CLIP kind {kind!r}")
    with torch.inference_mode():
        c = comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32})
        _init_(c.cond_stage_model, seed)
    return c


T5_WIDTH = 4096
T5_WORDS = (
    "a an the of in on at is this there photo picture image close-up high quality snapshot portrait shot cat cats "
    "dog dogs small large cute old young happy sitting standing lying running walking park beach grass house tree "
    "red blue showing light soft natural room snow street forest kitchen field sunset studio lake garden sky"
).split()
_T5_FOLDER: str | None = None


def t5_tokenizer_folder() -> str:
    """A tiny T5 tokenizer (``T5TokenizerFast`` files: <pad> 0, </s> 1, <unk> 2, the words of ``T5_WORDS`` and
    single letters) written once per process to a temporary folder; returns the folder."""
    global _T5_FOLDER
    if _T5_FOLDER is None:
        import tempfile

        from transformers import T5TokenizerFast

        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
        vocab += [("\u2581" + w, -1.0) for w in T5_WORDS]
        vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,()"]
        folder = tempfile.mkdtemp(prefix="zerocon-tiny-t5-")
        T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(folder)
        _T5_FOLDER = folder
    return _T5_FOLDER


def _t5_vocab_size() -> int:
    from transformers import T5TokenizerFast

    return len(T5TokenizerFast.from_pretrained(t5_tokenizer_folder()).get_vocab())


def _tiny_t5_tokenizer(min_length: int, tokenizer_data: dict):
    """ComfyUI's ``T5XXLTokenizer`` settings over the tiny vocabulary."""
    import comfy.sd1_clip
    from transformers import T5TokenizerFast

    return comfy.sd1_clip.SDTokenizer(
        t5_tokenizer_folder(),
        pad_with_end=False,
        embedding_size=T5_WIDTH,
        embedding_key="t5xxl",
        tokenizer_class=T5TokenizerFast,
        has_start_token=False,
        pad_to_max_length=False,
        max_length=99999999,
        min_length=min_length,
        tokenizer_data=tokenizer_data,
    )


def _t5_config(layers: int = 2, d_ff: int = 32) -> dict:
    return {
        "d_model": T5_WIDTH,
        "d_ff": d_ff,
        "d_kv": 8,
        "num_heads": 2,
        "num_layers": layers,
        "vocab_size": _t5_vocab_size(),
    }


def sd3_clip(l: bool = True, g: bool = True, t5: bool = True, seed: int = 0):  # noqa: E741
    """A tiny SD3 CLIP (``SD3ClipModel`` with the chosen encoders; the tokenizer always gives all three keys, as
    ComfyUI's ``SD3Tokenizer`` does). CLIP-L 32 + CLIP-G 32 wide (pooled 32 + 32), T5 4096 wide, min length 77."""
    import comfy.sd
    import comfy.text_encoders.sd3_clip as sd3

    class TinySD3Tokenizer(sd3.SD3Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            tokenizer_data = tokenizer_data or {}
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            self.t5xxl = _tiny_t5_tokenizer(77, tokenizer_data)

    target = _Target(sd3.sd3_clip(clip_l=l, clip_g=g, t5=t5), TinySD3Tokenizer)
    options = {
        "clip_l_model_config": _text_config(SDXL_L_WIDTH),
        "clip_g_model_config": _text_config(SDXL_G_WIDTH, act="gelu"),
        "t5xxl_model_config": _t5_config(),
    }
    with torch.inference_mode():
        c = comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32})
        _init_(c.cond_stage_model, seed)
    return c


def flux_clip(seed: int = 0, t5_layers: int = 2, t5_ff: int = 32):
    """A tiny Flux CLIP (``FluxClipModel``: T5 sequence 4096 wide, padded to 256 tokens; CLIP-L pooled, 32).
    ``t5_layers`` / ``t5_ff``: a bigger T5 (benchmarks)."""
    import comfy.sd
    import comfy.text_encoders.flux as flux

    class TinyFluxTokenizer(flux.FluxTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            tokenizer_data = tokenizer_data or {}
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            self.t5xxl = _tiny_t5_tokenizer(256, tokenizer_data)

    target = _Target(flux.flux_clip(), TinyFluxTokenizer)
    options = {"clip_l_model_config": _text_config(SDXL_L_WIDTH), "t5xxl_model_config": _t5_config(t5_layers, t5_ff)}
    with torch.inference_mode():
        c = comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32})
        _init_(c.cond_stage_model, seed)
    return c


VAE_CONFIG = {
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,  # GroupNorm(32 groups) needs a multiple of 32
            "ch_mult": [1, 1, 1, 1],  # 3 downsamplings: 8x, like SD's VAE
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}


def vae(seed: int = 0):
    """A tiny ``comfy.sd.VAE`` (SD-style AutoencoderKL, 4 latent channels, 8x) from a seeded state dict."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.inference_mode():
        model = AutoencoderKL(**VAE_CONFIG["params"])
        _init_(model, seed)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        return comfy.sd.VAE(sd=sd, config=VAE_CONFIG)


BLIP_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[DEC]",
    "a",
    "photography",
    "of",
    "cat",
    "dog",
    "on",
    "the",
    "grass",
    "red",
    "blue",
    "house",
    "tree",
    "sitting",
    "small",
]
_SPECIAL = 6


def save_blip(folder: str | os.PathLike, seed: int = 0, mode: str = "words") -> str:
    """Save a tiny BLIP captioner (transformers ``save_pretrained`` layout) to ``folder``; returns the folder.

    ``mode="words"``: special tokens can never be generated, so every caption is ``max_new_tokens`` words.
    ``mode="empty"``: the end token always wins, so every caption is empty once the prefix is stripped.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(BLIP_WORDS) + "\n")
    tok = BertTokenizer(vocab, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    text = {
        "vocab_size": len(BLIP_WORDS),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "encoder_hidden_size": 32,
        "bos_token_id": tok.bos_token_id,
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.decoder.bias
        if mode == "words":
            bias[:_SPECIAL] = -1e4
        elif mode == "empty":
            bias[tok.sep_token_id] = 1e4
        else:
            raise ValueError(f"unknown tiny BLIP mode {mode!r}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
