"""QuIP# (E8P, 2 bits): BlockLDLQ against GPTQ and brute-force rounding, and QuIP# against RTN and GPTQ.

Outside references: QuIP's theorem that LDLQ is OPTQ (so g = 1 must reproduce ``gptq_sweep`` code for code),
a brute-force 65,536-way nearest-codeword search, hand-factored 2 x 2 examples, and quip-sharp's choices
(H / mean(diag H) + 0.01 I, opt_scale 1.03) checked by measurement.
"""
import pytest
import torch

from qlab.core.formats.lattice import e8p_codebook, e8p_decode, e8p_nearest
from qlab.core.rotations import RandomizedHadamard
from qlab.core.spec import QuantSpec
from qlab.core.tensor import load_qtensor, save_qtensor
from qlab.methods import METHODS
from qlab.methods.weight.gptq import gptq, gptq_sweep, hessian, output_error
from qlab.methods.weight.quip import (QuipTensor, block_ldl, block_ldlq, e8p_quantizer, proxy_loss, quip_sharp,
                                      regularize, scalar_quantizer)
from qlab.methods.weight.rtn import rtn

INT2_G64 = "int2-g64-asym-minmax"


# ---- BlockLDLQ -----------------------------------------------------------------------------------------


def test_block_ldl_hand_example_and_structure():
    # H = [[1, .5], [.5, 1]] = U D U^T with U = [[1, .5], [0, 1]], D = diag(3/4, 1), worked by hand
    U, D = block_ldl(torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64), g=1)
    assert torch.allclose(U, torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(D.flatten(), torch.tensor([0.75, 1.0], dtype=torch.float64))
    # blocks of 8 on a random SPD matrix: identity diagonal blocks, zeros below them, U D U^T = H
    A = torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = A @ A.T + torch.eye(32, dtype=torch.float64)
    U, D = block_ldl(H, g=8)
    blocks = U.reshape(4, 8, 4, 8)
    for i in range(4):
        assert torch.allclose(blocks[i, :, i, :], torch.eye(8, dtype=torch.float64))
        for j in range(i):
            assert torch.equal(blocks[i, :, j, :], torch.zeros(8, 8, dtype=torch.float64))
    assert torch.allclose(U @ torch.block_diag(*D) @ U.T, H, atol=1e-10)
    with pytest.raises(ValueError, match="block size"):
        block_ldl(H, g=5)


def test_ldlq_hand_example():
    # gptq.py's example: W = [3.4, 1.4], H = [[1, .5], [.5, 1]], step 1. Column 0 rounds to 3; column 1
    # targets 1.4 + 0.4 * U_01 = 1.6 -> 2 (round to nearest would give [3, 1])
    H = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    quantize = scalar_quantizer(torch.ones(1), None, QuantSpec.parse("int4").grid)
    W_hat, codes = block_ldlq(torch.tensor([[3.4, 1.4]]), H, quantize, g=1, sigma=0.0)
    assert W_hat.tolist() == [[3.0, 2.0]] and codes.tolist() == [[3.0, 2.0]]
    assert proxy_loss(torch.tensor([[3.4, 1.4]]), W_hat, H) == pytest.approx(0.28)


def test_ldlq_with_g1_and_a_scalar_grid_is_gptq_code_for_code(real_layer):
    """QuIP thm. 6: LDLQ == OPTQ. Same H regularisation (percdamp = sigma = 0.01 of mean diag H), per-row
    scales fixed before the sweep (per-channel: GPTQ's static scales), natural order, float64 both sides."""
    W, X = real_layer
    W, H = W[:64].double(), hessian(X).double()
    spec = QuantSpec.parse("int3-channel-asym-minmax")
    sweep = gptq_sweep(W, H, spec, percdamp=0.01)
    scale, zero_point = sweep.scale.reshape(-1), sweep.zero_point.reshape(-1)
    W_hat, codes = block_ldlq(W, H, scalar_quantizer(scale, zero_point, spec.grid), g=1, sigma=0.01)
    assert torch.equal(W_hat, sweep.W_hat)
    gptq_codes = spec.grid.round(sweep.W_hat / scale[:, None] + zero_point[:, None])
    assert torch.equal(codes, gptq_codes)
    nearest = spec.grid.round(W / scale[:, None] + zero_point[:, None])
    assert (codes != nearest).float().mean() > 0.1  # the feedback really moved codes


def test_ldlq_with_identity_hessian_is_nearest_codeword_rounding():
    """H = I: no feedback, so every group of 8 goes to its nearest E8P point; checked by brute force."""
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W_hat, codes = block_ldlq(W, torch.eye(64), e8p_quantizer, g=8)
    groups = W.reshape(-1, 8)
    C = e8p_codebook()
    brute = C[torch.cdist(groups, C).argmin(dim=1)]  # the 65,536-way search
    assert torch.equal(W_hat.reshape(-1, 8), brute)
    assert torch.equal(e8p_decode(codes).reshape(16, 64), W_hat)


def test_ldlq_lowers_the_proxy_loss_below_nearest_rounding(real_layer):
    """On a real layer (rotated and scaled as QuIP# does), BlockLDLQ beats nearest E8P rounding at the
    objective it minimises, tr((W - W_hat) H (W - W_hat)^T)."""
    W, X = real_layer
    R = RandomizedHadamard(*W.shape, seed=0)
    Wr, Hr = R.weight(W.double()), regularize(R.hessian(hessian(X).double()))
    Wr = Wr / (Wr.pow(2).mean().sqrt() / 1.03)
    W_ldlq, _ = block_ldlq(Wr, Hr, e8p_quantizer, g=8, sigma=0.0)  # Hr is already regularised
    W_near = e8p_nearest(Wr.reshape(-1, 8))[0].reshape(Wr.shape)
    ldlq, near = proxy_loss(Wr, W_ldlq, Hr), proxy_loss(Wr, W_near, Hr)
    print(f"\nproxy loss: BlockLDLQ {ldlq:.1f}, nearest {near:.1f} ({ldlq / near:.2f}x)")
    assert ldlq < 0.9 * near


# ---- QuIP# ---------------------------------------------------------------------------------------------


def test_quip_beats_rtn_and_gptq_at_2_bits_on_a_real_layer(real_layer):
    W, X = real_layer
    q = quip_sharp(W, hessian(X))
    r, g = rtn(W, INT2_G64), gptq(W, hessian(X), INT2_G64)
    errors = {name: output_error(W, t.dequantize(), X) for name, t in (("quip#", q), ("rtn", r), ("gptq", g))}
    print("\nrelative output error:", {k: round(v, 4) for k, v in errors.items()},
          f"bits/weight: quip# {q.bits_per_weight:.3f}, int2 g64 {r.bits_per_weight:.3f}")
    assert q.bits_per_weight < g.bits_per_weight == r.bits_per_weight
    assert q.bits_per_weight == pytest.approx(8 * (2 * 192 * 72 + 4 + 72 + 24) / (192 * 576))  # 2.007
    assert errors["quip#"] < 0.5 * errors["gptq"] < errors["rtn"]


def test_e8p_scale_1_03_is_near_the_best_on_a_gaussian_and_on_a_real_layer(real_layer):
    """quip-sharp scales the rotated weight to RMS 1.03. Check it: E8P's MSE per dimension on a unit Gaussian
    is smallest near 1.03 (a Monte Carlo over 8,000 groups, the same ones at every scale), and on the real
    layer QuIP#'s output error at 1.03 is within 10% of the best of a small grid."""
    x = torch.randn(8000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = (0.8, 0.9, 1.0, 1.03, 1.1, 1.2)
    mse = {s: float(((e8p_nearest(x * s)[0] / s - x) ** 2).mean()) for s in grid}
    assert min(mse, key=mse.get) in (1.0, 1.03, 1.1) and mse[1.03] < 1.01 * min(mse.values())
    W, X = real_layer
    W, H = W[:48], hessian(X)
    err = {s: output_error(W, quip_sharp(W, H, opt_scale=s).dequantize(), X) for s in grid}
    print("\nE8P MSE per dim on N(0, 1):", {s: round(v, 4) for s, v in mse.items()},
          "\nreal-layer output error:", {s: round(v, 5) for s, v in err.items()})
    assert err[1.03] < 1.1 * min(err.values())


def test_dequantize_is_in_the_original_basis():
    """A weight that IS a rotated E8P point comes back exactly: same codes, and dequantize() = W to round-off."""
    m, n, seed = 24, 64, 3
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 1 << 16, (m, n // 8), generator=gen)
    points = e8p_decode(codes).reshape(m, n)
    W = RandomizedHadamard(m, n, seed=seed).weight_inverse(0.02 * points)  # original basis
    A = torch.randn(256, n, generator=gen, dtype=torch.float64)
    q = quip_sharp(W, A.T @ A, seed=seed, opt_scale=float(points.pow(2).mean().sqrt()))
    assert torch.equal(q.codes, codes) and q.scale == pytest.approx(0.02, rel=1e-12)
    assert (q.dequantize() - W).abs().max() < 1e-12 * W.abs().max()
    assert not torch.allclose(q.rotated(), W, atol=1e-3)  # the rotated basis is a different matrix


def test_state_dict_round_trip_and_refusals(real_layer, tmp_path):
    W, X = real_layer
    q = quip_sharp(W[:32], hessian(X), seed=5)
    save_qtensor(q, tmp_path / "q.pt")
    back = load_qtensor(tmp_path / "q.pt")
    assert isinstance(back, QuipTensor) and back.nbytes == q.nbytes and back.seed == 5
    assert torch.equal(back.codes, q.codes) and torch.equal(back.SU, q.SU) and torch.equal(back.SV, q.SV)
    assert torch.equal(back.dequantize(), q.dequantize()) and back.dtype == torch.float32
    with pytest.raises(ValueError, match="65536"):
        QuipTensor(q.shape, q.codes + (1 << 16), q.scale, q.SU, q.SV)
    with pytest.raises(ValueError, match="in/8"):
        QuipTensor(q.shape, q.codes[:, :-1], q.scale, q.SU, q.SV)
    with pytest.raises(ValueError, match="SU"):
        QuipTensor(q.shape, q.codes, q.scale, q.SU[:-1], q.SV)
    with pytest.raises(ValueError, match="multiple of 8"):
        quip_sharp(torch.randn(8, 12), torch.eye(12))
    with pytest.raises(ValueError, match="n = 184"):  # 184 = 23 * 8: no Hadamard construction
        quip_sharp(torch.randn(8, 184), torch.eye(184))


# ---- the registry and the walker -----------------------------------------------------------------------


def test_registry_quantizes_qkv_with_one_hessian_and_one_input_rotation(real_layer):
    W, X = real_layer
    q_w, k_w = W[:64], W[64:96]
    batches = [X[:512], X[512:]]
    result = METHODS["quip"]([q_w, k_w], batches, "e8p", names=["q_proj", "k_proj"])
    assert all(isinstance(t, QuipTensor) for t in result.qweights)
    assert torch.equal(result.qweights[0].SU, result.qweights[1].SU)  # x S_U V^T computed once for both
    alone = quip_sharp(k_w, hessian(X))
    assert torch.equal(result.qweights[1].codes, alone.codes)
    with pytest.raises(ValueError, match="'e8p'"):
        METHODS["quip"]([q_w], batches, "int2-g64-asym-minmax")
    with pytest.raises(ValueError, match="calibration inputs"):
        METHODS["quip"]([q_w], None, "e8p")


@torch.no_grad()
def _walk_tiny_llama(recipe):
    from embedded import tiny_llama
    from qlab.models.walker import quantize_model

    model = tiny_llama(hidden=64)  # widths 64, 32 and 128: Sylvester sizes
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    return model, quantize_model(model, recipe, calib)


@torch.no_grad()
def test_walker_runs_quip_on_a_tiny_llama():
    """The walker end to end, from the recipe string."""
    recipe = {"model.layers.*": "quip:e8p"}
    model, (quantized, report) = _walk_tiny_llama(recipe)
    assert len(report.qtensors) == 14 and all(isinstance(q, QuipTensor) for q in report.qtensors.values())
    assert report.quantized_bpw < 2.1
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    y, y_float = quantized(ids).logits, model(ids).logits
    _, (rtn_model, _) = _walk_tiny_llama({"model.layers.*": INT2_G64})
    err_quip, err_rtn = (y - y_float).pow(2).mean(), (rtn_model(ids).logits - y_float).pow(2).mean()
    assert torch.isfinite(y).all() and 0 < err_quip < err_rtn
