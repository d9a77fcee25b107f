"""Edit-direction nodes: make a CLIP edit direction, save / load it, add it to a CONDITIONING.

The math lives in ``zerocon_core.text.direction``; this module adapts ComfyUI's CLIP object to the engine's encode
callable ``encode(texts) -> (embeds (N, 77, D_total), pooled (N, P) | None)`` (``ComfyClipEncoder``: batched
sentences, pooled outputs, SD3 / Flux T5 lengths, the per-CLIP cache; docs/nodes-internals.md).
"""

from __future__ import annotations

import logging
import os
import weakref

import folder_paths
import torch
from comfy_api.latest import io, ui

from ...zerocon_core.text import direction as zdir
from ...zerocon_core.text import text_layout as zlayout
from ..glue import paths, progress
from ..glue.inputs import CATEGORY, schema

logger = logging.getLogger("zerocon")

Direction = io.Custom("ZEROCON_DIRECTION")

MODES = ("sentence bank", "prompt difference")

#: Mean embeddings of sentence lists per CLIP (bounded; see the module docstring).
BANK_CACHE = zdir.EmbeddingCache(max_entries=16)


# ---------------------------------------------------------------------------------------------------------
# ComfyUI CLIP -> engine encode callable


def _encoder_width(module) -> int | None:
    try:
        return int(module.transformer.get_input_embeddings().weight.shape[-1])
    except Exception:
        return None


def _ref(obj):
    """A hashable stand-in for ``obj``'s identity: a weak reference when possible (None stays None)."""
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return id(obj)


class ComfyClipEncoder:
    """The engine's encode callable over a ComfyUI ``CLIP`` (``comfy.sd.CLIP``).

    ``encoders`` is the split of the conditioning width by text encoder, in concatenation order
    (``(("l", 768),)`` for SD1.x, ``(("l", 768), ("g", 1280))`` for SDXL; SD3 / Flux: the encoders present,
    ``t5xxl`` included, see the module docstring). ``layout``: ``text_layout.identify_layout`` of the tokenizer's
    keys. ``pooled`` says whether pooled outputs are returned (SDXL, SD3 and Flux CLIPs, whose models use them).
    ``info`` describes the CLIP for the direction's metadata.
    """

    def __init__(self, clip, pooled: bool | None = None):
        if clip is None:
            raise ValueError(
                "ZeroCon Edit Direction: the clip input is None (the checkpoint loaded has no text encoder); "
                "connect a CLIP"
            )
        self.clip = clip
        probe = clip.tokenize("a")
        self.keys = tuple(probe.keys())
        self.layout = zlayout.identify_layout(keys=self.keys)
        self.segmented = self.layout in zdir.SEGMENTED
        self.pooled = ("g" in self.keys or self.segmented) if pooled is None else bool(pooled)
        self._truncated = 0
        self._t5_truncated = 0
        self._fast_pooled: bool | None = None  # None: not tried yet
        self.encoders: tuple[tuple[str, int], ...] | None = None
        self.t5_length = 0
        if self.segmented:
            self.encoders = self._segmented_encoders()
            self.t5_length = max(len(probe[zlayout.T5_KEY][0]), zlayout.CHUNK)
        self.info = {
            "clip": type(clip.cond_stage_model).__name__,
            "clip_keys": ",".join(self.keys),
            "clip_layer": str(getattr(clip, "layer_idx", None)),
        }

    def _segmented_encoders(self) -> tuple[tuple[str, int], ...]:
        """SD3 / Flux: ``((name, width), ...)`` of the encoders this CLIP has (SD3: any of l, g, t5xxl; Flux: the
        T5 only, as its sequence is T5's)."""
        model = self.clip.cond_stage_model
        names = ("l", "g", zlayout.T5_KEY) if self.layout == "SD3" else (zlayout.T5_KEY,)
        out = []
        for name in names:
            module = getattr(model, name if name == zlayout.T5_KEY else f"clip_{name}", None)
            if module is None:
                continue
            width = _encoder_width(module)
            if width is None:
                raise ValueError(f"ZeroCon Edit Direction: cannot read the width of this CLIP's {name} encoder")
            out.append((name, width))
        if not out:
            raise ValueError(f"ZeroCon Edit Direction: this {self.layout} CLIP has no text encoder loaded")
        return tuple(out)

    def _fit_t5(self, chunk: list) -> list:
        """One sentence's T5 tokens padded (pad token) or cut (end token kept last) to ``t5_length``."""
        tok = self.clip.tokenizer.t5xxl
        n = self.t5_length
        if len(chunk) > n:
            self._t5_truncated += 1
            return list(chunk[: n - 1]) + [(tok.end_token, 1.0)]
        return list(chunk) + [(tok.pad_token, 1.0)] * (n - len(chunk))

    @property
    def cache_key(self) -> tuple:
        """What makes two CLIPs encode alike: the text-encoder and tokenizer objects (weak references: a freed
        model never matches a new one at the same address), the layer (CLIP Set Last Layer), the weight patches
        (LoRA; ComfyUI renews ``patches_uuid`` whenever patches are added) and the tokenizer options."""
        clip = self.clip
        patcher = getattr(clip, "patcher", None)
        return (
            _ref(clip.cond_stage_model),
            _ref(getattr(clip, "tokenizer", None)),
            getattr(clip, "layer_idx", None),
            getattr(patcher, "patches_uuid", None),
            repr(sorted(getattr(clip, "tokenizer_options", {}).items())),
        )

    # ------------------------------------------------------------------ tokens
    def _tokens(self, texts: list[str]) -> dict[str, list]:
        """One token dict holding the first 77-token chunk of every text, in order."""
        merged: dict[str, list] = {k: [] for k in self.keys}
        for text in texts:
            tok = self.clip.tokenize(text)
            if set(tok) != set(self.keys):
                raise ValueError(
                    f"the CLIP tokenizer gave keys {sorted(tok)} for one sentence and {sorted(self.keys)} for another"
                )
            if any(len(chunks) > 1 for k, chunks in tok.items() if k != zlayout.T5_KEY):
                self._truncated += 1
            for k in self.keys:
                if k == zlayout.T5_KEY and self.segmented:
                    merged[k].append(self._fit_t5([t for chunk in tok[k] for t in chunk]))
                else:
                    merged[k].append(tok[k][0])
        return merged

    def _split_widths(self, width: int) -> tuple[tuple[str, int], ...]:
        model = self.clip.cond_stage_model
        # ComfyUI concatenates SDXL's encoders l first, then g (comfy/sdxl_clip.py SDXLClipModel).
        order = [k for k in ("l", "g") if k in self.keys] + [k for k in self.keys if k not in ("l", "g")]
        widths = [_encoder_width(getattr(model, f"clip_{k}", None)) for k in order]
        if all(w is not None for w in widths) and sum(widths) == width:
            return tuple(zip(order, widths))
        if len(order) == 1:
            return ((order[0], width),)
        guess = zdir.default_encoders(width)
        if len(guess) == len(order):
            return guess
        return (("+".join(order), width),)

    # ------------------------------------------------------------------ pooled
    def _pooled_parts(self) -> list[tuple[str, int | None]]:
        """The encoders whose pooled outputs ComfyUI returns, in order, each with the width of the zeros it
        puts there when the encoder is absent (None: it must be present): SDXL's "g"; a single-encoder CLIP's
        only one; SD3 "l" (768) + "g" (1280); Flux "l"."""
        if self.layout == "SD3":
            return [("l", zlayout.SD3_L_WIDTH), ("g", zlayout.SD3_CLIP_WIDTH - zlayout.SD3_L_WIDTH)]
        if self.layout == "Flux":
            return [("l", None)]
        if "g" in self.keys:
            return [("g", None)]
        return [(self.keys[0], None)] if len(self.keys) == 1 else []

    def _pooled_fast(self, tokens: dict, first_pooled: torch.Tensor) -> torch.Tensor | None:
        """Per-sentence pooled outputs from the pooled encoders' own batched ``encode`` (or None)."""
        parts = self._pooled_parts()
        n = len(tokens[self.keys[0]])
        rows = []
        for key, zero_width in parts:
            module = getattr(self.clip.cond_stage_model, f"clip_{key}", None)
            if module is None and zero_width is not None:
                rows.append(torch.zeros(n, zero_width))
                continue
            if module is None or not hasattr(module, "encode"):
                return None
            try:
                out = module.encode([[t[0] for t in chunk] for chunk in tokens[key]])
                pooled = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            except Exception:
                logger.debug("ZeroCon: batched pooled encode failed", exc_info=True)
                return None
            if pooled is None or pooled.ndim != 2 or pooled.shape[0] != n:
                return None
            rows.append(pooled.float().cpu())
        if not rows:
            return None
        pooled = torch.cat(rows, dim=-1)
        ref = first_pooled.reshape(-1).float().cpu()
        # Same tokens through the same module: only a wrong layout guess gives a real difference (the tolerance
        # leaves room for fp16 kernels that differ with the batch size).
        if pooled.shape[1] != ref.shape[0] or (pooled[0] - ref).norm() > 1e-2 * ref.norm() + 1e-6:
            logger.warning("ZeroCon: batched pooled outputs do not match ComfyUI's; encoding pooled outputs one by one")
            return None
        return pooled

    def _pooled_slow(self, tokens: dict, n: int) -> torch.Tensor:
        rows = []
        for i in range(n):
            one = {k: [tokens[k][i]] for k in self.keys}
            _, pooled = self.clip.encode_from_tokens(one, return_pooled=True)
            rows.append(pooled.reshape(1, -1).float().cpu())
        return torch.cat(rows)

    # ------------------------------------------------------------------ call
    def __call__(self, texts: list[str]):
        texts = list(texts)
        n = len(texts)
        if n == 0:
            raise ValueError("nothing to encode")
        tokens = self._tokens(texts)
        with torch.no_grad():
            cond, first_pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            embeds = self._per_sentence(cond, n)
            pooled = None
            if self.pooled:
                if first_pooled is None:
                    raise ValueError("ZeroCon: this CLIP gives no pooled output")
                if self._fast_pooled is not False:
                    pooled = self._pooled_fast(tokens, first_pooled)
                    self._fast_pooled = pooled is not None
                if pooled is None:
                    pooled = self._pooled_slow(tokens, n)
        if self.encoders is None:
            self.encoders = self._split_widths(int(embeds.shape[-1]))
        return embeds, pooled

    def _per_sentence(self, cond: torch.Tensor, n: int) -> torch.Tensor:
        """``(1, tokens, D)`` for n sentences -> ``(n, tokens / n, D)``: CLIP chunks are one per sentence; SD3
        puts all CLIP chunks first, then all T5 sequences (``SD3ClipModel.encode_token_weights``)."""
        width = int(cond.shape[-1])
        if self.segmented:
            names = {k for k, _ in self.encoders}
            clip_tokens = zlayout.CHUNK if names & {"l", "g"} else 0
            t5_tokens = self.t5_length if zlayout.T5_KEY in names else 0
            expected = n * (clip_tokens + t5_tokens)
        else:
            expected = zlayout.CHUNK * n
        if cond.shape[-2] != expected:
            raise ValueError(
                f"ZeroCon: this CLIP encoded {n} sentences to {cond.shape[-2]} tokens, not {expected}: only CLIPs "
                "with 77-token chunks (SD1.x, SD2.x, SDXL) and SD3 / Flux CLIPs are supported"
            )
        cond = cond.float().cpu()
        if not self.segmented:
            return cond.reshape(n, zlayout.CHUNK, width)
        clip_part = cond[0, : n * clip_tokens].reshape(n, clip_tokens, width)
        t5_part = cond[0, n * clip_tokens :].reshape(n, t5_tokens, width)
        return torch.cat([clip_part, t5_part], dim=1)

    def finish(self) -> None:
        if self._t5_truncated:
            logger.warning(
                "ZeroCon: %d sentence(s) longer than %d T5 tokens were cut to %d tokens",
                self._t5_truncated,
                self.t5_length,
                self.t5_length,
            )
            self._t5_truncated = 0
        if self._truncated:
            logger.warning(
                "ZeroCon: %d sentence(s) longer than 75 tokens were cut to their first 77-token chunk", self._truncated
            )
            self._truncated = 0


# ---------------------------------------------------------------------------------------------------------
# Nodes


def _sentence_list_input(side: str) -> io.String.Input:
    """The optional ``<side>_sentences`` (sentence bank only): the user's sentences replacing the templates."""
    return io.String.Input(
        f"{side}_sentences",
        multiline=True,
        default="",
        optional=True,
        tooltip=f"Sentence bank only, optional: your own {side} sentences, one per line (lines starting with # are "
        f"ignored). Replaces the templates for the {side} side.",
    )


def _bank_sentences(side: str, word: str, listing: str, count: int) -> list[str]:
    """One side of a sentence bank: the lines of ``listing``, else ``count`` template sentences about ``word``
    (``ValueError`` when both are empty)."""
    sentences = zdir.parse_sentence_list(listing or "")
    if sentences:
        return sentences
    if not word.strip():
        raise ValueError(f"ZeroCon Edit Direction: give a {side} word or a list of {side} sentences")
    return zdir.template_sentences(word, count)


def _prompt_difference(encode, source: str, target: str, lists: tuple[str, str]):
    """The direction target prompt minus source prompt (``lists``: the sentence inputs, ignored with a log line)."""
    if not source.strip() or not target.strip():
        raise ValueError("ZeroCon Edit Direction: prompt difference needs a non-empty source and target prompt")
    if any((text or "").strip() for text in lists):
        logger.info("ZeroCon Edit Direction: sentence lists are ignored in 'prompt difference' mode")
    return zdir.prompt_difference_direction(encode, source, target, encoders=None)


def _sentence_bank(encode, words: tuple[str, str], sentences: tuple[list[str], list[str]], batch_size: int):
    """The sentence-bank direction from the ``(source, target)`` sentences, with a progress bar and ``BANK_CACHE``."""
    with progress.WorkProgress("ZeroCon Edit Direction", unit="sentence") as report:
        return zdir.sentence_bank_direction(
            encode,
            *sentences,
            source=words[0],
            target=words[1],
            batch_size=batch_size,
            progress=report,
            cache=BANK_CACHE,
        )


def _edit_direction_inputs() -> list:
    """Edit Direction's inputs: the CLIP, the two sides, the mode, the sentence-bank settings and lists."""
    return [
        io.Clip.Input(
            "clip",
            tooltip="The CLIP (text encoder) of the model you edit with; the direction only fits conditionings made by a CLIP of the same kind.",
        ),
        io.String.Input(
            "source",
            default="cat",
            tooltip="Sentence bank: the word or phrase to edit away (e.g. 'cat'). Prompt difference: the source prompt, usually the image caption.",
        ),
        io.String.Input(
            "target",
            default="dog",
            tooltip="Sentence bank: the word or phrase to edit towards (e.g. 'dog'). Prompt difference: the target prompt (the caption with the edit).",
        ),
        io.Combo.Input(
            "mode",
            options=list(MODES),
            default=MODES[0],
            tooltip="'sentence bank': mean over many sentences per side (pix2pix-zero; less entangled). 'prompt difference': one prompt per side.",
        ),
        io.Int.Input(
            "num_sentences",
            default=300,
            min=1,
            max=5000,
            tooltip="Sentence bank only: how many built-in template sentences to generate per side when no sentence list is given. pix2pix-zero uses about 1000.",
        ),
        io.Int.Input(
            "batch_size",
            default=32,
            min=1,
            max=1024,
            tooltip="Sentences encoded per CLIP call. Lower it if the text encoder runs out of memory.",
        ),
        _sentence_list_input("source"),
        _sentence_list_input("target"),
    ]


class ZeroConEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConEditDirection",
            display_name="ZeroCon Edit Direction",
            category=CATEGORY,
            description=(
                "Builds a text-embedding edit direction with your CLIP (pix2pix-zero): the mean CLIP embedding of "
                "sentences about the target minus that of sentences about the source (sentence bank), or the "
                "embedding of a target prompt minus that of the source prompt (prompt difference). Add it to the "
                "caption's conditioning with ZeroCon Apply Edit Direction."
            ),
            inputs=_edit_direction_inputs(),
            outputs=[
                Direction.Output(
                    "direction",
                    display_name="direction",
                    tooltip="The edit direction (77 tokens x the CLIP's width; SDXL also a pooled delta; SD3 / Flux: the CLIP and T5 token deltas and the pooled delta).",
                )
            ],
        )

    @classmethod
    def execute(
        cls, clip, source, target, mode, num_sentences, batch_size, source_sentences="", target_sentences=""
    ) -> io.NodeOutput:
        encode = ComfyClipEncoder(clip)
        if mode == "prompt difference":
            direction = _prompt_difference(encode, source, target, (source_sentences, target_sentences))
        elif mode == "sentence bank":
            src = _bank_sentences("source", source, source_sentences, num_sentences)
            tgt = _bank_sentences("target", target, target_sentences, num_sentences)
            direction = _sentence_bank(encode, (source, target), (src, tgt), batch_size)
        else:
            raise ValueError(f"ZeroCon Edit Direction: unknown mode {mode!r}; use one of {list(MODES)}")
        encode.finish()
        direction.extra.update(encode.info)
        return io.NodeOutput(direction, ui=ui.PreviewText(direction.describe()))


class ZeroConApplyEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConApplyEditDirection",
            display_name="ZeroCon Apply Edit Direction",
            category=CATEGORY,
            description=(
                "Adds strength x the edit direction to a conditioning (every 77-token CLIP chunk; SD3 / Flux: the T5 "
                "delta on the first T5 tokens), and its pooled delta to pooled_output (SDXL, SD3, Flux). Everything else in the conditioning (areas, masks, hooks, timestep "
                "ranges...) is kept."
            ),
            inputs=[
                io.Conditioning.Input(
                    "conditioning",
                    tooltip="The conditioning to edit, normally CLIP Text Encode of the image caption (same CLIP as the direction).",
                ),
                Direction.Input(
                    "direction", tooltip="An edit direction from ZeroCon Edit Direction or ZeroCon Load Edit Direction."
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.05,
                    tooltip="How far to move along the direction: 0 leaves the conditioning unchanged, 1 is pix2pix-zero's edit, negative values edit the other way.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    "edited_conditioning", display_name="CONDITIONING", tooltip="The edited conditioning."
                )
            ],
        )

    @classmethod
    def execute(cls, conditioning, direction, strength) -> io.NodeOutput:
        if not isinstance(direction, zdir.EditDirection):
            raise TypeError(f"ZeroCon Apply Edit Direction: expected an edit direction, got {type(direction).__name__}")
        out = []
        for cond, extra in conditioning:
            d = dict(extra)
            pooled = extra.get("pooled_output")
            if direction.pooled is not None and pooled is None and strength != 0:
                logger.warning(
                    "ZeroCon Apply Edit Direction: the conditioning has no pooled_output; the pooled delta is not applied"
                )
            try:
                if pooled is not None:
                    new_cond, d["pooled_output"] = zdir.apply_direction(cond, direction, strength, pooled)
                else:
                    new_cond = zdir.apply_direction(cond, direction, strength)
            except ValueError as exc:
                raise ValueError(f"ZeroCon Apply Edit Direction: {exc}") from exc
            out.append([new_cond, d])
        return io.NodeOutput(out)


def _direction_path(name: str) -> str:
    """``models/edit_directions/<name>.safetensors`` (first registered folder), refusing paths that leave it."""
    name = (name or "").strip()
    if not name:
        raise ValueError("ZeroCon Save Edit Direction: give a file name")
    if not name.lower().endswith(paths.DIRECTION_EXTENSION):
        name += paths.DIRECTION_EXTENSION
    base = os.path.abspath(paths.folders(paths.EDIT_DIRECTIONS)[0])
    path = os.path.abspath(os.path.join(base, name))
    if os.path.commonpath((base, path)) != base or os.path.isabs(name):
        raise ValueError(f"ZeroCon Save Edit Direction: {name!r} must be a file name inside {base}")
    return path


class ZeroConSaveEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConSaveEditDirection",
            display_name="ZeroCon Save Edit Direction",
            category=CATEGORY,
            description="Saves an edit direction as .safetensors (with its metadata) under models/edit_directions, for ZeroCon Load Edit Direction.",
            is_output_node=True,
            inputs=[
                Direction.Input("direction", tooltip="The edit direction to save."),
                io.String.Input(
                    "filename",
                    default="cat_to_dog",
                    tooltip="File name under models/edit_directions (subfolders allowed; .safetensors is added).",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing file of the same name. Off (default): an existing file makes the node fail, naming the file, so a saved direction is never replaced by accident.",
                ),
            ],
            outputs=[
                Direction.Output(
                    "saved_direction", display_name="direction", tooltip="The same edit direction, passed through."
                )
            ],
        )

    @classmethod
    def execute(cls, direction, filename, overwrite=False) -> io.NodeOutput:
        if not isinstance(direction, zdir.EditDirection):
            raise TypeError(f"ZeroCon Save Edit Direction: expected an edit direction, got {type(direction).__name__}")
        name = filename.strip().replace("\\", "/")
        if name.startswith(paths.EDIT_DIRECTIONS + "/"):
            name = name[len(paths.EDIT_DIRECTIONS) + 1 :]
        path = _direction_path(name)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(
                f"ZeroCon Save Edit Direction: {path} exists (turn on overwrite or choose another name)"
            )
        zdir.save_direction(path, direction)
        return io.NodeOutput(direction, ui=ui.PreviewText(f"saved {direction.describe()} to {path}"))


class ZeroConLoadEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ZeroConLoadEditDirection",
            display_name="ZeroCon Load Edit Direction",
            category=CATEGORY,
            description="Loads an edit direction saved by ZeroCon Save Edit Direction from models/edit_directions.",
            inputs=[
                io.Combo.Input(
                    "name",
                    options=folder_paths.get_filename_list(paths.EDIT_DIRECTIONS),
                    tooltip="A .safetensors edit direction under models/edit_directions.",
                ),
            ],
            outputs=[Direction.Output("direction", display_name="direction", tooltip="The loaded edit direction.")],
        )

    @classmethod
    def _path(cls, name: str) -> str:
        path = folder_paths.get_full_path(paths.EDIT_DIRECTIONS, name)
        if path is None:
            raise FileNotFoundError(
                f"ZeroCon Load Edit Direction: no edit direction {name!r} in {paths.folders(paths.EDIT_DIRECTIONS)}"
            )
        return path

    @classmethod
    def fingerprint_inputs(cls, name):
        path = folder_paths.get_full_path(paths.EDIT_DIRECTIONS, name)
        if path is None:
            return ""
        st = os.stat(path)
        return f"{path}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        return io.NodeOutput(zdir.load_direction(cls._path(name)))


NODES: list[type[io.ComfyNode]] = [
    ZeroConEditDirection,
    ZeroConApplyEditDirection,
    ZeroConSaveEditDirection,
    ZeroConLoadEditDirection,
]
