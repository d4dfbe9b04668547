"""Tests for saetrain.activations.sites on tiny random models of every supported family."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from saetrain.activations.sites import (  # noqa: E402
    SITE_KINDS,
    SUPPORTED_FAMILIES,
    ResolvedSite,
    Site,
    SiteError,
    decoder_layers,
    model_family,
    num_layers,
    register_site_hook,
    resolve_site,
)
from tests.helpers.sites import _build

# Tiny matrices: one thread is fastest on the shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 3
LAYER = 1  # a middle layer: hidden_states[LAYER + 1] is not the final-norm output
_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def _configs() -> dict[str, Callable[[], PretrainedConfig]]:
    neox = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4
    )
    return {
        "llama": lambda: LlamaConfig(**_COMMON),
        "mistral": lambda: MistralConfig(**_COMMON),
        "qwen2": lambda: Qwen2Config(**_COMMON),
        "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
        "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=8),
        "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, head_dim=8),
        "gpt2": lambda: GPT2Config(
            n_embd=32,
            n_layer=N_LAYERS,
            n_head=4,
            vocab_size=128,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "gpt_neox-parallel": lambda: GPTNeoXConfig(
            **neox, vocab_size=128, use_parallel_residual=True
        ),
        "gpt_neox-sequential": lambda: GPTNeoXConfig(
            **neox, vocab_size=128, use_parallel_residual=False
        ),
    }


CONFIGS = _configs()
FAMILY_IDS = list(CONFIGS)

# Written out independently of sites.py: the module whose output is the block's MLP contribution
# to the residual stream (Gemma normalises the MLP output before the add).
MLP_OUT_MODULE = {
    "llama": "mlp",
    "mistral": "mlp",
    "qwen2": "mlp",
    "qwen3": "mlp",
    "gemma2": "post_feedforward_layernorm",
    "gemma3_text": "post_feedforward_layernorm",
    "gpt2": "mlp",
    "gpt_neox-parallel": "mlp",
    "gpt_neox-sequential": "mlp",
}


# The TransformerLens hook names (after `blocks.L.`), written out independently of sites.py.
TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "attn_z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_in": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}


def _kinds(fid: str) -> list[str]:
    """The site kinds a family has: a parallel-residual GPT-NeoX has no resid_mid."""
    return [k for k in SITE_KINDS if not (fid == "gpt_neox-parallel" and k == "resid_mid")]


def _fid(model: nn.Module) -> str:
    family = model_family(model)
    if family == "gpt_neox":
        return "gpt_neox-parallel" if model.config.use_parallel_residual else "gpt_neox-sequential"
    return family


@pytest.fixture(scope="module", params=FAMILY_IDS)
def family(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, _build(CONFIGS[request.param]())


@pytest.fixture(scope="module")
def input_ids() -> Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------
# Site names


def test_site_parse_and_name_roundtrip() -> None:
    for kind in SITE_KINDS:
        site = Site.parse(f"{kind}.12")
        assert site == Site(kind, 12)
        assert site.name == f"{kind}.12"
        assert Site.parse(site.name) == site


@pytest.mark.parametrize(
    "bad",
    [
        "resid_side.3",
        "resid_post",
        "resid_post.x",
        "resid_post.-1",
        "",
        "blocks.3.attn.hook_q",
        "blocks.3.hook_mlp_in",
        "blocks.x.hook_resid_post",
        "hook_resid_post",
    ],
)
def test_site_parse_errors_name_value_and_kinds(bad: str) -> None:
    with pytest.raises(SiteError) as excinfo:
        Site.parse(bad)
    msg = str(excinfo.value)
    assert repr(bad) in msg
    assert "<kind>.<layer>" in msg
    # Both spellings of every kind.
    for kind, tl in TL_HOOKS.items():
        assert kind in msg
        assert f"blocks.L.{tl}" in msg


def test_site_constructor_validates() -> None:
    with pytest.raises(SiteError, match="resid_side"):
        Site("resid_side", 0)
    with pytest.raises(SiteError):
        Site("resid_post", -1)
    assert issubclass(SiteError, ValueError)


# ---------------------------------------------------------------------------------------------
# Resolution


def test_family_and_layers(family: tuple[str, nn.Module]) -> None:
    fid, model = family
    assert model_family(model) == fid.split("-")[0]
    assert model_family(model) in SUPPORTED_FAMILIES
    assert num_layers(model) == N_LAYERS
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == N_LAYERS
    # The bare base model (no LM head) resolves to the same blocks.
    base = model.get_decoder() if fid.startswith(("gpt2", "gpt_neox")) else model.model
    assert decoder_layers(base) is layers


def test_resolved_site_fields(family: tuple[str, nn.Module]) -> None:
    fid, model = family
    layers = decoder_layers(model)
    expected_tl = {
        "resid_pre": "blocks.1.hook_resid_pre",
        "attn_z": "blocks.1.attn.hook_z",
        "attn_out": "blocks.1.hook_attn_out",
        "resid_mid": "blocks.1.hook_resid_mid",
        "mlp_in": "blocks.1.ln2.hook_normalized",
        "mlp_out": "blocks.1.hook_mlp_out",
        "resid_post": "blocks.1.hook_resid_post",
    }
    points = {"resid_pre": "input", "attn_z": "input", "resid_mid": "residual"}
    for kind in _kinds(fid):
        r = resolve_site(model, f"{kind}.1")
        assert r == resolve_site(model, Site(kind, 1))
        assert r == resolve_site(model, expected_tl[kind])  # the TransformerLens alias
        assert r.site == Site(kind, 1)
        assert r.layer_index == 1
        assert r.tl_hook_name == expected_tl[kind]
        assert r.point == points.get(kind, "output")
        assert r.width == 32  # 4 heads × head_dim 8 == hidden_size here
        # The hooked module lives inside block 1.
        assert any(m is r.module for m in layers[1].modules())


def test_layer_out_of_range() -> None:
    model = _build(CONFIGS["llama"]())
    with pytest.raises(SiteError) as excinfo:
        resolve_site(model, "resid_post.99")
    msg = str(excinfo.value)
    assert "99" in msg and "3 layers" in msg and "0..2" in msg
    resolve_site(model, "resid_post.2")  # the last layer is fine


def test_unsupported_family() -> None:
    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        word_embed_proj_dim=32,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    for call in (model_family, num_layers, lambda m: resolve_site(m, "resid_post.0")):
        with pytest.raises(SiteError) as excinfo:
            call(model)
        msg = str(excinfo.value)
        assert "'opt'" in msg
        for model_type in SUPPORTED_FAMILIES:
            assert model_type in msg


# ---------------------------------------------------------------------------------------------
# Capture


def _capture_all(model: nn.Module, ids: Tensor, layer: int) -> dict[str, Tensor]:
    acts: dict[str, Tensor] = {}
    handles = []
    for kind in _kinds(_fid(model)):

        def grab(x: Tensor, kind: str = kind) -> None:
            acts[kind] = x.detach().clone()

        handles.append(register_site_hook(resolve_site(model, Site(kind, layer)), grab))
    # Independently: what the MLP module itself received.
    mlp = decoder_layers(model)[layer].mlp
    handles.append(
        mlp.register_forward_pre_hook(lambda m, args: acts.__setitem__("mlp_received", args[0]))
    )
    try:
        _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return acts


def test_capture_matches_model(family: tuple[str, nn.Module], input_ids: Tensor) -> None:
    fid, model = family
    acts = _capture_all(model, input_ids, LAYER)
    assert set(acts) == {*_kinds(fid), "mlp_received"}
    for x in acts.values():
        assert x.shape == (*input_ids.shape, 32)

    # The residual identity: the block adds exactly attn_out and mlp_out to resid_pre.
    torch.testing.assert_close(
        acts["resid_post"],
        acts["resid_pre"] + acts["attn_out"] + acts["mlp_out"],
        atol=1e-5,
        rtol=1e-5,
    )
    # Not a vacuous identity: both contributions are non-trivial.
    assert acts["attn_out"].abs().mean() > 1e-2 and acts["mlp_out"].abs().mean() > 1e-2
    torch.testing.assert_close(acts["mlp_in"], acts["mlp_received"], atol=0, rtol=0)

    # Residual sites agree with transformers' own hidden_states (from a hook-free forward).
    with torch.no_grad():
        hs = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert len(hs) == N_LAYERS + 1
    torch.testing.assert_close(acts["resid_pre"], hs[LAYER], atol=0, rtol=0)
    torch.testing.assert_close(acts["resid_post"], hs[LAYER + 1], atol=0, rtol=0)


def test_capture_every_layer_resid_pre(family: tuple[str, nn.Module], input_ids: Tensor) -> None:
    _, model = family
    with torch.no_grad():
        hs = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        acts = _capture_all(model, input_ids, layer)
        torch.testing.assert_close(acts["resid_pre"], hs[layer], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Replacement


def test_identity_replacement_keeps_logits(
    family: tuple[str, nn.Module], input_ids: Tensor
) -> None:
    fid, model = family
    clean = _logits(model, input_ids)
    handles = [
        register_site_hook(resolve_site(model, Site(kind, LAYER)), lambda x: x)
        for kind in _kinds(fid)
    ]
    try:
        spliced = _logits(model, input_ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(spliced, clean, atol=0, rtol=0)


def test_zero_mlp_out_matches_monkeypatch(family: tuple[str, nn.Module], input_ids: Tensor) -> None:
    fid, model = family
    clean = _logits(model, input_ids)

    handle = register_site_hook(resolve_site(model, f"mlp_out.{LAYER}"), torch.zeros_like)
    try:
        zeroed_by_hook = _logits(model, input_ids)
    finally:
        handle.remove()
    assert not torch.allclose(zeroed_by_hook, clean, atol=1e-3)

    module = getattr(decoder_layers(model)[LAYER], MLP_OUT_MODULE[fid])
    orig_forward = module.forward
    module.forward = lambda *a, **k: torch.zeros_like(orig_forward(*a, **k))
    try:
        zeroed_by_patch = _logits(model, input_ids)
    finally:
        del module.forward  # restore the class method
    torch.testing.assert_close(zeroed_by_hook, zeroed_by_patch, atol=0, rtol=0)
    # Hooks and the patch are gone: the model is clean again.
    torch.testing.assert_close(_logits(model, input_ids), clean, atol=0, rtol=0)


def test_replacement_at_resid_pre_and_attn_out(
    family: tuple[str, nn.Module], input_ids: Tensor
) -> None:
    """Replacing resid_pre.L (a pre-hook) and attn_out.L (a tuple output) reaches the output."""
    _, model = family
    clean = _logits(model, input_ids)
    for kind in ("resid_pre", "attn_out", "mlp_in", "resid_post"):
        handle = register_site_hook(resolve_site(model, Site(kind, LAYER)), lambda x: 2 * x)
        try:
            changed = _logits(model, input_ids)
        finally:
            handle.remove()
        assert not torch.allclose(changed, clean, atol=1e-3), kind

    # Doubling resid_post.L equals doubling resid_pre.(L+1): same tensor, two hook points.
    outs = []
    for name in (f"resid_post.{LAYER}", f"resid_pre.{LAYER + 1}"):
        handle = register_site_hook(resolve_site(model, name), lambda x: 2 * x)
        try:
            outs.append(_logits(model, input_ids))
        finally:
            handle.remove()
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


class _Stop(Exception):
    pass


def test_exception_propagates(family: tuple[str, nn.Module], input_ids: Tensor) -> None:
    fid, model = family
    seen: list[int] = []

    def stop(x: Tensor) -> None:
        seen.append(x.shape[0])
        raise _Stop

    for kind in _kinds(fid):
        handle = register_site_hook(resolve_site(model, Site(kind, 0)), stop)
        try:
            with pytest.raises(_Stop):
                _logits(model, input_ids)
        finally:
            handle.remove()
    assert seen == [2] * len(_kinds(fid))
    _logits(model, input_ids)  # still works after removal


# ---------------------------------------------------------------------------------------------
# Hook mechanics on toy modules (kwargs input, tuple output, bad return values)


class _KwargsBlock(nn.Module):
    def forward(self, hidden_states: Tensor, scale: float = 1.0) -> tuple[Tensor, str]:
        return hidden_states * scale, "extra"


def _toy_site(module: nn.Module, point: str) -> ResolvedSite:
    return ResolvedSite(Site("resid_pre", 0), module, point, 0, "blocks.0.hook_resid_pre")  # type: ignore[arg-type]


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_input_replacement_positional_and_kwarg(as_kwarg: bool) -> None:
    block = _KwargsBlock()
    x = torch.ones(1, 2, 3)
    seen: list[Tensor] = []

    def fn(a: Tensor) -> Tensor:
        seen.append(a)
        return a + 1

    handle = register_site_hook(_toy_site(block, "input"), fn)
    out = block(hidden_states=x, scale=3.0) if as_kwarg else block(x, scale=3.0)
    handle.remove()
    assert seen[0] is x
    torch.testing.assert_close(out[0], (x + 1) * 3.0)  # kwarg `scale` kept
    assert out[1] == "extra"


def test_output_replacement_keeps_tuple_rest() -> None:
    block = _KwargsBlock()
    handle = register_site_hook(_toy_site(block, "output"), torch.zeros_like)
    out = block(torch.ones(1, 2, 3), scale=2.0)
    handle.remove()
    assert isinstance(out, tuple) and out[1] == "extra"
    assert torch.equal(out[0], torch.zeros(1, 2, 3))


def test_bad_replacement_rejected() -> None:
    block = _KwargsBlock()
    handle = register_site_hook(_toy_site(block, "output"), lambda x: x[:, :1])
    with pytest.raises(ValueError, match="shape"):
        block(torch.ones(1, 2, 3))
    handle.remove()
    handle = register_site_hook(_toy_site(block, "output"), lambda x: "nope")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="Tensor or None"):
        block(torch.ones(1, 2, 3))
    handle.remove()


def test_replacement_cast_to_activation_dtype() -> None:
    block = _KwargsBlock()
    handle = register_site_hook(_toy_site(block, "output"), lambda x: x.double() * 0)
    out = block(torch.ones(1, 2, 3, dtype=torch.float16))
    handle.remove()
    assert out[0].dtype == torch.float16 and not out[0].any()
