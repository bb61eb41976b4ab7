"""
Stage 05: evaluate a trained Re-ID model with the Market-1501 protocol.

Extracts features of the query and gallery images (optionally averaged with the flipped
image), ranks the gallery by Euclidean distance and reports mAP, CMC rank-1/5/10 and mINP
(common.evaluate_rank). Writes <results>/<name>.json and appends a row to <results>/results.md.

  python 05_evaluate.py --model runs/demo/reid/base/model.pt --data-root runs/demo/world --name base
  python 05_evaluate.py --model ... --data-root runs/demo/world --test-root runs/demo/world/shifted --name base_shifted
  python 05_evaluate.py --benchmark      # evaluator speed on a Market-sized problem vs a per-query reference
"""
import os
import re
import sys
import json
import time
import argparse

import numpy as np

import common

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", help="model.pt written by 04_train_reid.py")
p.add_argument("--data-root", help="Market-1501-layout folder")
p.add_argument("--test-root", help="folder with query/ and bounding_box_test/ if not --data-root (demo: world/shifted)")
p.add_argument("--no-size-check", action="store_true", help="skip the Market/Duke image-count sanity check")
p.add_argument("--name", default=None, help="row name in the results table (default: the model's folder)")
p.add_argument("--results", default=None, help="results folder (default: <model folder>/../../results)")
p.add_argument("--flip", action="store_true", help="average features of the image and its mirror")
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--max-rank", type=int, default=50)
p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
p.add_argument("--variant", default=None, help="table row this model belongs to (default: --name)")
p.add_argument("--seed", type=int, default=None, help="Re-ID seed of this model, for mean +- spread over seeds")
p.add_argument("--split", default="same", help="test split label, e.g. same / shifted (demo world)")
p.add_argument("--summarize", metavar="RESULTS_DIR", help="write RESULTS_DIR/summary.md: mean +- std over seeds "
               "per variant and split, from the json files there (no evaluation)")
p.add_argument("--readme", help="with --summarize: also replace the results block of this README")
p.add_argument("--benchmark", action="store_true", help="time the evaluator on a Market-sized random problem")
p.add_argument("--repeats", type=int, default=5, help="--benchmark: timed runs of the fast evaluator")


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The protocol written the straightforward way, one query at a time (as torchreid's
    Python evaluator): the yardstick that common.evaluate_rank must match exactly."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    cmcs, aps, inps = [], [], []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        matches = g_pids[order][keep] == q_pids[i]
        if not matches.any():
            continue
        hit_ranks = np.flatnonzero(matches) + 1
        cmc = np.ones(max_rank)
        cmc[:hit_ranks[0] - 1] = 0
        cmcs.append(cmc)
        aps.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
        inps.append(len(hit_ranks) / hit_ranks[-1])
    if not aps:
        return dict(num_valid_queries=0)
    return dict(mAP=float(np.mean(aps)), mINP=float(np.mean(inps)), cmc=np.mean(cmcs, 0),
                num_valid_queries=len(aps))


def market_sized_problem(seed=0, num_q=3368, num_g=15913, num_ids=751, num_cams=6, dim=64):
    """Random but Market-shaped: 751 identities with several images each over 6 cameras, pid-0
    distractors in the gallery, distances from noisy per-identity features (float32); the noise
    is set so that mAP is about 0.77, like a good model on Market-1501."""
    rng = np.random.default_rng(seed)
    g_pids = np.concatenate([rng.integers(1, num_ids + 1, num_g - 2798), np.zeros(2798, int)])
    q_pids = rng.integers(1, num_ids + 1, num_q)
    q_cams, g_cams = rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g)
    centres = rng.normal(size=(num_ids + 1, dim)).astype(np.float32)
    q = centres[q_pids] + 1.0 * rng.normal(size=(num_q, dim)).astype(np.float32)
    g = centres[g_pids] + 1.0 * rng.normal(size=(num_g, dim)).astype(np.float32)
    g[g_pids == 0] = 1.5 * rng.normal(size=((g_pids == 0).sum(), dim))
    d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None] - 2 * q @ g.T
    return np.sqrt(np.maximum(d2, 0)).astype(np.float32), q_pids, g_pids, q_cams, g_cams


def benchmark(args):
    import tracemalloc
    problem = market_sized_problem()
    print(f"Market-sized random problem: {problem[0].shape[0]} queries x {problem[0].shape[1]} gallery, "
          f"{len(np.unique(problem[2]))} gallery ids, 6 cameras, float32 distances")
    common.evaluate_rank(*problem)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fast = common.evaluate_rank(*problem)
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    common.evaluate_rank(*problem)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t = time.perf_counter()
    ref = reference_evaluate(*problem)
    t_ref = time.perf_counter() - t
    same = (abs(fast["mAP"] - ref["mAP"]) < 1e-6 and abs(fast["mINP"] - ref["mINP"]) < 1e-6
            and np.abs(fast["cmc"] - ref["cmc"]).max() < 1e-6 and fast["num_valid_queries"] == ref["num_valid_queries"])
    med = float(np.median(times))
    print(f"common.evaluate_rank : median {med:.3f} s over {args.repeats} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}), peak extra memory {peak / 2**20:.0f} MiB")
    print(f"per-query reference  : {t_ref:.2f} s (1 run)")
    print(f"speed-up             : {t_ref / med:.1f}x")
    print(f"same numbers (1e-6)  : {same}  mAP {fast['mAP']:.6f} vs {ref['mAP']:.6f}, "
          f"R1 {fast['cmc'][0]:.6f} vs {ref['cmc'][0]:.6f}, mINP {fast['mINP']:.6f} vs {ref['mINP']:.6f}")
    if not same:
        sys.exit(1)


def extract(model, items, args, device, height, width):
    import torch
    import torchvision.transforms as T
    from tqdm import tqdm
    transform = T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(common.ImageDataset(items, transform), batch_size=args.batch_size,
                                         num_workers=args.workers, shuffle=False)
    feats = []
    with torch.no_grad():
        for x, _, _ in tqdm(loader, desc="features", leave=False, mininterval=1.0):
            x = x.to(device)
            f = model(x)[0]
            if args.flip:
                f = (f + model(x.flip(3))[0]) / 2
            feats.append(f.float().cpu())
    return torch.cat(feats)


# Table 1 of the paper, in its order; any other variant name follows these rows
ROWS = {
    "base": "(I) no augmentation",
    "ii": "(II) in-distribution poses and viewpoints",
    "iii": "(III) out-of-distribution poses",
    "iv": "(IV) uniform viewpoints",
    "vi": "(VI) both = Diff-ID",
    "oracle": "ORACLE: (VI)'s jobs rendered as ground truth",
}


def row_label(variant):
    m = re.fullmatch(r"vi_n(\d+)", variant)
    return f"Table 2: (VI) with {int(m.group(1)):,} generated images" if m else ROWS.get(variant, variant)


def row_order(variant):
    m = re.fullmatch(r"vi_n(\d+)", variant)
    return (list(ROWS).index(variant) if variant in ROWS else len(ROWS) + (1 if m else 2), int(m.group(1)) if m else 0, variant)


def summarize(results_dir, readme=None):
    """Aggregate the per-model json files into one markdown table (mean +- sample std over
    seeds) and optionally splice it into the README between the results markers."""
    import glob
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(results_dir, "*.json")))]
    runs = [r for r in runs if "mAP" in r]
    if not runs:
        raise common.UserError(f"no result json files in '{results_dir}': run 05_evaluate.py on trained models first")
    splits = sorted({r.get("split", "same") for r in runs}, key=lambda s: (s != "same", s))
    variants = sorted({r.get("variant", r["name"]) for r in runs}, key=row_order)
    ms = lambda xs, sign="": (f"{100 * np.mean(xs):{sign}.1f} ± {100 * np.std(xs, ddof=1):.1f}" if len(xs) > 1
                              else f"{100 * xs[0]:{sign}.1f}" if xs else "")
    by = {(r.get("variant", r["name"]), r.get("split", "same"), r.get("seed")): r for r in runs}
    head = ("| row | " + " | ".join(f"{s}: mAP | {s}: R1" for s in splits) + " | "
            + " | ".join(f"{s}: mAP − (I)" for s in splits) + " | seeds |")
    lines = [head, "|" + "---|" * (3 * len(splits) + 2)]
    for v in variants:
        cells, deltas, n = [], [], 0
        for s in splits:
            rs = [r for r in runs if r.get("variant", r["name"]) == v and r.get("split", "same") == s]
            n = max(n, len(rs))
            cells += [ms([r["mAP"] for r in rs]), ms([r["R1"] for r in rs])]
            # paired by seed: a row's seed-s model against (I)'s seed-s model on the same split
            pairs = [(r, by.get(("base", s, r.get("seed")))) for r in rs] if v != "base" else []
            deltas.append(ms([r["mAP"] - b["mAP"] for r, b in pairs if b], "+"))
        lines.append(f"| {row_label(v)} | " + " | ".join(cells + deltas) + f" | {n} |")
    table = "\n".join(lines) + "\n"
    fid = os.path.join(results_dir, "fidelity.json")
    if os.path.exists(fid):
        f = json.load(open(fid))
        g, c = f["identity_gain_psnr_foreground"], f["control_pose_shuffled"]
        num = lambda v, spec: "n/a" if v is None else format(v, spec)  # controls need >= 2 jobs per identity / target
        ci = g["ci95"] or [None, None]
        table += (f"\nGenerator fidelity, {f['images']:,} generated (VI) images against ground-truth renders of the same "
                  f"jobs (`03_generate.py fidelity`): person PSNR {num(f['psnr_foreground'], '.2f')} dB, "
                  f"{num(g['mean'], '+.2f')} dB (95% CI {num(ci[0], '+.2f')} .. {num(ci[1], '+.2f')}) over another identity "
                  f"in the same pose; mask IoU {num(f['mask_iou'], '.3f')} against {num(c['mask_iou'], '.3f')} with the "
                  f"target pose shuffled.\n")
    times = os.path.join(results_dir, "stage_times.csv")
    if os.path.exists(times):
        import csv
        total, count = {}, {}
        for r in csv.DictReader(open(times)):
            total[r["stage"]] = total.get(r["stage"], 0) + int(r["seconds"])
            count[r["stage"]] = count.get(r["stage"], 0) + 1
        table += ("\n| stage | runs | wall time (s) |\n|---|---|---|\n"
                  + "".join(f"| {k} | {count[k]} | {v:,} |\n" for k, v in total.items())
                  + f"| all | {sum(count.values())} | {sum(total.values()):,} ({sum(total.values()) / 60:.0f} min) |\n")
    common.save_text(os.path.join(results_dir, "summary.md"), table)
    print(table)
    print(f"wrote {os.path.join(results_dir, 'summary.md')}")
    if readme:
        text = open(readme).read()
        a, b = "<!-- results:start -->", "<!-- results:end -->"
        if a not in text or b not in text:
            raise common.UserError(f"'{readme}' has no {a} ... {b} block to replace")
        note = f"\n_Generated by `python 05_evaluate.py --summarize {results_dir} --readme {readme}`._\n\n"
        text = text[:text.index(a) + len(a)] + note + table + "\n" + text[text.index(b):]
        common.save_text(readme, text)
        print(f"updated the results block of {readme}")


def main():
    args = p.parse_args()
    if args.benchmark:
        return benchmark(args)
    if args.summarize:
        return summarize(args.summarize, args.readme)
    if not args.model or not args.data_root:
        raise common.UserError("--model and --data-root are required (or --benchmark)")
    import torch
    if not os.path.isfile(args.model):
        raise common.UserError(f"model file '{args.model}' does not exist: train it with 04_train_reid.py")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = torch.load(args.model, map_location="cpu", weights_only=False)
    model = common.build_reid_model(ckpt["arch"], ckpt["num_classes"], bnneck=ckpt.get("bnneck", False))
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()

    data = common.load_reid_dataset(args.data_root, test_root=args.test_root, check_sizes=not args.no_size_check)
    query, n_bad_q = common.check_images(data["query"], "query images")
    gallery, n_bad_g = common.check_images(data["gallery"], "gallery images")
    test_root = args.test_root or args.data_root
    print(f"read {args.model} ({ckpt['arch']}, {ckpt['iterations']} iterations) and {test_root}: "
          f"{len(query)} query, {len(gallery)} gallery images"
          + (f"; skipped {n_bad_q + n_bad_g} unreadable" if n_bad_q + n_bad_g else ""))
    t0 = time.time()
    qf = extract(model, query, args, device, ckpt["height"], ckpt["width"])
    gf = extract(model, gallery, args, device, ckpt["height"], ckpt["width"])
    distmat = torch.cat([common.pairwise_euclidean(q, gf) for q in qf.split(1024)]).numpy()
    ids = lambda items, k: np.array([it[k] for it in items])
    r = common.evaluate_rank(distmat, ids(query, 1), ids(gallery, 1), ids(query, 2), ids(gallery, 2), args.max_rank)

    name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.model)))
    results_dir = args.results or os.path.join(os.path.dirname(os.path.abspath(args.model)), "..", "..", "results")
    results_dir = os.path.normpath(results_dir)
    cmc = r["cmc"]
    row = dict(name=name, variant=args.variant or name, seed=args.seed, split=args.split, model=args.model, test_root=test_root, flip=args.flip, mAP=r["mAP"], mINP=r["mINP"],
               R1=float(cmc[0]), R5=float(cmc[min(4, len(cmc) - 1)]), R10=float(cmc[min(9, len(cmc) - 1)]),
               cmc=cmc.tolist(), num_query=len(query), num_gallery=len(gallery),
               num_valid_queries=r["num_valid_queries"], num_skipped_queries=r["num_skipped_queries"],
               seconds=round(time.time() - t0, 1))
    common.save_json(os.path.join(results_dir, f"{name}.json"), row)
    table = os.path.join(results_dir, "results.md")
    header = "| name | test set | mAP | R1 | R5 | R10 | mINP |\n|---|---|---|---|---|---|---|\n"
    old = open(table).read() if os.path.exists(table) else header
    old = "".join(l for l in old.splitlines(True) if not l.startswith(f"| {name} |"))  # a rerun replaces its row
    line = (f"| {name} | {test_root} | {100 * r['mAP']:.1f} | {100 * row['R1']:.1f} | {100 * row['R5']:.1f} "
            f"| {100 * row['R10']:.1f} | {100 * r['mINP']:.1f} |\n")
    common.save_text(table, old + line)
    print(f"{name}: mAP {100 * r['mAP']:.1f}  R1 {100 * row['R1']:.1f}  R5 {100 * row['R5']:.1f}  "
          f"R10 {100 * row['R10']:.1f}  mINP {100 * r['mINP']:.1f}  ({r['num_valid_queries']} queries, "
          f"{r['num_skipped_queries']} skipped)")
    print(f"wrote {os.path.join(results_dir, name + '.json')} and a row of {table}")


if __name__ == "__main__":
    common.run_main(main)
