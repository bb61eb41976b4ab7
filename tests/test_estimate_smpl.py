"""
Stage 01b acceptance tests: the COCO -> SMPL joint map against the project's skeleton,
ViTPose through transformers with a tiny random checkpoint saved and loaded like a real one, the
SMPLify-style fit against the demo world's truth (viewpoint + reprojection), external parameters,
the sidecar working with '01 conditions --smpl', and one-line errors. CPU, offline.
"""
import os
import sys
import subprocess

import numpy as np
import pytest
import torch

from stages import ROOT, load_stage  # noqa: E402  (puts the repository root on sys.path)
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
import util  # noqa: E402
import body  # noqa: E402

e01 = load_stage("01b_estimate_smpl.py")
SCRIPT = os.path.join(ROOT, "01b_estimate_smpl.py")
RENDER = os.path.join(ROOT, "01_render_smpl.py")


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def smpl():
    torch.set_num_threads(2)
    b = body.load_body()
    return b, e01.keypoint_body(b)


@pytest.fixture(scope="module")
def world(small_world):
    return str(small_world)


def fit_args(**kw):
    import argparse
    d = dict(min_score=0.3, min_keypoints=6, batch_size=64, focal=e01.FOCAL, inits=8, steps=120, init_elevation=10.0,
             elevation_prior=[15.0, 10.0])
    d.update(kw)
    return argparse.Namespace(**d)

# ----------------------------------------------------------------------------- joints


def test_coco_order_maps_to_the_projects_skeleton(smpl):
    model, kb = smpl
    names = body.SMPL_JOINTS + body.SMPL_EXTRA
    for i, n in enumerate(body.COCO17):  # by name, through OpenPose-18 and the SMPL joint table
        assert body.OPENPOSE18[body.COCO17_TO_OPENPOSE18[i]] == n
        assert names[e01.COCO_SMPL[i]] == n
    # the reduced keypoint body gives exactly the full model's joints and face points ...
    rng = np.random.default_rng(0)
    go, bp = rng.normal(0, 0.3, (3, 3)), rng.normal(0, 0.3, (3, 69))
    betas = rng.normal(0, 1, (3, 10))
    _, J = body.body_forward(model, betas, go, bp)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)
    pts = e01.body_points(kb, f(betas), f(go), f(bp)).numpy()
    assert np.abs(pts - J[:, :29]).max() < 1e-5
    # ... and the COCO points are the OpenPose-18 points that 01 draws the skeleton maps from
    op = body.openpose18(J)
    assert np.abs(op[:, list(body.COCO17_TO_OPENPOSE18)] - pts[:, e01.COCO_SMPL]).max() < 1e-5
    # the face points sit where a face is: nose in front of the head (+z), left eye/ear on +x
    rest = e01.body_points(kb, f(np.zeros((1, 10))), f(np.zeros((1, 3))), f(np.zeros((1, 69)))).numpy()[0]
    nose, leye, reye, lear, rear = (rest[names.index(n)] for n in ("nose", "l_eye", "r_eye", "l_ear", "r_ear"))
    assert nose[2] > rest[names.index("head")][2] and leye[0] > reye[0] and lear[0] > rear[0]


def test_viewpoint_inverts_look_at():
    rng = np.random.default_rng(0)
    for _ in range(20):
        el, az, c = rng.uniform(-40, 60), rng.uniform(0, 360), rng.normal(0, 0.5, 3)
        R, t = body.look_at(el, az, c)
        e2, a2 = body.viewpoint(R[None], t[None], c[None])
        assert abs(e2[0] - el) < 1e-6 and e01.angle_diff(a2[0], az) < 1e-6

# ----------------------------------------------------------------------------- ViTPose


@pytest.fixture(scope="module")
def tiny_vitpose(tmp_path_factory):
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor
    torch.manual_seed(0)
    bb = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, mlp_ratio=2, out_indices=[2])
    model = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=bb, num_labels=17))
    d = tmp_path_factory.mktemp("vitpose")
    model.save_pretrained(d)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(d)
    return str(d)


def test_vitpose_tiny_checkpoint_same_path_as_real(tiny_vitpose, world, tmp_path):
    from PIL import Image
    proc, model = e01.load_vitpose(tiny_vitpose, "cpu")  # the loader a hub id goes through
    folder, names = e01.image_list(world, "bounding_box_train")
    ims = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names[:5]]
    one = e01.vitpose_keypoints(proc, model, ims, "cpu")
    assert one.shape == (5, 17, 3) and np.isfinite(one).all()
    # batching changes nothing: 5 at once == 2 + 3
    two = np.concatenate([e01.vitpose_keypoints(proc, model, ims[:2], "cpu"),
                          e01.vitpose_keypoints(proc, model, ims[2:], "cpu")])
    assert np.allclose(one, two, atol=1e-4)
    # keypoints are in the image's pixels: inside the box the processor crops (the whole image widened
    # to the model's 48:64 aspect, then padded 1.25x; a random model's heatmaps let the sub-pixel
    # refinement step out a little), never in the model's own 48x64 input frame
    H, W = ims[0].height, ims[0].width
    hw, hh = 0.75 * 1.25 * max(W, H * 48 / 64), 0.75 * 1.25 * max(H, W * 64 / 48)
    assert (np.abs(one[..., 0] - W / 2) <= hw).all() and (np.abs(one[..., 1] - H / 2) <= hh).all()
    assert one[..., 1].max() > 64 and one[..., 0].min() < 0  # spread beyond the 48x64 input: mapped back
    # the command: keypoints file for a whole split, in batches
    r = run(SCRIPT, "keypoints", "--data", world, "--out", tmp_path, "--model", tiny_vitpose, "--batch-size", 4)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "bounding_box_train.keypoints.npz") as z:
        assert list(z["names"]) == names and z["keypoints"].shape == (len(names), 17, 3)
        assert (z["image_size"] == [H, W]).all()
        assert np.allclose(z["keypoints"][:5], one, atol=1e-4)


def test_vitpose_bad_model_one_line(tmp_path, world):
    r = run(SCRIPT, "keypoints", "--data", world, "--out", tmp_path, "--model", tmp_path / "nothing")
    assert r.returncode == 2 and "cannot load ViTPose" in r.stderr and len(r.stderr.strip().splitlines()) == 1

# ----------------------------------------------------------------------------- the fit


def world_params(world, *splits):
    ps = [body.load_params(os.path.join(world, s.replace("shifted/", "shifted/smpl/") if s.startswith("shifted/")
                                          else os.path.join("smpl", s)) + ".npz") for s in splits]
    return {k: np.concatenate([p[k] for p in ps]) for k in body.PARAM_KEYS + ("names",)}


@pytest.mark.parametrize("noise, max_az, max_el", [(0.0, 25.0, 10.0), (2.0, 30.0, 12.0)])
def test_fit_recovers_viewpoint_of_the_world(smpl, world, noise, max_az, max_el):
    """Goal: median azimuth error <= 20 deg, elevation <= 8 deg; the bounds here leave room
    for the small world's sampling spread and fail on a clear regression."""
    model, kb = smpl
    p = world_params(world, "bounding_box_train", "shifted/query", "shifted/bounding_box_test")
    r = e01.evaluate_split(model, kb, p, noise, fit_args(), "cpu", np.random.default_rng(0))
    print(r)
    assert r["skipped"] == 0 and r["n"] == len(p["names"])
    assert r["azim_err"] <= max_az and r["elev_err"] <= max_el
    assert r["reproj_px"] <= 1.5 + noise
    assert r["azim_within_45"] >= 0.8  # front/back is not mixed up


def test_fit_cli_sidecar_skips_and_conditions(smpl, world, tmp_path):
    model, kb = smpl
    p = body.load_params(os.path.join(world, "smpl", "bounding_box_train.npz"))
    kp = e01.truth_keypoints(model, p)
    kp[3, :, 2] = 0.0          # no confident keypoint: marked and skipped
    kp[5, 6:, 2] = 0.1         # only 6 left above the score threshold: still fitted
    util.save_npz(tmp_path / "smpl" / "bounding_box_train.keypoints.npz", names=p["names"],
                    keypoints=kp.astype(np.float32), image_size=p["image_size"])
    r = run(SCRIPT, "fit", "--out", tmp_path / "smpl", "--batch-size", 16, "--steps", 80)
    assert r.returncode == 0, r.stderr
    assert "1 skipped" in r.stdout and "images/s" in r.stdout
    s = body.load_params(tmp_path / "smpl" / "bounding_box_train.npz")
    assert list(s["skipped"]) == [p["names"][3]] and len(s["names"]) == len(p["names"]) - 1
    assert s["K"].shape == (len(s["names"]), 3, 3) and (s["image_size"] == p["image_size"][0]).all()
    assert np.allclose(s["global_orient"], 0) and np.allclose(np.linalg.det(s["R"]), 1, atol=1e-4)
    # the rest of the pipeline reads it unchanged, from a folder outside the data set
    r = run(RENDER, "conditions", "--data", world, "--smpl", tmp_path / "smpl", "--out", tmp_path / "cond")
    assert r.returncode == 0, r.stderr
    stems = sorted(f.split(".")[0] for f in os.listdir(tmp_path / "cond" / "bounding_box_train"))
    assert len(stems) == 3 * (len(p["names"]) - 1) and p["names"][3].split(".")[0] not in stems
    # the skeleton map drawn from the fit lines up with the input keypoints: its shoulders where they are
    i = 0
    sk = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(
        tmp_path / "cond" / "bounding_box_train" / (str(s["names"][i]).split(".")[0] + ".skeleton.png")))
    for c in (5, 6):
        x, y = np.round(kp[0, c, :2]).astype(int)
        assert sk[max(0, y - 2):y + 3, max(0, x - 2):x + 3].max() > 0


def test_all_keypoints_unconfident_is_one_line(world, tmp_path):
    util.save_npz(tmp_path / "bounding_box_train.keypoints.npz", names=np.array(["a.jpg"]),
                    keypoints=np.zeros((1, 17, 3), np.float32), image_size=np.array([[128, 64]]))
    r = run(SCRIPT, "fit", "--out", tmp_path)
    assert r.returncode == 2 and "nothing to fit" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run(SCRIPT, "fit", "--out", tmp_path / "none")
    assert r.returncode == 2 and "run '01b_estimate_smpl.py keypoints' first" in r.stderr

# ----------------------------------------------------------------------------- external parameters


def test_import_4d_humans_style_and_KRt(smpl, world, tmp_path):
    """The world's truth written as 4D-Humans would (rotation matrices in the camera frame, cam_t,
    focal_length) comes back as the same bodies, cameras and viewpoints."""
    from scipy.spatial.transform import Rotation
    model, kb = smpl
    p = body.load_params(os.path.join(world, "shifted", "smpl", "bounding_box_test.npz"))
    n = len(p["names"])
    Rw, tw = p["R"].astype(np.float64), p["t"].astype(np.float64)
    Rg = np.einsum("nij,njk->nik", Rw, Rotation.from_rotvec(p["global_orient"].astype(np.float64)).as_matrix())
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
    J0 = e01.body_points(kb, f(p["betas"]), torch.zeros(n, 3), torch.zeros(n, 69)).numpy()[:, 0].astype(np.float64)
    cam_t = tw + np.einsum("nij,nj->ni", Rw, J0) - J0
    bp_mats = Rotation.from_rotvec(p["body_pose"].reshape(-1, 3).astype(np.float64)).as_matrix().reshape(n, 23, 3, 3)
    order = np.arange(n)[::-1]  # any row order: the sidecar comes out sorted by name
    np.savez(tmp_path / "hmr.npz", names=p["names"][order], global_orient=Rg[order, None], body_pose=bp_mats[order],
             betas=p["betas"][order], focal_length=p["K"][order, 0, 0], principal_point=p["K"][order, :2, 2],
             cam_t=cam_t[order], image_size=p["image_size"][order])
    np.savez(tmp_path / "krt.npz", names=p["names"], global_orient=p["global_orient"], body_pose=p["body_pose"],
             betas=p["betas"], K=p["K"], R=p["R"], t=p["t"], image_size=p["image_size"])
    el, az = e01.body_relative_view(kb, p)
    kp = e01.truth_keypoints(model, p)
    for src in ("hmr", "krt"):
        r = run(SCRIPT, "import", "--params", tmp_path / f"{src}.npz", "--split", "x", "--out", tmp_path / src)
        assert r.returncode == 0, r.stderr
        s = body.load_params(tmp_path / src / "x.npz")
        assert list(s["names"]) == list(p["names"])
        assert np.abs(s["elevation"] - el).max() < 0.05 and e01.angle_diff(s["azimuth"], az).max() < 0.05
        assert e01.reprojection_px(kb, s, kp, np.ones((n, 17))).max() < 0.05


def test_import_bad_file_one_line(tmp_path):
    np.savez(tmp_path / "bad.npz", names=np.array(["a.jpg"]), body_pose=np.zeros((1, 69)))
    r = run(SCRIPT, "import", "--params", tmp_path / "bad.npz", "--out", tmp_path)
    assert r.returncode == 2 and "lacks" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- dance videos -> pose bank


def joint_angle_error(a, b):
    """Mean geodesic angle (degrees) between two sets of (N, 69) SMPL body poses, over frames and
    the 23 body joints."""
    from scipy.spatial.transform import Rotation
    ra, rb = (Rotation.from_rotvec(x.reshape(-1, 3)) for x in (a, b))
    return float(np.degrees(np.mean((ra.inv() * rb).magnitude())))


def test_dance_video_to_pose_bank_recovers_poses_and_chooses_spread_ones(smpl, tmp_path):
    """A rendered 'dance video' (01 targets: 12 out-of-distribution poses, one viewpoint each) seen
    by an ideal keypoint detector (its projected joints) -> 01b fit -> 01 bank --choose 4 away from
    a walking 'training set'. The fit recovers the poses' joints (errors printed; docs/estimate.md
    reports them), clearly closer than the zero pose or another frame's; the chosen 4 are the
    greedy farthest ones, recomputed here with plain numpy."""
    model, _ = smpl
    for name, kind, n in (("video", "ood", 12), ("train", "id", 8)):
        r = run(RENDER, "targets", "--out", tmp_path / name, "--poses", kind, "--num-poses", n, "--views-per-pose", 1,
                "--size", "64x128", "--seed", 3)
        assert r.returncode == 0, r.stderr
    truth = body.load_params(tmp_path / "video" / "params.npz")
    frames = np.array([f"{i:04d}.jpg" for i in range(12)])
    util.save_npz(tmp_path / "smpl" / "vidA.keypoints.npz", names=frames, image_size=truth["image_size"],
                  keypoints=e01.truth_keypoints(model, truth).astype(np.float32))
    r = run(SCRIPT, "fit", "--out", tmp_path / "smpl", "--splits", "vidA", "--steps", 200)
    assert r.returncode == 0, r.stderr
    fit = body.load_params(tmp_path / "smpl" / "vidA.npz")
    # the joints of each pose (neutral shape, no root rotation, root at 0): what the bank compares
    joints = lambda bp: (lambda j: (j - j[:, :1]))(np.asarray(body.body_forward(
        model, np.zeros((len(bp), 10)), np.zeros((len(bp), 3)), np.asarray(bp, np.float64))[1])[:, :24])
    mpjpe = lambda a, b: 1000 * float(np.sqrt(((joints(a) - joints(b)) ** 2).sum(-1)).mean())
    other, zero = np.roll(truth["body_pose"], 1, axis=0), np.zeros_like(truth["body_pose"])  # each frame vs another's pose
    print(f"dance-video fit: mean joint-angle error {joint_angle_error(fit['body_pose'], truth['body_pose']):.1f} deg "
          f"(the zero pose {joint_angle_error(zero, truth['body_pose']):.1f}, another frame's "
          f"{joint_angle_error(other, truth['body_pose']):.1f}); mean joint position error "
          f"{mpjpe(fit['body_pose'], truth['body_pose']):.0f} mm (zero pose {mpjpe(zero, truth['body_pose']):.0f}, "
          f"another frame's {mpjpe(other, truth['body_pose']):.0f})")
    assert mpjpe(fit["body_pose"], truth["body_pose"]) < 0.8 * min(mpjpe(zero, truth["body_pose"]),
                                                                    mpjpe(other, truth["body_pose"]))
    r = run(RENDER, "bank", "--smpl", tmp_path / "smpl", "--choose", 4, "--away-from", tmp_path / "train" / "params.npz",
            "--out", tmp_path / "bank.npz")
    assert r.returncode == 0, r.stderr
    bank = np.load(tmp_path / "bank.npz")
    assert bank["poses"].shape == (4, 72) and str(bank["up"]) == "y" and np.allclose(bank["poses"][:, :3], 0)
    # the greedy choice, recomputed
    cand, avoid = joints(fit["body_pose"]), joints(body.load_params(tmp_path / "train" / "params.npz")["body_pose"])
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1).mean(-1))
    near, chosen = dist(cand, avoid).min(1), []
    for _ in range(4):
        chosen.append(int(np.argmax(near)))
        near = np.minimum(near, dist(cand, cand[chosen[-1:]])[:, 0])
    got = [list(fit["names"]).index(n.split("/", 1)[1]) for n in bank["names"]]
    assert got == chosen and np.all(np.diff(bank["nearest_distance"]) <= 1e-6)
    # and targets render from it in the canonical frame (the bank says y up)
    r = run(RENDER, "targets", "--out", tmp_path / "t", "--pose-bank", tmp_path / "bank.npz", "--num-poses", 4,
            "--views-from", tmp_path / "train" / "params.npz", "--views-per-pose", 1, "--size", "64x128")
    assert r.returncode == 0, r.stderr
    t = body.load_params(tmp_path / "t" / "params.npz")
    assert np.allclose(t["global_orient"], 0, atol=1e-5)
    train = body.load_params(tmp_path / "train" / "params.npz")
    assert all(any(np.isclose(e, train["elevation"], atol=0.01)) for e in t["elevation"])  # viewpoints from the photos
