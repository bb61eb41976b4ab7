"""
Stage 03: generate the pose-diversified augmentation (paper 3.2 + 4.1) with a generator that
02_train_generator.py trained.

  python 03_generate.py --generator runs/demo/generator --data runs/demo/world \\
      --targets runs/demo/targets/vi --out runs/demo/augmented/vi [--num-images N]

For every person id of <data>/bounding_box_train, 5-7 reference images are sampled
(--refs-per-pid); each is rendered in every target condition set of --targets (targets.csv +
maps/<target_id>.{depth,normal,skeleton}.png; --targets-per-ref draws a subset) with DDIM +
classifier-free guidance (25 steps, 3.5), using the noise-schedule config the generator was
trained with. The reference U-Net runs ONCE per reference; its features serve every denoising
step and every target of that reference. Output: <out>/bounding_box_train/PPPP_cCs0_RRTTTT_00.jpg
(Market-1501 names that every Re-ID toolkit reads: the source pid and camera, sequence 0, which
no real image has (util.generated_name); RR = reference slot, TTTT = target row) + <out>/manifest.csv (file, source, pid, target_id, pose_id, elevation,
azimuth, seed). Images are written atomically; a rerun skips what exists and the manifest only
ever lists complete images (it matches the folder after every finished run). Split one job
list over machines/GPUs with --shard i/n and/or torchrun (rank/world). Reference images that
cannot be read are skipped with their jobs, listed in <out>/unreadable_references.json.
On the demo world, demo/oracle.py renders the ground truth of the same jobs and
demo/fidelity.py measures the generated images against it. What the reference cache saves:
tools/bench_sampler.py.
"""
import os
import sys
import csv
import time
import argparse
import contextlib

import numpy as np
import torch
from tqdm import tqdm

import body
import common
import util
import models
from util import UserError

MANIFEST_COLS = ["file", "source", "pid", "target_id", "pose_id", "elevation", "azimuth", "seed"]
TARGET_COLS = ["target_id", "pose_id", "pose_source", "elevation", "azimuth"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="folder written by 02_train_generator.py")
    p.add_argument("--data", required=True, help="Market-1501-layout root: references come from bounding_box_train/")
    p.add_argument("--targets", required=True, help="target set folder: targets.csv + maps/ (01_render_smpl.py targets)")
    p.add_argument("--out", required=True, help="variant folder to write: bounding_box_train/ + manifest.csv")
    p.add_argument("--refs-per-pid", default="5-7", help="references sampled per person id, 'K' or 'LO-HI' (paper: 5-7)")
    p.add_argument("--targets-per-ref", type=int, default=0, help="targets drawn per reference (0: all; paper: 65-70)")
    p.add_argument("--num-images", type=int, default=0, help="cap on the images added, drawn at random from the "
                   "job list (0: all); the paper's own totals disagree, so this is a flag")
    p.add_argument("--ddim-steps", type=int, default=25, help="DDIM sampling steps per image")
    util.old_flag(p, "--steps", "--ddim-steps", type=int)
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=8, help="targets denoised together (x2 rows with guidance)")
    p.add_argument("--seed", type=int, default=0, help="seeds the job list and every image's noise")
    p.add_argument("--shard", default="0/1", help="i/n: do the i-th of n parts of the job list (torchrun splits further)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (use on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args(argv)
    try:
        args.refs = refs_range(args.refs_per_pid)
        i, n = (int(v) for v in args.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"bad --refs-per-pid '{args.refs_per_pid}' or --shard '{args.shard}' (want e.g. 5-7 and 0/4)")
    args.shard_i, args.shard_n = i, n
    for name in ("batch_size", "ddim_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("num_images", "targets_per_ref", "guidance", "threads"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    util.check_output_dir(args.out)
    return args


def refs_range(text):
    """--refs-per-pid 'K' or 'LO-HI' -> (LO, HI); ValueError unless 1 <= LO <= HI."""
    lo, hi = (int(v) for v in (text.split("-") * 2)[:2])
    if not 1 <= lo <= hi:
        raise ValueError(text)
    return lo, hi

# -----------------------------------------------------------------------------
# job list: a deterministic function of (data, targets, flags): every shard and every rerun agrees

def read_targets(folder):
    path = os.path.join(folder, "targets.csv")
    if not os.path.isfile(path):
        raise UserError(f"target set '{folder}' has no targets.csv: make one with 'python 01_render_smpl.py targets'")
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        missing = [c for c in TARGET_COLS if c not in (r.fieldnames or [])]
        if missing:
            raise UserError(f"'{path}' lacks columns {missing} (want {', '.join(TARGET_COLS)})")
        rows = list(r)
    if not rows:
        raise UserError(f"target set '{path}' is empty: no target rows")
    maps = os.path.join(folder, "maps")
    for row in rows:
        for k in common.COND_KINDS:
            if not os.path.isfile(body.cond_path(maps, row["target_id"], k)):
                raise UserError(f"target '{row['target_id']}' has no {k} map '{body.cond_path(maps, row['target_id'], k)}'")
    return rows


def make_jobs(train, targets, args):
    by_pid, camera = {}, {}
    for path, pid, cam in train:
        by_pid.setdefault(pid, []).append(path)
        camera[path] = cam
    jobs = []
    for pid in sorted(by_pid):
        rng = np.random.default_rng([args.seed, pid])
        paths = by_pid[pid]
        k = min(int(rng.integers(args.refs[0], args.refs[1] + 1)), len(paths))
        refs = sorted(rng.choice(paths, size=k, replace=False))
        for r, ref in enumerate(refs):
            rows = list(range(len(targets)))
            if 0 < args.targets_per_ref < len(targets):
                rows = sorted(np.random.default_rng([args.seed, pid, r]).choice(len(targets), args.targets_per_ref, replace=False))
            for ti in rows:
                t = targets[ti]
                jobs.append(dict(file="bounding_box_train/" + util.generated_name(pid, camera[ref], r * 10_000 + ti),
                                 source=os.path.basename(ref), ref_path=ref, pid=pid, target_id=t["target_id"],
                                 pose_id=t["pose_id"], elevation=t["elevation"], azimuth=t["azimuth"],
                                 seed=int(((args.seed * 1_000_003 + pid) * 100 + r) * 10_000 + ti)))
    if args.num_images and args.num_images < len(jobs):
        keep = np.sort(np.random.default_rng([args.seed, 9]).choice(len(jobs), args.num_images, replace=False))
        jobs = [jobs[i] for i in keep]
    return jobs


def write_manifest(out, jobs):
    """Rows of every job (all shards) whose image exists: never lists a missing image. One
    listdir, not a stat per job: cheap enough every few seconds at 80k jobs."""
    folder = os.path.join(out, "bounding_box_train")
    listing = lambda: {f for f in os.listdir(folder) if not f.startswith(".")}  # not the temp files
    while True:  # shards share the folder: rewrite if another one added images meanwhile
        have = listing()
        rows = [j for j in jobs if os.path.basename(j["file"]) in have]
        lines = [",".join(MANIFEST_COLS)] + [",".join(str(j[c]) for c in MANIFEST_COLS) for j in rows]
        util.save_text(os.path.join(out, "manifest.csv"), "\n".join(lines) + "\n")
        if listing() == have:
            return len(rows)

# -----------------------------------------------------------------------------
# sampling: the generator on one device, the reference U-Net once per reference

def load_target_maps(folder, targets, size):
    """{target_id: {kind: (C, H, W) map}} of every target row, at the generator's size."""
    return {t["target_id"]: body.load_conditions(os.path.join(folder, "maps"), t["target_id"], size) for t in targets}


def job_noise(jobs, shape, device):
    """One generator per image, seeded by its job: the same image whatever the batch or shard."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(j["seed"])) for j in jobs]).to(device)


class Sampler:
    """A generator folder loaded for sampling on one device. reference() runs the reference U-Net
    on one reference image; images() then renders any batch of that reference's jobs from those
    features (DDIM + classifier-free guidance, common.sample_latents)."""

    def __init__(self, folder, device, amp=False, ddim_steps=25, guidance=3.5):
        from diffusers import DDIMScheduler
        self.gen, self.vae, self.enc, self.schedule, gen_args = models.load_generator(folder)
        self.size = tuple(gen_args["size_hw"])
        self.scheduler = DDIMScheduler.from_config(self.schedule)  # the training schedule, sampled with DDIM
        self.gen.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)  # NHWC: faster convolutions
        self.vae.to(device)
        self.enc.to(device)
        self.device, self.amp, self.ddim_steps, self.guidance = device, amp, ddim_steps, guidance

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    @torch.no_grad()
    def reference(self, ref_img):
        """-> (reference latent, CLIP embedding, reference features): the features serve every
        target and every denoising step of this reference."""
        with self.autocast():
            x = ref_img[None].to(self.device)
            ref_lat, emb = models.encode_latents(self.vae, x), models.clip_embed(self.enc, x)
            return ref_lat, emb, self.gen.reference(ref_lat, emb)

    @torch.no_grad()
    def images(self, cache, jobs, maps):
        """-> uint8 images (B, H, W, 3) for jobs of the reference whose reference() is cache."""
        ref_lat, emb, bank = cache
        batch_size = len(jobs)
        with self.autocast():
            conds = {k: torch.stack([maps[j["target_id"]][k] for j in jobs]).to(self.device,
                                                                                 memory_format=torch.channels_last)
                     for k in common.COND_KINDS}
            pose = self.gen.pose(conds)  # once per batch, reused every step
            index = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            latents = common.sample_latents(self.gen, self.scheduler, job_noise(jobs, ref_lat.shape[1:], self.device),
                                            emb.expand(batch_size, -1, -1), pose, bank, index,
                                            steps=self.ddim_steps, guidance=self.guidance)
            return models.to_uint8(models.decode_latents(self.vae, latents))


def this_part(jobs, shard_i, shard_n):
    """This process's part of the job list: whole references (their cache is used fully),
    round-robin over --shard i/n x torchrun rank/world. -> ({reference path: its jobs}, part, parts, references)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    part, parts = shard_i * world + rank, shard_n * world
    refs = sorted({j["ref_path"] for j in jobs})
    mine = {r for i, r in enumerate(refs) if i % parts == part}
    groups = {}
    for j in jobs:
        if j["ref_path"] in mine:
            groups.setdefault(j["ref_path"], []).append(j)
    return groups, part, parts, refs

# -----------------------------------------------------------------------------

def generate(argv=None):
    args = parse_args(argv)
    device = util.pick_device(args.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch.device(device)
    if args.threads:
        torch.set_num_threads(args.threads)

    train = util.list_split(os.path.join(args.data, util.SPLIT_DIRS["train"]))
    targets = read_targets(args.targets)
    sampler = Sampler(args.generator, device, args.amp, args.ddim_steps, args.guidance)
    size = sampler.size
    print(f"read {len(train)} train images from '{args.data}', {len(targets)} targets from '{args.targets}', "
          f"generator '{args.generator}' ({size[1]}x{size[0]}, schedule {sampler.schedule.get('beta_schedule')})")
    maps = load_target_maps(args.targets, targets, size)

    jobs = make_jobs(train, targets, args)
    groups, part, parts, refs = this_part(jobs, args.shard_i, args.shard_n)
    # references that cannot be decoded: their jobs are skipped, counted and recorded (every shard
    # checks every reference, so all agree); the job list itself stays a function of the file names
    readable, _ = models.check_images([(r,) for r in refs], "reference images", bar=None)
    bad = set(refs) - {r for (r,) in readable}
    n_skipped = sum(1 for j in jobs if j["ref_path"] in bad)
    groups = {r: g for r, g in groups.items() if r not in bad}

    os.makedirs(os.path.join(args.out, "bounding_box_train"), exist_ok=True)
    util.remove_stale_temps(os.path.join(args.out, "bounding_box_train"))
    record = os.path.join(args.out, "unreadable_references.json")  # only while there are any
    if bad:
        util.save_json(record, dict(references=sorted(bad), jobs_skipped=n_skipped))
        print(f"skipping the {n_skipped} jobs of {len(bad)} reference image(s) that cannot be read "
              f"(e.g. '{min(bad)}'); listed in {record}")
    elif os.path.exists(record):
        with contextlib.suppress(FileNotFoundError):  # (another shard may have removed it)
            os.remove(record)
    todo = sum(1 for g in groups.values() for j in g if not os.path.isfile(os.path.join(args.out, j["file"])))
    n_mine = sum(len(g) for g in groups.values())
    print(f"{len(jobs)} jobs in all ({len(refs)} references); this part {part}/{parts}: {n_mine}, "
          f"{n_mine - todo} already there, {todo} to generate")
    bar = tqdm(total=todo, desc="generating", unit="img")
    n_ref_forwards, last_manifest = 0, 0.0
    for ref_path, ref_jobs in groups.items():
        pending = [j for j in ref_jobs if not os.path.isfile(os.path.join(args.out, j["file"]))]
        if not pending:
            continue
        cache = sampler.reference(models.load_image_tensor(ref_path, size))
        n_ref_forwards += 1
        for b in range(0, len(pending), args.batch_size):
            chunk = pending[b:b + args.batch_size]
            for j, img in zip(chunk, sampler.images(cache, chunk, maps)):
                util.save_image(os.path.join(args.out, j["file"]), img)
            bar.update(len(chunk))
            if time.time() - last_manifest > 10:  # a killed run's manifest lags by seconds at most
                write_manifest(args.out, jobs)
                last_manifest = time.time()
    bar.close()
    n = write_manifest(args.out, jobs)
    print(f"reference U-Net forwards: {n_ref_forwards}")
    print(f"wrote {todo} images to '{os.path.join(args.out, 'bounding_box_train')}'; "
          f"'{os.path.join(args.out, 'manifest.csv')}' lists {n} of {len(jobs)} jobs"
          + (f" ({n_skipped} skipped: their reference cannot be read)" if bad else ""))


def main():
    return generate(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "generate" else sys.argv[1:])


if __name__ == "__main__":
    util.run_main(main)
