"""One run, wired end to end: LM + data → buffer → trainer → evaluation → export."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from saetrain.activations.buffer import ActivationBuffer
from saetrain.activations.cache import ActivationCache, activation_key_fields
from saetrain.activations.model import TORCH_DTYPES, load_lm
from saetrain.activations.paired import PairedSource, check_same_tokenizer, split_sites
from saetrain.activations.sites import model_family, num_layers
from saetrain.activations.source import ActivationSource
from saetrain.activations.stream import TrainingStream
from saetrain.activations.tokens import TokenBatch, TokenSource
from saetrain.checks import validate
from saetrain.config import Config, DictionarySpec, ModelConfig, second_model
from saetrain.dictionaries import CLTStructure, Dictionary, Layout
from saetrain.distributed import World, world_session
from saetrain.distributed.data_parallel import DataParallel, only_main_reports
from saetrain.distributed.sharding import dictionary_cost
from saetrain.errors import ConfigError, PublishError
from saetrain.evaluation.density import density_summary
from saetrain.evaluation.evaluate import (
    Evaluated,
    evaluate_dictionaries,
    first_contexts,
    splice_member,
)
from saetrain.evaluation.metrics import training_dead_metrics
from saetrain.evaluation.shared_eval import my_contexts, reduce_ce, reduce_stats
from saetrain.evaluation.splice import replacement_lm_metrics
from saetrain.evaluation.transcoder_sets import evaluate_and_export_set, find_sets
from saetrain.export.extras import kind_metrics, write_extras
from saetrain.export.hub import check_publish, publish_folder
from saetrain.export.norm_space import export_fold
from saetrain.export.saelens import save_dictionary
from saetrain.loggers import CompositeLogger, open_logger
from saetrain.planning.expand import canonical_sites, dictionary_configs, merged
from saetrain.planning.site_patterns import site_lists
from saetrain.preflight import preflight, starting_point
from saetrain.progress import ReportedList, emit, phase
from saetrain.training.checkpoint import (
    StopRequest,
    check_resumable,
    find_resume_dir,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    wants_resume,
)
from saetrain.training.finetune import Start
from saetrain.training.fit import fold, prepare_trainer, restore_trainer, train_together
from saetrain.training.initialization import scale_summary
from saetrain.training.latent_shard import ShardedTrainer, check_shardable, latent_shard
from saetrain.training.run_folder import (
    RunGuard,
    finished,
    finished_resume_target,
    mark_finished,
)
from saetrain.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class DictionaryResult:
    name: str
    dictionary_dir: Path
    metrics: dict[str, float]


@dataclass
class RunResult:
    output_dir: Path
    dictionary_dir: Path  # the first dictionary's folder
    metrics: dict[str, float]  # the first dictionary's held-out metrics
    dictionaries: list[DictionaryResult]
    already_finished: bool = False  # a resume found the run finished and changed nothing


@dataclass
class _Job:
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


def run(cfg: Config, output_dir: str | Path, outputs_root: str | Path | None = None) -> RunResult:
    """Train, evaluate and save every dictionary `cfg` describes, from one LM pass.

    With `cfg.resume`, continue the run folder it names from its last checkpoint instead
    (`outputs_root`: where `resume=true` looks for the newest run when output_dir has none);
    a run that already finished is left as it is. The run folder is locked while this process
    writes it; SIGTERM / SIGINT outside training raise RunStopped, naming the phase.

    Started by torchrun, each rank calls this: they train on their shares of the stream
    (saetrain/distributed/data_parallel.py), and rank 0 alone writes the run folder's shared
    files (the checkpoints' shared part, the exports, the logs).
    """
    with (
        world_session(cfg.model.device, cfg.distributed.timeout_s) as world,
        only_main_reports(world),
    ):
        dp = DataParallel(world)
        # One run folder for all ranks: rank 0's (each rank's Hydra may have made its own).
        output_dir, outputs_root = dp.decide((output_dir, outputs_root))
        with RunGuard(output_dir) as guard:
            result = _run(cfg, output_dir, outputs_root, guard, dp)
        dp.finish()
        return result


def _run(
    cfg: Config,
    output_dir: str | Path,
    outputs_root: str | Path | None,
    guard: RunGuard,
    dp: DataParallel,
) -> RunResult:
    validate(cfg)
    dp.check(cfg.trainer.batch_tokens, cfg.buffer.size_tokens, cfg.cache.dir)
    cfg = normalized(cfg)
    world = dp.world
    writes = world.is_main  # the rank that writes the run folder's shared files
    started = time.time()
    # Data, sites and sizes against the model's config: before any weights load, and before the
    # run folder is touched.
    shape = preflight(cfg)
    check_shardable(cfg, world.world_size, shape)
    output_dir = Path(output_dir)
    checkpoint: dict[str, Any] | None = None
    if wants_resume(cfg.resume):
        assert cfg.resume is not None
        root = Path(outputs_root) if outputs_root is not None else None
        if (done := finished_resume_target(cfg.resume, output_dir)) is not None:
            return _already_finished(done, writes)  # touches nothing
        output_dir = find_resume_dir(cfg.resume, output_dir, root)
        if finished(output_dir) is not None:
            return _already_finished(output_dir, writes)
        if writes:
            guard.hold(output_dir, resuming=True)  # another process may be writing the folder
        if dp.decide(finished(output_dir) is not None):  # it finished while we waited
            return _already_finished(output_dir, writes)
        checkpoint_path = dp.decide(list_checkpoints(output_dir)[-1])
        checkpoint = load_checkpoint(checkpoint_path, world)
        check_resumable(checkpoint["config"], dataclasses.asdict(cfg), checkpoint_path)
        log.info("resuming %s from %s", output_dir, checkpoint_path)
    if cfg.publish.repo_id:
        try:
            check_publish(cfg.publish)  # a missing token fails now, not after training
        except PublishError as e:
            raise ConfigError(str(e)) from None
    torch.manual_seed(cfg.seed)
    device = world.device
    if checkpoint is None and writes:
        # After the checks (a run that cannot start writes nothing), before the first file.
        guard.hold(output_dir, resuming=False)

    with phase(f"model load ({cfg.model.name})"):
        model, tokenizer = load_lm(cfg.model, device)
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
    source = _source(cfg, model, tokenizer, sites, device)
    # The sites side by side in every row, each as wide as its activation (attn_z is
    # n_heads × head_dim, the others d_model).
    column: dict[str, slice] = {}
    start = 0
    for site in sites:
        column[site] = slice(start, start + source.width(site))
        start = column[site].stop
    jobs: list[_Job] = []
    for (name, sub), (inputs, targets), start in zip(configs, site_sets, starts, strict=True):
        read = inputs + (targets if targets != inputs else [])
        layout = Layout(
            sub.dictionary.kind,
            tuple(source.width(site) for site in inputs),
            tuple(source.width(site) for site in targets),
        )
        jobs.append(
            _Job(name, sub, inputs, targets, [column[site] for site in read], layout, start)
        )
    # Several dictionaries under torchrun: each trained (and written) by one rank, unless each is
    # split over every rank (distributed.shard_latents).
    if not cfg.distributed.shard_latents:
        dp.own([_cost(job) for job in jobs], cfg.distributed.assign)

    tokens = TokenSource(cfg.data, tokenizer, cfg.seed, world.rank, world.world_size)
    n_eval_contexts = max(math.ceil(cfg.eval.n_tokens / cfg.data.context_size), 1)
    with phase("held-out contexts"):  # tokenizes until enough held-out documents are found
        held_out = tokens.held_out(
            max(n_eval_contexts, cfg.eval.ce_contexts if cfg.eval.compute_ce else 0),
            cfg.eval.batch_contexts,
        )
    buffer_dtype = TORCH_DTYPES[cfg.buffer.dtype]
    cache = None
    if cfg.cache.dir is not None:
        cache = ActivationCache(
            cfg.cache.dir,
            activation_key_fields(cfg, sites, world.rank, world.world_size),
            {site: source.width(site) for site in sites},
            buffer_dtype,
            cfg.cache.shard_tokens,
            cfg.cache.verify,
        )
    loggers: list[CompositeLogger] = []
    try:
        for i, job in enumerate(jobs):
            loggers.append(
                open_logger(
                    cfg.logger,
                    output_dir / job.name,
                    dataclasses.asdict(job.cfg),
                    prefix=job.name if len(jobs) > 1 else "",
                )
                if dp.writes(i)
                else CompositeLogger([])  # another rank writes this dictionary's rows
            )
        setup = _Setup(
            cfg,
            output_dir,
            checkpoint,
            jobs,
            loggers,
            source,
            tokens,
            held_out,
            cache,
            device,
            sites,
            started,
            dp,
            guard,
        )
        result = _evaluate_and_save(setup, _train(setup))
        if cfg.inspect.enabled and dp.world.is_main:
            _inspect(setup, result)
        return result
    except BaseException:
        for logger in loggers:
            logger.abort()  # a finished logger ignores it
        raise


@dataclass
class _Setup:
    """What run() prepares before training: the LM as a source, the data, the jobs, loggers."""

    cfg: Config
    output_dir: Path
    checkpoint: dict[str, Any] | None  # set when resuming
    jobs: list[_Job]
    loggers: list[CompositeLogger]
    source: ActivationSource
    tokens: TokenSource
    held_out: list[TokenBatch]
    cache: ActivationCache | None
    device: torch.device
    sites: list[str]
    started: float
    dp: DataParallel
    guard: RunGuard  # the run's signal handler: the training loop's signals go to a StopRequest


def _train(setup: _Setup) -> dict[str, Any]:
    """The stream, the buffer and the training loop (checkpoints, signals) for every job;
    returns what saetrain_run.json records about the stream."""
    cfg, checkpoint, jobs, sites = setup.cfg, setup.checkpoint, setup.jobs, setup.sites
    source, cache, device, dp = setup.source, setup.cache, setup.device, setup.dp
    row_width = sum(source.width(site) for site in sites)
    buffer_dtype = TORCH_DTYPES[cfg.buffer.dtype]
    total_steps = max(cfg.trainer.total_tokens // cfg.trainer.batch_tokens, 1)
    # This rank's buffer and batch: its share of the global ones (all of them in one process).
    buffer_tokens = dp.local(cfg.buffer.size_tokens)
    batch_tokens = dp.local(cfg.trainer.batch_tokens)
    # A run that draws fewer rows than the buffer holds reads only those (a quick look before a
    # long run does not fill a long run's buffer first).
    drawn = ActivationBuffer.holds_all_size(buffer_tokens, batch_tokens, total_steps)
    if drawn is not None:
        log.info(
            "buffer: this run draws %d rows (%d steps × %d), fewer than the buffer's %d "
            "(buffer.size_tokens); "
            "the buffer holds just those (filled once, shuffled, never refilled)",
            drawn,
            total_steps,
            batch_tokens,
            buffer_tokens,
        )
        buffer_tokens = drawn
    stop = StopRequest()
    pipeline_start = time.time()
    stream = TrainingStream(
        source,
        setup.tokens,
        sites,
        buffer_dtype,
        cfg.buffer.lm_batch_contexts,
        cache,
        _prefetch_batches(cfg, device),
        torch.Generator().manual_seed(cfg.seed + 1),
        limit_tokens=ActivationBuffer.rows_needed(
            buffer_tokens, batch_tokens, total_steps, holds_all=drawn is not None
        ),
        position=checkpoint["stream"] if checkpoint is not None else None,
    )
    try:
        buffer = ActivationBuffer(
            stream,
            buffer_tokens,
            row_width,
            buffer_dtype,
            device,
            torch.Generator().manual_seed(dp.seed(cfg.seed)),
            state=checkpoint["buffer"] if checkpoint is not None else None,
            holds_all=drawn is not None,
        )
        log.info(
            "buffer: %d tokens × %d sites (%d wide in all) (%s) = %.1f MiB on %s",
            buffer_tokens,
            len(sites),
            row_width,
            cfg.buffer.dtype,
            buffer.storage_bytes() / 2**20,
            device,
        )
        if checkpoint is None:  # every rank's share: the same samples on every rank
            samples = dp.gather(buffer.peek(cfg.trainer.init_batches * batch_tokens))
        for i, job in enumerate(jobs):
            name = job.name if len(jobs) > 1 else ""
            if not dp.mine(i):
                continue  # another rank trains it
            if checkpoint is None:
                job.trainer = prepare_trainer(
                    job.cfg.dictionary,
                    job.cfg.trainer,
                    job.view(samples),
                    job.d_in,
                    job.d_out,
                    job.transcoder,
                    device,
                    torch.Generator().manual_seed(job.cfg.seed),
                    name=name,
                    layout=job.layout,
                    shard=latent_shard(job.cfg, dp.world, job.d_in),
                    start=job.start,
                )
            else:
                if checkpoint["trainers"][i] is None:
                    raise ConfigError(
                        f"resume: this rank ({dp.world.rank}) trains dictionary {job.name}, but "
                        "its state is in another rank's part of the checkpoint; resume with the "
                        "run's distributed.assign"
                    )
                job.trainer = restore_trainer(
                    job.cfg.dictionary,
                    job.cfg.trainer,
                    checkpoint["trainers"][i],
                    job.d_in,
                    job.d_out,
                    job.transcoder,
                    device,
                    name=name,
                    layout=job.layout,
                    shard=latent_shard(job.cfg, dp.world, job.d_in),
                )
            _announce(job)
        if checkpoint is not None:
            set_rng_state(checkpoint["rng"])
        mine = [i for i, job in enumerate(jobs) if job.trainer is not None]
        trainers = [jobs[i].trainer for i in mine]
        dp.report_memory(_memory(trainers, buffer))

        def save(step: int) -> Path:
            state = {
                "format": 1,
                "config": dataclasses.asdict(cfg),
                "step": step,
                "names": [job.name for job in jobs],
                # Each dictionary's state from the rank that writes it (None elsewhere); a
                # latent-sharded one's from every rank, each its own latents.
                "trainers": [
                    job.trainer.state_dict()
                    if job.trainer is not None and (dp.writes(i) or job.trainer.state_per_rank)
                    else None
                    for i, job in enumerate(jobs)
                ],
                "buffer": buffer.state_dict(),
                "stream": stream.position(),
                "rng": rng_state(),
            }
            return save_checkpoint(
                setup.output_dir, step, state, cfg.checkpoint.keep_last, dp.world
            )

        every = cfg.checkpoint.every_tokens
        resumed_tokens = trainers[0].state.tokens  # 0 unless resumed
        train_start = time.time()
        with setup.guard.deferring_to(stop), dp.diverging_together():
            train_together(
                trainers,
                [jobs[i].view for i in mine],
                # The global batch, from every rank's rows (the columns this rank trains on).
                dp.batches(buffer.next_batch, [job.columns for job in jobs]),
                cfg.logger.log_every,
                on_log=lambda i, row: setup.loggers[mine[i]].log(row),
                checkpoint_every=max(every // cfg.trainer.batch_tokens, 1) if every else 0,
                save=save,
                stop=dp.stop_agreed(stop.is_set),
            )
        train_seconds = time.time() - train_start
        pipeline_seconds = time.time() - pipeline_start
    finally:
        stream.close()
    # Over every rank (under torchrun each ran the LM on its own share).
    counts = dp.total(
        {
            "lm_tokens": stream.lm_tokens,
            "lm_contexts": stream.lm_contexts,
            "cached_tokens": stream.cached_tokens,
        }
    )
    lm_tokens, lm_contexts, cached_tokens = (
        int(counts[k]) for k in ("lm_tokens", "lm_contexts", "cached_tokens")
    )
    stream_info = {
        "sites": sites,
        "buffer_tokens": cfg.buffer.size_tokens,
        "buffer_rows": buffer.size,  # this rank's: fewer when the run draws fewer (holds_all)
        "buffer_bytes": buffer.storage_bytes(),
        "lm_tokens": lm_tokens,
        "lm_contexts": lm_contexts,
        "cached_tokens": cached_tokens,
        "cache_dir": str(cache.folder) if cache is not None else None,
        "position": stream.position(),  # this rank's (every rank's is in the checkpoints)
        "world_size": dp.world.world_size,
        "resumed_at_step": checkpoint["step"] if checkpoint is not None else None,
        "train_seconds": train_seconds,
        # From the first buffer fill to the last step: what the LM + buffer + training cost.
        "pipeline_seconds": pipeline_seconds,
        # Tokens trained by this process: a resumed run's checkpointed tokens were made before.
        "tokens_per_s": (trainers[0].state.tokens - resumed_tokens) / max(train_seconds, 1e-9),
        "pipeline_rows_per_s": (lm_tokens + cached_tokens) / max(pipeline_seconds, 1e-9),
    }
    log.info(
        "trained %d dictionar%s on %d tokens in %.1f s (LM on %d tokens, %d from the cache)",
        len(jobs),
        "y" if len(jobs) == 1 else "ies",
        trainers[0].state.tokens,
        train_seconds,
        lm_tokens,
        cached_tokens,
    )
    return stream_info


def _evaluate_and_save(setup: _Setup, stream_info: dict[str, Any]) -> RunResult:
    """Fold, evaluate, save (and upload) each trained dictionary. Under torchrun each rank does
    that for the dictionaries it trains, and only the rank that writes a dictionary saves, logs
    and uploads it; every rank returns every dictionary's result."""
    cfg, jobs, dp = setup.cfg, setup.jobs, setup.dp
    results: list[tuple[int, DictionaryResult]] = []
    publish_errors: list[str] = []
    mine: list[tuple[int, Any]] = []  # (job index, its folded dictionary) that this rank saves
    for i, job in enumerate(jobs):
        if job.trainer is None:
            continue  # another rank's
        fitted = fold(job.trainer)
        if isinstance(job.trainer, ShardedTrainer):  # rank 0 evaluates and saves it whole
            if (whole := job.trainer.gathered(fitted)) is None:
                continue
            fitted = whole
        mine.append((i, fitted))
    evaluated = _evaluate(setup, [(jobs[i], fitted.exported) for i, fitted in mine])
    for (i, fitted), (metrics, frequencies) in zip(mine, evaluated, strict=True):
        job, logger = jobs[i], setup.loggers[i]
        exported, trainer, state = fitted.exported, fitted.trainer, fitted.state
        metrics |= density_summary(frequencies)
        # The training window's dead latents beside the held-out never-fired ones (both named).
        metrics |= training_dead_metrics(
            fitted.tokens_since_fired, trainer.cfg.dead_after_tokens, state.tokens
        )
        metrics |= kind_metrics(exported, job.inputs)  # a crosscoder's decoder-norm shares
        if cfg.eval.suite:  # usefulness suites; SAEBench files into the dictionary's folder
            metrics |= _usefulness(setup, job, exported, dp.writes(i))
        run_info = {
            "config": dataclasses.asdict(job.cfg),
            "run_config": dataclasses.asdict(cfg) if len(jobs) > 1 else None,
            "name": job.name,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "device": str(setup.device),
            "tokens_seen": state.tokens,
            "steps": state.step,
            # dictionary.init_from: the folder it started from and what was taken from it.
            "init_from": job.start.record() if job.start is not None else None,
            "normalization_scale": scale_summary(fitted.scale_in),
            "target_normalization_scale": scale_summary(fitted.scale_out),
            "stream": stream_info,
            "train_seconds": stream_info["train_seconds"],
            "total_seconds": time.time() - setup.started,
            "final_metrics": metrics,
            "train_log": state.history,
        }
        if not dp.writes(i):
            results.append((i, DictionaryResult(job.name, setup.output_dir / job.name, metrics)))
            continue
        sae_metadata = saelens_metadata(
            job.cfg, setup.source, exported.architecture, job.inputs, job.targets
        )
        with phase(f"{_tag(job, jobs)}export to {setup.output_dir / job.name}"):
            sites = setup.source.sites
            inputs, targets = [sites[s] for s in job.inputs], [sites[s] for s in job.targets]
            norm_fold = export_fold(exported, inputs, targets)
            folder = save_dictionary(
                exported,
                setup.output_dir / job.name,
                norm_fold.honest_metadata(sae_metadata, inputs, targets),
                run_info,
                norm_fold.affines,
            )
            model = setup.source.model
            write_extras(
                exported, folder, job.inputs, job.targets, num_layers(model), model_family(model)
            )
        logger.log_density(frequencies, state.step)
        logger.finish(metrics)
        print_summary(metrics, folder, job.name if len(jobs) > 1 else None)
        results.append((i, DictionaryResult(job.name, folder, metrics)))
        if cfg.publish.repo_id:
            try:
                prefix = cfg.publish.prefix
                with phase(f"{_tag(job, jobs)}upload to {cfg.publish.repo_id}"):
                    url = publish_folder(
                        folder, cfg.publish, metrics, f"{prefix}/{job.name}" if prefix else job.name
                    )
                emit(f"published to {url}", log)
            except PublishError as e:
                log.error("%s", e)
                publish_errors.append(str(e))
    # Every rank's, once every rank has saved its own.
    tokens_seen = next(job.trainer.state.tokens for job in jobs if job.trainer is not None)
    gathered, publish_errors = dp.collect(results), dp.collect(publish_errors)
    results = sorted({i: result for i, result in gathered}.items())
    if dp.world.is_main:  # per-layer transcoders spliced together, and their circuit-tracer files
        _transcoder_sets(setup, [r for _, r in results])
    # Saved (an upload that failed can be redone by hand): resume now answers "already finished".
    if dp.world.is_main:
        mark_finished(setup.output_dir, [r.name for _, r in results], tokens_seen)
    if publish_errors:
        raise PublishError(
            "training finished and every dictionary is saved locally, but uploading failed:\n  "
            + "\n  ".join(publish_errors)
        )
    done = [r for _, r in results]
    return RunResult(setup.output_dir, done[0].dictionary_dir, done[0].metrics, done)


def _transcoder_sets(setup: _Setup, results: list[DictionaryResult]) -> None:
    """Evaluate and write each transcoder set of the run (evaluation/transcoder_sets.py)."""
    folders = {r.name: r.dictionary_dir for r in results}
    sets = find_sets(
        [
            (job.cfg.dictionary.kind, job.input_site, job.target_site, folders[job.name])
            for job in setup.jobs
            if job.name in folders
        ]
    )
    cfg, model = setup.cfg, setup.source.model
    ce_batches = (
        first_contexts(setup.held_out, cfg.eval.ce_contexts) if cfg.eval.compute_ce else None
    )
    for transcoder_set in sets:
        evaluate_and_export_set(
            transcoder_set,
            setup.source,
            ce_batches,
            setup.output_dir,
            num_layers(model),
            model_family(model),
        )


def _evaluate(
    setup: _Setup, fitted: list[tuple[_Job, Dictionary]]
) -> list[tuple[dict[str, float], torch.Tensor]]:
    """The held-out metrics and latent firing frequencies of every dictionary this rank saves,
    from one pass of the LM over the held-out contexts (evaluate_dictionaries), then, with
    `eval.splice_each`, each spliced into the LM on its own for CE/KL; with progress lines (minutes
    on a big model). Under data parallel (every rank holds every dictionary) each rank evaluates
    its share of the contexts and the sums are reduced (evaluation/shared_eval.py); otherwise
    this rank does it all."""
    if not fitted:
        return []
    cfg, source, dp = setup.cfg, setup.source, setup.dp
    together = dp.owners is None and not isinstance(fitted[0][0].trainer, ShardedTrainer)
    world = dp.world if together else World()
    held_out = my_contexts(world, setup.held_out)
    if world.distributed:
        log.info(
            "held-out evaluation shared by %d ranks: rank 0 evaluates %d of %d contexts",
            world.world_size,
            sum(len(b) for b in held_out),
            sum(len(b) for b in setup.held_out),
        )
    tag = _tag(fitted[0][0], setup.jobs) if len(fitted) == 1 else f"[{len(fitted)} dictionaries] "
    evaluated = evaluate_dictionaries(
        source,
        [Evaluated(exported, job.inputs, job.targets) for job, exported in fitted],
        ReportedList(held_out, f"{tag}evaluation", "contexts", len),
        reduce=lambda stats: reduce_stats(world, stats),
    )
    if cfg.eval.compute_ce and cfg.eval.splice_each:
        ce_batches = my_contexts(world, first_contexts(setup.held_out, cfg.eval.ce_contexts))
        for (job, exported), (metrics, _) in zip(fitted, evaluated, strict=True):
            mine = None
            if ce_batches:
                tag = _tag(job, setup.jobs)
                mine = replacement_lm_metrics(
                    source.models,
                    [splice_member(source, exported, job.inputs, job.targets)],
                    ReportedList(ce_batches, f"{tag}CE splicing", "contexts", len),
                )
            metrics |= reduce_ce(world, mine)
    return evaluated


def _usefulness(setup: _Setup, job: _Job, exported: Dictionary, write: bool) -> dict[str, float]:
    """eval.suite on one trained dictionary, with the run's LM (evaluation/usefulness)."""
    from saetrain.evaluation.usefulness import SuiteContext
    from saetrain.evaluation.usefulness.suites import evaluate_usefulness

    source = setup.source
    ctx = SuiteContext(source.model, setup.tokens.packer.tokenizer, exported, source, job.inputs,
                       setup.cfg.model.name, job.name, setup.device, job.cfg.seed,
                       setup.output_dir / job.name)  # fmt: skip
    return evaluate_usefulness(ctx, setup.cfg.eval, write)[0]


def _inspect(setup: _Setup, result: RunResult) -> None:
    """`inspect.enabled`: the latent site (saetrain/inspect) for the dictionaries just saved,
    with the run's LM; into <run>/inspect (a one-dictionary run: <folder>/inspect)."""
    from saetrain.inspect.pipeline import InspectConfig, inspect

    i = setup.cfg.inspect
    folder = result.output_dir if len(result.dictionaries) > 1 else result.dictionary_dir
    lm = (setup.source.model, setup.tokens.packer.tokenizer)
    with phase("inspect the latents"):
        inspect(InspectConfig(path=str(folder), n_tokens=i.n_tokens, top_k=i.top_k,
                              features=i.features), lm=lm)  # fmt: skip


def _already_finished(output_dir: Path, says: bool = True) -> RunResult:
    """The result a finished run saved, for a resume that has nothing left to do (`says`: the
    rank that reports it)."""
    marker = finished(output_dir) or {}
    results = []
    for name in marker.get("dictionaries", []):
        folder = output_dir / name
        info = json.loads((folder / "saetrain_run.json").read_text())
        results.append(DictionaryResult(name, folder, info["final_metrics"]))
    if says:
        emit(f"saetrain: already finished: {output_dir} (nothing to resume; left as it was)", log)
    first = results[0] if results else DictionaryResult("", output_dir, {})
    return RunResult(output_dir, first.dictionary_dir, first.metrics, results, True)


def _source(
    cfg: Config, model: torch.nn.Module, tokenizer: Any, sites: list[str], device: torch.device
) -> ActivationSource:
    """The LM as a source of the sites; with model_b, both models on the same tokens (unknown
    site / layer out of range fail here)."""
    if second_model(cfg) is None:
        return ActivationSource(model, sites)
    model_b_cfg = dataclasses.replace(cfg.model_b, device=cfg.model.device)
    with phase(f"model load ({model_b_cfg.name}, model_b)"):
        model_b, tokenizer_b = load_lm(model_b_cfg, device)
    check_same_tokenizer(tokenizer, tokenizer_b, cfg.model.name, model_b_cfg.name)
    sites_a, sites_b = split_sites(sites)
    return PairedSource(ActivationSource(model, sites_a), ActivationSource(model_b, sites_b))


def _cost(job: _Job) -> float:
    """What a dictionary weighs on the rank that trains it (for sharing them out)."""
    d = job.cfg.dictionary
    per_site = d.n_latents or d.expansion_factor * job.layout.in_widths[0]
    n_latents = per_site * (len(job.inputs) if d.kind == "clt" else 1)
    return dictionary_cost(n_latents, job.d_in, job.d_out)


def _memory(trainers: list[Trainer], buffer: ActivationBuffer) -> dict[str, int]:
    """Bytes this rank holds for training: weights, Adam's two moments of them, the buffer."""
    weights = sum(p.numel() * p.element_size() for t in trainers for p in t.dictionary.parameters())
    return {"weights": weights, "adam_state": 2 * weights, "buffer": buffer.storage_bytes()}


def _prefetch_batches(cfg: Config, device: torch.device) -> int:
    """buffer.prefetch_batches, or its default for the device (2 on a GPU, 0 on a CPU)."""
    if cfg.buffer.prefetch_batches is not None:
        return cfg.buffer.prefetch_batches
    return 2 if device.type == "cuda" else 0


def normalized(cfg: Config) -> Config:
    """`cfg` with every `dictionaries` entry as a DictionarySpec and site names canonical (a
    checkpoint's config then compares equal however the entries and sites were written)."""
    specs = [
        spec if isinstance(spec, DictionarySpec) else merged(DictionarySpec(), spec, "dictionaries")
        for spec in cfg.dictionaries
    ]
    return canonical_sites(dataclasses.replace(cfg, dictionaries=specs))


def _tag(job: _Job, jobs: list[_Job]) -> str:
    return f"[{job.name}] " if len(jobs) > 1 else ""


def _announce(job: _Job) -> None:
    trainer = job.trainer
    assert trainer is not None
    dictionary = trainer.dictionary
    what = {"crosscoder": "crosscoder", "clt": "CLT"}.get(
        dictionary.kind, "transcoder" if job.transcoder else "SAE"
    )
    log.info(
        "dictionary %s: %s %s, %s → %s, %d latents; normalisation scales %s / %s; "
        "%d steps of %d tokens, lr %.3g",
        job.name,
        dictionary.architecture,
        what,
        ", ".join(job.inputs),
        ", ".join(job.targets),
        trainer.shard.n_latents if isinstance(trainer, ShardedTrainer) else dictionary.n_latents,
        _scales_text(trainer.scale),
        _scales_text(trainer.target_scale),
        trainer.total_steps,
        trainer.cfg.batch_tokens,
        trainer.base_lr,
    )

    if isinstance(dictionary, CLTStructure):
        L, n, d = dictionary.n_layers, dictionary.layer_latents, dictionary.layer_d_out
        decoder_bytes = sum(W.numel() * W.element_size() for W in dictionary.W_dec)
        log.info(
            "dictionary %s: CLT decoders: L(L+1)/2 = %d blocks of %d × %d (%.1f MiB, %.1f MiB "
            "with Adam's two moments); they grow with the square of the layer count",
            job.name,
            L * (L + 1) // 2,
            n,
            d,
            decoder_bytes / 2**20,
            3 * decoder_bytes / 2**20,
        )


def _scales_text(scale: float | torch.Tensor) -> str:
    summary = scale_summary(scale)
    if isinstance(summary, list):
        return "[" + ", ".join(f"{v:.4g}" for v in summary) + "]"
    return f"{summary:.4g}"


def saelens_metadata(
    cfg: Config,
    source: ActivationSource,
    architecture: str,
    inputs: list[str] | None = None,
    targets: list[str] | None = None,
) -> dict[str, Any]:
    """cfg.json's metadata block: which model, hook(s) and data the dictionary belongs to.

    `inputs` / `targets`: the sites of a dictionary that reads several (a crosscoder's sources, a
    CLT's layers); SAELens's single-hook fields then name the first, and `hook_names` (and
    `hook_names_out`) list them all.
    """
    inputs = inputs or [cfg.site.input]
    targets = targets or [cfg.site.target or cfg.site.input]
    resolved = source.sites[inputs[0]]
    metadata: dict[str, Any] = {
        "model_name": cfg.model.name,
        "hook_name": resolved.tl_hook_name,
        "hook_layer": resolved.site.layer,
        "hook_head_index": None,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": cfg.data.path if cfg.data.path != "text" else "local text files",
        "model_from_pretrained_kwargs": {},
        "saetrain_architecture": architecture,
        "saetrain_site": inputs[0],
        # How the model loads (a packaged GGUF file, a revision): what `model_name` alone does
        # not say, so that a folder without its saetrain_run.json still evaluates offline.
        "saetrain_model": model_record(cfg.model),
    }
    if len(inputs) > 1:
        metadata |= {
            "saetrain_kind": cfg.dictionary.kind,
            "hook_names": [source.sites[site].tl_hook_name for site in inputs],
            "saetrain_sites": inputs,
        }
    if targets != inputs:
        resolved_out = source.sites[targets[0]]
        metadata |= {
            "hook_name_out": resolved_out.tl_hook_name,
            "hook_layer_out": resolved_out.site.layer,
            "hook_head_index_out": None,
            "saetrain_target_site": targets[0],
        }
        if len(targets) > 1:
            metadata |= {
                "hook_names_out": [source.sites[site].tl_hook_name for site in targets],
                "saetrain_target_sites": targets,
            }
    return metadata


def model_record(model: ModelConfig) -> dict[str, Any]:
    """The model group's fields that say how the model loads (not the machine's device)."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k != "device"}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("saetrain", "torch", "transformers", "datasets", "safetensors", "hydra-core"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """The saetrain source's git commit, when it runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


def print_summary(metrics: dict[str, Any], folder: Path, name: str | None = None) -> None:
    lines = ["", f"held-out evaluation{f' of {name}' if name else ''}:"]
    for key in (
        "fvu",
        "fvu_zero_baseline",
        "mse",
        "l0",
        "never_fired_fraction",
        "never_fired_tokens",
        "dense_count",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "delta_ce",
        "ce_recovered",
        "kl_div",
    ):
        if key in metrics:
            whole = key.endswith(("_count", "_tokens"))  # counts print as counts
            lines.append(f"  {key:<20} {metrics[key]:{'.0f' if whole else '.4f'}}")
    for key, value in metrics.items():  # per site / layer / model: fvu.mlp_out.3, ce_spliced@b
        if ("." in key or "@" in key) and isinstance(value, float):
            lines.append(f"  {key:<20} {value:.4f}")
    if "dead_fraction" in metrics:  # not held-out: the training window's
        lines.append(
            f"training: dead_fraction {metrics['dead_fraction']:.4f} (no firing in the last "
            f"{metrics['dead_window_tokens']:.0f} training tokens)"
        )
    lines.append(f"dictionary saved to {folder}")
    emit("\n".join(lines), log)  # the console and the run's log file
