"""Trainer: exact resume, early stopping, the LR schedule, and DDP (2 gloo processes) = one process.

Run as a script under torchrun, this file is the DDP worker of `test_ddp_matches_single_process`.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sparserec.train import Trainer, TrainConfig, shutdown_distributed, warmup_cosine


def toy_dataset():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(100, 8, generator=generator)
    return TensorDataset(features, (features[:, :4].argmax(1)))


def classify_loss(model, batch):
    features, labels = batch
    return F.cross_entropy(model(features), labels)


def noisy_collate(samples):
    """Stacks samples and adds NumPy noise, so a resume must restore NumPy's generator too."""
    features, labels = torch.utils.data.default_collate(samples)
    return features + torch.from_numpy(np.random.normal(0, 0.1, features.shape)).float(), labels


def make_trainer(model_seed=0, dropout=0.3, collate_fn=noisy_collate, evaluate_fn=None, count_batch=None, **config):
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 4))
    values = dict(max_steps=12, batch_size=16, lr=1e-2, warmup_steps=3, log_every=4, progress=False)
    return Trainer(model, toy_dataset(), classify_loss, TrainConfig(**{**values, **config}),
                   collate_fn=collate_fn, evaluate_fn=evaluate_fn, count_batch=count_batch)


@pytest.mark.parametrize("pause_at", [5, 7])  # mid-epoch, and at the end of the first epoch (7 batches)
def test_resume_equals_uninterrupted(tmp_path, pause_at):
    """12 steps vs pause_at steps + checkpoint + a fresh trainer + the rest."""
    uninterrupted = make_trainer()
    uninterrupted.fit()

    checkpoint = str(tmp_path / "checkpoint.pt")
    make_trainer(checkpoint_path=checkpoint).fit(stop_at=pause_at)
    resumed = make_trainer(model_seed=1, checkpoint_path=checkpoint)
    resumed.load_checkpoint(checkpoint)
    assert resumed.step == pause_at
    # The CPU budget carries over: the paused process's CPU time, plus this one's.
    saved_cpu = torch.load(checkpoint, weights_only=True)["cpu_s"]
    this_process = time.process_time()
    assert saved_cpu > 0 and resumed.cpu_seconds() >= saved_cpu + this_process
    result = resumed.fit()

    assert result.step == 12
    for expected, actual in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        assert torch.equal(expected, actual)
    assert resumed.history[-1] == uninterrupted.history[-1]  # the loss logged at step 12


def test_early_stopping_keeps_the_best_weights():
    scripted = iter([0.1, 0.3, 0.2, 0.25, 0.9])
    snapshots = {}

    def evaluate(model):
        snapshots[len(snapshots)] = [p.detach().clone() for p in model.parameters()]
        return {"ndcg@10": next(scripted)}

    trainer = make_trainer(evaluate_fn=evaluate, eval_every=2, patience=2)
    result = trainer.fit()
    # Validations at steps 2, 4 (best), 6 and 8 (two without improvement): stop at step 8.
    assert (result.step, result.best_step, result.best_metric, result.stopped_early) == (8, 4, 0.3, True)
    for best, actual in zip(snapshots[1], trainer.model.parameters()):
        assert torch.equal(best, actual)


def test_throughput_counts_every_example_and_token():
    counted = []

    def count_batch(batch):
        counted.append(len(batch[1]))
        return len(batch[1]), 8 * len(batch[1])  # 8 features per example stand in for tokens

    trainer = make_trainer(count_batch=count_batch, max_steps=7, log_every=7)  # one epoch: 6 x 16 + 4
    trainer.fit()
    (entry,) = trainer.history
    assert counted == [16] * 6 + [4]
    assert entry["examples_per_s"] > 0 and entry["tokens_per_s"] == pytest.approx(8 * entry["examples_per_s"])
    assert "examples_per_s" not in make_trainer(max_steps=4).fit().history[0]


def test_warmup_cosine_schedule():
    multiplier = warmup_cosine(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [multiplier(step) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert multiplier(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert multiplier(14) == pytest.approx(0.1) and multiplier(20) == pytest.approx(0.1)


def ddp_run_config():
    """Per process: 2 processes × batch 8 see the same samples per step as 1 process × batch 16."""
    return dict(model_seed=0, dropout=0.0, collate_fn=None, max_steps=3)


def test_time_limit_stops_validates_and_keeps_the_best():
    """A limit already spent stops at the first check (step log_every), validates there and finishes."""
    validated_at = []

    def evaluate_fn(model):
        validated_at.append(trainer.step)
        return {"ndcg@10": 1.0}

    trainer = make_trainer(max_steps=100, log_every=4, time_limit_s=1e-9, evaluate_fn=evaluate_fn)
    result = trainer.fit()
    assert result.step == 4 and validated_at == [4] and result.best_step == 4


def test_inverse_sqrt_schedule_in_the_trainer():
    trainer = make_trainer(max_steps=20, warmup_steps=4, schedule="inverse_sqrt")
    trainer.fit()
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * (4 / 21) ** 0.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_trainer(schedule="linear")


def test_ddp_matches_single_process(tmp_path):
    single = make_trainer(**ddp_run_config(), batch_size=16)
    single.fit()

    output = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # containers whose hostname does not resolve
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(output)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    ddp = torch.load(output, weights_only=True)
    assert ddp["world_size"] == 2
    for param, expected, grad in zip(single.model.parameters(), ddp["params"], ddp["grads"]):
        torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # the DDP worker, launched by torchrun
    trainer = make_trainer(**ddp_run_config(), batch_size=8)
    trainer.fit()
    if trainer.is_main:
        torch.save({"world_size": trainer.world_size, "params": [p.detach() for p in trainer.model.parameters()],
                    "grads": [p.grad for p in trainer.model.parameters()]}, sys.argv[1])
    shutdown_distributed()
