"""AQLM (additive codebooks): the reconstruction by hand, the size by hand, the beam search against brute force,
k-means and the Adam/beam rounds as descent methods, and the ``aqlm`` package's own dequantization on qlab's
codes, codebooks and scales written into its packed layout.
"""
import itertools

import pytest
import torch

from qlab.core.tensor import CodebookTensor, from_state_dict
from qlab.methods import METHODS
from qlab.methods.weight.aqlm import (AQLMConfig, aqlm_bits_per_weight, aqlm_quantize, beam_search, kmeans,
                                      proxy_loss, reconstruct, residual_kmeans, to_aqlm_layout)
from qlab.methods.weight.gptq import gptq, hessian, output_error

FAST = dict(beam_size=2, rounds=1, adam_steps=5, kmeans_iters=5)


def _spd(n, gen):
    A = torch.randn(n, n, generator=gen)
    return A @ A.T / n + 0.1 * torch.eye(n)


# ---- the format -----------------------------------------------------------------------------------------


def test_reconstruction_hand_example():
    # the module docstring's example: scale 2 * (C_1[1] + C_2[0]) = 2 * ([0, 1] + [.5, .5]) = [1, 3]
    codebooks = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.0, 0.0]]])
    codes = torch.tensor([[[1]], [[0]]])  # [M=2, out=1, G=1]
    assert reconstruct(codes, codebooks, torch.tensor([2.0])).tolist() == [[1.0, 3.0]]
    t = CodebookTensor((1, 2), codes, codebooks.half(), torch.tensor([2.0]).half(), bits=1)
    assert t.dequantize().tolist() == [[1.0, 3.0]]


def test_bits_per_weight_by_hand():
    # 2x8 on 576 x 576: codes 331,776 / 8 groups * 16 bits = 663,552; codebooks 2 * 256 * 8 * 16 = 65,536;
    # scales 576 * 16 = 9,216 -> 738,304 bits / 331,776 weights
    assert aqlm_bits_per_weight(576, 576, AQLMConfig.parse("2x8")) == pytest.approx(738_304 / 331_776)  # 2.2253
    # 1x8 on 1536 x 576: 110,592 * 8 + 256 * 8 * 16 + 1536 * 16 = 942,080 bits / 884,736 weights
    assert aqlm_bits_per_weight(1536, 576, AQLMConfig.parse("aqlm-1x8")) == pytest.approx(942_080 / 884_736)
    # 1x16 over SmolLM2-135M's block Linears (per layer q, o 576x576; k, v 192x576; gate, up 1536x576; down
    # 576x1536; 30 layers): every Linear carries a 2^16 x 8 fp16 codebook, 8,388,608 bits (1 MiB)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    weights = sum(o * i for o, i in shapes)
    assert weights == 106_168_320
    bits = sum(aqlm_bits_per_weight(o, i, AQLMConfig.parse("1x16")) * o * i for o, i in shapes)
    by_hand = (weights * 2 + 210 * 65_536 * 8 * 16 + 30 * 5_184 * 16) / weights  # codes, codebooks, scales
    assert bits / weights == pytest.approx(by_hand) and by_hand == pytest.approx(18.616, abs=1e-3)
    # the stored tensor counts the same bytes (8-bit codes pack exactly)
    gen = torch.Generator().manual_seed(0)
    t = CodebookTensor((64, 32), torch.randint(256, (2, 64, 4), generator=gen), torch.randn(2, 256, 8).half(),
                       torch.rand(64).half(), bits=8)
    assert t.bits_per_weight == pytest.approx(aqlm_bits_per_weight(64, 32, AQLMConfig.parse("2x8")))


def test_spec_parsing():
    assert AQLMConfig.parse("aqlm-2x8").name == "2x8" and AQLMConfig.parse(" 1X16 ").codebook_size == 65536
    assert AQLMConfig.parse("1x8", beam_size=3).beam_size == 3
    for bad in ("2x", "aqlm", "e8p", "2x8x8"):
        with pytest.raises(ValueError, match="MxB"):
            AQLMConfig.parse(bad)
    with pytest.raises(ValueError, match="beam_size"):
        AQLMConfig(beam_size=0)
    with pytest.raises(ValueError, match="2\\^16"):
        AQLMConfig(nbits=17)


# ---- the search -----------------------------------------------------------------------------------------


def test_beam_search_finds_the_brute_force_optimum():
    """2 groups x 2 codebooks of 4 vectors = 4^4 = 256 codings per row. A beam of 64 = 4^3 keeps every partial
    coding until the last step, so it must find each row's optimum; checked against enumerating all 256."""
    gen = torch.Generator().manual_seed(0)
    out, d, G, M, K = 5, 4, 2, 2, 4
    W = torch.randn(out, G * d, generator=gen)
    H = _spd(G * d, gen)  # a dense H: the two groups interact, so the search must handle the coupling
    books = torch.randn(M, K, d, generator=gen)
    scale = torch.rand(out, generator=gen) + 0.5
    start = torch.zeros(M, out, G, dtype=torch.long)
    codes = beam_search(W, H, start, books, scale, beam_size=64)
    for o in range(out):
        losses = {}
        for combo in itertools.product(range(K), repeat=M * G):  # (m0g0, m0g1, m1g0, m1g1)
            c = torch.tensor(combo).reshape(M, 1, G)
            losses[combo] = proxy_loss(W[o:o + 1], reconstruct(c, books, scale[o:o + 1]), H)
        best = min(losses, key=losses.get)
        found = tuple(codes[:, o, :].reshape(-1).tolist())
        assert found == best, (o, found, best)
    # a greedy beam of 1 is no worse than where it started, and worse than or equal to the optimum
    greedy = beam_search(W, H, start, books, scale, beam_size=1)
    loss = lambda c: proxy_loss(W, reconstruct(c, books, scale), H)  # noqa: E731
    assert loss(codes) <= loss(greedy) <= loss(start)


def test_kmeans_error_never_rises_and_residual_stages_help():
    gen = torch.Generator().manual_seed(1)
    Z = torch.randn(600, 8, generator=gen)
    C, assign, history = kmeans(Z, 16, 12, torch.Generator().manual_seed(0))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:])) and history[-1] < 0.95 * history[0]
    assert history[-1] == pytest.approx(float((Z - C[assign]).pow(2).sum(1).mean()), rel=1e-5)
    assert torch.equal(assign, torch.cdist(Z, C).argmin(1))  # every point sits with its nearest centroid
    # residual k-means: the second codebook codes what the first left, so the error drops again
    codes, books, hist = residual_kmeans(Z.reshape(60, 10, 8), AQLMConfig(num_codebooks=2, nbits=4, kmeans_iters=12))
    err = [float((Z.reshape(60, 10, 8) - sum(books[m][codes[m]] for m in range(k))).pow(2).sum(-1).mean())
           for k in (1, 2)]
    assert err[0] == pytest.approx(hist[0][-1], rel=1e-5) and err[1] == pytest.approx(hist[1][-1], rel=1e-5)
    assert err[1] < 0.8 * err[0]


def test_proxy_loss_falls_over_the_rounds_and_beats_gptq_on_a_real_layer(real_layer):
    """SmolLM2's layer-5 v_proj (its weights sit on the Q4_1 grid) with correlated inputs: every Adam step group
    and beam search lowers tr((W - W_hat) H (W - W_hat)^T); AQLM 2x8 ends well below GPTQ int2 g64's output error
    (at more bits here, 2.62 vs 2.28: a 192-row layer pays for its 8 KiB of codebooks)."""
    W, X = real_layer
    H = hessian(X)
    history = []
    q = aqlm_quantize(W, H, AQLMConfig.parse("2x8", beam_size=4, rounds=2, adam_steps=10, kmeans_iters=10),
                      history=history)
    losses = [h["loss"] for h in history]
    assert [h["stage"] for h in history] == ["kmeans", "adam 0", "beam 0", "adam 1", "beam 1"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.2 * losses[0]
    assert proxy_loss(W, q.dequantize(), H) == pytest.approx(losses[-1], rel=1e-4)  # the stored fp16 values
    assert q.codebooks.dtype == torch.float16 and q.scale.dtype == torch.float16
    g = gptq(W, H, "int2-g64-asym-minmax")
    errors = {"aqlm": output_error(W, q.dequantize(), X), "gptq": output_error(W, g.dequantize(), X)}
    print("\nrelative output error:", {k: round(v, 4) for k, v in errors.items()},
          f"bits/weight: AQLM 2x8 {q.bits_per_weight:.3f}, GPTQ int2 g64 {g.bits_per_weight:.3f}")
    assert q.bits_per_weight == pytest.approx(aqlm_bits_per_weight(192, 576, AQLMConfig()))
    assert errors["aqlm"] < 0.5 * errors["gptq"]


# ---- the outside reference: the aqlm package ------------------------------------------------------------


def _random_codebook_tensor(M, bits, out=24, inp=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    K = 1 << bits
    codes = torch.randint(K, (M, out, inp // 8), generator=gen)
    codes[0, 0, :2] = torch.tensor([K - 1, K // 2])  # the codes the signed layout wraps to negative
    return CodebookTensor((out, inp), codes, (torch.randn(M, K, 8, generator=gen) * 0.1).half(),
                          (torch.rand(out, generator=gen) + 0.5).half(), bits)


@pytest.mark.parametrize("M, bits", [(2, 8), (1, 8), (1, 16)])
def test_aqlm_package_dequantizes_qlab_codes_to_the_same_weights(M, bits):
    """aqlm 1.1.7's ``_dequantize_weight`` (an embedding_bag sum over codebooks, then the row scale) on qlab's
    tensors in its packed layout (signed int8/int16 codes) equals ``CodebookTensor.dequantize`` bit for bit:
    both add the same float32 values (the fp16 codebook entries, exact in float32) and multiply by the same
    scale, and a sum of at most two terms does not depend on the order."""
    aqlm_utils = pytest.importorskip("aqlm.utils")
    t = _random_codebook_tensor(M, bits)
    layout = to_aqlm_layout(t)
    assert layout["codes"].dtype == (torch.int8 if bits == 8 else torch.int16)
    assert torch.equal(layout["codes"], aqlm_utils.pack_int_data(t.codes.permute(1, 2, 0).clone(), bits))
    codes = aqlm_utils.unpack_int_data(layout["codes"], bits)
    theirs = aqlm_utils._dequantize_weight(codes, layout["codebooks"], layout["scales"])
    assert torch.equal(theirs, t.dequantize())


def test_aqlm_package_numba_matmul_on_a_quantized_layer(real_layer):
    """A weight quantized by qlab (2x8), loaded into ``aqlm.inference.QuantizedLinear``: its CPU kernel (numba
    LUT GEMV, one thread: its Kx8 kernel races with more, Vahe1994/AQLM#86) gives x @ W_hat^T to float32
    rounding (it sums in another order)."""
    pytest.importorskip("aqlm")
    numba = pytest.importorskip("numba")
    from aqlm.inference import QuantizedLinear

    W, X = real_layer
    W, X = W[:32], X[:64]
    q = aqlm_quantize(W, hessian(X), AQLMConfig.parse("2x8", **FAST))
    layout = to_aqlm_layout(q)
    layer = QuantizedLinear(576, 32, in_group_size=8, out_group_size=1, num_codebooks=2, nbits_per_codebook=8,
                            bias=False)
    for name in ("codes", "codebooks", "scales"):
        getattr(layer, name).data = layout[name].clone()
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with torch.no_grad():
            y = layer(X[:3])
    finally:
        numba.set_num_threads(threads)
    torch.testing.assert_close(y, X[:3] @ q.dequantize().T, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


# ---- the registry, saving, bad input --------------------------------------------------------------------


def test_registry_entry_returns_a_codebook_tensor_and_resumes_from_its_cache(real_layer, tmp_path):
    W, X = real_layer
    weights, batches = [W[:16], W[16:40]], [X[:256], X[256:512]]
    r = METHODS["aqlm"](weights, batches, "aqlm-1x8", **FAST, cache_dir=str(tmp_path))
    assert [q.shape for q in r.qweights] == [(16, 576), (24, 576)]
    assert all(isinstance(q, CodebookTensor) and q.codebooks.shape == (1, 256, 8) for q in r.qweights)
    assert len(list(tmp_path.glob("aqlm-1x8-*.pt"))) == 2
    again = METHODS["aqlm"](weights, batches, "1x8", **FAST, cache_dir=str(tmp_path))  # read back, not recomputed
    for a, b in zip(r.qweights, again.qweights):
        assert torch.equal(a.dequantize(), b.dequantize())
    back = from_state_dict(r.qweights[0].state_dict())
    assert torch.equal(back.dequantize(), r.qweights[0].dequantize())
    with pytest.raises(ValueError, match="calibration inputs"):
        METHODS["aqlm"](weights, None, "2x8")
    # 1x16 runs too (its 65,536-vector codebook is searched in chunks of rows), and its size is the formula's
    q = aqlm_quantize(W[:8, :64], hessian(X[:, :64]), AQLMConfig.parse("1x16", **FAST))
    assert q.codebooks.shape == (1, 65536, 8) and q.codes.max() < 65536
    assert q.bits_per_weight == pytest.approx(aqlm_bits_per_weight(8, 64, AQLMConfig.parse("1x16")))


def test_bad_input_is_refused_with_the_fix():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="multiple of the group size 8"):
        aqlm_quantize(torch.randn(4, 60), torch.eye(60))
    with pytest.raises(ValueError, match=r"H must be \[64, 64\]"):
        aqlm_quantize(torch.randn(4, 64), torch.eye(32))
    with pytest.raises(ValueError, match="NaN/Inf"):
        aqlm_quantize(torch.full((4, 64), float("nan")), torch.eye(64))
    books = torch.randn(1, 256, 8).half()
    with pytest.raises(ValueError, match=r"codes must be integers in \[0, 256\)"):
        CodebookTensor((2, 16), torch.tensor([[[0, 256], [1, 2]]]), books, None, bits=8)
    with pytest.raises(ValueError, match="group size d=8"):  # a weight whose width is not a whole number of groups
        CodebookTensor((2, 12), torch.zeros(1, 2, 1, dtype=torch.long), books, None, bits=8)
    with pytest.raises(ValueError, match="2\\^bits = 256"):
        to_aqlm_layout(CodebookTensor((2, 16), torch.zeros(1, 2, 2, dtype=torch.long), books[:, :100], None, bits=8))
    t = _random_codebook_tensor(1, 8)
    with pytest.raises(ValueError, match="codes must be"):
        beam_search(torch.randn(24, 64, generator=gen), torch.eye(64), t.codes[:, :, :4], t.codebooks, t.scale)
