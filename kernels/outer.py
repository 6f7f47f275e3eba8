"""Fused outer steps of NoLoCo and DiLoCo: one pass over the slow weights per outer step.

NoLoCo (ALGORITHMS.md §2), for replica i with slow weights phi, momentum delta, the group's
mean progress Dbar = mean_G(theta_j - phi_j) and, when it has a partner, the group's mean slow
weights phibar = mean_G(phi_j):

    delta <- b*delta + a*Dbar + c*(phibar - phi)      (no consensus term without phibar)
    phi   <- phi + delta
    theta <- phi

DiLoCo's Nesterov outer SGD (ALGORITHMS.md §5), with outer gradient Delta = mean_r(phi - theta_r)
and momentum buffer m: exactly torch.optim.SGD(lr=lr, momentum=mu, nesterov=True) on phi with
phi.grad = Delta (tested against it):

    m     <- mu*m + Delta
    phi   <- phi - lr*(Delta + mu*m)                 (phi - lr*m without Nesterov)
    theta <- phi

Numerics: all state (phi, delta, m, Dbar, phibar, Delta) is fp32; theta may be fp32, bf16 or
fp16 and receives phi rounded once (nearest-even). Scalars are rounded to fp32 on the host.
The reference is a fixed sequence of torch ops (the ones torch.optim.SGD uses, so it matches
SGD bit for bit); `x.add_(y, alpha=s)` is a fused multiply-add in torch's vectorized CPU
kernels, and the Triton kernels use `tl.fma` in the same places and no other fusion. The
contract between the paths is agreement up to fused-multiply-add rounding (a few fp32 ulp,
e.g. where a torch build computes s*y + x with two roundings); on x86 torch builds they
agree bit for bit. DiLoCo's first step with m = 0 equals SGD's first step (which clones
Delta into the buffer) except for the sign of zero results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from hyphae.kernels import _triton
from hyphae.kernels._common import fp32_scalar, scratch, storage_kind

__all__ = [
    "diloco_outer_",
    "diloco_outer_ref_",
    "diloco_outer_triton_",
    "noloco_outer_",
    "noloco_outer_ref_",
    "noloco_outer_triton_",
]

_CHUNK = 1 << 20  # elements per reference pass: chunk streams reuse cache; few ops (OpenMP barriers)
_BLOCK = 1024  # Triton elements per program

Tensors = Sequence[torch.Tensor]


def noloco_outer_(
    phis: Tensors,
    deltas: Tensors,
    mean_progress: Tensors,
    mean_phis: Tensors | None = None,
    thetas: Tensors | None = None,
    *,
    a: float = 0.7,
    b: float = 0.5,
    c: float = 0.7,
) -> None:
    """NoLoCo outer step in place on phis, deltas and (if given) thetas; see the module docstring.

    Args:
        phis, deltas: slow weights and outer momentum (fp32), updated in place.
        mean_progress: Dbar, the group mean of theta - phi (fp32), read only.
        mean_phis: phibar, the group mean of phi (fp32); None for a partner-less local step.
        thetas: fast weights to overwrite with the new phi; None to skip.
        a, b, c: outer lr, momentum, consensus weight (ALGORITHMS.md defaults).

    Raises:
        TypeError, ValueError: lists of different lengths, mismatched shapes or devices, wrong
            dtypes, non-contiguous tensors, or non-finite scalars.
    """
    _noloco("auto", phis, deltas, mean_progress, mean_phis, thetas, a, b, c)


def noloco_outer_ref_(
    phis: Tensors,
    deltas: Tensors,
    mean_progress: Tensors,
    mean_phis: Tensors | None = None,
    thetas: Tensors | None = None,
    *,
    a: float = 0.7,
    b: float = 0.5,
    c: float = 0.7,
) -> None:
    """`noloco_outer_` on the torch reference path."""
    _noloco("ref", phis, deltas, mean_progress, mean_phis, thetas, a, b, c)


def noloco_outer_triton_(
    phis: Tensors,
    deltas: Tensors,
    mean_progress: Tensors,
    mean_phis: Tensors | None = None,
    thetas: Tensors | None = None,
    *,
    a: float = 0.7,
    b: float = 0.5,
    c: float = 0.7,
) -> None:
    """`noloco_outer_` on the Triton path (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _noloco("triton", phis, deltas, mean_progress, mean_phis, thetas, a, b, c)


def diloco_outer_(
    phis: Tensors,
    momenta: Tensors,
    outer_grads: Tensors,
    thetas: Tensors | None = None,
    *,
    lr: float = 0.7,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> None:
    """DiLoCo outer step (torch SGD semantics) in place on phis, momenta and thetas.

    Args:
        phis, momenta: slow weights and momentum buffers (fp32, start at zero), in place.
        outer_grads: Delta = mean over replicas of phi - theta_r (fp32), read only.
        thetas: fast weights to overwrite with the new phi; None to skip.
        lr, momentum, nesterov: as torch.optim.SGD (ALGORITHMS.md: 0.7, 0.9, Nesterov).

    Raises:
        TypeError, ValueError: as `noloco_outer_`.
    """
    _diloco("auto", phis, momenta, outer_grads, thetas, lr, momentum, nesterov)


def diloco_outer_ref_(
    phis: Tensors,
    momenta: Tensors,
    outer_grads: Tensors,
    thetas: Tensors | None = None,
    *,
    lr: float = 0.7,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> None:
    """`diloco_outer_` on the torch reference path."""
    _diloco("ref", phis, momenta, outer_grads, thetas, lr, momentum, nesterov)


def diloco_outer_triton_(
    phis: Tensors,
    momenta: Tensors,
    outer_grads: Tensors,
    thetas: Tensors | None = None,
    *,
    lr: float = 0.7,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> None:
    """`diloco_outer_` on the Triton path (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _diloco("triton", phis, momenta, outer_grads, thetas, lr, momentum, nesterov)


def _noloco(
    path: str, phis: Tensors, deltas: Tensors, dbar: Tensors, phibar: Tensors | None,
    thetas: Tensors | None, a: float, b: float, c: float,
) -> None:
    named = {"phis": phis, "deltas": deltas, "mean_progress": dbar, "mean_phis": phibar, "thetas": thetas}
    rows = [_NoLoCoRow(*r) for r in _rows(named, {"phis", "deltas", "mean_progress", "mean_phis"})]
    scalars = (fp32_scalar("a", a), fp32_scalar("b", b), fp32_scalar("c", c))
    for row in rows:
        fast = path == "triton" or (path == "auto" and _triton.use_triton(row.phi))
        (_noloco_triton if fast else _noloco_ref)([row], *scalars)


def _diloco(
    path: str, phis: Tensors, momenta: Tensors, grads: Tensors, thetas: Tensors | None,
    lr: float, momentum: float, nesterov: bool,
) -> None:
    named = {"phis": phis, "momenta": momenta, "outer_grads": grads, "thetas": thetas}
    rows = [_DiLoCoRow(*r) for r in _rows(named, {"phis", "momenta", "outer_grads"})]
    lr32, mu32 = fp32_scalar("lr", lr), fp32_scalar("momentum", momentum)
    for row in rows:
        fast = path == "triton" or (path == "auto" and _triton.use_triton(row.phi))
        (_diloco_triton if fast else _diloco_ref)([row], lr32, mu32, bool(nesterov))


# --- checks -------------------------------------------------------------------------------


class _NoLoCoRow(NamedTuple):
    phi: torch.Tensor
    delta: torch.Tensor
    dbar: torch.Tensor
    phibar: torch.Tensor | None
    theta: torch.Tensor | None


class _DiLoCoRow(NamedTuple):
    phi: torch.Tensor
    mom: torch.Tensor
    grad: torch.Tensor
    theta: torch.Tensor | None


def _rows(named: dict[str, Tensors | None], state: set[str]) -> list[Any]:
    """Zip the lists into rows, checking lengths, shapes, devices, dtypes and contiguity."""
    lists = {k: list(v) for k, v in named.items() if v is not None}
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all lists must have the same length, got {lengths}")
    rows: list[Any] = []
    for i in range(next(iter(lengths.values()))):
        ref = lists["phis"][i]
        for name, values in lists.items():
            t = values[i]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != ref.shape or t.device != ref.device:
                raise ValueError(f"{name}[{i}] must match phis[{i}] ({tuple(ref.shape)} on {ref.device}), "
                                 f"got {tuple(t.shape)} on {t.device}")
            if name in state and t.dtype != torch.float32:
                raise TypeError(f"{name}[{i}] must be float32 (outer state is fp32), got {t.dtype}")
            storage_kind(t.dtype)
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous; call .contiguous()")
        rows.append([lists[k][i] if k in lists else None for k in named])
    return rows


# --- torch reference ----------------------------------------------------------------------


def _chunks(n: int) -> range:
    return range(0, n, _CHUNK)


@torch.no_grad()
def _noloco_ref(rows: list[_NoLoCoRow], a: float, b: float, c: float) -> None:
    for phi, delta, dbar, phibar, theta in rows:
        p, d, g = phi.view(-1), delta.view(-1), dbar.view(-1)
        pull = scratch("outer_pull", min(_CHUNK, p.numel()), torch.float32, p.device) if phibar is not None else None
        for lo in _chunks(p.numel()):
            s = slice(lo, lo + _CHUNK)
            ds = d[s].mul_(b).add_(g[s], alpha=a)
            if phibar is not None and pull is not None:
                t = torch.sub(phibar.view(-1)[s], p[s], out=pull[: ds.numel()])
                ds.add_(t, alpha=c)
            p[s].add_(ds)
            if theta is not None:
                theta.view(-1)[s].copy_(p[s])


@torch.no_grad()
def _diloco_ref(rows: list[_DiLoCoRow], lr: float, mu: float, nesterov: bool) -> None:
    for phi, mom, grad, theta in rows:
        p, m, g = phi.view(-1), mom.view(-1), grad.view(-1)
        step_buf = scratch("outer_step", min(_CHUNK, p.numel()), torch.float32, p.device) if nesterov else None
        for lo in _chunks(p.numel()):
            s = slice(lo, lo + _CHUNK)
            ms = m[s].mul_(mu).add_(g[s])  # SGD: buf.mul_(momentum).add_(grad, alpha=1 - 0)
            step = torch.add(g[s], ms, alpha=mu, out=step_buf[: ms.numel()]) if step_buf is not None else ms
            p[s].add_(step, alpha=-lr)  # SGD: param.add_(grad, alpha=-lr)
            if theta is not None:
                theta.view(-1)[s].copy_(p[s])


# --- Triton -------------------------------------------------------------------------------


def _launch_ctx(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.no_grad()
def _noloco_triton(rows: list[_NoLoCoRow], a: float, b: float, c: float) -> None:
    mod = _triton.module("outer")
    for phi, delta, dbar, phibar, theta in rows:
        n = phi.numel()
        if n == 0:
            continue
        with _launch_ctx(phi):
            mod.noloco_kernel[(-(-n // _BLOCK),)](
                phi, delta, dbar, phibar if phibar is not None else phi, theta if theta is not None else phi,
                n, a, b, c,
                CONSENSUS=phibar is not None, THETA=theta is not None,
                THETA_KIND=storage_kind(theta.dtype) if theta is not None else 0,
                BLOCK=_BLOCK, enable_fp_fusion=False,
            )


@torch.no_grad()
def _diloco_triton(rows: list[_DiLoCoRow], lr: float, mu: float, nesterov: bool) -> None:
    mod = _triton.module("outer")
    for phi, mom, grad, theta in rows:
        n = phi.numel()
        if n == 0:
            continue
        with _launch_ctx(phi):
            mod.diloco_kernel[(-(-n // _BLOCK),)](
                phi, mom, grad, theta if theta is not None else phi, n, mu, -lr,
                NESTEROV=nesterov, THETA=theta is not None,
                THETA_KIND=storage_kind(theta.dtype) if theta is not None else 0,
                BLOCK=_BLOCK, enable_fp_fusion=False,
            )
