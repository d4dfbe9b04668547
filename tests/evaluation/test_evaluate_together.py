"""Several dictionaries evaluated from one pass of the LM over the held-out contexts
(evaluate_dictionaries, run()'s evaluation): the same numbers as one pass each, with one forward
per held-out batch instead of one per dictionary and batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saetrain.activations.model import load_lm
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenBatch
from saetrain.config import DictionaryConfig
from saetrain.dictionaries import Layout, build_dictionary
from saetrain.evaluation.evaluate import Evaluated, evaluate_dictionaries, evaluate_dictionary

D = 32  # the tiny Llama's width


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _members() -> list[Evaluated]:
    """An SAE, two transcoders (a set), and a CLT over two layers, with random weights."""
    g = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    sae = build_dictionary(DictionaryConfig(architecture="topk", n_latents=48, k=6), D, D, cpu, g)
    members = [Evaluated(sae, ["resid_post.0"], ["resid_post.0"])]
    for layer in (0, 2):
        cfg = DictionaryConfig(architecture="relu", n_latents=40)
        tc = build_dictionary(cfg, D, D, cpu, g, transcoder=True)
        members.append(Evaluated(tc, [f"mlp_in.{layer}"], [f"mlp_out.{layer}"]))
    cfg = DictionaryConfig(architecture="jumprelu", kind="clt", n_latents=24)
    clt = build_dictionary(cfg, 2 * D, 2 * D, cpu, g, True, Layout("clt", (D, D), (D, D)))
    members.append(Evaluated(clt, ["mlp_in.1", "mlp_in.2"], ["mlp_out.1", "mlp_out.2"]))
    for member in members:
        with torch.no_grad():
            for p in member.dictionary.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        member.dictionary.eval()
    return members


def _batches(n: int = 3) -> list[TokenBatch]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (n * 4, 12), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False  # a BOS-like position that is not scored
    return [TokenBatch(ids[i * 4 : (i + 1) * 4], mask[i * 4 : (i + 1) * 4]) for i in range(n)]


def test_one_pass_gives_each_members_own_numbers_from_one_forward_per_batch(tiny_model):
    model, _ = load_lm_cpu(tiny_model)
    members = _members()
    sites = sorted({s for m in members for s in m.sites})
    source = ActivationSource(model, sites)
    batches = _batches()
    forwards = _count_forwards(model)
    together = evaluate_dictionaries(source, members, batches)
    assert forwards[0] == len(batches)  # one LM forward per held-out batch, for all four

    for member, (metrics, frequencies) in zip(members, together, strict=True):
        alone: list[torch.Tensor] = []
        before = forwards[0]
        expected = evaluate_dictionary(
            source, member.dictionary, batches, member.inputs, member.targets,
            compute_ce=False, frequencies_out=alone,
        )  # fmt: skip
        assert forwards[0] - before == len(batches)  # a pass of its own
        assert metrics == expected  # every number, exactly
        assert torch.equal(frequencies, alone[0])
    clt_metrics = together[3][0]
    assert {"fvu.mlp_out.1", "fvu.mlp_out.2", "l0.mlp_in.1", "l0.mlp_in.2"} <= set(clt_metrics)
    assert 0 < together[0][0]["l0"] <= 6  # the TopK SAE: at most k active


def test_one_pass_reads_each_member_in_its_own_dtype(tiny_model):
    """A bf16 member beside an fp32 one: each scored on activations cast to its dtype, as its own
    pass reads them."""
    model, _ = load_lm_cpu(tiny_model)
    members = _members()[:2]
    members[1].dictionary.to(torch.bfloat16)
    source = ActivationSource(model, sorted({s for m in members for s in m.sites}))
    batches = _batches(2)
    together = evaluate_dictionaries(source, members, batches)
    for member, (metrics, _) in zip(members, together, strict=True):
        alone = evaluate_dictionary(
            source, member.dictionary, batches, member.inputs, member.targets, compute_ce=False
        )
        assert metrics == alone


def load_lm_cpu(folder: Path):
    from saetrain.config import ModelConfig

    return load_lm(
        ModelConfig(name=str(folder), gguf_package=None, device="cpu"), torch.device("cpu")
    )


def test_run_evaluates_a_transcoder_set_in_one_pass(tiny_model, corpus, tmp_path):
    """A run of per-layer transcoders (a set over layers 0-2): the held-out reconstruction pass
    runs the LM once per held-out batch for all three; `eval.splice_each=false` drops the
    per-dictionary CE splices, and the whole-set splice still runs."""
    from saetrain.api import config_from_overrides
    from saetrain.run import run

    cfg = config_from_overrides(
        [
            f"model.name={tiny_model}", "model.gguf_package=null", "model.device=cpu",
            f"data.data_files=[{corpus}/*.txt]", "data.context_size=16", "data.holdout_percent=10",
            "site.input=mlp_in.*", "site.target=mlp_out.*",
            "buffer.size_tokens=512", "buffer.lm_batch_contexts=8",
            "dictionary.architecture=relu", "dictionary.n_latents=32",
            "trainer.total_tokens=512", "trainer.batch_tokens=128", "trainer.init_batches=1",
            "eval.n_tokens=256", "eval.batch_contexts=8", "eval.ce_contexts=8",
            "eval.splice_each=false", "logger.log_every=100",
        ]
    )  # fmt: skip
    import saetrain.run.finish as finish_module  # where run() looks evaluate_dictionaries up

    calls: list[int] = []
    real = finish_module.evaluate_dictionaries

    def counting(source, members, batches, **kwargs):
        forwards = [0]
        handle = source.model.register_forward_pre_hook(
            lambda *_: forwards.__setitem__(0, forwards[0] + 1)
        )
        try:
            out = real(source, members, batches, **kwargs)
        finally:
            handle.remove()
        calls.append(forwards[0])
        calls.append(len(members))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(finish_module, "evaluate_dictionaries", counting)
    try:
        result = run(cfg, tmp_path)
    finally:
        mp.undo()
    n_batches = 2  # 256 held-out tokens = 16 contexts of 16, 8 per batch
    assert calls == [n_batches, 3]  # one call, three members, one forward per batch
    assert len(result.dictionaries) == 3
    for d in result.dictionaries:
        assert d.metrics["fvu"] > 0
        assert "ce_spliced" not in d.metrics and "ce_clean" not in d.metrics
    metrics = json.loads(
        (tmp_path / "transcoder_set.mlp_in-mlp_out" / "replacement_metrics.json").read_text()
    )
    assert metrics["ce_spliced"] > 0 and metrics["layers"] == [0, 1, 2]
