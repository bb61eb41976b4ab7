"""
Stage 01: SMPL bodies -> depth / normal / skeleton condition maps (paper 3.2-3.3), viewpoint and
pose sampling, the built-in synthetic Re-ID world ("demo") with its oracle, and Figure 3.

  python 01_render_smpl.py world      --out runs/demo/world            # the demo data set
  python 01_render_smpl.py conditions --data runs/demo/world --out runs/demo/conditions
                 (real photos: --data DATA --smpl runs/<ds>/smpl, the sidecars of 01b_estimate_smpl.py)
  python 01_render_smpl.py targets    --out runs/demo/targets/vi --poses ood --views uniform
  python 01_render_smpl.py oracle     --manifest runs/demo/augmented/vi/manifest.csv
                 --targets runs/demo/targets/vi --world runs/demo/world --out runs/demo/augmented/oracle
  python 01_render_smpl.py figures    --data runs/demo/world --targets runs/demo/targets/vi
  python 01_render_smpl.py --benchmark

Body: the open SMPL-layout body in assets/open_body.npz (CC0, see assets/README.md) by default;
--smpl-model PATH selects an official SMPL file (.npz, or a .pkl converted with
tools/convert_smpl_pkl.py). The condition-map encoding lives in common.py section 5.

Camera convention (stored per image in smpl/<split>.npz and targets/<set>/params.npz): a pinhole
camera in OpenCV axes (x right, y down, z forward): x_cam = R @ X + t, pixel = K @ x_cam / z, for
an image of image_size = (height, width); X = the SMPL output vertices (transl = 0). The viewpoint
is placed around the body centre in the body's canonical frame (y up, facing +z): azimuth 0 =
camera in front, 90 = camera at the person's left side (+x), elevation > 0 = camera above.
K is fitted so that the body's projected box fills the frame like a Re-ID crop.
"""
import os
import csv
import json
import time
import argparse
import tempfile

import numpy as np

os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")  # headless OpenGL (Debian's libosmesa6)
os.environ.setdefault("LP_NUM_THREADS", "1")  # OSMesa's rasteriser: one thread per process, we scale by processes
import torch
from tqdm import tqdm

import common

HERE = os.path.dirname(os.path.abspath(__file__))
# body, SMPL forward, OpenPose joints, camera and the sidecar reader live in common.py section 5:
# the estimation stage (01b_estimate_smpl.py) shares them
from common import OPEN_BODY, FILL, load_body, body_forward, openpose18, look_at, project, load_params  # noqa: E402

# -----------------------------------------------------------------------------
# cameras and viewpoints

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


def sample_views(rng, n, kind):
    """(elevation, azimuth) in degrees. uniform: the paper's U[0,30] x U[0,360) (DESIGN.md 3);
    train: like the demo world's train cameras (elevation 8-14, walking towards or away)."""
    if kind == "uniform":
        return rng.uniform(0, 30, n), rng.uniform(0, 360, n)
    if kind == "train":
        return rng.uniform(8, 14, n), (rng.integers(0, 2, n) * 180 + rng.normal(0, 10, n)) % 360
    raise common.UserError(f"unknown viewpoint distribution '{kind}': use 'uniform' or 'train'")

# -----------------------------------------------------------------------------
# renderer: pyrender + OSMesa, one custom shader that writes camera-space normals (or baked
# vertex colours) to the colour buffer, so one pass gives normal + depth (DESIGN.md 3)

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
    """One OffscreenRenderer per process (DESIGN.md 3), deleted explicitly: a process that exits
    with a live OSMesa renderer segfaults."""

    def __init__(self, faces):
        try:
            import pyrender
            from pyrender.shader_program import ShaderProgram
        except Exception as e:  # ImportError, or PyOpenGL failing to find OSMesa
            raise common.UserError(f"no OpenGL backend for pyrender ({type(e).__name__}: {str(e)[:80]}): install "
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
                raise common.UserError(f"cannot open an OpenGL context ({type(e).__name__}: {str(e)[:80]}): install "
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
    """depth, normal, skeleton maps (uint8, common.py 5 encoding) of one posed body. The depth and
    normal come from the same single render pass, so their silhouettes coincide by construction."""
    rgb, z = renderer.render(verts, K, R, t, size, faces=faces)
    mask = z > 0
    depth = common.encode_depth(z, mask)
    # the shader wrote round(255 * (0.5 n + 0.5)) into the 8-bit buffer over a (0,0,0) background:
    # that IS common.encode_normal (the tests check that decode -> encode gives it back)
    normal = rgb
    skeleton = draw_skeleton(openpose18(joints[None])[0], z, K, R, t, size)
    return dict(depth=depth, normal=normal, skeleton=skeleton), mask


def draw_skeleton(kp3d, z, K, R, t, size, tol=0.03):
    """Project OpenPose-18 keypoints; face points (nose, eyes, ears) only when the rendered depth at
    their pixel shows them (not hidden behind the head): that is what tells front from back."""
    H, W = size
    uv, d = project(kp3d, K, R, t)
    vis = np.ones(18, bool)
    for i in common.OPENPOSE_FACE:
        x, y = int(np.floor(uv[i, 0])), int(np.floor(uv[i, 1]))
        if not (0 <= x < W and 0 <= y < H):
            vis[i] = False
            continue
        zz = z[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
        zz = zz[zz > 0]
        vis[i] = zz.size > 0 and d[i] <= zz.min() + tol
    return common.draw_skeleton(uv, vis, H, W)


def write_maps(folder, stem, maps):
    for kind in common.COND_KINDS:
        common.save_image(common.cond_path(folder, stem, kind), maps[kind])

# -----------------------------------------------------------------------------
# poses: an AMASS-style bank, or the built-in procedural source

JOINTS = list(common.SMPL_JOINTS)
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
        raise common.UserError(f"pose bank '{path}' not found")
    try:
        z = np.load(path)
    except Exception as e:
        raise common.UserError(f"pose bank '{path}' is not a readable .npz file ({type(e).__name__})")
    if "poses" not in z.files:
        raise common.UserError(f"pose bank '{path}' has no key 'poses' (found {z.files}): expected an AMASS-style "
                               f".npz with poses of shape N x 72 (or more) in SMPL axis-angle")
    p = np.asarray(z["poses"], dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 72 or len(p) == 0:
        raise common.UserError(f"pose bank '{path}': 'poses' has shape {p.shape}, expected N x 72 (or more) "
                               f"SMPL axis-angle")
    body = np.concatenate([p[:, 3:66], np.zeros((len(p), 6))], 1) if p.shape[1] == 156 else p[:, 3:72]
    betas = np.zeros((len(p), 10))
    if "betas" in z.files:
        b = np.asarray(z["betas"], dtype=np.float64)
        b = np.broadcast_to(b.reshape(1, -1) if b.ndim == 1 else b, (len(p), b.shape[-1]))
        k = min(10, b.shape[1])
        betas[:, :k] = b[:, :k]
    return upright(p[:, :3], up), body, betas

# -----------------------------------------------------------------------------
# parameter files (smpl/<split>.npz sidecars and targets/<set>/params.npz share the keys)

def parse_size(s):
    """'192x384' (width x height, as the paper writes it) -> (height, width)."""
    try:
        w, h = (int(v) for v in s.lower().split("x"))
        assert w > 0 and h > 0
    except Exception:
        raise common.UserError(f"bad --size '{s}': expected WIDTHxHEIGHT, e.g. 192x384 (paper) or 64x128 (demo)")
    return h, w

# -----------------------------------------------------------------------------
# the built-in synthetic Re-ID world (DESIGN.md 4). A "hard identity" world: a small clothing
# palette, so people are told apart by view-dependent details (chest logo, back patch, backpack,
# stripes, sleeve and trouser length, hair) as well as shape and colour. The TRAIN cameras are
# strongly biased (front/back walking, elevation 8-14 degrees); the shifted test split is not.

TOPS = [(190, 35, 35), (35, 60, 150), (225, 225, 220), (40, 40, 44), (60, 125, 65), (140, 140, 140)]
BOTTOMS = [(35, 35, 45), (45, 65, 120), (125, 105, 75), (150, 150, 150)]
SHOES = [(25, 25, 25), (225, 225, 225), (105, 70, 45)]
SKINS = [(245, 208, 170), (230, 184, 135), (205, 150, 105), (165, 112, 70), (110, 72, 45)]
HAIRS = [(25, 20, 15), (75, 50, 30), (150, 110, 65), (195, 165, 110), (115, 115, 115)]
ACCENTS = [(240, 200, 20), (20, 170, 200), (230, 110, 20), (150, 30, 160), (250, 250, 250), (200, 30, 30)]
TRAIN_CAMS = {1: 9.0, 2: 11.0, 3: 13.0}   # camera -> elevation (degrees), +-1 jitter per image
SHIFTED_CAMS = (4, 5, 6)                   # diverse viewpoints and poses


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
        common.save_image(os.path.join(root, j["folder"], j["name"]), img)
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
        raise common.UserError("the world needs at least 1 train id, 1 test id and 2 images per camera "
                               "(one query + one gallery image)")
    rng = np.random.default_rng(args.seed)
    idents = [sample_identity(rng, p, "train") for p in range(1, n_train + 1)]
    idents += [sample_identity(rng, p, "test") for p in range(n_train + 1, n_train + n_test + 1)]
    styles = [camera_style(rng, f"c{cam}") for cam in (*TRAIN_CAMS, *SHIFTED_CAMS, common.AUG_CAMERA)]
    meta = dict(format="diff-id demo world v1", seed=args.seed, model=os.path.basename(args.smpl_model or OPEN_BODY),
                config=dict(size=[H, W], train_ids=n_train, test_ids=n_test, images_per_camera=k,
                            train_cameras={str(c): e for c, e in TRAIN_CAMS.items()},
                            shifted_cameras=list(SHIFTED_CAMS), oracle_style=f"c{common.AUG_CAMERA}"),
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
        common.save_npz(os.path.join(root, "smpl", split + ".npz"), names=np.array([j["name"] for j in js]),
                        betas=np.array([pid2b[j["pid"]] for j in js], np.float32),
                        global_orient=np.stack([j["global_orient"] for j in js]).astype(np.float32),
                        body_pose=np.stack([j["body_pose"] for j in js]).astype(np.float32),
                        elevation=np.array([j["elevation"] for j in js], np.float32),
                        azimuth=np.array([j["azimuth"] for j in js], np.float32),
                        K=K.astype(np.float32), R=R.astype(np.float32), t=t.astype(np.float32),
                        image_size=np.tile([H, W], (len(js), 1)).astype(np.int32),
                        camera=np.array([j["camera"] for j in js], np.int32),
                        pose_kind=np.array([j["pose_kind"] for j in js]), model=np.array(meta["model"]))
    common.save_json(os.path.join(args.out, "identities.json"), meta)
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs) / 1e6
    print(f"wrote {n} images + smpl/*.npz sidecars + identities.json under {args.out}: "
          f"{size_mb:.1f} MB in {time.time() - t0:.0f} s")
    for folder, js in jobs.items():
        print(f"  {folder}: {len(js)} images, {len({j['pid'] for j in js})} ids")

# -----------------------------------------------------------------------------
# subcommands: targets, conditions, oracle

def make_targets(args):
    t0 = time.time()
    torch.set_num_threads(1)
    size = parse_size(args.size)
    rng = np.random.default_rng(args.seed)
    P, Q = args.num_poses, args.views_per_pose
    if P < 1 or Q < 1:
        raise common.UserError("--num-poses and --views-per-pose must be at least 1")
    if args.pose_bank:
        go, bp, betas = load_pose_bank(args.pose_bank, args.bank_up)
        pick = rng.choice(len(bp), size=P, replace=len(bp) < P)
        go, bp, betas = go[pick], bp[pick], betas[pick]
        pose_ids, source = pick, f"bank:{os.path.basename(args.pose_bank)}"
        kinds = np.array(["bank"] * P)
    else:
        go, bp, kinds = procedural_poses(rng, P, args.poses)
        betas, pose_ids, source = np.zeros((P, 10)), np.arange(P), f"procedural-{args.poses}"
    elev, azim = sample_views(rng, P * Q, args.views)
    rows = np.repeat(np.arange(P), Q)
    model = load_body(args.smpl_model)
    verts, joints = body_forward(model, betas, go, bp)
    ren = Renderer(model.body_faces)
    maps_dir = os.path.join(args.out, "maps")
    Ks, Rs, ts, ids = [], [], [], []
    try:
        for i in tqdm(range(P * Q), desc="targets", unit="set"):
            p = rows[i]
            K, R, t = fit_camera(verts[p], elev[i], azim[i], size)
            maps, _ = condition_maps(ren, verts[p], joints[p], K, R, t, size)
            tid = f"t{i:05d}"
            write_maps(maps_dir, tid, maps)
            Ks.append(K), Rs.append(R), ts.append(t), ids.append(tid)
    finally:
        ren.delete()
    lines = ["target_id,pose_id,pose_source,pose_kind,elevation,azimuth"]
    lines += [f"{ids[i]},{pose_ids[rows[i]]},{source},{kinds[rows[i]]},{elev[i]:.2f},{azim[i]:.2f}" for i in range(P * Q)]
    common.save_text(os.path.join(args.out, "targets.csv"), "\n".join(lines) + "\n")
    common.save_npz(os.path.join(args.out, "params.npz"), target_id=np.array(ids), pose_id=pose_ids[rows],
                    pose_kind=kinds[rows], betas=betas[rows].astype(np.float32),
                    global_orient=go[rows].astype(np.float32), body_pose=bp[rows].astype(np.float32),
                    elevation=elev.astype(np.float32), azimuth=azim.astype(np.float32),
                    K=np.stack(Ks).astype(np.float32), R=np.stack(Rs).astype(np.float32),
                    t=np.stack(ts).astype(np.float32), image_size=np.tile(size, (P * Q, 1)).astype(np.int32),
                    model=np.array(model.source))
    print(f"read {'pose bank ' + args.pose_bank if args.pose_bank else 'procedural ' + args.poses + ' poses'}; "
          f"wrote {P * Q} targets ({P} poses x {Q} views, {args.views} viewpoints, {size[1]}x{size[0]}) to "
          f"{args.out}/targets.csv, params.npz, maps/ in {time.time() - t0:.1f} s")


def make_conditions(args):
    t0 = time.time()
    torch.set_num_threads(1)
    model = load_body(args.smpl_model)
    smpl_dir = args.smpl or os.path.join(args.data, "smpl")  # real data: the estimation stage's folder
    ren = Renderer(model.body_faces)
    total = 0
    try:
        for split in args.splits:
            p = load_params(os.path.join(smpl_dir, split + ".npz"))
            names = [os.path.splitext(str(n))[0] for n in p["names"]]
            out = os.path.join(args.out, split)
            todo = [i for i, s in enumerate(names) if args.overwrite or
                    not all(os.path.exists(common.cond_path(out, s, k)) for k in common.COND_KINDS)]
            verts, joints = body_forward(model, p["betas"][todo], p["global_orient"][todo], p["body_pose"][todo]) \
                if todo else ([], [])
            for i, v, jt in tqdm(list(zip(todo, verts, joints)), desc=f"conditions {split}", unit="img"):
                stored = tuple(int(x) for x in p["image_size"][i])
                size = parse_size(args.size) if args.size else stored
                K = scale_camera(p["K"][i], stored, size)
                maps, _ = condition_maps(ren, v, jt, K, p["R"][i].astype(np.float64), p["t"][i].astype(np.float64), size)
                write_maps(out, names[i], maps)
            total += len(todo)
            print(f"read {smpl_dir}/{split}.npz ({len(names)} images); wrote {len(todo)} map sets to {out} "
                  f"({len(names) - len(todo)} existed)")
    finally:
        ren.delete()
    print(f"conditions: {total} sets in {time.time() - t0:.1f} s")


def read_manifest(path):
    if not os.path.exists(path):
        raise common.UserError(f"manifest '{path}' not found (03_generate.py writes augmented/<variant>/manifest.csv)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"file", "source", "pid", "target_id", "pose_id", "elevation", "azimuth", "seed"}
    if not rows or not need <= set(rows[0]):
        raise common.UserError(f"manifest '{path}' needs columns {sorted(need)}"
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
        raise common.UserError(f"'{meta_path}' not found: the oracle needs the demo world ('01_render_smpl.py world')")
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
                raise common.UserError(f"manifest row '{r['file']}': pid {pid} is not a demo-world identity")
            if tid not in tindex:
                raise common.UserError(f"manifest row '{r['file']}': target '{tid}' is not in {args.targets}/params.npz")
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
            common.save_image(dst, img)
            common.save_image(mask_path, (mask * 255).astype(np.uint8))
            n += 1
    finally:
        world.close()
    with open(args.manifest) as f:
        common.save_text(os.path.join(args.out, "manifest.csv"), f.read())
    print(f"read {args.manifest} ({len(rows)} rows), {args.targets}/params.npz, {meta_path}; wrote {n} oracle images "
          f"+ masks/ + manifest.csv to {args.out} ({len(rows) - n} existed) in {time.time() - t0:.1f} s")

# -----------------------------------------------------------------------------
# figures (paper Figure 3): viewpoint distributions and a t-SNE of body poses

def make_figures(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    t0 = time.time()
    smpl_file = os.path.join(args.smpl or os.path.join(args.data, "smpl"), args.split + ".npz")
    data = load_params(smpl_file)
    targ = load_params(os.path.join(args.targets, "params.npz"))
    sets = [(f"{args.split} ({len(data['azimuth'])} images)", data), (f"targets ({len(targ['azimuth'])})", targ)]
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (title, d) in zip(axes, sets):
        ax.hist2d(d["azimuth"] % 360, d["elevation"], bins=[36, 15], range=[[0, 360], [0, 30]], cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("azimuth (deg, 0 = front)")
    axes[0].set_ylabel("elevation (deg)")
    fig.suptitle("viewpoint distribution (elevation x azimuth)")
    fig.tight_layout()
    p1 = os.path.join(args.out, "fig3_viewpoints.png")
    common.atomic_write(p1, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)

    # t-SNE on the 69-d body pose, subsampled so that it runs in seconds
    rng = np.random.default_rng(0)
    a, b = data["body_pose"], targ["body_pose"]
    a = a[rng.choice(len(a), min(len(a), args.tsne_max), replace=False)]
    b = b[rng.choice(len(b), min(len(b), args.tsne_max), replace=False)]
    X = np.concatenate([a, b]).astype(np.float64)
    Y = TSNE(n_components=2, perplexity=min(30, max(2, (len(X) - 1) // 3)), init="pca", random_state=0).fit_transform(X)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    ya, yb = Y[:len(a)], Y[len(a):]
    axes[0].scatter(*ya.T, s=4, c="tab:blue"), axes[0].set_title(args.split)
    axes[1].scatter(*yb.T, s=4, c="tab:orange"), axes[1].set_title("targets")
    axes[2].scatter(*ya.T, s=4, c="tab:blue", label=args.split)
    axes[2].scatter(*yb.T, s=4, c="tab:orange", label="targets"), axes[2].set_title("both")
    axes[2].legend(loc="best", fontsize=8)
    fig.suptitle("t-SNE of SMPL body poses")
    fig.tight_layout()
    p2 = os.path.join(args.out, "fig3_tsne_poses.png")
    common.atomic_write(p2, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    wrote = [p1, p2] + sample_sheets(args)
    print(f"read {smpl_file} and {args.targets}/params.npz; wrote {', '.join(wrote)} "
          f"in {time.time() - t0:.1f} s")


def sample_sheets(args):
    """Contact sheets to look at: world images (train split vs shifted test split) and condition maps
    (training images with their aligned maps, if --conditions is given, and the target set's maps)."""
    from PIL import Image
    out = []
    load = lambda p, mode="RGB": np.asarray(Image.open(p).convert(mode))
    grey = lambda p: np.repeat(load(p, "L")[..., None], 3, 2)
    rows = []
    for folder in ("bounding_box_train", "shifted/query"):
        d = os.path.join(args.data, folder)
        if os.path.isdir(d):
            names = sorted(os.listdir(d))
            pick = [names[i] for i in np.linspace(0, len(names) - 1, min(12, len(names))).astype(int)]
            rows.append(np.concatenate([load(os.path.join(d, n)) for n in pick], 1))
    if rows:
        w = min(r.shape[1] for r in rows)
        p = os.path.join(args.out, "sheet_world.png")
        common.save_image(p, np.concatenate([r[:, :w] for r in rows], 0))
        out.append(p)
    cols = []
    cdir = os.path.join(args.conditions, args.split) if args.conditions else None
    if cdir and os.path.isdir(cdir):
        d = os.path.join(args.data, args.split)
        names = sorted(os.listdir(d))
        for n in [names[i] for i in np.linspace(0, len(names) - 1, 6).astype(int)]:
            stem = os.path.splitext(n)[0]
            im = load(os.path.join(d, n))
            maps = [grey(common.cond_path(cdir, stem, "depth")), load(common.cond_path(cdir, stem, "normal")),
                    load(common.cond_path(cdir, stem, "skeleton"))]
            maps = [np.asarray(Image.fromarray(m).resize(im.shape[1::-1])) for m in maps]
            cols.append(np.concatenate([im] + maps, 0))
    tdir = os.path.join(args.targets, "maps")
    ids = sorted({f.split(".")[0] for f in os.listdir(tdir)})[:6] if os.path.isdir(tdir) else []
    tile = (cols[0].shape[0] // 4, cols[0].shape[1]) if cols else None  # (h, w) of one map in the sheet
    for tid in ids:
        maps = [grey(common.cond_path(tdir, tid, "depth")), load(common.cond_path(tdir, tid, "normal")),
                load(common.cond_path(tdir, tid, "skeleton"))]
        h, w = tile or maps[0].shape[:2]
        maps = [np.asarray(Image.fromarray(m).resize((w, h))) for m in maps]
        cols.append(np.concatenate([np.zeros_like(maps[0])] + maps, 0) if tile else np.concatenate(maps, 0))
    if cols:
        p = os.path.join(args.out, "sheet_conditions.png")
        common.save_image(p, np.concatenate(cols, 1))
        out.append(p)
    return out

# -----------------------------------------------------------------------------
# benchmark: condition sets per second on one core, one-pass vs naive separate passes

def benchmark(args):
    torch.set_num_threads(1)
    size = parse_size(args.size or "192x384")
    n = args.bench_n
    rng = np.random.default_rng(0)
    go, bp, _ = procedural_poses(rng, n, "ood")
    betas = rng.normal(0, 1, (n, 10))
    elev, azim = sample_views(rng, n, "uniform")
    model = load_body(args.smpl_model)
    ren = Renderer(model.body_faces)
    import pyrender
    try:
        # warm-up (shader compile, first context)
        v, j = body_forward(model, betas[:2], go[:2], bp[:2])
        K, R, t = fit_camera(v[0], 10, 0, size)
        condition_maps(ren, v[0], j[0], K, R, t, size)

        def ours():  # batched SMPL forward, one pass for depth + normal, skeleton from the joints
            verts, joints = body_forward(model, betas, go, bp)
            for i in range(n):
                K, R, t = fit_camera(verts[i], elev[i], azim[i], size)
                condition_maps(ren, verts[i], joints[i], K, R, t, size)

        def naive():  # SMPL forward per body, a depth-only pass, a separate normal pass from pyrender's
            import trimesh  # own trimesh mesh, generic decode/encode, skeleton from the joints
            for i in range(n):
                v, j = body_forward(model, betas[i:i + 1], go[i:i + 1], bp[i:i + 1])
                K, R, t = fit_camera(v[0], elev[i], azim[i], size)
                pm = pyrender.Mesh.from_trimesh(trimesh.Trimesh(v[0], model.body_faces, process=False), smooth=True)
                z = _naive_pass(ren, pm, K, R, t, size, depth_only=True)
                rgb = _naive_pass(ren, pm, K, R, t, size, depth_only=False)
                mask = z > 0
                common.encode_depth(z, mask)
                common.encode_normal(common.decode_normal(rgb)[0], mask)
                draw_skeleton(openpose18(j)[0], z, K, R, t, size)

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

# -----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", action="store_true", help="condition sets/s at --size (default 192x384), one core")
    ap.add_argument("--bench-n", type=int, default=200, help="bodies per benchmark trial")
    ap.add_argument("--bench-repeat", type=int, default=3, help="benchmark trials (best and median reported)")
    ap.add_argument("--smpl-model", default=None, help="SMPL model file (.npz, or .pkl converted by "
                    "tools/convert_smpl_pkl.py); default: the open body assets/open_body.npz")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT of the maps/images (paper 192x384, demo 64x128)")
    sub = ap.add_subparsers(dest="cmd")

    w = sub.add_parser("world", help="build the demo Re-ID world (Market-1501 layout + smpl/ sidecars)")
    w.add_argument("--out", default="runs/demo/world")
    w.add_argument("--train-ids", type=int, default=120)
    w.add_argument("--test-ids", type=int, default=100)
    w.add_argument("--images-per-camera", type=int, default=4, help="per id and camera (3 train cameras, 3 shifted)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    w.add_argument("--overwrite", action="store_true", help="rebuild even if the same world exists")
    w.add_argument("--small", action="store_true", help="tiny world for tests (6 train / 4 test ids, 2 per camera)")
    w.add_argument("--smoke", action="store_true", help="smoke-test scale (30 train / 20 test ids, 3 per camera)")
    w.add_argument("--size", dest="sub_size", default=None, help="WIDTHxHEIGHT (default 64x128, like Market-1501)")

    c = sub.add_parser("conditions", help="maps aligned to each image of a data set with smpl/<split>.npz")
    c.add_argument("--data", default="runs/demo/world")
    c.add_argument("--out", default="runs/demo/conditions")
    c.add_argument("--splits", nargs="+", default=["bounding_box_train"])
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--size", dest="sub_size", default=None, help="WIDTHxHEIGHT (default: each image's own size)")
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
    t.add_argument("--num-poses", type=int, default=20)
    t.add_argument("--views-per-pose", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--size", dest="sub_size", default=None, help="WIDTHxHEIGHT (default 192x384)")

    o = sub.add_parser("oracle", help="ground-truth renders of a manifest's jobs (demo world only)")
    o.add_argument("--manifest", required=True)
    o.add_argument("--targets", required=True, help="the target set the manifest's target_id refer to")
    o.add_argument("--world", default="runs/demo/world")
    o.add_argument("--out", required=True)
    o.add_argument("--style", default=None, help="camera style name from identities.json (default: the oracle's, c9)")
    o.add_argument("--overwrite", action="store_true")
    o.add_argument("--size", dest="sub_size", default=None, help="WIDTHxHEIGHT (default: the world's)")

    f = sub.add_parser("figures", help="Figure 3: viewpoint distributions + t-SNE of poses (PNGs)")
    f.add_argument("--data", default="runs/demo/world")
    f.add_argument("--split", default="bounding_box_train")
    f.add_argument("--targets", required=True)
    f.add_argument("--out", default="runs/demo/results/figures")
    f.add_argument("--tsne-max", type=int, default=500, help="at most this many poses per set in the t-SNE")
    f.add_argument("--conditions", default=None, help="conditions folder (e.g. runs/demo/conditions) for the sheet")
    f.add_argument("--smpl", default=None, help="folder with <split>.npz (default <data>/smpl)")
    for p in (w, c, t, o, f):
        p.add_argument("--smpl-model", dest="sub_smpl_model", default=None, help="as the top-level --smpl-model")
    args = ap.parse_args()
    args.size = getattr(args, "sub_size", None) or args.size
    args.smpl_model = getattr(args, "sub_smpl_model", None) or args.smpl_model
    if args.benchmark:
        return benchmark(args)
    if args.cmd is None:
        ap.print_help()
        raise common.UserError("give a subcommand (world, conditions, targets, oracle, figures) or --benchmark")
    if args.cmd == "world":
        args.size = args.size or "64x128"
        return build_world(args)
    if args.cmd == "targets":
        args.size = args.size or "192x384"
        return make_targets(args)
    {"conditions": make_conditions, "oracle": make_oracle, "figures": make_figures}[args.cmd](args)


if __name__ == "__main__":
    common.run_main(main)
