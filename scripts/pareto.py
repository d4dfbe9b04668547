"""Train every architecture at a few sparsity levels on one LM's activations; tabulate and plot
FVU and ΔCE against L0 (the sparsity–fidelity frontier).

The LM runs once: its activations at the site are collected into memory, and every dictionary
trains on the same rows in the same order, so the comparison is about the architectures alone.
Each dictionary is evaluated exactly as `python -m saetrain` evaluates (held-out FVU, L0, and CE
with the dictionary spliced into the LM).

    python scripts/pareto.py                           # defaults: SmolLM2-135M, resid_post.6
    python scripts/pareto.py --tokens 2000000 --out docs/pareto --device cuda

Writes <out>.json, <out>.md (the table) and <out>.png (the plot: `pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from saetrain.activations.model import resolve_device
from saetrain.activations.tokens import TokenSource
from saetrain.bench.fit import fit_on_rows
from saetrain.bench.rows import collect_rows, default_data, lm_source
from saetrain.config import DictionaryConfig, ModelConfig, TrainerConfig
from saetrain.evaluation.evaluate import evaluate_dictionary

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
# Sparsity settings per architecture: k for the TopK family, λ for relu and gated, and the
# starting threshold θ₀ for jumprelu (λ fixed): Adam moves log θ by about lr per step, so in a
# run of a few hundred steps JumpReLU's L0 is set by θ₀ far more than by λ.
SWEEP: dict[str, list[float]] = {
    "topk": [16, 32, 64],
    "batchtopk": [16, 32, 64],
    "matryoshka": [16, 32, 64],
    "relu": [1.0, 2.0, 4.0],
    "gated": [1.5, 3.0, 6.0],
    "jumprelu": [0.3, 0.6, 1.0],
}


def configure(cfg: DictionaryConfig, arch: str, level: float) -> tuple[DictionaryConfig, str]:
    """The dictionary config for one sweep point, and its label."""
    if arch in TOPK_FAMILY:
        return replace(cfg, k=int(level)), f"k={int(level)}"
    if arch == "jumprelu":
        return replace(cfg, jumprelu_init_threshold=level), f"θ₀={level:g}"
    return replace(cfg, sparsity_coefficient=level), f"λ={level:g}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", default="resid_post.6")
    p.add_argument("--tokens", type=int, default=300_000, help="training tokens per dictionary")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--ce-contexts", type=int, default=16, help="0 skips the CE evaluation")
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--archs", default=",".join(SWEEP), help="comma-separated architectures")
    p.add_argument(
        "--levels",
        action="append",
        default=[],
        metavar="ARCH=V1,V2",
        help="replace an architecture's sparsity settings (k, λ or θ₀); repeatable",
    )
    p.add_argument(
        "--data", default=None, help="text files glob (default: the Python standard library)"
    )
    p.add_argument("--sample-by", default="document", choices=["document", "paragraph", "line"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/pareto", help="output path without extension")
    p.add_argument(
        "--from-json", action="store_true", help="re-render <out>.md and <out>.png from <out>.json"
    )
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.from_json:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_outputs(saved["results"], saved["meta"], Path(args.out))
        return 0
    sweep = dict(SWEEP)
    for item in args.levels:
        arch, _, values = item.partition("=")
        if arch not in SWEEP:
            raise SystemExit(f"--levels {item!r}: unknown architecture; choose from {list(SWEEP)}")
        sweep[arch] = [float(v) for v in values.split(",")]
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    data = default_data(args.data, args.sample_by)
    _, tokenizer, source = lm_source(ModelConfig(device=args.device), args.site, device)
    tokens = TokenSource(data, tokenizer, args.seed)
    n_eval = max(math.ceil(args.eval_tokens / data.context_size), args.ce_contexts, 1)
    held_out = tokens.held_out(n_eval, 16)

    t0 = time.time()
    acts = collect_rows(source, tokens.training(16), args.site, args.tokens).to(device)
    lm_seconds = time.time() - t0
    print(f"collected {len(acts)} activations at {args.site} in {lm_seconds:.0f}s", flush=True)

    results = []
    for arch in args.archs.split(","):
        for level in sweep[arch]:
            dict_cfg, label = configure(
                DictionaryConfig(architecture=arch, n_latents=args.n_latents), arch, level
            )
            trainer_cfg = TrainerConfig(
                total_tokens=len(acts),
                batch_tokens=args.batch,
                lr=args.lr,
                warmup_steps=10,
                sparsity_warmup_steps=30,
                dead_after_tokens=50_000,
            )
            t = time.time()
            fitted = fit_on_rows(dict_cfg, trainer_cfg, acts, args.seed, device)
            with_ce = args.ce_contexts > 0
            m = evaluate_dictionary(
                source, fitted.exported, held_out, args.site, None, with_ce, args.ce_contexts
            )
            row = {
                "architecture": arch,
                "setting": label,
                "l0": m["l0"],
                "fvu": m["fvu"],
                "delta_ce": m.get("delta_ce", float("nan")),
                "ce_recovered": m.get("ce_recovered", float("nan")),
                "never_fired_fraction": m["never_fired_fraction"],
                "train_seconds": time.time() - t,
            }
            results.append(row)
            print(
                f"{arch:<11} {row['setting']:<7} L0 {row['l0']:7.1f}  FVU {row['fvu']:.4f}  "
                f"ΔCE {row['delta_ce']:.4f}  CE rec {row['ce_recovered']:.3f}  "
                f"never fired {row['never_fired_fraction']:.3f}  ({row['train_seconds']:.0f}s)",
                flush=True,
            )

    meta = {
        "model": "SmolLM2-135M-Instruct",
        "site": args.site,
        "train_tokens": len(acts),
        "eval_tokens": args.eval_tokens,
        "ce_contexts": args.ce_contexts,
        "n_latents": args.n_latents,
        "lr": args.lr,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python scripts/pareto.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    write_outputs(results, meta, out)
    return 0


def write_outputs(results: list[dict], meta: dict, out: Path) -> None:
    """The markdown page (run details, table, plot) and the plot."""
    lines = [
        "# Sparsity–fidelity frontier of every architecture",
        "",
        "Generated by `scripts/pareto.py`; do not edit by hand.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Model and site: {meta['model']}, `{meta['site']}`; {meta['n_latents']} latents",
        f"- Training: {meta['train_tokens']:,} tokens of activations (one LM pass, the same rows "
        f"in the same order for every dictionary), lr {meta['lr']}",
        f"- Evaluation: {meta['eval_tokens']:,} held-out tokens for FVU, L0 and "
        f"never-fired latents; "
        f"{meta['ce_contexts']} held-out contexts for ΔCE (the dictionary spliced into the LM)",
        f"- Machine: {meta['device']}, {meta.get('threads', '?')} threads, torch {meta['torch']}, "
        f"{meta.get('date', '')}",
        "",
        "| architecture | setting | L0 | FVU | ΔCE | CE recovered | never fired |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['architecture']} | {r['setting']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{r['delta_ce']:.4f} | {r['ce_recovered']:.3f} | {r['never_fired_fraction']:.3f} |"
        )
    lines += ["", f"![FVU and ΔCE against L0]({out.name}.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(results, out.with_suffix(".png"), meta)


def plot(results: list[dict], path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch in dict.fromkeys(r["architecture"] for r in results):
        rows = sorted((r for r in results if r["architecture"] == arch), key=lambda r: r["l0"])
        l0 = [r["l0"] for r in rows]
        axes[0].plot(l0, [r["fvu"] for r in rows], marker="o", label=arch)
        axes[1].plot(l0, [r["delta_ce"] for r in rows], marker="o", label=arch)
    for ax, name in zip(axes, ("FVU (held-out)", "ΔCE (nats/token)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"{meta['model']} {meta['site']}, {meta['n_latents']} latents, "
        f"{meta['train_tokens']:,} training tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
