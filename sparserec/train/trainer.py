"""A small model-agnostic trainer.

AdamW with linear warmup then cosine decay or inverse-square-root decay, bf16 autocast on CUDA, gradient clipping, seeds,
checkpoint/resume, early stopping on a validation metric, tqdm progress, and DDP when launched by
`torchrun` (gloo on CPU, nccl on CUDA). The model is trained through `loss_fn(model, batch) ->
scalar loss`; under DDP `model` is the DDP wrapper, so `loss_fn` must call `model(...)` (its
forward), which is what synchronises the gradients.

Resuming (`load_checkpoint` then `fit`) continues bit-identically on CPU in one process: the
checkpoint holds the model, optimizer, scheduler, global RNG states and the position in the epoch,
and each epoch's order depends only on (seed, epoch). Under DDP every rank resumes with rank 0's
RNG state, so dropout masks differ from an uninterrupted run.
"""
import itertools
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from .distributed import init_distributed, rng_state, seed_everything, set_rng_state


@dataclass
class TrainConfig:
    """batch_size is per process. weight_decay applies to matrices (parameters with ≥ 2 dims).
    eval_every: steps between validations (with an evaluate_fn; also at max_steps; 0: only then).
    checkpoint_every: steps between checkpoints to checkpoint_path (0: none; with a path, one is
    also written after every validation and when `fit` returns).
    patience: validations without improvement of `metric` before stopping (0: never stop early).
    amp: bf16 autocast on CUDA (ignored on CPU).
    schedule: "cosine" (warmup, then cosine to min_lr_ratio at max_steps) or "inverse_sqrt" (warmup,
    then lr * sqrt(warmup_steps / step), T5/TIGER's; it does not depend on max_steps).
    time_limit_s: stop after this many seconds of `fit` (checked every log_every steps; 0: no
    limit), validate, and finish as at max_steps: a fixed wall-clock budget (pair with inverse_sqrt).
    """

    max_steps: int = 10_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0
    schedule: str = "cosine"
    time_limit_s: float = 0.0
    grad_clip: float = 1.0
    amp: bool = True
    seed: int = 0
    eval_every: int = 0
    patience: int = 0
    metric: str = "ndcg@10"
    checkpoint_path: str | None = None
    checkpoint_every: int = 0
    log_every: int = 50
    num_workers: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    step: int
    best_metric: float
    best_step: int
    stopped_early: bool
    history: list = field(default_factory=list)  # {"step", "loss"} and {"step", **validation metrics}


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """LR multiplier: linear from 1/warmup to 1 over the warmup, then cosine down to min_lr_ratio."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


def warmup_inverse_sqrt(warmup_steps: int):
    """LR multiplier: linear from 1/warmup to 1 over the warmup, then sqrt(warmup / step)."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return math.sqrt(max(1, warmup_steps) / (step + 1))
    return multiplier


SCHEDULES = ("cosine", "inverse_sqrt")


def lr_multiplier(config: "TrainConfig"):
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if config.schedule == "inverse_sqrt":
        return warmup_inverse_sqrt(config.warmup_steps)
    return warmup_cosine(config.warmup_steps, config.max_steps, config.min_lr_ratio)


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way through (`start` samples in), to resume."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


class Trainer:
    """Train `model` on `dataset` (map-style) batched by `collate_fn`, minimising `loss_fn(model, batch)`.

    evaluate_fn(model) -> {metric name: value}: validation, run on rank 0 in eval mode without
    gradients; `config.metric` (higher is better) drives early stopping and the best weights,
    which `fit` loads into rank 0's model when it finishes (rank 0 also writes the checkpoints).
    count_batch(batch) -> (examples, input tokens), read before the batch leaves the CPU: the
    progress bar and `history` then show this process's examples/s and tokens/s.
    """

    def __init__(self, model, dataset, loss_fn, config: TrainConfig, collate_fn=None, evaluate_fn=None,
                 device=None, count_batch=None):
        self.rank, self.world_size, local_rank = init_distributed()
        self.device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        self.config, self.dataset, self.loss_fn = config, dataset, loss_fn
        self.collate_fn, self.evaluate_fn, self.count_batch = collate_fn, evaluate_fn, count_batch
        seed_everything(config.seed + self.rank)
        self.model = model.to(self.device)
        self.train_model = model
        if self.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=device_ids)
        matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(config))
        self.sampler = ResumableSampler(dataset, num_replicas=self.world_size, rank=self.rank, seed=config.seed)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_metric, self.best_step, self.evals_since_best = -math.inf, -1, 0
        self.best_state = None
        self.stopped_early = False
        self.history = []
        self.cpu_before = 0.0  # CPU seconds of the earlier processes of a resumed run

    def cpu_seconds(self) -> float:
        """CPU seconds of the whole run so far: this process (all threads) plus, after a resume, the
        processes before it up to their last checkpoint (work after it was lost and is not counted)."""
        return self.cpu_before + time.process_time()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to `config.max_steps`, or pause at `stop_at` (e.g. to split a run into time-limited
        jobs; the schedule always spans max_steps). Resume with `load_checkpoint` on a new Trainer."""
        config = self.config
        stop_at = min(stop_at or config.max_steps, config.max_steps)
        bar = tqdm(total=config.max_steps, initial=self.step, desc="train",
                   disable=not (config.progress and self.is_main))
        running_loss, steps_since_log = torch.zeros((), device=self.device), 0
        started, timed_out = time.perf_counter(), False
        examples = tokens = 0  # since the last log
        last_log = started
        while self.step < stop_at and not self.stopped_early and not timed_out:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.batch_in_epoch * config.batch_size
            # A per-epoch generator: worker seeds depend on (seed, epoch) only, not on when we resumed.
            loader = DataLoader(self.dataset, config.batch_size, sampler=self.sampler, collate_fn=self.collate_fn,
                                num_workers=config.num_workers, generator=torch.Generator().manual_seed(config.seed + self.epoch))
            for batch in loader:
                if self.count_batch is not None:
                    batch_examples, batch_tokens = self.count_batch(batch)
                    examples, tokens = examples + batch_examples, tokens + batch_tokens
                running_loss += self._train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                steps_since_log += 1
                bar.update()
                if self.step % config.log_every == 0 or self.step == stop_at:
                    # Reading the loss syncs with the device, so only every log_every steps.
                    loss = running_loss.item() / steps_since_log
                    running_loss.zero_()
                    steps_since_log = 0
                    entry, shown = {"step": self.step, "loss": loss}, {}
                    if self.count_batch is not None:
                        now = time.perf_counter()
                        entry.update(examples_per_s=examples / (now - last_log), tokens_per_s=tokens / (now - last_log))
                        shown = {"ex/s": f"{entry['examples_per_s']:.1f}", "tok/s": f"{entry['tokens_per_s']:.0f}"}
                        examples = tokens = 0
                        last_log = now
                    self.history.append(entry)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", **shown)
                if config.time_limit_s and self.step % config.log_every == 0:
                    timed_out = self._everyone_agrees(time.perf_counter() - started >= config.time_limit_s)
                validated = self.evaluate_fn is not None and (
                    self.step == config.max_steps or timed_out
                    or (config.eval_every and self.step % config.eval_every == 0))
                if validated:
                    self._validate()
                if config.checkpoint_path and (validated or (config.checkpoint_every and self.step % config.checkpoint_every == 0)):
                    self.save_checkpoint(config.checkpoint_path)
                if self.step >= stop_at or self.stopped_early or timed_out:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        finished = self.step >= config.max_steps or self.stopped_early or timed_out
        if config.checkpoint_path:
            self.save_checkpoint(config.checkpoint_path)
        if finished and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return TrainResult(self.step, self.best_metric, self.best_step, self.stopped_early, self.history)

    def _train_step(self, batch):
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = move_to(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp and self.device.type == "cuda"):
            loss = self.loss_fn(self.train_model, batch)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def _everyone_agrees(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (ranks' clocks differ; all must stop at the same step)."""
        if self.world_size == 1:
            return flag
        flags = [flag]
        dist.broadcast_object_list(flags, src=0)
        return flags[0]

    def _validate(self):
        stop = [False]
        if self.is_main:
            self.model.eval()
            with torch.no_grad():
                metrics = self.evaluate_fn(self.model)
            value = metrics[self.config.metric]
            # CPU seconds of the run so far: learning curves against budget.
            self.history.append({"step": self.step, "cpu_s": self.cpu_seconds(), **metrics})
            if value > self.best_metric:
                self.best_metric, self.best_step, self.evals_since_best = value, self.step, 0
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            else:
                self.evals_since_best += 1
            stop[0] = bool(self.config.patience) and self.evals_since_best >= self.config.patience
        if self.world_size > 1:
            dist.broadcast_object_list(stop, src=0)
        self.stopped_early = stop[0]

    def save_checkpoint(self, path: str):
        """Everything `load_checkpoint` needs to continue exactly; written by rank 0, atomically."""
        if not self.is_main:
            return
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric, "best_step": self.best_step, "evals_since_best": self.evals_since_best,
            "best_state": self.best_state, "stopped_early": self.stopped_early, "history": self.history,
            "cpu_s": self.cpu_seconds(),
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a preempted save never leaves a truncated checkpoint

    def load_checkpoint(self, path: str):
        # On the CPU: load_state_dict moves model and optimizer tensors to their parameters' device.
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        for name in ("step", "epoch", "batch_in_epoch", "best_metric", "best_step", "evals_since_best",
                     "best_state", "stopped_early", "history"):
            setattr(self, name, state[name])
        # Checkpoints written before "cpu_s" existed: the CPU time up to their last validation.
        validated = [entry["cpu_s"] for entry in self.history if "cpu_s" in entry]
        self.cpu_before = state.get("cpu_s", validated[-1] if validated else 0.0)


def move_to(batch, device):
    """Tensors (also inside dicts, lists, tuples, or objects with a `.to(device)`) moved to `device`."""
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(move_to(value, device) for value in batch)
    if isinstance(batch, tuple):  # a NamedTuple
        return type(batch)(*(move_to(value, device) for value in batch))
    return batch.to(device) if hasattr(batch, "to") else batch
