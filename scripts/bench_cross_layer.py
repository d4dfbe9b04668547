"""Is a cross-layer transcoder (CLT) worth it? Per-layer transcoders vs one CLT, equal budgets.

(real) The default model (SmolLM2-135M-Instruct), `mlp_in.ℓ → mlp_out.ℓ` at layers --layers:
       per-layer transcoders (a transcoder set, dictionary.kind=single) against one CLT
       (dictionary.kind=clt) with the same latents per layer and the same k per layer — equal
       total latents and equal L0 — trained in ONE run (a `dictionaries` list, so both see the same
       tokens in the same order, same seed). Both are then spliced into the LM as a replacement
       (every layer's MLP output replaced at once, each dictionary reading the replaced forward's
       own inputs) on the same held-out contexts: CE clean / replaced / every MLP zeroed, CE
       recovered, KL (saetrain.evaluation.splice.replacement_lm_metrics); and per-layer FVU and L0
       from each dictionary's held-out evaluation (saetrain_run.json).
       With --arch jumprelu, the same with JumpReLU at (approximately) matched L0:
       dictionary.target_l0 = k per layer for each transcoder and L·k for the CLT.
(synthetic) saetrain.synthetic.cross_layer: features with a home layer, carried in every later
       layer's input and written to every later layer's output. Per-layer transcoders and a CLT
       (TopK, same latents and k per layer) trained on the same rows by saetrain.training.fit
       (prepare_trainer with a Layout; the trainer runs() uses) and scored on held-out rows: FVU,
       L0, and recovery of the true (feature, output layer) directions (SynthSAEBench's MCC per
       output layer, the share of true directions matched at |cos| ≥ 0.9, F1 of detection),
       plus, for the CLT, MCC of whole decoder rows against the true cross-layer rows.

    python scripts/bench_cross_layer.py real --layers 0 1 2 3 --tokens 122880  # the LM part
    python scripts/bench_cross_layer.py real --arch jumprelu ...   # adds JumpReLU rows
    python scripts/bench_cross_layer.py synthetic                  # the known-feature part
    python scripts/bench_cross_layer.py --smoke --out /tmp/clb     # toy sizes, seconds
    python scripts/bench_cross_layer.py render                     # md + png from the JSON

docs/cross_layer_bench.md gives the exact commands behind the committed numbers.

Each mode merges its rows into <out>.json (so parts can be run separately) and re-renders <out>.md
and <out>.png (matplotlib when installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from saetrain.bench.fit import fit_in_order
from saetrain.bench.report import fmt, md_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "cross_layer_bench"
GUTENBERG = ROOT.parent / "shared" / "data" / "gutenberg" / "*.txt"


# -- real model ----------------------------------------------------------------------------------


def real_overrides(args, arch: str) -> list[str]:
    layers = "[" + ",".join(str(layer) for layer in args.layers) + "]"
    site = f"{{input:'{args.input}',target:'{args.target}',layers:{layers}}}"
    L = len(args.layers)
    if arch == "topk":
        single = f"{{architecture:topk,n_latents:{args.n_latents},k:{args.k}}}"
        clt = f"{{kind:clt,architecture:topk,n_latents:{args.n_latents},k:{args.k}}}"
    else:
        extra = ",".join(args.jumprelu_opts)
        extra = "," + extra if extra else ""
        single = f"{{architecture:jumprelu,n_latents:{args.n_latents},target_l0:{args.k}{extra}}}"
        clt = (
            f"{{kind:clt,architecture:jumprelu,n_latents:{args.n_latents},"
            f"target_l0:{args.k * L}{extra}}}"
        )
    entries = (
        f"[{{name:set,site:{site},dictionary:{single}}},{{name:clt,site:{site},dictionary:{clt}}}]"
    )
    over = [
        f"dictionaries={entries}",
        f"trainer.total_tokens={args.tokens}",
        f"trainer.batch_tokens={args.batch}",
        f"eval.n_tokens={args.eval_tokens}",
        "eval.compute_ce=false",  # the replacement CE is computed below, on the same contexts
        f"seed={args.seed}",
    ]
    if args.data:
        over.append(f"data.data_files=[{args.data}]")
    # toy sizes for a tiny model (saetrain/synthetic/tiny_llama.py); --set may change them
    if args.smoke:
        over += ["model.gguf_package=null", "model.device=cpu", "data.context_size=16",
                 "data.holdout_percent=10", "buffer.size_tokens=1024", "buffer.lm_batch_contexts=8",
                 "trainer.init_batches=2", "eval.batch_contexts=8"]  # fmt: skip
    return over + list(args.set)


def run_real(args, arch: str) -> dict:
    from saetrain.activations.model import load_lm, resolve_device
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import TokenBatch, TokenSource
    from saetrain.api import config_from_overrides, load
    from saetrain.evaluation.evaluate import first_contexts, splice_member
    from saetrain.evaluation.splice import replacement_lm_metrics
    from saetrain.run import run

    overrides = real_overrides(args, arch)
    cfg = config_from_overrides(overrides)
    t0 = time.perf_counter()
    if args.from_run is not None:  # dictionaries already trained by this mode: evaluate only
        run_dir = args.from_run
        names = [f"set.{layer}" for layer in args.layers] + ["clt"]
        folders = {name: run_dir / name for name in names}
    else:
        run_dir = Path(args.work) / f"real-{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = run(cfg, run_dir)
        folders = {d.name: d.dictionary_dir for d in result.dictionaries}
    train_s = time.perf_counter() - t0
    infos = {name: json.loads((f / "saetrain_run.json").read_text()) for name, f in folders.items()}

    device = resolve_device(cfg.model.device)
    model, tokenizer = load_lm(cfg.model, device)
    L = args.layers
    ins = [args.input.replace("*", str(layer)) for layer in L]
    outs = [args.target.replace("*", str(layer)) for layer in L]
    source = ActivationSource(model, ins + outs)
    # The held-out contexts run() draws (same data, tokenizer and seed), first ce_contexts of them.
    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    held = tokens.held_out(args.ce_contexts, cfg.eval.batch_contexts)
    batches = first_contexts(held, args.ce_contexts)

    rows = []
    t1 = time.perf_counter()
    set_names = [f"set.{layer}" for layer in L]
    members = [
        splice_member(source, load(folders[n], device), [i], [o])
        for n, i, o in zip(set_names, ins, outs, strict=True)
    ]
    clt_member = splice_member(source, load(folders["clt"], device), ins, outs)
    # One context at a time (the same forwards), so that the paired difference gets an error bar.
    contexts = [
        TokenBatch(b.input_ids[i : i + 1], b.mask[i : i + 1])
        for b in batches
        for i in range(len(b))
    ]
    per_context = {"per-layer": [], "clt": []}
    with torch.no_grad():
        for ctx in contexts:
            per_context["per-layer"].append(replacement_lm_metrics(model, members, [ctx]))
            per_context["clt"].append(replacement_lm_metrics(model, [clt_member], [ctx]))
    set_ce, clt_ce = (pooled(per_context[kind]) for kind in ("per-layer", "clt"))
    paired = paired_differences(per_context["per-layer"], per_context["clt"])
    ce_s = time.perf_counter() - t1
    for kind, ce in (("per-layer", set_ce), ("clt", clt_ce)):
        row = {"arch": arch, "dictionary": kind, **{k: ce[k] for k in CE_KEYS if k in ce}}
        per_layer = {}
        for layer, i, o in zip(L, ins, outs, strict=True):
            if kind == "per-layer":
                final = infos[f"set.{layer}"]["final_metrics"]
                per_layer[str(layer)] = {"fvu": final["fvu"], "l0": final["l0"]}
            else:
                final = infos["clt"]["final_metrics"]
                per_layer[str(layer)] = {"fvu": final[f"fvu.{o}"], "l0": final[f"l0.{i}"]}
        row["per_layer"] = per_layer
        row["l0_total"] = sum(v["l0"] for v in per_layer.values())
        row["fvu_mean"] = sum(v["fvu"] for v in per_layer.values()) / len(per_layer)
        if kind == "clt":
            row["fvu_all"] = infos["clt"]["final_metrics"]["fvu"]
        names = set_names if kind == "per-layer" else ["clt"]
        row["tokens_seen"] = infos[names[0]]["tokens_seen"]
        row["latents_total"] = sum(
            int(json.loads((folders[n] / "cfg.json").read_text()).get("d_sae", 0)) for n in names
        )
        rows.append(row)
    return {
        "rows": rows,
        "paired_clt_minus_per_layer": paired,
        "meta": {
            "arch": arch,
            "model": cfg.model.name,
            "layers": list(L),
            "sites": f"{args.input} → {args.target}",
            "n_latents_per_layer": args.n_latents,
            "k_per_layer": args.k,
            "tokens": args.tokens,
            "batch_tokens": args.batch,
            "eval_tokens": args.eval_tokens,
            "ce_contexts": args.ce_contexts,
            "ce_tokens": set_ce.get("ce_tokens"),
            "context_size": cfg.data.context_size,
            "data": list(cfg.data.data_files or []) or cfg.data.path,
            "seed": cfg.seed,
            "overrides": overrides,
            "run_dir": str(run_dir),
            "train_and_eval_seconds": round(train_s, 1),
            "replacement_ce_seconds": round(ce_s, 1),
        },
    }


def pooled(per_context: list[dict]) -> dict:
    """Per-token means over all contexts (each context's means weighted by its scored tokens)."""
    from saetrain.evaluation.metrics import ce_recovered

    n = sum(c["ce_tokens"] for c in per_context)
    out = {
        key: sum(c[key] * c["ce_tokens"] for c in per_context) / n
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_div")
    }
    out["delta_ce"] = out["ce_spliced"] - out["ce_clean"]
    out["ce_recovered"] = ce_recovered(out["ce_clean"], out["ce_spliced"], out["ce_zero_ablated"])
    out["ce_tokens"] = n
    return out


def paired_differences(a: list[dict], b: list[dict]) -> dict:
    """b − a per context for CE replaced and KL: the token-weighted mean, and its standard error
    over contexts (contexts as the independent units)."""
    out = {"contexts": len(a)}
    w = torch.tensor([c["ce_tokens"] for c in a], dtype=torch.float64)
    for key in ("ce_spliced", "kl_div"):
        d = torch.tensor([y[key] - x[key] for x, y in zip(a, b, strict=True)], dtype=torch.float64)
        mean = float((w * d).sum() / w.sum())
        se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else math.nan
        out[key] = {"mean": mean, "se": se, "clt_better_in": int((d < 0).sum())}
    return out


CE_KEYS = ("ce_clean", "ce_spliced", "ce_zero_ablated", "delta_ce", "ce_recovered", "kl_div")


# -- synthetic -----------------------------------------------------------------------------------


def synthetic_configs(k: int, n: int, tokens: int, batch: int, lr: float):
    from saetrain.config import DictionaryConfig, TrainerConfig

    single = DictionaryConfig(architecture="topk", n_latents=n, k=k)
    clt = DictionaryConfig(kind="clt", architecture="topk", n_latents=n, k=k)
    trainer = TrainerConfig(
        total_tokens=tokens, batch_tokens=batch, lr=lr, warmup_steps=10, dead_after_tokens=tokens
    )
    return single, clt, trainer


def run_synthetic(args) -> dict:
    from saetrain.dictionaries import Layout
    from saetrain.evaluation.feature_recovery import (
        DetectionStats,
        abs_cosines,
        linear_assignment,
        mean_correlation_coefficient,
    )
    from saetrain.synthetic.cross_layer import CrossLayerConfig, CrossLayerSynthetic

    scfg = CrossLayerConfig(
        n_layers=args.syn_layers,
        d=args.syn_d,
        features_per_layer=args.syn_features,
        active_per_layer=args.syn_active,
        noise_std=args.syn_noise,
        seed=args.seed,
    )
    data = CrossLayerSynthetic(scfg)
    L, d = scfg.n_layers, scfg.d
    device = torch.device("cpu")
    train_rows, _ = data.rows(args.syn_tokens + args.init_rows)
    test_rows, test_codes = data.rows(args.syn_eval, torch.Generator().manual_seed(10**6))
    results = []
    for n in args.syn_latents:
        for k in args.syn_k:
            single_cfg, clt_cfg, trainer_cfg = synthetic_configs(
                k, n, args.syn_tokens, args.syn_batch, args.syn_lr
            )

            def fit(dict_cfg, cols, layout, trainer_cfg=trainer_cfg):
                return fit_in_order(
                    dict_cfg, trainer_cfg, train_rows[:, cols], args.init_rows, layout, device,
                    args.seed,
                )  # fmt: skip

            x_cols = [torch.arange(i * d, (i + 1) * d) for i in range(L)]
            y_cols = [torch.arange((L + i) * d, (L + i + 1) * d) for i in range(L)]
            t0 = time.perf_counter()
            singles = [
                fit(single_cfg, torch.cat([x_cols[i], y_cols[i]]), Layout.single(d, d))
                for i in range(L)
            ]
            clt = fit(clt_cfg, torch.cat(x_cols + y_cols), Layout("clt", (d,) * L, (d,) * L))
            train_s = time.perf_counter() - t0

            x_test = test_rows[:, : L * d]
            y_test = test_rows[:, L * d :]
            with torch.no_grad():
                # per-layer transcoders: predictions and codes per layer
                pl_pred, pl_codes = [], []
                for i, tc in enumerate(singles):
                    codes = tc.encode(x_test[:, i * d : (i + 1) * d])
                    pl_codes.append(codes)
                    pl_pred.append(tc.reconstruct(x_test[:, i * d : (i + 1) * d], codes))
                clt_codes = clt.encode(x_test)
                clt_pred = clt.reconstruct(x_test, clt_codes)
                clt_dense = (
                    clt_codes.to_dense(clt.n_latents)
                    if hasattr(clt_codes, "to_dense")
                    else clt_codes
                )
            for kind in ("per-layer", "clt"):
                row = {"n_per_layer": n, "k": k, "dictionary": kind, "per_layer": {}}
                fvus, mccs, mccfs, recs, f1s = [], [], [], [], []
                for lp in range(L):
                    y = y_test[:, lp * d : (lp + 1) * d]
                    pred = (
                        pl_pred[lp] if kind == "per-layer" else clt_pred[:, lp * d : (lp + 1) * d]
                    )
                    fvu = float(((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
                    present = data.present(lp)
                    true_dirs = data.dec_dirs[lp][present]
                    if kind == "per-layer":
                        dec = singles[lp].W_dec.detach()
                        l0 = float((pl_codes[lp].to_dense(n) > 0).sum(1).float().mean())
                        det = DetectionStats(dec, true_dirs)
                        det.update(pl_codes[lp], test_codes[:, present])
                    else:
                        # decoder vectors into output lp: slot lp − ℓ of every layer ℓ ≤ lp
                        dec = torch.cat(
                            [
                                clt.W_dec[src][:, (lp - src) * d : (lp - src + 1) * d]
                                for src in range(lp + 1)
                            ]
                        ).detach()
                        block = clt_dense[:, lp * n : (lp + 1) * n]
                        l0 = float((block > 0).sum(1).float().mean())
                        # detection at the home layer: layer lp's latents vs features homed there
                        home = data.home == lp
                        own = clt.W_dec[lp][:, :d].detach()
                        det = DetectionStats(own, data.dec_dirs[lp][home])
                        det.update(block, test_codes[:, home])
                    cos_all = abs_cosines(dec, true_dirs)
                    cos = cos_all.max(0).values
                    mcc = mean_correlation_coefficient(dec, true_dirs)
                    r_idx, c_idx = linear_assignment(cos_all, maximize=True)
                    # matched |cos| summed over the true directions (unmatched ones count 0)
                    mcc_f = float(cos_all[torch.from_numpy(r_idx), torch.from_numpy(c_idx)].sum())
                    mcc_f /= int(present.sum())
                    f1 = det.compute()["f1"]
                    row["per_layer"][str(lp)] = {
                        "fvu": fvu,
                        "l0": l0,
                        "mcc": mcc,
                        "mcc_features": mcc_f,
                        "recovered_0.9": float((cos >= 0.9).double().mean()),
                        "f1": f1,
                        "true_features": int(present.sum()),
                    }
                    (
                        fvus.append(fvu),
                        mccs.append(mcc),
                        mccfs.append(mcc_f),
                        recs.append(float((cos >= 0.9).double().mean())),
                        f1s.append(f1),
                    )  # noqa: E501
                y_all = y_test
                pred_all = torch.cat(pl_pred, 1) if kind == "per-layer" else clt_pred
                row["fvu_all"] = float(
                    ((y_all - pred_all) ** 2).sum() / ((y_all - y_all.mean(0)) ** 2).sum()
                )
                row["fvu_mean"] = sum(fvus) / L
                row["mcc_mean"] = sum(mccs) / L
                row["mcc_features_mean"] = sum(mccfs) / L
                row["recovered_mean"] = sum(recs) / L
                row["f1_mean"] = sum(f1s) / L
                row["l0_total"] = sum(v["l0"] for v in row["per_layer"].values())
                row["latents_total"] = n * L
                if kind == "clt":
                    whole = [
                        mean_correlation_coefficient(clt.W_dec[h].detach(), data.clt_rows(h))
                        for h in range(L)
                    ]
                    row["mcc_whole_rows"] = sum(whole) / L
                row["train_seconds"] = round(train_s, 1)
                results.append(row)
                print(f"  synthetic n={n} k={k} {kind}: fvu {row['fvu_all']:.4f} "
                      f"mcc {row['mcc_mean']:.3f} mcc/F {row['mcc_features_mean']:.3f} "
                      f"rec {row['recovered_mean']:.3f}", flush=True)  # fmt: skip
    true_l0 = [scfg.active_per_layer * (lp + 1) for lp in range(L)]
    return {
        "rows": results,
        "meta": {
            "generator": scfg.__dict__,
            "n_features": data.n_features,
            "true_active_in_layer_input": true_l0,
            "train_rows": args.syn_tokens,
            "init_rows": args.init_rows,
            "eval_rows": args.syn_eval,
            "batch": args.syn_batch,
            "lr": args.syn_lr,
        },
    }


# -- output ---------------------------------------------------------------------------------------


def real_table(part: dict) -> list[str]:
    meta = part["meta"]
    layers = meta["layers"]
    head = ["dictionary", "latents", "L0 (Σ layers)", "CE clean", "CE replaced", "CE zero",
            "ΔCE", "CE recovered", "KL"]  # fmt: skip
    head += [f"FVU L{layer}" for layer in layers] + [f"L0 L{layer}" for layer in layers]
    rows = []
    for r in part["rows"]:
        cells = [r["dictionary"], str(r["latents_total"]), fmt(r["l0_total"], 1)]
        cells += [fmt(r.get(k)) for k in CE_KEYS]
        cells += [fmt(r["per_layer"][str(la)]["fvu"]) for la in layers]
        cells += [fmt(r["per_layer"][str(la)]["l0"], 1) for la in layers]
        rows.append(cells)
    return md_table(head, rows)


def synthetic_table(part: dict) -> list[str]:
    head = ["n / layer", "k / layer", "dictionary", "FVU (all outputs)", "MCC",
            "matched \\|cos\\| per true direction", "recovered (\\|cos\\| ≥ 0.9)", "F1",
            "CLT: MCC whole rows",
            "L0 (Σ)"]  # fmt: skip
    return md_table(head, [
        [str(r["n_per_layer"]), str(r["k"]), r["dictionary"], fmt(r["fvu_all"]),
         fmt(r["mcc_mean"], 3), fmt(r.get("mcc_features_mean"), 3),
         fmt(r["recovered_mean"], 3), fmt(r["f1_mean"], 3),
         fmt(r.get("mcc_whole_rows"), 3), fmt(r["l0_total"], 1)]
        for r in part["rows"]
    ])  # fmt: skip


def synthetic_layer_table(part: dict) -> list[str]:
    head = ["n", "k", "dictionary", "output layer", "true features", "FVU", "MCC",
            "matched \\|cos\\| per true direction", "recovered", "F1", "L0"]  # fmt: skip
    return md_table(head, [
        [str(r["n_per_layer"]), str(r["k"]), r["dictionary"], layer,
         str(v["true_features"]), fmt(v["fvu"]), fmt(v["mcc"], 3), fmt(v["mcc_features"], 3),
         fmt(v["recovered_0.9"], 3), fmt(v["f1"], 3), fmt(v["l0"], 1)]
        for r in part["rows"]
        for layer, v in r["per_layer"].items()
    ])  # fmt: skip


def print_tables(results: dict) -> None:
    for key, part in results.items():
        if key.startswith("real"):
            print(f"\n{key}: {part['meta']['model']} {part['meta']['sites']} layers "
                  f"{part['meta']['layers']}, {part['meta']['tokens']} tokens")  # fmt: skip
            print("\n".join(real_table(part) + [""] + paired_lines(part)))
        elif key == "synthetic":
            print("\nsynthetic:")
            print("\n".join(synthetic_table(part)))


def write_png(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    reals = [(k, v) for k, v in results.items() if k.startswith("real")]
    syn = results.get("synthetic")
    n_panels = len(reals) + (1 if syn else 0)
    if n_panels == 0:
        return False
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 3.8), squeeze=False)
    ax_i = 0
    for key, part in reals:
        ax = axes[0][ax_i]
        ax_i += 1
        layers = part["meta"]["layers"]
        for r in part["rows"]:
            ax.plot(layers, [r["per_layer"][str(la)]["fvu"] for la in layers], marker="o",
                    label=f"{r['dictionary']} (ΔCE {r['delta_ce']:.3f})")  # fmt: skip
        ax.set_xlabel("layer")
        ax.set_ylabel("held-out FVU of mlp_out")
        ax.set_title(f"{key}: FVU per layer")
        ax.legend(fontsize=8)
    if syn:
        ax = axes[0][ax_i]
        for kind, marker in (("per-layer", "o"), ("clt", "s")):
            rows = [r for r in syn["rows"] if r["dictionary"] == kind]
            ax.plot([r["fvu_all"] for r in rows], [r["mcc_features_mean"] for r in rows], marker,
                    label=kind)  # fmt: skip
            for r in rows:
                xy = (r["fvu_all"], r["mcc_features_mean"])
                ax.annotate(f"n{r['n_per_layer']},k{r['k']}", xy, fontsize=7)
        ax.set_xlabel("held-out FVU (all outputs)")
        ax.set_ylabel("matched |cos| per true direction")
        ax.set_title("synthetic cross-layer features")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def paired_lines(part: dict) -> list[str]:
    p = part.get("paired_clt_minus_per_layer")
    if not p:
        return []
    ce, kl = p["ce_spliced"], p["kl_div"]
    return [f"CLT − per-layer, paired over {p['contexts']} contexts (mean ± standard error): "
            f"CE replaced {ce['mean']:+.4f} ± {ce['se']:.4f} (CLT lower in "
            f"{ce['clt_better_in']}/{p['contexts']} contexts), KL {kl['mean']:+.4f} ± "
            f"{kl['se']:.4f} (CLT lower in {kl['clt_better_in']}/{p['contexts']}).",
            ""]  # fmt: skip


def provenance(meta: dict) -> list[str]:
    if "command" not in meta:
        return []
    lines = []
    if "trained_by" in meta:
        lines += [f"Trained {meta['trained_by']['date']} ({meta['trained_by']['seconds']:.0f} s of "
                  "training and held-out evaluation on the loaded machine) by:", "",
                  f"    {meta['trained_by']['command']}", ""]  # fmt: skip
    return lines + [f"Made {meta.get('date', '?')} on {meta.get('machine', '?')} by:", "",
                    f"    {meta['command']}", ""]  # fmt: skip


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs (shared), load average "
            f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip


def write_markdown(results: dict, path: Path, notes: str) -> None:
    lines = ["# Cross-layer transcoder vs per-layer transcoders (issue 12)", ""]
    if notes:
        lines += [notes, ""]
    for key, part in sorted(results.items(), key=lambda kv: (kv[0] != "real_topk", kv[0])):
        if key.startswith("real"):
            m = part["meta"]
            lines += [f"## {key}: {m['model']}, {m['sites']}, layers {m['layers']}", "",
                      f"{m['n_latents_per_layer']} latents per layer, k (or target L0) "
                      f"{m['k_per_layer']} per layer, {m['tokens']:,} training tokens, "
                      f"replacement CE on {m['ce_contexts']} held-out contexts "
                      f"({int(m['ce_tokens'] or 0):,} scored tokens), FVU on "
                      f"{m['eval_tokens']:,} held-out tokens.", ""]  # fmt: skip
            lines += real_table(part) + [""] + paired_lines(part) + provenance(m)
        elif key == "synthetic":
            m = part["meta"]
            lines += ["## Synthetic cross-layer features", "",
                      f"Generator: {m['generator']}; {m['n_features']} features; "
                      f"{m['train_rows']:,} training rows, {m['eval_rows']:,} held-out rows.",
                      ""]  # fmt: skip
            lines += synthetic_table(part) + [""] + provenance(m) + ["Per output layer:", ""]
            lines += synthetic_layer_table(part) + [""]
    if path.with_suffix(".png").exists():
        lines += [f"![per-layer FVU and synthetic recovery]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("mode", nargs="?", choices=("real", "synthetic", "all", "render"), default="all")
    p.add_argument("--smoke", action="store_true", help="toy sizes (seconds); the real part runs "
                   "only with --set model.name=<a tiny model folder> "
                   "(saetrain/synthetic/tiny_llama.py) and --set data.data_files=[...]",
                   )  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="<out>.json / .md / .png")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_cross_layer"),
                   help="where the real runs' folders go")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="*", default=[], help="JSON files of parts run with another "
                   "--out, merged into <out>.json")  # fmt: skip
    p.add_argument("--notes-file", type=Path, default=None,
                   help="markdown kept in the JSON, atop <out>.md")  # fmt: skip
    g = p.add_argument_group("real model")
    g.add_argument("--arch", choices=("topk", "jumprelu"), default="topk")
    g.add_argument("--from-run", type=Path, default=None,
                   help="a run folder this mode wrote: skip training, evaluate its dictionaries "
                   "(same --layers etc.)")  # fmt: skip
    g.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    g.add_argument("--input", default="mlp_in.*")
    g.add_argument("--target", default="mlp_out.*")
    g.add_argument("--n-latents", type=int, default=2304, help="latents per layer")
    g.add_argument("--k", type=int, default=32, help="k per layer (JumpReLU: target L0 per layer)")
    g.add_argument("--tokens", type=int, default=122_880)
    g.add_argument("--batch", type=int, default=2048)
    g.add_argument("--eval-tokens", type=int, default=4096)
    g.add_argument("--ce-contexts", type=int, default=16)
    g.add_argument("--data", default=None, help="text files glob (default: Gutenberg if present)")
    g.add_argument("--jumprelu-opts", nargs="*", default=[],
                   help="extra dictionary fields for --arch jumprelu "
                   "(e.g. jumprelu_init_threshold:0.6)")  # fmt: skip
    g.add_argument("--set", action="append", default=[], help="extra Hydra override (repeatable)")
    s = p.add_argument_group("synthetic")
    s.add_argument("--syn-layers", type=int, default=4)
    s.add_argument("--syn-d", type=int, default=64)
    s.add_argument("--syn-features", type=int, default=64, help="features homed at each layer")
    s.add_argument("--syn-active", type=float, default=2.0)
    s.add_argument("--syn-noise", type=float, default=0.02)
    s.add_argument("--syn-latents", type=int, nargs="+", default=[64, 128])
    s.add_argument("--syn-k", type=int, nargs="+", default=[2, 4, 8])
    s.add_argument("--syn-tokens", type=int, default=400_000)
    s.add_argument("--syn-batch", type=int, default=1024)
    s.add_argument("--syn-lr", type=float, default=2e-3)
    s.add_argument("--syn-eval", type=int, default=8192)
    s.add_argument("--init-rows", type=int, default=4096)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    # run()'s progress lines (buffer fill, steps, evaluation) on stdout; quiet for --smoke
    logging.basicConfig(level=logging.WARNING if args.smoke else logging.INFO,
                        format="%(asctime)s %(message)s", stream=sys.stdout)  # fmt: skip
    if args.data is None and GUTENBERG.parent.is_dir() and not args.smoke:
        args.data = str(GUTENBERG)
    if args.smoke:
        args.layers = args.layers if args.layers != [0, 1, 2, 3] else [0, 1, 2]
        args.n_latents, args.k, args.tokens, args.batch = 32, 4, 1024, 128
        args.eval_tokens, args.ce_contexts = 128, 4
        args.syn_layers, args.syn_d, args.syn_features = 3, 8, 8
        args.syn_latents, args.syn_k, args.syn_tokens = [8], [2], 4096
        args.syn_batch, args.syn_eval, args.init_rows = 256, 512, 512

    json_path = args.out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    for other in args.merge:  # parts run separately (another --out) into this file
        results |= {k: v for k, v in json.loads(Path(other).read_text()).items() if k != "meta"}
    command = " ".join(["python", "scripts/bench_cross_layer.py", *(argv or sys.argv[1:])])
    if args.mode in ("real", "all") and (not args.smoke or any(
        s.startswith("model.name=") for s in args.set
    )):  # fmt: skip
        part = run_real(args, args.arch)
        part["meta"]["command"] = command
        part["meta"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        part["meta"]["machine"] = machine() + f", torch threads {args.threads}"
        results[f"real_{args.arch}"] = part
    if args.mode in ("synthetic", "all"):
        part = run_synthetic(args)
        part["meta"]["command"] = command
        part["meta"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        part["meta"]["machine"] = machine() + f", torch threads {args.threads}"
        results["synthetic"] = part
    if args.mode != "render" or "meta" not in results:
        results["meta"] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads "
            f"{args.threads}, load average at the end {os.getloadavg()[0]:.1f}",
            "torch": torch.__version__,
            "command": command,
            "smoke": args.smoke,
        }
    if args.notes_file is not None:
        results["notes"] = args.notes_file.read_text().strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    print_tables(results)
    write_png(results, args.out.with_suffix(".png"))
    write_markdown(results, args.out.with_suffix(".md"), results.get("notes", ""))
    print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
