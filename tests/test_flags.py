"""One flag vocabulary across the stages and tools: --data (input data root), --size WxH, --steps
for optimiser steps only, --ddim-steps for sampling steps, --workers, --batch-size, --save-every,
--device (default auto), --seed. Every script is run once in a subprocess that stops at its
argument parser: the parser's help (what --help prints, subcommands included) and its flags are
checked against the vocabulary, and each renamed flag's old spelling must still parse to the same
value, hidden from the help, with a one-line note on stderr (util.old_flag).

--steps means optimiser steps where it appears: 02 and 04 (training steps), demo/pretrain.py
(U-Net steps), and 01b's fit and evaluate, whose --steps are the Adam steps of the SMPL fit."""
import os
import re
import sys
import json
import subprocess

import pytest

from stages import ROOT  # noqa: E402  (puts the repository root on sys.path)

# script -> its subcommands (None: none)
SCRIPTS = {
    "01_render_smpl.py": ("conditions", "targets", "bank"),
    "01b_estimate_smpl.py": ("keypoints", "fit", "import", "evaluate"),
    "02_train_generator.py": None,
    "03_generate.py": None,
    "04_train_reid.py": None,
    "05_evaluate.py": None,
    "tools/identity_score.py": None,
    "demo/fidelity.py": None,
    "demo/world.py": None,
    "demo/pretrain.py": None,
}
OLD_SPELLINGS = ("--data-root", "--resolution", "--height", "--width", "--num-workers", "--ckpt-every",
                 "--sample-steps", "--iters", "--batch")
SAMPLING = {"02_train_generator.py", "03_generate.py"}  # their sampling steps are --ddim-steps
# (sub)parsers where --steps may appear: optimiser steps
OPTIMISER_STEPS = {"02_train_generator.py", "04_train_reid.py", "demo/pretrain.py",
                   "01b_estimate_smpl.py fit", "01b_estimate_smpl.py evaluate"}

# old spelling -> new, as (old argv, new argv, the value's dest); the rest of each argv is what the
# parser requires
G03 = ["--generator", "g", "--data", "d", "--targets", "t", "--out", "o"]
G02 = ["--data", "d", "--conditions", "c", "--out", "o", "--pretrained", "p"]
OLD_TO_NEW = {
    "03_generate.py": [(G03 + ["--steps", "4"], G03 + ["--ddim-steps", "4"], "ddim_steps")],
    "05_evaluate.py": [(["--model", "m", "--data-root", "X"], ["--model", "m", "--data", "X"], "data")],
    "tools/identity_score.py": [(["--model", "m", "--generated", "g", "--out", "o", "--data-root", "X"],
                                 ["--model", "m", "--generated", "g", "--out", "o", "--data", "X"], "data")],
    "01b_estimate_smpl.py": [(["keypoints", "--data", "d", "--out", "o", "--batch", "4"],
                              ["keypoints", "--data", "d", "--out", "o", "--batch-size", "4"], "batch_size"),
                             (["fit", "--out", "o", "--batch", "16"], ["fit", "--out", "o", "--batch-size", "16"], "batch_size"),
                             (["evaluate", "--batch", "16"], ["evaluate", "--batch-size", "16"], "batch_size")],
    "02_train_generator.py": [(G02 + ["--resolution", "16x32"], G02 + ["--size", "16x32"], "size"),
                              (G02 + ["--sample-steps", "2"], G02 + ["--ddim-steps", "2"], "ddim_steps"),
                              (G02 + ["--num-workers", "3"], G02 + ["--workers", "3"], "workers")],
    "04_train_reid.py": [(["--out", "o", "--data-root", "X"], ["--out", "o", "--data", "X"], "data"),
                         (["--data", "d", "--out", "o", "--iters", "7"], ["--data", "d", "--out", "o", "--steps", "7"], "steps"),
                         (["--data", "d", "--out", "o", "--ckpt-every", "5"],
                          ["--data", "d", "--out", "o", "--save-every", "5"], "save_every")],
}

# Runs SCRIPT as __main__ until its first ArgumentParser.parse_args: then prints, as one JSON line
# after a marker, every (sub)parser's help text and flags, and what the parser makes of each argv
# in argv_list (the namespace, its stderr, its exit status), and exits.
RUNNER = r"""
import argparse, contextlib, io, json, runpy, sys
script, argv_list = sys.argv[1], json.loads(sys.argv[2])
original = argparse.ArgumentParser.parse_args

def parsers(parser, name=""):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from parsers(subparser, sub)

def dump(parser, *args, **kwargs):
    out = dict(parsers={}, parsed=[])
    for name, p in parsers(parser):
        flags = [dict(flags=a.option_strings, dest=a.dest, default=a.default, help=a.help,
                      hidden=a.help == argparse.SUPPRESS) for a in p._actions if a.option_strings]
        out["parsers"][name] = dict(help=p.format_help(), flags=flags)
    for argv in argv_list:
        err, status, ns = io.StringIO(), 0, None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                ns = vars(original(parser, argv))
            except SystemExit as e:
                status = e.code
        out["parsed"].append(dict(argv=argv, namespace=ns, stderr=err.getvalue(), status=status))
    print("@@FLAGS@@" + json.dumps(out, default=str))
    sys.stdout.flush()
    raise SystemExit(0)

argparse.ArgumentParser.parse_args = dump
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
raise SystemExit("the script returned without parsing its arguments")
"""


def inspect(script, argv_list=()):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", RUNNER, script, json.dumps([list(a) for a in argv_list])],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in r.stdout.splitlines() if l.startswith("@@FLAGS@@")), None)
    assert r.returncode == 0 and line, f"{script}: no parser reached ({r.returncode})\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return json.loads(line[len("@@FLAGS@@"):])


def shows(text, flag):
    """flag appears in text as a flag of its own (--batch is not in --batch-size)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def parsed(request):
    script = request.param
    pairs = OLD_TO_NEW.get(script, [])
    return script, inspect(script, [argv for old, new, _ in pairs for argv in (old, new)]), pairs


def test_every_script_has_the_shared_vocabulary(parsed):
    script, info, _ = parsed
    subs = SCRIPTS[script]
    assert set(info["parsers"]) == {""} | set(subs or ()), f"{script}: subcommands {sorted(info['parsers'])}"
    problems = []
    for sub, p in info["parsers"].items():  # the top level, then each subcommand
        where = f"{script} {sub}".strip()
        visible = {f: a for a in p["flags"] if not a["hidden"] for f in a["flags"]}
        for old in OLD_SPELLINGS:
            if old in visible or shows(p["help"], old):
                problems.append(f"{where}: --help shows the old spelling {old}")
        if "--steps" in visible and where not in OPTIMISER_STEPS and script not in OPTIMISER_STEPS:
            problems.append(f"{where}: --steps in a script that trains nothing (sampling steps are --ddim-steps)")
        if "--device" in visible and visible["--device"]["default"] != "auto":
            problems.append(f"{where}: --device defaults to {visible['--device']['default']!r}, not 'auto'")
        if "--size" in visible and "WxH" not in (visible["--size"]["help"] or ""):
            problems.append(f"{where}: the help of --size does not say WxH")
    if script in SAMPLING:
        flags = {f for a in info["parsers"][""]["flags"] if not a["hidden"] for f in a["flags"]}
        if "--ddim-steps" not in flags:
            problems.append(f"{script}: samples, but has no --ddim-steps")
    assert not problems, "\n".join(problems)


def test_old_spellings_still_parse_with_a_note(parsed):
    script, info, pairs = parsed
    if not pairs:
        pytest.skip(f"{script}: no renamed flags")
    results = info["parsed"]
    for k, (old, new, dest) in enumerate(pairs):
        got_old, got_new = results[2 * k], results[2 * k + 1]
        assert got_new["status"] == 0, f"{script} {new}: {got_new['stderr']}"
        assert got_old["status"] == 0, f"{script} {old}: {got_old['stderr']}"
        assert got_old["namespace"][dest] == got_new["namespace"][dest] is not None, (script, dest)
        assert got_old["namespace"] == got_new["namespace"], f"{script}: {old} and {new} parse differently"
        flag = next(a for a in old if a.startswith("--") and a not in new)
        notes = got_old["stderr"].strip().splitlines()
        assert len(notes) == 1 and notes[0].startswith("note: ") and flag in notes[0], (script, got_old["stderr"])
        assert got_new["stderr"] == ""


def test_03_old_steps_in_process(capsys):
    """03's parse_args directly: the old --steps is --ddim-steps, said once on stderr."""
    from stages import load_stage
    s03 = load_stage("03_generate.py")
    old, new = s03.parse_args(G03 + ["--steps", "4"]), s03.parse_args(G03 + ["--ddim-steps", "4"])
    assert old.ddim_steps == new.ddim_steps == 4 and vars(old) == vars(new)
    err = capsys.readouterr().err
    assert err.count("note: --steps is now --ddim-steps") == 1
    assert s03.parse_args(G03).ddim_steps == 25 and s03.parse_args(G03).device == "auto"
