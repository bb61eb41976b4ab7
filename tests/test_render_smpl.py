"""
Stage 01 acceptance tests: independent checks of the rendered maps (geometry, not shapes), the
open body, pose banks, the demo world and the command line's one-line errors. CPU, offline.
"""
import os
import sys
import pickle
import subprocess

import numpy as np
import pytest

from stages import ROOT, load_stage  # noqa: E402  (puts the repository root on sys.path)
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
import util  # noqa: E402
import body  # noqa: E402

from demo.world import World  # noqa: E402

r01 = load_stage("01_render_smpl.py")
SCRIPT = os.path.join(ROOT, "01_render_smpl.py")
WORLD, ORACLE, FIGURES = (os.path.join(ROOT, *p) for p in (("demo", "world.py"), ("demo", "oracle.py"),
                                                            ("tools", "figures.py")))
SIZE = (256, 128)  # (height, width)


def run(*args, env=None, script=SCRIPT):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=e, cwd=ROOT)


@pytest.fixture(scope="module")
def smpl():
    import torch
    torch.set_num_threads(1)
    return body.load_body()


@pytest.fixture(scope="module")
def renderer(smpl):
    ren = body.Renderer(smpl.body_faces)
    yield ren
    ren.delete()


def walking(n=1, seed=0):
    rng = np.random.default_rng(seed)
    go, bp, _ = body.procedural_poses(rng, n, "id")
    return go, bp


def render(smpl, renderer, go, bp, elev, azim, size=SIZE, betas=None):
    betas = np.zeros((1, 10)) if betas is None else betas
    v, j = body.body_forward(smpl, betas, go[None], bp[None])
    K, R, t = body.fit_camera(v[0], elev, azim, size)
    maps, mask = body.condition_maps(renderer, v[0], j[0], K, R, t, size)
    return maps, mask, v[0], j[0], (K, R, t)


# ----------------------------------------------------------------------------- body

def test_open_body_tpose_arms_along_x_legs_straight(smpl):
    v, j = body.body_forward(smpl, np.zeros((1, 10)), np.zeros((1, 3)), np.zeros((1, 69)))
    J = {n: j[0, i] for i, n in enumerate(body.JOINTS)}
    for s, sign in (("l", 1), ("r", -1)):
        arm = J[f"{s}_wrist"] - J[f"{s}_shoulder"]
        cos = sign * arm[0] / np.linalg.norm(arm)
        assert cos > np.cos(np.radians(5)), f"{s} arm not along {'+' if sign > 0 else '-'}x"
        assert sign * J[f"{s}_wrist"][0] > sign * J[f"{s}_elbow"][0] > sign * J[f"{s}_shoulder"][0] > 0
        leg = J[f"{s}_ankle"] - J[f"{s}_hip"]
        assert -leg[1] / np.linalg.norm(leg) > np.cos(np.radians(3)), f"{s} leg not straight down"
        assert J[f"{s}_hip"][1] > J[f"{s}_knee"][1] > J[f"{s}_ankle"][1]
    assert J["head"][1] > J["neck"][1] > J["pelvis"][1]
    # facing +z: the nose (extra joint 24) is in front of the head joint, the person's left on +x
    assert j[0, 24, 2] > J["head"][2] + 0.05
    height = v[0, :, 1].max() - v[0, :, 1].min()
    assert 1.55 < height < 1.85


def test_betas_change_height_monotonically(smpl):
    betas = np.zeros((5, 10))
    betas[:, 0] = [-2, -1, 0, 1, 2]
    z = np.zeros((5, 3))
    v, _ = body.body_forward(smpl, betas, z, np.zeros((5, 69)))
    h = v[:, :, 1].max(1) - v[:, :, 1].min(1)
    assert np.all(np.diff(h) > 0.02), h


def test_missing_smpl_file_one_line():
    p = run("targets", "--out", "/tmp/unused", "--smpl-model", "/nonexistent/SMPL_NEUTRAL.pkl")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent/SMPL_NEUTRAL.pkl" in lines[0] and "smpl.is.tue.mpg.de" in lines[0]


def test_convert_chumpy_pickle(tmp_path):
    """A pickle in the official format (chumpy.ch.Ch objects, a sparse J_regressor), written here
    with a stand-in chumpy module; the converter reads it with no chumpy installed."""
    import types
    import scipy.sparse
    src = dict(np.load(body.OPEN_BODY))
    mod, ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch.Ch = Ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = mod, ch
    try:
        d = dict(v_template=Ch(src["v_template"].astype(np.float64)), shapedirs=Ch(src["shapedirs"]),
                 posedirs=src["posedirs"], J_regressor=scipy.sparse.csc_matrix(src["J_regressor"]),
                 weights=Ch(src["weights"]), kintree_table=src["kintree_table"], f=src["f"].astype(np.uint32))
        pkl = tmp_path / "SMPL_FAKE.pkl"
        with open(pkl, "wb") as f:
            pickle.dump(d, f, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    # run in a fresh process: no chumpy there
    out = tmp_path / "SMPL_FAKE.npz"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_smpl_pkl.py"), str(pkl), str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    z = np.load(out)
    for k in ("v_template", "shapedirs", "J_regressor", "weights"):
        np.testing.assert_allclose(z[k], src[k], atol=1e-6)
    m = body.load_body(str(out))
    assert m.v_template.shape[0] == src["v_template"].shape[0]
    # the .pkl itself needs chumpy: one line pointing at the converter
    p = run("targets", "--out", str(tmp_path / "t"), "--smpl-model", str(pkl), "--num-poses", "1")
    assert p.returncode == 2 and "convert_smpl_pkl.py" in p.stderr and len(p.stderr.strip().splitlines()) == 1

# ----------------------------------------------------------------------------- maps


def test_silhouettes_coincide_and_encoding_roundtrip(smpl, renderer, tmp_path):
    go, bp = walking(seed=1)
    maps, mask, v, j, cam = render(smpl, renderer, go[0], bp[0], 12, 30)
    dmask = maps["depth"] > 0
    nmask = maps["normal"].max(-1) > 0
    assert dmask.sum() > 2000 and (dmask == nmask).all()
    # skeleton limbs lie on the body: almost all skeleton pixels inside the slightly dilated silhouette
    from scipy.ndimage import binary_dilation
    sk = maps["skeleton"].max(-1) > 0
    w = body.skeleton_width(SIZE[0])
    inside = binary_dilation(dmask, iterations=w)[sk].mean()
    assert inside > 0.95, inside
    # the shader's 8-bit normal IS the body.encode_normal of its decoded value
    n, m = body.decode_normal(maps["normal"])
    assert np.abs(body.encode_normal(n, m).astype(int) - maps["normal"]).max() <= 1
    # written + read back through the loader that 02/03 use
    body.write_maps(str(tmp_path), "x", maps)
    c = body.load_conditions(str(tmp_path), "x")
    assert c["depth"].shape == (1, *SIZE) and c["normal"].shape == (3, *SIZE) and c["skeleton"].shape == (3, *SIZE)
    assert ((c["depth"][0] > 0).numpy() == (c["normal"].amax(0) > 0).numpy()).all()
    assert body.load_conditions(str(tmp_path), "x", size=(64, 32))["normal"].shape == (3, 64, 32)


def test_rendered_normals_match_mesh_geometry(smpl, renderer):
    """Camera-space normals of the map vs the normals of the mesh's triangles, computed here from
    the posed vertices, for the triangles visible at their centre pixel: median angle < 3 degrees."""
    go, bp = walking(seed=2)
    maps, mask, v, j, (K, R, t) = render(smpl, renderer, go[0], bp[0], 15, 40, size=(768, 384))
    tri = v[smpl.body_faces].astype(np.float64)
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    fn /= np.linalg.norm(fn, axis=1, keepdims=True)
    uv, d = body.project(tri.mean(1), K, R, t)
    x, y = np.floor(uv).astype(int).T
    ok = (x >= 0) & (x < 384) & (y >= 0) & (y < 768)
    # visible = not hidden: the triangle's depth matches the rendered depth at its centre pixel
    _, z = renderer.render(v, K, R, t, (768, 384))
    ok[ok] &= np.abs(z[y[ok], x[ok]] - d[ok]) < 0.003
    n_gl = (fn @ R.T) * np.array([1, -1, -1])  # OpenCV camera -> OpenGL camera (x right, y up, z to viewer)
    ok &= n_gl[:, 2] > 0.2
    got, _ = body.decode_normal(maps["normal"])
    ang = np.degrees(np.arccos(np.clip((got[y[ok], x[ok]] * n_gl[ok]).sum(1), -1, 1)))
    print(f"normals: {ok.sum()} visible triangles, median angle {np.median(ang):.2f} deg")
    assert ok.sum() > 2000 and np.median(ang) < 3.0, (ok.sum(), np.median(ang))


def test_higher_elevation_head_nearer_than_feet(smpl, renderer):
    go, bp = np.zeros(3), np.zeros(69)
    bp[15 * 3 + 2], bp[16 * 3 + 2] = -1.2, 1.2  # arms down

    def head_minus_feet(elev):
        maps, mask, *_ = render(smpl, renderer, go, bp, elev, 0)
        rows = np.where(mask.any(1))[0]
        top, bot = rows[:len(rows) // 10], rows[-len(rows) // 10:]
        d = maps["depth"].astype(float)
        return d[top][mask[top]].mean() - d[bot][mask[bot]].mean()
    hi, lo = head_minus_feet(30), head_minus_feet(0)
    assert hi > 40, hi          # near = bright: the head is clearly nearer from above
    assert hi > lo + 20, (hi, lo)


def test_azimuth_180_shows_the_back(smpl, renderer):
    go, bp = walking(seed=3)

    def facing(azim):
        maps, mask, v, j, (K, R, t) = render(smpl, renderer, go[0], bp[0], 10, azim)
        n, m = body.decode_normal(maps["normal"])
        n_world = (n[m] * np.array([1, -1, -1])) @ R   # camera -> body frame
        return n_world[:, 2].mean(), maps["skeleton"]
    z0, sk0 = facing(0)
    z1, sk1 = facing(180)
    assert z0 > 0.4 and z1 < -0.4, (z0, z1)   # front surface (+z) vs back surface (-z)
    nose = np.array(body.OPENPOSE_COLORS[0])
    has = lambda sk: (np.abs(sk.astype(int) - nose).sum(-1) == 0).any()
    assert has(sk0) and not has(sk1)          # the face keypoints are drawn only when visible


def test_skeleton_joints_inside_silhouette(smpl, renderer):
    rng = np.random.default_rng(4)
    go, bp, _ = body.procedural_poses(rng, 6, "ood")
    elev, azim = r01.sample_views(rng, 6, "uniform")
    from scipy.ndimage import binary_dilation
    for i in range(6):
        maps, mask, v, j, (K, R, t) = render(smpl, renderer, go[i], bp[i], elev[i], azim[i])
        kp = body.openpose18(j[None])[0]
        body_pts = [k for k in range(18) if k not in body.OPENPOSE_FACE and k != 1]
        uv, _ = body.project(kp[body_pts], K, R, t)
        x, y = np.floor(uv).astype(int).T
        assert ((x >= 0) & (x < SIZE[1]) & (y >= 0) & (y < SIZE[0])).all()
        assert binary_dilation(mask, iterations=1)[y, x].all(), (i, [body_pts[k] for k in np.where(~mask[y, x])[0]])

# ----------------------------------------------------------------------------- poses, targets


def test_pose_bank_roundtrip(tmp_path, smpl):
    rng = np.random.default_rng(5)
    go, bp, _ = body.procedural_poses(rng, 8, "ood")
    from scipy.spatial.transform import Rotation
    # an AMASS-like bank: z-up roots (canonical root rotated +90 deg about x), SMPL-H width 156
    zup = (Rotation.from_euler("x", 90, degrees=True) * Rotation.from_rotvec(go)).as_rotvec()
    poses = np.concatenate([zup, bp[:, :63], np.zeros((8, 90))], 1)
    betas = rng.normal(0, 1, 16)
    np.savez(tmp_path / "bank.npz", poses=poses, betas=betas)
    g2, b2, be2 = r01.load_pose_bank(str(tmp_path / "bank.npz"), up="z")
    np.testing.assert_allclose(b2[:, :63], bp[:, :63], atol=1e-9)
    ang = (Rotation.from_rotvec(g2).inv() * Rotation.from_rotvec(go)).magnitude()
    # heading is removed on purpose; the canonical roots here have little yaw except 'turn'/'dance'
    up2 = Rotation.from_rotvec(g2).apply([0, 1, 0])
    up1 = Rotation.from_rotvec(go).apply([0, 1, 0])
    assert np.abs(up2[:, 1] - up1[:, 1]).max() < 1e-6 and ang.max() < np.radians(60)
    np.testing.assert_allclose(be2[0], betas[:10])
    # through the targets subcommand: params.npz holds the bank's rows
    p = run("targets", "--out", str(tmp_path / "t"), "--pose-bank", str(tmp_path / "bank.npz"),
            "--num-poses", "3", "--views-per-pose", "2", "--size", "32x64")
    assert p.returncode == 0, p.stderr
    prm = np.load(tmp_path / "t" / "params.npz")
    np.testing.assert_allclose(prm["body_pose"][:, :63], bp[prm["pose_id"], :63], atol=1e-6)
    assert len(open(tmp_path / "t" / "targets.csv").read().splitlines()) == 7
    assert os.path.exists(tmp_path / "t" / "maps" / "t00005.skeleton.png")


@pytest.mark.parametrize("content,needle", [(dict(pose=np.zeros((3, 72))), "no key 'poses'"),
                                            (dict(poses=np.zeros((3, 10))), "shape")])
def test_bad_pose_bank_one_line(tmp_path, content, needle):
    np.savez(tmp_path / "bad.npz", **content)
    p = run("targets", "--out", str(tmp_path / "t"), "--pose-bank", str(tmp_path / "bad.npz"))
    assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_no_opengl_backend_names_the_package(tmp_path):
    p = run("targets", "--out", str(tmp_path / "t"), "--num-poses", "1", env={"PYOPENGL_PLATFORM": "nonexistent"})
    assert p.returncode == 2 and "libosmesa6" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_torch_dynamo_loads_after_rendering():
    """A process that renders and then builds a transformers model (01b's ViTPose, the corpus's CLIP):
    torch._dynamo loads triton, whose LLVM segfaulted when Mesa's was loaded first."""
    code = ("import numpy as np, body; r = body.Renderer(np.array([[0, 2, 1]]));"  # (wound to face the camera)
            "rgb, z = r.render(np.array([[0, 0, 1], [1, 0, 1], [0, 1, 1.]]), np.array([[8., 0, 8], [0, 8, 8], [0, 0, 1]]),"
            " np.eye(3), np.zeros(3), (16, 16)); import torch._dynamo; r.delete(); print(int((z > 0).sum()))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 20 < int(p.stdout.split()[-1]) < 40  # the triangle (8 x 8 px / 2) was drawn


def test_viewpoint_and_pose_sources():
    rng = np.random.default_rng(6)
    e, a = r01.sample_views(rng, 4000, "uniform")
    assert 0 <= e.min() and e.max() <= 30 and 0 <= a.min() and a.max() < 360 and np.ptp(a) > 350
    e, a = r01.sample_views(rng, 4000, "train")
    front_back = np.minimum(np.abs((a + 180) % 360 - 180), np.abs(a - 180))
    assert 8 <= e.min() and e.max() <= 14 and np.percentile(front_back, 95) < 25
    _, bid, k1 = body.procedural_poses(rng, 200, "id")
    _, bood, k2 = body.procedural_poses(rng, 200, "ood")
    assert set(k1) <= set(body.ID_KINDS) and set(k2) == set(body.OOD_KINDS)
    # OOD poses are farther from the mean walking pose than walking poses are
    mu = bid.mean(0)
    assert np.linalg.norm(bood - mu, axis=1).mean() > 1.5 * np.linalg.norm(bid - mu, axis=1).mean()
    assert np.abs(bood).max() < np.pi  # no wrapped / grotesque rotations

# ----------------------------------------------------------------------------- world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w"
    p = run("--out", str(out), "--train-ids", "3", "--test-ids", "2", "--images-per-camera", "2",
            "--workers", "1", script=WORLD)
    assert p.returncode == 0, p.stderr
    return out


def test_world_layout_and_determinism(world, tmp_path):
    names = lambda d: sorted(os.listdir(d))
    train = names(world / "bounding_box_train")
    assert len(train) == 3 * 3 * 2 and train[0] == "0001_c1s1_000001_00.jpg"
    assert all(util.parse_name(n)[0] in (1, 2, 3) for n in train)
    for split in ("query", "bounding_box_test", "shifted/query", "shifted/bounding_box_test"):
        assert {util.parse_name(n)[0] for n in names(world / split)} == {4, 5}
    d = util.load_reid_dataset(str(world))
    assert d["num_classes"] == 3
    sc = np.load(world / "smpl" / "bounding_box_train.npz")
    assert list(sc["names"]) == train and sc["body_pose"].shape == (18, 69) and sc["K"].shape == (18, 3, 3)
    assert (sc["elevation"] >= 8).all() and (sc["elevation"] <= 14).all()
    assert os.path.exists(world / "shifted" / "smpl" / "query.npz")
    from PIL import Image
    assert Image.open(world / "bounding_box_train" / train[0]).size == (64, 128)
    # same seed -> identical world (here also with 2 worker processes instead of 1)
    p = run("--out", str(tmp_path / "w2"), "--train-ids", "3", "--test-ids", "2",
            "--images-per-camera", "2", "--workers", "2", script=WORLD)
    assert p.returncode == 0, p.stderr
    for dp, _, fs in os.walk(world):
        for fn in fs:
            a, b = os.path.join(dp, fn), os.path.join(tmp_path / "w2", os.path.relpath(dp, world), fn)
            if fn.endswith(".npz"):
                za, zb = np.load(a), np.load(b)
                assert all(np.array_equal(za[k], zb[k]) for k in za.files), fn
            else:
                assert open(a, "rb").read() == open(b, "rb").read(), fn
    assert "images" in p.stdout and " s" in p.stdout  # size and time printed


def test_conditions_align_with_world_images(world, tmp_path, smpl):
    p = run("conditions", "--data", str(world), "--out", str(tmp_path / "c"))
    assert p.returncode == 0, p.stderr
    import json
    meta = json.load(open(world / "identities.json"))
    w = World(meta)
    try:
        sc = body.load_params(str(world / "smpl" / "bounding_box_train.npz"))
        for i in range(0, 18, 5):
            pid = util.parse_name(str(sc["names"][i]))[0]
            ident = dict(w.ids[pid], backpack=None)  # the maps show the body only
            _, mask, _ = w.render(ident, sc["global_orient"][i], sc["body_pose"][i], 0, 0, "c1", (128, 64), 0,
                                  camera=(sc["K"][i].astype(float), sc["R"][i].astype(float), sc["t"][i].astype(float)))
            stem = os.path.splitext(str(sc["names"][i]))[0]
            c = body.load_conditions(str(tmp_path / "c" / "bounding_box_train"), stem)
            m2 = (c["depth"][0] > 0).numpy()
            iou = (mask & m2).sum() / (mask | m2).sum()
            assert iou > 0.85, (stem, iou)
    finally:
        w.close()


def test_oracle_and_figures(world, tmp_path):
    tg = tmp_path / "tg"
    p = run("targets", "--out", str(tg), "--num-poses", "2", "--views-per-pose", "2", "--size", "64x128")
    assert p.returncode == 0, p.stderr
    man = tmp_path / "manifest.csv"
    man.write_text("file,source,pid,target_id,pose_id,elevation,azimuth,seed\n"
                   "bounding_box_train/0001_c9s1_000001_00.jpg,0001_c1s1_000001_00.jpg,1,t00002,1,0,0,7\n"
                   "bounding_box_train/0002_c9s1_000002_00.jpg,0002_c1s1_000007_00.jpg,2,t00001,0,0,0,8\n")
    p = run("--manifest", str(man), "--targets", str(tg), "--world", str(world), "--out", str(tmp_path / "o"),
            script=ORACLE)
    assert p.returncode == 0, p.stderr
    from PIL import Image
    img = np.asarray(Image.open(tmp_path / "o" / "bounding_box_train" / "0001_c9s1_000001_00.jpg"))
    mask = np.asarray(Image.open(tmp_path / "o" / "masks" / "0001_c9s1_000001_00.mask.png")) > 127
    assert img.shape == (128, 64, 3) and 0.05 < mask.mean() < 0.7
    # the oracle lines up with the target maps it was asked for
    c = body.load_conditions(str(tg / "maps"), "t00002")
    m2 = (c["depth"][0] > 0).numpy()
    assert (mask & m2).sum() / (mask | m2).sum() > 0.6
    d = util.load_reid_dataset(str(world), extra_train=[str(tmp_path / "o" / "bounding_box_train")])
    assert len(d["extra"]) == 2 and d["extra"] <= {p for p, _, _ in d["train"]}  # told apart by folder
    p = run("--data", str(world), "--targets", str(tg), "--out", str(tmp_path / "f"), script=FIGURES)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(tmp_path / "f" / "fig3_viewpoints.png") > 5000
    assert os.path.getsize(tmp_path / "f" / "fig3_tsne_poses.png") > 5000
