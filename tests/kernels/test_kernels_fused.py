"""The encoder fused with top-k: the Triton kernel (interpreted on CPU) and the chunked torch
reference against a float64 GEMM + topk, the dispatcher's choice and log line, and TopKSAE.encode.

Top-k is compared as sets of values (ties may pick any of the equal latents): the returned values
must be the k largest pre-activations, and each returned index must hold its returned value.
TRITON_INTERPRET is set while the kernel module is imported, as in test_kernels.py.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from saetrain.kernels import ops, reference

from saetrain.dictionaries import SparseCodes, TopKSAE
from tests.helpers.interpreted_triton import import_interpreted_triton_ops

triton_ops = import_interpreted_triton_ops()

needs_triton = pytest.mark.skipif(triton_ops is None, reason="triton is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Interpreted Triton for CPU tensors; counts fused-kernel launches so that no dispatcher test
    passes on the reference alone."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SAETRAIN_KERNELS", raising=False)
    monkeypatch.setattr(ops, "FORCE_REFERENCE", False)
    monkeypatch.setattr(ops, "_triton", triton_ops)
    calls = {"topk_encode": 0}
    original = triton_ops.topk_encode

    def counted(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls["topk_encode"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "topk_encode", counted)
    return calls


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(N: int, d: int, n: int, dtype: torch.dtype, seed: int = 0, kind: str = "random"):
    g = _gen(seed)
    if kind == "ties":  # small integers: exact in fp16 and fp32, many equal pre-activations
        x = torch.randint(-2, 3, (N, d), generator=g).float()
        W = torch.randint(-1, 2, (d, n), generator=g).float()
        W[:, 1::3] = W[:, 0:-1:3]  # duplicate columns: equal pre-activations in every row
        b_enc = torch.zeros(n)
        b_dec = torch.randint(-1, 2, (d,), generator=g).float()
    else:
        x = torch.randn(N, d, generator=g)
        W = torch.randn(d, n, generator=g) / d**0.5
        b_enc = 0.1 * torch.randn(n, generator=g)
        b_dec = 0.1 * torch.randn(d, generator=g)
        if kind == "negative":
            b_enc -= 10.0  # every pre-activation negative
    return x.to(dtype), W.to(dtype), b_enc.to(dtype), b_dec.to(dtype)


def _pre64(
    x: torch.Tensor, W: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None
) -> torch.Tensor:
    """Float64 pre-activations from x − b_dec rounded in the input dtype, as the encoder does."""
    rows = x if b_dec is None else x - b_dec
    return rows.double() @ W.double() + b_enc.double()


def _check_topk(
    values: torch.Tensor, indices: torch.Tensor, pre64: torch.Tensor, k: int, dtype: torch.dtype
) -> None:
    N, n = pre64.shape
    assert values.shape == indices.shape == (N, k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert bool(((indices >= 0) & (indices < n)).all())
    assert all(len(set(row.tolist())) == k for row in indices)  # k distinct latents per row
    assert bool((values[:, :-1] >= values[:, 1:]).all())  # descending, like torch.topk
    want = pre64.topk(k, dim=-1).values
    torch.testing.assert_close(values.double(), want, **TOL[dtype])
    torch.testing.assert_close(pre64.gather(1, indices), values.double(), **TOL[dtype])


# (name, N, d, n, k, splits, block_m, block_n): 16-row and 16-column blocks at tiny shapes, so N
# and n cross block edges; "splits" leaves its last split 6 columns (< k), padded with -inf.
CASES = [
    ("edges", 21, 20, 37, 5, 1, 16, 16),
    ("k1", 18, 12, 41, 1, 1, 16, 16),
    ("k_is_block", 7, 24, 50, 16, 1, 16, 16),
    ("splits", 17, 16, 70, 8, 3, 16, 16),
    ("wide_block", 9, 40, 45, 3, 1, 16, 32),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_kernel_matches_float64_topk(case, dtype, interpret):
    name, N, d, n, k, splits, block_m, block_n = case
    x, W, b_enc, b_dec = _inputs(N, d, n, dtype)
    values, indices = triton_ops.topk_encode(
        x, W, b_enc, k, b_dec, splits=splits, block_m=block_m, block_n=block_n, block_d=16
    )
    assert interpret == {"topk_encode": 1}
    pre64 = _pre64(x, W, b_enc, b_dec)
    _check_topk(values, indices, pre64, k, dtype)
    assert float(values.abs().max()) > 0.1
    ref_values, ref_indices = reference.topk_encode(x, W, b_enc, k, b_dec)
    torch.testing.assert_close(values, ref_values, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kernel_negative_pre_activations_without_b_dec(dtype, interpret):
    x, W, b_enc, _ = _inputs(19, 16, 40, dtype, seed=1, kind="negative")
    values, indices = triton_ops.topk_encode(
        x, W, b_enc, 6, None, splits=2, block_m=16, block_n=16, block_d=16
    )
    pre64 = _pre64(x, W, b_enc, None)
    assert float(pre64.max()) < -5.0
    _check_topk(values, indices, pre64, 6, dtype)
    assert bool((values < -5.0).all())  # not the zeros or -inf of padding


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kernel_ties(dtype, interpret):
    N, d, n, k = 13, 16, 40, 7
    x, W, b_enc, b_dec = _inputs(N, d, n, dtype, seed=2, kind="ties")
    pre64 = _pre64(x, W, b_enc, b_dec)
    kth = pre64.topk(k, dim=-1).values[:, -1:]
    assert int((pre64 == kth).sum()) > 2 * N  # the k-th value is shared: a real tie to break
    for splits in (1, 2):
        values, indices = triton_ops.topk_encode(
            x, W, b_enc, k, b_dec, splits=splits, block_m=16, block_n=16, block_d=16
        )
        _check_topk(values, indices, pre64, k, dtype)
        # Integers: the value lists and the values at the returned indices are exact.
        assert torch.equal(values.double(), pre64.topk(k, dim=-1).values)
        assert torch.equal(pre64.gather(1, indices), values.double())
    assert interpret == {"topk_encode": 2}


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64_topk_in_chunks(dtype, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 3 * 37)  # 3-row chunks
    x, W, b_enc, b_dec = _inputs(10, 20, 37, dtype)
    values, indices = reference.topk_encode(x, W, b_enc, 5, b_dec)
    _check_topk(values, indices, _pre64(x, W, b_enc, b_dec), 5, dtype)
    pre = torch.addmm(b_enc, x - b_dec, W)  # the unfused encoder (BLAS blocking may differ)
    torch.testing.assert_close(values, pre.topk(5, dim=-1).values, **TOL[dtype])


# -- the dispatcher -----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatcher_runs_the_kernel(dtype, interpret):
    x, W, b_enc, b_dec = _inputs(20, 16, 70, dtype, seed=3)
    values, indices = ops.fused_topk_encode(x, W, b_enc, 9, b_dec)
    assert interpret == {"topk_encode": 1}
    _check_topk(values, indices, _pre64(x, W, b_enc, b_dec), 9, dtype)
    assert triton_ops.TOPK_MAX_K == ops.FUSED_TOPK_MAX_K


@needs_triton
def test_dispatcher_falls_back_for_large_k_and_says_so_once(interpret, monkeypatch, caplog):
    monkeypatch.setattr(ops, "_logged", set())
    x, W, b_enc, b_dec = _inputs(3, 8, 150, torch.float32, seed=4)
    with caplog.at_level(logging.INFO, logger="saetrain.kernels.ops"):
        for _ in range(2):
            values, indices = ops.fused_topk_encode(x, W, b_enc, 130, b_dec)
    assert interpret == {"topk_encode": 0}
    assert [r.getMessage() for r in caplog.records] == [
        "Triton sparse kernels not used (fused top-k encode needs 1 <= k <= 128, not k = 130): "
        "running the torch reference ops"
    ]
    _check_topk(values, indices, _pre64(x, W, b_enc, b_dec), 130, torch.float32)


@needs_triton
def test_a_triton_without_tl_topk_keeps_the_fused_encoder_on_the_reference(
    interpret, monkeypatch, caplog
):
    """Triton < 3.4 has no tl.topk: the fused encoder is not launched (it would fail to build and
    turn every kernel off), the reason is logged, the other kernels stay on."""
    monkeypatch.setattr(ops, "_logged", set())
    monkeypatch.setattr(triton_ops, "HAS_FUSED_TOPK", False)
    x, W, b_enc, b_dec = _inputs(6, 8, 40, torch.float32, seed=9)
    with caplog.at_level(logging.INFO, logger="saetrain.kernels.ops"):
        values, indices = ops.fused_topk_encode(x, W, b_enc, 5, b_dec)
    assert interpret == {"topk_encode": 0}
    assert "needs Triton >= 3.4" in caplog.text
    _check_topk(values, indices, _pre64(x, W, b_enc, b_dec), 5, torch.float32)
    assert ops.use_triton(W) and ops._triton_error is None


# -- TopKSAE.encode -------------------------------------------------------------------------------


def _sae(transcoder: bool, dtype: torch.dtype = torch.float32) -> TopKSAE:
    d_out = 10 if transcoder else None
    sae = TopKSAE(12, 50, d_out, k=4, generator=_gen(5), dtype=dtype)
    with torch.no_grad():
        sae.b_dec.normal_(0.0, 0.2, generator=_gen(6))
        sae.b_enc.normal_(0.0, 0.2, generator=_gen(7))
    return sae


def _dense(codes: SparseCodes, n: int) -> torch.Tensor:
    return reference.dense_codes(codes.indices, codes.values.double(), n)


@needs_triton
@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_topk_encode_uses_the_fused_kernel_without_autograd(transcoder, interpret):
    sae = _sae(transcoder)
    x = torch.randn(9, 12, generator=_gen(8))
    dense_path = sae._select(sae.pre_activations(x))
    codes = sae.encode(x)  # autograd on: the dense path, which training-style callers rely on
    assert interpret == {"topk_encode": 0}
    assert codes.values.requires_grad
    with torch.no_grad():
        fused = sae.encode(x)
    assert interpret == {"topk_encode": 1}
    torch.testing.assert_close(_dense(fused, 50), _dense(dense_path.detach(), 50).detach())
    assert float(fused.values.max()) > 0.1


def test_topk_encode_on_cpu_is_the_dense_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SAETRAIN_KERNELS", raising=False)
    sae = _sae(False)
    x = torch.randn(9, 12, generator=_gen(9))
    with torch.no_grad():
        want = sae._select(sae.pre_activations(x))
        got = sae.encode(x)
    assert not ops.use_fused_topk(x, sae.W_enc, sae.k)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
