"""The parts of scripts/gpu_check.py. Each runs in its own process (so a CUDA fault, a hang or
a leak in one cannot take the others with it) and returns a JSON-able dict with a `status`:
pass | fail | skipped, a `reason` when not pass, and what it measured.

Every part takes `smoke`: toy sizes on CPU (the torch reference where Triton cannot run), so
that the test suite runs this code and it does not rot between GPU sessions.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
KERNEL_TESTS = ROOT / "tests" / "kernels"
for _path in (str(ROOT), str(SCRIPTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from saetrain.bench.report import package_versions  # noqa: E402  (saetrain from this tree)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Unit roundoff of each output dtype: a correctly rounded result is within u·|x| of x.
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
# ... and within half the subnormal spacing below the smallest normal number.
SUBNORMAL_HALF_STEP = {"fp32": 2.0**-150, "fp16": 2.0**-25, "bf16": 2.0**-134}


def _device(smoke: bool) -> torch.device:
    return torch.device("cpu" if smoke else "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


# -- environment -----------------------------------------------------------------------------------


def part_env(smoke: bool) -> dict[str, Any]:
    """GPU name, memory, driver and the package versions the other parts run with."""
    versions = package_versions()
    imports = {}
    for module in ("hydra", "omegaconf", "datasets", "triton", "saetrain"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as exc:  # noqa: BLE001  (recorded, not fatal here)
            imports[module] = f"{type(exc).__name__}: {exc}"
    out: dict[str, Any] = {
        "versions": versions,
        "imports": imports,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
        }
    try:
        query = "--query-gpu=name,memory.total,driver_version"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    missing = [m for m, state in imports.items() if state != "ok"]
    if not smoke and not torch.cuda.is_available():
        return out | {"status": "fail", "reason": "torch sees no CUDA device"}
    if missing:
        return out | {"status": "fail", "reason": f"cannot import {', '.join(missing)}"}
    return out | {"status": "pass"}


# -- the kernel tests, compiled ----------------------------------------------------------------


def part_kernel_tests(smoke: bool, timeout_s: float) -> dict[str, Any]:
    """tests/kernels/test_kernels.py and test_kernels_fused.py on the compiled kernels (on CUDA)."""
    if smoke or not torch.cuda.is_available():
        return {
            "status": "skipped",
            "reason": "skipped: no CUDA (CI runs these tests interpreted on CPU)",
        }
    # The kernel tests proper; test_kernels_compile.py builds for a GPU without one (CI's job),
    # a minute of this part's budget for nothing here.
    files = sorted(
        str(p.relative_to(ROOT))
        for p in KERNEL_TESTS.glob("test_kernels*.py")
        if p.name != "test_kernels_compile.py"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SAETRAIN_KERNELS")}
    env["SAETRAIN_TRITON_TESTS"] = "cuda"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *files]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": "fail", "reason": f"pytest ran past {timeout_s:.0f} s", "tail": output}
    text = proc.stdout + proc.stderr
    counts = {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text)
    }
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    out = {
        "command": " ".join(["SAETRAIN_TRITON_TESTS=cuda", "python", *cmd[1:]]),
        "returncode": proc.returncode,
        "counts": counts,
        "failed": failed,
        "tail": _tail(text),
    }
    if proc.returncode != 0:
        return out | {"status": "fail", "reason": f"pytest exit code {proc.returncode}"}
    return out | {"status": "pass"}


# -- the kernels at real sizes against float64 ---------------------------------------------------


class _Impl:
    """The kernels under test: Triton compiled (CUDA) or the torch reference (CPU smoke), with the
    Triton module's signatures."""

    def __init__(self, smoke: bool):
        from saetrain.kernels import reference

        self.reference = reference
        if smoke:
            self.name = "torch reference"
            self.decode = reference.sparse_decode
            self.gather_dot = reference.gather_dot
            self.segment_reduce = lambda indices, values, rows, n: (
                reference.sparse_transpose_product(indices, values, rows, n)
            )
            self.topk_encode = reference.topk_encode
        else:
            from saetrain.kernels import triton_ops

            if triton_ops.INTERPRETED:
                raise RuntimeError("TRITON_INTERPRET is set: the kernels would be interpreted")
            self.name = "triton (compiled)"
            self.decode = triton_ops.decode
            self.gather_dot = triton_ops.gather_dot
            self.segment_reduce = lambda indices, values, rows, n: triton_ops.segment_reduce(
                reference.sort_plan(indices, n), values, rows, n
            )
            self.topk_encode = triton_ops.topk_encode


def _compare(
    got: torch.Tensor, want: torch.Tensor, absum: torch.Tensor, terms: int, dtype: str
) -> dict[str, Any]:
    """Elementwise |got − want| ≤ 2·u_out·|want| + 2·√terms·u_fp32·Σ|terms| (the output's rounding
    plus a random-walk bound on fp32 accumulation) + 2 × half a subnormal step; `ratio` is the
    worst error over its bound."""
    got = got.double()
    bound = 2 * UNIT_ROUNDOFF[dtype] * want.abs() + 2 * SUBNORMAL_HALF_STEP[dtype]
    bound += 2 * math.sqrt(max(terms, 1)) * UNIT_ROUNDOFF["fp32"] * absum + 1e-300
    err = (got - want).abs()
    ratio = float((err / bound).max()) if err.numel() else 0.0
    finite = bool(torch.isfinite(got).all())
    rel = float((got - want).norm() / want.norm().clamp_min(1e-300)) if err.numel() else 0.0
    return {"ratio": ratio, "rel_err": rel, "pass": finite and ratio <= 1.0}


def _chunks(N: int, per_row: int, budget: int = 1 << 25) -> Iterator[slice]:
    step = max(1, budget // max(1, per_row))
    for s in range(0, N, step):
        yield slice(s, min(N, s + step))


def _gather_dot64(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, absolute: bool):
    out = torch.empty(indices.shape, dtype=torch.float64, device=g.device)
    for c in _chunks(len(indices), indices.shape[1] * W.shape[1]):
        w, r = W[indices[c]].double(), g[c].double()[:, None, :]
        out[c] = (w.abs() * r.abs()).sum(-1) if absolute else (w * r).sum(-1)
    return out


def _segments64(
    indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, n: int, absolute: bool
):
    out = torch.zeros(n, rows.shape[1], dtype=torch.float64, device=rows.device)
    for c in _chunks(len(indices), indices.shape[1] * rows.shape[1]):
        v, r = values[c].double(), rows[c].double()
        if absolute:
            v, r = v.abs(), r.abs()
        out.index_add_(0, indices[c].reshape(-1), (v[:, :, None] * r[:, None, :]).flatten(0, 1))
    return out


def _codes(kind: str, N: int, n: int, k: int, dtype: torch.dtype, device, g: torch.Generator):
    """Codes with repeated indices in a row, a row of one latent, zeros; or one latent for all."""
    indices = torch.randint(0, n, (N, k), generator=g)
    if kind == "all_equal":
        indices.fill_(n // 2)  # one segment of N·k entries
    elif k > 1:
        indices[: N // 8, 1] = indices[: N // 8, 0]  # a repeated index in an eighth of the rows
        indices[N // 8] = indices[N // 8, 0]  # a row that chose one latent k times
    values = torch.randn(N, k, generator=g)
    values[values.abs() < 0.3] = 0.0
    return indices.to(device), values.to(device, dtype)


def _check_decoder_kernels(impl, kind, N, d, n, k, name, device, g) -> list[dict[str, Any]]:
    dtype = DTYPES[name]
    indices, values = _codes(kind, N, n, k, dtype, device, g)
    W = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, dtype)
    rows = torch.randn(N, d, generator=g).to(device, dtype)
    seg_terms = int(torch.bincount(indices.flatten(), minlength=n).max())
    out = []

    got = impl.decode(indices, values, W)
    want = F.embedding_bag(indices, W.double(), per_sample_weights=values.double(), mode="sum")
    absum = F.embedding_bag(
        indices, W.double().abs(), per_sample_weights=values.double().abs(), mode="sum"
    )
    out.append({"op": "decode"} | _compare(got, want, absum, k, name))
    del got, want, absum

    got = impl.gather_dot(rows, indices, W)
    want, absum = _gather_dot64(rows, indices, W, False), _gather_dot64(rows, indices, W, True)
    out.append({"op": "gather_dot"} | _compare(got, want, absum, d, name))
    del got, want, absum

    got = impl.segment_reduce(indices, values, rows, n)
    want = _segments64(indices, values, rows, n, False)
    absum = _segments64(indices, values, rows, n, True)
    check = {"op": "segment_reduce"} | _compare(got, want, absum, seg_terms, name)
    unused = torch.ones(n, dtype=torch.bool, device=device)
    unused[indices.flatten()] = False
    check["unused_rows_zero"] = bool((got[unused] == 0).all())  # written, not left as garbage
    check["pass"] = check["pass"] and check["unused_rows_zero"]
    out.append(check)
    for c in out:
        c |= {"kind": kind, "dtype": name, "k": k, "segment_max": seg_terms}
    return out


def _encoder_inputs(kind: str, N: int, d: int, n: int, dtype: torch.dtype, device, g):
    if kind == "ties":  # small integers, duplicated columns: equal pre-activations everywhere
        x = torch.randint(-2, 3, (N, d), generator=g).float()
        W = torch.randint(-1, 2, (d, n), generator=g).float()
        W[:, 1::3] = W[:, 0:-1:3]
        b_enc = torch.zeros(n)
        b_dec = torch.randint(-1, 2, (d,), generator=g).float()
    else:
        x = torch.randn(N, d, generator=g)
        W = torch.randn(d, n, generator=g) / math.sqrt(d)
        b_enc = 0.1 * torch.randn(n, generator=g)
        b_dec = 0.1 * torch.randn(d, generator=g)
    return [t.to(device, dtype) for t in (x, W, b_enc, b_dec)]


def _check_topk_encode(impl, kind, N, d, n, ks, name, device, g) -> list[dict[str, Any]]:
    dtype = DTYPES[name]
    x, W, b_enc, b_dec = _encoder_inputs(kind, N, d, n, dtype, device, g)
    rows = x - b_dec  # rounded in the input dtype, as the encoder does
    pre = torch.addmm(b_enc.double(), rows.double(), W.double())
    absum = torch.addmm(b_enc.double().abs(), rows.double().abs(), W.double().abs())
    out = []
    for k in ks:
        values, indices = impl.topk_encode(x, W, b_enc, k, b_dec)
        want = pre.topk(k, dim=-1).values
        row_absum = absum.max(dim=1, keepdim=True).values.expand(-1, k)
        sorted_check = _compare(values, want, row_absum, d, name)
        at_indices = _compare(values, pre.gather(1, indices), absum.gather(1, indices), d, name)
        s = indices.sort(dim=1).values
        distinct = bool((s[:, 1:] != s[:, :-1]).all()) and bool(((s >= 0) & (s < n)).all())
        descending = bool((values[:, :-1] >= values[:, 1:]).all())
        out.append(
            {
                "op": "topk_encode",
                "kind": kind,
                "dtype": name,
                "k": k,
                "ratio": max(sorted_check["ratio"], at_indices["ratio"]),
                "rel_err": sorted_check["rel_err"],
                "distinct_indices": distinct,
                "descending": descending,
                "pass": sorted_check["pass"] and at_indices["pass"] and distinct and descending,
            }
        )
    return out


def _check_training_step(N, d, n, k, name, device) -> dict[str, Any]:
    """A TopKSAE step through the dispatcher (Triton) against the same step on the reference."""
    from saetrain.kernels import ops

    from saetrain.dictionaries import TopKSAE

    dtype = DTYPES[name]
    g = torch.Generator().manual_seed(5)
    sae = TopKSAE(d, n, k=k, dtype=dtype, device=device, generator=g)
    x = torch.randn(N, d, generator=g).to(device, dtype)
    dead = (torch.rand(n, generator=g) < 0.25).to(device)

    def step(force_reference: bool) -> tuple[float, dict[str, torch.Tensor]]:
        ops.FORCE_REFERENCE = force_reference
        try:
            sae.zero_grad(set_to_none=True)
            loss = sae.training_forward(x, x, dead).loss
            loss.backward()
            grads = {p: t.grad.double() for p, t in sae.named_parameters() if t.grad is not None}
            return float(loss), grads
        finally:
            ops.FORCE_REFERENCE = False

    loss, grads = step(False)
    ref_loss, ref_grads = step(True)
    rel = {
        p: float((grads[p] - ref_grads[p]).norm() / ref_grads[p].norm().clamp_min(1e-300))
        for p in grads
    }
    limit = 1e-4 if name == "fp32" else 16 * UNIT_ROUNDOFF[name]
    return {
        "op": "training_step",
        "dtype": name,
        "k": k,
        "loss": loss,
        "reference_loss": ref_loss,
        "grad_rel_err": rel,
        "limit": limit,
        "pass": math.isfinite(loss)
        and abs(loss - ref_loss) <= limit * abs(ref_loss)
        and max(rel.values()) <= limit,
    }


def part_kernel_sizes(smoke: bool) -> dict[str, Any]:
    """The kernels at real sizes (N 4096, d 2304, n 65536, k 32 / 128) in fp32, fp16, bf16 against
    float64 oracles on the same inputs, repeated and all-equal indices included; plus the tests'
    own tiny cases in bf16 (the unit tests cover fp32 and fp16)."""
    from saetrain.kernels import ops

    device = _device(smoke)
    impl = _Impl(smoke)
    N, d, n, ks = (48, 40, 300, (4, 16)) if smoke else (4096, 2304, 65536, (32, 128))
    g = torch.Generator().manual_seed(0)
    checks: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in DTYPES:
        for k in ks:
            for kind in ("random", "all_equal"):
                checks += _check_decoder_kernels(impl, kind, N, d, n, k, name, device, g)
        for kind in ("random", "ties"):
            checks += _check_topk_encode(impl, kind, N, d, n, ks, name, device, g)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # The unit tests' shapes (blocks crossed, k = 1, all equal), in bf16 as well.
    for tiny in ((6, 5, 11, 37), (5, 1, 7, 19), (3, 17, 29, 130)):
        tN, tk, tn, td = tiny
        for name in DTYPES:
            for kind in ("random", "all_equal"):
                for c in _check_decoder_kernels(impl, kind, tN, td, tn, tk, name, device, g):
                    checks.append(c | {"size": "tiny"})
    step_checks = [_check_training_step(N, d, n, ks[0], name, device) for name in ("fp32", "bf16")]
    seconds = time.perf_counter() - start
    failed = [c for c in checks + step_checks if not c["pass"]]
    out: dict[str, Any] = {
        "kernels": impl.name,
        "sizes": {"N": N, "d": d, "n": n, "k": list(ks)},
        "checks": checks,
        "training_steps": step_checks,
        "seconds": seconds,
        "worst_ratio": {
            name: max((c["ratio"] for c in checks if c["dtype"] == name), default=0.0)
            for name in DTYPES
        },
        "bf16_all_pass": all(c["pass"] for c in checks + step_checks if c["dtype"] == "bf16"),
    }
    if not smoke:
        out["triton_error"] = ops._triton_error
        probe = torch.zeros(1, device=device, dtype=torch.bfloat16)
        out["dispatcher_uses_triton"] = ops.use_triton(probe)
        if ops._triton_error or not out["dispatcher_uses_triton"]:
            return out | {"status": "fail", "reason": f"dispatcher: {ops._triton_error}"}
    if failed:
        names = sorted({f"{c['op']} {c['dtype']} {c.get('kind', '')}".strip() for c in failed})
        return out | {"status": "fail", "reason": f"{len(failed)} checks failed: {names}"}
    return out | {"status": "pass"}


# -- scripts/bench_kernels.py ------------------------------------------------------------------


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written (Adam's yardstick)."""
    from bench_kernels import timed

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * n_bytes / seconds


def part_bench_kernels(smoke: bool, workdir: Path) -> dict[str, Any]:
    """scripts/bench_kernels.py at the issue-5 shapes (N 4096, d 2304), trimmed to n 16384 / 65536,
    k 32 / 128, bf16 and fp32, 2 warm-ups and the median of 5, each step profiled; plus the copy
    bandwidth."""
    import bench_kernels
    from saetrain.kernels import ops

    device = _device(smoke)
    json_out = workdir / "bench_kernels.json"
    if smoke:
        argv = ["--small", "--rows", "64", "--d", "32", "--latents", "256", "--k", "8"]
        argv += ["--dtypes", "bf16", "fp32", "--warmup", "1", "--repeats", "2"]
    else:
        argv = ["--latents", "16384", "65536", "--k", "32", "128", "--dtypes", "bf16", "fp32"]
        argv += ["--warmup", "2", "--repeats", "5"]
    argv += ["--profile"]
    argv += ["--device", device.type, "--out", str(json_out)]
    rc = bench_kernels.main(argv)
    data = json.loads(json_out.read_text())
    copy = copy_bandwidth(device, (16 if smoke else 1024) * 2**20)
    out: dict[str, Any] = {
        "command": "python scripts/bench_kernels.py " + " ".join(argv[:-2]),
        "meta": data["meta"],
        "rows": data["rows"],
        "copy_bytes_per_s": copy,
        "returncode": rc,
    }
    if not smoke:
        out["triton_error"] = ops._triton_error
        if ops._triton_error or data["meta"]["kernels"] != "triton":
            reason = ops._triton_error or "the torch reference ran, not Triton"
            return out | {"status": "fail", "reason": reason}
    return out | {"status": "pass" if rc == 0 else "fail"}


# -- the pipeline at realistic sizes -------------------------------------------------------------


class RandomTokens:
    """Endless batches of random token ids with BOS first (masked out): what a TrainingStream
    reads from a TokenSource, without a tokenizer or a dataset."""

    def __init__(self, vocab: int, context: int, seed: int = 0, bos: int = 1):
        self.vocab, self.context, self.seed, self.bos = vocab, context, seed, bos

    def training(self, batch_size: int, skip_contexts: int = 0) -> Iterator[Any]:
        from saetrain.activations.tokens import TokenBatch

        g = torch.Generator().manual_seed(self.seed + skip_contexts)
        while True:
            ids = torch.randint(3, self.vocab, (batch_size, self.context), generator=g)
            ids[:, 0] = self.bos
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[:, 0] = False
            yield TokenBatch(ids, mask)


def stream_run(
    source: Any,
    tokens: RandomTokens,
    site: str,
    dictionaries: list[Any],
    trainer_cfg: Any,
    buffer_tokens: int,
    lm_batch_contexts: int,
    prefetch: int,
) -> dict[str, Any]:
    """What run()'s training does, on saetrain's own classes: TrainingStream (the LM, computed
    ahead on its CUDA stream) → ActivationBuffer → train_together. Timed from the first fill to
    the last step; the peak CUDA memory above the model's."""
    from saetrain.activations.buffer import ActivationBuffer
    from saetrain.activations.stream import TrainingStream
    from saetrain.training.fit import prepare_trainer, train_together

    device = source.device
    d = source.d_model
    steps = max(trainer_cfg.total_tokens // trainer_cfg.batch_tokens, 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    _sync(device)
    start = time.perf_counter()
    stream = TrainingStream(
        source,
        tokens,  # type: ignore[arg-type]  (a TokenSource's training() is all it reads)
        [site],
        torch.bfloat16,
        lm_batch_contexts,
        None,
        prefetch,
        torch.Generator().manual_seed(1),
        limit_tokens=ActivationBuffer.rows_needed(buffer_tokens, trainer_cfg.batch_tokens, steps),
    )
    try:
        buffer = ActivationBuffer(
            stream, buffer_tokens, d, torch.bfloat16, device, torch.Generator().manual_seed(0)
        )
        samples = buffer.peek(trainer_cfg.init_batches * trainer_cfg.batch_tokens)
        trainers = [
            prepare_trainer(
                cfg, trainer_cfg, samples, d, d, False, device, torch.Generator().manual_seed(i)
            )
            for i, cfg in enumerate(dictionaries)
        ]
        _sync(device)
        train_start, rows_before = time.perf_counter(), stream.rows_out
        train_together(trainers, [lambda rows: rows] * len(trainers), buffer.next_batch, 10**9)
        _sync(device)
        end = time.perf_counter()
        seconds = end - start
    finally:
        stream.close()
    out = {
        "dictionaries": len(dictionaries),
        "ks": [c.k for c in dictionaries],
        "prefetch_batches": prefetch,
        "lm_rows": stream.lm_tokens,
        "trained_tokens": trainers[0].state.tokens,
        "seconds": seconds,
        "rows_per_s": stream.lm_tokens / seconds,
        # After the first fill and the initialisation: the rate of a long run (where the first
        # fill, LM work alone, is a vanishing share), what the ≤ 10% target is about.
        "steady_rows": stream.rows_out - rows_before,
        "steady_seconds": end - train_start,
        "steady_rows_per_s": (stream.rows_out - rows_before) / (end - train_start),
        "final_loss": trainers[0].state.history[-1]["loss"] if trainers[0].state.history else None,
    }
    if device.type == "cuda":
        out["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    del trainers, buffer, samples
    return out


def part_pipeline(smoke: bool) -> dict[str, Any]:
    """LM forward alone to the site vs a streaming TopK run vs 4 dictionaries on one stream, on a
    random ~1.1B Llama in bf16 (rows/s, peak memory)."""
    # transformers (seconds to import) only in the part that builds a model
    from saetrain.activations.source import ActivationSource
    from saetrain.bench.models import random_llama
    from saetrain.bench.rows import lm_forward_rate
    from saetrain.config import DictionaryConfig, TrainerConfig

    device = _device(smoke)
    model = random_llama(device, toy=smoke)
    n_params = sum(p.numel() for p in model.parameters())
    layers = model.config.num_hidden_layers
    site = f"resid_post.{layers // 2}"
    source = ActivationSource(model, [site])
    d = source.d_model
    if smoke:
        context, lm_batch, buffer_tokens, batch, total, n_latents = 32, 4, 1024, 128, 2048, 256
        sweep_ks = (4, 8, 16, 32)
    else:
        context, lm_batch, buffer_tokens, batch, total = 1024, 16, 262144, 4096, 1 << 20
        # The default expansion (8 × d_model = 16384). By FLOPs a step is about one encoder
        # GEMM, 2·N·d·n, against the LM's 2·N·(0.5B parameters up to the site): 16× would cost
        # ~20% of the LM forward by itself, more than the 10% the target allows.
        n_latents, sweep_ks = DictionaryConfig().expansion_factor * d, (16, 32, 64, 128)
    tokens = RandomTokens(model.config.vocab_size, context)

    def dictionary(k: int) -> DictionaryConfig:
        return DictionaryConfig(architecture="topk", n_latents=n_latents, k=k, dtype="bfloat16")

    def trainer(total_tokens: int) -> TrainerConfig:
        return TrainerConfig(total_tokens=total_tokens, batch_tokens=batch, init_batches=4)

    common = (source, tokens, site)
    # Warm-up (not measured): kernels loaded from the Triton cache, cuBLAS heuristics, allocator.
    stream_run(*common, [dictionary(32)], trainer(8 * batch), buffer_tokens // 4, lm_batch, 2)
    one = stream_run(*common, [dictionary(32)], trainer(total), buffer_tokens, lm_batch, 2)
    in_loop = stream_run(*common, [dictionary(32)], trainer(total), buffer_tokens, lm_batch, 0)
    sweep = stream_run(
        *common, [dictionary(k) for k in sweep_ks], trainer(total), buffer_tokens, lm_batch, 2
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    lm = lm_forward_rate(source, tokens.training(lm_batch), site, one["lm_rows"])
    if device.type == "cuda":
        lm["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    out: dict[str, Any] = {
        "model": {
            "params": n_params,
            "d_model": d,
            "layers": layers,
            "intermediate": model.config.intermediate_size,
            "vocab": model.config.vocab_size,
            "dtype": "bfloat16",
        },
        "site": site,
        "context": context,
        "lm_batch_contexts": lm_batch,
        "buffer_tokens": buffer_tokens,
        "batch_tokens": batch,
        "n_latents": n_latents,
        "training_tokens": total,
        "lm_alone": lm,
        "stream": one,
        "stream_refill_in_loop": in_loop,
        "sweep": sweep,
        "stream_overhead": lm["rows_per_s"] / one["steady_rows_per_s"] - 1,
        "stream_overhead_whole_run": lm["rows_per_s"] / one["rows_per_s"] - 1,
        "stream_overhead_refill_in_loop": lm["rows_per_s"] / in_loop["steady_rows_per_s"] - 1,
        "sweep_over_one": sweep["seconds"] / one["seconds"],
    }
    if device.type == "cuda":
        out["model_gib"] = torch.cuda.memory_allocated(device) / 2**30
    return out | {"status": "pass"}


# -- python -m saetrain end to end ---------------------------------------------------------------


def part_e2e(smoke: bool, timeout_s: float, workdir: Path) -> dict[str, Any]:
    """`python -m saetrain` on the tiny local Llama (saetrain/synthetic/tiny_llama.py) on cuda,
    twice: the first run writes the activation cache (the prefetch thread on its CUDA stream, the
    Triton path, export and evaluation), the second reads it back through the prefetch thread;
    exit codes and metrics of both."""
    from saetrain.synthetic.tiny_llama import build_corpus, build_tiny_llama

    device = "cpu" if smoke else "cuda"
    work = Path(tempfile.mkdtemp(prefix="saetrain-gpu-check-e2e-", dir=workdir))
    model = build_tiny_llama(work / "model")
    corpus = build_corpus(work / "corpus")
    overrides = [
        f"model.name={model}", "model.gguf_package=null", f"model.device={device}",
        f"data.data_files=[{corpus}/*.txt]", "data.context_size=16", "data.holdout_percent=10",
        "site.input=resid_post.1", "buffer.size_tokens=1024", "buffer.lm_batch_contexts=8",
        f"buffer.prefetch_batches={0 if smoke else 2}", f"cache.dir={work / 'cache'}",
        "cache.shard_tokens=512",
        "dictionary.n_latents=64", "dictionary.k=4",
        f"trainer.total_tokens={2048 if smoke else 4096}",
        "trainer.batch_tokens=256", "trainer.lr=1e-3", "trainer.warmup_steps=2",
        "trainer.init_batches=2", "eval.n_tokens=256", "eval.batch_contexts=8",
        "eval.ce_contexts=8", "logger.log_every=4",
    ]  # fmt: skip
    deadline = time.monotonic() + timeout_s
    runs = {}
    for name in ("writes_cache", "reads_cache"):
        left = deadline - time.monotonic()
        if left < 10:
            runs[name] = {"status": "fail", "reason": f"no time left ({left:.0f} s of the part)"}
            continue
        runs[name] = _saetrain_run(overrides, work, name, left, smoke)
    first, second = runs["writes_cache"], runs["reads_cache"]
    out = first | {"reads_cache": second}
    if first["status"] == "pass" and second["status"] == "pass":
        cached = (second.get("stream") or {}).get("cached_tokens") or 0
        if cached <= 0:
            second |= {"status": "fail", "reason": "the second run read no cached activations"}
    failed = [f"{n}: {r['reason']}" for n, r in runs.items() if r["status"] != "pass"]
    if failed:
        return out | {"status": "fail", "reason": "; ".join(failed)}
    return out | {"status": "pass"}


def _saetrain_run(
    overrides: list[str], work: Path, name: str, timeout_s: float, smoke: bool
) -> dict[str, Any]:
    """One `python -m saetrain` into work/<name>: exit code, exported files, metrics, and whether
    the Triton kernels ran (on cuda) without a fallback."""
    run_dir = work / name
    overrides = [*overrides, f"output_dir={run_dir}", f"hydra.run.dir={work / ('hydra-' + name)}"]
    env = dict(os.environ)
    env.pop("SAETRAIN_KERNELS", None)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "saetrain", *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1)
        )
    except subprocess.TimeoutExpired:
        return {"status": "fail", "reason": f"python -m saetrain ran past {timeout_s:.0f} s"}
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    hydra_log = work / f"hydra-{name}" / "__main__.log"
    log_text = text + (hydra_log.read_text() if hydra_log.exists() else "")
    folder = run_dir / "resid_post.1"
    out: dict[str, Any] = {
        "command": "python -m saetrain " + " ".join(o for o in overrides if "=/" not in o),
        "returncode": proc.returncode,
        "seconds": seconds,
        "exported": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [],
        "tail": _tail(text),
    }
    fallback = sorted(set(re.findall(r"Triton sparse kernels not used \(([^)]*)\)", log_text)))
    failures = sorted(set(re.findall(r"the Triton kernel `\w+` failed[^\n]*", log_text)))
    out["kernel_fallbacks"] = fallback
    out["kernel_failures"] = failures
    info_path = folder / "saetrain_run.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        out["metrics"] = info.get("final_metrics")
        out["device"] = info.get("device")
        keys = ("lm_tokens", "cached_tokens", "pipeline_rows_per_s")
        out["stream"] = {k: info["stream"].get(k) for k in keys}
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit code {proc.returncode}")
    for file in ("cfg.json", "sae_weights.safetensors", "saetrain_run.json"):
        if file not in out["exported"]:
            problems.append(f"{file} not written")
    metrics = out.get("metrics") or {}
    if not all(math.isfinite(metrics.get(key, math.nan)) for key in ("fvu", "l0", "ce_spliced")):
        problems.append("metrics missing or not finite")
    if not smoke and (fallback or failures):
        problems.append(f"Triton not used: {fallback + failures}")
    if not smoke and out.get("device") != "cuda":
        problems.append(f"ran on {out.get('device')}")
    if problems:
        return out | {"status": "fail", "reason": "; ".join(problems)}
    return out | {"status": "pass"}


PARTS: dict[str, Callable[..., dict[str, Any]]] = {
    "env": part_env,
    "kernel_tests": part_kernel_tests,
    "kernel_sizes": part_kernel_sizes,
    "bench_kernels": part_bench_kernels,
    "pipeline": part_pipeline,
    "e2e": part_e2e,
}
