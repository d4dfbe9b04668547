"""Cross-layer transcoders (Ameisen et al. 2025, "Circuit Tracing"; Anthropic's CLT recipe).

L layers, each with n latents. Layer ℓ's encoder reads that layer's input x^ℓ (e.g. mlp_in.ℓ):
a^ℓ = σ(x^ℓ·W_enc^ℓ + b_enc^ℓ); its latents write to the output of every layer ℓ' ≥ ℓ through
their own decoders:  ŷ^ℓ' = Σ_{ℓ≤ℓ'} a^ℓ·W_dec^{ℓ→ℓ'} + b_dec^ℓ'  (+ x^ℓ'·W_skip^ℓ'ᵀ with a skip).

Parameters: W_enc [L, d_in, n], b_enc [L·n], W_dec[ℓ] [n, (L−ℓ)·d_out] (slot j of a row = the
decoder to layer ℓ+j), b_dec [L·d_out], W_skip [L, d_out, d_in]. Latent i of layer ℓ is latent
ℓ·n + i of the whole dictionary (codes, firing counters, thresholds, metrics). A latent's decoder
norm ‖W_dec‖ is the norm of its whole row: all its decoders to later layers, concatenated.

The decode is sparse: each layer's codes (layer-blocked SparseCodes, see `layer_blocked`) go
through saetrain.kernels.ops.sparse_decode against [n, (L−ℓ)·d], never a dense [N, n] product.

Activations: TopK per layer (k active latents in each layer, AuxK on each layer's dead latents),
BatchTopK per layer (k·N across the batch in each layer; a threshold per layer at inference),
JumpReLU (Anthropic: the tanh penalty on a·‖W_dec‖ and the pre-activation loss; λ warmed up by
trainer.sparsity_warmup_steps) and ReLU (L1 weighted by ‖W_dec‖). A CLT over one layer is a
transcoder of the same architecture: the same numbers for the same weights (tested).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from saetrain.config import DictionaryConfig
from saetrain.dictionaries.base import (
    Codes,
    Dictionary,
    LatentGroup,
    Scale,
    SparseCodes,
    TrainOutput,
    column_scales,
    total_variance,
)
from saetrain.dictionaries.batchtopk import average_threshold, batch_topk
from saetrain.dictionaries.jumprelu import JumpReLUSAE
from saetrain.dictionaries.layout import CLT_ARCHITECTURES
from saetrain.dictionaries.relu import ReLUSAE
from saetrain.dictionaries.topk import TopKSAE, select_dead
from saetrain.kernels.ops import encode_gather, sparse_decode
from saetrain.planning.site_patterns import KIND_SITES


def layer_blocked(z: torch.Tensor, support: torch.Tensor, n_layers: int) -> SparseCodes:
    """Dense codes [N, L·n] as SparseCodes with one block of equal width per layer.

    Block ℓ holds the positions of `support` in layer ℓ (padded with value-0 entries of the same
    layer up to the widest row of any layer), so a layer's decode reads only its block. Values
    are gathered from z with autograd: z's gradient reaches exactly the support.
    """
    n_rows, total = z.shape
    n = total // n_layers
    mask = support.reshape(n_rows, n_layers, n)
    width = max(int(mask.sum(-1).max()) if n_rows else 0, 1)
    local = mask.to(torch.float32).topk(width, dim=-1, sorted=False).indices
    values = z.reshape(n_rows, n_layers, n).gather(2, local)
    offsets = (torch.arange(n_layers, device=z.device) * n)[None, :, None]
    return SparseCodes((local + offsets).reshape(n_rows, -1), values.reshape(n_rows, -1))


class CLTStructure(Dictionary):
    """The per-layer encoders and triangular decoders; the activation is the class after it."""

    kind = "clt"
    kind_architectures = CLT_ARCHITECTURES
    multi_site = KIND_SITES["clt"].multi_site
    writes_later_layers = KIND_SITES["clt"].writes_later_layers
    latents_per_input = True  # dictionary.n_latents counts one layer's
    fine_tunable = False
    shardable_kind = False
    saelens_loadable = False
    kind_title = "Cross-layer transcoder"
    export_extras = ("circuit_tracer",)
    # Its activation is elementwise at inference (ReLU, JumpReLU, BatchTopK's per-layer
    # threshold), as circuit-tracer's CLTs compute; a TopK CLT picks k per layer.
    elementwise_inference: ClassVar[bool] = True
    latent_sharding = None  # its latents read and write several sites: not split over ranks

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        *,
        n_layers: int = 1,
        **kwargs: Any,
    ):
        d_out = d_in if d_out is None else d_out
        if d_in % n_layers or d_out % n_layers or n_latents % n_layers:
            raise ValueError(
                f"a CLT over {n_layers} layers needs d_in={d_in}, d_out={d_out} and "
                f"n_latents={n_latents} divisible by the number of layers"
            )
        self.n_layers = n_layers  # before the base builds the parameters (init_parameters)
        kwargs["transcoder"] = True
        super().__init__(d_in, n_latents, d_out, **kwargs)

    @property
    def layer_d_in(self) -> int:
        return self.d_in // self.n_layers

    @property
    def layer_d_out(self) -> int:
        return self.d_out // self.n_layers

    @property
    def layer_latents(self) -> int:
        return self.n_latents // self.n_layers

    def init_parameters(
        self,
        skip: bool,
        opts: dict[str, Any],
        generator: torch.Generator | None,
        encoder_init_norm: float | None,
    ) -> None:
        L, d_i, d_o, n = self.n_layers, self.layer_d_in, self.layer_d_out, self.layer_latents
        norm = self.transcoder_encoder_scale if encoder_init_norm is None else encoder_init_norm
        W_enc = norm / d_i**0.5 * torch.randn(L, d_i, n, generator=generator)
        self.W_enc = nn.Parameter(W_enc.to(**opts))
        self.b_enc = nn.Parameter(torch.zeros(L * n, **opts))
        decoders = []
        for layer in range(L):
            W = torch.randn(n, (L - layer) * d_o, generator=generator)
            decoders.append(nn.Parameter((W / W.norm(dim=1, keepdim=True)).to(**opts)))
        self.W_dec = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(L * d_o, **opts))
        self.W_skip = nn.Parameter(torch.zeros(L, d_o, d_i, **opts)) if skip else None

    # -- encode ------------------------------------------------------------------------------

    def layer_input(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return x[:, layer * self.layer_d_in : (layer + 1) * self.layer_d_in]

    def layer_bias(self, layer: int) -> torch.Tensor:
        n = self.layer_latents
        return self.b_enc[layer * n : (layer + 1) * n]

    def layer_pre(self, x_layer: torch.Tensor, layer: int) -> torch.Tensor:
        """[N, n]: one layer's pre-activations from that layer's input alone."""
        return x_layer @ self.W_enc[layer] + self.layer_bias(layer)

    def encode_layer(self, x_layer: torch.Tensor, layer: int) -> Codes:
        """One layer's codes ([N, n], latent indices local to the layer) from its input alone:
        a layer's codes never depend on another layer's input. ReLU here."""
        return self.layer_pre(x_layer, layer).relu()

    def layer_decoder_sum(self, layer: int) -> torch.Tensor:
        """[n, d_out]: each of the layer's latents' decoders summed over the layers it writes,
        its whole write into the residual stream (what inspect shows logit effects of)."""
        n, d = self.layer_latents, self.layer_d_out
        return self.W_dec[layer].detach().reshape(n, self.n_layers - layer, d).sum(1)

    def input_directions(self) -> torch.Tensor:
        """[L·n, L·d_in]: each latent's encoder column, in its own layer's slot of the input."""
        n, d = self.layer_latents, self.layer_d_in
        out = self.W_enc.new_zeros(self.n_layers * n, self.n_layers * d)
        for layer in range(self.n_layers):
            out[layer * n : (layer + 1) * n, layer * d : (layer + 1) * d] = self.W_enc[layer].T
        return out

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L·n]: each layer's encoder on its own input (a batched product, no dense
        [L·d, L·n] matrix)."""
        rows = x.reshape(x.shape[0], self.n_layers, self.layer_d_in)
        pre = torch.einsum("nli,lik->nlk", rows, self.W_enc)
        return pre.reshape(x.shape[0], -1) + self.b_enc

    # -- decode ------------------------------------------------------------------------------

    def layer_contributions(self, codes: SparseCodes) -> list[list[torch.Tensor]]:
        """parts[ℓ'] = each earlier layer's decoded contribution to layer ℓ' (no bias)."""
        L, d_o = self.n_layers, self.layer_d_out
        width = codes.indices.shape[1] // L
        n = self.layer_latents
        parts: list[list[torch.Tensor]] = [[] for _ in range(L)]
        for layer in range(L):
            block = slice(layer * width, (layer + 1) * width)
            local = codes.indices[:, block] - layer * n
            out = sparse_decode(local, codes.values[:, block], self.W_dec[layer])
            for j in range(L - layer):
                parts[layer + j].append(out[:, j * d_o : (j + 1) * d_o])
        return parts

    def decode(self, codes: Codes) -> torch.Tensor:
        """ŷ^ℓ' = Σ_{ℓ≤ℓ'} a^ℓ·W_dec^{ℓ→ℓ'} + b_dec^ℓ', every product sparse."""
        if not isinstance(codes, SparseCodes):
            codes = layer_blocked(codes, codes != 0, self.n_layers)
        parts = self.layer_contributions(codes)
        summed = [torch.stack(p).sum(0) for p in parts]
        return torch.cat(summed, dim=-1) + self.b_dec

    def reconstruct(self, x: torch.Tensor, codes: Codes) -> torch.Tensor:
        out = self.decode(codes)
        if self.W_skip is not None:
            rows = x.reshape(x.shape[0], self.n_layers, self.layer_d_in)
            skip = torch.einsum("nli,loi->nlo", rows, self.W_skip)
            out = out + skip.reshape(x.shape[0], -1)
        return out

    # -- the decoder's constraint, norms and folding -------------------------------------------

    def decoder_norms(self) -> torch.Tensor:
        """[L·n]: the norm of each latent's decoders to all later layers together."""
        return torch.cat([W.norm(dim=1) for W in self.W_dec])

    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        for W in self.W_dec:
            W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        for W in self.W_dec:
            if W.grad is None:
                continue
            unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            W.grad -= (W.grad * unit).sum(dim=1, keepdim=True) * unit

    @torch.no_grad()
    def fold_input_scale(self, scale_in: Scale, scale_out: Scale) -> None:
        """Per-layer (per-column) scales folded: the pre-activations on raw x equal training's."""
        L, d_i, d_o = self.n_layers, self.layer_d_in, self.layer_d_out
        s_in = column_scales(scale_in, self.d_in, self.b_dec)
        s_out = column_scales(scale_out, self.d_out, self.b_dec)
        self.W_enc *= s_in.reshape(L, d_i, 1)
        for layer, W in enumerate(self.W_dec):
            W /= s_out[layer * d_o :]
        self.b_dec /= s_out
        if self.W_skip is not None:
            self.W_skip *= s_in.reshape(L, 1, d_i) / s_out.reshape(L, d_o, 1)

    # -- export -------------------------------------------------------------------------------

    def inference_thresholds(self) -> torch.Tensor | None:
        """[L·n]: each latent's θ at inference (JumpReLU's; BatchTopK's, its layer's), or None
        where a latent fires above 0 (ReLU)."""
        return None

    def latent_groups(self, inputs: list[str], targets: list[str]) -> list[LatentGroup]:
        """One group per layer (`.L<layer>`): that layer's encoder on its own input, and its
        latents' decoders summed over the layers they write."""
        groups = []
        weight, d = self.W_enc, self.layer_d_in
        for i, (input_site, target_site) in enumerate(zip(inputs, targets, strict=True)):

            def encode(x: torch.Tensor, i: int = i) -> Codes:
                return self.encode_layer(x[:, :d].to(weight.device, weight.dtype), i)

            layer = re.search(r"\.(\d+)$", input_site)
            label = layer.group(1) if layer else str(i)
            groups.append(
                LatentGroup(
                    f".L{label}",
                    input_site,
                    target_site,
                    encode,
                    self.layer_latents,
                    self.layer_decoder_sum(i),
                )
            )
        return groups

    def memory_note(self) -> str:
        L, n, d = self.n_layers, self.layer_latents, self.layer_d_out
        decoder_bytes = sum(W.numel() * W.element_size() for W in self.W_dec)
        return (
            f"CLT decoders: L(L+1)/2 = {L * (L + 1) // 2} blocks of {n} × {d} "
            f"({decoder_bytes / 2**20:.1f} MiB, {3 * decoder_bytes / 2**20:.1f} MiB with Adam's "
            "two moments); they grow with the square of the layer count"
        )

    def about_rows(self, inputs: list[str], sites: tuple[str, ...]) -> dict[str, str]:
        return {
            "kind": (
                f"one layer of a cross-layer transcoder over {', '.join(inputs)} (its latents' "
                "decoders summed over the layers they write for the logit effects)"
            ),
            "d_in → d_out": f"{self.layer_d_in} → {self.layer_d_out} per layer",
        }

    def saelens_architecture(self) -> str:
        return "clt"

    def saelens_fields(self) -> dict[str, Any]:
        return {
            "clt_architecture": self.architecture,
            "n_layers": self.n_layers,
            "d_in_per_layer": self.layer_d_in,
            "d_out_per_layer": self.layer_d_out,
            "d_sae_per_layer": self.layer_latents,
            **self.clt_fields(),
        }

    def clt_fields(self) -> dict[str, Any]:
        return {}


class TopKCLT(CLTStructure, TopKSAE):
    """TopK in each layer: k latents of every layer's n fire per token; AuxK per layer."""

    elementwise_inference = False

    def __init__(self, d_in: int, n_latents: int, d_out: int | None = None, **kwargs: Any):
        aux_k = kwargs.get("aux_k")
        super().__init__(d_in, n_latents, d_out, **kwargs)
        if aux_k is None:  # Gao et al.'s d/2, of one layer's input
            self.aux_k = self.layer_d_in // 2

    def _layer_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Global indices [N, L·k] of each layer's top k in pre [N, L·n], layer-blocked."""
        L, n = self.n_layers, self.layer_latents
        local = pre.reshape(pre.shape[0], L, n).topk(self.k, dim=-1, sorted=False).indices
        offsets = (torch.arange(L, device=pre.device) * n)[None, :, None]
        return (local + offsets).reshape(pre.shape[0], -1)

    def encode(self, x: torch.Tensor) -> SparseCodes:
        pre = self.pre_activations(x)
        indices = self._layer_topk(pre)
        return SparseCodes(indices, pre.gather(1, indices).relu())

    def encode_layer(self, x_layer: torch.Tensor, layer: int) -> Codes:
        values, indices = self.layer_pre(x_layer, layer).topk(self.k, dim=-1, sorted=False)
        return SparseCodes(indices, values.relu())

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        L, n = self.n_layers, self.layer_latents
        kept, aux_parts, n_dead = [], [], 0
        extra: dict[str, torch.Tensor] = {}
        for layer in range(L):
            x_l = self.layer_input(x, layer)
            W, b = self.W_enc[layer], self.layer_bias(layer)
            with torch.no_grad():  # one dense product per layer; its backward is sparse
                pre = x_l @ W + b
                idx, mask, layer_terms = self.layer_selection(pre, layer)
                dead = dead_mask[layer * n : (layer + 1) * n] if dead_mask is not None else None
                aux = select_dead(pre, dead, self.aux_k) if self.aux_k_coefficient > 0 else None
            extra |= layer_terms
            width = idx.shape[1]
            both = idx if aux is None else torch.cat([idx, aux.indices], dim=1)
            values = encode_gather(x_l, W, b, both, pre).relu()
            chosen = values[:, :width] if mask is None else values[:, :width] * mask
            kept.append((idx + layer * n, chosen))
            if aux is not None:
                n_dead += int(dead.sum())  # type: ignore[union-attr]
                aux_parts.append((layer, aux.indices, values[:, width:]))
        codes = _same_width_blocks(kept)
        variance = total_variance(target)
        x_hat = self.reconstruct(x, codes)
        fvu = (target - x_hat).pow(2).sum() / variance
        loss, terms = fvu, {"fvu": fvu.detach(), **extra}
        if aux_parts:
            aux_term = self._auxk(aux_parts, target - x_hat, variance, n_dead)
            loss = loss + self.aux_k_coefficient * aux_term
            terms["auxk"] = aux_term.detach()
        return TrainOutput(loss=loss, x_hat=x_hat, codes=codes, terms=terms)

    def layer_selection(
        self, pre: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(local indices [N, k'], mask of real slots or None, logged terms) that one layer's
        training step keeps: each row's top k here; BatchTopK selects across the batch."""
        return pre.topk(self.k, dim=-1, sorted=False).indices, None, {}

    def _auxk(
        self,
        parts: list[tuple[int, torch.Tensor, torch.Tensor]],
        residual: torch.Tensor,
        variance: torch.Tensor,
        n_dead: int,
    ) -> torch.Tensor:
        """AuxK over layers: every layer's dead selection decodes through its own decoders; the
        term is weakened by the dead count against aux_k per layer, as in TopK."""
        e = residual.detach()
        d_o = self.layer_d_out
        e_hat = torch.zeros_like(e)
        for layer, indices, values in parts:
            out = sparse_decode(indices, values, self.W_dec[layer])
            e_hat = e_hat + nn.functional.pad(out, (layer * d_o, 0))
        scale = min(n_dead / (self.aux_k * self.n_layers), 1.0)
        if self.aux_k_normalization == "residual":
            denominator = (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
        else:  # the target's variance, the main FVU's denominator
            denominator = variance
        return scale * (e_hat - e).pow(2).sum() / denominator

    def clt_fields(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def init_kwargs_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": int(cfg["k"])}


def _same_width_blocks(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> SparseCodes:
    """Layer-blocked SparseCodes from each layer's (global indices, values), the narrower
    blocks padded with value-0 slots repeating their layer's first index."""
    width = max(indices.shape[1] for indices, _ in kept)
    blocks_i, blocks_v = [], []
    for indices, values in kept:
        pad = width - indices.shape[1]
        if pad:
            indices = torch.cat([indices, indices[:, :1].expand(-1, pad)], dim=1)
            values = torch.cat([values, values.new_zeros(values.shape[0], pad)], dim=1)
        blocks_i.append(indices)
        blocks_v.append(values)
    return SparseCodes(torch.cat(blocks_i, dim=1), torch.cat(blocks_v, dim=1))


class BatchTopKCLT(TopKCLT):
    """BatchTopK in each layer: the k·N largest of the layer's pre-activations across the batch;
    inference by a threshold per layer (a running average of the smallest kept activation), so
    it is a JumpReLU CLT at inference and is written for circuit-tracer as one."""

    architecture = "batchtopk"
    selects_per_batch = True
    elementwise_inference = True

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        threshold_momentum: float = 0.9,
        **kwargs: Any,
    ):
        super().__init__(d_in, n_latents, d_out, **kwargs)
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.zeros(self.n_layers, dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def layer_selection(
        self, pre: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        indices, mask, kept = batch_topk(pre, self.k)
        positive = kept[kept > 0]
        smallest = positive.min() if positive.numel() else kept.new_zeros(())
        return indices, mask, {f"batch_threshold.{layer}": smallest.detach()}

    def latent_thresholds(self) -> torch.Tensor:
        """[L·n]: each latent's inference threshold (its layer's)."""
        return self.threshold.repeat_interleave(self.layer_latents)

    def inference_thresholds(self) -> torch.Tensor:
        return self.latent_thresholds()

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pre = self.pre_activations(x)
        return pre * (pre > self.latent_thresholds()).to(pre.dtype)

    def encode_layer(self, x_layer: torch.Tensor, layer: int) -> Codes:
        pre = self.layer_pre(x_layer, layer)
        return pre * (pre > self.threshold[layer]).to(pre.dtype)

    @torch.no_grad()
    def after_step(self, out: TrainOutput) -> None:
        """Each layer's θ ← running average of its smallest kept activation (the first batch
        sets it)."""
        observed = torch.stack(
            [out.terms[f"batch_threshold.{layer}"].float() for layer in range(self.n_layers)]
        )
        average_threshold(self.threshold, self.threshold_updates, observed, self.threshold_momentum)

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        return super().init_kwargs_from_config(cfg) | {"threshold_momentum": cfg.threshold_momentum}

    def clt_fields(self) -> dict[str, Any]:
        return {}  # a JumpReLU at inference: no k

    @classmethod
    def init_kwargs_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {}


class JumpReLUCLT(CLTStructure, JumpReLUSAE):
    """JumpReLU per latent; the tanh penalty and pre-activation loss on a·‖W_dec‖ (Anthropic)."""

    def inference_thresholds(self) -> torch.Tensor:
        return self.threshold

    def encode_layer(self, x_layer: torch.Tensor, layer: int) -> Codes:
        n = self.layer_latents
        pre = self.layer_pre(x_layer, layer)
        return pre * (pre > self.threshold[layer * n : (layer + 1) * n]).to(pre.dtype)

    def training_codes(self, z: torch.Tensor, pre: torch.Tensor, theta: torch.Tensor) -> Codes:
        """Sparse per layer: the firing latents and those within the threshold's window, whose
        zero codes still carry the straight-through gradient to θ."""
        with torch.no_grad():
            support = (pre > theta) | ((pre - theta).abs() < self.bandwidth / 2)
        return layer_blocked(z, support, self.n_layers)

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {n: t.detach() for n, t in self.state_dict().items() if n != "log_threshold"}
        tensors["threshold"] = self.threshold.detach().to(self.W_enc.dtype)
        return tensors


class ReLUCLT(CLTStructure, ReLUSAE):
    """ReLU with the L1 of a·‖W_dec‖ (the ReLU family's penalty on the whole decoder row)."""


CLT_CLASSES: dict[str, type[CLTStructure]] = {
    "topk": TopKCLT,
    "batchtopk": BatchTopKCLT,
    "jumprelu": JumpReLUCLT,
    "relu": ReLUCLT,
}


class CLTLoader:
    """Builds a CLT from its exported cfg.json and tensors (SAELENS_LOADERS' entry)."""

    @staticmethod
    def from_saelens(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Dictionary:
        cls = CLT_CLASSES[cfg["clt_architecture"]]
        L = int(cfg["n_layers"])
        dictionary = cls(
            L * int(cfg["d_in_per_layer"]),
            L * int(cfg["d_sae_per_layer"]),
            L * int(cfg["d_out_per_layer"]),
            n_layers=L,
            skip="W_skip" in tensors,
            dtype=tensors["W_enc"].dtype,
            **cls.init_kwargs_from_saelens(cfg),
        )
        dictionary.load_saelens_tensors(tensors)
        return dictionary
