"""Wire codecs: exact sizes from the spec alone, round trips within the documented bounds, and the
format of hyphae.kernels.quant (blockwise absmax, round-half-even, packed nibbles)."""

import numpy as np
import pytest

from hyphae.protocol.tensor.codecs import Codec, bf16_to_f32, f32_to_bf16
from hyphae.protocol.tensor.spec import Tensor, TensorSpec

RNG = np.random.default_rng(0)


def _values(n: int) -> np.ndarray:
    x = RNG.standard_normal(n).astype(np.float32)
    x[::97] *= 50  # outliers
    return x


@pytest.mark.parametrize("name", ["raw", "fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 4097])
def test_wire_size_is_exact_and_round_trip_keeps_shape_and_dtype(name: str, n: int) -> None:
    codec = Codec.named(name)
    x = _values(n).reshape(n, 1)
    t = Tensor.from_numpy("x", x)
    wire = codec.encode(t)
    assert len(wire) == codec.wire_nbytes(t.spec)
    back = Tensor(t.spec, codec.decode(t.spec, wire)).numpy()
    assert back.shape == x.shape and back.dtype == x.dtype
    if name == "raw":
        assert np.array_equal(back, x)


def test_quantization_error_is_within_half_a_step() -> None:
    for name, qmax in (("int8", 127), ("int4", 7)):
        codec = Codec.named(name)
        x = _values(10_000)
        back = np.frombuffer(codec.decode(Tensor.from_numpy("x", x).spec, codec.encode(Tensor.from_numpy("x", x))),
                             np.float32)
        bs = codec.block_size
        for b in range(0, x.size, bs):
            block = x[b:b + bs]
            step = np.abs(block).max() / np.float32(qmax)
            assert np.all(np.abs(block - back[b:b + bs]) <= step / 2 + 2**-21 * np.abs(block).max() + 1e-30)


def test_int8_format_matches_the_kernels_definition() -> None:
    x = np.array([1.0, -2.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0], np.float32)
    codec = Codec(name="int8", block_size=4)
    wire = np.frombuffer(codec.encode(Tensor.from_numpy("x", x)), np.uint8)
    scales = wire[:8].view("<f4")
    codes = wire[8:].view(np.int8)
    assert scales[0] == np.float32(2.0) / np.float32(127) and scales[1] == 0
    assert codes.tolist() == [64, -127, 32, 16, 0, 0, 0, 0]  # 63.5 rounds half to even; zero scale -> 0


def test_int4_packs_two_codes_per_byte_low_nibble_first_and_pads_with_code_8() -> None:
    x = np.array([7.0, -7.0, 1.0], np.float32)
    codec = Codec(name="int4", block_size=4)
    wire = np.frombuffer(codec.encode(Tensor.from_numpy("x", x)), np.uint8)
    packed = wire[4:]
    assert packed.tolist() == [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]


def test_bf16_rounds_to_nearest_even_and_keeps_nan() -> None:
    x = np.array([1.0, 1.00390625, 1.01171875, np.nan, np.inf, -0.0], np.float32)
    bits = f32_to_bf16(x)
    assert bits[0] == 0x3F80 and bits[1] == 0x3F80 and bits[2] == 0x3F82  # ties to even
    assert np.isnan(bf16_to_f32(bits)[3]) and bf16_to_f32(bits)[4] == np.inf


def test_non_float_tensors_always_travel_raw() -> None:
    t = Tensor.from_numpy("ids", np.arange(10, dtype=np.int64))
    codec = Codec.named("int4")
    assert not codec.applies_to(t.spec) and codec.encode(t) is t.data


def test_bfloat16_tensor_with_int8_codec_round_trips_close() -> None:
    x = _values(1000)
    t = Tensor.from_numpy("b", f32_to_bf16(x), dtype="bfloat16")
    codec = Codec.named("int8")
    back = bf16_to_f32(np.frombuffer(codec.decode(t.spec, codec.encode(t)), np.uint16))
    assert np.max(np.abs(back - bf16_to_f32(f32_to_bf16(x)))) < np.abs(x).max() / 100


@pytest.mark.parametrize("bad", [dict(name="zip"), dict(name="int4", block_size=3), dict(name="int8", block_size=0),
                                 dict(name="raw", block_size=4)])
def test_bad_codec_is_a_clear_error(bad: dict) -> None:
    with pytest.raises(ValueError, match="codec|block_size"):
        Codec(**bad)


def test_spec_checks_and_from_buffer_size() -> None:
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("x", "complex64", (1,))
    with pytest.raises(ValueError, match="dimension"):
        TensorSpec("x", "float32", (-1,))
    with pytest.raises(ValueError, match="needs 8"):
        Tensor.from_buffer(TensorSpec("x", "float32", (2,)), b"\x00" * 7)
    with pytest.raises(ValueError, match="contiguous"):
        Tensor.from_numpy("x", np.zeros((4, 4), np.float32)[:, 1])


@pytest.mark.parametrize(("name", "bits"), [("int8", 8), ("int4", 4)])
def test_numpy_codecs_give_the_same_bytes_as_the_kernels_reference(name: str, bits: int) -> None:
    torch = pytest.importorskip("torch")
    from hyphae.kernels.quant import quantize_ref

    x = _values(5000)
    q = quantize_ref(torch.from_numpy(x), bits=bits)
    wire = np.frombuffer(Codec.named(name).encode(Tensor.from_numpy("x", x)), np.uint8)
    nb = q.scales.numel()
    assert np.array_equal(wire[:4 * nb].view("<f4"), q.scales.numpy())
    assert np.array_equal(wire[4 * nb:], q.codes.numpy().view(np.uint8))
