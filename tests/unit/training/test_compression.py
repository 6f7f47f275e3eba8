"""SparseLoCo compression: codec round trip, the decoder's checks, error feedback conserves mass."""

from __future__ import annotations

import pytest
import torch

from hyphae.kernels import SparseLayout, sparse_values
from hyphae.training.compression import (
    CompressedPayloadError,
    Compressor,
    accumulate,
    check_compression_options,
    decode,
    encode,
    kept_per_chunk,
)

SHAPES = {"a": torch.Size([30, 20]), "b": torch.Size([77]), "c": torch.Size([3, 3, 3])}  # 704 elements


def compressor(compression: str = "topk-int8", *, density: float = 0.05, chunk_size: int = 128,
               error_decay: float = 1.0) -> Compressor:
    return Compressor(SHAPES, compression=compression, density=density, chunk_size=chunk_size,
                      error_decay=error_decay)


def tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


@pytest.mark.parametrize("compression", ["topk-int8", "topk-2bit"])
def test_encode_decode_round_trips(compression: str) -> None:
    comp = compressor(compression)
    sp = comp.compress(tensors(0))
    back = decode(encode(sp), comp.layout)
    for field in ("indices", "codes", "scales"):
        assert torch.equal(getattr(back, field), getattr(sp, field))
    assert torch.equal(comp.dense(back), comp.dense(sp))
    assert comp.layout.kept == 6 * kept_per_chunk(0.05, 128)  # 6 chunks (the last of 64) keep 6 each


def test_the_layout_gives_the_advertised_byte_savings() -> None:
    lay = SparseLayout(1 << 20, 4096, kept_per_chunk(0.01, 4096), 8)
    assert 4 * lay.numel / lay.payload_bytes() > 120
    assert 4 * lay.numel / lay._replace(bits=2).payload_bytes() > 160


@pytest.mark.parametrize("error_decay", [1.0, 0.9])
def test_error_feedback_conserves_mass(error_decay: float) -> None:
    """Every round: sent + residual = β·(previous residual) + Δ; over rounds nothing is lost."""
    comp = compressor(error_decay=error_decay)
    owed = torch.zeros(comp.layout.numel, dtype=torch.float64)
    sent_total = torch.zeros_like(owed)
    for r in range(12):
        delta = comp.flatten(tensors(r, scale=1e-2))
        before = comp.error.double().clone()
        sent = comp.dense(comp.compress(comp.unflatten(delta))).double()
        assert torch.allclose(sent + comp.error.double(), error_decay * before + delta.double(), atol=1e-8, rtol=0)
        owed = error_decay * owed + delta.double()
        sent_total = error_decay * sent_total + sent
    assert torch.allclose(sent_total + comp.error.double(), owed, atol=1e-6, rtol=0)
    assert comp.error.abs().max() < owed.abs().max()  # the residual stays bounded


def test_flatten_unflatten_keep_names_and_shapes() -> None:
    comp = compressor()
    t = tensors(3)
    back = comp.unflatten(comp.flatten(t))
    assert list(back) == list(SHAPES) and all(torch.equal(back[n], t[n]) for n in t)


def _valid(compression: str = "topk-int8") -> tuple[dict[str, torch.Tensor], SparseLayout]:
    comp = compressor(compression)
    return {k: v.clone() for k, v in encode(comp.compress(tensors(1))).items()}, comp.layout


def _bad(change) -> tuple[dict[str, torch.Tensor], SparseLayout]:
    payload, lay = _valid()
    change(payload)
    return payload, lay


def _set(name: str, pos: int, value: float):
    def change(p: dict[str, torch.Tensor]) -> None:
        p[name][pos] = value
    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.pop("scales"), "expected tensors"),
        (lambda p: p.update(extra=torch.zeros(1)), "expected tensors"),
        (lambda p: p.update(indices=p["indices"].to(torch.int32)), "indices must be torch.int16"),
        (lambda p: p.update(codes=p["codes"][:-1]), "codes must be torch.int8"),
        (lambda p: p.update(scales=p["scales"].view(1, -1)), "scales must be torch.float32"),
        (_set("indices", 0, -1), "outside its chunk"),
        (_set("indices", 0, 128), "outside its chunk"),
        (_set("indices", -1, 704 - 5 * 128), "outside its chunk"),  # past the short last chunk
        (_set("indices", 1, 0), "increase strictly"),
        (_set("codes", 0, -128), "off the"),
        (_set("scales", 0, float("nan")), "finite"),
        (_set("scales", 0, float("inf")), "finite"),
        (_set("scales", 0, -1.0), "finite and >= 0"),
    ],
)
def test_decoder_refuses_what_does_not_fit_the_layout(change, message: str) -> None:
    payload, lay = _bad(change)
    with pytest.raises(CompressedPayloadError, match=message):
        decode(payload, lay)


def test_decoder_allows_a_new_chunk_to_restart_its_offsets() -> None:
    payload, lay = _valid()
    k = lay.k
    payload["indices"][:k] = torch.arange(128 - k, 128, dtype=torch.int16)  # chunk 0 ends high
    payload["indices"][k : 2 * k] = torch.arange(k, dtype=torch.int16)  # chunk 1 starts at 0
    decode(payload, lay)


@pytest.mark.parametrize(("compression", "largest_ok"), [("topk-int8", 3.4e38 / 127), ("topk-2bit", 3.4e38 / 2)])
def test_a_scale_whose_largest_value_overflows_is_refused(compression: str, largest_ok: float) -> None:
    payload, lay = _valid(compression)
    payload["scales"].fill_(largest_ok)
    index, values = sparse_values(decode(payload, lay))
    assert index.min() >= 0 and index.max() < lay.numel and torch.isfinite(values).all()
    payload["scales"][0] = largest_ok * 1.01  # times the largest code: past fp32's max
    with pytest.raises(CompressedPayloadError, match="finite"):
        decode(payload, lay)


def test_accumulate_adds_in_row_order_and_divides_by_members_or_senders() -> None:
    a = (torch.tensor([0, 2]), torch.tensor([1.0, 4.0]))
    b = (torch.tensor([2, 3]), torch.tensor([2.0, 8.0]))
    assert accumulate([a, b], 5, average="members").tolist() == [0.5, 0.0, 3.0, 4.0, 0.0]
    assert accumulate([a, b], 5, average="senders").tolist() == [1.0, 0.0, 3.0, 8.0, 0.0]
    with pytest.raises(ValueError, match="average must be one of"):
        accumulate([a], 5, average="sum")


@pytest.mark.parametrize(
    ("args", "message"),
    [(("zip", 0.01, 4096, 1.0), "compression must be one of"), (("topk-int8", 0.0, 4096, 1.0), "density"),
     (("topk-int8", 1.5, 4096, 1.0), "density"), (("topk-int8", 0.01, 0, 1.0), "chunk_size"),
     (("topk-int8", 0.01, 1 << 16, 1.0), "chunk_size"), (("topk-int8", 0.01, 4096, 0.0), "error_decay"),
     (("topk-int8", 0.01, 4096, 1.1), "error_decay")],
)
def test_options_are_checked_with_a_message_that_names_them(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_compression_options(*args)
