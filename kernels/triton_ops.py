"""Triton kernels for the sparse part of a TopK-family training step.

Importing this module decorates the kernels; under `TRITON_INTERPRET=1` (read by Triton at that
moment) they become interpreted Python that runs on CPU tensors — how CI tests them. Callers go
through `saetrain.kernels.ops`, which decides whether these or the torch reference run.

Three primitives cover the decoder forward and backward and the encoder backward:

- `decode`: out[i] = Σ_j v[i, j] · W[idx[i, j]]   (decoder forward; also dx = Σ_j gpre · W_encᵀ)
- `gather_dot`: out[i, j] = ⟨g[i], W[idx[i, j]]⟩    (dv, the gradient wrt the code values)
- `segment_reduce`: out[m] = Σ_{idx[i, j] = m} v[i, j] · R[i]   (dW_dec with R = g; dW_encᵀ with
  R = x and v = the gradient at the kept pre-activations)

`segment_reduce` uses a sort, not atomics: the flat indices are sorted once (`sort_plan`), and
one program per (latent, column block) walks its latent's segment and writes its output once.
Every output row is written exactly once (zeros for latents no row chose), so the result is
deterministic, needs no zero-fill, and accumulates in fp32 registers even for bf16 weights;
fp32 atomics would need a zeroed fp32 buffer plus a cast pass and give run-to-run differences.
A latent chosen by many rows is walked by one program in BLOCK_E-entry steps; that skew is what
a GPU measurement should check (scripts/bench_kernels.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from saetrain.kernels.reference import SortPlan

# Whether these kernels were built as interpreted Python (they then run on CPU tensors); Triton
# decides it from the same variable when the decorators below run.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


@triton.jit
def _decode_kernel(
    idx_ptr,
    val_ptr,
    w_ptr,
    out_ptr,
    K,
    D,
    stride_w_row,
    stride_w_col,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        idx = tl.load(idx_ptr + row * K + ks, mask=k_ok, other=0).to(tl.int64)
        val = tl.load(val_ptr + row * K + ks, mask=k_ok, other=0.0).to(tl.float32)
        w_ptrs = w_ptr + idx[:, None] * stride_w_row + cols[None, :] * stride_w_col
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(val[:, None] * w, axis=0)
    tl.store(out_ptr + row * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gather_dot_kernel(
    g_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    K,
    D,
    stride_w_row,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    idx = tl.load(idx_ptr + row * K + ks, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(g_ptr + row * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        w_ptrs = w_ptr + idx[:, None] * stride_w_row + cols[None, :]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * K + ks, acc.to(out_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _segment_reduce_kernel(
    perm_ptr,
    starts_ptr,
    val_ptr,
    r_ptr,
    out_ptr,
    K,
    D,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(starts_ptr + latent)
    end = tl.load(starts_ptr + latent + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        flat = tl.load(perm_ptr + es, mask=e_ok, other=0).to(tl.int64)
        val = tl.load(val_ptr + flat, mask=e_ok, other=0.0).to(tl.float32)
        rows = flat // K
        r_ptrs = r_ptr + rows[:, None] * D + cols[None, :]
        r = tl.load(r_ptrs, mask=e_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(val[:, None] * r, axis=0)
    out_ptrs = out_ptr + latent.to(tl.int64) * D + cols
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def decode(indices: torch.Tensor, values: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """[N, d] = Σ_j values[i, j] · W[indices[i, j]]; W may be strided (e.g. W_encᵀ)."""
    N, K = indices.shape
    D = W.shape[1]
    out = torch.empty(N, D, dtype=W.dtype, device=W.device)
    if N == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    idx = indices.contiguous()
    val = values.contiguous()
    block_d = _block(D, 128)
    block_k = _block(K, 16)
    grid = (N, triton.cdiv(D, block_d))
    _decode_kernel[grid](
        idx, val, W, out, K, D, W.stride(0), W.stride(1), BLOCK_K=block_k, BLOCK_D=block_d
    )
    return out


def gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """[N, k] = ⟨g[i], W[indices[i, j]]⟩ in g's dtype (fp32 accumulation)."""
    N, K = indices.shape
    D = W.shape[1]
    out = torch.empty(N, K, dtype=g.dtype, device=g.device)
    if N == 0 or K == 0:
        return out
    if D == 0:
        return out.zero_()
    W = W if W.stride(1) == 1 else W.contiguous()
    block_k = _block(K, 32)
    block_d = _block(D, 128)
    grid = (N, triton.cdiv(K, block_k))
    _gather_dot_kernel[grid](
        g.contiguous(), indices.contiguous(), W, out, K, D, W.stride(0),
        BLOCK_K=block_k, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def segment_reduce(
    plan: SortPlan, values: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """[n, d]: out[m] = Σ over latent m's entries of values[i, j] · rows[i] (see module doc)."""
    N, K = values.shape
    D = rows.shape[1]
    out = torch.empty(n_latents, D, dtype=rows.dtype, device=rows.device)
    if n_latents == 0 or D == 0:
        return out
    block_d = _block(D, 128)
    grid = (n_latents, triton.cdiv(D, block_d))
    _segment_reduce_kernel[grid](
        plan.perm, plan.starts, values.contiguous(), rows.contiguous(), out, K, D,
        BLOCK_E=16, BLOCK_D=block_d,
    )  # fmt: skip
    return out
