"""Tests for the sparse decode reference op and the TopK SAE on its shared dictionary base."""

from __future__ import annotations

import pytest
import torch
from saetrain.kernels.reference import sparse_decode

from saetrain.config import DictionaryConfig
from saetrain.dictionaries import ARCHITECTURES, SparseCodes, TopKSAE, build_dictionary


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_codes(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter with *addition*, so repeated indices in a row add up (as a sum over j does)."""
    dense = values.new_zeros(values.shape[0], n)
    return dense.scatter_add(1, indices, values)


def _sae(d: int = 16, n: int = 64, k: int = 4, seed: int = 0, **kwargs) -> TopKSAE:
    sae = TopKSAE(d, n, k=k, generator=_gen(seed), **kwargs)
    g = _gen(seed + 1000)
    with torch.no_grad():
        # Move away from the tied, zero-bias init so that every parameter matters.
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(sae.d_out, generator=g))
    return sae


def _canon(codes: SparseCodes) -> SparseCodes:
    """Codes with each row's latents in increasing order (topk's order is not a contract)."""
    indices, order = codes.indices.sort(dim=1)
    return SparseCodes(indices, codes.values.gather(1, order))


# -- sparse_decode --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("N", "k", "n", "d"),
    [(7, 1, 5, 3), (32, 4, 64, 16), (10, 8, 6, 5), (1, 3, 3, 2)],
)
def test_sparse_decode_matches_dense_product(N, k, n, d):
    g = _gen(N * 1000 + k)
    indices = torch.randint(0, n, (N, k), generator=g)
    values = torch.randn(N, k, generator=g)
    W_dec = torch.randn(n, d, generator=g)
    out = sparse_decode(indices, values, W_dec)
    expected = _dense_codes(indices, values, n) @ W_dec
    assert out.shape == (N, d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sparse_decode_repeated_indices_and_zero_values_by_hand():
    W_dec = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    indices = torch.tensor([[1, 1, 0], [2, 0, 2], [0, 1, 2]])
    values = torch.tensor([[2.0, 3.0, 0.0], [1.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    out = sparse_decode(indices, values, W_dec)
    expected = torch.tensor(
        [
            [5 * 10.0, 5 * 20.0],  # latent 1 twice: 2 + 3; latent 0 with value 0
            [0.5, 1.0],  # latent 2 with 1 and -1 cancels, latent 0 with 0.5
            [0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out, expected)


def test_sparse_decode_every_row_same_latent():
    g = _gen(3)
    W_dec = torch.randn(9, 4, generator=g)
    indices = torch.full((6, 5), 7)
    values = torch.rand(6, 5, generator=g)
    out = sparse_decode(indices, values, W_dec)
    torch.testing.assert_close(out, values.sum(1, keepdim=True) * W_dec[7], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_sparse_decode_gradients_match_dense_autograd(k):
    g = _gen(10 + k)
    N, n, d = 12, 8, 5
    indices = torch.randint(0, n, (N, k), generator=g)
    indices[0] = 2  # a row whose k entries are all the same latent
    values = torch.randn(N, k, generator=g)
    values[1, 0] = 0.0  # a zero value still gets a gradient
    W_dec = torch.randn(n, d, generator=g)
    upstream = torch.randn(N, d, generator=g)

    v1, W1 = values.clone().requires_grad_(), W_dec.clone().requires_grad_()
    (sparse_decode(indices, v1, W1) * upstream).sum().backward()

    v2, W2 = values.clone().requires_grad_(), W_dec.clone().requires_grad_()
    (_dense_codes(indices, v2, n) @ W2 * upstream).sum().backward()

    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-5, atol=1e-5)
    # By hand for one entry: d/dvalues[i, j] = <upstream[i], W_dec[indices[i, j]]>.
    torch.testing.assert_close(v1.grad[1, 0], upstream[1] @ W_dec[indices[1, 0]])
    # Latents that no row uses get no gradient.
    unused = torch.ones(n, dtype=torch.bool)
    unused[indices.flatten()] = False
    if unused.any():
        assert torch.all(W1.grad[unused] == 0)


def test_sparse_decode_casts_values_to_weight_dtype():
    g = _gen(4)
    indices = torch.randint(0, 6, (5, 2), generator=g)
    values = torch.randn(5, 2, generator=g, dtype=torch.float64)
    W_dec = torch.randn(6, 3, generator=g)
    out = sparse_decode(indices, values, W_dec)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _dense_codes(indices, values.float(), 6) @ W_dec)


def test_sparse_codes_to_dense():
    codes = SparseCodes(torch.tensor([[2, 0], [1, 3]]), torch.tensor([[5.0, 1.0], [0.0, 7.0]]))
    expected = torch.tensor([[1.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 7.0]])
    torch.testing.assert_close(codes.to_dense(4), expected)


# -- TopKSAE: shapes, init, encode, forward -------------------------------------------------------


def test_init_shapes_unit_decoder_and_tied_encoder():
    sae = TopKSAE(12, 40, k=3, generator=_gen(0))
    assert sae.W_enc.shape == (12, 40)
    assert sae.b_enc.shape == (40,)
    assert sae.W_dec.shape == (40, 12)
    assert sae.b_dec.shape == (12,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    torch.testing.assert_close(sae.W_enc, 0.5 * sae.W_dec.T)  # tied, at TopK's encoder_init_norm
    assert torch.all(sae.b_enc == 0) and torch.all(sae.b_dec == 0)
    assert sae.aux_k == 6  # d_in // 2 by default


def test_init_is_seeded():
    a = TopKSAE(8, 16, k=2, generator=_gen(5))
    b = TopKSAE(8, 16, k=2, generator=_gen(5))
    c = TopKSAE(8, 16, k=2, generator=_gen(6))
    assert torch.equal(a.W_dec, b.W_dec)
    assert not torch.allclose(a.W_dec, c.W_dec)


def test_transcoder_shapes():
    sae = TopKSAE(6, 20, d_out=9, k=2, generator=_gen(0))
    assert sae.W_enc.shape == (6, 20)
    assert sae.W_dec.shape == (20, 9)
    assert sae.b_dec.shape == (9,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))


@pytest.mark.parametrize("k", [1, 4, 9])
def test_encode_is_relu_of_top_k_pre_activations(k):
    sae = _sae(k=k)
    x = torch.randn(50, 16, generator=_gen(1))
    codes = sae.encode(x)
    assert codes.indices.shape == (50, k) and codes.values.shape == (50, k)
    assert codes.indices.dtype == torch.int64
    # k distinct latents per row
    assert torch.all(codes.indices.sort(dim=1).values.diff(dim=1) > 0)
    assert torch.all(codes.values >= 0)

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # dense computation by hand
    gathered = pre.gather(1, codes.indices)
    torch.testing.assert_close(codes.values, gathered.relu())
    # They are the k largest: each chosen one is ≥ every one not chosen.
    not_chosen = pre.scatter(1, codes.indices, float("-inf"))
    assert torch.all(gathered.min(dim=1).values >= not_chosen.max(dim=1).values)
    # Same set as torch.topk on the dense pre-activations.
    ref = pre.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(codes.indices.sort(dim=1).values, ref)


def test_encode_zeroes_negative_top_k_values():
    sae = _sae(k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation is negative
    codes = sae.encode(torch.randn(5, 16, generator=_gen(2)))
    assert codes.indices.shape == (5, 4)
    assert torch.all(codes.values == 0)


def test_forward_equals_decode_of_encode_and_dense_formula():
    sae = _sae()
    x = torch.randn(30, 16, generator=_gen(3))
    out = sae(x)
    torch.testing.assert_close(out, sae.decode(sae.encode(x)))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    torch.testing.assert_close(out, z @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)


def test_forward_on_three_dimensional_input():
    sae = _sae()
    x = torch.randn(3, 7, 16, generator=_gen(4))
    out = sae(x)
    assert out.shape == (3, 7, 16)
    torch.testing.assert_close(out, sae(x.reshape(21, 16)).reshape(3, 7, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_forward_preserves_input_dtype(dtype):
    sae = _sae()
    x32 = torch.randn(2, 5, 16, generator=_gen(5))
    x = x32.to(dtype)
    out = sae(x)
    assert out.dtype == dtype
    assert out.shape == x.shape
    # Computed in the dictionary's dtype from the (rounded) input.
    expected = sae(x.float()).to(dtype)
    assert torch.equal(out, expected)


def test_dictionary_in_half_precision_accepts_float32_input():
    sae = _sae().to(torch.bfloat16)
    x = torch.randn(4, 16, generator=_gen(6))
    out = sae(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sae(x.bfloat16()).float())


# -- fold_input_scale -----------------------------------------------------------------------------


@pytest.mark.parametrize("s", [4.0, 0.125])
def test_fold_input_scale_power_of_two_is_exact(s):
    sae = _sae()
    x = 3.0 * torch.randn(40, 16, generator=_gen(7))
    codes_scaled = sae.encode(s * x)
    out_scaled = sae(s * x)
    sae.fold_input_scale(s, s)
    codes_raw, codes_scaled = _canon(sae.encode(x)), _canon(codes_scaled)
    assert torch.equal(codes_raw.indices, codes_scaled.indices)
    assert torch.equal(codes_raw.values, codes_scaled.values)
    assert torch.equal(sae(x), out_scaled / s)


@pytest.mark.parametrize("s", [0.37, 2.9, 17.0])
def test_fold_input_scale(s):
    sae = _sae().double()
    x = torch.randn(40, 16, generator=_gen(8), dtype=torch.float64)
    codes_scaled = sae.encode(s * x)
    out_scaled = sae(s * x)
    sae.fold_input_scale(s, s)
    codes_raw, codes_scaled = _canon(sae.encode(x)), _canon(codes_scaled)
    assert torch.equal(codes_raw.indices, codes_scaled.indices)
    torch.testing.assert_close(codes_raw.values, codes_scaled.values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae(x), out_scaled / s, rtol=1e-12, atol=1e-12)
    # And the folded model is not the unfolded one (the test would be vacuous otherwise).
    assert not torch.allclose(sae(x), out_scaled)


def test_fold_input_scale_with_different_input_and_output_scales():
    s_in, s_out = 2.0, 8.0  # powers of two: any difference is not rounding
    sae = _sae()
    x = torch.randn(40, 16, generator=_gen(18))
    codes_scaled = sae.encode(s_in * x)
    out_scaled = sae(s_in * x)
    sae.fold_input_scale(s_in, s_out)
    assert torch.equal(_canon(sae.encode(x)).indices, _canon(codes_scaled).indices)
    torch.testing.assert_close(sae(x), out_scaled / s_out)


# -- decoder constraint ---------------------------------------------------------------------------


def test_set_decoder_unit_norm():
    sae = _sae()
    g = _gen(9)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=g) * 5 + 0.1)
    direction = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    sae.set_decoder_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_dec.detach(), direction)


def test_remove_gradient_parallel_to_decoder():
    sae = _sae()
    g = _gen(10)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=g) * 3 + 0.5)  # not unit-norm rows
    grad = torch.randn(64, 16, generator=g)
    sae.W_dec.grad = grad.clone()
    sae.remove_gradient_parallel_to_decoder()
    W = sae.W_dec.detach()
    unit = W / W.norm(dim=1, keepdim=True)
    new = sae.W_dec.grad
    # Orthogonal to every row.
    torch.testing.assert_close((new * unit).sum(1), torch.zeros(64), rtol=0, atol=1e-5)
    # The orthogonal part is unchanged: the removed part is parallel to each row.
    orth = grad - (grad * unit).sum(1, keepdim=True) * unit
    torch.testing.assert_close(new, orth, rtol=1e-5, atol=1e-5)
    removed = grad - new
    torch.testing.assert_close(removed, (grad * unit).sum(1, keepdim=True) * unit)
    assert removed.norm() > 1.0  # something was actually removed
    # Idempotent.
    sae.remove_gradient_parallel_to_decoder()
    torch.testing.assert_close(sae.W_dec.grad, orth, rtol=1e-5, atol=1e-5)


def test_remove_gradient_parallel_without_grad_is_a_no_op():
    sae = _sae()
    before = sae.W_dec.detach().clone()
    sae.remove_gradient_parallel_to_decoder()
    assert sae.W_dec.grad is None
    assert torch.equal(sae.W_dec.detach(), before)


# -- training_forward and AuxK --------------------------------------------------------------------


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def test_training_forward_without_dead_latents_is_fvu_only():
    sae = _sae()
    x = torch.randn(64, 16, generator=_gen(11))
    for dead in (None, torch.zeros(64, dtype=torch.bool)):
        out = sae.training_forward(x, x, dead)
        assert set(out.terms) == {"fvu"}
        torch.testing.assert_close(out.x_hat, sae(x))
        torch.testing.assert_close(out.loss, _fvu(x, sae(x)))
        torch.testing.assert_close(out.terms["fvu"], out.loss.detach())
        assert not out.terms["fvu"].requires_grad
        assert 0.0 < float(out.loss.detach()) < 10.0
        codes = sae.encode(x)
        assert torch.equal(out.codes.indices.sort(1).values, codes.indices.sort(1).values)


def test_training_forward_zero_coefficient_skips_auxk():
    sae = _sae(aux_k_coefficient=0.0)
    x = torch.randn(64, 16, generator=_gen(12))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    out = sae.training_forward(x, x, dead)
    assert "auxk" not in out.terms
    torch.testing.assert_close(out.loss, _fvu(x, sae(x)))


def _aux_by_hand(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    n_dead = int(dead.sum())
    aux_k = min(sae.aux_k, n_dead)
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    top = dead_pre.topk(aux_k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    e_hat = z @ sae.W_dec
    residual = x - sae(x)
    scale = min(n_dead / sae.aux_k, 1.0)
    # Gao et al.: normalised by the variance of the residual it reconstructs.
    return scale * (e_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()


@pytest.mark.parametrize("n_dead", [3, 20])  # fewer and more dead latents than aux_k (= 8)
def test_auxk_term_value_and_loss(n_dead):
    coef = 0.25
    sae = _sae(aux_k_coefficient=coef)
    x = torch.randn(64, 16, generator=_gen(13))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=_gen(14))[:n_dead]] = True
    out = sae.training_forward(x, x, dead)
    assert set(out.terms) == {"fvu", "auxk"}
    aux = out.terms["auxk"]
    assert float(aux) > 0
    with torch.no_grad():
        torch.testing.assert_close(aux, _aux_by_hand(sae, x, dead), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), out.terms["fvu"] + coef * aux)


def test_auxk_gradient_reaches_only_dead_decoder_rows():
    x = torch.randn(128, 16, generator=_gen(15))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=_gen(16))[:12]] = True

    grads = {}
    for coef in (0.0, 1.0):
        sae = _sae(aux_k_coefficient=coef)
        out = sae.training_forward(x, x, dead)
        out.loss.backward()
        grads[coef] = {name: p.grad.clone() for name, p in sae.named_parameters()}

    diff = grads[1.0]["W_dec"] - grads[0.0]["W_dec"]
    # Live rows untouched also checks that the residual target is detached: otherwise the aux
    # loss would pull on live rows through x_hat.
    assert torch.all(diff[~dead] == 0), "aux loss changed the gradient of live decoder rows"
    per_row = diff[dead].norm(dim=1)
    assert torch.all(per_row > 0), "every dead latent should be used by AuxK at this size"
    # The encoder is reached only through dead latents' pre-activations.
    diff_enc = grads[1.0]["W_enc"] - grads[0.0]["W_enc"]
    assert torch.all(diff_enc[:, ~dead] == 0)
    assert diff_enc[:, dead].abs().sum() > 0
    diff_b_enc = grads[1.0]["b_enc"] - grads[0.0]["b_enc"]
    assert torch.all(diff_b_enc[~dead] == 0)


# -- build_dictionary -----------------------------------------------------------------------------


def test_build_dictionary_from_config():
    cfg = DictionaryConfig(architecture="topk", n_latents=None, expansion_factor=4, k=3, aux_k=5)
    sae = build_dictionary(cfg, 8, 8, torch.device("cpu"), generator=_gen(0))
    assert isinstance(sae, TopKSAE)
    assert sae.n_latents == 32 and sae.k == 3 and sae.aux_k == 5
    assert sae.aux_k_coefficient == pytest.approx(cfg.aux_k_coefficient)
    assert sae.W_enc.dtype == torch.float32
    cfg2 = DictionaryConfig(n_latents=20, k=2, dtype="bfloat16")
    sae2 = build_dictionary(cfg2, 8, 8, torch.device("cpu"))
    assert sae2.n_latents == 20 and sae2.W_dec.dtype == torch.bfloat16
    assert "topk" in ARCHITECTURES


def test_build_dictionary_unknown_architecture_names_choices():
    cfg = DictionaryConfig(architecture="nope")
    with pytest.raises(ValueError, match="topk"):
        build_dictionary(cfg, 8, 8, torch.device("cpu"))
