"""
The built-in synthetic Re-ID world ("demo"): a small Re-ID data set rendered from the open body,
in Market-1501 layout, so that the whole pipeline runs on any machine without a download.

  python demo/world.py --out runs/demo/world [--smoke | --small] [--train-ids 120 --test-ids 100]

A "hard identity" world: a small clothing palette, so people are told apart by view-dependent
details (chest logo, back patch, backpack, stripes, sleeve and trouser length, hair) as well as
shape and colour. The TRAIN split is biased the way the paper describes real data: three cameras,
a narrow elevation band (8-14 degrees), people walking towards or away from the camera or
standing. Two test splits: query/ + bounding_box_test/ from the same cameras (like Market), and
shifted/ with diverse viewpoints (elevation 0-30, any azimuth) and out-of-distribution poses.
Every image has its SMPL parameters and camera in smpl/<split>.npz (the format 01b writes for real
photos), and identities.json holds every person and camera style, so any (identity, pose,
viewpoint) can be rendered as ground truth later (demo/oracle.py).
"""
import os
import sys
import json
import time
import argparse

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
from body import (OPEN_BODY, JOINTS, load_body, body_forward, fit_camera, scale_camera, parse_size,  # noqa: E402
                  procedural_poses, Renderer)

TOPS = [(190, 35, 35), (35, 60, 150), (225, 225, 220), (40, 40, 44), (60, 125, 65), (140, 140, 140)]
BOTTOMS = [(35, 35, 45), (45, 65, 120), (125, 105, 75), (150, 150, 150)]
SHOES = [(25, 25, 25), (225, 225, 225), (105, 70, 45)]
SKINS = [(245, 208, 170), (230, 184, 135), (205, 150, 105), (165, 112, 70), (110, 72, 45)]
HAIRS = [(25, 20, 15), (75, 50, 30), (150, 110, 65), (195, 165, 110), (115, 115, 115)]
ACCENTS = [(240, 200, 20), (20, 170, 200), (230, 110, 20), (150, 30, 160), (250, 250, 250), (200, 30, 30)]
TRAIN_CAMS = {1: 9.0, 2: 11.0, 3: 13.0}   # camera -> elevation (degrees), +-1 jitter per image
SHIFTED_CAMS = (4, 5, 6)                   # diverse viewpoints and poses
ORACLE_CAM = 9                             # the oracle's own camera style: a look no split has


def sample_identity(rng, pid, split):
    c = lambda pal: [int(v) for v in pal[rng.integers(len(pal))]]
    accent = lambda: c(ACCENTS)
    b = np.zeros(10)
    b[:4] = rng.normal(0, [1.0, 0.8, 0.6, 0.5])
    return dict(pid=int(pid), split=split, betas=[round(float(v), 4) for v in b], skin=c(SKINS), hair=c(HAIRS),
                hair_style="long" if rng.random() < 0.3 else "short", top=c(TOPS),
                sleeve="short" if rng.random() < 0.45 else "long",
                stripes=accent() if rng.random() < 0.3 else None,
                logo=dict(color=accent(), shape=str(rng.choice(["square", "circle", "bar"]))) if rng.random() < 0.5 else None,
                back_patch=accent() if rng.random() < 0.35 else None,
                bottom=c(BOTTOMS), trousers="shorts" if rng.random() < 0.25 else "long", shoes=c(SHOES),
                backpack=accent() if rng.random() < 0.35 else None)


def camera_style(rng, name):
    """Background + light of one camera (or of the oracle's new camera style)."""
    d = rng.normal(0, 1, 3)
    d = np.array([d[0] * 0.6, -abs(d[1]) - 0.6, -abs(d[2]) - 0.3])  # from above, towards the camera side
    return dict(name=name, bg_seed=int(rng.integers(1 << 30)), light=list(np.round(d / np.linalg.norm(d), 4)),
                ambient=round(float(rng.uniform(0.35, 0.55)), 3), diffuse=round(float(rng.uniform(0.45, 0.7)), 3),
                tint=[round(float(v), 3) for v in rng.uniform(0.85, 1.1, 3)])


def background(style, size):
    """A procedural street/corridor backdrop (1.5x the image, cropped per image): wall with
    windows/doors/signs above a floor, blurred like a surveillance camera."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(style["bg_seed"])
    H, W = int(size[0] * 1.5), int(size[1] * 1.5)
    img = np.zeros((H, W, 3))
    horizon = int(H * rng.uniform(0.55, 0.72))
    muted = lambda lo, hi: rng.uniform(lo, hi) * (1 + rng.uniform(-0.15, 0.15, 3))  # greys/browns, not toys
    wall, floor = muted(70, 190), muted(50, 140)
    img[:horizon] = wall
    img[horizon:] = floor * np.linspace(0.8, 1.15, H - horizon)[:, None, None]
    for _ in range(rng.integers(4, 10)):
        h, w = rng.integers(H // 10, H // 2), rng.integers(W // 8, W // 2)
        y, x = rng.integers(0, max(1, horizon - h // 2)), rng.integers(-w // 2, W)
        img[y:y + h, max(0, x):x + w] = muted(30, 220)
    for y in range(horizon, H, max(2, H // 12)):  # floor tiles
        img[y] *= 0.85
    img = gaussian_filter(img, sigma=(size[0] / 128, size[0] / 128, 0))
    return np.clip(img, 0, 255)


class World:
    """Everything needed to render a demo identity: the body (with optional backpack vertices),
    per-vertex clothing regions, camera styles, one renderer. Built in each worker process."""

    def __init__(self, meta, smpl_model=None):
        self.meta = meta
        self.styles = {s["name"]: s for s in meta["styles"]}
        self.ids = {int(p["pid"]): p for p in meta["identities"]}
        base = load_body(smpl_model)
        v0 = base.v_template.numpy().astype(np.float64)
        J0 = (base.J_regressor.numpy() @ v0)
        w = base.lbs_weights.numpy()
        grp = w.argmax(1)
        self.V = len(v0)
        box_v, box_f = self._backpack(v0, J0, grp)
        sd = base.shapedirs.numpy()
        near = np.argmin(np.linalg.norm(v0 - box_v.mean(0), axis=1))
        extra = dict(v_template=box_v, shapedirs=np.repeat(sd[near:near + 1], len(box_v), 0),
                     posedirs=np.zeros((len(box_v), 3, 207)),
                     weights=np.eye(24)[np.full(len(box_v), JOINTS.index("spine2"))])
        self.model = load_body(smpl_model, extra=extra)
        self.body_faces = self.model.body_faces
        self.pack_faces = box_f + self.V
        self.regions = self._regions(v0, J0, grp, base)
        self.renderer = None
        self.bgs = {}

    @staticmethod
    def _backpack(v0, J0, grp):
        torso = np.isin(grp, [3, 6, 9]) & (np.abs(v0[:, 0]) < 0.1)
        zb = v0[torso, 2].min()
        y0, y1 = J0[3, 1] - 0.02, J0[9, 1] + 0.06
        lo, hi = np.array([-0.15, y0, zb - 0.16]), np.array([0.15, y1, zb + 0.01])
        corners = lambda idx: [[(lo, hi)[b][a] for a, b in enumerate(c)] for c in idx]
        quads = [[(0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)], [(0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)],
                 [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0)], [(1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1)],
                 [(0, 1, 0), (0, 1, 1), (1, 1, 1), (1, 1, 0)], [(0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)]]
        verts, faces = [], []
        for q in quads:  # 4 own vertices per side: flat-shaded box, outward winding
            k = len(verts)
            verts += corners(q)
            faces += [[k, k + 1, k + 2], [k, k + 2, k + 3]]
        return np.array(verts), np.array(faces)

    def _regions(self, v, J, grp, base):
        """Clothing regions of every vertex, from the T-posed template (same for every shape)."""
        x, y, z = v[:, 0], v[:, 1], v[:, 2]
        ids = lambda *names: np.isin(grp, [JOINTS.index(n) for n in names])
        eyes_y = base.v_template.numpy()[[base.vertex_joint_selector.extra_joints_idxs[1].item()], 1][0]
        head = ids("head") | (ids("neck") & (y > J[12, 1] + 0.03))
        r = {}
        r["hair_short"] = head & ((y > eyes_y + 0.035) | ((z < J[15, 2] - 0.03) & (y > J[12, 1] + 0.06)))
        r["hair_long"] = head & ((y > eyes_y + 0.035) | (z < J[15, 2] - 0.01))
        r["skin"] = head | ids("l_wrist", "r_wrist", "l_hand", "r_hand")
        waist = J[0, 1] + 0.07
        torso = ids("pelvis", "spine1", "spine2", "spine3", "neck", "l_collar", "r_collar") & ~head
        r["top"] = torso & (y > waist)
        r["neck_skin"] = torso & (y > J[12, 1] - 0.02) & (np.abs(x) < 0.06)
        arms = ids("l_shoulder", "r_shoulder", "l_elbow", "r_elbow")
        r["sleeve_short"] = arms & (np.abs(x) < J[16, 0] + 0.12)
        r["sleeve_long"] = arms
        r["arms"] = arms
        legs = ids("l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle") | (torso & (y <= waist))
        r["legs"] = legs
        r["shorts"] = legs & (y > J[4, 1] + 0.08)
        r["shoes"] = ids("l_ankle", "r_ankle", "l_foot", "r_foot") & (y < J[7, 1] + 0.04)
        front, back = z > J[6, 2], z < J[6, 2]
        chest = r["top"] & front & (np.abs(x) < 0.09) & (np.abs(y - (J[6, 1] + J[9, 1]) / 2 - 0.02) < 0.07)
        r["logo_square"] = chest
        r["logo_circle"] = chest & (x ** 2 + (y - (J[6, 1] + J[9, 1]) / 2 - 0.02) ** 2 < 0.07 ** 2)
        r["logo_bar"] = r["top"] & front & (np.abs(y - J[9, 1]) < 0.025)
        r["back_patch"] = r["top"] & back & (np.abs(x) < 0.1) & (np.abs(y - J[6, 1]) < 0.09)
        r["stripes"] = (r["top"] | arms) & (np.floor((y - waist) / 0.05) % 2 == 1)
        r["top_y"] = y
        return r

    def albedo(self, ident):
        """(V + backpack,3) vertex colours in [0,1] of one identity."""
        r = self.regions
        col = np.zeros((self.V, 3))
        col[:] = ident["skin"]
        sleeve = r["sleeve_short"] if ident["sleeve"] == "short" else r["sleeve_long"]
        col[r["legs"] & (r["shorts"] if ident["trousers"] == "shorts" else True)] = ident["bottom"]
        col[r["top"] | sleeve] = ident["top"]
        if ident["stripes"] is not None:
            col[r["stripes"] & (r["top"] | sleeve)] = ident["stripes"]
        col[r["neck_skin"]] = ident["skin"]
        if ident["logo"] is not None:
            col[r["logo_" + ident["logo"]["shape"]]] = ident["logo"]["color"]
        if ident["back_patch"] is not None:
            col[r["back_patch"]] = ident["back_patch"]
        col[r["shoes"]] = ident["shoes"]
        col[r["hair_" + ident["hair_style"]]] = ident["hair"]
        pack = np.tile(np.asarray(ident["backpack"] or (0, 0, 0), float), (len(self.pack_faces) * 2, 1))
        return np.concatenate([col, pack]) / 255.0

    def render(self, ident, global_orient, body_pose, elevation, azimuth, style, size, seed, camera=None,
               posed=None):
        """Ground truth image of identity `ident` in a pose, seen from (elevation, azimuth) by camera
        `style`. camera=(K, R, t) to reuse a camera (e.g. a target set's), else fitted like a Re-ID
        crop. Returns rgb (H,W,3) uint8, foreground mask (H,W) bool, (K, R, t)."""
        if self.renderer is None:
            torch.set_num_threads(1)
            self.renderer = Renderer(self.body_faces)
        if posed is None:
            posed = body_forward(self.model, np.asarray([ident["betas"]]), global_orient[None], body_pose[None])[0][0]
        verts = posed
        H, W = size
        K, R, t = camera if camera is not None else fit_camera(verts[:self.V], elevation, azimuth, size)
        faces = np.concatenate([self.body_faces, self.pack_faces]) if ident["backpack"] else self.body_faces
        st = self.styles[style]
        n = self.renderer.vertex_normals(verts, faces)
        light = R.T @ np.asarray(st["light"])  # the light is fixed to the camera: same look for every person
        shade = st["ambient"] + st["diffuse"] * np.clip(n @ -light, 0, None)
        col = np.clip(self.albedo(ident) * shade[:, None] * np.asarray(st["tint"]), 0, 1)
        S = 2  # render at 2x and average: antialiased edges like a real (blurry) crop
        rgb, z = self.renderer.render(verts, scale_camera(K, size, (S * H, S * W)), R, t, (S * H, S * W),
                                      faces=faces, colors=col)
        alpha = (z > 0).reshape(H, S, W, S).mean((1, 3))[..., None]
        rgb = rgb[..., :3].astype(np.float64).reshape(H, S, W, S, 3).mean((1, 3)) / np.maximum(alpha, 1e-6)
        rng = np.random.default_rng(seed)
        key = (style, size)
        if key not in self.bgs:
            self.bgs[key] = background(st, size)
        bg = self.bgs[key]
        y0, x0 = rng.integers(0, bg.shape[0] - H + 1), rng.integers(0, bg.shape[1] - W + 1)
        bg = bg[y0:y0 + H, x0:x0 + W] * rng.uniform(0.9, 1.1)
        img = alpha * rgb + (1 - alpha) * bg + rng.normal(0, 3.0, (H, W, 3))
        return np.clip(img, 0, 255).round().astype(np.uint8), alpha[..., 0] >= 0.5, (K, R, t)

    def close(self):
        if self.renderer is not None:
            self.renderer.delete()
            self.renderer = None


def world_jobs(meta, rng):
    """Every image of the world as a job (all random choices made here, in one fixed order, so the
    world does not depend on the number of workers). -> {split folder: [job]}"""
    c = meta["config"]
    jobs = {"bounding_box_train": [], "query": [], "bounding_box_test": [],
            "shifted/query": [], "shifted/bounding_box_test": []}
    frame = {}

    def add(folder, ident, cam, kind_source, view):
        go, bp, kinds = procedural_poses(rng, 1, kind_source)
        f = frame[cam] = frame.get(cam, 0) + 1
        jobs[folder].append(dict(name=f"{ident['pid']:04d}_c{cam}s1_{f:06d}_00.jpg", pid=ident["pid"], camera=cam,
                                 style=f"c{cam}", global_orient=go[0], body_pose=bp[0], pose_kind=str(kinds[0]),
                                 elevation=float(view[0]), azimuth=float(view[1]), seed=int(rng.integers(1 << 31))))

    for ident in meta["identities"]:
        k = c["images_per_camera"]
        for cam, elev in TRAIN_CAMS.items():
            for i in range(k):
                e = elev + rng.uniform(-1, 1)
                a = (rng.integers(0, 2) * 180 + rng.normal(0, 10)) % 360  # walking towards or away
                folder = "bounding_box_train" if ident["split"] == "train" else ("query" if i == 0 else "bounding_box_test")
                add(folder, ident, cam, "id", (e, a))
        if ident["split"] == "test":
            for cam in SHIFTED_CAMS:
                for i in range(k):
                    e, a = rng.uniform(0, 30), rng.uniform(0, 360)
                    add("shifted/query" if i == 0 else "shifted/bounding_box_test", ident, cam,
                        "ood" if rng.random() < 0.5 else "id", (e, a))
    return jobs


_WORLD = None   # one World (and one renderer) per worker process
_WORLD_ARGS = None  # (meta, smpl_model), set before the worker pool forks


def _render_world_chunk(args):
    root, jobs = args
    global _WORLD
    if _WORLD is None:
        torch.set_num_threads(1)
        _WORLD = World(*_WORLD_ARGS)
    H, W = _WORLD.meta["config"]["size"]
    ident = _WORLD.ids[jobs[0]["pid"]]  # a chunk holds one identity: one batched SMPL forward
    verts, joints = body_forward(_WORLD.model, np.tile(ident["betas"], (len(jobs), 1)),
                                 np.stack([j["global_orient"] for j in jobs]), np.stack([j["body_pose"] for j in jobs]))
    out = []
    for j, v in zip(jobs, verts):
        img, mask, (K, R, t) = _WORLD.render(ident, None, None, j["elevation"], j["azimuth"], j["style"], (H, W),
                                             j["seed"], posed=v)
        util.save_image(os.path.join(root, j["folder"], j["name"]), img)
        out.append((j["folder"], j["name"], K, R, t))
    return out


def build_world(args):
    t0 = time.time()
    H, W = parse_size(args.size)
    n_train, n_test, k = args.train_ids, args.test_ids, args.images_per_camera
    if args.small:
        n_train, n_test, k = 6, 4, 2
    elif args.smoke:
        n_train, n_test, k = 30, 20, 3
    if min(n_train, n_test, k) < 1 or (k < 2):
        raise util.UserError("the world needs at least 1 train id, 1 test id and 2 images per camera "
                               "(one query + one gallery image)")
    rng = np.random.default_rng(args.seed)
    idents = [sample_identity(rng, p, "train") for p in range(1, n_train + 1)]
    idents += [sample_identity(rng, p, "test") for p in range(n_train + 1, n_train + n_test + 1)]
    styles = [camera_style(rng, f"c{cam}") for cam in (*TRAIN_CAMS, *SHIFTED_CAMS, ORACLE_CAM)]
    meta = dict(format="diff-id demo world v1", seed=args.seed, model=os.path.basename(args.smpl_model or OPEN_BODY),
                config=dict(size=[H, W], train_ids=n_train, test_ids=n_test, images_per_camera=k,
                            train_cameras={str(c): e for c, e in TRAIN_CAMS.items()},
                            shifted_cameras=list(SHIFTED_CAMS), oracle_style=f"c{ORACLE_CAM}"),
                styles=styles, identities=idents)
    old = os.path.join(args.out, "identities.json")
    if os.path.exists(old) and not args.overwrite:
        with open(old) as f:
            prev = json.load(f)
        if prev.get("seed") == meta["seed"] and prev.get("config") == json.loads(json.dumps(meta["config"])):
            print(f"world {args.out} exists with the same seed and size: kept (--overwrite rebuilds it)")
            return
    jobs = world_jobs(meta, rng)
    chunks = []
    for folder, js in jobs.items():
        by_pid = {}
        for j in js:
            j["folder"] = folder
            by_pid.setdefault(j["pid"], []).append(j)
        chunks += [(args.out, v) for v in by_pid.values()]
    global _WORLD_ARGS
    _WORLD_ARGS = (meta, args.smpl_model)
    n = sum(len(v) for v in jobs.values())
    print(f"world: {n_train} train ids, {n_test} test ids, {k} images per camera and id, {H}x{W} px, "
          f"{n} images, {args.workers} worker(s) -> {args.out}")
    results = []
    if args.workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.workers) as pool:
            for r in tqdm(pool.imap(_render_world_chunk, chunks), total=len(chunks), desc="world", unit="id"):
                results += r
    else:
        for ch in tqdm(chunks, desc="world", unit="id"):
            results += _render_world_chunk(ch)
        global _WORLD
        if _WORLD is not None:
            _WORLD.close()
            _WORLD = None
    cams = {(f, nm): (K, R, t) for f, nm, K, R, t in results}
    for folder, js in jobs.items():
        js = sorted(js, key=lambda j: j["name"])
        root, split = (os.path.join(args.out, "shifted"), folder.split("/")[1]) if "/" in folder else (args.out, folder)
        K, R, t = (np.stack(a) for a in zip(*[cams[(folder, j["name"])] for j in js]))
        pid2b = {p["pid"]: p["betas"] for p in idents}
        util.save_npz(os.path.join(root, "smpl", split + ".npz"), names=np.array([j["name"] for j in js]),
                        betas=np.array([pid2b[j["pid"]] for j in js], np.float32),
                        global_orient=np.stack([j["global_orient"] for j in js]).astype(np.float32),
                        body_pose=np.stack([j["body_pose"] for j in js]).astype(np.float32),
                        elevation=np.array([j["elevation"] for j in js], np.float32),
                        azimuth=np.array([j["azimuth"] for j in js], np.float32),
                        K=K.astype(np.float32), R=R.astype(np.float32), t=t.astype(np.float32),
                        image_size=np.tile([H, W], (len(js), 1)).astype(np.int32),
                        camera=np.array([j["camera"] for j in js], np.int32),
                        pose_kind=np.array([j["pose_kind"] for j in js]), model=np.array(meta["model"]))
    util.save_json(os.path.join(args.out, "identities.json"), meta)
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs) / 1e6
    print(f"wrote {n} images + smpl/*.npz sidecars + identities.json under {args.out}: "
          f"{size_mb:.1f} MB in {time.time() - t0:.0f} s")
    for folder, js in jobs.items():
        print(f"  {folder}: {len(js)} images, {len({j['pid'] for j in js})} ids")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo/world")
    ap.add_argument("--train-ids", type=int, default=120)
    ap.add_argument("--test-ids", type=int, default=100)
    ap.add_argument("--images-per-camera", type=int, default=4, help="per id and camera (3 train cameras, 3 shifted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--overwrite", action="store_true", help="rebuild even if the same world exists")
    ap.add_argument("--small", action="store_true", help="tiny world for tests (6 train / 4 test ids, 2 per camera)")
    ap.add_argument("--smoke", action="store_true", help="smoke-test scale (30 train / 20 test ids, 3 per camera)")
    ap.add_argument("--size", default="64x128", help="WxH of the images (64x128, like Market-1501)")
    ap.add_argument("--smpl-model", default=None, help="SMPL model file; default: the open body assets/open_body.npz")
    build_world(ap.parse_args())


if __name__ == "__main__":
    util.run_main(main)
