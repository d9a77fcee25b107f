"""ZeroCon Encode Prompts: one prompt per image (one per line, e.g. BLIP Caption's captions of a batch) into one
CONDITIONING whose batch row i is prompt i, so a batch of N images is edited in one run with N captions.

Each line is encoded exactly as CLIP Text Encode encodes a prompt (``clip.tokenize`` +
``clip.encode_from_tokens_scheduled``); one line gives CLIP Text Encode's output unchanged. The rows are then
stacked along the batch axis (``pooled_output`` too). Prompts of different lengths (more than 75 tokens:
several 77-token chunks) are brought to a common length by repeating their tokens, as ComfyUI does when it
batches conditionings of different lengths (comfy/conds.py): cross-attention over a repeated key/value sequence
gives the same result.

SD3 / SD3.5 and Flux CLIPs (a T5-XXL tokenizer): T5 encodes a prompt as one sequence, padded to a minimum length
(77 SD3, 256 Flux), and these models attend jointly over text and image tokens, where repeating text tokens
would change the attention weights. So when the prompts' T5 token counts differ, every line is tokenized again
with the T5 minimum length set to the longest line's (the tokenizer's own ``t5xxl_min_length`` option, what
T5 Tokenizer Options sets): the T5 sequences get the same length by T5's own padding. Row i is then CLIP Text
Encode of line i with that T5 padding. SD3 lines with different numbers of 77-token CLIP chunks (more than 75
CLIP tokens) cannot be batched exactly and are an error naming the line.
"""

from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io, ui

from ...zerocon_core.text.prompts import split_prompts
from ...zerocon_core.text.text_layout import T5_KEY
from ..glue.inputs import CATEGORY, schema

logger = logging.getLogger("zerocon")

NODE = "ZeroCon Encode Prompts"


def _tokenize_all(clip, prompts: list[str]) -> list[dict]:
    """Tokens of every prompt; with a T5 tokenizer, its sequences padded to the longest prompt's T5 length."""
    tokens = [clip.tokenize(prompt) for prompt in prompts]
    if len(prompts) > 1 and all(T5_KEY in t for t in tokens):
        lengths = [sum(len(chunk) for chunk in t[T5_KEY]) for t in tokens]
        if len(set(lengths)) > 1:
            options = {f"{T5_KEY}_min_length": max(lengths)}
            tokens = [clip.tokenize(prompt, tokenizer_options=options) for prompt in prompts]
            logger.info("%s: T5 sequences padded to %d tokens (the longest line's)", NODE, max(lengths))
    return tokens


def _stack(rows: list[list], prompts: list[str], joint: bool = False) -> list:
    """One CONDITIONING entry from N single-entry CONDITIONINGs of batch 1 (row i = prompt i). ``joint``: the
    CLIP has a T5 (SD3 / Flux), whose models attend jointly over text and image: no repeating (see the module
    docstring)."""
    conds = [row[0][0] for row in rows]
    length = math.lcm(*(int(c.shape[1]) for c in conds))
    if joint and len({int(c.shape[1]) for c in conds}) > 1:
        counts = [int(c.shape[1]) for c in conds]
        i = next(i for i, n in enumerate(counts) if n != counts[0])
        raise ValueError(
            f"{NODE}: line {i + 1} encodes to {counts[i]} tokens and line 1 to {counts[0]} (different numbers of "
            "77-token CLIP chunks: a line has more than 75 CLIP tokens); SD3 attends jointly over text and image, "
            "so repeating tokens to batch them would change the result: shorten the lines to 75 CLIP tokens or "
            "encode the images one at a time with CLIP Text Encode"
        )
    cond = torch.cat([c.repeat(1, length // int(c.shape[1]), 1) for c in conds])
    extras = [row[0][1] for row in rows]
    keys = set(extras[0])
    out = {}
    for i, extra in enumerate(extras):
        if set(extra) != keys:
            raise ValueError(f"{NODE}: line {i + 1} ({prompts[i]!r}) encodes to other fields than line 1")
    for key in keys:
        values = [extra[key] for extra in extras]
        if all(isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1 for v in values):
            if len({tuple(v.shape[1:]) for v in values}) != 1:
                raise ValueError(f"{NODE}: the prompts' {key!r} differ in shape: {[tuple(v.shape) for v in values]}")
            out[key] = torch.cat(values)
        elif all(v is values[0] or (not isinstance(v, torch.Tensor) and v == values[0]) for v in values):
            out[key] = values[0]
        else:
            raise ValueError(f"{NODE}: the prompts' {key!r} cannot be batched (it differs between prompts)")
    return [[cond, out]]


def encode_prompts(clip, prompts: list[str]) -> list:
    """CONDITIONING of batch ``len(prompts)``: row i is what CLIP Text Encode gives for ``prompts[i]``."""
    rows = []
    all_tokens = _tokenize_all(clip, prompts)
    for i, tokens in enumerate(all_tokens):
        row = clip.encode_from_tokens_scheduled(tokens)
        if len(prompts) == 1:
            return row
        if len(row) != 1:
            raise ValueError(
                f"{NODE}: line {i + 1} encodes to {len(row)} scheduled conditionings (CLIP hooks with a schedule); "
                "batching needs one per prompt: encode such prompts with CLIP Text Encode, one image at a time"
            )
        rows.append(row)
    return _stack(rows, prompts, joint=T5_KEY in all_tokens[0])


class ZeroConEncodePrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConEncodePrompts",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "CLIP Text Encode for a batch: one prompt per line (ZeroCon BLIP Caption writes one caption per image, "
                "one per line) becomes one CONDITIONING whose row i conditions image i of the batch. One line gives "
                "exactly what CLIP Text Encode gives."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP (text encoder) of the model you edit with."),
                io.String.Input(
                    "text",
                    multiline=True,
                    default="",
                    tooltip="One prompt per line, in the order of the images in the batch (blank lines are skipped). "
                    "Connect ZeroCon BLIP Caption's caption here. A single line is shared by every image.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    "conditioning",
                    display_name="CONDITIONING",
                    tooltip="Batch = number of lines (row i: line i); batch 1 for a single line.",
                )
            ],
        )

    @classmethod
    def execute(cls, clip, text) -> io.NodeOutput:
        if clip is None:
            raise ValueError(
                f"{NODE}: the clip input is None (the checkpoint loaded has no text encoder); connect a CLIP"
            )
        prompts = split_prompts(text)
        if not prompts:
            raise ValueError(f"{NODE}: the text is empty; give one prompt per line (one per image)")
        cond = encode_prompts(clip, prompts)
        shown = f"{len(prompts)} prompt(s), one per image" if len(prompts) > 1 else "1 prompt, shared by every image"
        return io.NodeOutput(cond, ui=ui.PreviewText(shown))


NODES: list[type[io.ComfyNode]] = [ZeroConEncodePrompts]
