"""A²CiD²: DADAO's practical form for deep nets — asynchronous pairwise gossip with momentum.

ALGORITHMS.md §4, "for deep nets". Each peer keeps its weights x (the model) and a companion x̃
(fp32, x̃ = x at the start) that follow, between events, the mixing ODE

    ẋ = η(x̃ − x),  x̃̇ = η(x − x̃)      ⇒  x + x̃ constant, x − x̃ decays as e^{−2ηΔt}

integrated in closed form over the time elapsed since the last event (`mix_`). Events:
- gradient step (the loop's `step`): flow to now, the normal optimizer step on x (AdamW, clip,
  schedule), and the same step added to x̃;
- gossip with a partner j (background tasks, `start`): flow to now, swap x with j through
  `comm.exchange`, then x̃_i += α̃(x_j − x_i) and x_i += ½(x_j − x_i) (`gossip_`), written as
  increments from the values *sent*, so Σ_i x_i is conserved exactly even if a gradient step
  landed while the bytes were in flight.
Nothing waits on anyone: the loop never touches the network, and a gossip partner that is gone
or late (`timeout_s`) is skipped.

Time is measured with `comm.now()` in units of this peer's measured step time (an EMA of the
time between two `step` calls), so one unit is one gradient event, as in the paper. The constants
come from the communication process (graph.py): with per-edge rates λ in those units,
η = 1/(2√(χ₁χ₂)) and α̃ = ½√(χ₁/χ₂). For the complete graph over N members (every peer may
gossip with every other) χ₁ = χ₂ = 1/(Nλ), so α̃ = ½ and η = Nλ/2; λ = (gossips per step)/(N−1)
is proportional to the step time, so ηΔt does not depend on it after all: mixing and gossip are
both clocked in seconds, which is what decouples communication from computation.

Rendezvous (why the gossip clock is shared): `exchange` needs both ends to call it with the same
tag, so a partner must know *when* it is wanted without a message. The gossip clock is a Poisson
process of mean spacing `gossip_interval_s` on the run clock, drawn from a hash of (run id, k)
(every peer draws the same ticks), and at tick k every member meets the partner the NoLoCo
pairing (`_pairing.groups`, n = 2) gives it. So each peer gossips at Poisson times of rate
1/gossip_interval_s with a uniformly random other member (per edge: Poisson of rate
1/((N−1)·interval)), with no coordinator, no message to arrange it and no dependence on N in the
schedule. A byte budget (`bytes_per_s` > 0) sets that interval to (bytes one gossip sends) /
budget: every member derives the same interval from the same model, so the clock stays shared,
and each peer then sends about `bytes_per_s` on average (a little less with an odd number of
members, where one sits out each tick) — what compares it with DiLoCo at equal bytes per peer.
It needs the peers' `comm.now()` to be one run clock (true in SimNetwork; a daemon whose
clocks differ by more than `timeout_s` simply never meets, and the peers train alone).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hyphae.training._config import check_int, check_positive, from_dict, to_dict
from hyphae.training._graph import complete_graph_chis
from hyphae.training._join import JoinDesk, check_outer_state, layout_of
from hyphae.training._pairing import group_of
from hyphae.training.comm import Comm, CommClosed, CommError
from hyphae.training.model import GPT
from hyphae.training.optim import AdamWConfig, build_adamw
from hyphae.training.strategy import Metrics, Precision, Strategy

__all__ = ["ACiD2", "ACiD2Config", "acid_constants", "gossip_", "gossip_interval", "mix_", "tick_times"]

logger = logging.getLogger(__name__)

_EMA = 0.1  # weight of the newest interval in the step-time estimate


@dataclass(frozen=True, kw_only=True, slots=True)
class ACiD2Config:
    """Settings of A²CiD² (registered as "dadao")."""

    optimizer: AdamWConfig = field(default_factory=AdamWConfig)
    """The local optimizer applied to x at every gradient event."""

    gossip_interval_s: float = 1.0
    """Mean seconds between two gossips of one peer (run-wide: every peer draws the same
    ticks). About one step time gives the paper's one communication per gradient."""

    bytes_per_s: float = 0.0
    """A budget of bytes sent per second per peer; > 0 replaces gossip_interval_s by (bytes of
    one gossip: the fp32 weights) / bytes_per_s. 0 = off (gossip_interval_s applies)."""

    timeout_s: float = 5.0
    """How long a gossip waits for its partner (arrival and transfer) before skipping it."""

    max_in_flight: int = 3
    """Gossips waiting on their partners at once. A tick that comes while an earlier gossip still
    waits (its partner gone or late) is attended anyway: were it missed, that tick's partner
    would time out too and miss the ticks after, and one lost peer would stall gossip run-wide
    (seen with 4 daemons). Each gossip in flight holds an fp32 copy of the weights."""

    eta: float | None = None
    """Mixing rate η per step time; None = 1/(2√(χ₁χ₂)) of the gossip process."""

    alpha_tilde: float | None = None
    """x̃'s gossip weight α̃; None = ½√(χ₁/χ₂). eta = alpha_tilde = 0 is plain async gossip."""

    run_id: str = ""
    """Names the run in the gossip clock and pairing hashes; every member uses the same."""

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, AdamWConfig):
            raise ValueError(f"optimizer must be an AdamWConfig, got {type(self.optimizer).__name__}")
        check_positive("gossip_interval_s", self.gossip_interval_s)
        check_positive("bytes_per_s", self.bytes_per_s, allow_zero=True)
        check_positive("timeout_s", self.timeout_s)
        check_int("max_in_flight", self.max_in_flight, minimum=1)
        if self.eta is not None:
            check_positive("eta", self.eta, allow_zero=True)
        if self.alpha_tilde is not None:
            check_positive("alpha_tilde", self.alpha_tilde, allow_zero=True)
        if not isinstance(self.run_id, str):
            raise ValueError(f"run_id must be a string, got {self.run_id!r}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ACiD2Config:
        return from_dict(cls, data)


def acid_constants(chi1: float, chi2: float) -> tuple[float, float]:
    """(η, α̃) = (1/(2√(χ₁χ₂)), ½√(χ₁/χ₂)) (ALGORITHMS.md §4)."""
    return 1.0 / (2.0 * math.sqrt(chi1 * chi2)), 0.5 * math.sqrt(chi1 / chi2)


@torch.no_grad()
def mix_(x: torch.Tensor, x_tilde: torch.Tensor, eta_dt: float) -> None:
    """Flow the mixing ODE over η·Δt in place: x + x̃ is kept, x − x̃ shrinks by e^{−2ηΔt}."""
    if eta_dt <= 0:
        return
    f = -0.5 * math.expm1(-2.0 * eta_dt)  # (1 − e^{−2ηΔt}) / 2, accurate for small ηΔt
    work = _work_dtype(x, x_tilde)
    step = (x_tilde.to(work) - x.to(work)).mul_(f)
    x.add_(step.to(x.dtype))
    x_tilde.sub_(step.to(x_tilde.dtype))


@torch.no_grad()
def gossip_(
    x: torch.Tensor, x_tilde: torch.Tensor, sent: torch.Tensor, received: torch.Tensor, alpha_tilde: float
) -> None:
    """The gossip jump with partner j, from what was exchanged: x += ½(x_j − x_i), x̃ += α̃(x_j − x_i).

    Both ends add opposite increments to x, so Σ x is conserved exactly (up to the rounding of
    each addition) whatever happened to x between sending and receiving.
    """
    work = _work_dtype(x, x_tilde)
    diff = received.to(work) - sent.to(work)
    x_tilde.add_(diff.to(x_tilde.dtype), alpha=alpha_tilde)
    x.add_(diff.mul_(0.5).to(x.dtype))


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 at least (bf16 weights mix in fp32), fp64 if any operand is."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def gossip_interval(config: ACiD2Config, gossip_bytes: int) -> float:
    """The gossip clock's mean spacing: gossip_bytes / bytes_per_s under a budget, else the config's.

    Raises:
        ValueError: the budget asks for gossips closer than the clock can draw (the message says
            the largest budget that works).
    """
    if config.bytes_per_s <= 0:
        return config.gossip_interval_s
    interval = gossip_bytes / config.bytes_per_s
    shortest = TICK_WINDOW_S / _TICKS_PER_WINDOW
    if interval < shortest:
        raise ValueError(f"bytes_per_s {config.bytes_per_s:g} asks for a gossip every {interval:.3g} s; the clock "
                         f"draws at most one per {shortest:g} s: use bytes_per_s <= {gossip_bytes / shortest:.3g}")
    return interval


TICK_WINDOW_S = 60.0
"""The gossip clock restarts its Poisson process every window, so a peer joins it at `now`
without replaying every tick since t = 0 (the run clock is wall time in the daemon)."""
_TICKS_PER_WINDOW = 1_000_000


def tick_times(run_id: str, interval_s: float, *, start_s: float = 0.0) -> Iterator[tuple[int, float]]:
    """(k, t_k) of the run's gossip clock from the window holding `start_s` on, forever.

    A Poisson process of mean spacing `interval_s`, drawn independently in each window of
    `TICK_WINDOW_S` seconds (arrivals on disjoint intervals of a Poisson process are independent,
    so this is still one Poisson process). It is a pure function of (run_id, interval_s), so
    every peer draws the same ticks without a message; k names the tick uniquely.
    """
    if interval_s * _TICKS_PER_WINDOW < TICK_WINDOW_S:
        raise ValueError(f"gossip interval {interval_s} s is too short; use >= {TICK_WINDOW_S / _TICKS_PER_WINDOW} s")
    for window in itertools.count(max(int(start_s // TICK_WINDOW_S), 0)):
        t, end = window * TICK_WINDOW_S, (window + 1) * TICK_WINDOW_S
        for j in itertools.count():
            key = f"hyphae-gossip-clock\0{run_id}\0{window}\0{j}".encode()
            u = (int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 11) * 2.0**-53
            t += -math.log1p(-u) * interval_s  # u in [0, 1): an exponential gap
            if t >= end:
                break
            yield window * _TICKS_PER_WINDOW + j, t


JOIN_EVERY = 10
"""Steps between two join boundaries: there a member looks for joiners (a local run-state read)
and serves them; A²CiD² has no outer step, so any step boundary would do."""
JOIN_RECORD_EVERY = 30
"""Join boundaries between two step records while nobody joins (every 300 steps)."""


class ACiD2(Strategy):
    """A²CiD² on one peer.

    Args:
        model: this peer's replica (x); x̃ starts equal to it.
        comm: this peer's Comm.
        config: settings.
        precision: compute precision (see strategy.Precision).
    """

    algorithm = "dadao"

    def __init__(
        self, model: GPT, comm: Comm, config: ACiD2Config | None = None, *, precision: Precision = "auto"
    ) -> None:
        super().__init__(model, comm, precision=precision)
        self.config = config or ACiD2Config()
        self._params = list(self.trainable_parameters())
        self.optimizer = build_adamw(self._params, self.config.optimizer)
        self.x_tilde = {n: p.detach().clone().float() for n, p in self._params}
        self.gossip_bytes = sum(4 * p.numel() for _, p in self._params)
        """Payload bytes one gossip sends (the weights in fp32)."""
        self.gossip_interval_s = gossip_interval(self.config, self.gossip_bytes)
        """Mean seconds between two gossip ticks: the config's, or set by the byte budget."""
        self.step_time_s: float | None = None
        self.gossips = 0
        self.failed_gossips = 0
        self.last_failure = ""
        """Why the latest skipped gossip failed (for the dashboard); empty until one does."""
        self._last_step_at: float | None = None
        self._flowed_at: float | None = None
        self._members = 1
        self._task: asyncio.Task | None = None
        self._in_flight: set[asyncio.Task] = set()
        self.joins = JoinDesk(comm, self, layout=layout_of(self._params), record_every=JOIN_RECORD_EVERY)

    # --- the loop calls these ----------------------------------------------------------------

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        self._flowed_at = self.comm.now()
        self._members = len(await self.comm.members())
        self._task = tasks.create_task(self._gossip_loop(tasks), name=f"acid-gossip-{self.comm.peer_id}")

    async def aclose(self) -> None:
        for task in (self._task, *self._in_flight):
            if task is not None:
                task.cancel()  # the TaskGroup reaps them; nothing is half-applied (see _gossip)
        self._task, self._in_flight = None, set()

    async def step(self, step: int) -> Metrics:
        now = self.comm.now()
        if self._last_step_at is not None and now > self._last_step_at:
            dt = now - self._last_step_at
            self.step_time_s = dt if self.step_time_s is None else (1 - _EMA) * self.step_time_s + _EMA * dt
        self._last_step_at = now
        self._flow(now)
        before = [p.detach().clone() for _, p in self._params]
        metrics = self.local_update(self.optimizer, self.config.optimizer, step)
        with torch.no_grad():
            for (name, p), old in zip(self._params, before):
                self.x_tilde[name].add_(p.detach().float() - old.float())
        metrics["gossips"] = self.gossips
        metrics["failed_gossips"] = self.failed_gossips
        if (step + 1) % JOIN_EVERY == 0:  # the loop holds weights_lock: no gossip lands meanwhile
            await self.joins.boundary((step + 1) // JOIN_EVERY)
        return metrics

    # --- mixing ------------------------------------------------------------------------------

    def constants(self) -> tuple[float, float]:
        """(η per step time, α̃) for the current membership and step time."""
        n = self._members
        if n < 2:
            return 0.0, 0.0
        unit = self.step_time_s or self.gossip_interval_s  # before the first measurement
        per_node = (1.0 if n % 2 == 0 else (n - 1) / n) * unit / self.gossip_interval_s
        eta, alpha_tilde = acid_constants(*complete_graph_chis(n, per_node / (n - 1)))
        cfg = self.config
        return (eta if cfg.eta is None else cfg.eta), (alpha_tilde if cfg.alpha_tilde is None else cfg.alpha_tilde)

    def _flow(self, now: float) -> None:
        if self._flowed_at is None:
            self._flowed_at = now
        dt = now - self._flowed_at
        self._flowed_at = max(now, self._flowed_at)
        if dt <= 0:
            return
        eta, _ = self.constants()
        unit = self.step_time_s or self.gossip_interval_s
        for name, p in self._params:
            mix_(p.data, self.x_tilde[name], eta * dt / unit)

    # --- gossip ------------------------------------------------------------------------------

    async def _gossip_loop(self, tasks: asyncio.TaskGroup) -> None:
        """Attend every tick; each gossip runs as its own task, up to `max_in_flight` at once."""
        cfg, me = self.config, self.comm.peer_id
        grace = cfg.timeout_s / 2  # a tick this late is still attended: the partner waits timeout_s
        for k, t in tick_times(cfg.run_id, self.gossip_interval_s, start_s=self.comm.now()):
            now = self.comm.now()
            if t + grace < now:
                continue  # missed (this peer was stalled): a partner that came times out
            if t > now:
                await self.comm.sleep(t - now)
            members = await self.comm.members()
            self._members = len(members)
            partner = [p for p in group_of(cfg.run_id, k, members, 2, me, domain="acid") if p != me]
            if not partner:
                continue
            if len(self._in_flight) >= cfg.max_in_flight:
                self._skip(k, partner[0], f"{len(self._in_flight)} gossips already in flight")
                continue
            task = tasks.create_task(self._gossip(partner[0], k), name=f"acid-gossip-{k}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _skip(self, k: int, partner: str, why: str) -> None:
        self.failed_gossips += 1
        self.last_failure = f"tick {k} with {partner[-8:]}: {why}"[:200]
        logger.debug("acid gossip %d with %s skipped: %s", k, partner, why)

    async def _gossip(self, partner: str, k: int) -> None:
        """One gossip with `partner` at tick k; skipped (counted) if it fails.

        Cancellation before the reply leaves x and x̃ as they were (only flowed in time); the
        partner may or may not have applied its half (Comm.exchange's contract).
        """
        async with self.weights_lock:  # not while a step computes with these weights
            self._flow(self.comm.now())
            sent = {n: p.detach().float().clone() for n, p in self._params}
        try:
            received = await self.comm.exchange(partner, sent, tag=f"acid/{k}", timeout_s=self.config.timeout_s)
            for name, ref in sent.items():
                if received[name].shape != ref.shape:
                    raise ValueError(f"{name}: shape {tuple(received[name].shape)}, expected {tuple(ref.shape)}")
        except CommClosed:
            raise
        except (CommError, TimeoutError, KeyError, ValueError) as exc:
            self._skip(k, partner, f"{type(exc).__name__}: {exc}")
            return
        async with self.weights_lock:
            self._flow(self.comm.now())
            _, alpha_tilde = self.constants()
            for name, p in self._params:
                gossip_(p.data, self.x_tilde[name], sent[name], received[name].to(p.device), alpha_tilde)
            self.gossips += 1

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "x_tilde": {n: t.clone() for n, t in self.x_tilde.items()},
            "step_time_s": self.step_time_s,
            "gossips": self.gossips,
            "failed_gossips": self.failed_gossips,
        }

    async def catch_up(self) -> int | None:
        """A joiner takes a member's (x, x̃) at its next join boundary (training/_join.py)."""
        return await self.joins.join()

    def outer_state(self) -> dict[str, torch.Tensor]:
        """This peer's x and x̃: a joiner that starts from them is a copy of this peer, mid-flow."""
        return {**{f"x/{n}": p.detach() for n, p in self._params}, **{f"x_tilde/{n}": t for n, t in self.x_tilde.items()}}

    def load_outer_state(self, tensors: Mapping[str, torch.Tensor], step: int) -> int:
        """Start as a copy of the member that sent `tensors` at join boundary `step` (its AdamW
        moments stay this peer's own: they follow its data).

        Raises:
            ValueError: not this model's tensors (nothing changed).
        """
        check_outer_state(tensors, self.x_tilde, required=("x", "x_tilde"))
        with torch.no_grad():
            for name, p in self._params:
                p.copy_(tensors[f"x/{name}"])
                self.x_tilde[name].copy_(tensors[f"x_tilde/{name}"])
        return step * JOIN_EVERY

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.x_tilde) - set(state["x_tilde"]))
        if missing:
            raise ValueError(f"A²CiD² state lacks x_tilde for {missing[:3]}...; wrong model?")
        with torch.no_grad():
            for name, t in self.x_tilde.items():
                t.copy_(state["x_tilde"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_time_s = state["step_time_s"]
        self.gossips = int(state["gossips"])
        self.failed_gossips = int(state["failed_gossips"])

