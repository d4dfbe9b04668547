"""Independent float64 references for the cross-layer dictionaries' tests (test_cross_layer_*.py).

Nothing here calls saetrain's encode / decode / loss code: the CLT and crosscoder formulas are
written out densely from the spec (issue 12, Ameisen et al. 2025, Lindsey et al. 2024).
"""

from __future__ import annotations

from pathlib import Path

import torch


def clt_weights(
    clt,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(W_enc per layer [d, n], b_enc per layer [n], W_dec per layer [n, (L−ℓ)·d], b_dec [L·d]),
    float64 copies."""
    L, n = clt.n_layers, clt.layer_latents
    W_enc = [clt.W_enc[li].detach().double() for li in range(L)]
    b_enc = [clt.b_enc[li * n : (li + 1) * n].detach().double() for li in range(L)]
    W_dec = [W.detach().double() for W in clt.W_dec]
    return W_enc, b_enc, W_dec, clt.b_dec.detach().double()


def dense_clt_pre(clt, x: torch.Tensor) -> list[torch.Tensor]:
    """pre^ℓ = x^ℓ·W_enc^ℓ + b_enc^ℓ, per layer, float64."""
    W_enc, b_enc, _, _ = clt_weights(clt)
    d = clt.layer_d_in
    x = x.double()
    return [x[:, li * d : (li + 1) * d] @ W_enc[li] + b_enc[li] for li in range(clt.n_layers)]


def dense_activation(
    arch: str, pre: torch.Tensor, k: int | None = None, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer's codes from its pre-activations, written out: topk (k largest, ReLU'd),
    jumprelu (pre·1[pre > θ]), relu."""
    if arch == "topk":
        assert k is not None
        idx = pre.topk(k, dim=-1).indices
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, idx, True)
        return torch.where(keep, pre.clamp_min(0), torch.zeros_like(pre))
    if arch == "jumprelu":
        assert threshold is not None
        return torch.where(pre > threshold.double(), pre, torch.zeros_like(pre))
    if arch == "relu":
        return pre.clamp_min(0)
    raise ValueError(arch)


def dense_clt_decode(clt, codes: list[torch.Tensor]) -> torch.Tensor:
    """ŷ^ℓ' = Σ_{ℓ≤ℓ'} a^ℓ·W_dec^{ℓ→ℓ'} + b_dec^ℓ' with W_dec^{ℓ→ℓ'} = slot ℓ'−ℓ of W_dec[ℓ]."""
    _, _, W_dec, b_dec = clt_weights(clt)
    L, d = clt.n_layers, clt.layer_d_out
    outs = []
    for lp in range(L):
        y = b_dec[lp * d : (lp + 1) * d].clone()
        for li in range(lp + 1):
            j = lp - li
            y = y + codes[li].double() @ W_dec[li][:, j * d : (j + 1) * d]
        outs.append(y)
    return torch.cat(outs, dim=-1)


def dense_clt_forward(clt, arch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, L·n], prediction [N, L·d_out]) of a CLT without skip, float64."""
    n = clt.layer_latents
    if arch == "batchtopk":  # at inference a JumpReLU with one threshold per layer
        thr, arch = clt.threshold.repeat_interleave(n), "jumprelu"
    else:
        thr = getattr(clt, "threshold", None)
    codes = []
    for li, pre in enumerate(dense_clt_pre(clt, x)):
        t = thr[li * n : (li + 1) * n].detach() if thr is not None else None
        codes.append(dense_activation(arch, pre, getattr(clt, "k", None), t))
    return torch.cat(codes, dim=-1), dense_clt_decode(clt, codes)


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """A saved dictionary's tensors as loaded by saetrain (state_dict order and names)."""
    from saetrain.export.saelens import load_dictionary

    return {k: v.detach().clone() for k, v in load_dictionary(folder).state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))


# -- the tiny Llama, read and spliced with plain forward hooks (no saetrain site code) -----------


def tiny_lm(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return model.eval()


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def _with_layer_output(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def capture(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """mlp_in.ℓ (the MLP's input), mlp_out.ℓ (its output), resid_post.ℓ (the block's output)."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for li, layer in enumerate(model.model.layers):

        def mlp_hook(_m, args, out, li=li):
            acts[f"mlp_in.{li}"], acts[f"mlp_out.{li}"] = args[0], out

        def block_hook(_m, _args, out, li=li):
            acts[f"resid_post.{li}"] = _layer_output(out)

        handles += [layer.mlp.register_forward_hook(mlp_hook),
                    layer.register_forward_hook(block_hook)]  # fmt: skip
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acts


def _nll_sum(model, ids, valid, handles_fn) -> tuple[float, torch.Tensor]:
    handles = handles_fn()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    logp = logits[:, :-1].reshape(-1, logits.shape[-1])[valid].double().log_softmax(-1)
    targets = ids[:, 1:].reshape(-1)[valid]
    return -float(logp.gather(1, targets[:, None]).sum()), logp


def replaced_ce(model, dictionary, kind: str, inputs: list[str], targets: list[str],
                batches) -> dict[str, float]:  # fmt: skip
    """ce_clean / ce_spliced / ce_zero_ablated per valid next-token position, every target
    replaced at once at unmasked positions: a CLT (causal) from the inputs as they arrive in the
    replaced forward, later layers as zeros; a crosscoder from the clean forward's sources."""
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    layers = model.model.layers
    for batch in batches:
        ids, mask = batch.input_ids, batch.mask
        valid = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
        keep = mask[..., None]
        clean_acts = capture(model, ids)

        def none():
            return []

        def zero(keep=keep):
            hs = []
            for site in targets:
                kind_, li = site.split(".")
                mod = layers[int(li)]
                if kind_ == "mlp_out":
                    hs.append(
                        mod.mlp.register_forward_hook(
                            lambda _m, _a, out, keep=keep: torch.where(
                                keep, torch.zeros_like(out), out
                            )
                        )
                    )
                else:
                    hs.append(
                        mod.register_forward_hook(
                            lambda _m, _a, out, keep=keep: _with_layer_output(
                                out,
                                torch.where(
                                    keep, torch.zeros_like(_layer_output(out)), _layer_output(out)
                                ),
                            )
                        )
                    )
            return hs

        def spliced(clean_acts=clean_acts, keep=keep):
            hs = []
            if kind == "crosscoder":
                rec = dictionary(torch.cat([clean_acts[s] for s in inputs], -1))
                d = rec.shape[-1] // len(targets)
                for j, site in enumerate(targets):
                    li = int(site.split(".")[1])
                    block = rec[..., j * d : (j + 1) * d]
                    hs.append(
                        layers[li].register_forward_hook(
                            lambda _m, _a, out, block=block, keep=keep: _with_layer_output(
                                out, torch.where(keep, block, _layer_output(out))
                            )
                        )
                    )
                return hs
            seen: dict[int, torch.Tensor] = {}  # the CLT's inputs read in this forward
            n_layers = len(inputs)
            for j, site in enumerate(targets):
                li = int(site.split(".")[1])

                def hook(_m, args, out, j=j, keep=keep):
                    seen[j] = args[0]
                    parts = [seen.get(i, torch.zeros_like(args[0])) for i in range(n_layers)]
                    pred = dictionary(torch.cat(parts, -1))
                    d = pred.shape[-1] // n_layers
                    return torch.where(keep, pred[..., j * d : (j + 1) * d], out)

                hs.append(layers[li].mlp.register_forward_hook(hook))
            return hs

        for name, fn in (("clean", none), ("spliced", spliced), ("zero", zero)):
            sums[name] += _nll_sum(model, ids, valid, fn)[0]
        count += int(valid.sum())
    return {f"ce_{k}" if k != "zero" else "ce_zero_ablated": v / count for k, v in sums.items()}


def site_fvu_and_l0(model, dictionary, inputs: list[str], targets: list[str], batches):
    """{site: FVU} per target (Σ‖y − ŷ‖² / Σ‖y − mean y‖² over unmasked positions, float64) and
    the mean number of non-zero codes per token in each block of n_latents / len(inputs)."""
    xs, ys = [], []
    for batch in batches:
        acts = capture(model, batch.input_ids)
        m = batch.mask
        xs.append(torch.cat([acts[s][m] for s in inputs], -1))
        ys.append(torch.cat([acts[s][m] for s in targets], -1))
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        y_hat = dictionary(x).double()
        codes = dictionary.encode(x)
    dense = codes.to_dense(dictionary.n_latents) if isinstance(codes, tuple) else codes
    y = y.double()
    d = y.shape[1] // len(targets)
    fvu = {}
    for j, site in enumerate(targets):
        yj, hj = y[:, j * d : (j + 1) * d], y_hat[:, j * d : (j + 1) * d]
        fvu[site] = float((yj - hj).pow(2).sum() / (yj - yj.mean(0)).pow(2).sum())
    per = dense.shape[1] // len(inputs)
    l0 = {s: float((dense[:, i * per : (i + 1) * per] != 0).sum()) / x.shape[0]
          for i, s in enumerate(inputs)}  # fmt: skip
    return fvu, l0
