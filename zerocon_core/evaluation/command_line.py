"""What the command lines share (``python -m zerocon_core edit`` / ``eval``, ``bench/sweep.py``): logging to
stderr, the one-line error report and exit codes, the PIE-Bench input options and the metric models.

Exit codes: 0 ok, 2 a usage or user error (one line on stderr: ``<prog>: error: <message>``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from ..common.log import logger

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
LOG_FORMAT = "%(levelname)s zerocon: %(message)s"
T = TypeVar("T")


def log_level(verbose: int = 0, quiet: bool = False) -> int:
    """``-q``: warnings; ``-vv``: debug; else info."""
    return logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)


@contextlib.contextmanager
def log_to_stderr(level: int) -> Iterator[logging.Handler]:
    """Send the ``zerocon`` logger to stderr at ``level`` for the block; the logger's level is restored after."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def parse_or_exit_code(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit code where argparse exits (it prints the usage error itself)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE


def report_errors(
    run: Callable[[], Any],
    prog: str,
    errors: tuple[type[BaseException], ...] = USER_ERRORS,
    traceback: bool = False,
    interrupt: bool = True,
) -> int:
    """``run()``'s exit code (None: 0); ``errors`` become one line ``<prog>: error: <message>`` and code 2 (after
    the traceback with ``traceback``); with ``interrupt`` a Ctrl-C is ``<prog>: interrupted`` and code 130."""
    try:
        return int(run() or 0)
    except errors as exc:
        if traceback:
            import traceback as tb

            tb.print_exc(file=sys.stderr)
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        if not interrupt:
            raise
        sys.stderr.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """A ``cls`` settings dataclass from parsed options: every field named like an option takes its value,
    then ``values`` (options whose name or meaning differs: files to read, negated flags) replace those."""
    named = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**named, **values})


# ---------------------------------------------------------------------------------------------------------
# PIE-Bench inputs and metric models


def add_input_choice(parser: argparse.ArgumentParser, manifest_help: str, piebench_help: str) -> None:
    """The required choice between ``--manifest FILE`` and ``--piebench MAPPING_JSON``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--manifest", default=None, help=manifest_help)
    what.add_argument("--piebench", default=None, metavar="MAPPING_JSON", help=piebench_help)


def add_piebench_selection(group: Any) -> None:
    """``--images`` and ``--categories``: where PIE-Bench's source images are, which editing types to keep."""
    group.add_argument(
        "--images", default=None, metavar="DIR", help="source images (default: annotation_images next to the JSON)"
    )
    group.add_argument(
        "--categories", nargs="+", default=None, metavar="ID", help="only these editing_type_id values (0 ... 9)"
    )


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, (str, list)) and not value)


def check_piebench_only(args: argparse.Namespace, names: Sequence[str]) -> None:
    """``ValueError`` naming the options of ``names`` given without ``--piebench``."""
    if getattr(args, "piebench", None):
        return
    given = [f"--{k}" for k in names if _given(getattr(args, k, None))]
    if given:
        raise ValueError(f"{', '.join(given)} only go with --piebench")


def piebench_image_folder(mapping: str | Path, images: str | Path | None) -> Path:
    """The source image folder (default: ``annotation_images`` next to ``mapping``, PIE-Bench's layout);
    ``FileNotFoundError`` when it is not a folder."""
    folder = Path(images) if images is not None else Path(mapping).parent / "annotation_images"
    if not folder.is_dir():
        raise FileNotFoundError(f"PIE-Bench source image folder not found: {folder} (give --images)")
    return folder


def check_metric_folders(clip: str | None, dino: str | None, lpips: str | None = None) -> None:
    """Check the given CLIP / DINO / LPIPS model folders (``FileNotFoundError`` / ``ValueError``), loading nothing."""
    from ..diffuseit.dino import check_dino_folder
    from .lpips import check_lpips_folder
    from .metrics import check_clip_folder

    if clip:
        check_clip_folder(clip)
    if dino:
        check_dino_folder(dino)
    if lpips:
        check_lpips_folder(lpips)


def load_metric_models(
    clip: str | None, dino: str | None, lpips: str | None, device: torch.device
) -> tuple[Any, Any, Any]:
    """``(clip, dino, lpips)`` metric models from the given folders (None where a folder is not given)."""
    from ..diffuseit.dino import load_dino
    from .lpips import load_lpips
    from .metrics import load_clip_metric

    return (
        load_clip_metric(clip, device=device) if clip else None,
        load_dino(dino, device=device) if dino else None,
        load_lpips(lpips, device=device) if lpips else None,
    )
