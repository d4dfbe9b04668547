"""dictionary.target_l0: λ is adapted during training so that the run ends near the target L0."""

from __future__ import annotations

import pytest

from saetrain.config import ConfigError, DictionaryConfig, TrainerConfig
from saetrain.synthetic import SyntheticConfig, SyntheticFeatures, score_recipe
from saetrain.training.l0_controller import L0Controller


def test_controller_moves_lambda_towards_the_target():
    c = L0Controller(target_l0=4.0, gain=0.05)
    assert c.factor == 1.0
    for _ in range(10):
        c.update(40.0)  # too dense: λ must grow
    up = c.factor
    assert up > 1.0
    for _ in range(40):
        c.update(0.4)  # too sparse: λ must shrink
    assert c.factor < up
    state = c.state_dict()
    again = L0Controller(4.0, 0.05)
    again.load_state_dict(state)
    assert again.factor == c.factor and again.update(4.0) == c.update(4.0)


@pytest.mark.parametrize("target", [4.0, 8.0])
def test_jumprelu_run_ends_within_10_percent_of_its_target_l0(one_thread, target):
    data = SyntheticFeatures(SyntheticConfig(d=32, n_features=256, mean_active=4))
    dict_cfg = DictionaryConfig(
        architecture="jumprelu", n_latents=512, sparsity_coefficient=0.1, target_l0=target
    )
    trainer_cfg = TrainerConfig(
        total_tokens=1000 * 256,
        batch_tokens=256,
        lr=5e-3,
        warmup_steps=20,
        sparsity_warmup_steps=150,
        dead_after_tokens=12_800,
    )
    scores = score_recipe(data, dict_cfg, trainer_cfg, seed=0, eval_rows=4096)
    assert abs(scores["l0"] - target) / target < 0.10, scores
    assert scores["lambda_factor"] != 1.0  # the controller, not the starting λ, set the L0


def test_target_l0_is_refused_for_topk():
    from saetrain.config import Config, validate

    with pytest.raises(ConfigError, match="dictionary.target_l0"):
        validate(Config(dictionary=DictionaryConfig(architecture="topk", target_l0=8)))
