"""The activation pipeline at scale: many dictionaries from one LM pass, the disk cache, the
background refill, bounded buffer memory, and tokenized or one-document-per-context data.

Uses the tiny local Llama of test_run.py, so every run takes seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from saetrain.activations.buffer import ActivationBuffer
from saetrain.activations.cache import MANIFEST, ActivationCache, CacheError
from saetrain.activations.model import load_lm
from saetrain.activations.prefetch import Prefetcher
from saetrain.activations.source import ActivationSource
from saetrain.activations.stream import TrainingStream
from saetrain.activations.tokens import TokenSource
from saetrain.checks import validate
from saetrain.config import CacheConfig, Config, DictionarySpec
from saetrain.errors import ConfigError
from saetrain.export.saelens import load_dictionary
from saetrain.planning.expand import dictionary_configs
from saetrain.run import run
from tests.helpers.runs import _config


def _base(tiny_model: Path, corpus: Path) -> Config:
    return _config(tiny_model, corpus, "topk", None)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    d = load_dictionary(folder)
    return {k: v.detach().clone() for k, v in d.state_dict().items()}


# -- many dictionaries from one stream --------------------------------------------------------


def test_one_stream_trains_each_dictionary_exactly_as_alone(tiny_model, corpus, tmp_path):
    """Three dictionaries (two sites, an SAE pair and a skip transcoder) from one LM pass; each
    ends with the same weights as when it is trained alone."""
    base = _base(tiny_model, corpus)
    specs = [
        DictionarySpec(name="k4", dictionary={"k": 4}),
        DictionarySpec(dictionary={"architecture": "relu"}, site={"input": "resid_post.2"}),
        DictionarySpec(
            dictionary={"skip": True}, site={"input": "mlp_in.1", "target": "mlp_out.1"}
        ),
    ]
    together = run(replace(base, dictionaries=specs), tmp_path / "together")
    names = [r.name for r in together.dictionaries]
    assert names == ["k4", "resid_post.2", "mlp_in.1-mlp_out.1"]
    info = json.loads((tmp_path / "together" / "k4" / "saetrain_run.json").read_text())
    assert info["stream"]["sites"] == ["resid_post.1", "resid_post.2", "mlp_in.1", "mlp_out.1"]
    assert info["stream"]["buffer_bytes"] == 1024 * 4 * 32 * 4  # tokens × sites × d × fp32
    lm_tokens = info["stream"]["lm_tokens"]
    assert lm_tokens >= 2048  # one pass feeds all three

    for i, (name, sub) in enumerate(dictionary_configs(replace(base, dictionaries=specs))):
        alone = run(sub, tmp_path / f"alone{i}")
        a = _weights(alone.dictionary_dir)
        b = _weights(tmp_path / "together" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}.{key}")
        assert alone.metrics["fvu"] == pytest.approx(together.dictionaries[i].metrics["fvu"])


def test_an_entry_seed_changes_only_that_dictionary_init(tiny_model, corpus, tmp_path):
    base = _base(tiny_model, corpus)
    specs = [DictionarySpec(name="a"), DictionarySpec(name="b", seed=5)]
    result = run(replace(base, dictionaries=specs), tmp_path)
    alone = run(base, tmp_path / "alone")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert torch.equal(a["W_enc"], _weights(alone.dictionary_dir)["W_enc"])
    assert not torch.allclose(a["W_enc"], b["W_enc"])
    assert result.dictionaries[1].metrics["fvu"] < 0.9


def test_dictionary_list_from_the_command_line():
    from hydra import compose, initialize_config_dir

    import saetrain
    from saetrain.checks import to_config
    from saetrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=saetrain.config_dir(), version_base=None):
        node = compose(
            config_name="config",
            overrides=["dictionaries=[{dictionary:{k:16}},{dictionary:{k:64},seed:2}]"],
        )
    cfg = to_config(node)
    subs = dictionary_configs(cfg)
    assert [(n, s.dictionary.k, s.seed) for n, s in subs] == [
        ("resid_post.6-0", 16, 0),
        ("resid_post.6-1", 64, 2),
    ]


def test_k_sweep_experiment_composes():
    from hydra import compose, initialize_config_dir

    import saetrain
    from saetrain.checks import to_config
    from saetrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=saetrain.config_dir(), version_base=None):
        node = compose(config_name="config", overrides=["+experiment=smollm2_k_sweep"])
    subs = dictionary_configs(to_config(node))
    assert [(n, s.dictionary.k, s.site.input) for n, s in subs] == [
        ("k16", 16, "resid_post.6"),
        ("k32", 32, "resid_post.6"),
        ("k64", 64, "resid_post.6"),
        ("k128", 128, "resid_post.6"),
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dictionary": {"kk": 1}}, r"dictionaries\[0\]\.dictionary: Key 'kk' not in"),
        ({"trainer": {"batch_tokens": 512}}, r"dictionaries\[0\]\.trainer\.batch_tokens=512"),
        ({"dictionary": {"architecture": "nope"}}, r"dictionaries\[0\]: dictionary.architecture"),
        ({"site": {"input": "resid_post.x"}}, r"dictionaries\[0\]\.site\.input"),
    ],
)
def test_bad_dictionary_entries_are_named(entry, message):
    with pytest.raises(ConfigError, match=message):
        validate(Config(dictionaries=[entry]))


def test_two_entries_in_one_folder_are_refused():
    with pytest.raises(ConfigError, match=r"dictionaries\[1\] and dictionaries\[0\].*'a'"):
        validate(Config(dictionaries=[{"name": "a"}, {"name": "a", "seed": 1}]))


# -- the background refill -------------------------------------------------------------------


def test_prefetcher_keeps_order_and_raises_where_the_source_failed():
    def source():
        for i in range(5):
            yield torch.full((3, 2), float(i))
        raise ConfigError("data ran dry")

    p = Prefetcher(source(), depth=2, device=torch.device("cpu"))
    got = [float(next(p)[0, 0]) for _ in range(5)]
    assert got == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ConfigError, match="data ran dry"):
        next(p)


def test_prefetcher_runs_ahead_by_depth_and_stops_on_close():
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield torch.zeros(1)

    p = Prefetcher(source(), depth=3, device=torch.device("cpu"))
    next(p)
    deadline = threading.Event()
    for _ in range(100):  # let the thread fill the queue
        if len(produced) >= 5:
            break
        deadline.wait(0.01)
    # One consumed, three queued, one more in the thread's hand waiting for room.
    assert len(produced) == 5
    assert len(p.queued()) == 3
    p.close()
    assert not p._thread.is_alive()
    assert len(produced) == 5


def test_buffer_memory_stays_bounded_with_a_prefetching_source():
    """Over 60 refills the buffer holds its storage plus at most the chunks computed ahead."""
    chunk, width, size, depth = 100, 8, 1000, 2

    def source():
        i = 0
        while True:
            yield torch.full((chunk, width), float(i))
            i += 1

    stream = Prefetcher(source(), depth=depth, device=torch.device("cpu"))
    buf = ActivationBuffer(
        stream, size, width, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    bound = buf.storage_bytes() + (depth + 1) * chunk * width * 4
    peak = 0
    while buf.refills < 60:
        buf.next_batch(100)
        peak = max(peak, buf.resident_bytes())
    assert buf.refills >= 60
    assert buf.storage_bytes() == size * width * 4
    assert buf.storage_bytes() < peak <= bound
    stream.close()


def test_background_refill_gives_the_same_run(tiny_model, corpus, tmp_path):
    cfg = _base(tiny_model, corpus)
    a = run(replace(cfg, buffer=replace(cfg.buffer, prefetch_batches=0)), tmp_path / "a")
    b = run(replace(cfg, buffer=replace(cfg.buffer, prefetch_batches=3)), tmp_path / "b")
    assert a.metrics["fvu"] == b.metrics["fvu"]
    wa, wb = _weights(a.dictionary_dir), _weights(b.dictionary_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_buffer_feeds_an_fp32_dictionary(tiny_model, corpus, tmp_path):
    cfg = _base(tiny_model, corpus)
    result = run(replace(cfg, buffer=replace(cfg.buffer, dtype="bfloat16")), tmp_path)
    info = json.loads((result.dictionary_dir / "saetrain_run.json").read_text())
    assert info["stream"]["buffer_bytes"] == 1024 * 32 * 2
    assert load_dictionary(result.dictionary_dir).W_enc.dtype == torch.float32
    assert result.metrics["fvu"] < 0.9


# -- the disk cache --------------------------------------------------------------------------


def _cached(cfg: Config, root: Path, **kwargs) -> Config:
    return replace(cfg, cache=CacheConfig(dir=str(root), **kwargs))


def _manifest(root: Path) -> dict:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return json.loads((folder / MANIFEST).read_text())


def test_second_run_reads_the_cache_instead_of_the_lm(tiny_model, corpus, tmp_path):
    cfg = _cached(_base(tiny_model, corpus), tmp_path / "cache", shard_tokens=700)
    first = run(cfg, tmp_path / "a")
    info = json.loads((first.dictionary_dir / "saetrain_run.json").read_text())["stream"]
    assert info["cached_tokens"] == 0 and info["lm_tokens"] >= 2048
    manifest = _manifest(tmp_path / "cache")
    assert sum(s["tokens"] for s in manifest["shards"]) == info["lm_tokens"]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert manifest["fields"]["sites"] == ["resid_post.1"]

    # A sweep's next job (another k) has the same key: no LM forward for training at all.
    other_k = replace(cfg, dictionary=replace(cfg.dictionary, k=8))
    second = run(other_k, tmp_path / "b")
    info2 = json.loads((second.dictionary_dir / "saetrain_run.json").read_text())["stream"]
    assert info2["lm_tokens"] == 0
    assert info2["cached_tokens"] >= 2048
    assert second.metrics["fvu"] < 0.9

    # Another site is another key, so another folder.
    run(replace(cfg, site=replace(cfg.site, input="resid_post.2")), tmp_path / "c")
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def _stream_rows(cfg: Config, cache: ActivationCache | None, n_batches: int) -> torch.Tensor:
    model, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    source = ActivationSource(model, ["resid_post.1"])
    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    stream = TrainingStream(
        source, tokens, ["resid_post.1"], torch.float32, 4, cache, 0, torch.Generator()
    )
    rows = torch.cat([next(stream) for _ in range(n_batches)])
    stream.close()
    return rows


def _cache_for(cfg: Config, root: Path, shard_tokens: int) -> ActivationCache:
    from saetrain.activations.cache import activation_key_fields

    fields = activation_key_fields(cfg, ["resid_post.1"])
    return ActivationCache(root, fields, {"resid_post.1": 32}, torch.float32, shard_tokens)


def test_a_killed_writer_leaves_nothing_trusted_and_the_next_run_continues(
    tiny_model, corpus, tmp_path, monkeypatch
):
    cfg = _base(tiny_model, corpus)
    reference = _stream_rows(cfg, None, 12)

    # A writer that dies while renaming its third shard into place.
    import saetrain.activations.cache as cache_module

    cache = _cache_for(cfg, tmp_path, shard_tokens=100)
    real_write = cache_module.atomic_write_bytes
    calls = []

    def dying_write(path, data):
        calls.append(path)
        if len(calls) == 3:
            Path(str(path) + ".partial").write_bytes(data[: len(data) // 2])  # a torn file
            raise KeyboardInterrupt("killed")
        real_write(path, data)

    monkeypatch.setattr(cache_module, "atomic_write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _stream_rows(cfg, cache, 12)
    monkeypatch.setattr(cache_module, "atomic_write_bytes", real_write)
    assert len(_manifest(tmp_path)["shards"]) == 2
    os.close(cache._lock_fd)  # the killed process is gone: the kernel drops its lock

    # The next run: the torn file is removed, the two good shards are read, the stream goes on
    # from the contexts they cover, and the rows are exactly the uninterrupted stream's.
    again = _cache_for(cfg, tmp_path, shard_tokens=100)
    assert list(again.folder.glob("*.partial"))  # a reader leaves a writer's files alone
    assert again.acquire()  # the next writer removes them
    assert not list(again.folder.glob("*.partial"))
    again.release()
    covered = sum(s["tokens"] for s in again.shards)
    cached = torch.cat([again.read_shard(s) for s in again.shards])
    assert torch.equal(cached, reference[:covered])
    rows = _stream_rows(cfg, again, 12)
    # Shards come back in a seeded random order; as a set of rows the stream is the same.
    n = min(len(rows), len(reference))
    ref_sorted = reference[:n][torch.argsort(reference[:n, 0])]
    got_sorted = rows[:n][torch.argsort(rows[:n, 0])]
    torch.testing.assert_close(got_sorted[: covered + 100], ref_sorted[: covered + 100])


def test_corrupted_shard_is_reported_never_read(tiny_model, corpus, tmp_path):
    cfg = _cached(_base(tiny_model, corpus), tmp_path / "cache", shard_tokens=700)
    run(cfg, tmp_path / "a")
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    shard = folder / _manifest(tmp_path / "cache")["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{shard.name} is corrupted"):
        run(cfg, tmp_path / "b")


def test_a_live_writer_is_not_disturbed(tiny_model, corpus, tmp_path):
    cfg = _base(tiny_model, corpus)
    first = _cache_for(cfg, tmp_path, shard_tokens=100)
    assert first.acquire()
    second = _cache_for(cfg, tmp_path, shard_tokens=100)
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


def test_a_lock_file_left_on_disk_does_not_block(tiny_model, corpus, tmp_path):
    """The lock is an flock, not the file's existence: a leftover file (a dead writer's) is fine."""
    cfg = _base(tiny_model, corpus)
    cache = _cache_for(cfg, tmp_path, shard_tokens=100)
    lock = cache.folder / "writer.lock"
    lock.write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    assert cache.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    cache.release()


# -- data in ---------------------------------------------------------------------------------


def _tokenized_corpus(tmp_path: Path, tiny_model: Path, corpus: Path, offset: int = 0) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = tmp_path / "tokens.jsonl"
    with out.open("w") as f:
        for doc in sorted(corpus.glob("*.txt")):
            ids = tok(doc.read_text(), add_special_tokens=False)["input_ids"]
            f.write(json.dumps({"input_ids": [i + offset for i in ids]}) + "\n")
    return out


def test_pretokenized_dataset_is_used_as_is(tiny_model, corpus, tmp_path):
    from transformers import AutoTokenizer

    cfg = _base(tiny_model, corpus)
    tokens_file = _tokenized_corpus(tmp_path, tiny_model, corpus)
    data = replace(cfg.data, path="json", data_files=[str(tokens_file)])
    result = run(replace(cfg, data=data), tmp_path / "ids")
    assert result.metrics["fvu"] < 0.9
    # One document per context, unshuffled: each context is BOS + a document's ids, unchanged.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    docs = {
        tuple(tok(d.read_text(), add_special_tokens=False)["input_ids"])
        for d in corpus.glob("*.txt")
    }
    plain = replace(data, packing="document", context_size=61, shuffle_buffer=0)
    batch = next(TokenSource(plain, tok, 0).training(8))
    assert (batch.input_ids[:, 0] == tok.bos_token_id).all()
    assert all(tuple(row[1:].tolist()) in docs for row in batch.input_ids)


def test_token_ids_of_another_tokenizer_are_refused(tiny_model, corpus, tmp_path):
    cfg = _base(tiny_model, corpus)
    tokens_file = _tokenized_corpus(tmp_path, tiny_model, corpus, offset=10_000)
    data = replace(cfg.data, path="json", data_files=[str(tokens_file)])
    with pytest.raises(ConfigError, match="token ids include 10.*another model"):
        run(replace(cfg, data=data), tmp_path)


def test_one_document_per_context(tiny_model, corpus):
    from transformers import AutoTokenizer

    cfg = _base(tiny_model, corpus)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = replace(cfg.data, packing="document", context_size=80, shuffle_buffer=0)
    batch = next(TokenSource(data, tok, 0).training(4))
    docs = sorted(corpus.glob("*.txt"))
    for row, mask in zip(batch.input_ids, batch.mask, strict=True):
        assert row[0] == tok.bos_token_id
        n_words = int(mask.sum())
        assert n_words == 60  # every corpus document has 60 words; the rest is masked padding
        assert (row[1 + n_words :] == tok.eos_token_id).all()
    first = tok(docs[0].read_text(), add_special_tokens=False)["input_ids"]
    texts = {tuple(tok(d.read_text(), add_special_tokens=False)["input_ids"]) for d in docs}
    assert tuple(batch.input_ids[0, 1:61].tolist()) in texts
    assert len(first) == 60


def test_parquet_texts_and_jsonl_token_ids_are_packed_as_documents(tiny_model, corpus, tmp_path):
    """A parquet file of texts and a JSON-lines file of token ids are read in file order, split by
    hash and packed exactly like the same documents given directly."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from saetrain.activations.tokens import ContextPacker, is_held_out

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))[:40]]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    with (tmp_path / "docs.jsonl").open("w") as f:
        for row in ids:
            f.write(json.dumps({"tokens": row}) + "\n")
    cfg = replace(_base(tiny_model, corpus).data, shuffle_buffer=0)
    packer = ContextPacker(tok, cfg.context_size, True)
    for path, file, docs in (("parquet", "docs.parquet", texts), ("json", "docs.jsonl", ids)):
        data = replace(cfg, path=path, data_files=[str(tmp_path / file)])
        got = next(TokenSource(data, tok, 0).training(16)).input_ids
        kept = [d for d in docs if not is_held_out(d, cfg.holdout_percent)]
        expected = torch.stack(list(itertools.islice(packer.contexts(kept), 16)))
        assert torch.equal(got, expected), path
