"""
`bash run_all.sh market1501 / dukemtmc` end to end, offline, on tiny data and tiny weights: the flow a
user runs on GPUs. The weights live in a local Hugging Face cache laid out as the hub's repos are
(HF_HOME, HF_HUB_OFFLINE=1), so hub ids resolve exactly as they would online; the same repos are
also passed as local folders. SMPL is estimated in the run (a tiny ViTPose under the default
model id), the paper's stage 1 runs on two tiny videos, and every generated name is read with the
parsing rules of the Re-ID toolkits users train with.
"""
import os
import re
import csv
import glob
import json
import sys
import shutil
import subprocess

import numpy as np
import pytest
import torch

from stages import ROOT  # noqa: E402  (puts the repository root on sys.path)
import util  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "tools"))
import tiny_hub  # noqa: E402
from tiny_hub import SD15, ENCODER  # noqa: E402  (run_all.sh's defaults)

# the tiny SD repo's own noise schedule differs from SD-1.5's, so a run that fell back to the
# built-in values would show
OWN_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.001, beta_end=0.02, beta_schedule="linear",
                    prediction_type="epsilon", clip_sample=False, steps_offset=1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME with tiny weights under run_all.sh's default ids (tools/tiny_hub.py): SD-1.5 (unet/ vae/
    scheduler/, its own schedule), the image-variations repo (image_encoder/) and a COCO-17 ViTPose
    under 01b's default id (a small 64x48 input, for speed)."""
    return tiny_hub.build(str(tmp_path_factory.mktemp("hf")), schedule=OWN_SCHEDULE, vitpose_size=(64, 48))


def env(hub):
    return dict(os.environ, HF_HOME=hub["home"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
                OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory, small_world):
    """Tiny Market-1501 and DukeMTMC-reID folders (the demo world's people, renamed for Duke with
    cameras 6-8, which Market does not have) and two 'videos' of frames for stage 1."""
    root = tmp_path_factory.mktemp("data")
    world = small_world
    market, duke = root / "Market-1501-v15.09.15", root / "DukeMTMC-reID"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        shutil.copytree(world / split, market / split)
        os.makedirs(duke / split)
        for i, f in enumerate(sorted(os.listdir(world / split))):
            pid, cam = util.parse_name(f)
            shutil.copy(world / split / f, duke / split / f"{pid:04d}_c{cam + 6}_f{i:07d}.jpg")
    videos = root / "videos"
    for vid, pid in (("vidA", 1), ("vidB", 2)):
        frames = sorted(glob.glob(str(world / "bounding_box_train" / f"{pid:04d}_*.jpg")))[:4]
        for k, f in enumerate(frames):
            os.makedirs(videos / vid, exist_ok=True)
            shutil.copy(f, videos / vid / f"{k:04d}.jpg")
    return dict(market1501=str(market), dukemtmc=str(duke), videos=str(videos))


def run_all(dataset, data, hub, runs, source, *extra):
    """source 'hub': the default ids (no --pretrained / --image-encoder), resolved in the cache;
    'local': the same repos' folders, passed by path."""
    weights = [] if source == "hub" else ["--pretrained", hub["sd"], "--image-encoder", hub["enc"]]
    args = ["bash", os.path.join(ROOT, "run_all.sh"), dataset, "--data-root", data[dataset], *weights,
            "--device", "cpu", "--smoke", "--no-size-check", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=dict(env(hub), RUNS_DIR=str(runs)), cwd=ROOT)


def toolkit_parse(folder, dataset):
    """What torchreid (torchreid/data/datasets/image/market1501.py, dukemtmcreid.py), fast-reid
    (fastreid/data/datasets/market1501.py) and the BoT baseline (reid-strong-baseline,
    data/datasets/market1501.py) do with a folder: glob *.jpg, search the FULL path with
    ([-\\d]+)_c(\\d), assert 0 <= pid <= 1501 (Market) and 1 <= camid <= 6 (Market) / 8 (Duke)."""
    pattern = re.compile(r'([-\d]+)_c(\d)')
    out = []
    for img_path in glob.glob(os.path.join(folder, "*.jpg")):
        pid, camid = map(int, pattern.search(img_path).groups())
        assert 0 <= pid <= 1501
        assert 1 <= camid <= (6 if dataset == "market1501" else 8), img_path
        out.append((os.path.basename(img_path), pid, camid - 1))
    return sorted(out)


@pytest.fixture(scope="module")
def market_run(data, hub, tmp_path_factory):
    """The one real-data flow end to end, as a user runs it on GPUs but tiny: `run_all.sh market1501
    --tables` with the default hub ids (from the cache), SMPL estimated in the run, the paper's
    stage 1 on two videos and its dance-video poses from two more. -> (run folder, result)."""
    runs = tmp_path_factory.mktemp("runs")
    r = run_all("market1501", data, hub, runs, "hub", "--stage1-data", data["videos"], "--pose-videos", data["videos"],
                "--tables")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return runs / "market1501-smoke", r


@pytest.mark.timeout(900)  # a whole pipeline end to end
def test_run_all_market1501_tables_offline(market_run, data):
    run, r = market_run
    # SMPL estimated in the run, with the ViTPose of 01b's default id (from the cache)
    with np.load(run / "smpl" / "bounding_box_train.keypoints.npz") as z:
        assert str(z["model"]) == "usyd-community/vitpose-base-simple"
    assert (run / "smpl" / "bounding_box_train.npz").is_file() and os.listdir(run / "conditions" / "bounding_box_train")
    # the noise schedule trained and sampled with is the pretrained repo's own, not SD-1.5's built-in values
    sched = json.load(open(run / "generator" / "scheduler" / "scheduler_config.json"))
    assert {k: sched[k] for k in OWN_SCHEDULE} == OWN_SCHEDULE
    # stage 1 on the videos from the pretrained weights, then stage 2 from stage 1
    s1, gargs = (json.load(open(run / g / "args.json")) for g in ("generator_stage1", "generator"))
    assert s1["stage"] == 1 and s1["pretrained"] == SD15 and s1["image_encoder_subfolder"] == "image_encoder"
    assert os.path.isdir(run / "stage1" / "conditions" / "vidA") and gargs["init"].endswith("generator_stage1")
    # (V): SD's architecture with random U-Nets; the rows' targets as the paper defines them on real data
    assert json.load(open(run / "generator_v" / "args.json"))["random_unets"]
    pose_source = lambda v: {x["pose_source"] for x in csv.DictReader(open(run / "targets" / v / "targets.csv"))}
    assert pose_source("ii") == pose_source("iv") == {"bank:train.npz"}
    assert pose_source("iii") == pose_source("vi") == {"bank:videos.npz"}
    bank = np.load(run / "poses" / "videos.npz")
    assert {str(n).split("/")[0] for n in bank["names"]} <= {"vidA", "vidB"} and len(bank["poses"]) <= 20
    train = np.load(run / "smpl" / "bounding_box_train.npz")
    for v in ("ii", "iii"):  # the training photos' own viewpoints
        t = np.load(run / "targets" / v / "params.npz")
        assert all(np.isclose(train["elevation"], e, atol=0.01).any() for e in t["elevation"])
    # every generated name reads in the toolkits, under the source image's pid and camera
    aug = run / "augmented" / "vi" / "bounding_box_train"
    parsed = toolkit_parse(str(aug), "market1501")
    rows = {os.path.basename(x["file"]): x for x in csv.DictReader(open(run / "augmented" / "vi" / "manifest.csv"))}
    assert parsed and sorted(rows) == [p[0] for p in parsed]
    for name, pid, camid in parsed:
        assert (pid, camid) == util.parse_name(rows[name]["source"]) and "s0_" in name
    # 04 tells generated from real images by the folder they come from, not by the name
    d = util.load_reid_dataset(data["market1501"], extra_train=[str(aug)], check_sizes=False)
    assert d["extra"] == {str(aug / n) for n, _, _ in parsed}
    summary = (run / "results" / "summary.md").read_text()
    for row in ("(I) no augmentation", "(II)", "(III)", "(IV)", "(V)", "(VI) both = Diff-ID"):
        assert f"| {row}" in summary, row
    assert "skipping the paper's stage 1" not in r.stdout


@pytest.mark.timeout(900)  # (runs the flow first when selected alone)
def test_dry_run_prints_the_commands_the_run_ran(market_run, data, hub, tmp_path):
    """--dry-run lists every stage command, in order, exactly as the run itself ran them (its
    '== stage: python ...' lines); it writes nothing."""
    run, r = market_run
    d = run_all("market1501", data, hub, run.parent, "hub", "--stage1-data", data["videos"], "--pose-videos",
                data["videos"], "--tables", "--dry-run")
    assert d.returncode == 0, d.stderr
    planned = [l for l in d.stdout.splitlines() if l.startswith("python ") and "tools/summarize.py" not in l]
    ran = [l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("== ") and ": python " in l]
    assert planned[0].startswith("python tools/check_weights.py") and planned[1:] == ran
    for stage in ("01b_estimate_smpl.py keypoints --data " + data["videos"], "01_render_smpl.py bank",
                  "--random-unets", "--pose-bank " + str(run / "poses" / "videos.npz")):
        assert any(stage in l for l in planned), stage
    dry = run_all("dukemtmc", data, hub, tmp_path, "local", "--dry-run")  # Duke: the same flow, nothing written
    assert dry.returncode == 0 and "note" not in dry.stderr.lower() and not os.listdir(tmp_path)


def test_missing_inputs_one_line(data, hub, tmp_path):
    r = run_all("market1501", data, hub, tmp_path, "hub", "--stage1-data", str(tmp_path / "no_videos"))
    assert r.returncode == 2 and "stage-1 videos (--stage1-data)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_all("market1501", data, hub, tmp_path, "hub", "--stage1-data", data["videos"], "--stage1-smpl", str(tmp_path))
    assert r.returncode == 2 and "vidA.npz' not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for args, words in ((("--pose-videos", str(tmp_path / "none")), "dance videos (--pose-videos)"),
                        (("--mixing", "sum"), "--mixing 'sum'"), (("--added", "all"), "--added 'all'"),
                        (("--pose-bank", str(tmp_path / "b.npz")), "pose bank (--pose-bank)")):
        r = run_all("market1501", data, hub, tmp_path, "hub", *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.listdir(tmp_path)  # nothing written


def test_duke_generated_names_read_in_the_toolkits(tmp_path):
    """Duke's cameras 1-8 (Market has 6): a generated name keeps the source's pid and camera."""
    for pid, cam in ((1, 0), (702, 7)):
        util.save_image(str(tmp_path / util.generated_name(pid, cam, 12)), np.zeros((8, 4, 3), np.uint8))
    assert sorted((p, c) for _, p, c in toolkit_parse(str(tmp_path), "dukemtmc")) == [(1, 0), (702, 7)]


def test_missing_weights_one_line_each_before_any_stage(data, hub, tmp_path):
    """A weight that cannot be had (here: a deleted id, and an encoder folder without weights) is
    named in one line each, exit 2, before the first stage writes anything."""
    os.makedirs(tmp_path / "enc" / "image_encoder")
    shutil.copy(os.path.join(hub["enc"], "image_encoder", "config.json"), tmp_path / "enc" / "image_encoder")
    args = ["bash", os.path.join(ROOT, "run_all.sh"), "market1501", "--data-root", data["market1501"], "--pretrained",
            "gone/deleted-model", "--image-encoder", str(tmp_path / "enc"), "--smoke", "--no-size-check"]
    r = subprocess.run(args, capture_output=True, text=True, env=dict(env(hub), RUNS_DIR=str(tmp_path / "runs")), cwd=ROOT)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 2, r.stdout + r.stderr
    assert "--pretrained 'gone/deleted-model'" in err[0] and "local cache" in err[0]
    assert "--image-encoder" in err[1] and "weights" in err[1]
    assert "== " not in r.stdout and not glob.glob(str(tmp_path / "runs" / "*" / "smpl"))  # no stage ran
    # the default ids as the cache holds them pass, and --smpl spares the ViTPose check
    ok = subprocess.run([sys.executable, "tools/check_weights.py", f"sd15={SD15}", f"image_encoder={ENCODER}",
                         "vitpose=usyd-community/vitpose-base-simple", "resnet50=none"],
                        capture_output=True, text=True, env=env(hub), cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.count("found") == 4, ok.stderr


def test_market_folder_names_are_recognised(tmp_path):
    os.makedirs(tmp_path / "Market-1501-v15.09.15" / "bounding_box_train")
    for split in ("query", "bounding_box_test"):
        os.makedirs(tmp_path / "Market-1501-v15.09.15" / split)
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        util.save_image(str(tmp_path / "Market-1501-v15.09.15" / split / "0002_c1s1_000451_03.jpg"),
                          np.zeros((8, 4, 3), np.uint8))
    with pytest.raises(util.UserError, match="looks incomplete.*expected 751"):  # the official archive's name
        util.load_reid_dataset(str(tmp_path / "Market-1501-v15.09.15"))
    os.rename(tmp_path / "Market-1501-v15.09.15", tmp_path / "data")
    util.load_reid_dataset(str(tmp_path / "data"))  # a neutral name: no check unless asked for ...
    with pytest.raises(util.UserError, match="expected 702"):  # ... by name (04/05 --dataset)
        util.load_reid_dataset(str(tmp_path / "data"), name="dukemtmc")
