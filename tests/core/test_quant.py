"""quantize / dequantize for every format: inverses on the grid, half-step error, honest sizes."""
import math

import pytest
import torch

from qlab.core.quant import _encode_groups, _qparams, fake_quant, qparams, quantize
from qlab.core.packing import pack
from qlab.core.spec import SCALE_DTYPES, QuantSpec
from qlab.core.tensor import QuantizedTensor
from qlab.core.granularity import PerGroup

SPECS = [
    "int8-channel-sym-absmax", "int8-tensor-sym-absmax-full", "int4-g128-asym-minmax",
    "int4-g32-sym-absmax", "int3-g64-asym-mse", "int2-channel-sym-mse", "int5-token-asym-minmax",
    "int6-channel@1-sym-absmax", "nf4", "nf4-b64-sym-absmax-dq", "fp8_e4m3", "fp8_e5m2-token-sym-absmax",
    "fp4_e2m1", "ternary", "binary", "fp16", "bf16",
]


@pytest.mark.parametrize("text", SPECS)
def test_codes_survive_requantization(text, weight):
    qt = quantize(weight, text)
    again = quantize(qt.dequantize(), qt.spec, scale=qt.scales(), zero_point=qt.zero_point)
    assert torch.equal(again.codes(), qt.codes())


@pytest.mark.parametrize("text", ["int8-channel-sym-absmax", "int4-g128-sym-absmax", "int4-g128-asym-minmax",
                                  "nf4", "fp8_e4m3", "int3-tensor-asym-minmax"])
def test_quantize_is_idempotent_with_fresh_scales(text, weight):
    once = quantize(weight, text)
    twice = quantize(once.dequantize(), text)
    assert torch.equal(twice.codes(), once.codes())
    assert torch.allclose(twice.dequantize(), once.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("text", ["int8-channel-sym-absmax", "int4-g128-asym-minmax", "int4-g32-sym-absmax",
                                  "int3-g64-asym-minmax", "int2-token-asym-minmax", "int8-tensor-sym-absmax-full"])
def test_error_of_in_range_values_is_at_most_half_a_step(text, weight):
    qt = quantize(weight, text)
    gran = qt.spec.granularity
    G, mask = gran.to_groups(weight)
    E, _ = gran.to_groups(weight - qt.dequantize())
    step = qt.scales().reshape(-1, 1)
    assert (E.abs() <= step / 2 * (1 + 1e-5)).all()


def test_fp8_error_is_half_an_ulp_at_each_magnitude(weight):
    qt = quantize(weight, "fp8_e4m3")
    scale = qt.scales().item()
    a = (weight / scale).abs()
    exponent = torch.clamp(torch.floor(torch.log2(a.clamp(min=1e-30))), min=-6)
    half_ulp = 2.0 ** (exponent - 3) / 2 * scale
    assert ((weight - qt.dequantize()).abs() <= half_ulp * (1 + 1e-5)).all()


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel"])
def test_fp8_matches_torch_scaled_cast(granularity, gen):
    x = torch.randn(32, 96, generator=gen) * 3
    qt = quantize(x, f"fp8_e4m3-{granularity}")
    scale = qt.scales().reshape(qt.spec.granularity.scale_shape(tuple(x.shape)))
    if granularity == "token":
        scale = scale[:, None]
    elif granularity == "channel":
        scale = scale[:, None]
    reference = (x / scale).to(torch.float8_e4m3fn)
    assert torch.equal(qt.codes(), reference.view(torch.uint8).to(torch.int64))


@pytest.mark.parametrize("family", ["int{b}-g64-asym-minmax", "int{b}-channel-sym-absmax", "int{b}-g32-asym-mse"])
def test_error_falls_as_bits_rise(family, weight):
    errors = [(fake_quant(weight, family.format(b=b)) - weight).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_mse_rule_never_worse_than_minmax(weight):
    for bits in (2, 3, 4):
        minmax = (fake_quant(weight, f"int{bits}-g64-asym-minmax") - weight).pow(2).sum()
        best = (fake_quant(weight, f"int{bits}-g64-asym-mse") - weight).pow(2).sum()
        assert best <= minmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("text", ["int4-g32-asym-minmax", "nf4", "fp8_e4m3"])
def test_shape_and_dtype_survive(dtype, text, gen):
    x = torch.randn(3, 5, 40, generator=gen).to(dtype)
    qt = quantize(x, text)
    out = qt.dequantize()
    assert out.shape == x.shape and out.dtype == dtype and qt.codes().shape == x.shape


def test_bits_per_weight_counts_scales_zero_points_and_the_ragged_group(weight):
    qt = quantize(weight, "int4-g128-asym-minmax")  # [16, 576]: 5 groups per row, last of 64
    codes = 16 * 576 * 4 / 8
    scales = 16 * 5 * 2  # fp16
    zeros = 16 * 5 * 4 / 8
    assert qt.packed.numel() == codes
    assert qt.nbytes == codes + scales + zeros
    assert qt.bits_per_weight == pytest.approx(4 + (16 + 4) * 5 / 576)


def test_zero_padding_of_the_ragged_group_leaves_its_min_max_range(gen):
    """576 columns in groups of 128: the last group is 64 values and 64 zeros of padding. A min-max range
    takes in 0 anyway, so the padding needs no mask: that group's scale and zero point are those of its 64
    values alone, all positive or all negative ones too."""
    x = torch.randn(3, 576, generator=gen)
    x[1, 512:] = x[1, 512:].abs() + 1
    x[2, 512:] = -x[2, 512:].abs() - 1
    ragged = quantize(x, "int4-g128-asym-minmax")
    alone = quantize(x[:, 512:].contiguous(), "int4-g64-asym-minmax")
    assert torch.equal(ragged.scales()[:, -1:], alone.scales())
    assert torch.equal(ragged.zero_point[:, -1:], alone.zero_point)
    assert torch.equal(ragged.codes()[:, 512:], alone.codes())


def test_nf4_double_quant_size_and_error(gen):
    x = torch.randn(64 * 256 * 2, generator=gen)
    plain, dq = quantize(x, "nf4"), quantize(x, "nf4-dq")
    assert plain.bits_per_weight == pytest.approx(4 + 16 / 64)
    # QLoRA: 4 + 8/64 + 32/(64*256) bits per weight, plus one fp32 offset
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / x.numel())
    e_plain = (plain.dequantize() - x).pow(2).mean()
    e_dq = (dq.dequantize() - x).pow(2).mean()
    assert e_dq < e_plain * 1.01


def test_ternary_is_bitnet_absmean(gen):
    w = torch.randn(8, 32, generator=gen)
    gamma = w.abs().mean()
    expected = torch.clamp(torch.round(w / gamma), -1, 1) * gamma.half().float()
    assert torch.allclose(fake_quant(w, "ternary"), expected)
    assert set(quantize(w, "ternary").values().unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_all_zero_group_stays_zero():
    x = torch.zeros(2, 64)
    x[1] = torch.linspace(-1, 1, 64)
    for text in ["int4-g32-asym-minmax", "int4-g32-sym-absmax", "nf4", "int4-g32-asym-mse"]:
        out = fake_quant(x, text)
        assert torch.equal(out[0], torch.zeros(64)) and torch.isfinite(out).all()


@pytest.mark.parametrize("text", SPECS + ["int4-g128-sym-absmax-sfp32", "int8-channel@1-sym-mse-full"])
def test_spec_string_round_trips(text):
    spec = QuantSpec.parse(text)
    assert QuantSpec.parse(str(spec)) == spec
    assert str(QuantSpec.parse(str(spec))) == str(spec)


def test_spec_defaults_and_constructor():
    assert str(QuantSpec.parse("nf4")) == "nf4-b64-sym-absmax"
    assert str(QuantSpec.parse("int4-g128-asym")) == "int4-g128-asym-minmax"
    assert QuantSpec.integer(4, group_size=128, symmetric=False) == QuantSpec.parse("int4-g128-asym-minmax")
    assert QuantSpec.parse("int8").grid.qmin == -127 and QuantSpec.parse("int8-full").grid.qmin == -128


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([1.0, float("nan")]), "NaN/Inf"),
    (torch.tensor([1.0, float("inf")]), "NaN/Inf"),
    (torch.empty(0, 4), "empty"),
    (torch.tensor([1, 2, 3]), "floating point"),
])
def test_bad_tensors(bad, message):
    with pytest.raises(ValueError, match=message):
        quantize(bad, "int8")


@pytest.mark.parametrize("text, message", [
    ("int9", "1 to 8 bits"), ("int0", "1 to 8 bits"), ("int4-g0", "positive"),
    ("int5-b0", "positive"), ("nf4-asym", "needs an int format"), ("int4-sym-minmax", "minmax rule"),
    ("fp7", "unknown format"), ("int4-g32-foo", "unknown granularity"), ("int1", "binary"),
])
def test_bad_specs(text, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec.parse(text)


@pytest.mark.parametrize("text", ["int8", "int8-tensor", "int4-g16-asym-minmax", "int4-g16-asym-minmax-fmin",
                                  "int3-g16-sym-mse", "int3-g16-asym-mse", "ternary", "fp16", "nf4", "fp8_e4m3"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_rule_counts_nan_and_inf_without_a_separate_pass(text, bad, gen):
    """validate(finite=False) leaves the check to the groups' ranges: each entry point still refuses, and
    counts, NaN/Inf anywhere, the padded last group of 40 = 16 + 16 + 8 included."""
    x = torch.randn(4, 40, generator=gen)
    x[1, 5], x[3, 39] = bad, bad
    for fn in (lambda: quantize(x, text), lambda: fake_quant(x, text), lambda: qparams(x, text)):
        with pytest.raises(ValueError, match=r"tensor has 2 NaN/Inf value\(s\)"):
            fn()
    given = quantize(torch.randn(4, 40, generator=gen), "int4-g16")
    with pytest.raises(ValueError, match=r"tensor has 2 NaN/Inf value\(s\)"):
        quantize(x, "int4-g16", scale=given.scales())


@pytest.mark.parametrize("text", ["int8-channel", "int8-channel-sbf16", "int8-tensor-full", "int4-g32-sbf16", "int2-g16",
                                  "fp8_e4m3", "fp8_e5m2-channel-sbf16", "fp8_e4m3-token-sfp16"])
def test_absmax_bound_holds_and_codes_are_the_clamped_rounding(text, gen):
    """The bound _qparams hands the encoder (so that it may skip its clamp) is >= every |x / scale|, and the
    codes are those of the clamped rounding, with scales rounded down (bf16) as well as up."""
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-3, 3, 96)
    spec = QuantSpec.parse(text)
    G, mask = spec.granularity.to_groups(x)
    p = _qparams(G, mask, spec)
    X = G / p.scale[:, None]
    assert p.bound >= float(X.abs().max()) and p.bound <= float(X.abs().max()) * (1 + 1e-5)
    expected = spec.granularity.from_groups(spec.grid.encode(spec.grid.round(X)), x.shape)
    assert torch.equal(quantize(x, text).codes(), expected)


@pytest.mark.parametrize("text", ["int8-channel", "int4-g32-asym-minmax", "int4-g32-asym-minmax-fmin", "fp8_e4m3",
                                  "nf4", "int3-tensor-asym-mse", "bf16"])
def test_encoding_in_slabs_changes_no_code(text, gen):
    """quantize encodes more than 2^23 values 2^20 at a time: slabs of several whole groups (100 or 1000
    values of groups of 32) and pieces of one group (7 values; 100 of a channel of 160; per tensor, all
    three) give the codes of a single pass."""
    x = torch.randn(24, 160, generator=gen) * 3
    spec = QuantSpec.parse(text)
    G, mask = spec.granularity.to_groups(x)
    p = _qparams(G, mask, spec)
    whole = _encode_groups(G, p, spec.grid)
    for slab in (7, 100, 1000):
        assert torch.equal(_encode_groups(G, p, spec.grid, slab=slab, one_pass=0), whole)
    assert torch.equal(spec.granularity.from_groups(whole, x.shape), quantize(x, text).codes().to(whole.dtype))


@pytest.mark.parametrize("text", ["int4-g32", "int4-g32-full", "int4-g32-asym-minmax", "nf4", "fp4_e2m1"])
def test_4_bit_values_by_byte_pairs_are_the_decoded_codes(text, gen):
    """values() of 4-bit codes looks each byte up in a table of value pairs: the same floats as unpacking the
    codes and decoding them one by one, an odd number of codes (a half-used last byte) included."""
    qt = quantize(torch.randn(7, 45, generator=gen), text)
    codes = torch.randint(0, 16, (7 * 45,), generator=gen)
    qt.packed = pack(codes, 4)
    expected = qt.spec.grid.decode(codes).reshape(7, 45)
    assert torch.equal(qt.values().view(torch.int32), expected.view(torch.int32))  # -0.0 included
    assert torch.equal(qt.codes(), codes.reshape(7, 45))


def test_scale_overflow_is_reported_not_silent():
    with pytest.raises(ValueError, match="overflows"):
        quantize(torch.tensor([1e9, 1.0]), "int8-tensor")
    with pytest.raises(ValueError, match="overflows"):  # finite values whose range overflows float32 itself
        quantize(torch.tensor([3e38, -3e38]), "int8-tensor-asym-minmax-sfp32")


def test_quantized_tensor_type_and_repr(weight):
    qt = quantize(weight, "int4-g128-asym-minmax")
    assert isinstance(qt, QuantizedTensor) and qt.spec.granularity == PerGroup(128)
    assert "4.174 bits/weight" in repr(qt) and math.prod(qt.shape) == weight.numel()


def test_mse_rule_clips_heavy_tails_far_below_a_fifth(gen):
    # Student-t with 3 degrees of freedom: at 2 bits the best clipping ratio is ~0.05 of max|x|
    x = torch.distributions.StudentT(3.0).sample((1, 20_000))
    qt = quantize(x, "int2-tensor-sym-mse-sfp32")
    p = qt.scales().item() * qt.spec.grid.max_abs / x.abs().max().item()
    assert p < 0.15
    # and it is the best ratio of a brute-force scan over p (1000 ratios), to within 1 %
    from qlab.core.scales import fake_quant_groups
    ratios = torch.linspace(0.005, 1, 1000)
    errors = torch.stack([((fake_quant_groups(x, x.abs().amax(1) * r / 1.0, None, qt.spec.grid) - x) ** 2).sum()
                          for r in ratios])
    best = errors.min()
    ours = ((qt.dequantize() - x) ** 2).sum()
    assert ours <= best * 1.01


def test_fractional_or_out_of_range_zero_points_are_rejected():
    x = torch.tensor([-1.0, -0.3, 0.2, 0.9])
    with pytest.raises(ValueError, match="integers"):
        quantize(x, "int2-tensor-asym-minmax", scale=[0.5], zero_point=[1.5])
    with pytest.raises(ValueError, match="must lie in"):
        quantize(x, "int2-tensor-asym-minmax", scale=[0.5], zero_point=[7])


@pytest.mark.parametrize("text", ["int8", "int4-g64", "int4-g128-asym-minmax", "int3-g32-asym-mse", "int2-channel-sym-mse",
                                  "nf4", "nf4-b64-dq", "fp8_e4m3", "fp8_e5m2-channel", "fp4_e2m1", "ternary", "dynamic8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_dequantize_of_quantize(text, dtype, gen):
    """The no-packing shortcut gives bit for bit what quantize -> pack -> unpack -> dequantize gives
    (shape 40 x 200: groups of 64 and 128 leave a ragged last group)."""
    x = (torch.randn(40, 200, generator=gen) * torch.rand(40, 1, generator=gen) * 3).to(dtype)
    x[3, 5] = 40.0  # an outlier
    expected = quantize(x, text).dequantize()
    got = fake_quant(x, text)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("text", SPECS)
def test_qparams_are_the_scales_quantize_stores(text, weight):
    qt = quantize(weight, text)
    scale, zero_point = qparams(weight, text)
    assert torch.equal(scale, qt.scales().reshape(-1))
    assert (zero_point is None) == (qt.zero_point is None)
    if zero_point is not None:
        assert torch.equal(zero_point, qt.zero_point.reshape(-1).float())


# ---- straight-through fake quantization -------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["int4-g32-sym-mse", "int3-g32-asym-mse", "int4-g32-asym-minmax-fmin", "nf4",
                                  "fp8_e4m3", "int8-channel"])
def test_ste_forward_is_fake_quant_bit_for_bit(spec):
    x = (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) ** 3).requires_grad_()
    from qlab import fake_quant_ste

    assert torch.equal(fake_quant_ste(x, spec), fake_quant(x.detach(), spec))


def test_ste_gradient_is_one_inside_the_range_and_zero_outside():
    """int4, symmetric, groups of 32, MSE-clipped scales: heavy tails fall outside [-7 s, 7 s] and get no
    gradient (clipped STE); everything inside gets exactly 1. Unclipped: 1 everywhere."""
    from qlab import fake_quant_ste

    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) ** 3).requires_grad_()
    spec = "int4-g32-sym-mse"
    g = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))  # an upstream gradient
    (fake_quant_ste(x, spec) * g).sum().backward()
    scale = quantize(x.detach(), spec).scales().repeat_interleave(32, dim=1)  # [4, 64]
    inside = (x.detach().abs() <= 7 * scale)
    assert 0 < (~inside).sum() < inside.sum()  # the search clipped some outliers
    assert torch.equal(x.grad, g * inside)
    x.grad = None
    (fake_quant_ste(x, spec, clipped=False) * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_ste_range_of_an_asymmetric_grid_by_hand():
    """int2 with a zero point on [0, 3]: scale 1, zero point 0 -> levels 0..3; x = 3.4 is clipped, 0.2 is not."""
    from qlab import fake_quant_ste

    x = torch.tensor([0.2, 1.0, 3.0, 3.4], requires_grad=True)
    qt = quantize(x.detach(), "int2-tensor-asym-minmax")
    s = qt.scales().item()
    y = fake_quant_ste(x, "int2-tensor-asym-minmax")
    y.sum().backward()
    hi = s * (3 - qt.zero_point.item())
    assert x.grad.tolist() == [float(v <= hi) for v in x.detach().tolist()]


def test_a_detached_fake_quant_trains_nothing():
    """detach(round(W / s) * s), the naive fake quant, cuts the graph: W gets no gradient at all."""
    from qlab import fake_quant_ste

    W = torch.randn(8, 32, requires_grad=True)
    naive = (torch.round(W / 0.1) * 0.1).detach()
    assert not naive.requires_grad and not fake_quant(W, "int4-g32").requires_grad  # nothing to backpropagate
    loss = ((torch.round(W / 0.1) * 0.1) ** 2).sum()  # without detach: round's gradient is zero almost everywhere
    loss.backward()
    assert W.grad.abs().sum() == 0
    W.grad = None
    fake_quant_ste(W, "int4-g32").sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


# ---- bad and edge inputs (issue 16) -------------------------------------------------------------------------

def test_fp16_scale_underflow_is_an_error_that_names_the_fix():
    """int4 g32 on values ~1e-8: the fp16 scale rounds to 0 (it used to be replaced by 1, de-quantizing to all
    zeros). int8 at |w| ~ 2e-6 stores a deep-subnormal fp16 scale (25% error before); fp32 scales are exact."""
    tiny = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="underflow fp16.*-sfp32"):
        quantize(tiny * 1e-8, "int4-g32")
    with pytest.raises(ValueError, match="underflow fp16"):
        quantize(tiny * 2e-6, "int8")
    x = tiny * 2e-6
    assert float((quantize(x, "int8-sfp32").dequantize() - x).norm() / x.norm()) < 0.01
    # mild subnormals (scale 3e-5, ~0.1% rounding) still quantize: weights this small are real
    assert quantize(tiny * 4e-3, "int8").dequantize().abs().max() > 0


@pytest.mark.parametrize("spec", ["binary-channel", "binary-g32", "ternary", "int4-g32", "int3-g32-asym-minmax", "nf4"])
def test_all_zero_groups_come_back_as_zeros(spec):
    """A zero row (or group) with its own scale de-quantizes to exact zeros on every grid; a binary grid
    {-1, 1} used to give -1. (With one scale for the whole tensor a binary grid has no way to say 0: a zero
    row then comes back as -scale; give it a scale per channel or group.)"""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    x[1] = 0.0
    x[2, :32] = 0.0
    for out in (quantize(x, spec).dequantize(), fake_quant(x, spec)):
        assert (out[1] == 0).all() and (out[0] != 0).any()
        if spec != "binary-channel":  # a zero half-row is a zero group of 32 (or zeros on a grid with a 0 level)
            assert (out[2, :32] == 0).all()


@pytest.mark.parametrize("bad, message", [
    ("int4-g128-g64", "granularity twice"), ("int4-mse-absmax", "scale rule twice"), ("int4-sym-asym", "symmetry twice"),
    ("int4-sfp16-sfp32", "scale dtype twice"), ("int4-asym-full", "'-full'"), ("int4-channel@x", "not an integer"),
])
def test_ambiguous_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec.parse(bad)


def test_given_quantization_parameters_are_checked():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"one value per group \(8\), got 3"):
        quantize(x, "int4-g32", scale=torch.ones(3))
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize(x, "int4-g32", scale=torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match="non-negative"):
        quantize(x, "int4-g32", scale=-torch.ones(8))
    with pytest.raises(ValueError, match="already an 8-bit float"):
        quantize(x.to(torch.float8_e4m3fn), "int4-g32")


def _checked_group_by_group(G, raw, spec):
    """The scale checks as _qparams made them before _check_range: a NaN/Inf pass when a range is not finite,
    the underflow check of every group, then the cast with its overflow check (the reference)."""
    from qlab.core import quant as Q
    if not torch.isfinite(raw).all():
        Q.check_finite(G)
    zero_groups = Q._check_underflow(raw, spec)
    scale = Q._cast_scale(SCALE_DTYPES[spec.scale_dtype])(raw)
    return scale, (zero_groups if zero_groups.any() else None)


@pytest.mark.parametrize("text", ["int8-channel", "int4-g16", "int4-g16-asym-minmax", "int4-g16-asym-minmax-fmin",
                                  "int8-channel-sbf16", "int4-g16-sfp32", "ternary-channel", "fp8_e4m3-channel-sfp16"])
@pytest.mark.parametrize("case", ["plain", "zero groups", "underflow", "underflow and zero groups", "overflow",
                                  "underflow and overflow", "nan", "inf and zero groups", "range overflows float32"])
def test_scale_checks_from_four_extremes_agree_with_the_group_by_group_checks(text, case):
    """_check_range reads the extremes of the ranges and of the stored scales: the same scales, all-zero groups
    and errors (message included) as checking every group."""
    from qlab.core import quant as Q
    spec = QuantSpec.parse(text)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(7))
    if "zero groups" in case:
        x[1] = 0.0
    if "underflow" in case:
        x[2] *= 1e-9
        x[4, :16] *= 1e-9
    if "overflow" in case and "range" not in case:
        x[3] *= 1e9
    if case == "nan":
        x[5, 3] = float("nan")
    if "inf" in case:
        x[0, 0] = float("inf")
    if case == "range overflows float32":
        x[3, :2] = torch.tensor([3e38, -3e38])
    G, mask = spec.granularity.to_groups(x)
    raw, _ = Q._full_range(G, mask, spec)
    try:
        want = _checked_group_by_group(G, raw, spec)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            Q._check_range(G, raw, spec)
        assert str(got.value) == str(e)
        return
    scale, zero_groups = Q._check_range(G, raw, spec)
    assert torch.equal(scale, want[0]) and scale.dtype == torch.float32
    if zero_groups is not None and not zero_groups.any():  # float minima: constant groups are no zero groups
        zero_groups = None
    assert (zero_groups is None and want[1] is None) or torch.equal(zero_groups, want[1])
