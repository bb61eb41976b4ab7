"""
Benchmark of 03_generate.py's reference cache: images/s when the reference U-Net runs once per
reference (what 03 does) against running it again at every denoising step (what a pipeline
without the cache does), on the same references, targets, seeds and batches: the first --images
jobs of 03's job list for these flags. Also checks that both give the same images. Writes nothing.

  python tools/bench_sampler.py --generator runs/demo/generator --data runs/demo/world \\
      --targets runs/demo/targets/vi [--images 32] [--ddim-steps 25] [--batch-size 8] [--device auto]
"""
import os
import sys
import copy
import time
import argparse
import importlib.util

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
import models  # noqa: E402

_spec = importlib.util.spec_from_file_location("generate_03", os.path.join(util.ROOT, "03_generate.py"))
generate_03 = importlib.util.module_from_spec(_spec)  # (a stage script: its name starts with a digit)
_spec.loader.exec_module(generate_03)


class ReferenceEveryStep:
    """The generator with the reference cache taken out: every denoising call first runs the
    reference U-Net again on the reference (the features are the same; only the cost differs).
    Everything else is the wrapped generator's."""

    def __init__(self, gen, ref_lat, ref_emb):
        self.gen, self.ref_lat, self.ref_emb = gen, ref_lat, ref_emb

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def denoise(self, noisy, t, emb, pose, bank, index):
        return self.gen.denoise(noisy, t, emb, pose, self.gen.reference(self.ref_lat, self.ref_emb), index)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="folder written by 02_train_generator.py")
    p.add_argument("--data", required=True, help="Market-1501-layout root: references come from bounding_box_train/")
    p.add_argument("--targets", required=True, help="target set folder: targets.csv + maps/ (01_render_smpl.py targets)")
    p.add_argument("--images", type=int, default=32, help="images timed per variant: the first jobs of 03's list")
    p.add_argument("--refs-per-pid", default="5-7", help="as 03's: references sampled per person id")
    p.add_argument("--targets-per-ref", type=int, default=0, help="as 03's: targets drawn per reference (0: all)")
    p.add_argument("--ddim-steps", type=int, default=25, help="DDIM sampling steps per image")
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=8, help="targets denoised together (x2 rows with guidance)")
    p.add_argument("--seed", type=int, default=0, help="as 03's: seeds the job list and every image's noise")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (use on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args(argv)
    try:
        args.refs = generate_03.refs_range(args.refs_per_pid)
    except ValueError:
        raise util.UserError(f"bad --refs-per-pid '{args.refs_per_pid}' (want e.g. 5-7)")
    return args


def benchmark(args):
    """-> dict(cached, recomputed: images/s, ratio, images, references, same_images)."""
    device = torch.device(util.pick_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    train = util.list_split(os.path.join(args.data, util.SPLIT_DIRS["train"]))
    targets = generate_03.read_targets(args.targets)
    sampler = generate_03.Sampler(args.generator, device, args.amp, args.ddim_steps, args.guidance)
    maps = generate_03.load_target_maps(args.targets, targets, sampler.size)
    job_args = argparse.Namespace(seed=args.seed, refs=args.refs, targets_per_ref=args.targets_per_ref, num_images=0)
    jobs = generate_03.make_jobs(train, targets, job_args)[:args.images]
    if not jobs:
        raise util.UserError("--images: no jobs to time")
    by_ref = {}
    for j in jobs:
        by_ref.setdefault(j["ref_path"], []).append(j)
    ref_imgs = {r: models.load_image_tensor(r, sampler.size) for r in by_ref}
    sampler.images(sampler.reference(ref_imgs[jobs[0]["ref_path"]]), jobs[:1], maps)  # warm-up
    res, made = {}, {}
    for name in ("cached", "recomputed"):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        made[name] = []
        for ref_path, ref_jobs in tqdm(by_ref.items(), desc=f"benchmark ({name})", leave=False):
            cache = sampler.reference(ref_imgs[ref_path])  # both variants pay for one
            variant = sampler
            if name == "recomputed":
                variant = copy.copy(sampler)
                variant.gen = ReferenceEveryStep(sampler.gen, cache[0], cache[1])
            for b in range(0, len(ref_jobs), args.batch_size):
                made[name].append(variant.images(cache, ref_jobs[b:b + args.batch_size], maps))
        if device.type == "cuda":
            torch.cuda.synchronize()
        res[name] = len(jobs) / (time.time() - t0)
    res.update(ratio=res["cached"] / res["recomputed"], images=len(jobs), references=len(by_ref),
               same_images=all(np.array_equal(a, b) for a, b in zip(made["cached"], made["recomputed"])))
    print(f"benchmark: {len(jobs)} images, {len(by_ref)} references, {args.ddim_steps} DDIM steps, batch "
          f"{args.batch_size}, guidance {args.guidance}, device {device}, threads {torch.get_num_threads()}")
    print(f"  with reference cache:        {res['cached']:.2f} images/s")
    print(f"  reference U-Net every step:  {res['recomputed']:.2f} images/s")
    print(f"  ratio: {res['ratio']:.2f}x; the same images: {'yes' if res['same_images'] else 'NO'}")
    return res


def main(argv=None):
    benchmark(parse_args(argv))


if __name__ == "__main__":
    util.run_main(main)
