"""resid_mid and attn_z on tiny random models of every family, and the TransformerLens aliases.

Each captured tensor is checked against one computed by hand from other tensors of the same
forward (resid_mid = resid_pre + the attention's contribution = what the MLP half's norm reads;
attn_z · W_Oᵀ + b = the attention output before any post-norm), and splicing is checked to
replace what the model computes next. Where a family allows it, head_dim is set so that attn_z
(n_heads × head_dim = 48) is wider than d_model (32).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from saetrain.activations.sites import (  # noqa: E402
    SITE_KINDS,
    Site,
    SiteError,
    canonical_site_name,
    decoder_layers,
    forward_position,
    register_site_hook,
    resolve_site,
)
from saetrain.activations.source import ActivationSource  # noqa: E402
from saetrain.activations.tokens import TokenBatch  # noqa: E402
from saetrain.evaluation.splice import spliced_lm_metrics  # noqa: E402
from tests.helpers.sites import _build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 1
_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
_NEOX = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=128
)
CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_COMMON, head_dim=12),
    "mistral": lambda: MistralConfig(**_COMMON, head_dim=12),
    "qwen2": lambda: Qwen2Config(**_COMMON, head_dim=12),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=12),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=12),
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, head_dim=12),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64),
    "gpt_neox-parallel": lambda: GPTNeoXConfig(**_NEOX, use_parallel_residual=True),
    "gpt_neox-sequential": lambda: GPTNeoXConfig(**_NEOX, use_parallel_residual=False),
}
# Written out independently of sites.py, from each family's modeling code: the attention module
# (its output before any post-norm), its output projection W_O, and the norm that starts the MLP
# half (whose input is the residual after attention).
ATTN = {"gemma2": "self_attn", "gemma3_text": "self_attn", "gpt2": "attn"}
O_PROJ = {"gpt2": "attn.c_proj", "gpt_neox-parallel": "attention.dense"}
MLP_NORM = {"gemma2": "pre_feedforward_layernorm", "gemma3_text": "pre_feedforward_layernorm"}
for _fid in CONFIGS:
    ATTN.setdefault(_fid, "attention" if _fid.startswith("gpt_neox") else "self_attn")
    O_PROJ.setdefault(
        _fid, "attention.dense" if _fid.startswith("gpt_neox") else "self_attn.o_proj"
    )
    MLP_NORM.setdefault(_fid, "ln_2" if _fid == "gpt2" else "post_attention_layernorm")
# attn_z is 48 wide where head_dim can be set, else hidden_size.
Z_WIDTH = {fid: 32 if fid.startswith(("gpt2", "gpt_neox")) else 48 for fid in CONFIGS}
SEQUENTIAL = [fid for fid in CONFIGS if fid != "gpt_neox-parallel"]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {fid: _build(make()) for fid, make in CONFIGS.items()}


@pytest.fixture(scope="module")
def ids() -> Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def _sub(model: nn.Module, path: str) -> nn.Module:
    return decoder_layers(model)[LAYER].get_submodule(path)


def _forward(
    fid: str,
    model: nn.Module,
    ids: Tensor,
    splice: dict[str, Callable[[Tensor], Tensor]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits, and what probes independent of sites.py saw: the attention module's output, W_O's
    input and output, the MLP half's norm input, the block output; `splice` replaces sites."""
    seen: dict[str, Tensor] = {}
    # The splices first, so that probes on the same modules see what they wrote.
    handles = [register_site_hook(resolve_site(model, n), fn) for n, fn in (splice or {}).items()]

    def keep(name: str, which: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: object = None) -> None:
            value = args[0] if which == "in" else out
            seen[name] = (value[0] if isinstance(value, tuple) else value).detach().clone()

        return hook

    handles.append(_sub(model, ATTN[fid]).register_forward_hook(keep("attn", "out")))
    handles.append(_sub(model, O_PROJ[fid]).register_forward_pre_hook(keep("z", "in")))
    handles.append(_sub(model, O_PROJ[fid]).register_forward_hook(keep("o_proj_out", "out")))
    handles.append(_sub(model, MLP_NORM[fid]).register_forward_pre_hook(keep("mlp_norm_in", "in")))
    handles.append(decoder_layers(model)[LAYER].register_forward_hook(keep("block_out", "out")))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def _capture(model: nn.Module, ids: Tensor, names: list[str]) -> dict[str, Tensor]:
    return ActivationSource(model, names)(ids)


# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("blocks.6.hook_resid_pre", "resid_pre.6"),
        ("blocks.6.attn.hook_z", "attn_z.6"),
        ("blocks.6.hook_attn_out", "attn_out.6"),
        ("blocks.6.hook_resid_mid", "resid_mid.6"),
        ("blocks.6.ln2.hook_normalized", "mlp_in.6"),
        ("blocks.6.hook_mlp_out", "mlp_out.6"),
        ("blocks.12.hook_resid_post", "resid_post.12"),
        (" blocks.0.hook_resid_post ", "resid_post.0"),
        ("resid_mid.3", "resid_mid.3"),
        ("attn_z.0", "attn_z.0"),
    ],
)
def test_transformerlens_aliases(alias: str, canonical: str) -> None:
    site = Site.parse(alias)
    assert site.name == canonical == canonical_site_name(alias)
    assert Site.parse(site.tl_hook_name) == site  # both spellings round-trip


@pytest.mark.parametrize("bad", ["blocks.6.hook_mlp_in", "blocks.6.mlp.hook_post", "blocks.6"])
def test_unknown_name_lists_both_spellings(bad: str) -> None:
    with pytest.raises(SiteError) as excinfo:
        canonical_site_name(bad)
    msg = str(excinfo.value)
    assert repr(bad) in msg
    assert "resid_mid" in msg and "blocks.L.hook_resid_mid" in msg
    assert "attn_z" in msg and "blocks.L.attn.hook_z" in msg


def test_forward_position_order() -> None:
    order = ["resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post"]
    assert list(SITE_KINDS) == order
    assert [forward_position(f"{k}.2") for k in order] == [(2, i) for i in range(7)]
    assert forward_position("blocks.2.attn.hook_z") == (2, 1)
    assert forward_position(Site("resid_post", 1)) < forward_position("resid_pre.2")


# ---------------------------------------------------------------------------------------------
# Capture: the tensors computed by hand


@pytest.mark.parametrize("fid", list(CONFIGS))
def test_attn_z_times_w_o_is_the_attention_output(
    fid: str, models: dict[str, nn.Module], ids: Tensor
) -> None:
    model = models[fid]
    r = resolve_site(model, f"attn_z.{LAYER}")
    assert r.width == Z_WIDTH[fid]
    acts = _capture(model, ids, [f"attn_z.{LAYER}", f"attn_out.{LAYER}"])
    z = acts[f"attn_z.{LAYER}"]
    assert z.shape == (2, 7, Z_WIDTH[fid])
    _, seen = _forward(fid, model, ids)
    torch.testing.assert_close(z, seen["z"], atol=0, rtol=0)
    proj = _sub(model, O_PROJ[fid])
    if isinstance(proj, nn.Linear):
        by_hand = z @ proj.weight.T
    else:  # GPT-2's Conv1D stores W_O transposed: [in, out]
        by_hand = z @ proj.weight
    if proj.bias is not None:
        by_hand = by_hand + proj.bias
    torch.testing.assert_close(by_hand, seen["attn"], atol=1e-5, rtol=1e-5)
    assert seen["attn"].abs().mean() > 1e-2
    if not fid.startswith("gemma"):  # no post-attention norm: attn_out is that output too
        torch.testing.assert_close(acts[f"attn_out.{LAYER}"], by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fid", SEQUENTIAL)
def test_resid_mid_is_resid_pre_plus_attn_out(
    fid: str, models: dict[str, nn.Module], ids: Tensor
) -> None:
    model = models[fid]
    names = [
        f"{k}.{LAYER}" for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    ]
    acts = _capture(model, ids, names)
    pre, attn, mid, mlp, post = (acts[n] for n in names)
    assert mid.shape == (2, 7, 32)
    torch.testing.assert_close(mid, pre + attn, atol=0, rtol=0)
    _, seen = _forward(fid, model, ids)
    torch.testing.assert_close(mid, seen["mlp_norm_in"], atol=0, rtol=0)  # what the MLP half reads
    torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=1e-5)
    assert (mid - pre).abs().mean() > 1e-2 and (post - mid).abs().mean() > 1e-2


def test_parallel_neox_has_no_resid_mid(models: dict[str, nn.Module]) -> None:
    with pytest.raises(SiteError) as excinfo:
        resolve_site(models["gpt_neox-parallel"], "blocks.1.hook_resid_mid")
    msg = str(excinfo.value)
    assert "'resid_mid.1'" in msg and "use_parallel_residual" in msg and "Pythia" in msg
    assert "resid_post" in msg  # says what to use instead


# ---------------------------------------------------------------------------------------------
# Splicing


@pytest.mark.parametrize("fid", list(CONFIGS))
def test_splice_new_sites(fid: str, models: dict[str, nn.Module], ids: Tensor) -> None:
    model = models[fid]
    clean, seen = _forward(fid, model, ids)
    kinds = ["attn_z"] + (["resid_mid"] if fid in SEQUENTIAL else [])
    for kind in kinds:
        name = f"{kind}.{LAYER}"
        same, _ = _forward(fid, model, ids, {name: lambda x: x.clone()})
        torch.testing.assert_close(same, clean, atol=0, rtol=0)
        zeroed, _ = _forward(fid, model, ids, {name: torch.zeros_like})
        assert (zeroed - clean).abs().max() > 1e-2, kind

    # Doubling attn_z doubles what W_O is given: the attention output becomes 2z·W_Oᵀ + b.
    proj = _sub(model, O_PROJ[fid])
    _, doubled = _forward(fid, model, ids, {f"attn_z.{LAYER}": lambda x: 2 * x})
    torch.testing.assert_close(doubled["z"], 2 * seen["z"], atol=0, rtol=0)
    bias = proj.bias if proj.bias is not None else 0.0
    torch.testing.assert_close(
        doubled["o_proj_out"], 2 * (seen["o_proj_out"] - bias) + bias, atol=1e-5, rtol=1e-5
    )

    if fid in SEQUENTIAL:
        # Doubling resid_mid reaches both the MLP half's input and the residual it is added to:
        # the block's output is 2·mid + the MLP's output on 2·mid.
        _, mid_doubled = _forward(fid, model, ids, {f"resid_mid.{LAYER}": lambda x: 2 * x})
        mid = seen["mlp_norm_in"]
        torch.testing.assert_close(mid_doubled["mlp_norm_in"], 2 * mid, atol=1e-5, rtol=1e-5)
        mlp = _capture_spliced_mlp_out(model, ids, lambda x: 2 * x)
        torch.testing.assert_close(mid_doubled["block_out"], 2 * mid + mlp, atol=1e-5, rtol=1e-5)


def _capture_spliced_mlp_out(
    model: nn.Module, ids: Tensor, replace: Callable[[Tensor], Tensor]
) -> Tensor:
    """mlp_out.L in a forward where resid_mid.L is replaced."""
    out: dict[str, Tensor] = {}
    handles = [
        register_site_hook(resolve_site(model, f"resid_mid.{LAYER}"), replace),
        register_site_hook(
            resolve_site(model, f"mlp_out.{LAYER}"), lambda x: out.__setitem__("x", x.clone())
        ),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return out["x"]


@pytest.mark.parametrize("fid", ["gemma2", "gpt2", "gpt_neox-sequential"])
def test_spliced_ce_on_new_sites(fid: str, models: dict[str, nn.Module], ids: Tensor) -> None:
    """The CE evaluation path: an identity 'dictionary' changes nothing, zeros change CE."""
    model = models[fid]
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False  # BOS-like position keeps its activation
    batches = [TokenBatch(ids, mask)]
    for kind in ("attn_z", "resid_mid"):
        site = resolve_site(model, f"{kind}.{LAYER}")
        m = spliced_lm_metrics(model, site, lambda x: x, batches)
        assert m["ce_spliced"] == m["ce_clean"] and m["kl_div"] == pytest.approx(0.0, abs=1e-6)
        assert abs(m["ce_zero_ablated"] - m["ce_clean"]) > 1e-3
        assert m["ce_tokens"] == 2 * 5
    # A transcoder attn_z → attn_out whose map is W_O itself recovers the clean CE.
    proj = _sub(model, O_PROJ[fid])
    weight = proj.weight.T if isinstance(proj, nn.Linear) else proj.weight
    target = resolve_site(model, f"attn_out.{LAYER}")
    if fid.startswith("gemma"):  # attn_out is after Gemma's post-attention norm
        norm = _sub(model, "post_attention_layernorm")
        predict: Callable[[Tensor], Tensor] = lambda z: norm.forward(z @ weight)  # noqa: E731
    else:
        bias = proj.bias if proj.bias is not None else 0.0
        predict = lambda z: z @ weight + bias  # noqa: E731
    m = spliced_lm_metrics(
        model, target, predict, batches, input_site=resolve_site(model, f"attn_z.{LAYER}")
    )
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["kl_div"] < 1e-6
