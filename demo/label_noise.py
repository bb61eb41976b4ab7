"""
The ORACLE augmentation with a share of its labels made wrong: a test of whether the generated
images' identity alone explains their Table 1 rows. A generated image that does not look like its
source identity is an image of someone else under the source's label. Here the oracle's flawless
renders play the generated images, and --keep of them keep their label; the others get another
image's label (the labels of that share are shuffled among its images, so every identity keeps
its number of images). Re-ID trained with it (04 --extra-train <out>/bounding_box_train) tells how
much a given identity score costs when everything else about the images is perfect.

  python demo/label_noise.py --src runs/demo/augmented/oracle --keep 0.5 --out runs/demo/augmented/oracle_keep50

Writes <out>/bounding_box_train/ (hard links, or copies across file systems, named under the new
label) and <out>/labels.csv (file, source file, true pid, label).
"""
import os
import sys
import csv
import shutil
import argparse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402


def relabel(pids, keep, seed):
    """-> new labels: a random round((1 - keep) * n) of the images get their labels shuffled among
    themselves (a shuffle can leave a label in place; the caller reports the share really wrong)."""
    rng = np.random.default_rng(seed)
    pids = np.asarray(pids)
    moved = rng.choice(len(pids), int(round((1 - keep) * len(pids))), replace=False)
    labels = pids.copy()
    labels[moved] = pids[rng.permutation(moved)]
    return labels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="an augmentation folder (demo/oracle.py's --out)")
    ap.add_argument("--keep", type=float, required=True, help="share of the images that keep their label (0..1)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 <= args.keep <= 1:
        raise util.UserError(f"--keep {args.keep} is not a share between 0 and 1")
    items = util.list_split(os.path.join(args.src, "bounding_box_train"))
    pids = np.array([pid for _, pid, _ in items])
    labels = relabel(pids, args.keep, args.seed)
    out_dir = os.path.join(args.out, "bounding_box_train")
    if os.path.isdir(out_dir):
        raise util.UserError(f"'{out_dir}' exists: remove it or choose another --out")
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rows = []
    for k, ((path, pid, cam), label) in enumerate(zip(items, labels)):
        name = util.generated_name(int(label), cam, k)  # k: unique, so no two images share a name
        try:
            os.link(path, os.path.join(tmp, name))
        except OSError:
            shutil.copyfile(path, os.path.join(tmp, name))
        rows.append(dict(file=name, source=os.path.basename(path), pid=pid, label=int(label)))
    os.replace(tmp, out_dir)  # the folder appears complete or not at all

    def write(f):
        with open(f, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    util.atomic_write(os.path.join(args.out, "labels.csv"), write)
    wrong = float(np.mean(labels != pids))
    print(f"read {len(items)} images from '{args.src}'; wrote '{out_dir}' and labels.csv: "
          f"{100 * wrong:.1f}% of them under another identity's label (--keep {args.keep})")


if __name__ == "__main__":
    util.run_main(main)
