"""The sparse ops: Triton kernels (under TRITON_INTERPRET=1, on CPU) and the torch reference
against a dense float64 oracle, their autograd against autograd through dense codes, the
dispatcher's choice and its log line, and TopK-family training steps against a dense step.

Triton reads TRITON_INTERPRET when the kernels are decorated, so it is set while the kernel
module is imported and then restored: the rest of the suite keeps the reference path (fast on
CPU), and the tests here turn interpreted Triton on per test with the `interpret` fixture.
"""

from __future__ import annotations

import logging

import pytest
import torch
from saetrain.kernels import ops, reference

from tests.helpers.interpreted_triton import import_interpreted_triton_ops

triton_ops = import_interpreted_triton_ops()

needs_triton = pytest.mark.skipif(triton_ops is None, reason="triton is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Interpreted Triton for CPU tensors; counts the kernel launches so no test passes on the
    reference alone."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SAETRAIN_KERNELS", raising=False)
    monkeypatch.setattr(ops, "FORCE_REFERENCE", False)
    monkeypatch.setattr(ops, "_triton", triton_ops)
    calls = {"decode": 0, "gather_dot": 0, "segment_reduce": 0}
    for name in calls:
        original = getattr(triton_ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_ops, name, counted)
    return calls


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (name, N, k, n, d): d = 130 and k = 17 cross the 128-column and 16-slot blocks.
CASES = [
    ("random", 6, 5, 11, 37),
    ("k1", 5, 1, 7, 19),
    ("all_equal", 9, 4, 13, 21),
    ("blocks", 3, 17, 29, 130),
]


def _case(name: str, N: int, k: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = _gen(seed)
    indices = torch.randint(0, n, (N, k), generator=g)
    if name == "all_equal":
        indices.fill_(n // 2)  # one latent takes every entry: a segment of N·k > BLOCK_E
    elif k > 1:
        indices[0, 1] = indices[0, 0]  # a repeated index within a row
        indices[1, :] = indices[1, 0]
    values = torch.randn(N, k, generator=g)
    values[values.abs() < 0.3] = 0.0  # zero values
    values[-1] = 0.0
    W = torch.randn(n, d, generator=g)
    rows = torch.randn(N, d, generator=g)
    return indices, values.to(dtype), W.to(dtype), rows.to(dtype)


def _dense64(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    return reference.dense_codes(indices, values.double(), n)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


# -- the three kernels against the dense oracle --------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_dense_oracle(case, dtype, interpret):
    name, N, k, n, d = case
    indices, values, W, rows = _case(*case, dtype)
    dense = _dense64(indices, values, n)
    assert float(dense.abs().sum()) > 0

    decoded = triton_ops.decode(indices, values, W)
    _close(decoded, dense @ W.double(), dtype)

    dots = triton_ops.gather_dot(rows, indices, W)
    _close(dots, (W.double()[indices] * rows.double()[:, None, :]).sum(-1), dtype)

    segments = triton_ops.segment_reduce(reference.sort_plan(indices, n), values, rows, n)
    expected = dense.T @ rows.double()
    _close(segments, expected, dtype)
    unused = torch.ones(n, dtype=torch.bool)
    unused[indices.flatten()] = False
    assert bool(unused.any())
    assert torch.equal(segments[unused], torch.zeros_like(segments[unused]))  # written, not left


@needs_triton
def test_decode_reads_a_strided_weight(interpret):
    """dx = Σ_j gpre · W_enc[:, idx] is a decode of W_encᵀ, a transposed view."""
    indices, values, _, _ = _case("random", 6, 5, 11, 37, torch.float32)
    W_enc = torch.randn(37, 11, generator=_gen(3))
    out = triton_ops.decode(indices, values, W_enc.t())
    _close(out, _dense64(indices, values, 11) @ W_enc.double().T, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_ops_match_dense_oracle(case, dtype, monkeypatch):
    name, N, k, n, d = case
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * k * d)  # several row chunks
    indices, values, W, rows = _case(*case, dtype)
    dense = _dense64(indices, values, n)
    _close(reference.sparse_decode(indices, values, W), dense @ W.double(), dtype)
    expected_dots = (W.double()[indices] * rows.double()[:, None, :]).sum(-1)
    _close(reference.gather_dot(rows, indices, W), expected_dots, dtype)
    product = reference.sparse_transpose_product(indices, values, rows, n)
    _close(product, dense.T @ rows.double(), dtype)
    _close(reference.scatter_sum(indices, values, n), dense.sum(0), dtype)
    plan = reference.sort_plan(indices, n)
    sorted_latents = indices.flatten()[plan.perm]
    assert bool((sorted_latents[1:] >= sorted_latents[:-1]).all())
    assert torch.equal(
        plan.starts[1:] - plan.starts[:-1], torch.bincount(indices.flatten(), None, n)
    )


# -- autograd through the dispatcher against autograd through dense codes ------------------------


def _decode_grads(indices, values, W, upstream, path):
    v = values.clone().requires_grad_(True)
    w = W.clone().requires_grad_(True)
    out = path(indices, v, w)
    (out.double() * upstream).sum().backward()
    return out.detach(), v.grad, w.grad


def _dense_decode(indices, v, w):
    return reference.dense_codes(indices, v, w.shape[0]) @ w


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["random", "all_equal"])
def test_sparse_decode_gradients_match_dense_autograd(case, dtype, interpret):
    name, N, k, n, d = case
    indices, values, W, _ = _case(*case, dtype)
    upstream = torch.randn(N, d, generator=_gen(7), dtype=torch.float64)
    out, dv, dW = _decode_grads(indices, values, W, upstream, ops.sparse_decode)
    assert interpret == {"decode": 1, "gather_dot": 1, "segment_reduce": 1}
    ref_out, ref_dv, ref_dW = _decode_grads(
        indices, values.double(), W.double(), upstream, _dense_decode
    )
    _close(out, ref_out, dtype)
    _close(dv, ref_dv, dtype)
    _close(dW, ref_dW, dtype)
    assert float(dW.abs().max()) > 0.1


def _encode_grads(x_in, W_enc, b_enc, indices, upstream, sparse: bool):
    x = x_in.clone().requires_grad_(True)
    W = W_enc.clone().requires_grad_(True)
    b = b_enc.clone().requires_grad_(True)
    if sparse:
        with torch.no_grad():
            pre = x @ W + b
        out = ops.encode_gather(x, W, b, indices, pre)
    else:
        out = (x @ W + b).gather(1, indices)  # autograd forms the dense [N, n] gradient
    (out.double() * upstream).sum().backward()
    return out.detach(), x.grad, W.grad, b.grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_encode_gather_gradients_match_dense_autograd(dtype, interpret):
    N, k, n, d = 7, 4, 23, 19
    indices, upstream, _, _ = _case("random", N, k, n, d, torch.float64)
    upstream[upstream == 0] = 0.5
    g = _gen(11)
    x_in = (0.5 * torch.randn(N, d, generator=g)).to(dtype)
    W_enc = (0.5 * torch.randn(d, n, generator=g)).to(dtype)
    b_enc = (0.5 * torch.randn(n, generator=g)).to(dtype)
    got = _encode_grads(x_in, W_enc, b_enc, indices, upstream, sparse=True)
    assert interpret == {"decode": 1, "gather_dot": 0, "segment_reduce": 1}
    want = _encode_grads(x_in.double(), W_enc.double(), b_enc.double(), indices, upstream, False)
    for a, b in zip(got, want, strict=True):
        _close(a, b, dtype)
    assert float(got[2].abs().max()) > 0.1


# -- the dispatcher -----------------------------------------------------------------------------


@needs_triton
def test_dispatcher_uses_triton_for_supported_dtypes_in_interpret_mode(interpret):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert ops.use_triton(torch.zeros(2, dtype=dtype))


@needs_triton
def test_a_failing_kernel_is_reported_and_the_reference_takes_over(interpret, monkeypatch, caplog):
    """A kernel that does not build (say, on an untested GPU) costs an error line, not the run."""
    monkeypatch.setattr(ops, "_triton_error", None)
    monkeypatch.setattr(ops, "_logged", set())

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_ops, "decode", broken)
    indices, values, W, _ = _case("random", 6, 5, 11, 37, torch.float32)
    with caplog.at_level(logging.INFO, logger="saetrain.kernels.ops"):
        out = ops.decode_forward(indices, values, W)
        again = ops.decode_forward(indices, values, W)
    expected = reference.sparse_decode(indices, values, W)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "the Triton kernel `decode` failed (RuntimeError: PTX assembly failed); using the torch "
        "reference ops from now on"
    ]
    assert not ops.use_triton(W)  # off for the rest of the process, and said why


def test_dispatcher_falls_back_and_says_why_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SAETRAIN_KERNELS", raising=False)
    monkeypatch.setattr(ops, "_logged", set())
    indices, values, W, _ = _case("random", 6, 5, 11, 37, torch.float32)
    with caplog.at_level(logging.INFO, logger="saetrain.kernels.ops"):
        for _ in range(3):
            ops.sparse_decode(indices, values, W)
        ops.sparse_decode(indices, values.double(), W.double())
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Triton sparse kernels not used (tensors on cpu, not CUDA): running the torch reference ops"
    ]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saetrain.kernels.ops"):
        assert not ops.use_triton(W.double())
        assert not ops.use_triton(W.double())
    assert [r.getMessage() for r in caplog.records] == [
        "Triton sparse kernels not used (dtype torch.float64 not supported (fp32, fp16, bf16 "
        "are)): running the torch reference ops"
    ]


@needs_triton
def test_forcing_the_reference(interpret, monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("SAETRAIN_KERNELS", "reference")
    assert not ops.use_triton(x)
    monkeypatch.delenv("SAETRAIN_KERNELS")
    assert ops.use_triton(x)
    monkeypatch.setattr(ops, "FORCE_REFERENCE", True)
    assert not ops.use_triton(x)


# -- a TopK-family training step: sparse path against a dense float64 step -----------------------


def _dense_step(d, x, dead_mask, arch):
    """Loss and gradients from the formulas with dense codes (float64, plain autograd)."""
    p = {name: t.detach().double().requires_grad_(True) for name, t in d.named_parameters()}
    x64 = x.double()
    pre = (x64 - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    N, n = pre.shape
    if arch == "topk":
        top = pre.topk(d.k, dim=-1).indices
        z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top)).relu()
    else:
        flat = pre.relu().flatten()
        chosen = flat.topk(d.k * N).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[chosen] = True
        z = pre.relu() * keep.view(N, n)
    variance = (x64 - x64.mean(0)).pow(2).sum()
    if arch == "matryoshka":
        partial, loss, start = p["b_dec"].expand(N, -1), 0.0, 0
        for end in d.prefixes:
            partial = partial + z[:, start:end] @ p["W_dec"][start:end]
            loss = loss + (x64 - partial).pow(2).sum() / variance
            start = end
        x_hat = partial
    else:
        x_hat = z @ p["W_dec"] + p["b_dec"]
        loss = (x64 - x_hat).pow(2).sum() / variance
    n_dead = int(dead_mask.sum())
    k_aux = min(d.aux_k, n_dead)
    aux_top = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1).indices
    z_aux = torch.zeros_like(pre).scatter(1, aux_top, pre.gather(1, aux_top)).relu()
    residual = (x64 - x_hat).detach()
    residual_variance = (residual - residual.mean(0)).pow(2).sum()  # Gao et al.'s AuxK
    aux = min(n_dead / d.aux_k, 1.0) * (z_aux @ p["W_dec"] - residual).pow(2).sum()
    aux = aux / residual_variance
    loss = loss + d.aux_k_coefficient * aux
    loss.backward()
    return loss.detach(), {name: t.grad for name, t in p.items()}


@needs_triton
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_training_step_sparse_path_matches_dense_step(arch, interpret):
    from saetrain.dictionaries import ARCHITECTURES

    kwargs = {"prefixes": [10, 40]} if arch == "matryoshka" else {}
    d = ARCHITECTURES[arch](
        12, 40, k=3, aux_k=5, aux_k_coefficient=0.5, generator=_gen(0), **kwargs
    )
    with torch.no_grad():
        d.b_dec.copy_(0.1 * torch.randn(12, generator=_gen(1)))
        d.b_enc.copy_(0.05 * torch.randn(40, generator=_gen(2)))
    x = torch.randn(10, 12, generator=_gen(3)) * torch.linspace(0.3, 2.0, 10)[:, None]
    dead_mask = torch.zeros(40, dtype=torch.bool)
    dead_mask[::3] = True
    out = d.training_forward(x, x, dead_mask)
    out.loss.backward()
    assert interpret["decode"] >= 3 and interpret["segment_reduce"] >= 3
    assert "auxk" in out.terms
    loss, grads = _dense_step(d, x, dead_mask, arch)
    assert float(out.loss.detach()) == pytest.approx(float(loss), rel=1e-5)
    for name, param in d.named_parameters():
        assert float(grads[name].abs().max()) > 1e-4, name
        torch.testing.assert_close(param.grad.double(), grads[name], rtol=1e-4, atol=1e-6)
    if arch != "topk":  # padded codes: the batch keeps k·N entries, rows differ in count
        codes = out.codes
        assert int((codes.values != 0).sum()) == 3 * 10
        assert codes.indices.shape[1] > 3
