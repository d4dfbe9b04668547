"""Build every Triton kernel ahead of time for a GPU target, on a machine without a GPU.

The Triton interpreter (how CI runs the kernel tests) never calls the compiler, so a kernel that
fails only to build — an op the installed Triton lacks, a 16-bit path that does not lower, shared
memory beyond an SM's limit, registers spilled to local memory — would first show in a scarce GPU
run. `triton.compile` lowers a kernel to PTX and a cubin for a named target (sm_90: H100/H200,
sm_80: A100) with the ptxas that Triton ships, no driver needed; this module does that for the
launches the wrappers in `triton_ops` make (their `*_config` functions) at real and at odd shapes,
specialising the integer arguments as Triton's JIT would (1 becomes a constant, multiples of 16
get a divisibility hint, pointers are 16-byte aligned).

    python -m saetrain.kernels.compile_check                      # sm_90 and sm_80: a table
    python -m saetrain.kernels.compile_check --arch 90 --json out.json --quick

Exit code 0 when every launch built and fits the target's shared memory. Registers per thread
and the stack frame are reported, not judged: whether a spill costs time is for a GPU to say.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Set before triton_ops is imported: these kernels are to be compiled, not interpreted. (This
# module is a command; a process that imports it has its kernels compiled from then on.)
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; silences a warning

import torch  # noqa: E402
import triton  # noqa: E402
from saetrain.kernels import triton_ops  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Largest shared memory one block may use (opt-in), by compute capability (CUDA guide, table 21);
# an unlisted one is held to the smallest.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# SMs of the target's usual GPU (A100, H100 SXM / H200): the fused top-k's column splits, and so
# the hint on its tiles_per_split argument, depend on them.
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Shape:
    """One call's sizes: rows N, width D (d_in or d_out), latents n, codes per row k."""

    name: str
    N: int
    D: int
    n: int
    k: int


# Real sizes (issue 5's N 4096, d 2304, n 65536 at k 32 and 128), SmolLM2-135M's width, and an
# odd shape that takes every masked, unhinted path (the unit tests' kind).
SHAPES = (
    Shape("real-k32", 4096, 2304, 65536, 32),
    Shape("real-k128", 4096, 2304, 65536, 128),
    Shape("smollm2-k32", 4096, 576, 4608, 32),
    Shape("odd-k5", 37, 37, 130, 5),
)
QUICK_SHAPES = ("real-k32", "real-k128", "odd-k5")


@dataclass
class Launch:
    """One kernel launch as the JIT would specialise it: the argument values decide the types."""

    kernel: str
    shape: str
    dtype: str
    args: dict[str, Any]  # name → value: a torch.dtype for a pointer, an int, or a constexpr
    options: dict[str, Any] = field(default_factory=dict)

    def source(self) -> ASTSource:
        fn = getattr(triton_ops, self.kernel)
        signature: dict[str, str] = {}
        constants: dict[str, Any] = {}
        attrs: dict[tuple[int, ...], list[list[Any]]] = {}
        constexprs = _fn_constexprs(self.kernel)
        for i, name in enumerate(fn.arg_names):
            value = self.args[name]
            if name in constexprs:
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, torch.dtype):
                signature[name] = "*" + (TRITON_DTYPE.get(value) or _int_type(value))
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif value == 1:  # the JIT turns an integer 1 into a constant
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn, signature, constexprs=constants, attrs=attrs)

    def key(self) -> str:
        return json.dumps([self.kernel, self.dtype, _spec(self.args), self.options], default=str)


def _int_type(dtype: torch.dtype) -> str:
    return {torch.int64: "i64", torch.int32: "i32"}[dtype]


def _spec(args: dict[str, Any]) -> dict[str, Any]:
    """What the JIT specialises on: pointer types, constexprs, and for integers 1 / %16 / other."""
    out: dict[str, Any] = {}
    for name, value in args.items():
        if isinstance(value, bool) or not isinstance(value, int):
            out[name] = str(value)
        else:
            wide = "" if -(2**31) <= value < 2**31 else "/i64"
            out[name] = 1 if value == 1 else ("d16" if value % 16 == 0 else "int") + wide
    return out


def _fn_constexprs(kernel: str) -> set[str]:
    fn = getattr(triton_ops, kernel)
    return {fn.arg_names[i] for i in fn.constexprs}


def launches(
    shapes: tuple[Shape, ...], dtypes: tuple[torch.dtype, ...], sms: int = 132
) -> Iterator[Launch]:
    """The launches triton_ops' wrappers make for these shapes on a GPU with `sms` SMs, one per
    JIT specialisation."""
    seen: set[str] = set()
    i64 = torch.int64
    for s in shapes:
        for dtype in dtypes:
            dt = TRITON_DTYPE[dtype]
            candidates = [
                # decode: the decoder forward (W_dec [n, D]) and the encoder's dx (W_encᵀ, made
                # contiguous by the caller, so the same launch).
                Launch(
                    "_decode_kernel", s.name, dt,
                    {"idx_ptr": i64, "val_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype,
                     "K": s.k, "D": s.D, "stride_w_row": s.D, "stride_w_col": 1}
                    | triton_ops.decode_config(s.k, s.D),
                ),
                Launch(
                    "_gather_dot_kernel", s.name, dt,
                    {"g_ptr": dtype, "idx_ptr": i64, "w_ptr": dtype, "out_ptr": dtype,
                     "K": s.k, "D": s.D, "stride_w_row": s.D}
                    | triton_ops.gather_dot_config(s.k, s.D),
                ),
                Launch(
                    "_segment_reduce_kernel", s.name, dt,
                    {"perm_ptr": i64, "starts_ptr": i64, "val_ptr": dtype, "r_ptr": dtype,
                     "out_ptr": dtype, "K": s.k, "D": s.D}
                    | triton_ops.segment_reduce_config(s.D),
                ),
            ]  # fmt: skip
            precisions = (True, False) if dtype == torch.float32 else (False,)
            for ieee in precisions:
                for has_b_dec in (True, False) if s.name == "real-k32" else (True,):
                    candidates.append(_topk_launch(s, dtype, ieee, has_b_dec, sms))
            for launch in candidates:
                if launch.key() not in seen:
                    seen.add(launch.key())
                    yield launch


def _topk_launch(s: Shape, dtype: torch.dtype, ieee: bool, has_b_dec: bool, sms: int) -> Launch:
    config = triton_ops.topk_encode_config(s.k, dtype, has_b_dec, ieee)
    options = {"num_warps": config.pop("num_warps")}
    n_tiles = triton.cdiv(s.n, config["BLOCK_N"])
    # _topk_splits on that GPU: only the hint on tiles_per_split depends on it.
    splits = max(1, min(n_tiles, triton.cdiv(2 * sms, triton.cdiv(s.N, config["BLOCK_M"]))))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    args = {
        "x_ptr": dtype, "w_ptr": dtype, "b_enc_ptr": dtype, "b_dec_ptr": dtype,
        "val_ptr": dtype, "idx_ptr": torch.int64,
        "N": s.N, "D": s.D, "n": s.n, "K": s.k, "tiles_per_split": tiles_per_split,
        "stride_xm": s.D, "stride_xd": 1, "stride_wd": s.n, "stride_wn": 1,
        "stride_out": splits * s.k,
    } | config  # fmt: skip
    return Launch("_topk_encode_kernel", s.name, TRITON_DTYPE[dtype], args, options)


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and the stack frame in bytes (what Triton calls spills: registers
    that did not fit, or arrays indexed at run time), from Triton's own cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, timeout=60
        ).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def build(launch: Launch, arch: int) -> dict[str, Any]:
    """Compile one launch for sm_<arch>; what it uses, and whether that fits."""
    row: dict[str, Any] = {
        "arch": arch,
        "kernel": launch.kernel.strip("_").removesuffix("_kernel"),
        "shape": launch.shape,
        "dtype": launch.dtype,
        "constexprs": {k: v for k, v in launch.args.items() if k in _fn_constexprs(launch.kernel)},
        "options": launch.options,
    }
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            launch.source(), target=GPUTarget("cuda", arch, 32), options=launch.options
        )
    except Exception as exc:  # noqa: BLE001  (reported per launch; the others still build)
        message = str(exc).strip().splitlines()
        return row | {
            "ok": False,
            "seconds": time.perf_counter() - start,
            "error": f"{type(exc).__name__}: {message[-1] if message else ''}"[:400],
        }
    row["seconds"] = time.perf_counter() - start
    row["shared_bytes"] = int(compiled.metadata.shared)
    row |= _resources(compiled.asm["cubin"])
    limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    if row["shared_bytes"] > limit:  # the launch would fail with OutOfResources
        error = f"shared memory {row['shared_bytes']} B over sm_{arch}'s {limit} B"
        return row | {"ok": False, "error": error}
    return row | {"ok": True, "error": None}


def run(archs: list[int], quick: bool) -> dict[str, Any]:
    shapes = tuple(s for s in SHAPES if not quick or s.name in QUICK_SHAPES)
    rows = []
    for arch in archs:
        for launch in launches(shapes, DTYPES, SM_COUNT.get(arch, 132)):
            rows.append(build(launch, arch))
            r = rows[-1]
            state = "ok" if r["ok"] else f"FAIL {r['error']}"
            print(
                f"sm_{arch} {r['kernel']:>14} {r['dtype']:>4} {r['shape']:>12} "
                f"{r['seconds']:5.1f}s  {state}",
                file=sys.stderr,
                flush=True,
            )
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": _ptxas_version(),
        "archs": archs,
        "launches": rows,
        "ok": all(r["ok"] for r in rows),
    }


def _ptxas_version() -> str | None:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    path = str(tool) if tool.exists() else shutil.which("ptxas")
    if path is None:
        return None
    text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"release ([\d.]+)", text)
    return found.group(1) if found else None


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Triton {result['triton']} (ptxas {result['ptxas']}), torch {result['torch']}: "
        f"{sum(r['ok'] for r in result['launches'])} of {len(result['launches'])} launches built.",
        "",
        "| target | kernel | dtype | shape | constexprs | shared B | regs | stack B | s | ok |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["launches"]:
        consts = ", ".join(
            f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "K_PAD"))
        )
        extra = [f"{k}={v}" for k, v in r["constexprs"].items() if k in ("PRECISION", "HAS_B_DEC")]
        spills = r.get("stack", "?")
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['shape']} | "
            f"{', '.join([consts, *extra])} | {r.get('shared_bytes', '-')} | "
            f"{r.get('reg', '?')} | {spills} | {r['seconds']:.1f} | "
            f"{'yes' if r['ok'] else 'NO: ' + str(r['error'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="90,80", help="compute capabilities to build for, e.g. 90,80 (default)"
    )
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES} only")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch must be comma-separated integers such as 90,80, not {args.arch!r}")
    if triton_ops.INTERPRETED:
        parser.error("the kernels were imported interpreted (TRITON_INTERPRET): nothing to build")
    result = run(archs, args.quick)
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
