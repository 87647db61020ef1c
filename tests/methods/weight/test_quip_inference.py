"""QuIP# at inference in the rotated basis: QuipLinear rotates the activation instead of un-rotating the weight.

Reference: the same layer with the weight de-quantized to the original basis (``QuipTensor.dequantize``), on the
embedded model's non-power-of-two widths (576 = 36 * 16, 1536 = 12 * 128, 192 = 12 * 16: Kronecker-factored
transforms), in float64 through the torch path and in float32 through the FWHT Triton kernel (interpreter).
"""
import pytest
import torch
import torch.nn.functional as F

from qlab.core.rotations import hadamard_transform
from qlab.methods.weight.quip import QuipTensor
from qlab.models.modules import QuipLinear, kron_hadamard


def _quip_tensor(m, n, spec="e8p", seed=0, dtype=torch.float64):
    """A QuipTensor with random codes: its weight is some rotated two-stage E8P matrix, no quantization needed."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << 16, (m, n // 8), generator=gen)
    resid = None if spec == "e8p" else torch.randint(0, 256 if spec == "e8p-rvq3" else 1 << 16, (m, n // 8),
                                                     generator=gen)
    SU = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    SV = torch.randint(0, 2, (m,), generator=gen).double() * 2 - 1
    return QuipTensor((m, n), codes, 0.02, SU, SV, seed, dtype, spec, resid)


@pytest.mark.parametrize("m, n, spec", [(192, 576, "e8p"), (576, 1536, "e8p-rvq3"), (1536, 576, "e8p-rvq4")])
def test_rotated_basis_equals_the_dequantized_weight_in_float64(m, n, spec):
    q = _quip_tensor(m, n, spec)
    bias = torch.randn(m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = QuipLinear(q, bias)(x)
    expected = F.linear(x, q.dequantize(), bias)
    assert y.shape == (3, 5, m)
    assert (y - expected).abs().max() < 1e-12 * expected.abs().max()
    assert not torch.allclose(F.linear(x, q.rotated(), bias), expected, atol=1e-3)  # the rotation matters


@pytest.mark.parametrize("fwht", ["torch", "interpret"])
def test_rotated_basis_through_the_fwht_kernel_in_float32(fwht):
    """The power-of-two factor through qlab.kernels.hadamard (float32): the 576 -> 1536 -> 576 shapes of the
    MLP, against the float64 de-quantized weight."""
    for m, n in ((1536, 576), (576, 1536)):
        q = _quip_tensor(m, n, "e8p", seed=m, dtype=torch.float32)
        x = torch.randn(1, n, generator=torch.Generator().manual_seed(3))  # one row: the interpreter is slow
        y = QuipLinear(q, fwht=fwht)(x)
        expected = F.linear(x.double(), q.rotation().weight_inverse(q.rotated()))  # the float64 weight
        assert y.dtype == torch.float32
        assert (y.double() - expected).abs().max() < 2e-5 * expected.abs().max()


def test_kron_hadamard_kernel_path_equals_the_core_transform():
    x = torch.randn(6, 1536, generator=torch.Generator().manual_seed(4))
    for transpose in (False, True):
        expected = hadamard_transform(x.double(), transpose=transpose)
        got = kron_hadamard(x, transpose=transpose, fwht="torch")
        assert (got.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert torch.equal(kron_hadamard(x.double()), hadamard_transform(x.double()))
    with pytest.raises(ValueError, match="QuipTensor"):
        QuipLinear(torch.zeros(4, 4))


@torch.no_grad()
def test_walker_installs_quip_linear_with_rotate_inputs():
    """The walker option: QuipLinear in every block Linear, the same codes as the original-basis run, and
    logits equal to it to float32 rounding."""
    from embedded import tiny_llama
    from qlab.models.walker import quantize_model

    model = tiny_llama(hidden=64)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    entry = {"method": "quip", "spec": "e8p-rvq3"}
    plain, report = quantize_model(model, {"model.layers.*": entry}, calib)
    rotated, report_r = quantize_model(model, {"model.layers.*": {**entry, "rotate_inputs": True}}, calib)
    linears = [m for n, m in rotated.named_modules() if n.startswith("model.layers.") and
               isinstance(m, (torch.nn.Linear, QuipLinear))]
    assert len(linears) == 14 and all(isinstance(m, QuipLinear) for m in linears)
    for name, q in report.qtensors.items():
        assert torch.equal(q.codes, report_r.qtensors[name].codes)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    y, y_rot = plain(ids).logits, rotated(ids).logits
    assert (y - y_rot).abs().max() < 1e-4 * y.abs().max()
