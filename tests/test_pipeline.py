"""End to end on CPU: a generic-format dataset with a learnable pattern -> tokenizer -> GRACE and
SASRec training -> full-ranking evaluation that beats the popularity baseline; runs saved,
reloaded and served by the CLI."""
import os

import numpy as np
import pytest
import torch

from sparserec import cli
from sparserec.pipeline import baselines, build_model, evaluate, fit, load_run, prepare, save_run, subsample
from sparserec.tokenize import TokenizerConfig
from sparserec.train import TrainConfig, seed_everything

NUM_ITEMS = 40
PRODUCT_TYPES = ("shoes", "socks", "hats", "bags")


def write_cycle_dataset(folder, users=120, length=10, seed=0):
    """Every user walks a cycle of items (item i is followed by item i+1 mod NUM_ITEMS) from a
    random start, clicking and sometimes buying: the next item is a function of the last one, and
    item popularity is flat, so popularity ranking is near chance."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "interactions.tsv"), "w") as file:
        file.write("user\titem\tbehavior\ttimestamp\n")
        for user in range(users):
            start = rng.integers(NUM_ITEMS)
            for step in range(length):
                behavior = "buy" if rng.random() < 0.3 else "click"
                file.write(f"u{user}\ti{(start + step) % NUM_ITEMS}\t{behavior}\t{step}\n")
    with open(os.path.join(folder, "items.tsv"), "w") as file:
        file.write("item\tproduct_type\tprice\tbrand\n")
        for item in range(NUM_ITEMS):
            file.write(f"i{item}\t{PRODUCT_TYPES[item * len(PRODUCT_TYPES) // NUM_ITEMS]}\t{item + 1}.5\tacme\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cycle"))
    write_cycle_dataset(folder)
    config = TokenizerConfig.fast(collab_dim=16)
    return prepare(folder, tokenizer_config=config, progress=False)


def train_config(steps):
    return TrainConfig(max_steps=steps, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=0, progress=False,
                       log_every=10)


@pytest.fixture(scope="module")
def trained_grace(prepared):
    seed_everything(0)
    model = build_model("grace", prepared, d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1, d_ff=64,
                        dropout=0.0)
    fit(model, prepared, train_config(100), valid_users=16, beam_size=10)
    return model


def test_examples_count_what_the_trainer_reports(prepared):
    from sparserec.train.examples import GRACEExamples, SASRecExamples

    data, split = prepared.data, prepared.split
    grace = GRACEExamples(data, prepared.tokenizer, split.train_targets(data))
    batch = grace.collate([grace[i] for i in range(5)])
    assert grace.counts(batch) == (5, int(batch["cu_seqlens"][-1]))
    sasrec = SASRecExamples(data, split.train_end, max_length=6)
    sequences = [sasrec[i] for i in range(4)]
    assert sasrec.counts(sasrec.collate(sequences)) == (4, sum(len(s) - 1 for s in sequences))


def test_grace_beats_popularity_on_every_task(prepared, trained_grace):
    results = evaluate(trained_grace, prepared, beam_size=10, progress=False)
    baseline = baselines(prepared)["popularity"]
    assert set(results) == {"target_behavior", "behavior_specific", "behavior_item"}
    for task, metrics in results.items():
        assert metrics["all"]["count"] == baseline[task]["all"]["count"] > 0
        assert metrics["all"]["hr@10"] > baseline[task]["all"]["hr@10"] + 0.2, (task, metrics, baseline[task])
        assert metrics["all"]["ndcg@10"] > baseline[task]["all"]["ndcg@10"], task
    # per-behavior breakdown: the target_behavior task only holds buys
    assert set(results["target_behavior"]) == {"all", "buy"}


def test_sasrec_beats_popularity(prepared):
    seed_everything(0)
    model = build_model("sasrec", prepared, d_model=32, num_heads=2, layers=1, dropout=0.0)
    fit(model, prepared, train_config(150), valid_users=32)
    result = evaluate(model, prepared)["behavior_specific"]["all"]
    assert result["hr@10"] > baselines(prepared)["popularity"]["behavior_specific"]["all"]["hr@10"] + 0.2


def test_saved_run_reloads_to_the_same_rankings(prepared, trained_grace, tmp_path):
    save_run(str(tmp_path), trained_grace, prepared, {"dataset": prepared.dataset})
    model, reloaded, run = load_run(str(tmp_path))
    assert run["model"] == "grace" and run["cot"]
    for name, tensor in trained_grace.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert torch.equal(reloaded.tokenizer.item_paths(), prepared.tokenizer.item_paths())
    targets = subsample(prepared.split.test, 20)
    before = evaluate(trained_grace, prepared, targets, beam_size=10, progress=False)
    assert evaluate(model, reloaded, targets, beam_size=10, progress=False) == before


def test_cli_recommend_and_evaluate(prepared, trained_grace, tmp_path, capsys):
    save_run(str(tmp_path), trained_grace, prepared, {"dataset": prepared.dataset})
    assert cli.main(["recommend", str(tmp_path), "--user", "u0", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "user u0: 10 past interactions; top 3 for behavior 'buy'"
    ranked = [line.split() for line in lines[1:]]
    assert [row[0] for row in ranked] == ["1.", "2.", "3."]
    assert all(row[2] in prepared.data.items.ids for row in ranked)
    log_probs = [float(row[4]) for row in ranked]
    assert log_probs == sorted(log_probs, reverse=True)
    assert cli.main(["evaluate", str(tmp_path), "--max-users", "20", "--beam", "10"]) == 0
    assert "| popularity | behavior_item | 20 |" in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "no-such-dataset", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'no-such-dataset'" in capsys.readouterr().err


def test_recency_baseline_ranks_distinct_past_items_most_recent_first():
    from sparserec.data import Targets, build_interaction_data
    from sparserec.evaluate import evaluate_recency

    # u0: a b a c | target b  -> recent distinct: c, a, b -> rank 3;  u1: d | target e -> absent.
    events = [("u0", "a"), ("u0", "b"), ("u0", "a"), ("u0", "c"), ("u0", "b"), ("u1", "d"), ("u1", "e")]
    data = build_interaction_data("toy", [u for u, _ in events], [i for _, i in events], [0] * len(events),
                                  list(range(len(events))), ("click",), {})
    metrics = evaluate_recency(data, Targets(np.array([0, 1]), np.array([4, 6])), ks=(1, 3))["all"]
    assert metrics["hr@1"] == 0.0 and metrics["hr@3"] == 0.5
    assert metrics["ndcg@3"] == pytest.approx(0.5 / np.log2(4))
