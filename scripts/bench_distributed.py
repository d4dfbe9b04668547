"""Benchmark saetrain under torchrun: 1 rank against N, for one dictionary (data parallel), for
a list of dictionaries (dictionary parallel), and for one dictionary whose latents are split over
the ranks (distributed.shard_latents=true).

Builds a small randomly initialised Llama from a config (d_model 256, 4 layers by default) with a
word-level tokenizer whose vocabulary is the corpus's most frequent words, saves both to a temporary
folder, and trains on a text corpus (the Python standard library's sources unless --data says
otherwise). Each run is a real launch,

    torchrun --standalone --nproc-per-node=N -m saetrain model.name=<folder> ...

and reads back each dictionary's saetrain_run.json: the stream's tokens_per_s (training rows per
second, every rank's share together), pipeline_rows_per_s (LM rows per second from the first
buffer fill to the last step), lm_tokens, and the held-out FVU. The wall time of the whole launch
(start, model load, training, evaluation, export) is measured around it.

    python scripts/bench_distributed.py                       # CPU: 1 vs 2 ranks, gloo
    python scripts/bench_distributed.py --smoke --out /tmp/b.json --doc ''   # toy sizes, < 90 s
    python scripts/bench_distributed.py --device cuda --nproc 1 2 4 8 --tokens 4000000 \\
        --d-model 1024 --layers 8 --n-latents 32768 --batch-tokens 8192 --buffer-tokens 262144 \\
        --out docs/bench_distributed_gpu.json --doc '' model.dtype=bfloat16

On CUDA each rank takes the GPU of its LOCAL_RANK and the code chooses NCCL. Any trailing
arguments are Hydra overrides given to every run. Prints a table, writes JSON (--out) and the
"## Several processes" section of docs/benchmarks.md (--doc; not in --smoke mode unless asked).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from saetrain.bench.launch import LaunchTimeout, run_launch, torchrun_command
from saetrain.bench.report import md_table, write_json

SECTION = "## Several processes"
# How each mode is launched, and its name in the table.
MODES = ("data", "dictionary", "sharded")
MODE_NAMES = {
    "data": "data parallel",
    "dictionary": "dictionary parallel",
    "sharded": "latents sharded",
}
# The pre-tokenizer's split (tokenizers' Whitespace): runs of word characters, or of other
# non-space characters.
WORD = re.compile(r"\w+|[^\w\s]+")

FULL = {
    "d_model": 256,
    "layers": 4,
    "vocab": 8192,
    "context": 128,
    "tokens": 262_144,
    "batch_tokens": 2048,
    "buffer_tokens": 16_384,
    "n_latents": 2048,
    "k": 32,
    "eval_tokens": 8192,
    "lm_batch_contexts": 16,
    "run_timeout": 1800,
}
SMOKE = {
    "d_model": 32,
    "layers": 2,
    "vocab": 512,
    "context": 32,
    "tokens": 2048,
    "batch_tokens": 256,
    "buffer_tokens": 1024,
    "n_latents": 64,
    "k": 4,
    "eval_tokens": 256,
    "lm_batch_contexts": 8,
    "run_timeout": 120,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="toy sizes (a check, not a measurement)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (each rank its LOCAL_RANK's GPU)")
    p.add_argument(
        "--nproc", type=int, nargs="+", default=[1, 2], help="world sizes to compare (1 2)"
    )
    p.add_argument(
        "--dictionaries",
        type=int,
        default=None,
        help="dictionaries of the dictionary-parallel runs, at least the largest --nproc "
        "(default: 4, or the largest --nproc if more)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=list(MODES),
        help="data: one dictionary; dictionary: a `dictionaries` list; sharded: one dictionary "
        "with its latents split over the ranks (distributed.shard_latents=true)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per rank (OMP_NUM_THREADS); default: CPU cores // ranks",
    )
    for name, help_ in [
        ("d_model", "the LM's width"),
        ("layers", "the LM's layers"),
        ("vocab", "word-level vocabulary (the corpus's most frequent words)"),
        ("context", "tokens per context"),
        ("tokens", "training tokens per run (trainer.total_tokens, global)"),
        ("batch_tokens", "trainer.batch_tokens (the global batch)"),
        ("buffer_tokens", "buffer.size_tokens (global: each rank holds its share)"),
        ("n_latents", "latents of each dictionary"),
        ("k", "TopK k"),
        ("eval_tokens", "held-out tokens for FVU (eval.n_tokens)"),
        ("lm_batch_contexts", "contexts per LM forward"),
        ("run_timeout", "seconds before a launch is killed"),
    ]:
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"{help_} (default: {FULL[name]}; --smoke {SMOKE[name]})",
        )
    p.add_argument("--data", default=None, help="text files (glob); default: the Python stdlib")
    p.add_argument("--ce", action="store_true", help="also measure CE / KL spliced (slower)")
    p.add_argument("--out", default=None, help="JSON (default docs/bench_distributed.json)")
    p.add_argument(
        "--doc",
        default=None,
        help="markdown file whose section is replaced ('' for none; default docs/benchmarks.md, "
        "none with --smoke)",
    )
    p.add_argument("--note", default="", help="a sentence added under the table")
    p.add_argument("--workdir", default=None, help="keep the model and runs here (default: temp)")
    p.add_argument(
        "--from-json",
        default=None,
        help="run nothing: print the table of this JSON and write its --doc section",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides given to every run")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = "" if args.smoke else "docs/bench_distributed.json"
    if args.doc is None:
        args.doc = "" if args.smoke else "docs/benchmarks.md"
    if args.dictionaries is None:
        args.dictionaries = max(4, *args.nproc)
    if "dictionary" in args.modes and args.dictionaries < max(args.nproc):
        p.error(f"--dictionaries {args.dictionaries} < the largest --nproc {max(args.nproc)}")
    if min(args.nproc) < 1:
        p.error("--nproc: world sizes are at least 1")
    return args


# -- the model and the data ------------------------------------------------------------------


def corpus_files(data: str | None) -> tuple[str, list[Path]]:
    """The data glob and its files (sorted)."""
    import glob

    pattern = data or os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    files = sorted(Path(f) for f in glob.glob(pattern))
    if not files:
        raise SystemExit(f"--data {pattern!r}: no files match")
    return pattern, files


def build_model(folder: Path, files: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """A randomly initialised Llama and a word-level tokenizer over the corpus's `vocab` most
    frequent words, saved with save_pretrained into `folder`."""
    # transformers, seconds to import: not for --from-json
    from saetrain.bench.models import word_llama

    counts: collections.Counter[str] = collections.Counter()
    for f in files:
        counts.update(WORD.findall(f.read_text(encoding="utf-8", errors="replace")))
    specials = ["<s>", "</s>", "<unk>"]
    words = [w for w, _ in counts.most_common(args.vocab - len(specials)) if w not in specials]
    return word_llama(folder, words, args.d_model, args.layers, args.context)


# -- one launch ------------------------------------------------------------------------------


def dictionary_entries(n: int, layers: int) -> str:
    """`dictionaries` of n TopK SAEs, one per layer in turn (resid_post), named d0 … d{n-1}."""
    entries = [
        # A second round over the layers gets its own init seed (else it would copy the first).
        f"{{name:d{i},site:{{input:resid_post.{i % layers}}}"
        + (f",seed:{i // layers}" if i >= layers else "")
        + "}"
        for i in range(n)
    ]
    return f"dictionaries=[{','.join(entries)}]"


def overrides(args: argparse.Namespace, model: Path, data: str, out: Path, mode: str) -> list[str]:
    site = f"resid_post.{args.layers - 1}"  # one dictionary: the LM runs as deep as for the list
    common = [
        f"model.name={model}",
        "model.gguf_package=null",
        f"model.device={args.device}",
        f"data.data_files=[{data}]",
        f"data.context_size={args.context}",
        f"site.input={site}",
        f"buffer.size_tokens={args.buffer_tokens}",
        f"buffer.lm_batch_contexts={args.lm_batch_contexts}",
        f"dictionary.n_latents={args.n_latents}",
        f"dictionary.k={args.k}",
        f"trainer.total_tokens={args.tokens}",
        f"trainer.batch_tokens={args.batch_tokens}",
        f"eval.n_tokens={args.eval_tokens}",
        f"eval.compute_ce={str(args.ce).lower()}",
        "logger.log_every=1000000",
        "checkpoint.every_tokens=0",
        f"output_dir={out}",
    ]
    if args.smoke:
        common += ["trainer.warmup_steps=2", "trainer.init_batches=2", "eval.ce_contexts=4"]
    if mode == "dictionary":
        common.append(dictionary_entries(args.dictionaries, args.layers))
    if mode == "sharded":
        common.append("distributed.shard_latents=true")
    return common + list(args.overrides)


def launch(
    args: argparse.Namespace, model: Path, data: str, workdir: Path, mode: str, nproc: int
) -> dict[str, Any]:
    """One torchrun launch; its measures."""
    out = workdir / "runs" / f"{mode}-{nproc}"
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // nproc)
    command = [
        *torchrun_command(nproc),
        "-m",
        "saetrain",
        *overrides(args, model, data, out, mode),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }
    print(f"-- {MODE_NAMES[mode]}, {nproc} rank(s), {threads} thread(s) each", flush=True)
    start = time.perf_counter()
    try:
        returncode, output = run_launch(command, env, workdir, args.run_timeout)
    except LaunchTimeout as e:
        raise SystemExit(
            f"{MODE_NAMES[mode]} with {nproc} rank(s) ran past {args.run_timeout} s (killed); "
            f"output:\n{e.output[-4000:]}"
        ) from None
    wall = time.perf_counter() - start
    (workdir / f"{mode}-{nproc}.log").write_text(output)
    if returncode != 0:
        raise SystemExit(
            f"{MODE_NAMES[mode]} with {nproc} rank(s) failed (exit code {returncode}):\n"
            f"{shlex.join(command)}\n{output[-4000:]}"
        )
    names = json.loads((out / "finished.json").read_text())["dictionaries"]
    infos = [json.loads((out / n / "saetrain_run.json").read_text()) for n in names]
    streams = [info["stream"] for info in infos]  # each from the rank that wrote it
    fvu = [float(info["final_metrics"]["fvu"]) for info in infos]
    tokens_per_s = min(s["tokens_per_s"] for s in streams)  # the slowest rank's
    return {
        "mode": mode,
        "nproc": nproc,
        "world_size": streams[0]["world_size"],
        "threads_per_rank": threads,
        "dictionaries": len(names),
        "names": names,
        "wall_s": wall,
        "train_s": max(s["train_seconds"] for s in streams),
        "pipeline_s": max(s["pipeline_seconds"] for s in streams),
        "tokens_seen": infos[0]["tokens_seen"],
        "tokens_per_s": tokens_per_s,
        "dictionary_rows_per_s": tokens_per_s * len(names),
        "pipeline_rows_per_s": min(s["pipeline_rows_per_s"] for s in streams),
        "lm_tokens": streams[0]["lm_tokens"],
        "fvu": fvu,
        "fvu_mean": sum(fvu) / len(fvu),
        "l0": [float(info["final_metrics"].get("l0", math.nan)) for info in infos],
    }


# -- reporting -------------------------------------------------------------------------------

COLUMNS = ["mode", "ranks", "dicts", "wall s", "train s", "train rows/s", "dict-rows/s",
           "vs 1 rank", "LM rows/s", "LM tokens", "held-out FVU"]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["mode"]: r for r in rows if r["nproc"] == 1}
    cells = []
    for r in rows:
        one = base.get(r["mode"])
        speed = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}×" if one else "–"
        fvu = (
            f"{r['fvu'][0]:.4f}"
            if len(r["fvu"]) == 1
            else f"{r['fvu_mean']:.4f} ({min(r['fvu']):.4f}–{max(r['fvu']):.4f})"
        )
        cells.append([
            MODE_NAMES[r["mode"]], r["nproc"], r["dictionaries"], f"{r['wall_s']:.1f}",
            f"{r['train_s']:.{2 if r['train_s'] < 10 else 1}f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['dictionary_rows_per_s']:,.0f}", speed, f"{r['pipeline_rows_per_s']:,.0f}",
            f"{r['lm_tokens']:,}", fvu,
        ])  # fmt: skip
    return "\n".join(md_table(COLUMNS, cells))


def _fill(text: str) -> str:
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def reading(result: dict[str, Any], note: str = "") -> list[str]:
    """What the table says, one bullet per mode and world size, and what the machine allows."""
    m, rows = result["machine"], result["rows"]
    bullets = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        one = next((r for r in rows if r["mode"] == mode and r["nproc"] == 1), None)
        for r in rows:
            if r["mode"] != mode or one is None or r is one:
                continue
            gap = max(abs(a - b) for a, b in zip(r["fvu"], one["fvu"], strict=True))
            bullets.append(
                f"{MODE_NAMES[mode].capitalize()}, {r['nproc']} ranks against 1: the LM ran on "
                f"{r['lm_tokens']:,} tokens against {one['lm_tokens']:,}, the held-out FVU of "
                f"every dictionary is within {gap:.4f} of the one-rank run, and training ran at "
                f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}× the one-rank rows/s "
                f"(wall time {r['wall_s']:.0f} s against {one['wall_s']:.0f} s)."
            )
    last = result["model"]["layers"] - 1  # the single dictionary's site: d{last} in the list
    for n in sorted({r["nproc"] for r in rows}):
        single = next((r for r in rows if r["mode"] == "data" and r["nproc"] == n), None)
        listed = next((r for r in rows if r["mode"] == "dictionary" and r["nproc"] == n), None)
        if single is None or listed is None or f"d{last}" not in listed["names"]:
            continue
        a, b = single["fvu"][0], listed["fvu"][listed["names"].index(f"d{last}")]
        bullets.append(
            f"With {_n(n, 'rank')}, d{last} of the list (same site, seed and rows as the single "
            f"dictionary) ends with held-out FVU {b:.6f} against the single dictionary's "
            f"{a:.6f}" + (": the same dictionary." if abs(a - b) < 1e-6 else ".")
        )
    for n in sorted({r["nproc"] for r in rows}):
        single = next((r for r in rows if r["mode"] == "data" and r["nproc"] == n), None)
        sharded = next((r for r in rows if r["mode"] == "sharded" and r["nproc"] == n), None)
        if single is None or sharded is None:
            continue
        a, b = single["fvu"][0], sharded["fvu"][0]
        bullets.append(
            f"With {_n(n, 'rank')}, the latent-sharded dictionary (the same global batches as "
            f"data parallel) ends with held-out FVU {b:.6f} against the data-parallel one's "
            f"{a:.6f}" + (": the same dictionary." if abs(a - b) < 1e-5 else ".")
        )
    if m["device"] == "cpu":
        threads = sorted({(r["nproc"], r["threads_per_rank"]) for r in rows})
        bullets.append(
            f"What {m['cpu_count']} CPU cores allow: every run has the same cores ("
            + ", ".join(f"{_n(n, 'rank')} × {_n(t, 'thread')}" for n, t in threads)
            + "). Two ranks on two cores take one core each, with nothing left for intra-op "
            "threads"
            + (
                ", where one rank spreads its products over both"
                if max(t for n, t in threads if n == 1) > 1
                else " (here the one-rank run had one thread too, so it left a core to the "
                "machine's other jobs that the two-rank runs competed for)"
            )
            + ": so these CPU numbers "
            "check that the distributed path trains the same dictionaries and what its "
            "collectives and its redundant work (every rank tokenizes the whole stream; in data "
            "parallel every rank takes the whole dictionary step) cost, not a speed-up. The "
            "speed-up (G GPUs: G× the dictionaries in about the time of one) is a multi-GPU "
            "measurement: the `--device cuda` command above."
        )
    load = m.get("load_average_start")
    if load and load[0] >= 0.5:
        bullets.append(
            f"Caveat: other jobs were running on this machine (load average {load[0]:.2f} "
            f"when the runs started, {m['load_average_end'][0]:.2f} when they ended), so the "
            "rates carry their noise; the FVUs do not depend on it."
        )
    if note:
        bullets.append(note)
    return [
        textwrap.fill(
            b,
            100,
            initial_indent="- ",
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        for b in bullets
    ]


def section(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["sizes"]
    model = result["model"]
    stdlib = result["data"] == os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    corpus = "the Python standard library's sources" if stdlib else f"`{result['data']}`"
    what = (
        f"{m['device']}, {m['cpu_count']} CPU cores, torch {m['torch']}, {m['date']}, "
        f"{s['tokens']:,} training tokens per run"
    )
    intro = (
        "Questions: does a run under torchrun with several ranks train to the same held-out "
        "FVU as one rank, and what does it cost or gain? (i) one dictionary, data parallel: "
        "each rank runs the LM on its share of the stream, the ranks' rows are gathered into "
        "the global batch and every rank takes the dictionary's step on it (only the LM is "
        f"split); (ii) a list of {s['dictionaries']} dictionaries (`dictionaries`, one per "
        "layer in turn), dictionary parallel: each rank runs the LM on its share and trains "
        "its share of the dictionaries on every rank's rows (all_to_all of their columns)"
        + (
            "; (iii) one dictionary, latents sharded (`distributed.shard_latents=true`): the "
            "rows are gathered as in (i), and each rank holds and steps 1/N of the latents "
            "(its share of the encoder product; top-k candidates gathered and merged, the "
            "decoder's partial sums all-reduced)."
            if any(r["mode"] == "sharded" for r in result["rows"])
            else "."
        )
    )
    setup = (
        "Each run is `torchrun --standalone --nproc-per-node=N -m saetrain` on a randomly "
        f"initialised Llama (d_model {model['d_model']}, {model['layers']} layers, "
        f"{model['parameters'] / 1e6:.1f} M parameters, a word-level vocabulary of the "
        f"corpus's {model['vocab']} most frequent words), {corpus}, contexts of "
        f"{s['context']}, TopK k={s['k']} with {s['n_latents']} latents (the single dictionary "
        f"on `resid_post.{model['layers'] - 1}`), global batches of {s['batch_tokens']} rows and "
        f"a buffer of {s['buffer_tokens']:,} (each rank holds its share), held-out FVU on "
        f"{s['eval_tokens']:,} tokens. *train rows/s*: the stream's `tokens_per_s` "
        "(saetrain_run.json: training rows per second, all ranks together, LM refills "
        "included; the slowest rank's); *dict-rows/s*: that × dictionaries; *vs 1 rank*: train "
        "rows/s over the one-rank run's; *LM rows/s*: `pipeline_rows_per_s` (LM rows from the "
        "first buffer fill to the last step); *LM tokens*: `lm_tokens`, all ranks together; "
        "*wall s*: the whole launch (start, model load, training, evaluation, export)."
    )
    return "\n".join(
        [
            f"{SECTION} (issue 11)",
            "",
            _fill(intro),
            "",
            f"    {result['command']}",
            "    # on a multi-GPU machine (NCCL):",
            "    python scripts/bench_distributed.py --device cuda --nproc 1 2 4 8 "
            "--tokens 4000000 \\",
            "        --d-model 1024 --layers 8 --n-latents 32768 --batch-tokens 8192 "
            "--buffer-tokens 262144 \\",
            "        --out docs/bench_distributed_gpu.json --doc '' model.dtype=bfloat16",
            "",
            _fill(setup),
            "",
            f"### {what}",
            "",
            table(result["rows"]),
            "",
            "Reading it:",
            "",  # a markdown list needs a blank line before it (else mkdocs renders it as text)
            *reading(result, result.get("note", "")),
            "",
        ]
    )


def write_section(doc: Path, text: str) -> None:
    """Replace the section that starts with SECTION (up to the next `## `), else append it."""
    old = doc.read_text() if doc.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION)), None)
    if start is None:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    doc.write_text(new.rstrip("\n") + "\n")


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(table(result["rows"]))
    if args.out and not args.from_json:
        out = Path(args.out)
        write_json(out, result)
        print(f"\nwrote {out}")
    if args.doc:
        write_section(Path(args.doc), section(result))
        print(f"wrote the '{SECTION}' section of {args.doc}")


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)  # so that the launch and the temp folder go
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["note"] = args.note or result.get("note", "")
        report(result, args)
        return
    import torch

    own_tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        own_tmp = tempfile.TemporaryDirectory(prefix="bench_distributed-")
        workdir = Path(own_tmp.name)
    try:
        data, files = corpus_files(args.data)
        load_start = os.getloadavg()
        started = time.perf_counter()
        model_info = build_model(workdir / "model", files, args)
        print(
            f"model: {model_info['parameters'] / 1e6:.2f} M parameters, vocabulary "
            f"{model_info['vocab']} ({time.perf_counter() - started:.1f} s to build)",
            flush=True,
        )
        rows = [
            launch(args, workdir / "model", data, workdir, mode, n)
            for mode in args.modes
            for n in sorted(set(args.nproc))
        ]
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    result = {
        "command": "python scripts/bench_distributed.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            # Other processes' load when the runs started and ended (1, 5, 15 minutes).
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "smoke": args.smoke,
        "model": model_info,
        "sizes": {
            name: getattr(args, name)
            for name in [*FULL, "dictionaries"]
            if name not in ("run_timeout",)
        },
        "data": data,
        "data_files": len(files),
        "overrides": list(args.overrides),
        "note": args.note,
        "rows": rows,
    }
    result["command"] = result["command"].rstrip()
    report(result, args)


if __name__ == "__main__":
    main()
