"""
Generate the pose-diversified augmentation (paper 3.2 + 4.1, DESIGN.md 6) with a generator that
02_train_generator.py trained, or measure generated images against ground truth.

  generate (default):
    python 03_generate.py --generator runs/demo/generator --data runs/demo/world \
        --targets runs/demo/targets/vi --out runs/demo/augmented/vi [--num-images N]
  For every person id of <data>/bounding_box_train, 5-7 reference images are sampled
  (--refs-per-pid); each is rendered in every target condition set of --targets (targets.csv +
  maps/<target_id>.{depth,normal,skeleton}.png; --targets-per-ref draws a subset) with DDIM +
  classifier-free guidance (25 steps, 3.5), using the noise-schedule config the generator was
  trained with. The reference U-Net runs ONCE per reference; its features serve every denoising
  step and every target of that reference. Output: <out>/bounding_box_train/PPPP_c9s1_RRTTTT_00.jpg
  (Market-1501 names under the source pid, camera c9 = common.AUG_CAMERA; RR = reference slot,
  TTTT = target row) + <out>/manifest.csv (file, source, pid, target_id, pose_id, elevation,
  azimuth, seed). Images are written atomically; a rerun skips what exists and the manifest only
  ever lists complete images (it matches the folder after every finished run). Split one job
  list over machines/GPUs with --shard i/n and/or torchrun (rank/world). --benchmark measures
  images/s with the reference cache vs recomputing the reference U-Net every step.

  fidelity (the demo world, where ground truth exists):
    python 03_generate.py fidelity --generated runs/demo/augmented/vi --oracle runs/demo/augmented/oracle
  compares every generated image to the oracle render of the same file name (same identity,
  pose, viewpoint): PSNR, SSIM and foreground-mask IoU, with two controls: the oracle of the same
  identity in ANOTHER target pose (pose-shuffled) and the oracle of ANOTHER identity in the same
  target pose. Writes <generated>/fidelity.json (--out), and with --sheet a PNG of references and
  their (skeleton | generated | oracle) triples.
"""
import os
import sys
import csv
import glob
import time
import argparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError

MANIFEST_COLS = ["file", "source", "pid", "target_id", "pose_id", "elevation", "azimuth", "seed"]
TARGET_COLS = ["target_id", "pose_id", "pose_source", "elevation", "azimuth"]


def parse_generate_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="folder written by 02_train_generator.py")
    p.add_argument("--data", required=True, help="Market-1501-layout root: references come from bounding_box_train/")
    p.add_argument("--targets", required=True, help="target set folder: targets.csv + maps/ (01_render_smpl.py targets)")
    p.add_argument("--out", required=True, help="variant folder to write: bounding_box_train/ + manifest.csv")
    p.add_argument("--refs-per-pid", default="5-7", help="references sampled per person id, 'K' or 'LO-HI' (paper: 5-7)")
    p.add_argument("--targets-per-ref", type=int, default=0, help="targets drawn per reference (0: all; paper: 65-70)")
    p.add_argument("--num-images", type=int, default=0, help="cap on the images added, drawn at random from the "
                   "job list (0: all); the paper's own totals disagree, so this is a flag")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=8, help="targets denoised together (x2 rows with guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default="0/1", help="i/n: do the i-th of n parts of the job list (torchrun splits further)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (use on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--benchmark", type=int, default=0, metavar="N", help="write nothing; time N images with the "
                   "reference cache and N recomputing the reference U-Net every step, print images/s and the ratio")
    args = p.parse_args(argv)
    try:
        lo, hi = (int(v) for v in (args.refs_per_pid.split("-") * 2)[:2])
        i, n = (int(v) for v in args.shard.split("/"))
        assert 1 <= lo <= hi and 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"bad --refs-per-pid '{args.refs_per_pid}' or --shard '{args.shard}' (want e.g. 5-7 and 0/4)")
    args.refs, args.shard_i, args.shard_n = (lo, hi), i, n
    return args

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
            if not os.path.isfile(common.cond_path(maps, row["target_id"], k)):
                raise UserError(f"target '{row['target_id']}' has no {k} map '{common.cond_path(maps, row['target_id'], k)}'")
    return rows


def make_jobs(train, targets, args):
    by_pid = {}
    for path, pid, _ in train:
        by_pid.setdefault(pid, []).append(path)
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
                jobs.append(dict(file=f"bounding_box_train/{pid:04d}_c{common.AUG_CAMERA}s1_{r:02d}{ti:04d}_00.jpg",
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
        common.save_text(os.path.join(out, "manifest.csv"), "\n".join(lines) + "\n")
        if listing() == have:
            return len(rows)

# -----------------------------------------------------------------------------

def generate(argv=None):
    args = parse_generate_args(argv)
    from diffusers import DDIMScheduler
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    train = common.list_split(os.path.join(args.data, common.SPLIT_DIRS["train"]))
    targets = read_targets(args.targets)
    gen, vae, enc, schedule, gargs = common.load_generator(args.generator)
    size = tuple(gargs["size_hw"])
    sched = DDIMScheduler.from_config(schedule)  # the training schedule, sampled with DDIM
    gen.to(device).eval().requires_grad_(False)
    vae.to(device)
    enc.to(device)
    print(f"read {len(train)} train images from '{args.data}', {len(targets)} targets from '{args.targets}', "
          f"generator '{args.generator}' ({size[1]}x{size[0]}, schedule {schedule.get('beta_schedule')})")
    maps = {t["target_id"]: common.load_conditions(os.path.join(args.targets, "maps"), t["target_id"], size) for t in targets}

    jobs = make_jobs(train, targets, args)
    # this process's part: whole references (their cache is used fully), round-robin over
    # --shard i/n x torchrun rank/world
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    part, parts = args.shard_i * world + rank, args.shard_n * world
    refs = sorted({j["ref_path"] for j in jobs})
    mine = {r for i, r in enumerate(refs) if i % parts == part}
    groups = {}
    for j in jobs:
        if j["ref_path"] in mine:
            groups.setdefault(j["ref_path"], []).append(j)

    def noise_of(js, shape):  # one generator per image: the same image whatever the batch or shard
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(j["seed"])) for j in js]).to(device)

    @torch.no_grad()
    def reference_cache(ref_img):
        """The reference U-Net, once per reference: its features serve all targets and steps."""
        with autocast():
            x = ref_img[None].to(device)
            ref_lat, emb = common.encode_latents(vae, x), common.clip_embed(enc, x)
            return ref_lat, emb, gen.reference(ref_lat, emb)

    @torch.no_grad()
    def run_batch(cache, js, recompute=False):
        """-> uint8 images for jobs js of one reference. recompute: benchmark baseline only."""
        ref_lat, emb, bank = cache
        B = len(js)
        with autocast():
            conds = {k: torch.stack([maps[j["target_id"]][k] for j in js]).to(device) for k in common.COND_KINDS}
            pose = gen.pose(conds)  # once per batch, reused every step
            idx = torch.zeros(B, dtype=torch.long, device=device)
            ref_fn = (lambda: gen.reference(ref_lat, emb)) if recompute else None
            z = common.sample_latents(gen, sched, noise_of(js, ref_lat.shape[1:]), emb.expand(B, -1, -1), pose, bank, idx,
                                      steps=args.steps, guidance=args.guidance, reference_fn=ref_fn)
            return common.to_uint8(common.decode_latents(vae, z))

    if args.benchmark:
        return benchmark(args, groups, size, reference_cache, run_batch, device)

    os.makedirs(os.path.join(args.out, "bounding_box_train"), exist_ok=True)
    for tmp in glob.glob(os.path.join(args.out, "bounding_box_train", ".tmp_*")):
        if time.time() - os.path.getmtime(tmp) > 600:  # left by a killed run (a live one is younger)
            os.remove(tmp)
    todo = sum(1 for g in groups.values() for j in g if not os.path.isfile(os.path.join(args.out, j["file"])))
    n_mine = sum(len(g) for g in groups.values())
    print(f"{len(jobs)} jobs in all ({len(refs)} references); this part {part}/{parts}: {n_mine}, "
          f"{n_mine - todo} already there, {todo} to generate")
    bar = tqdm(total=todo, desc="generating", unit="img")
    n_ref_forwards, last_manifest = 0, 0.0
    for ref_path, js in groups.items():
        pending = [j for j in js if not os.path.isfile(os.path.join(args.out, j["file"]))]
        if not pending:
            continue
        cache = reference_cache(common.load_image_tensor(ref_path, size))
        n_ref_forwards += 1
        for b in range(0, len(pending), args.batch_size):
            chunk = pending[b:b + args.batch_size]
            for j, img in zip(chunk, run_batch(cache, chunk)):
                common.save_image(os.path.join(args.out, j["file"]), img)
            bar.update(len(chunk))
            if time.time() - last_manifest > 10:  # a killed run's manifest lags by seconds at most
                write_manifest(args.out, jobs)
                last_manifest = time.time()
    bar.close()
    n = write_manifest(args.out, jobs)
    print(f"reference U-Net forwards: {n_ref_forwards}")
    print(f"wrote {todo} images to '{os.path.join(args.out, 'bounding_box_train')}'; "
          f"'{os.path.join(args.out, 'manifest.csv')}' lists {n} of {len(jobs)} jobs")


def benchmark(args, groups, size, reference_cache, run_batch, device):
    """Same references, targets, seeds and batches: cached reference features vs the reference
    U-Net recomputed at every denoising step (what a pipeline without the cache does)."""
    js = [j for g in groups.values() for j in g][:args.benchmark]
    if not js:
        raise UserError("--benchmark: no jobs in this part")
    by_ref = {}
    for j in js:
        by_ref.setdefault(j["ref_path"], []).append(j)
    imgs = {r: common.load_image_tensor(r, size) for r in by_ref}
    run_batch(reference_cache(imgs[js[0]["ref_path"]]), js[:1])  # warm-up
    res = {}
    for name, recompute in (("cached", False), ("recomputed", True)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for r, rj in tqdm(by_ref.items(), desc=f"benchmark ({name})", leave=False):
            cache = reference_cache(imgs[r])  # both variants pay for one; the baseline then recomputes it per step
            for b in range(0, len(rj), args.batch_size):
                run_batch(cache, rj[b:b + args.batch_size], recompute=recompute)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res[name] = len(js) / (time.time() - t0)
    res["ratio"] = res["cached"] / res["recomputed"]
    print(f"benchmark: {len(js)} images, {len(by_ref)} references, {args.steps} steps, batch {args.batch_size}, "
          f"guidance {args.guidance}, device {device}, threads {torch.get_num_threads()}")
    print(f"  with reference cache:        {res['cached']:.2f} images/s")
    print(f"  reference U-Net every step:  {res['recomputed']:.2f} images/s")
    print(f"  ratio: {res['ratio']:.2f}x")
    return res


# -----------------------------------------------------------------------------
# fidelity against the demo world's ground truth

def estimate_mask(img, thr=0.12):
    """Foreground of an HxWx3 [0,1] image: pixels far from the median colour of the image border
    (the demo world's backgrounds are plain per camera, so the border is background)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.linalg.norm(img - np.median(border, axis=0), axis=-1) > thr * np.sqrt(3)


def ssim(a, b, sigma=1.5, size=11):
    """SSIM (Wang et al. 2004) with a gaussian window, per channel, averaged; a, b HxWx3 in [0,1]."""
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].double()
    y = torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1)))[None].double()
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(3, 1, size, size)
    f = lambda t: F.conv2d(t, win, groups=3)
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def psnr(a, b, mask=None):
    """PSNR in dB of [0,1] images; mask: only those pixels (the person: backgrounds of generated
    and oracle images come from different cameras, so the whole-image figure mixes them in)."""
    d = (a - b) ** 2 if mask is None else ((a - b) ** 2)[mask]
    return float(10 * np.log10(1.0 / max(np.mean(d) if d.size else 1.0, 1e-10)))


def iou(m1, m2):
    u = np.logical_or(m1, m2).sum()
    return float(np.logical_and(m1, m2).sum() / u) if u else 1.0


def fidelity(argv):
    p = argparse.ArgumentParser(prog="03_generate.py fidelity", description="PSNR / SSIM / mask IoU of generated "
                                "images against the oracle renders of the same names, with controls")
    p.add_argument("--generated", required=True, help="variant folder: manifest.csv + bounding_box_train/")
    p.add_argument("--oracle", required=True, help="oracle folder of the same layout and file names (01 oracle)")
    p.add_argument("--oracle-masks", default=None, help="folder of oracle foreground masks <stem>.mask.png "
                   "(default <oracle>/masks, written by 01 oracle; else estimated like the generated ones)")
    p.add_argument("--out", default=None, help="JSON to write (default <generated>/fidelity.json)")
    p.add_argument("--sheet", default=None, help="also write a PNG contact sheet: per row a reference, then "
                   "4 x (target skeleton | generated | oracle); needs --data and --targets")
    p.add_argument("--data", default=None, help="with --sheet: the data set root whose bounding_box_train/ "
                   "holds the references")
    p.add_argument("--targets", default=None, help="with --sheet: the target set (maps/<target_id>.skeleton.png)")
    p.add_argument("--sheet-rows", type=int, default=6)
    args = p.parse_args(argv)
    if args.sheet and not (args.data and args.targets):
        raise UserError("--sheet needs --data (references) and --targets (skeleton maps)")
    from PIL import Image
    man = os.path.join(args.generated, "manifest.csv")
    if not os.path.isfile(man):
        raise UserError(f"'{args.generated}' has no manifest.csv (write it with 03_generate.py)")
    with open(man, newline="") as f:
        rows = list(csv.DictReader(f))
    masks_dir = args.oracle_masks or os.path.join(args.oracle, "masks")
    have = [r for r in rows if os.path.isfile(os.path.join(args.oracle, r["file"]))]
    if not have:
        raise UserError(f"none of the {len(rows)} images of '{man}' has an oracle render in '{args.oracle}' "
                        f"(make them with 'python 01_render_smpl.py oracle --manifest {man} ...')")

    def load(path, size=None):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != size:
                im = im.resize(size, Image.BICUBIC)
            return np.asarray(im, dtype=np.float64) / 255.0

    gen, ora, gmask, omask = {}, {}, {}, {}
    for r in tqdm(have, desc="loading", leave=False):
        g = load(os.path.join(args.generated, r["file"]))
        size = (g.shape[1], g.shape[0])
        o = load(os.path.join(args.oracle, r["file"]), size)
        mp = os.path.join(masks_dir, os.path.splitext(os.path.basename(r["file"]))[0] + ".mask.png")
        if os.path.isfile(mp):
            with Image.open(mp) as im:
                om = np.asarray(im.convert("L").resize(size, Image.NEAREST)) > 127
        else:
            om = estimate_mask(o)
        gen[r["file"]], ora[r["file"]], gmask[r["file"]], omask[r["file"]] = g, o, estimate_mask(g), om
    # controls: the same identity's oracle in another target pose (does the sample follow the pose?)
    # and another identity's oracle in the same target pose (does it keep the identity?)
    by_src, by_tgt = {}, {}
    for r in have:
        by_src.setdefault(r["source"], []).append(r)
        by_tgt.setdefault(r["target_id"], []).append(r)
    m = {k: [] for k in ("psnr", "psnr_fg", "ssim", "mask_iou", "shuf_psnr", "shuf_psnr_fg", "shuf_iou",
                         "other_psnr", "other_psnr_fg", "other_iou", "gain_pose_iou", "gain_id_psnr_fg")}
    for r in tqdm(have, desc="fidelity"):
        f = r["file"]
        m["psnr"].append(psnr(gen[f], ora[f]))
        m["psnr_fg"].append(psnr(gen[f], ora[f], omask[f]))
        m["ssim"].append(ssim(gen[f], ora[f]))
        m["mask_iou"].append(iou(gmask[f], omask[f]))
        same = [q for q in by_src[r["source"]] if q["target_id"] != r["target_id"]]
        if same:
            q = same[len(m["psnr"]) % len(same)]["file"]  # deterministic pick
            m["shuf_psnr"].append(psnr(gen[f], ora[q]))
            m["shuf_psnr_fg"].append(psnr(gen[f], ora[q], omask[q]))
            m["shuf_iou"].append(iou(gmask[f], omask[q]))
            m["gain_pose_iou"].append(m["mask_iou"][-1] - m["shuf_iou"][-1])
        other = [q for q in by_tgt[r["target_id"]] if q["pid"] != r["pid"]]
        if other:
            q = other[len(m["psnr"]) % len(other)]["file"]
            m["other_psnr"].append(psnr(gen[f], ora[q]))
            m["other_psnr_fg"].append(psnr(gen[f], ora[q], omask[q]))
            m["other_iou"].append(iou(gmask[f], omask[q]))
            m["gain_id_psnr_fg"].append(m["psnr_fg"][-1] - m["other_psnr_fg"][-1])
    mean = lambda v: float(np.mean(v)) if v else None
    # paired gains over the controls with a 95% interval: "clearly above" means the interval excludes 0
    ci = lambda v: [float(np.mean(v) - 1.96 * np.std(v) / np.sqrt(len(v))), float(np.mean(v) + 1.96 * np.std(v) / np.sqrt(len(v)))] if len(v) > 1 else None
    res = dict(generated=args.generated, oracle=args.oracle, images=len(have), images_without_oracle=len(rows) - len(have),
               psnr=mean(m["psnr"]), psnr_foreground=mean(m["psnr_fg"]), ssim=mean(m["ssim"]), mask_iou=mean(m["mask_iou"]),
               control_pose_shuffled=dict(psnr=mean(m["shuf_psnr"]), psnr_foreground=mean(m["shuf_psnr_fg"]),
                                          mask_iou=mean(m["shuf_iou"]), n=len(m["shuf_iou"])),
               control_other_identity=dict(psnr=mean(m["other_psnr"]), psnr_foreground=mean(m["other_psnr_fg"]),
                                           mask_iou=mean(m["other_iou"]), n=len(m["other_iou"])),
               oracle_masks="files" if os.path.isdir(masks_dir) else "estimated",
               pose_gain_mask_iou=dict(mean=mean(m["gain_pose_iou"]), ci95=ci(m["gain_pose_iou"])),
               identity_gain_psnr_foreground=dict(mean=mean(m["gain_id_psnr_fg"]), ci95=ci(m["gain_id_psnr_fg"])))
    out = args.out or os.path.join(args.generated, "fidelity.json")
    common.save_json(out, res)
    if args.sheet:
        sample_sheet(args, by_src, gen, ora)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    print(f"{len(have)} images vs oracle: PSNR {fmt(res['psnr'])} dB (person only {fmt(res['psnr_foreground'])}), "
          f"SSIM {fmt(res['ssim'])}, mask IoU {fmt(res['mask_iou'])}")
    for name, key in (("pose shuffled (same identity, other target)", "control_pose_shuffled"),
                      ("other identity (same target pose)", "control_other_identity")):
        c = res[key]
        print(f"  control, {name}: PSNR {fmt(c['psnr'])} (person only {fmt(c['psnr_foreground'])}), mask IoU {fmt(c['mask_iou'])}")
    for name, key in (("follows the pose: mask IoU - pose-shuffled", "pose_gain_mask_iou"),
                      ("keeps the identity: person PSNR - other identity", "identity_gain_psnr_foreground")):
        g = res[key]
        if g["ci95"]:
            print(f"  {name}: {g['mean']:+.4f} (95% CI {g['ci95'][0]:+.4f} .. {g['ci95'][1]:+.4f})")
    print(f"wrote {out}")
    return res


def sample_sheet(args, by_src, gen, ora, per_row=4):
    """The picture next to the numbers: references spread over the identities, each followed by
    per_row of its jobs as (target skeleton | generated | oracle), all at the generated size.
    by_src: {reference file name: [manifest rows]}, as fidelity() grouped them for its controls."""
    from PIL import Image
    sources = sorted(by_src)
    pick = [sources[i] for i in np.linspace(0, len(sources) - 1, min(args.sheet_rows, len(sources))).astype(int)]
    h, w = next(iter(gen.values())).shape[:2]
    tile = lambda path, mode="RGB": np.asarray(Image.open(path).convert(mode).resize((w, h), Image.BICUBIC))
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    lines = []
    for src in pick:
        cells = [tile(os.path.join(args.data, "bounding_box_train", src))]
        for r in by_src[src][:per_row]:
            cells += [tile(common.cond_path(os.path.join(args.targets, "maps"), r["target_id"], "skeleton")),
                      to8(gen[r["file"]]), to8(ora[r["file"]])]
        cells += [np.zeros((h, w, 3), np.uint8)] * (1 + 3 * per_row - len(cells))  # pad short rows
        lines.append(np.concatenate(cells, 1))
    common.save_image(args.sheet, np.concatenate(lines, 0))
    print(f"wrote {args.sheet} ({len(lines)} references x {per_row} jobs: skeleton | generated | oracle)")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "fidelity":
        return fidelity(sys.argv[2:])
    return generate(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "generate" else sys.argv[1:])


if __name__ == "__main__":
    common.run_main(main)
