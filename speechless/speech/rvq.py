"""Residual vector quantizer for stage 1: 1024-d Gemma 4 audio activations -> Q codes per frame.

`SpeechRVQ` wraps `vector_quantize_pytorch.ResidualVQ` (the training path: EMA codebooks, dead-code replacement,
commitment loss) and adds what the stage needs around it:

* input standardisation (mean / std buffers, undone after decoding): the activations carry a large common mean that
  would otherwise eat the first level and inflate cosine;
* `initialize()`: residual k-means fitted offline on training vectors, level by level on the residuals, with empty and
  tiny clusters re-seeded so every code has members; levels >= 1 as gain-shape (equal-norm) codebooks so held-out
  vectors spread over all codes (optionally each with a null code, `null_code`); written into the ResidualVQ buffers
  (`embed`, `embed_avg`, `cluster_size`, `initted`), so vqp's own k-means never runs over it;
* `encode()`: a fast, batch-invariant inference path (per-level fp32 matmul + argmin over fixed-size, padded chunks)
  that returns the same codes as `ResidualVQ` in eval mode;
* `decode()`, safetensors + JSON `save()` / `load()` (never pickles), and codebook averaging across checkpoints.

Training: call `loss(x)` in train mode. With EMA codebooks (the default) the EMA update and dead-code replacement
happen INSIDE that forward pass; the returned total has no trainable parameters behind it and is for logging only.

Several processes (torchrun): build the quantizer after `speechless.core.distributed.setup()`; then vqp synchronises the
EMA update and dead-code replacement across ranks, and each rank passes its
own slice of a global batch (with `global_batch` = the global size, which the dead-code threshold is scaled by).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from vector_quantize_pytorch import ResidualVQ

from speechless.core import distributed
from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import load_tensors, read_json, save_tensors, write_json

FORMAT = "speechless-rvq"
FORMAT_VERSION = 1


class RVQConfig(Section):
    """Residual vector quantizer (stage 1)."""

    num_quantizers: int = Field(8, ge=1)
    """Number of residual levels (codebooks). Default 8: 8 x 11 bits per 40 ms frame, the public Twi recipe's size."""

    codebook_size: int = Field(2048, ge=2)
    """Codes per level. Default 2048 (11 bits), as in the public Twi model and Mimi."""

    dim: int | None = Field(None, ge=1)
    """Input dimension; None = take it from the encoder (1024 for Gemma 4's `output_proj` input). A checkpoint whose
    dim differs from the encoder's is refused when loaded."""

    standardize: Literal["none", "global", "per_dim"] = "global"
    """Input scaling before quantizing. Default 'global': subtract the per-dimension train mean and divide by ONE
    global std (keeps the Euclidean geometry, so minimising distance still minimises raw MSE); 'per_dim' divides each
    dimension by its own std (weights low-variance dimensions up); 'none' quantizes raw activations (their common mean
    then costs the first level most of its codes). Undone after decoding."""

    kmeans_iters: int = Field(8, ge=1)
    """Lloyd iterations per level of the residual k-means that initialises the codebooks (>= 1; one iteration costs
    about N x K x D x 2 FLOP per level). Evidence for the default: docs/results.md."""

    kmeans_sample: int = Field(524_288, ge=2)
    """At most this many train vectors (a random subset) feed `initialize()`. Default 524288 = 256 per code at 2048
    codes; cost grows linearly (one iteration ~ N x K x D x 2 FLOP per level)."""

    kmeans_min_cluster: float = Field(0.25, ge=0.0)
    """During the k-means iterations (all but the last two), clusters smaller than this share of the mean cluster
    size (N / K) are re-seeded at badly served points (picked with probability ~ squared distance, or ~ 1 - cosine for
    equal-norm levels). Default 0.25: keeps codes from starving on the init data (not separately ablated in the study).
    Empty clusters are always re-seeded, so every code has members on the init data."""

    equal_norm_from_level: int | None = Field(1, ge=0)
    """Levels from this index on (0-based) get gain-shape codebooks in `initialize()`: spherical k-means directions
    times one least-squares gain per level, so every code has the same norm and held-out vectors are assigned by
    direction (see `equal_norm_codebook`). Default 1: level 0 sees structured data where plain k-means already used
    0.96 of its codes on held-out data; later levels see noise-like residuals where plain k-means centroids' unequal norms let a few codes
    take nearly all held-out vectors. None = plain k-means on every level."""

    gain_holdout: float = Field(0.2, ge=0.0, lt=1.0)
    """Share of the init vectors held out from the spherical k-means to fit each equal-norm level's gain without the
    self-inclusion bias. Default 0.2."""

    null_code: bool = False
    """Whether each gain-shape level keeps its last code as a null code (the mean of the vectors nearer the origin than
    to any direction code, near zero) and fits its directions without those vectors (see `equal_norm_codebook`). Off
    by default: on the demo it kept every code in use through fine-tuning, but stage 2's speech did not reproduce the
    real tokens' null codes and read back worse (docs/results.md)."""

    finetune: bool = True
    """Whether `loss()` in train mode updates the codebooks (EMA, dead-code replacement, or gradients). False passes
    vqp's `freeze_codebook=True`: the codebooks stay exactly as `initialize()` left them."""

    decay: float = Field(0.99, gt=0.0, lt=1.0)
    """EMA decay of the codebooks during training. Default 0.99 (Mimi / EnCodec); vqp's default 0.8 forgets a code's
    history in ~5 steps, too noisy at ~1 hit per code per batch."""

    dead_code_threshold: float = Field(0.1, ge=0.0)
    """Dead-code replacement threshold as a share of uniform use: a code whose EMA hit count per batch falls below
    `dead_code_threshold x batch / codebook_size` is replaced by a random residual of the current batch. Scaled by
    the batch size at every `loss()` call. Default 0.1 (Mimi's rule); 0 disables replacement."""

    mse_weight: float = Field(0.5, ge=0.0)
    """Weight of MSE(x, x_hat) in the loss (raw feature units). Default 0.5, as in the public Twi recipe."""

    cosine_weight: float = Field(0.5, ge=0.0)
    """Weight of (1 - cosine(x, x_hat)) in the loss. Default 0.5, as in the public Twi recipe."""

    commitment_weight: float = Field(1.0, ge=0.0)
    """Weight of vqp's per-level commitment loss (MSE between each level's input residual and its code, in
    standardised units, summed over levels). Default 1.0 (vqp's default). With EMA codebooks and a frozen encoder it
    trains nothing (it is logged only)."""

    encode_chunk: int = Field(4096, ge=1)
    """Rows per matmul in `encode()`. Fixed (the last chunk is zero-padded) so a vector's codes never depend on the
    other vectors of the call. Default 4096: fast on CPU, 32 MiB of distances per chunk at 2048 codes."""


def residual_codes(residual: torch.Tensor, books: torch.Tensor, norms: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy residual assignment: codes (N, Q) of standardised vectors `residual` (N, D), level by level the codeword
    of `books` (Q, K, D) nearest to what the levels before left (argmin ||c||^2 - 2 r.c; `norms` (Q, K) = ||c||^2).
    `residual` is consumed (left holding the final residual); `scores` (N, K) is an optional reusable buffer."""
    if scores is None:
        scores = torch.empty(residual.shape[0], books.shape[1], dtype=residual.dtype, device=residual.device)
    codes = torch.empty(residual.shape[0], books.shape[0], dtype=torch.long, device=residual.device)
    for level in range(books.shape[0]):
        torch.addmm(norms[level].unsqueeze(0), residual, books[level].t(), alpha=-2.0, out=scores)
        idx = scores.min(1).indices
        residual.sub_(torch.index_select(books[level], 0, idx))
        codes[:, level] = idx
    return codes


def _state_keys(num_quantizers: int) -> list[str]:
    keys = ["mean", "std", "needs_usage_rescale"]
    for level in range(num_quantizers):
        prefix = f"rvq.layers.{level}._codebook."
        keys += [prefix + name for name in ("initted", "cluster_size", "embed_avg", "embed")]
    return keys


@torch.no_grad()
def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row and the squared distance to it (fp32, chunked)."""
    c_norm = (centroids * centroids).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long)
    dist = torch.empty(x.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        d = torch.addmm(c_norm.unsqueeze(0), xb, centroids.t(), alpha=-2.0)
        best, arg = d.min(1)
        idx[start:start + chunk] = arg
        dist[start:start + chunk] = (best + (xb * xb).sum(1)).clamp_min(0)
    return idx, dist


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator,
           min_cluster: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with re-seeding of empty and tiny clusters; returns (centroids (k, D), counts (k,)).

    The returned counts come from the final assignment, and every count is >= 1 whenever x holds >= k distinct rows.
    """
    n, d = x.shape
    if n < k:
        raise UsageError(f"k-means needs at least {k} vectors (one per code); got {n}; give initialize() more data")
    centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    tiny = min_cluster * n / k

    def reseed(mask: torch.Tensor, dist: torch.Tensor) -> None:
        m = int(mask.sum())
        if m == 0:
            return
        weights = dist.double().clamp_min(0) + 1e-12
        picks = torch.multinomial(weights, min(m, n), replacement=False, generator=generator)
        centroids[mask.nonzero().squeeze(1)[: len(picks)]] = x[picks]

    def means(idx: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros(k, d, dtype=x.dtype).index_add_(0, idx, x)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        return torch.where((counts > 0).unsqueeze(1), new, centroids), counts

    # Lloyd iterations; the last two are plain (no tiny-cluster re-seeding) so centroids settle.
    for it in range(iters):
        idx, dist = _assign(x, centroids)
        centroids, counts = means(idx)
        limit = tiny if it < iters - 2 else 0.5
        reseed(counts < limit, dist)
    # Fix-up: until every code has a member (or rounds run out), move empty codes onto far-off points, re-assign.
    idx, dist = _assign(x, centroids)
    counts = torch.bincount(idx, minlength=k)
    for _ in range(20):
        if bool((counts > 0).all()):
            break
        centroids, _ = means(idx)
        reseed(counts == 0, dist)
        idx, dist = _assign(x, centroids)
        counts = torch.bincount(idx, minlength=k)
    return centroids, counts


@torch.no_grad()
def equal_norm_codebook(x: torch.Tensor, k: int, iters: int, generator: torch.Generator, holdout: float = 0.2,
                        min_cluster: float = 0.25, null_code: bool = False) -> tuple[torch.Tensor, float]:
    """Gain-shape codebook: k unit directions (spherical k-means) times ONE gain; returns (codes, gain).

    With equal code norms, Euclidean argmin ||x - c|| equals argmax x.c, so vqp's own assignment picks by direction
    and no code wins or loses because of its norm. Why: on noise-like residuals in 1024-d, k-means centroids of ~64
    points carry an excess norm^2 of ~tr(cov)/n that varies with cluster size and dominates held-out assignment, so
    the largest clusters take nearly all held-out vectors (measured: levels 2-8 at 0.14-0.39 utilization). The gain is
    the least-squares one, mean of max_k x.u_k, measured on a `holdout` share of `x` that the directions never saw
    (on the fitting rows it is inflated by each row's own contribution to its centroid).

    With `null_code`, the last code is a null code (the mean of the rows it serves, near zero) and only k - 1 codes
    are directions. A row whose best projection x.u falls under gain / 2 is nearer the origin than to any code of
    norm `gain`; such rows (silence, frames the levels before already coded) are left out of the direction fitting,
    so no direction is spent on their arbitrary orientations; the null code serves them.
    """
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator)
    n_fit = n - int(round(holdout * n)) if holdout > 0 else n
    fit, held = x[perm[:n_fit]], x[perm[n_fit:]] if holdout > 0 else x
    if n_fit < k:
        raise UsageError(f"equal-norm codebook needs at least {k} fitting vectors; got {n_fit}; give initialize() more data")
    unit = F.normalize(fit, dim=1)
    fit_norm = fit.norm(dim=1) if null_code else None
    k_dirs = k - 1 if null_code else k
    dirs = unit[torch.randperm(n_fit, generator=generator)[:k_dirs]].clone()
    active = torch.ones(n_fit, dtype=torch.bool)
    tiny = min_cluster * n_fit / k_dirs
    for it in range(iters):
        idx, best = _assign_dot(unit, dirs)
        if null_code:
            proj = best * fit_norm
            active = proj >= 0.5 * _null_gain(proj)
            tiny = min_cluster * int(active.sum()) / k_dirs
        counts = torch.bincount(idx[active], minlength=k_dirs)
        sums = torch.zeros(k_dirs, x.shape[1], dtype=unit.dtype).index_add_(0, idx[active], unit[active])
        new = F.normalize(sums, dim=1)
        dirs = torch.where((counts > 0).unsqueeze(1), new, dirs)
        limit = tiny if it < iters - 2 else 0.5
        small = counts < limit
        m = int(small.sum())
        if m:
            # re-seed at the rows worst served by their direction (lowest cosine), sampled ~ (1 - cos)
            weights = ((1 - best.double()).clamp_min(0) + 1e-12) * active
            picks = torch.multinomial(weights, min(m, int(active.sum())), replacement=False, generator=generator)
            dirs[small.nonzero().squeeze(1)[: len(picks)]] = unit[picks]
    _, proj = _assign_dot(held, dirs)
    gain = _null_gain(proj) if null_code else float(proj.double().mean())
    codes = dirs * gain
    if null_code:
        _, best = _assign_dot(x, dirs)
        served = best < 0.5 * gain
        null = x[served].double().mean(0).float() if bool(served.any()) else torch.zeros(x.shape[1], dtype=x.dtype)
        codes = torch.cat([codes, null.unsqueeze(0)])
    return codes, gain


def _null_gain(proj: torch.Tensor, rounds: int = 10) -> float:
    """The least-squares gain of the rows a gain-shape codebook with a null code gives a direction: mean of the best
    projections x.u over the rows whose projection reaches gain / 2 (fixed point, from the mean over all rows)."""
    proj = proj.double()
    gain = float(proj.mean())
    for _ in range(rounds):
        kept = proj[proj >= 0.5 * gain]
        if kept.numel() == 0:
            break
        gain = float(kept.mean())
    return gain


@torch.no_grad()
def _assign_dot(x: torch.Tensor, dirs: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_k x.d_k and the max value (chunked)."""
    idx = torch.empty(x.shape[0], dtype=torch.long)
    best = torch.empty(x.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        v, a = (x[start:start + chunk] @ dirs.t()).max(1)
        idx[start:start + chunk], best[start:start + chunk] = a, v
    return idx, best


def standardization(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (mean, std) of rows x (N, D) for `RVQConfig.standardize` 'global' (one std) or 'per_dim' (per dimension,
    floored at 1e-3 of the largest); computed in float64."""
    mean = x.double().mean(0)
    if mode == "global":
        std = torch.full_like(mean, float((x.double() - mean).pow(2).mean().sqrt()))
    else:
        std = (x.double() - mean).pow(2).mean(0).sqrt()
        std = std.clamp_min(max(float(std.max()) * 1e-3, 1e-8))
    return mean.float(), std.float().clamp_min(1e-8)


def level_codebook(residual: torch.Tensor, level: int, cfg: RVQConfig, gen: torch.Generator) -> tuple[torch.Tensor, float | None]:
    """(centroids, gain) that initialise residual level `level`: an equal-norm (gain-shape) codebook from
    `equal_norm_from_level` on, else plain k-means (gain None)."""
    if cfg.equal_norm_from_level is not None and level >= cfg.equal_norm_from_level:
        return equal_norm_codebook(residual, cfg.codebook_size, cfg.kmeans_iters, gen, cfg.gain_holdout,
                                   cfg.kmeans_min_cluster, cfg.null_code)
    centroids, _ = kmeans(residual, cfg.codebook_size, cfg.kmeans_iters, gen, cfg.kmeans_min_cluster)
    return centroids, None


class SpeechRVQ(torch.nn.Module):
    """ResidualVQ + standardisation + fast batch-invariant encode; see the module docstring."""

    def __init__(self, cfg: RVQConfig, dim: int):
        super().__init__()
        if cfg.dim is not None and cfg.dim != dim:
            raise UsageError(f"rvq.dim is {cfg.dim} but the encoder gives {dim}; set rvq.dim to {dim} or leave it unset")
        self.cfg = cfg
        self.dim = dim
        self.rvq = ResidualVQ(
            dim=dim,
            num_quantizers=cfg.num_quantizers,
            codebook_size=cfg.codebook_size,
            decay=cfg.decay,
            kmeans_init=True,  # initialize() fills the codebooks first; vqp never runs its own k-means
            kmeans_iters=cfg.kmeans_iters,
            # vqp fixes the threshold at construction; loss() rescales it by the batch size at every call.
            threshold_ema_dead_code=1e-6 if cfg.dead_code_threshold > 0 else 0,
            commitment_weight=cfg.commitment_weight,
            # In a torchrun job vqp all-reduces the EMA statistics (cluster sizes, embedding sums) inside forward and
            # draws replacement codes from all ranks' batches, so the codebooks stay identical on every rank.
            sync_codebook=distributed.is_distributed(),
        )
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        # Set by initialize(): cluster_size holds usage SHARES (sum 1); the first training batch rescales them to hits
        # per batch so the EMA and the dead-code threshold start in the right units.
        self.register_buffer("needs_usage_rescale", torch.tensor(False))
        self._codebooks_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def num_quantizers(self) -> int:
        return self.cfg.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def _codebook_modules(self):
        return [layer._codebook for layer in self.rvq.layers]

    def codebooks(self) -> torch.Tensor:
        """(Q, K, D) codebooks in standardised units (a detached fp32 copy)."""
        return torch.stack([cb.embed.detach()[0] for cb in self._codebook_modules()]).float()

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def _check_input(self, x: torch.Tensor, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UsageError(f"SpeechRVQ.{what}: expected (N, {self.dim}) vectors, got shape {tuple(x.shape)}")

    def is_initialized(self) -> bool:
        return all(bool(cb.initted) for cb in self._codebook_modules())

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def initialize(self, train_vectors: torch.Tensor, seed: int = 0, generator: torch.Generator | None = None) -> dict:
        """Fit standardisation stats and residual k-means on `train_vectors` (N, D) and load them into the buffers.

        Deterministic for a seed (or a given generator). Uses at most `kmeans_sample` random rows. Returns a summary:
        per-level train distortion and smallest cluster size. With `init != 'residual_kmeans'` only the statistics are
        set and vqp initialises the codebooks itself (k-means on the first batch, or random).
        """
        self._check_input(train_vectors, "initialize")
        gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        cfg = self.cfg
        n = train_vectors.shape[0]
        pick = torch.randperm(n, generator=gen)[: min(n, cfg.kmeans_sample)].sort().values
        x = train_vectors[pick].float().clone()
        if cfg.standardize != "none":
            mean, std = standardization(x, cfg.standardize)
            self.mean.copy_(mean)
            self.std.copy_(std)
        summary: dict = dict(vectors=int(x.shape[0]), levels=[])
        residual = self.standardize(x)
        total = float(residual.pow(2).mean())
        for level, cb in enumerate(self._codebook_modules()):
            centroids, gain = level_codebook(residual, level, cfg, gen)
            idx, _ = _assign(residual, centroids)
            counts = torch.bincount(idx, minlength=cfg.codebook_size)
            residual -= centroids[idx]
            share = counts.double() / counts.sum()
            cb.embed.data.copy_(centroids.unsqueeze(0))
            cb.cluster_size.data.copy_(share.float().unsqueeze(0))
            cb.embed_avg.data.copy_((centroids.double() * share.unsqueeze(1)).float().unsqueeze(0))
            cb.initted.data.copy_(torch.tensor(True))
            summary["levels"].append(dict(
                level=level, residual_nmse=float(residual.pow(2).mean()) / total,
                min_cluster=int(counts.min()), unused=int((counts == 0).sum()), gain=gain))
        self.needs_usage_rescale.fill_(True)
        self._codebooks_cache = None
        return summary

    # ------------------------------------------------------------------ training
    def _prepare_batch(self, batch: int) -> None:
        """Scale the dead-code threshold to the (global) batch; on the first batch after initialize(), shares -> hits."""
        cfg = self.cfg
        threshold = cfg.dead_code_threshold * batch / cfg.codebook_size
        for cb in self._codebook_modules():
            if cfg.dead_code_threshold > 0:
                cb.threshold_ema_dead_code = threshold
                cb.reset_cluster_size = threshold
            if bool(self.needs_usage_rescale):
                cb.cluster_size.data.mul_(batch)
                cb.embed_avg.data.mul_(batch)
        self.needs_usage_rescale.fill_(False)

    def loss(self, x: torch.Tensor, global_batch: int | None = None) -> dict:
        """One training forward on raw vectors x (B, D): {'loss', 'mse', 'cosine', 'commitment', 'codes'}.

        In train mode vqp's EMA codebook update and dead-code replacement happen inside this call; in a multi-process
        job x is this rank's slice of a batch of `global_batch` vectors (the statistics vqp all-reduces). `loss` =
        mse_weight * MSE(x, x_hat) + cosine_weight * (1 - cos(x, x_hat)) + commitment (already weighted, summed over
        levels); MSE / cosine in raw units. With EMA codebooks it has no trainable parameters (log it only).
        """
        self._check_input(x, "loss")
        if self.training:
            self._prepare_batch(global_batch or x.shape[0])
            self._codebooks_cache = None
        z = self.standardize(x)
        quantized, indices, commit = self.rvq(z.unsqueeze(0), freeze_codebook=not self.cfg.finetune)
        x_hat = self.unstandardize(quantized[0])
        xf = x.float()
        mse = F.mse_loss(x_hat, xf)
        cosine = F.cosine_similarity(x_hat, xf, dim=-1).mean()
        commitment = commit.sum()
        total = self.cfg.mse_weight * mse + self.cfg.cosine_weight * (1 - cosine) + commitment
        return dict(loss=total, mse=mse, cosine=cosine, commitment=commitment, codes=indices[0])

    def train_step(self, x: torch.Tensor, global_batch: int | None = None) -> dict:
        """One training step: the EMA codebook update and dead-code replacement happen inside `loss(x)` in train mode
        (no gradients). Returns the loss terms as floats."""
        self.train()
        with torch.no_grad():
            out = self.loss(x, global_batch)
        return {k: float(v.detach()) for k, v in out.items() if k != "codes"}

    # ------------------------------------------------------------------ inference
    def _encode_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._codebooks_cache is None or self.training:
            books = self.codebooks()
            self._codebooks_cache = (books, (books * books).sum(-1))
        return self._codebooks_cache

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (N, Q) int64 of raw vectors x (N, D): per level argmin ||c||^2 - 2 x.c in fp32.

        Rows go through in fixed `encode_chunk`-row blocks (the last one zero-padded), so a vector's codes never
        depend on the other vectors in the call (bitwise batch invariance). Equals ResidualVQ's eval-mode indices up
        to float near-ties (vqp computes sqrt(||x||^2 + ||c||^2 - 2 x.c)).
        """
        self._check_input(x, "encode")
        if not self.is_initialized():
            raise UsageError("SpeechRVQ.encode: codebooks are not initialised; call initialize() or load a checkpoint")
        books, norms = self._encode_tables()
        n, chunk = x.shape[0], self.cfg.encode_chunk
        codes = torch.empty(n, self.num_quantizers, dtype=torch.long)
        # Buffers reused across chunks and levels (fresh 32 MiB allocations cost page faults); `min(1)` and
        # `index_select` are ~1.5-2x faster than `argmin(1)` and fancy indexing on CPU and give the same values.
        residual = torch.empty(chunk, self.dim)
        scores = torch.empty(chunk, self.codebook_size)
        for start in range(0, n, chunk):
            block = x[start:start + chunk].to("cpu")
            rows = block.shape[0]
            torch.sub(block.float(), self.mean, out=residual[:rows]).div_(self.std)  # = standardize(block)
            residual[rows:].zero_()
            codes[start:start + rows] = residual_codes(residual, books, norms, scores)[:rows]
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw-unit vectors (N, D) from codes (N, Q') with Q' <= Q (coarser prefixes allowed): sum of codes, unscaled."""
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= self.num_quantizers:
            raise UsageError(f"SpeechRVQ.decode: expected (N, <= {self.num_quantizers}) codes, got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise UsageError(f"SpeechRVQ.decode: code ids must lie in [0, {self.codebook_size})")
        books, _ = self._encode_tables()
        out = torch.zeros(codes.shape[0], self.dim)
        for level in range(codes.shape[1]):
            out += books[level][codes[:, level].long()]
        return self.unstandardize(out)

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to rebuild the quantizer (what `save()` writes)."""
        state = self.state_dict()
        return {k: state[k].detach().float() if state[k].is_floating_point() else state[k].detach()
                for k in _state_keys(self.num_quantizers)}

    def save(self, folder: str | Path, weights: str = "model.safetensors") -> Path:
        """Write `weights` (safetensors) + config.json (every setting needed to rebuild) into `folder`, atomically."""
        folder = Path(folder)
        if not self.is_initialized():
            raise UsageError("SpeechRVQ.save: codebooks are not initialised; nothing worth saving")
        save_tensors(folder / weights, self.tensors(), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        write_json(folder / "config.json", dict(
            format=FORMAT, version=FORMAT_VERSION, rvq_dim=self.dim, num_quantizers=self.num_quantizers,
            codebook_size=self.codebook_size, config=self.cfg.model_dump(mode="json")))
        return folder / weights

    @classmethod
    def load(cls, folder: str | Path, weights: str = "model.safetensors", expected_dim: int | None = None) -> SpeechRVQ:
        """Rebuild from `save()` output (safetensors + JSON only); dim mismatch with `expected_dim` -> UsageError."""
        folder = Path(folder)
        meta = read_json(folder / "config.json")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UsageError(f"{folder / 'config.json'}: not a speechless RVQ checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise UsageError(f"{folder}: RVQ checkpoint version {meta.get('version')} is not supported (expected {FORMAT_VERSION})")
        dim = int(meta["rvq_dim"])
        if expected_dim is not None and dim != expected_dim:
            raise UsageError(f"checkpoint {folder} has dim {dim}, encoder gives {expected_dim}; use a checkpoint "
                             f"trained on this encoder's features")
        cfg = RVQConfig.model_validate(meta["config"])
        model = cls(cfg, dim)
        tensors = load_tensors(folder / weights)
        model.load_tensors(tensors, source=str(folder / weights))
        return model.eval()

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
        """Load `tensors()`-style weights; checks names and shapes; marks codebooks initialised (no vqp k-means)."""
        expected = self.tensors()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise RuntimeFailure(f"{source}: tensors do not match this RVQ config (missing {missing[:3]}, unexpected "
                                 f"{extra[:3]}); the checkpoint and its config.json disagree")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise RuntimeFailure(f"{source}: tensor {name} has shape {tuple(value.shape)}, config expects "
                                     f"{tuple(expected[name].shape)}")
        self.load_state_dict(tensors, strict=True)
        for cb in self._codebook_modules():
            cb.initted.data.copy_(torch.tensor(True))
        self._codebooks_cache = None

    def state_for_averaging(self) -> dict[str, torch.Tensor]:
        """Float tensors that may be averaged across checkpoints of ONE run (codes stay aligned within a run)."""
        return {k: v for k, v in self.tensors().items() if v.is_floating_point()}


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of `state_for_averaging()` dicts (e.g. the last K checkpoints of one run)."""
    if not states:
        raise UsageError("average_states: no checkpoints given")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise UsageError("average_states: checkpoints hold different tensors; average only checkpoints of one run")
    return {k: torch.stack([s[k].double() for s in states]).mean(0).float() for k in states[0]}


def average_checkpoints(models: list[SpeechRVQ]) -> SpeechRVQ:
    """A new SpeechRVQ whose codebooks, EMA buffers and standardisation are the mean of `models` (same config)."""
    if not models:
        raise UsageError("average_checkpoints: no checkpoints given")
    first = models[0]
    for m in models[1:]:
        if m.dim != first.dim or m.cfg != first.cfg:
            raise UsageError("average_checkpoints: checkpoints differ in dim or config; average only one run's checkpoints")
    out = SpeechRVQ(first.cfg, first.dim)
    state = first.tensors()
    state.update(average_states([m.state_for_averaging() for m in models]))
    out.load_tensors(state)
    return out.eval()


def encode_speed(model: SpeechRVQ, n: int = 8192, seed: int = 0) -> dict:
    """Vectors per second: SpeechRVQ.encode vs ResidualVQ.forward in eval mode, and their index agreement."""
    import time

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.dim, generator=gen) * model.std + model.mean
    model.eval()
    t0 = time.perf_counter()
    ours = model.encode(x)
    t1 = time.perf_counter()
    with torch.no_grad():
        _, ref, _ = model.rvq(model.standardize(x).unsqueeze(0))
    t2 = time.perf_counter()
    return dict(vectors=n, ours_per_s=n / (t1 - t0), residualvq_per_s=n / (t2 - t1),
                identical_rows=float((ours == ref[0]).all(1).float().mean()))
