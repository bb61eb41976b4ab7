"""
Stage 01: SMPL bodies -> depth / normal / skeleton condition maps (paper 3.2-3.3), and the target
set: sampled poses x viewpoints with their maps, what 03 renders every reference in.

  python 01_render_smpl.py conditions --data runs/demo/world --out runs/demo/conditions
                 (real photos: --data DATA --smpl runs/<ds>/smpl, the sidecars of 01b_estimate_smpl.py)
  python 01_render_smpl.py targets    --out runs/demo/targets/vi --poses ood --views uniform
  python 01_render_smpl.py bank       --smpl runs/<ds>/pose_videos/smpl --choose 20 \
                 --away-from runs/<ds>/smpl/bounding_box_train.npz --out runs/<ds>/poses/videos.npz

conditions: the maps of every training image, from its per-image SMPL parameters and camera
(smpl/<split>.npz), aligned with the photo; 02 trains on (image, maps) pairs.
targets: --num-poses poses (procedural, or drawn from an AMASS-style --pose-bank) x
--views-per-pose viewpoints (uniform: the paper's elevation U[0,30] x azimuth U[0,360)), each
rendered as a map set maps/<target_id>.{depth,normal,skeleton}.png + targets.csv + params.npz.
Viewpoints can also be drawn from estimated photos (--views-from: (II)'s and (III)'s "training
viewpoints" on real data).
bank: the paper's target poses (3.2, 4.1: 20 poses from dance videos): the SMPL fits of video
frames (01b) -> one AMASS-style pose bank. The paper samples its 20 at random from the videos
(--choose 0 keeps every pose; targets then draws at random). --choose N keeps N by greedy
farthest-point sampling instead (a departure, chosen so that the targets are out of the training
distribution by construction): each next pose is the one whose nearest neighbour among the
training photos' poses (--away-from) and the poses already chosen is farthest, with distance the
RMS of the 24 joint positions (metres, root at the origin, canonical frame, neutral shape).

Body: the open SMPL-layout body in assets/open_body.npz (CC0, see assets/README.md) by default;
--smpl-model PATH selects an official SMPL file (.npz, or a .pkl converted with
tools/convert_smpl_pkl.py). Bodies, cameras (convention: docs/formats.md), the map encoding and the
renderer live in body.py. The demo world is built by demo/world.py.
"""
import os
import time
import argparse

import numpy as np
import torch
from scipy.spatial.distance import cdist
from tqdm import tqdm

import util
from util import parse_size
from body import (load_body, body_chunks, body_forward, fit_camera, scale_camera, load_params, procedural_poses,
                  Renderer, condition_maps, write_maps, COND_KINDS, cond_path)

# -----------------------------------------------------------------------------
# viewpoints and poses

def sample_views(rng, n, kind):
    """(elevation, azimuth) in degrees. uniform: the paper's U[0,30] x U[0,360);
    train: like the demo world's train cameras (elevation 8-14, walking towards or away)."""
    if kind == "uniform":
        return rng.uniform(0, 30, n), rng.uniform(0, 360, n)
    if kind == "train":
        return rng.uniform(8, 14, n), (rng.integers(0, 2, n) * 180 + rng.normal(0, 10, n)) % 360
    raise util.UserError(f"unknown viewpoint distribution '{kind}': use 'uniform' or 'train'")


def upright(global_orient, up="z"):
    """Root rotations of a pose bank -> the canonical frame (y up, facing +z): AMASS stores z-up
    roots, so rotate -90 degrees about x first; then remove the heading so that the viewpoint
    (elevation, azimuth) is relative to the body's facing direction."""
    from scipy.spatial.transform import Rotation
    R = Rotation.from_rotvec(global_orient)
    if up == "z":
        R = Rotation.from_euler("x", -90, degrees=True) * R
    f = R.apply([0.0, 0.0, 1.0])
    yaw = np.degrees(np.arctan2(f[:, 0], f[:, 2]))
    return (Rotation.from_euler("y", -yaw[:, None], degrees=True) * R).as_rotvec()


def load_pose_bank(path, up="z"):
    """AMASS-style .npz: key `poses` (N x >=72 SMPL axis-angle; N x 156 = SMPL-H, whose hand joints
    are dropped), optional `betas` (N x >=10 or one row). -> global_orient, body_pose, betas."""
    if not os.path.exists(path):
        raise util.UserError(f"pose bank '{path}' not found")
    try:
        z = np.load(path)
    except Exception as e:
        raise util.UserError(f"pose bank '{path}' is not a readable .npz file ({type(e).__name__})")
    if "poses" not in z.files:
        raise util.UserError(f"pose bank '{path}' has no key 'poses' (found {z.files}): expected an AMASS-style "
                               f".npz with poses of shape N x 72 (or more) in SMPL axis-angle")
    poses = np.asarray(z["poses"], dtype=np.float64)
    if poses.ndim != 2 or poses.shape[1] < 72 or len(poses) == 0:
        raise util.UserError(f"pose bank '{path}': 'poses' has shape {poses.shape}, expected N x 72 (or more) "
                             f"SMPL axis-angle")
    body_pose = np.concatenate([poses[:, 3:66], np.zeros((len(poses), 6))], 1) if poses.shape[1] == 156 else poses[:, 3:72]
    up = str(z["up"]) if "up" in z.files else up  # banks this script writes say so: y (the canonical frame)
    betas = np.zeros((len(poses), 10))
    if "betas" in z.files:
        bank_betas = np.asarray(z["betas"], dtype=np.float64)
        bank_betas = np.broadcast_to(bank_betas.reshape(1, -1) if bank_betas.ndim == 1 else bank_betas,
                                     (len(poses), bank_betas.shape[-1]))
        k = min(10, bank_betas.shape[1])
        betas[:, :k] = bank_betas[:, :k]
    return upright(poses[:, :3], up), body_pose, betas

# -----------------------------------------------------------------------------
# the two subcommands: targets, conditions

def make_targets(args):
    t0 = time.time()
    torch.set_num_threads(1)
    size = parse_size(args.size)
    rng = np.random.default_rng(args.seed)
    num_poses, views_per_pose = args.num_poses, args.views_per_pose
    if num_poses < 1 or views_per_pose < 1:
        raise util.UserError("--num-poses and --views-per-pose must be at least 1")
    num_targets = num_poses * views_per_pose
    if args.pose_bank:
        global_orient, body_pose, betas = load_pose_bank(args.pose_bank, args.bank_up)
        pick = rng.choice(len(body_pose), size=num_poses, replace=len(body_pose) < num_poses)
        global_orient, body_pose, betas = global_orient[pick], body_pose[pick], betas[pick]
        pose_ids, source = pick, f"bank:{os.path.basename(args.pose_bank)}"
        kinds = np.array(["bank"] * num_poses)
    else:
        global_orient, body_pose, kinds = procedural_poses(rng, num_poses, args.poses)
        betas, pose_ids, source = np.zeros((num_poses, 10)), np.arange(num_poses), f"procedural-{args.poses}"
    if args.views_from:  # drawn from estimated photos' viewpoints
        params = load_params(args.views_from)
        rows = rng.integers(len(params["elevation"]), size=num_targets)
        elev, azim = params["elevation"][rows].astype(np.float64), params["azimuth"][rows].astype(np.float64)
        args.views = f"from {os.path.basename(args.views_from)}"
    else:
        elev, azim = sample_views(rng, num_targets, args.views)
    pose_of = np.repeat(np.arange(num_poses), views_per_pose)  # target row -> its pose
    model = load_body(args.smpl_model)
    verts, joints = body_forward(model, betas, global_orient, body_pose)
    ren = Renderer(model.body_faces)
    maps_dir = os.path.join(args.out, "maps")
    cam_K, cam_R, cam_t, ids = [], [], [], []
    try:
        for i in tqdm(range(num_targets), desc="targets", unit="set"):
            pose = pose_of[i]
            K, R, t = fit_camera(verts[pose], elev[i], azim[i], size)
            maps, _ = condition_maps(ren, verts[pose], joints[pose], K, R, t, size)
            tid = f"t{i:05d}"
            write_maps(maps_dir, tid, maps)
            cam_K.append(K), cam_R.append(R), cam_t.append(t), ids.append(tid)
    finally:
        ren.delete()
    lines = ["target_id,pose_id,pose_source,pose_kind,elevation,azimuth"]
    lines += [f"{ids[i]},{pose_ids[pose_of[i]]},{source},{kinds[pose_of[i]]},{elev[i]:.2f},{azim[i]:.2f}"
              for i in range(num_targets)]
    util.save_text(os.path.join(args.out, "targets.csv"), "\n".join(lines) + "\n")
    util.save_npz(os.path.join(args.out, "params.npz"), target_id=np.array(ids), pose_id=pose_ids[pose_of],
                  pose_kind=kinds[pose_of], betas=betas[pose_of].astype(np.float32),
                  global_orient=global_orient[pose_of].astype(np.float32), body_pose=body_pose[pose_of].astype(np.float32),
                  elevation=elev.astype(np.float32), azimuth=azim.astype(np.float32),
                  K=np.stack(cam_K).astype(np.float32), R=np.stack(cam_R).astype(np.float32),
                  t=np.stack(cam_t).astype(np.float32), image_size=np.tile(size, (num_targets, 1)).astype(np.int32),
                  model=np.array(model.source))
    print(f"read {'pose bank ' + args.pose_bank if args.pose_bank else 'procedural ' + args.poses + ' poses'}; "
          f"wrote {num_targets} targets ({num_poses} poses x {views_per_pose} views, {args.views} viewpoints, "
          f"{size[1]}x{size[0]}) to {args.out}/targets.csv, params.npz, maps/ in {time.time() - t0:.1f} s")


def pose_joints(model, body_pose):
    """(N, 69) body poses -> (N, 72) joint positions: neutral shape, no root rotation, root joint
    at the origin (what the distance between two poses is measured on). A chunk of meshes at a
    time: all at once would be ~5 GB at Market-1501's 12,936 training poses."""
    n = len(body_pose)
    joints = [j[:, :24] for _, j in body_chunks(model, np.zeros((n, 10)), np.zeros((n, 3)), body_pose)]
    return np.concatenate([j - j[:, :1] for j in joints]).reshape(n, -1) if n else np.zeros((0, 72))


def farthest_poses(candidates, avoid, n):
    """Greedy farthest-point sampling: n rows of candidates (N, D), each next one the candidate
    whose nearest neighbour among avoid (M, D) and the rows already chosen is farthest (RMS over
    the D / 3 joints = Euclidean distance / sqrt(D / 3)). -> (indices, that nearest distance at
    the time each was chosen)."""
    rms = lambda a, b: cdist(a, b) / np.sqrt(a.shape[1] / 3)
    nearest = np.full(len(candidates), np.inf)
    for i in range(0, len(candidates), 4096):  # video frames and training poses may be many: in blocks
        for j in range(0, len(avoid), 4096):
            nearest[i:i + 4096] = np.minimum(nearest[i:i + 4096], rms(candidates[i:i + 4096], avoid[j:j + 4096]).min(1))
    chosen, at = [], []
    for _ in range(min(n, len(candidates))):
        k = int(np.argmax(nearest))
        chosen.append(k), at.append(float(nearest[k]))
        nearest = np.minimum(nearest, rms(candidates, candidates[k:k + 1])[:, 0])
    return np.array(chosen), np.array(at)


def make_bank(args):
    """SMPL fits (01b's <name>.npz files, or a folder of them) -> an AMASS-style pose bank."""
    t0 = time.time()
    files = sorted(os.path.join(d, f) for d in args.smpl if os.path.isdir(d) for f in os.listdir(d)
                   if f.endswith(".npz") and not f.endswith(".keypoints.npz")) + [f for f in args.smpl if not os.path.isdir(f)]
    if not files:
        raise util.UserError(f"no SMPL fits (.npz) in {' '.join(args.smpl)}: run 01b_estimate_smpl.py fit on the frames first")
    body_pose, names = [], []
    for f in files:
        p = load_params(f)
        body_pose.append(np.asarray(p["body_pose"], np.float64))
        frames = p["names"] if "names" in p else [str(i) for i in range(len(p["body_pose"]))]
        names += [f"{os.path.splitext(os.path.basename(f))[0]}/{n}" for n in frames]
    body_pose = np.concatenate(body_pose)
    if not len(body_pose):
        raise util.UserError(f"the SMPL fits in {' '.join(args.smpl)} hold no poses (did 01b skip every frame?)")
    keep, nearest = np.arange(len(body_pose)), np.full(len(body_pose), np.nan)
    if args.choose:
        model = load_body(args.smpl_model)
        avoid = np.zeros((0, 72))
        if args.away_from:
            avoid = pose_joints(model, np.asarray(load_params(args.away_from)["body_pose"], np.float64))
        keep, nearest = farthest_poses(pose_joints(model, body_pose), avoid, args.choose)
    # the fits' root rotation is folded into their cameras: zero here, y up (the canonical frame)
    poses = np.concatenate([np.zeros((len(keep), 3)), body_pose[keep, :69]], 1)
    util.save_npz(args.out, poses=poses.astype(np.float32), up=np.array("y"), names=np.array(names)[keep],
                  nearest_distance=np.asarray(nearest, np.float32))
    print(f"read {len(body_pose)} poses from {len(files)} file(s); wrote {len(keep)} to {args.out}"
          + (f" (farthest-point: nearest distance {nearest.min():.3f}-{nearest.max():.3f} m RMS over the joints, "
             f"away from {args.away_from or 'nothing'})" if args.choose else "") + f" in {time.time() - t0:.1f} s")


def make_conditions(args):
    t0 = time.time()
    torch.set_num_threads(1)
    model = load_body(args.smpl_model)
    smpl_dir = args.smpl or os.path.join(args.data, "smpl")  # real data: the estimation stage's folder
    ren = Renderer(model.body_faces)
    total = 0
    try:
        for split in args.splits:
            params = load_params(os.path.join(smpl_dir, split + ".npz"))
            names = [os.path.splitext(str(n))[0] for n in params["names"]]
            out = os.path.join(args.out, split)
            todo = [i for i, stem in enumerate(names) if args.overwrite or
                    not all(os.path.exists(cond_path(out, stem, k)) for k in COND_KINDS)]
            # the meshes a chunk at a time: all at once would be ~3.5 GB on Market-1501
            bodies = (b for v, j in body_chunks(model, params["betas"][todo], params["global_orient"][todo],
                                                params["body_pose"][todo]) for b in zip(v, j))
            for i, (v, jt) in tqdm(zip(todo, bodies), total=len(todo), desc=f"conditions {split}", unit="img"):
                stored = tuple(int(x) for x in params["image_size"][i])
                size = parse_size(args.size) if args.size else stored
                K = scale_camera(params["K"][i], stored, size)
                maps, _ = condition_maps(ren, v, jt, K, params["R"][i].astype(np.float64),
                                         params["t"][i].astype(np.float64), size)
                write_maps(out, names[i], maps)
            total += len(todo)
            print(f"read {smpl_dir}/{split}.npz ({len(names)} images); wrote {len(todo)} map sets to {out} "
                  f"({len(names) - len(todo)} existed)")
    finally:
        ren.delete()
    print(f"conditions: {total} sets in {time.time() - t0:.1f} s")

# -----------------------------------------------------------------------------

def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smpl-model", default=None, help="SMPL model file (.npz, or .pkl converted by "
                    "tools/convert_smpl_pkl.py); default: the open body assets/open_body.npz")
    ap.add_argument("--size", default=None, help="WxH of the maps (the paper's 192x384, the demo's 64x128)")
    sub = ap.add_subparsers(dest="cmd")

    c = sub.add_parser("conditions", help="maps aligned to each image of a data set with smpl/<split>.npz")
    c.add_argument("--data", default="runs/demo/world", help="Market-1501-layout root whose images get maps")
    c.add_argument("--out", default="runs/demo/conditions",
                   help="conditions root: <out>/<split>/<stem>.{depth,normal,skeleton}.png")
    c.add_argument("--splits", nargs="+", default=["bounding_box_train"], help="split folders to render")
    c.add_argument("--overwrite", action="store_true", help="render again the map sets that exist")
    c.add_argument("--size", dest="sub_size", default=None, help="WxH of the maps (default: each image's own size)")
    c.add_argument("--smpl", default=None, help="folder with <split>.npz (default <data>/smpl; real data: the "
                   "--out of 01b_estimate_smpl.py, so the data set folder is never written to)")

    t = sub.add_parser("targets", help="sample a target set (poses x viewpoints) and render its maps")
    t.add_argument("--out", required=True, help="e.g. runs/demo/targets/ood_uniform")
    t.add_argument("--poses", choices=["id", "ood"], default="ood",
                   help="procedural source: id = walking/standing like the train split, ood = out-of-distribution")
    t.add_argument("--pose-bank", default=None, help="AMASS-style .npz (key poses, N x >=72) instead of --poses")
    t.add_argument("--bank-up", choices=["z", "y"], default="z", help="up axis of the bank's root (AMASS: z)")
    t.add_argument("--views", choices=["uniform", "train"], default="uniform",
                   help="uniform = elevation U[0,30] x azimuth U[0,360); train = like the demo train cameras")
    t.add_argument("--views-from", default=None, help="draw the viewpoints from a per-image SMPL file's elevation and "
                   "azimuth (e.g. the training photos' fits) instead of --views")
    t.add_argument("--num-poses", type=int, default=20, help="poses drawn")
    t.add_argument("--views-per-pose", type=int, default=5, help="viewpoints each pose is rendered from")
    t.add_argument("--seed", type=int, default=0, help="seeds the poses and viewpoints")
    t.add_argument("--size", dest="sub_size", default=None, help="WxH of the maps (default 192x384, the paper's)")
    b = sub.add_parser("bank", help="SMPL fits of video frames -> a pose bank (the paper's dance-video poses)")
    b.add_argument("--smpl", nargs="+", required=True, help="01b's per-video .npz files, or folders of them")
    b.add_argument("--out", required=True, help="the bank .npz (AMASS-style: poses N x 72, for targets --pose-bank)")
    b.add_argument("--choose", type=int, default=0, help="keep this many poses by farthest-point sampling (paper: "
                   "20); 0: keep all")
    b.add_argument("--away-from", default=None, help="a per-image SMPL file (the training photos' fits) whose poses "
                   "the chosen ones should differ from")
    for p in (c, t, b):
        p.add_argument("--smpl-model", dest="sub_smpl_model", default=None, help="as the top-level --smpl-model")
    return ap


def parse_args(argv=None):
    """-> args of one subcommand (cmd: conditions or targets), the top-level --size and --smpl-model
    merged in; no subcommand: the help, then a one-line error."""
    ap = build_parser()
    args = ap.parse_args(argv)
    args.size = getattr(args, "sub_size", None) or args.size
    args.smpl_model = getattr(args, "sub_smpl_model", None) or args.smpl_model
    if args.cmd is None:
        ap.print_help()
        raise util.UserError("give a subcommand: conditions, targets or bank (the demo world: demo/world.py)")
    if args.cmd == "bank" and args.choose < 0:
        raise util.UserError(f"--choose {args.choose}: must be 0 (keep all) or more")
    if args.cmd == "targets":
        args.size = args.size or "192x384"
    if args.size:
        parse_size(args.size)  # (checked now, before anything is rendered)
    (util.check_output_file if args.cmd == "bank" else util.check_output_dir)(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "targets":
        return make_targets(args)
    if args.cmd == "bank":
        return make_bank(args)
    make_conditions(args)


if __name__ == "__main__":
    util.run_main(main)
