"""The one-weight and one-layer QAT toys of notebook 13 (qlab.methods.train.toy), against hand arithmetic."""
import pytest
import torch

from qlab.methods.train.toy import landscape, layer_qat, rounded, ste_descent


def test_first_ste_steps_by_hand():
    # w = 0.1 rounds to 0 (s = 0.25): the STE gradient is 2 (0 - 0.6) = -1.2, so w <- 0.1 + 0.05 * 1.2 = 0.16,
    # which rounds to 0.25 (0.64 -> 1): gradient 2 (0.25 - 0.6) = -0.7, w <- 0.16 + 0.035 = 0.195, then 0.23
    traj = ste_descent(0.1, s=0.25, target=0.6, lr=0.05, steps=3)
    assert traj.w == pytest.approx([0.1, 0.16, 0.195, 0.23])
    assert traj.q == [0.0, 0.25, 0.25, 0.25]


def test_the_ste_ends_oscillating_across_the_boundary_and_the_others_never_move():
    ste = ste_descent(0.1, 0.25, 0.6, 0.05, 60)
    assert abs(ste.w[-1] - 0.625) < 0.05 and set(ste.q[-6:]) == {0.5, 0.75}
    assert ste.flip_backs >= 10 and ste.flips > ste.flip_backs
    for way in ("round", "detached"):
        traj = ste_descent(0.1, 0.25, 0.6, 0.05, 60, way)
        assert set(traj.w) == {0.1} and traj.flips == 0
    with pytest.raises(ValueError, match="estimator must be"):
        ste_descent(0.1, 0.25, 0.6, 0.05, 1, "identity")


def test_landscape_is_a_staircase_with_the_float_parabola_through_it():
    w = torch.tensor([0.0, 0.1, 0.124, 0.126, 0.6])
    land = landscape(w, 0.25, 0.6)
    assert rounded(w, 0.25).tolist() == [0.0, 0.0, 0.0, 0.25, 0.5]
    assert land["rounded"].tolist() == pytest.approx([0.36, 0.36, 0.36, 0.1225, 0.01])
    assert land["float"].tolist() == pytest.approx([0.36, 0.25, 0.226576, 0.224676, 0.0])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_qat_with_lsq_steps_beats_round_to_nearest(bits):
    r = layer_qat(bits, learned_scale=True, steps=100)
    assert r["qat_error"] < r["rtn_error"]
    assert len(r["losses"]) == len(r["flips"]) == 100 and sum(r["flips"]) > 0
