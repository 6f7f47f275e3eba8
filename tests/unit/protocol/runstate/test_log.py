"""The envelope log layer: merge is commutative, associative and idempotent, and the order,
grouping and duplication of deliveries never change the result (hypothesis)."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.protocol.identity import Identity
from hyphae.protocol.runstate.doc import new_section_doc
from hyphae.protocol.runstate.log import Outcome, Replica
from hyphae.protocol.runstate.rules import RuleContext, default_rules
from hyphae.protocol.runstate.state import RunState, RunStateConfig
from hyphae.protocol.runstate.wire import Envelope, sign_envelope

from .conftest import FakeClock

# Small compaction thresholds, so the universe holds several epochs per stream.
RULES = {name: dataclasses.replace(rule, compact_after_deltas=3) for name, rule in default_rules().items()}
CTX = RuleContext("run-p", owner=None)
AUTHORS = [Identity.generate() for _ in range(3)]


def _universe() -> tuple[list[Envelope], dict]:
    """Envelopes from 3 authors writing 2 sections through real writers (epochs included), and
    the fingerprint of everything they wrote."""
    rng = random.Random(7)
    clock = FakeClock()
    out: list[Envelope] = []
    truth: dict = {}
    for ident in AUTHORS:
        state = RunState("run-p", ident, config=RunStateConfig(rules=RULES), clock=clock)
        for i in range(10):
            clock.advance(0.01)
            if rng.random() < 0.5:
                env = state.write("member", {"last_seen_ms": i, "addrs": [f"/ip4/10.0.0.{i}/tcp/1"]})
            else:
                env = state.write("progress", {"step": i, f"k{rng.randrange(4)}": rng.random()},
                                  delete=[f"k{rng.randrange(4)}"])
            if env is not None:
                out.append(env)
        truth.update(state.replica.fingerprint())
    return out, truth


UNIVERSE, TRUTH = _universe()
N = len(UNIVERSE)


def feed(envelopes) -> Replica:
    replica = Replica("run-p", RULES)
    for env in envelopes:
        replica.offer(env, CTX)
    return replica


def merge(a: Replica, b: Replica) -> Replica:
    return feed([*a.envelopes(), *b.envelopes()])


def state_of(replica: Replica) -> tuple:
    held = frozenset(e.digest for e in replica.envelopes())
    values = {key: s.value for key, s in replica.streams.items()}
    return replica.fingerprint(), held, sorted(values.items())


subsets = st.lists(st.integers(0, N - 1), max_size=2 * N)


def pick(indices: list[int]) -> Replica:
    return feed(UNIVERSE[i] for i in indices)


def test_universe_has_several_epochs_per_stream() -> None:
    epochs: dict = {}
    for e in UNIVERSE:
        epochs.setdefault(e.key, set()).add(e.epoch)
    assert len(epochs) == 6 and max(map(len, epochs.values())) >= 2


def test_every_envelope_in_any_order_reproduces_what_the_authors_hold() -> None:
    for seed in range(5):
        shuffled = UNIVERSE[:]
        random.Random(seed).shuffle(shuffled)
        assert feed(shuffled).fingerprint() == TRUTH


@settings(max_examples=60, deadline=None)
@given(subsets, subsets)
def test_merge_is_commutative(a: list[int], b: list[int]) -> None:
    ra, rb = pick(a), pick(b)
    assert state_of(merge(ra, rb)) == state_of(merge(rb, ra))


@settings(max_examples=60, deadline=None)
@given(subsets, subsets, subsets)
def test_merge_is_associative(a: list[int], b: list[int], c: list[int]) -> None:
    ra, rb, rc = pick(a), pick(b), pick(c)
    assert state_of(merge(merge(ra, rb), rc)) == state_of(merge(ra, merge(rb, rc)))


@settings(max_examples=60, deadline=None)
@given(subsets)
def test_merge_is_idempotent(a: list[int]) -> None:
    ra = pick(a)
    assert state_of(merge(ra, ra)) == state_of(ra)
    assert state_of(feed([*ra.envelopes(), *ra.envelopes()])) == state_of(ra)


@settings(max_examples=60, deadline=None)
@given(subsets, st.randoms(use_true_random=False))
def test_delivery_order_and_duplicates_do_not_matter(a: list[int], rng: random.Random) -> None:
    shuffled = [UNIVERSE[i] for i in a] * 2
    rng.shuffle(shuffled)
    assert state_of(feed(shuffled)) == state_of(pick(sorted(set(a))))


def test_a_fork_is_recorded_and_the_first_envelope_kept() -> None:
    ident = AUTHORS[0]
    first = next(e for e in UNIVERSE if e.author == ident.peer_id and e.seq == 0)
    other = sign_envelope(ident, first.run, first.section, first.epoch, 0,
                          new_section_doc({"step": -1}).get_update())
    replica = feed([first])
    offer = replica.offer(other, CTX)
    assert offer.outcome is Outcome.REJECTED and "two different envelopes" in offer.reason
    assert replica.equivocators == {ident.peer_id}
    assert replica.streams[first.key].envelopes == [first]


def test_out_of_order_deltas_wait_and_pending_is_bounded() -> None:
    ident = AUTHORS[1]
    chain = sorted((e for e in UNIVERSE if e.author == ident.peer_id and e.section == "member"),
                   key=lambda e: (e.epoch, e.seq))
    epoch0 = [e for e in chain if e.epoch == chain[0].epoch]
    assert len(epoch0) >= 3
    replica = Replica("run-p", RULES, max_pending_per_stream=1)
    assert replica.offer(epoch0[2], CTX).outcome is Outcome.BUFFERED
    assert replica.offer(epoch0[2], CTX).outcome is Outcome.DUPLICATE
    assert replica.offer(epoch0[1], CTX).outcome is Outcome.DROPPED  # per-stream buffer of 1 is full
    assert replica.offer(epoch0[0], CTX).applied == (epoch0[0],)
    offer = replica.offer(epoch0[1], CTX)
    assert offer.applied == (epoch0[1], epoch0[2])  # the waiting delta follows its gap


def test_forged_signature_is_rejected_and_not_kept() -> None:
    env = UNIVERSE[0]
    forged = dataclasses.replace(env, sig=bytes(64))
    replica = Replica("run-p", RULES)
    assert replica.offer(forged, CTX).outcome is Outcome.REJECTED
    assert list(replica.envelopes()) == []
