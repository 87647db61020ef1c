import pytest
import torch

from qlab.kernels.kivi import kivi_dequantize, kivi_dequantize_reference, kivi_quantize, kivi_quantize_reference


def test_hand_example():
    q = kivi_quantize_reference(torch.tensor([[0.0, 0.1, 0.3, 0.6]]), bits=2, group_size=4, kind="value")
    # scale 0.2, codes [0, 0, 2, 3] (0.5 rounds to even) -> one byte 0b11_10_00_00
    assert q.packed.tolist() == [[0b11100000]]
    assert q.scale.item() == pytest.approx(0.2) and q.minimum.item() == 0.0
    assert kivi_dequantize_reference(q)[0].tolist() == pytest.approx([0.0, 0.0, 0.4, 0.6])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_kernels_are_bit_exact(seeded, backend, bits, kind):
    x = torch.randn(2, 3, 45, 40, generator=seeded(bits)) * 2  # [batch, heads, T, D]; T = 45 is ragged
    x[0, 0, :, 5] = 1.0  # a constant channel (scale falls back to 1)
    x[1, 2, 7] = 0.5  # a constant token
    group = 16
    ref = kivi_quantize_reference(x, bits, group, kind)
    out = kivi_quantize(x, bits, group, kind, backend=backend)
    stats = (-(-45 // group), 40) if kind == "key" else (45, -(-40 // group))  # 40 = 2 groups of 16 + 8
    assert ref.scale.shape == (2, 3, *stats) and ref.packed.shape == (2, 3, 45, 40 * bits // 8)
    assert torch.equal(out.packed, ref.packed)
    assert torch.equal(out.scale, ref.scale) and torch.equal(out.minimum, ref.minimum)
    deq = kivi_dequantize(ref, backend=backend)
    assert torch.equal(deq, kivi_dequantize_reference(ref))
    # round to nearest: every element within half a step of its group's scale
    axis = 2 if kind == "key" else 3
    half_step = ref.scale.repeat_interleave(group, axis).narrow(axis, 0, x.shape[axis]) / 2
    assert ((deq - x).abs() <= half_step * (1 + 1e-5)).all()


def test_keys_grouped_over_tokens_values_over_channels(seeded):
    x = torch.randn(1, 32, 8, generator=seeded(2))
    x[:, :, 3] *= 50  # an outlier channel: per-channel key scales isolate it
    k = kivi_quantize_reference(x, 2, 32, "key")
    v = kivi_quantize_reference(x, 2, 8, "value")
    assert k.scale.shape == (1, 1, 8) and v.scale.shape == (1, 32, 1)
    key_err = (kivi_dequantize_reference(k) - x)[..., [0, 1, 2, 4, 5, 6, 7]].abs().mean()
    value_err = (kivi_dequantize_reference(v) - x)[..., [0, 1, 2, 4, 5, 6, 7]].abs().mean()
    assert key_err * 3 < value_err  # the other channels keep their precision only per channel


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 or 4 bits"):
        kivi_quantize(torch.randn(4, 8), bits=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        kivi_quantize(torch.randn(4, 6), bits=2)
    with pytest.raises(ValueError, match="power of two"):
        kivi_quantize(torch.randn(4, 8), group_size=12)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_kivi_is_a_core_spec(seeded, bits, kind):
    """The kernel's codes, scales and minima equal the core quantizer's with KIVI's spec (float minimum,
    groups of G tokens per channel for keys), bit for bit; the tensor implements the protocol."""
    from qlab import QTensor, quantize
    from qlab.core.tensor import from_state_dict
    from qlab.methods.kv.kivi import kivi_spec

    x = torch.randn(2, 3, 45, 40, generator=seeded(bits + 10)) * 2
    x[0, 0, :, 5] = 1.0  # a constant channel
    kv = kivi_quantize_reference(x, bits, 16, kind)
    core = quantize(x, kivi_spec(kind, bits, 16))
    assert kv.spec == core.spec
    mine = kv.to_quantized()
    assert torch.equal(mine.packed, core.packed)
    assert torch.equal(mine.scale, core.scale) and torch.equal(mine.minimum, core.minimum)
    assert torch.equal(core.dequantize(), kivi_dequantize_reference(kv))
    assert isinstance(kv, QTensor) and kv.nbytes == core.nbytes
    again = from_state_dict(kv.state_dict())
    assert torch.equal(again.dequantize(), kv.dequantize()) and again.which == kind
