"""
Stage 01b: SMPL parameters + camera for real Re-ID photos, written as the same per-image
file the demo world writes (docs/formats.md), so '01_render_smpl.py conditions' and 'figures' run
unchanged on real data. Docs: docs/estimate.md.

  python 01b_estimate_smpl.py keypoints --data data/market1501 --out runs/market1501/smpl   # ViTPose, COCO-17
  python 01b_estimate_smpl.py fit       --out runs/market1501/smpl                         # SMPLify-style fit
  python 01_render_smpl.py conditions   --data data/market1501 --smpl runs/market1501/smpl --out runs/market1501/conditions
  python 01b_estimate_smpl.py import    --params hmr2.npz --split bounding_box_train --out runs/market1501/smpl
  python 01b_estimate_smpl.py evaluate  --world runs/demo/world --noise 0 2 4                # against the truth

Keypoints: transformers' VitPoseForPoseEstimation on the whole image (a Re-ID image is already a
person crop: no detector). Fit: SMPL joints reduced to the 24 joints + 5 face points (smplx's own
lbs), camera at a fixed focal length (default: the demo world's, the person filling the crop at
CAM_DISTANCE), several initial orientations per image, Adam, the lowest loss kept. The root
rotation is then folded into the camera (global_orient = 0, the body upright in its canonical
frame, like the world's), and (elevation, azimuth) is that camera seen from the body centre.
"""
import os
import time
import argparse

import numpy as np
import torch
from tqdm import tqdm

import util
from body import (COCO17_TO_OPENPOSE18, OPENPOSE18_SMPL, SMPL_JOINTS, load_body, body_forward, look_at,
                  project, viewpoint, load_params)

DEFAULT_VITPOSE = "usyd-community/vitpose-base-simple"
# focal length / image height of the fit's camera: the demo world's median (FILL * CAM_DISTANCE / the
# body's height: a person filling the crop seen from CAM_DISTANCE). With a person-filling crop only
# focal/distance is observable; fixing the focal like the world does puts the camera at the world's
# distance with its mild perspective, which is what the (weak) elevation cue lives on.
FOCAL = 4.4
# loss weights, against a reprojection error measured in 1% of the image height: pose prior from W_POSE
# annealed to W_POSE * W_END, betas, spine/neck/collar joints (x the L2), elevation prior. Tuned on
# the demo world (docs/estimate.md): a T-pose-centred prior or a strong final prior cost accuracy
W_POSE, W_END, W_BETAS, W_SPINE, W_EL = 30.0, 0.05, 10.0, 4.0, 1.0
COCO_SMPL = [OPENPOSE18_SMPL[i] for i in COCO17_TO_OPENPOSE18]  # COCO-17 -> index into SMPL joints + face
# joints the fit moves: the rest (wrists, hands, ankles, feet) change no COCO keypoint
FREE = ("l_hip", "r_hip", "spine1", "l_knee", "r_knee", "spine2", "spine3", "neck", "l_collar", "r_collar",
        "head", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow")


def jidx(name, axis):
    """Index into the 69-d body pose of joint `name`'s axis-angle component (0 x, 1 y, 2 z)."""
    return (SMPL_JOINTS.index(name) - 1) * 3 + axis

# -----------------------------------------------------------------------------
# 2D keypoints: ViTPose through transformers


def image_list(data, split):
    folder = os.path.join(data, split)
    if not os.path.isdir(folder):
        raise util.UserError(f"image folder '{folder}' not found (expected <data>/{split}/ with .jpg/.png images)")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(util.IMAGE_EXTS))
    if not names:
        raise util.UserError(f"no images (.jpg/.png) in '{folder}'")
    return folder, names


def readable_images(folder, names):
    """-> (the names whose image decodes, the names whose image does not), with a warning for each of those."""
    import warnings
    from PIL import Image
    ok, bad = [], []
    for n in names:
        try:
            with Image.open(os.path.join(folder, n)) as im:
                im.load()
            ok.append(n)
        except Exception as e:
            bad.append(n)
            warnings.warn(f"skipping unreadable image '{os.path.join(folder, n)}' ({type(e).__name__}: {e})")
    return ok, bad


def load_vitpose(model_id, device):
    from transformers import VitPoseImageProcessor, VitPoseForPoseEstimation
    try:
        proc = VitPoseImageProcessor.from_pretrained(model_id)
        model = VitPoseForPoseEstimation.from_pretrained(model_id).to(device).eval()
    except Exception as e:
        raise util.UserError(f"cannot load ViTPose '{model_id}' ({type(e).__name__}: {str(e).splitlines()[0][:120]}):"
                               f" give a local folder (save_pretrained) or a hub id such as {DEFAULT_VITPOSE}")
    if model.config.num_labels != 17:
        raise util.UserError(f"ViTPose '{model_id}' predicts {model.config.num_labels} keypoints: a COCO-17 "
                               f"checkpoint is needed (e.g. {DEFAULT_VITPOSE})")
    return proc, model


@torch.no_grad()
def vitpose_keypoints(proc, model, images, device):
    """PIL images (each a person crop) -> (N,17,3) COCO-17 [x, y, score] in the image's pixels."""
    boxes = [[[0.0, 0.0, float(im.width), float(im.height)]] for im in images]  # whole image = person box
    inputs = proc(images, boxes=boxes, return_tensors="pt")
    kw = {}
    if getattr(model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose+ (MoE): expert 0 = COCO
        kw["dataset_index"] = torch.zeros(len(images), dtype=torch.long, device=device)
    out = model(inputs["pixel_values"].to(device), **kw)
    res = proc.post_process_pose_estimation(out, boxes=boxes)
    return np.stack([np.concatenate([r[0]["keypoints"].numpy().reshape(17, 2),
                                     r[0]["scores"].numpy().reshape(17, 1)], 1) for r in res]).astype(np.float32)


def run_keypoints(args):
    from PIL import Image
    t0 = time.time()
    splits = {split: image_list(args.data, split) for split in args.splits}  # (before the model loads)
    device = util.pick_device(args.device)
    proc, model = load_vitpose(args.model, device)
    print(f"ViTPose '{args.model}' on {device}, batch {args.batch_size}")
    for split, (folder, names) in splits.items():
        # images that cannot be decoded are skipped with a warning naming them, counted, and listed
        # in the file (key unreadable, when there are any), as 04 and 05 skip them
        names, unreadable = readable_images(folder, names)
        if not names:
            raise util.UserError(f"none of the {len(unreadable)} images in '{folder}' can be read")
        kps, sizes = [], []
        for start in tqdm(range(0, len(names), args.batch_size), desc=f"keypoints {split}", unit="batch"):
            ims = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names[start:start + args.batch_size]]
            kps.append(vitpose_keypoints(proc, model, ims, device))
            sizes += [(im.height, im.width) for im in ims]
        path = os.path.join(args.out, f"{split}.keypoints.npz")
        util.save_npz(path, names=np.array(names), keypoints=np.concatenate(kps),
                        image_size=np.array(sizes, np.int32), model=np.array(args.model),
                        **({"unreadable": np.array(unreadable)} if unreadable else {}))
        print(f"read {len(names)} images from {folder}" + (f" (skipped {len(unreadable)} unreadable)" if unreadable else "")
              + f"; wrote {path}")
    print(f"keypoints: {time.time() - t0:.1f} s")

# -----------------------------------------------------------------------------
# the SMPLify-style fit


def keypoint_body(model):
    """SMPL reduced to what COCO keypoints see, for smplx's own lbs(): the 24 joints as 'vertices'
    (J_regressor @ template and its shape directions; J_regressor becomes the identity) + the 5 face
    vertices. Same joints as the full model, a small fraction of the points to skin."""
    face = model.vertex_joint_selector.extra_joints_idxs[:5]  # nose, r_eye, l_eye, r_ear, l_ear
    regressor = model.J_regressor
    n_pose_features = model.posedirs.shape[0]
    face_posedirs = model.posedirs.view(n_pose_features, -1, 3)[:, face]
    return dict(v_template=torch.cat([regressor @ model.v_template, model.v_template[face]]),
                shapedirs=torch.cat([torch.einsum("jv,vcb->jcb", regressor, model.shapedirs), model.shapedirs[face]]),
                posedirs=torch.cat([torch.zeros(n_pose_features, 24, 3), face_posedirs], 1).reshape(n_pose_features, -1),
                J_regressor=torch.cat([torch.eye(24), torch.zeros(24, 5)], 1),
                parents=model.parents, lbs_weights=torch.cat([torch.eye(24), model.lbs_weights[face]]))


def body_points(keypoint_model, betas, global_orient, body_pose):
    """(M,29,3): the 24 SMPL joints + 5 face points (indices as OPENPOSE18_SMPL)."""
    import smplx
    verts, joints = smplx.lbs.lbs(betas, torch.cat([global_orient, body_pose], 1), **keypoint_model)
    return torch.cat([joints, verts[:, 24:]], 1)


def rotmat(rv):
    """Batched axis-angle (M,3) -> rotation matrices (M,3,3), differentiable (smplx's Rodrigues)."""
    import smplx
    return smplx.lbs.batch_rodrigues(rv)


def rotvec(R):
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(R).as_rotvec()


# the prior's centre: arms hanging (the T-pose of the model file is no pose a person stands in);
# centred on zero instead, the fit twists the body to keep the arms up
REST = torch.zeros(69)
REST[jidx("l_shoulder", 2)], REST[jidx("r_shoulder", 2)] = -1.2, 1.2
POSE_W = torch.ones(69)
for _n in ("l_knee", "r_knee"):
    POSE_W[jidx(_n, 1)] = POSE_W[jidx(_n, 2)] = 10.0
for _n in ("l_elbow", "r_elbow"):
    POSE_W[jidx(_n, 0)] = POSE_W[jidx(_n, 2)] = 10.0
for _n in ("spine1", "spine2", "spine3", "neck", "l_collar", "r_collar"):
    POSE_W[jidx(_n, 0):jidx(_n, 0) + 3] = W_SPINE


def pose_prior(body_pose):
    """Priors that need no downloaded file: L2 on the free joints (stronger on the axes a knee or an
    elbow cannot turn about), and SMPLify's bending penalty on knees and elbows that bend backwards."""
    l2 = (body_pose - REST.to(body_pose.device)).square()
    hinge = lambda i, sign: torch.relu(sign * body_pose[:, i]).square()
    bend = (hinge(jidx("l_knee", 0), -1) + hinge(jidx("r_knee", 0), -1) +     # knee x > 0 = flex
            hinge(jidx("l_elbow", 1), 1) + hinge(jidx("r_elbow", 1), -1))     # l y < 0 / r y > 0 = flex
    return (l2 * POSE_W).sum(1) + 10.0 * bend


def fit_smpl(keypoint_model, kp, conf, focal=FOCAL, inits=8, keep=2, steps=(40, 120), elevation0=10.0,
             elevation_prior=(15.0, 10.0), lr=0.05, device="cpu"):
    """Batched SMPLify-style fit. kp (N,17,2) COCO-17 keypoints in units of the image height with the
    origin at the image centre, conf (N,17) weights (0 = unseen). The camera is at the origin looking
    along +z with focal `focal` (same units); the body is placed by global_orient + translation.
    Every image starts from `inits` orientations (cameras around the body at elevation0, like
    look_at) and the lowest final loss wins. steps: Adam steps of (orientation-only, full) fits.
    -> dict global_orient (N,3), body_pose (N,69), betas (N,10), t (N,3), loss (N,), pts (N,29,3) camera frame."""
    num_images = len(kp)
    keypoint_model = {k: v.to(device) for k, v in keypoint_model.items()}
    kp = torch.as_tensor(kp, dtype=torch.float32, device=device).repeat_interleave(inits, 0)
    kp_weight = torch.as_tensor(conf, dtype=torch.float32, device=device).repeat_interleave(inits, 0)
    kp_weight = kp_weight / kp_weight.sum(1, keepdim=True).clamp(min=1e-6)
    num_starts = num_images * inits
    start_orients = np.stack([rotvec(look_at(elevation0, a, np.zeros(3))[0]) for a in np.arange(inits) * 360.0 / inits])
    global_orient = torch.tensor(np.tile(start_orients, (num_images, 1)), dtype=torch.float32, device=device)
    body_pose = REST.to(device).repeat(num_starts, 1)  # start from the prior's centre
    betas = torch.zeros(num_starts, keypoint_model["shapedirs"].shape[-1], device=device)
    free = torch.zeros(69, device=device)
    for n in FREE:
        free[jidx(n, 0):jidx(n, 0) + 3] = 1
    coco = torch.tensor(COCO_SMPL, device=device)
    with torch.no_grad():  # translation: match the keypoints' weighted centre and spread
        points = body_points(keypoint_model, betas, global_orient, body_pose)[:, coco]
        mean = lambda x: (kp_weight[..., None] * x).sum(1)
        centre_2d, centre_3d = mean(kp), mean(points)
        spread_2d = mean((kp - centre_2d[:, None]).square()).sum(1).sqrt().clamp(min=1e-3)
        spread_3d = mean((points[..., :2] - centre_3d[:, None, :2]).square()).sum(1).sqrt()
        depth = focal * spread_3d / spread_2d - centre_3d[:, 2]
        t = torch.cat([centre_2d * (depth + centre_3d[:, 2])[:, None] / focal - centre_3d[:, :2], depth[:, None]], 1)
    global_orient, body_pose, betas, t = (x.clone().requires_grad_(True) for x in (global_orient, body_pose, betas, t))
    elev_mean, elev_sd = np.radians(elevation_prior[0]), np.radians(elevation_prior[1])
    unit = 0.01  # reprojection error in units of 1% of the image height

    def losses(frac):
        pts = body_points(keypoint_model, betas, global_orient, body_pose * free) + t[:, None]  # camera frame
        x = pts[:, coco]
        uv = focal * x[..., :2] / x[..., 2:].clamp(min=0.1)
        err2 = (uv - kp).square().sum(-1) / unit ** 2
        data = (kp_weight * (err2 / (1 + err2 / 100.0))).sum(1)  # Geman-McClure: robust beyond 10% of the height
        w_pose = W_POSE * (W_END ** frac)  # priors annealed from strong to weak, as SMPLify does
        # viewpoint prior: the camera's elevation seen from the body, sin(elev) = body up . direction
        # to the camera; weak, because 2D keypoints barely show it (docs/estimate.md)
        up = rotmat(global_orient)[:, :, 1]
        to_cam = -pts[:, 0] / pts[:, 0].norm(dim=1, keepdim=True)
        elev = torch.asin((up * to_cam).sum(1).clamp(-1, 1))
        view = W_EL * ((elev - elev_mean) / elev_sd).square() if elev_sd > 0 else 0.0
        return data + w_pose * pose_prior(body_pose * free) + W_BETAS * betas.square().sum(1) + view, pts

    # stage 1: orientation + translation from every start; the best `keep` starts per image go on to
    # stage 2, everything (a wrong front/back start is already far behind after stage 1)
    opt = torch.optim.Adam([global_orient, t], lr=lr)
    for i in range(steps[0]):
        loss, _ = losses(0.0)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    kept_per_image = min(keep, inits)
    with torch.no_grad():
        first_start = torch.arange(num_images, device=device)[:, None] * inits
        kept = (loss.view(num_images, inits).topk(kept_per_image, 1, largest=False).indices + first_start).ravel()
    global_orient, body_pose, betas, t, kp, kp_weight = (x.detach()[kept].clone().requires_grad_(x.requires_grad)
                                                         for x in (global_orient, body_pose, betas, t, kp, kp_weight))
    opt = torch.optim.Adam([global_orient, body_pose, betas, t], lr=lr)
    for i in range(steps[1]):
        loss, _ = losses(i / max(1, steps[1] - 1))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        loss, pts = losses(1.0)
        best = loss.view(num_images, kept_per_image).argmin(1) + torch.arange(num_images, device=device) * kept_per_image
        pick = lambda x: x.detach()[best].cpu().numpy().astype(np.float64)
        return dict(global_orient=pick(global_orient), body_pose=pick(body_pose * free), betas=pick(betas), t=pick(t),
                    loss=pick(loss), pts=pick(pts))


def to_sidecar(keypoint_model, global_orient, body_pose, betas, t_cam, K):
    """A body placed in the camera frame (root rotation global_orient, translation t_cam, camera R = I) ->
    the world's convention: global_orient 0 (upright canonical body), the root rotation folded
    into the camera R, and the viewpoint (elevation, azimuth) of that camera from the body centre.
    SMPL rotates the root about the rest pelvis J0: X(global_orient) = Rg (X(0) - J0) + J0, so
    x_cam = Rg X(0) + (t_cam + J0 - Rg J0)."""
    from scipy.spatial.transform import Rotation
    Rg = Rotation.from_rotvec(global_orient).as_matrix()
    with torch.no_grad():
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)
        pts = body_points(keypoint_model, f(betas), torch.zeros(len(global_orient), 3), f(body_pose))
        pts = pts.numpy().astype(np.float64)
    J0 = pts[:, 0]
    t = t_cam + J0 - np.einsum("nij,nj->ni", Rg, J0)
    centre = 0.5 * (pts.min(1) + pts.max(1))  # like the world: the middle of the body's box
    elev, azim = viewpoint(Rg, t, centre)
    return dict(global_orient=np.zeros_like(global_orient), body_pose=body_pose, betas=betas, R=Rg, t=t, K=K,
                elevation=elev, azimuth=azim)


def fit_keypoints(keypoint_model, names, kp, image_size, args, device):
    """COCO-17 [x, y, score] in pixels -> sidecar dict (fitted rows only) + names of skipped images."""
    H, W = image_size[:, 0].astype(np.float64), image_size[:, 1].astype(np.float64)
    conf = np.where(kp[..., 2] >= args.min_score, kp[..., 2], 0.0)
    ok = (conf > 0).sum(1) >= args.min_keypoints
    norm = np.stack([(kp[..., 0] - W[:, None] / 2) / H[:, None], (kp[..., 1] - H[:, None] / 2) / H[:, None]], -1)
    idx = np.flatnonzero(ok)
    if not len(idx):
        raise util.UserError(f"no image has {args.min_keypoints} keypoints with score >= {args.min_score}: nothing to fit")
    res = []
    t0 = time.time()
    for start in tqdm(range(0, len(idx), args.batch_size), desc="fit", unit="batch"):
        batch = idx[start:start + args.batch_size]
        res.append(fit_smpl(keypoint_model, norm[batch], conf[batch], focal=args.focal, inits=args.inits,
                            steps=(args.steps // 4, args.steps), elevation0=args.init_elevation,
                            elevation_prior=args.elevation_prior, device=device))
    dt = time.time() - t0
    cat = {k: np.concatenate([r[k] for r in res]) for k in ("global_orient", "body_pose", "betas", "t", "loss")}
    focal_px = args.focal * H[idx]
    K = np.zeros((len(idx), 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = focal_px, focal_px, W[idx] / 2, H[idx] / 2, 1
    out = to_sidecar(keypoint_model, cat["global_orient"], cat["body_pose"], cat["betas"], cat["t"], K)
    out["names"] = np.asarray(names)[idx]
    out["image_size"] = image_size[idx].astype(np.int32)
    out["keypoints"] = kp[idx].astype(np.float32)
    out["reproj_px"] = reprojection_px(keypoint_model, out, kp[idx], conf[idx])
    skipped = [str(n) for n in np.asarray(names)[~ok]]
    return out, skipped, dt


def reprojection_px(keypoint_model, params, kp, conf):
    """Per image: mean pixel distance between the fitted body's projected COCO keypoints and the
    input keypoints (confident ones), with the sidecar's own camera."""
    with torch.no_grad():
        f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
        pts = body_points(keypoint_model, f(params["betas"]), f(params["global_orient"]), f(params["body_pose"]))
        pts = pts.numpy()[:, COCO_SMPL]
    xc = np.einsum("nij,nkj->nki", params["R"], pts) + params["t"][:, None]
    uv = np.einsum("nij,nkj->nki", params["K"], xc)
    uv = uv[..., :2] / uv[..., 2:]
    e = np.linalg.norm(uv - kp[..., :2], axis=-1)
    return ((e * (conf > 0)).sum(1) / np.maximum((conf > 0).sum(1), 1)).astype(np.float32)


def save_sidecar(path, params, skipped, model_name):
    keys = ("names", "betas", "global_orient", "body_pose", "elevation", "azimuth", "K", "R", "t", "image_size")
    extra = {k: params[k] for k in ("keypoints", "reproj_px") if k in params}
    util.save_npz(path, **{k: np.asarray(params[k]).astype(np.float32) if k not in ("names", "image_size") else params[k]
                           for k in keys}, **extra, skipped=np.array(skipped, dtype=str), model=np.array(model_name))


def fit_setup(args):
    """What `fit` and `evaluate` both start with: threads, device, the body and its keypoint model."""
    torch.set_num_threads(args.threads)
    body = load_body(args.smpl_model)
    return util.pick_device(args.device), body, keypoint_body(body)


def run_fit(args):
    t0 = time.time()
    device, body, keypoint_model = fit_setup(args)
    for split in args.splits:
        kpath = args.keypoints or os.path.join(args.out, f"{split}.keypoints.npz")
        if not os.path.exists(kpath):
            raise util.UserError(f"keypoint file '{kpath}' not found: run '01b_estimate_smpl.py keypoints' first")
        try:
            with np.load(kpath, allow_pickle=False) as z:
                z = {k: z[k] for k in z.files if k in ("names", "keypoints", "image_size")}
        except Exception as e:
            raise util.UserError(f"keypoint file '{kpath}' cannot be read ({type(e).__name__}): it may be truncated; "
                                 f"delete it and run '01b_estimate_smpl.py keypoints' again")
        if len(z) < 3 or z["keypoints"].shape[1:] != (17, 3):
            raise util.UserError(f"'{kpath}' is not a keypoint file: expected names, keypoints (N,17,3) "
                                   f"COCO-17 [x, y, score], image_size (N,2)")
        names, kp, size = z["names"], z["keypoints"].astype(np.float64), z["image_size"]
        out, skipped, dt = fit_keypoints(keypoint_model, names, kp, size, args, device)
        path = os.path.join(args.out, f"{split}.npz")
        save_sidecar(path, out, skipped, body.source)
        print(f"read {kpath} ({len(names)} images); wrote {path}: {len(out['names'])} fitted, {len(skipped)} skipped "
              f"(fewer than {args.min_keypoints} keypoints with score >= {args.min_score}); median reprojection "
              f"{np.median(out['reproj_px']):.2f} px; {len(out['names']) / dt:.1f} images/s on {device}, batch "
              f"{args.batch_size} x {args.inits} starts")
    print(f"fit: {time.time() - t0:.1f} s")

# -----------------------------------------------------------------------------
# externally estimated parameters (e.g. 4D-Humans / HMR 2.0)


def as_axis_angle(a, joints, what):
    """(N, joints*3) axis-angle, (N, joints, 3) or rotation matrices (N, [1,] joints, 3, 3) -> (N, joints*3)."""
    from scipy.spatial.transform import Rotation
    a = np.asarray(a, dtype=np.float64)
    n = len(a)
    if a.shape[-2:] == (3, 3) and a.size == n * joints * 9:
        return Rotation.from_matrix(a.reshape(-1, 3, 3)).as_rotvec().reshape(n, joints * 3)
    if a.size == n * joints * 3:
        return a.reshape(n, joints * 3)
    raise util.UserError(f"'{what}' has shape {a.shape}: expected (N,{joints * 3}) axis-angle or "
                           f"(N,{joints},3,3) rotation matrices")


def run_import(args):
    body = load_body(args.smpl_model)
    keypoint_model = keypoint_body(body)
    if not os.path.exists(args.params):
        raise util.UserError(f"parameter file '{args.params}' not found")
    try:
        with np.load(args.params, allow_pickle=False) as z:
            given = {k: z[k] for k in z.files}
    except Exception as e:
        raise util.UserError(f"'{args.params}' is not a readable .npz file ({type(e).__name__})")
    need = [k for k in ("names", "global_orient", "body_pose", "image_size") if k not in given]
    cam = "K" in given and "R" in given and "t" in given
    if not cam and not ("focal_length" in given and "cam_t" in given):
        need.append("focal_length + cam_t (or K, R, t)")
    if need:
        raise util.UserError(f"'{args.params}' lacks {need}: see docs/estimate.md for the format")
    n = len(given["names"])
    short = [k for k in ("global_orient", "body_pose", "image_size", "betas", "K", "R", "t", "cam_t")
             if k in given and (np.ndim(given[k]) == 0 or len(given[k]) != n)]
    if short:
        raise util.UserError(f"'{args.params}' has {n} names but {short[0]} has shape {np.shape(given[short[0]])}: "
                             f"every per-image array needs one row per name (docs/estimate.md)")
    global_orient = as_axis_angle(given["global_orient"], 1, "global_orient")
    body_pose = as_axis_angle(given["body_pose"], 23, "body_pose")
    betas = np.zeros((n, 10))
    if "betas" in given:
        given_betas = np.asarray(given["betas"], np.float64).reshape(n, -1)
        betas[:, :min(10, given_betas.shape[1])] = given_betas[:, :10]
    size = np.asarray(given["image_size"]).reshape(n, 2).astype(np.int32)
    H, W = size[:, 0].astype(np.float64), size[:, 1].astype(np.float64)
    if cam:  # our convention already: the root rotation of the body goes into the camera the same way
        from scipy.spatial.transform import Rotation
        R, t = np.asarray(given["R"], np.float64), np.asarray(given["t"], np.float64)
        global_orient = rotvec(R @ Rotation.from_rotvec(global_orient).as_matrix())
        with torch.no_grad():
            J0 = body_points(keypoint_model, torch.as_tensor(betas, dtype=torch.float32), torch.zeros(n, 3),
                             torch.zeros(n, 69)).numpy()[:, 0].astype(np.float64)
        # the body at the given global_orient is R X + t in the camera frame; re-root it at J0
        t_cam = t + np.einsum("nij,nj->ni", R, J0) - J0
        K = np.asarray(given["K"], np.float64)
    else:
        focal = given["focal_length"]
        focal_px = np.broadcast_to(np.asarray(focal, np.float64).reshape(-1, 1) if np.ndim(focal)
                                   else np.full((n, 1), float(focal)), (n, 1))[:, 0]
        principal = (np.asarray(given["principal_point"], np.float64) if "principal_point" in given
                     else np.stack([W / 2, H / 2], 1))
        K = np.zeros((n, 3, 3))
        K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = focal_px, focal_px, principal[:, 0], principal[:, 1], 1
        t_cam = np.asarray(given["cam_t"], np.float64).reshape(n, 3)
    out = to_sidecar(keypoint_model, global_orient, body_pose, betas, t_cam, K)
    order = np.argsort(given["names"])
    out = {k: v[order] for k, v in out.items()}
    out["names"], out["image_size"] = np.asarray(given["names"])[order], size[order]
    path = os.path.join(args.out, f"{args.split}.npz")
    save_sidecar(path, out, [], body.source)
    print(f"read {args.params} ({n} images, camera {'K,R,t' if cam else 'focal_length + cam_t'}); wrote {path}")

# -----------------------------------------------------------------------------
# evaluation on the demo world, where the truth is known


def truth_keypoints(body, params):
    """The world's SMPL keypoints projected with its camera -> (N,17,3) COCO [x, y, 1 or 0]. A face
    point counts as unseen (score 0) when it is farther from the camera than the head joint: a
    detector does not see the nose from behind."""
    _, J = body_forward(body, params["betas"], params["global_orient"], params["body_pose"])
    X = np.concatenate([J[:, :24], J[:, 24:29]], 1)[:, COCO_SMPL]
    kp = np.zeros((len(X), 17, 3))
    for i in range(len(X)):
        uv, z = project(X[i], params["K"][i].astype(np.float64), params["R"][i].astype(np.float64),
                        params["t"][i].astype(np.float64))
        _, zh = project(J[i, 15:16], params["K"][i], params["R"][i], params["t"][i])
        kp[i, :, :2] = uv
        kp[i, :, 2] = 1.0
        kp[i, :5, 2] = (z[:5] <= zh[0] + 0.02).astype(float)
    return kp


def body_relative_view(keypoint_model, params):
    """The truth's viewpoint in the body's own frame (the world samples it in the world frame, and
    its bodies carry a small root tilt and heading): the same fold as to_sidecar."""
    from scipy.spatial.transform import Rotation
    Rw = params["R"].astype(np.float64)
    Rg = np.einsum("nij,njk->nik", Rw, Rotation.from_rotvec(params["global_orient"].astype(np.float64)).as_matrix())
    with torch.no_grad():
        f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
        pts = body_points(keypoint_model, f(params["betas"]), torch.zeros(len(Rg), 3), f(params["body_pose"]))
        pts = pts.numpy().astype(np.float64)
    J0 = pts[:, 0]
    t = params["t"].astype(np.float64) + np.einsum("nij,nj->ni", Rw, J0) - np.einsum("nij,nj->ni", Rg, J0)
    return viewpoint(Rg, t, 0.5 * (pts.min(1) + pts.max(1)))


def angle_diff(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + 180) % 360 - 180)


def evaluate_split(body, keypoint_model, params, noise, args, device, rng):
    """Fit from the truth's projected keypoints (+ Gaussian pixel noise) -> dict of median errors."""
    kp = truth_keypoints(body, params)
    kp[..., :2] += rng.normal(0, noise, kp[..., :2].shape) if noise > 0 else 0
    out, skipped, dt = fit_keypoints(keypoint_model, params["names"], kp, params["image_size"], args, device)
    e_rel, a_rel = body_relative_view(keypoint_model, params)
    return dict(n=len(out["names"]), skipped=len(skipped), images_per_s=len(out["names"]) / dt,
                elev_err=float(np.median(np.abs(out["elevation"] - params["elevation"]))),
                azim_err=float(np.median(angle_diff(out["azimuth"], params["azimuth"]))),
                elev_err_body=float(np.median(np.abs(out["elevation"] - e_rel))),
                azim_err_body=float(np.median(angle_diff(out["azimuth"], a_rel))),
                azim_within_45=float(np.mean(angle_diff(out["azimuth"], params["azimuth"]) <= 45)),
                elev_baseline=float(np.median(np.abs(args.elevation_prior[0] - params["elevation"]))),
                reproj_px=float(np.median(out["reproj_px"])))


def run_evaluate(args):
    t0 = time.time()
    device, body, keypoint_model = fit_setup(args)
    rows = []
    for split in args.splits:
        params = load_params(os.path.join(args.world, split.replace("shifted/", "shifted/smpl/")
                                            if split.startswith("shifted/") else os.path.join("smpl", split)) + ".npz")
        if args.max_images and len(params["names"]) > args.max_images:
            keep = np.random.default_rng(0).choice(len(params["names"]), args.max_images, replace=False)
            params = {k: (v[np.sort(keep)] if np.ndim(v) and len(v) == len(params["names"]) else v)
                      for k, v in params.items()}
        for noise in args.noise:
            r = evaluate_split(body, keypoint_model, params, noise, args, device, np.random.default_rng(args.seed))
            rows.append(dict(split=split, noise_px=noise, **r))
            print(f"{split:28s} noise {noise:4.1f} px: {r['n']} images, median |elevation error| {r['elev_err']:.1f} deg "
                  f"(body frame {r['elev_err_body']:.1f}; the constant {args.elevation_prior[0]:g} deg would give "
                  f"{r['elev_baseline']:.1f}), median |azimuth error| {r['azim_err']:.1f} deg (body frame "
                  f"{r['azim_err_body']:.1f}; {100 * r['azim_within_45']:.0f}% within 45), reprojection "
                  f"{r['reproj_px']:.2f} px, {r['images_per_s']:.1f} images/s")
    if args.json:
        util.save_json(args.json, dict(args={k: v for k, v in vars(args).items() if k != "func"}, rows=rows))
        print(f"wrote {args.json}")
    print(f"evaluate: {time.time() - t0:.1f} s")
    return rows

# -----------------------------------------------------------------------------


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")

    k = sub.add_parser("keypoints", help="COCO-17 keypoints of every image with ViTPose (transformers)")
    k.add_argument("--data", required=True, help="Market-1501-layout root")
    k.add_argument("--splits", nargs="+", default=["bounding_box_train"], help="split folders whose images get keypoints")
    k.add_argument("--out", required=True, help="writes <out>/<split>.keypoints.npz (e.g. runs/market1501/smpl)")
    k.add_argument("--model", default=DEFAULT_VITPOSE, help="hub id or local folder of a COCO-17 ViTPose checkpoint")
    k.add_argument("--batch-size", type=int, default=32, help="images per ViTPose forward")
    util.old_flag(k, "--batch", "--batch-size", type=int)
    k.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")

    def fit_args(p):
        p.add_argument("--batch-size", type=int, default=256, help="images fitted together (x --inits starts each)")
        util.old_flag(p, "--batch", "--batch-size", type=int)
        p.add_argument("--inits", type=int, default=8, help="initial orientations per image (azimuths 360/inits apart)")
        p.add_argument("--steps", type=int, default=120, help="optimiser (Adam) steps of the full fit (a quarter more "
                       "for the orientation-only stage before it)")
        p.add_argument("--focal", type=float, default=FOCAL, help="focal length / image height of the fit's camera")
        p.add_argument("--init-elevation", type=float, default=10.0, help="elevation (deg) of the initial cameras")
        p.add_argument("--elevation-prior", type=float, nargs=2, default=[15.0, 10.0], metavar=("MEAN", "SD"),
                       help="Gaussian prior on the camera elevation in degrees (2D keypoints barely show it; "
                       "SD 0 turns it off). Default: the middle of the paper's U[0,30] range")
        p.add_argument("--min-score", type=float, default=0.3, help="keypoints below this score are ignored")
        p.add_argument("--min-keypoints", type=int, default=6, help="images with fewer confident keypoints are skipped")
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")

    f = sub.add_parser("fit", help="SMPLify-style fit of the keypoints -> <out>/<split>.npz (the world's format)")
    f.add_argument("--out", required=True, help="folder with <split>.keypoints.npz; the sidecar goes next to it")
    f.add_argument("--splits", nargs="+", default=["bounding_box_train"], help="splits whose keypoints are fitted")
    f.add_argument("--keypoints", default=None, help="keypoint file (default <out>/<split>.keypoints.npz)")
    fit_args(f)

    i = sub.add_parser("import", help="externally estimated SMPL + camera (e.g. 4D-Humans) -> <out>/<split>.npz")
    i.add_argument("--params", required=True, help=".npz with names, global_orient, body_pose, [betas], image_size, "
                   "focal_length + cam_t (or K, R, t): docs/estimate.md")
    i.add_argument("--split", default="bounding_box_train", help="the split the parameters belong to (names the file)")
    i.add_argument("--out", required=True, help="folder to write <split>.npz to")

    e = sub.add_parser("evaluate", help="fit the demo world's own projected keypoints, compare with its truth")
    e.add_argument("--world", default="runs/demo/world", help="a demo world (demo/world.py): its SMPL truth")
    e.add_argument("--splits", nargs="+", default=["bounding_box_train", "shifted/bounding_box_test"],
                   help="the world's splits to fit")
    e.add_argument("--noise", type=float, nargs="+", default=[0.0, 2.0], help="Gaussian pixel noise (sigma) added")
    e.add_argument("--max-images", type=int, default=0, help="random subset per split (0 = all)")
    e.add_argument("--seed", type=int, default=0, help="seeds the pixel noise")
    e.add_argument("--json", default=None, help="also write the figures here")
    fit_args(e)
    for p in (f, i, e):
        p.add_argument("--smpl-model", default=None, help="SMPL model file (.npz or converted .pkl); default the "
                       "open body. Imported 4D-Humans parameters need the official SMPL their betas belong to")
    return ap


def parse_args(argv=None):
    """-> args of one subcommand (cmd: keypoints, fit, import or evaluate); none: the help, then a
    one-line error."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        raise util.UserError("give a subcommand: keypoints, fit, import or evaluate")
    for name, least in (("batch_size", 1), ("inits", 1), ("steps", 4), ("threads", 1)):  # (those it has)
        if getattr(args, name, least) < least:
            raise util.UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {least}"
                                 + (" (a quarter of it runs first)" if name == "steps" else ""))
    if getattr(args, "max_images", 0) < 0:
        raise util.UserError(f"--max-images {args.max_images}: must be 0 (all) or more")
    if args.cmd == "evaluate":
        if args.json:
            util.check_output_file(args.json, "--json")
    else:
        util.check_output_dir(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    {"keypoints": run_keypoints, "fit": run_fit, "import": run_import, "evaluate": run_evaluate}[args.cmd](args)


if __name__ == "__main__":
    util.run_main(main)
