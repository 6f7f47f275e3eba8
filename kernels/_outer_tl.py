"""Triton side of `outer.py`: the NoLoCo and DiLoCo (Nesterov SGD) outer steps in one pass.

Imported lazily through `_triton.module("outer")`. Launched with enable_fp_fusion=False and
explicit `tl.fma` exactly where torch's CPU `add(..., alpha=)` fuses (its vectorized kernel is
an fma), so on x86 builds of torch the two paths agree bit for bit; the documented contract is
agreement up to fused-multiply-add rounding (a few ulp).
"""

import triton
import triton.language as tl

from hyphae.kernels._perturb_tl import from_f32


@triton.jit
def noloco_kernel(
    phi_ptr, delta_ptr, dbar_ptr, phibar_ptr, theta_ptr, n, a, b, c,
    CONSENSUS: tl.constexpr, THETA: tl.constexpr, THETA_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """delta <- b*delta + a*Dbar + c*(phibar - phi); phi <- phi + delta; theta <- phi."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.cast(n, tl.int64)
    phi = tl.load(phi_ptr + offs, mask=mask, other=0.0)
    d = tl.load(delta_ptr + offs, mask=mask, other=0.0) * b
    d = tl.fma(tl.load(dbar_ptr + offs, mask=mask, other=0.0), a, d)
    if CONSENSUS:
        pull = tl.load(phibar_ptr + offs, mask=mask, other=0.0) - phi
        d = tl.fma(pull, c, d)
    phi = phi + d
    tl.store(delta_ptr + offs, d, mask=mask)
    tl.store(phi_ptr + offs, phi, mask=mask)
    if THETA:
        tl.store(theta_ptr + offs, from_f32(phi, THETA_KIND), mask=mask)


@triton.jit
def diloco_kernel(
    phi_ptr, mom_ptr, grad_ptr, theta_ptr, n, mu, neg_lr,
    NESTEROV: tl.constexpr, THETA: tl.constexpr, THETA_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """torch.optim.SGD(momentum=mu, nesterov) on phi with gradient Delta; theta <- phi."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.cast(n, tl.int64)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    m = tl.load(mom_ptr + offs, mask=mask, other=0.0) * mu + g  # torch: buf.mul_(mu).add_(g)
    if NESTEROV:
        step = tl.fma(m, mu, g)  # torch: g.add(buf, alpha=mu)
    else:
        step = m
    phi = tl.fma(step, neg_lr, tl.load(phi_ptr + offs, mask=mask, other=0.0))  # phi.add_(step, alpha=-lr)
    tl.store(mom_ptr + offs, m, mask=mask)
    tl.store(phi_ptr + offs, phi, mask=mask)
    if THETA:
        tl.store(theta_ptr + offs, from_f32(phi, THETA_KIND), mask=mask)
