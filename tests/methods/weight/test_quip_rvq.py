"""QuIP# at 3 and 4 bits (E8P plus a residual stage) and q/k/v stacked in one BlockLDLQ call.

Outside references: brute-force nearest-codeword searches over both stages, bits per weight counted by hand,
quip-sharp's constants (opt_scale, resid_scale; recorded in tests/data/lattice/e81b_reference.json) checked
by a Monte Carlo, GPTQ on the same layer and H, and each weight quantized alone.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qlab.core.formats.lattice import e8p_codebook, e81b_codebook
from qlab.core.tensor import load_qtensor, save_qtensor
from qlab.methods import METHODS
from qlab.methods.weight.gptq import gptq, hessian
from qlab.methods.weight.quip import (CODEBOOKS, QuipTensor, block_ldlq, proxy_loss, quip_sharp, quip_sharp_shared,
                                      regularize)
from qlab.core.rotations import RandomizedHadamard

REFERENCE = json.loads((Path(__file__).parents[2] / "data" / "lattice" / "e81b_reference.json").read_text())


def test_constants_are_quip_sharps():
    for name, ref in (("e8p-rvq3", "E8P12RVQ3B"), ("e8p-rvq4", "E8P12RVQ4B")):
        cb, constants = CODEBOOKS[name], REFERENCE["constants"][ref]
        assert (cb.opt_scale, cb.resid_scale) == (constants["opt_scale"], constants["opt_resid_scale"])
    assert CODEBOOKS["e8p-rvq3"].resid == "e81b" and CODEBOOKS["e8p-rvq4"].resid == "e8p"
    assert [CODEBOOKS[s].bits for s in ("e8p", "e8p-rvq3", "e8p-rvq4")] == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("spec", ["e8p-rvq3", "e8p-rvq4"])
def test_residual_stage_is_the_nearest_point_of_the_magnified_residual(spec):
    """Both stages by brute force: c1 = argmin over the 65,536 E8P points, c2 = argmin over the second codebook
    of (x - E8P[c1]) * resid_scale, and the point is E8P[c1] + C2[c2] / resid_scale."""
    cb = CODEBOOKS[spec]
    x = torch.randn(500, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    points, codes = cb.quantize(x)
    E8P = e8p_codebook()
    c1 = torch.cdist(x, E8P).argmin(1)
    C2 = E8P if cb.resid == "e8p" else e81b_codebook()
    c2 = torch.cdist((x - E8P[c1]) * cb.resid_scale, C2).argmin(1)
    assert torch.equal(codes, torch.stack([c1, c2], dim=1))
    assert torch.equal(points, E8P[c1] + C2[c2] / cb.resid_scale)
    err = lambda p: float(((x - p) ** 2).mean())  # noqa: E731
    assert err(points) < 0.5 * err(E8P[c1])  # the second stage halves the error or better


def test_quip_sharps_residual_scales_are_near_the_best_on_a_gaussian():
    """MSE per dimension on a unit Gaussian scaled to opt_scale, the same 2,000 groups at every resid_scale:
    quip-sharp's 2.04 (3 bits) and 3.45 (4 bits) are within 2% of the best of a small grid."""
    x = torch.randn(2000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grids = {"e8p-rvq3": (1.6, 2.04, 2.5), "e8p-rvq4": (2.8, 3.45, 4.2)}
    for spec, grid in grids.items():
        cb = CODEBOOKS[spec]
        mse = {}
        for rs in grid:
            points, _ = dataclasses.replace(cb, resid_scale=rs).quantize(x * cb.opt_scale)
            mse[rs] = float(((points / cb.opt_scale - x) ** 2).mean())
        print(f"\n{spec} MSE per dim vs resid_scale:", {k: round(v, 5) for k, v in mse.items()})
        assert mse[cb.resid_scale] < 1.02 * min(mse.values())
        assert mse[cb.resid_scale] < 0.95 * max(mse.values())  # the grid is wide enough to matter
    # but at 4 bits quip-sharp's stage-1 scale 1.03 is not the best: 0.9 gives ~10% less MSE here (and ~11% less
    # proxy loss on layer 5's v_proj with real inputs); qlab keeps quip-sharp's constant as the default
    cb = CODEBOOKS["e8p-rvq4"]
    lower = float(((cb.quantize(x * 0.9)[0] / 0.9 - x) ** 2).mean())
    print(f"e8p-rvq4 MSE per dim at opt_scale 0.9: {lower:.5f} (1.03: {mse[3.45]:.5f})")
    assert lower < 0.95 * mse[3.45]


def test_bits_per_weight_counted_by_hand():
    """192 x 576: 72 groups of 8 per row. Per group 16 (2 bits), 16 + 8 (3 bits) or 16 + 16 (4 bits) code bits;
    per layer a float32 scale and 576 + 192 sign bits: 2.00723, 3.00723, 4.00723 bits per weight."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << 16, (192, 72), generator=gen)
    SU, SV = torch.ones(576), -torch.ones(192)
    for spec, code_bytes, resid_max in (("e8p", 2, None), ("e8p-rvq3", 3, 256), ("e8p-rvq4", 4, 1 << 16)):
        resid = None if resid_max is None else torch.randint(0, resid_max, (192, 72), generator=gen)
        q = QuipTensor((192, 576), codes, 0.01, SU, SV, spec=spec, resid_codes=resid)
        assert q.nbytes == code_bytes * 192 * 72 + 4 + 576 // 8 + 192 // 8
        assert q.bits_per_weight == pytest.approx(code_bytes + 0.00723, abs=1e-5)


def test_blockldlq_feeds_back_the_full_two_stage_reconstruction(real_layer):
    """The W_hat BlockLDLQ feeds back is exactly what the codes decode to (both stages), and the feedback
    lowers the proxy loss below stage-by-stage nearest rounding of each group."""
    W, X = real_layer
    cb = CODEBOOKS["e8p-rvq4"]
    R = RandomizedHadamard(*W[:64].shape, seed=0)
    Wr, Hr = R.weight(W[:64].double()), regularize(R.hessian(hessian(X).double()))
    Wr = Wr / (Wr.pow(2).mean().sqrt() / cb.opt_scale)
    W_hat, codes = block_ldlq(Wr, Hr, cb.quantize, g=8, sigma=0.0)
    assert codes.shape == (64, 2 * 72)
    assert torch.equal(W_hat, cb.decode(codes[:, 0::2], codes[:, 1::2]).reshape(W_hat.shape))
    nearest = cb.quantize(Wr.reshape(-1, 8))[0].reshape(Wr.shape)
    ldlq, near = proxy_loss(Wr, W_hat, Hr), proxy_loss(Wr, nearest, Hr)
    print(f"\n4-bit proxy loss: BlockLDLQ {ldlq:.3f}, nearest {near:.3f}")
    assert ldlq < 0.9 * near


def test_four_bits_beat_two_bit_e8p_and_gptq_int4_g128(real_layer):
    """Relative proxy loss tr(E H E^T) / tr(W H W^T) on the real layer (v_proj of layer 5; its weights sit on the
    GGUF's Q4_1 grid, blocks of 32). Measured here: e8p 4.3e-3, rvq3 1.15e-3, rvq4 3.7e-4, GPTQ int3 g128
    3.7e-3, int4 g128 7.7e-4; the asserts keep margins."""
    W, X = real_layer
    H = hessian(X)
    base = proxy_loss(W, torch.zeros_like(W), H)
    loss = {s: proxy_loss(W, quip_sharp(W, H, spec=s).dequantize(), H) / base for s in CODEBOOKS}
    g3, g4 = gptq(W, H, "int3-g128-asym-minmax"), gptq(W, H, "int4-g128-asym-minmax")
    loss["gptq int3 g128"] = proxy_loss(W, g3.dequantize(), H) / base
    loss["gptq int4 g128"] = proxy_loss(W, g4.dequantize(), H) / base
    print("\nrelative proxy loss:", {k: f"{v:.2e}" for k, v in loss.items()})
    assert loss["e8p-rvq4"] < 0.2 * loss["e8p"] and loss["e8p-rvq3"] < 0.5 * loss["e8p"]
    assert loss["e8p-rvq4"] < 0.5 * loss["e8p-rvq3"]
    assert loss["e8p-rvq4"] < 0.75 * loss["gptq int4 g128"] and g4.bits_per_weight > 4.1
    assert loss["e8p-rvq3"] < 0.5 * loss["gptq int3 g128"] and g3.bits_per_weight > 3.1


def test_residual_state_dict_round_trip_and_refusals(real_layer, tmp_path):
    W, X = real_layer
    for spec in ("e8p-rvq3", "e8p-rvq4"):
        q = quip_sharp(W[:16], hessian(X), seed=2, spec=spec)
        save_qtensor(q, tmp_path / f"{spec}.pt")
        back = load_qtensor(tmp_path / f"{spec}.pt")
        assert back.spec == spec and back.nbytes == q.nbytes
        assert torch.equal(back.resid_codes, q.resid_codes) and torch.equal(back.dequantize(), q.dequantize())
    q3 = quip_sharp(W[:16], hessian(X), spec="e8p-rvq3")
    with pytest.raises(ValueError, match=r"resid_codes must be integers in \[0, 256\)"):
        QuipTensor(q3.shape, q3.codes, q3.scale, q3.SU, q3.SV, spec="e8p-rvq3", resid_codes=q3.resid_codes + 256)
    with pytest.raises(ValueError, match="needs resid_codes"):
        QuipTensor(q3.shape, q3.codes, q3.scale, q3.SU, q3.SV, spec="e8p-rvq4")
    with pytest.raises(ValueError, match="no second stage"):
        QuipTensor(q3.shape, q3.codes, q3.scale, q3.SU, q3.SV, spec="e8p", resid_codes=q3.resid_codes)
    with pytest.raises(ValueError, match="'e8p-rvq3', 'e8p-rvq4'"):
        quip_sharp(W[:16], hessian(X), spec="e8p-rvq2")


# ---- q/k/v stacked in one BlockLDLQ call -------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["e8p", "e8p-rvq3"])
def test_stacked_weights_get_the_codes_each_gets_alone(real_layer, spec):
    """q/k/v-like weights (rows of the real layer, one scaled x10 so the per-weight scales differ) through one
    BlockLDLQ sweep equal each quantized alone with the same H and seed: codes, scale, S_U and S_V."""
    W, X = real_layer
    H = hessian(X)
    weights = [W[:96], 10 * W[96:128], W[128:]]
    stacked = quip_sharp_shared(weights, H, seed=4, spec=spec)
    for w, s in zip(weights, stacked):
        alone = quip_sharp(w, H, seed=4, spec=spec)
        assert torch.equal(s.codes, alone.codes) and s.scale == alone.scale
        assert (s.resid_codes is None) == (spec == "e8p")
        assert s.resid_codes is None or torch.equal(s.resid_codes, alone.resid_codes)
        assert torch.equal(s.SU, stacked[0].SU) and torch.equal(s.SV, alone.SV)
        assert torch.equal(s.dequantize(), alone.dequantize())
    assert stacked[1].scale == pytest.approx(10 * quip_sharp(W[96:128], H, seed=4, spec=spec).scale, rel=1e-12)
    with pytest.raises(ValueError, match="same input width"):
        quip_sharp_shared([W, W[:, :64]], H)


def test_registry_takes_the_residual_specs(real_layer):
    W, X = real_layer
    result = METHODS["quip"]([W[:32], W[32:48]], [X], "e8p-rvq4")
    assert [q.spec for q in result.qweights] == ["e8p-rvq4"] * 2 and result.act is None
    assert torch.equal(result.qweights[1].codes, quip_sharp(W[32:48], hessian(X), spec="e8p-rvq4").codes)
    assert METHODS["quip"]([W[:16]], [X], "e8p", rotate_inputs=True).act == {"kind": "quip_rotated"}
