"""
Shared pieces of the Diff-ID pipeline. Only what two or more stage scripts use lives here:
  1. small I/O helpers (one-line errors, atomic writes)
  2. Re-ID data sets in Market-1501 / DukeMTMC-reID layout
  3. Re-ID training pieces: PK sampler, batch-hard triplet loss
  4. the Market-1501 evaluation protocol (mAP, CMC, mINP)
  5. condition maps (depth / normal / skeleton): encoding and file names
  6. generator pieces: reference attention, pose guiders
"""
import os
import re
import sys
import glob
import json
import tempfile
import warnings

import numpy as np

# -----------------------------------------------------------------------------
# 1. I/O helpers

class UserError(Exception):
    """Bad input that the user can fix. Stage scripts turn it into one line + exit 2."""


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def run_main(main):
    """Call main(); a UserError becomes one clear line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        die(str(e))


def atomic_write(path, write_fn, suffix=None):
    """Write a file via a temp file in the same folder + rename, so an interrupted run never
    leaves a truncated file. write_fn(tmp_path) does the writing; suffix keeps the extension
    for writers that look at it (PIL, np.savez)."""
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    suffix = suffix if suffix is not None else os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=suffix)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_text(path, text):
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, w)


def save_json(path, obj):
    save_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_image(path, img):
    """img: PIL image or HxW / HxWx3 uint8 array. Format from the extension."""
    from PIL import Image
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    atomic_write(path, lambda tmp: img.save(tmp, quality=95) if path.lower().endswith((".jpg", ".jpeg"))
                 else img.save(tmp))


def save_npz(path, **arrays):
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")

# -----------------------------------------------------------------------------
# 2. Re-ID data sets (DESIGN.md 2)
# Market-1501: PPPP_cCsS_FFFFFF_NN.jpg, DukeMTMC-reID: PPPP_cC_fFFFFFFF.jpg. Both parse with
# one regex applied to the BASENAME only (a parent folder like "run1_c2" must not match).

NAME_RE = re.compile(r"^([-\d]+)_c(\d)")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# name -> (train ids, train images, query images, gallery images, number of cameras)
EXPECTED = {
    "market1501": (751, 12936, 3368, 15913, 6),
    "dukemtmc": (702, 16522, 2228, 17661, 8),
}
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
AUG_CAMERA = 9  # camera id (1-based, as in file names) of generated images: no real camera uses it


def parse_name(path):
    """Basename -> (pid, 0-based camid). Raises UserError naming the file if it does not parse."""
    m = NAME_RE.match(os.path.basename(path))
    if m is None:
        raise UserError(f"cannot parse person id and camera from file name '{path}': expected "
                        f"Market-1501 (0002_c1s1_000451_03.jpg) or DukeMTMC (0001_c2_f0046182.jpg) names")
    return int(m.group(1)), int(m.group(2)) - 1


def list_split(folder, junk=True):
    """Sorted [(path, pid, camid)] of one split folder. junk=True drops pid -1 (Market's junk
    images); pid 0 (distractors) stays: it is a valid gallery id that never matches a query."""
    if not os.path.isdir(folder):
        raise UserError(f"split folder '{folder}' is missing: a Market-1501-layout data set needs "
                        f"bounding_box_train/, query/ and bounding_box_test/")
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise UserError(f"split folder '{folder}' has no images (*.jpg, *.png)")
    items = [(p, *parse_name(p)) for p in paths]
    return [it for it in items if not (junk and it[1] == -1)]


def load_reid_dataset(root, test_root=None, extra_train=(), name=None, check_sizes=True):
    """Returns dict(train=[(path, label, camid)], query=[(path, pid, camid)], gallery=[...],
    num_classes). Train pids are relabelled 0..C-1 over the sorted integer pids (so labels do
    not depend on the order of the files). extra_train: folders of generated images in the same
    naming, merged into train under their source pid. test_root: where query/ and
    bounding_box_test/ live, if not under root (the demo world's shifted test split)."""
    if not os.path.isdir(root):
        raise UserError(f"data root '{root}' does not exist: pass the folder that holds "
                        f"bounding_box_train/, query/ and bounding_box_test/")
    test_root = test_root or root
    train = list_split(os.path.join(root, SPLIT_DIRS["train"]))
    query = list_split(os.path.join(test_root, SPLIT_DIRS["query"]))
    gallery = list_split(os.path.join(test_root, SPLIT_DIRS["gallery"]))
    name = name or os.path.basename(os.path.normpath(root)).lower().replace("-", "")
    if check_sizes and name in EXPECTED:
        n_ids, n_train, n_query, n_gallery, _ = EXPECTED[name]
        got = (len({p for _, p, _ in train}), len(train), len(query), len(gallery))
        if got != (n_ids, n_train, n_query, n_gallery):
            raise UserError(f"data set '{root}' looks incomplete: found {got[0]} train ids / {got[1]} train "
                            f"images, {got[2]} query, {got[3]} gallery images; expected {n_ids} / {n_train}, "
                            f"{n_query}, {n_gallery} (re-extract the archive)")
    real_pids = {p for _, p, _ in train}
    for folder in extra_train:
        extra = list_split(folder)
        unknown = sorted({p for _, p, _ in extra} - real_pids)
        if unknown:
            raise UserError(f"extra train folder '{folder}' has person ids not in the train split "
                            f"(e.g. {unknown[:5]}): generated images must keep their source pid")
        train = train + extra
    pid2label = {pid: i for i, pid in enumerate(sorted(real_pids))}
    train = [(p, pid2label[pid], cam) for p, pid, cam in train]
    return dict(train=train, query=query, gallery=gallery, num_classes=len(pid2label))

# -----------------------------------------------------------------------------
# 3. Re-ID training pieces: PK sampler, batch-hard triplet loss

# (foundation issue)

# -----------------------------------------------------------------------------
# 4. Market-1501 evaluation protocol

# (foundation issue)

# -----------------------------------------------------------------------------
# 5. Condition maps (depth / normal / skeleton): encoding and file names
# The encoding is defined here ONCE (DESIGN.md 3): 01_render_smpl.py writes maps with it,
# 02/03 read them with load_conditions(). All three maps come from one camera, so their
# silhouettes coincide.
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

COND_KINDS = ("depth", "normal", "skeleton")
COND_CHANNELS = {"depth": 1, "normal": 3, "skeleton": 3}
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
    from PIL import Image, ImageDraw
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
    import torch
    from PIL import Image
    out = {}
    for kind in COND_KINDS:
        p = cond_path(folder, stem, kind)
        if not os.path.exists(p):
            raise UserError(f"condition map '{p}' is missing: make it with "
                            f"'python 01_render_smpl.py conditions' (or 'targets')")
        img = Image.open(p).convert("L" if kind == "depth" else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out[kind] = torch.from_numpy(np.ascontiguousarray(a))
    return out

# -----------------------------------------------------------------------------
# 6. Generator pieces: reference attention, pose guiders

# (generator issue)
