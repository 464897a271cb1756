"""The command line refuses bad arguments before any work, and runs that cannot silently go wrong:
fingerprinted data and tokenizer, explicit --resume / --overwrite, files that name themselves
when they are broken, and --help that shows every option's default."""
import json
import os
import random

import pytest
import torch

from sparserec import cli, pipeline, runs

TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--steps", "2", "--eval-every", "0",
        "--valid-users", "4", "--test-users", "4", "--batch-size", "8"]


def write_generic(folder, users=40, items=24, extra_lines=0, seed=0):
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "interactions.tsv"), "w") as file:
        file.write("user\titem\tbehavior\ttimestamp\n")
        for user in range(users):
            for t in range(7):
                file.write(f"u{user}\ti{rng.randrange(items)}\t{rng.choice(['click', 'buy'])}\t{t}\n")
        for line in range(extra_lines):
            file.write(f"new{line}\ti0\tclick\t0\n")
    with open(os.path.join(folder, "items.tsv"), "w") as file:
        file.write("item\tproduct_type\tprice\tbrand\n")
        for item in range(items):
            file.write(f"i{item}\tt{item % 3}\t{item + 1.5}\tb{item % 2}\n")
    return folder


def run_cli(capsys, *argv):
    """(exit code, stderr) of `sparserec argv`; argparse failures exit through SystemExit."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GRACE run on a tiny generic dataset: (run dir, data dir, cache dir)."""
    base = tmp_path_factory.mktemp("cli")
    data = write_generic(str(base / "data"))
    out, cache = str(base / "run"), str(base / "cache")
    assert cli.main(["train", "--dataset", data, "--cache", cache, "--out", out, *TINY]) == 0
    return out, data, cache


# ---- every argument is checked before any work ------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "--steps: must be at least 1"),
    (["train", "--steps", "-3"], "--steps: must be at least 1"),
    (["train", "--beam", "5"], "--beam (5) must be at least 10"),
    (["train", "--valid-users", "0"], "--valid-users: must be at least 1"),
    (["train", "--test-users", "0"], "--test-users: must be at least 1"),
    (["train", "--layers", "0"], "--layers: must be at least 1"),
    (["train", "--heads", "0"], "--heads: must be at least 1"),
    (["train", "--d-model", "30", "--heads", "4"], "must be a multiple of --heads"),
    (["train", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["train", "--lr", "0"], "--lr: must be a positive finite number"),
    (["train", "--lr", "nan"], "--lr: must be a positive finite number"),
    (["train", "--warmup", "-1"], "--warmup: must be at least 0"),
    (["train", "--eval-every", "-1"], "--eval-every: must be at least 0"),
    (["train", "--patience", "-1"], "--patience: must be at least 0"),
    (["train", "--checkpoint-every", "-1"], "--checkpoint-every: must be at least 0"),
    (["train", "--max-lines", "0"], "--max-lines: must be at least 1"),
    (["train", "--steps", "ten"], "--steps: must be an integer"),
    (["train", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["train", "--attention", "dense", "--disable-branch", "win"], "--disable-branch applies to --attention jsa"),
    (["train", *sum((["--disable-branch", b] for b in ("cmp", "slc", "jrn", "win")), [])], "all four branches"),
    (["prepare", "--max-lines", "0"], "--max-lines: must be at least 1"),
    (["prepare", "--tokenizer", "vq"], "--tokenizer: invalid choice"),
    (["prepare", "--coba-balance", "0.5"], "--coba-balance applies to --tokenizer coba only"),
    (["train", "--coba-window", "3", "--coba-steps", "1"], "--coba-window, --coba-steps applies to --tokenizer coba"),
    (["prepare", "--tokenizer", "coba", "--coba-window", "0"], "--coba-window: must be at least 1"),
    (["prepare", "--tokenizer", "coba", "--coba-mix", "1.5"], "--coba-mix: must be in [0, 1]"),
    (["prepare", "--tokenizer", "coba", "--coba-uniformity", "-1"], "--coba-uniformity: must be a non-negative"),
    (["train", "--think-clusters", "8"], "--think-clusters applies to --think only"),
    (["train", "--think-align-weight", "0.5", "--think-interest-reg", "1"],
     "--think-align-weight, --think-interest-reg applies to --think only"),
    (["train", "--think", "--model", "sasrec"], "--think applies to --model grace only"),
    (["train", "--think", "--think-clusters", "1"], "--think-clusters: must be at least 2"),
    (["train", "--think", "--think-clusters", "300"], "cannot exceed the codebook size (256)"),
    (["train", "--think", "--think-interest-weight", "-0.1"], "--think-interest-weight: must be a non-negative"),
    (["train", "--think", "--think-temperature", "0"], "--think-temperature: must be a positive"),
    (["evaluate", "somewhere", "--beam", "9"], "--beam (9) must be at least 10"),
    (["evaluate", "somewhere", "--max-users", "0"], "--max-users: must be at least 1"),
    (["recommend", "somewhere", "--user", "u1", "--top", "-3"], "--top: must be at least 1"),
    (["recommend", "somewhere", "--user", "u1", "--top", "0"], "--top: must be at least 1"),
    (["bench", "--lengths", "128,0"], "lengths must be positive"),
    (["bench", "--lengths", "a,b"], "comma-separated integers"),
    (["bench", "--repeats", "0"], "--repeats: must be at least 1"),
    (["demo", "--steps", "0"], "--steps: must be at least 1"),
])
def test_bad_arguments_exit_before_any_work(capsys, tmp_path, argv, message):
    out = tmp_path / "run"
    argv = argv + (["--out", str(out)] if argv[0] in ("train", "demo") else [])
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"sparserec {argv[0]}: error: ")  # one line, after the usage
    assert not out.exists()  # nothing was written: the check came first


def test_help_shows_every_default_and_every_option_has_help():
    (subparsers,) = cli.build_parser()._subparsers._group_actions
    assert set(subparsers.choices) == {"demo", "prepare", "train", "evaluate", "recommend", "bench"}
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for option in sub._actions:
            if option.dest == "help":
                continue
            assert option.help, f"{name} {option.option_strings or option.dest} has no help text"
            if option.option_strings and option.nargs != 0:
                assert "default" in formatter._get_help_string(option) % {"default": option.default}, (name, option.dest)
        assert "(default:" in sub.format_help()
    assert "--resume" in subparsers.choices["train"].format_help()


# ---- runs record what they were trained on ----------------------------------------------------

def test_run_records_fingerprints_and_absolute_dataset(trained):
    out, data, _ = trained
    run = runs.read_run(out)
    assert run["complete"] is True
    assert os.path.isabs(run["dataset"]) and run["dataset"] == os.path.abspath(data)
    files = {os.path.basename(f["path"]): f for f in run["fingerprints"]["data"]["files"]}
    assert set(files) == {"interactions.tsv", "items.tsv"}
    assert files["items.tsv"]["size"] == os.path.getsize(os.path.join(data, "items.tsv"))
    assert sorted(run["fingerprints"]["data"]["behaviors"]) == ["buy", "click"]
    assert len(run["fingerprints"]["tokenizer"]) == 16


def test_evaluate_and_recommend_refuse_changed_data(trained, tmp_path, capsys):
    out, data, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(out):
        (copy / name).write_bytes(open(os.path.join(out, name), "rb").read())
    moved = write_generic(str(tmp_path / "data"), extra_lines=1)  # one more line: indices shift
    run = json.loads((copy / "run.json").read_text())
    run["dataset"] = moved
    (copy / "run.json").write_text(json.dumps(run))
    for argv in (["evaluate", str(copy), "--max-users", "2"], ["recommend", str(copy), "--user", "u1"]):
        code, err = run_cli(capsys, *argv)
        assert code == 2
        assert "trained on other data" in err
        assert "interactions.tsv changed" in err and "num users 40 -> 41" in err


def test_moved_but_identical_data_is_accepted(trained, tmp_path, capsys):
    out, data, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(out):
        (copy / name).write_bytes(open(os.path.join(out, name), "rb").read())
    moved = write_generic(str(tmp_path / "data"))
    run = json.loads((copy / "run.json").read_text())
    run["dataset"] = moved
    (copy / "run.json").write_text(json.dumps(run))
    assert cli.main(["recommend", str(copy), "--user", "u1", "--top", "3"]) == 0
    assert "  1. item i" in capsys.readouterr().out


def test_replaced_tokenizer_is_refused(trained, tmp_path, capsys):
    out, _, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(out):
        (copy / name).write_bytes(open(os.path.join(out, name), "rb").read())
    state = torch.load(copy / "tokenizer.pt", weights_only=True)
    state["sids"] = state["sids"].flip(0)
    torch.save(state, copy / "tokenizer.pt")
    code, err = run_cli(capsys, "evaluate", str(copy), "--max-users", "2")
    assert code == 2 and "the tokenizer" in err


@pytest.mark.parametrize("name", ["run.json", "model.pt", "tokenizer.pt"])
def test_truncated_run_files_are_named(trained, tmp_path, capsys, name):
    out, _, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for file in os.listdir(out):
        (copy / file).write_bytes(open(os.path.join(out, file), "rb").read())
    content = (copy / name).read_bytes()
    (copy / name).write_bytes(content[: len(content) // 2])
    code, err = run_cli(capsys, "evaluate", str(copy), "--max-users", "2")
    assert code == 2
    assert str(copy / name) in err


# ---- train --out: refuse, resume, overwrite ----------------------------------------------------

def test_existing_run_is_refused_without_resume_or_overwrite(trained, capsys):
    out, data, cache = trained
    before = os.path.getmtime(os.path.join(out, "model.pt"))
    code, err = run_cli(capsys, "train", "--dataset", data, "--cache", cache, "--out", out, *TINY, "--lr", "0.01")
    assert code == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert os.path.getmtime(os.path.join(out, "model.pt")) == before


def test_resume_refuses_other_options_and_data(trained, tmp_path, capsys):
    out, data, cache = trained
    code, err = run_cli(capsys, "train", "--dataset", data, "--cache", cache, "--out", out, *TINY, "--lr", "0.01",
                        "--resume")
    assert code == 2 and "--lr 0.001 -> 0.01" in err
    changed = write_generic(str(tmp_path / "changed"), extra_lines=2)
    code, err = run_cli(capsys, "train", "--dataset", changed, "--cache", cache, "--out", out, *TINY, "--resume")
    assert code == 2 and "--dataset" in err
    code, err = run_cli(capsys, "train", "--cache", cache, "--out", str(tmp_path / "none"), *TINY, "--resume")
    assert code == 2 and "no checkpoint.pt" in err


def test_resume_continues_and_overwrite_restarts(tmp_path, capsys):
    data = write_generic(str(tmp_path / "data"))
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    common = ["--dataset", data, "--cache", cache, "--out", out, *TINY]
    assert cli.main(["train", *common]) == 0
    first = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert first["step"] == 2
    # A truncated checkpoint names itself on resume.
    content = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    open(os.path.join(out, "checkpoint.pt"), "wb").write(content[:100])
    code, err = run_cli(capsys, "train", *common, "--resume")
    assert code == 2 and "checkpoint.pt cannot be resumed" in err
    code, _ = run_cli(capsys, "train", *common, "--overwrite")
    assert code == 0
    second = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert second["step"] == 2 and runs.read_run(out)["complete"] is True
    assert cli.main(["train", *common, "--resume"]) == 0  # same options: continues (already finished)


def test_checkpoint_every_writes_during_training(tmp_path, monkeypatch):
    data = write_generic(str(tmp_path / "data"))
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    saved_steps = []
    from sparserec.train import trainer as trainer_module
    original = trainer_module.Trainer.save_checkpoint

    def spy(self, path):
        saved_steps.append(self.step)
        return original(self, path)
    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", spy)
    argv = [a if a != "2" or i != TINY.index("--steps") + 1 else "4" for i, a in enumerate(TINY)]
    assert cli.main(["train", "--dataset", data, "--cache", cache, "--out", out, *argv, "--checkpoint-every", "1"]) == 0
    assert saved_steps[:4] == [1, 2, 3, 4]
    run = runs.read_run(out)
    assert run["options"]["checkpoint_every"] == 1


def test_unfinished_run_says_resume(trained, tmp_path, capsys):
    out, _, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for file in os.listdir(out):
        (copy / file).write_bytes(open(os.path.join(out, file), "rb").read())
    run = json.loads((copy / "run.json").read_text())
    run["complete"] = False
    (copy / "run.json").write_text(json.dumps(run))
    code, err = run_cli(capsys, "evaluate", str(copy))
    assert code == 2 and "--resume" in err


def test_recommend_and_bench_refuse_a_sasrec_run(trained, tmp_path, capsys):
    out, _, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    run = json.loads(open(os.path.join(out, "run.json")).read())
    run["model"] = "sasrec"
    (copy / "run.json").write_text(json.dumps(run))
    code, err = run_cli(capsys, "recommend", str(copy), "--user", "u1")
    assert code == 2 and "needs a GRACE run" in err and "sasrec run" in err
    code, err = run_cli(capsys, "bench", "--run", str(copy))
    assert code == 2 and "needs a GRACE run" in err


def test_beam_larger_than_the_catalogue_is_refused_before_training(tmp_path, capsys):
    data = write_generic(str(tmp_path / "data"))
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--dataset", data, "--cache", str(tmp_path / "cache"), "--out", str(out),
                        *TINY, "--beam", "5000")
    assert code == 2 and "--beam 5000 is larger than the 24 items" in err
    assert not out.exists()


def test_semantic_ids_do_not_depend_on_the_thread_count(tmp_path):
    from sparserec.data import default_split, load_dataset
    from sparserec.tokenize import ItemTokenizer, TokenizerConfig
    data = load_dataset(write_generic(str(tmp_path / "data"), users=120, items=80))
    split = default_split(data)
    threads = torch.get_num_threads()
    paths = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            tokenizer = ItemTokenizer.fit(data, TokenizerConfig.fast(), train_end=split.train_end, progress=False)
            paths.append(tokenizer.item_paths())
            assert torch.get_num_threads() == count  # fit restores the caller's setting
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(paths[0], paths[1]) and torch.equal(paths[0], paths[2])


def test_empty_validation_or_task_is_refused_before_training(tmp_path, capsys):
    data = write_generic(str(tmp_path / "data"))
    out = tmp_path / "run"
    common = ["--dataset", data, "--cache", str(tmp_path / "cache"), "--out", str(out), *TINY]
    code, err = run_cli(capsys, "train", *common, "--max-lines", "3")
    assert code == 2 and "the validation split is empty" in err
    assert not out.exists()
    only_clicks = tmp_path / "clicks"
    only_clicks.mkdir()
    (only_clicks / "interactions.tsv").write_text(
        "user\titem\tbehavior\ttimestamp\n" + "".join(f"u{u}\ti{(u + t) % 9}\t{'buy' if (u, t) == (0, 0) else 'click'}\t{t}\n"
                                                     for u in range(12) for t in range(5)))
    code, err = run_cli(capsys, "train", *common[2:], "--dataset", str(only_clicks))
    assert code == 2 and "no target for the target_behavior task" in err
    assert not out.exists()


@pytest.mark.parametrize("tokenizer", ["rqvae", "coba"])
def test_prepare_reports_codebook_utilisation_and_uniqueness_per_level(tmp_path, capsys, tokenizer):
    data = write_generic(str(tmp_path / "data"))
    assert cli.main(["prepare", "--dataset", data, "--cache", str(tmp_path / "cache"), "--tokenizer", tokenizer]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out.split("tokenizer stats: ")[1].splitlines()[0])
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "SID level" not in line]
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    for level, (_, utilisation, unique) in enumerate(rows, 1):
        assert float(utilisation) == pytest.approx(stats[f"utilisation_level_{level}"], abs=5e-5)
        assert float(unique) == pytest.approx(stats[f"unique_level_{level}"], abs=5e-5)


@pytest.mark.parametrize("cot", [True, False])
def test_think_trains_evaluates_and_records_its_config(tmp_path, capsys, cot):
    data = write_generic(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    argv = ["train", "--dataset", data, "--cache", str(tmp_path / "cache"), "--out", out, *TINY, "--think",
            "--think-clusters", "4", "--think-interest-reg", "0.5", "--tokenizer", "coba"]
    argv += [] if cot else ["--no-cot"]
    assert cli.main(argv) == 0
    think = runs.read_run(out)["model_config"]["think"]
    assert (think["levels"], think["clusters"], think["interest_reg"]) == (3, 4, 0.5)
    assert "| grace |" in capsys.readouterr().out
    code, err = run_cli(capsys, "evaluate", out, "--exhaustive", "--max-users", "4")
    assert code == 2 and "--exhaustive scores paths without the thinking steps" in err
    assert run_cli(capsys, "evaluate", out, "--max-users", "4")[0] == 0
    model, prepared, _ = pipeline.load_run(out)
    with pytest.raises(ValueError, match="without the thinking steps"):
        pipeline.evaluate(model, prepared, exhaustive=True)
