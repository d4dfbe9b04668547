"""Sweep summaries: one table and one plot for all the jobs of a Hydra multirun.

`python -m saetrain -m dictionary.k=16,32,64` runs one job per value, each in its own folder of the
sweep folder (`multirun/<date>/<time>/<job number>/`). When the sweep ends, `SweepSummary` (a Hydra
callback registered in configs/config.yaml) reads every job's swept values from
`.hydra/overrides.yaml` and every dictionary's `saetrain_run.json`, and writes beside the jobs:

    summary.csv   one row per dictionary: all override values, the final metrics
    summary.md    the fields that vary across jobs, L0, FVU, ΔCE, CE recovered, never fired %
                  (held-out) and dead % (training window)
    summary.png   FVU and ΔCE against L0, one point per dictionary (needs matplotlib)

`summarize_sweep(folder)` (or `python -m saetrain.sweep <folder>`) does the same by hand, e.g. for a
sweep whose jobs ran elsewhere (SLURM) or were interrupted. This module imports neither torch nor
saetrain's heavier modules (only errors.py and atomic.py): Hydra instantiates the callback in
every run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from saetrain.atomic import atomic_write_bytes
from saetrain.errors import EXIT_BAD_INPUT, EXIT_OK

log = logging.getLogger(__name__)

RUN_FILE = "saetrain_run.json"  # saetrain.export.saelens.RUN_FILE, without importing torch
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG = "summary.csv", "summary.md", "summary.png"

# Final metrics shown in the Markdown table and the plot: (key in final_metrics, column title).
MAIN_METRICS = [
    ("l0", "L0"),
    ("fvu", "FVU"),
    ("delta_ce", "ΔCE"),
    ("ce_recovered", "CE recovered"),
]
# Latent-health shares shown as percentages: (key in final_metrics, CSV column, Markdown title).
# never_fired_fraction: no firing on the held-out tokens; dead_fraction: no firing in the last
# dead_window_tokens of training (evaluation/metrics.py).
PERCENT_METRICS = [
    ("never_fired_fraction", "never_fired_pct", "never fired %"),
    ("dead_fraction", "dead_pct", "dead %"),
]


# Usefulness suites' metrics (eval.suite): a column and a plot panel each, only when some job has
# them, so a sweep without eval.suite summarises as before. (key, title).
USEFULNESS_METRICS = [
    ("absorption/mean_absorption_fraction_score", "absorption"),
    ("absorption/mean_full_absorption_score", "full absorption"),
    ("sparse_probing/sae_top_1_test_accuracy", "top-1 probe acc"),
]


def _present(jobs: list[JobResult], metrics: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (key, title) pairs some finished job has a number for."""
    done = [j for j in jobs if j.error is None]
    return [(k, t) for k, t in metrics if any(_number(j.metrics.get(k)) is not None for j in done)]


@dataclass
class JobResult:
    """One dictionary of one job (a job that trained several gives several)."""

    job: str  # the job's folder name (its number, by default)
    overrides: dict[str, str]
    dictionary: str | None = None  # the dictionary folder, relative to the job's
    metrics: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    site: str | None = None
    tokens_seen: int | None = None
    error: str | None = None  # why there is no result (the job failed or is still running)


def _parse_overrides(path: Path) -> dict[str, str]:
    """`key=value` strings of a job's overrides.yaml, as written on the command line."""
    lines = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(lines, list):
        raise ValueError(f"{path} is not a list of overrides")
    out: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides([str(x) for x in lines]):
        if override.is_delete():
            continue
        out[override.key_or_group] = override.get_value_element_as_str()
    return out


def _job_sort_key(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


def collect_jobs(folder: str | Path) -> list[JobResult]:
    """Every job folder (one with .hydra/overrides.yaml) under `folder` and its dictionaries."""
    folder = Path(folder)
    results: list[JobResult] = []
    job_dirs = sorted(
        (p.parent.parent for p in folder.glob(f"**/{OVERRIDES_FILE.as_posix()}")),
        key=lambda d: _job_sort_key(d.relative_to(folder).as_posix()),
    )
    for job_dir in job_dirs:
        name = job_dir.relative_to(folder).as_posix()
        if name == ".":
            continue  # the sweep folder's own .hydra (a single run), not a job
        try:
            overrides = _parse_overrides(job_dir / OVERRIDES_FILE)
        except Exception as e:  # a damaged file: report it, summarise the rest
            results.append(JobResult(name, {}, error=f"unreadable overrides: {e}"))
            continue
        runs = sorted(job_dir.rglob(RUN_FILE))
        if not runs:
            results.append(JobResult(name, overrides, error=f"no {RUN_FILE} (failed or running)"))
        for run_file in runs:
            try:
                info = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                results.append(JobResult(name, overrides, error=f"{run_file}: {e}"))
                continue
            config = info.get("config", {})
            site = config.get("site", {})
            site_name = site.get("input")
            if site.get("target") and site.get("target") != site_name:
                site_name = f"{site_name}→{site['target']}"
            results.append(
                JobResult(
                    job=name,
                    overrides=overrides,
                    dictionary=run_file.parent.relative_to(job_dir).as_posix(),
                    metrics=info.get("final_metrics", {}),
                    architecture=config.get("dictionary", {}).get("architecture"),
                    site=site_name,
                    tokens_seen=info.get("tokens_seen"),
                )
            )
    return results


def swept_keys(jobs: list[JobResult]) -> list[str]:
    """Override keys whose values differ between jobs (all keys if none differ)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    varying = [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]
    return varying or keys


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.{digits}g}"


def render_csv(jobs: list[JobResult]) -> str:
    override_keys: list[str] = []
    for job in jobs:
        override_keys += [k for k in job.overrides if k not in override_keys]
    metric_keys = [k for k, _ in MAIN_METRICS] + [k for k, _, _ in PERCENT_METRICS]
    for job in jobs:
        metric_keys += [k for k in job.metrics if k not in metric_keys]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["job", "dictionary", "architecture", "site", "tokens_seen", *override_keys]
        + [column for _, column, _ in PERCENT_METRICS]
        + metric_keys
        + ["error"]
    )
    for job in jobs:
        shares = [_number(job.metrics.get(k)) for k, _, _ in PERCENT_METRICS]
        writer.writerow(
            [job.job, job.dictionary or "", job.architecture or "", job.site or ""]
            + ["" if job.tokens_seen is None else job.tokens_seen]
            + [job.overrides.get(k, "") for k in override_keys]
            + ["" if share is None else repr(100 * share) for share in shares]
            + [repr(job.metrics[k]) if k in job.metrics else "" for k in metric_keys]
            + [job.error or ""]
        )
    return buffer.getvalue()


def render_markdown(jobs: list[JobResult], folder: Path) -> str:
    swept = swept_keys([j for j in jobs if j.error is None] or jobs)
    several = len({(j.job, j.dictionary) for j in jobs}) > len({j.job for j in jobs})
    head = ["job", *(["dictionary"] if several else []), *swept]
    useful = _present(jobs, USEFULNESS_METRICS)
    head += [title for _, title in MAIN_METRICS] + [title for _, _, title in PERCENT_METRICS]
    head += [title for _, title in useful]
    lines = [
        f"# Sweep summary: {folder}",
        "",
        f"{len({j.job for j in jobs})} jobs, {sum(j.error is None for j in jobs)} dictionaries "
        "with results.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for job in jobs:
        if job.error is not None:
            continue
        cells = [job.job, *([job.dictionary or ""] if several else [])]
        cells += [job.overrides.get(k, "") for k in swept]
        cells += [_fmt(job.metrics.get(k)) for k, _ in MAIN_METRICS]
        for key, _, _ in PERCENT_METRICS:
            share = _number(job.metrics.get(key))
            cells.append("" if share is None else f"{100 * share:.1f}")
        cells += [_fmt(job.metrics.get(k)) for k, _ in useful]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [j for j in jobs if j.error is not None]
    if failed:
        lines += ["", "Jobs without results:", ""]
        lines += [
            f"- job {j.job} ({', '.join(f'{k}={v}' for k, v in j.overrides.items() if k in swept)})"
            f": {j.error}"
            for j in failed
        ]
    return "\n".join(lines) + "\n"


def plot_sweep(jobs: list[JobResult], path: Path, swept: list[str]) -> Path | None:
    """FVU and ΔCE against L0, one labelled point per dictionary; None without matplotlib."""
    try:  # matplotlib is imported here: it takes half a second, and only this plot needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: %s not written (pip install matplotlib)", path)
        return None
    done = [j for j in jobs if j.error is None and _number(j.metrics.get("l0")) is not None]
    panels = [(k, t) for k, t in (("fvu", "FVU"), ("delta_ce", "ΔCE")) if any(
        _number(j.metrics.get(k)) is not None for j in done)]  # fmt: skip
    useful = _present(done, USEFULNESS_METRICS)
    if not done or not panels + useful:
        log.warning("no finished job has L0 and FVU or ΔCE: %s not written", path)
        return None
    panels += useful
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        points = [(j, _number(j.metrics.get(key))) for j in done]
        points = [(j, y) for j, y in points if y is not None]
        xs = [float(j.metrics["l0"]) for j, _ in points]
        if (key, title) in useful:  # one line per architecture, in L0 order
            for arch in sorted({j.architecture or "?" for j, _ in points}):
                line = sorted((x, y) for (j, y), x in zip(points, xs, strict=True)
                              if (j.architecture or "?") == arch)  # fmt: skip
                ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=arch)
            ax.legend(fontsize=7)
        else:
            ax.scatter(xs, [y for _, y in points], color="tab:blue")
        for (job, y), x in zip(points, xs, strict=True):
            label = ", ".join(job.overrides.get(k, "") for k in swept) or job.job
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} against L0", fontsize=10)
        ax.grid(alpha=0.3)
    if swept:
        fig.suptitle("labels: " + ", ".join(swept), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize_sweep(folder: str | Path) -> Path:
    """Write summary.csv, summary.md and summary.png into the sweep `folder`; return the CSV."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sweep folder {folder} does not exist")
    jobs = collect_jobs(folder)
    if not jobs:
        raise FileNotFoundError(
            f"{folder} holds no job folders (none has {OVERRIDES_FILE}); is it a Hydra sweep "
            "folder (multirun/<date>/<time>)?"
        )
    csv_path = folder / SUMMARY_CSV
    atomic_write_bytes(csv_path, render_csv(jobs).encode())
    atomic_write_bytes(folder / SUMMARY_MD, render_markdown(jobs, folder).encode())
    swept = swept_keys([j for j in jobs if j.error is None] or jobs)
    plot_sweep(jobs, folder / SUMMARY_PNG, swept)
    log.debug("sweep summary: %s, %s", csv_path, folder / SUMMARY_MD)
    return csv_path


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep folder when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        try:
            csv_path = summarize_sweep(folder)
        except Exception as e:  # a summary must never turn a finished sweep into a failure
            log.warning("sweep summary of %s not written: %s", folder, e)
            return
        print(f"sweep summary written to {csv_path} and {folder / SUMMARY_MD}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m saetrain.sweep",
        description="Summarise a Hydra sweep folder of saetrain jobs into summary.csv/.md/.png.",
    )
    parser.add_argument("folder", type=Path, help="the sweep folder, e.g. multirun/<date>/<time>")
    args = parser.parse_args(argv)
    try:
        csv_path = summarize_sweep(args.folder)
    except FileNotFoundError as e:
        print(f"saetrain.sweep: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print((csv_path.parent / SUMMARY_MD).read_text())
    return EXIT_OK


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
