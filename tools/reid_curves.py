"""
Learning curves of the demo's Re-ID: same- and shifted-split mAP against training iterations, for
row (I) (real images only) and the ORACLE row ((VI)'s jobs rendered as ground truth: flawless
generated images). Where both curves flatten is how long the demo must train for its rows to
measure the augmentation rather than the training budget.

Each point is a real 04 run: 04 resumes from its checkpoint, so training to 400, then 800, ...
iterations continues one run (04's learning rate is a function of the iteration alone, --lr-steps
included, so the points lie on the curve of a single run), and after each stop 05 evaluates
model.pt on both test splits. Resumable: points already in the CSV
are skipped. Needs a finished demo run (its world and augmented/oracle).

  python tools/reid_curves.py --run runs/demo --out docs/reid_curves.png --steps 400 800 1600 3200 \\
      --seeds 0 1 -- --arch resnet18 --width-mult 0.25 --bnneck ...   (04's arguments after --)
"""
import os
import sys
import csv
import json
import argparse
import subprocess

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--run", required=True, help="a demo run folder of run_all.sh (world/, augmented/oracle/)")
p.add_argument("--out", required=True, help="the PNG; its .csv beside it holds the points")
p.add_argument("--steps", type=int, nargs="+", help="04's step counts to evaluate at, ascending")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
p.add_argument("--work", default=None, help="where the runs go (default: <run>/curves)")
util.old_flag(p, "--iters", "--steps", type=int, nargs="+")
p.add_argument("reid_args", nargs=argparse.REMAINDER, help="-- then 04_train_reid.py's arguments (model, lr, mixing)")


def stage(script, *args):
    r = subprocess.run([sys.executable, os.path.join(util.ROOT, script), *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise util.UserError(f"{script} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    return r


def plot(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, split in zip(axes, ("same", "shifted")):
        for row, colour in (("base", "tab:blue"), ("oracle", "tab:green")):
            its = sorted({int(r["iters"]) for r in points if r["row"] == row and r["split"] == split})
            if not its:
                continue
            by = [[float(r["mAP"]) for r in points if r["row"] == row and r["split"] == split and int(r["iters"]) == i]
                  for i in its]
            mean = np.array([np.mean(v) for v in by])
            ax.plot(its, mean, "o-", color=colour, label=f"{'(I) real only' if row == 'base' else 'ORACLE'} "
                    f"(mean of {max(len(v) for v in by)} seeds)")
            for v, i in zip(by, its):
                ax.plot([i] * len(v), v, ".", color=colour, alpha=0.4)
        ax.set_title(f"{split}-camera test split")
        ax.set_xlabel("training iterations")
        ax.set_ylabel("mAP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    util.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")


def table(points):
    """Markdown: per iteration count and split, (I) and ORACLE mAP (mean +- sample std over seeds) and
    ORACLE - (I) paired by seed."""
    get = {(r["row"], int(r["seed"]), int(r["iters"]), r["split"]): float(r["mAP"]) for r in points}
    ms = lambda v: f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else (f"{v[0]:.1f}" if v else "")
    lines = ["| iterations | split | (I) mAP | ORACLE mAP | ORACLE − (I), paired | seeds |", "|---|---|---|---|---|---|"]
    for it in sorted({k[2] for k in get}):
        for split in ("same", "shifted"):
            seeds = sorted(s for (row, s, i, sp) in get if row == "base" and i == it and sp == split)
            base = [get["base", s, it, split] for s in seeds]
            ora = [get[k] for k in sorted(get) if k[0] == "oracle" and k[2] == it and k[3] == split]
            diff = [get["oracle", s, it, split] - get["base", s, it, split] for s in seeds if ("oracle", s, it, split) in get]
            diff_text = (f"{np.mean(diff):+.1f} ± {np.std(diff, ddof=1):.1f}" if len(diff) > 1 else
                         f"{diff[0]:+.1f}" if diff else "")
            lines.append(f"| {it:,} | {split} | {ms(base)} | {ms(ora)} | {diff_text} | {len(diff)} |")
    return "\n".join(lines) + "\n"


def main():
    args = p.parse_args()
    reid = args.reid_args[1:] if args.reid_args[:1] == ["--"] else args.reid_args
    if not args.steps:
        raise util.UserError("give --steps N [N ...]: the step counts to evaluate at")
    if {"--steps", "--iters"} & set(reid):
        raise util.UserError("leave --steps out of 04's arguments: the curve's points set the steps")
    world, oracle = os.path.join(args.run, "world"), os.path.join(args.run, "augmented", "oracle", "bounding_box_train")
    for path in (world, oracle):
        if not os.path.isdir(path):
            raise util.UserError(f"'{path}' not found: run 'bash run_all.sh demo' first (it renders the ORACLE row)")
    work = args.work or os.path.join(args.run, "curves")
    csv_path = os.path.splitext(args.out)[0] + ".csv"
    fields = ["row", "seed", "iters", "split", "mAP", "R1"]
    points = []
    if os.path.isfile(csv_path):
        with open(csv_path) as f:
            points = list(csv.DictReader(f))
    done = {(r["row"], int(r["seed"]), int(r["iters"]), r["split"]) for r in points}
    runs = [(row, seed) for seed in args.seeds for row in ("base", "oracle")]
    for k, (row, seed) in enumerate(runs):
        out = os.path.join(work, f"{row}_s{seed}")
        extra = [] if row == "base" else ["--extra-train", oracle]
        for it in sorted(args.steps):
            if all((row, seed, it, sp) in done for sp in ("same", "shifted")):
                continue
            stage("04_train_reid.py", "--data", world, "--out", out, "--seed", seed, "--steps", it, *extra, *reid)
            for split, root in (("same", world), ("shifted", os.path.join(world, "shifted"))):
                name = f"{row}_s{seed}_it{it}_{split}"
                stage("05_evaluate.py", "--model", os.path.join(out, "model.pt"), "--data", world, "--test-root", root,
                      "--name", name, "--results", os.path.join(work, "results"), "--no-size-check", "--workers", "0")
                with open(os.path.join(work, "results", name + ".json")) as f:
                    r = json.load(f)
                points.append(dict(row=row, seed=seed, iters=it, split=split, mAP=round(100 * r["mAP"], 2),
                                   R1=round(100 * r["R1"], 2)))
                print(f"[{k + 1}/{len(runs)}] {row} seed {seed}, {it} iterations, {split}: mAP {points[-1]['mAP']:.1f}", flush=True)
            util.save_text(csv_path, ",".join(fields) + "\n" + "".join(",".join(str(r[f]) for f in fields) + "\n" for r in points))
    plot(points, args.out)
    md = os.path.splitext(args.out)[0] + ".md"
    util.save_text(md, table(points))
    print(table(points))
    print(f"wrote {csv_path} ({len(points)} points), {md} and {args.out}")


if __name__ == "__main__":
    util.run_main(main)
