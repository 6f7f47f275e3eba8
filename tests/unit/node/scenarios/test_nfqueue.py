"""The link emulator's netlink encoding and its shape checks (no kernel needed)."""

from __future__ import annotations

import socket
import struct

import pytest

from hyphae.node.scenarios._nfqueue import (NFNL_SUBSYS_QUEUE, NFQA_VERDICT_HDR, NFQNL_MSG_VERDICT_BATCH, LinkShape,
                                            _attr, _attrs, _message)


def test_attributes_are_padded_to_four_bytes_and_parse_back() -> None:
    encoded = _attr(2, b"\x01\x02\x03\x04\x05") + _attr(7, b"\xaa")
    assert len(encoded) == 12 + 8
    assert _attrs(encoded, 0) == {2: b"\x01\x02\x03\x04\x05", 7: b"\xaa"}


def test_verdict_batch_message_layout() -> None:
    msg = _message(NFQNL_MSG_VERDICT_BATCH, 7042, _attr(NFQA_VERDICT_HDR, struct.pack("!II", 1, 99)))
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", msg, 0)
    assert length == len(msg) == 16 + 4 + 12
    assert kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH and flags == 1
    family, version, queue = struct.unpack_from("!BBH", msg, 16)
    assert (family, version, queue) == (socket.AF_UNSPEC, 0, 7042)  # res_id is big-endian
    assert _attrs(msg, 20)[NFQA_VERDICT_HDR] == struct.pack("!II", 1, 99)


@pytest.mark.parametrize("kwargs", [{"delay_ms": -1}, {"loss": 1.0}, {"rate_mbit": -5}])
def test_link_shape_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be"):
        LinkShape(**kwargs)
