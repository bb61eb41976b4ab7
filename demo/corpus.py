"""
The demo world's generator PRETRAINING CORPUS: the counterpart of Stable Diffusion's broad data
and of the paper's stage-1 fashion videos, what `02_train_generator.py --stage 1` trains on.

  python demo/corpus.py --out runs/demo/corpus [--people 1000 --frames 12] [--smoke] [--workers 2]

then 02_train_generator.py --stage 1 --data runs/demo/corpus/frames --conditions runs/demo/corpus/conditions
(docs/generator.md, "Pretraining corpus (demo)").

N people whose pids are DISJOINT from the demo world's (the world's are 1..220, 4 digits in its
Market names; the corpus starts at --pid-start 100001), identities drawn by the world's own
sample_identity. Each person is a "video" of F frames in many poses (walk / stand and every
out-of-distribution kind of body.py's procedural poses) and viewpoints (elevation U[0,30],
azimuth U[0,360)) under 2 camera styles (background + light), rendered with the world's renderer
(demo/world.py World.render), plus the three condition maps of the body alone (no backpack) from
the same camera. Layout:
    <out>/frames/<video_id>/<frame>.png
    <out>/conditions/<video_id>/<frame>.{depth,normal,skeleton}.png
    <out>/smpl/<video_id>.npz       per-frame SMPL + camera (the sidecar keys of docs/formats.md,
                                    plus pose_kind, style and seed: World.render's inputs)
    <out>/identities.json           people + camera styles: World(meta) re-renders any frame
video_id = the pid in 6 digits, frame = 3 digits.

Resumable: a video is rendered into <out>/.partial/ and moved into place when complete; its smpl
npz is written last (atomically) and marks it done, so a rerun skips finished videos. Every random
choice of a person comes from rng(seed, pid): the corpus depends neither on --workers nor on
interruptions. A rerun with other settings (seed, frames, size, pid start) stops with an error;
--people may grow between runs.
"""
import os
import sys
import json
import time
import shutil
import argparse

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
from body import (OPEN_BODY, ID_KINDS, OOD_KINDS, body_forward, condition_maps, parse_size,  # noqa: E402
                  procedural_pose, write_maps, Renderer)
from demo.world import World, sample_identity, camera_style  # noqa: E402

# pose mix of a video: the world's in-distribution kinds, and every out-of-distribution kind sharing 55%
POSE_KINDS = ID_KINDS + OOD_KINDS
POSE_P = np.array([0.30, 0.15] + [0.55 / len(OOD_KINDS)] * len(OOD_KINDS))
STYLES_PER_VIDEO = 2  # two "cameras" per video: background and light differ between some frame pairs
FORMAT = "diff-id demo pretraining corpus v1"


def person(seed, pid):
    """The identity and camera styles of one person: the first draws of rng(seed, pid).
    -> (rng, identity, styles); the video plan goes on drawing from the same rng."""
    rng = np.random.default_rng([seed, pid])
    ident = sample_identity(rng, pid, "corpus")
    styles = [camera_style(rng, f"v{pid}_{k}") for k in range(STYLES_PER_VIDEO)]
    return rng, ident, styles


def video_plan(seed, pid, frames):
    """Everything random about one person's video, from rng(seed, pid)."""
    rng, ident, styles = person(seed, pid)
    kinds = [POSE_KINDS[k] for k in rng.choice(len(POSE_KINDS), size=frames, p=POSE_P)]
    go, bp = zip(*[procedural_pose(rng, k) for k in kinds])
    return dict(ident=ident, styles=styles, kinds=kinds, global_orient=np.stack(go), body_pose=np.stack(bp),
                elevation=rng.uniform(0, 30, frames), azimuth=rng.uniform(0, 360, frames),
                style=rng.integers(0, STYLES_PER_VIDEO, frames), seed=rng.integers(1 << 31, size=frames))


_WORLD, _MAPS = None, None  # per process: one World, and one renderer for the maps
_CFG = None  # out, seed, frames, size, meta: set before the worker pool forks


def render_video(pid):
    """Render one video into <out>/.partial/, move it into place, then write its smpl npz."""
    global _WORLD, _MAPS
    out, seed, frames, size = _CFG["out"], _CFG["seed"], _CFG["frames"], _CFG["size"]
    if _WORLD is None:
        torch.set_num_threads(1)
        _WORLD = World(_CFG["meta"])
        # the maps get a renderer of their own: the World renders at 2x, and changing one renderer's
        # viewport size makes pyrender rebuild its GL context (0.2 s a time, 20x the render itself)
        _MAPS = Renderer(_WORLD.body_faces)
    w = _WORLD
    w.bgs.clear()  # the World caches one backdrop per style; a video's styles never come back
    vid = f"{pid:06d}"
    plan = video_plan(seed, pid, frames)
    ident, styles = plan["ident"], plan["styles"]
    verts, joints = body_forward(w.model, np.tile(ident["betas"], (frames, 1)), plan["global_orient"],
                                 plan["body_pose"])
    part_f, part_c = (os.path.join(out, ".partial", d, vid) for d in ("frames", "conditions"))
    for d in (part_f, part_c):
        shutil.rmtree(d, ignore_errors=True)  # left by an interrupted run
        os.makedirs(d)
    Ks, Rs, ts = [], [], []
    for i in range(frames):
        img, _, (K, R, t) = w.render(ident, None, None, plan["elevation"][i], plan["azimuth"][i],
                                     styles[plan["style"][i]]["name"], size, int(plan["seed"][i]), posed=verts[i])
        # maps of the body alone (the backpack's vertices come after the body's), from the same camera:
        # what 01 conditions makes from the smpl npz
        maps, _ = condition_maps(_MAPS, verts[i][:w.V], joints[i], K, R, t, size, faces=w.body_faces)
        util.save_image(os.path.join(part_f, f"{i:03d}.png"), img)
        write_maps(part_c, f"{i:03d}", maps)
        Ks.append(K), Rs.append(R), ts.append(t)
    for d, part in (("frames", part_f), ("conditions", part_c)):
        dst = os.path.join(out, d, vid)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.rmtree(dst, ignore_errors=True)  # moved in by a run killed before its npz
        os.replace(part, dst)
    util.save_npz(os.path.join(out, "smpl", vid + ".npz"), names=np.array([f"{i:03d}.png" for i in range(frames)]),
                    betas=np.tile(np.asarray(ident["betas"], np.float32), (frames, 1)),
                    global_orient=plan["global_orient"].astype(np.float32),
                    body_pose=plan["body_pose"].astype(np.float32),
                    elevation=plan["elevation"].astype(np.float32), azimuth=plan["azimuth"].astype(np.float32),
                    K=np.stack(Ks).astype(np.float32), R=np.stack(Rs).astype(np.float32),
                    t=np.stack(ts).astype(np.float32), image_size=np.tile(size, (frames, 1)).astype(np.int32),
                    pose_kind=np.array(plan["kinds"]), style=np.array([styles[s]["name"] for s in plan["style"]]),
                    seed=plan["seed"].astype(np.int64), model=np.array(os.path.basename(OPEN_BODY)))
    return frames


def build_corpus(args):
    t0 = time.time()
    size = parse_size(args.size)
    if args.smoke:
        args.people, args.frames = 4, 4
    if args.people < 1 or not 2 <= args.frames <= 1000:
        raise util.UserError(f"--people {args.people} --frames {args.frames}: need at least 1 person and 2..1000 "
                               f"frames (stage 1 pairs two frames of one video; frame names have 3 digits)")
    if args.pid_start < 10000 or args.pid_start + args.people > 1000000:
        raise util.UserError(f"--pid-start {args.pid_start}: corpus pids must lie in 10000..999999, apart from the "
                               f"demo world's (its Market names hold 4-digit pids) and within 6-digit video ids")
    pids = list(range(args.pid_start, args.pid_start + args.people))
    people = [person(args.seed, p)[1:] for p in pids]  # cheap: identities + styles for the meta
    config = dict(size=list(size), frames=args.frames, pid_start=args.pid_start, pose_kinds=list(POSE_KINDS),
                  pose_p=[round(float(p), 4) for p in POSE_P], views="elevation U[0,30] x azimuth U[0,360)",
                  styles_per_video=STYLES_PER_VIDEO)
    meta = dict(format=FORMAT, seed=args.seed, model=os.path.basename(OPEN_BODY), people=args.people,
                config=config, styles=[s for _, st in people for s in st], identities=[i for i, _ in people])
    meta_path = os.path.join(args.out, "identities.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        now = dict(format=FORMAT, seed=args.seed, model=meta["model"], **json.loads(json.dumps(config)))
        was = dict(format=old.get("format"), seed=old.get("seed"), model=old.get("model"), **old.get("config", {}))
        diff = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(now) | set(was)) if was.get(k) != now.get(k)]
        if diff:
            raise util.UserError(f"'{args.out}' holds a corpus built with other settings ({'; '.join(diff)}): "
                                   f"rerun with its settings, or use another --out")
        if old.get("people", 0) > args.people:
            raise util.UserError(f"'{args.out}' holds {old['people']} people, --people {args.people} would leave "
                                   f"some unlisted in identities.json: pass --people {old['people']} or more")
        print(f"read {meta_path}: {old['people']} people, seed {old['seed']}")
    util.save_json(meta_path, meta)  # first: a resumed run checks its settings against it
    todo = [p for p in pids if not os.path.isfile(os.path.join(args.out, "smpl", f"{p:06d}.npz"))]
    print(f"corpus: {args.people} people (pids {pids[0]}..{pids[-1]}) x {args.frames} frames, {size[1]}x{size[0]} px, "
          f"seed {args.seed} -> {args.out}: {args.people - len(todo)} videos exist, {len(todo)} to render with "
          f"{args.workers} worker(s)")
    global _CFG, _WORLD, _MAPS
    _CFG = dict(out=args.out, seed=args.seed, frames=args.frames, size=size, meta=meta)
    n, t1 = 0, time.time()
    if args.workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.workers) as pool:
            for k in tqdm(pool.imap_unordered(render_video, todo), total=len(todo), desc="corpus", unit="video"):
                n += k
    else:
        try:
            for p in tqdm(todo, desc="corpus", unit="video"):
                n += render_video(p)
        finally:  # a process that exits with a live OSMesa renderer segfaults
            if _WORLD is not None:
                _WORLD.close()
                _MAPS.delete()
                _WORLD, _MAPS = None, None
    dt = time.time() - t1
    shutil.rmtree(os.path.join(args.out, ".partial"), ignore_errors=True)
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs) / 1e6
    speed = f"{n / max(dt, 1e-9):.1f} images/s (frame + maps)" if n else "nothing to render"
    print(f"wrote {len(todo)} videos ({n} frames + {3 * n} condition maps + smpl/<video_id>.npz) and identities.json "
          f"under {args.out}: {size_mb:.1f} MB in all; {speed}, {time.time() - t0:.0f} s in total")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo/corpus")
    ap.add_argument("--people", type=int, default=1000, help="people = videos")
    ap.add_argument("--frames", type=int, default=12, help="frames per video")
    ap.add_argument("--pid-start", type=int, default=100001, help="first pid (the demo world uses 1..220)")
    ap.add_argument("--seed", type=int, default=1234, help="corpus seed (the world's default is 0)")
    ap.add_argument("--size", default="64x128", help="WIDTHxHEIGHT (default 64x128, like the world)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--smoke", action="store_true", help="smoke-test scale (4 people x 4 frames)")
    build_corpus(ap.parse_args())


if __name__ == "__main__":
    util.run_main(main)
