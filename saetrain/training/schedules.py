"""Learning-rate schedule: linear warm-up, constant, linear decay to zero at the end."""

from __future__ import annotations


def default_lr(n_latents: int) -> float:
    """Gao et al.'s fitted scaling: 2e-4 at 16k latents, ∝ 1/sqrt(n_latents)."""
    return 2e-4 / (n_latents / 2**14) ** 0.5


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Factor on the base learning rate for optimiser step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_fraction)
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0
