"""The reference from the inversion: record the guidance's captures during DDIM inversion, replay them.

With the "current" convention and no inversion CFG, the inversion's forward at ascending level ``k``
(latent ``trajectory[k]``, sigma ``sigmas[k]``, the source conditioning) is exactly the reference forward
of sampling step ``i = n - k`` when the reference latent is pinned to the inverted trajectory (Direct
Inversion's source branch). ``ddim_invert(record=...)`` keeps, at those levels, the captures a list of
guidance terms requests (``RecordSettings``); ``guided_ddim_sample`` with ``SamplerSettings.reference``
"inverted" replays them instead of running a reference forward. Sampling step 0 (sigma_max) is never
evaluated by the inversion: one reference forward there.

Storage is compact (fp16 / bf16 on the offload device) and bounded by ``RecordSettings.budget_mb``: the
levels that do not fit are not recorded, and the sampler runs the reference forward live at those steps
(on the inverted latent, so the maps are the same; only the pass is not saved). Cross-attention
probabilities are kept whole; a feature layer read only by terms with a ``samples_key`` (PatchNCE) keeps
only what they read: the p x p pooled map at the step's sample locations (``losses.PatchSamples``), which
are a pure function of the term's seed and (step, layer, patch size), so the sampler draws the same ones.

Nothing here assumes a UNet: the contract is the ``Denoiser``'s (probs ``(B, heads, HW, T)``, features
``(B, C, H, W)``), for any family whose inversion forward is the reference forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..common.log import logger
from .denoiser import CaptureRequest, Prediction
from .guidance import GuidanceTerm
from .losses import PatchSamples

REFERENCES = ("inverted", "resampled")
STORAGE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class RecordSettings:
    """What ``ddim_invert`` records for the sampler to replay.

    ``guidance``: the terms the sampler will run (their merged ``CaptureRequest`` over the denoiser's
    layers is recorded, at the levels where some term is active). ``num_steps``: sampling steps (= the
    inversion's). ``dtype``: storage dtype name ("float16", "bfloat16"; "float32"/"float64" for tests).
    ``device``: where the record lives (None: the latent's device; "cpu" to offload). ``budget_mb``: the
    most the record may hold (MiB); levels beyond it are left out (logged, listed in ``ReferenceRecord.missing``).
    """

    guidance: tuple[GuidanceTerm, ...] = ()
    dtype: str = "float16"
    device: str | None = "cpu"
    budget_mb: float = 4096.0

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"record dtype must be one of {tuple(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not self.budget_mb >= 0:
            raise ValueError(f"record budget must be >= 0 MiB, got {self.budget_mb!r}")


@dataclass
class ReferenceRecord:
    """Captures recorded during an inversion, by ascending level ``k`` (sampling step ``n - k``).

    ``request``: what was recorded (merged request of the terms). ``captures[k]``: a ``Prediction`` with
    ``eps`` None and the requested probs/features, in the storage dtype on the storage device.
    ``missing``: levels that needed captures but did not fit the budget. ``step_bytes``: bytes of one
    level's captures (0 before anything was recorded). ``eval_at`` / ``cfg``: the inversion's convention
    and CFG (replay is exact only for "current" and cfg 1). ``sampled``: feature layers kept as
    ``PatchSamples``, with the ``samples_key`` of each term they were taken for; the other feature layers of
    ``request`` are kept whole.
    """

    request: CaptureRequest
    num_steps: int
    eval_at: str
    cfg: float
    captures: dict[int, Prediction] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    step_bytes: int = 0
    sampled: dict[str, frozenset] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(prediction_bytes(p) for p in self.captures.values())


def merged_request(terms: Sequence[GuidanceTerm], layers) -> tuple[list[CaptureRequest], CaptureRequest]:
    """Each term's request over ``layers`` and their union."""
    reqs = [t.request(layers) for t in terms]
    merged = CaptureRequest()
    for r in reqs:
        merged = merged | r
    return reqs, merged


def needed_steps(terms: Sequence[GuidanceTerm], num_steps: int) -> list[int]:
    """Sampling steps at which some term that requests captures is active (ascending)."""
    return [i for i in range(num_steps) if any(t.active(i, num_steps) for t in terms)]


def prediction_bytes(p: Prediction) -> int:
    """Bytes held by the probs and features of ``p`` (eps not counted; ``PatchSamples`` by their values)."""
    tensors = [*p.probs.values(), *p.features.values()]
    return sum(t.nbytes if isinstance(t, PatchSamples) else t.numel() * t.element_size() for t in tensors)


def step_record_bytes(
    probs: Sequence[tuple[int, int]],
    features: Sequence[tuple[int, int]],
    tokens: int,
    bytes_per: int,
    batch: int = 1,
    patches: Sequence[tuple[int, int]] = (),
) -> int:
    """Bytes of one level's record:
    ``batch * (sum_l heads_l * HW_l * tokens + sum_m C_m * HW_m + sum_j C_j * S_j) * bytes_per``.

    ``probs``: (heads, HW) per recorded cross-attention layer; ``features``: (channels, HW) per feature layer
    kept whole; ``patches``: (channels, S) per (PatchNCE layer, patch size) kept as samples, with
    ``S = min(num_patches, (H // p) * (W // p))``. Stored shapes: (B, heads, HW, tokens), (B, C, H, W), (B, C, S).
    """
    n = sum(h * hw * tokens for h, hw in probs) + sum(c * hw for c, hw in features) + sum(c * k for c, k in patches)
    return batch * n * bytes_per


def resolve_reference(
    reference: str, record: ReferenceRecord | None, *, has_trajectory: bool, negative_is_source: bool, branches: str
) -> tuple[str, str]:
    """The reference mode the sampler actually runs, and why (a log-ready sentence; "" when as asked).
    ``reference`` is a validated ``SamplerSettings.reference``.

    "inverted" needs an inversion trajectory, the "current" convention without inversion CFG, the source
    as the negative, and branches other than "pix2pix-zero" (kept on diffusers' lockstep reference);
    otherwise it falls back to "resampled".
    """
    if reference == "resampled":
        return "resampled", ""
    why = ""
    if not has_trajectory:
        why = "no inversion trajectory was given"
    elif record is not None and record.eval_at != "current":
        why = f"the inversion used the {record.eval_at!r} convention (its forwards are not the reference's)"
    elif record is not None and record.cfg != 1.0:
        why = "the inversion used CFG (the reference is the source caption alone)"
    elif not negative_is_source:
        why = "a separate negative needs negative-conditioned reference maps, which the inversion never computed"
    elif branches == "pix2pix-zero":
        why = "branches 'pix2pix-zero' keeps diffusers' lockstep reference"
    if why:
        return "resampled", f"reference 'inverted' falls back to 'resampled': {why}"
    return "inverted", ""


def record_gap(record: ReferenceRecord, terms: Sequence[GuidanceTerm], layers) -> str:
    """Why ``record`` cannot stand in for the reference forward of ``terms`` over ``layers`` ("" when it can):
    a layer the terms read is not recorded, or a term reads samples (``samples_key``) the record lacks."""
    for term in terms:
        req = term.request(layers)
        if not (req.probs <= record.request.probs and req.features <= record.request.features):
            return "the inversion's record lacks some guided layers"
        key = term.samples_key
        if key is None and any(n in record.sampled for n in req.features):
            return f"the inversion recorded only samples of feature layers {type(term).__name__} reads whole"
        if key is not None and any(n in record.sampled and key not in record.sampled[n] for n in req.features):
            return (
                f"the inversion recorded {type(term).__name__}'s samples for other settings (patch sizes, number "
                "of patches or seed)"
            )
    return ""


@dataclass
class Inversion:
    """Result of ``ddim_invert``: ``latent`` at ``sigmas[-1]`` (sigma space), the ascending ``sigmas`` and
    the ``trajectory`` of latents, one per level (``trajectory[k]`` is at ``sigmas[k]``). ``record``: the
    reference captures recorded for the sampler to replay (``ddim_invert(record=...)``), else None. Defined
    here so that the sampler reads it without importing the inversion."""

    latent: Tensor
    sigmas: Tensor
    trajectory: list[Tensor] = field(default_factory=list)
    record: ReferenceRecord | None = None


class Recorder:
    """Used by ``ddim_invert``: decides which levels to record and stores their captures within budget."""

    def __init__(self, settings: RecordSettings, layers, num_steps: int, eval_at: str, cfg: float) -> None:
        reqs, self.request = merged_request(settings.guidance, layers)
        capturing = [t for t, r in zip(settings.guidance, reqs) if r]
        readers = {n: [t for t, r in zip(settings.guidance, reqs) if n in r.features] for n in self.request.features}
        # a feature layer whose readers all read samples keeps only those (one reader per samples key)
        self.samplers = {
            n: list({t.samples_key: t for t in ts}.values())
            for n, ts in readers.items()
            if all(t.samples_key is not None for t in ts)
        }
        self.settings = settings
        self.num_steps = num_steps
        self.dtype = STORAGE_DTYPES[settings.dtype]
        self.budget = int(settings.budget_mb * 2**20)
        # levels k = n - i for the sampling steps i >= 1 that need captures (step 0 is never evaluated here)
        self.wanted = sorted(num_steps - i for i in needed_steps(capturing, num_steps) if i >= 1)
        self.record = ReferenceRecord(self.request, num_steps, eval_at, cfg)
        self.record.sampled = {n: frozenset(t.samples_key for t in ts) for n, ts in self.samplers.items()}
        self.keep: set[int] | None = None  # decided once one level's size is known

    def wants(self, k: int) -> CaptureRequest | None:
        """The request to capture with at inversion level ``k``, or None."""
        if not self.request or k not in self.wanted or (self.keep is not None and k not in self.keep):
            return None
        return self.request

    def compact(self, name: str, fmap: Tensor, step: int) -> Tensor | PatchSamples:
        """What the record keeps of the feature map of ``name`` at sampling ``step`` (before the storage cast)."""
        terms = self.samplers.get(name)
        if not terms:
            return fmap
        out = terms[0].reference_samples(name, fmap, step)
        for t in terms[1:]:
            out = out.merge(t.reference_samples(name, fmap, step))
        return out

    def add(self, k: int, pred: Prediction) -> None:
        """Store the captures of the inversion forward at level ``k`` (sampling step ``n - k``), if they fit."""
        dev = self.settings.device
        step = self.num_steps - k
        feats = {n: self.compact(n, t.detach(), step) for n, t in pred.features.items()}
        stored = Prediction(
            None,
            {n: t.detach().to(device=dev or t.device, dtype=self.dtype) for n, t in pred.probs.items()},
            {n: t.to(device=dev or fmap_device(t), dtype=self.dtype) for n, t in feats.items()},
        )
        size = prediction_bytes(stored)
        if self.keep is None:
            self.record.step_bytes = size
            fit = self.budget // size if size else len(self.wanted)
            # the earliest sampling steps (highest levels) matter most: keep those
            self.keep = set(sorted(self.wanted, reverse=True)[: int(fit)])
            self.record.missing = sorted(set(self.wanted) - self.keep)
            if self.record.missing:
                logger.warning(
                    "reference record: %d of %d levels fit the %.0f MiB budget (%.1f MiB per level); the "
                    "sampler runs the reference forward at sampling steps %s",
                    len(self.keep),
                    len(self.wanted),
                    self.settings.budget_mb,
                    size / 2**20,
                    sorted(self.num_steps - k for k in self.record.missing),
                )
            if k not in self.keep:
                return
        self.record.captures[k] = stored

    def finish(self) -> ReferenceRecord:
        logger.info(
            "reference record: %d levels, %.1f MiB (%s)",
            len(self.record.captures),
            self.record.nbytes / 2**20,
            self.settings.dtype,
        )
        return self.record


def fmap_device(t: Tensor | PatchSamples) -> torch.device:
    """The device a feature capture (map or ``PatchSamples``) lives on."""
    if isinstance(t, PatchSamples):
        return next(iter(t.values.values())).device if t.values else torch.device("cpu")
    return t.device


def replayed(record: ReferenceRecord, k: int, request: CaptureRequest, like: Tensor) -> Prediction | None:
    """The recorded captures at level ``k`` covering ``request``, cast to ``like``'s dtype/device; else None."""
    p = record.captures.get(k)
    if p is None or not (request.probs <= p.probs.keys() and request.features <= p.features.keys()):
        return None
    cast = {"device": like.device, "dtype": like.dtype}
    return Prediction(
        None, {n: p.probs[n].to(**cast) for n in request.probs}, {n: p.features[n].to(**cast) for n in request.features}
    )
