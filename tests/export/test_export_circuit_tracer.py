"""circuit-tracer export: file names, tensor names / shapes / dtypes, config.yaml, round trips, hook
names, layer coverage, and a CLT computed from its files. circuit-tracer itself is not imported
(tests/interop/test_circuit_tracer_load.py loads the same folders with it)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saetrain.dictionaries import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    ReLUSAE,
    SparseCodes,
    TopKSAE,
)
from saetrain.export.circuit_tracer import (
    THRESHOLD_KEY,
    TOPK_COMPATIBILITY,
    CircuitTracerExportError,
    CLTTensors,
    TranscoderLayer,
    circuit_tracer_hooks,
    coverage_warning,
    hooks_for_layers,
    layer_from_dictionary,
    read_clt,
    read_transcoder_set,
    threshold_in_dtype,
    write_clt,
    write_transcoder_set,
)

D, N = 8, 20
HOOKS = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}


def _layer(g: torch.Generator, threshold: bool = False, skip: bool = False) -> TranscoderLayer:
    return TranscoderLayer(
        W_enc=torch.randn(D, N, generator=g),
        b_enc=torch.randn(N, generator=g),
        W_dec=torch.randn(N, D, generator=g),
        b_dec=torch.randn(D, generator=g),
        threshold=torch.rand(N, generator=g) if threshold else None,
        W_skip=torch.randn(D, D, generator=g) if skip else None,
    )


def _clt(g: torch.Generator, L: int = 3, n: int = N, threshold: bool = True) -> CLTTensors:
    return CLTTensors(
        W_enc=[torch.randn(D, n, generator=g) for _ in range(L)],
        b_enc=[torch.randn(n, generator=g) for _ in range(L)],
        W_dec=[torch.randn(n, L - i, D, generator=g) for i in range(L)],
        b_dec=[torch.randn(D, generator=g) for _ in range(L)],
        threshold=[torch.rand(n, generator=g) for _ in range(L)] if threshold else None,
    )


def _config(folder) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


def test_transcoder_set_files_tensors_and_config(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = [_layer(g, threshold=True, skip=True) for _ in range(3)]
    result = write_transcoder_set(
        tmp_path, layers, **HOOKS, activation="jumprelu", n_model_layers=3, scan="my-scan"
    )
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "config.yaml",
        "layer_0.safetensors",
        "layer_1.safetensors",
        "layer_2.safetensors",
    ]
    assert result.files[-1] == "config.yaml" and result.warnings == []
    for i, layer in enumerate(layers):
        t = load_file(tmp_path / f"layer_{i}.safetensors")
        shapes = {name: tuple(x.shape) for name, x in t.items()}
        assert shapes == {
            "W_enc": (N, D),  # feature-major: the transpose of SAELens's [d, n]
            "W_dec": (N, D),
            "b_enc": (N,),
            "b_dec": (D,),
            "activation_function.threshold": (N,),
            "W_skip": (D, D),
        }
        assert all(x.dtype == torch.float32 for x in t.values())
        assert torch.equal(t["W_enc"], layer.W_enc.T)
        assert torch.equal(t["activation_function.threshold"], layer.threshold)
    cfg = _config(tmp_path)
    assert {k: cfg[k] for k in ("model_kind", "feature_input_hook", "feature_output_hook")} == {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
    }
    assert cfg["scan"] == "my-scan"
    # ReLU / JumpReLU are told apart by the threshold tensor; only a TopK set names its activation
    assert "activation" not in cfg and "k" not in cfg and "transcoders" not in cfg
    assert cfg["saetrain"]["activation"] == "jumprelu" and cfg["saetrain"]["skip_connection"]
    assert (cfg["saetrain"]["d_model"], cfg["saetrain"]["d_transcoder"]) == (D, N)


def test_transcoder_set_round_trips_through_the_reader(tmp_path):
    g = torch.Generator().manual_seed(1)
    layers = {i: _layer(g, threshold=True) for i in range(2)}
    write_transcoder_set(tmp_path, layers, **HOOKS, activation="jumprelu")
    back = read_transcoder_set(tmp_path)
    assert sorted(back.layers) == [0, 1]
    for i, layer in layers.items():
        got = back.layers[i]
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            assert torch.equal(getattr(got, name), getattr(layer, name)), name
        assert got.W_skip is None
    assert back.config["model_kind"] == "transcoder_set"


def test_topk_set_names_its_activation_and_says_who_reads_it(tmp_path, caplog):
    g = torch.Generator().manual_seed(2)
    with caplog.at_level(logging.WARNING, logger="saetrain.export.circuit_tracer"):
        result = write_transcoder_set(
            tmp_path,
            [_layer(g), _layer(g)],
            **HOOKS,
            activation="topk",
            k=4,
            transcoder_uri_prefix="hf://me/repo/tc/",
        )
    cfg = _config(tmp_path)
    assert (cfg["activation"], cfg["k"]) == ("topk", 4)
    assert cfg["transcoders"] == [
        "hf://me/repo/tc/layer_0.safetensors",
        "hf://me/repo/tc/layer_1.safetensors",
    ]
    assert TOPK_COMPATIBILITY in result.warnings
    assert "0.5.0" in TOPK_COMPATIBILITY and "main branch" in TOPK_COMPATIBILITY
    assert "ReLU" in caplog.text
    assert "activation_function.threshold" not in load_file(tmp_path / "layer_0.safetensors")
    with pytest.raises(CircuitTracerExportError, match="k >= 1"):
        write_transcoder_set(tmp_path / "x", [_layer(g)], **HOOKS, activation="topk")
    with pytest.raises(CircuitTracerExportError, match="needs a threshold"):
        write_transcoder_set(tmp_path / "y", [_layer(g)], **HOOKS, activation="jumprelu")


def test_layers_must_be_contiguous_from_zero_and_fewer_than_the_model_warns(tmp_path):
    g = torch.Generator().manual_seed(3)
    with pytest.raises(CircuitTracerExportError, match=r"0\.\.m−1.*got 0, 2 \(missing 1\)"):
        write_transcoder_set(tmp_path, {0: _layer(g), 2: _layer(g)}, **HOOKS, activation="relu")
    with pytest.raises(CircuitTracerExportError, match="missing 0"):
        write_transcoder_set(tmp_path, {1: _layer(g)}, **HOOKS, activation="relu")
    assert not (tmp_path / "config.yaml").exists()
    result = write_transcoder_set(
        tmp_path, [_layer(g), _layer(g)], **HOOKS, activation="relu", n_model_layers=4
    )
    (message,) = result.warnings
    assert "covers layers 0-1 of a 4-layer model (missing 2-3)" in message
    assert _config(tmp_path)["saetrain"]["warnings"] == [message]
    assert coverage_warning(range(4), 4) is None and coverage_warning(range(2), None) is None
    with pytest.raises(CircuitTracerExportError, match="model with 1 layers"):
        write_transcoder_set(
            tmp_path, [_layer(g)] * 2, **HOOKS, activation="relu", n_model_layers=1
        )


def test_rewriting_a_folder_removes_the_older_exports_files(tmp_path):
    g = torch.Generator().manual_seed(4)
    write_clt(tmp_path, _clt(g, L=2), **HOOKS)
    write_transcoder_set(tmp_path, [_layer(g) for _ in range(3)], **HOOKS, activation="relu")
    write_transcoder_set(tmp_path, [_layer(g) for _ in range(2)], **HOOKS, activation="relu")
    assert sorted(os.listdir(tmp_path)) == [
        "config.yaml",
        "layer_0.safetensors",
        "layer_1.safetensors",
    ]
    assert len(read_transcoder_set(tmp_path).layers) == 2


def test_shapes_circuit_tracer_cannot_hold_are_refused(tmp_path):
    g = torch.Generator().manual_seed(5)
    wide_out = TranscoderLayer(
        W_enc=torch.randn(D, N),
        b_enc=torch.randn(N),
        W_dec=torch.randn(N, D + 1),
        b_dec=torch.randn(D + 1),
    )
    with pytest.raises(CircuitTracerExportError, match="W_dec has shape"):
        write_transcoder_set(tmp_path, [wide_out], **HOOKS, activation="relu")
    with pytest.raises(CircuitTracerExportError, match="every layer or none"):
        write_transcoder_set(
            tmp_path, [_layer(g, skip=True), _layer(g)], **HOOKS, activation="relu"
        )


def test_bf16_export_rounds_the_threshold_down_so_gating_is_unchanged(tmp_path):
    g = torch.Generator().manual_seed(6)
    layer = _layer(g, threshold=True)
    write_transcoder_set(tmp_path, [layer], **HOOKS, activation="jumprelu", dtype=torch.bfloat16)
    t = load_file(tmp_path / "layer_0.safetensors")
    assert all(x.dtype == torch.bfloat16 for x in t.values())
    theta = layer.threshold
    written = t["activation_function.threshold"]
    assert (written.float() <= theta).all()
    # every bf16 value around θ gates the same against θ' (bf16) and θ (fp32)
    grid = (theta[:, None] * torch.linspace(0.98, 1.02, 801)).to(torch.bfloat16)
    assert torch.equal(grid > written[:, None], grid.float() > theta[:, None])
    exact = torch.tensor([0.5, -0.25, 0.0])
    assert torch.equal(threshold_in_dtype(exact, torch.bfloat16).float(), exact)
    negative = threshold_in_dtype(torch.tensor([-1e-3, 1e-30]), torch.bfloat16)
    assert (negative.float() <= torch.tensor([-1e-3, 1e-30])).all()


def test_hook_names_follow_the_sites_trained():
    assert circuit_tracer_hooks("mlp_in.3", "mlp_out.3") == ("mlp.hook_in", "hook_mlp_out")
    assert circuit_tracer_hooks("resid_mid.0", "mlp_out.0") == ("hook_resid_mid", "hook_mlp_out")
    # the SAELens alias of mlp_in is read as mlp_in; circuit-tracer's name for it is mlp.hook_in
    assert circuit_tracer_hooks("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out") == (
        "mlp.hook_in",
        "hook_mlp_out",
    )
    assert circuit_tracer_hooks("mlp_in.1", "mlp_out.1", family="qwen3", mlp_hook_out=True) == (
        "mlp.hook_in",
        "mlp.hook_out",
    )
    with pytest.raises(CircuitTracerExportError, match="before its post-MLP norm"):
        circuit_tracer_hooks("mlp_in.1", "mlp_out.1", family="gemma2", mlp_hook_out=True)
    for src, dst in (
        ("resid_post.1", "mlp_out.1"),
        ("mlp_in.1", "resid_post.1"),
        ("attn_out.1", "mlp_out.1"),
    ):
        with pytest.raises(CircuitTracerExportError, match="resid_mid.L or mlp_in.L"):
            circuit_tracer_hooks(src, dst)
    with pytest.raises(CircuitTracerExportError, match="crosses layers"):
        circuit_tracer_hooks("mlp_in.1", "mlp_out.2")
    with pytest.raises(CircuitTracerExportError, match="unknown kind"):
        circuit_tracer_hooks("mlp_mid.1", "mlp_out.1")
    sites = {i: (f"mlp_in.{i}", f"mlp_out.{i}") for i in range(3)}
    assert hooks_for_layers(sites) == ("mlp.hook_in", "hook_mlp_out")
    with pytest.raises(CircuitTracerExportError, match="one input and one output hook"):
        hooks_for_layers({0: ("mlp_in.0", "mlp_out.0"), 1: ("resid_mid.1", "mlp_out.1")})
    with pytest.raises(CircuitTracerExportError, match="at another layer"):
        hooks_for_layers({0: ("mlp_in.1", "mlp_out.1")})
    with pytest.raises(CircuitTracerExportError, match="relative to blocks"):
        write_transcoder_set(
            "unused",
            [],
            feature_input_hook="blocks.0.mlp.hook_in",
            feature_output_hook="hook_mlp_out",
            activation="relu",
        )


def test_clt_files_tensors_config_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(7)
    clt = _clt(g, L=3)
    result = write_clt(
        tmp_path, clt, feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out"
    )
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["config.yaml"] + [f"W_{kind}_{i}.safetensors" for i in range(3) for kind in ("enc", "dec")]
    )
    assert result.files[-1] == "config.yaml"
    for i in range(3):
        enc = load_file(tmp_path / f"W_enc_{i}.safetensors")
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{i}": (N, D),
            f"b_enc_{i}": (N,),
            f"b_dec_{i}": (D,),
            f"threshold_{i}": (N,),
        }
        dec = load_file(tmp_path / f"W_dec_{i}.safetensors")
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": (N, 3 - i, D)}
    cfg = _config(tmp_path)
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == (
        "hook_resid_mid",
        "hook_mlp_out",
    )
    back = read_clt(tmp_path).tensors
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        for a, b in zip(getattr(back, name), getattr(clt, name), strict=True):
            assert torch.equal(a, b), name
    with pytest.raises(CircuitTracerExportError, match=r"W_dec\[1\] has shape"):
        bad = CLTTensors(clt.W_enc, clt.b_enc, [clt.W_dec[0]] * 3, clt.b_dec)
        write_clt(tmp_path / "bad", bad, **HOOKS)
    with pytest.raises(CircuitTracerExportError, match="model_kind"):
        read_transcoder_set(tmp_path)


def _clt_forward_from_inputs(clt: CLTTensors, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [L, B, n] and outputs [L, B, d] in saetrain's orientation."""
    L = clt.n_layers
    codes = []
    for i in range(L):
        pre = x[i] @ clt.W_enc[i] + clt.b_enc[i]
        codes.append(pre * (pre > clt.threshold[i]) if clt.threshold else pre.relu())
    outputs = [
        sum(codes[i] @ clt.W_dec[i][:, j - i, :] for i in range(j + 1)) + clt.b_dec[j]
        for j in range(L)
    ]
    return torch.stack(codes), torch.stack(outputs)


def _clt_forward_from_files(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from the raw files in circuit-tracer's orientation (W_enc_i [n, d]; b_dec_i is
    output layer i's bias; W_dec_i slot j writes layer i + j)."""
    L = x.shape[0]
    enc = [load_file(folder / f"W_enc_{i}.safetensors") for i in range(L)]
    dec = [load_file(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(L)]
    codes = []
    for i in range(L):
        pre = torch.einsum("bd,fd->bf", x[i], enc[i][f"W_enc_{i}"]) + enc[i][f"b_enc_{i}"]
        theta = enc[i].get(f"threshold_{i}")
        codes.append(pre.relu() if theta is None else pre * (pre > theta))
    out = torch.stack([enc[j][f"b_dec_{j}"].expand(x.shape[1], -1).clone() for j in range(L)])
    for i in range(L):
        for j in range(dec[i].shape[1]):
            out[i + j] += codes[i] @ dec[i][:, j, :]
    return torch.stack(codes), out


@pytest.mark.parametrize("threshold", [True, False])
def test_clt_computed_from_its_files_equals_the_inputs(tmp_path, threshold):
    g = torch.Generator().manual_seed(8)
    clt = _clt(g, L=4, threshold=threshold)
    write_clt(tmp_path, clt, **HOOKS, n_model_layers=4)
    x = torch.randn(4, 16, D, generator=g)
    codes_in, out_in = _clt_forward_from_inputs(clt, x)
    codes_files, out_files = _clt_forward_from_files(tmp_path, x)
    assert torch.equal(codes_in, codes_files)
    torch.testing.assert_close(out_files, out_in, rtol=1e-5, atol=1e-5)
    assert (codes_in != 0).any() and (codes_in == 0).any()


def _perturbed(dictionary):
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in dictionary.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return dictionary.eval()


def _encode(
    layer: TranscoderLayer, activation: str, k: int | None, x: torch.Tensor
) -> torch.Tensor:
    pre = x @ layer.W_enc + layer.b_enc
    if activation == "jumprelu":
        return pre * (pre > layer.threshold)
    if activation == "topk":
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return pre.relu()


@pytest.mark.parametrize("cls", [JumpReLUSAE, BatchTopKSAE, TopKSAE, ReLUSAE])
def test_layer_from_dictionary_computes_what_the_dictionary_does(cls):
    kwargs = {"k": 4} if cls in (TopKSAE, BatchTopKSAE) else {}
    transcoder = _perturbed(
        cls(D, N, D, transcoder=True, generator=torch.Generator().manual_seed(0), **kwargs)
    )
    if cls is BatchTopKSAE:
        transcoder.threshold.fill_(0.3)
    layer, activation, k = layer_from_dictionary(transcoder)
    expected = {JumpReLUSAE: "jumprelu", BatchTopKSAE: "jumprelu", TopKSAE: "topk", ReLUSAE: "relu"}
    assert activation == expected[cls]
    assert (k is not None) == (cls is TopKSAE)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = transcoder.encode(x)
        ours = ours.to_dense(N) if isinstance(ours, SparseCodes) else ours
        torch.testing.assert_close(_encode(layer, activation, k, x), ours, rtol=0, atol=1e-6)
    if activation == "jumprelu":
        assert layer.threshold.dtype == torch.float32 and layer.threshold.shape == (N,)


def test_layer_from_dictionary_moves_an_saes_centring_into_b_enc():
    sae = _perturbed(JumpReLUSAE(D, N, generator=torch.Generator().manual_seed(0)))
    assert sae.apply_b_dec_to_input
    layer, activation, _ = layer_from_dictionary(sae)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_encode(layer, activation, None, x), sae.encode(x))


def test_gated_has_no_circuit_tracer_form():
    with pytest.raises(CircuitTracerExportError, match="Gated"):
        layer_from_dictionary(GatedSAE(D, N, D, transcoder=True))


# -- partial layer coverage: padded to the model's layers ---------------------------------------


def _ct_codes(tensors: dict, x: torch.Tensor, activation: str, k: int = 3) -> torch.Tensor:
    """A layer's codes from its file as circuit-tracer computes them (W_enc [n, d]; JumpReLU
    pre·1[pre > θ]; its TopK keeps the k largest pre-activations, negative or not)."""
    pre = x @ tensors["W_enc"].T + tensors["b_enc"]
    if activation == "jumprelu":
        return pre * (pre > tensors[THRESHOLD_KEY])
    if activation == "topk":
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)
    return pre.relu()


def _inputs(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Random rows at every scale (1e-3 … 1e6), signs mixed, plus a zero row."""
    x = torch.randn(*shape, generator=g) * 10.0 ** torch.randint(-3, 7, shape[:-1] + (1,))
    x[..., 0, :] = 0
    return x


@pytest.mark.parametrize(
    ("activation", "skip"), [("jumprelu", True), ("relu", False), ("topk", False)]
)
def test_a_set_covering_some_layers_is_padded_with_latents_that_never_fire(
    tmp_path, caplog, activation, skip
):
    g = torch.Generator().manual_seed(20)
    layers = {
        1: _layer(g, activation == "jumprelu", skip),
        3: _layer(g, activation == "jumprelu", skip),
    }
    k = 3 if activation == "topk" else None
    with caplog.at_level(logging.WARNING, logger="saetrain.export.circuit_tracer"):
        result = write_transcoder_set(
            tmp_path, layers, **HOOKS, activation=activation, k=k, n_model_layers=5
        )
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"] + [
        f"layer_{i}.safetensors" for i in range(5)
    ]
    files = {i: load_file(tmp_path / f"layer_{i}.safetensors") for i in range(5)}
    shapes = {name: tuple(t.shape) for name, t in files[1].items()}
    for i in range(5):  # every layer alike, as circuit-tracer's TranscoderSet needs
        assert {name: tuple(t.shape) for name, t in files[i].items()} == shapes
    for i, layer in layers.items():  # the trained layers exactly as without padding
        assert torch.equal(files[i]["W_enc"], layer.W_enc.T)
        assert torch.equal(files[i]["W_dec"], layer.W_dec)
        assert torch.equal(files[i]["b_enc"], layer.b_enc)
        assert torch.equal(files[i]["b_dec"], layer.b_dec)
        if skip:
            assert torch.equal(files[i]["W_skip"], layer.W_skip)
            assert torch.equal(files[i][THRESHOLD_KEY], layer.threshold)
    x = _inputs(g, 256, D)
    for i in (0, 2, 4):
        codes = _ct_codes(files[i], x, activation)
        assert not codes.any()  # never active, on any input
        out = codes @ files[i]["W_dec"] + files[i]["b_dec"]
        if skip:
            out = out + x @ files[i]["W_skip"].T
        assert not out.any()  # writes nothing: the MLP's output is all error
    assert (_ct_codes(files[1], x, activation) != 0).any()
    block = _config(tmp_path)["saetrain"]
    assert block["padded_layers"] == [0, 2, 4] and block["layers"] == 5
    (message,) = [w for w in result.warnings if "covers" in w]
    assert message.startswith("covers layers 1, 3 of a 5-layer model (missing 0, 2, 4): written "
                              "padded to all 5 layers")  # fmt: skip
    assert "wholly error nodes" in message and "attributes with it" not in message
    assert "the padding adds" in message
    assert block["warnings"] == result.warnings
    assert any(message in r.getMessage() for r in caplog.records)


def test_a_clt_covering_some_layers_is_padded_and_computes_what_it_did(tmp_path):
    """A 2-layer CLT at model layers 1 and 3 of 5: written as 5 layers; its own codes and outputs
    at layers 1 and 3 are unchanged, the padded layers' latents never fire and layers 0, 2, 4
    get no output."""
    g = torch.Generator().manual_seed(21)
    clt = _clt(g, L=2)
    result = write_clt(tmp_path, clt, **HOOKS, layers=[1, 3], n_model_layers=5)
    for m in range(5):
        enc = load_file(tmp_path / f"W_enc_{m}.safetensors")
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{m}": (N, D), f"b_enc_{m}": (N,), f"b_dec_{m}": (D,), f"threshold_{m}": (N,),
        }  # fmt: skip
        dec = load_file(tmp_path / f"W_dec_{m}.safetensors")[f"W_dec_{m}"]
        assert tuple(dec.shape) == (N, 5 - m, D)
    dec1 = load_file(tmp_path / "W_dec_1.safetensors")["W_dec_1"]
    assert torch.equal(dec1[:, 0], clt.W_dec[0][:, 0]) and torch.equal(
        dec1[:, 2], clt.W_dec[0][:, 1]
    )
    assert not dec1[:, 1].any() and not dec1[:, 3].any()
    enc3 = load_file(tmp_path / "W_enc_3.safetensors")
    assert torch.equal(enc3["W_enc_3"], clt.W_enc[1].T)
    assert torch.equal(enc3["threshold_3"], clt.threshold[1])
    x = _inputs(g, 5, 64, D)
    codes, out = _clt_forward_from_files(tmp_path, x)
    own_codes, own_out = _clt_forward_from_inputs(clt, x[[1, 3]])
    assert torch.equal(codes[[1, 3]], own_codes)
    torch.testing.assert_close(out[[1, 3]], own_out, rtol=1e-5, atol=1e-5)
    assert not codes[[0, 2, 4]].any() and not out[[0, 2, 4]].any()
    assert _config(tmp_path)["saetrain"]["padded_layers"] == [0, 2, 4]
    (message,) = result.warnings
    assert "covers layers 1, 3 of a 5-layer model (missing 0, 2, 4)" in message
    # without the model's layer count, layers 0..L−1 as before; other layers are refused
    with pytest.raises(CircuitTracerExportError, match="needs layers 0..m−1"):
        write_clt(tmp_path / "x", clt, **HOOKS, layers=[1, 3])
    with pytest.raises(CircuitTracerExportError, match="increasing"):
        write_clt(tmp_path / "x", clt, **HOOKS, layers=[3, 1], n_model_layers=5)
    with pytest.raises(CircuitTracerExportError, match="model with 3 layers"):
        write_clt(tmp_path / "x", clt, **HOOKS, layers=[1, 3], n_model_layers=3)
