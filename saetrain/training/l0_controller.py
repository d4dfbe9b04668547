"""Adapting the sparsity coefficient λ so that a run ends near a target L0 (`dictionary.target_l0`).

The penalty architectures (relu, gated, jumprelu) set their L0 through λ, and which λ gives which
L0 depends on the data, the width and the run's length: users sweep λ to hit one L0. Given a
target instead, λ is multiplied by a factor f that a controller moves every step from the batch's
L0 (the mean number of active latents per row of the training codes):

    e_t = clip(log(L0_t / L0*), ±1)           the error, relative (log) and bounded
    ē_t = β·ē_{t−1} + (1 − β)·e_t               its running average (β = 0.9)
    I_t = I_{t−1} + gain·e_t                    the integral: it removes the steady error
    log f_t = I_t + 10·gain·ē_t                 integral + proportional (damps overshoot)

A multiplicative (log-space) update fits a quantity that spans decades and keeps λ > 0; the
integral term makes the equilibrium L0 the target whatever the starting λ. The controller runs only
after the sparsity warm-up (during it λ is ramped on purpose and L0 is high: integrating then would
wind λ up). Its state is part of the trainer's checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

# Bounds on log f: λ may move by at most e^±20 from its configured value.
MAX_LOG_FACTOR = 20.0
ERROR_AVERAGE = 0.9
PROPORTIONAL = 10.0  # the proportional gain, in units of the integral gain


class L0Controller:
    """Integral + proportional control of log λ towards a target L0."""

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

    @property
    def log_factor(self) -> float:
        value = self.integral + PROPORTIONAL * self.gain * self.average_error
        return max(-MAX_LOG_FACTOR, min(MAX_LOG_FACTOR, value))

    @property
    def factor(self) -> float:
        """What λ is multiplied by now."""
        return math.exp(self.log_factor)

    def update(self, l0: float) -> float:
        """Take one batch's L0 (active latents per row); return the new factor."""
        error = math.log(max(l0, 1e-3) / self.target_l0)
        error = max(-1.0, min(1.0, error))
        self.average_error = ERROR_AVERAGE * self.average_error + (1 - ERROR_AVERAGE) * error
        self.integral = max(-MAX_LOG_FACTOR, min(MAX_LOG_FACTOR, self.integral + self.gain * error))
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
        self.integral = float(state["integral"])
        self.average_error = float(state["average_error"])
        self.updates = int(state["updates"])
