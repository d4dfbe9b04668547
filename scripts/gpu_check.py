"""One command that checks saetrain on a CUDA machine and measures the issue-10 targets.

    bash scripts/gpu_check.sh                  # on the GPU machine: writes into $OUT (or --out)
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gpu_check   # toy sizes on CPU (CI runs it)

Parts, in this order, each in its own process with its own time limit, so that one failure (an
exception, a CUDA fault, a hang) does not stop the rest; the whole run stays under --budget-s:

  env            GPU name, memory, driver; torch / triton / transformers / ... versions
  kernel_tests   tests/kernels/test_kernels.py, test_kernels_fused.py, compiled (on CUDA)
  kernel_sizes   the kernels at N 4096, d 2304, n 65536, k 32 / 128 in fp32 / fp16 / bf16 against
                 float64, repeated and all-equal indices; a TopK step Triton vs reference
  bench_kernels  scripts/bench_kernels.py at the issue-5 shapes (trimmed) + copy bandwidth
  pipeline       a random ~1.1B Llama in bf16: LM forward alone to the site vs a streaming TopK
                 run vs 4 dictionaries on one stream (rows/s, peak memory)
  e2e            python -m saetrain on the tiny local Llama on cuda, writing the activation cache,
                 then again reading it through the prefetch thread (exit codes, metrics)

Writes results.json, results.md and gpu_check.log into the output folder and prints a summary
with PASS/FAIL per target. `--cpu-smoke` runs every part at toy sizes on CPU (the torch reference
where Triton cannot run; the compiled-kernel tests are skipped): the numbers mean nothing, the
point is that the script runs. Exit code 0 when every part passed or was skipped, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from saetrain.bench.report import md_table

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["env", "kernel_tests", "kernel_sizes", "bench_kernels", "pipeline", "e2e"]
# Seconds per part on an H200 (a part's import of torch included), summing to the default
# --budget-s; later parts' limits also shrink when earlier ones ran long. kernel_tests compiles
# about 27 kernel specialisations (some 2-5 s each for the fused top-k), e2e runs saetrain twice.
BUDGET_S = {
    "env": 15,
    "kernel_tests": 100,
    "kernel_sizes": 65,
    "bench_kernels": 75,
    "pipeline": 100,
    "e2e": 85,
}
SMOKE_BUDGET_S = 180  # per part on a shared 2-core CPU
RESERVE_S = 15  # kept for each part still to come
INNER_MARGIN_S = 15  # a part's own subprocess (pytest, python -m saetrain) ends this much earlier
FILES = ("results.json", "results.md", "gpu_check.log")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="output folder (default: $OUT, else ./gpu_check)")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (CI)")
    parser.add_argument("--parts", help=f"comma-separated subset of: {','.join(ORDER)}")
    parser.add_argument(
        "--budget-s", type=float, default=440.0, help="wall-clock limit for all parts (440)"
    )
    # Internal: one part in this process (the parent runs each part so).
    parser.add_argument("--part", choices=ORDER, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ.get("OUT") or "gpu_check")
    parts = args.parts.split(",") if args.parts else ORDER
    unknown = [p for p in parts if p not in ORDER]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {ORDER}")
    args.parts = [p for p in ORDER if p in parts]
    return args


# -- one part, in a child process -----------------------------------------------------------------


def run_part(args: argparse.Namespace) -> int:
    """Run `args.part` here and write its result; an exception becomes status `error`."""
    sys.path.insert(0, str(ROOT / "scripts"))
    start = time.perf_counter()
    try:
        _injected_fault(args.part)
        import gpu_check_parts as parts

        fn = parts.PARTS[args.part]
        smoke = args.cpu_smoke
        inner = max(args.timeout - INNER_MARGIN_S, 5.0)
        if args.part in ("kernel_tests",):
            result = fn(smoke, inner)
        elif args.part == "e2e":
            result = fn(smoke, inner, args.workdir)
        elif args.part == "bench_kernels":
            result = fn(smoke, args.workdir)
        else:
            result = fn(smoke)
    except BaseException as exc:  # noqa: BLE001  (reported as this part's result)
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    result["wall_s"] = time.perf_counter() - start
    args.result.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def _injected_fault(part: str) -> None:
    """SAETRAIN_GPU_CHECK_FAULT=part:raise,part:hang makes parts fail on purpose, so that a test
    can show that the others still run (tests/scripts/test_gpu_check.py)."""
    for item in os.environ.get("SAETRAIN_GPU_CHECK_FAULT", "").split(","):
        name, _, kind = item.partition(":")
        if name == part and kind == "raise":
            raise RuntimeError(f"fault injected into {part}")
        if name == part and kind == "hang":
            time.sleep(3600)


def _spawn(name: str, args: argparse.Namespace, timeout: float, log, workdir: Path) -> dict:
    """The part in a child process with a hard time limit (its whole process group is killed)."""
    result_file = workdir / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name]
    cmd += ["--result", str(result_file), "--workdir", str(workdir), "--timeout", str(timeout)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    log.write(f"\n===== {name} (limit {timeout:.0f} s) =====\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started
        proc.wait()
        return {
            "status": "timeout",
            "reason": f"ran past its {timeout:.0f} s limit",
            "wall_s": timeout,
        }
    wall = time.perf_counter() - start
    if not result_file.exists():
        reason = f"the part's process died (exit code {proc.returncode}) before writing a result"
        return {"status": "error", "reason": reason, "wall_s": wall}
    result = json.loads(result_file.read_text())
    result["process_wall_s"] = wall
    return result


# -- targets, tables, summary ------------------------------------------------------------------


def _rows(parts: dict[str, dict], dtype: str = "bf16") -> list[dict]:
    bench = parts.get("bench_kernels", {})
    return [r for r in bench.get("rows", []) if r.get("dtype") == dtype]


def _where(row: dict) -> str:
    return f"n={row['n']} k={row['k']}"


def targets(parts: dict[str, dict]) -> list[dict[str, str]]:
    """Each issue-10 target with what was measured and PASS / FAIL / not measured."""
    out: list[dict[str, str]] = []

    def add(target: str, limit: str, measured: str | None, ok: bool | None) -> None:
        status = "not measured" if ok is None else ("PASS" if ok else "FAIL")
        out.append(
            {"target": target, "limit": limit, "measured": measured or "-", "status": status}
        )

    rows = _rows(parts)
    if rows:
        worst = max(rows, key=lambda r: r["step_over_gemm"])
        add(
            "TopK training step vs one dense encoder GEMM (bf16)",
            "≤ 1.5×",
            f"worst {worst['step_over_gemm']:.2f}× ({_where(worst)})",
            worst["step_over_gemm"] <= 1.5,
        )
        dense = [r for r in rows if "decode_dense_s" in r]
        speedup = min((r["decode_dense_s"] / r["decode_sparse_s"] for r in dense), default=None)
        vs_bag = max(r["decode_sparse_s"] / r["decode_embedding_bag_s"] for r in rows)
        add(
            "sparse decoder fwd+bwd vs dense, vs F.embedding_bag (bf16)",
            "≥ 5× faster than dense; faster than embedding_bag",
            f"dense/sparse ≥ {speedup:.1f}×; sparse/bag ≤ {vs_bag:.2f}"
            if speedup is not None
            else f"sparse/bag ≤ {vs_bag:.2f}",
            speedup is not None and speedup >= 5 and vs_bag < 1,
        )
        ratio = max(r["fused_over_unfused"] for r in rows)
        peaks = [(r["peak_fused_bytes"], r["peak_unfused_bytes"]) for r in rows]
        measured_peaks = all(a is not None and b is not None for a, b in peaks)
        less = measured_peaks and all(a < b for a, b in peaks)
        peak_text = (
            f"; peak fused/unfused ≤ {max(a / b for a, b in peaks):.2f}"
            if measured_peaks
            else "; peak memory not measured (no CUDA)"
        )
        add(
            "fused encoder+top-k vs GEMM + torch.topk (bf16)",
            "faster, with less peak memory",
            f"fused/unfused time ≤ {ratio:.2f}{peak_text}",
            ratio < 1 and less,
        )
        copy = parts["bench_kernels"].get("copy_bytes_per_s")
        largest = max(r["n"] for r in rows)
        adam = [r for r in rows if r["n"] == largest]
        share = min(r["adam_bytes_per_s"] for r in adam) / copy if copy else None
        add(
            "fused Adam vs copy bandwidth (bf16, largest n)",
            "≥ 70%",
            f"{100 * share:.0f}% of {copy / 1e9:.0f} GB/s" if share is not None else None,
            None if share is None else share >= 0.7 and all(r["adam_fused"] for r in adam),
        )
    else:
        for target, limit in (
            ("TopK training step vs one dense encoder GEMM (bf16)", "≤ 1.5×"),
            ("sparse decoder fwd+bwd vs dense, vs F.embedding_bag (bf16)", "≥ 5×; < bag"),
            ("fused encoder+top-k vs GEMM + torch.topk (bf16)", "faster, less memory"),
            ("fused Adam vs copy bandwidth (bf16, largest n)", "≥ 70%"),
        ):
            add(target, limit, None, None)
    pipe = parts.get("pipeline", {})
    if "stream_overhead" in pipe:
        add(
            "streaming training vs LM forward alone",
            "≤ 10% slower",
            f"{100 * pipe['stream_overhead']:+.1f}% after the first fill "
            f"({pipe['stream']['steady_rows_per_s']:,.0f} vs "
            f"{pipe['lm_alone']['rows_per_s']:,.0f} rows/s; whole run "
            f"{100 * pipe['stream_overhead_whole_run']:+.1f}%)",
            pipe["stream_overhead"] <= 0.10,
        )
        add(
            "sweep of 4 in one stream vs one run",
            "≤ 1.3×",
            f"{pipe['sweep_over_one']:.2f}×",
            pipe["sweep_over_one"] <= 1.3,
        )
    else:
        add("streaming training vs LM forward alone", "≤ 10% slower", None, None)
        add("sweep of 4 in one stream vs one run", "≤ 1.3×", None, None)
    sizes = parts.get("kernel_sizes", {})
    if "bf16_all_pass" in sizes:
        add(
            "bf16 kernels agree with the float64 reference within bf16 rounding",
            "error ≤ bound (2u·|ref| + fp32 accumulation)",
            f"worst error/bound {sizes['worst_ratio']['bf16']:.2f} ({sizes['kernels']})",
            sizes["bf16_all_pass"],
        )
    else:
        add("bf16 kernels agree with the float64 reference", "within bf16 rounding", None, None)
    return out


def _broken(what: str, exc: Exception) -> dict[str, str]:
    traceback.print_exc()
    error = f"error computing {what}: {type(exc).__name__}: {exc}"
    return {"target": what, "limit": "-", "measured": error, "status": "not measured"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.3f}"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# bench_kernels' columns in results.md: (header, JSON key, format).
BENCH_COLUMNS = [
    ("n", "n", str),
    ("k", "k", str),
    ("dtype", "dtype", str),
    ("dec sparse ms", "decode_sparse_s", _ms),
    ("dec dense ms", "decode_dense_s", _ms),
    ("dec bag ms", "decode_embedding_bag_s", _ms),
    ("GEMM ms", "encoder_gemm_s", _ms),
    ("step ms", "step_sparse_s", _ms),
    ("step/GEMM", "step_over_gemm", _ratio),
    ("peak GiB", "peak_sparse_bytes", _gib),
    ("dense peak GiB", "peak_dense_bytes", _gib),
    ("fused enc ms", "fused_encode_s", _ms),
    ("GEMM+topk enc ms", "unfused_encode_s", _ms),
    ("fused/unfused", "fused_over_unfused", _ratio),
    ("fused peak GiB", "peak_fused_bytes", _gib),
    ("unfused peak GiB", "peak_unfused_bytes", _gib),
    ("Adam GB/s", "adam_bytes_per_s", lambda v: "-" if v is None else f"{v / 1e9:.0f}"),
]


def markdown(report: dict[str, Any]) -> str:
    """results.md: parts, targets, then the main numbers of each part."""
    meta, parts = report["meta"], report["parts"]
    lines = [f"# GPU check, {meta['date']}: {meta['device']}", ""]
    if meta["cpu_smoke"]:
        lines += ["**CPU smoke run at toy sizes: the numbers are not measurements.**", ""]
    lines += [f"Command: `{meta['command']}`; {meta['wall_s']:.0f} s in all.", "", "## Parts", ""]
    lines += md_table(
        ["part", "status", "wall s", "note"],
        [
            [name, p["status"], f"{p.get('wall_s', 0):.1f}", p.get("reason", "")]
            for name, p in parts.items()
        ],
    )
    lines += ["", "## Targets", ""]
    lines += md_table(
        ["target", "limit", "measured", "status"],
        [[t["target"], t["limit"], t["measured"], t["status"]] for t in report["targets"]],
    )
    env = parts.get("env", {})
    if "versions" in env:
        v = env["versions"]
        lines += ["", "## Environment", ""]
        lines += [f"- GPU: {env.get('gpu')}; nvidia-smi: {env.get('nvidia_smi')}"]
        lines += [f"- versions: {', '.join(f'{k} {val}' for k, val in v.items())}"]
    tests = parts.get("kernel_tests", {})
    if "counts" in tests:
        lines += ["", f"## Kernel tests, compiled: {tests['counts']}", ""]
        lines += [f"- {f}" for f in tests.get("failed", [])]
    sizes = parts.get("kernel_sizes", {})
    if "checks" in sizes:
        lines += ["", f"## Kernels against float64 ({sizes['kernels']}, {sizes['sizes']})", ""]
        big = [c for c in sizes["checks"] if c.get("size") != "tiny"]
        lines += md_table(
            ["op", "kind", "dtype", "k", "error/bound", "rel err", "pass"],
            [
                [
                    c["op"],
                    c["kind"],
                    c["dtype"],
                    c["k"],
                    f"{c['ratio']:.3f}",
                    f"{c['rel_err']:.1e}",
                    c["pass"],
                ]
                for c in big
            ],
        )
        tiny = [c for c in sizes["checks"] if c.get("size") == "tiny"]
        lines += [
            "",
            f"Tests' tiny shapes in fp32/fp16/bf16: {sum(c['pass'] for c in tiny)} of "
            f"{len(tiny)} pass.",
        ]
        for step in sizes.get("training_steps", []):
            worst = max(step["grad_rel_err"].values())
            lines += [
                f"- TopK step {step['dtype']} k={step['k']}: Triton vs reference loss "
                f"{step['loss']:.6g} / {step['reference_loss']:.6g}, worst gradient rel err "
                f"{worst:.1e} (limit {step['limit']:.0e}): {step['pass']}"
            ]
    bench = parts.get("bench_kernels", {})
    if "rows" in bench:
        lines += ["", f"## bench_kernels ({bench['meta']['kernels']}; `{bench['command']}`)", ""]
        lines += [f"Copy bandwidth: {bench['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write).", ""]
        lines += md_table(
            [header for header, _, _ in BENCH_COLUMNS],
            [[fmt(r.get(key)) for _, key, fmt in BENCH_COLUMNS] for r in bench["rows"]],
        )
        lines += _profile_section(bench["rows"])
    pipe = parts.get("pipeline", {})
    if "lm_alone" in pipe:
        m = pipe["model"]
        lines += [
            "",
            f"## Pipeline: random Llama, {m['params'] / 1e9:.2f}B parameters "
            f"(d_model {m['d_model']}, {m['layers']} layers), bf16, site {pipe['site']}",
            "",
        ]
        lines += [
            f"Context {pipe['context']}, {pipe['lm_batch_contexts']} contexts per LM batch, "
            f"buffer {pipe['buffer_tokens']} rows, batches of {pipe['batch_tokens']}, "
            f"{pipe['n_latents']} latents, {pipe['training_tokens']} training tokens.",
            "",
        ]
        runs = [
            ("LM forward alone", pipe["lm_alone"]),
            ("streaming TopK k=32", pipe["stream"]),
            ("streaming, refill in the loop", pipe["stream_refill_in_loop"]),
            ("sweep of 4 (k 16..128), one stream", pipe["sweep"]),
        ]
        lines += md_table(
            ["measure", "rows/s", "seconds", "rows/s after the first fill", "peak GiB"],
            [
                [
                    name,
                    f"{r['rows_per_s']:,.0f}",
                    f"{r['seconds']:.2f}",
                    f"{r['steady_rows_per_s']:,.0f}" if "steady_rows_per_s" in r else "-",
                    f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-",
                ]
                for name, r in runs
            ],
        )
        lines += ["", "Peak GiB: CUDA memory allocated above the model's weights."]
    e2e = parts.get("e2e", {})
    if "returncode" in e2e:
        lines += ["", f"## python -m saetrain end to end: exit code {e2e['returncode']}", ""]
        lines += [
            f"- device {e2e.get('device')}, {e2e.get('seconds', 0):.1f} s; exported: "
            f"{', '.join(e2e.get('exported', []))}"
        ]
        lines += [
            f"- kernel fallbacks: {e2e.get('kernel_fallbacks')}; failures: "
            f"{e2e.get('kernel_failures')}"
        ]
        metrics = e2e.get("metrics") or {}
        keys = ("fvu", "l0", "never_fired_fraction", "dead_fraction", "ce_clean", "ce_spliced",
                "ce_recovered")  # fmt: skip
        lines += ["- metrics: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)]
        again = e2e.get("reads_cache") or {}
        lines += [
            f"- the same run reading the activation cache written by the first: exit code "
            f"{again.get('returncode')}, {again.get('seconds', 0):.1f} s, cached tokens read "
            f"{(again.get('stream') or {}).get('cached_tokens')}"
            + (f"; {again['reason']}" if again.get("reason") else "")
        ]
    return "\n".join(lines) + "\n"


def _profile_section(rows: list[dict[str, Any]]) -> list[str]:
    """The profile of the step furthest from its target (step/GEMM), when bench_kernels made one."""
    profiled = [r for r in rows if r.get("step_profile")]
    if not profiled:
        return []
    worst = max(profiled, key=lambda r: r["step_over_gemm"])
    prof = worst["step_profile"]
    busy = prof.get("device_busy")
    lines = [
        "",
        f"### Where the step's time goes ({_where(worst)}, step/GEMM "
        f"{worst['step_over_gemm']:.2f}×; {prof['timer']}, {prof['steps']} steps)",
        "",
        f"Self time {prof['self_ms_per_step']:.3f} ms per step"
        + (f"; device busy {busy:.0%} of the step's span." if busy is not None else "."),
        "",
    ]
    lines += md_table(
        ["kernel / op", "calls per step", "ms per step", "share"],
        [
            [
                f"`{t['name']}`",
                f"{t['calls_per_step']:g}",
                f"{t['self_ms_per_step']:.3f}",
                f"{t['share']:.0%}",
            ]
            for t in prof["top"]
        ],  # fmt: skip
    )
    return lines


def summary(report: dict[str, Any]) -> str:
    meta = report["meta"]
    head = "GPU check" + (" (CPU SMOKE: toy sizes, not measurements)" if meta["cpu_smoke"] else "")
    lines = [f"== {head}: {meta['device']}, {meta['wall_s']:.0f} s =="]
    for name, p in report["parts"].items():
        note = f"  {p['reason']}" if p.get("reason") else ""
        lines.append(f"  part {name:<14} {p['status']:<8} {p.get('wall_s', 0):6.1f} s{note}")
    for t in report["targets"]:
        lines.append(f"  {t['status']:<12} {t['target']}: {t['measured']} (target {t['limit']})")
    lines.append(f"written: {', '.join(str(Path(meta['out']) / f) for f in FILES)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        # One thread per process: on a busy 2-core machine, torch's two OpenMP threads made each
        # tiny LM forward in the main thread 20-40x slower (spinning at barriers).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    deadline = started + args.budget_s
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"saetrain-gpu-check-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    env_part = {}
    parts: dict[str, dict] = {}
    with open(out / "gpu_check.log", "w") as log:
        for i, name in enumerate(args.parts):
            later = len(args.parts) - i - 1
            budget = SMOKE_BUDGET_S if args.cpu_smoke else BUDGET_S[name]
            limit = min(budget, deadline - time.perf_counter() - later * RESERVE_S)
            if limit < 10:
                parts[name] = {"status": "skipped", "reason": "out of time", "wall_s": 0.0}
            elif name == "kernel_tests" and args.cpu_smoke:  # no process needed to say so
                reason = "skipped: no CUDA (CI runs these tests interpreted on CPU)"
                parts[name] = {"status": "skipped", "reason": reason, "wall_s": 0.0}
            else:
                parts[name] = _spawn(name, args, limit, log, workdir)
            status = parts[name]
            print(
                f"[gpu_check] {name}: {status['status']} in {status.get('wall_s', 0):.1f} s"
                + (f" ({status['reason']})" if status.get("reason") else ""),
                flush=True,
            )
            if name == "env":
                env_part = parts[name]
    gpu = env_part.get("gpu", {}).get("name") if isinstance(env_part.get("gpu"), dict) else None
    report = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": gpu or ("cpu (smoke)" if args.cpu_smoke else "no CUDA device"),
            "cpu_smoke": args.cpu_smoke,
            "command": " ".join(["python scripts/gpu_check.py", *(argv or sys.argv[1:])]),
            "out": str(out),
            "budget_s": args.budget_s,
            "wall_s": time.perf_counter() - started,
        },
        "parts": parts,
    }
    try:
        report["targets"] = targets(parts)
    except Exception as exc:  # noqa: BLE001  (a surprise in one part's data must not lose the rest)
        report["targets"] = [_broken("targets", exc)]
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    try:
        text = markdown(report)
    except Exception as exc:  # noqa: BLE001
        text = f"# GPU check\n\nresults.md could not be written ({exc!r}); see results.json.\n"
    (out / "results.md").write_text(text)
    print(summary(report), flush=True)
    bad = [n for n, p in parts.items() if p["status"] not in ("pass", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
