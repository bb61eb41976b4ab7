"""
Stage 05: evaluate a trained Re-ID model with the Market-1501 protocol.

Extracts features of the query and gallery images (optionally averaged with the flipped
image), ranks the gallery by Euclidean distance and reports mAP, CMC rank-1/5/10 and mINP
(the protocol: common.evaluate_rank; computed by its vectorised twin evaluate_fast.evaluate_rank).
Writes <results>/<name>.json and appends a row to <results>/results.md.

  python 05_evaluate.py --model runs/demo/reid/base/model.pt --data runs/demo/world --name base
  python 05_evaluate.py --model ... --data runs/demo/world --test-root runs/demo/world/shifted --name base_shifted

Tables over models and seeds: tools/summarize.py; the evaluator's speed: tools/bench_evaluate.py.
"""
import os
import time
import argparse

import numpy as np

import common
import evaluate_fast
import util
import models


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model.pt written by 04_train_reid.py")
    p.add_argument("--data", required=True, help="Market-1501-layout root the model was trained on")
    util.old_flag(p, "--data-root", "--data")
    p.add_argument("--test-root", help="folder with query/ and bounding_box_test/ if not --data (demo: world/shifted)")
    p.add_argument("--no-size-check", action="store_true", help="skip the Market/Duke image-count sanity check")
    p.add_argument("--dataset", choices=["auto", "market1501", "dukemtmc"], default="auto", help="which official image "
                   "counts to check (auto: from the folder name, e.g. Market-1501-v15.09.15 or DukeMTMC-reID)")
    p.add_argument("--name", default=None, help="row name in the results table (default: the model's folder)")
    p.add_argument("--results", default=None, help="results folder (default: <model folder>/../../results)")
    p.add_argument("--flip", action="store_true", help="average features of the image and its mirror")
    p.add_argument("--batch-size", type=int, default=128, help="images per feature-extraction batch")
    p.add_argument("--workers", type=int, default=2, help="image loader processes")
    p.add_argument("--max-rank", type=int, default=50, help="longest CMC rank reported")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--variant", default=None, help="table row this model belongs to (default: --name)")
    p.add_argument("--seed", type=int, default=None, help="Re-ID seed of this model, for mean +- spread over seeds")
    p.add_argument("--split", default="same", help="test split label, e.g. same / shifted (demo world)")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_rank"):
        if getattr(args, name) < 1:
            raise util.UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.workers < 0:
        raise util.UserError(f"--workers {args.workers}: must be 0 or more")
    return args


def results_folder(args):
    """--results, or <model folder>/../../results; checked before the features are computed."""
    folder = os.path.normpath(args.results or os.path.join(os.path.dirname(os.path.abspath(args.model)), "..", "..", "results"))
    util.check_output_dir(folder, "--results" if args.results else "the results folder (--results)")
    return folder


def main(argv=None):
    args = parse_args(argv)
    import torch
    device = torch.device(util.pick_device(args.device))
    model, ckpt = models.load_reid_model(args.model, device)
    results_dir = results_folder(args)

    data = util.load_reid_dataset(args.data, test_root=args.test_root, check_sizes=not args.no_size_check,
                                  name=None if args.dataset == "auto" else args.dataset)
    query, n_bad_q = models.check_images(data["query"], "query images")
    gallery, n_bad_g = models.check_images(data["gallery"], "gallery images")
    test_root = args.test_root or args.data
    print(f"read {args.model} ({ckpt['arch']}, {ckpt['iterations']} iterations) and {test_root}: "
          f"{len(query)} query, {len(gallery)} gallery images"
          + (f"; skipped {n_bad_q + n_bad_g} unreadable" if n_bad_q + n_bad_g else ""))
    t0 = time.time()
    feats = lambda items: models.extract_features(model, items, device, ckpt["height"], ckpt["width"], args.batch_size,
                                                  args.workers, args.flip)
    query_feats, gallery_feats = feats(query), feats(gallery)
    distmat = torch.cat([common.pairwise_euclidean(q, gallery_feats) for q in query_feats.split(1024)]).numpy()
    ids = lambda items, k: np.array([it[k] for it in items])
    try:
        scores = evaluate_fast.evaluate_rank(distmat, ids(query, 1), ids(gallery, 1), ids(query, 2), ids(gallery, 2),
                                             args.max_rank)
    except ValueError as e:  # e.g. no query has a match in the gallery from another camera
        raise util.UserError(f"cannot evaluate on '{test_root}': {e}; check its query/ and bounding_box_test/")

    name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.model)))
    cmc = scores["cmc"]
    row = dict(name=name, variant=args.variant or name, seed=args.seed, split=args.split, model=args.model, test_root=test_root, flip=args.flip, mAP=scores["mAP"], mINP=scores["mINP"],
               R1=float(cmc[0]), R5=float(cmc[min(4, len(cmc) - 1)]), R10=float(cmc[min(9, len(cmc) - 1)]),
               cmc=cmc.tolist(), num_query=len(query), num_gallery=len(gallery),
               num_valid_queries=scores["num_valid_queries"], num_skipped_queries=scores["num_skipped_queries"],
               seconds=round(time.time() - t0, 1))
    if n_bad_q + n_bad_g:  # skipped (as 02, 04 do): this mAP is over the readable images only
        row.update(unreadable_query=n_bad_q, unreadable_gallery=n_bad_g)
    util.save_json(os.path.join(results_dir, f"{name}.json"), row)
    table = os.path.join(results_dir, "results.md")
    header = "| name | test set | mAP | R1 | R5 | R10 | mINP |\n|---|---|---|---|---|---|---|\n"
    old = open(table).read() if os.path.exists(table) else header
    # a rerun replaces its row
    old = "".join(table_line for table_line in old.splitlines(True) if not table_line.startswith(f"| {name} |"))
    line = (f"| {name} | {test_root} | {100 * scores['mAP']:.1f} | {100 * row['R1']:.1f} | {100 * row['R5']:.1f} "
            f"| {100 * row['R10']:.1f} | {100 * scores['mINP']:.1f} |\n")
    util.save_text(table, old + line)
    print(f"{name}: mAP {100 * scores['mAP']:.1f}  R1 {100 * row['R1']:.1f}  R5 {100 * row['R5']:.1f}  "
          f"R10 {100 * row['R10']:.1f}  mINP {100 * scores['mINP']:.1f}  ({scores['num_valid_queries']} queries, "
          f"{scores['num_skipped_queries']} skipped)")
    print(f"wrote {os.path.join(results_dir, name + '.json')} and a row of {table}")


if __name__ == "__main__":
    util.run_main(main)
