"""
Rebuild the demo world's PRETRAINED GENERATOR (assets/demo_generator/) end to end, with the
project's own code: the demo's counterpart of Stable Diffusion + the paper's stage 1, which
run_all.sh demo fine-tunes on the world's biased train split (stage 2, 02 --init).

  python demo/pretrain.py --work ~/diffid-runs/pretrain --out assets/demo_generator [--smoke]

Steps (each resumes or is skipped when its output is there; rerun the same command):
  1. corpus: demo/corpus.py, 1,000 people disjoint from the world's, 12 frames each, many poses,
     viewpoints, backgrounds and lights (the broad data SD and the fashion videos stand for);
  2. image encoder: demo/image_encoder.py, a tiny CLIPVisionModelWithProjection trained to give
     one corpus person the same embedding in two frames, then frozen (CLIP's role);
  3. generator: demo/scratch_generator.py (the VAE trained on the corpus, random tiny U-Nets and
     guiders), then 02_train_generator.py --stage 1 --init on the corpus, batch 16, EMA weights, min-SNR weighting;
     run in segments of --snapshot-every steps, each exported to <work>/snapshots/step_N/
     (the learning curve: tools/identity_curve.py);
  4. export: the last snapshot copied into --out (the layout 02 writes, loadable by 02 --init and
     03) with provenance.json: commands, seconds per step, machine, git commit.
"""
import os
import sys
import time
import shutil
import socket
import argparse
import platform
import tempfile
import subprocess

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
import models  # noqa: E402

# what a generator folder needs (02 writes these; checkpoint.pt, log.csv and samples/ are training state)
EXPORT = ("args.json", "reference_unet", "denoising_unet", "guiders.safetensors", "scheduler", "vae", "image_encoder")


def run(name, cmd, log, log_path):
    """Run one stage script, its output streaming through; a failure stops with one error line.
    log[name] keeps the command and the seconds of every call (a resumed step's calls add up),
    saved to log_path after each call."""
    t0 = time.time()
    util.run_script(cmd)
    prev = log.get(name, {}).get("seconds", 0.0)
    log[name] = dict(command="python " + " ".join(cmd), seconds=round(prev + time.time() - t0, 1))
    util.save_json(log_path, log)


def copy_generator(src, dst):
    """Copy the loadable part of a 02 folder into a temp folder beside dst -> its path (then
    models.swap_in puts it in place: an interrupted copy never leaves a half folder at dst)."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=".tmp_")
    for name in EXPORT:
        s = os.path.join(src, name)
        (shutil.copytree if os.path.isdir(s) else shutil.copy2)(s, os.path.join(tmp, name))
    return tmp


def folder_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/demo/pretrain", help="corpus, encoder, training state, snapshots (keep it "
                    "outside the clone for long runs)")
    ap.add_argument("--out", default="assets/demo_generator", help="the exported generator folder")
    ap.add_argument("--people", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--encoder-steps", type=int, default=600)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=4000, help="U-Net steps in all (the shipped folder: 4,000)")
    ap.add_argument("--snapshot-every", type=int, default=1000, help="export a snapshot every N steps (the curve)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="corpus render processes")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the tests (minutes)")
    ap.add_argument("--device", default="auto", help="for 02 and the random generator's VAE")
    args = ap.parse_args()
    if args.smoke:
        args.people, args.frames, args.encoder_steps, args.vae_steps = 4, 4, 4, 4
        args.steps, args.snapshot_every, args.batch_size = 4, 2, 2
    if args.steps < 1 or args.snapshot_every < 1:
        raise util.UserError(f"--steps {args.steps} and --snapshot-every {args.snapshot_every} must be at least 1")
    work = os.path.abspath(args.work)
    corpus, enc_dir, gen_dir = (os.path.join(work, d) for d in ("corpus", "image_encoder", "generator"))
    os.makedirs(work, exist_ok=True)
    log_path = os.path.join(work, "pretrain_log.json")
    log = util.load_json(log_path) if os.path.isfile(log_path) else {}
    t0 = time.time()

    corpus_cmd = ["demo/corpus.py", "--out", corpus, "--workers", str(args.workers)]
    run("corpus", corpus_cmd + (["--smoke"] if args.smoke else ["--people", str(args.people), "--frames", str(args.frames)]), log, log_path)
    if not os.path.isfile(os.path.join(enc_dir, "encoder.json")):
        run("image encoder", ["demo/image_encoder.py", "--corpus", corpus, "--out", enc_dir, "--steps", str(args.encoder_steps)]
            + (["--people", "2"] if args.smoke else []), log, log_path)
    else:
        print(f"image encoder: '{enc_dir}' is there")
    scratch = os.path.join(work, "scratch")  # the random tiny networks, the VAE trained first
    if not os.path.isfile(os.path.join(scratch, "args.json")):
        run("random generator", ["demo/scratch_generator.py", "--stage", "1", "--data", os.path.join(corpus, "frames"),
                                 "--out", scratch, "--image-encoder", enc_dir, "--size", "64x128", "--vae-steps",
                                 str(args.vae_steps), "--vae-batch-size", "2" if args.smoke else "16"]
            + ["--device", args.device], log, log_path)
    gen_cmd = ["02_train_generator.py", "--stage", "1", "--data", os.path.join(corpus, "frames"),
               "--conditions", os.path.join(corpus, "conditions"), "--out", gen_dir, "--init", scratch, "--size", "64x128",
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--ema", "0.999", "--min-snr-gamma", "5",
               "--cache-encodings",  # each frame through the frozen VAE and image encoder once, not twice a step
               "--save-every", str(args.snapshot_every), "--sample-every", str(args.snapshot_every)]
    gen_cmd += ["--device", args.device]
    gen_cmd += ["--ddim-steps", "2", "--num-val", "2"] if args.smoke else []
    for step in range(args.snapshot_every, args.steps + args.snapshot_every, args.snapshot_every):
        step = min(step, args.steps)
        snap = os.path.join(work, "snapshots", f"step_{step:06d}")
        if os.path.isdir(snap):
            continue
        run(f"generator to step {step}", gen_cmd + ["--steps", str(step)], log, log_path)  # resumes from the checkpoint of the segment before
        models.swap_in(copy_generator(gen_dir, snap), snap)
        print(f"wrote snapshot '{snap}'")

    tmp = copy_generator(os.path.join(work, "snapshots", f"step_{args.steps:06d}"), args.out)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=util.ROOT, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(gen_dir, "log.csv")) as f:
        rows = list(f)[1:]
    prov = dict(what="the demo world's pretrained generator: 02_train_generator.py stage 1 from scratch on the "
                "demo pretraining corpus (people disjoint from the world's), the counterpart of SD-1.5 + stage 1",
                rebuild=f"python demo/pretrain.py --work WORK --out {args.out}" + (" --smoke" if args.smoke else ""),
                settings={k: v for k, v in vars(args).items() if k not in ("work", "out", "device")},
                steps=log, training_log_rows=len(rows), git_commit=git,
                machine=dict(host=socket.gethostname(), cpus=os.cpu_count(), platform=platform.platform(),
                             device=util.pick_device(args.device)),
                encoder_check=util.load_json(os.path.join(enc_dir, "encoder.json")))
    util.save_json(os.path.join(tmp, "provenance.json"), prov)
    models.swap_in(tmp, args.out)
    print(f"wrote '{args.out}' ({folder_mb(args.out):.1f} MB) with provenance.json; "
          f"{sum(s['seconds'] for s in log.values()) / 60:.1f} min of stage runs in all ({time.time() - t0:.0f} s this call)")


if __name__ == "__main__":
    util.run_main(main)
