"""SAEBench 0.6.0's own absorption eval on a saetrain SAE folder and SmolLM2-135M, offline.

Two steps, two environments (sae-bench is never a saetrain dependency):

1. In saetrain's venv, write SmolLM2's HF state dict, config, tokenizer and reference logits:

       python scripts/compare_saebench_absorption.py export --model-dir /tmp/sb-model

2. In a scratch venv (`pip install -c constraints-cpu.txt sae-bench`; uninstall torchvision if
   it does not match the CPU torch), run SAEBench's functions on the folder:

       python scripts/compare_saebench_absorption.py run --model-dir /tmp/sb-model \
           --sae outputs/.../resid_post.6 --max-words 600 --out saebench_absorption.json

`run` builds a TransformerLens HookedTransformer from Llama's settings (TransformerLens has no
SmolLM2 entry), loads the HF weights with TransformerLens's Llama converter, checks its logits
against HF's (exit 1 beyond 1e-3), keeps the first layer+1 blocks (resid_post.<layer> is then
unchanged, checked), restricts SAEBench's vocabulary (`get_alpha_tokens`) to a seeded choice of
`--max-words` words, folds the decoder norms where SAELens allows it (as SAEBench's loader; SAELens
refuses for TopK), and runs
`run_k_sparse_probing_experiment` then `run_feature_absortion_experiment`, averaging as
SAEBench's main.py does (letters with ground-truth probe F1 > 0.6). SAEBench caches its probes
and their activations inside its package (sae_bench/artifacts/absorption) keyed by model and
layer only, and reuses them for another word sample: delete that folder between runs. Compare with
`python -m saetrain.evaluate path=<folder> eval.suite=[absorption] eval.absorption.max_words=N`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

TEMPLATE = "{word} has the first letter:"
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


def export(model_dir: Path) -> None:
    """In saetrain's venv: the HF model's state dict, config, tokenizer and logits on PROMPT."""
    from saetrain.activations.model import load_lm
    from saetrain.config import ModelConfig

    model, tok = load_lm(ModelConfig(), torch.device("cpu"))
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), model_dir / "state_dict.pt")
    model.config.to_json_file(str(model_dir / "config.json"))
    tok.save_pretrained(str(model_dir / "tokenizer"))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, model_dir / "ref_logits.pt")


def letter_covering_sample(words: list[str], n: int, seed: int, per_letter: int = 8) -> list[str]:
    """A seeded choice of n words holding at least `per_letter` of each letter: SAEBench's
    k-sparse probing fails (KeyError) on a letter with test words and no training word."""
    rng = random.Random(seed)
    shuffled = rng.sample(words, len(words))
    chosen: list[str] = []
    for letter in "abcdefghijklmnopqrstuvwxyz":
        chosen += [w for w in shuffled if w.strip()[0].lower() == letter][:per_letter]
    rest = [w for w in shuffled if w not in set(chosen)]
    return rng.sample(chosen + rest[: max(n - len(chosen), 0)], max(n, len(chosen)))


def hooked_transformer(model_dir: Path, n_layers: int | None = None):
    """(TL model with n_layers blocks, HF Llama model, tokenizer) from the exported files."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    raw = json.loads((model_dir / "config.json").read_text())
    raw.pop("quantization_config", None)  # the GGUF was de-quantized on load
    hf_cfg = LlamaConfig(**raw)
    d_head = hf_cfg.hidden_size // hf_cfg.num_attention_heads
    rope = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 100000.0)
    cfg = HookedTransformerConfig(
        d_model=hf_cfg.hidden_size,
        d_head=d_head,
        n_heads=hf_cfg.num_attention_heads,
        n_key_value_heads=hf_cfg.num_key_value_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=n_layers or hf_cfg.num_hidden_layers,
        n_ctx=2048,
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        rotary_base=rope,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        model_name="SmolLM2-135M-Instruct",
        dtype=torch.float32,
    )
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(torch.load(model_dir / "state_dict.pt"))
    tok = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    model = HookedTransformer(cfg, tokenizer=tok)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval(), hf, tok


def run(args: argparse.Namespace) -> int:
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
    from sae_bench.evals.absorption.main import _aggregate_results_df
    from sae_bench.evals.absorption.vocab import get_alpha_tokens
    from sae_lens import SAE

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    hook = f"blocks.{args.layer}.hook_resid_post"
    ref = torch.load(args.model_dir / "ref_logits.pt")
    full, _, _ = hooked_transformer(args.model_dir)
    with torch.no_grad():
        logit_diff = (full(ref["ids"]) - ref["logits"]).abs().max().item()
        expected = full.run_with_cache(ref["ids"], names_filter=[hook])[1][hook]
    print(f"TL vs HF max |logit diff|: {logit_diff:.2e}", flush=True)
    if logit_diff > 1e-3:
        return 1
    del full
    model, _, _ = hooked_transformer(args.model_dir, args.layer + 1)
    with torch.no_grad():
        got = model.run_with_cache(ref["ids"], names_filter=[hook])[1][hook]
    truncated_diff = (got - expected).abs().max().item()
    print(f"{args.layer + 1}-block model, {hook} max |diff|: {truncated_diff:.2e}", flush=True)

    words = get_alpha_tokens(model.tokenizer)
    chosen = letter_covering_sample(words, args.max_words, args.seed)
    common.get_alpha_tokens = lambda tokenizer: chosen
    feature_absorption.get_alpha_tokens = lambda tokenizer: chosen
    sae = SAE.load_from_disk(args.sae, device="cpu")
    decoder_norm = float(sae.W_dec.norm(dim=1).mean())
    try:  # as sae_bench_utils.general_utils.load_and_format_sae does (SAELens refuses for TopK)
        sae.fold_W_dec_norm()
        folded = True
    except NotImplementedError:
        folded = False
    print(f"decoder row norm {decoder_norm:.3f}, folded: {folded}", flush=True)
    start = time.time()
    common_args = dict(
        model=model, sae=sae, layer=args.layer, sae_name="saetrain", force=True,
        max_k_value=10, prompt_template=TEMPLATE, prompt_token_pos=args.position, device="cpu",
    )  # fmt: skip
    k_sparse = run_k_sparse_probing_experiment(f1_jump_threshold=0.03, **common_args)
    raw = feature_absorption.run_feature_absortion_experiment(
        feature_split_f1_jump_threshold=0.03, batch_size=16, **common_args
    )
    per_letter = _aggregate_results_df(raw)
    probe_f1 = {r["letter"]: float(r["f1_probe"]) for r in k_sparse.to_dict("records")}
    counted = per_letter[[probe_f1[c] > 0.6 for c in per_letter["letter"]]]
    mean = {
        "mean_absorption_fraction_score": statistics.mean(counted["mean_absorption_fraction"]),
        "mean_full_absorption_score": statistics.mean(counted["full_absorption_rate"]),
        "mean_num_split_features": statistics.mean(counted["num_split_feats"]),
        "letters_counted": len(counted),
    }
    out = {
        "tl_vs_hf_max_logit_diff": logit_diff,
        "truncated_model_site_diff": truncated_diff,
        "alphabetic_tokens": len(words),
        "words_used": len(chosen),
        "prompt_token_pos": args.position,
        "decoder_row_norm_mean": decoder_norm,
        "decoder_norm_folded": folded,
        "seconds": time.time() - start,
        "mean": mean,
        "probe_f1": probe_f1,
        "per_letter": counted[
            ["letter", "mean_absorption_fraction", "full_absorption_rate", "num_split_feats",
             "num_probe_true_positives"]
        ].to_dict("records"),
    }  # fmt: skip
    print(json.dumps(mean, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["export", "run"])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--sae", help="a saetrain folder in the SAELens layout (run)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--position", type=int, default=-6, help="the word's token, from the end")
    parser.add_argument("--max-words", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.step == "export":
        export(args.model_dir)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
