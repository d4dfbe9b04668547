"""The optimisation loop for one dictionary fed by an activation buffer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from saetrain.config import TrainerConfig
from saetrain.dictionaries.base import (
    Dictionary,
    LatentSplit,
    Scale,
    TrainOutput,
    active_count,
    fired_latents,
)
from saetrain.errors import TrainingDiverged
from saetrain.evaluation.metrics import reconstruction_metrics
from saetrain.progress import duration, human
from saetrain.training.l0_controller import L0Controller, too_short
from saetrain.training.schedules import default_lr, lr_multiplier

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _finite_later(loss: torch.Tensor) -> Callable[[], bool]:
    """Whether `loss` is finite, asked for now and read later. On CUDA the flag is copied to
    pinned memory behind the forward, and reading it waits for that copy alone: the host can
    queue the backward meanwhile, and the GPU runs it instead of idling at a sync."""
    finite = torch.isfinite(loss.detach())
    if not finite.is_cuda:
        return lambda: bool(finite)
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    flag.copy_(finite, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> bool:
        copied.synchronize()
        return bool(flag)

    return read


class Trainer:
    """Adam on a dictionary, with its decoder constraint, sparsity warm-up and dead-latent tracking.

    Activations arrive raw and are multiplied by `scale` (so E‖x‖² = d). A transcoder's batches
    are rows [x, y] of width d_in + d_out; y is multiplied by `target_scale`. A dictionary on
    several sites has one scale per column (each site's own, see block_normalization_scales).

    The forward, the gradient clipping and the logged batch statistics are methods of their own
    so that a dictionary split over ranks (saetrain/training/latent_shard.py) can make them
    global; everything else is the same loop.
    """

    # Whether every rank checkpoints its own state of this trainer (a latent shard), rather than
    # one rank the whole of it.
    state_per_rank: bool = False
    # This rank's part of the dictionary's latents when they are split over ranks (a
    # ShardedTrainer sets it); None: the trainer holds the whole dictionary.
    shard: LatentSplit | None = None

    def __init__(
        self,
        dictionary: Dictionary,
        cfg: TrainerConfig,
        scale: Scale,
        total_steps: int,
        target_scale: Scale | None = None,
        name: str = "",
    ):
        self.dictionary = dictionary
        self.name = name  # prefixes progress lines when several dictionaries train together
        self.cfg = cfg
        self.scale = self._on_device(scale)
        self.target_scale = self.scale if target_scale is None else self._on_device(target_scale)
        self.total_steps = total_steps
        self.base_lr = cfg.lr if cfg.lr is not None else default_lr(dictionary.n_latents)
        device = dictionary.W_enc.device
        self.optimizer = torch.optim.Adam(
            dictionary.parameters(),
            lr=self.base_lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            # One fused kernel for all parameters on CUDA (what scripts/bench_kernels.py times);
            # torch's default elsewhere. Same update, same state_dict: resume is unaffected.
            fused=True if device.type == "cuda" else None,
        )
        self.tokens_since_fired = torch.zeros(
            dictionary.n_latents, dtype=torch.int64, device=device
        )
        self.state = TrainState()
        # dictionary.target_l0: λ adapted towards it (penalty architectures only).
        target_l0 = getattr(dictionary, "target_l0", None)
        self.l0_controller = (
            L0Controller(target_l0, cfg.target_l0_gain) if target_l0 is not None else None
        )
        if target_l0 is not None:
            reason = too_short(total_steps, cfg.sparsity_warmup_steps, cfg.batch_tokens, target_l0)
            if reason is not None:
                log.warning("%s%s", f"[{name}] " if name else "", reason)

    def _on_device(self, scale: Scale) -> Scale:
        """A number stays a float; per-column scales live beside the weights."""
        if isinstance(scale, torch.Tensor):
            return scale.to(self.dictionary.b_dec.device, torch.float32)
        return float(scale)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: weights, Adam, counters, scales."""
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "scale": self._saved(self.scale),
            "target_scale": self._saved(self.target_scale),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "history": self.state.history,
            **(
                {"l0_controller": self.l0_controller.state_dict()}
                if self.l0_controller is not None
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(self._same_implementation(state["optimizer"]))
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.scale = self._on_device(state["scale"])
        self.target_scale = self._on_device(state["target_scale"])
        self.state = TrainState(int(state["step"]), int(state["tokens"]), list(state["history"]))
        if self.l0_controller is not None and "l0_controller" in state:
            self.l0_controller.load_state_dict(state["l0_controller"])

    @staticmethod
    def _saved(scale: Scale) -> Scale:
        return scale.detach().cpu() if isinstance(scale, torch.Tensor) else scale

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target), normalised, from a raw batch."""
        d = self.dictionary
        batch = batch.to(d.W_enc.dtype)
        dtype = d.W_enc.dtype  # per-column scales are float32: the product keeps the weights' dtype
        if not d.transcoder:
            x = (batch * self.scale).to(dtype)
            return x, x
        x, y = batch[:, : d.d_in] * self.scale, batch[:, d.d_in :] * self.target_scale
        return x.to(dtype), y.to(dtype)

    def _same_implementation(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved optimizer state with this run's Adam implementation (fused on CUDA, torch's
        default elsewhere): load_state_dict would otherwise bring back the saving run's, and a
        checkpoint may resume on another device."""
        mine = self.optimizer.param_groups
        groups = [
            g | {key: m.get(key) for key in ("fused", "foreach") if key in m}
            for g, m in zip(saved["param_groups"], mine, strict=False)
        ]
        return saved | {"param_groups": groups}

    def step(self, batch: torch.Tensor) -> tuple[torch.Tensor, TrainOutput]:
        """One optimiser step on a batch of raw activations.

        Returns the normalised target and the forward's output, for logging.
        """
        d = self.dictionary
        x, y = self.split(batch)
        step = self.state.step
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * lr_multiplier(
                step, self.total_steps, self.cfg.warmup_steps, self.cfg.decay_fraction
            )
        warmup = self.cfg.sparsity_warmup_steps
        sparsity = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if self.l0_controller is not None:
            sparsity *= self.l0_controller.factor
        out = self.forward(x, y, sparsity)
        finite = _finite_later(out.loss)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if not finite():  # before the update: the weights (and the last checkpoint) stay good
            raise TrainingDiverged(
                f"the loss is {float(out.loss.detach())} at step {step + 1}"
                f"{f' of dictionary {self.name}' if self.name else ''} "
                f"(terms: {', '.join(f'{k}={float(v):.4g}' for k, v in out.terms.items())}); "
                "training stopped before applying it"
            )
        if d.unit_norm_decoder:
            d.remove_gradient_parallel_to_decoder()
        if self.cfg.grad_clip > 0:
            self.clip_gradients(self.cfg.grad_clip)
        self.optimizer.step()
        if d.unit_norm_decoder:
            d.set_decoder_unit_norm()
        d.after_step(out)
        if self.l0_controller is not None and step + 1 >= warmup:
            self.l0_controller.update(self.mean_l0(out, x.shape[0]))
            d.shift_sparsity(self.l0_controller.shift)

        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired.masked_fill_(fired_latents(out.codes, d.n_latents), 0)
        self.state.step += 1
        self.state.tokens += x.shape[0]
        return y, out

    def forward(self, x: torch.Tensor, y: torch.Tensor, sparsity: float) -> TrainOutput:
        """The dictionary's training forward on normalised rows."""
        return self.dictionary.training_forward(x, y, self.dead_mask(), sparsity)

    def clip_gradients(self, max_norm: float) -> None:
        """Scale the gradients so that their global norm is at most `max_norm`."""
        torch.nn.utils.clip_grad_norm_(self.dictionary.parameters(), max_norm)

    def batch_metrics(self, y: torch.Tensor, out: TrainOutput) -> dict[str, float]:
        """FVU and L0 of a training batch (its progress row)."""
        return reconstruction_metrics(y, out.x_hat.detach(), out.codes, self.dictionary.n_latents)

    def mean_l0(self, out: TrainOutput, rows: int) -> float:
        """Active codes per row of a training batch (what the L0 controller steers)."""
        return float(active_count(out.codes)) / rows

    def dead_fraction(self) -> float:
        """The share of latents the dead mask holds now."""
        return float(self.dead_mask().double().mean())

    def train(
        self,
        next_batch: Callable[[int], torch.Tensor],
        log_every: int,
    ) -> TrainState:
        """Run `total_steps` steps, logging progress every `log_every` steps."""
        start = time.perf_counter()
        for _ in range(self.total_steps):
            y, out = self.step(next_batch(self.cfg.batch_tokens))
            self.maybe_log(y, out, log_every, time.perf_counter() - start)
        return self.state

    def maybe_log(
        self,
        y: torch.Tensor,
        out: TrainOutput,
        log_every: int,
        elapsed: float,
        start_tokens: int = 0,
    ) -> dict[str, float] | None:
        """After a step: every `log_every` steps (and the last), record and print a progress row."""
        step = self.state.step
        if step % log_every != 0 and step != self.total_steps:
            return None
        metrics = self.batch_metrics(y, out)
        rate = (self.state.tokens - start_tokens) / max(elapsed, 1e-9)
        eta = (self.total_steps - step) * self.cfg.batch_tokens / max(rate, 1e-9)
        dead = self.dead_fraction()
        row = {
            "step": step,
            "tokens": self.state.tokens,
            "tokens_per_s": rate,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": float(out.loss.detach()),
            **{k: float(v) for k, v in out.terms.items()},
            "fvu": metrics["fvu"],
            "l0": metrics["l0"],
            "dead_fraction": dead,
        }
        if self.l0_controller is not None:
            row["sparsity_coefficient"] = (
                self.l0_controller.factor * self.dictionary.sparsity_coefficient
            )
        self.state.history.append(row)
        log.info(
            "%sstep %d/%d | %s tokens | %s tok/s | eta %s | loss %.4f | fvu %.4f | "
            "l0 %.1f | dead %.1f%%",
            f"[{self.name}] " if self.name else "",
            step,
            self.total_steps,
            human(self.state.tokens),
            human(rate),
            duration(eta),
            row["loss"],
            row["fvu"],
            row["l0"],
            100 * dead,
        )
        return row
