"""
Forecast of the GPU hours of `bash run_all.sh market1501|dukemtmc`, stage by stage, from
docs/forecast.json: per-item costs measured by tools/rehearse.py (a rehearsal at the real sizes with
tiny weights, on a CPU), the paper's reported GPU times (section 4.1-4.2) and docs/fullsize.md's CPU
measurements of the SD-1.5-sized generator. How each figure is made: docs/forecast.md.

  python tools/forecast.py --dataset market1501                       # the plain run, 1 seed, 1 GPU
  python tools/forecast.py --dataset market1501 --tables --seeds 3 --gpus 2
  python tools/forecast.py --dataset dukemtmc --stage1-frames 192402 --pose-video-frames 5000

--gpus 2 assumes 02, 03 and 04 are run under torchrun (or two processes, one per GPU): run_all.sh
itself starts every stage as one process, which uses one GPU, so its own time is the --gpus 1 one.

Standard library only: `run_all.sh ... --dry-run` prints this forecast before anything is set up.
"""
import os
import sys
import json
import argparse

FIGURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "forecast.json")


class UserError(Exception):
    """Bad input: main() prints it as one 'error:' line and exits 2, as every stage script does
    (util.UserError's twin: util imports numpy, which a dry run may not have)."""


SWEEP = (3500, 7000, 14000, 21000, 28000, 35000, 42000, 56000)  # run_all.sh's Table 2 counts


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="market1501 or dukemtmc")
    ap.add_argument("--tables", action="store_true", help="every row of Tables 1 and 2 (run_all.sh --tables)")
    ap.add_argument("--seeds", type=int, default=1, help="Re-ID seeds per table row (run_all.sh's default: 1)")
    ap.add_argument("--stage1-steps", type=int, default=30000, help="generator steps of stage 1 (paper: 30000)")
    ap.add_argument("--gen-steps", type=int, default=30000, help="generator steps of stage 2 (paper: 30000)")
    ap.add_argument("--reid-steps", type=int, default=20000, help="Re-ID steps (paper: 20000)")
    ap.add_argument("--added", default="stated", help="(VI)'s generated images: stated (45,500 Market / 49,000 "
                    "Duke), totals (14,000) or a number")
    ap.add_argument("--stage1-frames", type=int, default=0, help="video frames of stage 1 (0: no stage 1, as "
                    "run_all.sh without --stage1-data; the paper's UBC Fashion: 192402)")
    ap.add_argument("--pose-video-frames", type=int, default=0, help="dance-video frames whose poses are estimated "
                    "(0: none, as run_all.sh without --pose-videos)")
    ap.add_argument("--gpus", type=int, default=1, help="1 or 2 (2: 02, 03 and 04 under torchrun)")
    ap.add_argument("--figures", default=FIGURES, help="the figures (default docs/forecast.json)")
    args = ap.parse_args(argv)
    if args.dataset not in ("market1501", "dukemtmc"):
        raise UserError(f"--dataset '{args.dataset}': use market1501 or dukemtmc")
    if args.gpus not in (1, 2):
        raise UserError(f"--gpus {args.gpus}: use 1 or 2")
    for name in ("seeds", "gen_steps", "reid_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("stage1_steps", "stage1_frames", "pose_video_frames"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if args.added not in ("stated", "totals"):
        try:
            args.added = int(args.added)
        except ValueError:
            raise UserError(f"--added '{args.added}': use stated, totals or a number of images")
        if args.added < 1:
            raise UserError(f"--added {args.added}: must be at least 1")
    if not os.path.isfile(args.figures):
        raise UserError(f"figures file '{args.figures}' not found (docs/forecast.json; tools/rehearse.py "
                        f"measures its 'measured' part)")
    return args


def unit_costs(fig):
    """The per-item seconds the forecast multiplies, each with how it is made. -> {name: (seconds, source)}."""
    p, f, m = fig["paper"], fig["fullsize_cpu"], fig["measured"]
    per = lambda k: max(0.0, m[k]["seconds_per_item"])  # (a flat cost can measure a hair below 0)
    s2 = p["stage2"]["hours"] * 3600 / p["stage2"]["steps"]
    train_cpu = sum(f["train_step_batch1_s"]) / len(f["train_step_batch1_s"])
    ddim_cpu = f["generate_s_per_image"] / f["generate_ddim_steps"]
    ratio = f["sample_ddim_steps"] * ddim_cpu / (p["stage2"]["batch"] * train_cpu)
    manifest = m["manifest"]["seconds"] / 10.0  # 03 rewrites its manifest every 10 s
    loader2, loader1 = (m["generator_loader"][k]["seconds_per_step"] for k in ("stage2", "stage1"))
    c = {
        "keypoints": (per("keypoints"), "measured (CPU side; tiny ViTPose)"),
        "fit": (per("fit"), "measured on CPU (upper bound)"),
        "conditions": (per("conditions"), "measured"),
        "conditions_768": (per("conditions_768"), "measured"),
        "bank": (per("bank"), "measured"),
        "bank_choose": (per("bank_choose"), "measured"),
        "targets": (per("targets"), "measured"),
        "stage1_step": (p["stage1"]["hours"] * 3600 / p["stage1"]["steps"] + loader1,
                        "paper 15 h / 30k steps + measured loading"),
        "stage2_step": (s2 + loader2, "paper 6.5 h / 30k steps + measured loading"),
        "generate": (ratio * s2 * (1 + manifest), f"computed: {ratio:.2f} stage-2 steps per image"),
        "reid_step": (p["reid"]["hours"] * 3600 * p["reid"]["gpus"] / p["reid"]["steps"],
                      "paper 2 h / 20k steps on 2 GPUs, x2"),
        "reid_loader": (m["reid_loader"]["vi"]["seconds_per_batch"], "measured"),
        "evaluate": (m["evaluate"]["points"][-1]["seconds"], "measured at full counts"),
        "identity": (per("identity"), "measured (tiny ResNet)"),
    }
    c["ratio"] = (ratio, "computed")
    return c


def forecast(args, fig):
    """-> rows [(stage, items, seconds per item, hours, source)], the run's wall hours on args.gpus GPUs.
    Fixed start-up seconds of a stage are added to its hours (not to the per-item figure)."""
    d, m = fig["datasets"][args.dataset], fig["measured"]
    c = unit_costs(fig)
    g = args.gpus
    add = {"stated": d["added_stated"], "totals": fig["run"]["added_totals"]}.get(args.added, args.added)
    rows = []

    def row(stage, items, cost, parallel=False, fixed=0.0):
        """parallel: a GPU-bound stage that splits over the GPUs (02, 03, 04)."""
        sec, source = c[cost]
        hours = (items * sec + fixed) / 3600 / (g if parallel else 1)
        rows.append((stage, items, sec, hours, source))

    fixed = lambda k: max(0.0, m[k].get("fixed_seconds", 0.0))
    if args.stage1_frames:
        n = args.stage1_frames
        row("stage 1: keypoints", n, "keypoints", fixed=fixed("keypoints"))
        row("stage 1: fit", n, "fit", fixed=fixed("fit"))
        row("stage 1: conditions 768x768", n, "conditions_768", fixed=fixed("conditions_768"))
    row("01b keypoints (train)", d["train"], "keypoints", fixed=fixed("keypoints"))
    row("01b fit (train)", d["train"], "fit", fixed=fixed("fit"))
    row("01 conditions (train)", d["train"], "conditions", fixed=fixed("conditions"))
    row("01 bank (train)", d["train"], "bank", fixed=fixed("bank"))
    if args.pose_video_frames:
        n = args.pose_video_frames
        row("dance videos: keypoints", n, "keypoints", fixed=fixed("keypoints"))
        row("dance videos: fit", n, "fit", fixed=fixed("fit"))
        row("dance videos: bank --choose 20", n, "bank_choose", fixed=fixed("bank_choose"))
    variants = 4 if args.tables else 1
    row(f"01 targets ({variants} variant{'s' * (variants > 1)})", 80 * variants, "targets",
        fixed=variants * fixed("targets"))
    if args.stage1_frames and args.stage1_steps:
        row("02 stage 1 (768x768, batch 2)", args.stage1_steps, "stage1_step", parallel=True)
    row("02 stage 2 (192x384, batch 4)", args.gen_steps, "stage2_step", parallel=True)
    if args.tables:
        row("02 (V) random U-Nets", args.gen_steps, "stage2_step", parallel=True)
    gen_fixed = fixed("generate")
    row("03 generate (VI) pool", fig["run"]["pool_vi"], "generate", parallel=True, fixed=gen_fixed)
    if args.tables:
        row("03 generate (II)-(V)", 4 * add, "generate", parallel=True, fixed=4 * gen_fixed)
    # Re-ID: rows x seeds; a step of a row with generated images holds 256 + 32 images (CamStyle)
    reid_rows = [("base", 0)] + ([("ii", add), ("iii", add), ("iv", add), ("v", add)] if args.tables else [])
    reid_rows += [("vi", add)] + ([(f"vi_n{n}", n) for n in SWEEP] if args.tables else [])
    step, source = c["reid_step"]
    extra_share = fig["run"]["camstyle_extra_per_step"] / fig["run"]["reid_batch"]
    base_fixed, vi_fixed = fixed("reid_base"), fixed("reid_vi")
    per_image_start = max(0.0, (vi_fixed - base_fixed) / m["reid_vi"]["extra_images"])
    reid_s, n_runs = 0.0, 0
    for name, n_extra in reid_rows:
        s = step * (1 + extra_share if n_extra else 1) / g
        s = max(s, c["reid_loader"][0] / g)  # no faster than its loaders feed it (2 workers per process)
        reid_s += args.seeds * (args.reid_steps * s + base_fixed + per_image_start * n_extra)
        n_runs += args.seeds
    rows.append((f"04 Re-ID ({len(reid_rows)} rows x {args.seeds} seed{'s' * (args.seeds > 1)})",
                 n_runs * args.reid_steps, reid_s / (n_runs * args.reid_steps), reid_s / 3600, source))
    scale = (d["query"] + d["gallery"]) / (fig["datasets"]["market1501"]["query"] + fig["datasets"]["market1501"]["gallery"])
    sec = c["evaluate"][0] * scale
    rows.append(("05 evaluate", n_runs, sec, n_runs * sec / 3600, c["evaluate"][1]))
    row("identity score", fig["run"]["pool_vi"], "identity", fixed=fixed("identity"))
    return rows, sum(r[3] for r in rows)


def fmt_seconds(s):
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 600 else f"{s / 3600:.2f} h"


def main(argv=None):
    args = parse_args(argv)
    with open(args.figures) as f:
        fig = json.load(f)
    rows, total = forecast(args, fig)
    m = fig["measured"]
    print(f"forecast: run_all.sh {args.dataset}{' --tables' if args.tables else ''}, {args.seeds} Re-ID seed(s), "
          f"{args.gpus} GPU(s) (RTX A6000 as the paper's); figures of {os.path.relpath(args.figures)} "
          f"(measured {m['date']}; docs/forecast.md)")
    print(f"{'stage':42s} {'items':>10s} {'per item':>10s} {'hours':>8s}  source")
    for stage, items, sec, hours, source in rows:
        print(f"{stage:42s} {items:>10,} {fmt_seconds(sec):>10s} {hours:8.2f}  {source}")
    print(f"{'total':42s} {'':>10s} {'':>10s} {total:8.1f}  = {total / 24:.1f} days")
    if args.gpus == 2:
        print("note: 2 GPUs = 02, 03 and 04 under torchrun (or two processes); run_all.sh runs each stage as one "
              "process on one GPU: see --gpus 1")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
