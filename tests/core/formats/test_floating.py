"""FP grids against torch's own float casts (the outside reference), over every code and random data."""
import pytest
import torch

from qlab.core.formats import get_grid

TORCH_DTYPES = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def _bits_of(values, dtype):
    view = torch.uint8 if dtype.itemsize == 1 else torch.int16
    return values.to(dtype).view(view).to(torch.int64) & (2 ** (8 * dtype.itemsize) - 1)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_decode_all_256_codes_matches_torch(name):
    grid, dtype = get_grid(name), TORCH_DTYPES[name]
    codes = torch.arange(256)
    ours = grid.decode(codes)
    theirs = codes.to(torch.uint8).view(dtype).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    finite = ~torch.isnan(theirs)
    assert torch.equal(ours[finite], theirs[finite])
    assert torch.equal(torch.signbit(ours[finite]), torch.signbit(theirs[finite]))
    real = torch.isfinite(theirs)
    assert torch.equal(grid.encode(ours[real]), codes[real])


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_round_is_bit_exact_with_torch_cast(name, gen):
    grid, dtype = get_grid(name), TORCH_DTYPES[name]
    magnitudes = torch.logspace(-9, 5, 50_000)
    x = torch.randn(50_000, generator=gen) * magnitudes
    x = x.clamp(-grid.max, grid.max)
    ours, theirs = grid.round(x), x.to(dtype).float()
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs))
    assert torch.equal(grid.encode(ours), _bits_of(x, dtype))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_ties_round_to_even_like_torch(name):
    grid, dtype = get_grid(name), TORCH_DTYPES[name]
    levels = grid.levels
    midpoints = (levels[1:] + levels[:-1]) / 2
    assert torch.equal(grid.round(midpoints), midpoints.to(dtype).float())


def test_known_constants():
    e4m3, e5m2, fp16, bf16 = (get_grid(n) for n in ["fp8_e4m3", "fp8_e5m2", "fp16", "bf16"])
    assert e4m3.levels.max() == 448 and e4m3.min_subnormal == 2**-9 and e4m3.min_normal == 2**-6
    assert e5m2.levels.max() == 57344 and e5m2.min_subnormal == 2**-16
    assert fp16.eps == torch.finfo(torch.float16).eps and bf16.eps == torch.finfo(torch.bfloat16).eps
    assert fp16.levels.max() == torch.finfo(torch.float16).max


def test_fp4_e2m1_levels_match_the_ocp_mx_table():
    # OCP Microscaling Formats spec v1.0, table of E2M1 values
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    levels = get_grid("fp4_e2m1").levels
    assert levels[levels >= 0].tolist() == expected
    assert levels[levels <= 0].tolist() == [-v for v in reversed(expected)]


def test_saturates_instead_of_overflowing():
    assert get_grid("fp8_e4m3").round(torch.tensor([1e6, -500.0])).tolist() == [448.0, -448.0]
    assert get_grid("fp8_e5m2").round(torch.tensor([1e9])).tolist() == [57344.0]


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp16", "bf16"])
def test_torch_cast_fast_path_equals_the_arithmetic(name):
    """round() and encode() use torch's cast where torch has the dtype; the format's arithmetic, spelled out in
    round_arithmetic / encode_arithmetic, must give the same values and codes: every code's value, every
    midpoint between neighbours (the ties), values beyond the max, and random values across many decades."""
    from qlab.core.formats import get_grid

    grid = get_grid(name)
    levels = grid.levels
    mids = (levels[1:] + levels[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 30, (20000,), generator=g).float())
    x = torch.cat([levels, mids, torch.tensor([grid.max * 1.5, -grid.max * 3, 0.0, -0.0]), rand])
    fast, slow = grid.round(x), grid.round_arithmetic(x)
    assert torch.equal(fast, slow) and torch.equal(torch.signbit(fast), torch.signbit(slow))
    if grid.bits == 8:
        assert torch.equal(grid.encode(fast), grid.encode_arithmetic(fast))
        every = torch.arange(256)
        a, b = grid.decode(every), grid.decode_arithmetic(every)
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) and torch.equal(torch.signbit(a), torch.signbit(b))


def test_e4m3_codes_are_the_clamped_torch_cast_bit_for_bit(gen, cpu_loops):
    """The encoder's one-pass E4M3 loop (divide, round, saturate) against torch: the divide, the clamp to +-448,
    torch's cast. Every float32 whose low 16 bits are one of a few patterns (ties, either side of them; all
    exponents, both signs, subnormals, inf, NaN; all 2^32 floats were checked once), then groups with scales."""
    from qlab.core.formats.floating import e4m3_codes
    high = torch.arange(1 << 16, dtype=torch.int64) << 16
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    bits = (high[:, None] | low[None, :]).reshape(-1)
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    ours = e4m3_codes(x[None], torch.ones(1))[0]
    assert torch.equal(ours, x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    G = torch.randn(64, 96, generator=gen) * torch.logspace(-8, 4, 96)
    scale = torch.rand(64, generator=gen) * 0.01 + 1e-4
    assert torch.equal(e4m3_codes(G, scale),
                       (G / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("threads", [1, 2])
def test_e4m3_codes_split_mid_row_on_two_threads(gen, threads, cpu_loops):
    # 3 rows of 50,001: two threads split the 150,003 values inside the second row
    from qlab.core.formats.floating import e4m3_codes
    G = torch.randn(3, 50_001, generator=gen) * 100
    scale = torch.tensor([0.5, 1.0, 3.0])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = e4m3_codes(G, scale)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ours, (G / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
