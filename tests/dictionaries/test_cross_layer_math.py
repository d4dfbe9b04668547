"""Cross-layer dictionaries (issue 12): the CLT's and the crosscoder's math against independent
float64 computations written here from the spec — a one-layer CLT is a transcoder, the JumpReLU
CLT's penalty gradients (straight-through threshold included), causality and the dense decode,
scale folding, the crosscoder's decoder norm / L1 / export layout, and save → load."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries import ARCHITECTURES, Layout, SparseCodes, build_dictionary
from saetrain.dictionaries.clt import CLT_CLASSES, JumpReLUCLT
from saetrain.dictionaries.crosscoder import crosscoder_class
from saetrain.dictionaries.layout import CLT_ARCHITECTURES, CROSSCODER_ARCHITECTURES
from saetrain.export.saelens import load_dictionary, save_dictionary
from tests.helpers.cross_layer import (
    clt_weights,
    dense_clt_decode,
    dense_clt_forward,
    dense_clt_pre,
)

F64 = torch.float64

# Options that make every loss term matter: AuxK on (a large coefficient), JumpReLU with the tanh
# penalty and the pre-activation loss, a bandwidth wide enough that many pre-activations sit in
# the threshold's window.
ARCH_KWARGS = {
    "topk": {"k": 3, "aux_k": 5, "aux_k_coefficient": 0.5},
    "jumprelu": {
        "sparsity_loss": "tanh",
        "tanh_scale": 2.5,
        "pre_act_coefficient": 0.3,
        "sparsity_coefficient": 0.7,
        "bandwidth": 0.4,
        "init_threshold": 0.3,
    },
    "relu": {"sparsity_coefficient": 0.6},
    "batchtopk": {"k": 3, "aux_k": 5, "aux_k_coefficient": 0.5},
}


def _randomise(module: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial biases, skip weights, thresholds and decoder row norms (init leaves them 0/1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "log_threshold":
                p.copy_(torch.empty(p.shape).uniform_(0.1, 0.7, generator=g).log())
            elif name.startswith(("b_", "r_")) or name == "W_skip":
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.startswith("W_dec"):
                p.mul_(torch.empty(p.shape[0], 1, dtype=p.dtype).uniform_(0.5, 2.0, generator=g))
        threshold = getattr(module, "threshold", None)
        if isinstance(threshold, torch.Tensor) and not isinstance(threshold, torch.nn.Parameter):
            if "threshold" in dict(module.named_buffers()):  # BatchTopK's inference threshold(s)
                threshold.copy_(torch.empty(threshold.shape).uniform_(0.1, 0.5, generator=g))


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# -- 1. a CLT over one layer is a transcoder ---------------------------------------------------


def _transcoder_and_clt(arch: str, skip: bool, pre_act_latents: str = "all"):
    d_in, d_out, n = 8, 6, 24
    kwargs = dict(ARCH_KWARGS[arch])
    if arch == "jumprelu":
        kwargs["pre_act_latents"] = pre_act_latents
    g = torch.Generator().manual_seed(0)
    tc = ARCHITECTURES[arch](d_in, n, d_out, transcoder=True, skip=skip, dtype=F64, generator=g,
                             **kwargs)  # fmt: skip
    _randomise(tc, g)
    clt = CLT_CLASSES[arch](d_in, n, d_out, n_layers=1, skip=skip, dtype=F64, **kwargs)
    with torch.no_grad():
        clt.W_enc.copy_(tc.W_enc[None])
        clt.b_enc.copy_(tc.b_enc)
        clt.W_dec[0].copy_(tc.W_dec)
        clt.b_dec.copy_(tc.b_dec)
        if skip:
            clt.W_skip.copy_(tc.W_skip[None])
        if arch == "jumprelu":
            clt.log_threshold.copy_(tc.log_threshold)
    return tc, clt, g


def _clt_grads_as_transcoder(clt) -> dict[str, torch.Tensor]:
    g = _grads(clt)
    out = {"W_enc": g["W_enc"][0], "b_enc": g["b_enc"], "W_dec": g["W_dec.0"], "b_dec": g["b_dec"]}
    if "W_skip" in g:
        out["W_skip"] = g["W_skip"][0]
    if "log_threshold" in g:
        out["log_threshold"] = g["log_threshold"]
    return out


CASES = [
    ("topk", False, "all", 9),  # 9 dead of 24: AuxK selects aux_k=5 of them, weight 1
    ("topk", True, "all", 3),  # 3 dead < aux_k: AuxK weakened to 3/5
    ("topk", False, "all", 0),  # no dead latents: no AuxK term at all
    ("jumprelu", False, "all", 7),
    ("jumprelu", True, "dead", 7),  # the pre-activation loss on dead latents only
    ("relu", False, "all", 0),
    ("relu", True, "all", 0),
]


@pytest.mark.parametrize(("arch", "skip", "pre_act_latents", "n_dead"), CASES)
def test_one_layer_clt_equals_a_transcoder(arch, skip, pre_act_latents, n_dead):
    tc, clt, g = _transcoder_and_clt(arch, skip, pre_act_latents)
    x = torch.randn(40, 8, generator=g, dtype=F64)
    y = torch.randn(40, 6, generator=g, dtype=F64) + 0.5
    dead = torch.zeros(24, dtype=torch.bool)
    dead[torch.randperm(24, generator=g)[:n_dead]] = True
    if arch == "topk":
        assert clt.aux_k == tc.aux_k == 5

    # inference: codes and prediction
    with torch.no_grad():
        c_tc, c_clt = tc.encode(x), clt.encode(x)
        dense = lambda c: c.to_dense(24) if isinstance(c, SparseCodes) else c  # noqa: E731
        torch.testing.assert_close(dense(c_clt), dense(c_tc), rtol=0, atol=1e-12)
        assert int((dense(c_tc) != 0).sum()) > 0
        torch.testing.assert_close(clt.decode(c_clt), tc.decode(c_tc), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(clt(x), tc(x), rtol=1e-12, atol=1e-12)

    # training: loss, every logged term, gradients (AuxK included)
    out_tc = tc.training_forward(x, y, dead, sparsity_multiplier=0.8)
    out_clt = clt.training_forward(x, y, dead, sparsity_multiplier=0.8)
    assert out_clt.terms.keys() == out_tc.terms.keys()
    if arch == "topk":
        assert ("auxk" in out_tc.terms) is (n_dead > 0)
        if n_dead:
            assert float(out_tc.terms["auxk"]) > 0
    if arch == "jumprelu":
        assert {"l0_penalty", "pre_act"} <= out_tc.terms.keys()
    for key in out_tc.terms:
        torch.testing.assert_close(out_clt.terms[key], out_tc.terms[key], rtol=1e-9, atol=1e-12,
                                   msg=key)  # fmt: skip
    torch.testing.assert_close(out_clt.loss, out_tc.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out_clt.x_hat, out_tc.x_hat, rtol=1e-9, atol=1e-12)
    out_tc.loss.backward()
    out_clt.loss.backward()
    g_tc, g_clt = _grads(tc), _clt_grads_as_transcoder(clt)
    assert g_clt.keys() == g_tc.keys()
    for key in g_tc:
        assert g_tc[key].abs().max() > 0, key
        # log_threshold is fp32 in both (kept in fp32 whatever the weights' dtype)
        tol = 1e-6 if key == "log_threshold" else 1e-9
        torch.testing.assert_close(g_clt[key], g_tc[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize(
    "dead_per_layer", [(9, 0, 2), (7, 8, 9), (0, 0, 0)], ids=["uneven", "every-layer", "none"]
)
def test_topk_clt_loss_and_auxk_over_layers_match_a_dense_reference(dead_per_layer):
    """3 layers: FVU of the dense prediction + AuxK where each layer's top min(aux_k, dead in that
    layer) dead pre-activations decode through that layer's own decoders (to every later layer)
    and the term is weighted by min(total dead / (aux_k·L), 1) (the module docstring); values,
    terms and every gradient against a dense float64 autograd reference."""
    L, d_i, d_o, n, N, k, aux_k, coef = 3, 5, 4, 12, 48, 3, 5, 0.5
    g = torch.Generator().manual_seed(5)
    clt = CLT_CLASSES["topk"](L * d_i, L * n, L * d_o, n_layers=L, k=k, aux_k=aux_k,
                              aux_k_coefficient=coef, dtype=F64, generator=g)  # fmt: skip
    _randomise(clt, g)
    x = torch.randn(N, L * d_i, generator=g, dtype=F64)
    y = torch.randn(N, L * d_o, generator=g, dtype=F64) + 1.0
    dead = torch.zeros(L * n, dtype=torch.bool)
    for li, count in enumerate(dead_per_layer):
        dead[li * n + torch.randperm(n, generator=g)[:count]] = True
    out = clt.training_forward(x, y, dead)
    out.loss.backward()

    leaves = {"W_enc": clt.W_enc.detach().clone(), "b_enc": clt.b_enc.detach().clone(),
              "b_dec": clt.b_dec.detach().clone()}  # fmt: skip
    for li in range(L):
        leaves[f"W_dec.{li}"] = clt.W_dec[li].detach().clone()
    for t in leaves.values():
        t.requires_grad_()
    codes, aux_codes = [], []
    for li in range(L):
        pre = (
            x[:, li * d_i : (li + 1) * d_i] @ leaves["W_enc"][li]
            + leaves["b_enc"][li * n : (li + 1) * n]
        )
        top = torch.zeros_like(pre, dtype=torch.bool).scatter_(
            1, pre.detach().topk(k).indices, True
        )
        codes.append(torch.where(top, pre.clamp_min(0), torch.zeros_like(pre)))
        dl = dead[li * n : (li + 1) * n]
        m = min(aux_k, int(dl.sum()))
        sel = torch.zeros_like(top)
        if m:
            masked = pre.detach().masked_fill(~dl, float("-inf"))
            sel.scatter_(1, masked.topk(m).indices, True)
        aux_codes.append(torch.where(sel, pre.clamp_min(0), torch.zeros_like(pre)))

    def decode(cs, bias):
        outs = []
        for lp in range(L):
            acc = leaves["b_dec"][lp * d_o : (lp + 1) * d_o] if bias else 0
            for li in range(lp + 1):
                j = lp - li
                acc = acc + cs[li] @ leaves[f"W_dec.{li}"][:, j * d_o : (j + 1) * d_o]
            outs.append(acc * torch.ones(N, d_o, dtype=F64))
        return torch.cat(outs, -1)

    y_hat = decode(codes, True)
    fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    loss = fvu
    n_dead = int(dead.sum())
    if n_dead:
        e = (y - y_hat).detach()
        e_hat = decode(aux_codes, False)
        auxk = (
            min(n_dead / (aux_k * L), 1.0) * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        )
        loss = loss + coef * auxk
        torch.testing.assert_close(out.terms["auxk"], auxk.detach(), rtol=1e-10, atol=0)
    else:
        assert "auxk" not in out.terms
    loss.backward()
    torch.testing.assert_close(out.terms["fvu"], fvu.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-10, atol=0)
    got = _grads(clt)
    assert got.keys() == leaves.keys()
    for key, leaf in leaves.items():
        assert leaf.grad.abs().max() > 1e-3, key
        # the CPU sparse kernels (encode_gather / sparse_decode backward) accumulate in float32
        torch.testing.assert_close(got[key], leaf.grad, rtol=1e-6, atol=1e-6, msg=key)


# -- 2. JumpReLU CLT: penalty gradients against a closed form ----------------------------------


def test_jumprelu_clt_tanh_and_pre_act_gradients_match_closed_form():
    """Every gradient of the JumpReLU CLT's loss (MSE + m·λ·Σtanh(c·z·‖W_dec‖) + λ_P·Σ ReLU(θ −
    pre)·‖W_dec‖, ‖W_dec‖ the norm of a latent's whole row over later layers), against the
    derivatives written out by hand in float64, with the straight-through threshold gradients
    ∂z/∂θ = −(θ/ε)·K and no gradient through the step to pre."""
    L, d_i, d_o, n, N = 3, 5, 4, 6, 64
    lam, lam_p, c, eps, mult = 0.8, 0.3, 2.5, 0.5, 0.6
    g = torch.Generator().manual_seed(1)
    clt = JumpReLUCLT(L * d_i, L * n, L * d_o, n_layers=L, sparsity_loss="tanh", tanh_scale=c,
                      pre_act_coefficient=lam_p, sparsity_coefficient=lam, bandwidth=eps,
                      dtype=F64, generator=g)  # fmt: skip
    _randomise(clt, g)
    x = torch.randn(N, L * d_i, generator=g, dtype=F64)
    y = torch.randn(N, L * d_o, generator=g, dtype=F64)
    out = clt.training_forward(x, y, None, sparsity_multiplier=mult)
    out.loss.backward()

    # the closed form
    W_enc, b_enc, W_dec, b_dec = clt_weights(clt)
    theta_all = clt.threshold.detach().double()
    pres = dense_clt_pre(clt, x)
    z, H, K, th, r = [], [], [], [], []
    for li in range(L):
        t = theta_all[li * n : (li + 1) * n]
        th.append(t)
        H.append((pres[li] > t).double())
        K.append(((pres[li] - t).abs() < eps / 2).double())
        z.append(pres[li] * H[li])
        r.append(W_dec[li].norm(dim=1))
    assert sum(float(k.sum()) for k in K) > 20, "too few pre-activations in the window"
    y_hat = dense_clt_decode(clt, z)
    R = y_hat - y
    mse = R.pow(2).sum(-1).mean()
    tanh = [torch.tanh(c * z[li] * r[li]) for li in range(L)]
    S = sum(t.sum(-1).mean() for t in tanh)
    P = sum(((th[li] - pres[li]).clamp_min(0) * r[li]).sum(-1).mean() for li in range(L))
    loss = mse + mult * lam * S + lam_p * P
    torch.testing.assert_close(out.terms["mse"], mse, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.terms["l0_penalty"], S, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.terms["pre_act"], P, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=0)

    dy = 2 * R / N
    blk = lambda t, j, d: t[:, j * d : (j + 1) * d]  # noqa: E731
    ref: dict[str, torch.Tensor] = {"b_dec": dy.sum(0)}
    g_enc, g_benc, g_logth = [], [], []
    for li in range(L):
        sech2 = 1 - tanh[li].pow(2)
        gz = sum(blk(dy, lp, d_o) @ blk(W_dec[li], lp - li, d_o).T for lp in range(li, L))
        gz = gz + mult * lam * sech2 * c * r[li] / N
        below = (th[li] > pres[li]).double()
        g_pre = gz * H[li] - lam_p * below * r[li] / N
        g_theta = (gz * (-(th[li] / eps) * K[li])).sum(0) + lam_p * (below * r[li]).sum(0) / N
        g_r = mult * lam * (sech2 * c * z[li]).sum(0) / N
        g_r = g_r + lam_p * (th[li] - pres[li]).clamp_min(0).sum(0) / N
        gW = torch.cat([z[li].T @ blk(dy, lp, d_o) for lp in range(li, L)], dim=1)
        ref[f"W_dec.{li}"] = gW + g_r[:, None] * W_dec[li] / r[li][:, None]
        g_enc.append(blk(x, li, d_i).T @ g_pre)
        g_benc.append(g_pre.sum(0))
        g_logth.append(th[li] * g_theta)
    ref["W_enc"] = torch.stack(g_enc)
    ref["b_enc"] = torch.cat(g_benc)
    ref["log_threshold"] = torch.cat(g_logth)

    got = _grads(clt)
    assert got.keys() == ref.keys()
    for key in ref:
        assert ref[key].abs().max() > 1e-3, key
        tol = 1e-5 if key == "log_threshold" else 1e-6  # θ is fp32
        torch.testing.assert_close(got[key].double(), ref[key], rtol=tol, atol=tol, msg=key)


# -- 3. CLT causality and the dense decode -----------------------------------------------------


def _clt(arch: str, L: int = 3, d_i: int = 5, d_o: int = 4, n: int = 8, skip: bool = False,
         dtype: torch.dtype = F64, seed: int = 0):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(ARCH_KWARGS[arch])
    clt = CLT_CLASSES[arch](L * d_i, L * n, L * d_o, n_layers=L, skip=skip, dtype=dtype,
                            generator=g, **kwargs)  # fmt: skip
    _randomise(clt, g)
    return clt, g


@pytest.mark.parametrize("arch", CLT_ARCHITECTURES)
def test_clt_prediction_ignores_later_layers_and_equals_the_dense_sum(arch):
    L, d_i, d_o, n = 3, 5, 4, 8
    clt, g = _clt(arch, L, d_i, d_o, n)
    x = torch.randn(50, L * d_i, generator=g, dtype=F64)
    with torch.no_grad():
        y = clt(x)
        codes = clt.encode(x)
        dense_codes, dense_y = dense_clt_forward(clt, arch, x)
        got_codes = codes.to_dense(L * n) if isinstance(codes, SparseCodes) else codes
        torch.testing.assert_close(got_codes, dense_codes, rtol=0, atol=1e-12)
        torch.testing.assert_close(y, dense_y, rtol=1e-12, atol=1e-12)
        # decode of dense codes (made sparse inside) equals the dense sum too
        torch.testing.assert_close(clt.decode(dense_codes), dense_y, rtol=1e-12, atol=1e-12)
        # every layer's latents write somewhere, and layer 0 reaches the last layer
        assert all(float(c.abs().sum()) > 0 for c in dense_codes.split(n, dim=1))
        for lp in range(L - 1):  # change every input after layer lp
            x2 = x.clone()
            x2[:, (lp + 1) * d_i :] = 5 * torch.randn(50, (L - lp - 1) * d_i, generator=g,
                                                      dtype=F64)  # fmt: skip
            y2 = clt(x2)
            keep = slice(0, (lp + 1) * d_o)
            torch.testing.assert_close(y2[:, keep], y[:, keep], rtol=0, atol=1e-12)
            assert not torch.allclose(y2[:, (lp + 1) * d_o :], y[:, (lp + 1) * d_o :])


@pytest.mark.parametrize("arch", CLT_ARCHITECTURES)
def test_clt_training_prediction_is_causal_and_dense(arch):
    """training_forward's x̂ (the sparse training decode) equals the dense computation, and a
    layer's training prediction does not depend on later inputs."""
    L, d_i, d_o, n = 3, 5, 4, 8
    clt, g = _clt(arch, L, d_i, d_o, n)
    x = torch.randn(50, L * d_i, generator=g, dtype=F64)
    target = torch.randn(50, L * d_o, generator=g, dtype=F64)
    out = clt.training_forward(x, target, None)
    if arch != "batchtopk":  # BatchTopK trains on the batch's top k·N, infers by threshold
        _, dense_y = dense_clt_forward(clt, arch, x)
        torch.testing.assert_close(out.x_hat.detach(), dense_y, rtol=1e-12, atol=1e-12)
    x2 = x.clone()
    x2[:, d_i:] += 3.0
    out2 = clt.training_forward(x2, target, None)
    torch.testing.assert_close(out2.x_hat[:, :d_o], out.x_hat[:, :d_o], rtol=0, atol=1e-12)


# -- 4. folding per-site scales ----------------------------------------------------------------


def _fold_check(dictionary, s_in: torch.Tensor, s_out: torch.Tensor, x: torch.Tensor) -> None:
    folded = copy.deepcopy(dictionary)
    folded.fold_input_scale(s_in, s_out)
    with torch.no_grad():
        want = dictionary(x * s_in) / s_out
        got = folded(x)
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        # same codes too (the pre-activations are training's)
        ca, cb = dictionary.encode(x * s_in), folded.encode(x)
        if isinstance(ca, SparseCodes):
            ca, cb = ca.to_dense(dictionary.n_latents), cb.to_dense(dictionary.n_latents)
        torch.testing.assert_close(cb, ca, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("arch", CLT_ARCHITECTURES)
def test_folded_clt_on_raw_inputs_equals_unfolded_on_scaled(arch, skip):
    L, d_i, d_o, n = 3, 5, 4, 8
    clt, g = _clt(arch, L, d_i, d_o, n, skip=skip)
    # per column (each column its own scale, stricter than per site)
    s_in = torch.empty(L * d_i, dtype=F64).uniform_(0.3, 3.0, generator=g)
    s_out = torch.empty(L * d_o, dtype=F64).uniform_(0.3, 3.0, generator=g)
    x = torch.randn(40, L * d_i, generator=g, dtype=F64) / s_in
    _fold_check(clt, s_in, s_out, x)
    # per site, as block_normalization_scales makes them
    s_in = torch.tensor([0.5, 2.0, 7.0], dtype=F64).repeat_interleave(d_i)
    s_out = torch.tensor([3.0, 0.25, 1.5], dtype=F64).repeat_interleave(d_o)
    _fold_check(clt, s_in, s_out, x)
    # one number each (dictionary.normalize_activations=false gives 1.0)
    _fold_check(clt, 2.5, 0.4, x)
    _fold_check(clt, 1.0, 1.0, x)


@pytest.mark.parametrize("arch", CROSSCODER_ARCHITECTURES)
def test_folded_crosscoder_on_raw_inputs_equals_unfolded_on_scaled(arch):
    S, d, n = 3, 5, 16
    cfg = DictionaryConfig(architecture=arch, kind="crosscoder", n_latents=n, k=3, dtype="float32")
    g = torch.Generator().manual_seed(2)
    cc = build_dictionary(cfg, S * d, S * d, torch.device("cpu"), g,
                          layout=Layout("crosscoder", (d,) * S, (d,) * S)).double()  # fmt: skip
    assert cc.kind == "crosscoder" and not cc.transcoder
    _randomise(cc, g)
    s = torch.empty(S * d, dtype=F64).uniform_(0.3, 3.0, generator=g)
    x = torch.randn(40, S * d, generator=g, dtype=F64) / s
    _fold_check(cc, s, s, x)


# -- 5. crosscoder decoder norms, ReLU's L1, export layout -------------------------------------


def _crosscoder(arch: str, S: int = 3, d: int = 5, n: int = 12, seed: int = 3, **kw):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(ARCH_KWARGS.get(arch, {})) | kw
    cls = crosscoder_class(ARCHITECTURES[arch])
    cc = cls(S * d, n, S * d, source_widths=(d,) * S, dtype=F64, generator=g, **kwargs)
    _randomise(cc, g)
    return cc, g


def test_crosscoder_decoder_norms_are_summed_over_sources():
    S, d, n = 3, 5, 12
    cc, _ = _crosscoder("relu", S, d, n)
    W = cc.W_dec.detach()
    want = sum(W[:, s * d : (s + 1) * d].norm(dim=1) for s in range(S))
    torch.testing.assert_close(cc.decoder_norms(), want, rtol=1e-12, atol=0)
    assert not torch.allclose(want, W.norm(dim=1))  # not the norm of the whole row


@pytest.mark.parametrize("mult", [1.0, 0.25])
def test_relu_crosscoder_l1_and_gradients_are_weighted_by_summed_source_norms(mult):
    S, d, n, N = 3, 5, 12, 30
    cc, g = _crosscoder("relu", S, d, n, sparsity_coefficient=0.6)
    x = torch.randn(N, S * d, generator=g, dtype=F64)
    out = cc.training_forward(x, x, None, sparsity_multiplier=mult)
    out.loss.backward()

    # independent: leaf copies, the crosscoder written out
    W_enc = cc.W_enc.detach().clone().requires_grad_()
    b_enc = cc.b_enc.detach().clone().requires_grad_()
    W_dec = cc.W_dec.detach().clone().requires_grad_()
    b_dec = cc.b_dec.detach().clone().requires_grad_()
    z = ((x - b_dec) @ W_enc + b_enc).clamp_min(0)
    norms = sum(W_dec[:, s * d : (s + 1) * d].norm(dim=1) for s in range(S))
    l1 = (z * norms).sum(-1).mean()
    mse = (x - (z @ W_dec + b_dec)).pow(2).sum(-1).mean()
    loss = mse + mult * 0.6 * l1
    loss.backward()
    assert float(l1.detach()) > 0
    torch.testing.assert_close(out.terms["l1"], l1.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.terms["mse"], mse.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-12, atol=0)
    for name, leaf in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        got = getattr(cc, name).grad
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_jumprelu_crosscoder_penalties_use_summed_source_norms():
    S, d, n, N = 3, 5, 12, 30
    cc, g = _crosscoder("jumprelu", S, d, n)
    x = torch.randn(N, S * d, generator=g, dtype=F64)
    out = cc.training_forward(x, x, None)
    pre = ((x - cc.b_dec) @ cc.W_enc + cc.b_enc).detach()
    theta = cc.threshold.detach().double()
    W = cc.W_dec.detach()
    norms = sum(W[:, s * d : (s + 1) * d].norm(dim=1) for s in range(S))
    z = torch.where(pre > theta, pre, torch.zeros_like(pre))
    tanh = torch.tanh(2.5 * z * norms).sum(-1).mean()
    pre_act = ((theta - pre).clamp_min(0) * norms).sum(-1).mean()
    torch.testing.assert_close(out.terms["l0_penalty"], tanh, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.terms["pre_act"], pre_act, rtol=1e-6, atol=0)


def test_crosscoder_export_layout():
    S, d, n = 3, 5, 12
    cc, _ = _crosscoder("topk", S, d, n)
    t = cc.saelens_tensors()
    assert t["W_enc"].shape == (S, d, n)
    assert t["b_enc"].shape == (n,)
    assert t["W_dec"].shape == (n, S, d)
    assert t["b_dec"].shape == (S, d)
    for s in range(S):  # source s is block s of the concatenated dictionary
        assert torch.equal(t["W_enc"][s], cc.W_enc.detach()[s * d : (s + 1) * d])
        assert torch.equal(t["W_dec"][:, s], cc.W_dec.detach()[:, s * d : (s + 1) * d])
        assert torch.equal(t["b_dec"][s], cc.b_dec.detach()[s * d : (s + 1) * d])


def test_clt_parameter_layout():
    L, d_i, d_o, n = 3, 5, 4, 8
    clt, _ = _clt("jumprelu", L, d_i, d_o, n, skip=True)
    t = clt.saelens_tensors()
    assert t["W_enc"].shape == (L, d_i, n)
    assert t["b_enc"].shape == (L * n,)
    for li in range(L):
        assert t[f"W_dec.{li}"].shape == (n, (L - li) * d_o)
    assert t["b_dec"].shape == (L * d_o,)
    assert t["W_skip"].shape == (L, d_o, d_i)
    assert t["threshold"].shape == (L * n,)
    assert "log_threshold" not in t
    assert clt.decoder_norms().shape == (L * n,)
    torch.testing.assert_close(
        clt.decoder_norms(), torch.cat([clt.W_dec[li].detach().norm(dim=1) for li in range(L)])
    )


# -- 6. save → load ------------------------------------------------------------------------------


def _roundtrip(dictionary, tmp_path, x, loads_as=None):
    save_dictionary(dictionary.float(), tmp_path, {"model_name": "tiny"})
    loaded = load_dictionary(tmp_path)
    assert type(loaded) is (loads_as or type(dictionary))
    with torch.no_grad():
        a, b = dictionary.eval()(x), loaded(x)
    assert a.abs().max() > 0
    assert torch.equal(a, b), float((a - b).abs().max())
    return loaded, json.loads((tmp_path / "cfg.json").read_text())


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("arch", CLT_ARCHITECTURES)
def test_clt_save_load_gives_identical_outputs(arch, skip, tmp_path):
    L, d_i, d_o, n = 3, 5, 4, 8
    clt, g = _clt(arch, L, d_i, d_o, n, skip=skip)
    x = torch.randn(30, L * d_i, generator=g)
    loaded, cfg = _roundtrip(clt, tmp_path, x)
    assert cfg["architecture"] == "clt" and cfg["clt_architecture"] == arch
    assert (cfg["n_layers"], cfg["d_in_per_layer"], cfg["d_out_per_layer"],
            cfg["d_sae_per_layer"]) == (L, d_i, d_o, n)  # fmt: skip
    assert loaded.n_layers == L and (loaded.W_skip is not None) is skip
    if arch == "topk":
        assert loaded.k == clt.k


@pytest.mark.parametrize("arch", CROSSCODER_ARCHITECTURES)
def test_crosscoder_save_load_gives_identical_outputs(arch, tmp_path):
    S, d, n = 3, 5, 16
    cfg = DictionaryConfig(architecture=arch, kind="crosscoder", n_latents=n, k=3)
    g = torch.Generator().manual_seed(4)
    cc = build_dictionary(cfg, S * d, S * d, torch.device("cpu"), g,
                          layout=Layout("crosscoder", (d,) * S, (d,) * S))  # fmt: skip
    _randomise(cc, g)
    if arch in ("batchtopk", "matryoshka"):  # inference: a JumpReLU with the learnt threshold
        cc.threshold.fill_(0.2)
    x = torch.randn(30, S * d, generator=g)
    # BatchTopK and Matryoshka export as the JumpReLU they are at inference (as an SAE does)
    inference = "jumprelu" if arch in ("batchtopk", "matryoshka") else arch
    loaded, saved = _roundtrip(cc, tmp_path, x, crosscoder_class(ARCHITECTURES[inference]))
    inner = {"relu": "standard", "gated": "gated", "topk": "topk", "jumprelu": "jumprelu"}
    assert saved["crosscoder_architecture"] == inner[inference]
    assert saved["architecture"] == "crosscoder"
    assert (saved["n_sources"], saved["d_source"]) == (S, d)
    assert loaded.kind == "crosscoder" and loaded.source_widths == (d,) * S
    torch.testing.assert_close(loaded.decoder_norms(), cc.decoder_norms(), rtol=0, atol=0)


def test_clt_from_build_dictionary_counts_latents_per_layer():
    cfg = DictionaryConfig(architecture="topk", kind="clt", n_latents=8, k=2)
    clt = build_dictionary(cfg, 15, 12, torch.device("cpu"), torch.Generator().manual_seed(0),
                           layout=Layout("clt", (5, 5, 5), (4, 4, 4)))  # fmt: skip
    assert (clt.n_layers, clt.layer_latents, clt.n_latents) == (3, 8, 24)
    assert clt.aux_k == 5 // 2  # Gao et al.'s d/2 of one layer's input
    assert clt.transcoder and not clt.apply_b_dec_to_input
    assert math.isclose(float(clt.W_dec[0].detach().norm(dim=1).mean()), 1.0, rel_tol=1e-6)


# -- the decoder constraint under the trainer --------------------------------------------------


@pytest.mark.parametrize("kind", ["clt", "crosscoder"])
@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_trainer_keeps_whole_decoder_rows_at_unit_norm(kind, arch):
    """TopK / JumpReLU: after every step each latent's whole decoder row (a CLT's decoders to all
    later layers together; a crosscoder's to all sources) has norm 1, and the gradient parallel
    to it is removed first; ReLU's rows are free."""
    from saetrain.config import TrainerConfig
    from saetrain.training.trainer import Trainer

    L, d, n = 3, 6, 10
    g = torch.Generator().manual_seed(6)
    kw = {"k": 3} if arch == "topk" else {}
    if kind == "clt":
        dictionary = CLT_CLASSES[arch](L * d, L * n, L * d, n_layers=L, generator=g, **kw)
        width = 2 * L * d
    else:
        dictionary = crosscoder_class(ARCHITECTURES[arch])(L * d, n, L * d, source_widths=(d,) * L,
                                                           generator=g, **kw)  # fmt: skip
        width = L * d
    cfg = TrainerConfig(total_tokens=64 * 4, batch_tokens=64, lr=5e-2, warmup_steps=0)
    scale = torch.empty(L * d).uniform_(0.5, 2.0, generator=g)
    trainer = Trainer(dictionary, cfg, scale, 4, target_scale=scale)

    def rows():
        if kind == "clt":
            return torch.cat([W.detach() for W in dictionary.W_dec], dim=1)
        return dictionary.W_dec.detach()

    before = [r.clone() for r in rows()]
    decoders = list(dictionary.W_dec) if kind == "clt" else [dictionary.W_dec]
    for _ in range(4):
        old = [W.detach().clone() for W in decoders]
        trainer.step(torch.randn(64, width, generator=g))
        if dictionary.unit_norm_decoder:  # the gradient was projected off the (old) rows
            for W, W_old in zip(decoders, old, strict=True):
                unit = W_old / W_old.norm(dim=1, keepdim=True)
                assert W.grad.abs().max() > 0
                assert (W.grad * unit).sum(1).abs().max() < 1e-6
    norms = dictionary.decoder_norms() if kind == "clt" else rows().norm(dim=1)
    if arch == "relu":
        assert dictionary.unit_norm_decoder is False
        assert (norms - 1).abs().max() > 1e-3
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    assert not torch.allclose(torch.stack(before), rows())  # it did train


@pytest.mark.parametrize("arch", CLT_ARCHITECTURES)
def test_clt_decode_is_sparse_per_layer(arch, monkeypatch):
    """Every decode (inference and training) goes through sparse_decode once per layer, against
    that layer's own [n, (L−ℓ)·d] decoder, with layer-local indices and no more slots than the
    widest layer's active count; nothing multiplies a dense [N, L·n] code matrix."""
    import saetrain.dictionaries.clt as clt_module

    L, d_i, d_o, n = 3, 5, 4, 8
    clt, g = _clt(arch, L, d_i, d_o, n)
    x = torch.randn(30, L * d_i, generator=g, dtype=F64)
    calls = []
    real = clt_module.sparse_decode

    def spy(indices, values, W):
        calls.append((indices.shape, W.shape, int(indices.min()), int(indices.max())))
        return real(indices, values, W)

    monkeypatch.setattr(clt_module, "sparse_decode", spy)
    with torch.no_grad():
        codes = clt.encode(x)
        y = clt(x)
    dense = codes.to_dense(L * n) if isinstance(codes, SparseCodes) else codes
    widest = int((dense.reshape(30, L, n) != 0).sum(-1).max())
    assert len(calls) == L  # one sparse product per layer
    for i, (idx_shape, W_shape, lo, hi) in enumerate(calls[:L]):
        assert W_shape == (n, (L - i) * d_o)
        assert 0 <= lo and hi < n
        assert idx_shape[1] <= max(widest, clt.k if arch == "topk" else 0, 1)
    calls.clear()
    target = torch.randn(30, L * d_o, generator=g, dtype=F64)
    out = clt.training_forward(x, target, None)
    main = [c for c in calls if c[1][0] == n][:L]
    assert [c[1] for c in main] == [(n, (L - li) * d_o) for li in range(L)]
    if arch != "batchtopk":  # BatchTopK trains on the batch's top k·N, infers by threshold
        torch.testing.assert_close(out.x_hat.detach(), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_dead", [0, 9])
def test_one_layer_batchtopk_clt_equals_a_batchtopk_transcoder(n_dead):
    """Training (the batch's top k·N, AuxK), gradients, the threshold's running average and the
    threshold inference of a one-layer BatchTopK CLT equal a BatchTopK transcoder's."""
    d_in, d_out, n = 8, 6, 24
    g = torch.Generator().manual_seed(7)
    kwargs = dict(ARCH_KWARGS["batchtopk"]) | {"threshold_momentum": 0.7}
    tc = ARCHITECTURES["batchtopk"](d_in, n, d_out, transcoder=True, dtype=F64, generator=g,
                                    **kwargs)  # fmt: skip
    _randomise(tc, g)
    clt = CLT_CLASSES["batchtopk"](d_in, n, d_out, n_layers=1, dtype=F64, **kwargs)
    with torch.no_grad():
        clt.W_enc.copy_(tc.W_enc[None])
        clt.b_enc.copy_(tc.b_enc)
        clt.W_dec[0].copy_(tc.W_dec)
        clt.b_dec.copy_(tc.b_dec)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n, generator=g)[:n_dead]] = True
    for _step in range(2):  # the first batch sets θ, the second averages into it
        x = torch.randn(40, d_in, generator=g, dtype=F64)
        y = torch.randn(40, d_out, generator=g, dtype=F64)
        for p in (*tc.parameters(), *clt.parameters()):
            p.grad = None
        a = tc.training_forward(x, y, dead)
        b = clt.training_forward(x, y, dead)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.x_hat, a.x_hat, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.codes.to_dense(n), a.codes.to_dense(n), rtol=0, atol=1e-12)
        assert ("auxk" in b.terms) is (n_dead > 0)
        a.loss.backward()
        b.loss.backward()
        g_tc, g_clt = _grads(tc), _clt_grads_as_transcoder(clt)
        for key in g_tc:
            torch.testing.assert_close(g_clt[key], g_tc[key], rtol=1e-9, atol=1e-12, msg=key)
        tc.after_step(a)
        clt.after_step(b)
        assert float(clt.threshold[0]) == pytest.approx(float(tc.threshold), rel=1e-6)
        assert float(tc.threshold) > 0
    with torch.no_grad():
        x = torch.randn(30, d_in, generator=g, dtype=F64)
        torch.testing.assert_close(clt(x), tc(x), rtol=1e-6, atol=1e-9)
