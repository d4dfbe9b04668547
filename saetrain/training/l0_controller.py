"""Steering a run to a target L0 (`dictionary.target_l0`) without winding up.

The penalty architectures (relu, gated, jumprelu) set their L0 through λ and through what decides
which latents fire (JumpReLU's thresholds θ, ReLU's b_enc, Gated's biases). Adam moves those by
about lr per step whatever λ is, so a controller that acts on λ alone cannot move L0 faster than
lr allows: its integral winds up meanwhile (λ × 24,000 in a 1,024-step run), the penalty swamps
the reconstruction, and L0 overshoots once the thresholds catch up. Two actuators instead, both
driven by the batch's L0 (active latents per row of the training codes):

    e_t = clip(log(L0_t / L0*), ±1)            the error, relative (log) and bounded
    ē_t = β·ē_{t−1} + (1 − β)·e_t              the error's running average (β = 0.9)
    shift_t = STEER · (e_t + ē_t) / 2          fast: the dictionary moves its activity threshold
                                               by this much after the optimiser step
                                               (Dictionary.shift_sparsity), outside Adam; the
                                               average halves the batch-to-batch noise
    slow:  I_t = I_{t−1} + gain·e_t  only when |ē_t| ≥ |ē_{t−1}|, clipped to ±log(MAX_FACTOR)
    λ_t = λ · exp(I_t)

The threshold shift is proportional control on the quantity that sets L0, so L0 follows the
target within tens of steps (it does not go through Adam). The integral on λ is what makes the shift
unnecessary at equilibrium (λ such that Adam's own threshold updates balance); it integrates only
while the error is not already shrinking (during a transient the shift does the work: integrating
then is the wind-up) and λ stays within MAX_FACTOR of its configured value either way. The
controller runs only after the sparsity warm-up (during it λ is ramped on purpose and L0 is high).
Its state is part of the trainer's checkpoint, so a resumed run continues exactly.

A run with fewer than MIN_STEPS steps after the warm-up is too short for the thresholds to travel
from their initial L0 to the target: `too_short` says so at start.
"""

from __future__ import annotations

import math
from typing import Any

# λ stays within this factor of its configured value (both ways): no wind-up.
MAX_FACTOR = 100.0
ERROR_AVERAGE = 0.9
# The threshold shift per step per unit of log error (shift_sparsity's units: log θ for JumpReLU,
# encoder-column norms for ReLU and Gated biases). 0.2 closes a tenfold L0 gap in ~20 steps.
STEER = 0.2
# Steps after the sparsity warm-up that the controller needs to end within 10% of its target.
MIN_STEPS = 50


class L0Controller:
    """Proportional steering of the activity threshold plus a bounded integral on log λ."""

    def __init__(self, target_l0: float, gain: float = 0.02):
        if not target_l0 > 0:
            raise ValueError(f"dictionary.target_l0={target_l0} must be > 0")
        if not gain > 0:
            raise ValueError(f"trainer.target_l0_gain={gain} must be > 0")
        self.target_l0 = float(target_l0)
        self.gain = float(gain)
        self.integral = 0.0
        self.average_error = 0.0
        self.updates = 0
        self.shift = 0.0  # the last step's threshold shift (log units of L0)

    @property
    def log_factor(self) -> float:
        return self.integral

    @property
    def factor(self) -> float:
        """What λ is multiplied by now."""
        return math.exp(self.log_factor)

    def update(self, l0: float) -> float:
        """Take one batch's L0 (active latents per row); set `shift`, return λ's new factor."""
        error = math.log(max(l0, 1e-3) / self.target_l0)
        error = max(-1.0, min(1.0, error))
        previous = self.average_error
        self.average_error = ERROR_AVERAGE * previous + (1 - ERROR_AVERAGE) * error
        if abs(self.average_error) >= abs(previous):  # not already converging: integrate
            bound = math.log(MAX_FACTOR)
            self.integral = max(-bound, min(bound, self.integral + self.gain * error))
        self.shift = STEER * (error + self.average_error) / 2
        self.updates += 1
        return self.factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "target_l0": self.target_l0,
            "gain": self.gain,
            "integral": self.integral,
            "average_error": self.average_error,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bound = math.log(MAX_FACTOR)  # a checkpoint of the unbounded controller comes back bounded
        self.integral = max(-bound, min(bound, float(state["integral"])))
        self.average_error = float(state["average_error"])
        self.updates = int(state["updates"])


def too_short(
    total_steps: int, sparsity_warmup_steps: int, batch_tokens: int, target_l0: float
) -> str | None:
    """Why a run cannot be expected to reach `target_l0`, or None when it is long enough."""
    steering = total_steps - max(sparsity_warmup_steps - 1, 0)
    if steering >= MIN_STEPS:
        return None
    needed = MIN_STEPS + max(sparsity_warmup_steps - 1, 0)
    return (
        f"dictionary.target_l0={target_l0:g}: the L0 controller gets {max(steering, 0)} steps "
        f"(trainer.total_tokens / trainer.batch_tokens = {total_steps} steps, "
        f"{sparsity_warmup_steps} of them trainer.sparsity_warmup_steps) and needs at least "
        f"{MIN_STEPS} to end within 10% of its target: set trainer.total_tokens >= "
        f"{needed * batch_tokens} (or shorten the warm-up); this run's L0 may end far from it"
    )
