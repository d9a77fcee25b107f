"""A toy world whose truth is known: drawn scenes (a coloured shape on a background) with their masks and
captions (:mod:`.world`), a checker that reads colour, shape, background and mask back from pixels
(:mod:`.checker`), the word-level tokenizer and model configs of the small text-to-image model trained on it
(:mod:`.model`), and the held-out edit set with its scoring (:mod:`.edits`). See docs/toyworld.md.

Nothing here imports ComfyUI; the model parts need diffusers and transformers (the ``cli`` extra).
"""

from .world import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, Scene, random_scene, render

__all__ = ["BACKGROUNDS", "COLOURS", "IMAGE_SIZE", "SHAPES", "Scene", "random_scene", "render"]
