"""Sparse ops for the TopK family, with autograd, dispatched to Triton or the torch reference.

The dictionaries call `sparse_decode` and `encode_gather`; the backward of each is sparse in the
codes, O(N·k·d), and never forms a dense [N, n_latents] tensor:

- decoder: dv[i, j] = ⟨g[i], W_dec[idx[i, j]]⟩ (gather-dot) and dW_dec = the sorted segmented
  reduction Σ v·g per latent (`segment_reduce`);
- encoder, restricted to the gathered (kept and AuxK) pre-activations: dW_encᵀ is the same
  segmented reduction with x in place of g, db_enc a scatter-add, dx = Σ_j gpre[i, j]·W_enc[:, m].

`fused_topk_encode` is the encoder fused with the top-k selection for inference and eval (no
autograd): (values, indices) of torch.topk((x − b_dec)·W_enc + b_enc, k) without writing the
[N, n] pre-activations. Training keeps the dense pre (AuxK needs it over the dead latents).

Triton runs when every tensor is on CUDA (or on CPU with `TRITON_INTERPRET=1`, the tests' mode)
and the dtype is fp32, fp16 or bf16. Otherwise the reference runs and the reason is logged once
(no silent fallback). `SAETRAIN_KERNELS=reference` in the environment, or `FORCE_REFERENCE =
True` here, forces the reference (tests, benchmarks).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

import torch
from saetrain.kernels import reference

logger = logging.getLogger(__name__)

FORCE_REFERENCE: bool = False
FUSED_TOPK_MAX_K = 128  # triton_ops.TOPK_MAX_K: the running best lists live in registers
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_logged: set[str] = set()
_triton: ModuleType | None = None
_triton_error: str | None = None


def _log_fallback(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.info("Triton sparse kernels not used (%s): running the torch reference ops", reason)


def _attempt(kernel: str, *args: Any) -> Any:
    """Run a Triton kernel; if it fails (a compiler or driver error on an untested GPU), say so
    loudly once, turn Triton off for the rest of the process and return None: the caller then
    runs the torch reference, and a long run is not lost to a kernel that does not build."""
    global _triton_error
    try:
        return getattr(_triton_ops(), kernel)(*args)
    except Exception as exc:  # noqa: BLE001  (any kernel failure falls back, logged)
        _triton_error = f"the Triton kernel `{kernel}` failed ({type(exc).__name__}: {exc})"
        logger.error("%s; using the torch reference ops from now on", _triton_error)
        return None


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_ops() -> ModuleType | None:
    """The kernel module, imported on first need (importing it decides interpreted or not)."""
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            from saetrain.kernels import triton_ops

            _triton = triton_ops
        except ImportError as exc:  # triton absent (e.g. macOS, Windows)
            _triton_error = f"triton cannot be imported: {exc}"
    return _triton if _triton_error is None else None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors; logs the reason once when not."""
    if FORCE_REFERENCE or os.environ.get("SAETRAIN_KERNELS", "") == "reference":
        _log_fallback("forced by SAETRAIN_KERNELS=reference or ops.FORCE_REFERENCE")
        return False
    devices = {t.device.type for t in tensors}
    interpret = _interpret_mode()
    if devices != {"cuda"} and not (interpret and devices == {"cpu"}):
        _log_fallback(f"tensors on {'/'.join(sorted(devices))}, not CUDA")
        return False
    bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point()} - _supported_names())
    if bad:
        _log_fallback(f"dtype {', '.join(bad)} not supported (fp32, fp16, bf16 are)")
        return False
    ops = _triton_ops()
    if ops is None:
        _log_fallback(str(_triton_error))
        return False
    if devices == {"cpu"} and not ops.INTERPRETED:
        _log_fallback("CPU tensors, but the kernels were imported before TRITON_INTERPRET=1")
        return False
    return True


def _supported_names() -> set[str]:
    return {str(d) for d in SUPPORTED_DTYPES}


# -- primitives (no autograd) -------------------------------------------------------------------


def decode_forward(indices: torch.Tensor, values: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Σ_j values[i, j] · W[indices[i, j]] → [N, d] in W's dtype (W may be a strided view)."""
    values = values.to(W.dtype)
    if use_triton(values, W):
        out = _attempt("decode", indices, values, W)
        if out is not None:
            return out
    return reference.sparse_decode(indices, values, W)


def gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """⟨g[i], W[indices[i, j]]⟩ → [N, k] in g's dtype."""
    if use_triton(g, W):
        out = _attempt("gather_dot", g, indices, W)
        if out is not None:
            return out
    if g.device.type == "cpu":
        return _cpu_gather_dot(g, indices, W)
    return reference.gather_dot(g, indices, W)


def segment_reduce(
    indices: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    n_latents: int,
    plan: reference.SortPlan | None = None,
) -> torch.Tensor:
    """[n, d]: out[m] = Σ_{indices[i, j] = m} values[i, j] · rows[i] (sorted, no atomics)."""
    if use_triton(values, rows):
        plan = plan if plan is not None else reference.sort_plan(indices, n_latents)
        out = _attempt("segment_reduce", plan, values, rows, n_latents)
        if out is not None:
            return out
    if rows.device.type == "cpu":
        return _cpu_segment_reduce(indices, values, rows, n_latents)
    return reference.sparse_transpose_product(indices, values, rows, n_latents)


# On CPU the gather-dot and the segmented reduction are fastest as dense products over row chunks:
# a BLAS GEMM beats gathering [N, k, d] rows by 4-5x at SAE shapes on 2 cores (4608 latents, k 32,
# d 576: 60 ms vs 280 ms), and chunks of rows bound the [rows, n] temporaries.
_CPU_CHUNK_ELEMENTS = 1 << 24


def _cpu_rows_per_chunk(n_latents: int) -> int:
    return max(1, _CPU_CHUNK_ELEMENTS // max(1, n_latents))


def _cpu_gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    step = _cpu_rows_per_chunk(W.shape[0])
    Wt = W.to(g.dtype).t()
    parts = [
        (g[s : s + step] @ Wt).gather(1, indices[s : s + step]) for s in range(0, len(g), step)
    ]
    return torch.cat(parts) if parts else g.new_zeros(indices.shape)


def _cpu_segment_reduce(
    indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    step = _cpu_rows_per_chunk(n_latents)
    out = torch.zeros(n_latents, rows.shape[1], dtype=torch.float32)
    for s in range(0, len(rows), step):
        codes = reference.dense_codes(
            indices[s : s + step], values[s : s + step].float(), n_latents
        )
        out.addmm_(codes.t(), rows[s : s + step].float())
    return out.to(rows.dtype)


# -- autograd -------------------------------------------------------------------------------------


class SparseDecode(torch.autograd.Function):
    """x̂ = Σ_j v[i, j] · W_dec[idx[i, j]] with the sparse backward (gather-dot, segments)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(indices, values, W_dec)
        return decode_forward(indices, values, W_dec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        indices, values, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        d_values = d_W = None
        if ctx.needs_input_grad[1]:
            d_values = gather_dot(grad, indices, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            d_W = segment_reduce(indices, values.to(grad.dtype), grad, W_dec.shape[0])
            d_W = d_W.to(W_dec.dtype)
        return None, d_values, d_W


class EncodeGather(torch.autograd.Function):
    """pre[i, idx[i, j]] for pre = x_in·W_enc + b_enc computed by the caller without autograd.

    Forward is a gather from the dense pre-activations (the one dense GEMM of the step); backward
    sends the gradient of the gathered entries to x_in, W_enc and b_enc through the sparse ops:
    dx_in = Σ_j gpre·W_enc[:, idx] (a decode with W_encᵀ), dW_enc = (segments of gpre·x_in)ᵀ,
    db_enc = scatter-add. The dense [N, n] gradient of pre is never formed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        indices: torch.Tensor,
        pre: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x_in, W_enc, indices)
        ctx.n_latents = W_enc.shape[1]
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x_in, W_enc, indices = ctx.saved_tensors
        n = ctx.n_latents
        grad = grad.contiguous()
        d_x = d_W = d_b = None
        if ctx.needs_input_grad[0]:
            # A contiguous W_encᵀ [n, d_in] makes each gathered latent one coalesced row read;
            # reading W_enc's columns in place would touch one cache sector per element.
            d_x = decode_forward(indices, grad, W_enc.t().contiguous()).to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            d_W = segment_reduce(indices, grad.to(x_in.dtype), x_in, n).t().to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            d_b = reference.scatter_sum(indices, grad, n).to(W_enc.dtype)
        return d_x, d_W, d_b, None, None


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j values[i, j] · W_dec[indices[i, j]] (no bias), differentiable in values and W_dec.

    On CPU, torch's own embedding_bag with its autograd: its sparse backward is faster there than
    the gather-dot + segmented reduction, which are built for the GPU.
    """
    if W_dec.device.type == "cpu" and not use_triton(values, W_dec):
        return reference.sparse_decode(indices, values, W_dec)
    return SparseDecode.apply(indices, values, W_dec)


def encode_gather(
    x_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    pre: torch.Tensor,
) -> torch.Tensor:
    """The pre-activations at `indices` [N, k], differentiable in x_in, W_enc and b_enc."""
    return EncodeGather.apply(x_in, W_enc, b_enc, indices, pre.detach())


def topk_encode(
    x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [N, k], ReLU values [N, k], detached pre [N, n]): TopK with a sparse backward."""
    with torch.no_grad():
        pre = torch.addmm(b_enc, x_in, W_enc)
        indices = pre.topk(k, dim=-1, sorted=False).indices
    return indices, encode_gather(x_in, W_enc, b_enc, indices, pre).relu(), pre


# -- the encoder fused with top-k (inference / eval) ----------------------------------------------


def use_fused_topk(x: torch.Tensor, W_enc: torch.Tensor, k: int) -> bool:
    """Whether `fused_topk_encode` runs the Triton kernel; logs the reason once when not."""
    if not 1 <= k <= min(W_enc.shape[1], FUSED_TOPK_MAX_K):
        _log_fallback(f"fused top-k encode needs 1 <= k <= {FUSED_TOPK_MAX_K}, not k = {k}")
        return False
    if not use_triton(x, W_enc):
        return False
    ops = _triton_ops()
    if ops is not None and not ops.HAS_FUSED_TOPK:
        _log_fallback("fused top-k encode needs Triton >= 3.4 (tl.topk, tl.bitonic_merge)")
        return False
    return True


@torch.no_grad()
def fused_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, k] descending, indices [N, k]) of torch.topk((x − b_dec)·W_enc + b_enc, k).

    Triton (`triton_ops.topk_encode`) never writes the [N, n] pre-activations; the reference does
    the GEMM + topk in row chunks. x is cast to W_enc's dtype; b_dec=None skips the subtraction
    (transcoders). No gradient flows: this is the inference/eval encoder.
    """
    x = x.to(W_enc.dtype)
    b_enc = b_enc.contiguous()
    b_dec = None if b_dec is None else b_dec.to(W_enc.dtype).contiguous()
    if use_fused_topk(x, W_enc, k):
        out = _attempt("topk_encode", x, W_enc, b_enc, k, b_dec)
        if out is not None:
            return out
    return reference.topk_encode(x, W_enc, b_enc, k, b_dec)
