"""
A rehearsal of `bash run_all.sh market1501` at Market-1501's real sizes with tiny weights, on a CPU:
every stage timed (wall seconds) with its peak memory (RSS) at two or three input sizes, so that
the cost per item (image, step, target, ...) is measured on the real data layout and the real image
and map sizes, and a cost that grows faster than its input shows. tools/forecast.py turns the
figures into GPU hours (docs/forecast.md).

  python tools/rehearse.py --work /tmp/rehearse --out docs/forecast.json   # ~30 min on 2 shared cores

What it builds under --work (reused when there):
  hf/       a Hugging Face cache with tiny random weights under run_all.sh's default hub ids
            (tools/tiny_hub.py; ViTPose's processor at its real 256x192 input, so the per-image
            preprocessing is the real one), HF_HUB_OFFLINE=1
  pool/     450 person crops rendered by demo/world.py --smoke (50 people)
  Market-1501-v15.09.15/   the full layout by reuse: 751 ids / 12,936 train, 3,368 query, 19,732
            gallery files (15,913 scored + 3,819 junk '-1'; 2,793 of the scored are distractors
            '0000'), 6 cameras, Market names; every file a byte copy of a pool crop (64x128 JPEG)
  sub_<n>/  hard-linked subsets (the first n train images; query and gallery quartered for 05)
  runs/     what the stages write; logs/ one log per timed command

The network parts are tiny, so what is measured is everything around them: image decoding and
resizing, ViTPose's preprocessing, the SMPL fit (no network: real cost, on the CPU), the condition
renders, the data loaders, the job lists, the evaluation's ranking. GPU compute of the real networks
is not measured here (docs/forecast.md takes it from the paper's reported times).
--out merges the figures into the "measured" key of that JSON file (the rest stays).
"""
import os
import sys
import csv
import json
import time
import shutil
import argparse
import datetime
import platform
import subprocess
import importlib.util

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import util  # noqa: E402
import tiny_hub  # noqa: E402  (this script's folder is on sys.path)
from tiny_hub import SD15, ENCODER, VITPOSE  # noqa: E402
TRAIN, QUERY, GALLERY = (util.SPLIT_DIRS[k] for k in ("train", "query", "gallery"))
# Market-1501-v15.09.15: train ids / images, query, scored gallery (util.EXPECTED), and inside the
# gallery folder the junk (-1, not scored) and distractor (0000) images; 1,501 ids in all
IDS, N_TRAIN, N_QUERY, N_GALLERY, CAMS = util.EXPECTED["market1501"]
N_JUNK, N_DISTRACTORS, TEST_IDS = 3819, 2793, 750
MARKET_DIR = "Market-1501-v15.09.15"


def load_stage(filename):
    """A stage script as a module (their names start with a digit)."""
    spec = importlib.util.spec_from_file_location("stage_" + filename[:-3].replace("/", "_"), os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# -----------------------------------------------------------------------------
# the data set: Market-1501's layout and counts, every image a copy of a rendered pool crop


def pool_people(pool):
    """{(split, pid): [crop paths]} of the rendered world."""
    people = {}
    for split in (TRAIN, QUERY, GALLERY):
        for path, pid, _ in util.list_split(os.path.join(pool, split)):
            people.setdefault((split, pid), []).append(path)
    return [people[k] for k in sorted(people)]


def split_counts(total, n, rng):
    """total images over n ids as evenly as possible, in a random order."""
    c = np.full(n, total // n)
    c[rng.permutation(n)[:total % n]] += 1
    return c


def write_market(root, people, seed=0):
    """The full Market-1501 layout: names PPPP_cCsS_FFFFFF_BB.jpg (junk -1_..., distractors 0000_...)."""
    if os.path.isfile(os.path.join(root, "done")):
        return
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, 1502))
    train_ids, test_ids = np.sort(ids[:IDS]), np.sort(ids[IDS:])
    frame = [0]

    def name(pid, cam):
        frame[0] += 1
        return f"{pid:04d}_c{cam}s{rng.integers(1, 7)}_{frame[0]:06d}_{rng.integers(0, 8):02d}.jpg"
    files = {TRAIN: [], QUERY: [], GALLERY: []}  # (name, source crop)
    crop = lambda pid, k: people[pid % len(people)][k % len(people[pid % len(people)])]
    for pid, n in zip(train_ids, split_counts(N_TRAIN, IDS, rng)):
        files[TRAIN] += [(name(pid, rng.integers(1, CAMS + 1)), crop(pid, k)) for k in range(n)]
    n_scored = N_GALLERY - N_DISTRACTORS
    for pid, nq, ng in zip(test_ids, split_counts(N_QUERY, TEST_IDS, rng), split_counts(n_scored, TEST_IDS, rng)):
        cams = rng.permutation(np.arange(1, CAMS + 1))  # at most one query per camera, as Market's
        files[QUERY] += [(name(pid, cams[k]), crop(pid, k)) for k in range(nq)]
        files[GALLERY] += [(name(pid, rng.integers(1, CAMS + 1)), crop(pid, nq + k)) for k in range(ng)]
    for k in range(N_DISTRACTORS):
        files[GALLERY].append((name(0, rng.integers(1, CAMS + 1)), crop(int(rng.integers(len(people))), k)))
    for k in range(N_JUNK):
        files[GALLERY].append((name(0, rng.integers(1, CAMS + 1)).replace("0000_", "-1_", 1), crop(k, k)))
    for split, items in files.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for n, src in items:
            shutil.copyfile(src, os.path.join(root, split, n))
    d = util.load_reid_dataset(root, name="market1501")  # the official counts, as 04 and 05 check them
    assert (len(d["train"]), len(d["query"]), len(d["gallery"])) == (N_TRAIN, N_QUERY, N_GALLERY)
    open(os.path.join(root, "done"), "w").close()


def subset(root, out, n_train, test_fraction=1.0):
    """Hard links: the first n_train train images (whole ids first), query and gallery cut to
    test_fraction (junk kept in proportion)."""
    if os.path.isdir(out):
        return out
    for split, keep in ((TRAIN, lambda f: f[:n_train]), (QUERY, lambda f: f[:int(len(f) * test_fraction)]),
                        (GALLERY, lambda f: f[:int(len(f) * test_fraction)])):
        names = sorted(os.listdir(os.path.join(root, split)))
        if split == GALLERY:  # the sorted order puts the junk first: spread the cut evenly instead
            names = names[::max(1, int(round(1 / test_fraction)))] if test_fraction < 1 else names
        else:
            names = keep(names)
        os.makedirs(os.path.join(out, split))
        for f in names:
            os.link(os.path.join(root, split, f), os.path.join(out, split, f))
    return out


def write_sidecar(pool_params, names, path):
    """A per-image SMPL file (01b's format) for `names`: the pool's true parameters, tiled."""
    rows = np.arange(len(names)) % len(pool_params["names"])
    n0 = len(pool_params["names"])
    arrays = {k: (v[rows] if np.ndim(v) and len(v) == n0 else v) for k, v in pool_params.items()}
    arrays["names"] = np.asarray(names)
    util.save_npz(path, **arrays)

# -----------------------------------------------------------------------------
# timing: wall seconds and the peak RSS of a child process (os.wait4: that child's own figure)


class Timer:
    def __init__(self, work, env):
        self.logs, self.env = os.path.join(work, "logs"), env
        os.makedirs(self.logs, exist_ok=True)

    def run(self, tag, cmd):
        """-> (seconds, peak RSS MiB of the command's own process, from GNU time: a figure read from
        this process's children would start at this process's own size). Fails with the log's tail."""
        log, rss = os.path.join(self.logs, tag + ".log"), os.path.join(self.logs, tag + ".maxrss_kib")
        t0 = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss, *cmd], stdout=f, stderr=subprocess.STDOUT,
                               env=self.env, cwd=ROOT)
        seconds = time.time() - t0
        if r.returncode != 0:
            tail = open(log).read()[-2000:]
            raise SystemExit(f"error: {tag} failed (exit {r.returncode}): {log}\n{tail}")
        mib = int(open(rss).read().split()[-1]) / 1024.0
        print(f"  {tag}: {seconds:.1f} s, peak RSS {mib:.0f} MiB", flush=True)
        return seconds, mib


def series(timer, stage, item, sizes, make_cmd, full, note):
    """Run make_cmd(n) for each size n; -> the stage's record: seconds per item from the two largest
    sizes (the slope: a fixed start-up cost drops out), the start-up, MiB per item, and growth: the
    later slope over the earlier one (1 = linear; with 3+ sizes)."""
    key = stage.replace(" ", "_")
    if key in DONE:  # measured by an earlier, interrupted run of the same --work
        print(f"{stage}: measured before ({DONE_PATH[0]})")
        return DONE[key]
    print(f"{stage} ({item}s: {', '.join(map(str, sizes))})", flush=True)
    points = []
    for n in sizes:
        cmd = make_cmd(n)
        seconds, mib = timer.run(f"{stage.replace(' ', '_')}_{n}", cmd)
        points.append(dict(n=n, seconds=round(seconds, 2), peak_rss_mib=round(mib, 1)))
    rec = dict(item=item, points=points, full_count=full, note=note,
               command=" ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) and c.startswith(ROOT) else c
                                for c in make_cmd(sizes[-1])))
    rec.update(fit_line(points))
    rec["scope"] = "full" if sizes[-1] >= full else "sample"
    keep(key, rec)
    return rec


DONE, DONE_PATH = {}, [None]  # the figures so far (work/measured.json): a rerun continues after the last one


def keep(key, value):
    DONE[key] = value
    util.save_json(DONE_PATH[0], DONE)


def fit_line(points):
    (a, b) = points[-2], points[-1]
    dn = b["n"] - a["n"]
    per = (b["seconds"] - a["seconds"]) / dn
    out = dict(seconds_per_item=per, fixed_seconds=a["seconds"] - per * a["n"],
               mib_per_item=(b["peak_rss_mib"] - a["peak_rss_mib"]) / dn)
    if len(points) >= 3:
        c = points[-3]
        earlier = (a["seconds"] - c["seconds"]) / (a["n"] - c["n"])
        out["growth"] = per / earlier if earlier > 0 else None
    return out

# -----------------------------------------------------------------------------
# in-process measurements of single functions


def bench_manifest(work, n_jobs):
    """03's write_manifest (every 10 s of generation) with n_jobs jobs and as many images on disk."""
    gen = load_stage("03_generate.py")
    out = os.path.join(work, "runs", "manifest_bench")
    folder = os.path.join(out, TRAIN)
    os.makedirs(folder, exist_ok=True)
    jobs = [dict(file=f"{TRAIN}/{util.generated_name(1 + i % 751, i % 6, i)}", source="x.jpg", pid=1, target_id="t0",
                 pose_id=0, elevation=1.0, azimuth=2.0, seed=i) for i in range(n_jobs)]
    have = set(os.listdir(folder))
    for j in jobs:
        b = os.path.basename(j["file"])
        if b not in have:
            open(os.path.join(folder, b), "w").close()
    t = []
    for _ in range(3):
        t0 = time.time()
        gen.write_manifest(out, jobs)
        t.append(time.time() - t0)
    return dict(jobs=n_jobs, images_on_disk=n_jobs, seconds=round(min(t), 3),
                note="one call; 03 calls it every 10 s while generating, so it costs seconds/10 of the generation "
                     "time, growing with the images already in the folder")


def bench_rank(root):
    """evaluate_fast.evaluate_rank on a full query x gallery distance matrix (random distances)."""
    import evaluate_fast
    d = util.load_reid_dataset(root, name="market1501")
    q = np.array([(p, c) for _, p, c in d["query"]])
    g = np.array([(p, c) for _, p, c in d["gallery"]])
    dist = np.random.default_rng(0).random((len(q), len(g)), dtype=np.float32)
    t0 = time.time()
    evaluate_fast.evaluate_rank(dist, q[:, 0], g[:, 0], q[:, 1], g[:, 1])
    return dict(query=len(q), gallery=len(g), seconds=round(time.time() - t0, 2),
                seconds_per_pair=(time.time() - t0) / (len(q) * len(g)))


def bench_generator_loader(argv, batch_size, steps=10):
    """02's training pairs alone: seconds to load one step's batch (target, reference, maps)."""
    gen = load_stage("02_train_generator.py")
    args = gen.parse_args(["--out", "/tmp/unused", "--pretrained", SD15, "--image-encoder", ENCODER,
                           "--skip-missing-conditions", *argv])
    _, data = gen.load_pairs(args)
    data[0]
    t0 = time.time()
    for k in range(1, 1 + steps * batch_size):
        data[k]
    return dict(batch_size=batch_size, seconds_per_step=(time.time() - t0) / steps)


def bench_reid_loader(data, extra, steps=12):
    """04's data pipeline alone (its load_data, PK batches, CamStyle extras, 2 loader workers, the
    paper's 128x256 input): seconds per batch after the first two."""
    import torch
    reid = load_stage("04_train_reid.py")
    argv = ["--data", data, "--out", "/tmp/unused", "--dataset", "market1501", "--backbone-weights", "none"]
    if extra:
        argv += ["--extra-train", extra, "--extra-count", "45500", "--extra-per-id", "1"]
    args = reid.parse_args(argv)
    _, labels, is_aug, real, sampler, dataset, _ = reid.load_data(args, 0, 1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=reid.batch_stream(sampler, 0, real, labels, is_aug, args),
                                         num_workers=args.workers)
    it = iter(loader)
    sizes = [len(next(it)[0]) for _ in range(2)]
    t0 = time.time()
    for _ in range(steps):
        sizes.append(len(next(it)[0]))
    return dict(workers=args.workers, images_per_batch=sizes[-1], seconds_per_batch=(time.time() - t0) / steps)

# -----------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/rehearse", help="where the data, weights and runs go (reused)")
    ap.add_argument("--out", default=None, help="merge the figures into this JSON's 'measured' key (docs/forecast.json)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every measurement runs (figures "
                    "are not worth keeping)")
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    q = args.quick
    hf, pool, market = (os.path.join(work, d) for d in ("hf", "pool", MARKET_DIR))
    runs = os.path.join(work, "runs")
    os.makedirs(runs, exist_ok=True)
    env = dict(os.environ, HF_HOME=hf, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONUNBUFFERED="1")
    timer = Timer(work, env)
    py = sys.executable
    t_start = time.time()

    print("tiny weights, the pool, the Market-1501 layout", flush=True)
    if not os.path.isfile(os.path.join(hf, "done")):  # ViTPose's processor at its real input, 256x192
        tiny_hub.build(hf)
        open(os.path.join(hf, "done"), "w").close()
    if not os.path.isfile(os.path.join(pool, "identities.json")):
        timer.run("pool_world", [py, "demo/world.py", "--out", pool, "--smoke", "--workers", "1"])
    people = pool_people(pool)
    t0 = time.time()
    write_market(market, people)
    layout_s = time.time() - t0
    import body
    pool_params = body.load_params(os.path.join(pool, "smpl", TRAIN + ".npz"))
    train_names = sorted(os.listdir(os.path.join(market, TRAIN)))
    sub = lambda n, frac=1.0: subset(market, os.path.join(work, f"sub_{n}" + ("" if frac == 1 else f"_t{frac:g}")), n, frac)
    smpl_full = os.path.join(runs, "smpl_full")
    os.makedirs(smpl_full, exist_ok=True)
    write_sidecar(pool_params, train_names, os.path.join(smpl_full, TRAIN + ".npz"))
    DONE_PATH[0] = os.path.join(work, "measured.json")
    if os.path.isfile(DONE_PATH[0]):
        DONE.update(util.load_json(DONE_PATH[0]))
    m = DONE

    def smpl_dir(n):  # sidecar of the first n train images
        d = os.path.join(runs, f"smpl_{n}")
        if not os.path.isfile(os.path.join(d, TRAIN + ".npz")):
            os.makedirs(d, exist_ok=True)
            write_sidecar(pool_params, train_names[:n], os.path.join(d, TRAIN + ".npz"))
        return d

    # 01b keypoints: ViTPose (tiny backbone, real preprocessing) over the train images
    sizes = [16, 64, 128] if q else [64, 808, 1617]
    m["keypoints"] = series(timer, "keypoints", "image", sizes, lambda n: [
        py, "01b_estimate_smpl.py", "keypoints", "--data", sub(n), "--out", os.path.join(runs, f"kp_{n}"),
        "--model", VITPOSE, "--device", "cpu"], N_TRAIN,
        "tiny ViTPose backbone at ViTPose-B's 256x192 input: image decoding + the processor's affine crop + "
        "heatmap post-processing are real; ViT-B's own forward is not in it")

    # 01b fit: the SMPLify-style fit at its defaults (120 steps, 8 starts, batch 256), on the pool's true
    # keypoints + 2 px noise (a tiny ViTPose's keypoints are noise), every image fitted
    fit_mod = load_stage("01b_estimate_smpl.py")
    kp = fit_mod.truth_keypoints(body.load_body(None), pool_params)
    kp[..., :2] += np.random.default_rng(0).normal(0, 2.0, kp[..., :2].shape)

    def fit_cmd(n):
        d = os.path.join(runs, f"fit_{n}")
        os.makedirs(d, exist_ok=True)
        rows = np.arange(n) % len(kp)
        util.save_npz(os.path.join(d, TRAIN + ".keypoints.npz"), names=np.array(train_names[:n]),
                      keypoints=kp[rows].astype(np.float32), image_size=pool_params["image_size"][rows].astype(np.int32),
                      model=np.array("truth"))
        return [py, "01b_estimate_smpl.py", "fit", "--out", d, "--device", "cpu"]
    sizes = [32, 64] if q else [256, 512]
    m["fit"] = series(timer, "fit", "image", sizes, fit_cmd, N_TRAIN,
                      "no network: the real computation, on the CPU (run_all.sh runs it on the GPU when there is one); "
                      "--threads 2 (its default); whole batches of 256, so linear by construction")

    # 01 conditions at 192x384 (stage 2) and 768x768 (stage 1's video frames)
    sizes = [16, 64, 128] if q else [32, 404, 808]
    m["conditions"] = series(timer, "conditions", "image", sizes, lambda n: [
        py, "01_render_smpl.py", "conditions", "--data", market, "--smpl", smpl_dir(n), "--out",
        os.path.join(runs, f"cond_{n}"), "--size", "192x384"], N_TRAIN,
        "pyrender (OSMesa) depth/normal/skeleton maps at 192x384 from the pool's SMPL parameters, tiled")
    cond_train = os.path.join(runs, f"cond_{sizes[-1]}")
    sizes = [4, 8, 16] if q else [8, 32, 64]
    m["conditions_768"] = series(timer, "conditions 768", "image", sizes, lambda n: [
        py, "01_render_smpl.py", "conditions", "--data", market, "--smpl", smpl_dir(n), "--out",
        os.path.join(runs, f"cond768_{n}"), "--size", "768x768"], 0,
        "stage 1's frames: the same maps at 768x768")

    # 01 bank: the training photos' poses; and --choose 20 away from them (the dance-video poses)
    sizes = [128, 1024, 3234] if q else [1617, 6468, N_TRAIN]
    m["bank"] = series(timer, "bank", "image", sizes, lambda n: [
        py, "01_render_smpl.py", "bank", "--smpl", os.path.join(smpl_dir(n), TRAIN + ".npz"),
        "--out", os.path.join(runs, f"bank_{n}.npz")], N_TRAIN, "the training photos' pose bank")

    def choose_cmd(n):
        d = os.path.join(runs, f"videos_{n}")
        os.makedirs(d, exist_ok=True)
        write_sidecar(pool_params, [f"{k:06d}.jpg" for k in range(n)], os.path.join(d, "video0.npz"))
        return [py, "01_render_smpl.py", "bank", "--smpl", d, "--choose", "20", "--away-from",
                os.path.join(smpl_full, TRAIN + ".npz"), "--out", os.path.join(runs, f"bank_videos_{n}.npz")]
    sizes = [50, 100, 200] if q else [250, 500, 1000]
    m["bank_choose"] = series(timer, "bank choose", "video frame", sizes, choose_cmd, 0,
                              "dance-video frames (candidates) against all 12,936 training poses: farthest_poses "
                              "compares every candidate with every training pose")

    # 01 targets: 20 poses x 4 views per variant, from the training photos' bank and viewpoints
    bank_full = os.path.join(runs, f"bank_{N_TRAIN if not q else 3234}.npz")
    sizes = [1, 2, 4] if q else [5, 10, 20]
    m["targets"] = series(timer, "targets", "target", [4 * n for n in sizes], lambda n: [
        py, "01_render_smpl.py", "targets", "--out", os.path.join(runs, f"targets_{n}"), "--pose-bank", bank_full,
        "--views-from", os.path.join(smpl_full, TRAIN + ".npz"), "--size", "192x384", "--num-poses", str(n // 4),
        "--views-per-pose", "4"], 80, "one variant's target set: 20 poses x 4 views at 192x384")
    targets = os.path.join(runs, f"targets_{4 * sizes[-1]}")

    # 02 stage 2: tiny SD at 192x384, batch 4, run_all.sh's flags (workers 0, the defaults)
    n_gen_data = 64 if q else 404  # and twice that below: both inside the conditions rendered above
    data_gen = sub(n_gen_data)

    def gen_cmd(steps, data=data_gen, tag=""):
        return [py, "02_train_generator.py", "--data", data, "--conditions", cond_train, "--out",
                os.path.join(runs, f"gen{tag}_{steps}"), "--size", "192x384", "--pretrained", SD15, "--image-encoder",
                ENCODER, "--steps", str(steps), "--skip-missing-conditions", "--device", "cpu"]
    sizes = [2, 4, 8] if q else [2, 5, 10]
    m["generator"] = series(timer, "generator", "step", sizes, gen_cmd, 30000,
                            f"tiny U-Nets on {n_gen_data} training images with maps: per step the loading of 4 "
                            "(target, reference) pairs with their maps at 192x384 in the main process (--workers 0, "
                            "as run_all.sh), the tiny networks' step; the validation grid and save at the end cancel "
                            "in the slope")
    generator = os.path.join(runs, f"gen_{sizes[-1]}")
    # the same number of steps on twice the data: the per-step cost should not change
    if "double_data" not in m["generator"]:
        s, mib = timer.run("generator_data_x2", gen_cmd(sizes[-1], sub(2 * n_gen_data), "x2"))
        m["generator"]["double_data"] = dict(images=2 * n_gen_data, steps=sizes[-1], seconds=round(s, 2),
                                             peak_rss_mib=round(mib, 1))
        keep("generator", m["generator"])

    # 02 stage 1: video frames at 768x768, batch 2
    vids = os.path.join(work, "videos")
    if not os.path.isdir(os.path.join(runs, "stage1_cond")):
        shutil.rmtree(vids, ignore_errors=True)
        for v in range(4):
            os.makedirs(os.path.join(vids, f"vid{v}"))
            for k in range(32):
                shutil.copyfile(people[v][k % len(people[v])], os.path.join(vids, f"vid{v}", f"{k:04d}.jpg"))
        vsmpl = os.path.join(work, "videos_smpl")
        os.makedirs(vsmpl, exist_ok=True)
        for v in range(4):
            write_sidecar(pool_params, [f"{k:04d}.jpg" for k in range(32)], os.path.join(vsmpl, f"vid{v}.npz"))
        timer.run("stage1_conditions", [py, "01_render_smpl.py", "conditions", "--data", vids, "--smpl", vsmpl,
                                        "--splits", "vid0", "vid1", "vid2", "vid3", "--out",
                                        os.path.join(runs, "stage1_cond"), "--size", "768x768"])
    "generator_loader" in m or keep("generator_loader", dict(
        stage2=bench_generator_loader(["--data", sub(2 * n_gen_data), "--conditions", cond_train, "--size", "192x384"], 4),
        stage1=bench_generator_loader(["--stage", "1", "--data", vids, "--conditions", os.path.join(runs, "stage1_cond"),
                                       "--size", "768x768", "--batch-size", "2"], 2),
        note="02's PairData alone (what --workers 0 loads in the main process between two GPU steps): image "
             "decode + resize, the maps' PNGs; stage 1 on 64x128 frames (real video frames are larger)"))

    # 03: the full job list (80,000 of ~315,000 jobs, as (VI)), a slice of the references generated
    parts = [4000, 2000, 1000] if q else [2000, 1000, 500]

    def generate_cmd(p):
        return [py, "03_generate.py", "--generator", generator, "--data", market, "--targets", targets, "--out",
                os.path.join(runs, f"aug_{p}"), "--refs-per-pid", "5-7", "--targets-per-ref", "70", "--num-images",
                "80000", "--shard", f"0/{p}", "--ddim-steps", "2", "--device", "cpu"]
    print("generate (images: --shard 0/" + ", 0/".join(map(str, parts)) + ")", flush=True)
    points = []
    for p in ([] if "generate" in m else parts):
        s, mib = timer.run(f"generate_{p}", generate_cmd(p))
        n = len(os.listdir(os.path.join(runs, f"aug_{p}", TRAIN)))
        points.append(dict(n=n, seconds=round(s, 2), peak_rss_mib=round(mib, 1)))
    "generate" in m or keep("generate", dict(item="image", points=points, full_count=80000, scope="sample", **fit_line(points),
                         command=" ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in generate_cmd(parts[-1])),
                         note="tiny generator, 2 DDIM steps + guidance (the tiny networks' CPU time is not the "
                              "point: 25 steps ran at 2.9 s per image), batch 8; the job list is the full one (every "
                              "shard builds all of it: the fixed cost), the images a slice of it"))
    "manifest" in m or keep("manifest", bench_manifest(work, 2000 if q else 80000))

    # 04: tiny ResNet (resnet18 at 1/4 width) at the paper's 128x256, P=32 x K=8, 2 loader workers
    extra = os.path.join(runs, "generated_pool", TRAIN)
    n_extra = 2000 if q else 45500
    if not os.path.isdir(extra):  # a stand-in for 03's (VI) folder: links to the pool under generated names
        os.makedirs(extra)
        train = util.list_split(os.path.join(market, TRAIN))
        with open(os.path.join(runs, "generated_pool", "manifest.csv"), "w") as f:
            f.write("file,source,pid,target_id,pose_id,elevation,azimuth,seed\n")
            for i in range(n_extra):
                src, pid, cam = train[(i * 7919) % len(train)]
                nm = util.generated_name(pid, cam, i)
                os.link(src, os.path.join(extra, nm))
                f.write(f"{TRAIN}/{nm},{os.path.basename(src)},{pid},t0,0,0,0,{i}\n")
    reid_flags = ["--backbone-weights", "none", "--arch", "resnet18", "--width-mult", "0.25", "--device", "cpu"]
    camstyle = ["--extra-per-id", "1", "--extra-label-smoothing", "0.1", "--extra-weight", "0.25"]

    def reid_cmd(steps, tag, more=()):
        return [py, "04_train_reid.py", "--data", market, "--out", os.path.join(runs, f"reid_{tag}_{steps}"), "--seed", "0",
                *reid_flags, "--steps", str(steps), "--dataset", "market1501", *more]
    sizes = [1, 3] if q else [2, 6]
    m["reid_base"] = series(timer, "reid base", "step", sizes, lambda n: reid_cmd(n, "base"), 20000,
                            "row (I): 12,936 train images; fixed_seconds = start-up (checks every image once, "
                            "builds the model); the tiny ResNet's CPU step is not the GPU's")
    more = ["--extra-train", extra, "--extra-count", str(n_extra), *camstyle]
    m["reid_vi"] = series(timer, "reid vi", "step", sizes, lambda n: reid_cmd(n, "vi", more), 20000,
                          f"row (VI): 12,936 + {n_extra:,} generated images (CamStyle mixing: 256 + 32 per step)")
    m["reid_vi"]["extra_images"] = n_extra
    print("04 data pipeline alone", flush=True)
    "reid_loader" in m or keep("reid_loader", dict(base=bench_reid_loader(market if not q else sub(3234), None),
                            vi=bench_reid_loader(market if not q else sub(3234), extra),
                            note="04's DataLoader alone (2 workers, decode + resize + flip/pad/crop): what one "
                                 "process can feed its GPU per step at most, on this machine"))

    # 05: the full query x gallery with the tiny model; and a quarter of both
    model = os.path.join(runs, f"reid_base_{sizes[-1]}", "model.pt")
    quarter = sub(N_TRAIN, 0.25)

    def eval_cmd(root, tag, check):
        return [py, "05_evaluate.py", "--model", model, "--data", root, "--name", f"eval_{tag}", "--results",
                os.path.join(runs, "results"), "--device", "cpu", *check]
    print("evaluate (full query x gallery; a quarter of both)", flush=True)
    if "evaluate" not in m:
        s_full, mib_full = timer.run("evaluate_full", eval_cmd(market, "full", ["--dataset", "market1501"]))
        s_q, mib_q = timer.run("evaluate_quarter", eval_cmd(quarter, "quarter", ["--no-size-check"]))
        nq = len(util.list_split(os.path.join(quarter, QUERY))) + len(util.list_split(os.path.join(quarter, GALLERY)))
        rec = dict(item="evaluation", scope="full", full_count=1, command=" ".join(
            os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in eval_cmd(market, "full", ["--dataset", "market1501"])),
            points=[dict(n=nq, seconds=round(s_q, 2), peak_rss_mib=round(mib_q, 1)),
                    dict(n=N_QUERY + N_GALLERY, seconds=round(s_full, 2), peak_rss_mib=round(mib_full, 1))],
            rank=bench_rank(market), note="n = query + scored gallery images; 2 loader workers, the tiny ResNet at "
                                          "128x256; rank: evaluate_fast alone on the full distance matrix")
        rec.update(fit_line(rec["points"]))
        keep("evaluate", rec)


    # tools/identity_score.py: all train features + N generated images, nearest identity centroid
    def identity_cmd(n):
        d = os.path.join(runs, f"identity_gen_{n}")
        os.makedirs(d, exist_ok=True)
        rows = open(os.path.join(runs, "generated_pool", "manifest.csv")).read().splitlines()
        util.save_text(os.path.join(d, "manifest.csv"), "\n".join(rows[:n + 1]) + "\n")
        if not os.path.exists(os.path.join(d, TRAIN)):
            os.symlink(extra, os.path.join(d, TRAIN))
        return [py, "tools/identity_score.py", "--model", model, "--data", market, "--generated", d, "--out",
                os.path.join(runs, f"identity_{n}.json"), "--device", "cpu"]
    sizes = [250, 500, 1000] if q else [1000, 2000, 4000]
    m["identity"] = series(timer, "identity", "generated image", sizes, identity_cmd, 80000,
                           "the tiny ResNet's 128-d feature (ResNet50's is 2048-d); 751 identity centroids; "
                           "fixed_seconds includes the 12,936 train images' features")
    m["identity"]["feature_dim"] = 128
    m["layout_seconds"] = round(layout_s, 1)

    import torch
    m["machine"] = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
                        torch=torch.__version__, python=platform.python_version(),
                        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
                        note="a shared 2-core machine: a long background run and other tests ran beside it")
    m["date"] = datetime.date.today().isoformat()
    m["command"] = "python tools/rehearse.py --work " + args.work + (" --quick" if q else "") + \
                   (f" --out {args.out}" if args.out else "")
    m["wall_minutes"] = round((time.time() - t_start) / 60, 1)
    print(json.dumps({k: (v.get("seconds_per_item") if isinstance(v, dict) else v) for k, v in m.items()}, indent=1))
    if args.out:
        doc = util.load_json(args.out) if os.path.isfile(args.out) else {}
        doc["measured"] = m
        util.save_json(args.out, doc)
        print(f"wrote the 'measured' key of {args.out}")
    util.save_json(os.path.join(work, "measured.json"), m)


if __name__ == "__main__":
    util.run_main(main)
