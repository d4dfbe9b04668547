"""circuit-tracer loads saetrain's circuit-tracer exports and computes what they mean.

Skipped where circuit-tracer is not installed (it is not a saetrain dependency), e.g. in a scratch
environment: `pip install -c constraints-cpu.txt circuit-tracer==0.5.0`. Until commit 3e60da0 this
was scripts/check_circuit_tracer_load.py, whose results docs/circuit_tracer_check.json holds.

Builds random transcoder sets (ReLU, JumpReLU with and without a skip connection, TopK; a JumpReLU
and a BatchTopK saetrain transcoder through `layer_from_dictionary`; a bf16 JumpReLU) and random
CLTs (ReLU, JumpReLU) in memory, writes them with saetrain.export.circuit_tracer, loads each folder
with circuit-tracer's own loader (`load_transcoder_from_hub` with the folder's absolute path: the
route `ReplacementModel.from_pretrained(model, folder)` takes) and compares its encode / decode
(for a CLT, every layer's output from all earlier layers) with a torch computation from the input
tensors. A TopK set is expected to disagree in circuit-tracer 0.5.0, which ignores
`activation: topk`. Then circuit-tracer's TransformerLens replacement model runs `attribute()`
with sets and CLTs on a tiny random model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("circuit_tracer")
pytest.importorskip("transformer_lens")

# circuit-tracer and TransformerLens are imported only where installed (the skips above).
from circuit_tracer import attribute  # noqa: E402
from circuit_tracer.replacement_model.replacement_model_transformerlens import (  # noqa: E402
    TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.activation_functions import TopK  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: E402
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from saetrain.config import DictionaryConfig  # noqa: E402
from saetrain.dictionaries import BatchTopKSAE, JumpReLUSAE, Layout, build_dictionary  # noqa: E402
from saetrain.export.circuit_tracer import (  # noqa: E402
    CLTTensors,
    TranscoderLayer,
    clt_from_dictionary,
    layer_from_dictionary,
    write_clt,
    write_transcoder_set,
)
from saetrain.synthetic.tiny_llama import build_word_tokenizer  # noqa: E402

TOLERANCE = 1e-5


D, N, L, ROWS = 16, 48, 3, 64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_layer(g: torch.Generator, *, threshold: bool, skip: bool):
    return TranscoderLayer(
        W_enc=torch.randn(D, N, generator=g) / D**0.5,
        b_enc=0.1 * torch.randn(N, generator=g),
        W_dec=torch.randn(N, D, generator=g) / N**0.5,
        b_dec=0.1 * torch.randn(D, generator=g),
        threshold=(0.3 + 0.2 * torch.rand(N, generator=g)) if threshold else None,
        W_skip=(0.1 * torch.randn(D, D, generator=g)) if skip else None,
    )


def _reference_codes(x, layer, activation: str, k: int | None):
    """saetrain's inference codes from the SAELens-orientation tensors."""
    pre = x @ layer.W_enc + layer.b_enc
    if activation == "relu":
        return pre.relu()
    if activation == "jumprelu":
        return pre * (pre > layer.threshold)
    values, indices = pre.topk(k, dim=-1)  # saetrain's TopK: the k largest, then ReLU
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _reference_decode(x, codes, layer):
    out = codes @ layer.W_dec + layer.b_dec
    return out if layer.W_skip is None else out + x @ layer.W_skip.T


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check_set(name, folder, layers, activation, k, load, rows, expect_equal=True, dtype=None):
    result = write_transcoder_set(
        folder,
        layers,
        feature_input_hook="mlp.hook_in",
        feature_output_hook="hook_mlp_out",
        activation=activation,
        k=k,
        n_model_layers=len(layers),
        dtype=dtype,
    )
    kwargs = {} if dtype is None else {"dtype": dtype}
    ct, config = load(str(Path(folder).resolve()), **kwargs)
    out = []
    for i, layer in enumerate(layers):
        x = rows[i] if dtype is None else rows[i].to(dtype)
        with torch.no_grad():
            ours = _reference_codes_in(x, layer, activation, k, dtype)
            theirs = ct[i].encode(x)
            dec_ours = _reference_decode_in(x, ours, layer, dtype)
            dec_theirs = ct[i].decode(theirs, x)
        out.append(
            {
                "check": f"{name} L{i}",
                "class": f"{type(ct).__name__}/{type(ct[i].activation_function).__name__}",
                "encode": _max_diff(ours, theirs),
                "decode": _max_diff(dec_ours, dec_theirs),
                "fired_mismatch": int(((ours != 0) != (theirs != 0)).sum()),
                "expect_equal": expect_equal,
            }
        )
    if activation == "topk":
        x = rows[0]
        with torch.no_grad():
            pre = ct[0].encode(x, apply_activation_function=False)
            theirs = TopK(k)(pre)
        ours = _reference_codes(x, layers[0], "topk", k)
        out.append(
            {
                "check": f"{name} L0 through circuit-tracer's TopK({k})",
                "class": "activation_functions.TopK",
                "encode": _max_diff(ours, theirs),
                "decode": float("nan"),
                "fired_mismatch": int(((ours != 0) != (theirs != 0)).sum()),
                "expect_equal": True,
            }
        )
    for row in out:
        row["files"] = len(result.files)
        row["config_keys"] = sorted(config)
    return out


def _reference_codes_in(x, layer, activation, k, dtype):
    """The reference in `dtype` (pre-activations rounded as circuit-tracer's, θ kept fp32)."""
    if dtype is None:
        return _reference_codes(x, layer, activation, k)
    pre = torch.nn.functional.linear(x, layer.W_enc.T.to(dtype), layer.b_enc.to(dtype))
    assert activation == "jumprelu"
    return pre * (pre.float() > layer.threshold.float()).to(dtype)


def _reference_decode_in(x, codes, layer, dtype):
    if dtype is None:
        return _reference_decode(x, codes, layer)
    return codes @ layer.W_dec.to(dtype) + layer.b_dec.to(dtype)


def check_dictionaries(folder, load, rows):
    """saetrain JumpReLU and BatchTopK transcoders through layer_from_dictionary: circuit-tracer's
    output equals saetrain's own forward."""
    out = []
    for cls in (JumpReLUSAE, BatchTopKSAE):
        g = _gen(7)
        dicts = []
        for _ in range(2):
            sae = cls(D, N, D, transcoder=True, generator=g)
            with torch.no_grad():
                for p in sae.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
                if cls is BatchTopKSAE:
                    sae.threshold.fill_(0.2)
            dicts.append(sae.eval())
        converted = [layer_from_dictionary(s) for s in dicts]
        layers = [c[0] for c in converted]
        sub = Path(folder) / cls.architecture
        write_transcoder_set(
            sub,
            layers,
            feature_input_hook="mlp.hook_in",
            feature_output_hook="hook_mlp_out",
            activation=converted[0][1],
        )
        ct, _ = load(str(sub.resolve()))
        for i, sae in enumerate(dicts):
            x = rows[i]
            with torch.no_grad():
                codes_ours = sae.encode(x)
                codes_theirs = ct[i].encode(x)
                out.append(
                    {
                        "check": f"saetrain {cls.__name__} L{i} (layer_from_dictionary)",
                        "class": f"{type(ct).__name__}/{type(ct[i].activation_function).__name__}",
                        "encode": _max_diff(codes_ours, codes_theirs),
                        "decode": _max_diff(sae(x), ct[i](x)),
                        "fired_mismatch": int(((codes_ours != 0) != (codes_theirs != 0)).sum()),
                        "expect_equal": True,
                    }
                )
    return out


def _random_clt(g: torch.Generator, threshold: bool, L: int = L):
    n = 32
    return CLTTensors(
        W_enc=[torch.randn(D, n, generator=g) / D**0.5 for _ in range(L)],
        b_enc=[0.1 * torch.randn(n, generator=g) for _ in range(L)],
        W_dec=[torch.randn(n, L - i, D, generator=g) / n**0.5 for i in range(L)],
        b_dec=[0.1 * torch.randn(D, generator=g) for _ in range(L)],
        threshold=[0.3 + 0.2 * torch.rand(n, generator=g) for _ in range(L)] if threshold else None,
    )


def check_clt(name, folder, clt, load, x):
    """x [L, B, d]: layer i's input. Reference: codes_i = act(x_i·W_enc[i] + b_enc[i]); layer j's
    output = Σ_{i≤j} codes_i·W_dec[i][:, j−i] + b_dec[j]."""
    write_clt(
        folder,
        clt,
        feature_input_hook="hook_resid_mid",
        feature_output_hook="hook_mlp_out",
        n_model_layers=L,
    )
    codes = []
    for i in range(L):
        pre = x[i] @ clt.W_enc[i] + clt.b_enc[i]
        codes.append(pre.relu() if clt.threshold is None else pre * (pre > clt.threshold[i]))
    outputs = torch.stack(
        [
            sum(codes[i] @ clt.W_dec[i][:, j - i] for i in range(j + 1)) + clt.b_dec[j]
            for j in range(L)
        ]
    )
    loaded = {
        "load_transcoder_from_hub (lazy decoder)": load(str(Path(folder).resolve()))[0],
        "load_clt (eager)": load_clt(
            str(Path(folder).resolve()), lazy_decoder=False, dtype=torch.float32, device="cpu"
        ),
    }
    out = []
    for how, ct in loaded.items():
        with torch.no_grad():
            theirs = ct.encode(x)
            per_layer = torch.stack([ct.encode_layer(x[i], i) for i in range(L)])
            decoded = ct.decode(theirs.to_sparse())
        ours = torch.stack(codes)
        out.append(
            {
                "check": f"{name} via {how}",
                "class": f"{type(ct).__name__}/{type(ct.activation_function).__name__}",
                "encode": max(_max_diff(ours, theirs), _max_diff(ours, per_layer)),
                "decode": _max_diff(outputs, decoded),
                "fired_mismatch": int(((ours != 0) != (theirs != 0)).sum()),
                "expect_equal": True,
            }
        )
    return out


def check_saetrain_clt(folder, load, x):
    """saetrain's own CLT classes (random weights, folded per-layer scales), written by
    clt_from_dictionary: circuit-tracer's encode and per-layer outputs against saetrain's."""
    out = []
    for arch in ("relu", "jumprelu", "batchtopk"):
        cfg = DictionaryConfig(
            architecture=arch, kind="clt", n_latents=N, jumprelu_init_threshold=0.3
        )
        layout = Layout("clt", (D,) * L, (D,) * L)
        clt = build_dictionary(cfg, L * D, L * D, torch.device("cpu"), _gen(7), True, layout)
        with torch.no_grad():
            clt.b_enc.normal_(0, 0.1, generator=_gen(8))
            if arch == "batchtopk":  # its inference thresholds, one per layer
                clt.threshold.copy_(0.2 + 0.1 * torch.arange(L, dtype=torch.float32))
            clt.fold_input_scale(
                torch.rand(L * D, generator=_gen(9)) + 0.5, torch.rand(L * D) + 0.5
            )
        tensors = clt_from_dictionary(clt)
        rows = x.permute(1, 0, 2).reshape(x.shape[1], L * D)  # [B, L·d]: layers side by side
        with torch.no_grad():
            ours_codes = clt.encode(rows).reshape(-1, L, N).permute(1, 0, 2)
            ours_out = clt(rows).reshape(-1, L, D).permute(1, 0, 2)
        result = check_clt(f"saetrain {arch} CLT", Path(folder) / arch, tensors, load, x)

        ct = load_clt(str((Path(folder) / arch).resolve()), lazy_decoder=False,
                      dtype=torch.float32, device="cpu")  # fmt: skip
        with torch.no_grad():
            theirs = ct.encode(x)
            decoded = ct.decode(theirs.to_sparse())
        out.append(
            {
                "check": f"saetrain {arch} CLT (clt_from_dictionary) vs saetrain's forward",
                "class": result[0]["class"],
                "encode": _max_diff(ours_codes, theirs),
                "decode": _max_diff(ours_out, decoded),
                "fired_mismatch": int(((ours_codes != 0) != (theirs != 0)).sum()),
                "expect_equal": True,
            }
        )
    return out


def check_replacement_model(folder, load):
    """circuit-tracer's TransformerLens replacement model on a tiny random 3-layer model: the hook
    names are accepted and attribute() runs, per hook pair and for a CLT, with error nodes for
    every layer; a set or CLT covering part of the layers, exported with `n_model_layers` (padded
    to every layer), runs too, with error nodes for every layer and no active feature in a padded
    layer, while the same exported unpadded (as saetrain did before) crashes attribute() (a CLT)
    or has error nodes for its own layers only (a set); and `mlp.hook_in` is the MLP's input
    (the norm with its weight) while `ln2.hook_normalized` is before the weight."""
    cfg = HookedTransformerConfig(
        n_layers=L, d_model=D, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=123,
        act_fn="gelu", normalization_type="RMS", device="cpu", seed=0,
    )  # fmt: skip
    g = _gen(11)
    tokens = torch.tensor([0, 5, 7, 9, 11, 3])
    # TransformerLens wants a tokenizer that knows its folder: saved and reloaded
    build_word_tokenizer().save_pretrained(Path(folder) / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer")
    # (name, input hook, output hook, CLT?, layers covered, padded to the model's layers?,
    #  expected: "full" (error nodes for every layer) | "partial" (own layers only) | "crash")
    cases = [
        ("set mlp.hook_in → hook_mlp_out", "mlp.hook_in", "hook_mlp_out", False, [0, 1, 2], True,
         "full"),
        ("set hook_resid_mid → mlp.hook_out", "hook_resid_mid", "mlp.hook_out", False, [0, 1, 2],
         True, "full"),
        ("set covering layers 0-1 of 3, unpadded (before)", "mlp.hook_in", "hook_mlp_out", False,
         [0, 1], False, "partial"),
        ("set covering layers 0-1 of 3, padded", "mlp.hook_in", "hook_mlp_out", False, [0, 1],
         True, "full"),
        ("set covering layers 1 of 3, padded", "mlp.hook_in", "hook_mlp_out", False, [1], True,
         "full"),
        ("clt hook_resid_mid → hook_mlp_out", "hook_resid_mid", "hook_mlp_out", True, [0, 1, 2],
         True, "full"),
        ("clt covering layers 0-1 of 3, unpadded (before)", "hook_resid_mid", "hook_mlp_out", True,
         [0, 1], False, "crash"),
        ("clt covering layers 0-1 of 3, padded", "hook_resid_mid", "hook_mlp_out", True, [0, 1],
         True, "full"),
        ("clt covering layers 0, 2 of 3, padded", "hook_resid_mid", "hook_mlp_out", True, [0, 2],
         True, "full"),
    ]  # fmt: skip
    out = []
    for i, (name, hook_in, hook_out, is_clt, covered, padded, expected) in enumerate(cases):
        sub = Path(folder) / f"case{i}"
        n_model_layers = L if padded else None
        if is_clt:
            write_clt(sub, _random_clt(g, True, len(covered)), feature_input_hook=hook_in,
                      feature_output_hook=hook_out, layers=covered,
                      n_model_layers=n_model_layers)  # fmt: skip
        else:
            layers = {i: _random_layer(g, threshold=False, skip=False) for i in covered}
            write_transcoder_set(sub, layers, feature_input_hook=hook_in,
                                 feature_output_hook=hook_out, activation="relu",
                                 n_model_layers=n_model_layers)  # fmt: skip
        ct, _ = load(str(sub.resolve()))
        model = TransformerLensReplacementModel.from_config(cfg, ct)
        model.set_tokenizer(tokenizer)
        with torch.no_grad():
            for block in model.blocks:  # norm weights ≠ 1, so the two hooks differ
                block.ln2.w.copy_(1 + 0.5 * torch.randn(D, generator=g))
        row = {
            "check": f"replacement model: {name}",
            "encode": float("nan"),
            "decode": float("nan"),
            "fired_mismatch": 0,
            "model_layers": L,
            "covered_layers": covered,
            "padded": padded,
            "expected": expected,
        }
        try:
            graph = attribute(tokens, model, max_n_logits=3, batch_size=16, verbose=False)
        except Exception as e:  # noqa: BLE001 - the failure is what this case records
            row |= {"class": f"attribute() failed: {type(e).__name__}", "error": str(e)[:300],
                    "outcome": "crash"}  # fmt: skip
        else:
            n_feat = graph.active_features.shape[0]
            n_nodes = graph.adjacency_matrix.shape[0]
            n_logits = len(graph.logit_tokens)
            error_layers = (n_nodes - n_feat - len(tokens) - n_logits) // len(tokens)
            feature_layers = sorted({int(x) for x in graph.active_features[:, 0].tolist()})
            active_in_padded = sum(
                int((graph.active_features[:, 0] == layer).sum())
                for layer in range(L) if layer not in covered
            )  # fmt: skip
            row |= {
                "class": f"attribute() ok, {error_layers} error layers",
                "error_node_layers": error_layers,
                "feature_layers": feature_layers,
                "active_features_in_padded_layers": active_in_padded,
                "outcome": "full" if error_layers == L else "partial",
            }
            if active_in_padded:
                row["outcome"] = "padded latents active"
        row["expect_equal"] = True
        row["agrees"] = row["outcome"] == expected
        out.append(row)
        if name.startswith("set mlp.hook_in"):
            _, cache = model.run_with_cache(tokens)
            hook_in_acts = cache["blocks.0.mlp.hook_in"]
            normed = cache["blocks.0.ln2.hook_normalized"]
            mid = cache["blocks.0.hook_resid_mid"]
            out.append(
                {
                    "check": "TL: mlp.hook_in vs ln2(hook_resid_mid) [Δ=0 expected]",
                    "class": "HookedTransformer (fold_ln=False)",
                    "encode": _max_diff(hook_in_acts, model.blocks[0].ln2(mid)),
                    "decode": float("nan"),
                    "fired_mismatch": 0,
                    "expect_equal": True,
                }
            )
            out.append(
                {
                    "check": "TL: mlp.hook_in vs ln2.hook_normalized [Δ>0 expected]",
                    "class": "HookedTransformer (fold_ln=False)",
                    "encode": _max_diff(hook_in_acts, normed),
                    "decode": float("nan"),
                    "fired_mismatch": 0,
                    "expect_equal": False,
                }
            )
    return out


def load(path: str, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return load_transcoder_from_hub(path, device=torch.device("cpu"), **kwargs)


def unexpected(results: list[dict]) -> list[str]:
    """The checks whose agreement (within TOLERANCE, the same latents firing; for a replacement
    model case its outcome) is not what they expect."""
    failed = []
    for r in results:
        enc, dec = r["encode"], r["decode"]
        agrees = (enc != enc or enc <= TOLERANCE) and (dec != dec or dec <= TOLERANCE)
        agrees = agrees and r["fired_mismatch"] == 0
        if "outcome" in r:
            agrees = r["agrees"]
        if agrees != r["expect_equal"]:
            failed.append(r["check"])
    return failed


def test_sets_and_clts_load_and_compute_the_same(tmp_path):
    torch.manual_seed(0)
    g = _gen(0)
    rows = [torch.randn(ROWS, D, generator=g) for _ in range(L)]
    results = []
    relu = [_random_layer(g, threshold=False, skip=False) for _ in range(L)]
    results += check_set("set relu", tmp_path / "relu", relu, "relu", None, load, rows)
    jump = [_random_layer(g, threshold=True, skip=False) for _ in range(L)]
    # a pre-activation exactly at its threshold: saetrain (pre > θ) does not fire it
    pre0 = rows[0] @ jump[0].W_enc + jump[0].b_enc
    jump[0].threshold[:8] = pre0[0, :8]
    results += check_set("set jumprelu", tmp_path / "jumprelu", jump, "jumprelu", None, load, rows)
    skip = [_random_layer(g, threshold=True, skip=True) for _ in range(L)]
    results += check_set("set jumprelu+skip", tmp_path / "skip", skip, "jumprelu", None, load, rows)
    bf16 = [_random_layer(g, threshold=True, skip=False) for _ in range(L)]
    results += check_set(
        "set jumprelu bf16", tmp_path / "bf16", bf16, "jumprelu", None, load, rows,
        dtype=torch.bfloat16,
    )  # fmt: skip
    topk = [_random_layer(g, threshold=False, skip=False) for _ in range(L)]
    results += check_set(
        "set topk (0.5.0 reads it as ReLU)", tmp_path / "topk", topk, "topk", 5, load, rows,
        expect_equal=False,
    )  # fmt: skip
    results += check_dictionaries(tmp_path / "dictionaries", load, rows)
    x = torch.stack([torch.randn(ROWS, D, generator=g) for _ in range(L)])
    results += check_clt("clt relu", tmp_path / "clt_relu", _random_clt(g, False), load, x)
    results += check_clt("clt jumprelu", tmp_path / "clt_jumprelu", _random_clt(g, True), load, x)
    results += check_saetrain_clt(tmp_path / "saetrain_clt", load, x)
    assert not unexpected(results), results


def test_the_replacement_model_runs_attribute(tmp_path):
    torch.manual_seed(0)
    results = check_replacement_model(tmp_path / "replacement_model", load)
    assert not unexpected(results), results
