"""Peer libraries' TopK SAE training on a tensor of activations, for side-by-side comparisons.

Optional: nothing here imports a peer at module import time, and no peer is a saetrain
dependency. Install a peer into a scratch environment (with saetrain beside it), e.g.

    python3 -m venv /tmp/peers
    /tmp/peers/bin/pip install -c constraints-cpu.txt torch==2.13.0
    /tmp/peers/bin/pip install -c constraints-cpu.txt eai-sparsify
    /tmp/peers/bin/pip install -e . --no-deps   # and saetrain's own dependencies

API (every function takes raw activation rows; nothing is normalised for the peer):

    sparsify_available() -> bool
    train_sparsify_topk(train, n_latents=..., k=..., ...) -> PeerWeights
    to_topk_sae(weights, k) -> saetrain TopKSAE (raw scale, SAELens shapes)

A peer's dictionary is scored as saetrain's are:
`saetrain.bench.score.score_rows(to_topk_sae(weights, k), rows)`.

`train_sparsify_topk` drives sparsify's own SparseCoder (its init, forward, FVU and AuxK losses,
decoder-norm handling) through the steps of sparsify.Trainer's FVU path (grad_acc_steps = 1,
micro_acc_steps = 1): b_dec set to the first batch's mean; the decoder renormalised before every
forward; gradient parallel to the decoder rows removed; the optimiser it names (Adam with
transformers' linear warm-up/decay schedule over the whole run, or SignSGD under schedule-free
averaging, sparsify's default) and its learning-rate rule when lr is None; dead latents counted
as sparsify does (tokens since fired > threshold); with schedule-free, the averaged weights that
sparsify's checkpoint saves (optimizer.eval()). The rows are taken in the order given.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PeerWeights:
    """A trained TopK SAE in SAELens shapes, on raw activations."""

    W_enc: torch.Tensor  # [d_in, n]
    b_enc: torch.Tensor  # [n]
    W_dec: torch.Tensor  # [n, d_in]
    b_dec: torch.Tensor  # [d_in]
    info: dict[str, Any] = field(default_factory=dict)  # recipe, seconds, training history


def sparsify_available() -> bool:
    """Whether EleutherAI's sparsify (PyPI: eai-sparsify) can be imported."""
    return importlib.util.find_spec("sparsify") is not None


def sparsify_default_lr(n_latents: int, optimizer: str) -> float:
    """sparsify.Trainer's learning rate when TrainConfig.lr is None (version 1.3)."""
    if optimizer == "adam":
        return 2e-4 / (n_latents / 2**14) ** 0.5
    if optimizer == "signum":
        return 5e-3 / (n_latents / 2**14) ** 0.5
    raise ValueError(f"optimizer={optimizer!r}; choose adam or signum")


def train_sparsify_topk(
    train: torch.Tensor,
    *,
    n_latents: int,
    k: int = 32,
    batch_size: int = 2048,
    lr: float | None = None,
    optimizer: str = "adam",
    warmup_steps: int = 1000,
    auxk_alpha: float = 0.0,
    dead_feature_threshold: int = 10_000_000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log_every: int = 0,
) -> PeerWeights:
    """Train sparsify's TopK SparseCoder on the rows of `train` [N, d], in order.

    Defaults are sparsify.TrainConfig's (warm-up 1000 steps, AuxK off, dead after 10M tokens),
    except the optimiser: "adam" here ("signum", sparsify's default, is available). Steps:
    N // batch_size; a partial last batch is dropped, as sparsify's DataLoader count does.
    """
    import os

    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1" if str(device) == "cpu" else "0")
    from sparsify import SparseCoder, SparseCoderConfig

    train = train.to(device=device, dtype=torch.float32)
    d = train.shape[1]
    steps = len(train) // batch_size
    if steps < 1:
        raise ValueError(f"{len(train)} rows make no batch of {batch_size}")
    torch.manual_seed(seed)  # sparsify.Trainer seeds the init this way
    sae = SparseCoder(d, SparseCoderConfig(k=k, num_latents=n_latents), device, torch.float32)
    base_lr = lr if lr is not None else sparsify_default_lr(n_latents, optimizer)
    schedulers: list[Any] = []
    if optimizer == "adam":
        from transformers import get_linear_schedule_with_warmup

        opt: Any = torch.optim.Adam(sae.parameters(), lr=base_lr)
        schedulers.append(get_linear_schedule_with_warmup(opt, warmup_steps, steps))
    elif optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=base_lr), momentum=0.95)
        opt.train()
    else:
        raise ValueError(f"optimizer={optimizer!r}; choose adam or signum")

    since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(n_latents, dtype=torch.bool, device=device)
    history = []
    start = time.perf_counter()
    for step in range(steps):
        x = train[step * batch_size : (step + 1) * batch_size]
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_feature_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for s in schedulers:
            s.step()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[did_fire] = 0
            did_fire.zero_()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            row = {
                "step": step + 1,
                "fvu": float(out.fvu),
                "auxk": float(out.auxk_loss),
                "dead_fraction": float((since_fired > dead_feature_threshold).float().mean()),
            }
            history.append(row)
            print(f"  sparsify step {step + 1}/{steps} fvu {row['fvu']:.4f}", flush=True)
    if optimizer == "signum":
        opt.eval()  # sparsify saves the schedule-free average
    seconds = time.perf_counter() - start
    import sparsify

    return PeerWeights(
        W_enc=sae.encoder.weight.detach().T.contiguous(),
        b_enc=sae.encoder.bias.detach().clone(),
        W_dec=sae.W_dec.detach().clone(),
        b_dec=sae.b_dec.detach().clone(),
        info={
            "library": f"sparsify {sparsify.__version__}",
            "optimizer": optimizer,
            "lr": base_lr,
            "warmup_steps": warmup_steps if optimizer == "adam" else 0,
            "auxk_alpha": auxk_alpha,
            "dead_feature_threshold": dead_feature_threshold,
            "steps": steps,
            "tokens": steps * batch_size,
            "seed": seed,
            "train_seconds": seconds,
            "history": history,
        },
    )


def to_topk_sae(weights: PeerWeights, k: int):
    """A saetrain TopKSAE holding the peer's weights (it encodes and decodes raw activations)."""
    from saetrain.dictionaries.topk import TopKSAE

    d_in, n = weights.W_enc.shape
    sae = TopKSAE(d_in, n, k=k, dtype=weights.W_enc.dtype, device=weights.W_enc.device)
    sae.load_state_dict(
        {
            "W_enc": weights.W_enc,
            "b_enc": weights.b_enc,
            "W_dec": weights.W_dec,
            "b_dec": weights.b_dec,
        }
    )
    return sae.eval()
