import pytest
import torch

from qlab.core.packing import pack, unpack, packed_nbytes


def test_two_nibbles_per_byte_low_first():
    assert pack(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]


def test_three_bit_codes_straddle_bytes():
    # codes 1..8 of 3 bits: stream (LSB first) 001 010 011 100 101 110 111 000 -> 3 bytes
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == [(stream >> (8 * k)) & 0xFF for k in range(3)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000])
def test_round_trip_every_width(bits, n, gen):
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_rejects_codes_out_of_range_and_odd_widths():
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="1 to 8 or 16"):
        pack(torch.tensor([1]), 12)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_unpack_to_uint8_is_the_same_codes(bits, gen):
    codes = torch.randint(0, 2**bits, (1001,), generator=gen)
    packed = pack(codes.to(torch.uint8), bits)
    assert torch.equal(packed, pack(codes, bits))            # uint8 codes pack like int64 ones
    small = unpack(packed, bits, 1001, torch.uint8)
    assert small.dtype == torch.uint8 and torch.equal(small.to(torch.int64), codes)


def test_unpack_refuses_uint8_for_16_bit_codes():
    with pytest.raises(ValueError, match="do not fit in uint8"):
        unpack(pack(torch.tensor([300]), 16), 16, 1, torch.uint8)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001])
def test_nibble_loop_packs_as_the_bit_stream_says(n, gen):
    """4-bit codes take a compiled loop: byte j = code 2j | code 2j+1 << 4 (an odd count: high nibble 0), from
    int64, uint8 or a non-contiguous view alike."""
    codes = torch.randint(0, 16, (n,), generator=gen)
    padded = torch.cat([codes, torch.zeros(n % 2, dtype=codes.dtype)])
    expected = (padded[0::2] | (padded[1::2] << 4)).to(torch.uint8)
    assert torch.equal(pack(codes, 4), expected)
    assert torch.equal(pack(codes.to(torch.uint8), 4), expected)
    wide = torch.stack([codes, torch.zeros_like(codes)], dim=1)[:, 0]  # stride 2
    assert (n == 1 or not wide.is_contiguous()) and torch.equal(pack(wide, 4), expected)
