"""Bit-packing round trips and the documented byte layout."""

import pytest
import torch

from dlqat.quant.bitpack import pack_codes, packed_width, unpack_codes


@pytest.mark.parametrize("n_bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1, 8), (3, 64), (5, 576), (4, 13), (2, 1), (7, 100)])
def test_round_trip_is_exact(n_bits, shape):
    q = torch.randint(-(2 ** (n_bits - 1)), 2 ** (n_bits - 1), shape, dtype=torch.int8)
    packed = pack_codes(q, n_bits)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], packed_width(shape[1], n_bits))
    assert torch.equal(unpack_codes(packed, n_bits, shape[1]), q)


def test_documented_layouts():
    # 4-bit: code 2j in the low nibble of byte j (unsigned u = q + 8)
    q4 = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, -3]], dtype=torch.int8)
    u = (q4.to(torch.int32) + 8)[0].tolist()
    expect = [u[2 * j] | (u[2 * j + 1] << 4) for j in range(4)]
    assert pack_codes(q4, 4)[0].tolist() == expect
    # 2-bit: four codes per byte, lowest bits first
    q2 = torch.tensor([[-2, -1, 0, 1, 1, 0, -1, -2]], dtype=torch.int8)
    u = (q2.to(torch.int32) + 2)[0].tolist()
    assert pack_codes(q2, 2)[0].tolist() == [
        u[0] | u[1] << 2 | u[2] << 4 | u[3] << 6,
        u[4] | u[5] << 2 | u[6] << 4 | u[7] << 6,
    ]
    # 3-bit: 8 codes in a 24-bit little-endian word
    q3 = torch.arange(-4, 4, dtype=torch.int8)[None]
    word = sum((k) << (3 * k) for k in range(8))  # u = 0..7
    assert pack_codes(q3, 3)[0].tolist() == [word & 255, (word >> 8) & 255, word >> 16]


def test_out_of_range_and_bad_width_are_errors():
    with pytest.raises(ValueError, match="outside the 3-bit range"):
        pack_codes(torch.tensor([[4]], dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="expected 3 bytes per row"):
        unpack_codes(torch.zeros(1, 4, dtype=torch.uint8), 3, 8)
