"""engine/quantize.py against its definition: the error bound, exact zeros, refused NaN/inf,
int4 packing, wire bytes, dtypes, bad arguments, and a slow exact reference (Fractions)."""
from fractions import Fraction

import numpy as np
import pytest

from engine.backend import bfloat16
from engine.quantize import (QMAX, Quantized, codes_int8, dequantize, from_bytes, pack_int4,
                             quantize, to_bytes, unpack_int4, wire_bytes)

BF16 = bfloat16()
SIZES = [0, 1, 5, 255, 256, 257, 1000]
BLOCKS = [1, 3, 64, 256]


def data(n, dtype=np.float32, seed=0):
    """Normal values with a few outliers (x100) and a tiny-valued stretch."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    x[rng.random(n) < 0.01] *= 100.0
    x[n // 2: n // 2 + 7] *= 1e-38
    return x.astype(dtype)


def element_scales(qt):
    return np.repeat(qt.scales.astype(np.float64), qt.block)[:qt.n]


def ref_quantize(x, bits, block):
    """The definition, one block at a time in exact rational arithmetic."""
    qmax = QMAX[bits]
    vals = [Fraction(float(v)) for v in np.asarray(x, dtype=np.float64).reshape(-1)]
    codes, scales = [], []
    for start in range(0, len(vals), block):
        blk = vals[start:start + block]
        m = max(abs(v) for v in blk)
        s = np.float32(float(m / qmax))        # near; then move to the smallest float32 >= m/qmax
        while Fraction(float(s)) * qmax < m:
            s = np.nextafter(s, np.float32(np.inf))
        while s > 0 and Fraction(float(np.nextafter(s, np.float32(0)))) * qmax >= m:
            s = np.nextafter(s, np.float32(0))
        scales.append(s)
        for v in blk:
            q = 0 if s == 0 else round(v / Fraction(float(s)))   # Fraction round: half to even
            codes.append(max(-qmax, min(qmax, q)))
    return np.array(codes, dtype=np.int8), np.array(scales, dtype=np.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n", SIZES)
def test_error_at_most_half_a_step(bits, block, n):
    x = data(n, seed=n + block)
    qt = quantize(x, bits, block)
    s = element_scales(qt)
    err64 = np.abs(x.astype(np.float64) - dequantize(qt, np.float64))
    assert np.all(err64 <= s / 2)                                   # exact in float64
    err32 = np.abs(x.astype(np.float64) - dequantize(qt).astype(np.float64))
    assert np.all(err32 <= s / 2 + np.abs(x) * 2.0 ** -23)          # + one float32 rounding
    assert np.all(np.abs(codes_int8(qt)) <= QMAX[bits])
    assert qt.scales.shape == (-(-n // block),) and qt.scales.dtype == np.float32


@pytest.mark.parametrize("bits", [8, 4])
def test_the_block_max_maps_to_qmax_and_ties_round_to_even(bits):
    qmax = QMAX[bits]
    x = np.array([qmax, 0.5, 1.5, 2.5, -2.5, -qmax], dtype=np.float32)   # scale exactly 1
    qt = quantize(x, bits, block=6)
    assert qt.scales.tolist() == [1.0]
    assert codes_int8(qt).tolist() == [qmax, 0, 2, 2, -2, -qmax]


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_blocks_give_zero_scale_and_exact_zeros(bits):
    x = np.concatenate([np.ones(4), np.zeros(8), -np.ones(3)]).astype(np.float32)
    qt = quantize(x, bits, block=4)
    assert qt.scales[1] == 0 and qt.scales[2] == 0 and qt.scales[0] > 0
    y = dequantize(qt)
    assert not np.isnan(y).any()
    assert np.array_equal(y[4:12], np.zeros(8, np.float32))
    assert np.allclose(y[:4], 1.0, rtol=2.0 ** -22, atol=0)        # the max: within an ulp
    assert np.allclose(y[12:], -1.0, rtol=2.0 ** -22, atol=0)
    z = dequantize(quantize(np.zeros(300, np.float64), bits))
    assert np.array_equal(z, np.zeros(300)) and not np.signbit(z).any()


@pytest.mark.parametrize("bad, count, nan, first", [
    ([1.0, np.nan, 2.0], 1, 1, 1),
    ([0.0, 1.0, np.inf, -np.inf, np.nan], 3, 1, 2),
])
def test_nan_and_inf_are_refused_naming_count_and_index(bad, count, nan, first):
    with pytest.raises(ValueError, match=rf"^quantize: x has {count} non-finite values \({nan} NaN, "
                                         rf"{count - nan} inf\), first at flat index {first}$"):
        quantize(np.array(bad, dtype=np.float32))


def test_a_scale_beyond_float32_is_refused():
    with pytest.raises(ValueError, match="overflows a float32 scale"):
        quantize(np.array([1e300, 1.0]))


@pytest.mark.parametrize("n", [1, 2, 7, 8, 1001])
def test_int4_packs_two_per_byte_low_nibble_first(n):
    rng = np.random.default_rng(n)
    q = rng.integers(-8, 8, size=n).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (-(-n // 2),)
    assert np.array_equal(unpack_int4(packed, n), q)
    lo = packed & 0xF
    assert np.array_equal(((lo.astype(int) ^ 8) - 8)[: (n + 1) // 2], q[0::2])
    assert pack_int4(np.array([1, -1], np.int8)).tolist() == [0xF1]
    assert pack_int4(np.array([-7, 3, 5], np.int8)).tolist() == [0x39, 0x05]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n", SIZES)
def test_wire_bytes_is_the_buffer_size_and_the_buffer_round_trips(bits, block, n):
    x = data(n, seed=7).reshape(-1)
    qt = quantize(x, bits, block)
    buf = to_bytes(qt)
    nb = -(-n // block)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert buf.size == wire_bytes(n, bits, block) == (n if bits == 8 else -(-n // 2)) + 4 * nb
    back = from_bytes(buf, (n,), bits, block)
    assert np.array_equal(back.scales, qt.scales) and np.array_equal(codes_int8(back), codes_int8(qt))
    assert np.array_equal(dequantize(back), dequantize(qt))


def test_wire_bytes_per_element():
    n = 1 << 20
    assert wire_bytes(n, 8, 256) == n + 4 * n // 256
    assert wire_bytes(n, 4, 256) == n // 2 + 4 * n // 256
    assert wire_bytes(0, 4, 256) == 0 and wire_bytes(1, 4, 256) == 5 and wire_bytes(1, 8, 1) == 5


@pytest.mark.parametrize("src", [np.float16, BF16, np.float32, np.float64])
@pytest.mark.parametrize("dst", [None, np.float16, BF16, np.float32, np.float64])
@pytest.mark.parametrize("bits", [8, 4])
def test_dtypes_and_shapes(src, dst, bits):
    x = data(3 * 5 * 7, dtype=np.float32, seed=3).reshape(3, 5, 7).astype(src)
    qt = quantize(x, bits, block=16)
    again = quantize(x.copy(), bits, block=16)
    assert np.array_equal(to_bytes(qt), to_bytes(again))                      # deterministic
    y = dequantize(qt, dst)
    want = np.dtype(src if dst is None else dst)
    assert y.dtype == want and y.shape == (3, 5, 7)
    x64 = x.astype(np.float64).reshape(-1)
    ulp = np.abs(x64) * {2: 2.0 ** -7 if want == BF16 else 2.0 ** -10, 4: 2.0 ** -23, 8: 0.0}[want.itemsize]
    assert np.all(np.abs(x64 - y.astype(np.float64).reshape(-1)) <= element_scales(qt) / 2 + ulp + 1e-30)


def test_out_is_written_in_place():
    x = data(100)
    qt = quantize(x, 8, 32)
    out = np.full((10, 10), np.nan, np.float64)
    assert dequantize(qt, out=out) is out
    assert np.array_equal(out.reshape(-1), dequantize(qt, np.float64))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
@pytest.mark.parametrize("block", [1, 2, 5, 16])
def test_codes_and_scales_equal_the_exact_reference(bits, dtype, block):
    for seed, n in enumerate([1, 2, 17, 40, 61]):
        x = data(n, dtype=np.float32, seed=seed).astype(dtype)
        qt = quantize(x, bits, block)
        ref_codes, ref_scales = ref_quantize(x, bits, block)
        assert np.array_equal(qt.scales, ref_scales)
        assert np.array_equal(codes_int8(qt), ref_codes)
    half = np.array([QMAX[bits], 0.5, 1.5, -0.5, -3.5], dtype=dtype)   # exact ties
    assert np.array_equal(codes_int8(quantize(half, bits, 5)), ref_quantize(half, bits, 5)[0])


@pytest.mark.parametrize("call, msg", [
    (lambda: quantize(np.ones(4, np.float32), bits=2), "^quantize: bits must be 4 or 8, got 2$"),
    (lambda: quantize(np.ones(4, np.float32), bits=True), "^quantize: bits must be 4 or 8"),
    (lambda: quantize(np.ones(4, np.float32), block=0), "^quantize: block must be an int >= 1, got 0$"),
    (lambda: quantize(np.ones(4, np.float32), block=2.0), "^quantize: block must be an int >= 1"),
    (lambda: quantize(np.ones(4, np.int32)), "^quantize: x must be a float16, .* got int32$"),
    (lambda: quantize([1.0, 2.0]), "^quantize: x must be a float16, .* got list$"),
    (lambda: dequantize(quantize(np.ones(4, np.float32)), out=np.zeros(5, np.float32)),
     "^dequantize: out has 5 elements, the quantized array 4$"),
    (lambda: dequantize(quantize(np.ones(4, np.float32)), np.float32, out=np.zeros(4)),
     "^dequantize: dtype float32 differs from out's dtype float64$"),
    (lambda: dequantize(quantize(np.ones(4, np.float32)), np.int8), "^dequantize: dtype must be"),
    (lambda: wire_bytes(-1), "^wire_bytes: n must be an int >= 0"),
    (lambda: wire_bytes(4, bits=16), "^wire_bytes: bits must be 4 or 8"),
    (lambda: from_bytes(np.zeros(7, np.uint8), 4), "^from_bytes: buf has 7 bytes, .* need 8$"),
    (lambda: from_bytes(np.zeros(8, np.int8), 4), "^from_bytes: buf must be a 1-D uint8 array"),
])
def test_bad_arguments_are_one_line_value_errors(call, msg):
    with pytest.raises(ValueError, match=msg) as e:
        call()
    assert "\n" not in str(e.value)


def test_quantized_holds_its_metadata():
    qt = quantize(np.ones((2, 3), np.float16), 4, 4)
    assert isinstance(qt, Quantized) and qt.n == 6 and qt.shape == (2, 3)
    assert qt.dtype == np.float16 and qt.bits == 4 and qt.block == 4 and qt.codes.dtype == np.uint8


def test_gpu_matches_cpu_bit_for_bit():
    from engine import backend
    if backend.emulated():                      # ENGINE_DEVICE=gpu-emulated: "the GPU" is the device double
        cupy = backend.use_double()
    else:
        cupy = pytest.importorskip("cupy")
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                pytest.skip("no GPU")
        except cupy.cuda.runtime.CUDARuntimeError:
            pytest.skip("no GPU")
    from engine.backend import device, set_device
    before = device()
    set_device("gpu")
    try:
        _gpu_matches_cpu(cupy)
    finally:
        set_device(before)


def _gpu_matches_cpu(cupy):
    for bits in (8, 4):
        x = data(1001, seed=bits)
        qt, qg = quantize(x, bits, 64), quantize(cupy.asarray(x), bits, 64)
        assert np.array_equal(cupy.asnumpy(to_bytes(qg)), to_bytes(qt))
        assert np.array_equal(cupy.asnumpy(dequantize(qg)), dequantize(qt))
        back = from_bytes(to_bytes(qg), 1001, bits, 64)
        assert np.array_equal(cupy.asnumpy(dequantize(back)), dequantize(qt))
