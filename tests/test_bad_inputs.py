"""Bad inputs, one table: each case runs a script in a subprocess (with a timeout, so a hang fails
the case) and must end with exit status 2 and ONE stderr line 'error: ...' that names what is
wrong; never a traceback. Where a skip is documented (an unreadable image in a data set), the
case ends with exit 0 and a warning naming the file. Files a case marks as kept must be unchanged
afterwards, and folders it marks as absent must not have been made. CPU, offline, tiny inputs."""
import os
import sys
import json
import shutil
import tempfile
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stages import ROOT  # noqa: E402  (puts the repository root on sys.path)
import util  # noqa: E402
from test_reid import make_market, TINY  # noqa: E402
from test_generator import make_world, make_targets, make_sd_folder, train_args, gen_args, person  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
           PYOPENGL_PLATFORM=os.environ.get("PYOPENGL_PLATFORM", "osmesa"))
TIMEOUT = 120
# a read-only folder stops root only without the capability to override permissions
SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


# Starting a fresh interpreter costs 1-4 s of imports (torch, diffusers), more than most cases take:
# the cases run as processes forked from one server that imported those libraries once (and ran
# nothing in them). Each case is still its own process, run as `python script argv` would run it
# (runpy, __main__, its own argv, cwd, stdout, stderr and exit status), killed at the timeout.
# BAD_INPUTS_FRESH=1: a fresh interpreter per case instead.
SERVER = r"""
import os, sys, json, time, signal, runpy, traceback
base_path = list(sys.path)
sys.path.insert(0, sys.argv[1])
for m in ("numpy", "PIL.Image", "tqdm", "torch", "torchvision", "torchvision.transforms", "scipy.spatial.transform",
          "safetensors.torch", "diffusers", "transformers", "skimage.metrics", "smplx", "trimesh"):
    try:
        __import__(m)
    except Exception:
        pass
try:
    from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler, DDIMScheduler  # noqa
    from transformers import CLIPVisionModelWithProjection  # noqa
except Exception:
    pass
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        for fd, path in ((0, os.devnull), (1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(req["cwd"])
        sys.argv = [req["script"]] + req["argv"]
        sys.path[:] = [os.path.dirname(req["script"])] + base_path[1:]
        code = 0
        try:
            runpy.run_path(req["script"], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline, status = time.time() + req["timeout"], None
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    print(json.dumps({"rc": None if status is None else os.waitstatus_to_exitcode(status)}), flush=True)
"""
_server = None


def start_server():
    global _server
    _server = subprocess.Popen([sys.executable, "-c", SERVER, ROOT], env=ENV, cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert _server.stdout.readline().strip() == "ready"


def stop_server():
    global _server
    if _server is not None:
        _server.stdin.close()
        _server.wait(timeout=30)
        _server = None


def run(script, argv, drop_root=False, timeout=TIMEOUT):
    """-> CompletedProcess-like (returncode, stdout, stderr); a timeout raises TimeoutExpired."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, argv)]
    if drop_root or _server is None or os.environ.get("BAD_INPUTS_FRESH"):
        return subprocess.run((SETPRIV + cmd) if drop_root else cmd, env=ENV, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err")
        _server.stdin.write(json.dumps(dict(script=cmd[1], argv=cmd[2:], cwd=ROOT, stdout=out, stderr=err,
                                            timeout=timeout)) + "\n")
        _server.stdin.flush()
        rc = json.loads(_server.stdout.readline())["rc"]
        if rc is None:
            raise subprocess.TimeoutExpired(cmd, timeout)
        read = lambda p: open(p, errors="replace").read()  # noqa: E731
        return subprocess.CompletedProcess(cmd, rc, read(out), read(err))


def truncate(path, keep=0.5):
    """Cut a file to a share of its bytes: an interrupted copy or download."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])
    return path


def write_manifest(folder, header, rows):
    util.save_text(os.path.join(folder, "manifest.csv"), "\n".join([header] + rows) + "\n")

# -----------------------------------------------------------------------------
# the shared inputs: made once for all cases


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    start_server()
    try:
        yield make_inputs(tmp_path_factory.mktemp("bad_inputs"))
    finally:
        stop_server()


def make_inputs(root):
    f = SimpleNamespace(root=root)
    # Re-ID: a tiny Market-layout folder, a 04 model of one step, a test split seen by one camera only
    f.market = make_market(root / "market", n_ids=4, per_cam=1, test_ids=2)
    f.reid = root / "runs" / "reid" / "base"
    r = run("04_train_reid.py", ["--data", f.market, "--out", f.reid, *TINY, "--steps", 1])
    assert r.returncode == 0, r.stderr[-3000:]
    f.model = f.reid / "model.pt"
    f.onecam = make_market(root / "onecam", n_ids=4, per_cam=1, cams=(1, 1), test_ids=2)
    # the generator: tiny world, targets, SD-1.5-style folder, 02 for one step
    w = {"root": str(root / "gw")}
    w["data"], w["cond"] = make_world(w["root"])
    w["targets"] = make_targets(w["root"])
    w["sd"], w["enc"] = make_sd_folder(w["root"])
    f.w = w
    f.gen = str(root / "gen")
    r = run("02_train_generator.py", train_args(w, f.gen, 1, "--save-every", 1))
    assert r.returncode == 0, r.stderr[-3000:]
    # generated images of the market ids with a manifest (identity_score), and a generated / oracle
    # pair of folders (fidelity)
    f.idgen = root / "idgen"
    os.makedirs(f.idgen / "bounding_box_train")
    rows = []
    for k, src in enumerate(sorted(os.listdir(f.market / "bounding_box_train"))[:4]):
        pid, cam = util.parse_name(src)
        name = "bounding_box_train/" + util.generated_name(pid, cam, k)
        shutil.copy(f.market / "bounding_box_train" / src, f.idgen / name)
        rows.append(f"{name},{src},{pid},t{k:03d}")
    f.id_rows = rows
    write_manifest(f.idgen, "file,source,pid,target_id", rows)
    f.fgen, f.fora = root / "fgen", root / "fora"
    rows = []
    for src_pid in (1, 2):
        for t in range(2):
            name = f"bounding_box_train/{src_pid:04d}_c1s0_{t:06d}_00.png"
            for folder, shift in ((f.fgen, 1), (f.fora, 0)):
                util.save_image(str(folder / name), person(1, src_pid, pose=3 * t + shift)[0])
            rows.append(f"{name},{src_pid:04d}_c1s1_000001_00.png,{src_pid},t{t:03d}")
    f.f_rows = rows
    write_manifest(f.fgen, "file,source,pid,target_id", rows)
    # bad model files for 05 and identity_score
    bad = root / "bad"
    os.makedirs(bad)
    f.model_trunc = truncate(shutil.copy(f.model, bad / "truncated.pt"))
    torch.save({"weights": torch.zeros(3)}, bad / "not_a_model.pt")
    f.not_model = bad / "not_a_model.pt"
    ck = torch.load(f.model, weights_only=True)
    torch.save(dict(ck, arch="resnet34"), bad / "other_arch.pt")  # resnet18 weights, named resnet34
    f.other_arch = bad / "other_arch.pt"
    f.text_model = bad / "model.txt.pt"
    f.text_model.write_text("not a torch file\n")
    # a small keypoint file for 01b fit, and a tiny ViTPose checkpoint for 01b keypoints
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(10, 50, (2, 17, 2)), np.full((2, 17, 1), 0.9)], 2).astype(np.float32)
    f.keypoints = root / "kp" / "bounding_box_train.keypoints.npz"
    util.save_npz(str(f.keypoints), names=np.array(["a.jpg", "b.jpg"]), keypoints=kp,
                  image_size=np.array([[64, 32]] * 2, np.int32), model=np.array("test"))
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor
    torch.manual_seed(0)
    bb = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, mlp_ratio=2, out_indices=[2])
    f.vitpose = root / "vitpose"
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=bb, num_labels=17)).save_pretrained(f.vitpose)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(f.vitpose)
    return f


class Case:
    """One row of the table. argv(c) builds the command line from the shared inputs (c.f) and a
    fresh folder (c.tmp); it may mark files to keep (c.keep), folders that must not appear
    (c.absent), and a read-only folder (c.readonly). word: what the error line (or, with code 0,
    the warning) must say; check(c, result): more to assert."""

    def __init__(self, id, script, argv, word, code=2, check=None):
        self.id, self.script, self.argv, self.word, self.code, self.check = id, script, argv, word, code, check


class Ctx:
    def __init__(self, f, tmp):
        self.f, self.tmp, self.kept, self.absent_paths, self.read_only, self.drop_root = f, tmp, [], [], [], False

    def keep(self, path):
        self.kept.append(path)
        return path

    def absent(self, path):
        self.absent_paths.append(path)
        return path

    def copy(self, src, name):
        dst = self.tmp / name
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
        return dst

    def readonly(self, folder):
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o555)
        self.read_only.append(folder)
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: a read-only folder cannot stop this process")
            self.drop_root = True
        return folder

    def file(self, name, text="a file, not a folder\n"):
        p = self.tmp / name
        p.write_text(text)
        return self.keep(p)


def snapshot(path):
    if os.path.isdir(path):
        return {os.path.relpath(os.path.join(d, n), path): open(os.path.join(d, n), "rb").read()
                for d, _, files in os.walk(path) for n in files}
    return open(path, "rb").read()

# -----------------------------------------------------------------------------
# argv builders shared by the rows


def r04(c, *extra, out=None):
    return ["--data", c.f.market, "--out", out or c.tmp / "reid", *TINY, "--steps", 1, *extra]


def r05(c, *extra, model=None):
    return ["--model", model or c.f.model, "--data", c.f.market, "--no-size-check", "--workers", 0,
            "--results", c.tmp / "results", *extra]


def r02(c, *extra, out=None):
    return train_args(c.f.w, out or c.tmp / "gen", 1, *extra)


def r03(c, *extra, gen=None):
    return gen_args(c.f.w, gen or c.f.gen, c.tmp / "aug", "--ddim-steps", 1, *extra)


def rid(c, *extra, generated=None, out=None, model=None):
    return ["--model", model or c.f.model, "--data", c.f.market, "--generated", generated or c.f.idgen,
            "--out", out or c.tmp / "identity.json", "--workers", 0, "--device", "cpu", *extra]


def rfid(c, *extra, generated=None, oracle=None):
    return ["--generated", generated or c.f.fgen, "--oracle", oracle or c.f.fora, "--out", c.tmp / "fidelity.json", *extra]


def swap(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def drop(argv, flag):
    argv = list(argv)
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def with_manifest(c, base, header, rows, name="g"):
    """A copy of an image folder with another manifest."""
    d = c.copy(base, name)
    write_manifest(d, header, rows)
    return d


def corrupt_copy(c, folder, pick, name):
    """A copy of `folder` whose pick(sorted file names) file is cut in half: -> (copy, that file)."""
    d = c.copy(folder, name)
    victim = d / pick(sorted(os.listdir(d)))
    truncate(victim)
    return d, victim


def market_with_bad(c, split):
    d = c.copy(c.f.market, "market")
    victim = d / split / sorted(os.listdir(d / split))[0]
    truncate(victim, 0.3)
    c.victim = victim
    return d

# -----------------------------------------------------------------------------
# 04: counts and sizes at parsing; data, backbone, checkpoint and --out before any training


def ckpt_04(c, make):
    """A copy of the trained 04 folder whose checkpoint.pt make(c, path) replaced or damaged."""
    out = c.copy(c.f.reid, "reid")
    make(c, out / "checkpoint.pt")
    c.keep(out / "checkpoint.pt")
    return r04(c, "--steps", 3, out=out)


CASES = [
    Case("04-K-0", "04_train_reid.py", lambda c: r04(c, "--K", 0), "--K 0"),
    Case("04-P-0", "04_train_reid.py", lambda c: r04(c, "--P", 0), "--P 0"),
    Case("04-save-every-0", "04_train_reid.py", lambda c: r04(c, "--save-every", 0), "--save-every"),
    Case("04-size-0x0", "04_train_reid.py", lambda c: r04(c, "--size", "0x0"), "--size"),
    Case("04-size-not-WxH", "04_train_reid.py", lambda c: r04(c, "--size", "large"), "WIDTHxHEIGHT"),
    Case("04-steps-negative", "04_train_reid.py", lambda c: r04(c, "--steps", -5), "--steps -5"),
    Case("04-extra-count-negative", "04_train_reid.py", lambda c: r04(c, "--extra-count", -1), "--extra-count"),
    Case("04-workers-negative", "04_train_reid.py", lambda c: r04(c, "--workers", -1), "--workers"),
    Case("04-lr-0", "04_train_reid.py", lambda c: r04(c, "--lr", 0), "--lr"),
    Case("04-max-aug-share-2", "04_train_reid.py", lambda c: r04(c, "--max-aug-share", 2), "--max-aug-share"),
    Case("04-data-missing", "04_train_reid.py", lambda c: swap(r04(c), "--data", c.tmp / "nope"), "does not exist"),
    Case("04-data-is-a-file", "04_train_reid.py", lambda c: swap(r04(c), "--data", c.file("data")), "is a file"),
    Case("04-P-more-than-ids", "04_train_reid.py", lambda c: r04(c, "--P", 9), "lower --P"),
    Case("04-extra-train-missing", "04_train_reid.py", lambda c: r04(c, "--extra-train", c.tmp / "nope"), "missing"),
    Case("04-extra-count-too-many", "04_train_reid.py",
         lambda c: r04(c, "--extra-train", c.f.market / "bounding_box_train", "--extra-count", 999), "hold only"),
    Case("04-arch-unknown", "04_train_reid.py", lambda c: r04(c, "--arch", "resnet7"), "--arch"),
    Case("04-backbone-missing", "04_train_reid.py", lambda c: r04(c, "--backbone-weights", c.tmp / "w.pth"),
         "does not exist"),
    Case("04-backbone-truncated", "04_train_reid.py",
         lambda c: r04(c, "--backbone-weights", truncate(c.copy(c.f.model, "w.pth"))), "backbone weights"),
    Case("04-checkpoint-truncated", "04_train_reid.py", lambda c: ckpt_04(c, lambda c, p: truncate(p)),
         "cannot be read"),
    Case("04-checkpoint-foreign-torch-file", "04_train_reid.py",
         lambda c: ckpt_04(c, lambda c, p: torch.save({"step": 3}, p)), "not a checkpoint of 04_train_reid.py"),
    Case("04-checkpoint-of-02", "04_train_reid.py",
         lambda c: ckpt_04(c, lambda c, p: shutil.copy(os.path.join(c.f.gen, "checkpoint.pt"), p)),
         "not a checkpoint of 04_train_reid.py"),
    Case("04-out-is-a-file", "04_train_reid.py", lambda c: r04(c, out=c.file("reid")), "is a file"),
    Case("04-out-read-only", "04_train_reid.py", lambda c: r04(c, out=c.readonly(c.tmp / "ro") / "reid"), "not writable"),
    Case("04-device-unknown", "04_train_reid.py", lambda c: r04(c, "--device", "gpu0"), "--device"),
    Case("04-device-cuda-absent", "04_train_reid.py", lambda c: r04(c, "--device", "cuda"), "no CUDA GPU"),
    Case("04-unreadable-train-image-skipped", "04_train_reid.py",
         lambda c: ["--data", market_with_bad(c, "bounding_box_train"), "--out", c.tmp / "reid", *TINY, "--steps", 0],
         "skipping unreadable image", code=0,
         check=lambda c, r: os.path.basename(c.victim) in r.stderr and "skipped 1 unreadable" in r.stdout
         and os.path.isfile(c.tmp / "reid" / "model.pt")
         and util.load_json(c.tmp / "reid" / "args.json")["unreadable_images"] == 1),
]

# -----------------------------------------------------------------------------
# 05: counts at parsing; the model file, data and results folder before any feature


CASES += [
    Case("05-batch-size-0", "05_evaluate.py", lambda c: r05(c, "--batch-size", 0), "--batch-size 0"),
    Case("05-workers-negative", "05_evaluate.py", lambda c: r05(c, "--workers", -1), "--workers"),
    Case("05-max-rank-0", "05_evaluate.py", lambda c: r05(c, "--max-rank", 0), "--max-rank"),
    Case("05-model-missing", "05_evaluate.py", lambda c: r05(c, model=c.tmp / "model.pt"), "does not exist"),
    Case("05-model-truncated", "05_evaluate.py", lambda c: r05(c, model=c.f.model_trunc), "not a Re-ID model"),
    Case("05-model-not-a-model", "05_evaluate.py", lambda c: r05(c, model=c.f.not_model), "not a Re-ID model"),
    Case("05-model-other-architecture", "05_evaluate.py", lambda c: r05(c, model=c.f.other_arch), "not a Re-ID model"),
    Case("05-model-text-file", "05_evaluate.py", lambda c: r05(c, model=c.f.text_model), "not a Re-ID model"),
    Case("05-model-is-a-folder", "05_evaluate.py", lambda c: r05(c, model=c.f.reid), "is a folder"),
    Case("05-data-missing", "05_evaluate.py", lambda c: swap(r05(c), "--data", c.tmp / "nope"), "does not exist"),
    Case("05-test-root-missing", "05_evaluate.py", lambda c: r05(c, "--test-root", c.tmp / "nope"), "missing"),
    Case("05-results-is-a-file", "05_evaluate.py", lambda c: swap(r05(c), "--results", c.file("results")), "is a file"),
    Case("05-results-read-only", "05_evaluate.py",
         lambda c: swap(r05(c), "--results", c.readonly(c.tmp / "ro") / "results"), "not writable"),
    Case("05-device-unknown", "05_evaluate.py", lambda c: r05(c, "--device", "tpu"), "--device"),
    Case("05-no-cross-camera-match", "05_evaluate.py", lambda c: r05(c, "--test-root", c.f.onecam), "cannot evaluate"),
    Case("05-unreadable-query-skipped", "05_evaluate.py",
         lambda c: r05(c, "--test-root", market_with_bad(c, "query")), "skipping unreadable image", code=0,
         check=lambda c, r: os.path.basename(c.victim) in r.stderr and "skipped 1 unreadable" in r.stdout
         and [util.load_json(c.tmp / "results" / f).get("unreadable_query") for f in os.listdir(c.tmp / "results")
              if f.endswith(".json")] == [1]),
]

# -----------------------------------------------------------------------------
# 02: counts and sizes at parsing (nothing written); weights, data, maps, checkpoint, --out


def gen_copy(c, name="gen"):
    return c.copy(c.f.gen, name)


def damaged_gen_02(c, file):
    out = gen_copy(c)
    c.keep(truncate(out / file))
    return r02(c, "--steps", 3, out=out)


def broken_map_02(c):
    cond = c.copy(c.f.w["cond"], "cond")
    victim = sorted((cond / "bounding_box_train").iterdir())[0]
    truncate(victim)
    return swap(r02(c), "--conditions", cond)


def unreadable_02(c):
    data = c.copy(c.f.w["data"], "data")
    c.victim = sorted((data / "bounding_box_train").iterdir())[0]
    truncate(c.victim, 0.3)
    return swap(r02(c), "--data", data)


def skipped_02(c, r):
    args = util.load_json(os.path.join(c.tmp, "gen", "args.json"))
    return c.victim.name in r.stderr and "skipped 1 unreadable" in r.stdout and args["unreadable_images"] == 1


CASES += [
    Case("02-grad-accum-0", "02_train_generator.py", lambda c: r02(c, "--grad-accum", 0), "--grad-accum 0"),
    Case("02-batch-size-0-nothing-written", "02_train_generator.py",
         lambda c: r02(c, "--batch-size", 0, out=c.absent(c.tmp / "gen")), "--batch-size 0"),
    Case("02-steps-negative", "02_train_generator.py", lambda c: r02(c, "--steps", -1), "--steps -1"),
    Case("02-size-0x0", "02_train_generator.py", lambda c: r02(c, "--size", "0x0"), "--size"),
    Case("02-save-every-0", "02_train_generator.py", lambda c: r02(c, "--save-every", 0), "--save-every"),
    Case("02-lr-0", "02_train_generator.py", lambda c: r02(c, "--lr", 0), "--lr"),
    Case("02-drop-prob-2", "02_train_generator.py", lambda c: r02(c, "--drop-prob", 2), "--drop-prob"),
    Case("02-no-weights", "02_train_generator.py", lambda c: drop(drop(r02(c), "--pretrained"), "--image-encoder"),
         "--init"),
    Case("02-pretrained-without-encoder", "02_train_generator.py", lambda c: drop(r02(c), "--image-encoder"),
         "--image-encoder"),
    Case("02-pretrained-missing", "02_train_generator.py", lambda c: swap(r02(c), "--pretrained", c.tmp / "sd"),
         "does not exist"),
    Case("02-pretrained-is-a-file", "02_train_generator.py", lambda c: swap(r02(c), "--pretrained", c.file("sd")),
         "is a file"),
    Case("02-init-not-a-generator", "02_train_generator.py",
         lambda c: drop(drop(r02(c), "--pretrained"), "--image-encoder") + ["--init", c.f.market], "not a generator"),
    Case("02-data-missing", "02_train_generator.py", lambda c: swap(r02(c), "--data", c.tmp / "nope"), "missing"),
    Case("02-stage1-videos-missing", "02_train_generator.py",
         lambda c: swap(r02(c, "--stage", 1), "--data", c.tmp / "nope"), "does not exist"),
    Case("02-conditions-missing", "02_train_generator.py", lambda c: swap(r02(c), "--conditions", c.tmp / "nope"),
         "condition maps missing"),
    Case("02-condition-map-truncated", "02_train_generator.py", broken_map_02, "cannot be read"),
    Case("02-checkpoint-truncated", "02_train_generator.py", lambda c: damaged_gen_02(c, "checkpoint.pt"),
         "cannot be read"),
    Case("02-args-json-truncated", "02_train_generator.py", lambda c: damaged_gen_02(c, "args.json"), "JSON"),
    Case("02-out-is-a-file", "02_train_generator.py", lambda c: r02(c, out=c.file("gen")), "is a file"),
    Case("02-device-unknown", "02_train_generator.py", lambda c: r02(c, "--device", "gpu"), "--device"),
    Case("02-unreadable-image-skipped", "02_train_generator.py", unreadable_02, "skipping unreadable image", code=0,
         check=skipped_02),
]

# -----------------------------------------------------------------------------
# 03: counts at parsing; generator folder, data, targets, --out before sampling


def damaged_gen_03(c, file):
    gen = gen_copy(c)
    c.keep(truncate(gen / file))
    return r03(c, gen=gen)


def targets_03(c, damage):
    t = c.copy(c.f.w["targets"], "targets")
    damage(t)
    return swap(r03(c), "--targets", t)


def unreadable_03(c):
    """A reference photo as a JPEG cut short."""
    from PIL import Image
    data = c.copy(c.f.w["data"], "data")
    png = sorted((data / "bounding_box_train").iterdir())[0]
    c.victim = png.with_suffix(".jpg")
    with Image.open(png) as im:
        im.save(c.victim, quality=95)
    os.remove(png)
    truncate(c.victim, 0.5)
    return swap(r03(c, "--refs-per-pid", 3, "--targets-per-ref", 1), "--data", data)


def skipped_03(c, r):
    record = util.load_json(os.path.join(c.tmp, "aug", "unreadable_references.json"))
    listed = open(os.path.join(c.tmp, "aug", "manifest.csv")).read()
    return (c.victim.name in r.stderr and record["jobs_skipped"] == 1 and record["references"] == [str(c.victim)]
            and c.victim.name not in listed and len(listed.splitlines()) == 1 + 8)


CASES += [
    Case("03-batch-size-0", "03_generate.py", lambda c: r03(c, "--batch-size", 0), "--batch-size 0"),
    Case("03-ddim-steps-0", "03_generate.py", lambda c: r03(c, "--ddim-steps", 0), "--ddim-steps 0"),
    Case("03-num-images-negative", "03_generate.py", lambda c: r03(c, "--num-images", -1), "--num-images -1"),
    Case("03-guidance-negative", "03_generate.py", lambda c: r03(c, "--guidance", -1), "--guidance"),
    Case("03-targets-per-ref-negative", "03_generate.py", lambda c: r03(c, "--targets-per-ref", -2), "--targets-per-ref"),
    Case("03-refs-per-pid-0", "03_generate.py", lambda c: r03(c, "--refs-per-pid", 0), "--refs-per-pid"),
    Case("03-shard-out-of-range", "03_generate.py", lambda c: r03(c, "--shard", "2/2"), "--shard"),
    Case("03-generator-missing", "03_generate.py", lambda c: r03(c, gen=c.tmp / "nope"), "not a generator folder"),
    Case("03-generator-is-a-file", "03_generate.py", lambda c: r03(c, gen=c.file("gen")), "not a generator folder"),
    Case("03-guiders-truncated", "03_generate.py", lambda c: damaged_gen_03(c, "guiders.safetensors"),
         "pose guider weights"),
    Case("03-generator-args-json-truncated", "03_generate.py", lambda c: damaged_gen_03(c, "args.json"), "JSON"),
    Case("03-denoising-unet-truncated", "03_generate.py",
         lambda c: damaged_gen_03(c, "denoising_unet/diffusion_pytorch_model.safetensors"), "denoising U-Net"),
    Case("03-data-missing", "03_generate.py", lambda c: swap(r03(c), "--data", c.tmp / "nope"), "missing"),
    Case("03-targets-missing", "03_generate.py", lambda c: swap(r03(c), "--targets", c.tmp / "nope"), "targets.csv"),
    Case("03-targets-columns-missing", "03_generate.py",
         lambda c: targets_03(c, lambda t: util.save_text(str(t / "targets.csv"), "target_id,pose_id\nt000,0\n")),
         "lacks columns"),
    Case("03-target-map-truncated", "03_generate.py",
         lambda c: targets_03(c, lambda t: truncate(t / "maps" / "t002.normal.png")), "t002.normal.png"),
    Case("03-out-is-a-file", "03_generate.py", lambda c: swap(r03(c), "--out", c.file("aug")), "is a file"),
    Case("03-unreadable-reference-skipped", "03_generate.py", unreadable_03, "skipping unreadable image", code=0,
         check=skipped_03),
]

# -----------------------------------------------------------------------------
# tools/identity_score.py: the model, the manifest (columns, rows, images), --out


def id_manifest(c, header="file,source,pid,target_id", rows=None, keep_out=False):
    d = with_manifest(c, c.f.idgen, header, c.f.id_rows if rows is None else rows)
    out = c.file("identity.json", '{"earlier": "result"}\n') if keep_out else None
    return rid(c, generated=d, out=out)


def id_missing_image(c):
    d = c.copy(c.f.idgen, "g")
    os.remove(d / c.f.id_rows[1].split(",")[0])
    return rid(c, generated=d)


def id_unreadable_image(c):
    d = c.copy(c.f.idgen, "g")
    truncate(d / c.f.id_rows[2].split(",")[0], 0.3)
    return rid(c, generated=d)


R = lambda c: c.f.id_rows  # noqa: E731
CASES += [
    Case("identity-manifest-without-pid", "tools/identity_score.py",
         lambda c: id_manifest(c, "file,source,person,target_id", keep_out=True), "pid"),
    Case("identity-manifest-image-missing", "tools/identity_score.py", id_missing_image, "1 of the 4 images"),
    Case("identity-manifest-duplicate-row", "tools/identity_score.py",
         lambda c: id_manifest(c, rows=R(c) + [R(c)[0]]), "twice"),
    Case("identity-manifest-ragged-row", "tools/identity_score.py",
         lambda c: id_manifest(c, rows=R(c)[:2] + [R(c)[2] + ",extra"] + R(c)[3:]), "fields"),
    Case("identity-manifest-short-row", "tools/identity_score.py",
         lambda c: id_manifest(c, rows=R(c)[:3] + [R(c)[3].rsplit(",", 1)[0]]), "fields"),
    Case("identity-manifest-pid-not-integer", "tools/identity_score.py",
         lambda c: id_manifest(c, rows=[R(c)[0].replace(",1,", ",one,")] + R(c)[1:]), "not an integer"),
    Case("identity-manifest-empty", "tools/identity_score.py", lambda c: id_manifest(c, rows=[]), "no images"),
    Case("identity-manifest-absent", "tools/identity_score.py", lambda c: rid(c, generated=c.tmp), "manifest.csv"),
    Case("identity-oracle-manifest-absent", "tools/identity_score.py", lambda c: rid(c, "--oracle", c.tmp),
         "manifest.csv"),
    Case("identity-image-unreadable", "tools/identity_score.py", id_unreadable_image, "cannot be read"),
    Case("identity-model-truncated", "tools/identity_score.py", lambda c: rid(c, model=c.f.model_trunc),
         "not a Re-ID model"),
    Case("identity-model-missing", "tools/identity_score.py", lambda c: rid(c, model=c.tmp / "m.pt"), "does not exist"),
    Case("identity-data-missing", "tools/identity_score.py", lambda c: swap(rid(c), "--data", c.tmp / "nope"), "missing"),
    Case("identity-out-read-only", "tools/identity_score.py",
         lambda c: rid(c, out=c.readonly(c.tmp / "ro") / "identity.json"), "not writable"),
    Case("identity-out-under-a-file", "tools/identity_score.py", lambda c: rid(c, out=c.file("res") / "identity.json"),
         "is a file"),
    Case("identity-out-is-a-folder", "tools/identity_score.py", lambda c: rid(c, out=c.tmp), "is a folder"),
    Case("identity-workers-negative", "tools/identity_score.py", lambda c: rid(c, "--workers", -1), "--workers"),
    Case("identity-unreadable-train-image-skipped", "tools/identity_score.py",
         lambda c: swap(rid(c), "--data", market_with_bad(c, "bounding_box_train")), "skipping unreadable image", code=0,
         check=lambda c, r: os.path.basename(c.victim) in r.stderr and "skipped 1 unreadable" in r.stdout
         and util.load_json(c.tmp / "identity.json")["unreadable_train_images"] == 1),
]

# -----------------------------------------------------------------------------
# demo/fidelity.py: the manifest (columns, rows, images), the oracle, counts, --out


F = lambda c: c.f.f_rows  # noqa: E731


def fid_manifest(c, header="file,source,pid,target_id", rows=None):
    return rfid(c, generated=with_manifest(c, c.f.fgen, header, F(c) if rows is None else rows))


def fid_damaged(c, which, damage):
    d = c.copy(getattr(c.f, which), which)
    damage(d / F(c)[1].split(",")[0])
    return rfid(c, **{"generated" if which == "fgen" else "oracle": d})


CASES += [
    Case("fidelity-manifest-without-pid", "demo/fidelity.py", lambda c: fid_manifest(c, "file,source,id,target_id"),
         "pid"),
    Case("fidelity-manifest-without-target", "demo/fidelity.py", lambda c: fid_manifest(c, "file,source,pid,target"),
         "target_id"),
    Case("fidelity-manifest-duplicate-row", "demo/fidelity.py", lambda c: fid_manifest(c, rows=F(c) + [F(c)[2]]),
         "twice"),
    Case("fidelity-manifest-ragged-row", "demo/fidelity.py",
         lambda c: fid_manifest(c, rows=[F(c)[0] + ",x"] + F(c)[1:]), "fields"),
    Case("fidelity-manifest-absent", "demo/fidelity.py", lambda c: rfid(c, generated=c.tmp), "manifest.csv"),
    Case("fidelity-generated-image-missing", "demo/fidelity.py", lambda c: fid_damaged(c, "fgen", os.remove),
         "1 of the 4 images"),
    Case("fidelity-generated-image-truncated", "demo/fidelity.py", lambda c: fid_damaged(c, "fgen", truncate),
         "cannot be read"),
    Case("fidelity-oracle-image-truncated", "demo/fidelity.py", lambda c: fid_damaged(c, "fora", truncate),
         "cannot be read"),
    Case("fidelity-no-oracle-render", "demo/fidelity.py", lambda c: rfid(c, oracle=c.tmp), "has an oracle render"),
    Case("fidelity-sheet-rows-0", "demo/fidelity.py", lambda c: rfid(c, "--sheet-rows", 0), "--sheet-rows"),
    Case("fidelity-ceiling-images-0", "demo/fidelity.py", lambda c: rfid(c, "--ceiling-images", 0), "--ceiling-images"),
    Case("fidelity-sheet-without-data", "demo/fidelity.py", lambda c: rfid(c, "--sheet", c.tmp / "s.png"), "--data"),
    Case("fidelity-out-is-a-folder", "demo/fidelity.py", lambda c: swap(rfid(c), "--out", c.tmp), "is a folder"),
    Case("fidelity-partial-oracle-skipped", "demo/fidelity.py", lambda c: fid_damaged(c, "fora", os.remove),
         "no oracle render", code=0,
         check=lambda c, r: F(c)[1].split(",")[0] in r.stderr
         and util.load_json(str(c.tmp / "fidelity.json"))["images_without_oracle"] == 1),
]

# -----------------------------------------------------------------------------
# 01: SMPL parameter files, model files, pose banks, counts


def params_file(c, name, damage=None, **arrays):
    """A per-image SMPL parameter file (only the keys given), optionally damaged."""
    p = c.tmp / name
    os.makedirs(p.parent, exist_ok=True)
    util.save_npz(str(p), **(arrays or dict(names=np.array(["a.jpg"]), betas=np.zeros((1, 10)))))
    if damage:
        damage(p)
    return p


def conditions_01(c, damage=None, **arrays):
    data = c.tmp / "data"
    params_file(c, "data/smpl/bounding_box_train.npz", damage, **arrays)
    return ["conditions", "--data", data, "--out", c.tmp / "cond"]


CASES += [
    Case("01-no-subcommand", "01_render_smpl.py", lambda c: [], "subcommand"),
    Case("01-conditions-smpl-truncated", "01_render_smpl.py", lambda c: conditions_01(c, truncate), "cannot be read"),
    Case("01-conditions-smpl-missing", "01_render_smpl.py", lambda c: ["conditions", "--data", c.tmp, "--out", c.tmp / "o"],
         "not found"),
    Case("01-conditions-smpl-lacks-keys", "01_render_smpl.py", lambda c: conditions_01(c), "lacks keys"),
    Case("01-conditions-size-not-WxH", "01_render_smpl.py", lambda c: conditions_01(c) + ["--size", "128"], "--size"),
    Case("01-conditions-out-is-a-file", "01_render_smpl.py", lambda c: swap(conditions_01(c), "--out", c.file("cond")),
         "is a file"),
    Case("01-conditions-smpl-model-missing", "01_render_smpl.py",
         lambda c: ["--smpl-model", c.tmp / "SMPL.npz"] + conditions_01(c), "not found"),
    Case("01-conditions-smpl-model-truncated", "01_render_smpl.py",
         lambda c: ["--smpl-model", truncate(c.copy(os.path.join(ROOT, "assets", "open_body.npz"), "body.npz"))]
         + conditions_01(c), "SMPL model file"),
    Case("01-targets-num-poses-0", "01_render_smpl.py", lambda c: ["targets", "--out", c.tmp / "t", "--num-poses", 0],
         "--num-poses"),
    Case("01-targets-views-per-pose-0", "01_render_smpl.py",
         lambda c: ["targets", "--out", c.tmp / "t", "--views-per-pose", 0], "--views-per-pose"),
    Case("01-targets-size-0x0", "01_render_smpl.py", lambda c: ["targets", "--out", c.tmp / "t", "--size", "0x0"],
         "--size"),
    Case("01-targets-out-is-a-file", "01_render_smpl.py", lambda c: ["targets", "--out", c.file("t")], "is a file"),
    Case("01-targets-pose-bank-missing", "01_render_smpl.py",
         lambda c: ["targets", "--out", c.tmp / "t", "--pose-bank", c.tmp / "bank.npz"], "not found"),
    Case("01-targets-pose-bank-truncated", "01_render_smpl.py",
         lambda c: ["targets", "--out", c.tmp / "t", "--pose-bank",
                    params_file(c, "bank.npz", truncate, poses=np.zeros((50, 72)))], "not a readable"),
    Case("01-targets-views-from-truncated", "01_render_smpl.py",
         lambda c: ["targets", "--out", c.tmp / "t", "--views-from", params_file(c, "v.npz", truncate)], "cannot be read"),
    Case("01-bank-fits-missing", "01_render_smpl.py", lambda c: ["bank", "--smpl", c.tmp / "fit.npz", "--out", c.tmp / "b.npz"],
         "not found"),
    Case("01-bank-no-fits-in-folder", "01_render_smpl.py", lambda c: ["bank", "--smpl", c.tmp, "--out", c.tmp / "b.npz"],
         "no SMPL fits"),
    Case("01-bank-fit-truncated", "01_render_smpl.py",
         lambda c: ["bank", "--smpl", params_file(c, "fit.npz", truncate), "--out", c.tmp / "b.npz"], "cannot be read"),
    Case("01-bank-out-is-a-folder", "01_render_smpl.py", lambda c: ["bank", "--smpl", c.tmp, "--out", c.tmp],
         "is a folder"),
    Case("01-bank-choose-negative", "01_render_smpl.py",
         lambda c: ["bank", "--smpl", c.tmp, "--choose", -1, "--out", c.tmp / "b.npz"], "--choose"),
]

# -----------------------------------------------------------------------------
# 01b: keypoints (images, model), fit (keypoint file, counts), import (parameter file)


def fit_01b(c, *extra, damage=None):
    kp = c.copy(c.f.keypoints, "bounding_box_train.keypoints.npz")
    if damage:
        damage(kp)
    return ["fit", "--out", c.tmp, "--threads", 1, *extra]


def import_01b(c, damage=None, **arrays):
    n = 2
    given = dict(names=np.array(["a.jpg", "b.jpg"]), global_orient=np.zeros((n, 3)), body_pose=np.zeros((n, 69)),
                 image_size=np.array([[64, 32]] * n), focal_length=300.0, cam_t=np.zeros((n, 3)))
    given.update(arrays)
    p = params_file(c, "hmr.npz", damage, **{k: v for k, v in given.items() if v is not None})
    return ["import", "--params", p, "--out", c.tmp / "smpl"]


def keypoints_unreadable(c):
    data = c.copy(c.f.market, "market")
    c.victim = data / "query" / sorted(os.listdir(data / "query"))[0]
    truncate(c.victim, 0.3)
    return ["keypoints", "--data", data, "--splits", "query", "--out", c.tmp / "smpl", "--model", c.f.vitpose,
            "--device", "cpu"]


def keypoints_skipped(c, r):
    z = np.load(c.tmp / "smpl" / "query.keypoints.npz")
    return c.victim.name in r.stderr and list(z["unreadable"]) == [c.victim.name] and len(z["names"]) == 1


CASES += [
    Case("01b-no-subcommand", "01b_estimate_smpl.py", lambda c: [], "subcommand"),
    Case("01b-keypoints-data-missing", "01b_estimate_smpl.py",
         lambda c: ["keypoints", "--data", c.tmp / "nope", "--out", c.tmp / "smpl"], "not found"),
    Case("01b-keypoints-split-empty", "01b_estimate_smpl.py",
         lambda c: (os.makedirs(c.tmp / "d" / "bounding_box_train"),
                    ["keypoints", "--data", c.tmp / "d", "--out", c.tmp / "smpl"])[1], "no images"),
    Case("01b-keypoints-batch-size-0", "01b_estimate_smpl.py",
         lambda c: ["keypoints", "--data", c.f.market, "--out", c.tmp / "smpl", "--batch-size", 0], "--batch-size 0"),
    Case("01b-keypoints-out-is-a-file", "01b_estimate_smpl.py",
         lambda c: ["keypoints", "--data", c.f.market, "--out", c.file("smpl")], "is a file"),
    Case("01b-keypoints-model-missing", "01b_estimate_smpl.py",
         lambda c: ["keypoints", "--data", c.f.market, "--out", c.tmp / "smpl", "--model", c.tmp / "vitpose"], "ViTPose"),
    Case("01b-keypoints-unreadable-image-skipped", "01b_estimate_smpl.py", keypoints_unreadable,
         "skipping unreadable image", code=0, check=keypoints_skipped),
    Case("01b-fit-keypoints-missing", "01b_estimate_smpl.py", lambda c: ["fit", "--out", c.tmp], "not found"),
    Case("01b-fit-keypoints-truncated", "01b_estimate_smpl.py", lambda c: fit_01b(c, damage=truncate), "cannot be read"),
    Case("01b-fit-not-a-keypoint-file", "01b_estimate_smpl.py",
         lambda c: fit_01b(c, damage=lambda p: util.save_npz(str(p), names=np.array(["a"]))), "not a keypoint file"),
    Case("01b-fit-batch-size-0", "01b_estimate_smpl.py", lambda c: fit_01b(c, "--batch-size", 0), "--batch-size 0"),
    Case("01b-fit-steps-2", "01b_estimate_smpl.py", lambda c: fit_01b(c, "--steps", 2), "--steps 2"),
    Case("01b-fit-inits-0", "01b_estimate_smpl.py", lambda c: fit_01b(c, "--inits", 0), "--inits 0"),
    Case("01b-fit-threads-0", "01b_estimate_smpl.py", lambda c: fit_01b(c, "--threads", 0), "--threads 0"),
    Case("01b-fit-no-confident-keypoints", "01b_estimate_smpl.py", lambda c: fit_01b(c, "--min-keypoints", 18),
         "no image has"),
    Case("01b-evaluate-world-missing", "01b_estimate_smpl.py",
         lambda c: ["evaluate", "--world", c.tmp / "nope", "--threads", 1], "not found"),
    Case("01b-evaluate-max-images-negative", "01b_estimate_smpl.py",
         lambda c: ["evaluate", "--world", c.tmp, "--max-images", -1], "--max-images"),
    Case("01b-import-missing", "01b_estimate_smpl.py",
         lambda c: ["import", "--params", c.tmp / "hmr.npz", "--out", c.tmp / "smpl"], "not found"),
    Case("01b-import-truncated", "01b_estimate_smpl.py", lambda c: import_01b(c, truncate), "not a readable"),
    Case("01b-import-lacks-keys", "01b_estimate_smpl.py", lambda c: import_01b(c, cam_t=None), "focal_length + cam_t"),
    Case("01b-import-rows-differ", "01b_estimate_smpl.py", lambda c: import_01b(c, body_pose=np.zeros((3, 69))),
         "one row per name"),
    Case("01b-import-body-pose-shape", "01b_estimate_smpl.py", lambda c: import_01b(c, body_pose=np.zeros((2, 60))),
         "body_pose"),
    Case("tiny-hub-vitpose-size-not-16s", "tools/tiny_hub.py", lambda c: ["--out", c.tmp / "hf", "--vitpose-size", "100x50"],
         "--vitpose-size"),
    Case("tiny-hub-out-is-a-file", "tools/tiny_hub.py", lambda c: ["--out", c.file("hf")], "is a file"),
]

def visible_lines(stderr):
    """stderr as a terminal shows it: progress bars redraw a line after '\\r' and are left out."""
    lines = [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]
    return [line for line in lines if line.strip() and "%|" not in line]


def test_the_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 70 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.timeout(2 * TIMEOUT)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, fx, tmp_path):
    c = Ctx(fx, tmp_path)
    argv = case.argv(c)
    before = {p: snapshot(p) for p in c.kept}
    try:
        r = run(case.script, argv, drop_root=c.drop_root)
    finally:
        for d in c.read_only:  # (so that pytest can remove it)
            os.chmod(d, 0o755)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == case.code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = visible_lines(r.stderr)
    if case.code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
        assert case.word in lines[0], lines[0]
    else:
        assert any(case.word in line for line in lines), r.stderr[-3000:]
    if case.check:
        assert case.check(c, r), (r.stdout[-2000:], r.stderr[-2000:])
    for p, b in before.items():
        assert snapshot(p) == b, f"{p} changed"
    for p in c.absent_paths:
        assert not os.path.exists(p), f"{p} was made"
