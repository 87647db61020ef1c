"""The scale searches: float32 arithmetic order, rounding, and what each search guarantees."""
import numpy as np

from qlab.gguf import search


def test_seqsum_is_a_left_to_right_float32_loop():
    t = np.random.default_rng(0).standard_normal((50, 37)).astype(np.float32) * 1e3
    loop = np.zeros(50, np.float32)
    for i in range(37):
        loop = (loop + t[:, i]).astype(np.float32)
    assert np.array_equal(search.seqsum(t), loop)


def test_nearest_int_rounds_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998], np.float32)
    assert search.nearest_int(x).tolist() == [0, 2, 2, -0, -2, 2]


def test_qkx_search_never_worse_than_min_max():
    """The candidate (scale, min) pairs include min-max's, so the weighted error can only go down."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    w = np.abs(x) + 0.1
    s, m, L = search.make_qkx_quants(x, 15, w, -1.0, 0.1, 20, False)
    s0, m0, L0 = search.make_qkx_quants(x, 15, w, -1.0, 0.1, -1, False)  # nstep < 1: min-max only
    err = lambda s, m, L: (w * (s[:, None] * L - m[:, None] - x) ** 2).sum(1)  # noqa: E731
    assert (err(s, m, L) <= err(s0, m0, L0) + 1e-6).all()
    assert (err(s, m, L) < err(s0, m0, L0)).mean() > 0.5
    assert L.min() >= 0 and L.max() <= 15


def test_qx_search_levels_in_range_and_fit():
    x = np.random.default_rng(2).standard_normal((100, 16)).astype(np.float32)
    s, L = search.make_qx_quants(x, 32)
    assert L.min() >= 0 and L.max() <= 63
    rel = np.sqrt(((s[:, None] * (L - 32) - x) ** 2).mean() / (x ** 2).mean())
    assert rel < 0.03


def test_q3_descent_improves_the_least_squares_merit():
    x = np.random.default_rng(3).standard_normal((100, 16)).astype(np.float32)
    s, L = search.make_q3_quants(x, 4)
    l = L - 4
    w = x * x
    merit = (w * x * l).sum(1) ** 2 / (w * l * l).sum(1)
    l0 = np.clip(np.rint(-4 / search.signed_extreme(x)[:, None] * x), -4, 3)
    merit0 = (w * x * l0).sum(1) ** 2 / (w * l0 * l0).sum(1)
    assert (merit >= merit0 * (1 - 1e-6)).all()


def test_seqsum_keeps_leading_dims():
    t = np.random.default_rng(4).standard_normal((3, 5, 16)).astype(np.float32)
    assert np.array_equal(search.seqsum(t), search.seqsum(t.reshape(15, 16)).reshape(3, 5))


def test_qkx_flat_block_keeps_its_min():
    """A constant negative block: max == min, so scale 0, levels 0 and the_min = -min (the C's early return)."""
    x = np.full((1, 32), -2.5, np.float32)
    s, m, L = search.make_qkx_quants(x, 15, np.ones_like(x), -1.0, 0.1, 20, False)
    assert s[0] == 0 and m[0] == 2.5 and not L.any()
