"""
The demo generator's learning curve: identity kept against pretraining steps. Every snapshot that
demo/pretrain.py exported (<work>/snapshots/step_N/) renders a fixed subset of (VI)'s jobs on the
demo world, straight from pretraining (no fine-tuning: the people are new to it); then the same
checks as run_all.sh: the row-(I) Re-ID model's identity score (tools/identity_score.py) and the
person PSNR against the oracle renders over the other-identity control (demo/fidelity.py).
Further generators (e.g. the fine-tuned one, or row (V)'s from scratch) join as labelled points;
without --snapshots the points alone are scored and plotted.

  python tools/identity_curve.py --snapshots ~/diffid-runs/pretrain/snapshots --run runs/demo \\
      --point "fine-tuned (run_all)=runs/demo/generator" --point "(V) from scratch=runs/demo/generator_v" \\
      --work ~/diffid-runs/curve --out docs/demo/identity_curve.png

Needs a finished run_all.sh demo in --run (world, targets/vi, reid/base_s0/model.pt). Writes
<work>/<name>/ per generator (resumes: a generator with identity.json is skipped), <work>/curve.csv
and the PNG.
"""
import os
import sys
import io
import csv
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402


def measure(gen, out, run_dir, args):
    """Generate the job subset with one generator and score it -> dict of the curve's numbers."""
    ident = os.path.join(out, "identity.json")
    if not os.path.isfile(ident):
        world, targets = os.path.join(run_dir, "world"), os.path.join(run_dir, "targets", "vi")
        generated, oracle = os.path.join(out, "generated"), os.path.join(out, "oracle")
        for cmd in (["03_generate.py", "--generator", gen, "--data", world, "--targets", targets, "--out", generated,
                     "--refs-per-pid", "1", "--targets-per-ref", str(args.targets_per_ref), "--seed", "1"],
                    ["demo/oracle.py", "--manifest", os.path.join(generated, "manifest.csv"), "--targets", targets,
                     "--world", world, "--out", oracle],
                    ["demo/fidelity.py", "--generated", generated, "--oracle", oracle, "--out", os.path.join(out, "fidelity.json")],
                    ["tools/identity_score.py", "--model", os.path.join(run_dir, "reid", "base_s0", "model.pt"),
                     "--data", world, "--generated", generated, "--oracle", oracle, "--out", ident]):
            util.run_script(cmd)
    fid, idn = (util.load_json(os.path.join(out, f)) for f in ("fidelity.json", "identity.json"))
    g = fid["identity_gain_psnr_foreground"]
    return dict(identity_generated=idn["generated"]["agreement"], identity_oracle=idn["oracle"]["agreement"],
                chance=idn["chance"], person_psnr_gain=g["mean"], gain_lo=g["ci95"][0], gain_hi=g["ci95"][1],
                mask_iou=fid["mask_iou"], images=idn["generated"]["images"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", help="demo/pretrain.py's <work>/snapshots (step_N/ folders); without it only the --point generators")
    ap.add_argument("--run", required=True, help="a finished run_all.sh demo folder (runs/demo)")
    ap.add_argument("--point", action="append", default=[], metavar="LABEL=GENERATOR", help="another generator to score")
    ap.add_argument("--work", required=True, help="where the generated images and scores go")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--targets-per-ref", type=int, default=2, help="jobs per train identity (one reference each)")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.run, "reid", "base_s0", "model.pt")):
        raise util.UserError(f"'{args.run}' has no reid/base_s0/model.pt: run 'bash run_all.sh demo' first")
    if not args.snapshots and not args.point:
        raise util.UserError("nothing to score: give --snapshots, --point LABEL=GENERATOR, or both")
    snaps = []
    if args.snapshots:
        snaps = sorted(d for d in os.listdir(args.snapshots) if d.startswith("step_")) if os.path.isdir(args.snapshots) else []
        if not snaps:
            raise util.UserError(f"no step_N/ snapshots in '{args.snapshots}' (demo/pretrain.py writes them)")
    rows = [dict(name=s, step=int(s[5:]), **measure(os.path.join(args.snapshots, s), os.path.join(args.work, s), args.run, args))
            for s in snaps]
    for p in args.point:
        label, _, gen = p.partition("=")
        if not gen:
            raise util.UserError(f"--point '{p}' is not LABEL=GENERATOR")
        rows.append(dict(name=label, step=-1, **measure(gen, os.path.join(args.work, label.replace(" ", "_").replace("/", "_")),
                                                        args.run, args)))
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    util.save_text(os.path.join(args.work, "curve.csv"), text.getvalue())

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = [r for r in rows if r["step"] >= 0]
    points = [r for r in rows if r["step"] < 0]
    steps = [r["step"] for r in curve]
    # the points sit right of the curve; without snapshots, side by side with their labels as ticks
    xs = [steps[-1] * (1.04 + 0.04 * i) if steps else i for i in range(len(points))]
    every = steps + xs  # the oracle and chance are the same jobs' for every generator: lines across all
    snap = "generated (pretrained snapshot)" if steps else None  # no legend entry without a curve
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [100 * r["identity_generated"] for r in curve], "o-", label=snap)
    a.plot(every, [100 * r["identity_oracle"] for r in curve + points], "k--", label="oracle renders (ceiling)")
    a.plot(every, [100 * r["chance"] for r in curve + points], ":", color="grey", label="chance")
    b.plot(steps, [r["person_psnr_gain"] for r in curve], "o-", label=snap)
    b.fill_between(steps, [r["gain_lo"] for r in curve], [r["gain_hi"] for r in curve], alpha=0.2)
    b.axhline(0, color="grey", lw=0.5)
    for x, r in zip(xs, points):
        a.plot([x], [100 * r["identity_generated"]], "s", label=r["name"])
        b.errorbar([x], [r["person_psnr_gain"]], yerr=[[r["person_psnr_gain"] - r["gain_lo"]], [r["gain_hi"] - r["person_psnr_gain"]]],
                   fmt="s", label=r["name"])
    xlabel = "pretraining steps (batch 16)" if steps else "generator"
    a.set(xlabel=xlabel, ylabel="identity score (%)", title=f"nearest train centroid = source id ({rows[-1]['images']} jobs)")
    b.set(xlabel=xlabel, ylabel="dB", title="person PSNR over the other-identity control (95% CI)")
    if not steps:
        for ax in (a, b):
            ax.set_xticks(xs, [r["name"] for r in points], fontsize=7)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    util.atomic_write(args.out, lambda tmp: fig.savefig(tmp, dpi=90))
    print(f"read {len(rows)} generators; wrote {os.path.join(args.work, 'curve.csv')} and {args.out}")


if __name__ == "__main__":
    util.run_main(main)
