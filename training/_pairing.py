"""Coordination-free grouping: every member computes the same random groups on its own.

NoLoCo (ALGORITHMS.md §2) pairs replicas at outer step t without any message: every node takes
the live members sorted by peer id, draws the permutation π = Permutation_N(seed = hash(run, t))
and forms the groups (π[g], π[g + G], ..., π[g + (n-1)G]) for g < G = N // n, i.e. the pairs
(π[g], π[g + N/2]) for n = 2. The N mod n members left over are singletons: they take a
local-only step. A²CiD²'s gossip ticks reuse the same function with n = 2 (acid.py).

Why not `random.Random(seed).shuffle`: CPython only promises `random()`'s sequence across
versions, not `shuffle`'s, and two members on different Pythons must agree. The permutation
here is Fisher-Yates driven by a keyed BLAKE2b counter (exactly uniform draws by rejection), so
it is a pure function of (run, t, members) on every platform and version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["group_of", "groups", "permutation", "round_key"]


def round_key(run_id: str, round_index: int, *, domain: str = "noloco") -> bytes:
    """The 32-byte seed of round `round_index` of run `run_id` (hash(run, t)).

    `domain` separates uses (NoLoCo outer steps vs gossip ticks) so they draw independent
    permutations from the same run id.
    """
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be an integer >= 0, got {round_index!r}")
    text = f"hyphae-pairing\0{domain}\0{run_id}\0{round_index}".encode()
    return hashlib.blake2b(text, digest_size=32).digest()


def _uniform_below(key: bytes, counter: int, bound: int) -> tuple[int, int]:
    """An exactly uniform integer in [0, bound) and the next unused counter."""
    limit = (1 << 64) - (1 << 64) % bound  # reject the biased tail of the 64-bit range
    while True:
        block = hashlib.blake2b(counter.to_bytes(8, "little"), key=key, digest_size=8).digest()
        counter += 1
        value = int.from_bytes(block, "little")
        if value < limit:
            return value % bound, counter


def permutation(key: bytes, n: int) -> list[int]:
    """A uniformly random permutation of range(n), a pure function of (key, n).

    Raises:
        ValueError: n < 0.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    perm = list(range(n))
    counter = 0
    for i in range(n - 1, 0, -1):
        j, counter = _uniform_below(key, counter, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def groups(
    run_id: str, round_index: int, members: Sequence[str], group_size: int, *, domain: str = "noloco"
) -> list[tuple[str, ...]]:
    """The partition of `members` into groups for one round; identical on every member.

    Args:
        run_id: names the run (every member passes the same).
        round_index: the outer step (or gossip tick) t.
        members: the live members as this node sees them (order and duplicates do not matter:
            they are sorted and deduplicated first).
        group_size: n >= 2 members per group.
        domain: see `round_key`.

    Returns:
        N // n groups of n peer ids followed by N mod n singletons; every member appears in
        exactly one. Each group's ids are in permutation order (π[g] first).

    Raises:
        ValueError: group_size < 2.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    ids = sorted(set(members))
    perm = permutation(round_key(run_id, round_index, domain=domain), len(ids))
    n_groups = len(ids) // group_size
    out = [tuple(ids[perm[g + k * n_groups]] for k in range(group_size)) for g in range(n_groups)]
    out += [(ids[i],) for i in perm[n_groups * group_size :]]
    return out


def group_of(
    run_id: str,
    round_index: int,
    members: Sequence[str],
    group_size: int,
    peer: str,
    *,
    domain: str = "noloco",
) -> tuple[str, ...]:
    """The group `peer` belongs to in `groups(...)`; (peer,) if it is not among `members`."""
    for group in groups(run_id, round_index, members, group_size, domain=domain):
        if peer in group:
            return group
    return (peer,)
