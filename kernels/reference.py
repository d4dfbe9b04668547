"""Torch reference implementations of the sparse dictionary ops.

They are the CPU path and the oracle the Triton kernels (`triton_ops.py`) are tested against. All
take TopK-family codes as (indices [N, k] int64, values [N, k]); indices may repeat within a row
(padded codes repeat them with value 0), and every op is then additive. Nothing here forms a
dense [N, n_latents] tensor; temporaries of [rows, k, d] (and the [rows, n] pre-activations of
`topk_encode`) are bounded by working in row chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Rows per chunk are chosen so that a [rows, k, d] temporary stays under this many elements.
_CHUNK_ELEMENTS = 1 << 24


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """x̂[i] = Σ_j values[i, j] · W_dec[indices[i, j]]  (no bias).

    indices, values: [N, k]; W_dec: [n_latents, d]. Costs O(N·k·d) rather than the O(N·n·d) of a
    dense product with the scattered codes; differentiable in `values` and `W_dec`.
    """
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """out[i, j] = ⟨g[i], W[indices[i, j]]⟩: the decoder's gradient wrt the code values.

    g: [N, d]; W: [n, d]. Accumulates in fp32, returns g's dtype.
    """
    N, k = indices.shape
    out = torch.empty(N, k, dtype=torch.float32, device=g.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * W.shape[1]))
    for s in range(0, N, step):
        gathered = W[indices[s : s + step]].float()  # [c, k, d]
        out[s : s + step] = torch.bmm(gathered, g[s : s + step, :, None].float())[..., 0]
    return out.to(g.dtype)


def sparse_transpose_product(
    indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """out[m] = Σ_{(i, j): indices[i, j] = m} values[i, j] · rows[i]   → [n_latents, d].

    With rows = the output gradient g it is dW_dec; with rows = the encoder input x and values =
    the gradient at the kept pre-activations it is dW_encᵀ. Accumulates in fp32 (index_add_ into
    an fp32 buffer), returns rows' dtype.
    """
    N, k = indices.shape
    d = rows.shape[1]
    out = torch.zeros(n_latents, d, dtype=torch.float32, device=rows.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * d))
    for s in range(0, N, step):
        idx = indices[s : s + step]
        contrib = values[s : s + step, :, None].float() * rows[s : s + step, None, :].float()
        out.index_add_(0, idx.reshape(-1), contrib.reshape(-1, d))
    return out.to(rows.dtype)


def scatter_sum(indices: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """out[m] = Σ_{indices[i, j] = m} values[i, j]: the encoder bias gradient (fp32 accumulate)."""
    out = torch.zeros(n_latents, dtype=torch.float32, device=values.device)
    return out.index_add_(0, indices.reshape(-1), values.reshape(-1).float()).to(values.dtype)


class SortPlan(NamedTuple):
    """The flat codes sorted by latent, computed once and shared by every segmented reduction.

    perm [N·k]: flat positions (i·k + j) in latent order; starts [n + 1]: latent m's entries are
    perm[starts[m]:starts[m + 1]].
    """

    perm: torch.Tensor
    starts: torch.Tensor


def sort_plan(indices: torch.Tensor, n_latents: int) -> SortPlan:
    """Sort the flat indices once (O(N·k log)); the segmented kernels then need no atomics."""
    flat = indices.reshape(-1)
    _, perm = torch.sort(flat)
    counts = torch.bincount(flat, minlength=n_latents)
    starts = torch.zeros(n_latents + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return SortPlan(perm, starts)


def dense_codes(indices: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """[N, n] with the codes summed in (repeated indices add): the dense oracle's input."""
    dense = values.new_zeros(values.shape[0], n_latents)
    return dense.scatter_add_(1, indices, values)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk((x − b_dec)·W_enc + b_enc, k) → (values [N, k] descending, indices [N, k]).

    The oracle of the fused encoder/top-k kernel and its fallback: the same GEMM + topk as the
    unfused encoder, in row chunks so that only a [rows, n] slice of the pre-activations lives.
    """
    N, n = x.shape[0], W_enc.shape[1]
    values = torch.empty(N, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(N, k, dtype=torch.int64, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n))
    for s in range(0, N, step):
        rows = x[s : s + step] if b_dec is None else x[s : s + step] - b_dec
        top = torch.addmm(b_enc, rows, W_enc).topk(k, dim=-1)
        values[s : s + step] = top.values
        indices[s : s + step] = top.indices
    return values, indices
