"""Tests for the learning-rate schedule, data-dependent initialisation and the trainer loop."""

from __future__ import annotations

import copy

import pytest
import torch

from saetrain.config import TrainerConfig
from saetrain.dictionaries import TopKSAE
from saetrain.evaluation.metrics import ReconstructionStats
from saetrain.training.initialization import (
    geometric_median,
    initial_b_dec,
    normalization_scale,
)
from saetrain.training.schedules import default_lr, lr_multiplier
from saetrain.training.trainer import Trainer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- schedules ------------------------------------------------------------------------------------


def test_warmup_is_linear_from_one_over_warmup():
    mults = [lr_multiplier(s, 1000, 10, 0.2) for s in range(10)]
    assert mults == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert mults[0] == pytest.approx(0.1)
    assert lr_multiplier(10, 1000, 10, 0.2) == 1.0


def test_constant_in_the_middle():
    for step in (10, 11, 400, 799):
        assert lr_multiplier(step, 1000, 10, 0.2) == 1.0


def test_linear_decay_to_about_zero_at_the_end():
    total, decay = 1000, 0.2  # decay over the last 200 steps: 800 .. 999
    mults = [lr_multiplier(s, total, 10, decay) for s in range(800, 1000)]
    assert mults[0] == pytest.approx(1.0)
    assert mults[-1] == pytest.approx(1 / 200)
    diffs = [b - a for a, b in zip(mults, mults[1:], strict=False)]
    assert diffs == pytest.approx([-1 / 200] * 199)
    assert lr_multiplier(900, total, 10, decay) == pytest.approx(0.5)
    assert lr_multiplier(total, total, 10, decay) == 0.0  # never negative past the end
    assert lr_multiplier(total + 5, total, 10, decay) == 0.0


def test_schedule_without_warmup_or_decay():
    assert lr_multiplier(0, 100, 0, 0.2) == 1.0
    assert lr_multiplier(99, 100, 5, 0.0) == 1.0
    assert lr_multiplier(0, 100, 1, 0.0) == 1.0


def test_default_lr_scaling():
    assert default_lr(16384) == pytest.approx(2e-4, rel=1e-12)
    assert default_lr(4 * 16384) == pytest.approx(1e-4, rel=1e-12)
    assert default_lr(16384 // 4) == pytest.approx(4e-4, rel=1e-12)
    for n in (1000, 32768, 131072):
        assert default_lr(n) * n**0.5 == pytest.approx(2e-4 * 16384**0.5, rel=1e-12)


# -- initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_normalization_scale_makes_mean_squared_norm_d(dtype):
    g = _gen(0)
    x = (7.0 * torch.randn(500, 24, generator=g) + 3.0).to(dtype)
    s = normalization_scale(x)
    assert isinstance(s, float)
    mean_sq = (s * x.double()).pow(2).sum(-1).mean()
    assert float(mean_sq) == pytest.approx(24.0, rel=1e-9)
    assert 0.05 < s < 0.2  # ‖x‖ ≈ sqrt(24 · 58): s ≈ 1/7.6


def test_geometric_median_ignores_a_huge_outlier():
    g = _gen(1)
    d = 8
    centre = torch.randn(d, generator=g, dtype=torch.float64) * 5
    offsets = torch.randn(100, d, generator=g, dtype=torch.float64)
    points = torch.cat([centre + offsets, centre - offsets])  # symmetric around the centre
    outlier = centre + 1e6 * torch.nn.functional.normalize(
        torch.ones(d, dtype=torch.float64), dim=0
    )
    points = torch.cat([points, outlier[None]])
    median = geometric_median(points)
    mean = points.mean(0)
    assert (median - centre).norm() < 0.05
    assert (mean - centre).norm() > 1000


def test_geometric_median_is_a_minimum_of_the_distance_sum():
    g = _gen(2)
    pts = torch.randn(60, 5, generator=g, dtype=torch.float64).pow(3)  # skewed, heavy tails
    median = geometric_median(pts, iters=500, tol=1e-12)

    def cost(p):
        return (pts - p).norm(dim=1).sum()

    assert cost(median) < cost(pts.mean(0))
    for _ in range(20):
        step = 1e-3 * torch.randn(5, generator=g, dtype=torch.float64)
        assert cost(median) <= cost(median + step) + 1e-9


def test_geometric_median_in_one_dimension_is_the_median():
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]], dtype=torch.float64)
    median = geometric_median(pts, iters=1000, tol=1e-12)
    assert float(median) == pytest.approx(2.0, abs=1e-3)


def test_geometric_median_keeps_dtype():
    pts = torch.randn(20, 3, generator=_gen(3))
    assert geometric_median(pts).dtype == torch.float32


def test_initial_b_dec_methods():
    g = _gen(4)
    x = torch.randn(50, 6, generator=g) + 2.0
    torch.testing.assert_close(initial_b_dec(x, "mean"), x.mean(0))
    zeros = initial_b_dec(x, "zeros")
    assert zeros.shape == (6,) and zeros.dtype == x.dtype and torch.all(zeros == 0)
    torch.testing.assert_close(initial_b_dec(x, "geometric_median"), geometric_median(x))
    with pytest.raises(ValueError, match="geometric_median"):
        initial_b_dec(x, "median")


# -- trainer --------------------------------------------------------------------------------------

D, N_TRUE, K = 32, 128, 4


def _features() -> torch.Tensor:
    F = torch.randn(N_TRUE, D, generator=_gen(100))
    return F / F.norm(dim=1, keepdim=True)


def _sample(F: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Rows that are exactly K-sparse, non-negative combinations of the unit features F."""
    idx = torch.rand(n, N_TRUE, generator=g).topk(K, dim=1).indices
    coef = 2 * torch.rand(n, K, generator=g) + 0.5
    return torch.zeros(n, N_TRUE).scatter(1, idx, coef) @ F


def _fvu(sae: TopKSAE, scale: float, x: torch.Tensor) -> float:
    stats = ReconstructionStats(sae.n_latents, x.shape[-1])
    with torch.no_grad():
        codes = sae.encode(x * scale)
        x_hat = sae.decode(codes) / scale
    stats.update(x, x_hat, codes)
    return stats.compute()["fvu"]


def _trainer(
    steps: int, batch: int = 256, lr: float | None = 1e-2, dead_after: int = 10**9, seed: int = 2
) -> tuple[Trainer, float]:
    F = _features()
    sae = TopKSAE(D, 256, k=K, generator=_gen(seed))
    x0 = _sample(F, 2048, _gen(seed + 1))
    scale = normalization_scale(x0)
    with torch.no_grad():
        sae.b_dec.copy_(initial_b_dec(x0 * scale, "geometric_median"))
    cfg = TrainerConfig(
        batch_tokens=batch,
        lr=lr,
        warmup_steps=20,
        decay_fraction=0.2,
        dead_after_tokens=dead_after,
    )
    return Trainer(sae, cfg, scale, steps), scale


def test_trainer_learns_a_known_sparse_dictionary():
    F = _features()
    trainer, scale = _trainer(300)
    sae = trainer.dictionary
    fresh = _sample(F, 4096, _gen(9))
    fvu_before = _fvu(sae, scale, fresh)
    assert fvu_before > 0.5

    g = _gen(5)
    calls: list[int] = []

    def next_batch(n: int) -> torch.Tensor:
        calls.append(n)
        return _sample(F, n, g)

    state = trainer.train(next_batch, log_every=100)
    assert calls == [256] * 300
    assert state.step == 300 and state.tokens == 300 * 256

    fvu_after = _fvu(sae, scale, fresh)  # measured on data never trained on (≈ 0.15)
    assert fvu_after < 0.25
    assert fvu_after < 0.4 * fvu_before
    # The learned decoder contains the true features: most (≈ 95%) have a row with cosine > 0.9.
    cos = F @ sae.W_dec.detach().T
    assert (cos.max(dim=1).values > 0.9).float().mean() > 0.8
    # Decoder rows stay unit-norm throughout.
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))

    # History: logged every 100 steps, FVU going down, the schedule's learning rate.
    assert [row["step"] for row in state.history] == [100, 200, 300]
    assert state.history[-1]["fvu"] < state.history[0]["fvu"]
    assert state.history[-1]["l0"] == pytest.approx(K)
    assert state.history[0]["lr"] == pytest.approx(1e-2)
    assert state.history[-1]["lr"] == pytest.approx(1e-2 * lr_multiplier(299, 300, 20, 0.2))
    for row in state.history:
        # No dead latents (dead_after is huge): the loss is the batch FVU, as the metrics see it.
        assert "auxk" not in row
        assert row["loss"] == pytest.approx(row["fvu"], rel=1e-4)
        assert {"tokens", "tokens_per_s", "dead_fraction"} <= set(row)


def test_trainer_step_scales_input_and_keeps_unit_decoder():
    trainer, scale = _trainer(10)
    sae = trainer.dictionary
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    x_raw = _sample(_features(), 64, _gen(6))
    x, out = trainer.step(x_raw)
    torch.testing.assert_close(x, x_raw * scale)
    assert float(out.terms["fvu"]) > 0
    for name, p in sae.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))
    assert trainer.state.step == 1 and trainer.state.tokens == 64


def test_trainer_sets_the_scheduled_learning_rate_each_step():
    trainer, _ = _trainer(20, lr=3e-3)
    g = _gen(7)
    F = _features()
    for step in range(20):
        trainer.step(_sample(F, 32, g))
        expected = 3e-3 * lr_multiplier(step, 20, 20, 0.2)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_default_learning_rate_comes_from_the_size():
    trainer, _ = _trainer(5, lr=None)
    assert trainer.base_lr == pytest.approx(default_lr(256))


def test_training_is_reproducible():
    F = _features()
    results = []
    for _ in range(2):
        trainer, _ = _trainer(20, batch=64)
        g = _gen(11)
        trainer.train(lambda n, g=g: _sample(F, n, g), log_every=10)
        results.append(copy.deepcopy(trainer.dictionary.state_dict()))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_tokens_since_fired_tracks_codes():
    trainer, _ = _trainer(50)
    F = _features()
    g = _gen(12)
    expected = torch.zeros(256, dtype=torch.int64)
    for _ in range(15):
        x, out = trainer.step(_sample(F, 48, g))
        fired = torch.zeros(256, dtype=torch.bool)
        fired[out.codes.indices[out.codes.values > 0]] = True
        expected = torch.where(fired, torch.zeros_like(expected), expected + 48)
        assert torch.equal(trainer.tokens_since_fired, expected)
    assert expected.max() > 0 and (expected == 0).any()


def test_a_latent_that_never_fires_becomes_dead_after_dead_after_tokens():
    batch = 32
    trainer, _ = _trainer(50, batch=batch, dead_after=5 * batch)
    sae = trainer.dictionary
    never = [3, 77]
    with torch.no_grad():
        sae.W_enc[:, never] = 0.0
        sae.b_enc[never] = -1e4  # pre-activation −1e4 whatever the input: never in the top k
    F = _features()
    g = _gen(13)
    assert not trainer.dead_mask().any()
    for step in range(1, 8):
        _, out = trainer.step(_sample(F, batch, g))
        assert not torch.isin(out.codes.indices, torch.tensor(never)).any()
        assert trainer.tokens_since_fired[never].tolist() == [step * batch] * 2
        dead = trainer.dead_mask()
        assert dead[never].tolist() == [step >= 5] * 2
        fired = torch.zeros(256, dtype=torch.bool)
        fired[out.codes.indices[out.codes.values > 0]] = True
        assert not dead[fired].any()
        # The forward sees the dead mask from before its own step: AuxK starts at step 6.
        assert ("auxk" in out.terms) == (step >= 6)


def test_a_checkpoint_resumes_with_this_device_s_adam_implementation():
    """A state saved by a CUDA run (fused Adam) resumed on CPU keeps the CPU run's Adam, and the
    other way round: load_state_dict would bring back the saving run's `fused` flag."""
    trainer, _ = _trainer(steps=4)
    state = trainer.state_dict()
    assert trainer.optimizer.param_groups[0]["fused"] is None  # CPU: torch's default
    state["optimizer"]["param_groups"][0]["fused"] = True  # as a CUDA run saves it
    resumed, _ = _trainer(steps=4)
    resumed.load_state_dict(state)
    assert resumed.optimizer.param_groups[0]["fused"] is None
    assert resumed.optimizer.param_groups[0]["lr"] == state["optimizer"]["param_groups"][0]["lr"]
    assert state["optimizer"]["param_groups"][0]["fused"] is True  # the saved state untouched
