"""SAELens, attaching a dictionary saetrain saved at its `hook_name` in a TransformerLens model,
computes what saetrain computes on the HuggingFace model: the site itself, not only the weights.

Skipped where sae-lens or transformer-lens is not installed (neither is a saetrain dependency).
The case is built here: the tests' tiny Llama with random norm weights (an untrained norm's are
all ones, which would hide a missing fold), and a TopK SAE, a JumpReLU SAE and a ReLU transcoder
trained by saetrain on its `mlp_in.1` (seconds on a CPU). The TransformerLens model is converted
from the HF weights as `HookedTransformer.from_pretrained` processes them (norm weights folded
into the next layer). For each folder: SAELens's codes of the TransformerLens activation at
`hook_name` against saetrain's codes of its own site on the HF model, and both outputs (at
`hook_name_out` for a transcoder). Until commit 5e7f538 this was scripts/check_saelens_hooks.py,
whose results docs/saelens_hooks_check.json holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sae_lens")
pytest.importorskip("transformer_lens")

# SAELens and TransformerLens are imported only where installed (the skips above).
from sae_lens import SAE  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from saetrain.activations.sites import resolve_site  # noqa: E402
from saetrain.config import (  # noqa: E402
    BufferConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.dictionaries import SparseCodes  # noqa: E402
from saetrain.export.saelens import load_dictionary  # noqa: E402
from saetrain.run import run  # noqa: E402
from saetrain.synthetic.tiny_llama import build_corpus, build_tiny_llama  # noqa: E402


def tl_llama(hf: Any) -> Any:
    """A HookedTransformer with the HF Llama's weights, processed as from_pretrained does."""
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=64,
        d_vocab=c.vocab_size, eps=c.rms_norm_eps, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_adjacent_pairs=False,
        rotary_base=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"],
        final_rms=True, gated_mlp=True, n_key_value_heads=c.num_key_value_heads,
        original_architecture="LlamaForCausalLM", device="cpu", default_prepend_bos=False,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=True, center_writing_weights=False,
        center_unembed=False, fold_value_biases=True,
    )  # fmt: skip
    return model.eval()


def dense(codes: Any, n: int) -> torch.Tensor:
    return codes.to_dense(n) if isinstance(codes, SparseCodes) else codes


def compare_at_hooks(folder: Path, hf: Any, tl: Any, tokens: torch.Tensor) -> dict[str, Any]:
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg["metadata"]
    hook_in, hook_out = meta["hook_name"], meta.get("hook_name_out", meta["hook_name"])
    site_in = meta["saetrain_site"]
    site_out = meta.get("saetrain_target_site", site_in)
    ours = load_dictionary(folder).double()
    sae = SAE.load_from_disk(str(folder), device="cpu")  # in its saved dtype (float32)

    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in {site_in, site_out}:
        r = resolve_site(hf, name)
        assert r.point == "output", f"{name}: this check reads module outputs only"
        handles.append(
            r.module.register_forward_hook(
                lambda m, a, out, name=name: captured.__setitem__(
                    name, (out[0] if isinstance(out, tuple) else out).detach()
                )
            )
        )
    with torch.no_grad():
        hf_logits = hf(tokens).logits
        tl_logits, cache = tl.run_with_cache(tokens, names_filter=[hook_in, hook_out])
    for h in handles:
        h.remove()
    d = ours.d_in
    x_hf = captured[site_in].reshape(-1, d).double()
    x_tl = cache[hook_in].reshape(-1, d).double()
    with torch.no_grad():
        ours_codes = dense(ours.encode(x_hf), ours.n_latents)
        ours_out = ours(x_hf)
        x_sl = x_tl.to(sae.W_enc.dtype)
        sl_codes = sae.encode(x_sl)
        sl_out = sae.decode(sl_codes)
        if getattr(sae, "W_skip", None) is not None:
            sl_out = sl_out + x_sl @ sae.W_skip.T
        sl_codes, sl_out = sl_codes.double(), sl_out.double()
        naive = dense(ours.encode(x_tl), ours.n_latents)  # the model's weights at TL's hook
    # An output at an mlp_in target is in TransformerLens's space: compare there.
    y_hf = captured[site_out].reshape(-1, ours.d_out).double()
    y_tl = cache[hook_out].reshape(-1, ours.d_out).double()
    affine = torch.linalg.lstsq(y_tl, y_hf).solution.diagonal()  # y_hf = y_tl · a per column
    ours_out_tl = ours_out / affine if site_out.startswith("mlp_in") else ours_out
    scale = float(ours_codes.abs().max())
    out = {
        "folder": str(folder),
        "sae_lens_class": type(sae).__name__,
        "hook_name": hook_in,
        "hook_name_out": hook_out,
        "logits_max_abs_diff_tl_vs_hf": float((tl_logits - hf_logits).abs().max()),
        "site_max_abs_diff_tl_vs_hf": float((x_tl - x_hf).abs().max()),
        "codes_max_abs_diff": float((sl_codes - ours_codes).abs().max()),
        "codes_scale": scale,
        "output_max_abs_diff": float((sl_out - ours_out_tl).abs().max()),
        "output_scale": float(ours_out_tl.abs().max()),
        "same_active_latents": bool(((sl_codes != 0) == (ours_codes != 0)).all()),
        "unfolded_codes_max_abs_diff": float((naive - ours_codes).abs().max()),
    }
    out["agree"] = (
        out["same_active_latents"]
        and out["codes_max_abs_diff"] <= 1e-4 * max(scale, 1.0)
        and out["output_max_abs_diff"] <= 1e-4 * max(out["output_scale"], 1.0)
    )
    return out


def build_case(root: Path) -> tuple[Path, list[Path]]:
    """A tiny Llama with random norm weights and three dictionaries trained on its mlp_in.1."""
    base = build_tiny_llama(root / "base")
    hf = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(11)
    for layer in hf.model.layers:
        for norm in (layer.post_attention_layernorm, layer.input_layernorm):
            sign = torch.where(torch.rand(norm.weight.shape, generator=g) < 0.25, -1.0, 1.0)
            norm.weight.data = (0.5 + torch.rand(norm.weight.shape, generator=g)) * sign
    model = root / "model"
    hf.save_pretrained(model)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (model / f.name).write_bytes(f.read_bytes())
    corpus = build_corpus(root / "corpus")
    folders = []
    for arch, target in (("topk", None), ("jumprelu", None), ("relu", "mlp_out.1")):
        cfg = Config(
            model=ModelConfig(name=str(model), gguf_package=None, device="cpu"),
            data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16),
            site=SiteConfig(input="mlp_in.1", target=target),
            buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
            dictionary=DictionaryConfig(architecture=arch, n_latents=64, k=4),
            trainer=TrainerConfig(total_tokens=2048, batch_tokens=256, lr=1e-3, init_batches=2),
            eval=EvalConfig(n_tokens=256, batch_contexts=8, ce_contexts=8),
            logger=LoggerConfig(log_every=4),
        )
        folders.append(run(cfg, root / arch).dictionary_dir)
    return model, folders


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model, folders = build_case(tmp_path_factory.mktemp("hooks"))
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).eval()
    tokens = torch.randint(
        3, hf.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0)
    )
    return hf, tl_llama(hf), tokens, folders


@pytest.mark.parametrize("index", [0, 1, 2], ids=["topk", "jumprelu", "relu-transcoder"])
def test_saelens_at_the_transformer_lens_hook_agrees(case, index):
    hf, tl, tokens, folders = case
    result = compare_at_hooks(folders[index], hf, tl, tokens)
    assert result["agree"], result
