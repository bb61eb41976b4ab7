"""tools/forecast.py: the arithmetic against a hand-computed case (items x per-item cost, 1 GPU vs 2),
bad input in one line, and the shipped docs/forecast.json read end to end. Seconds, offline, CPU."""
import json
import os
import subprocess
import sys

import pytest

from stages import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import forecast  # noqa: E402

point = lambda per, fixed=0.0: dict(seconds_per_item=per, fixed_seconds=fixed, mib_per_item=0.0)
FIGURES = dict(
    datasets=dict(market1501=dict(ids=751, train=12936, query=3368, gallery=15913, added_stated=45500),
                  dukemtmc=dict(ids=702, train=16522, query=2228, gallery=17661, added_stated=49000)),
    run=dict(pool_vi=80000, added_totals=14000, reid_batch=256, camstyle_extra_per_step=32),
    paper=dict(stage1=dict(steps=30000, hours=15), stage2=dict(steps=30000, hours=6, batch=4),
               reid=dict(steps=20000, hours=2, gpus=2)),
    fullsize_cpu=dict(train_step_batch1_s=[10.0, 10.0], generate_s_per_image=8.0, generate_ddim_steps=4,
                      sample_ddim_steps=25),
    measured=dict(date="today", keypoints=point(0.01), fit=point(0.1), conditions=point(0.05), conditions_768=point(0.2),
                  bank=point(0.0), bank_choose=point(0.5), targets=point(1.0), generate=point(0.0),
                  manifest=dict(seconds=0.0), generator_loader=dict(stage1=dict(seconds_per_step=0.0),
                                                                    stage2=dict(seconds_per_step=0.08)),
                  reid_base=point(0.0), reid_vi=dict(point(0.0), extra_images=45500),
                  reid_loader=dict(vi=dict(seconds_per_batch=0.1)),
                  evaluate=dict(points=[dict(n=1, seconds=50.0), dict(n=2, seconds=100.0)]),
                  identity=dict(point(0.001), mib_per_item=1.0)))


@pytest.fixture
def figures(tmp_path):
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(FIGURES))
    return str(path)


def test_hand_computed_plain_run(figures):
    args = forecast.parse_args(["--dataset", "market1501", "--gen-steps", "1000", "--reid-steps", "1000",
                                "--figures", figures])
    rows, total = forecast.forecast(args, FIGURES)
    seconds = {stage.split(" (")[0]: hours * 3600 for stage, _, _, hours, _ in rows}
    # 02: 6 h / 30,000 steps = 0.72 s, + 0.08 s of loading; 03: 25 DDIM steps x (8 s / 4) over 4 x 10 s
    # = 1.25 stage-2 steps of 0.72 s per image; 04: 2 h x 2 GPUs / 20,000 = 0.72 s, (VI) x 288/256
    expected = {"01b keypoints": 12936 * 0.01, "01b fit": 12936 * 0.1, "01 conditions": 12936 * 0.05,
                "01 bank": 0.0, "01 targets": 80 * 1.0, "02 stage 2": 1000 * 0.8, "03 generate": 80000 * 0.9,
                "04 Re-ID": 1000 * 0.72 + 1000 * 0.72 * 1.125, "05 evaluate": 2 * 100.0, "identity score": 80.0}
    assert seconds.keys() == expected.keys()
    for k, v in expected.items():
        assert seconds[k] == pytest.approx(v), k
    assert total * 3600 == pytest.approx(76759.76)

    two = forecast.parse_args(["--dataset", "market1501", "--gen-steps", "1000", "--reid-steps", "1000",
                               "--gpus", "2", "--figures", figures])
    _, total2 = forecast.forecast(two, FIGURES)  # 02, 03 and 04 halve; the CPU stages do not
    assert total2 * 3600 == pytest.approx(76759.76 - 400 - 36000 - 765)


def test_tables_and_seeds_count_runs(figures):
    args = forecast.parse_args(["--dataset", "dukemtmc", "--tables", "--seeds", "3", "--added", "totals",
                                "--figures", figures])
    rows, _ = forecast.forecast(args, FIGURES)
    by = {r[0]: r for r in rows}
    assert by["04 Re-ID (14 rows x 3 seeds)"][1] == 14 * 3 * 20000
    assert by["05 evaluate"][1] == 42
    assert by["03 generate (II)-(V)"][1] == 4 * 14000
    assert by["01 targets (4 variants)"][1] == 320


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "cuhk03"], "--dataset 'cuhk03'"),
    (["--dataset", "market1501", "--gpus", "3"], "--gpus 3"),
    (["--dataset", "market1501", "--added", "lots"], "--added 'lots'"),
    (["--dataset", "market1501", "--seeds", "0"], "--seeds 0"),
    (["--dataset", "market1501", "--figures", "/nonexistent.json"], "not found"),
])
def test_bad_input_is_one_line(argv, words):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "forecast.py"), *argv], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_shipped_figures():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "forecast.py"), "--dataset", "market1501",
                        "--tables", "--seeds", "3", "--gpus", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "total" in r.stdout and "03 generate (VI) pool" in r.stdout


def test_dry_run_prints_the_forecast_of_its_own_settings(tmp_path):
    """run_all.sh --dry-run on real data prints the forecast (as '# ' comments, so the output stays a
    list of commands) for the settings it was given: rows, seeds, steps, the dance-video frames."""
    (tmp_path / "market" / "bounding_box_train").mkdir(parents=True)
    (tmp_path / "dance" / "vid").mkdir(parents=True)
    for n in range(3):
        (tmp_path / "dance" / "vid" / f"{n:04d}.jpg").write_bytes(b"")
    r = subprocess.run(["bash", "run_all.sh", "market1501", "--data-root", str(tmp_path / "market"), "--dry-run",
                        "--tables", "--seeds", "0 1 2", "--reid-steps", "1000", "--pose-videos", str(tmp_path / "dance")],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, RUNS_DIR=str(tmp_path / "runs")))
    assert r.returncode == 0, r.stderr
    shown = [l[2:] for l in r.stdout.splitlines() if l.startswith("# ")]
    same = subprocess.run([sys.executable, "tools/forecast.py", "--dataset", "market1501", "--tables", "--seeds", "3",
                           "--reid-steps", "1000", "--pose-video-frames", "3"], capture_output=True, text=True, cwd=ROOT)
    expected = same.stdout.splitlines()
    assert expected[0].startswith("forecast:") and expected[-1].startswith("total")
    assert shown[shown.index(expected[0]):][:len(expected)] == expected
    assert not (tmp_path / "runs").exists()
