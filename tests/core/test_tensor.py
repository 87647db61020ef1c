"""The quantized-tensor protocol: every kind sizes, de-quantizes and saves the same way."""
import gguf
import numpy as np
import pytest
import torch

from qlab import CodebookTensor, QTensor, QuantSpec, load_qtensor, quantize, save_qtensor
from qlab import gguf as qg
from qlab.core.rotations import RandomizedHadamard
from qlab.core.tensor import RotatedTensor, from_state_dict
from qlab.kernels.kivi import kivi_quantize_reference


def _kinds(gen):
    w = torch.randn(16, 64, generator=gen)
    codes = torch.randint(0, 256, (2, 16, 8), generator=gen)
    return {
        "int4 g32 asym": quantize(w, "int4-g32-asym-minmax"),
        "nf4 double-quant": quantize(w, "nf4-b64-dq"),
        "int3 g32 float minimum": quantize(w, "int3-g32-asym-minmax-fmin"),
        "codebook 2x8": CodebookTensor((16, 64), codes, torch.randn(2, 256, 8, generator=gen), torch.rand(16) + 0.5, bits=8),
        "gguf Q4_K": qg.quantize(torch.randn(4, 256, generator=gen), "Q4_K"),
        "kivi key": kivi_quantize_reference(torch.randn(2, 40, 16, generator=gen), 2, 16, "key"),
        "rotated int3 g32": _rotated(w, "int3-g32-asym-minmax", seed=4),
    }


def _rotated(W, spec, seed=0):
    R = RandomizedHadamard(*W.shape, seed=seed)
    return RotatedTensor.of(quantize(R.weight(W.double()).float(), spec), R, W.dtype)


def test_every_kind_implements_the_protocol_and_round_trips_through_a_file(gen, tmp_path):
    for name, t in _kinds(gen).items():
        assert isinstance(t, QTensor), name
        assert t.bits_per_weight == 8 * t.nbytes / np.prod(t.shape), name
        save_qtensor(t, tmp_path / "t.pt")
        again = load_qtensor(tmp_path / "t.pt")
        assert type(again) is type(t) and again.nbytes == t.nbytes, name
        assert torch.equal(again.dequantize(), t.dequantize()), name


def test_state_dicts_are_checked():
    with pytest.raises(ValueError, match="unknown quantized-tensor kind"):
        from_state_dict({"kind": "mystery"})
    state = quantize(torch.randn(4, 64), "int4-g32").state_dict()
    state["packed"] = state["packed"][:-1]
    with pytest.raises(ValueError, match="bytes of codes"):
        from_state_dict(state)


def test_codebook_tensor_by_hand():
    """The docstring's example, and its bytes: codes at 1 bit, a 2x2 fp16 codebook, one fp16 scale."""
    t = CodebookTensor((1, 4), torch.tensor([[[1, 0]]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([2.0]), bits=1)
    assert t.dequantize().tolist() == [[0.0, 2.0, 2.0, 0.0]]
    assert t.nbytes == 1 + 4 * 2 + 2
    # two codebooks summed (AQLM's additive codes), no scale
    t = CodebookTensor((1, 2), torch.tensor([[[1]], [[0]]]), torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[0.5, 0.5], [9.0, 9.0]]]), None, bits=1)
    assert t.dequantize().tolist() == [[1.5, 2.5]]


def test_codebook_sizes_as_aqlm_counts_them():
    """AQLM 2x8 on a [576, 576] layer: 2 x 8-bit codes per 8 weights (2 bits/weight), 2 codebooks of 256 x 8
    fp16 values, one fp16 scale per row; a fixed lattice codebook (QuIP#'s E8P) is not counted per layer."""
    out, inp = 576, 576
    codes = torch.zeros(2, out, inp // 8, dtype=torch.int64)
    t = CodebookTensor((out, inp), codes, torch.zeros(2, 256, 8), torch.ones(out), bits=8)
    assert t.nbytes == 2 * out * inp // 8 + 2 * 256 * 8 * 2 + out * 2
    assert t.bits_per_weight == pytest.approx(2 + (8192 + 1152) * 8 / (576 * 576))
    fixed = CodebookTensor((out, inp), codes, torch.zeros(2, 256, 8), torch.ones(out), bits=8, learned_codebooks=False)
    assert fixed.nbytes == 2 * out * inp // 8 + out * 2


def test_codebook_tensor_refuses_bad_codes():
    books = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        CodebookTensor((2, 16), torch.tensor([[[0, 4], [1, 1]]]), books, None, bits=2)
    with pytest.raises(ValueError, match="multiple of the codebook's group size"):
        CodebookTensor((2, 12), torch.zeros(1, 2, 1, dtype=torch.int64), books, None, bits=2)
    with pytest.raises(ValueError, match="do not fit"):
        CodebookTensor((2, 16), torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 8, 8), None, bits=2)
    with pytest.raises(ValueError, match="codes must be"):
        CodebookTensor((2, 16), torch.zeros(1, 2, 3, dtype=torch.int64), books, None, bits=2)


def test_float_minimum_by_hand():
    """int2 with a float minimum: x = [0.1, 0.4, 1.0] -> min 0.1, scale 0.9 / 3 = 0.3, q = [0, 1, 3]."""
    qt = quantize(torch.tensor([0.1, 0.4, 1.0]), "int2-tensor-asym-minmax-fmin-sfp32")
    assert qt.codes().tolist() == [0, 1, 3] and qt.zero_point is None
    assert qt.minimum.item() == pytest.approx(0.1) and qt.scales().item() == pytest.approx(0.3)
    assert qt.dequantize().tolist() == pytest.approx([0.1, 0.4, 1.0], abs=1e-7)
    assert qt.nbytes == 1 + 4 + 4  # three 2-bit codes, an fp32 scale, an fp32 minimum
    # with an integer zero point the range is widened to include 0 and 0.1 no longer sits on a level
    assert not torch.allclose(quantize(torch.tensor([0.1, 0.4, 1.0]), "int2-tensor-asym-minmax").dequantize(),
                              torch.tensor([0.1, 0.4, 1.0]), atol=1e-3)


def test_float_minimum_requantizes_llama_cpp_q4_1_exactly(gen):
    """Weights that came out of llama.cpp's Q4_1 (the gguf package's encoder, the embedded checkpoint's format)
    are reproduced exactly by the core spec with a float minimum and fp16 scales, in groups of 32 (an integer
    zero point cannot do that: its minimum sits on a multiple of the step)."""
    w = torch.randn(64, 576, generator=gen) * 0.05
    T = gguf.GGMLQuantizationType.Q4_1
    q41 = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), T), T).copy())
    again = quantize(q41, "int4-g32-asym-minmax-fmin").dequantize()
    assert torch.equal(again, q41)
    assert not torch.equal(quantize(q41, "int4-g32-asym-minmax").dequantize(), q41)
    assert quantize(q41, "int4-g32-asym-minmax-fmin").bits_per_weight == 5.0  # = Q4_1's 20 bytes per 32


def test_spec_strings_with_axes_and_minima():
    assert str(QuantSpec.parse("int2-g32@-2-asym-minmax-fmin-sfp32")) == "int2-g32@-2-asym-minmax-fmin-sfp32"
    assert QuantSpec.parse("int4-channel@-1").granularity.axis == -1
    for bad, message in [("int4-fmin", "asymmetric"), ("int4-g32-asym-mse-fmin", None), (None, "a spec is"),
                         ("nf4-asym-minmax-fmin", "int format")]:
        if message is None:
            QuantSpec.parse(bad)  # mse searches a float minimum too
            continue
        with pytest.raises(ValueError, match=message):
            QuantSpec.parse(bad)
    with pytest.raises(ValueError, match="Granularity"):
        QuantSpec(granularity="g32")


class _Exact:
    """A stand-in quantized tensor that stores its weight exactly (float64, 0 bytes)."""

    def __init__(self, W):
        self.W, self.shape, self.dtype, self.nbytes = W, tuple(W.shape), W.dtype, 0

    def dequantize(self):
        return self.W


def test_rotated_tensor_turns_the_weight_back_exactly_and_counts_its_signs(gen):
    W = torch.randn(24, 32, dtype=torch.float64, generator=gen)  # 24 = 12 * 2 (Paley), 32 = 2^5
    R = RandomizedHadamard(24, 32, seed=7)
    exact = RotatedTensor.of(_Exact(R.weight(W)), R, torch.float64)
    assert (exact.dequantize() - W).abs().max() < 1e-13  # nothing quantized: W to float64 round-off
    assert exact.nbytes == 3 + 4  # one bit per sign: 24 + 32 bits
    t = _rotated(W.float(), "int4-g16-asym-minmax", seed=7)
    # codes 24 * 32 * 4 / 8 = 384, 48 fp16 scales = 96, 48 4-bit zero points = 24; signs 7 bytes
    assert t.inner.nbytes == 504 and t.nbytes == 511 and t.bits_per_weight == 8 * 511 / (24 * 32)
    assert torch.equal(t.dequantize(), R.weight_inverse(t.inner.dequantize().double()).float())
    assert t.shape == (24, 32) and t.dtype == torch.float32


def test_rotated_tensor_refuses_bad_signs(gen):
    t = _rotated(torch.randn(24, 32, generator=gen), "int4-g16-asym-minmax")
    with pytest.raises(ValueError, match="SU must be 32 signs"):
        RotatedTensor(t.inner, t.SU[:-1], t.SV)
    with pytest.raises(ValueError, match="SV must be 24 signs"):
        RotatedTensor(t.inner, t.SU, t.SV * 0)
