"""
The results tables: every <results>/<name>.json that 05_evaluate.py wrote, aggregated into one
markdown table (mean +- sample std over seeds, per Table 1/2 row and test split; the gain over row
(I) paired by seed), with the generator checks (demo/fidelity.py's fidelity.json, tools/
identity_score.py's identity.json; fidelity_v.json and identity_v.json for row (V)'s generator) and
the stage times of run_all.sh (stage_times.csv, a column per invocation) when present. Writes
<results>/summary.md. --docs FILE puts all of it between FILE's <!-- results:start --> and
<!-- results:end --> markers; --readme FILE puts the headline (rows (I), (VI) and ORACLE, the runs
that made them, a link to the --docs file) between <!-- headline:start --> and <!-- headline:end -->.

  python tools/summarize.py runs/demo/results [--docs docs/results.md] [--readme README.md]
"""
import os
import re
import sys
import argparse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402

# Table 1 of the paper, in its order; any other variant name follows these rows
ROWS = {
    "base": "(I) no augmentation",
    "ii": "(II) in-distribution poses and viewpoints",
    "iii": "(III) out-of-distribution poses",
    "iv": "(IV) uniform viewpoints",
    "v": "(V) = (VI) with a randomly initialised diffusion model",
    "vi": "(VI) both = Diff-ID",
    "oracle": "ORACLE: (VI)'s jobs rendered as ground truth",
}


def row_label(variant):
    m = re.fullmatch(r"vi_n(\d+)", variant)
    return f"Table 2: (VI) with {int(m.group(1)):,} generated images" if m else ROWS.get(variant, variant)


def row_order(variant):
    m = re.fullmatch(r"vi_n(\d+)", variant)
    return (list(ROWS).index(variant) if variant in ROWS else len(ROWS) + (1 if m else 2), int(m.group(1)) if m else 0, variant)


HEADLINE = ("base", "vi", "oracle")  # the README's rows
RESULTS_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
HEADLINE_MARKERS = ("<!-- headline:start -->", "<!-- headline:end -->")


def check_block(path, markers):
    a, b = markers
    if not os.path.exists(path):
        raise util.UserError(f"'{path}' not found")
    text = open(path).read()
    if a not in text or b not in text or text.index(a) > text.index(b):
        raise util.UserError(f"'{path}' has no {a} ... {b} block to replace")
    return text


def replace_block(path, markers, body):
    """Replace what lies between the two markers of the file at path with body."""
    a, b = markers
    text = check_block(path, markers)
    util.save_text(path, text[:text.index(a) + len(a)] + "\n" + body + "\n" + text[text.index(b):])


def invocations(results_dir):
    """The run_all.sh commands of stage_times.csv, in order, each once, as shell commands (the
    recorded line joins the arguments with spaces: --seeds' list is quoted again)."""
    path = os.path.join(results_dir, "stage_times.csv")
    if not os.path.exists(path):
        return []
    import csv
    with open(path, newline="") as f:
        names = [r[2] for r in list(csv.reader(f))[1:] if len(r) > 2 and r[2]]
    cmds = []
    for name in names:
        cmd = re.sub(r" \([^()]*\)$", "", name)  # the date run_all.sh appends
        cmd = re.sub(r"--seeds ((?:\d+ )*\d+)(?= --|$)", lambda m: f'--seeds "{m.group(1)}"' if " " in m.group(1)
                     else m.group(0), cmd)
        if cmd not in cmds:
            cmds.append(cmd)
    return [f"bash {c}" for c in cmds]


def summarize(results_dir, readme=None, docs=None):
    """Aggregate the per-model json files into one markdown table (mean +- sample std over
    seeds); optionally splice it into docs between the results markers and its headline rows
    into the README between the headline markers."""
    import glob
    for path, markers in ((docs, RESULTS_MARKERS), (readme, HEADLINE_MARKERS)):  # both, before anything is written
        if path:
            check_block(path, markers)
    runs = [util.load_json(f) for f in sorted(glob.glob(os.path.join(results_dir, "*.json")))]
    runs = [r for r in runs if "mAP" in r]
    if not runs:
        raise util.UserError(f"no result json files in '{results_dir}': run 05_evaluate.py on trained models first")
    splits = sorted({r.get("split", "same") for r in runs}, key=lambda s: (s != "same", s))
    variants = sorted({r.get("variant", r["name"]) for r in runs}, key=row_order)
    ms = lambda xs, sign="": (f"{100 * np.mean(xs):{sign}.1f} ± {100 * np.std(xs, ddof=1):.1f}" if len(xs) > 1
                              else f"{100 * xs[0]:{sign}.1f}" if xs else "")
    by = {(r.get("variant", r["name"]), r.get("split", "same"), r.get("seed")): r for r in runs}
    head = ("| row | " + " | ".join(f"{s}: mAP | {s}: R1" for s in splits) + " | "
            + " | ".join(f"{s}: mAP − (I)" for s in splits) + " | seeds |")
    lines = [head, "|" + "---|" * (3 * len(splits) + 2)]
    cells_of = {}  # variant: (mAP cells, R1 cells, gain cells, seeds), a cell per split
    for v in variants:
        maps, r1s, deltas, n = [], [], [], 0
        for s in splits:
            rs = [r for r in runs if r.get("variant", r["name"]) == v and r.get("split", "same") == s]
            n = max(n, len(rs))
            maps.append(ms([r["mAP"] for r in rs]))
            r1s.append(ms([r["R1"] for r in rs]))
            # paired by seed: a row's seed-s model against (I)'s seed-s model on the same split
            pairs = [(r, by.get(("base", s, r.get("seed")))) for r in rs] if v != "base" else []
            deltas.append(ms([r["mAP"] - b["mAP"] for r, b in pairs if b], "+"))
        cells_of[v] = maps, r1s, deltas, n
        cells = [c for pair in zip(maps, r1s) for c in pair]
        lines.append(f"| {row_label(v)} | " + " | ".join(cells + deltas) + f" | {n} |")
    table = "\n".join(lines) + "\n"
    num = lambda v, spec: "n/a" if v is None else format(v, spec)  # controls need >= 2 jobs per identity / target

    def gain(g):  # fidelity.json's person PSNR over the other-identity control
        lo, hi = g["ci95"] or (None, None)
        return f"{num(g['mean'], '+.2f')} dB (95% CI {num(lo, '+.2f')} .. {num(hi, '+.2f')}) over another identity"

    def lost(g):  # identity_score.py's collapse numbers, if the JSON has them
        return (f"; the images that lose it land on {g['wrong_ids']} identities, {100 * g['wrong_top5']:.0f}% of them on "
                f"5, feature spread {g['spread_vs_real']:.2f} of the real images'" if "wrong_ids" in g else "")

    fid = os.path.join(results_dir, "fidelity.json")
    if os.path.exists(fid):
        f = util.load_json(fid)
        c = f["control_pose_shuffled"]
        table += (f"\nGenerator fidelity, {f['images']:,} generated (VI) images against ground-truth renders of the same "
                  f"jobs (`demo/fidelity.py`): person PSNR {num(f['psnr_foreground'], '.2f')} dB, "
                  f"{gain(f['identity_gain_psnr_foreground'])} in the same pose; mask IoU {num(f['mask_iou'], '.3f')} "
                  f"against {num(c['mask_iou'], '.3f')} with the target pose shuffled.")
        if "colourfulness" in f:  # how much of the clothes' colour survives (0 = grey), and what the VAE alone keeps
            c, v = f["colourfulness"], f.get("vae_ceiling")
            table += (f" Colourfulness of the person (mean RGB std, 0 = grey): generated {num(c['generated'], '.1f')}, "
                      f"oracle {num(c['oracle'], '.1f')}" + (f"; the generator's VAE alone (oracle encoded and decoded): "
                      f"{num(v['colourfulness'], '.1f')}, person PSNR {num(v['psnr_foreground'], '.2f')} dB" if v else "") + ".")
        table += "\n"
    ident = os.path.join(results_dir, "identity.json")
    if os.path.exists(ident):  # tools/identity_score.py
        d = util.load_json(ident)
        table += (f"\nIdentity kept (`tools/identity_score.py`: the generated image's nearest identity centroid, by the "
                  f"row-(I) model, is its source identity): {100 * d['generated']['agreement']:.1f}% of "
                  f"{d['generated']['images']:,} generated images"
                  + (f", {100 * d['oracle']['agreement']:.1f}% of their oracle renders (generated / oracle "
                     f"{d['generated_vs_oracle']:.2f})" if "oracle" in d else "")
                  + f"; chance {100 * d['chance']:.1f}% ({d['identities']} identities){lost(d['generated'])}.\n")
    fid_v, ident_v = (os.path.join(results_dir, f) for f in ("fidelity_v.json", "identity_v.json"))
    if os.path.exists(fid_v) and os.path.exists(ident_v):  # run_all.sh demo --tables: row (V)'s generator, same jobs
        g, d = util.load_json(fid_v)["identity_gain_psnr_foreground"], util.load_json(ident_v)
        table += (f"\nThe same checks for row (V)'s generator (the same architecture trained from scratch on the train "
                  f"split), on the same jobs: person PSNR {gain(g)}; identity kept for "
                  f"{100 * d['generated']['agreement']:.1f}% of {d['generated']['images']:,} images{lost(d['generated'])}.\n")
    times = os.path.join(results_dir, "stage_times.csv")
    if os.path.exists(times):  # one column per run_all.sh invocation (a resumed or --tables run adds one)
        import csv
        with open(times, newline="") as f:
            rows = list(csv.reader(f))[1:]
        runs, secs = {}, {}  # {run: None} keeps their order; {(stage, run): seconds}
        for r in rows:
            stage, run = r[0], (r[2] if len(r) > 2 else "")  # older files have no run column
            runs[run] = None
            secs[stage, run] = secs.get((stage, run), 0) + int(r[1])
        stages = list(dict.fromkeys(r[0] for r in rows))
        head = [f"`{r}`" if r else "wall time" for r in runs]
        table += ("\n| stage (wall time, s) | " + " | ".join(head) + " |\n|---" + "|---" * len(runs) + "|\n"
                  + "".join(f"| {st} | " + " | ".join(f"{secs[st, r]:,}" if (st, r) in secs else "" for r in runs) + " |\n"
                            for st in stages)
                  + "| all | " + " | ".join(f"{t:,} ({t / 60:.0f} min)" for t in
                                           (sum(v for (_, r2), v in secs.items() if r2 == r) for r in runs)) + " |\n")
    util.save_text(os.path.join(results_dir, "summary.md"), table)
    print(table)
    print(f"wrote {os.path.join(results_dir, 'summary.md')}")
    command = f"python tools/summarize.py {results_dir}" + (f" --docs {docs}" if docs else "") + (
        f" --readme {readme}" if readme else "")
    runs_made = invocations(results_dir)
    made = f"From {', then '.join(f'`{c}`' for c in runs_made)} in one folder; written" if runs_made else "Written"
    if docs:
        replace_block(docs, RESULTS_MARKERS, f"_{made} by `{command}`._\n\n" + table)
        print(f"updated the results block of {docs}")
    if readme:
        head = ("| row | " + " | ".join(f"{s}: mAP" for s in splits) + " | "
                + " | ".join(f"{s}: mAP − (I)" for s in splits) + " | seeds |")
        lines = [head, "|" + "---|" * (2 * len(splits) + 2)]
        lines += [f"| {row_label(v)} | " + " | ".join(cells_of[v][0] + cells_of[v][2]) + f" | {cells_of[v][3]} |"
                  for v in HEADLINE if v in cells_of]
        link = (f"; every row, the generator checks and the stage times: "
                f"[{docs}]({os.path.relpath(docs, os.path.dirname(os.path.abspath(readme)))})" if docs else "")
        replace_block(readme, HEADLINE_MARKERS, "\n".join(lines) + f"\n\n_{made} by `{command}`{link}._\n")
        print(f"updated the headline block of {readme}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results folder with the json files of 05_evaluate.py")
    ap.add_argument("--docs", help="put the tables between the results markers of this file (docs/results.md)")
    ap.add_argument("--readme", help="put the headline rows (I), (VI), ORACLE between the headline markers of this "
                    "file (README.md)")
    args = ap.parse_args()
    summarize(args.results, args.readme, args.docs)


if __name__ == "__main__":
    util.run_main(main)
