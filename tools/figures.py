"""
Figure 3 of the paper for a data set and a target set: the viewpoint distributions (elevation x
azimuth) and a t-SNE of the SMPL body poses, plus contact sheets of the images and condition maps.

  python tools/figures.py --data runs/demo/world --targets runs/demo/targets/vi --out runs/demo/results/figures \\
      [--conditions runs/demo/conditions] [--smpl runs/market1501/smpl]
"""
import os
import sys
import time
import argparse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
from body import load_params, cond_path  # noqa: E402

def make_figures(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    t0 = time.time()
    smpl_file = os.path.join(args.smpl or os.path.join(args.data, "smpl"), args.split + ".npz")
    data = load_params(smpl_file)
    targ = load_params(os.path.join(args.targets, "params.npz"))
    sets = [(f"{args.split} ({len(data['azimuth'])} images)", data), (f"targets ({len(targ['azimuth'])})", targ)]
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (title, d) in zip(axes, sets):
        ax.hist2d(d["azimuth"] % 360, d["elevation"], bins=[36, 15], range=[[0, 360], [0, 30]], cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("azimuth (deg, 0 = front)")
    axes[0].set_ylabel("elevation (deg)")
    fig.suptitle("viewpoint distribution (elevation x azimuth)")
    fig.tight_layout()
    p1 = os.path.join(args.out, "fig3_viewpoints.png")
    util.atomic_write(p1, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)

    # t-SNE on the 69-d body pose, subsampled so that it runs in seconds
    rng = np.random.default_rng(0)
    a, b = data["body_pose"], targ["body_pose"]
    a = a[rng.choice(len(a), min(len(a), args.tsne_max), replace=False)]
    b = b[rng.choice(len(b), min(len(b), args.tsne_max), replace=False)]
    X = np.concatenate([a, b]).astype(np.float64)
    Y = TSNE(n_components=2, perplexity=min(30, max(2, (len(X) - 1) // 3)), init="pca", random_state=0).fit_transform(X)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    ya, yb = Y[:len(a)], Y[len(a):]
    axes[0].scatter(*ya.T, s=4, c="tab:blue"), axes[0].set_title(args.split)
    axes[1].scatter(*yb.T, s=4, c="tab:orange"), axes[1].set_title("targets")
    axes[2].scatter(*ya.T, s=4, c="tab:blue", label=args.split)
    axes[2].scatter(*yb.T, s=4, c="tab:orange", label="targets"), axes[2].set_title("both")
    axes[2].legend(loc="best", fontsize=8)
    fig.suptitle("t-SNE of SMPL body poses")
    fig.tight_layout()
    p2 = os.path.join(args.out, "fig3_tsne_poses.png")
    util.atomic_write(p2, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    wrote = [p1, p2] + sample_sheets(args)
    print(f"read {smpl_file} and {args.targets}/params.npz; wrote {', '.join(wrote)} "
          f"in {time.time() - t0:.1f} s")


def sample_sheets(args):
    """Contact sheets to look at: world images (train split vs shifted test split) and condition maps
    (training images with their aligned maps, if --conditions is given, and the target set's maps)."""
    from PIL import Image
    out = []
    load = lambda p, mode="RGB": np.asarray(Image.open(p).convert(mode))
    grey = lambda p: np.repeat(load(p, "L")[..., None], 3, 2)
    rows = []
    for folder in ("bounding_box_train", "shifted/query"):
        d = os.path.join(args.data, folder)
        if os.path.isdir(d):
            names = sorted(os.listdir(d))
            pick = [names[i] for i in np.linspace(0, len(names) - 1, min(12, len(names))).astype(int)]
            rows.append(np.concatenate([load(os.path.join(d, n)) for n in pick], 1))
    if rows:
        w = min(r.shape[1] for r in rows)
        p = os.path.join(args.out, "sheet_world.png")
        util.save_image(p, np.concatenate([r[:, :w] for r in rows], 0))
        out.append(p)
    cols = []
    cdir = os.path.join(args.conditions, args.split) if args.conditions else None
    if cdir and os.path.isdir(cdir):
        d = os.path.join(args.data, args.split)
        names = sorted(os.listdir(d))
        for n in [names[i] for i in np.linspace(0, len(names) - 1, 6).astype(int)]:
            stem = os.path.splitext(n)[0]
            im = load(os.path.join(d, n))
            maps = [grey(cond_path(cdir, stem, "depth")), load(cond_path(cdir, stem, "normal")),
                    load(cond_path(cdir, stem, "skeleton"))]
            maps = [np.asarray(Image.fromarray(m).resize(im.shape[1::-1])) for m in maps]
            cols.append(np.concatenate([im] + maps, 0))
    tdir = os.path.join(args.targets, "maps")
    ids = sorted({f.split(".")[0] for f in os.listdir(tdir)})[:6] if os.path.isdir(tdir) else []
    tile = (cols[0].shape[0] // 4, cols[0].shape[1]) if cols else None  # (h, w) of one map in the sheet
    for tid in ids:
        maps = [grey(cond_path(tdir, tid, "depth")), load(cond_path(tdir, tid, "normal")),
                load(cond_path(tdir, tid, "skeleton"))]
        h, w = tile or maps[0].shape[:2]
        maps = [np.asarray(Image.fromarray(m).resize((w, h))) for m in maps]
        cols.append(np.concatenate([np.zeros_like(maps[0])] + maps, 0) if tile else np.concatenate(maps, 0))
    if cols:
        p = os.path.join(args.out, "sheet_conditions.png")
        util.save_image(p, np.concatenate(cols, 1))
        out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/world")
    ap.add_argument("--split", default="bounding_box_train")
    ap.add_argument("--targets", required=True)
    ap.add_argument("--out", default="runs/demo/results/figures")
    ap.add_argument("--tsne-max", type=int, default=500, help="at most this many poses per set in the t-SNE")
    ap.add_argument("--conditions", default=None, help="conditions folder (e.g. runs/demo/conditions) for the sheet")
    ap.add_argument("--smpl", default=None, help="folder with <split>.npz (default <data>/smpl)")
    make_figures(ap.parse_args())


if __name__ == "__main__":
    util.run_main(main)
