"""Training: a model-agnostic trainer (AdamW, warmup + cosine or inverse sqrt, AMP, checkpoints, early stopping, DDP)."""
from .distributed import init_distributed, seed_everything, shutdown_distributed
from .trainer import Trainer, TrainConfig, TrainResult, move_to, warmup_cosine, warmup_inverse_sqrt

__all__ = ["Trainer", "TrainConfig", "TrainResult", "init_distributed", "move_to", "seed_everything",
           "shutdown_distributed", "warmup_cosine", "warmup_inverse_sqrt"]
