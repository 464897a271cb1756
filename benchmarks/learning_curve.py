"""Learning curves: a validation metric against the CPU-hours spent (or the steps), from runs' metrics.json.

`sparserec train` records at every validation the process's CPU seconds so far (all threads; the
tokenizer fit and the earlier validations included) beside the metrics, and metrics.json keeps that
history. This plots one curve per run, with published numbers as horizontal lines.

  python benchmarks/learning_curve.py runs/grace-beauty runs/sasrec-beauty --metric ndcg@10 \
      --published "TIGER (test)=0.0384" --out benchmarks/results/learning_curve_beauty.png

`--model gr` runs trained with --eval-every keep a test learning curve instead (no validation
split: the held-out action users and the test rows); their metrics are `action_ne` (mean NE over
behaviors) and the next item's `hr@10`, `ndcg@10`:

  python benchmarks/learning_curve.py runs/gr/taobao-{interleave,lfa,mvp} --metric action_ne --x steps \
      --out benchmarks/results/action_fusion_taobao_ne.png
"""
import argparse
import json
import os
import re


def ranker_point(point: dict) -> dict:
    """A `--model gr` curve point flattened to the metric names of this script."""
    return {"step": point["step"], "cpu_s": point["cpu_s"], "action_ne": point["action"]["mean_ne"],
            **{name: value for name, value in point["next_item"].items() if "@" in name}}


def history_of(run_dir: str, metric: str):
    """[(cpu_hours, value, step)] of the run's validations (gr: curve points) that recorded CPU time."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: is {run_dir} a finished `sparserec train` run?")
    with open(path) as file:
        metrics = json.load(file)
    if metrics.get("curve"):
        history = [ranker_point(point) for point in metrics["curve"]]
    else:
        history = metrics.get("history")
    if history is None:
        raise ValueError(f"{path} has no training history (written by an older sparserec)")
    points = [(entry["cpu_s"] / 3600, entry[metric], entry["step"]) for entry in history
              if metric in entry and "cpu_s" in entry]
    if not points:
        raise ValueError(f"{path}: no validation recorded both {metric!r} and CPU time")
    return points


def published_line(text: str):
    label, sep, value = text.rpartition("=")
    if not sep or not label:
        raise ValueError(f"--published takes LABEL=VALUE, got {text!r}")
    return label, float(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of `sparserec train`")
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--published", action="append", default=[], help="LABEL=VALUE, a horizontal line")
    parser.add_argument("--title", default=None)
    parser.add_argument("--x", choices=("cpu-hours", "steps"), default="cpu-hours", help="the horizontal axis")
    parser.add_argument("--out", required=True, help="PNG to write (a .md table of the points beside it)")
    args = parser.parse_args()
    published = [published_line(text) for text in args.published]
    curves = {run: history_of(run, args.metric) for run in args.runs}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Runs that differ only in their "-seedN" suffix share a colour (one per variant) and differ in line style,
    # so seed-to-seed spread reads apart from the difference between variants.
    names = {run: os.path.basename(run.rstrip("/")) for run in curves}
    variant_of = {run: re.sub(r"-seed\d+$", "", name) for run, name in names.items()}
    variants = list(dict.fromkeys(variant_of.values()))
    seen_per_variant = {variant: 0 for variant in variants}
    styles = ("-", "--", ":", "-.")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run, points in curves.items():
        variant = variant_of[run]
        style = styles[seen_per_variant[variant] % len(styles)]
        seen_per_variant[variant] += 1
        axes.plot([p[0] if args.x == "cpu-hours" else p[2] for p in points], [p[1] for p in points], marker="o",
                  markersize=4, linestyle=style, color=f"C{variants.index(variant) % 10}", label=names[run])
    for label, value in published:
        axes.axhline(value, linestyle="--", color="grey", linewidth=1)
        # x in axes coordinates: the label sits at the left edge whatever the data's x range
        axes.annotate(label, (0, value), xycoords=axes.get_yaxis_transform(), xytext=(4, 3),
                      textcoords="offset points", fontsize=8, color="grey")
    axes.set_xlabel("CPU-hours (whole process, all threads)" if args.x == "cpu-hours" else "training steps")
    axes.set_ylabel(f"{args.metric} (gr: test curve; others: validation)")
    axes.set_title(args.title or f"{args.metric} against {'CPU budget' if args.x == 'cpu-hours' else 'steps'}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.savefig(args.out, dpi=120)
    table = [f"| run | step | CPU-hours | {args.metric} |", "|---|---|---|---|"]
    table += [f"| {os.path.basename(run.rstrip('/'))} | {step} | {hours:.3f} | {value:.4f} |"
              for run, points in curves.items() for hours, value, step in points]
    with open(os.path.splitext(args.out)[0] + ".md", "w") as file:
        file.write("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
