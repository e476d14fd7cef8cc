"""Blockwise 4-bit quantization: closed form on hand-sized tensors, invariants, bitsandbytes parity."""
import pytest
import torch

from deltatune.quant import codebooks
from deltatune.quant.dynamic8 import dequantize_dynamic8, quantize_dynamic8
from deltatune.quant.nf4 import absmax_float, dequantize, quantize_4bit, quantize_fp4, quantize_nf4

bnb_f = pytest.importorskip("bitsandbytes.functional")


def _weights(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if w.dim() == 2:  # rows of different scale, so blocks have very different absmax, as in real weights
        w = w * torch.rand(shape[0], 1, generator=g)
    return (w * 0.05).to(dtype)


# --- tier (a): closed form ----------------------------------------------------------------------

def test_nf4_codes_of_exact_levels_and_nibble_order():
    levels = torch.tensor(codebooks.NF4_LEVELS)
    x = torch.cat([levels, levels.flip(0)] * 2) * 2.5  # one block of 64, absmax 2.5
    s = quantize_nf4(x, blocksize=64, double_quant=False)
    codes = torch.cat([torch.arange(16), torch.arange(15, -1, -1)] * 2)
    expected = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)  # even element in the high nibble
    assert torch.equal(s.packed, expected)
    assert s.absmax.tolist() == [2.5]
    assert torch.equal(dequantize(s), x)  # level * absmax, the same float32 product


def test_values_round_to_nearest_level_ties_down():
    levels = torch.tensor(codebooks.NF4_LEVELS)
    mid = (levels[7] + levels[8]) / 2  # exactly between code 7 (0.0) and 8
    x = torch.tensor([1.0, mid, mid + 1e-4, -0.7] + [0.0] * 60)
    s = quantize_nf4(x, double_quant=False)
    assert s.packed[:2].tolist() == [(15 << 4) | 7, (8 << 4) | 1]


def test_fp4_levels_are_sign_exponent_mantissa():
    code = codebooks.code_4bit("fp4")
    assert code[3] == 1.0 and code[11] == -1.0  # 0b011 is the largest magnitude, 12/12
    assert code[2].item() == pytest.approx(8 / 12) and code[1].item() == pytest.approx(0.0625 / 12)


def test_double_quant_closed_form():
    # block absmax 1 and 3 -> offset (mean) 2 -> (-1, 1) / nested scale 1 -> codes 0 and 255 of
    # the dynamic map, whose levels are -0.99297 (its minimum) and 1
    x = torch.zeros(128)
    x[0], x[64] = 1.0, -3.0
    s = quantize_nf4(x, blocksize=64, double_quant=True)
    assert s.nested_offset.item() == 2.0 and s.nested_absmax.tolist() == [1.0]
    assert s.absmax.tolist() == [0, 255]
    lowest = codebooks.dynamic_map()[0]
    assert torch.equal(absmax_float(s), torch.stack([lowest + 2.0, torch.tensor(3.0)]))


# --- tier (b): invariants -----------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_requantizing_dequantized_values_is_a_fixed_point(quant_type):
    s = quantize_4bit(_weights((64, 96)), quant_type, 64, double_quant=False)
    s2 = quantize_4bit(dequantize(s), quant_type, 64, double_quant=False)
    assert torch.equal(s.absmax, s2.absmax) and torch.equal(dequantize(s2), dequantize(s))
    if quant_type == "nf4":  # FP4 has two codes for zero (+0 and -0), so only its values are fixed
        assert torch.equal(s.packed, s2.packed)


def test_error_is_bounded_by_half_the_widest_level_gap():
    w = _weights((32, 128))
    s = quantize_nf4(w, double_quant=False)
    levels = torch.tensor(codebooks.NF4_LEVELS)
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    per_block = (dequantize(s) - w).abs().view(-1, 64).amax(1)
    assert (per_block <= half_gap * s.absmax * (1 + 1e-6)).all()


def test_absmax_of_a_block_range_equals_the_slice():
    s = quantize_nf4(_weights((40, 1000)), blocksize=64, double_quant=True)  # 625 blocks, 3 nested
    full = absmax_float(s)
    for a, b in [(0, 625), (250, 260), (255, 513), (600, 625)]:
        assert torch.equal(absmax_float(s, a, b), full[a:b])


def test_bits_per_param_with_double_quant():
    s = quantize_nf4(_weights((512, 512)), blocksize=64, double_quant=True)
    assert s.bits_per_param() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / s.numel)
    assert s.bits_per_param() <= 4.2
    assert quantize_nf4(_weights((512, 512)), double_quant=False).bits_per_param() == pytest.approx(4.5)


def test_input_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), "int4")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(torch.tensor([1.0, float("nan")] * 32))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))


# --- tier (c): parity with bitsandbytes -----------------------------------------------------------

def test_codebooks_equal_bitsandbytes():
    assert torch.equal(codebooks.code_4bit("nf4"), bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codebooks.code_4bit("fp4"), bnb_f.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(codebooks.dynamic_map(), bnb_f.create_dynamic_map())


@pytest.mark.parametrize("n", [256 * 40, 1000, 37])
def test_dynamic8_equals_bitsandbytes_quantize_blockwise(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    q, st = bnb_f.quantize_blockwise(x, blocksize=256)
    codes, scales = quantize_dynamic8(x, 256)
    assert torch.equal(codes, q) and torch.equal(scales, st.absmax)
    # decoded by bitsandbytes' published map, not by whichever dequantize kernel it loads (see _bnb_meaning)
    meaning = bnb_f.create_dynamic_map()[q.long()] * st.absmax.repeat_interleave(256)[:n]
    assert torch.equal(dequantize_dynamic8(codes, scales), meaning)


CASES = [((96, 160), 64), ((33, 17), 64), ((4, 512), 128), ((8, 96), 32), ((130, 700), 64)]


def _bnb_meaning(packed: torch.Tensor, state, shape, dtype=torch.float32) -> torch.Tensor:
    """The weights a bitsandbytes 4-bit state stands for, computed from its parts and bitsandbytes'
    published tables only: ``code_table[nibble] * absmax`` per block, the absmax decoded from its 8-bit
    codes (``create_dynamic_map()[code] * state2.absmax`` per block of 256) plus the offset under
    double quantization. No bitsandbytes kernel runs here: which CPU kernel ``dequantize_4bit`` takes
    depends on what it loads at run time, and 0.50.2's AVX-512 one returns other values from the second
    row on when the row width is not a multiple of the block (a (3, 96) weight in blocks of 64)."""
    n = torch.Size(shape).numel()
    absmax = state.absmax.float()
    if state.nested:
        nb = state.state2.blocksize
        codes = bnb_f.create_dynamic_map()[state.absmax.long()]
        absmax = codes * state.state2.absmax.repeat_interleave(nb)[: codes.numel()] + state.offset
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[:n].long()
    levels = bnb_f.get_4bit_type(state.quant_type, device="cpu")[nibbles]
    return (levels * absmax.repeat_interleave(state.blocksize)[:n]).to(dtype).view(shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", CASES)
def test_codes_and_constants_equal_bitsandbytes(quant_type, double_quant, shape, blocksize):
    w = _weights(shape, seed=shape[0])
    ref, ref_state = bnb_f.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                         quant_type=quant_type)
    s = quantize_4bit(w, quant_type, blocksize, double_quant)
    assert torch.equal(s.packed, ref.view(-1))
    assert torch.equal(s.absmax, ref_state.absmax)
    if double_quant:
        assert torch.equal(s.nested_absmax, ref_state.state2.absmax)
        assert torch.equal(s.nested_offset, ref_state.offset)
    assert torch.equal(dequantize(s), _bnb_meaning(ref, ref_state, shape))


def test_large_tensor_constants_equal_bitsandbytes():
    # 65536 blocks: torch reduces the absmax mean with several threads here, which changes its
    # last bit, so the offset must be taken the way bitsandbytes takes it
    w = _weights((2048, 2048))
    ref, ref_state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    s = quantize_nf4(w)
    assert torch.equal(s.nested_offset, ref_state.offset) and torch.equal(s.absmax, ref_state.absmax)
    assert torch.equal(s.packed, ref.view(-1)) and torch.equal(s.nested_absmax, ref_state.state2.absmax)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_equal_bitsandbytes(dtype):
    w = _weights((64, 128), dtype=dtype)
    ref, ref_state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    s = quantize_nf4(w)
    assert torch.equal(s.packed, ref.view(-1)) and torch.equal(s.absmax, ref_state.absmax)
    assert s.dtype == dtype
    assert torch.equal(dequantize(s, dtype), _bnb_meaning(ref, ref_state, w.shape, dtype))


def test_fp4_shorthand_matches_generic():
    w = _weights((16, 64))
    assert torch.equal(quantize_fp4(w).packed, quantize_4bit(w, "fp4").packed)
