"""The activation cache under torchrun: each rank caches its share of the stream under its own
key, and a second run with the same world size reads every rank's share back instead of running
the LM.

Every torchrun call is bounded in time.
"""

from __future__ import annotations

import json

import pytest

from saetrain.distributed import World
from saetrain.distributed.data_parallel import DataParallel
from tests.helpers.distributed import _overrides, _torchrun


@pytest.fixture(scope="module")
def two_runs(tiny_model, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_cache")
    cache = root / "cache"
    infos = []
    for name in ("fills", "reads"):
        out = root / name
        args = _overrides(tiny_model, corpus, out, f"cache.dir={cache}", "cache.shard_tokens=256")
        done = _torchrun(args, root)
        assert done.returncode == 0, done.stdout[-4000:]
        infos.append(json.loads((out / "resid_post.1" / "saetrain_run.json").read_text()))
    return root, cache, infos


def test_a_second_run_reads_every_rank_s_share_from_the_cache(two_runs):
    root, cache, (fills, reads) = two_runs
    assert fills["stream"]["cached_tokens"] == 0 and fills["stream"]["lm_tokens"] >= 2048
    assert reads["stream"]["lm_tokens"] == 0 and reads["stream"]["cached_tokens"] >= 2048
    # one key per rank, each naming its share
    keys = sorted(p for p in cache.iterdir() if p.is_dir())
    shares = [json.loads((k / "manifest.json").read_text())["fields"]["share"] for k in keys]
    assert sorted(s["rank"] for s in shares) == [0, 1] and {s["world_size"] for s in shares} == {2}
    # every row the LM made is in a rank's cache, once
    manifests = [json.loads((k / "manifest.json").read_text()) for k in keys]
    cached = sum(shard["tokens"] for m in manifests for shard in m["shards"])
    assert cached == fills["stream"]["lm_tokens"]
    # The same rows in another order (cached chunks fill the buffer otherwise than LM batches):
    # the same held-out FVU to within what a reshuffle moves it on the tiny model.
    one, two = fills["final_metrics"]["fvu"], reads["final_metrics"]["fvu"]
    assert two < 0.95 and abs(one - two) < 0.05, (one, two)


def test_the_cache_is_no_longer_refused_under_torchrun():
    DataParallel(World(rank=0, world_size=2)).check(256, 1024, "/some/cache")
