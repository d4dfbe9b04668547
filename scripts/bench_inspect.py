"""Benchmark `python -m saetrain.inspect`: what the latent pass costs over the LM alone.

On a saved dictionary folder (its run's model, data and held-out tokens, as the CLI takes them),
over the same held-out batches, in tokens/s:
  1. the LM forward alone, cut after the dictionary's site;
  2. the LM and the dictionary's encoder (codes made, nothing kept);
  3. the inspect pass: LM, encoder and the streaming collector (top-K, quantile samples,
     histograms), i.e. `saetrain.inspect.units.collect_all`;
and, after the pass, the time to build every latent's record (logit effects included) and to
write the site.

    python scripts/bench_inspect.py --folder outputs/<date>/<time>/resid_post.6
    python scripts/bench_inspect.py --folder <folder> --tokens 65536 --device cuda

Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from saetrain.bench.report import write_json


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True, help="a saved dictionary folder")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens per measurement")
    p.add_argument("--batch-contexts", type=int, default=16, help="contexts per LM forward")
    p.add_argument("--top-k", type=int, default=20, help="top contexts kept per latent")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds; the three passes alternate in each, the fastest round counts",
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: the run's)")
    p.add_argument("--out", default="docs/bench_inspect.json", help="JSON output path")
    return p.parse_args()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    import dataclasses
    import math

    from saetrain.activations.model import load_lm, resolve_device
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import TokenSource
    from saetrain.evaluation.folder import EvaluateConfig, resolve
    from saetrain.export.saelens import load_dictionary
    from saetrain.inspect.collect import CollectSettings, dense_codes
    from saetrain.inspect.features import write_feature_files
    from saetrain.inspect.pipeline import _records
    from saetrain.inspect.site import write_site
    from saetrain.inspect.units import collect_all, unit_from_dictionary

    args = parse_args()
    explicit = {"model.device"} if args.device else set()
    ev = EvaluateConfig(path=args.folder)
    if args.device:
        ev.model = dataclasses.replace(ev.model, device=args.device)
    r = resolve(ev, explicit)
    device = resolve_device(r.model.device)
    dictionary = load_dictionary(r.folder, device).requires_grad_(False)
    model, tokenizer = load_lm(r.model, device)
    source = ActivationSource(model, [r.input_site])
    n_contexts = math.ceil(args.tokens / r.data.context_size)
    batches = TokenSource(r.data, tokenizer, r.seed).held_out(n_contexts, args.batch_contexts)
    tokens = sum(b.input_ids.numel() for b in batches)
    unit = unit_from_dictionary(r.folder.name, dictionary, r.input_site, r.target_site)
    settings = CollectSettings(top_k=args.top_k, seed=r.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def lm_only() -> None:
        for b in batches:
            source(b.input_ids)
        sync()

    def lm_encode() -> None:
        with torch.no_grad():
            for b in batches:
                x = source(b.input_ids)[r.input_site]
                dense_codes(unit.encode(x.reshape(-1, x.shape[-1])), unit.n_latents)
        sync()

    stats = {}

    def inspect_pass() -> None:
        stats.update(collect_all(source, [unit], batches, settings, tokens))
        sync()

    source(batches[0].input_ids)  # warm-up
    passes = (("LM alone (to the site)", lm_only), ("LM + encoder", lm_encode),
              ("inspect pass (LM + encoder + collector)", inspect_pass))  # fmt: skip
    # Alternated, so that a busy spell on a shared machine hits every pass alike; best of rounds.
    times: dict[str, list[float]] = {name: [] for name, _ in passes}
    for _ in range(args.repeats):
        for name, fn in passes:
            times[name].append(timed(fn))
    rows = []
    for name, _ in passes:
        best = min(times[name])
        rows.append({"what": name, "seconds": best, "tokens_per_s": tokens / best,
                     "all_seconds": times[name]})  # fmt: skip
    lm_rate = rows[0]["tokens_per_s"]
    for row in rows:
        row["relative_to_lm"] = row["tokens_per_s"] / lm_rate
    records: list = []
    stat = stats[unit.name]
    t_records = timed(lambda: records.extend(_records(unit, stat, model, tokenizer, 10)))
    with tempfile.TemporaryDirectory() as tmp:
        t_site = timed(lambda: write_site(Path(tmp), records, unit.name, {}, {}, tokens))
        site_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        t_features = timed(lambda: write_feature_files(tmp, {6: records}))
        feature_bytes = sum(p.stat().st_size for p in (Path(tmp) / "features").iterdir())

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device.type}",
        "torch": torch.__version__,
        "folder": str(r.folder),
        "model": r.model.name,
        "site": r.input_site,
        "latents": unit.n_latents,
        "tokens": tokens,
        "top_k": args.top_k,
        "repeats": args.repeats,
        "rows": rows,
        "records_seconds": t_records,
        "site_seconds": t_site,
        "site_megabytes": site_bytes / 1e6,
        "feature_files_seconds": t_features,
        "feature_files_megabytes": feature_bytes / 1e6,
    }
    print(f"\n{r.model.name} at {r.input_site}, {unit.n_latents} latents, {tokens} held-out tokens")
    print(f"| {'what':<42} | {'tok/s':>8} | {'vs LM':>6} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 8}|")
    for row in rows:
        print(f"| {row['what']:<42} | {row['tokens_per_s']:>8.0f} | "
              f"{row['relative_to_lm']:>6.2f} |")  # fmt: skip
    print(f"records (logit effects included): {t_records:.1f} s; site: {t_site:.1f} s, "
          f"{site_bytes / 1e6:.1f} MB; circuit-tracer feature files (as if a transcoder): "
          f"{t_features:.1f} s, {feature_bytes / 1e6:.1f} MB")  # fmt: skip
    out = Path(args.out)
    write_json(out, result)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
