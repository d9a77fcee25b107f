"""Drafts of the shipped workflows (example_workflows/*.json), built node by node in the real frontend.

``build_workflows.py`` turns each spec into a graph with the frontend's own LiteGraph API (createNode,
widget values, connect, groups), then saves exactly what the frontend exports (``graphToPrompt().workflow``,
``JSON.stringify(.., null, 2)``, as Workflow > Export writes it). Edit the specs here, rebuild, never
hand-edit the JSON.

Spec format (see ``page.js::build``): nodes ``{key, type, col, widgets, title?, size?, mode?, color?}``
stacked per column; links ``[from_key, output, to_key, input]`` by slot name (widget inputs included);
groups ``{title, keys, color}``. Each node gets a slot in its column as high as it is on every frontend and
renderer the build measured (classic canvas and Vue "Nodes 2.0"), with its text result shown when its type is in
``TEXT_RESULT_TYPES``, so that no node covers another one.
"""

from __future__ import annotations

SD15_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_URL = "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors?download=true"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SDXL_URL = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors?download=true"
SD35_CKPT = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
SD35_URL = "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors?download=true"
#: Flux-dev as ComfyUI's Flux examples load it: (key, node type, widgets, [(file, folder, url)])
FLUX_LOADERS = [
    (
        "unet",
        "UNETLoader",
        {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
        [
            (
                "flux1-dev.safetensors",
                "diffusion_models",
                "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors?download=true",
            )
        ],
    ),
    (
        "clip",
        "DualCLIPLoader",
        {
            "clip_name1": "clip_l.safetensors",
            "clip_name2": "t5xxl_fp8_e4m3fn.safetensors",
            "type": "flux",
            "device": "default",
        },
        [
            (
                "clip_l.safetensors",
                "text_encoders",
                "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors?download=true",
            ),
            (
                "t5xxl_fp8_e4m3fn.safetensors",
                "text_encoders",
                "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn.safetensors?download=true",
            ),
        ],
    ),
    (
        "vae",
        "VAELoader",
        {"vae_name": "ae.safetensors"},
        [
            (
                "ae.safetensors",
                "vae",
                "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors?download=true",
            )
        ],
    ),
]

#: Node types that show a text result on the node after a run (``ui.PreviewText``; web/zerocon_text.js adds the box).
#: The layout keeps room for it below the node, so that the result never covers the node under it.
TEXT_RESULT_TYPES = (
    "ZeroConBLIPCaption",
    "ZeroConEncodePrompts",
    "ZeroConEditDirection",
    "ZeroConSaveEditDirection",
    "ZeroConGuidedSampler",
    "ZeroConDiffuseITSampler",
    "ZeroConEditMetrics",
)
#: The text the layout and the overlap test show in those boxes (the box's height does not depend on it: it scrolls).
SAMPLE_RESULT = "cat -> dog, sentence bank: 300 sentences each\nsecond line of a result"

NOTE_COLOR, NOTE_BG = "#432", "#653"
GROUP_COLORS = {
    "input": "#3f789e",
    "caption": "#8A8",
    "direction": "#b58b2a",
    "invert": "#a1309b",
    "guide": "#88A",
    "output": "#8AA",
    "metrics": "#b06634",
    "reuse": "#444",
}

BLIP_NOTE = """### Caption (BLIP)
The caption is the **source prompt**: the image is inverted with it and the edit starts from it.

- *prefix* `a photography of` is pix2pix-zero's; the caption continues it (the prefix is removed from the output).
- *num_beams* 3 (pix2pix-zero); 1 is greedy and faster. *min_new_tokens*: raise it if captions come out empty.
- A batch of images gets one caption per line; **Encode caption** (ZeroCon Encode Prompts) gives image i caption i.
- Wrong caption? Delete the link into **Encode caption** and type the caption there.

**Model folder:** `ComfyUI/models/blip/blip-image-captioning-base/` holds the files of
[Salesforce/blip-image-captioning-base](https://huggingface.co/Salesforce/blip-image-captioning-base)
(config.json, model.safetensors, tokenizer and preprocessor files). With *allow_download* on and a network,
it is downloaded there on the first run; offline, the node's error names the folder to fill.
"""

DIRECTION_NOTE = """### Edit direction
**Edit Direction** turns *source* → *target* into a direction in your CLIP's text-embedding space;
**Apply Edit Direction** adds *strength* × direction to the caption's conditioning.

- *mode* `sentence bank` (pix2pix-zero): mean embedding of *num_sentences* template sentences with the target word
  minus the same with the source word. More sentences = a cleaner direction (pix2pix-zero uses about 1000; 300 is
  much faster and close). `prompt difference`: *source* and *target* are whole prompts (e.g. the caption and the
  caption with the edit) — one sentence each.
- *strength* 1 is pix2pix-zero's edit; 0 gives the reconstruction; 0.5–0.8 for a milder edit; negative reverses it.
- The direction belongs to the CLIP that made it (SD1.x and SDXL directions are not interchangeable).
"""

INVERT_NOTE = """### DDIM inversion
Runs the model backwards from the image to noise x_T with the caption, so sampling forward again gives the image back.

- *steps* 50 (pix2pix-zero). The guided sampler reuses the inversion's steps, so set them here only.
- *cfg* 1: the caption alone (pix2pix-zero). Other values need a *negative*.
- *regularize* with *lambda_ac* / *lambda_kl* 20 and 5 × 5 rounds (*reg_outer* × *reg_rolls*): pix2pix-zero's noise
  regularisation, which keeps the inverted noise Gaussian so the edit can move it. Off = plain DDIM inversion (faster,
  edits less).
- *seed* only picks the regulariser's random shifts; the inversion itself is deterministic.
- *convention* `current` queries the model where each step starts (ComfyUI's FlipSigmas + ddim); `next` where it
  ends, as diffusers' DDIMInverseScheduler: pick `next` to reproduce diffusers' pix2pix-zero pipeline.
"""

GUIDE_NOTE = """### Guidance (what keeps the layout)
At each step the edit's latent takes one gradient step so that its features stay close to the reconstruction's.

- *weight* −1 = auto, no tuning: with the sampler's *step_mode* `auto` a weight is a **ratio**, how hard a term pulls
  next to the others (auto: 1 each, both terms pull equally hard; 2 = twice as hard as the other). The total pull is
  the sampler's *step_size*. With *step_mode* `raw` the weight is a step size (auto: 0.1 / 0.5 for SD1.x / SD2-base /
  SDXL, a tenth of that for v-prediction SD2-768).
- **Cross-Attention Guidance** (pix2pix-zero): *layers* `all`.
- **PatchNCE Guidance** (zeroCon): patch-wise contrastive loss on the up-block self-attention outputs; *patches* 256
  sampled locations, *tau* 0.07, *patch_sizes* `1,2`. These are our defaults: the zeroCon paper does not state them.
- *start* / *end*: the fraction of the steps during which a term is active. *weight* 0 turns a term off; remove the
  link into the sampler's *guidance* for a plain DDIM edit (no guidance).
"""

SAMPLER_NOTE = """### Guided sampler
From x_T, a reference branch reconstructs the source while the edit branch samples the edited caption.

- *cfg* 5 with the **caption as the negative** (pix2pix-zero, for real images). Connect a *negative* to override.
- *step_mode* `auto`: each step moves the latent by *step_size* (0.02 = 2 %) of its own size, shared by the guidance
  terms by their weights: the same strength on every model. Structure lost: raise *step_size*; noisy: lower it.
  `raw`: the latent moves by weight × gradient (pix2pix-zero; the weights are step sizes).
- **diagnostics** / **summary**: a per-step chart and a one-line summary (also on the node): at how many steps the
  guidance was applied, how big the update was, how hard each term pulled.
- *branches* `edit` guides only the edited forward (fastest); `both` guides the negative and the edited forwards of
  one latent; `pix2pix-zero` is pix2pix-zero's own update (one copy of the latent per CFG half).
- *seed* only picks PatchNCE's sample locations: sampling is deterministic.
- **reconstruction** is the source rebuilt from x_T with no edit. If it already differs from your image, the inversion
  is the problem (more steps, regularisation), not the edit.
"""


def _insert_after(nodes: list, key: str, *new: dict) -> list:
    i = next(i for i, n in enumerate(nodes) if n["key"] == key)
    return nodes[: i + 1] + list(new) + nodes[i + 1 :]


def _readme(title: str, body: str) -> dict:
    return {
        "key": "readme",
        "type": "MarkdownNote",
        "col": 0,
        "widgets": {"text": f"# {title}\n\n{body}"},
        "title": "Read me",
        "size": [380, 560],
        "color": NOTE_COLOR,
        "bgcolor": NOTE_BG,
        "fixed": True,
    }


def _note(key: str, col: int, text: str, height: int = 300, width: int = 380) -> dict:
    heading = next((ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("#")), "")
    return {
        "key": key,
        "type": "MarkdownNote",
        "col": col,
        "widgets": {"text": text},
        "size": [width, height],
        "title": f"Note: {heading}" if heading else "Note",
        "color": NOTE_COLOR,
        "bgcolor": NOTE_BG,
        "fixed": True,
        "dy": 30,
    }


def _ckpt(name: str, url: str) -> dict:
    return {
        "key": "ckpt",
        "type": "CheckpointLoaderSimple",
        "col": 0,
        "widgets": {"ckpt_name": name},
        "properties": {"models": [{"name": name, "url": url, "directory": "checkpoints"}]},
    }


def _edit_chain(
    size: int, seed_fixed: bool = True, direction_key: str = "direction", guidance: bool = True
) -> tuple[list, list]:
    """The shared text-edit graph (nodes, links) from image to saved edit; ``direction_key`` makes the direction."""
    ctl = {"control_after_generate": "fixed"} if seed_fixed else {}
    nodes = [
        {"key": "image", "type": "LoadImage", "col": 0, "widgets": {"image": "example.png"}},
        {
            "key": "scale",
            "type": "ImageScale",
            "col": 0,
            "title": "Resize to the model's size",
            "widgets": {"upscale_method": "lanczos", "width": size, "height": size, "crop": "center"},
        },
        {"key": "blip_loader", "type": "ZeroConBLIPLoader", "col": 1},
        {"key": "caption", "type": "ZeroConBLIPCaption", "col": 1},
        {"key": "show_caption", "type": "PreviewAny", "col": 1, "title": "Caption (source prompt)", "size": [340, 120]},
        {
            "key": "encode",
            "type": "ZeroConEncodePrompts",
            "col": 2,
            "title": "Encode caption (one prompt per image)",
            "size": [340, 120],
        },
        {"key": "apply", "type": "ZeroConApplyEditDirection", "col": 2},
        {"key": "vae_encode", "type": "VAEEncode", "col": 3},
        {
            "key": "invert",
            "type": "ZeroConDDIMInversion",
            "col": 3,
            "widgets": {
                "steps": 50,
                "cfg": 1.0,
                "regularize": True,
                "lambda_ac": 20.0,
                "lambda_kl": 20.0,
                "reg_outer": 5,
                "reg_rolls": 5,
                "seed": 0,
                **ctl,
                "convention": "current",
            },
        },
    ]
    if guidance:
        nodes += [
            {
                "key": "xattn",
                "type": "ZeroConCrossAttentionGuidance",
                "col": 4,
                "widgets": {"weight": -1.0, "layers": "all", "start": 0.0, "end": 1.0},
            },
            {
                "key": "nce",
                "type": "ZeroConPatchNCEGuidance",
                "col": 4,
                "widgets": {
                    "weight": -1.0,
                    "layers": "up",
                    "patches": 256,
                    "tau": 0.07,
                    "patch_sizes": "1,2",
                    "start": 0.0,
                    "end": 1.0,
                    "location_seed": 0,
                },
            },
        ]
    nodes += [
        {
            "key": "sampler",
            "type": "ZeroConGuidedSampler",
            "col": 4,
            "widgets": {
                "cfg": 5.0,
                "step_mode": "auto",
                "step_size": 0.02,
                "branches": "edit",
                "seed": 0,
                **ctl,
                "reference": "inverted",
            },
        },
        {"key": "decode_edit", "type": "VAEDecode", "col": 5, "title": "VAE Decode (edit)"},
        {
            "key": "save_edit",
            "type": "SaveImage",
            "col": 5,
            "title": "Save edit",
            "widgets": {"filename_prefix": "zerocon/edit"},
            "size": [340, 300],
        },
        {"key": "decode_rec", "type": "VAEDecode", "col": 5, "title": "VAE Decode (reconstruction)"},
        {
            "key": "preview_rec",
            "type": "PreviewImage",
            "col": 5,
            "title": "Reconstruction (no edit)",
            "size": [340, 300],
        },
    ]
    links = [
        ["image", "IMAGE", "scale", "image"],
        ["blip_loader", "blip", "caption", "blip"],
        ["scale", "IMAGE", "caption", "image"],
        ["caption", "caption", "show_caption", "source"],
        ["ckpt", "CLIP", "encode", "clip"],
        ["caption", "caption", "encode", "text"],
        ["encode", "CONDITIONING", "apply", "conditioning"],
        [direction_key, "direction", "apply", "direction"],
        ["scale", "IMAGE", "vae_encode", "pixels"],
        ["ckpt", "VAE", "vae_encode", "vae"],
        ["ckpt", "MODEL", "invert", "model"],
        ["vae_encode", "LATENT", "invert", "latent"],
        ["encode", "CONDITIONING", "invert", "conditioning"],
        ["ckpt", "MODEL", "sampler", "model"],
        ["invert", "inversion", "sampler", "inversion"],
        ["apply", "CONDITIONING", "sampler", "edited"],
        ["sampler", "edit", "decode_edit", "samples"],
        ["ckpt", "VAE", "decode_edit", "vae"],
        ["decode_edit", "IMAGE", "save_edit", "images"],
        ["sampler", "reconstruction", "decode_rec", "samples"],
        ["ckpt", "VAE", "decode_rec", "vae"],
        ["decode_rec", "IMAGE", "preview_rec", "images"],
    ]
    if direction_key == "direction":
        links.append(["ckpt", "CLIP", "direction", "clip"])
    if guidance:
        links += [
            ["xattn", "guidance", "nce", "previous"],
            ["nce", "guidance", "sampler", "guidance"],
            ["nce", "guidance", "invert", "guidance"],  # the inversion records the reference maps it needs
        ]
    return nodes, links


def _direction_node(widgets: dict | None = None, size=None) -> dict:
    node = {
        "key": "direction",
        "type": "ZeroConEditDirection",
        "col": 2,
        "widgets": {
            "source": "cat",
            "target": "dog",
            "mode": "sentence bank",
            "num_sentences": 300,
            "batch_size": 32,
            **(widgets or {}),
        },
    }
    if size:
        node["size"] = size
    return node


def _groups(extra_direction_keys=(), guidance=True) -> list:
    return [
        {"title": "1. Model and image", "keys": ["ckpt", "image", "scale"], "color": GROUP_COLORS["input"]},
        {"title": "2. Caption", "keys": ["blip_loader", "caption", "show_caption"], "color": GROUP_COLORS["caption"]},
        {
            "title": "3. Edit direction",
            "keys": ["encode", "direction", "apply", *extra_direction_keys],
            "color": GROUP_COLORS["direction"],
        },
        {"title": "4. Invert", "keys": ["vae_encode", "invert"], "color": GROUP_COLORS["invert"]},
        {
            "title": "5. Guided edit",
            "keys": (["xattn", "nce"] if guidance else []) + ["sampler"],
            "color": GROUP_COLORS["guide"],
        },
        {
            "title": "6. Results",
            "keys": ["decode_edit", "save_edit", "decode_rec", "preview_rec"],
            "color": GROUP_COLORS["output"],
        },
    ]


def _notes_row(base_col: int = 1) -> list:
    return [
        _note("note_caption", 1, BLIP_NOTE, 330),
        _note("note_direction", 2, DIRECTION_NOTE, 330),
        _note("note_invert", 3, INVERT_NOTE, 360),
        _note("note_guide", 4, GUIDE_NOTE, 400),
        _note("note_sampler", 5, SAMPLER_NOTE, 360),
    ]


def _text_edit(name: str, title: str, model: str, ckpt: str, url: str, size: int, folder_hint: str) -> dict:
    readme = _readme(
        title,
        f"""Edits a photo with text and keeps its layout (**pix2pix-zeroCon**): BLIP captions the image,
a CLIP edit direction moves the caption from *source* to *target* (cat → dog), the image is DDIM-inverted, and the
guided sampler edits while its cross-attention maps (pix2pix-zero) and UNet patch features (PatchNCE, zeroCon) stay
close to those of the reconstruction.

**Use:** pick your image in *Load Image*, set *source* / *target* in *Edit Direction*, then Queue.
The edit is saved to `ComfyUI/output/zerocon/`; the reconstruction is previewed next to it.

**Models** (local files; notes below say what each knob does):
- `ComfyUI/models/checkpoints/{ckpt}` — {model}; {folder_hint}
- `ComfyUI/models/blip/blip-image-captioning-base/` — BLIP captioner, see *Caption*.

The guided sampler differentiates through the UNet at every step: it is slower and needs more memory than a plain
KSampler at the same size.
""",
    )
    nodes, links = _edit_chain(size)
    nodes = _insert_after([readme, _ckpt(ckpt, url), *nodes], "encode", _direction_node())
    nodes += _notes_row()
    return {"name": name, "nodes": nodes, "links": links, "groups": _groups()}


def text_edit_sd15() -> dict:
    return _text_edit(
        "text_edit_sd15",
        "ZeroCon text edit — SD1.5",
        "Stable Diffusion 1.5",
        SD15_CKPT,
        SD15_URL,
        512,
        "any SD1.x checkpoint works: choose yours in *Load Checkpoint*. 512 × 512 is SD1.5's size (sides must be "
        "multiples of 8).",
    )


def text_edit_sdxl() -> dict:
    return _text_edit(
        "text_edit_sdxl",
        "ZeroCon text edit — SDXL",
        "Stable Diffusion XL base 1.0",
        SDXL_CKPT,
        SDXL_URL,
        1024,
        "any SDXL checkpoint works (also SSD-1B / Vega / KOALA). 1024 × 1024 is SDXL's size. The edit direction "
        "covers both SDXL text encoders and the pooled embedding.",
    )


FLOW_INVERT_NOTE = """### Inversion (flow models)
On SD3.5 and Flux the inversion runs the model's flow ODE backwards (Euler, ComfyUI's `simple` grid of the model's own
sampling, shift included): the flow-matching twin of DDIM inversion.

- *steps* 28 (these models' usual count); the guided sampler reuses them.
- *cfg* 1: the caption alone.
- *regularize* is **off** here: pix2pix-zero's noise regulariser was made for Stable Diffusion's noise prediction;
  on flow models it acts on the implied noise and its weights are not verified yet. Turn it on to try it.
- The inverted latent belongs to the ZeroCon samplers: a stock sampler cannot start from it (ComfyUI scales a flow
  latent by 1 − sigma on the way in, which is 0 at the top of the grid).
"""

FLOW_GUIDE_NOTE = """### Guidance on an MM-DiT
- **Cross-Attention Guidance**: the text-to-image part of the joint attention (image queries against the prompt's
  keys, softmax over all keys as the model computes it); *layers* `all` picks the model's default blocks (double-stream
  / joint blocks, where the text and image streams meet); `auto` says the same; `double:0,1` or `joint:12,18` pick
  blocks by number.
- **PatchNCE Guidance**: the image tokens' outputs of the default blocks (*layers* `up` or `auto`).
- *weight* −1 = auto; *start* / *end* as for Stable Diffusion.
"""


def _relink(links: list, mapping: dict) -> list:
    """``links`` with each ``(from_key, output)`` in ``mapping`` replaced by its new source key."""
    return [[mapping.get((a, out), a), out, b, inp] for a, out, b, inp in links]


def _flux_loader_nodes() -> list:
    return [
        {
            "key": key,
            "type": node_type,
            "col": 0,
            "widgets": widgets,
            "properties": {"models": [{"name": n, "url": u, "directory": d} for n, d, u in files]},
        }
        for key, node_type, widgets, files in FLUX_LOADERS
    ]


FLUX_RELINK = {("ckpt", "MODEL"): "unet", ("ckpt", "CLIP"): "clip", ("ckpt", "VAE"): "vae"}


def _flow_widgets(nodes: list, cfg: float) -> list:
    """The text-edit chain's widget values for a flow model: 28 steps, no regulariser, ``cfg`` in the sampler."""
    for n in nodes:
        if n["key"] == "invert":
            n["widgets"].update({"steps": 28, "regularize": False})
        if n["key"] == "sampler":
            n["widgets"]["cfg"] = cfg
    return nodes


def _flow_notes(extra: list | None = None) -> list:
    notes = [n for n in _notes_row() if n["key"] in ("note_caption", "note_direction", "note_sampler")]
    return notes + [_note("note_invert", 3, FLOW_INVERT_NOTE, 360), _note("note_guide", 4, FLOW_GUIDE_NOTE, 300)]


def text_edit_sd35() -> dict:
    readme = _readme(
        "ZeroCon text edit — SD3.5",
        f"""The pix2pix-zeroCon text edit on **Stable Diffusion 3.5** (MM-DiT, flow matching): BLIP
captions the image, an edit direction through SD3.5's own text encoders (CLIP-L, CLIP-G and T5-XXL, sequence and
pooled) moves the caption from *source* to *target*, the image is inverted along the model's flow, and the guided
sampler edits while the joint attention's text-to-image maps and the image tokens' features stay close to the
reconstruction's.

**Use:** pick your image in *Load Image*, set *source* / *target* in *Edit Direction*, then Queue.

**Models:**
- `ComfyUI/models/checkpoints/{SD35_CKPT}` — SD3.5 Medium with its text encoders; any SD3 / SD3.5 checkpoint works
  (one without text encoders needs a *TripleCLIPLoader* for the CLIP input). 1024 × 1024 is its size.
- `ComfyUI/models/blip/blip-image-captioning-base/` — BLIP captioner, see *Caption*.

*cfg* 5 with the caption as the negative (real CFG). The guided sampler differentiates through the transformer at
every step: slower and hungrier than a KSampler.
""",
    )
    nodes, links = _edit_chain(1024)
    nodes = _insert_after([readme, _ckpt(SD35_CKPT, SD35_URL), *nodes], "encode", _direction_node())
    nodes = _flow_widgets(nodes, 5.0)
    nodes += _flow_notes()
    return {"name": "text_edit_sd35", "nodes": nodes, "links": links, "groups": _groups()}


def text_edit_flux() -> dict:
    readme = _readme(
        "ZeroCon text edit — Flux.1-dev",
        """The pix2pix-zeroCon text edit on **Flux.1-dev** (MM-DiT, flow matching, guidance-distilled):
BLIP captions the image, an edit direction through Flux's text encoders (the T5-XXL sequence and CLIP-L's pooled
vector) moves the caption from *source* to *target*, the image is inverted along the model's flow, and the guided
sampler edits while the joint attention's text-to-image maps and the image tokens' features stay close to the
reconstruction's.

**Use:** pick your image in *Load Image*, set *source* / *target* in *Edit Direction*, then Queue.

**Models** (the files ComfyUI's Flux examples use):
- `ComfyUI/models/diffusion_models/flux1-dev.safetensors` (*Load Diffusion Model*; an fp8 copy works too)
- `ComfyUI/models/text_encoders/clip_l.safetensors` and `t5xxl_fp8_e4m3fn.safetensors` (*DualCLIPLoader*, type flux)
- `ComfyUI/models/vae/ae.safetensors` (*Load VAE*)
- `ComfyUI/models/blip/blip-image-captioning-base/` — BLIP captioner, see *Caption*.

Flux-dev is guidance-distilled: no CFG (*cfg* 1 in the sampler); **FluxGuidance** 3.5 on the caption sets the
distilled guidance the inversion and the edit use (Apply Edit Direction keeps it). 1024 × 1024 is its size.
""",
    )
    nodes, links = _edit_chain(1024)
    nodes = [n for n in nodes]
    nodes = _insert_after([readme, *_flux_loader_nodes(), *nodes], "encode", _direction_node())
    nodes = _insert_after(
        nodes, "encode", {"key": "flux_guidance", "type": "FluxGuidance", "col": 2, "widgets": {"guidance": 3.5}}
    )
    nodes = _flow_widgets(nodes, 1.0)
    nodes += _flow_notes()
    links = _relink(links, FLUX_RELINK)
    links = [
        ["flux_guidance", "CONDITIONING", b, inp]
        if (a, b) in (("encode", "apply"), ("encode", "invert"))
        else [a, o, b, inp]
        for a, o, b, inp in links
    ]
    links += [["encode", "CONDITIONING", "flux_guidance", "conditioning"], ["clip", "CLIP", "direction", "clip"]]
    links = [ln for ln in links if ln != ["ckpt", "CLIP", "direction", "clip"]]
    groups = _groups()
    groups[0]["keys"] = ["unet", "clip", "vae", "image", "scale"]
    groups[2]["keys"] = groups[2]["keys"] + ["flux_guidance"]
    return {"name": "text_edit_flux", "nodes": nodes, "links": links, "groups": groups}


SOURCE_SENTENCES = """# one sentence per line; lines starting with # are ignored
a cat sitting on the grass
a photo of a cat looking at the camera
a close-up photo of a cat's face
a cat lying on a sofa
a small cat walking in the street
a cat sleeping in the sun
a black and white photo of a cat
a cat sitting next to a window
a fluffy cat on a wooden floor
a painting of a cat
"""

TARGET_SENTENCES = """# one sentence per line; lines starting with # are ignored
a dog sitting on the grass
a photo of a dog looking at the camera
a close-up photo of a dog's face
a dog lying on a sofa
a small dog walking in the street
a dog sleeping in the sun
a black and white photo of a dog
a dog sitting next to a window
a fluffy dog on a wooden floor
a painting of a dog
"""

SENTENCES_NOTE = """### Your own sentence lists
*source_sentences* / *target_sentences* replace the built-in templates of that side (then *num_sentences* does not
apply to it). One sentence per line; lines starting with `#` are ignored.

Write pairs that differ **only in the subject** and vary everything else (place, pose, style, framing): the mean
cancels what the sentences share and keeps what differs, so the direction moves *cat* to *dog* without dragging the
scene along. Tens of sentences per side work; more give a cleaner direction. Lists of different lengths are fine.

For non-object edits write what changes: e.g. `a photo of a house in summer` → `a photo of a house in winter`.
*source* / *target* still name the edit in the direction's metadata.
"""


def custom_sentences() -> dict:
    readme = _readme(
        "ZeroCon — edit direction from your own sentences",
        """The same text edit as
*text_edit_sd15*, but the edit direction comes from **sentence lists you write** instead of the built-in templates.
Edit the two lists in *Edit Direction* (see the note next to it), then Queue.

**Models:** `ComfyUI/models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors` (any SD1.x checkpoint) and
`ComfyUI/models/blip/blip-image-captioning-base/` (see *Caption*).
""",
    )
    nodes, links = _edit_chain(512)
    direction = _direction_node(
        {"source_sentences": SOURCE_SENTENCES, "target_sentences": TARGET_SENTENCES}, size=[400, 620]
    )
    nodes = _insert_after([readme, _ckpt(SD15_CKPT, SD15_URL), *nodes], "encode", direction)
    nodes += [_note("note_sentences", 2, SENTENCES_NOTE, 330)]
    nodes += [n for n in _notes_row() if n["key"] != "note_direction"]
    return {"name": "custom_sentences", "nodes": nodes, "links": links, "groups": _groups()}


SAVE_NOTE = """### 1 · Make and save the direction (run once)
Queue once as loaded: only this group runs (group 2 is muted, shown dimmed) and writes
`ComfyUI/models/edit_directions/cat_to_dog.safetensors` (the name in *filename*; subfolders allowed).
The file keeps the direction and its metadata (source, target, CLIP kind), so a long sentence bank is
computed once.
"""

REUSE_NOTE = """### 2 · Reuse it (any later run, any workflow)
1. Right-click the title of group **2** → *Set Group Nodes to Always*.
2. Press **R** (refresh) so *Load Edit Direction* lists the new file, and pick it.
3. Right-click group **1** → *Set Group Nodes to Never* (it is not needed any more), then Queue.

*Load Edit Direction* replaces *Edit Direction* anywhere: it reads `ComfyUI/models/edit_directions/`.
Use it with the same kind of CLIP that made it (an SD1.x direction for SD1.x models).
"""


def direction_save_and_reuse() -> dict:
    readme = _readme(
        "ZeroCon — save an edit direction, reuse it",
        """Builds a direction once, saves it to
`models/edit_directions`, and edits with the **saved file** in a second branch.

- **Group 1** makes and saves the direction.
- **Group 2** loads the file and runs the full text edit (caption, inversion, guided sampler).

Group 2 starts muted because the file does not exist before the first run (a loader with a missing file fails
validation). The notes in each group say what to click.

**Models:** `ComfyUI/models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors` (any SD1.x checkpoint) and
`ComfyUI/models/blip/blip-image-captioning-base/` (see *Caption*).
""",
    )
    nodes, links = _edit_chain(512, direction_key="load")
    save_nodes = [
        _direction_node(size=[340, 470]),  # it grows after the layout: reserve its height (Save goes below)
        {
            "key": "save",
            "type": "ZeroConSaveEditDirection",
            "col": 2,
            "widgets": {"filename": "cat_to_dog", "overwrite": True},
        },
        _note("note_save", 2, SAVE_NOTE, 220),
    ]
    load = {
        "key": "load",
        "type": "ZeroConLoadEditDirection",
        "col": 3,
        "dy": 0,
        "widgets": {"name": "cat_to_dog.safetensors"},
    }
    reuse_note = _note("note_reuse", 3, REUSE_NOTE, 260)
    nodes = [readme, _ckpt(SD15_CKPT, SD15_URL), *save_nodes, reuse_note, load, *nodes]
    links = [["ckpt", "CLIP", "direction", "clip"], ["direction", "direction", "save", "direction"], *links]
    # group 2's nodes, muted at first
    reuse = [
        "load",
        "encode",
        "apply",
        "vae_encode",
        "invert",
        "xattn",
        "nce",
        "sampler",
        "decode_edit",
        "save_edit",
        "decode_rec",
        "preview_rec",
    ]
    muted = set(reuse)
    for n in nodes:
        if n["key"] in muted:
            n["mode"] = 2
    nodes += [n for n in _notes_row() if n["key"] in ("note_invert", "note_guide", "note_sampler")]
    groups = [
        {
            "title": "Model, image and caption",
            "keys": ["ckpt", "image", "scale", "blip_loader", "caption", "show_caption"],
            "color": GROUP_COLORS["input"],
        },
        {"title": "1. Save (run once)", "keys": ["direction", "save", "note_save"], "color": GROUP_COLORS["direction"]},
        {
            "title": "2. Reuse the saved file (muted at first)",
            "keys": ["note_reuse", *reuse],
            "color": GROUP_COLORS["reuse"],
        },
    ]
    # The caption's CLIP Text Encode and Apply live in group 2's column; move them out of column 2.
    for n in nodes:
        if n["key"] in ("encode", "apply"):
            n["col"] = 3
    return {
        "name": "direction_save_and_reuse",
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "columns": {"colX": [0, 450, 900, 1350, 1800, 2250]},
    }


METRICS_NOTE = """### Measure the edit (ZeroCon Edit Metrics)
- **CLIP score** (×100 cosine of the edit with *target_text*) and **CLIP accuracy** (is the edit closer to the target
  text than to the source text): did the edit happen? Needs **CLIP Metric Loader**.
- **Structure distance** (DINO self-similarity, PIE-Bench's metric; 0 = same layout): was the layout kept? Needs
  **DINO Loader**.
- **Background PSNR / SSIM / MSE**: how much the rest changed. Connect a *mask* (1 = edited region) to measure only
  the background; without it they cover the whole image.
- The second metrics node compares the **reconstruction** with the source: it tells how much of any change is the
  inversion's fault.

**Model folders** (transformers `save_pretrained` layout, downloaded on first run when *allow_download* is on):
- `ComfyUI/models/clip_metric/clip-vit-large-patch14/` ← [openai/clip-vit-large-patch14](https://huggingface.co/openai/clip-vit-large-patch14)
- `ComfyUI/models/dino/dino-vitb8/` ← [facebook/dino-vitb8](https://huggingface.co/facebook/dino-vitb8)
"""

WORDS_NOTE = """### Source and target words
Typed once here, they feed *Edit Direction* and build the target text for the metrics
(the caption with *source* replaced by *target*).
"""


def compare_and_measure() -> dict:
    readme = _readme(
        "ZeroCon — edit, then measure it",
        """The SD1.5 text edit followed by **ZeroCon Edit Metrics**,
which scores the edit against the source image (did the edit happen, was the layout kept, how much did the rest
change) and scores the reconstruction the same way. The numbers are shown in the two *summary* boxes and are
available as FLOAT outputs for your own nodes.

**Models:** `ComfyUI/models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors` (any SD1.x checkpoint),
`ComfyUI/models/blip/blip-image-captioning-base/`, and the CLIP / DINO folders named in the metrics note.
""",
    )
    nodes, links = _edit_chain(512)
    words = [
        {
            "key": "source_word",
            "type": "PrimitiveString",
            "col": 1,
            "title": "source word",
            "widgets": {"value": "cat"},
        },
        {
            "key": "target_word",
            "type": "PrimitiveString",
            "col": 1,
            "title": "target word",
            "widgets": {"value": "dog"},
        },
        _note("note_words", 1, WORDS_NOTE, 140),
    ]
    metric_nodes = [
        {
            "key": "target_text",
            "type": "StringReplace",
            "col": 6,
            "title": "Target text (caption with the edit)",
            "size": [340, 160],
        },
        {"key": "clip_metric", "type": "ZeroConCLIPMetricLoader", "col": 6},
        {"key": "dino", "type": "ZeroConDINOLoader", "col": 6},
        {"key": "metrics", "type": "ZeroConEditMetrics", "col": 7, "title": "Edit metrics (source vs edit)"},
        {"key": "show_metrics", "type": "PreviewAny", "col": 7, "title": "Edit metrics summary", "size": [380, 200]},
        {
            "key": "metrics_rec",
            "type": "ZeroConEditMetrics",
            "col": 7,
            "title": "Reconstruction metrics (source vs reconstruction)",
        },
        {
            "key": "show_metrics_rec",
            "type": "PreviewAny",
            "col": 7,
            "title": "Reconstruction metrics summary",
            "size": [380, 200],
        },
        _note("note_metrics", 6, METRICS_NOTE, 470),
    ]
    nodes = _insert_after([readme, _ckpt(SD15_CKPT, SD15_URL), *nodes], "encode", _direction_node())
    nodes = _insert_after(nodes, "show_caption", *words)
    nodes += metric_nodes
    nodes += [n for n in _notes_row() if n["key"] in ("note_direction", "note_invert", "note_guide", "note_sampler")]
    links = links + [
        ["source_word", "STRING", "direction", "source"],
        ["target_word", "STRING", "direction", "target"],
        ["caption", "caption", "target_text", "string"],
        ["source_word", "STRING", "target_text", "find"],
        ["target_word", "STRING", "target_text", "replace"],
        ["scale", "IMAGE", "metrics", "source_image"],
        ["decode_edit", "IMAGE", "metrics", "edited_image"],
        ["caption", "caption", "metrics", "source_text"],
        ["target_text", "STRING", "metrics", "target_text"],
        ["clip_metric", "clip_metric", "metrics", "clip_metric"],
        ["dino", "dino", "metrics", "dino"],
        ["metrics", "summary", "show_metrics", "source"],
        ["scale", "IMAGE", "metrics_rec", "source_image"],
        ["decode_rec", "IMAGE", "metrics_rec", "edited_image"],
        ["caption", "caption", "metrics_rec", "source_text"],
        ["caption", "caption", "metrics_rec", "target_text"],
        ["clip_metric", "clip_metric", "metrics_rec", "clip_metric"],
        ["dino", "dino", "metrics_rec", "dino"],
        ["metrics_rec", "summary", "show_metrics_rec", "source"],
    ]
    groups = _groups() + [
        {
            "title": "7. Measure",
            "keys": [
                "target_text",
                "clip_metric",
                "dino",
                "metrics",
                "show_metrics",
                "metrics_rec",
                "show_metrics_rec",
                "note_metrics",
            ],
            "color": GROUP_COLORS["metrics"],
        },
    ]
    groups[1]["keys"] = groups[1]["keys"] + ["source_word", "target_word", "note_words"]
    return {"name": "compare_and_measure", "nodes": nodes, "links": links, "groups": groups}


DIFFUSEIT_MODELS_NOTE = """### Prompts and DINO
**DINO Loader** reads `ComfyUI/models/dino/dino-vitb8/`, the files of
[facebook/dino-vitb8](https://huggingface.co/facebook/dino-vitb8) (config.json, model.safetensors or
pytorch_model.bin; transformers `save_pretrained` layout). With *allow_download* on and a network it is downloaded
there on the first run; offline, the node's error names the folder to fill. *precision* fp32 is exact (86M
parameters); fp16 / bf16 halve its memory on a GPU.

The sampler needs a **positive** and a **negative** prompt (CFG). {positive}
"""

DIFFUSEIT_STRUCTURE_NOTE = """### DINO Structure Guidance (what keeps the layout)
At every guided step the predicted clean image is **decoded with the VAE**, run through DINO, and compared with the
source *image* (the one you encoded):
- *lambda_ssim* 1000: DINO key self-similarity (the layout); *lambda_contrastive* 200: patch-contrastive loss on the
  keys (each patch stays like the same patch of the source). More = closer to the source layout.
- *lambda_semantic* 100: pushes the first, noisiest steps away from the previous step (DiffuseIT's acceleration);
  *lambda_range* 200: keeps decoded pixels inside [0, 1]. 0 turns a term off.
- *weight* −1 = auto: with the sampler's `auto` step mode a ratio (structure 1; semantic and range 0.5 each), with
  `raw` a global multiplier (auto 1). 0 disables the node. *dino_size* 224 is DiffuseIT's DINO resolution (larger =
  finer structure, slower). *start* / *end*: the fraction of the steps during which it is active.
- *noise_blend*: DiffuseIT's `--use_noise_aug_all` (losses on a noise-blended estimate).

**Much cheaper:** the decode through the checkpoint's VAE (with gradients) is the expensive part. Put
`taesd_encoder` / `taesd_decoder` (.safetensors or .pth, [madebyollin/taesd](https://github.com/madebyollin/taesd))
in `ComfyUI/models/vae_approx/`, add a **Load VAE** node with `taesd` (`taesdxl` for SDXL) and connect it to the
guidance nodes' *vae* input (keep the checkpoint's VAE for VAE Encode / Decode). Close enough for DINO at 224 px.
"""

DIFFUSEIT_STYLE_NOTE = """### DINO Style Guidance (the reference's look)
Pulls the decoded prediction toward the **reference** image:
- *lambda_cls* 2000: DINO [CLS] token of the output toward the reference's (global appearance / style).
- *lambda_pixel* 3000: pixel MSE toward the reference resized to the output (mostly global colour; 0 disables it
  when the reference's colours should not leak in).
- *weight*, *dino_size*, *start* / *end* and the *vae* input (TAESD for speed) as in Structure Guidance.

Balance the two nodes with their *weight* (auto: 1 each, equal pull): more style weight = more of the reference,
less of the source's structure. Chained through *previous*: both terms reach the sampler on one link.
"""

DIFFUSEIT_SAMPLER_NOTE = """### DiffuseIT Sampler
No inversion: the encoded source is **noised** to the start level, then sampled back with guided DDIM.
- *strength* −1 = auto, DiffuseIT's noise level (sigma 6, about 0.85 of the steps). Lower (e.g. 0.5–0.7) keeps more
  of the source; 1 starts from almost pure noise.
- *resample* 10 (DiffuseIT): the first step is repeated with re-noising in between, which helps the guidance take
  hold; 1 turns it off (faster). It costs *resample* − 1 extra guided steps.
- *steps* 50: the full DDIM schedule; only the last *strength* part is run. *cfg* 5 between positive and negative.
- *step_mode* `auto`: each step moves the latent by *step_size* (2 %) of its size, shared by the terms by their
  weights; `raw`: weight × gradient (DiffuseIT's step). *seed*: the start and resampling noise.
- **diagnostics** / **summary**: per-step chart and summary (also on the node): steps applied, update size, pulls.

Every guided step backpropagates through the UNet, the VAE decoder and DINO: much slower than a KSampler.
"""


def _diffuseit(name: str, title: str, style: bool) -> dict:
    what = (
        "takes its **look from a reference image** (DINO [CLS] + colour), optionally steered by a prompt"
        if style
        else "becomes **what the prompt describes** (the prompt conditions the model through CFG)"
    )
    readme = _readme(
        title,
        f"""**DiffuseIT** (Kwon & Ye, ICLR 2023) on Stable Diffusion: the source image is noised
part way (no inversion) and sampled back while DINO ViT losses on the decoded prediction keep its **structure**
(key self-similarity + patch contrast); the result {what}.

**Use:** pick the content image in *Load Image (content)*{", the style in *Load Image (style reference)*" if style else ""}
and write the {"description" if style else "target"} in the positive prompt, then Queue. The result is saved to
`ComfyUI/output/zerocon/`. The notes below say what each knob does.

**Models** (local files):
- `ComfyUI/models/checkpoints/{SD15_CKPT}` — Stable Diffusion 1.5; any SD1.x / SD2.x / SDXL checkpoint works
  (choose yours in *Load Checkpoint*; 512 × 512 for SD1.5, 1024 for SDXL).
- `ComfyUI/models/dino/dino-vitb8/` ← [facebook/dino-vitb8](https://huggingface.co/facebook/dino-vitb8), see the
  DINO note.
- Optional, for speed: TAESD in `ComfyUI/models/vae_approx/` (see the structure note).
""",
    )
    readme["size"] = [380, 340]
    ctl = {"control_after_generate": "fixed"}
    positive = "a photo" if style else "a photo of a dog"
    nodes = [
        readme,
        _ckpt(SD15_CKPT, SD15_URL),
        {
            "key": "image",
            "type": "LoadImage",
            "col": 0,
            "title": "Load Image (content)",
            "widgets": {"image": "example.png"},
            "size": [340, 320],
        },  # the image preview grows the node after the layout: reserve its height
        {
            "key": "scale",
            "type": "ImageScale",
            "col": 0,
            "title": "Resize to the model's size",
            "widgets": {"upscale_method": "lanczos", "width": 512, "height": 512, "crop": "center"},
        },
    ]
    if style:
        nodes.append(
            {
                "key": "style_image",
                "type": "LoadImage",
                "col": 0,
                "title": "Load Image (style reference)",
                "widgets": {"image": "example.png"},
                "size": [340, 320],
            }
        )
    nodes += [
        {
            "key": "positive",
            "type": "CLIPTextEncode",
            "col": 1,
            "title": "Positive prompt (describe the source)" if style else "Positive prompt (the target)",
            "widgets": {"text": positive},
            "size": [340, 120],
        },
        {
            "key": "negative",
            "type": "CLIPTextEncode",
            "col": 1,
            "title": "Negative prompt",
            "widgets": {"text": "blurry, low quality"},
            "size": [340, 120],
        },
        {"key": "vae_encode", "type": "VAEEncode", "col": 1},
        {
            "key": "dino",
            "type": "ZeroConDINOLoader",
            "col": 1,
            "widgets": {"model": "dino-vitb8", "precision": "fp32", "device": "auto", "allow_download": True},
        },
        _note(
            "note_models",
            1,
            DIFFUSEIT_MODELS_NOTE.replace(
                "{positive}",
                (
                    "Image-guided: the positive prompt describes the source (or stays generic, `a photo`); the reference "
                    "image gives the style."
                    if style
                    else "Text-guided: the **positive prompt is the target** (`a photo of a dog`) and conditions the model; the "
                    "DINO structure losses keep the source's layout."
                ),
            ),
            230,
        ),
        {
            "key": "structure",
            "type": "ZeroConDinoStructureGuidance",
            "col": 2,
            "widgets": {
                "weight": -1.0,
                "lambda_ssim": 1000.0,
                "lambda_contrastive": 200.0,
                "lambda_semantic": 100.0,
                "lambda_range": 200.0,
                "dino_size": 224,
                "noise_blend": False,
                "start": 0.0,
                "end": 1.0,
            },
        },
    ]
    if style:
        nodes.append(
            {
                "key": "style",
                "type": "ZeroConDinoStyleGuidance",
                "col": 2,
                "widgets": {
                    "weight": -1.0,
                    "lambda_cls": 2000.0,
                    "lambda_pixel": 3000.0,
                    "dino_size": 224,
                    "start": 0.0,
                    "end": 1.0,
                },
            }
        )
    nodes += [
        _note("note_structure", 2, DIFFUSEIT_STRUCTURE_NOTE, 310, 420),
    ]
    if style:
        nodes.append(_note("note_style", 2, DIFFUSEIT_STYLE_NOTE, 220, 420))
    nodes += [
        {
            "key": "sampler",
            "type": "ZeroConDiffuseITSampler",
            "col": 3,
            "widgets": {
                "steps": 50,
                "cfg": 5.0,
                "strength": -1.0,
                "resample": 10,
                "seed": 0,
                **ctl,
                "step_mode": "auto",
                "step_size": 0.02,
            },
        },
        _note("note_sampler", 3, DIFFUSEIT_SAMPLER_NOTE, 280),
        {"key": "decode", "type": "VAEDecode", "col": 4},
        {
            "key": "save",
            "type": "SaveImage",
            "col": 4,
            "title": "Save result",
            "widgets": {"filename_prefix": f"zerocon/{name}"},
            "size": [340, 340],
        },
    ]
    links = [
        ["image", "IMAGE", "scale", "image"],
        ["ckpt", "CLIP", "positive", "clip"],
        ["ckpt", "CLIP", "negative", "clip"],
        ["scale", "IMAGE", "vae_encode", "pixels"],
        ["ckpt", "VAE", "vae_encode", "vae"],
        ["ckpt", "MODEL", "structure", "model"],
        ["ckpt", "VAE", "structure", "vae"],
        ["dino", "dino", "structure", "dino"],
        ["scale", "IMAGE", "structure", "image"],
        ["ckpt", "MODEL", "sampler", "model"],
        ["positive", "CONDITIONING", "sampler", "positive"],
        ["negative", "CONDITIONING", "sampler", "negative"],
        ["vae_encode", "LATENT", "sampler", "latent"],
        ["sampler", "latent", "decode", "samples"],
        ["ckpt", "VAE", "decode", "vae"],
        ["decode", "IMAGE", "save", "images"],
    ]
    if style:
        links += [
            ["ckpt", "MODEL", "style", "model"],
            ["ckpt", "VAE", "style", "vae"],
            ["dino", "dino", "style", "dino"],
            ["style_image", "IMAGE", "style", "reference"],
            ["structure", "guidance", "style", "previous"],
            ["style", "guidance", "sampler", "guidance"],
        ]
    else:
        links.append(["structure", "guidance", "sampler", "guidance"])
    groups = [
        {
            "title": "1. Model and images",
            "keys": ["ckpt", "image", "scale"] + (["style_image"] if style else []),
            "color": GROUP_COLORS["input"],
        },
        {
            "title": "2. Prompts, latent and DINO",
            "keys": ["positive", "negative", "vae_encode", "dino"],
            "color": GROUP_COLORS["direction"],
        },
        {
            "title": "3. DiffuseIT guidance",
            "keys": ["structure"] + (["style"] if style else []),
            "color": GROUP_COLORS["guide"],
        },
        {"title": "4. Sample", "keys": ["sampler"], "color": GROUP_COLORS["invert"]},
        {"title": "5. Result", "keys": ["decode", "save"], "color": GROUP_COLORS["output"]},
    ]
    return {"name": name, "nodes": nodes, "links": links, "groups": groups}


def diffuseit_image_guided() -> dict:
    return _diffuseit("diffuseit_image_guided", "DiffuseIT — image-guided style transfer (SD1.5)", style=True)


def diffuseit_text_guided() -> dict:
    return _diffuseit("diffuseit_text_guided", "DiffuseIT — text-guided translation (SD1.5)", style=False)


DIFFUSEIT_FLUX_NOTE = """### DiffuseIT on Flux.1-dev
The same DiffuseIT as on Stable Diffusion, on a flow model:
- the source is noised to DiffuseIT's level by **signal-to-noise ratio** (*strength* −1: t ≈ 0.86 on Flux's grid), the
  semantic gate likewise, and sampled back with Euler steps (*steps* 28, ComfyUI's `simple` grid with Flux's shift);
- the DINO losses decode the predicted image with **Flux's 16-channel VAE** (`ae.safetensors`), or much cheaper with
  `taef1` (put `taef1_encoder` / `taef1_decoder` in `models/vae_approx/`, load it with Load VAE and connect it to the
  guidance node's *vae* only);
- Flux-dev is guidance-distilled: *cfg* 1 and **FluxGuidance** on the prompt (the negative prompt is then unused).
"""


def diffuseit_text_guided_flux() -> dict:
    spec = _diffuseit("diffuseit_text_guided_flux", "DiffuseIT — text-guided translation (Flux.1-dev)", style=False)
    readme = next(n for n in spec["nodes"] if n["key"] == "readme")
    readme["widgets"]["text"] = readme["widgets"]["text"].split("**Models** (local files):")[0] + (
        """**Models** (the files ComfyUI's Flux examples use):
- `ComfyUI/models/diffusion_models/flux1-dev.safetensors` (*Load Diffusion Model*)
- `ComfyUI/models/text_encoders/clip_l.safetensors` and `t5xxl_fp8_e4m3fn.safetensors` (*DualCLIPLoader*, type flux)
- `ComfyUI/models/vae/ae.safetensors` (*Load VAE*); optional, for speed: `taef1` in `ComfyUI/models/vae_approx/`
- `ComfyUI/models/dino/dino-vitb8/` ← [facebook/dino-vitb8](https://huggingface.co/facebook/dino-vitb8), see the
  DINO note.
"""
    )
    nodes = [n for n in spec["nodes"] if n["key"] != "ckpt"]
    i = next(i for i, n in enumerate(nodes) if n["key"] == "readme")
    nodes = nodes[: i + 1] + _flux_loader_nodes() + nodes[i + 1 :]
    for n in nodes:
        if n["key"] == "scale":
            n["widgets"].update({"width": 1024, "height": 1024})
        if n["key"] == "sampler":
            n["widgets"].update({"steps": 28, "cfg": 1.0})
    nodes = _insert_after(
        nodes, "negative", {"key": "flux_guidance", "type": "FluxGuidance", "col": 1, "widgets": {"guidance": 3.5}}
    )
    nodes.append(_note("note_flux", 3, DIFFUSEIT_FLUX_NOTE, 300))
    links = _relink(spec["links"], FLUX_RELINK)
    links = [
        ["flux_guidance", "CONDITIONING", b, inp] if (a, b) == ("positive", "sampler") else [a, o, b, inp]
        for a, o, b, inp in links
    ]
    links.append(["positive", "CONDITIONING", "flux_guidance", "conditioning"])
    groups = spec["groups"]
    groups[0]["keys"] = ["unet", "clip", "vae", "image", "scale"]
    groups[1]["keys"] = groups[1]["keys"] + ["flux_guidance"]
    return {**spec, "nodes": nodes, "links": links, "groups": groups}


def _own_readme_column(make):
    """The Read-me note alone in column 0, every other node one column to the right."""

    def wrapped() -> dict:
        spec = make()
        for n in spec["nodes"]:
            if n["key"] != "readme":
                n["col"] = n.get("col", 0) + 1
        cols = spec.get("columns", {})
        if "colX" in cols:
            cols["colX"] = [0] + [x + 450 for x in cols["colX"]]
        return spec

    wrapped.__name__ = make.__name__
    return wrapped


SPECS = {
    "text_edit_sd15": text_edit_sd15,
    "text_edit_sdxl": text_edit_sdxl,
    "text_edit_sd35": text_edit_sd35,
    "text_edit_flux": text_edit_flux,
    "custom_sentences": custom_sentences,
    "direction_save_and_reuse": direction_save_and_reuse,
    "compare_and_measure": compare_and_measure,
    "diffuseit_image_guided": diffuseit_image_guided,
    "diffuseit_text_guided": diffuseit_text_guided,
    "diffuseit_text_guided_flux": diffuseit_text_guided_flux,
}
SPECS = {k: _own_readme_column(v) for k, v in SPECS.items()}


# Pack ids on every node: what ComfyUI-Manager and the frontend resolve a shared workflow's node packs by
# (node ``properties``: ``cnr_id`` = the Comfy Registry id, ``ver`` = its version; ``comfy-core`` with
# ComfyUI's version for built-in nodes). Frontend-only nodes (notes) have no Python pack and get none, as
# in ComfyUI's own templates: a ``comfy-core`` id on them would make the frontend look for a missing core node.
PACK_ID = "zerocon"  # [project] name in pyproject.toml
CORE_PACK_ID = "comfy-core"
FRONTEND_ONLY = frozenset({"MarkdownNote", "Note"})


def pack_properties(node_type: str, pack_version: str, comfyui_version: str) -> dict:
    """The ``cnr_id`` / ``ver`` properties of a node of ``node_type`` ({} for a frontend-only node)."""
    if node_type in FRONTEND_ONLY:
        return {}
    if node_type.startswith("ZeroCon"):
        return {"cnr_id": PACK_ID, "ver": pack_version}
    return {"cnr_id": CORE_PACK_ID, "ver": comfyui_version}


def stamp_pack_ids(workflow: dict, pack_version: str, comfyui_version: str) -> dict:
    """Set ``pack_properties`` on every node of a UI-format workflow, in place; returns it."""
    for node in workflow["nodes"]:
        node.setdefault("properties", {}).update(pack_properties(node["type"], pack_version, comfyui_version))
    return workflow
