"""qlab.study.ladder: bits per weight counted exactly, and errors on matrices whose answer is known."""
import math

import pytest
import torch

from qlab.study.ladder import granularity_ladder


def test_bits_per_weight_is_codes_plus_fp16_scales():
    W = torch.randn(6, 96, generator=torch.Generator().manual_seed(0))
    rows = {r["granularity"]: r for r in granularity_ladder({"w": W}, bits=(4,), granularities=("tensor", "channel", "g64", "g32"))}
    assert rows["tensor"]["bits_per_weight"] == pytest.approx(4 + 16 / (6 * 96))
    assert rows["channel"]["bits_per_weight"] == pytest.approx(4 + 16 / 96)
    assert rows["g64"]["bits_per_weight"] == pytest.approx(4 + 16 * math.ceil(96 / 64) / 96)  # a 32-wide tail group
    assert rows["g32"]["bits_per_weight"] == pytest.approx(4.5)


def test_errors_on_a_matrix_with_a_known_answer():
    # each row is an integer vector -7..7 times its own power-of-two step: on the int4 grid per channel
    # (exact), not per tensor (row 0's step 2^-6 is below the shared step 2^-1 / ... of row 1)
    q = torch.arange(-7.0, 8.0).repeat(2, 1)
    W = q * torch.tensor([[2.0**-6], [2.0**-1]])
    rows = {r["granularity"]: r for r in granularity_ladder({"w": W}, bits=(4,), granularities=("tensor", "channel"))}
    assert rows["channel"]["rel_error"] == 0
    # per tensor the scale is row 1's 2^-1: row 0 (|x| <= 7/64 < 1/4) rounds to 0 everywhere
    expected = (W[0].norm() / W.norm()).item()
    assert rows["tensor"]["rel_error"] == pytest.approx(expected, rel=1e-6)


def test_bad_matrix_is_named():
    with pytest.raises(ValueError, match=r"matrices\['v'\] must be a 2-D tensor"):
        granularity_ladder({"v": torch.ones(8)})
