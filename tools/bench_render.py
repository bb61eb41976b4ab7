"""
Benchmark of stage 01's renderer: condition sets (depth + normal + skeleton) per second on one
core, the one-pass renderer of body.py against a naive pipeline (SMPL forward per body, a
depth-only pass, a separate normal pass with pyrender's own mesh, generic encoding). Prints both
rates and their ratio; writes nothing.

  python tools/bench_render.py [--size 192x384] [--bench-n 200] [--bench-repeat 3]
"""
import os
import sys
import time
import argparse

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
from util import parse_size  # noqa: E402
from body import (load_body, body_forward, fit_camera, procedural_poses, Renderer,  # noqa: E402
                  condition_maps, skeleton_map, openpose18, encode_depth, encode_normal, decode_normal)

def benchmark(args):
    torch.set_num_threads(1)
    size = parse_size(args.size or "192x384")
    n = args.bench_n
    rng = np.random.default_rng(0)
    global_orient, body_pose, _ = procedural_poses(rng, n, "ood")
    betas = rng.normal(0, 1, (n, 10))
    elev, azim = rng.uniform(0, 30, n), rng.uniform(0, 360, n)  # the paper's viewpoints
    model = load_body(args.smpl_model)
    ren = Renderer(model.body_faces)
    import pyrender
    try:
        # warm-up (shader compile, first context)
        v, j = body_forward(model, betas[:2], global_orient[:2], body_pose[:2])
        K, R, t = fit_camera(v[0], 10, 0, size)
        condition_maps(ren, v[0], j[0], K, R, t, size)

        def ours():  # batched SMPL forward, one pass for depth + normal, skeleton from the joints
            verts, joints = body_forward(model, betas, global_orient, body_pose)
            for i in range(n):
                K, R, t = fit_camera(verts[i], elev[i], azim[i], size)
                condition_maps(ren, verts[i], joints[i], K, R, t, size)

        def naive():  # SMPL forward per body, a depth-only pass, a separate normal pass from pyrender's
            import trimesh  # own trimesh mesh, generic decode/encode, skeleton from the joints
            for i in range(n):
                v, j = body_forward(model, betas[i:i + 1], global_orient[i:i + 1], body_pose[i:i + 1])
                K, R, t = fit_camera(v[0], elev[i], azim[i], size)
                pm = pyrender.Mesh.from_trimesh(trimesh.Trimesh(v[0], model.body_faces, process=False), smooth=True)
                z = _naive_pass(ren, pm, K, R, t, size, depth_only=True)
                rgb = _naive_pass(ren, pm, K, R, t, size, depth_only=False)
                mask = z > 0
                encode_depth(z, mask)
                encode_normal(decode_normal(rgb)[0], mask)
                skeleton_map(openpose18(j)[0], z, K, R, t, size)

        # the machine is shared: repeat both and report the best trial (timeit's convention) and the median
        fast, slow = [], []
        for _ in tqdm(range(args.bench_repeat), desc="benchmark", unit="trial"):
            for fn, out in ((ours, fast), (naive, slow)):
                t0 = time.time()
                fn()
                out.append(n / (time.time() - t0))
    finally:
        ren.delete()
    print(f"benchmark: {n} condition sets (depth + normal + skeleton) at {size[1]}x{size[0]}, one core, "
          f"SMPL forward ({model.num_body_vertices} vertices) included, {args.bench_repeat} trials")
    print(f"  one pass (ours):        best {max(fast):7.1f} sets/s   median {np.median(fast):7.1f}")
    print(f"  naive separate passes:  best {max(slow):7.1f} sets/s   median {np.median(slow):7.1f}")
    print(f"  ratio (best): {max(fast) / max(slow):.2f}x   goal >= 150 sets/s: {'met' if max(fast) >= 150 else 'NOT met'}")
    return max(fast), max(slow)


def _naive_pass(ren, pm, K, R, t, size, depth_only):
    pr = ren.pyrender
    ren._setup(size)
    ren.place(pm, K, R, t)
    if depth_only:
        return ren.r.render(ren.scene, flags=pr.RenderFlags.DEPTH_ONLY)
    return ren.r.render(ren.scene, flags=ren.flags)[0]

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=None, help="WxH of the maps (default 192x384, the paper's)")
    ap.add_argument("--bench-n", type=int, default=200, help="bodies per benchmark trial")
    ap.add_argument("--bench-repeat", type=int, default=3, help="benchmark trials (best and median reported)")
    ap.add_argument("--smpl-model", default=None, help="SMPL model file; default: the open body assets/open_body.npz")
    benchmark(ap.parse_args())


if __name__ == "__main__":
    util.run_main(main)
