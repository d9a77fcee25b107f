"""LPIPS with the SqueezeNet trunk (PIE-Bench's background LPIPS), in plain torch: no torchvision.

PIE-Bench scores with torchmetrics' ``LearnedPerceptualImagePatchSimilarity(net_type="squeeze")``, which is
Zhang et al.'s LPIPS v0.1: images in [-1, 1] are shifted/scaled (``SHIFT``, ``SCALE``), run through the
features of torchvision's SqueezeNet 1.1 (cut after modules 1, 4, 7, 9, 10, 11, 12: 64, 128, 256, 384, 384,
512, 512 channels), each feature map is unit-normalised over channels (``x / (||x|| + 1e-10)``), the squared
difference is weighted per channel by a learnt 1x1 convolution (no bias), averaged over the positions and
summed over the seven layers. This module rebuilds that network so that both weight files load unchanged.

Nothing is downloaded. ``load_lpips(folder)`` reads two files from a local folder:

- the SqueezeNet 1.1 ImageNet weights, torchvision's ``squeezenet1_1-b8a52dc0.pth`` (any file named
  ``squeezenet1_1*.pth`` or ``squeezenet1_1*.safetensors``; torchvision's state-dict keys ``features.N...``);
- the LPIPS v0.1 linear layers, ``squeeze.pth`` (or ``squeeze.safetensors``) as shipped in the ``lpips``
  package (``lpips/weights/v0.1/squeeze.pth``; keys ``lin0.model.1.weight`` ... ``lin6.model.1.weight``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.log import logger

__all__ = ["CHANNELS", "LPIPS_HELP", "SqueezeLpips", "check_lpips_folder", "load_lpips", "lpips_distance"]

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
#: channels of the seven compared feature maps
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
#: index (in ``features``) of the last module of each compared slice
_CUTS = (1, 4, 7, 9, 10, 11, 12)
_FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128)}
_FIRES.update({9: (256, 48, 192), 10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)})
LPIPS_HELP = (
    "put torchvision's SqueezeNet 1.1 weights (squeezenet1_1-b8a52dc0.pth) and the LPIPS v0.1 linear layers "
    "(squeeze.pth from the lpips package, lpips/weights/v0.1/squeeze.pth) in that folder"
)


class _Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], dim=1)


class _Lin(nn.Module):
    """``model.1`` is the 1x1 convolution (``model.0`` was LPIPS' dropout, a no-op in eval mode)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class SqueezeLpips(nn.Module):
    """LPIPS v0.1 on SqueezeNet 1.1 features. ``forward(x, y)``: images ``(B, 3, H, W)`` in [-1, 1] -> ``(B,)``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(13):
            if i == 0:
                layers.append(nn.Conv2d(3, 64, 3, stride=2))
            elif i == 1:
                layers.append(nn.ReLU())
            elif i in (2, 5, 8):
                layers.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
            else:
                layers.append(_Fire(*_FIRES[i]))
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(_Lin(c) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The seven compared feature maps of ``x`` in [-1, 1] (after the shift/scale)."""
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _CUTS:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = 0.0
        for lin, fx, fy in zip(self.lins, self.feature_maps(x), self.feature_maps(y)):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin.model((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return total


def _files(folder: Path) -> tuple[Path | None, Path | None]:
    trunk = sorted(p for p in folder.glob("squeezenet1_1*") if p.suffix in (".pth", ".safetensors"))
    lin = [folder / n for n in ("squeeze.pth", "squeeze.safetensors") if (folder / n).is_file()]
    return (trunk[0] if trunk else None), (lin[0] if lin else None)


def check_lpips_folder(folder: str | os.PathLike) -> tuple[Path, Path]:
    """The (trunk, linear layers) weight files in ``folder``; ``FileNotFoundError`` naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LPIPS model folder not found: {folder!s}; {LPIPS_HELP}")
    trunk, lin = _files(folder)
    missing = []
    if trunk is None:
        missing.append("squeezenet1_1*.pth (or .safetensors)")
    if lin is None:
        missing.append("squeeze.pth (or .safetensors)")
    if missing:
        raise FileNotFoundError(f"LPIPS model folder {folder!s} lacks {' and '.join(missing)}; {LPIPS_HELP}")
    return trunk, lin


def _state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(os.fspath(path))
        sd: Any = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable / not a state dict: a user error, said plainly
        raise ValueError(f"cannot read LPIPS weights {path}: {exc}") from exc
    if not isinstance(sd, dict):
        raise ValueError(f"LPIPS weights {path} are not a state dict (got {type(sd).__name__})")
    return sd


def load_lpips(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SqueezeLpips:
    """Build :class:`SqueezeLpips` from the two weight files in ``folder`` (see the module docstring); eval mode,
    frozen, float32. ``ValueError`` when a file lacks a weight or has the wrong shape."""
    trunk_path, lin_path = check_lpips_folder(folder)
    model = SqueezeLpips()
    trunk = {k: v for k, v in _state_dict(trunk_path).items() if k.startswith("features.")}
    lin = _state_dict(lin_path)
    lin = {f"lins.{k[3:]}": v for k, v in lin.items() if k.startswith("lin") and k[3:4].isdigit()}
    state = {**trunk, **lin}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"LPIPS weights in {folder!s} lack {len(missing)} tensor(s), e.g. {missing[:3]} "
            f"(found {trunk_path.name}: {len(trunk)} features.* tensors, {lin_path.name}: {len(lin)} lin tensors)"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"LPIPS weight {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: state[k].float() for k in expected})
    logger.info("loaded LPIPS (SqueezeNet 1.1) from %s", folder)
    return model.to(device).eval().requires_grad_(False)


def lpips_distance(model: SqueezeLpips, source: Tensor, edited: Tensor) -> Tensor:
    """LPIPS between images ``(B, 3, H, W)`` in [0, 1] (mapped to [-1, 1] as PIE-Bench does): ``(B,)`` CPU fp32."""
    device = next(model.parameters()).device
    with torch.no_grad():
        x = source.to(device=device, dtype=torch.float32) * 2 - 1
        y = edited.to(device=device, dtype=torch.float32) * 2 - 1
        return model(x, y).cpu()
