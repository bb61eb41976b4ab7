"""
Shared pieces of the Diff-ID pipeline. Only what two or more stage scripts use lives here:
  1. small I/O helpers (one-line errors, atomic writes)
  2. Re-ID data sets in Market-1501 / DukeMTMC-reID layout
  3. Re-ID training pieces: image checks, PK sampler, the Re-ID network, batch-hard triplet loss
  4. the Market-1501 evaluation protocol (mAP, CMC, mINP)
  5. condition maps (depth / normal / skeleton): encoding and file names; the SMPL body, camera
     and per-image parameter files shared by 01_render_smpl.py and 01b_estimate_smpl.py
  6. generator pieces: reference attention, pose guiders
"""
import io
import os
import re
import sys
import glob
import json
import math
import shutil
import tempfile
import warnings
import functools
import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_text(path, text):
    """Unchanged text keeps the file and its mtime, so a rerun does not make later stages look stale."""
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return

    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, w)


def save_json(path, obj):
    save_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_image(path, img):
    """img: PIL image or HxW / HxWx3 uint8 array. Format from the extension."""
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


def load_reid_dataset(root, test_root=None, extra_train=(), extra_count=None, name=None, check_sizes=True):
    """Returns dict(train=[(path, label, camid)], query=[(path, pid, camid)], gallery=[...],
    num_classes). Train pids are relabelled 0..C-1 over the sorted integer pids (so labels do
    not depend on the order of the files). extra_train: folders of generated images in the same
    naming, merged into train under their source pid; extra_count: keep only this many of them,
    a fixed random subset whose smaller counts are prefixes of larger ones (the paper's Table 2
    draws growing numbers from one generated pool). test_root: where query/ and
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
    extra = []
    for folder in extra_train:
        items = list_split(folder)
        unknown = sorted({p for _, p, _ in items} - real_pids)
        if unknown:
            raise UserError(f"extra train folder '{folder}' has person ids not in the train split "
                            f"(e.g. {unknown[:5]}): generated images must keep their source pid")
        extra += items
    if extra_count is not None:
        if extra_count > len(extra):
            raise UserError(f"asked for {extra_count} generated images but {', '.join(extra_train)} hold only {len(extra)}")
        extra = [extra[i] for i in sorted(np.random.default_rng(0).permutation(len(extra))[:extra_count])]
    train = train + extra
    pid2label = {pid: i for i, pid in enumerate(sorted(real_pids))}
    train = [(p, pid2label[pid], cam) for p, pid, cam in train]
    return dict(train=train, query=query, gallery=gallery, num_classes=len(pid2label))

# -----------------------------------------------------------------------------
# 3. Re-ID training pieces: PK sampler, batch-hard triplet loss

def check_images(items, what="images"):
    """Decode every image once; corrupt or unreadable files are dropped with a warning naming
    them, so that training never dies on image 9,000 of an epoch. Returns (kept, num_bad)."""
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


def build_reid_model(arch, num_classes, weights=None, bnneck=False):
    """torchvision trunk (ResNet50 in the paper; any torchvision classifier with an fc head,
    e.g. resnet18 or shufflenet_v2_x0_5 for CPU runs) -> global average pool -> feature (2048-d
    for resnet50, the paper's triplet feature) -> linear classifier (cross-entropy). By default no
    BNNeck: the paper uses the pooled feature for both losses. bnneck=True (Luo et al. 2019, "Bag of Tricks") puts a
    BatchNorm1d between the feature and a bias-free classifier: the triplet loss still sees the
    pooled feature, cross-entropy a normalised copy, so a trunk trained from scratch cannot satisfy
    both by shrinking every feature to one point. forward() returns (pooled feature, logits) either
    way; the pooled feature is what 05 ranks. weights: None, 'imagenet' (torchvision download), or
    a path to a torchvision state dict for the trunk."""
    import torchvision  # only the Re-ID stages need it

    if arch not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown --arch '{arch}': use a torchvision classifier with an fc head "
                        f"(resnet50, resnet18, shufflenet_v2_x0_5, regnet_x_400mf, ...)")
    trunk = torchvision.models.get_model(arch, weights=None)
    if not isinstance(getattr(trunk, "fc", None), torch.nn.Linear):
        raise UserError(f"--arch '{arch}' has no fc head: use a ResNet, ResNeXt, RegNet or ShuffleNetV2")
    if weights == "imagenet":
        url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
        try:
            state = torch.hub.load_state_dict_from_url(url, progress=False)
        except Exception as e:
            raise UserError(f"cannot download ImageNet weights for {arch} from {url} ({type(e).__name__}); "
                            f"on a machine without internet download that file elsewhere and pass "
                            f"--backbone-weights PATH, or use --backbone-weights none")
        trunk.load_state_dict(state)
    elif weights not in (None, "none"):
        if not os.path.isfile(weights):
            raise UserError(f"backbone weights file '{weights}' does not exist")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, _ = trunk.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")]:
            raise UserError(f"'{weights}' is not a torchvision {arch} state dict (missing {missing[:3]} ...)")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feat_dim = trunk.fc.in_features
            trunk.fc = torch.nn.Identity()  # trunk(x) is now the globally pooled feature
            self.backbone = trunk
            self.neck = torch.nn.BatchNorm1d(self.feat_dim) if bnneck else torch.nn.Identity()
            if bnneck:
                self.neck.bias.requires_grad_(False)  # a scale per channel, no shift (Bag of Tricks)
            self.classifier = torch.nn.Linear(self.feat_dim, num_classes, bias=not bnneck)

        def forward(self, x):
            f = self.backbone(x)
            return f, self.classifier(self.neck(f))

    return Net()


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageDataset:
    """Map-style data set over [(path, label, camid)] for torch's DataLoader (which needs only
    __len__ and __getitem__): returns (transform(RGB image), label, camid)."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label, camid = self.items[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        return self.transform(img), label, camid


def pairwise_euclidean(x, y):
    """Euclidean distances between rows of x and rows of y (torch), clamped before the sqrt so
    the gradient stays finite when two features coincide."""
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * x @ y.t()
    return d2.clamp_min(1e-12).sqrt()


def triplet_loss(features, labels, margin=0.5):
    """Batch-hard triplet loss (Hermans et al. 2017; the paper's margin 0.5): for each anchor,
    the farthest positive and the nearest negative in the batch, hinge on their difference."""
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
        img = Image.open(p).convert("L" if kind == "depth" else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out[kind] = torch.from_numpy(np.ascontiguousarray(a))
    return out


# Bodies, cameras and the per-image SMPL file, shared by 01_render_smpl.py (renders from them) and
# 01b_estimate_smpl.py (fits them to photos). Camera convention (docs/formats.md): pinhole in OpenCV
# axes (x right, y down, z forward), x_cam = R @ X + t, pixel = K @ x_cam / z; X = SMPL output
# vertices (transl = 0); the viewpoint (elevation, azimuth) is the camera's direction from the body
# centre in the body's canonical frame (y up, facing +z; azimuth 0 = front, 90 = the person's left).

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
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
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


def body_forward(model, betas, global_orient, body_pose, chunk=256):
    """Batched SMPL forward (numpy in, numpy out): vertices (N,V,3), joints (N,45,3)."""
    V, J = [], []
    nb = model.num_betas
    with torch.no_grad():
        for s in range(0, len(body_pose), chunk):
            f = lambda a: torch.as_tensor(np.asarray(a[s:s + chunk]), dtype=torch.float32)
            o = model(betas=f(betas)[:, :nb], global_orient=f(global_orient), body_pose=f(body_pose)[:, :69])
            V.append(o.vertices.numpy())
            J.append(o.joints.numpy())
    return np.concatenate(V), np.concatenate(J)


def openpose18(joints):
    """SMPL joints (+ smplx's extra face keypoints at 24..28: nose, reye, leye, rear, lear) ->
    (N,18,3) OpenPose-18 keypoints in OPENPOSE18 order."""
    j = joints
    neck = 0.5 * (j[:, 16] + j[:, 17])  # OpenPose's neck sits between the shoulders
    return np.stack([neck if i is None else j[:, i] for i in OPENPOSE18_SMPL], 1)


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
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    missing = [k for k in PARAM_KEYS if k not in d]
    if missing:
        raise UserError(f"'{path}' lacks keys {missing}: expected {list(PARAM_KEYS)} (see docs/formats.md)")
    return d

# -----------------------------------------------------------------------------
# 6. Generator pieces: reference attention, pose guiders
# The generator of the paper (section 3.4, Figure 4; DESIGN.md 5): a reference U-Net and a
# denoising U-Net of identical config, pose guiders, frozen VAE and CLIP image encoder.
# 02_train_generator.py trains it, 03_generate.py samples from it; both use what is here.
REF_KEY = "diffid_reference"       # key in cross_attention_kwargs that carries the reference context
GUIDER_WIDTHS = (16, 32, 96, 256)  # pose guider widths, as in the paper's relatives (AnimateAnyone)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SD-1.5's noise schedule: the default for a generator built from scratch. A pretrained folder's
# own scheduler/ wins. 02 saves the schedule it trained with; 03 samples with that same config.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                     steps_offset=1)


def _reference_hook(name, module, args, kwargs):
    """Forward pre-hook on attn1 (self-attention) of every BasicTransformerBlock of both U-Nets.
    The context rides in cross_attention_kwargs, so it arrives with the call that uses it, and
    gradient checkpointing's recomputation during backward sees the same context as the forward
    (state set on a module around a call is gone by then). Contexts:
      {"write": bank}: reference U-Net: store attn1's input under this block's qualified name.
      {"read": bank, "index": idx, "null": mask or None}: denoising U-Net: keys/values from
         concat([h, bank[name][idx]], tokens), queries from h only, so the output keeps h's
         tokens (the paper's "first half"). Rows with idx -1 (the null condition) get their
         reference tokens masked out: their attention is exactly over h.
    No context: plain self-attention, the U-Net is untouched."""
    ctx = kwargs.pop(REF_KEY, None)
    if ctx is None:
        return args, kwargs
    h = args[0] if args else kwargs["hidden_states"]
    if "write" in ctx:
        ctx["write"][name] = h
        return args, kwargs
    if kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
        raise RuntimeError(f"reference attention: {name}.attn1 already has a context or mask")
    ref = ctx["read"][name].to(h.dtype)[ctx["index"].clamp(min=0)]
    kwargs["encoder_hidden_states"] = torch.cat([h, ref], dim=1)
    if ctx["null"] is not None:
        mask = h.new_zeros(h.shape[0], 1, h.shape[1] + ref.shape[1])
        mask[ctx["null"], :, h.shape[1]:] = float("-inf")
        kwargs["attention_mask"] = mask
    return args, kwargs


def _drop_reference_kwarg(module, args, kwargs):
    # attn2 receives the same cross_attention_kwargs; the processor would warn about the key
    kwargs.pop(REF_KEY, None)
    return args, kwargs


def attach_reference_attention(reference_unet, denoising_unet):
    """Hook every BasicTransformerBlock's attn1 of both U-Nets. Blocks are paired by qualified
    name (e.g. 'down_blocks.1.attentions.0.transformer_blocks.0'), never by width or order of
    calls: two blocks of one width exist at several depths. Returns the block names."""
    from diffusers.models.attention import BasicTransformerBlock
    def blocks(unet):
        return [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    names = blocks(reference_unet)
    if not names or names != blocks(denoising_unet):
        raise ValueError("reference and denoising U-Net must have the same config with attention blocks")
    for unet in (reference_unet, denoising_unet):
        if getattr(unet, "_diffid_hooked", False):
            raise ValueError("reference attention hooks are already attached to this U-Net")
        unet._diffid_hooked = True
        for n in names:
            block = unet.get_submodule(n)
            block.attn1.register_forward_pre_hook(functools.partial(_reference_hook, n), with_kwargs=True)
            if block.attn2 is not None:
                block.attn2.register_forward_pre_hook(_drop_reference_kwarg, with_kwargs=True)
    return names


class PoseGuider(nn.Module):
    """One condition map -> features at latent resolution. Conv 3x3 -> 16 + SiLU, then per level
    a stride-1 and a stride-2 conv (widths GUIDER_WIDTHS), `levels` = log2 of the VAE factor,
    then ONE zero-initialised conv: the generator starts as the plain U-Net, and the zero conv
    still gets a gradient because its input is not zero (two zero layers in series would not)."""

    def __init__(self, in_channels, out_channels, levels, widths=GUIDER_WIDTHS):
        super().__init__()
        w = [widths[min(i, len(widths) - 1)] for i in range(levels + 1)]
        layers = [nn.Conv2d(in_channels, w[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(w[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return self.out(self.body(x))


def build_guiders(conv_in_channels, vae_factor, widths=GUIDER_WIDTHS):
    """One guider per condition; output widths split conv_in's output channels (320 for SD-1.5)
    so that their concatenation can be added to the projected noisy latent."""
    levels = int(round(math.log2(vae_factor)))
    if 2 ** levels != vae_factor:
        raise ValueError(f"VAE downsampling factor {vae_factor} is not a power of 2")
    k = len(COND_KINDS)
    outs = [conv_in_channels // k + (i < conv_in_channels % k) for i in range(k)]
    return nn.ModuleDict({kind: PoseGuider(COND_CHANNELS[kind], o, levels, widths)
                          for kind, o in zip(COND_KINDS, outs)})


def null_condition(emb, index, drop):
    """THE null condition, shared by training (dropout, p=0.1) and sampling (the unconditional
    branch of classifier-free guidance): no reference (index -1) AND a zero CLIP embedding,
    dropped together. Pose maps stay in both branches."""
    emb = torch.where(drop[:, None, None], torch.zeros_like(emb), emb)
    index = torch.where(drop, torch.full_like(index, -1), index)
    return emb, index


class Generator(nn.Module):
    """Everything that trains: reference U-Net, denoising U-Net, pose guiders."""

    def __init__(self, reference_unet, denoising_unet, guiders):
        super().__init__()
        self.reference_unet, self.denoising_unet, self.guiders = reference_unet, denoising_unet, guiders
        self.block_names = attach_reference_attention(reference_unet, denoising_unet)
        self._pose = None
        # pose features are added to conv_in's OUTPUT (the projected noisy latent, paper 3.4);
        # conv_in is never inside a checkpointed segment, so state set around the call is safe
        denoising_unet.conv_in.register_forward_hook(self._add_pose)

    def _add_pose(self, module, args, out):
        return out if self._pose is None else out + self._pose.to(out.dtype)

    def reference(self, latents, emb):
        """Reference U-Net on clean reference latents at t = 0 -> bank {block name: attn1 input}.
        A fresh bank every call: nothing from an earlier reference or micro-batch can leak in."""
        bank = {}
        t = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        self.reference_unet(latents, t, encoder_hidden_states=emb, cross_attention_kwargs={REF_KEY: {"write": bank}})
        return bank

    def pose(self, conds):
        """{kind: (B, C, H, W) maps in [0, 1]} -> (B, conv_in channels, h, w)."""
        return torch.cat([self.guiders[k](conds[k]) for k in COND_KINDS], dim=1)

    def denoise(self, noisy, t, emb, pose, bank=None, index=None):
        """Denoising U-Net prediction. bank=None: no reference attention at all; else row i
        attends to reference index[i] of the bank (-1: none)."""
        kw = None
        if bank is not None:
            null = index < 0
            kw = {REF_KEY: {"read": bank, "index": index, "null": null if bool(null.any()) else None}}
        self._pose = pose
        try:
            return self.denoising_unet(noisy, t, encoder_hidden_states=emb, cross_attention_kwargs=kw).sample
        finally:
            self._pose = None

    def forward(self, noisy, t, emb, conds, ref_latents, ref_emb, index):
        """One training prediction in one call (what DDP wraps)."""
        return self.denoise(noisy, t, emb, self.pose(conds), self.reference(ref_latents, ref_emb), index)


def vae_factor(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(vae, images):
    """images (B, 3, H, W) in [-1, 1] -> scaled latents (the posterior mean: deterministic)."""
    z = vae.encode(images.to(vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, z):
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor + shift).sample.clamp(-1, 1)


@torch.no_grad()
def clip_embed(image_encoder, images):
    """images (B, 3, H, W) in [-1, 1] -> (B, 1, D) image_embeds, the cross-attention context of
    both U-Nets. The whole crop is resized to the encoder's square input (CLIP's own
    preprocessing centre-crops the short side, which cuts head and feet off a person crop)."""
    s = image_encoder.config.image_size
    x = F.interpolate((images.float() + 1) / 2, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return image_encoder(pixel_values=((x - mean) / std).to(image_encoder.dtype)).image_embeds[:, None]


@torch.no_grad()
def sample_latents(gen, scheduler, noise, emb, pose, bank, index, steps=25, guidance=3.5, reference_fn=None):
    """DDIM + classifier-free guidance. noise (B, 4, h, w); emb (B, 1, D) CLIP embedding of each
    row's reference; pose (B, C, h, w) guider features (computed once, reused every step); bank +
    index: reference features (computed ONCE per reference by the caller) and which one each row
    uses. The unconditional branch is null_condition(): the training null exactly.
    reference_fn: benchmark only, recomputes the bank every step (the uncached baseline)."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    cfg = guidance != 1.0
    if cfg:  # [uncond rows; cond rows] in one batch
        emb_u, index_u = null_condition(emb, index, torch.ones_like(index, dtype=torch.bool))
        emb, index, pose = torch.cat([emb_u, emb]), torch.cat([index_u, index]), torch.cat([pose, pose])
    for t in scheduler.timesteps:
        if reference_fn is not None:
            bank = reference_fn()
        xin = scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        eps = gen.denoise(xin, t, emb, pose, bank, index)
        if cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps.float(), t, x).prev_sample
    return x


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def load_image_tensor(path, size):
    """Image file -> (3, H, W) float in [-1, 1] at size (height, width)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def save_pretrained_atomic(model, folder):
    """save_pretrained into a temp dir beside `folder`, then swap it in: an interrupted save never
    leaves a half-written model folder behind (the old one stays until the new one is complete)."""
    folder = os.path.abspath(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp_")
    try:
        model.save_pretrained(tmp)
        if os.path.isdir(folder):
            old = tmp + ".old"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def from_pretrained(cls, path_or_id, subfolder=None, what="weights"):
    """cls.from_pretrained(local folder or hub id) with one clear line for the usual mistakes
    (missing path, not a diffusers/transformers folder, hub unreachable) instead of a traceback.
    The same call loads SD-1.5 ("runwayml/stable-diffusion-v1-5", subfolder "unet") and the
    folders 02 writes."""
    config_name = getattr(cls, "config_name", None) or "config.json"
    where = os.path.join(path_or_id, subfolder) if subfolder else path_or_id
    if os.path.isdir(path_or_id):
        if not os.path.isfile(os.path.join(where, config_name)):
            raise UserError(f"{what} '{path_or_id}' is not a diffusers/transformers folder: "
                            f"'{os.path.join(where, config_name)}' is missing")
    elif os.path.exists(path_or_id) or path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") != 1:
        raise UserError(f"{what} '{path_or_id}' does not exist (give a local folder or a hub id like "
                        f"'runwayml/stable-diffusion-v1-5')")
    kw = {"subfolder": subfolder} if subfolder else {}
    if cls.__module__.startswith("diffusers.models"):
        from diffusers.utils import is_accelerate_available
        kw["low_cpu_mem_usage"] = is_accelerate_available()  # no warning per model when it is absent
    try:
        with warnings.catch_warnings():  # huggingface_hub deprecation noise on every hub lookup
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return cls.from_pretrained(path_or_id, **kw)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {what} from '{where}': {msg}")


def save_guiders(path, guiders):
    from safetensors.torch import save_file
    meta = {"config": json.dumps({k: dict(in_channels=g.body[0].in_channels, out_channels=g.out.out_channels,
                                          widths=[m.out_channels for m in g.body if isinstance(m, nn.Conv2d)])
                                  for k, g in guiders.items()})}
    sd = {k: v.detach().cpu().contiguous() for k, v in guiders.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def load_guiders(path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise UserError(f"pose guider weights '{path}' are missing")
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    guiders = nn.ModuleDict()
    for k in COND_KINDS:
        c = cfg[k]
        w = c["widths"][0::2]  # the body's convs: first, then (stride-1, stride-2) per level
        guiders[k] = PoseGuider(c["in_channels"], c["out_channels"], len(w) - 1, widths=tuple(w))
    guiders.load_state_dict(load_file(path))
    return guiders


def save_generator(folder, gen):
    save_pretrained_atomic(gen.reference_unet, os.path.join(folder, "reference_unet"))
    save_pretrained_atomic(gen.denoising_unet, os.path.join(folder, "denoising_unet"))
    save_guiders(os.path.join(folder, "guiders.safetensors"), gen.guiders)


def load_generator(folder):
    """-> (Generator, vae, image_encoder, noise-schedule config, args dict) from a folder that
    02_train_generator.py wrote. The VAE / image encoder come from the folder when 02 trained or
    built them (--from-scratch), else from the pretrained sources recorded in args.json."""
    from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler
    from transformers import CLIPVisionModelWithProjection
    args_path = os.path.join(folder, "args.json")
    if not os.path.isfile(args_path):
        raise UserError(f"'{folder}' is not a generator folder written by 02_train_generator.py (no args.json)")
    with open(args_path) as f:
        args = json.load(f)
    ref = from_pretrained(UNet2DConditionModel, os.path.join(folder, "reference_unet"), what="reference U-Net")
    den = from_pretrained(UNet2DConditionModel, os.path.join(folder, "denoising_unet"), what="denoising U-Net")
    gen = Generator(ref, den, load_guiders(os.path.join(folder, "guiders.safetensors")))
    own = lambda sub: os.path.isdir(os.path.join(folder, sub))
    vae = (from_pretrained(AutoencoderKL, os.path.join(folder, "vae"), what="VAE") if own("vae") else
           from_pretrained(AutoencoderKL, args["pretrained"], "vae", what="VAE"))
    enc = (from_pretrained(CLIPVisionModelWithProjection, os.path.join(folder, "image_encoder"), what="image encoder")
           if own("image_encoder") else
           from_pretrained(CLIPVisionModelWithProjection, args["image_encoder"], args.get("image_encoder_subfolder"),
                           what="image encoder"))
    schedule = dict(from_pretrained(DDPMScheduler, os.path.join(folder, "scheduler"), what="noise schedule").config)
    return gen, vae.eval().requires_grad_(False), enc.eval().requires_grad_(False), schedule, args
