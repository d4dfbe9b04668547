"""TopK recipe ablation: saetrain's TopK SAE against EleutherAI's sparsify at equal tokens, and
saetrain's recipe changed one factor at a time toward sparsify's choices.

    python scripts/topk_ablation.py collect --out /tmp/acts_resid6.pt   # LM once (minutes)
    python scripts/topk_ablation.py run --acts /tmp/acts_resid6.pt      # the table
    python scripts/topk_ablation.py render                              # md from the json

`collect` runs SmolLM2-135M-Instruct (the default model) on the default data (the Python standard
library) and saves the activations at one site: training rows and held-out rows. `run` trains
every variant on the same training rows in the same order (a fixed permutation per seed) and
reports held-out FVU, L0 and never-fired latents (saetrain.evaluation.metrics, the one definition).
sparsify's rows appear when sparsify is importable (scripts/peers.py; it is never a saetrain
dependency: install it into a scratch venv).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent


def collect(args: argparse.Namespace) -> int:
    import math
    import os
    import sysconfig
    from dataclasses import replace

    from saetrain.activations.model import load_lm, resolve_device
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import TokenSource
    from saetrain.config import DataConfig, ModelConfig

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    data = DataConfig()
    data = replace(data, data_files=[os.path.join(sysconfig.get_paths()["stdlib"], "*.py")])
    model, tokenizer = load_lm(ModelConfig(device=args.device), device)
    source = ActivationSource(model, [args.site])
    tokens = TokenSource(data, tokenizer, args.seed)
    t0 = time.time()
    held_rows = [
        r.cpu()
        for r in source.rows(
            iter(tokens.held_out(math.ceil(args.eval_tokens / (data.context_size - 1)), 16)),
            [args.site],
            torch.float32,
        )
    ]
    held_out = torch.cat(held_rows)[: args.eval_tokens]
    chunks, have = [], 0
    for rows in source.rows(tokens.training(16), [args.site], torch.float32):
        chunks.append(rows.cpu())
        have += len(rows)
        if have >= args.tokens:
            break
    train = torch.cat(chunks)[: args.tokens]
    seconds = time.time() - t0
    meta = {
        "model": "SmolLM2-135M-Instruct",
        "site": args.site,
        "data": "python standard library (configs/data/python_stdlib.yaml)",
        "seed": args.seed,
        "lm_seconds": seconds,
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": train, "held_out": held_out, "meta": meta}, args.out)
    print(
        f"collected {len(train)} training + {len(held_out)} held-out activations at {args.site} "
        f"in {seconds:.0f}s ({(len(train) + len(held_out)) / seconds:.0f} tok/s) -> {args.out}"
    )
    return 0


# -- the recipes -------------------------------------------------------------------------------

# saetrain's TopK recipe at the commit this study started from (ec0e184): the Hydra defaults
# (configs/trainer/default.yaml, configs/dictionary/topk.yaml). Fixed here so the table's
# "before" row stays the same whatever the defaults become.
HEAD_DICTIONARY = {
    "architecture": "topk",
    "aux_k": None,
    "aux_k_coefficient": 1 / 32,
    "aux_k_normalization": "residual",
    "b_dec_init": "geometric_median",
    "normalize_activations": True,
    "encoder_init_norm": 1.0,  # W_enc = W_dec.T (no field then; the default is 0.5 since)
}
HEAD_TRAINER = {
    "lr": 2e-3,
    "warmup_steps": 10,
    "decay_fraction": 0.2,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 6.25e-10,
    "grad_clip": 1.0,
    "dead_after_tokens": 50_000,
}


def current_defaults() -> tuple[dict, dict]:
    """The TopK recipe the configs give today (what `python -m saetrain` trains)."""
    from omegaconf import OmegaConf

    root = SCRIPTS.parent / "configs"
    dictionary = OmegaConf.to_container(OmegaConf.load(root / "dictionary" / "topk.yaml"))
    trainer = OmegaConf.to_container(OmegaConf.load(root / "trainer" / "default.yaml"))
    keep_t = set(HEAD_TRAINER) | {"batch_tokens"}
    return (
        {k: v for k, v in dictionary.items() if k not in ("n_latents", "expansion_factor", "k")},
        {k: v for k, v in trainer.items() if k in keep_t and k != "batch_tokens"},
    )


# Changes to the encoder/decoder init, applied once the dictionary exists (before step 1).
def init_linear(d, gen):
    """sparsify's: nn.Linear's default encoder (uniform ±1/sqrt(d_in), column norms ≈ 0.58),
    W_dec its transpose at unit row norm."""
    W = (torch.rand(d.d_in, d.n_latents, generator=gen) * 2 - 1) / d.d_in**0.5
    d.W_enc.copy_(W)
    d.W_dec.copy_((W / W.norm(dim=0, keepdim=True)).T)


def init_untied(d, gen):
    """An encoder independent of the decoder (Gaussian, columns at unit norm)."""
    W = torch.randn(d.d_in, d.n_latents, generator=gen)
    d.W_enc.copy_(W / W.norm(dim=0, keepdim=True))


def init_enc_scale(factor):
    def apply(d, gen):
        d.W_enc.mul_(factor)

    apply.__doc__ = f"tied init, encoder columns scaled by {factor}"
    return apply


# One variant: overrides of the recipe (dictionary.*, trainer.*) and optional hooks.
#   init: (dictionary, generator) -> None, under no_grad, before training
#   no_grad_projection: keep unit-norm rows but skip removing the gradient's parallel part
VARIANTS: dict[str, dict] = {}


def variant(name, group, what, dictionary=None, trainer=None, **extra):
    VARIANTS[name] = {
        "group": group,
        "what": what,
        "dictionary": dictionary or {},
        "trainer": trainer or {},
        **extra,
    }


variant("head", "baseline", "saetrain at ec0e184: AuxK / residual, encoder tied at norm 1 (before)")
variant(
    "current",
    "baseline",
    "saetrain's configs today: encoder_init_norm 0.5 for TopK (after)",
    current=True,
)
variant(
    "raw_input", "normalisation", "no input scaling (sparsify)", {"normalize_activations": False}
)
variant(
    "init_linear",
    "init",
    "W_enc nn.Linear uniform, W_dec = its normalised transpose (sparsify)",
    init=init_linear,
)
variant("init_untied", "init", "W_enc random, not tied to W_dec", init=init_untied)
variant("init_enc_0.5", "init", "tied, encoder columns at norm 0.5", init=init_enc_scale(0.5))
variant("init_enc_2", "init", "tied, encoder columns at norm 2", init=init_enc_scale(2.0))
variant("init_enc_0.25", "init", "tied, encoder columns at norm 0.25", init=init_enc_scale(0.25))
variant("init_enc_0.1", "init", "tied, encoder columns at norm 0.1", init=init_enc_scale(0.1))
variant(
    "init_enc_0.5_lr_4e-3",
    "init",
    "tied, encoder columns at norm 0.5, lr 4e-3",
    trainer={"lr": 4e-3},
    init=init_enc_scale(0.5),
)
variant("b_dec_mean", "b_dec", "b_dec = mean (sparsify: the first batch's)", {"b_dec_init": "mean"})
variant("b_dec_zeros", "b_dec", "b_dec = 0", {"b_dec_init": "zeros"})
variant(
    "auxk_off", "auxk", "no AuxK (sparsify's default auxk_alpha = 0)", {"aux_k_coefficient": 0.0}
)
variant(
    "auxk_target",
    "auxk",
    "AuxK / target variance (sparsify when on)",
    {"aux_k_normalization": "target"},
)
variant("auxk_k64", "auxk", "aux_k = 64 (of d/2 = 288)", {"aux_k": 64})
variant("auxk_coef_0.1", "auxk", "AuxK coefficient 0.1 (1/32 default)", {"aux_k_coefficient": 0.1})
variant(
    "dead_10M",
    "auxk",
    "dead after 10M tokens (sparsify's; never within this run)",
    trainer={"dead_after_tokens": 10_000_000},
)
variant("dead_200k", "auxk", "dead after 200k tokens", trainer={"dead_after_tokens": 200_000})
variant(
    "sched_linear",
    "schedule",
    "linear decay over the whole run after warm-up (sparsify)",
    trainer={"decay_fraction": 1.0},
)
variant("sched_const", "schedule", "no decay", trainer={"decay_fraction": 0.0})
variant("warmup_50", "schedule", "50 warm-up steps", trainer={"warmup_steps": 50})
variant(
    "adam_eps_1e-8", "adam", "Adam eps 1e-8 (torch's default, sparsify)", trainer={"adam_eps": 1e-8}
)
variant("adam_b2_0.99", "adam", "Adam beta2 0.99", trainer={"adam_beta2": 0.99})
variant("adam_b1_0", "adam", "Adam beta1 0 (Gao et al. use 0.9)", trainer={"adam_beta1": 0.0})
variant(
    "no_grad_proj",
    "decoder",
    "unit-norm rows, gradient's parallel part kept",
    no_grad_projection=True,
)
variant("no_clip", "clip", "no gradient clipping (sparsify)", trainer={"grad_clip": 0.0})
variant(
    "lr_3.8e-4",
    "lr",
    "lr 3.77e-4 (Gao et al.'s rule at 4608 latents; sparsify's Adam default)",
    trainer={"lr": 2e-4 / (4608 / 2**14) ** 0.5},
)
variant("lr_1e-3", "lr", "lr 1e-3", trainer={"lr": 1e-3})
variant("lr_4e-3", "lr", "lr 4e-3", trainer={"lr": 4e-3})
variant("lr_8e-3", "lr", "lr 8e-3", trainer={"lr": 8e-3})
# sparsify: its own code (scripts/peers.py); AuxK and the dead window as saetrain's so that only
# the recipe differs; the warm-up as saetrain's (sparsify's 1000 steps exceed this run).
# The rest of the TopK family with the encoder init that matters most above.
for arch in ("batchtopk", "matryoshka"):
    variant(arch, "family", f"{arch}, saetrain's recipe at ec0e184", {"architecture": arch})
    for scale in (0.5, 0.25):
        variant(
            f"{arch}_enc_{scale}",
            "family",
            f"{arch}, tied, encoder columns at norm {scale}",
            {"architecture": arch},
            init=init_enc_scale(scale),
        )
variant(
    "sparsify_adam",
    "sparsify",
    "sparsify, Adam, lr 2e-3, warm-up 10, linear decay, AuxK 1/32 dead>50k",
    peer={
        "optimizer": "adam",
        "lr": 2e-3,
        "warmup_steps": 10,
        "auxk_alpha": 1 / 32,
        "dead_feature_threshold": 50_000,
    },
)
variant(
    "sparsify_signum",
    "sparsify",
    "sparsify's default optimiser: SignSGD + schedule-free, its lr rule, AuxK 1/32 dead>50k",
    peer={
        "optimizer": "signum",
        "lr": None,
        "auxk_alpha": 1 / 32,
        "dead_feature_threshold": 50_000,
    },
)
variant(
    "sparsify_defaults",
    "sparsify",
    "sparsify's defaults (signum, AuxK off)",
    peer={"optimizer": "signum", "lr": None},
)
variant(
    "sparsify_adam_noaux",
    "sparsify",
    "sparsify, Adam, lr 2e-3, warm-up 10, AuxK off",
    peer={"optimizer": "adam", "lr": 2e-3, "warmup_steps": 10},
)

variant(
    "sparsify_adam_lr_rule",
    "sparsify",
    "sparsify, Adam at its lr rule (3.77e-4), warm-up 10, linear decay, AuxK 1/32 dead>50k",
    peer={
        "optimizer": "adam",
        "lr": None,
        "warmup_steps": 10,
        "auxk_alpha": 1 / 32,
        "dead_feature_threshold": 50_000,
    },
)

# auxk_target is the recipe before the AuxK change (AuxK divided by the target's variance).
HEADLINE = ["auxk_target", "head", "current", "sparsify_adam", "sparsify_signum"]


# -- training ---------------------------------------------------------------------------------


def batches_for(train: torch.Tensor, seed: int, batch: int):
    """The seed's row order (one permutation), its batches, and the generator after it."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    steps = len(train) // batch
    return order[: steps * batch], gen


def run_saetrain(spec: dict, train, held_out, args, seed: int) -> dict:
    from dataclasses import replace

    from peers import heldout_metrics

    from saetrain.config import DictionaryConfig, TrainerConfig
    from saetrain.training.fit import fit_dictionary

    if spec.get("current"):
        dict_over, trainer_over = current_defaults()
    else:
        dict_over = {**HEAD_DICTIONARY, **spec["dictionary"]}
        trainer_over = {**HEAD_TRAINER, **spec["trainer"]}
    order, gen = batches_for(train, seed, args.batch)
    dict_cfg = replace(DictionaryConfig(), n_latents=args.n_latents, k=args.k, **dict_over)
    trainer_cfg = replace(
        TrainerConfig(), total_tokens=len(order), batch_tokens=args.batch, **trainer_over
    )
    cursor = [0]

    def next_batch(n: int) -> torch.Tensor:
        rows = order[cursor[0] : cursor[0] + n]
        cursor[0] += n
        return train[rows]

    def on_ready(dictionary, trainer) -> None:
        if spec.get("init") is not None:
            with torch.no_grad():
                spec["init"](dictionary, gen)
        if spec.get("no_grad_projection"):
            dictionary.remove_gradient_parallel_to_decoder = lambda: None

    t = time.perf_counter()
    fitted = fit_dictionary(
        dict_cfg,
        trainer_cfg,
        next_batch,
        train[order[: args.init_rows]],
        train.shape[1],
        train.shape[1],
        False,
        torch.device("cpu"),
        gen,
        log_every=10**9,
        on_ready=on_ready,
    )
    seconds = time.perf_counter() - t
    return {
        **heldout_metrics(fitted.exported, held_out),
        "train_fvu_last": fitted.state.history[-1]["fvu"],
        "train_seconds": seconds,
        "recipe": {"dictionary": dict_over, "trainer": trainer_over},
    }


def run_peer(spec: dict, train, held_out, args, seed: int) -> dict:
    from peers import heldout_metrics, to_topk_sae, train_sparsify_topk

    order, _ = batches_for(train, seed, args.batch)
    weights = train_sparsify_topk(
        train[order],
        n_latents=args.n_latents,
        k=args.k,
        batch_size=args.batch,
        seed=seed,
        **spec["peer"],
    )
    info = {k: v for k, v in weights.info.items() if k != "history"}
    return {
        **heldout_metrics(to_topk_sae(weights, args.k), held_out),
        "train_seconds": info.pop("train_seconds"),
        "recipe": info,
    }


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(SCRIPTS))
    from peers import sparsify_available

    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.acts)
    train, held_out = data["train"].float(), data["held_out"].float()
    if args.tokens:
        train = train[: args.tokens]
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    saved = (
        json.loads(out.with_suffix(".json").read_text())
        if out.with_suffix(".json").exists() and args.append
        else {"results": []}
    )
    results = {(r["variant"], r["seed"]): r for r in saved["results"]}
    have_peer = sparsify_available()
    for name in names:
        spec = VARIANTS[name]
        if "peer" in spec and not have_peer:
            print(f"{name}: sparsify is not importable; skipped (see scripts/peers.py)")
            continue
        for seed in seeds:
            m = (run_peer if "peer" in spec else run_saetrain)(spec, train, held_out, args, seed)
            row = {"variant": name, "group": spec["group"], "what": spec["what"], "seed": seed, **m}
            results[(name, seed)] = row
            print(
                f"{name:<20} seed {seed}  FVU {row['fvu']:.4f}  L0 {row['l0']:5.1f}  "
                f"never fired {row['never_fired_fraction']:.3f}  ({row['train_seconds']:.0f}s)",
                flush=True,
            )
            meta = {
                "acts": str(args.acts),
                "collected": data.get("meta", {}),
                "train_tokens": (len(train) // args.batch) * args.batch,
                "held_out_tokens": len(held_out),
                "n_latents": args.n_latents,
                "k": args.k,
                "batch": args.batch,
                "init_rows": args.init_rows,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
                "command": "python scripts/topk_ablation.py " + " ".join(sys.argv[1:]),
            }
            ordered = sorted(
                results.values(),
                key=lambda r: (
                    list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else 999,
                    r["seed"],
                ),
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(
                json.dumps({"meta": meta, "results": ordered}, indent=2, default=str)
            )
    render(out)
    return 0


# -- the table --------------------------------------------------------------------------------


def render(out: Path) -> None:
    saved = json.loads(out.with_suffix(".json").read_text())
    meta, rows = saved["meta"], saved["results"]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    base = by.get("head")

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    def per_seed(rs, key, fmt):
        return " / ".join(format(r[key], fmt) for r in sorted(rs, key=lambda r: r["seed"]))

    def line(name, rs):
        fvu = mean(rs, "fvu")
        rel = ""
        if base:
            common = {r["seed"] for r in base} & {r["seed"] for r in rs}
            if common:
                b = mean([r for r in base if r["seed"] in common], "fvu")
                f = mean([r for r in rs if r["seed"] in common], "fvu")
                rel = f"{100 * (f - b) / b:+.1f}%"
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        what = VARIANTS[name]["what"] if name in VARIANTS else rs[0]["what"]
        return (
            f"| {name} | {what} | {seeds} | {fvu:.4f} | {per_seed(rs, 'fvu', '.4f')} | "
            f"{rel} | {per_seed(rs, 'l0', '.1f')} | {per_seed(rs, 'never_fired_fraction', '.3f')} |"
        )

    header = [
        "| variant | what | seeds | held-out FVU (mean) | FVU per seed | vs before | L0 "
        "| never fired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        "# TopK recipe: saetrain against sparsify, and one-factor ablations",
        "",
        "Generated by `scripts/topk_ablation.py`; do not edit by hand.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Activations: {meta['collected'].get('model', '?')} `{meta['collected'].get('site')}`"
        f", {meta['collected'].get('data', '')}; {meta['train_tokens']:,} training rows (the same "
        f"rows in the same order for every variant of a seed), {meta['held_out_tokens']:,} "
        "held-out rows",
        f"- Dictionary: {meta['n_latents']} latents, k = {meta['k']}, batch {meta['batch']} "
        f"tokens; saetrain's scale and b_dec from the first {meta['init_rows']:,} rows",
        f"- Machine: CPU, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}",
        "- vs before: the held-out FVU's change against `head` on the same seeds",
        "",
        "## Headline",
        "",
        *header,
    ]
    for name in HEADLINE:
        if name in by:
            lines.append(line(name, by[name]))
    lines += ["", "## One factor at a time (from `head`)", "", *header]
    for name in VARIANTS:
        if name in by and name not in HEADLINE:
            lines.append(line(name, by[name]))
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run the LM once and save activations")
    c.add_argument("--out", default="/tmp/acts_resid6.pt")
    c.add_argument("--site", default="resid_post.6")
    c.add_argument("--tokens", type=int, default=409_600, help="training rows")
    c.add_argument("--eval-tokens", type=int, default=16_384, help="held-out rows")
    c.add_argument("--device", default="auto")
    c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="train the variants and write the table")
    r.add_argument("--acts", default="/tmp/acts_resid6.pt")
    r.add_argument(
        "--variants", default="", help=f"comma-separated; default all: {','.join(VARIANTS)}"
    )
    r.add_argument("--seeds", default="0,1")
    r.add_argument("--tokens", type=int, default=0, help="use the first N training rows (0: all)")
    r.add_argument("--n-latents", type=int, default=4608)
    r.add_argument("--k", type=int, default=32)
    r.add_argument("--batch", type=int, default=2048)
    r.add_argument(
        "--init-rows",
        type=int,
        default=16_384,
        help="rows for saetrain's scale and b_dec (as run() with init_batches=8)",
    )
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--out", default="docs/topk_ablation")
    r.add_argument(
        "--append",
        action="store_true",
        help="keep <out>.json's other rows (re-running a variant replaces its rows)",
    )
    d = sub.add_parser("render", help="rewrite <out>.md from <out>.json")
    d.add_argument("--out", default="docs/topk_ablation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "collect":
        return collect(args)
    if args.command == "run":
        return run(args)
    render(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
