"""
The ORACLE augmentation of the demo world: the ground truth of every generated image of a manifest,
i.e. the source identity rendered in the target's pose and viewpoint (the target's own camera, so
it lines up with the target maps) under the world's oracle camera style. Flawless "generated"
images: the yardstick for the generator (demo/fidelity.py) and for the Re-ID rows (Table 1's ORACLE).

  python demo/oracle.py --manifest runs/demo/augmented/vi/manifest.csv --targets runs/demo/targets/vi \\
      --world runs/demo/world --out runs/demo/augmented/oracle

Writes the same file names and layout as the manifest's folder + masks/<stem>.mask.png + a copy of
manifest.csv; a rerun skips what exists.
"""
import os
import sys
import csv
import json
import time
import argparse

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
from body import load_params, parse_size, scale_camera  # noqa: E402
from demo.world import World  # noqa: E402

def read_manifest(path):
    if not os.path.exists(path):
        raise util.UserError(f"manifest '{path}' not found (03_generate.py writes augmented/<variant>/manifest.csv)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"file", "source", "pid", "target_id", "pose_id", "elevation", "azimuth", "seed"}
    if not rows or not need <= set(rows[0]):
        raise util.UserError(f"manifest '{path}' needs columns {sorted(need)}"
                               + ("" if rows else " and at least one row"))
    return rows


def make_oracle(args):
    """Render the ground truth of every generated image of a manifest: the source identity, in the
    target's pose and viewpoint (the target's camera, so it lines up with the target maps), under
    the world's oracle camera style. Same file names and layout + masks/<stem>.mask.png."""
    t0 = time.time()
    torch.set_num_threads(1)
    rows = read_manifest(args.manifest)
    meta_path = os.path.join(args.world, "identities.json")
    if not os.path.exists(meta_path):
        raise util.UserError(f"'{meta_path}' not found: the oracle needs the demo world (demo/world.py)")
    with open(meta_path) as f:
        meta = json.load(f)
    tp = load_params(os.path.join(args.targets, "params.npz"))
    tindex = {str(t): i for i, t in enumerate(tp["target_id"])}
    world = World(meta, args.smpl_model)
    size = parse_size(args.size) if args.size else tuple(meta["config"]["size"])
    style = args.style or meta["config"]["oracle_style"]
    n = 0
    try:
        for r in tqdm(rows, desc="oracle", unit="img"):
            pid, tid = int(r["pid"]), r["target_id"]
            if pid not in world.ids:
                raise util.UserError(f"manifest row '{r['file']}': pid {pid} is not a demo-world identity")
            if tid not in tindex:
                raise util.UserError(f"manifest row '{r['file']}': target '{tid}' is not in {args.targets}/params.npz")
            i = tindex[tid]
            dst = os.path.join(args.out, r["file"])
            stem = os.path.splitext(os.path.basename(r["file"]))[0]
            mask_path = os.path.join(args.out, "masks", stem + ".mask.png")
            if os.path.exists(dst) and os.path.exists(mask_path) and not args.overwrite:
                continue
            cam = (scale_camera(tp["K"][i], tuple(tp["image_size"][i]), size), tp["R"][i].astype(np.float64),
                   tp["t"][i].astype(np.float64))
            img, mask, _ = world.render(world.ids[pid], tp["global_orient"][i], tp["body_pose"][i],
                                        float(tp["elevation"][i]), float(tp["azimuth"][i]), style, size,
                                        int(r["seed"]), camera=cam)
            util.save_image(dst, img)
            util.save_image(mask_path, (mask * 255).astype(np.uint8))
            n += 1
    finally:
        world.close()
    with open(args.manifest) as f:
        util.save_text(os.path.join(args.out, "manifest.csv"), f.read())
    print(f"read {args.manifest} ({len(rows)} rows), {args.targets}/params.npz, {meta_path}; wrote {n} oracle images "
          f"+ masks/ + manifest.csv to {args.out} ({len(rows) - n} existed) in {time.time() - t0:.1f} s")

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest.csv written by 03_generate.py")
    ap.add_argument("--targets", required=True, help="the target set the manifest's target_id refer to")
    ap.add_argument("--world", default="runs/demo/world")
    ap.add_argument("--out", required=True)
    ap.add_argument("--style", default=None, help="camera style name from identities.json (default: the oracle's, c9)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the world's)")
    ap.add_argument("--smpl-model", default=None, help="SMPL model file; default: the open body assets/open_body.npz")
    make_oracle(ap.parse_args())


if __name__ == "__main__":
    util.run_main(main)
