"""
Plumbing every stage needs, apart from the paper's method (common.py): one-line errors for bad
input, atomic writes, Market-1501 / DukeMTMC file names and Re-ID data sets.
"""
import os
import re
import csv
import sys
import random
import glob
import gc
import json
import time
import shutil
import argparse
import tempfile
import subprocess

import numpy as np
from PIL import Image


ROOT = os.path.dirname(os.path.abspath(__file__))  # the repository root: the scripts' paths are relative to it


class UserError(Exception):
    """Bad input that the user can fix. Stage scripts turn it into one line + exit 2."""


def run_main(main):
    """Call main(); a UserError becomes one clear line on stderr and exit status 2. A reader that
    stops early (`| head`) ends the output quietly instead of with a BrokenPipeError traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(1)
    finally:
        teardown_ddp()  # on every return, early ones included


# -----------------------------------------------------------------------------
# the flags every stage shares: --data, --size WxH, --steps (optimiser) / --ddim-steps (sampling),
# --workers, --save-every, --device auto

def old_flag(p, old, new, **kw):
    """Keep an old spelling of a renamed flag for one release: hidden from --help, and using it
    says so in one line (kw: type=..., as the new flag has)."""
    dest = new.lstrip("-").replace("-", "_")

    class Note(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"note: {old} is now {new} (the old spelling goes in the next release)", file=sys.stderr)
            setattr(namespace, dest, values)
    p.add_argument(old, dest=dest, action=Note, help=argparse.SUPPRESS, **kw)
    new_action = p._option_string_actions.get(new)
    if new_action is not None and new_action.required:  # either spelling satisfies a required flag
        new_action.required = False
        parse = p.parse_args

        def parse_args(args=None, namespace=None):
            ns = parse(args, namespace)
            if getattr(ns, dest) is None:
                p.error(f"the following arguments are required: {new}")
            return ns
        p.parse_args = parse_args


def parse_size(text, flag="--size"):
    """'WIDTHxHEIGHT' -> (height, width), both positive."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise UserError(f"{flag} '{text}' is not WIDTHxHEIGHT (e.g. 192x384)")
    if w <= 0 or h <= 0:
        raise UserError(f"{flag} '{text}': width and height must be positive")
    return h, w


def pick_device(name):
    """--device auto -> cuda when there is one, else cpu; anything else as given, checked (a
    device torch does not know, or cuda without a GPU, is one line)."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise UserError(f"--device '{name}' is not a device: use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    return name


def check_output_dir(path, flag="--out"):
    """Before any work: `path` is a folder, or one that can be made (nothing is created here). A
    file in its place or a read-only parent is one line now instead of a traceback hours later."""
    path = os.path.abspath(str(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a file, not a folder: pass a folder (or move the file away)")
    d = path
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"{flag} '{path}' cannot be made: '{d}' is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}': folder '{d}' is not writable: fix its permissions or pass another {flag}")


def check_output_file(path, flag="--out"):
    """Before any work: `path` can be written as a file (not a folder; its folder can be made)."""
    if os.path.isdir(str(path)):
        raise UserError(f"{flag} '{path}' is a folder: pass a file path")
    check_output_dir(os.path.dirname(os.path.abspath(str(path))), f"the folder of {flag}")


# -----------------------------------------------------------------------------
# DDP and checkpoints: what 02 and 04 share around their training loops

def setup_ddp(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group, one process per GPU (or CPU
    processes with gloo). -> (rank, world size, torch.device)."""
    import torch
    device = pick_device(device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def teardown_ddp():
    torch = sys.modules.get("torch")  # (scripts that never imported torch have no process group)
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        # A model in a reference cycle (the generator: its conv_in hook is a bound method of itself)
        # outlives main(), and DDP's hooks on its parameters keep the process group alive until the
        # interpreter shuts down; gloo's threads then die with it ("terminate called", SIGABRT) in
        # ~10% of 2-process CPU runs. Collecting the cycles first releases the group while Python is whole.
        gc.collect()
        torch.distributed.destroy_process_group()


def rng_state():
    """Every generator's state as tensors and plain values, so that a checkpoint loads with
    torch.load(weights_only=True): loading a file never runs code from it."""
    import torch
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    import torch
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state):
    """torch.save of state + every RNG's state, atomically (a kill never leaves half a file)."""
    import torch
    state["rng"] = rng_state()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, args=None, keep=(), restore_rng=True, need=(), writer="this script"):
    """-> the checkpoint dict at path, loaded without running code (weights_only), RNGs restored
    (unless restore_rng is False: the caller restores ck["rng"] itself, later).
    With args: the settings that define the result must equal those the checkpoint was trained
    with (every argument except those in keep, e.g. the step count, which a rerun may raise);
    else one line names the differences. need: the keys a checkpoint of `writer` holds besides
    rng and args (another script's file, or any other torch file, is one line)."""
    import torch
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=not restore_rng)
        missing = [k for k in ("rng", "args", *need) if k not in ck] if isinstance(ck, dict) else ["its keys"]
        if not missing and restore_rng:
            set_rng_state(ck["rng"])
    except Exception as e:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {str(e).strip()[:120].splitlines()[0] if str(e).strip() else ''}): "
                        f"delete it to start that run afresh, or pass another --out")
    if missing:
        raise UserError(f"'{path}' is not a checkpoint of {writer} (it lacks {', '.join(missing)}): delete it to "
                        f"start that run afresh, or pass another --out")
    if args is not None:
        saved, now = ck.get("args", {}), vars(args)
        diff = [k for k in now if k not in keep and k in saved and _jsonable(saved[k]) != _jsonable(now[k])]
        if diff:
            said = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in diff[:4])
            raise UserError(f"'{path}' was trained with {said}: rerun with its settings to resume, or pass a new --out")
    return ck


class CsvLog:
    """A training log.csv, rewritten whole (atomically) on every row; a resumed run keeps the
    rows up to its checkpoint's step (the steps after it are redone)."""

    def __init__(self, path, fields, start):
        self.path, self.fields, self.rows = path, fields, []
        if start and os.path.isfile(path):
            with open(path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r[fields[0]]) <= start]
        self.write()

    def add(self, *values):
        self.rows.append(dict(zip(self.fields, values)))
        self.write()

    def write(self):
        save_text(self.path, ",".join(self.fields) + "\n" +
                  "".join(",".join(str(r[k]) for k in self.fields) + "\n" for r in self.rows))


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def run_script(cmd):
    """Run one of the project's Python scripts (cmd = [script path from the repository root, args...])
    in the repository root, its output streaming through; a failure becomes a UserError (the
    script has already said what went wrong)."""
    print("$ python " + " ".join(cmd), flush=True)
    if subprocess.call([sys.executable] + cmd, cwd=ROOT) != 0:
        raise UserError(f"'{cmd[0]}' failed (see above); fix what it reported and rerun: finished steps are kept")


def atomic_write(path, write_fn, suffix=None):
    """Write a file via a temp file in the same folder + rename, so an interrupted run never
    leaves a truncated file. write_fn(tmp_path) does the writing; suffix keeps the extension
    for writers that look at it (PIL, np.savez)."""
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    suffix = suffix if suffix is not None else os.path.splitext(path)[1]
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=suffix)
    except OSError as e:
        raise UserError(f"cannot write '{path}' ({type(e).__name__}: {e.strerror or e}): check that its folder "
                        f"is a writable folder, or pass another output path")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk, a folder where the file goes: one line, not a traceback
            raise UserError(f"cannot write '{path}' ({type(e).__name__}: {e.strerror or e}): check the folder's "
                            f"permissions and free space, or pass another output path")
        raise


def remove_stale_temps(folder, age_s=600):
    """Delete the temp files and folders (.tmp_*) that a killed run left in `folder`; a live
    writer's are younger than age_s."""
    for tmp in glob.glob(os.path.join(folder, ".tmp_*")):
        if time.time() - os.path.getmtime(tmp) > age_s:
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)


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


def load_json(path):
    """A JSON file; a truncated or damaged one is one line naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise UserError(f"'{path}' is not valid JSON ({e}): it may be truncated; write it again "
                            f"(rerun the script that wrote it)")


def save_image(path, img):
    """img: PIL image or HxW / HxWx3 uint8 array. Format from the extension."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    atomic_write(path, lambda tmp: img.save(tmp, quality=95) if path.lower().endswith((".jpg", ".jpeg"))
                 else img.save(tmp))


def save_npz(path, **arrays):
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")

# Market-1501: PPPP_cCsS_FFFFFF_NN.jpg, DukeMTMC-reID: PPPP_cC_fFFFFFFF.jpg. Both parse with one
# regex applied to the BASENAME only (a parent folder like "run1_c2" must not match).
# Generated images (03_generate.py, demo/oracle.py) are named PPPP_cCs0_RRTTTT_00.jpg: the source
# image's pid and REAL camera (toolkits such as torchreid, fast-reid and the BoT baseline assert
# the camera range), sequence 0, which no real Market image has. What marks them as generated for
# our own code is the folder they come from (--extra-train), never the name.

NAME_RE = re.compile(r"^(-?\d+)_c(\d)")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# name -> (train ids, train images, query images, gallery images, number of cameras)
EXPECTED = {"market1501": (751, 12936, 3368, 15913, 6), "dukemtmc": (702, 16522, 2228, 17661, 8)}
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
GENERATED_SEQUENCE = 0  # the sequence field of generated Market-style names


def generated_name(pid, camid, slot):
    """Market-1501 name of a generated image: source pid, source camera (0-based camid), sequence
    0, `slot` a unique number of up to 6 digits (03: reference slot x 10,000 + target row)."""
    return f"{pid:04d}_c{camid + 1}s{GENERATED_SEQUENCE}_{slot:06d}_00.jpg"


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
    num_classes, extra=set of the train paths that came from extra_train). Train pids are relabelled 0..C-1 over the sorted integer pids (so labels do
    not depend on the order of the files). extra_train: folders of generated images in the same
    naming, merged into train under their source pid; extra_count: keep only this many of them,
    a fixed random subset whose smaller counts are prefixes of larger ones (the paper's Table 2
    draws growing numbers from one generated pool). test_root: where query/ and
    bounding_box_test/ live, if not under root (the demo world's shifted test split). name:
    'market1501' or 'dukemtmc' checks the official image counts; default: recognised from the
    folder name (market1501*, Market-1501-v15.09.15, DukeMTMC-reID, ...)."""
    if not os.path.isdir(root):
        raise UserError(f"data root '{root}' {'is a file, not a folder' if os.path.exists(root) else 'does not exist'}: "
                        f"pass the folder that holds bounding_box_train/, query/ and bounding_box_test/")
    test_root = test_root or root
    train = list_split(os.path.join(root, SPLIT_DIRS["train"]))
    query = list_split(os.path.join(test_root, SPLIT_DIRS["query"]))
    gallery = list_split(os.path.join(test_root, SPLIT_DIRS["gallery"]))
    folder = re.sub(r"[^a-z0-9]", "", os.path.basename(os.path.normpath(root)).lower())
    name = name or next((k for k in EXPECTED if folder.startswith(k)), None)
    if check_sizes and name in EXPECTED:
        n_ids, n_train, n_query, n_gallery, _ = EXPECTED[name]
        got = (len({p for _, p, _ in train}), len(train), len(query), len(gallery))
        if got != (n_ids, n_train, n_query, n_gallery):
            raise UserError(f"data set '{root}' looks incomplete: found {got[0]} train ids / {got[1]} train "
                            f"images, {got[2]} query, {got[3]} gallery images; expected {n_ids} / {n_train}, "
                            f"{n_query}, {n_gallery} (re-extract the archive, or pass --no-size-check for a subset)")
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
    return dict(train=train, query=query, gallery=gallery, num_classes=len(pid2label),
                extra={p for p, _, _ in extra})


def read_manifest(folder, need=("file", "pid"), writer="03_generate.py"):
    """<folder>/manifest.csv -> its rows (dicts), checked: the columns in need, every row as long
    as the header, no image listed twice, integer pids, every listed image present. Any of these
    is one line: a figure over a partial or double-counted set would be wrong without a word."""
    path = os.path.join(folder, "manifest.csv")
    if not os.path.isfile(path):
        raise UserError(f"'{folder}' has no manifest.csv ({writer} writes it)")
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    header, body = (lines[0], lines[1:]) if lines else ([], [])
    lacking = [c for c in need if c not in header]
    if lacking:
        raise UserError(f"'{path}' lacks the column(s) {', '.join(lacking)} (it has: {', '.join(header) or 'none'}): "
                        f"rerun {writer}, which writes the whole manifest")
    rows, seen = [], {}
    for n, values in enumerate(body, 2):
        if not values:
            continue
        if len(values) != len(header):
            raise UserError(f"'{path}' line {n} has {len(values)} fields, the header {len(header)}: the manifest is "
                            f"damaged; rerun {writer}, which rewrites it")
        r = dict(zip(header, values))
        if r["file"] in seen:
            raise UserError(f"'{path}' lists '{r['file']}' twice (lines {seen[r['file']]} and {n}): it would count "
                            f"twice; rerun {writer}, which rewrites the manifest")
        seen[r["file"]] = n
        if "pid" in need and not re.fullmatch(r"-?\d+", r["pid"].strip()):
            raise UserError(f"'{path}' line {n}: pid '{r['pid']}' is not an integer")
        rows.append(r)
    if not rows:
        raise UserError(f"'{path}' lists no images")
    gone = [r["file"] for r in rows if not os.path.isfile(os.path.join(folder, r["file"]))]
    if gone:
        raise UserError(f"{len(gone)} of the {len(rows)} images listed in '{path}' are missing (e.g. '{gone[0]}'): "
                        f"figures over the rest would be partial; rerun {writer} to make them")
    return rows
