"""ZeroCon Encode Prompts: one prompt per image (one per line, e.g. BLIP Caption's captions of a batch) into one
CONDITIONING whose batch row i is prompt i, so a batch of N images is edited in one run with N captions.

Each line is encoded exactly as CLIP Text Encode encodes a prompt (``clip.tokenize`` +
``clip.encode_from_tokens_scheduled``); one line gives CLIP Text Encode's output unchanged. The rows are then
stacked along the batch axis (``pooled_output`` too). Prompts of different lengths (more than 75 tokens:
several 77-token chunks) are brought to a common length by repeating their tokens, as ComfyUI does when it
batches conditionings of different lengths (comfy/conds.py): attention over a repeated key/value sequence gives
the same result.
"""

from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io, ui

from ..zerocon_core.prompts import split_prompts
from .inputs import CATEGORY

logger = logging.getLogger("zerocon")

NODE = "ZeroCon Encode Prompts"


def _stack(rows: list[list], prompts: list[str]) -> list:
    """One CONDITIONING entry from N single-entry CONDITIONINGs of batch 1 (row i = prompt i)."""
    conds = [row[0][0] for row in rows]
    length = math.lcm(*(int(c.shape[1]) for c in conds))
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
    for i, prompt in enumerate(prompts):
        row = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        if len(prompts) == 1:
            return row
        if len(row) != 1:
            raise ValueError(
                f"{NODE}: line {i + 1} encodes to {len(row)} scheduled conditionings (CLIP hooks with a schedule); "
                "batching needs one per prompt: encode such prompts with CLIP Text Encode, one image at a time"
            )
        rows.append(row)
    return _stack(rows, prompts)


class ZeroConEncodePrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
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
