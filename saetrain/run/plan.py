"""What a run will do, decided before its weights load: the config checked against the model's
config file and the data; the run folder (fresh, resumed from its last checkpoint, or finished
and left as it is; nothing is written before every check has passed); the dictionaries (`Job`s)
with their sites and where their columns sit in the stream's rows; what each weighs on the rank
that trains it, and what training holds in memory."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saetrain.activations.buffer import ActivationBuffer
from saetrain.activations.source import ActivationSource
from saetrain.checks import validate
from saetrain.config import Config, DictionarySpec, second_model
from saetrain.dictionaries import Layout, configured_latents
from saetrain.distributed.data_parallel import DataParallel
from saetrain.distributed.sharding import dictionary_cost
from saetrain.errors import ConfigError, PublishError
from saetrain.export.hub import check_publish
from saetrain.planning.expand import canonical_sites, dictionary_configs, merged
from saetrain.planning.model_shape import ModelShape
from saetrain.planning.site_patterns import site_lists
from saetrain.preflight import preflight, starting_point
from saetrain.run.result import RunResult, already_finished
from saetrain.training.checkpoint import (
    check_resumable,
    find_resume_dir,
    list_checkpoints,
    load_checkpoint,
    wants_resume,
)
from saetrain.training.finetune import Start
from saetrain.training.latent_shard import check_shardable
from saetrain.training.run_folder import RunGuard, finished, finished_resume_target
from saetrain.training.trainer import Trainer

log = logging.getLogger("saetrain.run")  # the run's one logger, whichever module of it writes


@dataclass
class Job:
    """One dictionary of the run: its config, its input and target sites (one each for an SAE or
    transcoder, one per layer for a crosscoder or CLT), where their columns sit in the stream, the
    sites' widths (attn_z differs from d_model), its trainer."""

    name: str
    cfg: Config
    inputs: list[str]
    targets: list[str]
    columns: list[slice]
    layout: Layout
    # dictionary.init_from's folder: the dictionary the run starts from (None: a new one).
    start: Start | None = None
    trainer: Trainer | None = None

    @property
    def transcoder(self) -> bool:
        return self.targets != self.inputs

    @property
    def d_in(self) -> int:
        return self.layout.d_in

    @property
    def d_out(self) -> int:
        return self.layout.d_out

    @property
    def input_site(self) -> str:
        return self.inputs[0]

    @property
    def target_site(self) -> str:
        return self.targets[0]

    def view(self, rows: torch.Tensor) -> torch.Tensor:
        """This dictionary's raw rows ([x] or [x, y]) out of the stream's rows."""
        if len(self.columns) == 1:
            return rows[:, self.columns[0]]
        return torch.cat([rows[:, c] for c in self.columns], dim=-1)


@dataclass
class Dictionaries:
    """The run's dictionaries before the LM's widths are known: (folder name, config) each, the
    folder each starts from, their input and target sites, and every site the stream reads (each
    once, in first-use order)."""

    configs: list[tuple[str, Config]]
    starts: list[Start | None]
    site_sets: list[tuple[list[str], list[str]]]
    sites: list[str]


def normalized(cfg: Config) -> Config:
    """`cfg` with every `dictionaries` entry as a DictionarySpec and site names canonical (a
    checkpoint's config then compares equal however the entries and sites were written)."""
    specs = [
        spec if isinstance(spec, DictionarySpec) else merged(DictionarySpec(), spec, "dictionaries")
        for spec in cfg.dictionaries
    ]
    return canonical_sites(dataclasses.replace(cfg, dictionaries=specs))


def checked(cfg: Config, dp: DataParallel) -> tuple[Config, ModelShape]:
    """The config validated, normalized and checked against the model's config and the data (sites
    and sizes): before any weights load, and before the run folder is touched."""
    validate(cfg)
    dp.check(cfg.trainer.batch_tokens, cfg.buffer.size_tokens, cfg.cache.dir)
    cfg = normalized(cfg)
    shape = preflight(cfg)
    check_shardable(cfg, dp.world.world_size, shape)
    return cfg, shape


@dataclass
class Begun:
    """The run folder this run writes, the checkpoint it resumes from (None: a fresh run), or the
    result of a run that had already finished (then nothing else happens)."""

    output_dir: Path
    checkpoint: dict[str, Any] | None = None
    finished: RunResult | None = None


def begin(
    cfg: Config,
    output_dir: str | Path,
    outputs_root: str | Path | None,
    guard: RunGuard,
    dp: DataParallel,
) -> Begun:
    """The run folder, locked for this process (`guard`) on the rank that writes it; with
    `cfg.resume`, the one it names and its last checkpoint. Seeds torch for the run."""
    writes = dp.world.is_main  # the rank that writes the run folder's shared files
    output_dir = Path(output_dir)
    checkpoint: dict[str, Any] | None = None
    if wants_resume(cfg.resume):
        assert cfg.resume is not None
        root = Path(outputs_root) if outputs_root is not None else None
        if (done := finished_resume_target(cfg.resume, output_dir)) is not None:
            return Begun(done, finished=already_finished(done, writes))  # touches nothing
        output_dir = find_resume_dir(cfg.resume, output_dir, root)
        if finished(output_dir) is not None:
            return Begun(output_dir, finished=already_finished(output_dir, writes))
        if writes:
            guard.hold(output_dir, resuming=True)  # another process may be writing the folder
        if dp.decide(finished(output_dir) is not None):  # it finished while we waited
            return Begun(output_dir, finished=already_finished(output_dir, writes))
        checkpoint_path = dp.decide(list_checkpoints(output_dir)[-1])
        checkpoint = load_checkpoint(checkpoint_path, dp.world)
        check_resumable(checkpoint["config"], dataclasses.asdict(cfg), checkpoint_path)
        log.info("resuming %s from %s", output_dir, checkpoint_path)
    if cfg.publish.repo_id:
        try:
            check_publish(cfg.publish)  # a missing token fails now, not after training
        except PublishError as e:
            raise ConfigError(str(e)) from None
    torch.manual_seed(cfg.seed)
    if checkpoint is None and writes:
        # After the checks (a run that cannot start writes nothing), before the first file.
        guard.hold(output_dir, resuming=False)
    return Begun(output_dir, checkpoint)


def plan_dictionaries(cfg: Config, shape: ModelShape) -> Dictionaries:
    """Every dictionary `cfg` describes (fine-tuned ones with the shape and settings of the folder
    they start from) and the sites they read."""
    configs = dictionary_configs(cfg, shape.n_layers)
    starts: list[Start | None] = [None] * len(configs)
    for i, (name, sub) in enumerate(configs):
        if sub.dictionary.init_from is not None:  # fine-tuning: the folder's shape and weights
            sub, starts[i] = starting_point(sub, shape)
            configs[i] = (name, sub)
            log.info("dictionary %s %s", name, starts[i].describe())  # type: ignore[union-attr]
    two_models = second_model(cfg) is not None
    site_sets = [site_lists(sub.site, sub.dictionary.kind, two_models) for _, sub in configs]
    sites: list[str] = []
    for inputs, targets in site_sets:
        for site in inputs + targets:
            if site not in sites:
                sites.append(site)
    return Dictionaries(configs, starts, site_sets, sites)


def lay_out_jobs(planned: Dictionaries, source: ActivationSource) -> list[Job]:
    """The dictionaries with their columns in the stream's rows: the sites side by side, each as
    wide as its activation (attn_z is n_heads × head_dim, the others d_model)."""
    column: dict[str, slice] = {}
    start = 0
    for site in planned.sites:
        column[site] = slice(start, start + source.width(site))
        start = column[site].stop
    out: list[Job] = []
    for (name, sub), (inputs, targets), begin in zip(
        planned.configs, planned.site_sets, planned.starts, strict=True
    ):
        read = inputs + (targets if targets != inputs else [])
        layout = Layout(
            sub.dictionary.kind,
            tuple(source.width(site) for site in inputs),
            tuple(source.width(site) for site in targets),
        )
        out.append(Job(name, sub, inputs, targets, [column[site] for site in read], layout, begin))
    return out


def job_cost(job: Job) -> float:
    """What a dictionary weighs on the rank that trains it (for sharing them out)."""
    d = job.cfg.dictionary
    n_latents = configured_latents(d, job.layout.in_widths)
    return dictionary_cost(n_latents, job.d_in, job.d_out)


def training_memory(trainers: list[Trainer], buffer: ActivationBuffer) -> dict[str, int]:
    """Bytes this rank holds for training: weights, Adam's two moments of them, the buffer."""
    weights = sum(p.numel() * p.element_size() for t in trainers for p in t.dictionary.parameters())
    return {"weights": weights, "adam_state": 2 * weights, "buffer": buffer.storage_bytes()}
