"""Dictionary quality of every architecture at matched L0: real activations and known features.

(a) Real activations of the default model (SmolLM2-135M-Instruct, `resid_post.6`): every
    architecture at each target L0 (k for TopK / BatchTopK / Matryoshka, `dictionary.target_l0`
    for ReLU / Gated / JumpReLU), trained on the first N/4 and on all N training rows (two token
    budgets, so that long-run behaviour shows), scored on held-out rows (FVU, L0, never-fired
    share; saetrain.evaluation.metrics) and spliced into the LM (ΔCE; saetrain.evaluation.splice).
(b) saetrain.synthetic's generator (known feature directions and firings): every architecture
    at the generator's L0, scored as SynthSAEBench scores (saetrain.evaluation.feature_recovery:
    MCC after an optimal one-to-one matching, F1 of feature detection, uniqueness), with the
    figures the benchmark's authors publish quoted beside ours.
(c) Optional, never a dependency: when EleutherAI's sparsify is importable, its TopK trainer on the
    same tensors (scripts/peers.py), scored the same way.

    python scripts/quality_bench.py --save-acts /tmp/acts_resid6.pt     # the LM once (minutes)
    python scripts/quality_bench.py --acts /tmp/acts_resid6.pt          # docs/quality_bench.*
    python scripts/quality_bench.py --smoke --out /tmp/qb               # toy sizes, < 60 s
    python scripts/quality_bench.py --from-json                         # re-render md + png

Without --acts, activations are collected from the LM here (--model, --data, --tokens). Every
dictionary of a budget trains on the same rows in the same order (saetrain/bench/fit.py) with
the config `python -m saetrain dictionary=<arch>` composes (configs/dictionary/<arch>.yaml,
configs/trainer/default.yaml), changed only by the overrides the table names and by --set.
Writes <out>.json (after every row, so a long run can be watched or re-rendered), <out>.md and
<out>.png (matplotlib, `pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from saetrain.bench.fit import fit_on_rows
from saetrain.bench.rows import collect_rows, default_data, lm_source, load_rows, save_rows
from saetrain.bench.score import score_rows

ARCHITECTURES = ("relu", "gated", "topk", "batchtopk", "jumprelu", "matryoshka")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
PENALTY_FAMILY = ("relu", "gated", "jumprelu")

# Where the L0 controller (dictionary.target_l0) starts λ — θ₀ for JumpReLU, whose L0 in a short
# run follows its starting threshold more than λ — on real activations: a power law through the
# nearest two points of docs/pareto.md's frontier (SmolLM2-135M resid_post.6, 4608 latents,
# 204,800 tokens): relu λ 1 → L0 89, 2 → 27.5; gated λ 1.5 → 101, 3 → 33; jumprelu θ₀ 0.6 → 40,
# 1 → 18.6. The controller then moves λ towards the target; a run too short for it to get there
# ends near the start, so the table reports the L0 reached, not the target.
START_POINTS = {
    "relu": ("dictionary.sparsity_coefficient", 2.0, 27.5, -0.59),
    "gated": ("dictionary.sparsity_coefficient", 3.0, 33.0, -0.62),
    "jumprelu": ("dictionary.jumprelu_init_threshold", 0.6, 40.2, -0.65),
}

# SynthSAEBench-16k (16,384 features, d = 768, SAEs 4096 wide, 200M samples, lr 3e-4, batch
# 1024), mean ± std over seeds, as the benchmark's authors publish them on SAELens' SynthSAEBench
# page ("Raw results for SynthSAEBench-16k at selected L0s"). Columns: F1, MCC, uniqueness,
# explained variance.
REFERENCE = {
    "source": (
        "Chanin & Garriga-Alonso, SynthSAEBench (arXiv:2602.14687): the authors' SAELens "
        "documentation page, section 'Raw results for SynthSAEBench-16k at selected L0s' "
        "(decoderesearch/SAELens docs/synth_sae_bench.md, read at commit 53c8beac)"
    ),
    "url": "https://github.com/decoderesearch/SAELens/blob/main/docs/synth_sae_bench.md",
    "paper": "https://arxiv.org/abs/2602.14687",
    "setup": (
        "SynthSAEBench-16k: 16,384 ground-truth features in d = 768 (Zipfian firing, hierarchy, "
        "low-rank correlations), SAE width 4096, 200M training samples, lr 3e-4, batch 1024; "
        "true L0 of the 4096 most frequent features ≈ 25"
    ),
    "rows": [
        # (L0, architecture, F1, MCC, uniqueness, explained variance)
        (25, "batchtopk", "0.7316 ± 0.0010", "0.7574 ± 0.0003", "0.9837 ± 0.0015", "0.7923"),
        (25, "matryoshka", "0.8793 ± 0.0021", "0.7927 ± 0.0006", "0.9987 ± 0.0005", "0.7792"),
        (25, "matching pursuit", "0.4464 ± 0.0044", "0.6930 ± 0.0030", "0.8281 ± 0.0069", "0.8351"),
        (
            25,
            "standard L1 (relu)",
            "0.5562 ± 0.0020",
            "0.6039 ± 0.0012",
            "0.8976 ± 0.0021",
            "0.7654",
        ),
        (25, "jumprelu", "0.7317 ± 0.0034", "0.7527 ± 0.0009", "0.9885 ± 0.0010", "0.7951"),
        (20, "batchtopk", "0.8183 ± 0.0011", "0.7526 ± 0.0007", "0.9760 ± 0.0028", "0.7889"),
        (20, "matryoshka", "0.8601 ± 0.0016", "0.7455 ± 0.0021", "0.9874 ± 0.0020", "0.7699"),
        (20, "matching pursuit", "0.4439 ± 0.0024", "0.6748 ± 0.0028", "0.7552 ± 0.0026", "0.8267"),
        (
            20,
            "standard L1 (relu)",
            "0.5777 ± 0.0012",
            "0.5834 ± 0.0015",
            "0.8528 ± 0.0055",
            "0.7501",
        ),
        (20, "jumprelu", "0.8241 ± 0.0041", "0.7434 ± 0.0015", "0.9781 ± 0.0029", "0.7906"),
    ],
    "caveat": (
        "The authors' page, not the paper's own tables, which the stored copies available here did "
        "not show; it says its figures are for the model used in the paper (v2 of "
        "SynthSAEBench-16k). TopK and Gated are not among them. The setups differ by orders of "
        "magnitude (features, width, samples) and in the generator (hierarchy and correlations "
        "there; independent firings and a few correlated pairs here): compare rankings, not values."
    ),
}


# -- configs ----------------------------------------------------------------------------------


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """`--set [ARCH:]group.key=value` → {arch or "*": {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        scope, _, override = item.partition(":") if ":" in item.split("=")[0] else ("", "", item)
        key, sep, value = override.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected [ARCH:]group.key=value")
        if scope and scope not in ARCHITECTURES:
            raise SystemExit(f"--set {item!r}: unknown architecture; choose from {ARCHITECTURES}")
        out.setdefault(scope or "*", {})[key] = value
    return out


def matched_configs(
    arch: str,
    l0: float,
    n_latents: int,
    tokens: int,
    batch: int,
    sets: dict[str, dict[str, str]],
    start_points: bool,
    trainer_defaults: dict[str, str] | None = None,
):
    """(DictionaryConfig, TrainerConfig, how): the config the CLI composes, at L0 `l0`.

    `how` says how the L0 was asked for (and from where λ or θ₀ started).
    """
    from saetrain.api import config_from_overrides

    over = {"dictionary.n_latents": str(n_latents)}
    if arch in TOPK_FAMILY:
        over["dictionary.k"] = str(int(round(l0)))
        how = f"k={int(round(l0))}"
    else:
        over["dictionary.target_l0"] = f"{l0:g}"
        how = f"target_l0={l0:g}"
        if start_points:
            key, value, at_l0, power = START_POINTS[arch]
            start = value * (l0 / at_l0) ** power
            over[key] = f"{start:.3g}"
            how += f" from {'θ₀' if 'threshold' in key else 'λ'}={start:.3g}"
    over |= trainer_defaults or {}
    over |= {"trainer.total_tokens": str(tokens), "trainer.batch_tokens": str(batch)}
    over |= sets.get("*", {}) | sets.get(arch, {})
    if any(k.startswith(("dictionary.", "trainer.")) for k in sets.get(arch, {})):
        how += " (+--set)"
    overrides = [f"dictionary={arch}", *(f"{k}={v}" for k, v in over.items())]
    cfg = config_from_overrides(overrides)
    return cfg.dictionary, cfg.trainer, how


# -- scoring ----------------------------------------------------------------------------------


def ce_metrics(lm: dict | None, dictionary) -> dict[str, float]:
    """ΔCE, CE recovered and KL with the dictionary spliced into the LM (NaN without an LM)."""
    if lm is None:
        return {"delta_ce": math.nan, "ce_recovered": math.nan, "kl_div": math.nan}
    from saetrain.evaluation.splice import spliced_lm_metrics

    m = spliced_lm_metrics(lm["model"], lm["site"], dictionary, lm["batches"])
    return {k: m[k] for k in ("delta_ce", "ce_recovered", "kl_div", "ce_clean", "ce_tokens")}


def training_dead(fitted) -> dict[str, float]:
    from saetrain.evaluation.metrics import training_dead_metrics

    t = fitted.trainer
    return training_dead_metrics(t.tokens_since_fired, t.cfg.dead_after_tokens, t.state.tokens)


# -- (a) real activations ---------------------------------------------------------------------


def real_inputs(args, device):
    """(train rows, held-out rows, lm or None, meta) for part (a)."""
    from saetrain.activations.tokens import TokenSource
    from saetrain.config import ModelConfig

    if args.smoke and not args.model:
        # Synthetic rows stand in for an LM's activations: no ΔCE.
        from saetrain.synthetic.features import SyntheticConfig, SyntheticFeatures

        gen = SyntheticFeatures(SyntheticConfig(d=32, n_features=128, mean_active=6, seed=7))
        train = gen.sample(args.tokens or 8192, torch.Generator().manual_seed(1))
        held = gen.sample(2048, torch.Generator().manual_seed(2))
        return train, held, None, {"source": "synthetic rows (smoke: no LM, no ΔCE)"}

    model_cfg = ModelConfig(device=args.device)
    if args.model:
        model_cfg = ModelConfig(name=args.model, gguf_package=None, device=args.device)
    meta: dict = {"model": args.model or "SmolLM2-135M-Instruct", "site": args.site}
    data = default_data(args.data)
    seed = args.seed
    if args.acts:
        train, held, collected = load_rows(Path(args.acts))
        meta |= {"acts": str(args.acts), "collected": collected}
        meta["site"] = collected.get("site", args.site)
        seed = int(collected.get("seed", seed))
        if args.tokens:
            train = train[: args.tokens]
        if args.ce_contexts <= 0:
            return train, held, None, meta
    need_lm = not args.acts or args.ce_contexts > 0
    lm = None
    if need_lm:
        model, tokenizer, source = lm_source(model_cfg, meta["site"], device)
        tokens = TokenSource(data, tokenizer, seed)
        if not args.acts:
            t0 = time.time()
            n_held = math.ceil(args.eval_tokens / (data.context_size - 1))
            held = collect_rows(source, tokens.held_out(n_held, 16), meta["site"], args.eval_tokens)
            train = collect_rows(source, tokens.training(16), meta["site"], args.tokens or 409_600)
            meta["lm_seconds"] = time.time() - t0
            meta["data"] = data.data_files
        if args.ce_contexts > 0:
            lm = {
                "model": model,
                "site": source.sites[meta["site"]],
                "batches": tokens.held_out(args.ce_contexts, 16),
            }
    return train.to(device), held, lm, meta


def run_real(args, device, results: dict, save) -> None:
    train, held, lm, meta = real_inputs(args, device)
    batch = args.batch
    n = (len(train) // batch) * batch
    budgets = [("N/4", (n // 4 // batch) * batch), ("N", n)]
    results["real"] = {
        "meta": meta
        | {
            "train_rows": len(train),
            "held_out_rows": len(held),
            "budgets": {label: b for label, b in budgets},
            "n_latents": args.n_latents,
            "batch": batch,
            "ce_contexts": args.ce_contexts if lm is not None else 0,
            "start_points": args.start_points,
        },
        "rows": [],
    }
    sets = parse_sets(args.set)
    # Toy runs (a few dozen steps) get a sparsity warm-up that ends inside them.
    toy_trainer = (
        {"trainer.sparsity_warmup_steps": "4", "trainer.target_l0_gain": "0.2"}
        if args.smoke
        else None
    )
    for l0 in args.l0:
        for arch in args.archs:
            for label, tokens in budgets:
                if tokens < batch:
                    continue
                dict_cfg, trainer_cfg, how = matched_configs(
                    arch, l0, args.n_latents, tokens, batch, sets, args.start_points, toy_trainer
                )
                t = time.time()
                fitted = fit_on_rows(dict_cfg, trainer_cfg, train[:tokens], args.seed, device)
                seconds = time.time() - t
                row = {
                    "library": "saetrain",
                    "architecture": arch,
                    "target_l0": l0,
                    "how": how,
                    "budget": label,
                    "train_tokens": tokens,
                    **score_rows(fitted.exported, held),
                    **ce_metrics(lm, fitted.exported),
                    **training_dead(fitted),
                    "lambda_factor": (
                        fitted.trainer.l0_controller.factor
                        if fitted.trainer.l0_controller is not None
                        else None
                    ),
                    "train_seconds": seconds,
                    "eval_seconds": time.time() - t - seconds,
                }
                results["real"]["rows"].append(row)
                print_row("a", row)
                save()
    run_peers(args, train, held, lm, budgets, results, save)


def run_peers(args, train, held, lm, budgets, results, save) -> None:
    """(c): peer libraries' TopK on the same rows, when importable (never required)."""
    import importlib.util

    from peers import sparsify_available

    status = {
        "sparsify": sparsify_available(),
        "sae_lens": importlib.util.find_spec("sae_lens") is not None,
    }
    results["peers"] = {
        "available": status,
        "notes": [
            "sae_lens: scripts/peers.py has no SAELens trainer adapter, so no SAELens rows are "
            "trained even where sae_lens is importable"
        ],
    }
    if not status["sparsify"] or args.no_peers:
        return
    from peers import to_topk_sae, train_sparsify_topk

    for l0 in args.l0:
        for label, tokens in budgets:
            rows = train[:tokens]
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
            weights = train_sparsify_topk(
                rows[order.to(rows.device)].cpu(),
                n_latents=args.n_latents,
                k=int(round(l0)),
                batch_size=args.batch,
                lr=2e-3,
                optimizer="adam",
                warmup_steps=10,
                auxk_alpha=1 / 32,
                dead_feature_threshold=50_000,
                seed=args.seed,
            )
            sae = to_topk_sae(weights, int(round(l0)))
            row = {
                "library": weights.info["library"],
                "architecture": "topk",
                "target_l0": l0,
                "how": f"k={int(round(l0))} (sparsify Adam, lr 2e-3, AuxK 1/32, dead > 50k)",
                "budget": label,
                "train_tokens": tokens,
                **score_rows(sae, held),
                **ce_metrics(lm, sae),
                "train_seconds": weights.info["train_seconds"],
            }
            results["real"]["rows"].append(row)
            print_row("c", row)
            save()


# -- (b) synthetic features -------------------------------------------------------------------


def synthetic_setup(args):
    from dataclasses import replace

    from saetrain.synthetic.features import SyntheticConfig

    # Uniform magnitudes (0.5..1.5): a firing feature is never vanishingly small, as in
    # SynthSAEBench (magnitudes 4–5 ± 0.5), so that detection F1 measures the dictionary rather
    # than coefficients too small to see (exponential magnitudes put many near 0).
    if args.smoke:
        cfg = SyntheticConfig(d=16, n_features=64, mean_active=3, correlated_pairs=4)
        return replace(cfg, magnitude="uniform"), 32, 20_480
    cfg = SyntheticConfig(d=64, n_features=512, mean_active=8, correlated_pairs=16)
    return replace(cfg, magnitude="uniform"), 256, args.synth_tokens


def run_synthetic(args, device, results: dict, save) -> None:
    from saetrain.synthetic.features import SyntheticFeatures

    cfg, n_latents, tokens = synthetic_setup(args)
    data = SyntheticFeatures(cfg)
    # The L0 of the n_latents most frequent features (SynthSAEBench's "true L0 of the first 4096
    # latents"), and 80 % of it (its second reported L0).
    top_l0 = float(data.probabilities.sort(descending=True).values[:n_latents].sum())
    targets = sorted({float(round(top_l0)), float(max(round(0.8 * top_l0), 1))}, reverse=True)
    batch = 256 if args.smoke else 1024
    g = torch.Generator().manual_seed(args.seed + 11)
    # In chunks: each draw also makes the dense [n, n_features] coefficients.
    train = torch.cat([data.sample(min(65_536, tokens - i), g) for i in range(0, tokens, 65_536)])
    eval_x, eval_codes = data.sample_with_codes(4096 if args.smoke else 16_384, g)
    trainer_defaults = {
        "trainer.lr": "0.003",
        "trainer.sparsity_warmup_steps": "100" if not args.smoke else "10",
        "trainer.dead_after_tokens": str(min(100_000, tokens // 4)),
    }
    results["synthetic"] = {
        "config": {**vars(cfg), "n_latents": n_latents, "train_samples": tokens, "batch": batch},
        "true_l0": float(data.probabilities.sum()),
        "top_l0": top_l0,
        "targets": targets,
        "trainer_overrides": trainer_defaults,
        "eval_samples": len(eval_x),
        "reference": REFERENCE,
        "rows": [],
    }
    sets = parse_sets(args.set)
    for l0 in targets:
        for arch in args.archs:
            dict_cfg, trainer_cfg, how = matched_configs(
                arch, l0, n_latents, tokens, batch, sets, False, trainer_defaults
            )
            t = time.time()
            fitted = fit_on_rows(dict_cfg, trainer_cfg, train.to(device), args.seed, device)
            seconds = time.time() - t
            row = {
                "architecture": arch,
                "target_l0": l0,
                "how": how,
                **score_rows(fitted.exported, eval_x, (data.features, eval_codes)),
                **training_dead(fitted),
                "train_seconds": seconds,
            }
            results["synthetic"]["rows"].append(row)
            print_row("b", row)
            save()


# -- output -----------------------------------------------------------------------------------


def print_row(part: str, r: dict) -> None:
    extra = (
        f"MCC {r['mcc']:.3f}  F1 {r['f1']:.3f}"
        if "mcc" in r
        else f"ΔCE {r['delta_ce']:.4f}  [{r['budget']}]"
    )
    print(
        f"({part}) {r.get('library', 'saetrain'):<14} {r['architecture']:<10} {r['how']:<30} "
        f"L0 {r['l0']:6.1f}  FVU {r['fvu']:.4f}  {extra}  never fired "
        f"{r['never_fired_fraction']:.3f}  ({r['train_seconds']:.0f}s)",
        flush=True,
    )


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def write_outputs(results: dict, out: Path) -> None:
    meta = results["meta"]
    lines = [
        "# Dictionary quality at matched L0: real activations and known features",
        "",
        "Generated by `scripts/quality_bench.py`; do not edit by hand.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"{meta['date']}; seed {meta['seed']}",
        "",
    ]
    if "real" in results:
        lines += real_section(results["real"], results.get("peers"))
    if "synthetic" in results:
        lines += synthetic_section(results["synthetic"])
    lines += [f"![FVU / ΔCE against L0, and feature recovery]({out.name}.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(results, out.with_suffix(".png"))


def real_section(real: dict, peers: dict | None) -> list[str]:
    m = real["meta"]
    collected = m.get("collected", {})
    lines = [
        "## (a) Real activations at matched L0",
        "",
        (
            f"- Activations: {m['source']}"
            if m.get("source")
            else f"- Activations: {m.get('model', collected.get('model', '?'))} `{m.get('site')}`"
            + (f", {collected.get('data')}" if collected.get("data") else "")
            + (f", {m['data']}" if m.get("data") else "")
            + (f" (`{m['acts']}`)" if m.get("acts") else "")
        ),
        f"- {m['train_rows']:,} training rows; budgets "
        + ", ".join(f"{k} = {v:,} tokens" for k, v in m["budgets"].items())
        + f" (each budget: the first rows, in one seeded order); batch {m['batch']}; "
        f"{m['n_latents']} latents",
        f"- Held-out: {m['held_out_rows']:,} rows for FVU, L0 and never-fired; "
        + (
            f"{m['ce_contexts']} held-out contexts for ΔCE (the dictionary spliced into the LM)"
            if m["ce_contexts"]
            else "no ΔCE (no LM, or --ce-contexts 0)"
        ),
        "- L0: k for TopK, BatchTopK and Matryoshka (BatchTopK's and Matryoshka's inference "
        "threshold gives an L0 near k, not exactly k); `dictionary.target_l0` for ReLU, Gated and "
        "JumpReLU — all three support it (saetrain/training/l0_controller.py adapts λ during "
        "training), "
        + (
            "started from the λ (θ₀ for JumpReLU) that docs/pareto.md's frontier puts near the "
            "target (START_POINTS in the script). "
            if m.get("start_points")
            else "started from the config's λ and θ₀. "
        )
        + "The L0 column is what the run reached on held-out rows.",
        "- never fired: share of latents with no firing on the held-out rows; dead (training): "
        "share not fired in the last `trainer.dead_after_tokens` training tokens.",
        "",
        "| library | architecture | L0 asked | budget | L0 | FVU | ΔCE | CE recovered | "
        "never fired | dead (training) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(
        real["rows"],
        key=lambda r: (
            r["target_l0"],
            ARCHITECTURES.index(r["architecture"]),
            r["library"] != "saetrain",
            r["train_tokens"],
        ),
    )
    for r in rows:
        lines.append(
            f"| {r['library']} | {r['architecture']} | {r['how']} | {r['budget']} "
            f"({r['train_tokens']:,}) | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{fmt(r.get('delta_ce'), '.4f')} | {fmt(r.get('ce_recovered'), '.3f')} | "
            f"{r['never_fired_fraction']:.3f} | {fmt(r.get('dead_fraction'), '.3f')} | "
            f"{r['train_seconds']:.0f} |"
        )
    lines.append("")
    if peers is not None:
        avail = peers["available"]
        lines.append(
            "- Peers (optional): sparsify "
            + ("importable: its rows are above" if avail["sparsify"] else "not importable: no rows")
            + "; sae_lens "
            + ("importable" if avail["sae_lens"] else "not importable")
            + ". "
            + " ".join(peers["notes"])
            + "."
        )
        lines.append("")
    return lines


def synthetic_section(s: dict) -> list[str]:
    c = s["config"]
    ref = s["reference"]
    targets = s.get("targets") or sorted({r["target_l0"] for r in s["rows"]}, reverse=True)
    lines = [
        "## (b) Known features (saetrain.synthetic), scored as SynthSAEBench scores",
        "",
        f"- Generator: d = {c['d']}, {c['n_features']} features (log-uniform frequencies over "
        f"{c['freq_decades']:g} decades, {c['correlated_pairs']} correlated pairs, "
        f"{c['magnitude']} magnitudes, noise {c['noise_std']:g}), true L0 {s['true_l0']:.2f}; "
        f"dictionaries {c['n_latents']} wide (narrower than the features, as SynthSAEBench's "
        f"4096 of 16,384), {c['train_samples']:,} training samples, batch {c['batch']}; "
        f"scored on {s['eval_samples']:,} fresh samples",
        f"- L0 asked: {' and '.join(f'{t:g}' for t in targets)}: the L0 of the "
        f"{c['n_latents']} most frequent features ({s['top_l0']:.2f}; SynthSAEBench asks for the "
        "L0 of its 4096 most frequent, ≈ 25) and 80 % of it (SynthSAEBench's L0 = 20), rounded",
        "- Training: the config `python -m saetrain dictionary=<arch>` composes, with lr 3e-3, "
        "the sparsity warm-up and the dead window scaled to the run (see `how` and the JSON)",
        "- MCC: mean |cos| between decoder rows and true directions after the optimal one-to-one "
        "matching; F1 (precision, recall): each latent a detector of its best-matching feature "
        "(fires ⇔ the feature's coefficient > 0), averaged over latents; uniqueness: distinct "
        "best matches / latents (saetrain/evaluation/feature_recovery.py)",
        "",
        "| architecture | L0 asked | L0 | MCC | F1 | precision | recall | uniqueness | FVU | "
        "never fired | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['architecture']} | {r['how']} | {r['l0']:.1f} | {r['mcc']:.3f} | "
            f"{r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['uniqueness']:.3f} | "
            f"{r['fvu']:.4f} | {r['never_fired_fraction']:.3f} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "### SynthSAEBench's figures, for comparison",
        "",
        f"Source: {ref['source']}; paper {ref['paper']}. Setup: {ref['setup']}.",
        "",
        "| L0 | architecture | F1 | MCC | uniqueness | variance explained |",
        "|---|---|---|---|---|---|",
    ]
    for row in ref["rows"]:
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"Caveat: {ref['caveat']}", ""]
    return lines


def plot(results: dict, path: Path) -> None:
    """(a) FVU and ΔCE against the L0 reached, per budget; (b) MCC and F1 per architecture."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    real = results.get("real", {}).get("rows", [])
    synth = results.get("synthetic", {}).get("rows", [])
    n_axes = (2 if real else 0) + (1 if synth else 0)
    if n_axes == 0:
        return
    fig, axes = plt.subplots(1, n_axes, figsize=(5.4 * n_axes, 4.6), squeeze=False)
    axes = list(axes[0])
    colours = {a: f"C{i}" for i, a in enumerate(ARCHITECTURES)}
    if real:
        plot_real(axes[0], axes[1], real, colours)
    if synth:
        plot_synthetic(axes[-1], synth, colours)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def plot_real(ax_fvu, ax_ce, real: list[dict], colours: dict[str, str]) -> None:
    for arch in ARCHITECTURES:
        for lib in dict.fromkeys(r["library"] for r in real):
            for budget, style in (("N/4", "o--"), ("N", "s-")):
                rows = sorted(
                    (
                        r
                        for r in real
                        if r["architecture"] == arch
                        and r["budget"] == budget
                        and r["library"] == lib
                    ),
                    key=lambda r: r["l0"],
                )
                if not rows:
                    continue
                name = arch if lib == "saetrain" else f"{arch} ({lib.split()[0]})"
                kw = {
                    "color": colours[arch] if lib == "saetrain" else "k",
                    "alpha": 1.0 if budget == "N" else 0.45,
                    "label": name if budget == "N" else None,
                }
                l0 = [r["l0"] for r in rows]
                ax_fvu.plot(l0, [r["fvu"] for r in rows], style, **kw)
                ax_ce.plot(l0, [r["delta_ce"] for r in rows], style, **kw)
    for ax, name in ((ax_fvu, "held-out FVU"), (ax_ce, "ΔCE (nats/token)")):
        ax.set_xscale("log")
        ax.set_xlabel("L0 reached (active latents per token)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_fvu.set_title("(a) real activations: solid N, dashed N/4")
    ax_ce.set_title("(a) ΔCE spliced into the LM")
    if not any(math.isfinite(r.get("delta_ce", math.nan)) for r in real):
        ax_ce.text(0.5, 0.5, "no ΔCE (no LM)", ha="center", transform=ax_ce.transAxes)
    ax_fvu.legend(fontsize=7)


def plot_synthetic(ax, synth: list[dict], colours: dict[str, str]) -> None:
    targets = sorted({r["target_l0"] for r in synth}, reverse=True)
    width = 0.8 / (2 * len(targets))
    archs = [a for a in ARCHITECTURES if any(r["architecture"] == a for r in synth)]
    for j, target in enumerate(targets):
        for m, (metric, hatch) in enumerate((("mcc", ""), ("f1", "//"))):
            xs, ys, cs = [], [], []
            for i, arch in enumerate(archs):
                r = next(
                    (r for r in synth if r["architecture"] == arch and r["target_l0"] == target),
                    None,
                )
                if r is not None:
                    xs.append(i + (2 * j + m - len(targets) + 0.5) * width)
                    ys.append(r[metric])
                    cs.append(colours[arch])
            ax.bar(
                xs,
                ys,
                width,
                color=cs,
                hatch=hatch,
                alpha=1.0 if j == 0 else 0.55,
                edgecolor="k",
                label=f"{metric.upper()} at L0 {target:g}",
            )
    ax.set_xticks(range(len(archs)), archs, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_title("(b) known features: MCC (plain), F1 (hatched)")
    ax.legend(fontsize=7)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--acts", default=None, help="activations saved by --save-acts")
    p.add_argument(
        "--save-acts", default=None, help="collect the LM's rows (no --acts), save them, stop"
    )
    p.add_argument("--tokens", type=int, default=0, help="training rows (0: all / 409,600)")
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out rows (no --acts)")
    p.add_argument("--ce-contexts", type=int, default=16, help="contexts for ΔCE; 0 skips it")
    p.add_argument("--model", default=None, help="a local HF model folder (default: SmolLM2)")
    p.add_argument("--data", default=None, help="text files glob (default: the Python stdlib)")
    p.add_argument("--site", default="resid_post.6")
    p.add_argument("--l0", default="32,64", help="target L0s (k) of part (a)")
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--archs", default=",".join(ARCHITECTURES))
    p.add_argument("--parts", default="a,b", help="a (real), b (synthetic); c runs with a")
    p.add_argument("--synth-tokens", type=int, default=1_048_576, help="(b) training samples")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[ARCH:]group.key=value",
        help="a config override for every dictionary (or one architecture's); repeatable",
    )
    p.add_argument(
        "--no-start-points",
        dest="start_points",
        action="store_false",
        help="(a): start λ / θ₀ at the config's values, not START_POINTS' (off in --smoke)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip (c) even if sparsify imports")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="toy sizes: every part in < 60 s")
    p.add_argument(
        "--out", default=None, help="path without extension (default docs/quality_bench)"
    )
    p.add_argument("--from-json", action="store_true", help="re-render <out>.md/.png from .json")
    args = p.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in args.archs if a not in ARCHITECTURES]
    if unknown:
        p.error(f"--archs: unknown {unknown}; choose from {list(ARCHITECTURES)}")
    args.parts = set(args.parts.split(","))
    if args.smoke:
        args.start_points = False
        args.l0 = "4,8" if args.l0 == "32,64" else args.l0
        args.n_latents = 64 if args.n_latents == 4608 else args.n_latents
        args.batch = 256 if args.batch == 2048 else args.batch
        args.tokens = args.tokens or 8192
        args.eval_tokens = min(args.eval_tokens, 2048)
        args.ce_contexts = min(args.ce_contexts, 4)
        args.site = "resid_post.1" if args.site == "resid_post.6" and args.model else args.site
    args.l0 = [float(v) for v in args.l0.split(",")]
    args.out = Path(
        args.out or ("/tmp/quality_bench_smoke" if args.smoke else "docs/quality_bench")
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    if args.from_json:
        write_outputs(json.loads(out.with_suffix(".json").read_text()), out)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.save_acts:
        train, held, _, meta = real_inputs(args, device)
        save_rows(Path(args.save_acts), train, held, meta | {"seed": args.seed})
        print(f"saved {len(train)} training + {len(held)} held-out rows -> {args.save_acts}")
        return 0
    results: dict = {
        "meta": {
            "command": "python scripts/quality_bench.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "smoke": args.smoke,
            "seed": args.seed,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "architectures": args.archs,
        }
    }
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))

    start = time.time()
    if "b" in args.parts:
        run_synthetic(args, device, results, save)
    if "a" in args.parts:
        run_real(args, device, results, save)
    results["meta"]["seconds"] = time.time() - start
    save()
    write_outputs(results, out)
    print(
        f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')} ({time.time() - start:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
