"""One prompt per image, carried in a single string: one line per image.

A batch of N images travels through a graph as one IMAGE; its captions travel as one STRING of N lines
(``join_prompts``), so the nodes after the caption node run once for the whole batch. Whoever needs the
prompts one by one (the caption encoder, the edit metrics) splits the string back with ``split_prompts``.
A single-line string is one prompt shared by every image.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["SEPARATOR", "join_prompts", "split_prompts"]

SEPARATOR = "\n"


def join_prompts(prompts: Sequence[str]) -> str:
    """The prompts as one string, one per line; line breaks inside a prompt become spaces."""
    if isinstance(prompts, str):
        raise TypeError("join_prompts takes a list of prompts, not a single string")
    return SEPARATOR.join(" ".join(str(p).split()) for p in prompts)


def split_prompts(text: str) -> list[str]:
    """The prompts of ``text``, one per non-blank line (surrounding whitespace removed); ``[]`` for a blank text."""
    return [line.strip() for line in str(text).splitlines() if line.strip()]
