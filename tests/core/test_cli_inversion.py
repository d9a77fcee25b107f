"""``--inversion current|next`` on the command line: parsed, passed to ``EditOptions.eval_at``, bad values refused.

The pass-through check stops the ``edit`` command right after it has built its ``EditOptions`` (at
``validate``), so no model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zerocon_core.diffusers_host import cli, pipeline, sd_models
from zerocon_core.method.inversion import EVAL_AT


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 128, np.uint8), "RGB").save(path)
    return path


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    image = _png(tmp_path / "in.png")
    return ["edit", "--image", str(image), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out.png")] + [
        "--source",
        "cat",
        "--target",
        "dog",
        *extra,
    ]


def test_parsed_with_current_as_default(tmp_path):
    parser = cli.build_parser()
    assert parser.parse_args(_argv(tmp_path)).inversion == "current"
    assert parser.parse_args(_argv(tmp_path, "--inversion", "next")).inversion == "next"
    assert EVAL_AT == ("current", "next")


class _Built(Exception):
    pass


@pytest.mark.parametrize("flag,expected", [((), "current"), (("--inversion", "next"), "next")])
def test_passed_through_to_edit_options(tmp_path, monkeypatch, flag, expected):
    seen = {}

    def capture(options):
        seen["eval_at"] = options.eval_at
        raise _Built

    monkeypatch.setattr(sd_models, "model_source", lambda model: None)
    monkeypatch.setattr(pipeline.EditOptions, "validate", capture)
    with pytest.raises(_Built):
        cli.cmd_edit(cli.build_parser().parse_args(_argv(tmp_path, *flag)))
    assert seen == {"eval_at": expected}


def test_bad_value_is_a_usage_error(tmp_path, capsys):
    assert cli.main(_argv(tmp_path, "--inversion", "diffusers")) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--inversion: invalid choice: 'diffusers'" in err and "current" in err and "next" in err


def test_edit_options_refuse_an_unknown_convention():
    with pytest.raises(ValueError, match=r"eval_at \(the inversion convention\) must be one of current, next, got 'x'"):
        pipeline.EditOptions(source="cat", target="dog", eval_at="x").validate()
    pipeline.EditOptions(source="cat", target="dog", eval_at="next").validate()
