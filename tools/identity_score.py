"""
Does the generator keep identity? A check that works on real data too, where there is no ground
truth: the Re-ID model of row (I) (trained on the real images only) embeds every generated image,
and the image counts as kept when its nearest identity centroid (the mean feature of that
identity's real training images) is its source identity. The share of such images is compared
with chance (1 / number of identities) and, on the demo world, with the oracle renders of the
same jobs (flawless images: the ceiling). For the images that lose their identity it also says how
alike they are (how many identities they land on, the feature spread): a generator whose people all
look like a few ids lands on few. A user can run it on Market-1501 before spending GPU
hours on Re-ID training with generated images.

  python tools/identity_score.py --model runs/demo/reid/base_s0/model.pt --data runs/demo/world \\
      --generated runs/demo/augmented/vi [--oracle runs/demo/augmented/oracle] --out runs/demo/results/identity.json
"""
import os
import sys
import argparse

import numpy as np
import torch
from scipy.spatial.distance import cdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
import models  # noqa: E402


def nearest_centroid(train_feats, train_labels, feats):
    """The label of the nearest (Euclidean) class centroid of `train_feats`, for every row of `feats`
    (an image is kept when it is its own label: labels absent from train_labels are misses)."""
    classes = np.unique(train_labels)
    centroids = np.stack([train_feats[train_labels == c].mean(0) for c in classes])
    # distances only (a difference array would be images x identities x 2048 floats: ~470 GiB for
    # Market's 80,000-image pool), in chunks of images
    return np.concatenate([classes[cdist(feats[i:i + 4096], centroids).argmin(1)]
                           for i in range(0, len(feats), 4096)] or [classes[:0]])


def collapse(train_feats, feats, assigned, labels):
    """How alike the images that lose their identity are: the identities they land on (a generator
    whose people all look like a few ids lands on few; flawless renders of other poses on many),
    the share of them on the 5 most frequent, and the feature spread (mean distance to the set's
    mean) relative to the real train images'."""
    spread = lambda f: float(np.sqrt(((f - f.mean(0)) ** 2).sum(1)).mean())
    wrong = assigned[assigned != labels]
    counts = np.sort(np.unique(wrong, return_counts=True)[1])[::-1]
    return dict(wrong_ids=int(len(counts)), wrong_top5=float(counts[:5].sum() / max(len(wrong), 1)),
                spread_vs_real=spread(feats) / spread(train_feats))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model.pt of row (I), trained without generated images (04)")
    ap.add_argument("--data", required=True, help="the Market-layout data set the model was trained on")
    util.old_flag(ap, "--data-root", "--data")
    ap.add_argument("--generated", required=True, help="03's folder: bounding_box_train/ + manifest.csv")
    ap.add_argument("--oracle", default=None, help="demo world: the oracle renders of the same jobs (demo/oracle.py)")
    ap.add_argument("--out", required=True, help="JSON to write")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    ap.add_argument("--workers", type=int, default=2, help="image loader processes")
    args = ap.parse_args(argv)
    if args.workers < 0:
        raise util.UserError(f"--workers {args.workers}: must be 0 or more")
    util.check_output_file(args.out)
    return args


def read_images(folder):
    """[(path, source pid, 0)] of every image a manifest lists: all of them present, readable,
    listed once (else one line: the agreement over a partial set would be another figure)."""
    rows = util.read_manifest(folder, ("file", "pid"), writer="03_generate.py or demo/oracle.py")
    items = [(os.path.join(folder, r["file"]), int(r["pid"]), 0) for r in rows]
    bad = models.unreadable_images([p for p, _, _ in items], f"images of {folder}")
    if bad:
        raise util.UserError(f"{len(bad)} of the {len(items)} images listed in '{os.path.join(folder, 'manifest.csv')}' "
                             f"cannot be read (e.g. '{bad[0][0]}', {bad[0][1][:80]}): delete them and rerun the "
                             f"command that made them (03_generate.py or demo/oracle.py)")
    return items


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(util.pick_device(args.device))
    model, ckpt = models.load_reid_model(args.model, device)
    image_sets = {name: read_images(folder) for name, folder in (("generated", args.generated), ("oracle", args.oracle))
                  if folder is not None}  # (checked before any feature is computed)
    train, n_bad = models.check_images(util.list_split(os.path.join(args.data, util.SPLIT_DIRS["train"])),
                                       "train images")  # (skipped and counted, as 04 does)
    feats = lambda items: models.extract_features(model, items, device, ckpt["height"], ckpt["width"],
                                                  workers=args.workers).numpy()
    train_feats, train_labels = feats(train), np.array([pid for _, pid, _ in train])
    res = dict(model=args.model, identities=int(len(np.unique(train_labels))), chance=1.0 / len(np.unique(train_labels)))
    if n_bad:
        res["unreadable_train_images"] = n_bad
    for name, items in image_sets.items():
        gen_feats, labels = feats(items), np.array([pid for _, pid, _ in items])
        assigned = nearest_centroid(train_feats, train_labels, gen_feats)
        res[name] = dict(images=len(items), agreement=float(np.mean(assigned == labels)),
                         **collapse(train_feats, gen_feats, assigned, labels))
    if "oracle" in res:
        res["generated_vs_oracle"] = res["generated"]["agreement"] / max(res["oracle"]["agreement"], 1e-12)
    util.save_json(args.out, res)
    line = f"identity kept (nearest train centroid = source id, by the row-(I) model): generated " \
           f"{100 * res['generated']['agreement']:.1f}%"
    if "oracle" in res:
        line += f", oracle renders {100 * res['oracle']['agreement']:.1f}% (generated / oracle {res['generated_vs_oracle']:.2f})"
    print(line + f", chance {100 * res['chance']:.1f}% ({res['identities']} ids)")
    g = res["generated"]
    print(f"the generated images that lose their identity land on {g['wrong_ids']} identities, "
          f"{100 * g['wrong_top5']:.0f}% of them on 5; feature spread {g['spread_vs_real']:.2f} of the real images'")
    print(f"read {args.model}, {len(train)} train images of {args.data}"
          + (f" (skipped {n_bad} unreadable)" if n_bad else "") + f"; wrote {args.out}")
    return res


if __name__ == "__main__":
    util.run_main(main)
