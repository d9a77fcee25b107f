"""DDIM grids (zerocon_core.method.schedule): step-count validation and edges."""

from __future__ import annotations

import pytest

from zerocon_core.method.schedule import ddim_sigmas, ddim_timesteps

# -- steps -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, None])
def test_bad_step_counts(den, steps):
    with pytest.raises(ValueError, match="steps"):
        ddim_sigmas(den.sigma_table, steps)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(steps)


def test_step_count_edges(den):
    assert len(ddim_sigmas(den.sigma_table, 1)) == 2
    assert ddim_timesteps(1).tolist() == [1]
    assert len(ddim_sigmas(den.sigma_table, 999)) == 1000
    assert ddim_timesteps(999)[0] == 999
    with pytest.raises(ValueError, match="past the model's last"):  # offset 1: timestep 1000 does not exist
        ddim_sigmas(den.sigma_table, 1000)
    assert ddim_timesteps(1000, steps_offset=0)[0] == 999
    with pytest.raises(ValueError, match="cannot exceed"):
        ddim_sigmas(den.sigma_table, 1001)
