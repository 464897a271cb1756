"""CoBa RQ-VAE (S²GR, arXiv 2601.18664): collaborative, balanced semantic IDs.

Three changes to the RQ-VAE of `rqvae.py`, each with its own weight in `CoBaConfig`:

- **graph propagation** (`propagate`): before quantization, each item embedding is mixed with the
  average of its neighbours in the co-occurrence graph of the *training* sequences (items within
  `window` events of each other in a user's sequence, edges weighted by how often):
  x <- (1 - mix) * x + mix * D^-1 A x, `steps` times. Items with no neighbour keep their embedding.
- **uniformity** (`uniformity_loss`): per level, log mean exp(-2 ||c_i - c_j||^2) over pairs of
  distinct unit-normalised codewords (Wang & Isola's uniformity), added to the training loss; it
  is lowest when a level's codewords spread evenly in direction.
- **load balancing** (`balanced_codes`): during training, residual r takes code
  argmin_c ||r - e_c||^2 + balance * mean_c ||r - e_c||^2 * log(K * u_c), where u is the level's
  running (exponential moving average, `usage_decay`) share of assignments, so an over-used code
  (u_c > 1/K) is chosen less and an under-used one more. The penalty is in units of the row's mean
  distance, so `balance` does not depend on the latent's scale. Final codes are plain nearest
  codewords (what the decoder was trained to read).
"""
from dataclasses import dataclass

import numpy as np
import torch

from ..data.interactions import InteractionData
from .embeddings import cooccurrence_counts


@dataclass(frozen=True)
class CoBaConfig:
    window: int = 5
    steps: int = 2
    mix: float = 0.5
    uniformity: float = 0.1
    balance: float = 0.1
    usage_decay: float = 0.99

    def __post_init__(self):
        if self.window < 1 or self.steps < 0:
            raise ValueError(f"CoBa window must be >= 1 and steps >= 0, got window={self.window}, steps={self.steps}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"CoBa mix must be in [0, 1], got {self.mix}")
        if self.uniformity < 0 or self.balance < 0:
            raise ValueError(f"CoBa uniformity and balance weights must be >= 0, got {self.uniformity}, {self.balance}")
        if not 0.0 <= self.usage_decay < 1.0:
            raise ValueError(f"CoBa usage_decay must be in [0, 1), got {self.usage_decay}")


def cooccurrence_graph(data: InteractionData, train_end=None, window: int = 5) -> torch.Tensor:
    """Sparse (num_items, num_items) float32 co-occurrence counts of the training rows (symmetric,
    zero diagonal); `train_end`: `DataSplit.train_end` (None: every row)."""
    left, right, counts = cooccurrence_counts(data, train_end, window)
    index = torch.from_numpy(np.stack([left, right]))
    n = data.num_items
    return torch.sparse_coo_tensor(index, torch.from_numpy(counts).float(), (n, n),
                                   check_invariants=True).coalesce()


def propagate(embeddings: torch.Tensor, graph: torch.Tensor, steps: int, mix: float) -> torch.Tensor:
    """`steps` rounds of x <- (1 - mix) x + mix * (neighbour average of x) over `graph`."""
    x = embeddings.float()
    degree = torch.sparse.sum(graph, dim=1).to_dense().unsqueeze(1)
    has_neighbours = degree > 0
    for _ in range(steps):
        average = torch.sparse.mm(graph, x) / degree.clamp(min=1e-12)
        x = torch.where(has_neighbours, (1 - mix) * x + mix * average, x)
    return x


def uniformity_loss(codebook: torch.Tensor) -> torch.Tensor:
    """log mean over pairs i != j of exp(-2 ||c_i - c_j||^2), codewords (K, d) unit-normalised."""
    unit = torch.nn.functional.normalize(codebook, dim=1)
    # ||a - b||^2 = 2 - 2 a.b for unit vectors; the diagonal (i = j) is left out.
    squared = (2 - 2 * unit @ unit.T).clamp(min=0)
    off_diagonal = ~torch.eye(codebook.shape[0], dtype=torch.bool, device=codebook.device)
    return torch.logsumexp(-2 * squared[off_diagonal], dim=0) - np.log(off_diagonal.sum().item())


def balanced_codes(distances: torch.Tensor, usage: torch.Tensor, balance: float) -> torch.Tensor:
    """(n,) codes for squared distances (n, K) with over-used codes (usage (K,), summing to 1) penalised."""
    codebook_size = usage.shape[0]
    penalty = torch.log(codebook_size * usage.clamp(min=1e-6))
    return (distances + balance * distances.mean(dim=1, keepdim=True) * penalty).argmin(dim=1)


def update_usage(usage: torch.Tensor, codes: torch.Tensor, decay: float) -> torch.Tensor:
    """Exponential moving average of the share of `codes` taking each code."""
    share = torch.bincount(codes, minlength=usage.shape[0]).float() / max(codes.numel(), 1)
    return decay * usage + (1 - decay) * share
