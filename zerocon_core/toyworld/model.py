"""The toy model's parts: a word-level CLIP tokenizer over the world's vocabulary and the configs of the small
VAE, UNet (``UNet2DConditionModel`` with cross-attention) and CLIP text encoder trained on the toy world
(bench/toyworld_train.py). The model is stored in the diffusers layout the command line loads
(``unet/ vae/ text_encoder/ tokenizer/ scheduler/``), see :func:`save_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .world import BACKGROUNDS, COLOURS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: Every word a caption uses (each is one token).
WORDS = ("a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS.values())
#: Prompt length of the text encoder (SD's 77, so ComfyUI's CLIP padding fits too).
MAX_LENGTH = 77
TEXT_WIDTH = 64
LATENT_CHANNELS = 4


def _merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build ``word</w>`` from its characters."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    out, acc = [], pieces[0]
    for p in pieces[1:]:
        out.append((acc, p))
        acc += p
    return out


def _vocab(order: list[str]) -> tuple[list[str], list[str]]:
    chars = sorted({c for w in WORDS for c in w})
    tokens = [BOS, EOS, *chars, *(c + "</w>" for c in chars)]
    merges = []
    for w in order:
        for a, b in _merges(w):
            merges.append(f"{a} {b}")
            if a + b not in tokens:
                tokens.append(a + b)
    return tokens, list(dict.fromkeys(merges))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word (the lowest-ranked pair merges first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _word_order() -> list[str]:
    """An order of :data:`WORDS` whose merges make every word one token (a word that splits moves first)."""
    order = list(WORDS)
    for _ in range(len(WORDS) ** 2):
        ranks = {tuple(m.split()): i for i, m in enumerate(_vocab(order)[1])}
        split = [w for w in order if len(_bpe(w, ranks)) > 1]
        if not split:
            return order
        order.remove(split[0])
        order.insert(0, split[0])
    raise RuntimeError("no merge order makes every toy-world word one token")


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) in which every word of
    :data:`WORDS` is one token (other text falls back to characters). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = _vocab(_word_order())
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = dict(
        tokenizer_class="CLIPTokenizer",
        model_max_length=MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def load_tokenizer(folder: str | os.PathLike) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)


def vae_config() -> dict:
    """A two-level ``AutoencoderKL``: 32 px RGB <-> a 16 x 16 x 4 latent (factor 2)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=1.0,
    )


def unet_config() -> dict:
    """An SD-shaped UNet on 16 x 16 latents: cross-attention at the 16 x 16 and 8 x 8 levels, none at 4 x 4."""
    return dict(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def text_config(vocab_size: int) -> dict:
    """A two-layer CLIP text encoder of width :data:`TEXT_WIDTH` over ``vocab_size`` tokens."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def scheduler_config() -> dict:
    """SD1.x's DDIM scheduler config (the schedule the model is trained with)."""
    return dict(
        _class_name="DDIMScheduler",
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_parts(vocab_size: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """Freshly initialised ``(vae, unet, text_encoder)`` (float32, seeded)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    unet = UNet2DConditionModel(**unet_config())
    text = CLIPTextModel(CLIPTextConfig(**text_config(vocab_size)))
    return vae, unet, text


def save_model(folder: str | os.PathLike, vae: Any, unet: Any, text_encoder: Any, tokenizer_folder: Path) -> Path:
    """Write the model in diffusers layout (fp16 safetensors) to ``folder``; returns it."""
    import copy
    import shutil

    import torch

    folder = Path(folder)
    for name, part in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        copy.deepcopy(part).to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
    tok = folder / "tokenizer"
    if tok.resolve() != Path(tokenizer_folder).resolve():
        shutil.copytree(tokenizer_folder, tok, dirs_exist_ok=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2))
    return folder
