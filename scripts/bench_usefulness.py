"""The absorption suite's cost against the LM forward alone on the same tokens.

    python scripts/bench_usefulness.py [--model-path DIR] [--site resid_post.6]
        [--dictionary FOLDER | --n-latents 4608 --k 32] [--max-words 2000] [--device cpu]
        [--out docs/bench_usefulness.json]

Times, on one set of first-letter prompts (the suite's own, eval.absorption settings):
  lm_forward_full   the whole LM on the prompts' tokens, no hooks (what any evaluation pays)
  suite_lm          the suite's LM forwards (they stop at the dictionary's site)
  suite_probes      ground-truth probes, encoding, L1 ranking, k-sparse probes, absorption
and prints a table and writes JSON. The suite's F1 thresholds are off here so that every phase
runs whatever the probe's F1 (which is reported). Without --dictionary a TopK dictionary with
random weights stands in (the suite's cost hardly depends on what the latents mean; the probe F1
is the LM's).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from saetrain.bench.report import write_json
from saetrain.config import AbsorptionConfig, DictionaryConfig, ModelConfig
from saetrain.evaluation.usefulness.absorption import absorption
from saetrain.evaluation.usefulness.first_letter import (
    build_prompts,
    first_letter_data,
    right_padded,
)
from saetrain.progress import Progress


def _dictionary(args: argparse.Namespace, d_in: int, device: torch.device):
    if args.dictionary:
        from saetrain.export.saelens import load_dictionary

        return load_dictionary(args.dictionary, device).eval()
    from saetrain.dictionaries import build_dictionary

    cfg = DictionaryConfig(architecture="topk", n_latents=args.n_latents, k=args.k)
    gen = torch.Generator().manual_seed(0)
    return build_dictionary(cfg, d_in, d_in, torch.device("cpu"), gen).to(device).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="HF folder (default: SmolLM2 GGUF)")
    parser.add_argument("--site", default="resid_post.6")
    parser.add_argument("--dictionary", default=None)
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--max-words", type=int, default=2000)
    parser.add_argument("--batch-prompts", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from saetrain.activations.model import load_lm
    from saetrain.activations.source import ActivationSource

    device = torch.device(args.device)
    model_cfg = ModelConfig(device=args.device)
    if args.model_path:
        model_cfg = ModelConfig(name=args.model_path, gguf_package=None, device=args.device)
    model, tokenizer = load_lm(model_cfg, device)
    source = ActivationSource(model, [args.site])
    dictionary = _dictionary(args, source.width(args.site), device)
    # Every letter counted (F1 > -1), so that every phase runs and is timed whatever the probe's
    # F1 (reported).
    cfg = AbsorptionConfig(max_words=args.max_words, batch_prompts=args.batch_prompts,
                           min_probe_f1=-1.0, min_letters=1)  # fmt: skip

    prompts = build_prompts(tokenizer, cfg, seed=0)
    every = prompts.train_prompts + prompts.test_prompts
    n_tokens = sum(len(p) for p in every)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    with torch.no_grad(), Progress("LM forward alone", len(every), "prompts") as progress:
        for i in range(0, len(every), cfg.batch_prompts):
            ids, _ = right_padded(every[i : i + cfg.batch_prompts])
            model(input_ids=ids.to(device), use_cache=False)
            progress.update(len(ids))
    sync()
    lm_full = time.perf_counter() - start

    start = time.perf_counter()
    data = first_letter_data(source, [args.site], tokenizer, cfg, seed=0)
    sync()
    suite_lm = time.perf_counter() - start
    start = time.perf_counter()
    outcome = absorption(data, dictionary, cfg)
    suite_probes = time.perf_counter() - start

    result = {
        "model": model_cfg.name,
        "site": args.site,
        "device": str(device),
        "dictionary": args.dictionary or f"random topk, {args.n_latents} latents, k={args.k}",
        "prompts": len(every),
        "prompt_tokens": n_tokens,
        "lm_forward_full_s": lm_full,
        "suite_lm_s": suite_lm,
        "suite_probes_s": suite_probes,
        "suite_total_s": suite_lm + suite_probes,
        "suite_over_lm_forward": (suite_lm + suite_probes) / lm_full,
        "probe_mean_f1": float(sum(r.probe_f1 for r in outcome.letters) / 26),
        "probe_letters_above_min_f1": sum(r.probe_f1 > cfg.min_probe_f1 for r in outcome.letters),
        "refused": outcome.refused,
    }
    rows = [
        ("LM forward alone (all layers)", lm_full),
        (f"suite: LM forwards to {args.site}", suite_lm),
        ("suite: probes + absorption", suite_probes),
        ("suite total", suite_lm + suite_probes),
    ]
    print(f"\n{len(every)} prompts, {n_tokens} tokens, {model_cfg.name} on {device}")
    print(f"{'phase':<36} {'seconds':>9}")
    for name, seconds in rows:
        print(f"{name:<36} {seconds:>9.2f}")
    print(f"suite / LM forward: {result['suite_over_lm_forward']:.2f}×")
    if args.out:
        write_json(Path(args.out), result)
        print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    main()
