"""Benchmark the sparse TopK kernels (issue 5): is a TopK step little more than one dense GEMM?

For every (n_latents, k, dtype) it measures, with N rows of width d:

- decoder forward + backward: the sparse ops (saetrain.kernels.ops: Triton on CUDA) against
  (a) dense torch (codes scattered to [N, n], then a matmul) and (b) F.embedding_bag;
- a whole TopK training step forward + backward (encoder GEMM, top-k, decoder, AuxK, loss)
  through TopKSAE.training_forward, against one dense encoder GEMM of the same shape, against
  the GEMM + torch.topk (what a fused encoder/top-k kernel would replace), and against the same
  step with plain autograd through the dense pre-activations (the pre-issue path), with the peak
  memory of both steps;
- the encoder fused with top-k (`ops.fused_topk_encode`: Triton on CUDA, the [N, n]
  pre-activations never written) against the unfused inference encoder it replaces,
  torch.addmm(b_enc, x − b_dec, W_enc).topk(k), with the peak memory of both;
- the optimizer step separately: torch.optim.Adam(fused=True where the device has it), as
  achieved bytes/s over the bytes it must move (read p, g, m, v; write p, m, v);
- with --profile, where the sparse step's time goes (torch.profiler: the kernels with the most
  self time, and the fraction of the step the device was busy), so that one GPU run can explain
  a missed target.

Times are medians over --repeats after --warmup runs (CUDA: synchronised). Prints a table and
writes JSON. `python scripts/bench_kernels.py --out docs/bench_kernels.json` on a CUDA machine;
`--small` runs small shapes (on CPU: the torch reference path) as a smoke test.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from saetrain.kernels import ops, reference

from saetrain.bench.report import write_json
from saetrain.dictionaries import TopKSAE

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak CUDA memory fn() allocates above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def profile_step(
    fn: Callable[[], Any], device: torch.device, steps: int = 3, top: int = 12
) -> dict[str, Any]:
    """Where a step's time goes, for the run that has to explain a missed target: the ops (CPU) or
    kernels (CUDA) with the most self time over `steps` steps under torch.profiler, and on CUDA
    how busy the device was — the union of its kernels' intervals over their span; the rest is
    the device waiting for the host (launches, host syncs)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)

    def self_us(event: Any) -> float:
        if not cuda:
            return float(event.self_cpu_time_total)
        value = getattr(event, "self_device_time_total", None)
        return float(value if value is not None else event.self_cuda_time_total)

    def counted(event: Any) -> bool:
        # On CUDA the kernels alone: torch also credits each kernel's time to the op that
        # launched it, and user annotations span others.
        if not cuda:
            return True
        return event.device_type == DeviceType.CUDA and not getattr(
            event, "is_user_annotation", False
        )

    averages = [e for e in prof.key_averages() if counted(e) and self_us(e) > 0]
    total = sum(self_us(e) for e in averages)
    ranked = sorted(averages, key=self_us, reverse=True)[:top]
    out: dict[str, Any] = {
        "steps": steps,
        "timer": "CUDA kernels" if cuda else "CPU ops",
        "self_ms_per_step": total / 1e3 / steps,
        "top": [
            {
                "name": e.key[:90],
                "calls_per_step": e.count / steps,
                "self_ms_per_step": self_us(e) / 1e3 / steps,
                "share": self_us(e) / total if total else 0.0,
            }
            for e in ranked
        ],
        "device_busy": None,
    }
    if cuda:
        spans = sorted(
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == DeviceType.CUDA
        )
        busy, end_of_union = 0.0, float("-inf")
        for start, end in spans:
            if end > end_of_union:
                busy += end - max(start, end_of_union)
                end_of_union = end
        if spans:
            out["device_busy"] = busy / max(end_of_union - spans[0][0], 1e-9)
    return out


def _codes(N: int, n: int, k: int, device: torch.device, dtype: torch.dtype, g: torch.Generator):
    indices = torch.randint(0, n, (N, k), generator=g).to(device)
    values = torch.rand(N, k, generator=g).to(device, dtype)
    return indices, values


def bench_decoder(N, d, n, k, dtype, device, args) -> dict[str, Any]:
    """Decoder fwd+bwd: sparse ops vs dense scatter+matmul vs embedding_bag."""
    g = torch.Generator().manual_seed(0)
    indices, values = _codes(N, n, k, device, dtype, g)
    W = torch.randn(n, d, generator=g).to(device, dtype)
    upstream = torch.randn(N, d, generator=g).to(device, dtype)

    def run(decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        v = values.clone().requires_grad_(True)
        w = W.clone().requires_grad_(True)

        def step() -> None:
            v.grad = w.grad = None
            decode(v, w).backward(upstream)

        return step

    def dense(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v.new_zeros(N, n).scatter(1, indices, v) @ w

    def bag(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, w, per_sample_weights=v, mode="sum")

    def sparse(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ops.sparse_decode(indices, v, w)

    with torch.no_grad():  # agreement of the sparse path with embedding_bag, relative
        want = bag(values.float(), W.float())
        err = (sparse(values, W).float() - want).norm() / want.norm().clamp_min(1e-30)
    out = {
        "decode_sparse_s": timed(run(sparse), device, args.warmup, args.repeats),
        "decode_embedding_bag_s": timed(run(bag), device, args.warmup, args.repeats),
        "decode_rel_err": float(err),
    }
    if not args.skip_dense_decoder:
        out["decode_dense_s"] = timed(run(dense), device, args.warmup, args.repeats)
    return out


def _dense_autograd_step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The pre-issue TopK step: autograd through the dense pre-activations ([N, n] gradient)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    x_hat = reference.sparse_decode(indices, values.relu(), sae.W_dec) + sae.b_dec
    variance = (x - x.mean(0)).pow(2).sum()
    loss = (x - x_hat).pow(2).sum() / variance
    n_dead = int(dead.sum())
    k_aux = min(sae.aux_k, n_dead)
    aux_v, aux_i = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
    e_hat = reference.sparse_decode(aux_i, aux_v.relu(), sae.W_dec)
    aux = min(n_dead / sae.aux_k, 1.0) * (e_hat - (x - x_hat).detach()).pow(2).sum() / variance
    return loss + sae.aux_k_coefficient * aux


def bench_step(N, d, n, k, dtype, device, args) -> dict[str, Any]:
    """Whole TopK step fwd+bwd vs one encoder GEMM, GEMM + topk, and the dense autograd step."""
    g = torch.Generator().manual_seed(1)
    sae = TopKSAE(d, n, k=k, dtype=dtype, device=device, generator=g)
    x = torch.randn(N, d, generator=g).to(device, dtype)
    dead = torch.rand(n, generator=g) < args.dead_fraction
    dead = dead.to(device)
    W_enc = sae.W_enc.detach()

    def gemm() -> None:
        x @ W_enc

    def gemm_topk() -> None:
        (x @ W_enc).topk(k, dim=-1, sorted=False)

    def sparse_step() -> None:
        sae.zero_grad(set_to_none=True)
        sae.training_forward(x, x, dead).loss.backward()

    def dense_step() -> None:
        sae.zero_grad(set_to_none=True)
        _dense_autograd_step(sae, x, dead).backward()

    out: dict[str, Any] = {
        "encoder_gemm_s": timed(gemm, device, args.warmup, args.repeats),
        "gemm_topk_s": timed(gemm_topk, device, args.warmup, args.repeats),
        "step_sparse_s": timed(sparse_step, device, args.warmup, args.repeats),
        "step_dense_s": timed(dense_step, device, args.warmup, args.repeats),
        "peak_sparse_bytes": peak_bytes(sparse_step, device),
        "peak_dense_bytes": peak_bytes(dense_step, device),
    }
    out["step_over_gemm"] = out["step_sparse_s"] / out["encoder_gemm_s"]
    if args.profile:
        out["step_profile"] = profile_step(sparse_step, device)

    sparse_step()  # gradients in place for the optimizer
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=fused)
    moved = sum(7 * p.numel() * p.element_size() for p in sae.parameters())
    out["adam_fused"] = fused
    out["adam_s"] = timed(optimizer.step, device, args.warmup, args.repeats)
    out["adam_bytes"] = moved
    out["adam_bytes_per_s"] = moved / out["adam_s"]
    return out


def bench_fused_encode(N, d, n, k, dtype, device, args) -> dict[str, Any]:
    """Inference encode: fused encoder/top-k vs GEMM + torch.topk through the dense pre."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, d, generator=g).to(device, dtype)
    W_enc = (torch.randn(d, n, generator=g) / d**0.5).to(device, dtype)
    b_enc = (0.1 * torch.randn(n, generator=g)).to(device, dtype)
    b_dec = (0.1 * torch.randn(d, generator=g)).to(device, dtype)

    def fused() -> None:
        ops.fused_topk_encode(x, W_enc, b_enc, k, b_dec)

    def unfused() -> None:
        torch.addmm(b_enc, x - b_dec, W_enc).topk(k, dim=-1, sorted=False)

    with torch.no_grad():  # the k largest values against fp32 GEMM + topk on the same inputs
        got = ops.fused_topk_encode(x, W_enc, b_enc, k, b_dec)[0].float()
        want = torch.addmm(b_enc.float(), (x - b_dec).float(), W_enc.float()).topk(k).values
        err = (got - want).norm() / want.norm().clamp_min(1e-30)
    out: dict[str, Any] = {
        "fused_encode_s": timed(fused, device, args.warmup, args.repeats),
        "unfused_encode_s": timed(unfused, device, args.warmup, args.repeats),
        "fused_rel_err": float(err),
        "peak_fused_bytes": peak_bytes(fused, device),
        "peak_unfused_bytes": peak_bytes(unfused, device),
    }
    out["fused_over_unfused"] = out["fused_encode_s"] / out["unfused_encode_s"]
    return out


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:9.3f}"


def _fmt_gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:7.2f}"


COLUMNS = [
    ("n", "n", lambda v: str(v)),
    ("k", "k", lambda v: str(v)),
    ("dtype", "dtype", lambda v: v),
    ("dec sparse ms", "decode_sparse_s", _fmt_s),
    ("dec dense ms", "decode_dense_s", _fmt_s),
    ("dec bag ms", "decode_embedding_bag_s", _fmt_s),
    ("dec rel err", "decode_rel_err", lambda v: f"{v:.1e}"),
    ("GEMM ms", "encoder_gemm_s", _fmt_s),
    ("GEMM+topk ms", "gemm_topk_s", _fmt_s),
    ("step ms", "step_sparse_s", _fmt_s),
    ("step/GEMM", "step_over_gemm", lambda v: f"{v:.2f}"),
    ("dense step ms", "step_dense_s", _fmt_s),
    ("peak GiB", "peak_sparse_bytes", _fmt_gb),
    ("dense peak GiB", "peak_dense_bytes", _fmt_gb),
    ("Adam ms", "adam_s", _fmt_s),
    ("Adam GB/s", "adam_bytes_per_s", lambda v: f"{v / 1e9:.1f}"),
]

# The fused encoder/top-k, a second table (the first is already wide).
FUSED_COLUMNS = [
    *COLUMNS[:3],
    ("fused enc ms", "fused_encode_s", _fmt_s),
    ("GEMM+topk enc ms", "unfused_encode_s", _fmt_s),
    ("fused/unfused", "fused_over_unfused", lambda v: f"{v:.2f}"),
    ("fused rel err", "fused_rel_err", lambda v: f"{v:.1e}"),
    ("fused peak GiB", "peak_fused_bytes", _fmt_gb),
    ("unfused peak GiB", "peak_unfused_bytes", _fmt_gb),
]


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Any]]) -> None:
    cells = [[fmt(r[key]) if key in r else "-" for _, key, fmt in columns] for r in rows]
    widths = [
        max(len(h), *(len(c[i].strip()) for c in cells)) for i, (h, _, _) in enumerate(columns)
    ]
    print(" | ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(c.strip().rjust(w) for c, w in zip(row, widths, strict=True)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--small", action="store_true", help="small shapes (a CPU smoke run)")
    parser.add_argument("--rows", type=int, help="N (default 4096; 256 with --small)")
    parser.add_argument("--d", type=int, help="d_in = d_out (default 2304; 64 with --small)")
    parser.add_argument("--latents", type=int, nargs="+", help="n values (16384 65536)")
    parser.add_argument("--k", type=int, nargs="+", help="k values (32 64 128)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="(bf16 fp32)")
    parser.add_argument("--dead-fraction", type=float, default=0.25, help="dead latents (AuxK)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--skip-dense-decoder", action="store_true", help="leave out the [N, n] dense decoder"
    )
    parser.add_argument(
        "--reference", action="store_true", help="force the torch reference ops (no Triton)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the sparse step (top kernels, device busy fraction) into the JSON",
    )
    args = parser.parse_args(argv)
    small = args.small
    args.rows = args.rows or (256 if small else 4096)
    args.d = args.d or (64 if small else 2304)
    args.latents = args.latents or ([1024, 4096] if small else [16384, 65536])
    args.k = args.k or ([8, 32] if small else [32, 64, 128])
    args.dtypes = args.dtypes or (["fp32", "bf16"] if small else ["bf16", "fp32"])
    if small:
        args.warmup, args.repeats = min(args.warmup, 2), min(args.repeats, 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    ops.FORCE_REFERENCE = args.reference
    triton_used = ops.use_triton(torch.zeros(1, device=device))
    probe = torch.zeros(1, device=device)
    fused_used = all(
        ops.use_fused_topk(probe, torch.empty(0, n, device=device), k)
        for n in args.latents
        for k in args.k
    )
    meta = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "kernels": "triton" if triton_used else "torch reference",
        "fused_encode": "triton" if fused_used else "torch reference (GEMM + topk in row chunks)",
        "N": args.rows,
        "d": args.d,
        "dead_fraction": args.dead_fraction,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "small": args.small,
    }
    print(f"# {meta['device']}, torch {meta['torch']}, sparse ops: {meta['kernels']}, "
          f"N={args.rows}, d={args.d}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for n in args.latents:
        for k in args.k:
            for name in args.dtypes:
                dtype = DTYPES[name]
                row: dict[str, Any] = {"n": n, "k": k, "dtype": name}
                row |= bench_decoder(args.rows, args.d, n, k, dtype, device, args)
                row |= bench_step(args.rows, args.d, n, k, dtype, device, args)
                row |= bench_fused_encode(args.rows, args.d, n, k, dtype, device, args)
                rows.append(row)
                print(f"  done n={n} k={k} {name}", file=sys.stderr)
    print_table(rows, COLUMNS)
    print(f"\n# inference encode, fused encoder/top-k: {meta['fused_encode']}")
    print_table(rows, FUSED_COLUMNS)
    if args.out:
        write_json(args.out, {"meta": meta, "rows": rows}, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
