"""demo/corpus.py, the demo generator's pretraining corpus: layout and counts, pids apart from the
world's, byte-identical reruns and worker counts, one identity per video in many poses and views,
re-renderable from identities.json, maps that 01 conditions reproduces from the smpl npz, 02's
stage 1 trains on it, and a rerun with other settings stops with one line. CPU, offline."""
import os
import sys
import json
import glob
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from stages import ROOT  # noqa: E402  (puts the repository root on sys.path)
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
from transformers import CLIPVisionModelWithProjection  # noqa: E402
import common  # noqa: E402
import util  # noqa: E402
import models  # noqa: E402
import body  # noqa: E402
from demo.world import World  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
CORPUS = os.path.join(ROOT, "demo", "corpus.py")
PEOPLE, FRAMES, PID_START = 4, 4, 100001  # what --smoke builds
PIDS = list(range(PID_START, PID_START + PEOPLE))


def script(path, *args, timeout=300):
    return subprocess.run([sys.executable, path, *map(str, args)], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def files(root):
    """{relative path: bytes} of every file under root, npz files as {key: array} (np.savez stamps
    the zip entries with the time of writing, so their bytes differ between identical runs)."""
    out = {}
    for p in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            rel = os.path.relpath(p, root)
            if p.endswith(".npz"):
                with np.load(p) as z:
                    out[rel] = {k: z[k] for k in z.files}
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for rel in a:
        if isinstance(a[rel], dict):
            assert sorted(a[rel]) == sorted(b[rel]), rel
            for k in a[rel]:
                assert np.array_equal(a[rel][k], b[rel][k]), f"{rel}:{k}"
        else:
            assert a[rel] == b[rel], rel


def image(path):
    return np.asarray(Image.open(path)).astype(np.int64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The smoke corpus twice: with 2 workers and with 1."""
    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for workers in (2, 1):
        d = str(root / f"w{workers}")
        r = script(CORPUS, "--out", d, "--smoke", "--workers", workers)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"{PEOPLE} to render" in r.stdout and "images/s" in r.stdout
        out[workers] = d
    return out


def test_smoke_layout_counts_and_pids_apart_from_the_world(corpus):
    d = corpus[2]
    vids = [f"{p:06d}" for p in PIDS]
    assert sorted(os.listdir(os.path.join(d, "frames"))) == vids
    assert sorted(os.listdir(os.path.join(d, "conditions"))) == vids
    assert sorted(os.listdir(os.path.join(d, "smpl"))) == [v + ".npz" for v in vids]
    assert not os.path.exists(os.path.join(d, ".partial"))
    for v in vids:
        stems = [f"{i:03d}" for i in range(FRAMES)]
        assert sorted(os.listdir(os.path.join(d, "frames", v))) == [s + ".png" for s in stems]
        assert sorted(os.listdir(os.path.join(d, "conditions", v))) == \
            sorted(f"{s}.{k}.png" for s in stems for k in common.COND_KINDS)
        for s in stems:
            assert Image.open(os.path.join(d, "frames", v, s + ".png")).size == (64, 128)
            maps = body.load_conditions(os.path.join(d, "conditions", v), s)
            assert maps["depth"].shape == (1, 128, 64) and maps["normal"].shape == (3, 128, 64)
            m = maps["depth"][0].numpy() > 0  # the body's box fills the frame like a Re-ID crop (body.FILL)
            assert max(m.any(1).mean(), m.any(0).mean()) > 0.85
        p = body.load_params(os.path.join(d, "smpl", v + ".npz"))  # the sidecar keys of docs/formats.md
        assert list(p["names"]) == [s + ".png" for s in stems]
        assert p["K"].shape == (FRAMES, 3, 3) and (p["image_size"] == [128, 64]).all()
    with open(os.path.join(d, "identities.json")) as f:
        meta = json.load(f)
    pids = [i["pid"] for i in meta["identities"]]
    assert pids == PIDS and not set(pids) & set(range(1, 221))  # the world's ids are 1..220
    assert len(meta["styles"]) == 2 * PEOPLE and meta["config"]["frames"] == FRAMES


def test_workers_and_rerenders_give_identical_files(corpus, tmp_path):
    a, b = files(corpus[2]), files(corpus[1])
    assert len(a) == PEOPLE * (4 * FRAMES + 1) + 1
    assert_same(a, b)  # 2 workers == 1 worker
    # a video deleted, and one interrupted before its npz (frames in place, one of them garbage,
    # a stale .partial): both are rendered again, the finished ones are skipped
    c = str(tmp_path / "c")
    shutil.copytree(corpus[1], c)
    for d in ("frames", "conditions"):
        shutil.rmtree(os.path.join(c, d, "100002"))
    os.remove(os.path.join(c, "smpl", "100002.npz"))
    os.remove(os.path.join(c, "smpl", "100003.npz"))
    util.save_image(os.path.join(c, "frames", "100003", "000.png"), np.zeros((128, 64, 3), np.uint8))
    util.save_image(os.path.join(c, ".partial", "frames", "100003", "009.png"), np.zeros((128, 64, 3), np.uint8))
    r = script(CORPUS, "--out", c, "--smoke", "--workers", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{PEOPLE - 2} videos exist, 2 to render" in r.stdout
    assert_same(files(c), a)


def test_one_identity_per_video_in_many_poses_and_views(corpus):
    d = corpus[1]
    with open(os.path.join(d, "identities.json")) as f:
        meta = json.load(f)
    ids = {i["pid"]: i for i in meta["identities"]}
    style_names = {s["name"] for s in meta["styles"]}
    betas = []
    for pid in PIDS:
        v = f"{pid:06d}"
        p = body.load_params(os.path.join(d, "smpl", v + ".npz"))
        # one identity: the same betas in every frame, those of identities.json
        assert np.array_equal(p["betas"], np.tile(np.float32(ids[pid]["betas"]), (FRAMES, 1)))
        betas.append(p["betas"][0])
        # many poses and views: no two frames share a pose, a viewpoint or an image
        pose = np.concatenate([p["global_orient"], p["body_pose"]], 1)
        for i in range(FRAMES):
            for j in range(i):
                assert np.abs(pose[i] - pose[j]).max() > 1e-3
        assert len(set(p["azimuth"].tolist())) == FRAMES
        assert (0 <= p["elevation"]).all() and (p["elevation"] <= 30).all()
        assert (0 <= p["azimuth"]).all() and (p["azimuth"] < 360).all()
        imgs = [image(os.path.join(d, "frames", v, f"{i:03d}.png")) for i in range(FRAMES)]
        assert all(np.abs(imgs[i] - imgs[j]).mean() > 1 for i in range(FRAMES) for j in range(i))
        assert set(p["style"].tolist()) <= style_names and all(s.startswith(f"v{pid}_") for s in p["style"])
        assert set(p["pose_kind"].tolist()) <= set(meta["config"]["pose_kinds"])
    assert len({tuple(b) for b in betas}) == PEOPLE  # and different people differ


def test_world_rerenders_frames_and_01_reproduces_maps(corpus, tmp_path):
    """identities.json + smpl npz are enough: the World re-renders a frame, 01 conditions its maps
    (up to float32 rounding of the stored camera: a few pixels off by one level)."""
    d = corpus[1]
    with open(os.path.join(d, "identities.json")) as f:
        meta = json.load(f)
    w = World(meta)
    try:
        for pid in PIDS[:2]:
            v = f"{pid:06d}"
            p = body.load_params(os.path.join(d, "smpl", v + ".npz"))
            for i in range(FRAMES):
                img, _, _ = w.render(w.ids[pid], p["global_orient"][i], p["body_pose"][i], float(p["elevation"][i]),
                                     float(p["azimuth"][i]), str(p["style"][i]), tuple(p["image_size"][i]),
                                     int(p["seed"][i]))
                diff = np.abs(img.astype(np.int64) - image(os.path.join(d, "frames", v, f"{i:03d}.png")))
                assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (v, i)
    finally:
        w.close()
    vids = [f"{p:06d}" for p in PIDS]
    r = script(os.path.join(ROOT, "01_render_smpl.py"), "conditions", "--data", d, "--splits", *vids,
               "--out", tmp_path / "maps")
    assert r.returncode == 0, r.stderr[-3000:]
    for v in vids:
        for i in range(FRAMES):
            for k in common.COND_KINDS:
                a = image(body.cond_path(os.path.join(d, "conditions", v), f"{i:03d}", k))
                b = image(body.cond_path(str(tmp_path / "maps" / v), f"{i:03d}", k))
                assert np.abs(a - b).max() <= 2 and (a != b).reshape(*a.shape[:2], -1).any(-1).mean() < 0.01, (v, i, k)


def test_02_stage1_trains_on_the_smoke_corpus(corpus, tmp_path):
    d, scratch, out = corpus[1], str(tmp_path / "scratch"), str(tmp_path / "generator_stage1")
    r = script(os.path.join(ROOT, "demo", "scratch_generator.py"), "--stage", 1, "--data", os.path.join(d, "frames"),
               "--out", scratch, "--size", "64x128", "--vae-steps", 2, "--vae-batch-size", 2, "--guider-widths", "8,16,32,64")
    assert r.returncode == 0, r.stderr[-3000:]
    r = script(os.path.join(ROOT, "02_train_generator.py"), "--stage", 1, "--data", os.path.join(d, "frames"),
               "--conditions", os.path.join(d, "conditions"), "--out", out, "--init", scratch, "--size", "64x128",
               "--steps", 2, "--batch-size", 2, "--sample-every", 0, "--ddim-steps", 2, "--num-val", 2,
               "--save-every", 2, "--log-every", 1, "--threads", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"read {PEOPLE * FRAMES} images in {PEOPLE} videos" in r.stdout
    # the guiders have the widths asked for, and load back with them (factor 8: 3 levels)
    g = models.load_guiders(os.path.join(out, "guiders.safetensors"))
    for k in common.COND_KINDS:
        convs = [m for m in g[k].body if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 64], k
        assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1, 2], k
    for f in ("reference_unet", "denoising_unet", "guiders.safetensors", "scheduler", "vae", "image_encoder",
              "args.json", "checkpoint.pt", "log.csv"):
        assert os.path.exists(os.path.join(out, f)), f
    with open(os.path.join(out, "log.csv")) as f:
        assert [l.split(",")[0] for l in f.read().split()[1:]] == ["1", "2"]


def test_other_settings_stop_with_one_line(corpus):
    d = corpus[1]
    before = files(d)
    for args, expect in ((("--seed", 7), "seed 1234 -> 7"), (("--frames", 5), "frames 4 -> 5"),
                         (("--size", "32x64"), "size [128, 64] -> [64, 32]"),
                         (("--pid-start", 200001), "pid_start 100001 -> 200001")):
        r = script(CORPUS, "--out", d, "--people", PEOPLE, "--frames", FRAMES, *args, "--workers", 1)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "other settings" in lines[0], lines
        assert expect in lines[0], lines
    for args in (("--size", "64by128"), ("--pid-start", 5), ("--frames", 1)):  # bad input: one line too
        r = script(CORPUS, "--out", d, *args, "--workers", 1)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert_same(files(d), before)  # nothing was written


def test_image_encoder_pretrains_rescales_and_02_uses_it(corpus, tmp_path):
    """demo/image_encoder.py on the smoke corpus: the saved encoder's embeddings have norm ~sqrt(dim)
    (the rescale lives in the weights), and demo/scratch_generator.py --image-encoder takes it frozen as it
    is: its generator folder's encoder gives the same embeddings, and the U-Nets' cross-attention
    width follows the encoder's (32 here, not 02's random encoder's 64)."""
    import torch
    d, enc_dir, gen_dir = corpus[1], str(tmp_path / "enc"), str(tmp_path / "gen")
    r = script(os.path.join(ROOT, "demo", "image_encoder.py"), "--corpus", d, "--out", enc_dir, "--steps", 20,
               "--people", 2, "--dim", 32, "--holdout", 0.5, "--threads", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.load(open(os.path.join(enc_dir, "encoder.json")))
    assert stats["videos"] == PEOPLE and stats["frames"] == PEOPLE * FRAMES and stats["heldout_videos"] == 2
    x = torch.stack([models.load_image_tensor(p, (128, 64))
                     for p in sorted(glob.glob(os.path.join(d, "frames", "*", "*.png")))])
    enc = CLIPVisionModelWithProjection.from_pretrained(enc_dir).eval()
    e = models.clip_embed(enc, x)[:, 0]
    assert e.shape == (PEOPLE * FRAMES, 32)
    assert abs(float(e.norm(dim=1).mean()) / np.sqrt(32) - 1) < 0.1
    r = script(os.path.join(ROOT, "demo", "scratch_generator.py"), "--stage", 1, "--data", os.path.join(d, "frames"),
               "--out", gen_dir, "--image-encoder", enc_dir, "--size", "64x128", "--vae-steps", 2, "--vae-batch-size", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    gen, _, enc2, _, _ = models.load_generator(gen_dir)
    assert gen.denoising_unet.config.cross_attention_dim == 32
    assert torch.equal(models.clip_embed(enc2, x)[:, 0], e)


def test_image_encoder_bad_corpus_is_one_line(corpus, tmp_path):
    """A corpus with a video folder that holds no frames (or no corpus at all) stops with one line."""
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(corpus[1], "frames"), bad / "frames")
    os.makedirs(bad / "frames" / "999999")  # sorts last: an empty video
    for root in (bad, tmp_path / "missing"):
        r = script(os.path.join(ROOT, "demo", "image_encoder.py"), "--corpus", root, "--out", tmp_path / "enc")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "enc")


@pytest.mark.timeout(900)  # a whole pipeline end to end
def test_pretrain_smoke_snapshots_export_and_provenance(tmp_path):
    """demo/pretrain.py --smoke: corpus -> image encoder -> 02 stage 1 in two segments of 2 steps
    (the second resumes the first: its weights differ from the first snapshot's) -> the export
    equals the last snapshot file for file, loads like any 02 folder and records its provenance.
    A rerun finds everything done and trains nothing."""
    import torch
    work, out = tmp_path / "work", str(tmp_path / "demo_generator")
    r = script(os.path.join(ROOT, "demo", "pretrain.py"), "--work", work, "--out", out, "--smoke", "--workers", 1,
               timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    snaps = work / "snapshots"
    assert sorted(os.listdir(snaps)) == ["step_000002", "step_000004"]
    exported = files(out)
    assert_same({k: v for k, v in exported.items() if k != "provenance.json"}, files(snaps / "step_000004"))
    assert "checkpoint.pt" not in exported and not any(k.startswith("samples") for k in exported)
    with open(work / "generator" / "log.csv") as f:
        assert [l.split(",")[0] for l in f.read().split()[1:]] == ["2", "4"]  # each segment logs its last step
    g2, _, _, _, _ = models.load_generator(str(snaps / "step_000002"))
    g4, vae, enc, schedule, a = models.load_generator(out)
    w2, w4 = g2.denoising_unet.conv_in.weight, g4.denoising_unet.conv_in.weight
    assert not torch.equal(w2, w4)
    assert a["stage"] == 1 and a["init"].endswith("scratch") and a["ema"] == 0.999
    prov = json.load(open(os.path.join(out, "provenance.json")))
    assert sorted(prov["steps"]) == ["corpus", "generator to step 2", "generator to step 4", "image encoder",
                                     "random generator"]
    assert prov["steps"]["generator to step 4"]["command"].split()[1:3] == ["02_train_generator.py", "--stage"]
    assert prov["settings"]["steps"] == 4 and prov["machine"]["cpus"] == os.cpu_count()
    r = script(os.path.join(ROOT, "demo", "pretrain.py"), "--work", work, "--out", out, "--smoke", "--workers", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training" not in r.stderr  # no 02 run: no progress bar
    again = files(out)
    assert_same({k: v for k, v in again.items() if k != "provenance.json"},
                {k: v for k, v in exported.items() if k != "provenance.json"})


SHIPPED = os.path.join(ROOT, "assets", "demo_generator")


def test_shipped_demo_generator_loads_and_its_vae_keeps_colour(corpus):
    """assets/demo_generator, what run_all.sh demo fine-tunes (02 --init; run_all.sh demo --smoke
    fine-tunes it and generates in test_pipeline): 02's layout, under 30 MB, with its provenance;
    models.load_generator (the path of --init and 03) loads it. Its VAE returns the people of
    corpus frames it never saw with most of their colour: the person pixels' colourfulness after
    encode + decode is >= 60% of the input's (the demo VAE trained on RGB errors alone kept 40%)."""
    import torch
    from demo.fidelity import colourfulness
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert size < 30 * 2 ** 20
    prov = json.load(open(os.path.join(SHIPPED, "provenance.json")))
    assert prov["settings"]["people"] == 1000 and "demo/pretrain.py" in prov["rebuild"]
    gen, vae, enc, schedule, a = models.load_generator(SHIPPED)
    assert a["stage"] == 1 and a["from_scratch"] and a["resolution"] == [64, 128]
    assert gen.denoising_unet.config.cross_attention_dim == enc.config.projection_dim
    frames = sorted(glob.glob(os.path.join(corpus[1], "frames", "*", "*.png")))
    x = torch.stack([models.load_image_tensor(p, (128, 64)) for p in frames])
    masks = [image(p.replace(os.sep + "frames" + os.sep, os.sep + "conditions" + os.sep)[:-4] + ".depth.png") > 0
             for p in frames]
    with torch.no_grad():
        rec = models.to_uint8(models.decode_latents(vae, models.encode_latents(vae, x))) / 255.0
    inp = ((x + 1) / 2).permute(0, 2, 3, 1).numpy()
    c_in = np.mean([colourfulness(i, m) for i, m in zip(inp, masks)])
    c_rec = np.mean([colourfulness(r, m) for r, m in zip(rec, masks)])
    assert c_in > 5 and c_rec >= 0.6 * c_in, (c_in, c_rec)
