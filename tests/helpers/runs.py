"""Seconds-long run configurations on the tiny Llama, and the hooks tests use around them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from saetrain.activations.cache import ActivationCache
from saetrain.config import (
    BufferConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.training import trainer as trainer_module


def _config(tiny_model: Path, corpus: Path, arch: str, target: str | None) -> Config:
    return Config(
        model=ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="mlp_in.1" if target else "resid_post.1", target=target),
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        dictionary=DictionaryConfig(
            architecture=arch, n_latents=64, k=4, skip=target is not None, sparsity_coefficient=0.1
        ),
        trainer=TrainerConfig(
            total_tokens=2048, batch_tokens=256, lr=1e-3, warmup_steps=2, init_batches=2
        ),
        eval=EvalConfig(n_tokens=256, batch_contexts=8, ce_contexts=8),
        logger=LoggerConfig(log_every=4),
    )


def _tiny_overrides(model: Path, corpus: Path) -> list[str]:
    """What turns the default job into a seconds-long run on the tiny Llama."""
    return [
        f"model.name={model}", "model.gguf_package=null", "model.device=cpu",
        f"data.data_files=[{corpus}/*.txt]", "data.context_size=16", "data.holdout_percent=10",
        "site.input=resid_post.1", "buffer.size_tokens=1024", "buffer.lm_batch_contexts=8",
        "dictionary.n_latents=64", "trainer.total_tokens=2048", "trainer.batch_tokens=256",
        "trainer.lr=1e-3", "trainer.warmup_steps=2", "trainer.init_batches=2",
        "eval.n_tokens=256", "eval.batch_contexts=8", "eval.ce_contexts=8", "logger.log_every=4",
    ]  # fmt: skip


def _cfg(tiny_model: Path, corpus: Path, arch: str = "topk", **trainer) -> Config:
    cfg = _config(tiny_model, corpus, arch, None)
    return replace(
        cfg,
        trainer=replace(cfg.trainer, total_tokens=4096, **trainer),
        checkpoint=CheckpointConfig(every_tokens=1024, keep_last=2),  # every 4 steps of 16
    )


def _fail_at_step(monkeypatch, n: int, error: BaseException) -> None:
    """Make the n-th training step raise `error` (as a crash or a kill would stop it)."""
    real = trainer_module.Trainer.step
    calls = [0]

    def step(self, batch):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return real(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)


def _toy_cache(root: Path, shard_tokens: int = 8) -> ActivationCache:
    """A cache that needs no model: one site of width 4."""
    fields = {"format": 1, "model": "toy", "sites": ["s"]}
    return ActivationCache(root, fields, {"s": 4}, torch.float32, shard_tokens)
