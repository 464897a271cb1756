"""RQ-VAE semantic IDs (TIGER): an MLP autoencoder whose latent is quantised by residual codebooks.

Level l quantises what levels < l left over: code_l = argmin_c ||r_l - e_{l,c}||, r_{l+1} = r_l -
e_{l,code_l}; the decoder reads sum_l e_{l,code_l} (straight-through gradient to the encoder).
Loss: reconstruction MSE + codebook loss ||sg(r) - e||^2 + commitment * ||r - sg(e)||^2. Each
level's codebook starts as k-means centroids of that level's residuals (first batch of training:
the whole catalogue through the initial encoder), and codes no item used are re-seeded every
`dead_code_reset_every` epochs with residuals of random items (0: never). Seeded: the same inputs and
config give the same codes. With a `CoBaConfig` (`coba.py`), training adds the uniformity loss and
balances code assignments by their running usage.
"""
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .coba import CoBaConfig, balanced_codes, uniformity_loss, update_usage


@dataclass(frozen=True)
class RQVAEConfig:
    levels: int = 3
    codebook_size: int = 256
    latent_dim: int = 32
    hidden_dims: tuple = (256, 128)
    epochs: int = 300
    batch_size: int = 1024
    lr: float = 1e-3
    commitment: float = 0.25
    kmeans_iters: int = 25
    dead_code_reset_every: int = 25
    seed: int = 0

    @classmethod
    def fast(cls, **overrides) -> "RQVAEConfig":
        """Seconds on a CPU for a few thousand items (tests, demos); codes are coarser."""
        return cls(**{**dict(hidden_dims=(128,), epochs=40, kmeans_iters=10, dead_code_reset_every=10),
                      **overrides})


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """(k, dim) centroids by Lloyd's algorithm from k random points; empty clusters keep their centroid."""
    n = points.shape[0]
    start = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centroids = points[start].clone()
    for _ in range(iters):
        assign = torch.cdist(points, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def _mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """coba: None (TIGER's RQ-VAE) or the CoBa losses' weights (uniformity, load balancing)."""

    def __init__(self, input_dim: int, config: RQVAEConfig, coba: CoBaConfig | None = None):
        super().__init__()
        self.config, self.coba = config, coba
        self.encoder = _mlp((input_dim, *config.hidden_dims, config.latent_dim))
        self.decoder = _mlp((config.latent_dim, *reversed(config.hidden_dims), input_dim))
        self.codebooks = nn.Parameter(torch.randn(config.levels, config.codebook_size, config.latent_dim) * 0.1)
        # Running share of training assignments per code (load balancing; uniform at the start).
        self.register_buffer("usage", torch.full((config.levels, config.codebook_size), 1 / config.codebook_size))

    def quantize(self, latent: torch.Tensor, balanced: bool = False):
        """(quantised latent with straight-through gradient, codes (n, levels), residuals per level,
        codebook loss, commitment loss). balanced: CoBa's usage-balanced assignment (training), which
        also updates the running usage."""
        residual, total = latent, torch.zeros_like(latent)
        codes, residuals, codebook_loss, commitment_loss = [], [], 0.0, 0.0
        for level, codebook in enumerate(self.codebooks):
            distances = torch.cdist(residual.detach(), codebook.detach())
            if balanced:
                code = balanced_codes(distances.pow(2), self.usage[level], self.coba.balance)
                self.usage[level] = update_usage(self.usage[level], code, self.coba.usage_decay)
            else:
                code = distances.argmin(dim=1)
            chosen = codebook[code]
            codebook_loss = codebook_loss + (residual.detach() - chosen).pow(2).sum(1).mean()
            commitment_loss = commitment_loss + (residual - chosen.detach()).pow(2).sum(1).mean()
            codes.append(code)
            residuals.append(residual.detach())
            total = total + chosen.detach()
            residual = residual - chosen.detach()
        return latent + (total - latent).detach(), torch.stack(codes, 1), residuals, codebook_loss, commitment_loss

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, levels) int64 codes."""
        return self.quantize(self.encoder(x))[1]

    def loss(self, x: torch.Tensor, training: bool = True):
        """(total loss, reconstruction, codes); training: CoBa's balanced assignment when configured."""
        balanced = training and self.coba is not None and self.coba.balance > 0
        quantised, codes, _, codebook_loss, commitment_loss = self.quantize(self.encoder(x), balanced)
        reconstruction = (self.decoder(quantised) - x).pow(2).sum(1).mean()
        total = reconstruction + codebook_loss + self.config.commitment * commitment_loss
        if self.coba is not None and self.coba.uniformity > 0:
            total = total + self.coba.uniformity * sum(uniformity_loss(codebook) for codebook in self.codebooks)
        return total, reconstruction, codes

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, generator: torch.Generator):
        residual = self.encoder(x)
        for level in range(self.config.levels):
            self.codebooks[level] = kmeans(residual, self.config.codebook_size, self.config.kmeans_iters, generator)
            code = torch.cdist(residual, self.codebooks[level]).argmin(dim=1)
            residual = residual - self.codebooks[level][code]

    @torch.no_grad()
    def reset_dead_codes(self, x: torch.Tensor, generator: torch.Generator) -> int:
        """Re-seeds codes no item uses with residuals of random items; returns how many."""
        _, codes, residuals, _, _ = self.quantize(self.encoder(x))
        reset = 0
        for level, residual in enumerate(residuals):
            used = torch.bincount(codes[:, level], minlength=self.config.codebook_size) > 0
            dead = (~used).nonzero().flatten()
            if dead.numel():
                pick = torch.randint(residual.shape[0], (dead.numel(),), generator=generator)
                self.codebooks[level, dead] = residual[pick]
                reset += dead.numel()
        return reset


def semantic_id_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """Codebook utilisation per level (fraction of codes used), uniqueness per level and collisions
    of full code tuples.

    unique_level_l = share of items whose codes of levels 1..l no other item shares (at the last
    level: the items whose semantic ID is unique before the collision index);
    collision_rate = 1 - distinct tuples / items (TIGER's definition); colliding_items = fraction of
    items sharing their tuple with another; max_items_per_sid = the collision slot's size.
    """
    n, levels = codes.shape
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    stats = {f"utilisation_level_{l + 1}": torch.unique(codes[:, l]).numel() / codebook_size for l in range(levels)}
    for level in range(levels):
        _, prefix, prefix_counts = torch.unique(codes[:, :level + 1], dim=0, return_inverse=True, return_counts=True)
        stats[f"unique_level_{level + 1}"] = float((prefix_counts[prefix] == 1).float().mean())
    stats.update(
        collision_rate=1.0 - counts.numel() / n,
        colliding_items=float((counts[inverse] > 1).float().mean()),
        max_items_per_sid=int(counts.max()),
    )
    return stats


def train_rqvae(embeddings: torch.Tensor, config: RQVAEConfig = RQVAEConfig(), progress: bool = True,
                coba: CoBaConfig | None = None):
    """Trains an RQ-VAE on (num_items, d) embeddings; returns (model, codes (num_items, levels), stats).

    Inputs are standardised per dimension first (the model stores no scaler: the codes are the
    product). stats: `semantic_id_stats` plus the final reconstruction MSE. coba: train with CoBa's
    uniformity loss and load balancing (graph propagation happens before, on the embeddings).
    """
    x = embeddings.float()
    x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp(min=1e-6)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # layer initialisation
        model = RQVAE(x.shape[1], config, coba)
    model.init_codebooks(x, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    bar = tqdm(range(config.epochs), desc="RQ-VAE", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], config.batch_size):
            loss, reconstruction, _ = model.loss(x[order[start:start + config.batch_size]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if config.dead_code_reset_every and (epoch + 1) % config.dead_code_reset_every == 0 and epoch + 1 < config.epochs:
            model.reset_dead_codes(x, generator)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        _, reconstruction, codes = model.loss(x, training=False)
    stats = semantic_id_stats(codes, config.codebook_size)
    stats["reconstruction_mse"] = float(reconstruction) / x.shape[1]
    return model, codes, stats


@torch.no_grad()
def codebook_clusters(codebooks: torch.Tensor, clusters: int, iters: int = 25, seed: int = 0):
    """Each level's codewords grouped by k-means (S²GR's thinking targets): (centroids (levels,
    clusters, d), cluster of each code (levels, codebook_size) int64). Seeded."""
    levels, size, _ = codebooks.shape
    if not 2 <= clusters <= size:
        raise ValueError(f"clusters (K_c) must be in [2, codebook size {size}], got {clusters}")
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.stack([kmeans(codebooks[level].float(), clusters, iters, generator) for level in range(levels)])
    return centroids, torch.cdist(codebooks.float(), centroids).argmin(dim=2)


def collision_index(codes: torch.Tensor) -> torch.Tensor:
    """(n,) int64: items sharing a code tuple are numbered 0, 1, ... in item order, so that
    (codes, collision index) is unique per item."""
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.sort(group, stable=True).indices  # items grouped, in item order inside a group
    grouped = group[order]
    index = torch.empty_like(group)
    index[order] = torch.arange(group.shape[0]) - torch.searchsorted(grouped, grouped)
    return index
