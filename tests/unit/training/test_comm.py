"""The Comm contract's pure parts: the tensor blob format, digests, plain run-state values."""

import pytest
import torch

from hyphae.training.comm import Comm, blob_digest, check_plain
from hyphae.training._tensor_codec import decode_tensors, encode_tensors


def test_tensor_blob_round_trips_every_dtype_and_shape() -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 4).t(),
    }
    out = decode_tensors(encode_tensors(tensors))
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_same_tensors_always_give_the_same_bytes_and_digest() -> None:
    a = {"b": torch.ones(3), "a": torch.zeros(2)}
    b = {"a": torch.zeros(2), "b": torch.ones(3)}
    assert encode_tensors(a) == encode_tensors(b)
    assert blob_digest(encode_tensors(a)) == blob_digest(encode_tensors(b))


def test_decoded_tensors_do_not_share_memory_with_the_blob() -> None:
    blob = bytearray(encode_tensors({"x": torch.ones(4)}))
    out = decode_tensors(bytes(blob))
    out["x"].add_(1)
    assert torch.equal(decode_tensors(bytes(blob))["x"], torch.ones(4))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"PK\x03\x04rest", "bad magic"),
        (b"HYT1\xff\xff\xff\x00{}", "header length"),
        (b"HYT1\x02\x00\x00\x00{]", "not valid JSON"),
    ],
)
def test_malformed_blobs_are_refused_before_any_data_is_read(blob: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_tensors(blob)


def test_truncated_blob_is_reported_as_corrupt() -> None:
    blob = encode_tensors({"x": torch.ones(100)})
    with pytest.raises(ValueError, match="corrupt"):
        decode_tensors(blob[:-4])


def test_plain_values_pass_and_objects_are_refused_with_their_path() -> None:
    check_plain({"a": [1, 2.5, "s", b"b", None, True, {"n": []}]})
    with pytest.raises(ValueError, match=r"value\['a'\]\[1\] is a Tensor"):
        check_plain({"a": [1, torch.ones(1)]})
    with pytest.raises(ValueError, match="non-string key"):
        check_plain({1: "x"})


def test_comm_is_abstract() -> None:
    with pytest.raises(TypeError):
        Comm()  # type: ignore[abstract]
