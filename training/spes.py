"""SPES: every node holds the whole MoE but trains only the shared weights and its own experts.

ALGORITHMS.md §1 (arXiv 2602.11543), without the paper's parameter server:

- Ownership. Expert index e (the same owner in every layer) belongs to one live node, a
  contiguous block per node (`assign_experts` over the sorted members). It lives in the run
  state (`spes/owner/{e}` = peer id, written by the owner). A fresh run assigns from
  `members()` in `start()`; after that every sync reassigns from the round's `included`
  list, which the all-reduce hands identically to every included node, so all nodes agree
  without asking each other. A node that joins mid-run owns nothing until the next sync.
- Memory. Experts this node does not own are `requires_grad_(False)` and not in the AdamW
  optimizer: no gradient, no optimizer state. On reassignment the optimizer is rebuilt over
  the new trainable set, keeping the state of parameters that stay (optimizer state is never
  synced or reset, as in the paper); an adopted expert starts with fresh AdamW moments.
- Sync every `sync_steps` steps, round r = steps done / sync_steps:
  1. each owner publishes each owned expert e as a content-addressed blob (`put_tensors`;
     every layer's w1/w2 of e) and records {hash, round, peer, step} at `spes/expert/{e}`;
  2. the shared tensors are averaged (fp32 mean) by `comm.all_reduce` over the members —
     fault tolerant: a member lost mid-round is left out. It also acts as the barrier after
     which every included owner's record is in the run state;
  3. every node fetches every expert whose recorded hash differs from the one its copy came
     from (`get_tensors`; in the daemon a peer that already fetched serves it too). An owner
     that is not in `included` is gone: its last recorded blob is its expert's latest weights
     (what it trained since that sync is lost);
  4. if t = steps done is a multiple of `merge_interval` and a_t > 0, the expert-merging
     warm-up runs on every node from the identical synced weights (so results agree);
  5. ownership is recomputed from `included`; an adopter first makes sure its copy of each
     adopted expert equals the latest recorded blob (fetching it by hash if not);
  6. the first included node also stores the averaged shared tensors as a blob
     (`spes/shared`), so a node joining later starts from the synced weights.
  `transfer_dtype="bfloat16"` halves every byte of it (§1), nodes stay bit-identical.
- Safe by default (`training/_robust_gather.py`, `reduce_verified`): if step 2's mean holds
  NaN/Inf, the round is redone as a checked gather — the shared tensors swapped with every
  member, a non-finite contribution refused (its sender reported, and left out of `included`,
  so it loses its experts), any over `norm_clip` (3) × the members' median norm scaled down.
  `norm_clip = 0` with `robust = "none"` only skips a poisoned round. A fetched expert or shared
  blob holding NaN/Inf is never loaded.
  With static membership and no merge, all nodes end a sync bit-identical: each expert is its
  owner's pre-sync value, each shared tensor the all-reduce's fp32 mean.
- Local training: AdamW β (0.9, 0.95), wd 0.1, clip 1.0, warm-up + cosine (`AdamWConfig`);
  the load-balancing (0.01) and router z-loss (0.001) weights come from the model config.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hyphae.training import robust
from hyphae.training._config import check_choice, check_int, check_positive, check_range, from_dict, to_dict
from hyphae.training._experts import assign_experts, expert_tensors, merge_coefficient, merge_model_experts_
from hyphae.training._robust_gather import checks_on, reduce_verified, remember_refused, result_is_finite
from hyphae.training.comm import BlobCorrupt, Comm, CommClosed, CommError
from hyphae.training.model import GPT
from hyphae.training.optim import AdamWConfig, build_adamw
from hyphae.training.strategy import Metrics, Precision, Strategy

logger = logging.getLogger(__name__)

OWNER_PREFIX = "spes/owner/"
"""Run-state keys `spes/owner/{e}` -> peer id of expert e's owner."""

EXPERT_PREFIX = "spes/expert/"
"""Run-state keys `spes/expert/{e}` -> {"hash", "round", "peer", "step"} of e's latest blob."""

SHARED_KEY = "spes/shared"
"""Run-state key -> {"hash", "round", "step"} of the latest averaged shared tensors."""

_POLL_S = 0.05  # how often a fetcher re-reads the run state while an owner's record is pending


@dataclass(frozen=True, kw_only=True, slots=True)
class SPESConfig:
    """Settings of SPES (defaults from the paper)."""

    optimizer: AdamWConfig = field(default_factory=AdamWConfig)
    """Local AdamW over the shared parameters and the owned experts."""

    sync_steps: int = 100
    """Local steps between two syncs."""

    merge_interval: int = 500
    """Steps between expert-merging warm-up steps; a multiple of sync_steps so every node
    merges right after the same sync, from identical weights. 0 disables merging."""

    merge_a0: float = 0.05
    """a0 of the merge schedule a_t = a0 · max(0, 1 − t / merge_until)."""

    merge_until: int = 20000
    """T of the merge schedule: no merging from this step on."""

    merge_top_k: int = 4
    """Most similar experts (cosine of flattened w1) each expert is pulled towards."""

    timeout_s: float = 300.0
    """How long a sync waits for stragglers (all-reduce) and for an owner's expert blob."""

    transfer_dtype: str = "float32"
    """Dtype of what a sync sends: "bfloat16" halves the bytes. The owner then rounds its own
    copy of each published expert to bf16 too, so every node still holds the same bits; the
    optimizer state stays fp32."""

    robust: str = "none"
    """How the checked gather combines the shared tensors: "none" (mean), "median" or "trimmed_mean"."""

    trim_fraction: float = 0.25
    """With robust = "trimmed_mean": share of the members dropped at each end, per coordinate."""

    norm_clip: float = 3.0
    """k >= 1: in a checked gather, scale shared tensors whose norm exceeds k × the members'
    median down to that. 0 (with robust = "none") = the plain all-reduce, a poisoned round skipped."""

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, AdamWConfig):
            raise ValueError(f"optimizer must be an AdamWConfig, got {type(self.optimizer).__name__}")
        robust.check_robust_options(self.robust, self.trim_fraction, self.norm_clip)
        check_int("sync_steps", self.sync_steps, minimum=1)
        check_int("merge_interval", self.merge_interval, minimum=0)
        if self.merge_interval % self.sync_steps:
            raise ValueError(
                f"merge_interval ({self.merge_interval}) must be a multiple of sync_steps "
                f"({self.sync_steps}) so all nodes merge the same synced weights; e.g. "
                f"merge_interval={self.sync_steps * max(1, round(self.merge_interval / self.sync_steps))}"
            )
        check_range("merge_a0", self.merge_a0, 0.0, 1.0)
        check_int("merge_until", self.merge_until, minimum=1)
        check_int("merge_top_k", self.merge_top_k, minimum=1)
        check_positive("timeout_s", self.timeout_s)
        check_choice("transfer_dtype", self.transfer_dtype, ("float32", "bfloat16"))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SPESConfig:
        return from_dict(cls, data)


class SPES(Strategy):
    """SPES on one node.

    Args:
        model: this node's replica of an MoE GPT (identical init on every node).
        comm: this node's Comm.
        config: SPES settings.
        precision: compute precision (see strategy.Precision).

    Raises:
        ValueError: a dense model.
    """

    algorithm = "spes"

    def __init__(
        self, model: GPT, comm: Comm, config: SPESConfig | None = None, *, precision: Precision = "auto"
    ) -> None:
        if not model.config.is_moe:
            raise ValueError("SPES trains a mixture-of-experts model; build it with n_experts > 0 (e.g. 'tiny-moe')")
        super().__init__(model, comm, precision=precision)
        self.config = config or SPESConfig()
        self.n_experts = model.config.n_experts
        self._shared = model.shared_parameters()
        self.owned: tuple[int, ...] = ()
        self.optimizer: torch.optim.AdamW
        self._set_owned(())
        self.loaded: dict[int, str] = {}
        """Expert -> hash of the blob its local weights were last set from (or published as)."""
        self.rounds = 0
        self.failed_rounds = 0
        self.merges = 0
        self.rejected_updates = 0
        self.rejected_peers: list[str] = []
        self._joined = False

    # --- ownership ---------------------------------------------------------------------------

    def _set_owned(self, owned: tuple[int, ...] | list[int]) -> None:
        """Freeze every expert but `owned` and rebuild AdamW over what is trainable."""
        owned = tuple(sorted(set(int(e) for e in owned)))
        bad = [e for e in owned if not 0 <= e < self.n_experts]
        if bad:
            raise ValueError(f"experts {bad} out of range [0, {self.n_experts})")
        with torch.no_grad():
            for e in range(self.n_experts):
                for p in expert_tensors(self.model, e).values():
                    p.requires_grad_(e in owned)
                    if e not in owned:
                        p.grad = None
        old = getattr(self, "optimizer", None)  # None while __init__ builds the first one
        self.optimizer = build_adamw(self.model.named_parameters(), self.config.optimizer)
        if old is not None:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p in old.state:
                        self.optimizer.state[p] = old.state[p]
        self.owned = owned

    async def _write_owner_records(self) -> None:
        for e in self.owned:
            await self.comm.state_set(f"{OWNER_PREFIX}{e}", self.comm.peer_id)

    # --- the loop calls these ----------------------------------------------------------------

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        await self._join()

    async def step(self, step: int) -> Metrics:
        await self._join()
        metrics = self.local_update(self.optimizer, self.config.optimizer, step)
        done = step + 1
        if done % self.config.sync_steps == 0:
            metrics.update(await self._sync(done))
        return metrics

    async def catch_up(self) -> int | None:
        """A joiner loads the run's synced weights now and starts at their step, so its syncs
        carry the members' round numbers. None in a fresh run, or when the record is not
        believed: a step above the median (low) of the expert records' steps (a member claiming
        step 10^9), or shared weights that are not this model's or not finite."""
        shared = await self.comm.state_get(SHARED_KEY)
        step = shared.get("step") if isinstance(shared, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return None
        experts = await self.comm.state_items(EXPERT_PREFIX)
        steps = [r["step"] for r in experts.values() if isinstance(r, dict) and isinstance(r.get("step"), int)]
        if steps and step > statistics.median_low(steps):
            logger.warning("spes: the synced weights claim step %d, above the experts' median %d; not joining "
                           "from them", step, statistics.median_low(steps))
            return None
        return step if await self._join() else None

    async def _join(self) -> bool:
        """First contact with the run: take ownership in a fresh run, else the synced weights.

        A run is fresh until its first sync completed (no `spes/shared` record yet): nodes that
        start together may see each other's first expert records before that, and must not
        mistake themselves for joiners.

        Returns:
            Whether this call loaded the run's synced shared weights.
        """
        if self._joined:
            return False
        self._joined = True
        shared = await self.comm.state_get(SHARED_KEY)
        if shared is None:  # a fresh run: everyone assigns from the same member list
            if not self.owned:
                mine = [e for e, p in assign_experts(await self.comm.members(), self.n_experts).items()
                        if p == self.comm.peer_id]
                self._set_owned(mine)
            await self._write_owner_records()
            logger.info("spes %s: owns experts %s", self.comm.peer_id, list(self.owned))
            return False
        logger.info("spes %s: joining a run in progress; loading the synced weights", self.comm.peer_id)
        records = self._by_expert(await self.comm.state_items(EXPERT_PREFIX))
        await asyncio.gather(*(self._fetch(e, rec["hash"]) for e, rec in records.items()))
        try:
            tensors = await self.comm.get_tensors(shared["hash"], timeout_s=self.config.timeout_s)
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            logger.warning("spes: could not fetch the shared weights (%s); keeping the local ones", exc)
            return False
        shapes = {n: tuple(p.shape) for n, p in self._shared.items()}
        if {n: tuple(t.shape) for n, t in tensors.items()} != shapes:
            logger.warning("spes: the run's shared weights %s are not this model's; keeping the local ones",
                           shared["hash"][:12])
            return False
        if not robust.is_finite(tensors):
            logger.warning("spes: the run's shared weights %s hold NaN/Inf; keeping the local ones", shared["hash"][:12])
            return False
        self._load(tensors, self._shared)
        return True

    # --- the sync ----------------------------------------------------------------------------

    async def _sync(self, done: int) -> Metrics:
        cfg, me = self.config, self.comm.peer_id
        r = done // cfg.sync_steps
        await self._publish(r, done)  # 1. publish
        included = await self._average_shared(r)  # 2. all-reduce (and barrier)
        expected = set(included) if included is not None else set(await self.comm.members())
        others = [e for e in range(self.n_experts) if e not in self.owned]
        await asyncio.gather(*(self._refresh(e, r, expected) for e in others))  # 3. fetch
        a = 0.0
        if cfg.merge_interval and done % cfg.merge_interval == 0:
            a = merge_coefficient(done, a0=cfg.merge_a0, until=cfg.merge_until)
            if a > 0:  # 4. merge warm-up, identical on every node
                merge_model_experts_(self.model, a, top_k=cfg.merge_top_k)
                self.merges += 1
        if included:
            await self._reassign(included)  # 5. ownership
            if included[0] == me:  # 6. the synced shared weights, for joiners
                digest = await self.comm.put_tensors(self._wire(self._shared))
                await self.comm.state_set(SHARED_KEY, {"hash": digest, "round": r, "step": done})
        self.rounds = r
        return {"peers": len(included) if included else 1, "owned_experts": len(self.owned), "merge_a": a}

    async def _publish(self, r: int, done: int) -> None:
        """Offer each owned expert as a blob and record its hash (a failure costs only this round)."""
        me = self.comm.peer_id
        for e in self.owned:
            params = expert_tensors(self.model, e)
            wire = self._wire(params)
            if self.config.transfer_dtype != "float32":
                self._load(wire, params)  # the owner keeps exactly what it sends
            try:
                digest = await self.comm.put_tensors(wire)
                await self.comm.state_set(f"{EXPERT_PREFIX}{e}", {"hash": digest, "round": r, "peer": me, "step": done})
            except CommClosed:
                raise
            except CommError as exc:
                logger.warning("spes round %d: could not publish expert %d (%s); others keep its last blob", r, e, exc)
                continue
            self.loaded[e] = digest

    async def _average_shared(self, r: int) -> tuple[str, ...] | None:
        """Replace the shared tensors by their fp32 mean; returns who was included (None: failed)."""
        cfg, tag = self.config, f"spes/{r}"
        try:
            group = await self.comm.members()
            if group == [self.comm.peer_id]:
                return (self.comm.peer_id,)
            if checks_on(cfg.robust, cfg.norm_clip):
                gathered = await reduce_verified(self.comm, self._wire(self._shared), group=group, tag=tag,
                                                timeout_s=cfg.timeout_s, method=cfg.robust,
                                                trim_fraction=cfg.trim_fraction, norm_clip=cfg.norm_clip)
                self.rejected_updates += len(gathered.refused)
                self.rejected_peers = remember_refused(self.rejected_peers, gathered.refused)
                mean, included = gathered.tensors, gathered.included
            else:
                result = await self.comm.all_reduce(self._wire(self._shared), group=group, tag=tag,
                                                    timeout_s=cfg.timeout_s)
                ok = result_is_finite(result.tensors, tag)
                mean, included = (result.tensors if ok else None), result.included
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            self.failed_rounds += 1
            logger.warning("spes round %d: all-reduce failed (%s); keeping local shared weights", r, exc)
            return None
        if mean is None:
            self.failed_rounds += 1
            return None
        self._load(mean, self._shared)
        return included

    async def _refresh(self, e: int, r: int, expected: set[str]) -> None:
        """Bring expert e to its latest blob, waiting for this round's if its owner is expected."""
        key = f"{EXPERT_PREFIX}{e}"
        deadline = self.comm.now() + self.config.timeout_s
        while True:
            rec = await self.comm.state_get(key)
            if rec is not None and rec["round"] >= r:
                break
            owner = await self.comm.state_get(f"{OWNER_PREFIX}{e}")
            if owner not in expected or self.comm.now() >= deadline:
                break  # gone (or silent): its last blob is the latest there is
            await self.comm.sleep(_POLL_S)
        if rec is not None:
            await self._fetch(e, rec["hash"])

    async def _fetch(self, e: int, digest: str) -> None:
        """Set expert e's weights from blob `digest` unless they already came from it."""
        if self.loaded.get(e) == digest:
            return
        try:
            tensors = await self.comm.get_tensors(digest, timeout_s=self.config.timeout_s)
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            logger.warning("spes: expert %d blob %s unavailable (%s); keeping the local copy", e, digest[:12], exc)
            return
        params = expert_tensors(self.model, e)
        if set(tensors) != set(params):
            raise BlobCorrupt(f"expert blob {digest} holds {sorted(tensors)[:2]}..., not expert {e} of this model")
        if not robust.is_finite(tensors):
            logger.warning("spes: expert %d blob %s holds NaN/Inf; keeping the local copy", e, digest[:12])
            return
        self._load(tensors, params)
        self.loaded[e] = digest

    async def _reassign(self, included: tuple[str, ...]) -> None:
        me = self.comm.peer_id
        mine = tuple(e for e, p in sorted(assign_experts(included, self.n_experts).items()) if p == me)
        if mine == self.owned:
            return
        records = self._by_expert(await self.comm.state_items(EXPERT_PREFIX))
        for e in sorted(set(mine) - set(self.owned)):  # adopter: latest weights first
            if e in records:
                await self._fetch(e, records[e]["hash"])
        logger.info("spes %s: experts %s -> %s (members %d)", me, list(self.owned), list(mine), len(included))
        self._set_owned(mine)
        await self._write_owner_records()

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _by_expert(records: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
        return {int(k.rsplit("/", 1)[1]): v for k, v in records.items()}

    def _wire(self, params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """What a sync sends of `params`: the tensors themselves, or bf16 copies."""
        if self.config.transfer_dtype == "bfloat16":
            return {n: p.detach().to(torch.bfloat16) for n, p in params.items()}
        return {n: p.detach() for n, p in params.items()}

    @staticmethod
    def _load(tensors: Mapping[str, torch.Tensor], params: Mapping[str, torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])

    def optimizer_state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (measured, not computed)."""
        return optimizer_state_bytes(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "owned": list(self.owned),
            "loaded": {str(e): d for e, d in self.loaded.items()},
            "rounds": self.rounds,
            "failed_rounds": self.failed_rounds,
            "merges": self.merges,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._set_owned(list(state["owned"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.loaded = {int(e): str(d) for e, d in state["loaded"].items()}
        self.rounds = int(state["rounds"])
        self.failed_rounds = int(state["failed_rounds"])
        self.merges = int(state["merges"])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of the bytes of every tensor an optimizer holds as state (moments, step counters)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
