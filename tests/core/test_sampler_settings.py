"""SamplerSettings: one frozen object carries the guided loop's settings; bad values fail on construction."""

from __future__ import annotations

import dataclasses

import pytest

from zerocon_core.method.sampler import BRANCHES, STEP_MODES, SamplerSettings


def test_defaults_and_frozen():
    s = SamplerSettings()
    assert (s.cfg, s.step_mode, s.step_size, s.branches, s.seed, s.resample, s.keep_reference) == (
        5.0,
        "auto",
        0.02,
        "edit",
        0,
        1,
        False,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.cfg = 1.0  # type: ignore[misc]
    assert set(BRANCHES) == {"edit", "both", "pix2pix-zero"} and set(STEP_MODES) == {"auto", "raw", "normalized"}


def test_default_step_mode_follows_branches():
    """No step mode given: "auto", except branches "pix2pix-zero" (pix2pix-zero's own raw update); an explicit
    mode always wins."""
    assert SamplerSettings(branches="edit").step_mode == "auto"
    assert SamplerSettings(branches="both").step_mode == "auto"
    assert SamplerSettings(branches="pix2pix-zero").step_mode == "raw"
    assert SamplerSettings(branches="pix2pix-zero", step_mode="auto").step_mode == "auto"
    assert SamplerSettings(branches="edit", step_mode="raw").step_mode == "raw"


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(step_mode="adam"), "step_mode must be one of ('auto', 'raw', 'normalized'), got 'adam'"),
        (dict(step_size=-0.1), "step_size must be a finite number >= 0, got -0.1"),
        (dict(step_size=float("nan")), "step_size must be a finite number >= 0, got nan"),
        (dict(branches="neg"), "branches must be one of ('edit', 'both', 'pix2pix-zero'), got 'neg'"),
        (dict(resample=0), "resample must be an integer >= 1, got 0"),
        (dict(resample=2.0), "resample must be an integer >= 1, got 2.0"),
        (dict(resample=True), "resample must be an integer >= 1, got True"),
    ],
)
def test_bad_settings_raise_on_construction(changes, message):
    with pytest.raises(ValueError) as err:
        SamplerSettings(**changes)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # a copy is validated again
        dataclasses.replace(SamplerSettings(), **changes)
    assert str(err.value) == message
