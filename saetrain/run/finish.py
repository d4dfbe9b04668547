"""How a run ends, once training is over: each trained dictionary folded (its normalisation into
its weights), gathered whole (a latent-sharded one), evaluated on the held-out contexts (and the
usefulness suites), exported into its folder and published; then the transcoder sets, the "run
finished" mark, and the latent site (`inspect.enabled`).

Under torchrun each rank does that for the dictionaries it trains, and only the rank that writes a
dictionary saves, logs and uploads it; every rank returns every dictionary's result."""

from __future__ import annotations

import logging
from typing import Any

import torch

from saetrain.activations.sites import model_family, num_layers
from saetrain.dictionaries import Dictionary
from saetrain.distributed import World
from saetrain.errors import PublishError
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
from saetrain.evaluation.usefulness import SuiteContext
from saetrain.evaluation.usefulness.suites import evaluate_usefulness
from saetrain.export.extras import kind_metrics, write_extras
from saetrain.export.hub import publish_folder
from saetrain.export.norm_space import export_fold
from saetrain.export.saelens import save_dictionary
from saetrain.inspect.pipeline import InspectConfig, inspect
from saetrain.progress import ReportedList, emit, phase
from saetrain.run.load import Setup
from saetrain.run.plan import Job
from saetrain.run.report import print_summary, run_record, saelens_metadata, tag
from saetrain.run.result import DictionaryResult, RunResult
from saetrain.training.fit import fold
from saetrain.training.run_folder import mark_finished

log = logging.getLogger("saetrain.run")  # the run's one logger, whichever module of it writes


def finish(setup: Setup, stream_info: dict[str, Any]) -> RunResult:
    """Fold, evaluate, save (and upload) each trained dictionary; the transcoder sets; mark the
    run finished; inspect its latents. `stream_info`: what saetrain_run.json records about the
    stream."""
    cfg, jobs, dp = setup.cfg, setup.jobs, setup.dp
    results: list[tuple[int, DictionaryResult]] = []
    publish_errors: list[str] = []
    mine: list[tuple[int, Any]] = []  # (job index, its folded dictionary) that this rank saves
    for i, job in enumerate(jobs):
        if job.trainer is None:
            continue  # another rank's
        fitted = fold(job.trainer)
        if job.trainer.shard is not None:  # rank 0 evaluates and saves it whole
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
        run_info = run_record(setup, job, fitted, metrics, stream_info)
        if not dp.writes(i):
            results.append((i, DictionaryResult(job.name, setup.output_dir / job.name, metrics)))
            continue
        sae_metadata = saelens_metadata(
            job.cfg, setup.source, exported.architecture, job.inputs, job.targets
        )
        with phase(f"{tag(job, jobs)}export to {setup.output_dir / job.name}"):
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
                with phase(f"{tag(job, jobs)}upload to {cfg.publish.repo_id}"):
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
    result = RunResult(setup.output_dir, done[0].dictionary_dir, done[0].metrics, done)
    if cfg.inspect.enabled and dp.world.is_main:
        _inspect(setup, result)
    return result


def _transcoder_sets(setup: Setup, results: list[DictionaryResult]) -> None:
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
    setup: Setup, fitted: list[tuple[Job, Dictionary]]
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
    together = dp.owners is None and fitted[0][0].trainer.shard is None
    world = dp.world if together else World()
    held_out = my_contexts(world, setup.held_out)
    if world.distributed:
        log.info(
            "held-out evaluation shared by %d ranks: rank 0 evaluates %d of %d contexts",
            world.world_size,
            sum(len(b) for b in held_out),
            sum(len(b) for b in setup.held_out),
        )
    label = tag(fitted[0][0], setup.jobs) if len(fitted) == 1 else f"[{len(fitted)} dictionaries] "
    evaluated = evaluate_dictionaries(
        source,
        [Evaluated(exported, job.inputs, job.targets) for job, exported in fitted],
        ReportedList(held_out, f"{label}evaluation", "contexts", len),
        reduce=lambda stats: reduce_stats(world, stats),
    )
    if cfg.eval.compute_ce and cfg.eval.splice_each:
        ce_batches = my_contexts(world, first_contexts(setup.held_out, cfg.eval.ce_contexts))
        for (job, exported), (metrics, _) in zip(fitted, evaluated, strict=True):
            mine = None
            if ce_batches:
                mine = replacement_lm_metrics(
                    source.models,
                    [splice_member(source, exported, job.inputs, job.targets)],
                    ReportedList(ce_batches, f"{tag(job, setup.jobs)}CE splicing", "contexts", len),
                )
            metrics |= reduce_ce(world, mine)
    return evaluated


def _usefulness(setup: Setup, job: Job, exported: Dictionary, write: bool) -> dict[str, float]:
    """eval.suite on one trained dictionary, with the run's LM (evaluation/usefulness)."""
    source = setup.source
    ctx = SuiteContext(source.model, setup.tokens.packer.tokenizer, exported, source, job.inputs,
                       setup.cfg.model.name, job.name, setup.device, job.cfg.seed,
                       setup.output_dir / job.name)  # fmt: skip
    return evaluate_usefulness(ctx, setup.cfg.eval, write)[0]


def _inspect(setup: Setup, result: RunResult) -> None:
    """`inspect.enabled`: the latent site (saetrain/inspect) for the dictionaries just saved,
    with the run's LM; into <run>/inspect (a one-dictionary run: <folder>/inspect)."""
    i = setup.cfg.inspect
    folder = result.output_dir if len(result.dictionaries) > 1 else result.dictionary_dir
    lm = (setup.source.model, setup.tokens.packer.tokenizer)
    with phase("inspect the latents"):
        inspect(InspectConfig(path=str(folder), n_tokens=i.n_tokens, top_k=i.top_k,
                              features=i.features), lm=lm)  # fmt: skip
