"""Foundation: data set parsing, PK sampler, triplet loss, evaluator, 04 training + resume, 05."""
import os
import sys
import csv
import json
import time
import signal
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from stages import ROOT, load_stage  # noqa: E402  (puts the repository root on sys.path)
import common  # noqa: E402
import evaluate_fast  # noqa: E402
import util  # noqa: E402
import models  # noqa: E402

train04 = load_stage("04_train_reid.py")


def run(script, *args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def make_market(root, n_ids=8, per_cam=3, cams=(1, 2), test_ids=6, separable=False, seed=0, h=32, w=16):
    """A tiny Market-1501-layout data set. separable=True: each identity wears its own shirt
    colour (on a noisy background, with a random shirt position and brightness), so a trained
    model can tell them apart and an untrained one does much worse."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n_ids + test_ids + 1, 3))

    def image(pid):
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        if separable:
            top = rng.integers(0, h // 2)
            img[top:top + h // 2, 2:w - 2] = np.clip(colours[pid] * rng.uniform(0.8, 1.2) + rng.normal(0, 10, (h // 2, w - 4, 3)), 0, 255)
        return img

    n = 0
    def write(folder, pid, cam):
        nonlocal n
        n += 1
        util.save_image(os.path.join(root, folder, f"{pid:04d}_c{cam}s1_{n:06d}_00.jpg"), image(pid))

    for pid in range(1, n_ids + 1):
        for cam in cams:
            for _ in range(per_cam):
                write("bounding_box_train", pid, cam)
    for pid in range(n_ids + 1, n_ids + test_ids + 1):
        write("query", pid, cams[0])
        for cam in cams:
            for _ in range(per_cam):
                write("bounding_box_test", pid, cam)
    write("bounding_box_test", 0, cams[1])   # a distractor
    write("bounding_box_test", -1, cams[1])  # junk: dropped
    return root


# -----------------------------------------------------------------------------
# data sets

def test_parse_name_uses_basename_only():
    assert util.parse_name("/data/run1_c2/0002_c1s1_000451_03.jpg") == (2, 0)
    assert util.parse_name("0001_c8_f0046182.jpg") == (1, 7)
    assert util.parse_name("-1_c3s1_000001_00.jpg") == (-1, 2)
    with pytest.raises(util.UserError, match="holiday.jpg"):
        util.parse_name("/x/0001_c1/holiday.jpg")
    with pytest.raises(util.UserError, match="1-2_c1s1_000001_00.jpg"):  # toolkits' [-\d]+ would take "1-2"
        util.parse_name("1-2_c1s1_000001_00.jpg")
    # a generated image: the source's pid and camera, sequence 0
    assert util.generated_name(7, 4, 30012) == "0007_c5s0_030012_00.jpg"
    assert util.parse_name(util.generated_name(7, 4, 30012)) == (7, 4)


def test_bad_name_in_a_split_is_one_line(tmp_path):
    root = make_market(tmp_path / "data")
    util.save_image(str(root / "bounding_box_train" / "1-2_c1s1_000001_00.jpg"), np.zeros((8, 4, 3), np.uint8))
    r = run("04_train_reid.py", "--data", root, "--out", tmp_path / "o", "--no-size-check", check=False)
    assert r.returncode == 2 and "1-2_c1s1_000001_00.jpg" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dataset_relabel_junk_distractor_and_extra(tmp_path):
    root = make_market(tmp_path / "m", n_ids=3, per_cam=1)
    extra = tmp_path / "aug" / "bounding_box_train"
    util.save_image(str(extra / "0002_c9s1_000001_00.jpg"), np.zeros((8, 4, 3), np.uint8))
    d = util.load_reid_dataset(str(root), extra_train=[str(extra)])
    assert d["num_classes"] == 3
    assert sorted({lab for _, lab, _ in d["train"]}) == [0, 1, 2]
    assert [lab for p, lab, cam in d["train"] if "c9" in p] == [1]  # pid 2 -> label 1, under its source pid
    assert all(cam in (0, 1) for _, _, cam in d["query"])
    g_pids = [pid for _, pid, _ in d["gallery"]]
    assert 0 in g_pids and -1 not in g_pids


def test_extra_count_takes_nested_subsets(tmp_path):
    root = make_market(tmp_path / "m", n_ids=3, per_cam=1)
    extra = tmp_path / "aug" / "bounding_box_train"
    for i in range(20):
        util.save_image(str(extra / f"{1 + i % 3:04d}_c9s1_{i:06d}_00.jpg"), np.zeros((8, 4, 3), np.uint8))
    n_real = len(util.load_reid_dataset(str(root))["train"])
    picked = {}
    for n in (0, 5, 12, 20):
        d = util.load_reid_dataset(str(root), extra_train=[str(extra)], extra_count=n)
        picked[n] = {p for p, _, _ in d["train"] if "_c9s1_" in p}
        assert len(d["train"]) == n_real + n and len(picked[n]) == n
    assert picked[0] < picked[5] < picked[12] < picked[20]  # smaller counts are subsets of larger ones
    with pytest.raises(util.UserError, match="only 20"):
        util.load_reid_dataset(str(root), extra_train=[str(extra)], extra_count=21)


def test_dataset_size_check_names_folder(tmp_path):
    root = make_market(tmp_path / "market1501", n_ids=3, per_cam=1)
    with pytest.raises(util.UserError, match="market1501.*expected 751"):
        util.load_reid_dataset(str(root))


# -----------------------------------------------------------------------------
# PK sampler and triplet loss

def test_pk_sampler_batches_and_coverage():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(23), rng.integers(1, 12, 23))
    s = train04.PKSampler(labels, P=4, K=3, seed=5)
    for e in range(3):
        batches = s.epoch(e)
        seen = set()
        for b in batches:
            assert len(b) == 12
            pids = labels[b].reshape(4, 3)
            assert (pids == pids[:, :1]).all() and len(set(pids[:, 0])) == 4
            seen |= set(pids[:, 0])
        assert seen == set(range(23))
    assert s.epoch(1) == train04.PKSampler(labels, P=4, K=3, seed=5).epoch(1)  # a function of (seed, epoch)
    # resuming the stream at batch i gives the same batches as the uninterrupted stream
    a = s.iterate(0)
    full = [next(a) for _ in range(40)]
    b = s.iterate(25)
    assert [next(b) for _ in range(15)] == full[25:]
    # DDP: the ranks split each batch into whole identities
    r0, r1 = (train04.PKSampler(labels, 4, 3, seed=5, rank=r, world_size=2).epoch(0) for r in (0, 1))
    assert [x + y for x, y in zip(r0, r1)] == s.epoch(0)


def test_triplet_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for margin in (0.3, 0.5, 2.0):
        f = torch.randn(24, 7, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (24,), generator=g)
        y[:5] = torch.arange(5)  # every class present
        y[5:10] = torch.arange(5)
        total = 0.0
        for a in range(24):
            pos = [torch.dist(f[a], f[j]).item() for j in range(24) if y[j] == y[a]]
            neg = [torch.dist(f[a], f[j]).item() for j in range(24) if y[j] != y[a]]
            total += max(0.0, max(pos) - min(neg) + margin)
        assert common.triplet_loss(f, y, margin).item() == pytest.approx(total / 24, abs=1e-5)


def test_reid_loss_by_hand():
    """04's reid_loss: the paper's sum of the batch-hard triplet and the cross-entropy; with
    CamStyle mixing (first n_real rows real) the real rows' cross-entropy plus extra_weight x the
    generated rows' label-smoothed one, and the triplet over all rows or the real ones only."""
    g = torch.Generator().manual_seed(1)
    feat, logits = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3])

    def ce(rows, eps=0.0):  # cross-entropy written out, label smoothing as (1 - eps) one-hot + eps / C
        logp = logits[rows] - logits[rows].exp().sum(1, keepdim=True).log()
        target = torch.full_like(logp, eps / 4)
        target[torch.arange(len(rows)), y[rows]] += 1 - eps
        return -(target * logp).sum(1).mean()
    loss, tri, l_ce = train04.reid_loss(feat, logits, y, 0.5)
    assert torch.isclose(loss, common.triplet_loss(feat, y, 0.5) + ce(list(range(12))))
    real, gen = list(range(8)), list(range(8, 12))
    loss, tri, l_ce = train04.reid_loss(feat, logits, y, 0.5, n_real=8, extra_weight=0.25, extra_smoothing=0.1,
                                        extra_triplet="real")
    assert torch.isclose(tri, common.triplet_loss(feat[:8], y[:8], 0.5))
    assert torch.isclose(l_ce, ce(real) + 0.25 * ce(gen, 0.1)) and torch.isclose(loss, tri + l_ce)
    _, tri_all, _ = train04.reid_loss(feat, logits, y, 0.5, n_real=8, extra_triplet="all")
    assert torch.isclose(tri_all, common.triplet_loss(feat, y, 0.5)) and not torch.isclose(tri_all, tri)


# -----------------------------------------------------------------------------
# evaluator

@pytest.mark.parametrize("evaluate", [evaluate_fast.evaluate_rank, common.evaluate_rank])
def test_evaluator_hand_computed(evaluate):
    # one query (pid 1, cam 0); gallery by distance: [pid2, pid1 cam1, pid1 cam0 (removed), pid3, pid1 cam1]
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
    r = evaluate(d, np.array([1]), np.array([2, 1, 1, 3, 1]), np.array([0]), np.array([1, 1, 0, 1, 1]), max_rank=10)
    # kept ranking: pid2, pid1, pid3, pid1 -> hits at ranks 2 and 4: AP = (1/2 + 2/4) / 2
    assert r["mAP"] == pytest.approx(0.5)
    assert r["mINP"] == pytest.approx(2 / 4)
    assert r["cmc"].tolist() == [0, 1, 1, 1, 1]  # max_rank 10 cut at the gallery size
    # ties keep gallery order (stable sort): the match at index 2 ties with index 1 and 3
    d = np.array([[0.5, 0.2, 0.2, 0.2]], np.float32)
    r = evaluate(d, np.array([1]), np.array([2, 3, 1, 4]), np.array([0]), np.array([1, 1, 1, 1]))
    assert r["cmc"][:3].tolist() == [0, 1, 1] and r["mAP"] == pytest.approx(1 / 2)
    # junk (pid -1) is never ranked: the same numbers as without it, CMC cut at the scored gallery
    d = np.array([[0.05, 0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
    r = evaluate(d, np.array([1]), np.array([-1, 2, 1, 1, 3, 1]), np.array([0]), np.array([1, 1, 1, 0, 1, 1]), max_rank=10)
    assert r["mAP"] == pytest.approx(0.5) and r["mINP"] == pytest.approx(2 / 4) and r["cmc"].tolist() == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("evaluate", [evaluate_fast.evaluate_rank, common.evaluate_rank])
def test_evaluator_skips_same_camera_only_queries(evaluate):
    d = np.random.default_rng(0).random((2, 3)).astype(np.float32)
    r = evaluate(d, np.array([1, 2]), np.array([1, 2, 2]), np.array([0, 0]), np.array([0, 1, 1]))
    assert r["num_valid_queries"] == 1 and r["num_skipped_queries"] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_evaluator_equals_plain_on_random_problems(dtype):
    rng = np.random.default_rng(3)
    checked = tied = 0
    for trial in range(150):
        nq, ng, nid = rng.integers(1, 40), rng.integers(1, 90), rng.integers(1, 12)
        q_p, g_p = rng.integers(1, nid + 1, nq), rng.integers(0, nid + 1, ng)  # pid 0: distractors
        g_p[rng.random(ng) < 0.1] = -1  # junk
        q_c, g_c = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
        if trial % 2:  # coarse values: many ties
            d = rng.integers(0, 6, (nq, ng)).astype(dtype) - 1
        else:
            d = rng.random((nq, ng)).astype(dtype)
        # queries with a match at the same distance as another gallery item: the stable order decides its rank
        tied += sum(np.isin(row[g_p == q], row[g_p != q]).any() for row, q in zip(d, q_p))
        try:  # the plain version of the protocol is the yardstick
            ref = common.evaluate_rank(d, q_p, g_p, q_c, g_c, max_rank=50)
        except ValueError:  # no query has a match from another camera: the fast one says so too
            with pytest.raises(ValueError, match="no query has a match"):
                evaluate_fast.evaluate_rank(d, q_p, g_p, q_c, g_c)
            continue
        r = evaluate_fast.evaluate_rank(d, q_p, g_p, q_c, g_c, max_rank=50, chunk=int(rng.integers(1, 9)))
        assert r["num_valid_queries"] == ref["num_valid_queries"]
        assert r["num_skipped_queries"] == ref["num_skipped_queries"]
        assert r["num_valid_queries"] + r["num_skipped_queries"] == nq
        assert abs(r["mAP"] - ref["mAP"]) < 1e-6 and abs(r["mINP"] - ref["mINP"]) < 1e-6
        assert len(r["cmc"]) == len(ref["cmc"]) == min(50, (g_p != -1).sum()) and np.abs(r["cmc"] - ref["cmc"]).max() < 1e-6
        checked += 1
    assert checked > 100 and tied > 500


# -----------------------------------------------------------------------------
# 04 + 05 end to end

TINY = ["--arch", "resnet18", "--backbone-weights", "none", "--size", "16x32", "--P", "4", "--K", "2", "--workers", "0",
        "--no-size-check", "--threads", "2"]


def test_train_and_evaluate_random_images(tmp_path):
    root = make_market(tmp_path / "data")
    out = tmp_path / "runs" / "reid" / "base"
    run("04_train_reid.py", "--data", root, "--out", out, "--steps", 6, "--log-every", 2,
        "--warmup", 4, "--lr-steps", 5, "--bnneck", *TINY)  # (05 must rebuild the BNNeck from model.pt)
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and [l.split(",")[0] for l in log[1:]] == ["2", "4", "6"]
    # warm-up over 4 steps, then x0.1 from the 6th: learning rate used at steps 2, 4, 6
    assert [float(l.split(",")[5]) for l in log[1:]] == pytest.approx([0.5e-5, 1e-5, 1e-6])
    assert np.isfinite([float(l.split(",")[1]) for l in log[1:]]).all()
    run("05_evaluate.py", "--model", out / "model.pt", "--data", root, "--no-size-check", "--workers", 0)
    res = json.loads((tmp_path / "runs" / "results" / "base.json").read_text())
    assert 0 <= res["mAP"] <= 1 and res["num_query"] == 6 and res["num_gallery"] == 6 * 6 + 1
    run("05_evaluate.py", "--model", out / "model.pt", "--data", root, "--no-size-check", "--workers", 0)
    table = (tmp_path / "runs" / "results" / "results.md").read_text()
    assert table.count("| base |") == 1  # evaluating again replaces the row


def test_training_separates_identities(tmp_path):
    root = make_market(tmp_path / "data", n_ids=10, per_cam=4, test_ids=8, separable=True)
    maps = {}
    for iters in (0, 80):
        out = tmp_path / "reid" / f"it{iters}"
        run("04_train_reid.py", "--data", root, "--out", out, "--steps", iters, "--lr", "3e-4",
            "--lr-classifier", "1e-3", *TINY)
        run("05_evaluate.py", "--model", out / "model.pt", "--data", root, "--no-size-check", "--workers", 0,
            "--results", tmp_path / "results")
        maps[iters] = json.loads((tmp_path / "results" / f"it{iters}.json").read_text())["mAP"]
    assert maps[80] > maps[0] + 0.15, maps


def test_resume_after_kill_past_the_learning_rate_drop_equals_a_straight_run(tmp_path):
    """Killed after its learning-rate drop (and after a checkpoint there), the resumed run ends
    with the weights of a run never interrupted: the schedule is a function of the step alone,
    the PK stream, the optimiser and the RNGs come back from the checkpoint."""
    root = make_market(tmp_path / "data")
    common_args = ["--steps", 200, "--lr-steps", 20, "--save-every", 5, "--log-every", 1, *TINY]
    straight, out = tmp_path / "straight", tmp_path / "killed"
    run("04_train_reid.py", "--data", root, "--out", straight, *common_args)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "04_train_reid.py"), "--data", str(root), "--out", str(out),
                             *map(str, common_args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.pt"
    step = lambda: torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0
    while proc.poll() is None and step() < 25:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = step()
    assert 25 <= killed_at < 200 and not (out / "model.pt").exists()
    r = run("04_train_reid.py", "--data", root, "--out", out, *common_args)
    assert f"resumed from {ckpt} at step {killed_at}" in r.stdout
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (straight, out))
    assert b["iterations"] == 200 and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    logs = [(d / "log.csv").read_text().splitlines() for d in (straight, out)]
    assert [int(l.split(",")[0]) for l in logs[1][1:]] == list(range(1, 201))  # no gap, no duplicate rows
    assert [l.split(",")[5] for l in logs[0]] == [l.split(",")[5] for l in logs[1]]  # the same learning rates
    # resuming with a setting that changes the result is refused in one line, the checkpoint kept
    os.remove(out / "model.pt")
    r = run("04_train_reid.py", "--data", root, "--out", out, *common_args, "--lr", "2e-5", check=False)
    assert_clean_error(r, "--lr 1e-05 (now 2e-05)")
    assert step() == 200


def test_loading_a_crafted_model_file_runs_no_code(tmp_path):
    """A model.pt whose pickle would run code (here: create a file) is refused in one line."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"arch": "resnet18", "num_classes": 2, "state_dict": Evil()}, tmp_path / "model.pt")
    root = make_market(tmp_path / "data", n_ids=2, per_cam=1)
    r = run("05_evaluate.py", "--model", tmp_path / "model.pt", "--data", root, "--no-size-check", check=False)
    assert_clean_error(r, "model.pt", "not a Re-ID model")
    assert not marker.exists()


# -----------------------------------------------------------------------------
# bad inputs: one line, exit 2, nothing from deep inside a library

def assert_clean_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs(tmp_path):
    r = run("04_train_reid.py", "--data", tmp_path / "nope", "--out", tmp_path / "o", check=False)
    assert_clean_error(r, "nope", "does not exist")
    root = make_market(tmp_path / "d1", n_ids=4, per_cam=1)
    os.rename(root / "query", root / "q2")
    r = run("04_train_reid.py", "--data", root, "--out", tmp_path / "o", "--no-size-check", check=False)
    assert_clean_error(r, "query", "missing")
    root = make_market(tmp_path / "d2", n_ids=4, per_cam=1)
    Image.new("RGB", (4, 8)).save(root / "bounding_box_train" / "IMG_1234.jpg")
    r = run("04_train_reid.py", "--data", root, "--out", tmp_path / "o", "--no-size-check", check=False)
    assert_clean_error(r, "IMG_1234.jpg")
    root = make_market(tmp_path / "d3", n_ids=4, per_cam=1)
    for f in (root / "bounding_box_test").iterdir():
        f.unlink()
    r = run("05_evaluate.py", "--model", tmp_path / "m.pt", "--data", root, check=False)
    assert_clean_error(r, "m.pt")
    r = run("04_train_reid.py", "--data", root, "--out", tmp_path / "o", "--no-size-check", check=False)
    assert_clean_error(r, "bounding_box_test", "no images")


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = make_market(tmp_path / "data")
    bad = root / "bounding_box_train" / "0003_c1s1_999999_00.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "reid"
    r = run("04_train_reid.py", "--data", root, "--out", out, "--steps", 3, *TINY)
    assert "skipped 1 unreadable" in r.stdout
    assert "0003_c1s1_999999_00.jpg" in r.stderr
    assert (out / "model.pt").exists()


def test_imagenet_weights_unavailable_is_one_clear_error(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(util.UserError, match="--backbone-weights PATH"):
        models.build_reid_model("resnet18", 3, "imagenet")


def test_backbone_weights_from_file(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = models.build_reid_model("resnet18", 5, str(tmp_path / "r18.pth"))
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    x = torch.randn(2, 3, 32, 16)
    ref.fc = torch.nn.Identity()
    ref.eval(), m.eval()
    assert torch.allclose(m(x)[0], ref(x)) and m(x)[1].shape == (2, 5)


def test_bnneck_logits_and_feature():
    torch.manual_seed(0)
    m = models.build_reid_model("resnet18", 5, bnneck=True)
    m.train()
    m(torch.randn(8, 3, 32, 16))  # move the running statistics away from (0, 1)
    with torch.no_grad():
        m.neck.weight.uniform_(0.5, 2.0)
    m.eval()
    x = torch.randn(4, 3, 32, 16)
    f, logits = m(x)
    assert torch.equal(f, m.backbone(x))  # the triplet / ranking feature is the pooled one, before the BN
    n = m.neck
    ref = (f - n.running_mean) / torch.sqrt(n.running_var + n.eps) * n.weight @ m.classifier.weight.T
    assert torch.allclose(logits, ref, atol=1e-4)
    assert m.classifier.bias is None and not n.bias.requires_grad and n.bias.abs().sum() == 0


def test_slim_resnet_widths_and_reload(tmp_path):
    m = models.build_reid_model("resnet18", 5, bnneck=True, width_mult=0.25)
    convs = [c.out_channels for c in m.backbone.modules() if isinstance(c, torch.nn.Conv2d)]
    assert convs[0] == 16 and sorted(set(convs)) == [16, 32, 64, 128] and m.feat_dim == 128
    # the same blocks as torchvision's resnet18, each with 1/4 of the channels (1/16 of the weights, about)
    full = models.build_reid_model("resnet18", 5, bnneck=True)
    assert [type(c).__name__ for c in m.backbone.modules()] == [type(c).__name__ for c in full.backbone.modules()]
    n = lambda net: sum(p.numel() for p in net.backbone.parameters())
    assert 1 / 20 < n(m) / n(full) < 1 / 12
    assert models.build_reid_model("resnet50", 5, width_mult=0.5).feat_dim == 1024  # 256 x 4 (bottleneck)
    with pytest.raises(util.UserError, match="width-mult"):
        models.build_reid_model("shufflenet_v2_x0_5", 5, width_mult=0.5)
    root = make_market(tmp_path / "data")  # 04 stores the multiplier; 05 rebuilds the slim network from model.pt
    out = tmp_path / "slim"
    run("04_train_reid.py", "--data", root, "--out", out, "--steps", 2, "--bnneck", "--width-mult", 0.25, *TINY)
    model, ckpt = models.load_reid_model(str(out / "model.pt"))
    assert ckpt["width_mult"] == 0.25 and model.feat_dim == 128


def test_preloaded_images_equal_decoded_ones(tmp_path):
    import torchvision.transforms as T
    root = make_market(tmp_path / "data", n_ids=2, per_cam=2)
    items = util.load_reid_dataset(str(root), check_sizes=False)["train"]
    size = (24, 12)  # a real resize (the images are 32x16)
    pil = models.ImageDataset(items, T.Compose([T.Resize(size), T.ToTensor()]))
    mem = models.ImageDataset(items, T.ConvertImageDtype(torch.float), preload=size)
    for i in range(len(items)):
        assert torch.equal(pil[i][0], mem[i][0]) and pil[i][1:] == mem[i][1:]


def test_extra_per_id_keeps_the_real_batch_and_adds_its_identities():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0, 0, 1, 2])  # indices 8.. are generated
    extra_by_label = {0: np.array([8, 9]), 1: np.array([10]), 2: np.array([11])}
    real = [0, 1, 3, 4]  # a P=2 x K=2 batch of identities 0 and 1
    b = train04.add_extra(real, 7, labels, 2, 3, extra_by_label, seed=0)
    assert b[:4] == real and len(b) == 4 + 3 + 3
    assert set(b[4:7]) <= {8, 9} and b[7:] == [10, 10, 10]  # 3 per identity, with replacement if fewer
    assert b == train04.add_extra(real, 7, labels, 2, 3, extra_by_label, seed=0)  # a function of the batch number
    assert train04.add_extra([6, 7], 0, labels, 2, 1, {0: np.array([8])}, seed=0) == [6, 7]  # none for id 2: none added


def test_extra_per_id_training_run(tmp_path):
    root = make_market(tmp_path / "data")
    extra = tmp_path / "aug" / "bounding_box_train"
    for i in range(16):
        util.save_image(str(extra / f"{1 + i % 8:04d}_c1s0_{i:06d}_00.jpg"), np.full((32, 16, 3), 40 * (i % 6), np.uint8))
    out = tmp_path / "mix"
    run("04_train_reid.py", "--data", root, "--extra-train", extra, "--out", out, "--steps", 3, "--log-every", 1,
        "--extra-per-id", 2, "--extra-label-smoothing", 0.1, "--extra-weight", 0.5, "--extra-triplet", "real", "--preload", *TINY)
    ce = [float(l.split(",")[3]) for l in (out / "log.csv").read_text().splitlines()[1:]]
    assert len(ce) == 3 and np.isfinite(ce).all()


def test_ddp_two_processes_cpu(tmp_path):
    root = make_market(tmp_path / "data")
    out = tmp_path / "reid"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        os.path.join(ROOT, "04_train_reid.py"), "--data", str(root), "--out", str(out),
                        "--steps", "4", "--device", "cpu", *TINY], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "model.pt", weights_only=True)["iterations"] == 4
    assert "2 ranks hold identical weights" in r.stdout  # the ranks trained one model, not two


def test_identity_score_nearest_centroid_by_hand():
    ident = load_stage("tools/identity_score.py")
    # three identities at known places, two noisy train features each
    tf = np.array([[0, 0.1], [0, -0.1], [10, 0.1], [10, -0.1], [0.1, 10], [-0.1, 10]])
    tl = np.array([1, 1, 2, 2, 3, 3])
    q = np.array([[1, 0], [9, 1], [6, 0], [0, 4], [0, 0]])
    ql = np.array([1, 2, 3, 1, 7])  # kept, kept, nearer 2 than 3: lost, nearer 1 (4) than 3 (6): kept, unknown id
    assert np.mean(ident.nearest_centroid(tf, tl, q) == ql) == pytest.approx(3 / 5)
    assert list(ident.nearest_centroid(tf, tl, q)) == [1, 2, 2, 1, 1]
    # more images than one chunk (4,096): the same labels as the direct images x ids x dim formula
    rng = np.random.default_rng(0)
    tf, tl, q = rng.normal(size=(300, 16)), rng.integers(0, 40, 300), rng.normal(size=(9000, 16))
    ids = np.unique(tl)
    centroids = np.stack([tf[tl == c].mean(0) for c in ids])
    assert (ident.nearest_centroid(tf, tl, q) == ids[((q[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]).all()
    # lost images landing on 7 identities, 4, 3, 2, 1, 1, 1, 1 times: 11 of the 13 on the 5 most frequent
    assigned = np.array([1] * 4 + [2] * 3 + [3] * 2 + [4, 5, 6, 7] + [9, 9])
    labels = np.array([0] * 13 + [9, 9])  # the last two are kept
    c = ident.collapse(np.array([[0, 0], [2, 0]], float), np.array([[0, 0], [0, 4]], float), assigned, labels)
    assert c["wrong_ids"] == 7 and c["wrong_top5"] == pytest.approx(11 / 13)
    assert c["spread_vs_real"] == pytest.approx(2.0)  # distances to the mean: 2, 2 against 1, 1


def test_label_noise_moves_labels_keeps_counts(tmp_path):
    noise = load_stage("demo/label_noise.py")
    pids = np.repeat(np.arange(1, 41), 10)  # 40 identities x 10 images
    labels = noise.relabel(pids, keep=0.3, seed=0)
    assert sorted(labels) == sorted(pids)  # a shuffle: every identity keeps its number of images
    moved = labels != pids
    assert 0.65 <= moved.mean() <= 0.7  # 280 shuffled; a few land on their own identity by chance
    assert (noise.relabel(pids, keep=1.0, seed=0) == pids).all()
    # the script: files named under the new label, the true pid beside it in labels.csv
    src = tmp_path / "oracle" / "bounding_box_train"
    src.mkdir(parents=True)
    for k, pid in enumerate([1, 1, 2, 2, 3, 3]):
        Image.new("RGB", (16, 32), (40 * pid, 0, 0)).save(src / util.generated_name(pid, 0, k))
    run("demo/label_noise.py", "--src", tmp_path / "oracle", "--keep", 0, "--out", tmp_path / "noisy", "--seed", 1)
    rows = list(csv.DictReader(open(tmp_path / "noisy" / "labels.csv")))
    for r in rows:  # each image still shows its true person (the red level) under its new label
        path = tmp_path / "noisy" / "bounding_box_train" / r["file"]
        assert util.parse_name(r["file"])[0] == int(r["label"])
        assert abs(int(np.asarray(Image.open(path))[0, 0, 0]) - 40 * int(r["pid"])) <= 3  # (JPEG)
    assert sorted(int(r["label"]) for r in rows) == [1, 1, 2, 2, 3, 3]
    r = run("demo/label_noise.py", "--src", tmp_path / "oracle", "--keep", 0, "--out", tmp_path / "noisy", check=False)
    assert r.returncode == 2 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_summarize_mean_and_spread_into_readme(tmp_path):
    res = tmp_path / "results"
    for variant, split, seed, m in [("base", "same", 0, 0.50), ("base", "same", 1, 0.60), ("base", "shifted", 0, 0.2),
                                    ("vi", "same", 0, 0.55), ("vi_n600", "same", 0, 0.4), ("vi_n50", "same", 0, 0.3),
                                    ("oracle", "same", 0, 0.7)]:
        util.save_json(str(res / f"{variant}_s{seed}_{split}.json"),
                         dict(name=f"{variant}_s{seed}_{split}", variant=variant, seed=seed, split=split, mAP=m, R1=m + 0.1))
    (tmp_path / "stage_times.csv").write_text("stage,seconds\n")
    util.save_json(str(res / "fidelity.json"), dict(images=1200, psnr_foreground=15.754, mask_iou=0.348,
                     identity_gain_psnr_foreground=dict(mean=0.234, ci95=[0.11, 0.351]), control_pose_shuffled=dict(mask_iou=0.2681)))
    (res / "stage_times.csv").write_text("stage,seconds\nworld,10\nreid,3\nreid,4\n")
    util.save_json(str(res / "identity.json"), dict(identities=120, chance=1 / 120, generated=dict(images=1200, agreement=0.25),
                     oracle=dict(images=1200, agreement=0.5), generated_vs_oracle=0.5))
    util.save_json(str(res / "fidelity_v.json"), dict(images=1200, psnr_foreground=14.0, mask_iou=0.3,
                     identity_gain_psnr_foreground=dict(mean=0.125, ci95=[-0.05, 0.3]), control_pose_shuffled=dict(mask_iou=0.26)))
    util.save_json(str(res / "identity_v.json"), dict(identities=120, chance=1 / 120, generated=dict(
        images=1200, agreement=0.0125, wrong_ids=50, wrong_top5=0.624, spread_vs_real=0.6449)))
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text("intro\n<!-- headline:start -->\nold rows\n<!-- headline:end -->\nrest\n")
    docs.parent.mkdir()
    docs.write_text("intro\n<!-- results:start -->\nold table\n<!-- results:end -->\nrest\n")
    run("tools/summarize.py", res, "--docs", docs, "--readme", readme)
    text, head = docs.read_text(), readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("<!-- results:end -->\nrest\n")
    assert "old rows" not in head and head.startswith("intro\n") and head.endswith("<!-- headline:end -->\nrest\n")
    # the README's headline: rows (I), (VI), ORACLE with mAP and the paired gain per split, the command, the link
    assert ("| row | same: mAP | shifted: mAP | same: mAP − (I) | shifted: mAP − (I) | seeds |\n|---|---|---|---|---|---|\n"
            "| (I) no augmentation | 55.0 ± 7.1 | 20.0 |  |  | 2 |\n| (VI) both = Diff-ID | 55.0 |  | +5.0 |  | 1 |\n"
            "| ORACLE: (VI)'s jobs rendered as ground truth | 70.0 |  | +20.0 |  | 1 |\n\n") in head
    assert "Table 2" not in head and "Generator fidelity" not in head and "| stage" not in head
    assert f"_Written by `python tools/summarize.py {res} --docs {docs} --readme {readme}`" in head
    assert f"[{docs}](docs/results.md)._\n" in head and f"_Written by `python tools/summarize.py {res} --docs" in text
    base = [l for l in text.splitlines() if l.startswith("| (I) no augmentation")][0]
    # mean 55.0, sample std of (50, 60) = 7.07; R1 65.0 +- 7.1; shifted has one seed
    assert "55.0 ± 7.1 | 65.0 ± 7.1 | 20.0 | 30.0 |  |  | 2 |" in base, base
    # the gain over (I) pairs seeds: vi seed 0 (55) - base seed 0 (50); no base seed to pair on shifted
    assert "| (VI) both = Diff-ID | 55.0 | 65.0 |  |  | +5.0 |  | 1 |" in text
    assert "1,200 generated (VI) images" in text and "person PSNR 15.75 dB, +0.23 dB (95% CI +0.11 .. +0.35)" in text
    assert "mask IoU 0.348 against 0.268 with" in text
    assert "25.0% of 1,200 generated images, 50.0% of their oracle renders (generated / oracle 0.50); chance 0.8%" in text
    assert "row (V)'s generator" in text and "+0.12 dB (95% CI -0.05 .. +0.30)" in text and "kept for 1.2% of 1,200" in text
    assert "1,200 images; the images that lose it land on 50 identities, 62% of them on 5, feature spread 0.64" in text
    assert "(120 identities).\n" in text  # identity.json without the collapse numbers: no clause
    # too few jobs for the controls (the smoke run): the line says n/a instead of failing
    util.save_json(str(res / "fidelity.json"), dict(images=2, psnr_foreground=None, mask_iou=0.5,
                     identity_gain_psnr_foreground=dict(mean=None, ci95=None), control_pose_shuffled=dict(mask_iou=None)))
    run("tools/summarize.py", res)
    assert "person PSNR n/a dB, n/a dB (95% CI n/a .. n/a)" in (res / "summary.md").read_text()
    # stage times: an older file (no run column) gives one column; then one column per invocation
    assert "| reid | 7 |" in text and "| all | 17 (0 min) |" in text
    (res / "stage_times.csv").write_text("stage,seconds,run\nworld,10,run_all.sh demo (d1)\nreid,90,run_all.sh demo (d1)\n"
                                         "world,2,run_all.sh demo --tables (d2)\nreid,3,run_all.sh demo --tables (d2)\n"
                                         "reid,4,run_all.sh demo --tables (d2)\ngenerate ii,5,run_all.sh demo --tables (d2)\n"
                                         "reid,1,run_all.sh demo --tables (d3)\nreid,1,run_all.sh demo --seeds 0 1 (d4)\n")
    run("tools/summarize.py", res, "--readme", readme)  # the runs behind the rows, each once, as commands
    assert ("_From `bash run_all.sh demo`, then `bash run_all.sh demo --tables`, then `bash run_all.sh demo --seeds "
            "\"0 1\"` in one folder; written by") in readme.read_text()
    times = (res / "summary.md").read_text()
    assert "| stage (wall time, s) | `run_all.sh demo (d1)` | `run_all.sh demo --tables (d2)` |" in times
    assert "| reid | 90 | 7 |" in times and "| generate ii |  | 5 |" in times and "| all | 100 (2 min) | 14 (0 min) |" in times
    # Table 2 rows follow Table 1's, by the number of generated images
    labels = [l.split(" | ")[0] for l in text.splitlines() if l.startswith("| (") or l.startswith("| Table 2")]
    assert labels == ["| (I) no augmentation", "| (VI) both = Diff-ID", "| Table 2: (VI) with 50 generated images",
                      "| Table 2: (VI) with 600 generated images"]
    # a reader that has gone before the table is printed (| true exits at once): no BrokenPipeError traceback
    p = subprocess.run(f"'{sys.executable}' tools/summarize.py '{res}' | true", shell=True, cwd=ROOT, capture_output=True, text=True)
    assert p.stderr == "", p.stderr


def test_reid_curves_table_pairs_by_seed():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import reid_curves
    pts = [dict(row=r, seed=s, iters=800, split=sp, mAP=m) for r, s, sp, m in [
        ("base", 0, "same", 50.0), ("base", 1, "same", 60.0), ("oracle", 0, "same", 49.0), ("oracle", 1, "same", 57.0),
        ("base", 0, "shifted", 10.0), ("base", 1, "shifted", 12.0), ("oracle", 0, "shifted", 20.0), ("oracle", 1, "shifted", 18.0)]]
    rows = reid_curves.table(pts).splitlines()[2:]
    # same: (I) 55 +- 7.07, ORACLE 53 +- 5.66, paired differences -1 and -3: -2 +- 1.41
    assert rows[0] == "| 800 | same | 55.0 ± 7.1 | 53.0 ± 5.7 | -2.0 ± 1.4 | 2 |"
    assert rows[1] == "| 800 | shifted | 11.0 ± 1.4 | 19.0 ± 1.4 | +8.0 ± 2.8 | 2 |"


# -----------------------------------------------------------------------------
# flags that change training do change it

def test_mixing_flags_change_the_trained_weights(tmp_path):
    """CamStyle mixing's --extra-weight and --extra-label-smoothing, and --max-aug-share, each
    change what 04 trains (same seed, same data, 3 steps): a flag that did nothing would leave the
    weights bit-identical to the reference run's."""
    root = make_market(tmp_path / "data")
    extra = tmp_path / "aug" / "bounding_box_train"
    for i in range(16):
        util.save_image(str(extra / f"{1 + i % 8:04d}_c1s0_{i:06d}_00.jpg"), np.full((32, 16, 3), 40 * (i % 6), np.uint8))
    mix = ["--extra-per-id", 2, "--extra-label-smoothing", 0.1, "--extra-weight", 0.5]
    variants = {"reference": mix, "extra-weight 0": mix[:-1] + [0], "no smoothing": mix[:3] + [0] + mix[4:],
                "pooled": [], "pooled, capped at 0": ["--max-aug-share", 0]}
    weights = {}
    for name, flags in variants.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        run("04_train_reid.py", "--data", root, "--extra-train", extra, "--out", out, "--steps", 3, *flags, *TINY)
        weights[name] = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    same = lambda a, b: all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])
    for name in ("extra-weight 0", "no smoothing"):
        assert not same("reference", name), name
    assert not same("pooled", "pooled, capped at 0")


def test_max_aug_share_caps_each_identitys_generated_slots():
    labels = np.array([0] * 6 + [1] * 6)
    is_aug = np.array([0, 0, 1, 1, 1, 1] * 2, bool)
    real_by_label = {0: np.array([0, 1]), 1: np.array([6, 7])}
    batch = [2, 3, 4, 5, 8, 9, 10, 11]  # P=2 x K=4, all generated
    for share, cap in ((0.0, 0), (0.5, 2), (1.0, 4)):
        out = train04.cap_augmented(batch, labels, is_aug, 4, share, real_by_label)
        for i in (0, 4):  # each identity's K slots: at most `cap` generated, the rest its real images
            group = out[i:i + 4]
            assert sum(is_aug[group]) == cap and all(labels[j] == labels[batch[i]] for j in group)


def test_flip_averages_the_mirrored_images_feature(tmp_path):
    """05 --flip: the feature is the mean of the image's and its mirror's, computed by hand here."""
    root = make_market(tmp_path / "data", n_ids=2, per_cam=1)
    items = util.load_reid_dataset(str(root), check_sizes=False)["query"]
    net = models.build_reid_model("resnet18", 3, bnneck=True, width_mult=0.25).eval()
    plain = models.extract_features(net, items, "cpu", 32, 16, workers=0)
    flipped = models.extract_features(net, items, "cpu", 32, 16, workers=0, flip=True)
    import torchvision.transforms as T
    x = torch.stack([T.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD)(T.ToTensor()(Image.open(p).convert("RGB")))
                     for p, _, _ in items])
    with torch.no_grad():
        mirror = net(x.flip(3).contiguous(memory_format=torch.channels_last))[0]
    torch.testing.assert_close(flipped, (plain + mirror) / 2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, flipped)
