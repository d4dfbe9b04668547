"""The held-out evaluation shared by the ranks of a data-parallel run: each rank a share of the
contexts, the sums reduced, and the metrics those of one process evaluating everything.

Every torchrun call is bounded in time.
"""

from __future__ import annotations

import json

import pytest
import torch

from saetrain.activations.tokens import TokenBatch
from saetrain.dictionaries.base import SparseCodes
from saetrain.distributed import World
from saetrain.evaluation.metrics import ReconstructionStats
from saetrain.evaluation.shared_eval import my_contexts


def _rows(seed: int, n: int, offset: float) -> tuple[torch.Tensor, torch.Tensor, SparseCodes]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * 3 + offset  # far off-centre: the shift matters
    x_hat = x + 0.1 * torch.randn(n, 6, generator=g)
    codes = SparseCodes(torch.randint(0, 10, (n, 2), generator=g), torch.rand(n, 2, generator=g))
    return x, x_hat, codes


def test_merged_stats_are_those_of_one_pass_over_every_row():
    parts = [_rows(0, 40, 100.0), _rows(1, 25, -50.0), _rows(2, 1, 7.0)]
    whole = ReconstructionStats(10, 6)
    shares = []
    for x, x_hat, codes in parts:
        whole.update(x, x_hat, codes)
        share = ReconstructionStats(10, 6)
        share.update(x, x_hat, codes)
        shares.append(share)
    shares.insert(1, ReconstructionStats(10, 6))  # a rank that had no row
    expected, got = whole.compute(), ReconstructionStats.merged(shares).compute()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-12 * max(1.0, abs(value)), (key, got[key], value)
    assert torch.equal(ReconstructionStats.merged(shares).fire_counts, whole.fire_counts)
    # one share alone is not the whole: the test can tell them apart
    assert abs(shares[0].compute()["fvu"] - expected["fvu"]) > 1e-4


def test_each_context_is_evaluated_by_one_rank():
    batches = [
        TokenBatch(torch.arange(n * 4).view(n, 4) + 100 * i, torch.ones(n, 4, dtype=torch.bool))
        for i, n in enumerate((5, 1, 4))
    ]
    seen = []
    for rank in range(3):
        for batch in my_contexts(World(rank=rank, world_size=3), batches):
            assert len(batch) > 0
            seen += batch.input_ids[:, 0].tolist()
    assert sorted(seen) == sorted(torch.cat([b.input_ids[:, 0] for b in batches]).tolist())
    assert my_contexts(World(), batches) is batches


@pytest.fixture(scope="module")
def data_parallel_run(tiny_model, corpus, tmp_path_factory):
    from tests.helpers.distributed import _overrides, _torchrun

    root = tmp_path_factory.mktemp("shared_eval")
    out = root / "run"
    # 10 held-out contexts over 2 ranks in batches of 4: shares of 2 and 2, 2 and 2, 1 and 1
    args = _overrides(tiny_model, corpus, out, "eval.n_tokens=160", "eval.batch_contexts=4")
    done = _torchrun(args, root)
    assert done.returncode == 0, done.stdout[-4000:]
    return out, done.stdout


def test_the_shared_evaluation_gives_the_one_process_numbers(data_parallel_run):
    from saetrain.evaluate import evaluate_path

    out, stdout = data_parallel_run
    assert "held-out evaluation shared by 2 ranks: rank 0 evaluates 5 of 10 contexts" in stdout
    folder = out / "resid_post.1"
    two = json.loads((folder / "saetrain_run.json").read_text())["final_metrics"]
    one = evaluate_path(folder, ["model.device=cpu"]).metrics
    keys = ("fvu", "mse", "l0", "never_fired_fraction", "never_fired_tokens", "ce_clean",
            "ce_spliced", "ce_zero_ablated", "ce_recovered", "kl_div", "ce_tokens")  # fmt: skip
    assert one["never_fired_tokens"] > 100  # most of 10 contexts × 16 (BOS and specials out)
    for key in keys:
        assert abs(two[key] - one[key]) <= 1e-5 * max(1.0, abs(one[key])), (key, two[key], one[key])
