"""Every architecture on the shared base: the custom gradients (JumpReLU and step STEs, the gated
auxiliary path) against independent computations, each architecture's loss terms and codes,
transcoders and skip connections, scale folding, SAELens export and build_dictionary.

Expected values are computed here from the formulas (in float64 where it helps), never by calling
the code under test a second time.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.dictionaries import (
    ARCHITECTURES,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    SparseCodes,
    TopKSAE,
    build_dictionary,
)
from saetrain.dictionaries.jumprelu import JumpReLUFunction, StepFunction
from saetrain.export.saelens import CFG_FILE, WEIGHTS_FILE, load_dictionary, save_dictionary
from saetrain.training.trainer import Trainer

ARCHS = ["relu", "gated", "topk", "batchtopk", "matryoshka", "jumprelu"]
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
PENALTY_FAMILY = ("relu", "gated", "jumprelu")
META = {"model_name": "m", "hook_name": "blocks.1.hook_mlp_in", "hook_layer": 1}

# (name, d_in, d_out, transcoder, skip)
MODES = [
    ("sae", 8, 8, False, False),
    ("transcoder", 8, 8, True, False),
    ("transcoder_wide", 8, 6, True, False),
    ("skip_transcoder", 8, 6, True, True),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")


def _make(arch, d_in=8, n=32, d_out=None, *, transcoder=False, skip=False, seed=0, **kwargs):
    if arch in TOPK_FAMILY:
        kwargs.setdefault("k", 4)
    return ARCHITECTURES[arch](
        d_in, n, d_out, transcoder=transcoder, skip=skip, generator=_gen(seed), **kwargs
    )


@torch.no_grad()
def _perturb(d, seed=1):
    """Move every parameter off its init: biases, r_mag, thresholds and W_skip non-zero,
    decoder rows off unit norm."""
    g = _gen(seed)
    for name, p in d.named_parameters():
        if name == "log_threshold":
            p.uniform_(math.log(0.05), math.log(0.5), generator=g)
        elif name == "W_skip":
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        elif name == "W_dec":
            p.mul_(0.5 + 1.5 * torch.rand(p.shape[0], 1, generator=g))
        else:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    if isinstance(d, BatchTopKSAE):
        d.threshold.fill_(0.15)
    return d


def _dense(codes, n):
    return codes.to_dense(n) if isinstance(codes, SparseCodes) else codes


def _rows(n, d, seed, scale=1.0):
    return scale * torch.randn(n, d, generator=_gen(seed))


def _p64(d):
    return {name: p.detach().double() for name, p in d.named_parameters()}


# -- JumpReLU / step straight-through estimators --------------------------------------------------

THETA = [0.3, 1.0, 2.5]
EPS = 0.2
# pre − θ in units of ε: ±0.45 lie inside the rectangle window (|u| < ½), ±0.6 and ±3 outside;
# u = 0 is pre == θ exactly (inactive: the step is strict, but inside the window).
OFFSETS = [-3.0, -0.6, -0.45, -0.2, 0.0, 0.2, 0.45, 0.6, 3.0]


def _ste_inputs(dtype):
    theta = torch.tensor(THETA, dtype=dtype)
    u = torch.tensor(OFFSETS, dtype=dtype)[:, None].expand(-1, len(THETA))
    pre = (theta + EPS * u).clone().requires_grad_(True)
    upstream = torch.randn(pre.shape, generator=_gen(5), dtype=dtype)
    return pre, theta.clone().requires_grad_(True), u, upstream


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jumprelu_function_forward_and_gradients_match_closed_form(dtype):
    pre, theta, u, g = _ste_inputs(dtype)
    out = JumpReLUFunction.apply(pre, theta, EPS)
    assert torch.equal(out, torch.where(u > 0, pre.detach(), torch.zeros_like(u)))
    out.backward(g)

    inside = (u.abs() < 0.5).to(dtype)  # K((pre − θ)/ε)
    assert int(inside[:, 0].sum()) == 5  # u = ±0.45, ±0.2, 0
    # ∂/∂pre = 1[pre > θ]; ∂/∂θ = −(θ/ε)·K, summed over the batch.
    assert torch.equal(pre.grad, g * (u > 0).to(dtype))
    expected_theta = (-(theta.detach() / EPS) * inside * g).sum(0)
    torch.testing.assert_close(theta.grad, expected_theta, rtol=1e-6, atol=1e-6)
    # The rows outside the window contribute nothing: changing their upstream changes nothing.
    theta.grad = None
    g2 = torch.where(inside.bool(), g, 100.0 * torch.ones_like(g))
    JumpReLUFunction.apply(pre, theta, EPS).backward(g2)
    torch.testing.assert_close(theta.grad, expected_theta, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_function_forward_and_gradients_match_closed_form(dtype):
    pre, theta, u, g = _ste_inputs(dtype)
    out = StepFunction.apply(pre, theta, EPS)
    assert torch.equal(out, (u > 0).to(dtype))
    out.backward(g)
    assert pre.grad is None or not pre.grad.any()  # no gradient through the step to pre
    inside = (u.abs() < 0.5).to(dtype)
    expected_theta = (-(1.0 / EPS) * inside * g).sum(0)
    torch.testing.assert_close(theta.grad, expected_theta, rtol=1e-6, atol=1e-6)


def _jumprelu_setup(d_out=None, skip=False):
    eps, lam = 0.4, 0.7
    sae = JumpReLUSAE(
        6,
        10,
        d_out,
        sparsity_coefficient=lam,
        bandwidth=eps,
        transcoder=skip,
        skip=skip,
        generator=_gen(0),
    )
    _perturb(sae, seed=3)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(math.log(0.1), math.log(0.8), 10))
    x = _rows(64, 6, seed=4)
    y = _rows(64, sae.d_out, seed=6) if skip else x
    return sae, x, y, eps, lam


@pytest.mark.parametrize("mult", [1.0, 0.5])
def test_jumprelu_sae_log_threshold_gradient_is_chain_rule_through_theta(mult):
    sae, x, y, eps, lam = _jumprelu_setup()
    out = sae.training_forward(x, y, None, mult)
    out.loss.backward()

    p = _p64(sae)
    x64, y64, N = x.double(), y.double(), x.shape[0]
    theta = p["log_threshold"].exp()
    pre = (x64 - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    active = pre > theta
    z = pre * active
    y_hat = z @ p["W_dec"] + p["b_dec"]
    mse = (y64 - y_hat).pow(2).sum(-1).mean()
    l0 = active.sum(-1).double().mean()
    # dL/dz for the reconstruction, then the two STEs, then dθ/dlogθ = θ.
    dz = 2 * (y_hat - y64) @ p["W_dec"].T / N
    kernel = ((pre - theta).abs() / eps < 0.5).double()
    assert 50 < int(kernel.sum()) < kernel.numel() - 50  # both sides of the window occur
    dtheta = (dz * -(theta / eps) * kernel).sum(0) + mult * lam * (-(1 / eps) * kernel).sum(0) / N
    expected = theta * dtheta
    assert float(expected.abs().min()) > 0  # every latent has rows inside its window
    torch.testing.assert_close(sae.log_threshold.grad.double(), expected, rtol=1e-4, atol=1e-6)

    # The L0 penalty is the mean count of active latents; the loss combines the terms.
    assert float(out.terms["l0_penalty"]) == pytest.approx(float(l0), rel=1e-6)
    assert float(out.terms["mse"]) == pytest.approx(float(mse), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(mse + mult * lam * l0), rel=1e-5)

    # The encoder sees the gradient of pre·1[pre > θ] with the mask held fixed: the step adds
    # nothing to pre.
    W_enc = p["W_enc"].clone().requires_grad_(True)
    pre2 = (x64 - p["b_dec"]) @ W_enc + p["b_enc"]
    ((y64 - (pre2 * active) @ p["W_dec"] - p["b_dec"]).pow(2).sum(-1).mean()).backward()
    torch.testing.assert_close(sae.W_enc.grad.double(), W_enc.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to(dtype=torch.float16),
        lambda m: m.half(),
        lambda m: m.bfloat16(),
    ],
    ids=["to_bf16", "to_fp16", "half", "bfloat16"],
)
def test_jumprelu_threshold_stays_fp32_and_bit_identical_when_cast(cast):
    sae = JumpReLUSAE(8, 16, generator=_gen(0))
    with torch.no_grad():
        # Values that bf16/fp16 cannot represent: a rounded copy would differ.
        sae.log_threshold.copy_(torch.linspace(math.log(0.0123457), math.log(0.987654), 16))
    before = sae.log_threshold.detach().clone()
    assert not torch.equal(before.bfloat16().float(), before)
    out = cast(sae)
    assert out is sae
    assert sae.W_enc.dtype in (torch.bfloat16, torch.float16)
    assert sae.log_threshold.dtype == torch.float32
    assert isinstance(sae.log_threshold, torch.nn.Parameter)
    assert torch.equal(sae.log_threshold.detach(), before)
    assert any(p is sae.log_threshold for p in sae.parameters())  # still trained
    x = _rows(5, 8, seed=1).to(sae.W_enc.dtype)
    assert sae(x).dtype == sae.W_enc.dtype
    sae.float()
    assert torch.equal(sae.log_threshold.detach(), before)


def test_jumprelu_low_precision_encode_agrees_with_the_training_forward():
    sae = JumpReLUSAE(4, 3, init_threshold=0.1, generator=_gen(0)).bfloat16()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(0.1)  # pre = bf16(0.1) = 0.10009765625 > θ = fp32(0.1)
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    train_codes = sae.training_forward(x, x, None).codes
    assert bool((train_codes > 0).all())  # active during training: pre > θ
    assert torch.equal(sae.encode(x), train_codes.detach())


def test_jumprelu_low_precision_pre_gradient_follows_the_forward_mask():
    pre = torch.full((2, 3), 0.1, dtype=torch.bfloat16, requires_grad=True)  # 0.10009765625
    theta = torch.full((3,), 0.1, dtype=torch.float32, requires_grad=True)
    out = JumpReLUFunction.apply(pre, theta, 0.001)
    assert bool((out > 0).all())
    out.sum().backward()
    assert torch.equal(pre.grad, torch.ones_like(pre))


# -- gated ----------------------------------------------------------------------------------------


def _gated(d_out=None, transcoder=False, skip=False, lam=0.7):
    gated = GatedSAE(
        8, 24, d_out, sparsity_coefficient=lam, transcoder=transcoder, skip=skip, generator=_gen(0)
    )
    return _perturb(gated, seed=2)


def _gated_paths(p, x64, centre):
    x_in = x64 - p["b_dec"] if centre else x64
    pi_gate = x_in @ p["W_enc"] + p["b_gate"]
    pi_mag = x_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]
    return pi_gate, pi_mag


@pytest.mark.parametrize(
    ("d_out", "transcoder", "skip"), [(None, False, False), (6, True, False), (6, True, True)]
)
def test_gated_encode_is_the_saelens_formula(d_out, transcoder, skip):
    gated = _gated(d_out, transcoder, skip)
    x = _rows(40, 8, seed=3)
    pi_gate, pi_mag = _gated_paths(_p64(gated), x.double(), centre=not transcoder)
    expected = (pi_gate > 0).double() * pi_mag.relu()
    assert 0.2 < float((expected > 0).double().mean()) < 0.8
    z = gated.encode(x)
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(z > 0, expected > 0)


@pytest.mark.parametrize(
    ("d_out", "transcoder", "skip"), [(None, False, False), (6, True, False), (6, True, True)]
)
def test_gated_aux_term_trains_the_gate_but_not_the_decoder(d_out, transcoder, skip):
    gated, mult, lam = _gated(d_out, transcoder, skip), 0.6, 0.7
    x = _rows(48, 8, seed=4)
    y = _rows(48, gated.d_out, seed=5) if transcoder else x
    out = gated.training_forward(x, y, None, mult)
    out.loss.backward()
    full = {n: p.grad.detach().clone() for n, p in gated.named_parameters()}

    # The same loss written independently, without the auxiliary term.
    def loss_terms(aux: bool):
        p = dict(gated.named_parameters())
        x_in = x - p["b_dec"] if not transcoder else x
        pi_gate = x_in @ p["W_enc"] + p["b_gate"]
        pi_mag = x_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]
        z = (pi_gate > 0).float() * pi_mag.relu()
        skip_out = x @ p["W_skip"].T if skip else 0.0
        mse = (y - (z @ p["W_dec"] + p["b_dec"] + skip_out)).pow(2).sum(-1).mean()
        l1 = (pi_gate.relu() * p["W_dec"].norm(dim=1)).sum(-1).mean()
        if not aux:
            return mse, l1
        frozen_skip = x @ p["W_skip"].detach().T if skip else 0.0
        aux_hat = pi_gate.relu() @ p["W_dec"].detach() + p["b_dec"].detach() + frozen_skip
        return (y - aux_hat).pow(2).sum(-1).mean()

    def f(t):
        return float(t.detach())

    gated.zero_grad()
    mse, l1 = loss_terms(aux=False)
    (mse + mult * lam * l1).backward()
    no_aux = {n: p.grad.detach().clone() for n, p in gated.named_parameters()}
    gated.zero_grad()
    aux = loss_terms(aux=True)
    aux.backward()
    aux_only = {n: p.grad for n, p in gated.named_parameters()}

    assert float(out.terms["mse"]) == pytest.approx(f(mse), rel=1e-5)
    assert float(out.terms["l1"]) == pytest.approx(f(l1), rel=1e-5)
    assert float(out.terms["aux"]) == pytest.approx(f(aux), rel=1e-5)
    assert f(out.loss) == pytest.approx(f(mse + mult * lam * l1 + aux), rel=1e-5)

    # The decoder's weights get exactly the gradient they get without the auxiliary term.
    torch.testing.assert_close(full["W_dec"], no_aux["W_dec"], rtol=1e-5, atol=1e-7)
    assert aux_only["W_dec"] is None
    if skip:
        torch.testing.assert_close(full["W_skip"], no_aux["W_skip"], rtol=1e-5, atol=1e-7)
    if transcoder:
        # b_dec lives only in the output: the auxiliary term does not reach it at all.
        torch.testing.assert_close(full["b_dec"], no_aux["b_dec"], rtol=1e-5, atol=1e-7)
        assert aux_only["b_dec"] is None
    else:
        # An SAE centres its input on b_dec: the aux term reaches b_dec through the gate's input
        # x − b_dec (as in the paper and SAELens), never through the frozen decoder bias.
        torch.testing.assert_close(
            full["b_dec"] - no_aux["b_dec"], aux_only["b_dec"], rtol=1e-4, atol=1e-6
        )
    # The gate (W_enc, b_gate) does get the auxiliary gradient; the magnitude path does not.
    for name in ("W_enc", "b_gate"):
        diff = full[name] - no_aux[name]
        assert float(diff.abs().max()) > 1e-3
        torch.testing.assert_close(diff, aux_only[name], rtol=1e-4, atol=1e-6)
    for name in ("b_mag", "r_mag"):
        torch.testing.assert_close(full[name], no_aux[name], rtol=1e-5, atol=1e-7)


def test_gated_sparsity_term_is_relu_gate_times_decoder_norms():
    gated = _gated()
    x = _rows(32, 8, seed=6)
    norms = gated.W_dec.detach().double().norm(dim=1)
    assert float(norms.max() - norms.min()) > 0.3  # rows are not unit: the weights matter
    pi_gate, _ = _gated_paths(_p64(gated), x.double(), centre=True)
    expected = (pi_gate.relu() * norms).sum(-1).mean()
    for mult in (0.0, 1.0):
        out = gated.training_forward(x, x, None, mult)
        assert float(out.terms["l1"]) == pytest.approx(float(expected), rel=1e-5)
    l1_free = gated.training_forward(x, x, None, 0.0).loss
    assert float((out.loss - l1_free).detach()) == pytest.approx(0.7 * float(expected), rel=1e-4)


# -- ReLU -----------------------------------------------------------------------------------------


def test_relu_l1_term_and_sparsity_multiplier():
    sae = _perturb(ReLUSAE(8, 24, sparsity_coefficient=2.5, generator=_gen(0)))
    x = _rows(40, 8, seed=7)
    p = _p64(sae)
    z = ((x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
    norms = p["W_dec"].norm(dim=1)
    assert float(norms.max() - norms.min()) > 0.3
    l1 = (z * norms).sum() / x.shape[0]
    mse = (x.double() - z @ p["W_dec"] - p["b_dec"]).pow(2).sum(-1).mean()
    for mult in (0.0, 0.25, 1.0):
        out = sae.training_forward(x, x, None, mult)
        assert float(out.terms["l1"]) == pytest.approx(float(l1), rel=1e-5)
        assert float(out.terms["mse"]) == pytest.approx(float(mse), rel=1e-5)
        assert float(out.loss.detach()) == pytest.approx(float(mse + mult * 2.5 * l1), rel=1e-5)
        torch.testing.assert_close(out.codes.double(), z, rtol=1e-5, atol=1e-6)
    # Without the penalty the gradient is the reconstruction's alone.
    sae.zero_grad()
    sae.training_forward(x, x, None, 0.0).loss.backward()
    W_dec = p["W_dec"].clone().requires_grad_(True)
    (x.double() - z @ W_dec - p["b_dec"]).pow(2).sum(-1).mean().backward()
    torch.testing.assert_close(sae.W_dec.grad.double(), W_dec.grad, rtol=1e-4, atol=1e-6)


def _trainer(d, steps=8, lr=1e-2):
    cfg = TrainerConfig(batch_tokens=64, lr=lr, warmup_steps=0, decay_fraction=0.0)
    return Trainer(d, cfg, scale=1.0, total_steps=steps)


def _batches(d, n=64, seed=0):
    g = _gen(seed)
    while True:
        x = torch.randn(n, d.d_in, generator=g)
        if d.transcoder:
            y = torch.randn(n, d.d_out, generator=g) + 0.5 * x[:, : d.d_out].flip(1)
            yield torch.cat([x, y], 1)
        else:
            yield x


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_constraint_per_architecture(arch):
    d = _make(arch, 8, 32, k=4) if arch in TOPK_FAMILY else _make(arch, 8, 32)
    assert d.unit_norm_decoder is (arch != "relu")
    before = d.W_dec.detach().clone()
    stream = _batches(d)
    trainer = _trainer(d)
    for _ in range(8):
        trainer.step(next(stream))
    assert not torch.equal(d.W_dec.detach(), before)  # it trained
    norms = d.decoder_norms().detach()
    if arch == "relu":
        assert float((norms - 1).abs().max()) > 1e-3  # rows free: norms move off 1
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)


# -- BatchTopK ------------------------------------------------------------------------------------


def _batchtopk(k=3, **kwargs):
    sae = BatchTopKSAE(8, 32, k=k, aux_k_coefficient=0.0, generator=_gen(0), **kwargs)
    return _perturb(sae, seed=4)


def test_batchtopk_training_codes_keep_the_k_n_largest_of_the_batch():
    sae, k, N = _batchtopk(k=3), 3, 16
    # Rows of very different sizes: big rows take more than k latents, small rows fewer.
    x = _rows(N, 8, seed=8) * torch.logspace(-1, 1, N)[:, None]
    z = _dense(sae.training_forward(x, x, None).codes, 32)
    p = _p64(sae)
    relu = ((x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
    assert int((relu > 0).sum()) > k * N
    assert int((z != 0).sum()) == k * N
    kept = z[z != 0].double().sort().values
    top = relu.flatten().topk(k * N).values.sort().values
    torch.testing.assert_close(kept, top, rtol=1e-5, atol=1e-6)
    # The kept positions are exactly those at or above the k·N-th largest value.
    torch.testing.assert_close(z.double(), relu * (relu >= top[0]), rtol=1e-5, atol=1e-6)
    per_row = (z != 0).sum(1)
    assert int(per_row.sum()) == k * N and bool((per_row != k).any())
    assert int(per_row.max()) > k and int(per_row.min()) < k


def test_batchtopk_keeps_only_positive_values_when_too_few():
    sae = _batchtopk(k=3)
    with torch.no_grad():
        sae.b_enc.fill_(-1.25)  # few positive pre-activations (encoder columns at norm 0.5)
    x = _rows(16, 8, seed=9)
    z = _dense(sae.training_forward(x, x, None).codes, 32)
    relu = sae.pre_activations(x).detach().relu()
    assert 0 < int((relu > 0).sum()) < 3 * 16
    assert torch.equal(z != 0, relu > 0)
    assert bool((z >= 0).all())


def test_batchtopk_threshold_is_first_min_then_ema():
    sae, m = _batchtopk(k=3, threshold_momentum=0.9), 0.9
    # Before any step the value is not averaged in: the first batch replaces it.
    assert float(sae.threshold) == pytest.approx(0.15) and int(sae.threshold_updates) == 0
    mins, expected = [], None
    for i in range(4):
        x = _rows(16, 8, seed=20 + i, scale=1.0 + 0.5 * i)
        p = _p64(sae)
        relu = ((x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
        mins.append(float(relu.flatten().topk(3 * 16).values.min()))
        out = sae.training_forward(x, x, None)
        sae.after_step(out)
        expected = mins[0] if i == 0 else m * expected + (1 - m) * mins[-1]
        assert float(sae.threshold) == pytest.approx(expected, rel=1e-5)
        assert int(sae.threshold_updates) == i + 1
    assert len(set(mins)) == 4 and mins[0] > 0
    assert sae.threshold.dtype == torch.float32


def test_batchtopk_inference_is_a_threshold_on_pre_activations():
    sae = _batchtopk(k=3)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    x = _rows(40, 8, seed=10)
    p = _p64(sae)
    pre = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    expected = pre * (pre > 0.3)
    assert bool(((pre > 0) & (pre < 0.3)).any())  # a ReLU would keep these
    z = sae.encode(x)
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(z > 0, expected > 0)
    # Inference does not depend on the rest of the batch.
    torch.testing.assert_close(sae.encode(x[:5]), z[:5])


# -- Matryoshka -----------------------------------------------------------------------------------


def _fvu64(y, y_hat):
    return (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()


@pytest.mark.parametrize(
    ("prefixes", "skip"), [([4, 12, 32], False), (None, False), ([8, 32], True)]
)
def test_matryoshka_loss_is_the_sum_of_prefix_fvus(prefixes, skip):
    d_out = 6 if skip else None
    sae = MatryoshkaSAE(
        8,
        32,
        d_out,
        k=4,
        prefixes=prefixes,
        aux_k_coefficient=0.0,
        transcoder=skip,
        skip=skip,
        generator=_gen(0),
    )
    _perturb(sae, seed=5)
    x = _rows(32, 8, seed=11)
    y = _rows(32, 6, seed=12) + x[:, :6] if skip else x
    out = sae.training_forward(x, y, None)
    z, p, y64 = _dense(out.codes.detach(), 32).double(), _p64(sae), y.double()
    base = p["b_dec"] + (x.double() @ p["W_skip"].T if skip else 0.0)
    sizes = prefixes or [2, 4, 8, 16, 32]
    assert sae.prefixes == sizes
    fvus = [_fvu64(y64, z[:, :m] @ p["W_dec"][:m] + base) for m in sizes]
    assert float(out.loss.detach()) == pytest.approx(float(sum(fvus)), rel=1e-5)
    assert float(out.terms["fvu"]) == pytest.approx(float(fvus[-1]), rel=1e-5)
    assert len({round(float(f), 6) for f in fvus}) == len(sizes)  # every prefix counts
    torch.testing.assert_close(out.x_hat.detach(), sae.reconstruct(x, out.codes.detach()))
    assert int((z != 0).sum()) == 4 * 32  # BatchTopK codes over all latents


def test_matryoshka_default_prefixes():
    assert MatryoshkaSAE(8, 128, generator=_gen(0)).prefixes == [8, 16, 32, 64, 128]
    assert MatryoshkaSAE(8, 100, generator=_gen(0)).prefixes == [6, 12, 25, 50, 100]
    assert MatryoshkaSAE(2, 4, k=1, generator=_gen(0)).prefixes == [1, 2, 4]
    cfg = DictionaryConfig(architecture="matryoshka", n_latents=64, matryoshka_prefixes=None)
    assert build_dictionary(cfg, 8, 8, torch.device("cpu")).prefixes == [4, 8, 16, 32, 64]
    assert MatryoshkaSAE(8, 32, prefixes=[32, 8, 8], generator=_gen(0)).prefixes == [8, 32]


@pytest.mark.parametrize("prefixes", [[8, 16], [0, 32], [8, 64], [-4, 32]])
def test_matryoshka_invalid_prefixes_raise(prefixes):
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        MatryoshkaSAE(8, 32, prefixes=prefixes, generator=_gen(0))


# -- transcoders and skip connections -------------------------------------------------------------


def test_topk_transcoder_does_not_centre_on_b_dec():
    sae = _perturb(TopKSAE(8, 32, k=4, generator=_gen(0)))
    tc = _perturb(TopKSAE(8, 32, k=4, transcoder=True, generator=_gen(0)))
    assert sae.apply_b_dec_to_input is True and tc.apply_b_dec_to_input is False
    x = _rows(20, 8, seed=13)
    for d, centred in ((sae, True), (tc, False)):
        p = _p64(d)
        x_in = x.double() - p["b_dec"] if centred else x.double()
        expected = x_in @ p["W_enc"] + p["b_enc"]
        torch.testing.assert_close(d.pre_activations(x).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_transcoder_codes_do_not_depend_on_b_dec(arch):
    x = _rows(24, 8, seed=14)
    for transcoder in (False, True):
        d = _perturb(_make(arch, transcoder=transcoder))
        assert d.apply_b_dec_to_input is (not transcoder)
        before = _dense(d.encode(x), d.n_latents).detach()
        with torch.no_grad():
            d.b_dec.add_(1.0)
        after = _dense(d.encode(x), d.n_latents).detach()
        assert torch.equal(before, after) is transcoder


def _recon_grad_wrt_output(d, x, y, out):
    """dL/dŷ of the reconstruction loss, from the formulas (AuxK off)."""
    y64, N = y.double(), y.shape[0]
    if isinstance(d, MatryoshkaSAE):
        z, p = _dense(out.codes.detach(), d.n_latents).double(), _p64(d)
        partial = p["b_dec"] + x.double() @ p["W_skip"].T
        total_var = (y64 - y64.mean(0)).pow(2).sum()
        grad, start = torch.zeros_like(y64), 0
        for end in d.prefixes:
            partial = partial + z[:, start:end] @ p["W_dec"][start:end]
            grad += 2 * (partial - y64) / total_var
            start = end
        return grad
    y_hat = out.x_hat.detach().double()
    if d.architecture in TOPK_FAMILY:
        return 2 * (y_hat - y64) / (y64 - y64.mean(0)).pow(2).sum()
    return 2 * (y_hat - y64) / N


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_transcoder(arch):
    kwargs = {"aux_k_coefficient": 0.0} if arch in TOPK_FAMILY else {}
    d = _make(arch, 8, 32, 6, transcoder=True, skip=True, **kwargs)
    assert d.W_skip.shape == (6, 8) and not d.W_skip.any()
    _perturb(d)
    x = _rows(30, 8, seed=15)
    y = _rows(30, 6, seed=16)
    with_skip = d(x).detach()
    W_skip = d.W_skip.detach().clone()
    with torch.no_grad():
        d.W_skip.zero_()
    without = d(x).detach()
    with torch.no_grad():
        d.W_skip.copy_(W_skip)
    torch.testing.assert_close(with_skip - without, x @ W_skip.T, rtol=1e-5, atol=1e-5)

    out = d.training_forward(x, y, None, 1.0)
    out.loss.backward()
    expected = _recon_grad_wrt_output(d, x, y, out).T @ x.double()
    assert float(d.W_skip.grad.abs().max()) > 1e-3
    torch.testing.assert_close(d.W_skip.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_skip_needs_a_transcoder():
    with pytest.raises(ValueError, match="skip"):
        ReLUSAE(8, 16, skip=True)


# -- folding the normalisation scales -------------------------------------------------------------


@pytest.mark.parametrize("scales", [(2.7, 2.7), (3.7, 0.45)], ids=["same", "differ"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale(arch, mode, scales):
    _, d_in, d_out, transcoder, skip = mode
    s_in, s_out = scales
    d = _perturb(_make(arch, d_in, 32, d_out, transcoder=transcoder, skip=skip))
    folded = copy.deepcopy(d)
    folded.fold_input_scale(s_in, s_out)
    x = _rows(40, d_in, seed=17, scale=1 / s_in)  # raw activations; s_in·x is what d was fed
    with torch.no_grad():
        expected = d(s_in * x) / s_out
        got = folded(x)
        codes = _dense(folded.encode(x), d.n_latents)
        codes_expected = _dense(d.encode(s_in * x), d.n_latents)
    assert 0 < float((codes_expected != 0).double().mean()) < 0.9
    assert torch.equal(codes != 0, codes_expected != 0)
    torch.testing.assert_close(codes, codes_expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 / s_out)
    # The original is untouched (fold acts on the copy only).
    assert not torch.equal(folded.W_enc, d.W_enc)


# -- SAELens export -------------------------------------------------------------------------------

SAELENS_NAME = {
    # arch: (SAE, transcoder, skip transcoder)
    "relu": ("standard", "transcoder", "skip_transcoder"),
    "gated": ("gated", "gated", "gated_skip_transcoder"),
    "topk": ("topk", "topk", "topk_skip_transcoder"),
    "jumprelu": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "batchtopk": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "matryoshka": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
}
LOADED_CLASS = {
    "relu": ReLUSAE,
    "gated": GatedSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "batchtopk": JumpReLUSAE,
    "matryoshka": JumpReLUSAE,
}
TENSORS = {
    "relu": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "batchtopk": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "matryoshka": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}


@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip(arch, mode, tmp_path):
    name, d_in, d_out, transcoder, skip = mode
    d = _perturb(_make(arch, d_in, 32, d_out, transcoder=transcoder, skip=skip))
    if isinstance(d, BatchTopKSAE):
        with torch.no_grad():
            d.threshold.zero_()
        trainer, stream = _trainer(d, steps=3, lr=1e-3), _batches(d, seed=3)
        for _ in range(3):
            trainer.step(next(stream))
        assert float(d.threshold) > 0.05 and int(d.threshold_updates) == 3
    d.eval()
    save_dictionary(d, tmp_path, META)

    cfg = json.loads((tmp_path / CFG_FILE).read_text())
    kind = 2 if skip else (1 if transcoder else 0)
    assert cfg["architecture"] == SAELENS_NAME[arch][kind]
    assert (cfg["d_in"], cfg["d_sae"]) == (d_in, 32)
    assert cfg["apply_b_dec_to_input"] is (not transcoder)
    if transcoder:
        assert cfg["d_out"] == d_out
    else:
        assert "d_out" not in cfg
    if arch == "topk":
        assert cfg["k"] == 4
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    assert set(tensors) == TENSORS[arch] | ({"W_skip"} if skip else set())
    assert "log_threshold" not in tensors and "threshold_updates" not in tensors
    assert tuple(tensors["W_enc"].shape) == (d_in, 32)
    assert tuple(tensors["W_dec"].shape) == (32, d_out)
    if "threshold" in tensors:
        assert tuple(tensors["threshold"].shape) == (32,)
        theta = d.threshold.detach().expand(32)
        torch.testing.assert_close(tensors["threshold"], theta, rtol=0, atol=0)

    loaded = load_dictionary(tmp_path)
    assert type(loaded) is LOADED_CLASS[arch]
    assert loaded.transcoder is transcoder and (loaded.W_skip is not None) is skip
    assert (loaded.d_in, loaded.n_latents, loaded.d_out) == (d_in, 32, d_out)
    if "threshold" in tensors:
        torch.testing.assert_close(loaded.threshold.detach(), tensors["threshold"])
    x = _rows(64, d_in, seed=18, scale=1.5)
    with torch.no_grad():
        codes, codes_loaded = d.encode(x), loaded.encode(x)
        out, out_loaded = d(x), loaded(x)
    dense = _dense(codes, 32)
    assert 0 < float((dense != 0).double().mean()) < 0.9
    assert torch.equal(dense != 0, _dense(codes_loaded, 32) != 0)
    torch.testing.assert_close(_dense(codes_loaded, 32), dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_loaded, out, rtol=1e-6, atol=1e-6)


# -- build_dictionary -----------------------------------------------------------------------------

CLASSES = {
    "relu": ReLUSAE,
    "gated": GatedSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
    "jumprelu": JumpReLUSAE,
}


@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_build_dictionary_applies_the_config(arch, transcoder):
    cfg = DictionaryConfig(
        architecture=arch,
        n_latents=48,
        k=5,
        aux_k=7,
        aux_k_coefficient=0.125,
        threshold_momentum=0.75,
        matryoshka_prefixes=[12, 24, 48],
        sparsity_coefficient=0.375,
        jumprelu_bandwidth=0.0625,
        jumprelu_init_threshold=0.25,
        skip=transcoder,
        dtype="bfloat16",
    )
    d_out = 6 if transcoder else 8
    d = build_dictionary(cfg, 8, d_out, torch.device("cpu"), _gen(0), transcoder=transcoder)
    assert type(d) is CLASSES[arch] and d.architecture == arch
    assert (d.d_in, d.n_latents, d.d_out) == (8, 48, d_out)
    assert d.transcoder is transcoder and (d.W_skip is not None) is transcoder
    assert d.W_enc.dtype == d.W_dec.dtype == torch.bfloat16
    if arch in TOPK_FAMILY:
        assert (d.k, d.aux_k, d.aux_k_coefficient) == (5, 7, 0.125)
    else:
        assert d.sparsity_coefficient == 0.375
    if arch in ("batchtopk", "matryoshka"):
        assert d.threshold_momentum == 0.75
        assert d.threshold.dtype == torch.float32
    if arch == "matryoshka":
        assert d.prefixes == [12, 24, 48]
    if arch == "jumprelu":
        assert d.bandwidth == 0.0625
        assert d.log_threshold.dtype == torch.float32
        torch.testing.assert_close(d.threshold.detach(), torch.full((48,), 0.25))
    # Seeded: the same generator seed gives the same weights.
    again = build_dictionary(cfg, 8, d_out, torch.device("cpu"), _gen(0), transcoder=transcoder)
    assert torch.equal(again.W_dec, d.W_dec)


def test_build_dictionary_expansion_factor_and_every_architecture_is_known():
    assert set(ARCHITECTURES) == set(ARCHS)
    cfg = DictionaryConfig(architecture="gated", n_latents=None, expansion_factor=3)
    assert build_dictionary(cfg, 8, 8, torch.device("cpu")).n_latents == 24
