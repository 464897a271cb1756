"""The generative ranker of issue 11 (docs/action_fusion.md): shapes, causality for every fusion and
attention, AttnLFA / AttnMVP against a hand-written dense computation, its training examples and
evaluation, the action metrics against hand-computed values, and the CLI's argument checks."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparserec import cli
from sparserec.data import leave_one_out
from sparserec.metrics import action_metrics, auc, log_loss, normalized_entropy
from sparserec.models.gr import ATTENTIONS, FUSIONS, GRConfig, GenerativeRanker
from sparserec.ops.dispatch import backends
from sparserec.train.gr import (RankerExamples, action_users, evaluate_ranker, journey_anchors, ranker_loss,
                                training_rates)

CASES = [(fusion, attention) for fusion in FUSIONS for attention in ATTENTIONS]
NUM_ITEMS, NUM_ACTIONS = 23, 4


def ranker(fusion, attention, dtype=torch.float64, backend="reference"):
    # JSA on the reference (the executable spec) unless told; test_jsa_backends_agree checks the C++ kernels.
    config = GRConfig(num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, fusion=fusion, attention=attention, d_model=16,
                      num_heads=2, action_dim=4, layers=2, d_ff=32, dropout=0.0, max_length=24, backend=backend)
    torch.manual_seed(0)
    model = GenerativeRanker(config).to(dtype).eval()
    for parameter in model.parameters():  # N(0, 0.02) leaves attention near uniform; make it peaked
        parameter.data.normal_(0, 0.4)
    return model


def sequences(batch=3, length=19, seed=1):
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(0, NUM_ITEMS, (batch, length), generator=generator)
    actions = torch.randint(0, NUM_ACTIONS, (batch, length), generator=generator)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        valid[1, 13:] = False  # a shorter sequence, padded
    anchors = torch.rand(batch, length, generator=generator) < 0.3
    anchors[:, 0] = True
    return items, actions, valid, anchors


@pytest.mark.parametrize("fusion, attention", CASES)
def test_shapes_and_finite_loss(fusion, attention):
    model = ranker(fusion, attention, dtype=torch.float32)
    items, actions, valid, anchors = sequences()
    action_logits, states = model(items, actions, valid, anchors)
    assert action_logits.shape == (3, 19, NUM_ACTIONS)
    assert states.shape == (3, 19, 16)
    assert model.item_logits(states).shape == (3, 19, NUM_ITEMS)
    loss = ranker_loss(model.train(), dict(items=items, actions=actions, valid=valid, anchors=anchors))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for name, p in model.named_parameters() if "pe" not in name)


@pytest.mark.parametrize("fusion, attention", CASES)
def test_no_position_sees_the_future_or_its_own_action(fusion, attention):
    model = ranker(fusion, attention)
    items, actions, valid, anchors = sequences(batch=1, length=19)
    base_logits, base_states = model(items, actions, valid, anchors)
    at = 9
    new_action = actions.clone()
    new_action[0, at] = (actions[0, at] + 1) % NUM_ACTIONS
    logits, states = model(items, new_action, valid, anchors)
    # a_9 is visible to position 9's next-item state and to every later position, never to the
    # action logits of positions <= 9 nor to the states before 9.
    torch.testing.assert_close(logits[0, : at + 1], base_logits[0, : at + 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(states[0, :at], base_states[0, :at], rtol=0, atol=1e-12)
    assert (states[0, at] - base_states[0, at]).abs().max() > 1e-6
    assert (logits[0, at + 1:] - base_logits[0, at + 1:]).abs().max() > 1e-6
    new_item = items.clone()
    new_item[0, at] = (items[0, at] + 1) % NUM_ITEMS
    logits, states = model(new_item, actions, valid, anchors)
    torch.testing.assert_close(logits[0, :at], base_logits[0, :at], rtol=0, atol=1e-12)
    torch.testing.assert_close(states[0, :at], base_states[0, :at], rtol=0, atol=1e-12)
    assert (logits[0, at] - base_logits[0, at]).abs().max() > 1e-6  # item n informs its own action


@pytest.mark.parametrize("fusion, attention", CASES)
def test_padding_and_batch_neighbours_change_nothing(fusion, attention):
    model = ranker(fusion, attention)
    items, actions, valid, anchors = sequences()
    logits, states = model(items, actions, valid, anchors)
    alone_logits, alone_states = model(items[1:2, :13], actions[1:2, :13], valid[1:2, :13], anchors[1:2, :13])
    torch.testing.assert_close(logits[1, :13], alone_logits[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(states[1, :13], alone_states[0], rtol=0, atol=1e-10)


@pytest.mark.skipif(backends().get("cpp") is not None, reason="the C++ extension is not built")
@pytest.mark.parametrize("fusion", FUSIONS)
def test_jsa_backends_agree(fusion):
    """The fused C++ JSA (value width D + action columns for lfa/mvp) equals the reference, fwd and bwd."""
    items, actions, valid, anchors = sequences()
    results = {}
    for backend in ("reference", "cpp"):
        model = ranker(fusion, "jsa", dtype=torch.float32, backend=backend)
        action_logits, states = model(items, actions, valid, anchors)
        (action_logits.sum() + states.sum()).backward()
        results[backend] = [action_logits, states] + [p.grad for p in model.parameters() if p.grad is not None]
    for got, expected in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def hand_written(model, items, actions):
    """docs/action_fusion.md written out for one sequence with loops over queries (float64)."""
    config = model.config
    heads, dim, adim = config.num_heads, config.d_model // config.num_heads, config.action_dim
    n_items = len(items)
    x = model.item_embedding.weight[items] + model.positions.weight[:n_items]
    alpha = model.action_values.weight[actions].view(n_items, heads, adim)
    for layer, block in enumerate(model.blocks):
        attention = block.attention
        h = block.attention_norm(x)
        q = (h @ attention.q_proj.weight.T).view(n_items, heads, dim)
        k = (h @ attention.k_proj.weight.T).view(n_items, heads, dim)
        v = (h @ attention.v_proj.weight.T).view(n_items, heads, dim)
        with_actions = config.fusion == "mvp" or layer == config.layers - 1
        value_rows, action_rows = [], []
        for n in range(n_items):
            keys = torch.cat([attention.sink_key[None], k[:n]])                    # sink, items m < n
            values = torch.cat([attention.sink_value[None], v[:n]])
            past_actions = torch.cat([torch.zeros(1, heads, adim, dtype=x.dtype), alpha[:n]])
            p = torch.softmax(torch.einsum("hd,shd->hs", q[n], keys) / math.sqrt(dim), dim=-1)
            value_rows.append(torch.einsum("hs,shd->hd", p, values))
            action_rows.append(torch.einsum("hs,shd->hd", p, past_actions))
        o_v, o_a = torch.stack(value_rows), torch.stack(action_rows)
        out = torch.cat([o_v, o_a] if with_actions else [o_v], dim=-1).flatten(1) @ attention.out_proj.weight.T
        x = x + out
        x = x + block.ffn(block.ffn_norm(x))
    state = model.norm(x)
    action_logits = state @ model.action_head.weight.T + model.action_head.bias
    return action_logits, state + model.action_embedding.weight[actions]


@pytest.mark.parametrize("fusion", ["lfa", "mvp"])
def test_lfa_and_mvp_equal_the_hand_written_dense_computation(fusion):
    model = ranker(fusion, "dense")
    items, actions, valid, anchors = sequences(batch=1, length=11)
    logits, states = model(items, actions, valid, anchors)
    expected_logits, expected_states = hand_written(model, items[0], actions[0])
    torch.testing.assert_close(logits[0], expected_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(states[0], expected_states, rtol=1e-10, atol=1e-10)


def test_interleave_is_one_causal_attention_over_twice_the_tokens():
    model = ranker("interleave", "dense")
    items, actions, valid, anchors = sequences(batch=1, length=7)
    x = torch.stack([model.item_embedding(items), model.action_embedding(actions)], dim=2).view(1, 14, -1)
    x = x + model.positions.weight[:14]
    for block in model.blocks:
        attention, h = block.attention, block.attention_norm(x)
        split = lambda w: (h @ w.T).view(1, 14, 2, 8).transpose(1, 2)  # noqa: E731
        scores = split(attention.q_proj.weight) @ split(attention.k_proj.weight).transpose(-1, -2) / math.sqrt(8)
        scores = scores.masked_fill(~torch.ones(14, 14, dtype=torch.bool).tril(), -math.inf)
        out = (torch.softmax(scores, -1) @ split(attention.v_proj.weight)).transpose(1, 2).flatten(2)
        x = x + out @ attention.out_proj.weight.T
        x = x + block.ffn(block.ffn_norm(x))
    state = model.norm(x)
    logits, states = model(items, actions, valid, anchors)
    torch.testing.assert_close(logits[0], model.action_head(state[0, 0::2]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(states[0], state[0, 1::2], rtol=1e-10, atol=1e-10)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="fusion must be one of"):
        GRConfig(num_items=5, num_actions=2, fusion="concat")
    with pytest.raises(ValueError, match="attention must be one of"):
        GRConfig(num_items=5, num_actions=2, attention="flash")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GRConfig(num_items=5, num_actions=2, d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="max_length"):
        GenerativeRanker(GRConfig(num_items=5, num_actions=2, max_length=3))(*[t[:, :4] for t in sequences()])


# ---- examples and evaluation -------------------------------------------------------------------

def test_examples_and_evaluation_read_the_right_rows(tiny_behavior_data):
    data = tiny_behavior_data
    split = leave_one_out(data)
    held_out = action_users(data, split.train_end, fraction=0.25, seed=3)
    assert len(held_out) == 3 and np.array_equal(held_out, action_users(data, split.train_end, fraction=0.25, seed=3))
    examples = RankerExamples(data, split.train_end, max_length=5, held_out=held_out)
    assert len(examples) == data.num_users - 3 and not np.isin(examples.users, held_out).any()
    user = examples.users[3]
    items, actions = examples[3]
    start, end = data.user_ptr[user], split.train_end[user]
    np.testing.assert_array_equal(items, data.item[start:end][-5:])
    np.testing.assert_array_equal(actions, data.behavior[start:end][-5:])
    batch = examples.collate([examples[i] for i in range(4)])
    assert batch["valid"].sum().item() == sum(len(examples[i][0]) for i in range(4))
    assert examples.interactions_per_epoch() == sum(len(examples[i][0]) for i in range(len(examples)))
    anchors = journey_anchors(data)(data.item[start:end])
    types = [data.items.product_type[i] for i in data.item[start:end]]
    assert anchors.tolist() == [True] + [a != b for a, b in zip(types[1:], types[:-1])]

    model = GenerativeRanker(GRConfig(num_items=data.num_items, num_actions=4, fusion="mvp", max_length=5))
    metrics = evaluate_ranker(model, data, split, held_out)
    # action targets: every position of the held-out users' last 5 training-split interactions
    labels = np.concatenate([data.behavior[data.user_ptr[u]:split.train_end[u]][-5:] for u in held_out])
    assert metrics["action"]["count"] == len(labels)
    assert metrics["next_item"]["count"] == len(split.test) - int(np.isin(split.test.user, held_out).sum())
    training = np.concatenate([data.behavior[data.user_ptr[u]:split.train_end[u]] for u in range(data.num_users)
                               if u not in held_out])
    for index, name in enumerate(data.behaviors):
        assert metrics["action"][name]["positives"] == int((labels == index).sum())
        rate, y = (training == index).mean(), labels == index
        constant = metrics["action_training_rates"][name]
        assert constant["log_loss"] == pytest.approx(-(y * math.log(rate) + (1 - y) * math.log(1 - rate)).mean())
        assert constant["auc"] == 0.5  # every score tied


def test_action_prior_starts_at_the_training_base_rates(tiny_behavior_data):
    data = tiny_behavior_data
    split = leave_one_out(data)
    held_out = action_users(data, split.train_end, fraction=0.25, seed=3)
    model = GenerativeRanker(GRConfig(num_items=data.num_items, num_actions=4, fusion="lfa", max_length=5))
    torch.nn.init.zeros_(model.action_head.weight)  # the bias alone: the constant predictor
    model.set_action_prior(training_rates(data, split, held_out).float())
    metrics = evaluate_ranker(model, data, split, held_out)
    for name in data.behaviors:
        assert metrics["action"][name]["log_loss"] == pytest.approx(
            metrics["action_training_rates"][name]["log_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="rates must have shape"):
        model.set_action_prior(torch.full((3,), 0.25))


# ---- action metrics against hand-computed values -------------------------------------------------

def test_action_metrics_by_hand():
    logits = torch.tensor([0.0, math.log(3), -math.log(3), 2.0], dtype=torch.float64)   # p = 1/2, 3/4, 1/4, sigmoid(2)
    labels = torch.tensor([1, 1, 0, 0])
    p4 = 1 / (1 + math.exp(-2))
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.75) + math.log(1 - p4)) / 4
    assert log_loss(logits, labels) == pytest.approx(expected, rel=1e-12)
    assert normalized_entropy(logits, labels) == pytest.approx(expected / math.log(2), rel=1e-12)
    # positives score 0 and 1.10; negatives -1.10 and 2: pairs won 1 + 1 + 0 + 0 of 4
    assert auc(logits, labels) == 0.5
    assert auc([0.2, 0.2, 0.1, 0.3], [1, 0, 0, 1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)  # a tie counts 1/2
    assert math.isnan(auc([0.1, 0.2], [1, 1])) and math.isnan(normalized_entropy([0.1, 0.2], [0, 0]))
    with pytest.raises(ValueError, match="0 or 1"):
        log_loss([0.1], [2])


def test_action_metrics_per_behavior():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0]], dtype=torch.float64)
    actions = torch.tensor([0, 0, 1])
    metrics = action_metrics(logits, actions, ("click", "buy"))
    assert metrics["count"] == 3
    assert metrics["click"]["base_rate"] == pytest.approx(2 / 3) and metrics["click"]["positives"] == 2
    assert metrics["click"]["auc"] == 1.0 and metrics["buy"]["auc"] == 1.0
    rate = 2 / 3
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert metrics["click"]["ne"] == pytest.approx(log_loss(logits[:, 0], actions == 0) / entropy)
    assert metrics["mean_ne"] == pytest.approx((metrics["click"]["ne"] + metrics["buy"]["ne"]) / 2)
    with pytest.raises(ValueError, match=r"logits must be \(B, 2\)"):
        action_metrics(logits[:, :1], actions, ("click", "buy"))


# ---- command line ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", "gr"], "--model gr needs --action-fusion"),
    (["--action-fusion", "lfa"], "--action-fusion applies to --model gr only"),
    (["--model", "gr", "--action-fusion", "lfa", "--patience", "2"], "--patience does not apply to --model gr"),
    (["--model", "gr", "--action-fusion", "mvp", "--disable-branch", "win"], "--disable-branch does not apply"),
    (["--model", "gr", "--action-fusion", "mvp", "--d-model", "30", "--heads", "4"], "multiple of --heads"),
    (["--model", "gr", "--action-fusion", "late"], "invalid choice: 'late'"),
])
def test_cli_refuses_bad_gr_arguments_before_work(capsys, tmp_path, argv, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", *argv, "--out", str(out)])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_trains_and_reports_interleaving_doubles_tokens(capsys, tmp_path):
    per_fusion = {}
    for fusion in ("interleave", "lfa"):
        out = tmp_path / fusion
        assert cli.main(["train", "--model", "gr", "--action-fusion", fusion, "--attention", "dense", "--steps", "2",
                         "--max-lines", "3000", "--test-users", "40", "--out", str(out)]) == 0
        per_fusion[fusion] = json.loads((out / "metrics.json").read_text())
        # one behavior per interaction: base rates that sum to 1 (a zero bias would give 0.5 each)
        bias = torch.load(out / "model.pt")["action_head.bias"]
        assert torch.sigmoid(bias).sum().item() == pytest.approx(1.0, abs=0.02)
    printed = capsys.readouterr().out
    assert "action prediction on " in printed and "next item at the test row (40 users" in printed
    assert per_fusion["interleave"]["tokens_per_step"] == pytest.approx(2 * per_fusion["lfa"]["tokens_per_step"])
    assert per_fusion["lfa"]["steps"] == 2 and per_fusion["lfa"]["test"]["next_item"]["count"] == 40
    with pytest.raises(ValueError, match="holds a --model gr run"):
        cli.cmd_evaluate(cli.parse_args(["evaluate", str(tmp_path / "lfa")]))


def test_learning_curve_pauses_without_changing_the_training(capsys, tmp_path):
    common = ["train", "--model", "gr", "--action-fusion", "mvp", "--attention", "dense", "--steps", "4",
              "--max-lines", "3000", "--test-users", "40"]
    assert cli.main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert cli.main(common + ["--eval-every", "3", "--out", str(tmp_path / "curve")]) == 0
    assert "| step | action mean NE |" in capsys.readouterr().out
    plain, curve = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("plain", "curve"))
    assert plain["curve"] == [] and [point["step"] for point in curve["curve"]] == [3, 4]
    assert curve["curve"][-1]["action"] == curve["test"]["action"] == plain["test"]["action"]
    weights = [torch.load(tmp_path / name / "model.pt") for name in ("plain", "curve")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)
