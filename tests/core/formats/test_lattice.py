import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch

from qlab.core.formats.lattice import (e8p_abs_patterns, e8p_codebook, e8p_decode, e8p_encode, e8p_nearest,
                                       generator, nearest_an, nearest_dn, nearest_e8, nearest_zn,
                                       normalized_second_moment)

REFERENCE = json.loads((Path(__file__).parents[2] / "data" / "lattice" / "e8p_reference.json").read_text())


# ---------------------------------------------------------------- decoders


def _is_dn(y):
    return bool(((y == y.round()).all(-1) & (y.sum(-1) % 2 == 0)).all())


def _is_e8(y):
    integer = (y == y.round()).all(-1)
    half = (y - 0.5 == (y - 0.5).round()).all(-1)
    return bool(((integer | half) & (y.sum(-1) % 2 == 0)).all())


def _brute_force(x, offsets_of, cosets):
    """Nearest among every lattice point within 1 of round(x - c) + c in each coordinate, for each coset c.

    Enough for D4, D8, E8 (covering radius <= sqrt 2 < 1.5, so the nearest point's coordinates are within 1 of
    the rounded ones); the candidates are enumerated, not decoded.
    """
    n = x.shape[-1]
    box = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=n)), dtype=x.dtype)
    best = []
    for xi in x:
        cands = torch.cat([torch.round(xi - c) + c + box for c in cosets])
        cands = cands[offsets_of(cands)]  # keep the lattice points
        best.append(cands[((cands - xi) ** 2).sum(-1).argmin()])
    return torch.stack(best)


def test_e8_hand_example_from_conway_sloane():
    x = torch.tensor([0.1, 0.1, 0.8, 1.3, 2.2, -0.6, -0.7, 0.9], dtype=torch.float64)
    assert nearest_dn(x).tolist() == [0, 0, 1, 1, 2, 0, -1, 1]  # rounds to sum 3; -0.6 re-rounded to 0
    assert nearest_e8(x).tolist() == [0, 0, 1, 1, 2, 0, -1, 1]  # squared distance 0.65 beats the coset's 0.95
    assert ((x - nearest_dn(x - 0.5) - 0.5) ** 2).sum().item() == pytest.approx(0.95)


def test_d4_hand_example():
    # (0.6, 0.2, 0.1, 0) rounds to (1, 0, 0, 0), odd; the worst-rounded coordinate is 0.6 (error 0.4) -> 0
    assert nearest_dn(torch.tensor([0.6, 0.2, 0.1, 0.0])).tolist() == [0, 0, 0, 0]
    # (0.6, 0.45, 0, 0) rounds to (1, 0, 0, 0); the worst is 0.45 (error 0.45) -> (1, 1, 0, 0)
    assert nearest_dn(torch.tensor([0.6, 0.45, 0.0, 0.0])).tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("name", ["D4", "D8", "E8"])
def test_decoders_agree_with_brute_force(name):
    nearest, _, n = generator(name)
    x = 3 * torch.randn(300, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = nearest(x)
    assert _is_dn(y) if name != "E8" else _is_e8(y)
    cosets = (0.0, 0.5) if name == "E8" else (0.0,)
    expected = _brute_force(x, lambda c: (c.sum(-1) % 2 == 0), cosets)
    torch.testing.assert_close(((x - y) ** 2).sum(-1), ((x - expected) ** 2).sum(-1), rtol=0, atol=1e-12)
    assert torch.equal(y, expected)  # no ties on continuous random inputs


def test_zn_and_hexagonal_a2_against_brute_force():
    x = torch.randn(200, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(nearest_zn(x), torch.round(x))
    # A2 in R^3: enumerate the zero-sum integer points near x (lattice points u B, |u_i| <= 4)
    _, B, _ = generator("A2")
    pts = torch.tensor(list(itertools.product(range(-4, 5), repeat=2)), dtype=torch.float64) @ B
    p = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) @ B
    y = nearest_an(p)
    assert bool((y.sum(-1) == 0).all()) and torch.equal(y, y.round())
    expected = pts[torch.cdist(p, pts).argmin(1)]
    assert torch.equal(y, expected)


# Conway & Sloane, "Sphere Packings, Lattices and Groups", table 2.3: G(Z) = 1/12, G(A2) = 5 / (36 sqrt 3),
# G(D4) = 0.0766032, G(E8) = 929/12960
CLOSED_FORM = {"Z1": 1 / 12, "A2": 5 / (36 * 3**0.5), "D4": 0.0766032, "E8": 929 / 12960}


@pytest.mark.parametrize("name", list(CLOSED_FORM))
def test_normalized_second_moment_matches_closed_form(name):
    G, se = normalized_second_moment(name, samples=200_000, seed=0)
    assert 0 < se < 2e-4
    assert abs(G - CLOSED_FORM[name]) < 4 * se


def test_e8_beats_d4_beats_z_by_more_than_the_error_bars():
    (gz, sz), (gd, sd), (ge, se) = (normalized_second_moment(n, 100_000, seed=5) for n in ("Z8", "D4", "E8"))
    assert gz - gd > 4 * (sz + sd) and gd - ge > 4 * (sd + se)


def test_unknown_lattice_is_refused():
    with pytest.raises(ValueError, match="unknown lattice 'E7'"):
        generator("E7")
    with pytest.raises(ValueError, match="last dim 8"):
        nearest_e8(torch.zeros(3, 4))


# ---------------------------------------------------------------- E8P


def _digest(table):  # as make_e8p_reference.table_digest: 4 x value as int8, row-major
    return hashlib.sha256((table * 4).round().to(torch.int8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def codebook():
    return e8p_codebook()


def test_abs_patterns_are_quip_sharps(codebook):
    A = e8p_abs_patterns()
    assert ["".join(str(int(2 * v)) for v in row) for row in A.tolist()] == REFERENCE["abs_patterns_times_2"]
    norms = (A**2).sum(-1)
    assert int((norms <= 10).sum()) == 227 and bool((norms[227:] == 12).all())


def test_codebook_equals_quip_sharps_set_and_code_order(codebook):
    # REFERENCE was written by tests/data/lattice/make_e8p_reference.py from quip-sharp's own construction
    assert codebook.shape == (65536, 8) and REFERENCE["n_distinct"] == 65536
    rows = torch.tensor(sorted(map(tuple, codebook.tolist())), dtype=torch.float64)
    assert len(torch.unique(rows, dim=0)) == 65536
    assert _digest(rows) == REFERENCE["sha256_sorted_set"]  # the same set of 65,536 vectors
    assert _digest(codebook) == REFERENCE["sha256_code_order"]  # and the same 16-bit code for each


def test_codebook_lies_in_e8_plus_a_quarter(codebook):
    shifted = codebook - 0.25
    assert torch.equal(nearest_e8(shifted), shifted)
    assert (codebook.sum(-1) * 4 % 2 == 0).all()  # u +- 1/4 with sum(u) even: sums are even +- 2


def test_decode_bit_by_bit():
    # code 0x0103: abs pattern 1 = (1,1,1,1,1,1,1,3)/2 (odd sum 5), signs 0b11 (even popcount -> +1/4):
    # bits 0 and 1 negate coordinates 0 and 2 (coordinate i uses bit (0,4,1,5,2,6,3,7)[i]); odd sum negates 7
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5, 0.5, 0.5, 0.5, -1.5]) + 0.25
    assert e8p_decode(torch.tensor(0x0103)).tolist() == expected.tolist()
    # code 0x0001: pattern 0 (all 1/2), signs 0b1 (odd popcount -> -1/4, bit 0 cleared): u = (1/2)^8
    assert e8p_decode(torch.tensor(0x0001)).tolist() == [0.25] * 8


def test_encode_inverts_decode(codebook):
    codes = torch.arange(1 << 16)
    u_plus, u_minus = codebook - 0.25, codebook + 0.25
    plus = (u_plus - 0.5 == (u_plus - 0.5).round()).all(-1)  # u + 1/4 has u half-integral
    shift = torch.where(plus, 1, -1)
    u = torch.where(plus[:, None], u_plus, u_minus)
    assert torch.equal(e8p_encode(codes >> 8, u < 0, shift), codes)


def test_bad_codes_and_group_sizes_are_refused():
    with pytest.raises(ValueError, match="16-bit"):
        e8p_decode(torch.tensor([65536]))
    with pytest.raises(ValueError, match="16-bit"):
        e8p_decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="abs_index must be in 0 .. 255"):
        e8p_encode(torch.tensor([256]), torch.zeros(1, 8, dtype=torch.bool), torch.tensor([1]))
    with pytest.raises(ValueError, match="negative must have shape"):
        e8p_encode(torch.tensor([3]), torch.zeros(1, 4, dtype=torch.bool), torch.tensor([1]))
    with pytest.raises(ValueError, match="even sum"):  # pattern 0 = (1/2)^8 with one negative sign: odd sum
        e8p_encode(torch.tensor([0]), torch.eye(8, dtype=torch.bool)[:1], torch.tensor([1]))
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        e8p_nearest(torch.zeros(10, 4))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_fast_nearest_equals_brute_force_argmax(codebook, sigma):
    x = sigma * torch.randn(3000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    points, codes = e8p_nearest(x)
    brute = torch.cdist(x, codebook).argmin(1)  # the 65,536-way search
    assert torch.equal(codes, brute)
    assert torch.equal(points, codebook[brute])
