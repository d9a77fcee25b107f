"""The CLI's --branches choice reaches the guided sampler (pix2pix-zero included); a bad one is a usage error."""

from __future__ import annotations

import pytest

from zerocon_core.diffusers_host import cli
from zerocon_core.diffusers_host import pipeline as pipeline_module
from zerocon_core.method.sampler import BRANCHES

from .tiny import tiny_sd_folder, write_png


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("models") / "sd-tiny")


def _edit(model_dir, tmp_path, *extra: str) -> list[str]:
    image = write_png(tmp_path / "in.png")
    return [
        "edit",
        "--image",
        str(image),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "out.png"),
        "--caption",
        "a cat",
        "--target-prompt",
        "a dog",
        "--steps",
        "2",
        "--no-regularization",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def test_pix2pix_zero_branches_reach_the_sampler(model_dir, tmp_path, monkeypatch):
    seen = []
    real = pipeline_module.invert_and_edit

    def spy(*args, **kwargs):
        seen.append(kwargs["settings"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "invert_and_edit", spy)
    assert cli.main(_edit(model_dir, tmp_path, "--branches", "pix2pix-zero", "--cfg", "4")) == 0
    assert [(s.branches, s.cfg) for s in seen] == [("pix2pix-zero", 4.0)]
    assert (tmp_path / "out.png").is_file()


def test_bad_branches_is_a_usage_error(tmp_path, capsys):
    code = cli.main(["edit", "--branches", "negative"])
    assert code == 2
    err = capsys.readouterr().err
    choices = ", ".join(repr(b) for b in BRANCHES)
    assert f"argument --branches: invalid choice: 'negative' (choose from {choices})" in err
