"""
The demo generator's image encoder, pretrained: the counterpart of CLIP, which the paper takes
pretrained on broad data and keeps frozen. A tiny CLIPVisionModelWithProjection (models.tiny_clip)
learns from the demo's pretraining corpus (demo/corpus.py) to give one person the same embedding
in any pose, viewpoint and camera: two frames of a video are a positive pair, every other frame
of the batch a negative (NT-Xent, SimCLR's loss). Its people are disjoint from the demo world's,
as CLIP's data are from Market-1501's. 02_train_generator.py --from-scratch --image-encoder OUT
then uses it frozen, through the same code path as SD-1.5's CLIP.

  python demo/image_encoder.py --corpus runs/demo/corpus --out runs/demo/image_encoder [--steps 600]

Writes OUT/ (save_pretrained, swapped in whole when done) and OUT/encoder.json: the nearest-
neighbour check on videos held out of training (does a frame's nearest other frame show the same
person?), for the random and the trained encoder, and the time taken.
"""
import os
import sys
import time
import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
import models  # noqa: E402
from body import parse_size  # noqa: E402


def load_corpus(root, size):
    """-> uint8 frames (N, H, W, 3) and the video index of each; videos = frames/<video_id>/*.png."""
    fdir = os.path.join(root, "frames")
    if not os.path.isdir(fdir):
        raise util.UserError(f"'{root}' has no frames/ folder: make the corpus with 'python demo/corpus.py --out {root}'")
    videos = sorted(v for v in os.listdir(fdir) if os.path.isdir(os.path.join(fdir, v)))
    names = [sorted(f for f in os.listdir(os.path.join(fdir, v)) if f.lower().endswith(util.IMAGE_EXTS))
             for v in videos]
    if len(videos) < 4 or min(len(n) for n in names) < 2:  # checked before any image is read
        raise util.UserError(f"corpus '{root}' needs 4+ videos of 2+ frames each (found {len(videos)} videos, "
                               f"{sum(len(n) < 2 for n in names)} of them with fewer than 2 frames)")
    frames, video = [], []
    for k, (v, fs) in enumerate(zip(tqdm(videos, desc="reading corpus", unit="video"), names)):
        for f in fs:
            with Image.open(os.path.join(fdir, v, f)) as im:
                frames.append(np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)))
            video.append(k)
    return np.stack(frames), np.array(video)


def as_input(u8):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the range every stage passes images in."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def embed(enc, frames, bs=256):
    return torch.cat([models.clip_embed(enc, as_input(frames[i:i + bs]))[:, 0] for i in range(0, len(frames), bs)])


def nearest_same_video(emb, video):
    """Share of frames whose nearest other frame (cosine) is of the same video (= person)."""
    z = F.normalize(emb, dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    return float((video[sim.argmax(1).numpy()] == video).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="demo/corpus.py output (frames/<video_id>/<frame>.png)")
    ap.add_argument("--out", required=True, help="folder for the encoder (CLIPVisionModelWithProjection)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--people", type=int, default=32, help="people (videos) per batch, two frames each")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW, warm-up 100 steps, then cosine to 0")
    ap.add_argument("--tau", type=float, default=0.1, help="NT-Xent temperature")
    ap.add_argument("--dim", type=int, default=64, help="projection dim = the U-Nets' cross-attention dim")
    ap.add_argument("--holdout", type=float, default=0.05, help="share of the videos kept out of training (the check)")
    ap.add_argument("--size", default="64x128", help="WxH the frames are read at (02's --size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    frames, video = load_corpus(args.corpus, parse_size(args.size))
    n_vid = video.max() + 1
    rng = np.random.default_rng([args.seed, 21])
    held = rng.permutation(n_vid)[:max(2, int(round(args.holdout * n_vid)))]
    is_held = np.isin(video, held)
    train_vids = np.setdiff1d(np.arange(n_vid), held)
    if len(train_vids) < 2:
        raise util.UserError(f"corpus '{args.corpus}' has too few videos to train on ({n_vid}, {len(held)} held out)")
    P = min(args.people, len(train_vids))
    by_video = [np.flatnonzero(video == v) for v in range(n_vid)]
    print(f"read {len(frames)} frames of {n_vid} videos from '{args.corpus}'; training on {len(train_vids)}, "
          f"{len(held)} held out; batch {P} people x 2 frames")

    enc = models.tiny_clip(args.dim, args.seed + 7)  # the random encoder 02 --from-scratch would use
    before = nearest_same_video(embed(enc.eval(), frames[is_held]), video[is_held])
    opt = torch.optim.AdamW(enc.parameters(), lr=args.lr, weight_decay=0.05)
    enc.train()
    bar = tqdm(range(args.steps), desc="training encoder")
    for it in bar:
        lr = args.lr * min(1.0, (it + 1) / 100) * 0.5 * (1 + np.cos(np.pi * it / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        pick = rng.choice(train_vids, P, replace=False)
        pairs = np.array([rng.choice(by_video[v], 2, replace=False) for v in pick])
        x = as_input(frames[pairs.T.ravel()])  # [first frames; second frames]
        z = F.normalize(enc(pixel_values=models.clip_pixels(enc, x)).image_embeds, dim=1)
        logits = z @ z.T / args.tau
        logits.fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(logits, torch.cat([torch.arange(P, 2 * P), torch.arange(P)]))  # the other frame
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    enc.eval().requires_grad_(False)
    # The loss sees only directions; the U-Nets see the raw embedding as their cross-attention
    # context. Rescale the projection so that embeddings have norm sqrt(dim) (unit entries on
    # average), inside the weights, so every caller of models.clip_embed gets the same input.
    emb = embed(enc, frames[~is_held][:2048])
    scale = float(np.sqrt(args.dim) / emb.norm(dim=1).mean())
    enc.visual_projection.weight.mul_(scale)
    after = nearest_same_video(embed(enc, frames[is_held]), video[is_held])
    models.save_pretrained_atomic(enc, args.out)
    stats = dict(steps=args.steps, people_per_batch=P, tau=args.tau, lr=args.lr, dim=args.dim, seed=args.seed,
                 videos=int(n_vid), frames=len(frames), heldout_videos=len(held), heldout_nearest_same_person_random=before,
                 heldout_nearest_same_person_trained=after, chance=float(np.mean([(np.sum(video[is_held] == v) - 1)
                                                                             / (is_held.sum() - 1) for v in video[is_held]])),
                 projection_scale=scale, seconds=round(time.time() - t0, 1))
    util.save_json(os.path.join(args.out, "encoder.json"), stats)
    print(f"held-out videos: a frame's nearest other frame shows the same person {100 * after:.1f}% of the time "
          f"(random encoder {100 * before:.1f}%, chance {100 * stats['chance']:.1f}%)")
    print(f"wrote '{args.out}' (save_pretrained) and encoder.json in {stats['seconds']:.0f} s")


if __name__ == "__main__":
    util.run_main(main)
