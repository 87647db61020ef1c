"""The 256-point E8 codebook of 3-bit QuIP# (E81B), against quip-sharp's construction and by brute force.

Outside reference: tests/data/lattice/e81b_reference.json, written by make_e81b_reference.py from quip-sharp's own
get_e81bgrid (transcribed line for line); qlab builds the set differently (itertools over {-1, 0, 1} and {+-1/2}).
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from qlab.core.formats.lattice import e81b_codebook, e81b_decode, e81b_nearest, nearest_e8

REFERENCE = json.loads((Path(__file__).parents[2] / "data" / "lattice" / "e81b_reference.json").read_text())


def _digest(table):
    return hashlib.sha256((table * 4).round().to(torch.int8).numpy().tobytes()).hexdigest()


def test_e81b_equals_quip_sharps_set_and_code_order():
    C = e81b_codebook()
    assert C.shape == (256, 8) and REFERENCE["n_distinct"] == 256
    rows = torch.tensor(sorted(map(tuple, C.tolist())), dtype=torch.float64)
    assert len(torch.unique(rows, dim=0)) == 256
    assert _digest(rows) == REFERENCE["sha256_sorted_set"]  # the same 256 vectors
    assert _digest(C) == REFERENCE["sha256_code_order"]  # with the same 8-bit code each


def test_e81b_is_the_short_vectors_of_e8_plus_fifteen_of_norm_4():
    C = e81b_codebook()
    assert torch.equal(nearest_e8(C), C)  # every point is in E8
    norms = (C**2).sum(-1)
    assert {float(v): int((norms == v).sum()) for v in norms.unique()} == {0.0: 1, 2.0: 240, 4.0: 15}
    assert REFERENCE["norm_counts"] == {"0.0": 1, "2.0": 240, "4.0": 15}
    assert C[0].tolist() == [-1, -1, 0, 0, 0, 0, 0, 0]  # the smallest integer root, lexicographically
    assert C[113].tolist() == [-0.5] * 8  # the half-integer roots follow the 1 + 112 integer points
    assert (C[241:249] == 2 * torch.eye(8, dtype=torch.float64)).all() and C[255].tolist() == [0] * 6 + [-2, 0]
    assert not bool((C == torch.tensor([0.0] * 7 + [-2.0])).all(-1).any())  # -2 e_7 is the one left out


def test_e81b_nearest_equals_brute_force_and_decode():
    x = 0.7 * torch.randn(4000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    points, codes = e81b_nearest(x)
    C = e81b_codebook()
    assert torch.equal(codes, torch.cdist(x, C).argmin(1))
    assert torch.equal(points, C[codes]) and torch.equal(e81b_decode(codes), points)
    assert len(codes.unique()) > 200  # the test really visits most of the codebook


def test_e81b_refuses_bad_codes_and_group_sizes():
    with pytest.raises(ValueError, match="8-bit"):
        e81b_decode(torch.tensor([256]))
    with pytest.raises(ValueError, match="8-bit"):
        e81b_decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        e81b_nearest(torch.zeros(3, 4))
