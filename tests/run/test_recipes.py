"""Recipe conventions against independent computations: Matryoshka's mean over prefixes."""

from __future__ import annotations

import math

import pytest
import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries import build_dictionary


def _matryoshka(reduction: str):
    cfg = DictionaryConfig(
        architecture="matryoshka",
        n_latents=32,
        k=4,
        matryoshka_prefixes=[4, 8, 32],
        matryoshka_reduction=reduction,
    )
    return build_dictionary(cfg, 8, 8, torch.device("cpu"), torch.Generator().manual_seed(0))


def test_matryoshka_mean_is_the_average_of_the_prefix_fvus():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    mean, total = _matryoshka("mean"), _matryoshka("sum")
    z = mean.encode(x)
    variance = (x - x.mean(0)).pow(2).sum()
    loss_mean, _, _ = mean.reconstruction_loss(x, x, z, variance)
    loss_sum, _, _ = total.reconstruction_loss(x, x, z, variance)
    dense = (
        z if isinstance(z, torch.Tensor) else torch.zeros(64, 32).scatter(1, z.indices, z.values)
    )
    by_hand = []
    for end in (4, 8, 32):
        x_hat = dense[:, :end] @ mean.W_dec[:end] + mean.b_dec
        by_hand.append(float((x - x_hat).pow(2).sum().detach() / variance))
    assert abs(float(loss_sum) - sum(by_hand)) < 1e-4
    assert abs(float(loss_mean) - sum(by_hand) / 3) < 1e-4


# -- JumpReLU's L0 penalties and the pre-activation loss, against closed forms in float64 -------

EPS, LAM, LAM_P, TANH_C = 0.4, 0.7, 0.3, 4.0


def _jumprelu(loss: str, pre_act: float = 0.0, latents: str = "all", target_l0=None):
    from saetrain.dictionaries.jumprelu import JumpReLUSAE

    sae = JumpReLUSAE(
        6,
        10,
        sparsity_coefficient=LAM,
        bandwidth=EPS,
        sparsity_loss=loss,
        tanh_scale=TANH_C,
        pre_act_coefficient=pre_act,
        pre_act_latents=latents,
        target_l0=target_l0,
        generator=torch.Generator().manual_seed(0),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        sae.log_threshold.copy_(torch.linspace(math.log(0.1), math.log(0.8), 10))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4))
    return sae, x


def _closed_form(sae, x):
    """Everything the penalties are made of, in float64, from the parameters alone."""
    p = {n: t.detach().double() for n, t in sae.named_parameters()}
    theta = p["log_threshold"].exp()
    pre = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    active = pre > theta
    z = pre * active
    x_hat = z @ p["W_dec"] + p["b_dec"]
    norms = p["W_dec"].norm(dim=1)
    kernel = ((pre - theta).abs() / EPS < 0.5).double()  # the rectangle K((pre − θ)/ε)
    return p, theta, pre, active, z, x_hat, norms, kernel


def _loss_and_grads(sae, x, dead=None):
    out = sae.training_forward(x, x, dead)
    out.loss.backward()
    return out, {n: t.grad.double() for n, t in sae.named_parameters()}


def test_jumprelu_tanh_penalty_value_and_gradients():
    sae, x = _jumprelu("tanh")
    out, grads = _loss_and_grads(sae, x)
    p, theta, pre, active, z, x_hat, norms, kernel = _closed_form(sae, x)
    N = x.shape[0]
    penalty = torch.tanh(TANH_C * z * norms).sum(-1).mean()
    assert float(out.terms["l0_penalty"]) == pytest.approx(float(penalty), rel=1e-5)
    mse = (x.double() - x_hat).pow(2).sum(-1).mean()
    assert float(out.loss.detach()) == pytest.approx(float(mse + LAM * penalty), rel=1e-5)

    # dL/dz: reconstruction plus λ·c·‖W_dec,i‖·sech²(c·z·‖W_dec,i‖)/N.
    sech2 = 1 - torch.tanh(TANH_C * z * norms).pow(2)
    dz = 2 * (x_hat - x.double()) @ p["W_dec"].T / N + LAM * TANH_C * norms * sech2 / N
    # θ through JumpReLU's straight-through estimator, then dθ/dlogθ = θ.
    expected_log_theta = theta * (dz * -(theta / EPS) * kernel).sum(0)
    torch.testing.assert_close(grads["log_threshold"], expected_log_theta, rtol=1e-4, atol=1e-7)
    # The encoder: pre·1[pre > θ] with the mask fixed, so dL/dpre = dz·active.
    dpre = dz * active
    x_in = x.double() - p["b_dec"]
    torch.testing.assert_close(grads["W_enc"], x_in.T @ dpre, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads["b_enc"], dpre.sum(0), rtol=1e-4, atol=1e-7)
    # The tanh penalty reaches the decoder's norms (unlike the step penalty).
    W = p["W_dec"].clone().requires_grad_(True)
    (
        (x.double() - z @ W - p["b_dec"]).pow(2).sum(-1).mean()
        + LAM * torch.tanh(TANH_C * z * W.norm(dim=1)).sum(-1).mean()
    ).backward()
    torch.testing.assert_close(grads["W_dec"], W.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("target", [2.0, 8.0])  # L0 above and below the target
def test_jumprelu_quadratic_penalty_value_and_threshold_gradient(target):
    sae, x = _jumprelu("quadratic", target_l0=target)
    out, grads = _loss_and_grads(sae, x)
    p, theta, pre, active, z, x_hat, norms, kernel = _closed_form(sae, x)
    N = x.shape[0]
    l0 = active.sum(-1).double().mean()
    assert 2.0 < float(l0) < 8.0
    assert float(out.terms["l0_penalty"]) == pytest.approx(float((l0 - target) ** 2 / target))
    # d/dθ of (L0 − L0*)²/L0*: 2(L0 − L0*)/L0* times the step's STE −(1/ε)·K summed over rows / N.
    dz = 2 * (x_hat - x.double()) @ p["W_dec"].T / N
    d_penalty = 2 * (l0 - target) / target * (-(1 / EPS) * kernel).sum(0) / N
    expected = theta * ((dz * -(theta / EPS) * kernel).sum(0) + LAM * d_penalty)
    torch.testing.assert_close(grads["log_threshold"], expected, rtol=1e-4, atol=1e-7)
    # Above the target the penalty raises θ (gradient descent: negative gradient); below, lowers.
    no_penalty = theta * (dz * -(theta / EPS) * kernel).sum(0)
    sign = float(((grads["log_threshold"] - no_penalty) * theta).sum().sign())
    assert sign == (-1.0 if float(l0) > target else 1.0)


def test_jumprelu_quadratic_needs_a_target():
    with pytest.raises(ValueError, match="target_l0"):
        _jumprelu("quadratic")


@pytest.mark.parametrize("latents", ["all", "dead"])
def test_jumprelu_pre_activation_loss_value_and_gradients(latents):
    sae, x = _jumprelu("step", pre_act=LAM_P, latents=latents)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    out, grads = _loss_and_grads(sae, x, dead)
    p, theta, pre, active, z, x_hat, norms, kernel = _closed_form(sae, x)
    mask = dead.double() if latents == "dead" else torch.ones(10, dtype=torch.float64)
    below = (theta - pre).relu() * norms * mask
    assert float(out.terms["pre_act"]) == pytest.approx(float(below.sum(-1).mean()), rel=1e-5)

    # Its gradient alone: the difference between the run with λ_P and the same run without.
    sae0, _ = _jumprelu("step", pre_act=0.0)
    _, grads0 = _loss_and_grads(sae0, x, dead)
    N = x.shape[0]
    inside = ((theta - pre) > 0).double() * mask  # where ReLU(θ − pre) has slope 1
    d_pre = -LAM_P * inside * norms / N
    x_in = x.double() - p["b_dec"]
    torch.testing.assert_close(
        grads["W_enc"] - grads0["W_enc"], x_in.T @ d_pre, atol=1e-6, rtol=1e-4
    )
    d_log_theta = theta * (LAM_P * inside * norms / N).sum(0)
    torch.testing.assert_close(
        grads["log_threshold"] - grads0["log_threshold"], d_log_theta, atol=1e-6, rtol=1e-4
    )
    if latents == "dead":  # live latents' parameters see no pre-activation loss at all
        assert torch.all((grads["W_enc"] - grads0["W_enc"])[:, ~dead].abs() < 1e-7)


@pytest.mark.parametrize("architecture", ["relu", "gated", "topk", "batchtopk", "jumprelu"])
def test_encoder_init_norm_scales_the_tied_encoder(architecture):
    gen = torch.Generator().manual_seed(0)
    cfg = DictionaryConfig(architecture=architecture, n_latents=48, k=4)
    default = build_dictionary(cfg, 16, 16, torch.device("cpu"), gen)
    # The architecture's own norm when the field is null; the decoder's rows at unit norm.
    expected = type(default).encoder_init_norm
    assert torch.allclose(default.W_enc.norm(dim=0), torch.full((48,), expected), atol=1e-5)
    assert torch.allclose(default.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    set_ = DictionaryConfig(architecture=architecture, n_latents=48, k=4, encoder_init_norm=0.3)
    scaled = build_dictionary(set_, 16, 16, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.allclose(scaled.W_enc, 0.3 * scaled.W_dec.T, atol=1e-6)  # tied, at 0.3
    assert torch.allclose(scaled.W_dec, default.W_dec)  # the same directions


def test_encoder_init_norm_sets_a_transcoders_random_columns():
    cfg = DictionaryConfig(architecture="topk", n_latents=4096, k=4, encoder_init_norm=0.2)
    tc = build_dictionary(cfg, 64, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    norms = tc.W_enc.detach().norm(dim=0)
    assert abs(float(norms.mean()) - 0.2) < 0.01  # random columns of expected norm 0.2


def test_encoder_init_norm_must_be_positive():
    from saetrain.api import config_from_overrides
    from saetrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dictionary.encoder_init_norm=0.0 is not valid"):
        config_from_overrides(["dictionary.encoder_init_norm=0"])
