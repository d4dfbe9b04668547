"""Robustness of the stream, the cache, resume and run(): concurrent cache users, a writer's
position, resume settings, and resources released on failure (each was a bug once)."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import saetrain.activations.cache as cache_module
from saetrain.activations.cache import ActivationCache, activation_key_fields
from saetrain.activations.model import load_lm
from saetrain.activations.prefetch import Prefetcher
from saetrain.activations.source import ActivationSource
from saetrain.activations.stream import TrainingStream
from saetrain.activations.tokens import TokenSource
from saetrain.config import CacheConfig, CheckpointConfig
from saetrain.errors import ConfigError
from saetrain.export.saelens import load_dictionary
from saetrain.run import run
from saetrain.training import trainer as trainer_module
from tests.helpers.runs import _config, _toy_cache

SITE = "resid_post.1"


def _stream(cfg, source, tokenizer, cache, position=None) -> TrainingStream:
    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    return TrainingStream(
        source, tokens, [SITE], torch.float32, 4, cache, 0, torch.Generator(), position=position
    )


def _model_cache(cfg, root: Path, shard_tokens: int) -> ActivationCache:
    fields = activation_key_fields(cfg, [SITE])
    return ActivationCache(root, fields, {SITE: 32}, torch.float32, shard_tokens)


# -- cache ------------------------------------------------------------------------------------


def test_opening_the_cache_does_not_delete_a_live_writers_shard(tmp_path, monkeypatch):
    writer = _toy_cache(tmp_path)
    assert writer.acquire()
    real = cache_module.atomic_write_json

    def manifest_write(path, obj):
        _toy_cache(tmp_path)  # another run opens the cache between shard rename and manifest
        real(path, obj)

    monkeypatch.setattr(cache_module, "atomic_write_json", manifest_write)
    writer.add(torch.ones(10, 4), 2)  # > shard_tokens: a shard, then the manifest
    monkeypatch.undo()
    writer.release()
    reader = _toy_cache(tmp_path)
    assert len(reader.shards) == 1
    reader.read_shard(reader.shards[0])  # CacheError: listed in the manifest but missing


def test_a_killed_writer_leaves_no_lock_and_a_live_one_excludes_others(tmp_path):
    """The writer lock is an flock: a SIGKILLed holder releases it, a live one keeps others out."""
    script = (
        "import sys, time, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.helpers.runs import _toy_cache\n"
        f"c = _toy_cache(__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "assert c.acquire(); print('locked', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        assert not _toy_cache(tmp_path).acquire()  # the live writer keeps the key
    finally:
        child.kill()
        child.wait()
    survivor = _toy_cache(tmp_path)
    assert survivor.acquire()  # the kernel released the dead writer's lock
    survivor.release()


def test_a_writer_with_a_stale_manifest_does_not_clobber_shards(tmp_path):
    late = _toy_cache(tmp_path)  # run A opens the cache (manifest: empty) ...
    early = _toy_cache(tmp_path)  # ... while run B writes two shards and finishes
    assert early.acquire()
    early.add(torch.full((8, 4), 1.0), 2)
    early.add(torch.full((8, 4), 2.0), 2)
    early.release()
    reader = _toy_cache(tmp_path)  # run C sees B's shards
    assert len(reader.shards) == 2
    assert late.acquire()  # A becomes the writer with its stale manifest
    late.add(torch.full((9, 4), 3.0), 2)
    late.release()
    for entry in reader.shards:
        reader.read_shard(entry)  # CacheError: shard-000000 corrupted (overwritten by A)
    assert _toy_cache(tmp_path).contexts >= 4  # B's shards are still listed


def test_a_writer_only_caches_rows_at_the_end_of_the_cache(tiny_model, corpus, tmp_path):
    cfg = _config(tiny_model, corpus, "topk", None)
    model, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    source = ActivationSource(model, [SITE])
    ref = _stream(cfg, source, tokenizer, None)
    reference = torch.cat([next(ref) for _ in range(4)])
    ref.close()
    # A resumed run (its checkpoint: 8 contexts taken, no cache shards read) on an empty cache.
    cache = _model_cache(cfg, tmp_path, shard_tokens=10**6)
    position = {"rows_out": 0, "contexts_out": 8, "cached_chunks_out": 0, "cache_shards": 0}
    resumed = _stream(cfg, source, tokenizer, cache, position)
    next(resumed), next(resumed)
    resumed.close()
    again = _model_cache(cfg, tmp_path, shard_tokens=10**6)
    for entry in again.shards:
        assert entry["contexts"] > 0
    cached = torch.cat([again.read_shard(s) for s in again.shards]) if again.shards else None
    if cached is not None:  # what the cache says are contexts 0.. must be contexts 0..
        assert torch.equal(cached, reference[: len(cached)])


# -- resume -----------------------------------------------------------------------------------


def test_resume_with_another_cache_dir_is_refused_or_exact(
    tiny_model, corpus, tmp_path, monkeypatch
):
    base = _config(tiny_model, corpus, "topk", None)
    cfg = replace(
        base,
        trainer=replace(base.trainer, total_tokens=4096),
        checkpoint=CheckpointConfig(every_tokens=1024, keep_last=1),
        eval=replace(base.eval, compute_ce=False),
        cache=CacheConfig(dir=str(tmp_path / "cache"), shard_tokens=700),
    )
    # Fill the cache with more than the run needs, so the runs below only read it.
    model, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    writer = TrainingStream(
        ActivationSource(model, [SITE]),
        TokenSource(cfg.data, tokenizer, cfg.seed),
        [SITE],
        torch.float32,
        cfg.buffer.lm_batch_contexts,
        _model_cache(cfg, tmp_path / "cache", 700),
        0,
        torch.Generator(),
    )
    while writer.rows_out < 8192:
        next(writer)
    writer.close()

    whole = run(cfg, tmp_path / "whole")
    real = trainer_module.Trainer.step
    calls = [0]

    def step(self, batch):
        calls[0] += 1
        if calls[0] == 7:
            raise RuntimeError("crash")
        return real(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    with pytest.raises(RuntimeError, match="crash"):
        run(cfg, tmp_path / "a")
    monkeypatch.undo()
    try:
        no_cache = replace(cfg.cache, dir=None)  # only cache.dir differs
        resumed = run(replace(cfg, resume=str(tmp_path / "a"), cache=no_cache), tmp_path)
    except ConfigError:
        return  # refused: fine
    a = load_dictionary(whole.dictionary_dir).state_dict()
    b = load_dictionary(resumed.dictionary_dir).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def test_resume_false_means_no_resume(tiny_model, corpus, tmp_path):
    from saetrain.training.checkpoint import wants_resume

    # Hydra turns `resume=false` into the string 'False'.
    assert [wants_resume(v) for v in ("False", "false", "null", "", None)] == [False] * 5
    assert wants_resume("true") and wants_resume("/runs/a")
    result = run(replace(_config(tiny_model, corpus, "topk", None), resume="False"), tmp_path)
    assert result.output_dir == tmp_path


# -- run() resources --------------------------------------------------------------------------


def test_loggers_are_closed_when_evaluation_fails(tiny_model, corpus, tmp_path, monkeypatch):
    import saetrain.run.finish as finish_module  # where run() looks evaluate_dictionaries up
    import saetrain.run.load as load_module  # where run() looks open_logger up

    opened = []
    real_open = load_module.open_logger

    def open_logger(*args, **kwargs):
        logger = real_open(*args, **kwargs)
        opened.append(logger)
        return logger

    def failing_eval(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(load_module, "open_logger", open_logger)
    monkeypatch.setattr(finish_module, "evaluate_dictionaries", failing_eval)
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(cfg, trainer=replace(cfg.trainer, total_tokens=512))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(cfg, tmp_path)
    assert opened
    assert all(logger._finished for logger in opened)
    assert all(b._file.closed for logger in opened for b in logger.backends if hasattr(b, "_file"))


# -- prefetcher -------------------------------------------------------------------------------


def test_prefetcher_setup_failure_reaches_the_consumer():
    def items():
        yield torch.zeros(1)

    # On a machine without CUDA (CI), creating the side stream fails, as a bad device would.
    if torch.cuda.is_available():
        pytest.skip("needs a machine where torch.cuda.Stream fails")
    prefetcher = Prefetcher(items(), 1, torch.device("cuda"))
    outcome: list[str] = []

    def consume() -> None:
        try:
            next(prefetcher)
            outcome.append("item")
        except BaseException as e:  # noqa: BLE001 - any error reaching the consumer is right
            outcome.append(type(e).__name__)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=3)
    hung = consumer.is_alive()
    if hung:
        prefetcher._queue.put(object())  # unblock the consumer thread so it does not linger
    assert not hung, "the consumer blocks forever after the producer thread died"
