"""
SMPL bodies, cameras, poses and the condition maps rendered from them: the plumbing that
01_render_smpl.py (maps of real and target bodies), 01b_estimate_smpl.py (bodies fitted to photos),
02/03 (they read the maps) and the demo world (renders people) share. Not the paper's method itself.
  1. condition maps: the encoding (defined once, here) and file names
  2. the body: SMPL model files, batched forward, OpenPose-18 keypoints
  3. cameras, and the per-image parameter file
  4. poses: the built-in procedural source
  5. rendering: one pyrender pass gives depth + normal; condition_maps() makes all three maps

Camera convention (stored per image in smpl/<split>.npz and targets/<set>/params.npz): a pinhole
camera in OpenCV axes (x right, y down, z forward): x_cam = R @ X + t, pixel = K @ x_cam / z, for
an image of image_size = (height, width); X = the SMPL output vertices (transl = 0). The viewpoint
is placed around the body centre in the body's canonical frame (y up, facing +z): azimuth 0 =
camera in front, 90 = camera at the person's left side (+x), elevation > 0 = camera above.
K is fitted so that the body's projected box fills the frame like a Re-ID crop.
"""
import io
import os
import contextlib
import tempfile

import numpy as np

os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")  # headless OpenGL (Debian's libosmesa6), before pyrender loads
os.environ.setdefault("LP_NUM_THREADS", "1")  # OSMesa's rasteriser: one thread per process, we scale by processes
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from common import COND_KINDS
from util import UserError, save_image

# -----------------------------------------------------------------------------
# 1. Condition maps (depth / normal / skeleton): encoding and file names
# The encoding is defined here once: 01_render_smpl.py writes maps with it, 02/03 read them with
# load_conditions(). All three maps come from one camera, so their silhouettes coincide.
#   depth:    8-bit grey. On the body 1 - minmax(z) (near = bright), mapped to 1..255 so that
#             the farthest body pixel stays apart from the background (0).
#   normal:   8-bit RGB, OpenGL camera-space unit normal (x right, y up, z towards the viewer),
#             round(255 * (0.5 n + 0.5)); background 0 (no unit normal encodes to (0,0,0)).
#   skeleton: 8-bit RGB on black, OpenPose-18 body keypoints drawn like ControlNet's OpenPose
#             annotator: 17 limbs in the standard palette at 60% intensity, then the joints as
#             dots at full colour. Body joints are always drawn (OpenPose also guesses hidden
#             limbs); the face points (nose, eyes, ears) only when visible, because they are
#             what tells front from back. A keypoint with visible=False is left out.
# Files: <folder>/<stem>.<kind>.png, <stem> = image name without extension (or a target id).

OPENPOSE18 = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
              "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")
OPENPOSE_FACE = (0, 14, 15, 16, 17)
OPENPOSE_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
                  (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
OPENPOSE_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                   (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                   (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))


def cond_path(folder, stem, kind):
    return os.path.join(folder, f"{stem}.{kind}.png")


def encode_depth(z, mask):
    """z: HxW distance along the camera axis (any sign convention where larger = farther),
    mask: HxW bool body pixels -> HxW uint8."""
    out = np.zeros(z.shape, np.uint8)
    if mask.any():
        zb = z[mask]
        lo, hi = zb.min(), zb.max()
        d = 1.0 - (zb - lo) / max(hi - lo, 1e-8)  # near = 1, far = 0
        out[mask] = np.round(1 + 254 * d).astype(np.uint8)
    return out


def encode_normal(n, mask):
    """n: HxWx3 OpenGL camera-space normals, mask: HxW bool -> HxWx3 uint8."""
    n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-8)
    out = np.round(255 * (0.5 * np.clip(n, -1, 1) + 0.5)).astype(np.uint8)
    out[~mask] = 0
    return out


def decode_normal(img):
    """HxWx3 uint8 normal map -> (HxWx3 float unit normals, HxW bool mask)."""
    mask = img.max(axis=-1) > 0
    n = img.astype(np.float32) / 127.5 - 1.0
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-8)
    return n * mask[..., None], mask


def skeleton_width(height):
    """Limb width in pixels for an image of this height (ControlNet: 8 px at 512)."""
    return max(2, int(round(height / 48)))


def draw_skeleton(kp, visible, height, width):
    """kp: 18x2 pixel coordinates (x right, y down) in OpenPose-18 order, visible: 18 bools
    -> HxWx3 uint8 skeleton map."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    w = skeleton_width(height)
    for i, (a, b) in enumerate(OPENPOSE_LIMBS):
        if visible[a] and visible[b]:
            c = tuple(int(0.6 * v) for v in OPENPOSE_COLORS[i])
            draw.line([tuple(map(float, kp[a])), tuple(map(float, kp[b]))], fill=c, width=w)
    r = w / 2 + 0.5
    for i in range(18):
        if visible[i]:
            x, y = float(kp[i][0]), float(kp[i][1])
            draw.ellipse([x - r, y - r, x + r, y + r], fill=OPENPOSE_COLORS[i])
    return np.asarray(img)


def load_conditions(folder, stem, size=None):
    """-> {kind: float32 tensor (C, H, W) in [0, 1]} for depth (C=1), normal, skeleton (C=3).
    size: (height, width) to resize to (bilinear), None keeps the stored size."""
    out = {}
    for kind in COND_KINDS:
        p = cond_path(folder, stem, kind)
        if not os.path.exists(p):
            raise UserError(f"condition map '{p}' is missing: make it with "
                            f"'python 01_render_smpl.py conditions' (or 'targets')")
        try:
            with Image.open(p) as im:
                img = im.convert("L" if kind == "depth" else "RGB")
        except Exception as e:  # a truncated PNG (an interrupted copy): name it, say how to remake it
            raise UserError(f"condition map '{p}' cannot be read ({type(e).__name__}): delete it and render it again "
                            f"with 'python 01_render_smpl.py conditions' (or 'targets')")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out[kind] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def write_maps(folder, stem, maps):
    for kind in COND_KINDS:
        save_image(cond_path(folder, stem, kind), maps[kind])


def unreadable_map(folder, stem):
    """The first of an image's maps that is damaged (PIL's verify: every PNG chunk and its checksum,
    without decoding the pixels), else None."""
    for k in COND_KINDS:
        p = cond_path(folder, stem, k)
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception:
            return p
    return None


def check_conditions(items, groups, skip_missing=False):
    """02's training pairs: items [(image, map folder, stem)], groups [[item indices]] -> groups
    without the images that lack maps (only with skip_missing; else a clear error).
    Real photos whose SMPL fit was skipped (01b: too few confident keypoints) have no maps. A map
    that cannot be read (a truncated copy) is one line naming it, or with skip_missing counts as
    missing."""
    bad = [i for i, (_, c, s) in enumerate(items)
           if not all(os.path.isfile(cond_path(c, s, k)) for k in COND_KINDS)]
    missing, broken = set(bad), []
    for i, (_, c, s) in enumerate(tqdm(items, desc="checking maps", leave=False, mininterval=1.0, disable=None)):
        p = None if i in missing else unreadable_map(c, s)
        if p:
            broken.append((i, p))
    if broken and not skip_missing:
        raise UserError(f"condition map '{broken[0][1]}' cannot be read ({len(broken)} image(s) have such maps): "
                        f"delete it and render it again with 'python 01_render_smpl.py conditions', or pass "
                        f"--skip-missing-conditions to train without those images")
    bad = sorted(bad + [i for i, _ in broken])
    if bad and not skip_missing:
        _, c, s = items[bad[0]]
        raise UserError(f"condition maps missing for {len(bad)} of {len(items)} images (e.g. "
                        f"'{cond_path(c, s, 'depth')}'): make them with 'python 01_render_smpl.py "
                        f"conditions', or pass --skip-missing-conditions to train without those images")
    if bad:
        print(f"skipping {len(bad)} images without condition maps (e.g. '{items[bad[0]][0]}')")
    bad = set(bad)
    groups = [[i for i in g if i not in bad] for g in groups]
    return [g for g in groups if len(g) >= 2]


# -----------------------------------------------------------------------------
# 2. The body: SMPL model files, forward, OpenPose-18 keypoints

OPEN_BODY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "open_body.npz")
SMPL_URL = "https://smpl.is.tue.mpg.de"
PARAM_KEYS = ("betas", "global_orient", "body_pose", "elevation", "azimuth", "K", "R", "t", "image_size")
CAM_DISTANCE = 8.0   # metres: a surveillance camera some way off (perspective stays mild)
FILL = 0.92          # the body's projected box fills this fraction of the frame (Re-ID crop margin)
SMPL_JOINTS = ("pelvis", "l_hip", "r_hip", "spine1", "l_knee", "r_knee", "spine2", "l_ankle", "r_ankle", "spine3",
               "l_foot", "r_foot", "neck", "l_collar", "r_collar", "head", "l_shoulder", "r_shoulder", "l_elbow",
               "r_elbow", "l_wrist", "r_wrist", "l_hand", "r_hand")
# smplx appends keypoints taken from vertices after the 24 joints; the first five are the face
SMPL_EXTRA = ("nose", "r_eye", "l_eye", "r_ear", "l_ear")
# OpenPose-18 point -> index into the SMPL joints (+ SMPL_EXTRA at 24..); None = the neck, which
# OpenPose puts between the shoulders
OPENPOSE18_SMPL = tuple(None if n == "neck" else (SMPL_JOINTS + SMPL_EXTRA).index(n) for n in OPENPOSE18)
# COCO-17 (ViTPose, 4D-Humans, ...) keypoint order; every COCO point is an OpenPose-18 point by name
COCO17 = ("nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
          "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle")
COCO17_TO_OPENPOSE18 = tuple(OPENPOSE18.index(n) for n in COCO17)


def load_body(path=None, extra=None):
    """smplx.SMPL for the open body (default) or an official SMPL file (.npz / converted .pkl).
    extra: optional dict of arrays appended to the model (the demo world's backpack vertices)."""
    import smplx
    path = path or OPEN_BODY
    if not os.path.exists(path):
        raise UserError(f"SMPL model file '{path}' not found: download SMPL (SMPL_NEUTRAL) from {SMPL_URL} "
                        f"and pass --smpl-model PATH (or leave it out to use the open body)")
    if path.endswith(".pkl"):
        try:
            import pickle
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
        except ModuleNotFoundError as e:
            raise UserError(f"'{path}' needs {e.name} to unpickle (official SMPL .pkl files do): convert it "
                            f"once with 'python tools/convert_smpl_pkl.py {path} OUT.npz' and pass OUT.npz")
        d = {k: np.asarray(v) for k, v in d.items() if k in ("v_template", "shapedirs", "posedirs", "J_regressor",
                                                              "weights", "kintree_table", "f")}
    else:
        try:
            with np.load(path) as z:
                d = {k: z[k] for k in z.files}
        except Exception as e:
            raise UserError(f"SMPL model file '{path}' cannot be read ({type(e).__name__}): it may be truncated; "
                            f"copy it again (or leave --smpl-model out to use the open body)")
    missing = [k for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
               if k not in d]
    if missing:
        raise UserError(f"'{path}' is not an SMPL model file: keys {missing} are missing")
    if hasattr(d["J_regressor"], "toarray"):
        d["J_regressor"] = d["J_regressor"].toarray()
    # smplx's default vertex ids index SMPL's own 6,890 vertices: other meshes bring their own
    vids = {k[len("vertex_ids_"):]: int(v) for k, v in d.items() if k.startswith("vertex_ids_")} or None
    d = {k: v for k, v in d.items() if not k.startswith("vertex_ids_")}
    if extra is not None:
        d["shapedirs"] = d["shapedirs"][..., :extra["shapedirs"].shape[-1]]  # SMPL 1.1 files have 300 betas
        for k in ("v_template", "shapedirs", "posedirs", "weights"):
            d[k] = np.concatenate([d[k], extra[k]], 0)
        d["J_regressor"] = np.concatenate([d["J_regressor"], np.zeros((24, len(extra["v_template"])))], 1)
    nb = min(10, d["shapedirs"].shape[-1])
    with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a warning about 10 betas
        model = smplx.SMPL(model_path=path, data_struct=smplx.utils.Struct(**d), vertex_ids=vids, num_betas=nb)
    model.body_faces = np.asarray(d["f"], dtype=np.int64)
    model.num_body_vertices = len(d["v_template"]) - (0 if extra is None else len(extra["v_template"]))
    model.source = os.path.basename(path)
    return model.eval()


def body_chunks(model, betas, global_orient, body_pose, chunk=256):
    """SMPL forward a chunk of bodies at a time (numpy in, numpy out): yields vertices (n,V,3),
    joints (n,45,3), so that a caller over thousands of bodies need not hold every mesh at once."""
    for s in range(0, len(body_pose), chunk):
        f = lambda a: torch.as_tensor(np.asarray(a[s:s + chunk]), dtype=torch.float32)
        with torch.no_grad():
            o = model(betas=f(betas)[:, :model.num_betas], global_orient=f(global_orient), body_pose=f(body_pose)[:, :69])
        yield o.vertices.numpy(), o.joints.numpy()


def body_forward(model, betas, global_orient, body_pose, chunk=256):
    """Batched SMPL forward (numpy in, numpy out): vertices (N,V,3), joints (N,45,3)."""
    parts = list(body_chunks(model, betas, global_orient, body_pose, chunk))
    return np.concatenate([v for v, _ in parts]), np.concatenate([j for _, j in parts])


def openpose18(joints):
    """SMPL joints (+ smplx's extra face keypoints at 24..28: nose, reye, leye, rear, lear) ->
    (N,18,3) OpenPose-18 keypoints in OPENPOSE18 order."""
    j = joints
    neck = 0.5 * (j[:, 16] + j[:, 17])  # OpenPose's neck sits between the shoulders
    return np.stack([neck if i is None else j[:, i] for i in OPENPOSE18_SMPL], 1)

# -----------------------------------------------------------------------------
# 3. Cameras (convention: the module docstring and docs/formats.md) and the per-image parameter file

def look_at(elevation, azimuth, centre, distance=CAM_DISTANCE):
    """World->camera (R, t) in OpenCV axes for a camera on a sphere around `centre`."""
    e, a = np.radians(elevation), np.radians(azimuth)
    pos = centre + distance * np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)])
    z = centre - pos
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 1.0, 0.0])   # camera x = right in the image
    x /= np.linalg.norm(x)
    y = np.cross(z, x)                 # camera y = down in the image
    R = np.stack([x, y, z])
    return R, -R @ pos


def viewpoint(R, t, centre):
    """Inverse of look_at: (elevation, azimuth) in degrees of the camera (R, t) seen from `centre`
    (all batched: R (N,3,3), t (N,3), centre (N,3)); azimuth in [0, 360)."""
    C = -np.einsum("nji,nj->ni", R, t)  # camera centre in the body frame: -R^T t
    d = C - centre
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    return np.degrees(np.arcsin(np.clip(d[:, 1], -1, 1))), np.degrees(np.arctan2(d[:, 0], d[:, 2])) % 360


def project(X, K, R, t):
    """(N,3) world points -> (N,2) pixels (x right, y down) and (N,) depth along the camera axis."""
    xc = X @ R.T + t
    uv = xc @ K.T
    return uv[:, :2] / uv[:, 2:3], xc[:, 2]


def load_params(path):
    """A per-image SMPL file (smpl/<split>.npz) or a target set's params.npz -> dict of arrays."""
    if not os.path.exists(path):
        raise UserError(f"SMPL parameter file '{path}' not found (the demo world writes <data>/smpl/<split>.npz, "
                        f"01b_estimate_smpl.py writes <out>/<split>.npz for real photos; a target set writes "
                        f"targets/<set>/params.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"SMPL parameter file '{path}' cannot be read ({type(e).__name__}): it may be truncated; "
                        f"write it again (demo/world.py, 01b_estimate_smpl.py fit or import, 01 targets)")
    missing = [k for k in PARAM_KEYS if k not in d]
    if missing:
        raise UserError(f"'{path}' lacks keys {missing}: expected {list(PARAM_KEYS)} (see docs/formats.md)")
    return d


def fit_camera(verts, elevation, azimuth, size, fill=FILL):
    """Camera (K, R, t) that looks at the body centre from (elevation, azimuth) and frames the
    projected body like a Re-ID crop: uniform scale so the box fits `fill` of the frame, centred."""
    H, W = size
    vt = np.ascontiguousarray(verts.T)  # (3,N): numpy's min/max over a length-3 inner axis is 40x slower
    centre = 0.5 * (vt.min(1) + vt.max(1)).astype(np.float64)
    R, t = look_at(elevation, azimuth, centre)
    xc = R.astype(vt.dtype) @ vt + t.astype(vt.dtype)[:, None]
    uv = xc[:2] / xc[2]                         # normalised image coordinates (focal 1)
    lo, hi = uv.min(1), uv.max(1)
    f = fill * min(W / (hi[0] - lo[0]), H / (hi[1] - lo[1]))
    mid = 0.5 * (lo + hi)
    K = np.array([[f, 0, W / 2 - f * mid[0]], [0, f, H / 2 - f * mid[1]], [0, 0, 1.0]])
    return K, R, t


def scale_camera(K, old_size, new_size):
    """K for the same view at another image size (a resize of the image)."""
    sy, sx = new_size[0] / old_size[0], new_size[1] / old_size[1]
    K = np.array(K, dtype=np.float64).copy()
    K[..., 0, :] *= sx
    K[..., 1, :] *= sy
    return K


def parse_size(s):
    """'192x384' (width x height, as the paper writes it) -> (height, width)."""
    try:
        w, h = (int(v) for v in s.lower().split("x"))
        assert w > 0 and h > 0
    except Exception:
        raise UserError(f"bad --size '{s}': expected WIDTHxHEIGHT, e.g. 192x384 (paper) or 64x128 (demo)")
    return h, w

# -----------------------------------------------------------------------------
# 4. Poses: the built-in procedural source (an AMASS-style bank is read by 01_render_smpl.py)

JOINTS = list(SMPL_JOINTS)
ID_KINDS = ("walk", "stand")
OOD_KINDS = ("arms_up", "reach", "crouch", "lean", "kick", "turn", "dance")


def _rot(x=0.0, y=0.0, z=0.0):
    """Rotation from Euler angles in degrees, applied z first, then y, then x (extrinsic), as a
    scipy Rotation. Signs in the SMPL rest frame (y up, facing +z, left on +x): hip x < 0 = leg
    forward, knee x > 0 = flex, spine x > 0 = bend forward, l_shoulder z < 0 = left arm down,
    r_shoulder z > 0 = right arm down, l_elbow y < 0 / r_elbow y > 0 = forearm forward."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_euler("xyz", [x, y, z], degrees=True)


def _pose(rots, root=None):
    """{joint name: Rotation} -> (global_orient (3,), body_pose (69,)) axis-angle."""
    bp = np.zeros((23, 3))
    for name, r in rots.items():
        bp[JOINTS.index(name) - 1] = r.as_rotvec()
    return (np.zeros(3) if root is None else root.as_rotvec()), bp.ravel()


def procedural_pose(rng, kind):
    """One SMPL pose of the given kind. In-distribution kinds (walk, stand) are what the demo
    world's TRAIN cameras see; the others are out-of-distribution, kept inside joint limits."""
    u = rng.uniform
    j = {}
    arm_l, arm_r = -u(68, 80), u(68, 80)  # arms hanging (T-pose arms point along +-x)
    j["l_shoulder"], j["r_shoulder"] = _rot(z=arm_l), _rot(z=arm_r)
    j["l_elbow"], j["r_elbow"] = _rot(y=-u(5, 25)), _rot(y=u(5, 25))
    j["head"] = _rot(x=u(-8, 8), y=u(-10, 10))
    root = _rot(x=u(-3, 3), y=u(-8, 8))
    if kind == "walk":
        a, s = u(0.6, 1.2), np.sin(u(0, 2 * np.pi))
        c = np.sqrt(1 - s * s) * rng.choice([-1, 1])
        j["l_hip"], j["r_hip"] = _rot(x=-28 * a * s), _rot(x=28 * a * s)
        j["l_knee"] = _rot(x=5 + 45 * a * max(0.0, c) ** 2 + 10 * a * max(0.0, -s))
        j["r_knee"] = _rot(x=5 + 45 * a * max(0.0, -c) ** 2 + 10 * a * max(0.0, s))
        j["l_shoulder"] = _rot(x=22 * a * s) * _rot(z=arm_l)
        j["r_shoulder"] = _rot(x=-22 * a * s) * _rot(z=arm_r)
        j["spine1"], j["spine3"] = _rot(x=u(0, 4), y=4 * a * s), _rot(y=4 * a * s)
    elif kind == "stand":
        j["l_hip"], j["r_hip"] = _rot(x=u(-6, 4), z=u(0, 5)), _rot(x=u(-6, 4), z=-u(0, 5))
        j["l_knee" if rng.random() < 0.5 else "r_knee"] = _rot(x=u(0, 12))
        j["l_shoulder"] = _rot(x=u(-10, 10)) * _rot(z=arm_l)
        j["r_shoulder"] = _rot(x=u(-10, 10)) * _rot(z=arm_r)
    elif kind == "arms_up":
        mode = rng.choice(["both", "l", "r"], p=[0.5, 0.25, 0.25])
        if mode in ("both", "l"):
            j["l_shoulder"] = _rot(x=u(-20, 10), z=u(40, 110))
        if mode in ("both", "r"):
            j["r_shoulder"] = _rot(x=u(-20, 10), z=-u(40, 110))
        j["l_elbow"], j["r_elbow"] = _rot(y=-u(0, 90)), _rot(y=u(0, 90))
    elif kind == "reach":
        for s, sg in (("l", -1), ("r", 1)):
            if rng.random() < 0.7:
                j[f"{s}_shoulder"] = _rot(y=sg * u(50, 95), z=sg * u(-30, 20))
                j[f"{s}_elbow"] = _rot(y=sg * u(0, 40))
        j["spine2"] = _rot(x=u(0, 15))
    elif kind == "crouch":
        h = u(70, 115)
        j["l_hip"], j["r_hip"] = _rot(x=-h, z=u(5, 20)), _rot(x=-h, z=-u(5, 20))
        j["l_knee"], j["r_knee"] = _rot(x=u(90, 135)), _rot(x=u(90, 135))
        j["l_ankle"], j["r_ankle"] = _rot(x=-u(10, 30)), _rot(x=-u(10, 30))
        j["spine1"], j["spine2"] = _rot(x=u(5, 20)), _rot(x=u(5, 15))
        j["l_shoulder"], j["r_shoulder"] = _rot(y=-u(20, 70), z=-u(20, 60)), _rot(y=u(20, 70), z=u(20, 60))
        j["l_elbow"], j["r_elbow"] = _rot(y=-u(20, 90)), _rot(y=u(20, 90))
    elif kind == "lean":
        fwd, side = u(-10, 25), u(-15, 15)
        for name in ("spine1", "spine2", "spine3"):
            j[name] = _rot(x=fwd, z=side)
        j["l_hip"], j["r_hip"] = _rot(x=-u(0, 20)), _rot(x=-u(0, 20))
    elif kind == "kick":
        s, o = ("l", "r") if rng.random() < 0.5 else ("r", "l")
        j[f"{s}_hip"] = _rot(x=-u(45, 90), z=(1 if s == "l" else -1) * u(0, 15))
        j[f"{s}_knee"] = _rot(x=u(0, 45))
        j[f"{o}_knee"] = _rot(x=u(0, 15))
        j["l_shoulder"], j["r_shoulder"] = _rot(z=-u(10, 45)), _rot(z=u(10, 45))
        j["spine1"] = _rot(x=-u(0, 10))
    elif kind == "turn":
        tw = u(-35, 35)
        for name in ("spine1", "spine2", "spine3"):
            j[name] = _rot(y=tw)
        j["head"] = _rot(x=u(-10, 10), y=tw + u(-30, 30))
        root = _rot(y=u(-45, 45))
        j["l_shoulder"] = _rot(x=u(-30, 30)) * _rot(z=arm_l)
        j["r_shoulder"] = _rot(x=u(-30, 30)) * _rot(z=arm_r)
    elif kind == "dance":
        j["l_shoulder"] = _rot(y=-u(-30, 60), z=u(-70, 110))
        j["r_shoulder"] = _rot(y=u(-30, 60), z=-u(-70, 110))
        j["l_elbow"], j["r_elbow"] = _rot(y=-u(0, 120)), _rot(y=u(0, 120))
        s = "l" if rng.random() < 0.5 else "r"
        j[f"{s}_hip"] = _rot(x=-u(0, 70), z=(1 if s == "l" else -1) * u(0, 30))
        j[f"{s}_knee"] = _rot(x=u(0, 100))
        j["spine2"] = _rot(z=u(-15, 15), y=u(-20, 20))
        root = _rot(y=u(-30, 30), z=u(-8, 8))
    else:
        raise ValueError(kind)
    return _pose(j, root)


def procedural_poses(rng, n, source):
    """n poses from source 'id' (walk / stand) or 'ood' (OOD_KINDS) -> global_orient (n,3),
    body_pose (n,69), kinds (n,) str."""
    kinds = rng.choice(ID_KINDS if source == "id" else OOD_KINDS, size=n, p=[0.7, 0.3] if source == "id" else None)
    go, bp = zip(*[procedural_pose(rng, k) for k in kinds])
    return np.stack(go), np.stack(bp), np.asarray(kinds)

# -----------------------------------------------------------------------------
# 5. Rendering: pyrender + OSMesa, one custom shader that writes camera-space normals (or baked
# vertex colours) to the colour buffer, so one pass gives normal + depth (normals from finite
# differences of depth came out 2 degrees off and faceted)

VERT_SHADER = """#version 330 core
layout(location = 0) in vec3 position;
#ifdef COLOR_0_LOC
layout(location = COLOR_0_LOC) in vec4 color_0;
#endif
layout(location = INST_M_LOC) in mat4 inst_m;
uniform mat4 M;
uniform mat4 V;
uniform mat4 P;
out vec3 frag_pos;
out vec4 frag_color;
void main() {
    vec4 p = V * M * inst_m * vec4(position, 1.0);
    frag_pos = p.xyz;  // OpenGL camera space
    gl_Position = P * p;
#ifdef COLOR_0_LOC
    frag_color = color_0;
#else
    frag_color = vec4(0.0);
#endif
}
"""
# The normal is the triangle's own plane normal, from screen-space derivatives of the camera-space
# position (exact within a triangle, no per-vertex normals to compute or upload). At Re-ID sizes a
# triangle of the 13.7k-vertex body covers one or two pixels, so smooth shading would add nothing.
FRAG_SHADER = """#version 330 core
in vec3 frag_pos;
in vec4 frag_color;
out vec4 frag_out;
void main() {
#ifdef COLOR_0_LOC
    frag_out = vec4(frag_color.rgb, 1.0);
#else
    vec3 n = normalize(cross(dFdx(frag_pos), dFdy(frag_pos)));
    frag_out = vec4(0.5 * n + 0.5, 1.0);
#endif
}
"""


class Renderer:
    """One OffscreenRenderer per process (OSMesa allows no more), deleted explicitly: a process that exits
    with a live OSMesa renderer segfaults."""

    def __init__(self, faces):
        # Mesa (OSMesa's llvmpipe) and triton each bring their own LLVM, and triton loaded after Mesa
        # segfaults; torch._dynamo loads triton (transformers' models do), so triton goes first
        try:
            import triton  # noqa: F401
        except Exception:  # no triton (a CPU-only torch build): nothing to clash with
            pass
        try:
            import pyrender
            from pyrender.shader_program import ShaderProgram
        except Exception as e:  # ImportError, or PyOpenGL failing to find OSMesa
            raise UserError(f"no OpenGL backend for pyrender ({type(e).__name__}: {str(e)[:80]}): install "
                                   f"Debian's libosmesa6 (apt-get install libosmesa6) and keep PYOPENGL_PLATFORM=osmesa")
        self.pyrender = pyrender
        self.faces = np.asarray(faces, dtype=np.int64)
        self.size = None
        self.r = None
        d = tempfile.mkdtemp(prefix="diffid_shaders_")
        for name, src in (("cond.vert", VERT_SHADER), ("cond.frag", FRAG_SHADER)):
            with open(os.path.join(d, name), "w") as f:
                f.write(src)
        programs = {}

        class Cache:  # pyrender asks its program cache for a shader: ours always answers with cond.*
            def get_program(self, vertex_shader, fragment_shader, geometry_shader=None, defines=None):
                key = tuple(sorted((defines or {}).items()))
                if key not in programs:
                    programs[key] = ShaderProgram(os.path.join(d, "cond.vert"), os.path.join(d, "cond.frag"),
                                                  defines=defines)
                return programs[key]

            def clear(self):
                for p in programs.values():
                    p.delete()
                programs.clear()
        self.cache = Cache()
        self.scene = pyrender.Scene(bg_color=np.zeros(4), ambient_light=np.zeros(3))
        self.cam_node = None
        self.mesh_node = None
        self.flags = pyrender.RenderFlags.NONE  # back faces culled: the body is a closed, outward-wound mesh
        # sparse vertex-face incidence: smooth vertex normals in one mat-vec product per frame
        self.incidence = {}
        self._setup((16, 16))  # open the GL context now: a missing backend fails before any work

    def _incidence(self, faces, nv):
        key = (id(faces), len(faces), nv)
        if key not in self.incidence:
            import scipy.sparse
            F = len(faces)
            rows = faces.ravel()
            cols = np.repeat(np.arange(F), 3)
            self.incidence[key] = scipy.sparse.csr_matrix((np.ones(3 * F, np.float32), (rows, cols)), shape=(nv, F))
        return self.incidence[key]

    def vertex_normals(self, verts, faces):
        v = verts[faces]
        fn = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])  # area-weighted face normals
        vn = self._incidence(faces, len(verts)) @ fn
        return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)

    def _setup(self, size):
        pr = self.pyrender
        H, W = size
        if self.r is None or self.size != (H, W):
            try:
                if self.r is None:
                    self.r = pr.OffscreenRenderer(W, H)
                else:
                    self.r.viewport_width, self.r.viewport_height = W, H
            except Exception as e:
                raise UserError(f"cannot open an OpenGL context ({type(e).__name__}: {str(e)[:80]}): install "
                                       f"Debian's libosmesa6 (apt-get install libosmesa6) and set PYOPENGL_PLATFORM=osmesa")
            self.size = (H, W)

    def render(self, verts, K, R, t, size, faces=None, colors=None):
        """One pass. Returns (rgb HxWx3 uint8, z HxW float metres along the camera axis, 0 = background).
        colors None: rgb is the encoded camera-space normal (0.5 n + 0.5) of each triangle; else the
        given per-vertex colours (already shaded) are interpolated."""
        pr = self.pyrender
        self._setup(size)
        if self.r._renderer is not None and self.r._renderer._program_cache is not self.cache:
            self.r._renderer._program_cache = self.cache
        faces = self.faces if faces is None else faces
        verts = np.asarray(verts, dtype=np.float32)
        kw = dict(positions=verts, indices=faces)
        if colors is not None:
            kw["color_0"] = np.concatenate([colors, np.ones((len(colors), 1))], 1).astype(np.float32)
        self.place(pr.Mesh([pr.Primitive(mode=4, **kw)]), K, R, t)
        rgb, z = self.r.render(self.scene, flags=self.flags)
        if self.r._renderer._program_cache is not self.cache:  # first render created the GL renderer
            self.r._renderer._program_cache = self.cache
            rgb, z = self.r.render(self.scene, flags=self.flags)
        return rgb, z

    def place(self, mesh, K, R, t):
        """Put this mesh (replacing the last one) and a camera with intrinsics K and world->camera
        R, t into the scene. OpenCV (x right, y down, z forward) -> OpenGL camera pose (x right,
        y up, z back)."""
        pr = self.pyrender
        if self.mesh_node is not None:
            self.scene.remove_node(self.mesh_node)
        self.mesh_node = self.scene.add(mesh)
        cam = pr.IntrinsicsCamera(K[0, 0], K[1, 1], K[0, 2], K[1, 2], znear=0.5, zfar=50.0)
        pose = np.eye(4)
        pose[:3, :3] = R.T @ np.diag([1.0, -1.0, -1.0])
        pose[:3, 3] = -R.T @ t
        if self.cam_node is not None:
            self.scene.remove_node(self.cam_node)
        self.cam_node = self.scene.add(cam, pose=pose)

    def delete(self):
        if self.r is not None:
            self.r.delete()
            self.r = None


def condition_maps(renderer, verts, joints, K, R, t, size, faces=None):
    """depth, normal, skeleton maps (uint8, py 5 encoding) of one posed body. The depth and
    normal come from the same single render pass, so their silhouettes coincide by construction."""
    rgb, z = renderer.render(verts, K, R, t, size, faces=faces)
    mask = z > 0
    depth = encode_depth(z, mask)
    # the shader wrote round(255 * (0.5 n + 0.5)) into the 8-bit buffer over a (0,0,0) background:
    # that IS encode_normal (the tests check that decode -> encode gives it back)
    normal = rgb
    skeleton = skeleton_map(openpose18(joints[None])[0], z, K, R, t, size)
    return dict(depth=depth, normal=normal, skeleton=skeleton), mask


def skeleton_map(kp3d, z, K, R, t, size, tol=0.03):
    """Project OpenPose-18 keypoints; face points (nose, eyes, ears) only when the rendered depth at
    their pixel shows them (not hidden behind the head): that is what tells front from back."""
    H, W = size
    uv, d = project(kp3d, K, R, t)
    vis = np.ones(18, bool)
    for i in OPENPOSE_FACE:
        x, y = int(np.floor(uv[i, 0])), int(np.floor(uv[i, 1]))
        if not (0 <= x < W and 0 <= y < H):
            vis[i] = False
            continue
        zz = z[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
        zz = zz[zz > 0]
        vis[i] = zz.size > 0 and d[i] <= zz.min() + tol
    return draw_skeleton(uv, vis, H, W)


