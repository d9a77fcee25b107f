"""Where the CLI's Stable Diffusion model comes from, and loading its parts with diffusers.

``--model`` (:func:`model_source`) takes one of three forms:

- a **single-file checkpoint** (``.safetensors`` / ``.ckpt``, what ``ComfyUI/models/checkpoints`` holds):
  SD1.x, SD2.x or SDXL, loaded with diffusers' ``from_single_file``. The file holds the weights; the
  configs (UNet/VAE/CLIP shapes, scheduler, tokenizer vocabulary: a few MB of JSON and text) come from a
  diffusers-layout folder: ``config`` when given, else the family's reference repository on the Hugging
  Face Hub (:data:`REFERENCE_REPOS`), read from the Hugging Face cache or downloaded once.
- a **diffusers-layout folder** (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``; SDXL adds
  ``text_encoder_2/ tokenizer_2/``).
- a **Hugging Face model id** (``owner/name``, default :data:`DEFAULT_MODEL`): the parts the edit uses
  (full-precision safetensors only) are downloaded once to the Hugging Face cache, with a progress bar.

Local files never touch the network. Offline (``HF_HUB_OFFLINE=1``, or no connection) with nothing
local, the error says what to put where.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..common.log import logger
from ..common.model_folders import hub_offline

if TYPE_CHECKING:
    import torch

#: The model ``--model`` defaults to (diffusers' reference SD1.5 repository).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
#: diffusers' model types this pack edits, with the repository whose configs describe each family
#: (the repositories diffusers itself falls back to for these types).
REFERENCE_REPOS = {
    "v1": ("SD1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "v2": ("SD2.x", "stabilityai/stable-diffusion-2-1"),
    "xl_base": ("SDXL", "stabilityai/stable-diffusion-xl-base-1.0"),
}
#: Config files of a diffusers repository (the patterns diffusers' ``from_single_file`` fetches).
CONFIG_PATTERNS = ("*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model")
_WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FORMS = (
    "--model takes a single-file checkpoint (.safetensors/.ckpt, e.g. from ComfyUI/models/checkpoints), "
    "a diffusers-layout folder or a Hugging Face model id"
)


#: Sub-folders every diffusers-layout model folder needs; SDXL adds the ``*_2`` pair.
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


class NotLocalError(FileNotFoundError):
    """Files the model needs are neither on this machine nor downloadable now (offline, or no connection)."""


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names: ``kind`` is ``"checkpoint"`` (a file), ``"folder"`` or ``"hub"`` (a model id)."""

    kind: str
    location: str

    def __str__(self) -> str:
        return self.location


@dataclass
class SDParts:
    """The diffusers/transformers parts of one SD model (in eval mode, on the CPU) and its scheduler config."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: str = "SD"

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def check_sd_folder(folder: str | os.PathLike) -> bool:
    """Raise ``FileNotFoundError`` naming ``folder`` (or its missing parts) unless it is a diffusers-layout
    SD folder. Returns True for SDXL (``text_encoder_2/`` and ``tokenizer_2/`` present)."""
    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(
            f"model folder not found: {p} (expected a diffusers-layout Stable Diffusion folder with "
            f"{', '.join(f'{s}/' for s in REQUIRED_PARTS)})"
        )
    missing = [s for s in REQUIRED_PARTS if not (p / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model folder {p} is incomplete: missing {', '.join(f'{s}/' for s in missing)} "
            "(it must be in diffusers layout, e.g. written by DiffusionPipeline.save_pretrained)"
        )
    return all((p / s).is_dir() for s in SDXL_PARTS)


def model_source(model: str | os.PathLike | None) -> ModelSource:
    """Classify ``model`` (None: :data:`DEFAULT_MODEL`) without loading anything. An existing file must be a
    ``.safetensors``/``.ckpt`` checkpoint, an existing folder a diffusers-layout folder; a missing path raises
    ``FileNotFoundError``; ``owner/name`` that is not on disk is a Hugging Face model id."""
    if model is None:
        return ModelSource("hub", DEFAULT_MODEL)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        check_sd_folder(path)
        return ModelSource("folder", str(path))
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"model file {path} is not a .safetensors or .ckpt checkpoint ({_FORMS})")
        return ModelSource("checkpoint", str(path))
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or not _HUB_ID.match(text)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise FileNotFoundError(
            f"model file not found: {path} (SD1.x/SD2.x/SDXL checkpoints usually live in ComfyUI/models/checkpoints/)"
        )
    if looks_like_path:
        raise FileNotFoundError(
            f"model folder not found: {path} ({_FORMS}; a folder needs {', '.join(f'{s}/' for s in REQUIRED_PARTS)})"
        )
    return ModelSource("hub", text)


# ---------------------------------------------------------------------------------------------------------
# The Hugging Face Hub (one call site: tests replace it)


def _snapshot_download(repo_id: str, **kwargs: Any) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


def _fetch(repo_id: str, allow_patterns: list[str], what: str, missing: list[str] | None = None) -> Path:
    """The local snapshot of ``repo_id`` restricted to ``allow_patterns``: the Hugging Face cache when it holds
    every file of ``missing`` (relative paths; None: trust the cache), else downloaded when online (huggingface_hub
    draws the progress bars). Raises ``FileNotFoundError`` saying what to put where when offline."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(_snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
        if not [f for f in (missing or []) if not (folder / f).is_file()]:
            return folder
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise NotLocalError(f"{what} are not on this machine and downloads are off (HF_HUB_OFFLINE is set)")
    logger.info("downloading %s from the Hugging Face Hub (%s), once: later runs read the cache", what, repo_id)
    try:
        return Path(_snapshot_download(repo_id, allow_patterns=allow_patterns))
    except GatedRepoError as exc:
        raise PermissionError(
            f"{repo_id} needs a Hugging Face login and its license accepted (huggingface-cli login): {exc}"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local file or folder nor a model on the Hugging Face Hub ({_FORMS})"
        ) from None
    except LocalEntryNotFoundError as exc:  # no connection and nothing cached
        raise NotLocalError(f"{what} are not on this machine and the Hub cannot be reached ({exc})") from None


def hub_parts(sdxl: bool) -> list[str]:
    """Relative paths of the weight files a hub download must hold (full precision, safetensors)."""
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if sdxl else [])
    return [f"{p}/{_WEIGHTS[p]}" for p in parts]


def download_model(repo_id: str) -> Path:
    """The diffusers-layout folder of hub model ``repo_id`` in the Hugging Face cache, downloaded once: configs,
    tokenizers and the full-precision safetensors of UNet, VAE and text encoder(s) (no fp16/EMA variants,
    no safety checker)."""
    where = (
        f"pass --model with a checkpoint file (e.g. ComfyUI/models/checkpoints/<name>.safetensors) or a "
        f"diffusers folder (huggingface-cli download {repo_id} --local-dir DIR on a machine that is online)"
    )
    try:
        configs = _fetch(repo_id, ["model_index.json"], f"the files of model {repo_id}", missing=["model_index.json"])
    except NotLocalError as exc:
        raise FileNotFoundError(
            f"{exc}: run once online to download it to the Hugging Face cache, or {where}"
        ) from None
    sdxl = "text_encoder_2" in _read_json(configs / "model_index.json")
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + (
        ["text_encoder_2", "tokenizer_2"] if sdxl else []
    )
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*"]
    patterns += [f"{p}/config.json" for p in parts if p in _WEIGHTS] + hub_parts(sdxl)
    try:
        folder = _fetch(repo_id, patterns, f"the weights of model {repo_id}", missing=hub_parts(sdxl))
    except NotLocalError as exc:
        raise FileNotFoundError(f"{exc}: run once online to finish the download, or {where}") from None
    check_sd_folder(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Single-file checkpoints


class _LazyCheckpoint(Mapping):
    """Read-only view of a ``.safetensors`` file: keys at once, a tensor only when indexed."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _open_checkpoint(path: Path) -> Mapping:
    """The checkpoint's state dict, lazily for ``.safetensors``; ``ValueError`` if it cannot be read."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            return _LazyCheckpoint(path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a checkpoint we can read"
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"cannot read checkpoint {path}: it holds no state dict")
    return sd


def checkpoint_type(path: str | os.PathLike) -> str:
    """diffusers' model type of a single-file checkpoint (``v1``, ``v2``, ``xl_base``); ``ValueError`` naming
    the file and what is supported for anything else (inpainting, refiner, SD3, Flux, LoRAs, ...)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    path = Path(path)
    sd = _open_checkpoint(path)
    if not any(k.startswith("model.diffusion_model.") for k in sd):
        raise ValueError(
            f"{path} is not a full Stable Diffusion checkpoint (no UNet weights: a LoRA, VAE or other part?); "
            "supported: SD1.x, SD2.x and SDXL base checkpoints"
        )
    model_type = infer_diffusers_model_type(sd)
    if model_type not in REFERENCE_REPOS:
        raise ValueError(
            f"{path} is a {model_type!r} checkpoint; supported: SD1.x, SD2.x and SDXL base checkpoints "
            "(not inpainting, refiner, SD3, Flux or other families)"
        )
    return model_type


def sd2_prediction_type(path: str | os.PathLike) -> str:
    """``v_prediction`` or ``epsilon`` for an SD2.x checkpoint, by ComfyUI's rule (SD2 768-v and SD2-base share
    one architecture): v-prediction when the last up-block's first transformer norm bias has a population
    standard deviation above 0.09."""
    import torch

    sd = _open_checkpoint(Path(path))
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if key in sd and float(torch.std(sd[key].float(), unbiased=False)) > 0.09:
        return "v_prediction"
    return "epsilon"


def checkpoint_configs(path: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``(config_folder, model_type)`` for checkpoint ``path``: ``config`` (a diffusers-layout folder, weights
    optional) when given, else the configs of the family's reference repository from the Hugging Face cache,
    downloaded once (a few MB) when online."""
    model_type = checkpoint_type(path)
    family, repo = REFERENCE_REPOS[model_type]
    if config is not None:
        folder = Path(config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model config folder {folder} has no model_index.json (give a diffusers-layout folder: "
                "its configs and tokenizers are enough, weights are not needed)"
            )
        return folder, model_type
    try:
        folder = _fetch(repo, list(CONFIG_PATTERNS), f"the configs of {family} models ({repo})", ["model_index.json"])
    except NotLocalError as exc:
        raise FileNotFoundError(
            f"{exc}: {Path(path).name} holds the weights, its configs come from {repo}. Run once online "
            f"(a few MB are downloaded to the Hugging Face cache), or pass --model-config DIR with a diffusers "
            f"folder of the same family (configs are enough: huggingface-cli download {repo} --include '*.json' "
            f"'*.txt' --local-dir DIR)"
        ) from None
    return folder, model_type


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None, config: str | os.PathLike | None = None
) -> SDParts:
    """Load a single-file SD1.x/SD2.x/SDXL checkpoint (configs: :func:`checkpoint_configs`; ``dtype`` None:
    float32), nothing from the
    network once the configs are local. SD2.x from the reference configs gets its prediction type from
    :func:`sd2_prediction_type`."""
    import torch

    dtype = dtype or torch.float32
    path = Path(path)
    folder, model_type = checkpoint_configs(path, config)
    sdxl = (folder / "text_encoder_2").is_dir()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra: dict[str, Any] = {} if sdxl else dict(safety_checker=None, feature_extractor=None)
    if not sdxl:
        extra["requires_safety_checker"] = False
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **extra)
    sched = dict(pipe.scheduler.config)
    if model_type == "v2" and config is None:
        sched["prediction_type"] = sd2_prediction_type(path)
    family = "SDXL" if sdxl else REFERENCE_REPOS[model_type][0]
    return SDParts(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        sched,
        text_encoder_2=getattr(pipe, "text_encoder_2", None) if sdxl else None,
        tokenizer_2=getattr(pipe, "tokenizer_2", None) if sdxl else None,
        family=family,
    )


def load_folder(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> SDParts:
    """Load every part from a local diffusers-layout folder (``local_files_only``); ``dtype`` None: float32."""
    import torch

    dtype = dtype or torch.float32
    folder = Path(folder)
    sdxl = check_sd_folder(folder)
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **kw)
    vae_cfg = _read_json(folder / "vae" / "config.json")
    vae_dt = torch.float32 if (dtype == torch.float16 and vae_cfg.get("force_upcast", False)) else dtype
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dt, **kw)
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype, **kw)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", **kw)
    te2 = tok2 = None
    if sdxl:
        te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype, **kw)
        tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", **kw)
    return SDParts(unet, vae, te, tok, sched_cfg, te2, tok2, family="SDXL" if sdxl else "SD")


def load_model(
    source: ModelSource, dtype: torch.dtype | None = None, config: str | os.PathLike | None = None
) -> SDParts:
    """Load ``source`` (see :func:`model_source`). ``config``: configs for a checkpoint (ignored otherwise).
    A VAE whose config asks for ``force_upcast`` stays float32 when ``dtype`` is float16."""
    import torch

    dtype = dtype or torch.float32
    if source.kind == "checkpoint":
        parts = load_checkpoint(source.location, dtype, config)
    elif source.kind == "folder":
        parts = load_folder(source.location, dtype)
    elif source.kind == "hub":
        parts = load_folder(download_model(source.location), dtype)
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    if dtype == torch.float16 and bool(getattr(parts.vae.config, "force_upcast", False)):
        parts.vae.to(torch.float32)
    return parts
