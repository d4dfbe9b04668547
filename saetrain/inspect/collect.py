"""Per-latent statistics in one streaming pass: top contexts, quantile samples, histograms.

Nothing holds all activations. Each batch of codes ([B, T, n], zero where a latent is silent or
the position is special) updates, on the device the codes live on:

- a running top-K per latent (value, global row, the window of that latent's activations and
  token ids around the row): the batch's own top-K per latent is merged with the kept one;
- a uniform sample of each latent's firing positions (reservoir by random priority: the same
  merge with a random key instead of the value), later split into activation-quantile bands;
- firing counts, activation sums, the smallest activation, and a histogram of log10 activation
  on a fixed fine grid (from which quantile values and linear histograms are derived at the end).

Memory is n × (2·K·W + bins) numbers, whatever the number of tokens. Rows are numbered
`context · T + position` over the contexts in the order they were given, so a brute-force pass
over the same contexts finds the same rows (ties in value are broken by the lower row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saetrain.dictionaries.base import Codes, SparseCodes

# The fixed histogram grid: log10(activation) from LOG_MIN to LOG_MAX in LOG_BINS steps (0.025 of
# a decade each: quantile values read from it are within 6% of the exact ones). Activations
# outside are counted in the end bins.
LOG_MIN, LOG_MAX, LOG_BINS = -4.0, 4.0, 320


@dataclass(frozen=True)
class CollectSettings:
    """How much to keep per latent."""

    # Top-activating contexts kept per latent.
    top_k: int = 20
    # Tokens shown before and after the max token of each example (the window is 1 + both).
    before: int = 12
    after: int = 4
    # Activation-quantile bands and examples sampled per band.
    quantile_bands: int = 4
    per_band: int = 5
    # Seed of the random priorities that pick the quantile samples.
    seed: int = 0

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    @property
    def sample_size(self) -> int:
        return self.quantile_bands * self.per_band


def dense_codes(codes: Codes, n_latents: int) -> torch.Tensor:
    """[N, n] codes whatever form the dictionary returned (TopK's indices/values scattered)."""
    if isinstance(codes, SparseCodes):
        return codes.to_dense(n_latents)
    return codes


class _Kept:
    """K entries per latent ordered by a key (largest first): key, value, row, window, tokens."""

    def __init__(self, n: int, k: int, window: int, device: torch.device):
        self.key = torch.full((n, k), -1.0, device=device)
        self.value = torch.zeros(n, k, device=device)
        self.row = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.acts = torch.zeros(n, k, window, device=device)
        self.tokens = torch.full((n, k, window), -1, dtype=torch.int32, device=device)

    def merge(self, key, value, row, windows) -> None:
        """Keep the K largest keys of the kept and the new entries ([n, m] each); among equal keys
        the lower row wins (the candidates are sorted by row first, and the sort is stable).
        `windows(latents, candidates)` gives the (acts, tokens) windows [P, W] of the new entries
        that made it: after the first batches few do, so few windows are ever gathered."""
        k = self.key.shape[1]
        key = torch.cat([self.key, key], 1)
        row = torch.cat([self.row, row], 1)
        # Empty slots (row -1) sort last among equal keys.
        by_row = torch.argsort(torch.where(row < 0, torch.iinfo(torch.int64).max, row), dim=1)
        by_key = torch.argsort(torch.gather(key, 1, by_row), dim=1, descending=True, stable=True)
        order = torch.gather(by_row, 1, by_key)[:, :k]
        self.key = torch.gather(key, 1, order)
        self.row = torch.gather(row, 1, order)
        self.value = torch.gather(torch.cat([self.value, value], 1), 1, order)
        w = self.acts.shape[2]
        kept = order.clamp(max=k - 1)[:, :, None].expand(-1, -1, w)
        acts, tokens = torch.gather(self.acts, 1, kept), torch.gather(self.tokens, 1, kept)
        latents, slots = (order >= k).nonzero(as_tuple=True)
        if latents.numel():
            new_acts, new_tokens = windows(latents, order[latents, slots] - k)
            acts[latents, slots] = new_acts
            tokens[latents, slots] = new_tokens
        self.acts, self.tokens = acts, tokens


@dataclass
class LatentStats:
    """What the pass found, on the CPU. Per latent j: `top_*[j]` its top contexts (largest first;
    row -1: fewer firings than K), `sample_*[j]` its random firing sample, sorted by activation."""

    n_latents: int
    context_size: int
    settings: CollectSettings
    tokens: int  # positions counted (special tokens excluded)
    counts: torch.Tensor  # [n] int64: positions where the latent is non-zero
    sums: torch.Tensor  # [n] float64: sum of its activations
    act_min: torch.Tensor  # [n]: smallest positive activation (0 if none)
    top_values: torch.Tensor  # [n, K]
    top_rows: torch.Tensor  # [n, K] int64: context · T + position
    top_acts: torch.Tensor  # [n, K, W]: the latent's activation on each window token
    top_tokens: torch.Tensor  # [n, K, W] int32: token ids (-1 outside the context)
    sample_values: torch.Tensor  # [n, S]
    sample_rows: torch.Tensor
    sample_acts: torch.Tensor
    sample_tokens: torch.Tensor
    log_histogram: torch.Tensor  # [n, LOG_BINS] int64 on the fixed log10 grid

    @property
    def frequencies(self) -> torch.Tensor:
        """Float64 [n]: fraction of counted positions where each latent fired."""
        return self.counts.double() / max(self.tokens, 1)

    @property
    def mean_activation(self) -> torch.Tensor:
        """[n]: mean activation over the positions where the latent fired (0 if it never did)."""
        return torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1).double(), 0.0)

    @property
    def act_max(self) -> torch.Tensor:
        return self.top_values[:, 0].clamp(min=0)

    def quantile_values(self, quantiles: torch.Tensor) -> torch.Tensor:
        """[n, len(quantiles)]: activation at each quantile of the firing distribution, read
        from the log grid (a bin's upper edge; 0 for a latent that never fired)."""
        cum = self.log_histogram.cumsum(1).double()
        total = cum[:, -1:].clamp(min=1)
        target = quantiles.double()[None, :] * total
        bins = torch.searchsorted(cum, target.contiguous()).clamp(max=LOG_BINS - 1)
        edges = 10 ** (LOG_MIN + (bins.double() + 1) * (LOG_MAX - LOG_MIN) / LOG_BINS)
        edges = torch.minimum(edges, self.act_max.double()[:, None])
        return torch.where(cum[:, -1:] > 0, edges, 0.0).float()

    def linear_histogram(self, j: int, n_bins: int) -> tuple[list[int], float, float]:
        """Latent j's firing activations in `n_bins` equal bins from act_min to act_max, rebinned
        from the log grid (each fine bin's count goes to the bin holding its centre)."""
        lo, hi = float(self.act_min[j]), float(self.act_max[j])
        counts = self.log_histogram[j]
        out = [0] * n_bins
        if hi <= lo or int(counts.sum()) == 0:
            if int(counts.sum()):
                out[-1] = int(counts.sum())
            return out, lo, hi
        width = (LOG_MAX - LOG_MIN) / LOG_BINS
        centres = 10 ** (LOG_MIN + (torch.arange(LOG_BINS, dtype=torch.float64) + 0.5) * width)
        idx = ((centres - lo) / (hi - lo) * n_bins).floor().clamp(0, n_bins - 1).long()
        binned = torch.zeros(n_bins, dtype=torch.int64).index_add_(0, idx, counts)
        return binned.tolist(), lo, hi


class LatentCollector:
    """Feeds batches of one dictionary's codes into the running statistics."""

    def __init__(
        self,
        n_latents: int,
        context_size: int,
        settings: CollectSettings = CollectSettings(),
        device: torch.device | str = "cpu",
    ):
        self.n = n_latents
        self.t = context_size
        self.s = settings
        self.device = torch.device(device)
        self.contexts = 0
        self.tokens = 0
        n, w = n_latents, settings.window
        self.counts = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.act_min = torch.full((n,), float("inf"), device=self.device)
        self.hist = torch.zeros(n * LOG_BINS, dtype=torch.int64, device=self.device)
        self.top = _Kept(n, settings.top_k, w, self.device)
        self.sample = _Kept(n, settings.sample_size, w, self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.offsets = torch.arange(-settings.before, settings.after + 1, device=self.device)

    @torch.no_grad()
    def update(self, codes: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """One batch: codes [B, T, n] (dense, float), its token ids and mask [B, T]."""
        b, t, n = codes.shape
        if t != self.t or n != self.n:
            raise ValueError(
                f"codes of shape {tuple(codes.shape)}; expected [B, {self.t}, {self.n}]"
            )
        # Latent-major (a fresh copy, so masking in place leaves the caller's codes alone): each
        # latent's positions are contiguous for topk and gather. Few full passes over [n, B·T]:
        # the statistics come from the non-zero entries alone.
        by_latent = codes.to(self.device, torch.float32).reshape(b * t, n).t().contiguous()
        mask = mask.to(self.device).reshape(1, b * t)
        by_latent.masked_fill_(~mask, 0.0)
        self.tokens += int(mask.sum())
        latents, rows = by_latent.nonzero(as_tuple=True)
        values = by_latent[latents, rows]
        self.counts += torch.bincount(latents, minlength=n)
        self.sums.index_add_(0, latents, values.double())
        positive = values > 0
        latents, rows, values = latents[positive], rows[positive], values[positive]
        if values.numel():
            self.act_min.scatter_reduce_(0, latents, values, "amin")
            logs = values.log10()
            bins = ((logs - LOG_MIN) / (LOG_MAX - LOG_MIN) * LOG_BINS).long()
            bins = bins.clamp(0, LOG_BINS - 1)
            self.hist.index_add_(0, latents * LOG_BINS + bins, torch.ones_like(bins))

        ids = input_ids.to(self.device).reshape(-1)
        # Top-K by value; only firing (positive) positions count: the rest get key -1.
        m = min(self.s.top_k, b * t)
        key, local = by_latent.topk(m, dim=1)
        key = torch.where(key > 0, key, -1.0)
        self.top.merge(*self._entries(key, local, by_latent, ids))
        # A uniform sample of firing positions: the largest random priorities, drawn for the
        # firing entries only and ranked within each latent (sorted by latent, then priority).
        m = min(self.s.sample_size, b * t)
        priority = torch.rand(values.shape, generator=self.gen, device=self.device)
        order = torch.argsort(priority, descending=True)
        order = order[torch.argsort(latents[order], stable=True)]
        lat, local_rows, pri = latents[order], rows[order], priority[order]
        per_latent = torch.bincount(lat, minlength=n)
        first = per_latent.cumsum(0) - per_latent
        rank = torch.arange(lat.numel(), device=self.device) - first[lat]
        chosen = rank < m
        key = torch.full((n, m), -1.0, device=self.device)
        local = torch.zeros((n, m), dtype=torch.int64, device=self.device)
        key[lat[chosen], rank[chosen]] = pri[chosen]
        local[lat[chosen], rank[chosen]] = local_rows[chosen]
        self.sample.merge(*self._entries(key, local, by_latent, ids))
        self.contexts += b

    def _entries(self, key, local, by_latent, ids):
        """The merge's inputs for batch rows `local` [n, m]: key, value, global row, and the
        function that gathers the windows of the entries that are kept."""
        t = self.t
        valid = key >= 0
        value = torch.gather(by_latent, 1, local)
        ctx, pos = local // t, local % t
        row = torch.where(valid, (self.contexts + ctx) * t + pos, -1)

        def windows(latents: torch.Tensor, candidates: torch.Tensor):
            c, p = ctx[latents, candidates], pos[latents, candidates]
            win = p[:, None] + self.offsets  # [P, W]
            inside = (win >= 0) & (win < t)
            flat = c[:, None] * t + win.clamp(0, t - 1)
            acts = torch.where(inside, by_latent[latents[:, None], flat], 0.0)
            return acts, torch.where(inside, ids[flat].int(), -1)

        return torch.where(valid, key, -1.0), torch.where(valid, value, 0.0), row, windows

    def result(self) -> LatentStats:
        """The statistics so far, on the CPU; the quantile sample sorted by activation."""
        order = torch.argsort(self.sample.value, dim=1, descending=True, stable=True)
        idx = order[:, :, None].expand(-1, -1, self.s.window)
        act_min = torch.where(torch.isinf(self.act_min), 0.0, self.act_min)
        return LatentStats(
            n_latents=self.n,
            context_size=self.t,
            settings=self.s,
            tokens=self.tokens,
            counts=self.counts.cpu(),
            sums=self.sums.cpu(),
            act_min=act_min.cpu(),
            top_values=torch.where(self.top.row >= 0, self.top.value, 0.0).cpu(),
            top_rows=self.top.row.cpu(),
            top_acts=self.top.acts.cpu(),
            top_tokens=self.top.tokens.cpu(),
            sample_values=torch.gather(self.sample.value, 1, order).cpu(),
            sample_rows=torch.gather(self.sample.row, 1, order).cpu(),
            sample_acts=torch.gather(self.sample.acts, 1, idx).cpu(),
            sample_tokens=torch.gather(self.sample.tokens, 1, idx).cpu(),
            log_histogram=self.hist.reshape(self.n, LOG_BINS).cpu(),
        )
