"""Edit directions in CLIP text-embedding space (pix2pix-zero's sentence banks; docs/method.md §4).

A direction is the token-wise difference of two mean text embeddings, ``mean(target) - mean(source)``, over
all 77 positions (BOS, EOS and padding included, as pix2pix-zero does). It is added to the conditional caption
embedding: ``c_edit = c + strength * delta`` on every 77-token chunk.

Host independence: the text encoder is an *encode callable* supplied by the host,

    encode(texts: list[str]) -> (embeds (N, 77, D_total), pooled (N, P) | None)

where ``embeds`` is exactly what the host's UNet receives as cross-attention context (for SDXL the
encoders' hidden states concatenated along the channel axis, CLIP-L first: 768 + 1280 = 2048, as both
diffusers and ComfyUI do) and ``pooled`` is the pooled text embedding (SDXL: text_encoder_2 / "g"), or
``None``. Hosts must return a fixed token length (77; SD3 / Flux: below): a ComfyUI CLIP host should keep the
first 77-token chunk of long sentences. The encoder split of ``D_total`` comes from, in order: the ``encoders`` argument,
an ``encoders`` attribute on the callable (set by :func:`clip_encoder` / :func:`sdxl_clip_encoder`), or
the width (768 -> ``l``, 1024 -> ``h``, 2048 -> ``l`` + ``g``; ComfyUI's encoder keys).

Progress and caching (sentence banks): ``progress(done, total)`` is called before the first and after every
``encode`` call, counting sentences (a host may raise from it to cancel); an :class:`EmbeddingCache` keeps the
mean embedding of each sentence list per encoder (``encode.cache_key``), so a second direction with the same
encoder and sentences encodes nothing.

Representation: :class:`EditDirection` holds one ``(T, D_e)`` delta per encoder in an insertion-ordered
dict (order = concatenation order in the conditioning); :attr:`EditDirection.delta` is their
concatenation ``(T, D_total)``. Deltas are float32 on the CPU; means are accumulated in float64.
:attr:`EditDirection.layout` names the encoder layout (``zerocon_core.text.text_layout``: SD1.x, SD2.x, SDXL, SD3,
Flux), saved with the direction.

SD3 / SD3.5 and Flux (T5-XXL): the host returns, per sentence, the conditioning ComfyUI builds for it, cut
to a fixed length: SD3 ``[CLIP part (77 tokens: CLIP-L | CLIP-G | zeros) ; T5 (L tokens)]`` x 4096, Flux
``T5 (L tokens)`` x 4096. ``L`` is the T5 tokenizer's padded length (its minimum length: 77 for SD3, 256 for
Flux), so every sentence of a bank has the same length, as the tokenizer itself pads it (longer sentences
are cut to L tokens, ending with T5's end token). The direction keeps one delta per encoder present:
``l (77, 768)``, ``g (77, 1280)``, ``t5xxl (L, 4096)`` and the pooled delta (SD3: CLIP-L + CLIP-G, 2048;
Flux: CLIP-L, 768). Applied to a conditioning, the CLIP delta goes on every 77-token chunk of SD3's CLIP part
(as for SD1.x/SDXL) and the T5 delta on the first ``min(L, n)`` of the conditioning's ``n`` T5 tokens: T5
encodes a prompt as one sequence (no chunks), so a prompt longer than L keeps its tail unchanged (the bank's
mean has padding, not words, there) and a conditioning padded shorter than L gets the first n positions.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence, overload

import torch
from torch import Tensor

from ..common.legacy_args import merge_settings
from ..common.log import logger
from .text_layout import (
    CHUNK,
    LAYOUTS,
    SD3_L_WIDTH,
    T5_KEY,
    T5_WIDTH,
    ConditioningLayout,
    conditioning_layout,
    delta_layout,
    describe_encoders,
    identify_layout,
    sd3_offsets,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "EditDirection",
    "EmbeddingCache",
    "EncodeFn",
    "ProgressFn",
    "apply_direction",
    "check_direction_fits",
    "clip_encoder",
    "default_encoders",
    "load_direction",
    "parse_sentence_list",
    "prompt_difference_direction",
    "save_direction",
    "sdxl_clip_encoder",
    "sentence_bank_direction",
    "template_sentences",
]

FORMAT = "zerocon.edit_direction"
FORMAT_VERSION = 2
"""Version 2 adds SD3 / Flux directions (a ``layout`` field, a T5 delta); SD1.x/SD2.x/SDXL files are still
written as version 1, which older versions of the pack read."""

EncodeFn = Callable[[list[str]], "tuple[Tensor, Tensor | None]"]
"""Host text encoder: ``list[str] -> (embeds (N, 77, D_total), pooled (N, P) | None)`` (SD3: ``(N, 77 + L, 4096)``
or without the CLIP or T5 part; Flux: ``(N, L, 4096)``; the host's ``layout`` and ``encoders`` attributes say
which, see the module docstring)."""

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: sentences encoded so far out of ``total``; may raise to cancel."""

SEGMENTED = ("SD3", "Flux")
"""Layouts whose conditioning has T5 tokens (deltas of different token lengths per encoder)."""


def default_encoders(width: int) -> tuple[tuple[str, int], ...]:
    """Encoder split ``((name, width), ...)`` guessed from a conditioning width (ComfyUI's encoder keys)."""
    if width == 768:
        return (("l", 768),)
    if width == 1024:
        return (("h", 1024),)
    if width == 2048:
        return (("l", 768), ("g", 1280))
    return (("text", int(width)),)


@dataclass
class EditDirection:
    """A token-wise edit direction.

    ``deltas``: encoder name -> ``(T, D_e)`` float32 delta, in the order the encoders are concatenated in the
    conditioning (SD1.x/SD2.x/SDXL: all T = 77; SD3: ``l``/``g`` 77 tokens, ``t5xxl`` L tokens; Flux:
    ``t5xxl`` only). ``pooled``: ``(P,)`` pooled-embedding delta or ``None``. ``mode``: ``"sentences"``
    (sentence banks) or ``"prompt"`` (prompt difference). ``layout``: one of ``text_layout.LAYOUTS`` or ``""``
    (unknown); left empty, it is inferred from the encoder names and widths (``identify_layout``).
    """

    deltas: dict[str, Tensor]
    pooled: Tensor | None = None
    source: str = ""
    target: str = ""
    mode: str = "sentences"
    num_source: int = 0
    num_target: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    layout: str = ""

    def __post_init__(self) -> None:
        if not self.deltas:
            raise ValueError("an edit direction needs at least one encoder delta")
        if any(d.ndim != 2 for d in self.deltas.values()):
            shapes = {k: tuple(v.shape) for k, v in self.deltas.items()}
            raise ValueError(f"edit direction deltas must all be (T, D), got {shapes}")
        if self.mode not in ("sentences", "prompt"):
            raise ValueError(f"edit direction mode must be 'sentences' or 'prompt', got {self.mode!r}")
        if self.pooled is not None and self.pooled.ndim != 1:
            raise ValueError(f"pooled delta must be 1-D (P,), got shape {tuple(self.pooled.shape)}")
        if self.layout not in LAYOUTS:
            flat = sum(int(v.shape[-1]) for k, v in self.deltas.items() if k != T5_KEY)
            width = int(self.deltas[T5_KEY].shape[-1]) if T5_KEY in self.deltas else flat
            pooled_width = None if self.pooled is None else int(self.pooled.shape[-1])
            self.layout = delta_layout(self.deltas, width, pooled_width)
        clip = [k for k in self.deltas if k != T5_KEY]
        lengths = {int(self.deltas[k].shape[0]) for k in (clip if self.segmented else self.deltas)}
        if len(lengths) > 1 or (self.segmented and clip and lengths != {CHUNK}):
            shapes = {k: tuple(v.shape) for k, v in self.deltas.items()}
            raise ValueError(f"edit direction deltas must all be (T, D) with the same T, got {shapes}")
        if self.segmented and self.layout == "Flux" and list(self.deltas) != [T5_KEY]:
            raise ValueError(f"a Flux edit direction has a T5 delta only, got {list(self.deltas)}")

    @property
    def segmented(self) -> bool:
        """True for SD3 / Flux: T5 tokens follow (SD3) or replace (Flux) the 77-token CLIP chunks."""
        return self.layout in SEGMENTED

    @property
    def clip_encoders(self) -> tuple[str, ...]:
        """The CLIP encoders (not T5) the direction has deltas for."""
        return tuple(k for k in self.deltas if k != T5_KEY)

    @property
    def t5_length(self) -> int:
        """Token length L of the T5 delta (0 without T5)."""
        return int(self.deltas[T5_KEY].shape[0]) if T5_KEY in self.deltas and self.segmented else 0

    def delta_for(self, clip_tokens: int, t5_tokens: int) -> Tensor:
        """SD3 / Flux: the ``(clip_tokens + t5_tokens, width)`` delta for a conditioning with that many CLIP
        tokens (a multiple of 77; SD3 only) and T5 tokens: the CLIP delta (CLIP-L | CLIP-G | zeros) on every
        77-token chunk, the T5 delta on the first ``min(L, t5_tokens)`` T5 tokens, zeros after."""
        if not self.segmented:
            raise ValueError(f"delta_for is for SD3 / Flux directions, this one is {self.kind()}")
        width = self.width
        out = torch.zeros(clip_tokens + t5_tokens, width, dtype=torch.float32)
        if clip_tokens:
            chunk = torch.zeros(CHUNK, width, dtype=torch.float32)
            offsets = sd3_offsets({k: int(self.deltas[k].shape[-1]) for k in self.clip_encoders})
            for k, start in offsets.items():
                chunk[:, start : start + self.deltas[k].shape[-1]] = self.deltas[k]
            out[:clip_tokens] = chunk.repeat(clip_tokens // CHUNK, 1)
        n = min(self.t5_length, t5_tokens)
        if n:
            out[clip_tokens : clip_tokens + n] = self.deltas[T5_KEY][:n]
        return out

    @property
    def delta(self) -> Tensor:
        """The concatenated delta ``(T, D_total)``, as it adds to a conditioning (SD3 / Flux: one CLIP chunk,
        if any, then the L T5 tokens, as the sentences were encoded)."""
        if self.segmented:
            return self.delta_for(CHUNK if self.clip_encoders else 0, self.t5_length)
        parts = list(self.deltas.values())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @property
    def encoders(self) -> tuple[tuple[str, int], ...]:
        """``((name, width), ...)`` in concatenation order."""
        return tuple((k, int(v.shape[-1])) for k, v in self.deltas.items())

    @property
    def width(self) -> int:
        """Conditioning width D_total (768 SD1.x, 1024 SD2.x, 2048 SDXL, 4096 SD3 and Flux)."""
        if self.layout == "SD3":
            return T5_WIDTH  # ComfyUI pads SD3's CLIP part to T5-XXL's width, with or without T5
        if self.layout == "Flux":
            return int(self.deltas[T5_KEY].shape[-1])
        return sum(w for _, w in self.encoders)

    @property
    def length(self) -> int:
        """Token length T of :attr:`delta` (77; SD3 77 + L or L; Flux L)."""
        if self.segmented:
            return (CHUNK if self.clip_encoders else 0) + self.t5_length
        return int(next(iter(self.deltas.values())).shape[0])

    def kind(self) -> str:
        """``"SDXL"``, ``"SD3: CLIP-L + CLIP-G + T5-XXL"``, ``"Flux"``... (``"unknown family"`` if unknown)."""
        if self.layout == "SD3":
            return f"SD3: {describe_encoders(self.deltas)}"
        return self.layout or "unknown family"

    def describe(self) -> str:
        """One-line human description, e.g. for a node's UI."""
        enc = "+".join(f"{k}{w}" for k, w in self.encoders)
        counts = f", {self.num_source}/{self.num_target} sentences" if self.mode == "sentences" else ""
        pooled = ", pooled" if self.pooled is not None else ""
        tokens = f", {self.length} tokens" if self.segmented else ""
        return (
            f"'{self.source}' -> '{self.target}' ({self.mode}{counts}; {enc} = {self.width} wide, "
            f"{self.kind()}{tokens}{pooled})"
        )


# ---------------------------------------------------------------------------------------------------------
# Building directions


def _resolve_encoders(encode, encoders, width: int, layout: str) -> tuple[tuple[str, int], ...]:
    enc = encoders if encoders is not None else getattr(encode, "encoders", None)
    enc = tuple((str(k), int(w)) for k, w in enc) if enc is not None else default_encoders(width)
    if layout in SEGMENTED:
        names = [k for k, _ in enc]
        if layout == "Flux" and names != [T5_KEY] or layout == "SD3" and not set(names) <= {"l", "g", T5_KEY}:
            raise ValueError(f"encoder split {list(enc)} does not fit the {layout} layout")
        if any(w > width for _, w in enc):
            raise ValueError(f"encoder split {list(enc)} is wider than the text encoder's width {width}")
    elif sum(w for _, w in enc) != width:
        raise ValueError(f"encoder split {list(enc)} does not add up to the text encoder's width {width}")
    return enc


def _resolve_layout(encode, mean: MeanEmbedding, enc_names) -> str:
    """The host's ``layout`` attribute, else the one rule (``identify_layout``) on the encoder names and widths."""
    layout = getattr(encode, "layout", None) or mean.layout
    if layout:
        return layout
    pooled_width = None if mean.pooled is None else int(mean.pooled.shape[-1])
    return identify_layout(int(mean.embeds.shape[-1]), pooled_width, keys=enc_names)


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of sentences, not a single string (use parse_sentence_list)")
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError(f"{what} is empty: give at least one sentence")
    return texts


@dataclass(frozen=True)
class MeanEmbedding:
    """The mean over a sentence list of the host embeddings: ``embeds (T, D)`` float64, ``pooled (P,)`` float64
    or None, and the encoder split and layout the host reported (None if it reported none)."""

    embeds: Tensor
    pooled: Tensor | None
    encoders: tuple[tuple[str, int], ...] | None = None
    layout: str | None = None


class EmbeddingCache:
    """Least-recently-used store of :class:`MeanEmbedding` per ``(encoder key, sentences)``, at most
    ``max_entries`` entries (an SDXL entry is about 1.3 MB)."""

    def __init__(self, max_entries: int = 16):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[Hashable, MeanEmbedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> MeanEmbedding | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: MeanEmbedding) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class _Counter:
    """Sentences encoded so far, reported to ``progress``."""

    def __init__(self, progress: ProgressFn | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def report(self, n: int = 0) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _mean_embedding(encode: EncodeFn, texts: list[str], batch_size: int, what: str, counter: _Counter) -> MeanEmbedding:
    """Mean over ``texts`` of the host embeddings, encoding ``batch_size`` texts per call."""
    total = pooled_total = None
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        with torch.no_grad():
            emb, pooled = encode(chunk)
        if emb.ndim != 3 or emb.shape[0] != len(chunk):
            raise ValueError(
                f"encode() must return embeddings of shape (N, 77, D) for N={len(chunk)} texts, got {tuple(emb.shape)}"
            )
        s = emb.detach().to("cpu", torch.float64).sum(0)
        if total is not None and s.shape != total.shape:
            raise ValueError(
                f"encode() returned {tuple(emb.shape[1:])} for some {what} and {tuple(total.shape)} for others: "
                "the host must pad/truncate every text to the same token length (77; T5: its padded length)"
            )
        total = s if total is None else total + s
        if pooled is not None:
            if pooled.ndim != 2 or pooled.shape[0] != len(chunk):
                raise ValueError(f"encode() pooled output must be (N, P) for N={len(chunk)}, got {tuple(pooled.shape)}")
            p = pooled.detach().to("cpu", torch.float64).sum(0)
            pooled_total = p if pooled_total is None else pooled_total + p
        elif pooled_total is not None:
            raise ValueError("encode() returned a pooled output for some texts but not for others")
        counter.report(len(chunk))
    n = len(texts)
    enc = getattr(encode, "encoders", None)
    return MeanEmbedding(
        embeds=total / n,
        pooled=pooled_total / n if pooled_total is not None else None,
        encoders=tuple((str(k), int(w)) for k, w in enc) if enc is not None else None,
        layout=getattr(encode, "layout", None),
    )


def _cache_key(encode: EncodeFn, texts: list[str]) -> Hashable | None:
    key = getattr(encode, "cache_key", None)
    return None if key is None else (key, tuple(texts))


def _split(delta: Tensor, encoders: tuple[tuple[str, int], ...], layout: str) -> dict[str, Tensor]:
    """Per-encoder deltas from the host-shaped delta ``(T, D)``: channel slices (SD1.x/SD2.x/SDXL); SD3: the
    CLIP-L / CLIP-G channels of the first 77 tokens (``sd3_offsets``) and the T5 tokens after them; Flux: all
    of it is T5."""
    out = {}
    if layout in SEGMENTED:
        widths = dict(encoders)
        offsets = sd3_offsets({k: w for k, w in widths.items() if k != T5_KEY})
        clip_tokens = CHUNK if offsets else 0
        if delta.shape[0] < clip_tokens or (T5_KEY in widths) != (delta.shape[0] > clip_tokens):
            raise ValueError(
                f"encode() returned {delta.shape[0]} tokens per sentence, which does not fit {layout} with "
                f"{describe_encoders(widths)}"
            )
        for name, _ in encoders:
            if name == T5_KEY:
                out[name] = delta[clip_tokens:, : widths[name]]
            else:
                start = offsets[name]
                out[name] = delta[:CHUNK, start : start + widths[name]]
        return {k: v.to(torch.float32).contiguous() for k, v in out.items()}
    start = 0
    for name, w in encoders:
        out[name] = delta[:, start : start + w].to(torch.float32).contiguous()
        start += w
    return out


@dataclass
class BankSettings:
    """How ``sentence_bank_direction`` encodes: at most ``batch_size`` texts per ``encode`` call; ``encoders``
    (name, width) pairs naming the embedding's blocks (None: from ``encode`` or the width);
    ``progress(done, total)`` over the sentences to encode; ``cache`` (an ``EmbeddingCache``) keeps mean
    embeddings when ``encode`` has a ``cache_key``."""

    batch_size: int = 32
    encoders: Sequence[tuple[str, int]] | None = None
    progress: ProgressFn | None = None
    cache: EmbeddingCache | None = None


def _bank_means(encode: EncodeFn, sides: list, bank: BankSettings) -> list[MeanEmbedding]:
    """The mean embedding of each ``(texts, what)`` side, from ``bank.cache`` where it has it."""
    cache = bank.cache
    keys = [_cache_key(encode, texts) if cache is not None else None for texts, _ in sides]
    means: list[MeanEmbedding | None] = [cache.get(k) if k is not None else None for k in keys]
    counter = _Counter(bank.progress, sum(len(texts) for (texts, _), m in zip(sides, means) if m is None))
    counter.report()
    for i, ((texts, what), key) in enumerate(zip(sides, keys)):
        if means[i] is None:
            means[i] = _mean_embedding(encode, texts, bank.batch_size, what, counter)
            if key is not None:
                cache.put(key, means[i])
    total = sum(len(texts) for texts, _ in sides)
    if total - counter.total:
        logger.info("edit direction: %d of %d sentence embeddings taken from the cache", total - counter.total, total)
    return means


def sentence_bank_direction(
    encode: EncodeFn,
    source_sentences: Sequence[str],
    target_sentences: Sequence[str],
    source: str = "",
    target: str = "",
    *args: Any,
    bank: BankSettings | None = None,
    **kwargs: Any,
) -> EditDirection:
    """pix2pix-zero's sentence-bank direction: ``mean(encode(target)) - mean(encode(source))``, token-wise.

    Embeddings ``(N, 77, D)`` are averaged over sentences (float64 accumulation) at every position; the
    pooled delta is kept when ``encode`` returns pooled outputs. ``bank``: see ``BankSettings``; its fields
    are also accepted as the old keywords (``batch_size=...``) or positionally after ``target``. Raises
    ``ValueError`` for an empty sentence list.
    """
    bank = merge_settings(BankSettings, bank, args, kwargs, "sentence_bank_direction")
    src = _check_texts(source_sentences, "source sentence list")
    tgt = _check_texts(target_sentences, "target sentence list")
    if bank.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {bank.batch_size}")
    mean_src, mean_tgt = _bank_means(encode, [(src, "source sentences"), (tgt, "target sentences")], bank)
    if mean_src.embeds.shape != mean_tgt.embeds.shape:
        raise ValueError(
            f"source and target embeddings differ in shape: {tuple(mean_src.embeds.shape)} vs "
            f"{tuple(mean_tgt.embeds.shape)}"
        )
    encoders = bank.encoders
    if encoders is None and getattr(encode, "encoders", None) is None:
        encoders = mean_src.encoders or mean_tgt.encoders
    width = int(mean_src.embeds.shape[-1])
    names = [k for k, _ in (encoders or getattr(encode, "encoders", None) or default_encoders(width))]
    layout = _resolve_layout(encode, mean_src, names)
    enc = _resolve_encoders(encode, encoders, width, layout)
    pooled = None
    if mean_src.pooled is not None and mean_tgt.pooled is not None:
        pooled = (mean_tgt.pooled - mean_src.pooled).to(torch.float32)
    d = EditDirection(
        deltas=_split(mean_tgt.embeds - mean_src.embeds, enc, layout),
        layout=layout,
        pooled=pooled,
        source=source,
        target=target,
        mode="sentences",
        num_source=len(src),
        num_target=len(tgt),
    )
    logger.info("edit direction %s", d.describe())
    return d


def prompt_difference_direction(
    encode: EncodeFn,
    source_prompt: str,
    target_prompt: str,
    encoders: Sequence[tuple[str, int]] | None = None,
) -> EditDirection:
    """Direction ``encode(target_prompt) - encode(source_prompt)`` (e.g. target prompt minus the caption)."""
    if not isinstance(source_prompt, str) or not isinstance(target_prompt, str):
        raise TypeError("prompt_difference_direction takes two strings")
    if source_prompt == target_prompt:
        logger.warning("source and target prompts are identical: the edit direction is zero")
    d = sentence_bank_direction(encode, [source_prompt], [target_prompt], source_prompt, target_prompt, 2, encoders)
    d.mode = "prompt"
    return d


# ---------------------------------------------------------------------------------------------------------
# Sentences

_BACKGROUNDS = (
    "in a park",
    "on a beach",
    "in a living room",
    "in the snow",
    "on a city street",
    "in a forest",
    "in a kitchen",
    "on a grassy field",
    "at sunset",
    "in a studio",
    "by a lake",
    "in the desert",
    "on a wooden floor",
    "in front of a brick wall",
    "in a garden",
    "under a blue sky",
    "in the rain",
    "on a mountain trail",
    "in a barn",
    "near a window",
)
_VERBS = (
    "sitting",
    "standing",
    "lying down",
    "running",
    "walking",
    "resting",
    "playing",
    "looking at the camera",
    "sleeping",
    "jumping",
    "waiting",
    "posing",
    "looking around",
    "turning its head",
    "relaxing",
)
_ADJECTIVES = (
    "beautiful",
    "small",
    "large",
    "cute",
    "old",
    "young",
    "happy",
    "colorful",
    "quiet",
    "majestic",
    "fluffy",
    "elegant",
    "curious",
    "calm",
    "friendly",
    "bright",
    "detailed",
    "lovely",
    "striking",
    "charming",
)
_SHOTS = (
    "a photo",
    "a close-up photo",
    "a picture",
    "an image",
    "a high quality photo",
    "a snapshot",
    "a candid photo",
    "a wide shot",
    "a portrait",
    "a blurry photo",
)
_STRUCTURES = (
    "{art} {adj} {word} {verb} {bg}.",
    "{shot} of {art} {adj} {word} {verb} {bg}.",
    "{shot} of {art} {word} {bg}.",
    "{Art} {word} {verb} {bg}.",
    "{bg_cap}, {art} {adj} {word} is {verb}.",
    "there is {art} {adj} {word} {verb} {bg}.",
    "{shot} showing {art} {adj} {word} {bg}.",
    "{art} {adj} {word} {bg}, {verb}.",
    "{art} {word} {verb} {bg}, in soft natural light.",
    "{shot} of {art} {adj} {word}.",
    "this is {art} {adj} {word} {verb} {bg}.",
    "{art} {adj} {word}, {verb} {bg}, {shot_bare}.",
)


def _article(next_word: str) -> str:
    return "an" if next_word[:1].lower() in "aeiou" else "a"


def template_sentences(word: str, n: int = 300, seed: int = 0) -> list[str]:
    """``n`` distinct template sentences that all contain ``word`` (deterministic for a given seed).

    Built from sentence structures x shots x adjectives x verbs x backgrounds (like pix2pix-zero's fixed
    template; no language model). Such banks give more entangled directions than LLM-written ones.
    Banks for two words made with the same ``n`` and ``seed`` are *paired*: sentence i of both uses the
    same structure and context, so the mean difference isolates the word (articles a/an may differ).
    """
    word = " ".join(str(word).split())
    if not word:
        raise ValueError("template_sentences needs a non-empty word")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sizes = (len(_STRUCTURES), len(_SHOTS), len(_ADJECTIVES), len(_VERBS), len(_BACKGROUNDS))
    total = 1
    for s in sizes:
        total *= s
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    for idx in rng.sample(range(total), min(total, max(4 * n, n + 64))):
        k = idx
        parts = []
        for s in sizes:
            parts.append(k % s)
            k //= s
        st, sh, ad, vb, bg = parts
        adj, shot, background = _ADJECTIVES[ad], _SHOTS[sh], _BACKGROUNDS[bg]
        template = _STRUCTURES[st]
        art = _article(adj) if "{adj}" in template else _article(word)
        text = template.format(
            art=art,
            Art=art.capitalize(),
            adj=adj,
            word=word,
            verb=_VERBS[vb],
            bg=background,
            bg_cap=background[0].upper() + background[1:],
            shot=shot,
            shot_bare=shot.split(" ", 1)[1],
        )
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                break
    if len(out) < n:
        logger.warning("template_sentences: only %d distinct sentences for %r (asked for %d)", len(out), word, n)
    return out


def parse_sentence_list(text: str | Iterable[str]) -> list[str]:
    """User sentence list: one sentence per line; blank lines and lines starting with ``#`` are dropped."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    return [s for s in (" ".join(str(line).split()) for line in lines) if s and not s.startswith("#")]


# ---------------------------------------------------------------------------------------------------------
# Applying


def _different_clip(direction: EditDirection, what: str) -> ValueError:
    made_with = direction.extra.get("clip")
    return ValueError(
        f"the direction was made with a different CLIP{f' ({made_with})' if made_with else ''}: {what}. "
        "Make the direction with the CLIP that encoded this conditioning."
    )


def check_direction_fits(direction: EditDirection, cond: ConditioningLayout) -> None:
    """Raise ``ValueError`` naming both sides when ``direction`` cannot be added to a conditioning of layout
    ``cond`` (:func:`text_layout.conditioning_layout`): another width, another known family (Flux vs SD3),
    another set of SD3 encoders (a CLIP-L-only SD3 direction does not fit a CLIP-L + CLIP-G + T5 conditioning:
    it would leave two encoders unedited), a token count that is not whole 77-token chunks, or another pooled
    width."""
    mine = f"it is {direction.width} wide ({direction.kind()})"
    theirs = f"this conditioning is {cond.width} wide ({cond.describe()})"
    if cond.width != direction.width:
        raise _different_clip(direction, f"{mine}, but {theirs}")
    if direction.layout and cond.layout and direction.layout != cond.layout:
        raise _different_clip(direction, f"{mine}, but {theirs}")
    if cond.layout == "SD3" and direction.layout == "SD3" and set(cond.encoders) != set(direction.deltas):
        raise _different_clip(direction, f"{mine}, but {theirs}")
    if direction.segmented and (
        bool(direction.clip_encoders) != bool(cond.clip_tokens) or (T5_KEY in direction.deltas) != bool(cond.t5_tokens)
    ):  # e.g. an SD3 direction with CLIP-L on a conditioning that cannot be told SD3 or Flux (no pooled output)
        raise _different_clip(direction, f"{mine}, but {theirs}")
    if not direction.segmented and cond.tokens % direction.length != 0:
        raise ValueError(
            f"conditioning has {cond.tokens} tokens, not a multiple of the edit direction's {direction.length}: "
            "cannot add the direction"
        )
    if (
        direction.pooled is not None
        and cond.pooled_width is not None
        and cond.pooled_width != direction.pooled.shape[-1]
    ):
        raise _different_clip(
            direction,
            f"its pooled delta is {direction.pooled.shape[-1]} wide but this conditioning's pooled_output is "
            f"{cond.pooled_width} wide",
        )


@overload
def apply_direction(cond_embeds: Tensor, direction: EditDirection, strength: float, pooled: None = None) -> Tensor: ...
@overload
def apply_direction(
    cond_embeds: Tensor, direction: EditDirection, strength: float, pooled: Tensor
) -> tuple[Tensor, Tensor]: ...
def apply_direction(cond_embeds, direction, strength, pooled=None):
    """``cond + strength * delta`` at the conditioning's tokens (``(B, T, D)`` or ``(T, D)``).

    SD1.x/SD2.x/SDXL: the delta on every 77-token chunk (a 154-token conditioning gets it twice). SD3: the
    CLIP delta on every chunk of the CLIP part, the T5 delta on the first ``min(L, n)`` of its n T5 tokens;
    Flux: the T5 delta likewise (:meth:`EditDirection.delta_for`). Returns the new conditioning (same
    dtype/device); when ``pooled`` ``(B, P)`` is given, returns ``(cond, pooled)`` with ``pooled + strength *
    direction.pooled`` (unchanged if the direction has no pooled delta). Inputs are not modified. Raises
    ``ValueError`` (:func:`check_direction_fits`) when the direction does not fit the conditioning.
    """
    if cond_embeds.ndim not in (2, 3):
        raise ValueError(f"conditioning must be (B, tokens, D) or (tokens, D), got {tuple(cond_embeds.shape)}")
    l_width = int(direction.deltas["l"].shape[-1]) if direction.layout == "SD3" and "l" in direction.deltas else None
    layout = conditioning_layout(cond_embeds, pooled, l_width=l_width or SD3_L_WIDTH)
    check_direction_fits(direction, layout)
    strength = float(strength)
    if direction.segmented:
        delta = direction.delta_for(layout.clip_tokens, layout.t5_tokens)
        if layout.t5_tokens != direction.t5_length:
            logger.info(
                "edit direction: T5 delta (%d tokens) added to the first %d of the conditioning's %d T5 tokens",
                direction.t5_length,
                min(direction.t5_length, layout.t5_tokens),
                layout.t5_tokens,
            )
    else:
        delta = direction.delta.repeat(layout.tokens // direction.length, 1)
    delta = delta.to(cond_embeds.device)
    work = torch.float64 if cond_embeds.dtype == torch.float64 else torch.float32
    if strength == 0.0:
        out = cond_embeds.clone()
    else:
        out = (cond_embeds.to(work) + strength * delta.to(work)).to(cond_embeds.dtype)
    if pooled is None:
        return out
    if direction.pooled is None or strength == 0.0:
        return out, pooled.clone()
    pwork = torch.float64 if pooled.dtype == torch.float64 else torch.float32
    new_pooled = (pooled.to(pwork) + strength * direction.pooled.to(pooled.device, pwork)).to(pooled.dtype)
    return out, new_pooled


# ---------------------------------------------------------------------------------------------------------
# Saving / loading


def save_direction(path: str | os.PathLike, direction: EditDirection) -> None:
    """Write ``direction`` to a ``.safetensors`` file with metadata (atomic: temp file, then ``os.replace``)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = {f"delta.{k}": v.detach().to("cpu").contiguous().clone() for k, v in direction.deltas.items()}
    if direction.pooled is not None:
        tensors["pooled"] = direction.pooled.detach().to("cpu").contiguous().clone()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if direction.segmented else 1),
        "layout": direction.layout,
        "source": direction.source,
        "target": direction.target,
        "mode": direction.mode,
        "encoders": json.dumps([[k, w] for k, w in direction.encoders]),
        "width": str(direction.width),
        "num_source_sentences": str(direction.num_source),
        "num_target_sentences": str(direction.num_target),
        "extra": json.dumps(direction.extra),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logger.info("saved edit direction %s to %s", direction.describe(), path)


def load_direction(path: str | os.PathLike) -> EditDirection:
    """Read a direction written by :func:`save_direction`. Raises ``FileNotFoundError`` / ``ValueError``.

    Files without a ``layout`` field (written before SD3 / Flux support), or with one this version does not
    know, get the layout the one rule (``identify_layout``) infers from their encoder names and widths."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"edit direction file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path} is not an edit direction file (not a readable .safetensors file: {e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an edit direction file (its metadata has no format '{FORMAT}')")
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = -1
    if version < 1 or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: edit direction format version {meta.get('format_version')!r} is not supported "
            f"(this version reads 1..{FORMAT_VERSION}; update ComfyUI-ZeroCon)"
        )
    try:
        encoders = [(str(k), int(w)) for k, w in json.loads(meta["encoders"])]
        deltas = {k: tensors[f"delta.{k}"] for k, _ in encoders}
        extra = json.loads(meta.get("extra", "{}"))
        layout = meta.get("layout", "")
        if layout and layout not in LAYOUTS:
            logger.warning("%s: unknown edit direction layout %r; inferring it from the widths", path, layout)
        d = EditDirection(
            layout=layout if layout in LAYOUTS else "",
            deltas=deltas,
            pooled=tensors.get("pooled"),
            source=meta.get("source", ""),
            target=meta.get("target", ""),
            mode=meta.get("mode", "sentences"),
            num_source=int(meta.get("num_source_sentences", "0")),
            num_target=int(meta.get("num_target_sentences", "0")),
            extra={str(k): str(v) for k, v in extra.items()},
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: broken edit direction file ({e})") from e
    for k, w in encoders:
        if d.deltas[k].shape[-1] != w:
            raise ValueError(f"{path}: broken edit direction file (encoder {k} should be {w} wide)")
    return d


# ---------------------------------------------------------------------------------------------------------
# transformers CLIP encoders (diffusers / CLI side)


class _Encoder:
    """An encode callable with an ``encoders`` attribute (the split of its output width)."""

    def __init__(self, fn, encoders):
        self._fn = fn
        self.encoders = tuple(encoders)

    def __call__(self, texts: list[str]):
        return self._fn(list(texts))


def _tokenize(tokenizer, texts, device):
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def clip_encoder(tokenizer, text_encoder, device=None, batch_size: int = 64) -> EncodeFn:
    """Encode callable over a transformers ``CLIPTokenizer`` + ``CLIPTextModel`` (SD1.x / SD2.x, as diffusers).

    Texts are padded/truncated to ``tokenizer.model_max_length`` (77); returns ``(last_hidden_state (N, 77, D)
    float32 on the CPU, None)``. Runs under ``torch.no_grad`` in batches of ``batch_size``.
    """
    dev = _model_device(text_encoder, device)
    width = int(text_encoder.config.hidden_size)

    def encode(texts: list[str]):
        outs = []
        for i in range(0, len(texts), batch_size):
            with torch.no_grad():
                out = text_encoder(_tokenize(tokenizer, texts[i : i + batch_size], dev))
            outs.append(out.last_hidden_state.float().cpu())
        return torch.cat(outs), None

    return _Encoder(encode, default_encoders(width) if width in (768, 1024) else (("l", width),))


def sdxl_clip_encoder(
    tokenizer, text_encoder, tokenizer_2, text_encoder_2, device=None, batch_size: int = 64
) -> EncodeFn:
    """Encode callable for SDXL's two encoders, as diffusers ``StableDiffusionXLPipeline.encode_prompt``.

    Penultimate hidden states of ``text_encoder`` (CLIPTextModel, "l") and ``text_encoder_2``
    (CLIPTextModelWithProjection, "g") concatenated -> ``(N, 77, D1 + D2)``; pooled = ``text_encoder_2``'s
    ``text_embeds`` ``(N, P)``. Float32 on the CPU.
    """
    dev1 = _model_device(text_encoder, device)
    dev2 = _model_device(text_encoder_2, device)
    w1, w2 = int(text_encoder.config.hidden_size), int(text_encoder_2.config.hidden_size)

    def encode(texts: list[str]):
        embs, pooleds = [], []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            with torch.no_grad():
                o1 = text_encoder(_tokenize(tokenizer, chunk, dev1), output_hidden_states=True)
                o2 = text_encoder_2(_tokenize(tokenizer_2, chunk, dev2), output_hidden_states=True)
            h1 = o1.hidden_states[-2].float().cpu()
            h2 = o2.hidden_states[-2].float().cpu()
            embs.append(torch.cat([h1, h2], dim=-1))
            pooleds.append(o2.text_embeds.float().cpu())
        return torch.cat(embs), torch.cat(pooleds)

    return _Encoder(encode, (("l", w1), ("g", w2)))
