"""Benchmark the activation pipeline: what training costs over the LM forward alone, what one
stream saves a sweep, and what the disk cache saves a later run.

Measures, on the default job's model and data (any Hydra overrides may be appended):
  1. the LM forward alone up to the deepest site (tokenization included), in activation rows/s;
  2. a full training run streaming from the LM (buffer, dictionary steps), in rows/s from the
     first buffer fill to the last step, with the refill computed ahead in a background thread
     (buffer.prefetch_batches=2) and in the training loop (0), and the overhead over (1);
  3. a sweep of 4 TopK dictionaries (k = 16, 32, 64, 128): wall time of one run that trains all
     four from one stream vs four separate runs;
  4. a run reading the disk cache written by (2) vs computing the activations.

    python scripts/bench_pipeline.py                               # CPU: SmolLM2, 49k tokens
    python scripts/bench_pipeline.py --tokens 2000000 model.device=cuda model.dtype=bfloat16 \\
        buffer.size_tokens=262144 trainer.batch_tokens=4096

Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from saetrain.bench.report import write_json
from saetrain.bench.rows import lm_forward_rate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=49152, help="training tokens per run")
    p.add_argument("--out", default="docs/bench_pipeline.json", help="JSON output path")
    p.add_argument("--skip-sweep", action="store_true", help="skip measurement 3 (5 runs)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the default job")
    return p.parse_args()


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import saetrain
    from saetrain.checks import to_config
    from saetrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=saetrain.config_dir(), version_base=None):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def lm_alone(cfg, rows_wanted: int) -> dict[str, float]:
    """Rows/s of tokenization + LM forward to the deepest site, nothing else."""
    from saetrain.activations.model import load_lm, resolve_device
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import TokenSource

    device = resolve_device(cfg.model.device)
    model, tokenizer = load_lm(cfg.model, device)
    source = ActivationSource(model, [cfg.site.input])
    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    batches = tokens.training(cfg.buffer.lm_batch_contexts)
    return lm_forward_rate(source, batches, cfg.site.input, rows_wanted)


def timed_run(cfg, folder: Path) -> tuple[float, dict[str, Any]]:
    from saetrain.run import run

    start = time.perf_counter()
    result = run(cfg, folder)
    wall = time.perf_counter() - start
    info = json.loads((result.dictionary_dir / "saetrain_run.json").read_text())
    return wall, info["stream"]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = compose(args.overrides)
    cfg = replace(
        cfg,
        trainer=replace(cfg.trainer, total_tokens=args.tokens),
        eval=replace(cfg.eval, n_tokens=1024, compute_ce=False),
    )
    work = Path(tempfile.mkdtemp(prefix="saetrain-bench-"))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": cfg.model.device,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "tokens": args.tokens,
        "model": cfg.model.name,
        "site": cfg.site.input,
        "buffer_tokens": cfg.buffer.size_tokens,
        "batch_tokens": cfg.trainer.batch_tokens,
        "n_latents": cfg.dictionary.n_latents or cfg.dictionary.expansion_factor * 576,
    }
    print("1/4 LM forward alone ...", flush=True)
    ahead = replace(cfg, buffer=replace(cfg.buffer, prefetch_batches=2))
    stream_wall, stream = timed_run(ahead, work / "stream")
    lm = lm_alone(cfg, stream["lm_tokens"])
    results["lm_alone"] = lm
    results["stream"] = stream | {"wall_seconds": stream_wall}
    results["pipeline_overhead"] = lm["rows_per_s"] / stream["pipeline_rows_per_s"] - 1

    print("2/4 no background refill ...", flush=True)
    _, sync = timed_run(replace(cfg, buffer=replace(cfg.buffer, prefetch_batches=0)), work / "s")
    results["stream_no_prefetch"] = sync
    results["pipeline_overhead_no_prefetch"] = lm["rows_per_s"] / sync["pipeline_rows_per_s"] - 1

    if not args.skip_sweep:
        print("3/4 sweep of 4: one stream vs 4 runs ...", flush=True)
        ks = (16, 32, 64, 128)
        specs = [{"name": f"k{k}", "dictionary": {"k": k}} for k in ks]
        one_wall, one = timed_run(replace(cfg, dictionaries=specs), work / "sweep1")
        separate = [
            timed_run(replace(cfg, dictionary=replace(cfg.dictionary, k=k)), work / f"sweep{k}")
            for k in ks
        ]
        results["sweep"] = {
            "ks": list(ks),
            "one_stream_wall_seconds": one_wall,
            "one_stream_pipeline_seconds": one["pipeline_seconds"],
            "separate_wall_seconds": sum(w for w, _ in separate),
            "separate_pipeline_seconds": sum(s["pipeline_seconds"] for _, s in separate),
        }
        results["sweep"]["speedup_wall"] = (
            results["sweep"]["separate_wall_seconds"] / results["sweep"]["one_stream_wall_seconds"]
        )

    print("4/4 disk cache: write, then read ...", flush=True)
    cached_cfg = replace(cfg, cache=replace(cfg.cache, dir=str(work / "cache")))
    _, write = timed_run(cached_cfg, work / "cache_write")
    _, read = timed_run(cached_cfg, work / "cache_read")
    results["cache_write"] = write
    results["cache_read"] = read
    results["cache_read_speedup"] = read["pipeline_rows_per_s"] / write["pipeline_rows_per_s"]

    out = Path(args.out)
    write_json(out, results)
    print(table(results))
    print(f"\nwrote {out}")


def table(r: dict[str, Any]) -> str:
    s = r["stream"]
    rows = [
        ("LM forward alone (to the deepest site)", f"{r['lm_alone']['rows_per_s']:,.0f} rows/s"),
        ("training run, streaming (background refill)", f"{s['pipeline_rows_per_s']:,.0f} rows/s"),
        ("  overhead over the LM alone", f"{100 * r['pipeline_overhead']:.1f}%"),
        (
            "training run, refill in the loop",
            f"{r['stream_no_prefetch']['pipeline_rows_per_s']:,.0f} rows/s",
        ),
        ("  overhead over the LM alone", f"{100 * r['pipeline_overhead_no_prefetch']:.1f}%"),
    ]
    if "sweep" in r:
        w = r["sweep"]
        rows += [
            ("sweep of 4, one stream (wall)", f"{w['one_stream_wall_seconds']:.1f} s"),
            ("sweep of 4, separate runs (wall)", f"{w['separate_wall_seconds']:.1f} s"),
            ("  one stream saves", f"{w['speedup_wall']:.2f}×"),
        ]
    rows += [
        (
            "training run computing + writing the cache",
            f"{r['cache_write']['pipeline_rows_per_s']:,.0f} rows/s",
        ),
        ("training run reading the cache", f"{r['cache_read']['pipeline_rows_per_s']:,.0f} rows/s"),
        ("  cache speed-up", f"{r['cache_read_speedup']:.2f}×"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {a:<{width}} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
