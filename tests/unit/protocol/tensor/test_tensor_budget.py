"""Budgets sized from the model (never below the configured floor), and a fetch's progress:
bytes, a rate over the last seconds, an ETA, and a quiet rule for log lines."""

import pytest

from hyphae.protocol.tensor import TensorConfig, TransferBudget, budget_for_state
from hyphae.protocol.tensor._progress import FetchProgress

GB = 10**9


def test_a_1b_model_gets_budgets_its_state_fits_in_and_a_small_one_keeps_the_defaults() -> None:
    floor = TransferBudget.of(TensorConfig())
    assert (floor.max_unclaimed_bytes, floor.max_unclaimed_bytes_per_peer) == (2 << 30, 512 << 20)
    state = 4 * GB  # 1B fp32 parameters
    big = budget_for_state(state, floor)
    assert big.state_bytes == state
    assert big.max_transfer_bytes >= 1.25 * state > floor.max_transfer_bytes  # a whole-model exchange
    assert big.max_unclaimed_bytes_per_peer >= 1.25 * state  # one peer's early full-state transfer
    assert big.max_unclaimed_bytes >= 2 * big.max_unclaimed_bytes_per_peer  # two such peers at once
    assert big.max_blob_bytes >= 4 * 1.25 * state  # weights, outer momentum, two optimizer moments
    small = budget_for_state(40_000_000, floor)  # 10M parameters
    assert (small.max_transfer_bytes, small.max_unclaimed_bytes, small.max_unclaimed_bytes_per_peer,
            small.max_blob_bytes) == (floor.max_transfer_bytes, floor.max_unclaimed_bytes,
                                      floor.max_unclaimed_bytes_per_peer, floor.max_blob_bytes)
    assert "4.00 GB" in big.describe() and "configured defaults" in floor.describe()


@pytest.mark.parametrize("kwargs", [{"state_bytes": -1}, {"state_bytes": 10, "headroom": 0.5},
                                    {"state_bytes": 10, "early_peers": 0}, {"state_bytes": True}])
def test_bad_sizing_arguments_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        budget_for_state(floor=TransferBudget.of(TensorConfig()), **kwargs)


def test_a_budget_whose_per_peer_share_exceeds_the_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="per_peer"):
        TransferBudget(max_transfer_bytes=1, max_unclaimed_bytes=10, max_unclaimed_bytes_per_peer=11, max_blob_bytes=1)


def test_rate_is_over_the_last_seconds_and_eta_follows_it() -> None:
    p = FetchProgress(2000, 100, now=0.0, window_s=5.0)  # 100 bytes already here (resumed)
    assert p.rate_bps(0.0) == 0.0 and p.eta_s(0.0) is None
    for t in range(1, 11):  # 50 B/s for 10 s
        p.add(50, float(t))
    assert p.rate_bps(10.0) == pytest.approx(50.0)
    assert p.eta_s(10.0) == pytest.approx((2000 - 600) / 50)
    for t in range(11, 14):  # a provider joins: 150 B/s
        p.add(150, float(t))
    assert p.rate_bps(13.0) == pytest.approx((3 * 150 + 2 * 50) / 5)  # the window, not the average since t=0
    assert p.describe(13.0) == "1.05 kB of 2.00 kB (52%) at 110 B/s, ETA 9 s"
    assert p.summary(13.0) == "950 B in 13.0 s (73 B/s, 100 B already here)"


def test_progress_lines_are_quiet_every_5_s_and_10_percent_or_after_a_stall() -> None:
    p = FetchProgress(1000, 0, now=0.0, line_every_s=5.0, line_step=0.1, stall_s=60.0)
    lines = []
    for t in range(1, 41):  # 10 B/s: 1 % per second
        p.add(10, float(t))
        if p.line_due(float(t)):
            lines.append(t)
    assert lines == [10, 20, 30, 40]  # 10 % steps; the 5 s alone would say every 5 s
    fast = FetchProgress(1000, 0, now=0.0)
    due = []
    for tenth in range(1, 40):  # 25 bytes a tenth of a second: done in 4 s
        fast.add(25, tenth / 10)
        if fast.line_due(tenth / 10):
            due.append(tenth)
    assert due == []  # a fetch done within 5 s logs no progress line (only its closing one)
    stalled = FetchProgress(1000, 0, now=0.0)
    stalled.add(10, 1.0)
    assert not stalled.line_due(59.0) and stalled.line_due(60.0)  # stuck at 1 %: said once a minute
