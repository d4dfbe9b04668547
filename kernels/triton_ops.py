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

`topk_encode` (inference/eval, no autograd) fuses the encoder GEMM with the top-k selection so
that the [N, n] pre-activations are never written; see the section above it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from saetrain.kernels.reference import SortPlan

# Whether these kernels were built as interpreted Python (they then run on CPU tensors); Triton
# decides it from the same variable when the decorators below run.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


# The launch parameters each wrapper below picks; kernels/compile_check.py compiles exactly these
# ahead of time for a GPU target, so they live in one place.


def decode_config(K: int, D: int) -> dict[str, int]:
    return {"BLOCK_K": _block(K, 16), "BLOCK_D": _block(D, 128)}


def gather_dot_config(K: int, D: int) -> dict[str, int]:
    return {"BLOCK_K": _block(K, 32), "BLOCK_D": _block(D, 128)}


def segment_reduce_config(D: int) -> dict[str, int]:
    return {"BLOCK_E": 16, "BLOCK_D": _block(D, 128)}


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
    row = tl.program_id(0).to(tl.int64)  # row · D passes 2³¹ at ~930k rows of d 2304
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
    row = tl.program_id(0).to(tl.int64)  # row · D passes 2³¹ at ~930k rows of d 2304
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
    config = decode_config(K, D)
    grid = (N, triton.cdiv(D, config["BLOCK_D"]))
    _decode_kernel[grid](idx, val, W, out, K, D, W.stride(0), W.stride(1), **config)
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
    config = gather_dot_config(K, D)
    grid = (N, triton.cdiv(K, config["BLOCK_K"]))
    _gather_dot_kernel[grid](
        g.contiguous(), indices.contiguous(), W, out, K, D, W.stride(0), **config
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
    config = segment_reduce_config(D)
    grid = (n_latents, triton.cdiv(D, config["BLOCK_D"]))
    _segment_reduce_kernel[grid](
        plan.perm, plan.starts, values.contiguous(), rows.contiguous(), out, K, D, **config
    )  # fmt: skip
    return out


# -- the encoder fused with the top-k selection --------------------------------------------------
#
# The [N, n] pre-activations are never written: each program owns BLOCK_M rows and walks its
# share of W_enc's columns in BLOCK_N tiles, keeping a running best list of K_PAD candidates per
# row in registers. A candidate is one int64 key, (order-preserving int32 bits of the value) << 32
# | (2³¹ − 1 − column), so one integer sort moves value and index together and ties go to the
# lower column. Per tile: tl.topk picks the tile's best K_PAD (descending); the elementwise max
# with the running list (ascending) is a bitonic sequence holding the top K_PAD of both, which
# tl.bitonic_merge sorts back in O(K_PAD log K_PAD) — no full re-sort of the union.

TOPK_MAX_K = 128
# tl.topk and tl.bitonic_merge arrived in Triton 3.4; with an older Triton (torch < 2.8 brings
# one) the other kernels still run and the fused encoder is left to the reference.
HAS_FUSED_TOPK: bool = hasattr(tl, "topk") and hasattr(tl, "bitonic_merge")


@triton.jit
def _pad_key(ROWS: tl.constexpr, COLS: tl.constexpr):
    # INT64_MIN: no real key is lower (a NaN with every bit set is the only one that ties).
    return tl.full([ROWS, COLS], -2147483648, tl.int32).to(tl.int64) << 32


@triton.jit
def _topk_encode_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
    val_ptr,
    idx_ptr,
    N,
    D,
    n,
    K,
    tiles_per_split,
    stride_xm,
    stride_xd,
    stride_wd,
    stride_wn,
    stride_out,
    HAS_B_DEC: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < N
    pad = _pad_key(BLOCK_M, K_PAD)
    best = pad  # ascending along the last axis
    col_start = split * tiles_per_split * BLOCK_N
    col_end = tl.minimum(n, col_start + tiles_per_split * BLOCK_N)
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            x_ptrs = x_ptr + rows[:, None] * stride_xm + ds[None, :] * stride_xd
            x = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if HAS_B_DEC:  # subtracted in the input dtype, as the unfused x − b_dec is
                x = x - tl.load(b_dec_ptr + ds, mask=d_ok, other=0.0)[None, :]
            w_ptrs = w_ptr + ds[:, None].to(tl.int64) * stride_wd + cols[None, :] * stride_wn
            w = tl.load(w_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        acc += tl.load(b_enc_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ROUND:  # select on the values the unfused pre-activations would hold
            acc = acc.to(val_ptr.dtype.element_ty).to(tl.float32)
        bits = acc.to(tl.int32, bitcast=True)
        high = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        low = (2147483647 - cols).to(tl.int64)
        key = tl.where(col_ok[None, :], (high << 32) | low[None, :], _pad_key(BLOCK_M, BLOCK_N))
        top = tl.topk(key, K_PAD)  # descending
        best = tl.bitonic_merge(tl.maximum(best, top), descending=False)
    best = tl.flip(best, 1)  # descending
    valid = best > pad
    high = (best >> 32).to(tl.int32)
    bits = tl.where(high < 0, high ^ 0x7FFFFFFF, high)
    values = tl.where(valid, bits.to(tl.float32, bitcast=True), float("-inf"))
    indices = tl.where(valid, 2147483647 - best.to(tl.int32), 0).to(tl.int64)
    slots = tl.arange(0, K_PAD)
    out = rows[:, None] * stride_out + split * K + slots[None, :]
    ok = row_ok[:, None] & (slots < K)[None, :]
    tl.store(val_ptr + out, values.to(val_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + out, indices, mask=ok)


def _topk_splits(row_tiles: int, n_tiles: int, device: torch.device) -> int:
    """Column splits so that about two programs per SM run: N/BLOCK_M row tiles alone leave most
    of a GPU idle at N = 4096. Each split's K candidates per row are merged by one torch.topk."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(2 * sms, row_tiles)))


def topk_encode_config(
    k: int,
    dtype: torch.dtype,
    has_b_dec: bool,
    ieee: bool,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
) -> dict[str, Any]:
    """The fused encoder's constexprs and num_warps for k and the input dtype (see above)."""
    k_pad = max(2, triton.next_power_of_2(k))
    block_n = block_n or max(k_pad, 64)
    if block_n < k_pad:
        raise ValueError(f"block_n = {block_n} must be at least k padded to {k_pad}")
    return {
        "HAS_B_DEC": has_b_dec,
        "ROUND": dtype != torch.float32,
        "PRECISION": "ieee" if ieee else "tf32",
        "K_PAD": k_pad,
        "BLOCK_M": block_m or (32 if k_pad >= 64 else 64),
        "BLOCK_N": block_n,
        "BLOCK_D": block_d or 32,
        "num_warps": 8 if k_pad >= 128 else 4,
    }


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk((x − b_dec)·W_enc + b_enc, k) as (values [N, k] descending, indices [N, k])
    without the [N, n] pre-activations; k ≤ TOPK_MAX_K (padded to a power of two inside)."""
    N, D = x.shape
    n = W_enc.shape[1]
    if not 1 <= k <= min(n, TOPK_MAX_K):
        raise ValueError(f"k = {k} must be in [1, min(n_latents = {n}, {TOPK_MAX_K})]")
    # fp32: exact products unless torch's own GEMM would use TF32 too (16-bit inputs ignore it).
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    config = topk_encode_config(
        k, x.dtype, b_dec is not None, ieee, block_m=block_m, block_n=block_n, block_d=block_d
    )
    n_tiles = triton.cdiv(n, config["BLOCK_N"])
    row_tiles = triton.cdiv(N, config["BLOCK_M"])
    splits = max(1, min(n_tiles, splits or _topk_splits(row_tiles, n_tiles, x.device)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    values = torch.empty(N, splits * k, dtype=x.dtype, device=x.device)
    indices = torch.empty(N, splits * k, dtype=torch.int64, device=x.device)
    if N == 0:
        return values, indices
    _topk_encode_kernel[(row_tiles, splits)](
        x, W_enc, b_enc, b_dec if b_dec is not None else b_enc, values, indices,
        N, D, n, k, tiles_per_split,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), splits * k,
        **config,
    )  # fmt: skip
    if splits > 1:
        values, best = values.topk(k, dim=1)
        indices = indices.gather(1, best)
    return values, indices
