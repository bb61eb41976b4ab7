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

def check_images(items, what="images"):
    """Decode every image once; corrupt or unreadable files are dropped with a warning naming
    them, so that training never dies on image 9,000 of an epoch. Returns (kept, num_bad)."""
    from PIL import Image
    from tqdm import tqdm
    kept, bad = [], 0
    for it in tqdm(items, desc=f"checking {what}", leave=False, mininterval=1.0):
        try:
            with Image.open(it[0]) as im:
                im.load()
            kept.append(it)
        except Exception as e:
            bad += 1
            warnings.warn(f"skipping unreadable image '{it[0]}' ({type(e).__name__}: {e})")
    if not kept:
        raise UserError(f"none of the {len(items)} {what} could be read")
    return kept, bad


class PKSampler:
    """Batches of P distinct identities x K images, with torchreid's RandomIdentitySampler
    semantics: per identity, shuffle its images (drawn with replacement up to K when it has
    fewer), cut them into chunks of K, and draw P identities that still have chunks per batch.
    One difference on purpose: identities not yet drawn this epoch are drawn first, so every
    identity appears in every epoch (torchreid can drop the last few).
    Batches are a pure function of (seed, epoch): resuming at iteration i just skips i batches.
    With world_size > 1 (DDP), each batch's P identities are split across ranks, so every rank
    sees whole identities (all K images), as the batch-hard triplet loss needs."""

    def __init__(self, labels, P, K, seed=0, rank=0, world_size=1):
        labels = np.asarray(labels)
        self.by_pid = {int(p): np.flatnonzero(labels == p) for p in np.unique(labels)}
        if len(self.by_pid) < P:
            raise UserError(f"a PK batch needs P={P} identities but the train split has only {len(self.by_pid)}: lower --P")
        if P % world_size:
            raise UserError(f"P={P} identities per batch cannot be split evenly over {world_size} processes")
        self.P, self.K, self.seed, self.rank, self.world_size = P, K, seed, rank, world_size

    def epoch(self, e):
        rng = np.random.default_rng([self.seed, e])
        chunks = {}
        for pid, idx in self.by_pid.items():
            idx = rng.choice(idx, size=self.K, replace=True) if len(idx) < self.K else rng.permutation(idx)
            chunks[pid] = [idx[i:i + self.K] for i in range(0, len(idx) - self.K + 1, self.K)]
        unused, batches = set(chunks), []
        while unused:
            avail = sorted(p for p in chunks if chunks[p])
            fresh = sorted(unused)
            if len(avail) < self.P:  # last batch of the epoch: fill it with fresh chunks of drawn ids
                others = sorted(set(self.by_pid) - unused)
                pids = fresh + list(rng.choice(others, self.P - len(fresh), replace=False))
                for p in pids:
                    if not chunks[p]:
                        chunks[p] = [rng.choice(self.by_pid[p], size=self.K, replace=len(self.by_pid[p]) < self.K)]
            elif len(fresh) >= self.P:
                pids = list(rng.choice(fresh, self.P, replace=False))
            else:
                rest = sorted(set(avail) - unused)
                pids = fresh + list(rng.choice(rest, self.P - len(fresh), replace=False))
            batches.append([int(i) for p in pids for i in chunks[p].pop(0)])
            unused -= set(pids)
        while True:  # then torchreid's rule until fewer than P identities have chunks left
            avail = sorted(p for p in chunks if chunks[p])
            if len(avail) < self.P:
                break
            pids = rng.choice(avail, self.P, replace=False)
            batches.append([int(i) for p in pids for i in chunks[p].pop(0)])
        per_rank = self.P // self.world_size * self.K
        return [b[self.rank * per_rank:(self.rank + 1) * per_rank] for b in batches]

    def iterate(self, start=0):
        """Endless stream of batches over epochs, starting at global batch number `start`."""
        e = 0
        while True:
            batches = self.epoch(e)
            if start < len(batches):
                yield from batches[start:]
                start = 0
            else:
                start -= len(batches)
            e += 1


def pairwise_euclidean(x, y):
    """Euclidean distances between rows of x and rows of y (torch), clamped before the sqrt so
    the gradient stays finite when two features coincide."""
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * x @ y.t()
    return d2.clamp_min(1e-12).sqrt()


def triplet_loss(features, labels, margin=0.5):
    """Batch-hard triplet loss (Hermans et al. 2017; the paper's margin 0.5): for each anchor,
    the farthest positive and the nearest negative in the batch, hinge on their difference."""
    import torch
    d = pairwise_euclidean(features, features)
    same = labels[:, None] == labels[None, :]
    hardest_pos = d.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(same, float("inf")).amin(1)
    return torch.relu(hardest_pos - hardest_neg + margin).mean()

# -----------------------------------------------------------------------------
# 4. Market-1501 evaluation protocol
# Semantics of torchreid's eval_market1501 (shared by every toolkit): for each query, gallery
# items with the same pid AND the same camera are removed; the gallery is ranked by distance
# with a STABLE sort (ties keep gallery order); a query with no remaining match is skipped and
# counted; AP is the mean over positives of the precision at each positive; CMC is cut at
# max_rank; mINP = (number of positives) / (rank of the last positive).
# Speed: instead of argsorting whole rows and gathering pids/cams (torchreid), each row's
# distances are turned into unique integer keys (order-preserving float bits << 32 | gallery
# index) and sorted; the few same-pid items of a query are then located in the sorted row by
# binary search. Memory is O(chunk x gallery).

def _sortable_keys(d, cols):
    """float32 distances -> uint64 keys whose plain order is (distance, gallery index) order:
    the IEEE bits of a float are made monotone (flip all bits of negatives, the sign bit of
    the rest) and the gallery index fills the low 32 bits, so keys are unique and a fast
    unstable sort gives exactly the stable argsort."""
    u = d.view(np.uint32)
    u = np.where(u >> 31, ~u, u | np.uint32(0x80000000)).astype(np.uint64)
    return (u << np.uint64(32)) | cols.astype(np.uint64)


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, chunk=128):
    """distmat (num_query, num_gallery), numpy; pids and camids numpy int arrays.
    Returns dict(mAP, mINP, cmc (length min(max_rank, num_gallery)), num_valid_queries,
    num_skipped_queries). float32 distances take the fast path; other dtypes are ranked with
    numpy's stable argsort (same result, slower)."""
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if num_q != len(q_pids) or num_g != len(g_pids):
        raise ValueError(f"distmat is {distmat.shape} but there are {len(q_pids)} query / {len(g_pids)} gallery ids")
    if np.isnan(distmat).any():
        raise ValueError("distmat contains NaN")
    max_rank = min(max_rank, num_g)
    fast = distmat.dtype == np.float32 and num_g < 2 ** 32
    g_index = np.arange(num_g)
    first_hit, aps, inps = [], [], []
    for s in range(0, num_q, chunk):
        d = np.ascontiguousarray(distmat[s:s + chunk])
        qp, qc = q_pids[s:s + chunk], q_camids[s:s + chunk]
        # same-pid gallery items of each query (the positives plus the same-camera ones that the
        # protocol removes): a handful per row, so everything after the sort is sparse
        rows, cols = np.nonzero(qp[:, None] == g_pids[None, :])
        if fast:
            keys = _sortable_keys(d, g_index[None, :])
            keys.sort(axis=1)
            item_keys = _sortable_keys(d[rows, cols], cols)
            pos = np.empty(len(rows), dtype=np.int64)
            bounds = np.searchsorted(rows, np.arange(len(d) + 1))
            for r in range(len(d)):
                a, b = bounds[r], bounds[r + 1]
                if a < b:
                    pos[a:b] = np.searchsorted(keys[r], item_keys[a:b])
        else:
            order = np.argsort(d, axis=1, kind="stable")
            rank_of = np.empty_like(order)
            np.put_along_axis(rank_of, order, np.arange(num_g)[None, :].repeat(len(d), 0), axis=1)
            pos = rank_of[rows, cols]
        # walk each row's same-pid items in rank order: removed items shift later ranks up by one
        o = np.lexsort((pos, rows))
        rows, pos, removed = rows[o], pos[o], (g_camids[cols[o]] == qc[rows[o]])
        removed_before = np.cumsum(removed) - removed      # exclusive count over all rows...
        removed_before -= removed_before[np.searchsorted(rows, rows)]  # ...made per row
        keep = ~removed
        rank = (pos - removed_before)[keep] + 1            # 1-based rank among the kept gallery
        rrows = rows[keep]
        hit_no = np.arange(len(rrows)) - np.searchsorted(rrows, rrows) + 1  # k-th positive of its row
        n_pos = np.bincount(rrows, minlength=len(d))
        valid = n_pos > 0
        prec_sum = np.bincount(rrows, weights=hit_no / rank, minlength=len(d))
        last = np.zeros(len(d), dtype=np.int64)
        np.maximum.at(last, rrows, rank)
        first = np.full(len(d), np.iinfo(np.int64).max)
        np.minimum.at(first, rrows, rank)
        first_hit.append(first[valid])
        aps.append(prec_sum[valid] / n_pos[valid])
        inps.append(n_pos[valid] / last[valid])
    first_hit, aps, inps = np.concatenate(first_hit), np.concatenate(aps), np.concatenate(inps)
    num_valid = len(aps)
    if num_valid == 0:
        raise ValueError("no query has a match in the gallery from another camera")
    cmc = (first_hit[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(0)
    return dict(mAP=float(aps.mean()), mINP=float(inps.mean()), cmc=cmc,
                num_valid_queries=int(num_valid), num_skipped_queries=int(num_q - num_valid))

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
