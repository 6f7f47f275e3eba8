"""The 1-byte ZO scalar codec: error bound in range, floor/ceiling rules, a pinned table."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyphae.training import _zo_codec as codec


def test_relative_error_is_at_most_6_5_percent_over_the_whole_range() -> None:
    mags = np.geomspace(codec.FLOOR, codec.CEILING, 200_001)
    for sign in (1.0, -1.0):
        values = sign * mags
        decoded = np.array(codec.decode(codec.encode(values)))
        rel = np.abs(decoded - values) / np.abs(values)
        assert rel.max() <= 0.065, rel.max()
        assert np.all(np.sign(decoded) == sign)
    assert codec.MAX_RELATIVE_ERROR <= 0.065


@given(st.floats(min_value=codec.FLOOR, max_value=codec.CEILING), st.booleans())
def test_any_in_range_value_round_trips_within_the_bound(mag: float, negative: bool) -> None:
    g = -mag if negative else mag
    ghat = codec.decode_byte(codec.encode_byte(g))
    assert abs(ghat - g) <= 0.065 * abs(g)
    assert math.copysign(1.0, ghat) == math.copysign(1.0, g)


def test_every_byte_decodes_and_re_encodes_to_itself() -> None:
    for b in range(256):
        assert codec.encode_byte(codec.decode_byte(b)) == b


def test_values_below_the_floor_are_sent_as_the_floor_with_their_sign() -> None:
    assert codec.decode_byte(codec.encode_byte(1e-9)) == codec.FLOOR
    assert codec.decode_byte(codec.encode_byte(-1e-9)) == -codec.FLOOR
    assert codec.decode_byte(codec.encode_byte(0.0)) == codec.FLOOR
    assert codec.decode_byte(codec.encode_byte(-0.0)) == -codec.FLOOR


def test_values_above_the_ceiling_and_infinities_are_sent_as_the_ceiling() -> None:
    assert codec.decode_byte(codec.encode_byte(1e9)) == codec.CEILING
    assert codec.decode_byte(codec.encode_byte(-math.inf)) == -codec.CEILING


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        codec.encode_byte(math.nan)
    with pytest.raises(ValueError, match="0..255"):
        codec.decode_byte(256)


def test_range_and_grid_are_the_specified_ones() -> None:
    assert codec.FLOOR == pytest.approx(math.exp(-8), rel=1e-7)
    assert codec.CEILING == pytest.approx(math.exp(63 / 8), rel=1e-7)
    assert codec.decode_byte(64) == 1.0 and codec.decode_byte(64 | 0x80) == -1.0
    assert len(codec.encode([0.5, -2.0, 7.0])) == 3


def test_decode_table_is_pinned_so_every_platform_decodes_the_same_bits() -> None:
    assert codec.table_digest() == codec.TABLE_SHA256
