"""Tiny text models for tests, built from configs and tokenizer files written here (no hub, no weights).

- :func:`write_clip_tokenizer` / :func:`tiny_clip`: a character-level CLIP BPE tokenizer (vocab.json +
  merges.txt) and a random 2-layer ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``).
- :func:`tiny_blip_folder`: a random BLIP captioner (tiny vision + text configs, a BertTokenizer over a
  small word vocabulary, 32 px ``BlipImageProcessor``) saved with ``save_pretrained`` to a folder.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_CHARS = string.ascii_lowercase + string.digits + ".,!'-"
#: the sizes of every tiny transformer tower here and in tiny_vision (BLIP and CLIP text / vision)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def write_clip_tokenizer(folder: str | os.PathLike, pad_token: str = CLIP_EOS, max_length: int = 77) -> Path:
    """Write a character-level CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json) to ``folder``.

    Every character c has the tokens ``c`` and ``c</w>`` (end of word); a few merges make common pairs.
    ``pad_token``: ``<|endoftext|>`` (SD1 / SDXL encoder 1) or ``!`` (SDXL encoder 2).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [CLIP_BOS, CLIP_EOS]
    tokens += list(_CLIP_CHARS) + [c + "</w>" for c in _CLIP_CHARS]
    merges = ["t h", "a t</w>", "i n", "th e</w>"]
    tokens += ["th", "at</w>", "in", "the</w>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": CLIP_BOS,
                "eos_token": CLIP_EOS,
                "unk_token": CLIP_EOS,
                "pad_token": pad_token,
            }
        )
    )
    return folder


def load_clip_tokenizer(folder: str | os.PathLike):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)


def tiny_clip(
    folder: str | os.PathLike,
    hidden: int = 32,
    layers: int = 2,
    projection: int | None = None,
    pad_token: str = CLIP_EOS,
    seed: int = 0,
):
    """``(tokenizer, text_model)``: a tokenizer written to ``folder`` and a random tiny CLIP text model.

    ``projection``: build a ``CLIPTextModelWithProjection`` with this ``projection_dim`` (SDXL encoder 2).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = load_clip_tokenizer(write_clip_tokenizer(folder, pad_token=pad_token))
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=projection or hidden,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    return tok, model


BLIP_WORDS = (
    "a photography of picture photo the cat dog horse zebra sitting standing on in with grass couch table "
    "red blue green small large man woman glasses and is at near white black brown"
).split()


def tiny_blip_folder(folder: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """Save a random tiny BLIP captioner (model + processor) to ``folder``; returns the folder."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    folder = Path(folder)
    tok_dir = folder.parent / (folder.name + "-tokenizer-src")
    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + list(BLIP_WORDS)
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "bos_token": "[DEC]", "model_max_length": 64}
        )
    )
    tokenizer = BertTokenizer.from_pretrained(os.fspath(tok_dir), local_files_only=True)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    text_cfg = BlipTextConfig(
        vocab_size=len(vocab),
        encoder_hidden_size=32,
        **TINY_TOWER,
        max_position_embeddings=64,
        bos_token_id=vocab.index("[DEC]"),
        eos_token_id=vocab.index("[SEP]"),
        sep_token_id=vocab.index("[SEP]"),
        pad_token_id=vocab.index("[PAD]"),
    )
    vision_cfg = BlipVisionConfig(
        **TINY_TOWER,
        image_size=image_size,
        patch_size=8,
    )
    cfg = BlipConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg).eval()
    model.save_pretrained(os.fspath(folder))
    processor.save_pretrained(os.fspath(folder))
    return folder
