"""Command line: ``python -m zerocon_core edit --image IN --source cat --target dog --model MODEL --out OUT``.

Subcommands (argparse): ``edit`` (the text-guided pix2pix-zeroCon edit with diffusers). Errors the user can
fix (missing files/folders, bad values, unreadable images) print one line and exit with code 2; ``-v``
adds the traceback. The human summary (caption, timing table) goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ..common.log import logger
from ..evaluation.command_line import EXIT_USAGE as EXIT_USAGE  # re-exported: the old names
from ..evaluation.command_line import USER_ERRORS as USER_ERRORS
from ..evaluation.command_line import from_args, log_level, log_to_stderr, parse_or_exit_code, report_errors
from ..method.inversion import EVAL_AT
from .sd_models import DEFAULT_MODEL


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m zerocon_core`` parser: ``edit`` (here) and ``eval`` (``evaluation.evaluate``)."""
    parser = argparse.ArgumentParser(
        prog="python -m zerocon_core", description="ZeroCon: training-free image translation."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # options every subcommand takes (`edit` here, `eval` from zerocon_core.evaluation.evaluate)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v: tracebacks, -vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")

    p = sub.add_parser(
        "edit",
        parents=[common],
        help="text-guided edit (pix2pix-zeroCon) with an SD1.x/SD2.x/SDXL model",
        description="Caption -> edit direction -> DDIM inversion -> guided DDIM sampling -> output "
        "image of the input's size.",
    )
    _add_io_options(p.add_argument_group("input / output"))
    _add_direction_options(p.add_argument_group("edit direction"))
    s = p.add_argument_group("sampling")
    _add_guidance_options(s)
    _add_run_options(s)
    p.set_defaults(func=cmd_edit)
    from ..evaluation.evaluate import register as register_eval

    register_eval(sub, parents=[common])
    return parser


def _add_io_options(io: Any) -> None:
    io.add_argument("--image", required=True, metavar="FILE", help="input image file")
    io.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="SD1.x/SD2.x/SDXL model: a single-file checkpoint (.safetensors/.ckpt, e.g. from "
        "ComfyUI/models/checkpoints), a diffusers-layout folder, or a Hugging Face model id downloaded once "
        f"(default {DEFAULT_MODEL})",
    )
    io.add_argument(
        "--model-config",
        default=None,
        metavar="DIR",
        help="for a checkpoint file: a diffusers-layout folder of the same family whose configs and tokenizers "
        "describe it (default: the family's reference configs, from the Hugging Face cache or downloaded once)",
    )
    io.add_argument(
        "--out", required=True, metavar="FILE", help="output image file (.png, .jpg, ...); written atomically"
    )
    io.add_argument("--blip", default=None, metavar="DIR", help="local BLIP captioning folder (transformers layout)")
    io.add_argument("--caption", default=None, metavar="TEXT", help="source prompt; skips BLIP")
    io.add_argument(
        "--caption-min-tokens", type=int, default=0, metavar="N", help="BLIP: minimum new tokens (default 0)"
    )
    io.add_argument(
        "--strict-size",
        action="store_true",
        help="fail on sizes that are not multiples of 8 instead of resizing (and restoring)",
    )
    io.add_argument(
        "--save-direction", default=None, metavar="FILE", help="also save the edit direction (.safetensors)"
    )


def _add_direction_options(d: Any) -> None:
    d.add_argument("--source", default=None, metavar="WORD", help="source concept word, e.g. cat")
    d.add_argument("--target", default=None, metavar="WORD", help="target concept word, e.g. dog")
    d.add_argument("--target-prompt", default=None, metavar="TEXT", help="direction = target prompt minus the caption")
    d.add_argument(
        "--source-sentences", default=None, metavar="FILE", help="file: source sentence bank, one sentence per line"
    )
    d.add_argument(
        "--target-sentences", default=None, metavar="FILE", help="file: target sentence bank, one sentence per line"
    )
    d.add_argument("--direction", default=None, metavar="FILE", help="load a saved edit direction (.safetensors)")
    d.add_argument(
        "--num-sentences",
        type=_positive_int,
        default=300,
        metavar="N",
        help="template sentences per word when no sentence file is given (default 300)",
    )
    d.add_argument("--strength", type=float, default=1.0, metavar="X", help="edit direction multiplier (default 1)")


def _add_guidance_options(s: Any) -> None:
    from ..method.sampler import AUTO_STEP_SIZE, BRANCHES, STEP_MODES

    s.add_argument(
        "--steps", type=_positive_int, default=50, metavar="N", help="DDIM steps, inversion and sampling (default 50)"
    )
    s.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed: regulariser shifts, patch sampling, VAE sample"
    )
    s.add_argument(
        "--cfg", type=_non_negative, default=5.0, metavar="X", help="classifier-free guidance, caption as negative (5)"
    )
    s.add_argument(
        "--xa-weight",
        type=_non_negative,
        default=None,
        metavar="X",
        help="cross-attention guidance weight: a ratio in --step-mode auto (default 1), a step in raw mode "
        "(default 0.1; 0.01 for v-prediction); 0 = off",
    )
    s.add_argument(
        "--nce-weight",
        type=_non_negative,
        default=None,
        metavar="X",
        help="PatchNCE guidance weight: a ratio in --step-mode auto (default 1 = pulls as hard as "
        "cross-attention), a step in raw mode (default 0.5; 0.05 for v-prediction); 0 = off",
    )
    s.add_argument(
        "--step-mode",
        choices=STEP_MODES,
        default=None,
        help="auto (default; raw with --branches pix2pix-zero): each guidance step moves the latent by "
        "--step-size of its RMS, the terms mixed by their weights as ratios; raw: weight x gradient "
        "(pix2pix-zero); normalized: the raw direction rescaled to RMS --step-size",
    )
    s.add_argument(
        "--step-size",
        type=_non_negative,
        default=None,
        metavar="X",
        help=f"guidance step in auto mode, as a fraction of the latent's RMS (default {AUTO_STEP_SIZE:g}); "
        "unused in raw mode",
    )
    s.add_argument(
        "--branches",
        choices=BRANCHES,
        default="edit",
        help="edit: guide the edited forward only (default); both: both CFG halves of one latent; "
        "pix2pix-zero: pix2pix-zero's own two-copy update",
    )


def _add_run_options(s: Any) -> None:
    s.add_argument("--no-regularization", action="store_true", help="plain DDIM inversion (no noise regulariser)")
    s.add_argument(
        "--inversion",
        choices=EVAL_AT,
        default="current",
        help="where each inversion step queries the model: current (default; the level it starts from, "
        "ComfyUI's FlipSigmas + ddim convention) or next (the level it goes to: diffusers' DDIMInverseScheduler, "
        "as pix2pix-zero's diffusers pipeline)",
    )
    s.add_argument(
        "--posterior", choices=("mean", "sample"), default="mean", help="VAE latent: mean (default) or a sample"
    )
    s.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    s.add_argument(
        "--dtype", default="auto", help="auto (default: float16 on GPU, float32 on CPU), float32, float16, bfloat16"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def _read_sentences(path: str | None, what: str) -> list[str] | None:
    if path is None:
        return None
    from ..text.direction import parse_sentence_list

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    sentences = parse_sentence_list(p.read_text(encoding="utf-8"))
    if not sentences:
        raise ValueError(f"{what} file {p} has no sentences (one per line; '#' starts a comment)")
    return sentences


def _check_out(path: str) -> Path:
    from PIL import Image

    out = Path(path)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out.parent}")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"unknown output image extension {out.suffix!r} for {out}; use e.g. .png or .jpg")
    return out


def _edit_options(args: argparse.Namespace) -> Any:
    """The ``EditOptions`` of the ``edit`` arguments (sentence and direction files read, nothing validated)."""
    from ..text.direction import load_direction
    from .pipeline import EditOptions

    direction = load_direction(args.direction) if args.direction else None
    return from_args(
        EditOptions,
        args,
        source_sentences=_read_sentences(args.source_sentences, "source sentences"),
        target_sentences=_read_sentences(args.target_sentences, "target sentences"),
        direction=direction,
        regularization=not args.no_regularization,
        eval_at=args.inversion,
        blip_min_tokens=args.caption_min_tokens,
    )


def _check_edit_inputs(args: argparse.Namespace) -> tuple[Path, Any, Any]:
    """``(out, image, options)`` after every cheap check of the ``edit`` arguments (paths, values, sizes):
    nothing is loaded or written until they all pass."""
    from ..common.images import load_image
    from .sd_models import model_source

    out = _check_out(args.out)
    image = load_image(args.image)
    model_source(args.model)
    if args.model_config is not None and not Path(args.model_config).is_dir():
        raise FileNotFoundError(f"--model-config folder not found: {args.model_config}")
    if args.blip is not None and args.caption is None:
        from ..text.captioning import check_blip_folder

        check_blip_folder(args.blip)
    options = _edit_options(args)
    options.validate()
    if args.save_direction is not None and not Path(args.save_direction).parent.is_dir():
        raise FileNotFoundError(f"folder for --save-direction does not exist: {Path(args.save_direction).parent}")
    if args.strict_size:
        from ..common.images import fit_to_multiple

        fit_to_multiple(image, 8, strict=True)
    return out, image, options


def _summary(result: Any, out: Path) -> str:
    """The human summary of an edit on stdout: caption, direction, output, guidance, timing table."""
    from ..method.diagnostics import summary

    h, w = result.input_size
    lines = [
        f"caption:   {result.caption}",
        f"direction: {result.direction.describe()}",
        f"output:    {out} ({w}x{h})",
        f"guidance:  {summary(result.sample)}" if result.sample is not None else "guidance:  none",
        "",
        "where the time went:",
        result.timings.table(),
        "",
    ]
    return "\n".join(lines)


def cmd_edit(args: argparse.Namespace) -> int:
    """The ``edit`` subcommand. Validates every path before loading a model; raises USER_ERRORS for fixable input."""
    from ..common.images import save_image
    from ..text.direction import save_direction
    from .pipeline import Timings, ZeroConPipeline

    out, image, options = _check_edit_inputs(args)
    timings = Timings()
    with timings.stage("load"):
        pipe = ZeroConPipeline.from_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            blip_folder=args.blip if args.caption is None else None,
            model_config=args.model_config,
        )
    try:
        result = pipe.edit(image, options, progress=not args.no_progress, timings=timings)
    finally:
        pipe.close()
    save_image(result.image, out)
    if args.save_direction is not None:
        save_direction(args.save_direction, result.direction)
    sys.stdout.write(_summary(result, out))
    sys.stdout.flush()
    logger.info("wrote %s", out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 usage/user error, 130 interrupted)."""
    parser = build_parser()
    args = parse_or_exit_code(parser, argv)
    if isinstance(args, int):
        return args
    with log_to_stderr(log_level(args.verbose, args.quiet)):
        prog = f"{parser.prog} {args.command}"
        return report_errors(lambda: args.func(args), prog, traceback=bool(args.verbose))


if __name__ == "__main__":
    sys.exit(main())
