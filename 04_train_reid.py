"""
Stage 04: train the Re-ID model on the training split, with or without the generated images.

The paper's recipe (section 4.2) is the default: torchvision ResNet50 from ImageNet weights,
the 2048-d pooled feature, batch-hard triplet loss (margin 0.5) + cross-entropy, summed (reid_loss
below); PK batches P=32 x K=8; Adam, lr 1e-5 for the backbone and 1e-4 for the classifier; 20,000
steps; 256x128 input, horizontal flip + pad/crop. Open in the paper, chosen here: weight decay
5e-4 (torchreid's), a constant learning rate, generated images pooled with the real ones. Flags
that are not the paper's sit in their own groups of --help (the CPU demo's small trunk, BNNeck,
schedule, and CamStyle-style mixing of the generated images: docs/reid.md).

  python 04_train_reid.py --data data/market1501 --out runs/market1501/reid/base
  python 04_train_reid.py --data data/market1501 --extra-train runs/market1501/augmented/vi/bounding_box_train \
      --out runs/market1501/reid/vi
  torchrun --nproc_per_node 2 04_train_reid.py ...     # DDP: P identities split over the GPUs

Writes model.pt (the weights and what builds them; 05 reads it), checkpoint.pt (rerun the same
command to resume), log.csv, args.json.
"""
import os
import sys
import time
import random
import argparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

import common
import util
import models
from util import UserError

# -----------------------------------------------------------------------------
# the paper's loss: batch-hard triplet + cross-entropy

def reid_loss(feat, logits, labels, margin, n_real=None, extra_weight=1.0, extra_smoothing=0.0, extra_triplet="all"):
    """-> (loss, triplet part, cross-entropy part). The paper: triplet on the pooled feature plus
    cross-entropy on the logits, over the whole batch. With CamStyle-style mixing (n_real: the
    batch's first n_real rows are real, the rest generated) the cross-entropy is the real rows'
    mean plus extra_weight x the generated rows' (label-smoothed) mean, and the triplet runs over
    all rows or the real ones only."""
    if n_real is None:
        l_tri, l_ce = common.triplet_loss(feat, labels, margin), F.cross_entropy(logits, labels)
        return l_tri + l_ce, l_tri, l_ce
    rows = slice(None) if extra_triplet == "all" else slice(0, n_real)
    l_tri = common.triplet_loss(feat[rows], labels[rows], margin)
    l_ce = F.cross_entropy(logits[:n_real], labels[:n_real])
    if len(labels) > n_real:
        l_ce = l_ce + extra_weight * F.cross_entropy(logits[n_real:], labels[n_real:], label_smoothing=extra_smoothing)
    return l_tri + l_ce, l_tri, l_ce


def learning_rate_factor(step, args):
    """A pure function of the step (so a resumed run needs no scheduler state): linear warm-up,
    then x gamma at each of --lr-steps (the paper: constant)."""
    factor = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    return factor * args.gamma ** sum(step >= m for m in args.lr_steps)

# -----------------------------------------------------------------------------
# PK batches: P identities x K images each, what the batch-hard triplet loss needs

class PKSampler:
    """Batches of P distinct identities x K images, with torchreid's RandomIdentitySampler
    semantics: per identity, shuffle its images (drawn with replacement up to K when it has
    fewer), cut them into chunks of K, and draw P identities that still have chunks per batch.
    One difference on purpose: identities not yet drawn this epoch are drawn first, so every
    identity appears in every epoch (torchreid can drop the last few).
    Batches are a pure function of (seed, epoch): resuming at iteration i just skips i batches.
    With world_size > 1 (DDP), each batch's P identities are split across ranks, so every rank
    sees whole identities (all K images), as the batch-hard triplet loss needs."""

    def __init__(self, labels, P, K, seed=0, rank=0, world_size=1):
        labels = np.asarray(labels)
        self.by_pid = {int(p): np.flatnonzero(labels == p) for p in np.unique(labels)}
        if len(self.by_pid) < P:
            raise util.UserError(f"a PK batch needs P={P} identities but the train split has only {len(self.by_pid)}: lower --P")
        if P % world_size:
            raise util.UserError(f"P={P} identities per batch cannot be split evenly over {world_size} processes")
        self.P, self.K, self.seed, self.rank, self.world_size = P, K, seed, rank, world_size

    def epoch(self, e):
        rng = np.random.default_rng([self.seed, e])
        chunks = {}
        for pid, idx in self.by_pid.items():
            idx = rng.choice(idx, size=self.K, replace=True) if len(idx) < self.K else rng.permutation(idx)
            chunks[pid] = [idx[i:i + self.K] for i in range(0, len(idx) - self.K + 1, self.K)]
        unused, batches = set(chunks), []
        while unused:
            avail = sorted(p for p in chunks if chunks[p])
            fresh = sorted(unused)
            if len(avail) < self.P:  # last batch of the epoch: fill it with fresh chunks of drawn ids
                others = sorted(set(self.by_pid) - unused)
                pids = fresh + list(rng.choice(others, self.P - len(fresh), replace=False))
                for p in pids:
                    if not chunks[p]:
                        chunks[p] = [rng.choice(self.by_pid[p], size=self.K, replace=len(self.by_pid[p]) < self.K)]
            elif len(fresh) >= self.P:
                pids = list(rng.choice(fresh, self.P, replace=False))
            else:
                rest = sorted(set(avail) - unused)
                pids = fresh + list(rng.choice(rest, self.P - len(fresh), replace=False))
            batches.append([int(i) for p in pids for i in chunks[p].pop(0)])
            unused -= set(pids)
        while True:  # then torchreid's rule until fewer than P identities have chunks left
            avail = sorted(p for p in chunks if chunks[p])
            if len(avail) < self.P:
                break
            pids = rng.choice(avail, self.P, replace=False)
            batches.append([int(i) for p in pids for i in chunks[p].pop(0)])
        per_rank = self.P // self.world_size * self.K
        return [b[self.rank * per_rank:(self.rank + 1) * per_rank] for b in batches]

    def iterate(self, start=0):
        """Endless stream of batches over epochs, starting at global batch number `start`."""
        e = 0
        while True:
            batches = self.epoch(e)
            if start < len(batches):
                yield from batches[start:]
                start = 0
            else:
                start -= len(batches)
            e += 1



def cap_augmented(batch, labels, is_aug, K, share, real_by_label):
    """Limit generated images to floor(share * K) of each identity's K slots and refill the
    freed slots with that identity's real images: with tens of generated images per identity
    they would otherwise fill almost every batch."""
    rng = np.random.default_rng(batch)  # a function of the batch: resuming replays it exactly
    cap, out = int(share * K), []
    for i in range(0, len(batch), K):
        group = batch[i:i + K]
        aug = [j for j in group if is_aug[j]]
        if len(aug) > cap:
            real = real_by_label[labels[group[0]]]
            fill = rng.choice(real, len(aug) - cap, replace=len(aug) - cap > len(real))
            group = [j for j in group if not is_aug[j]] + aug[:cap] + list(fill)
        out += [int(j) for j in group]
    return out


def add_extra(batch, b, labels, K, n, extra_by_label, seed):
    """CamStyle-style mixing (Zhong et al. 2018): the real PK batch unchanged, then n generated
    images of each of its identities (those that have any), drawn as a function of the batch
    number b so that resuming replays them."""
    rng = np.random.default_rng([seed, 77, b])
    extra = []
    for i in range(0, len(batch), K):
        pool = extra_by_label.get(labels[batch[i]], ())
        if len(pool):
            extra += [int(j) for j in rng.choice(pool, n, replace=len(pool) < n)]
    return batch + extra



# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Market-1501-layout folder (bounding_box_train/ ...)")
    p.add_argument("--extra-train", nargs="*", default=[], help="folders of generated images (same naming) added to train")
    p.add_argument("--extra-count", type=int, default=None,
                   help="use only this many generated images: a fixed subset, nested across counts (Table 2)")
    p.add_argument("--out", required=True, help="output folder: model.pt, checkpoint.pt, log.csv, args.json")
    p.add_argument("--no-size-check", action="store_true", help="skip the Market/Duke image-count sanity check")
    p.add_argument("--dataset", choices=["auto", "market1501", "dukemtmc"], default="auto", help="which official image "
                   "counts to check (auto: from the folder name, e.g. Market-1501-v15.09.15 or DukeMTMC-reID)")
    p.add_argument("--arch", default="resnet50", help="torchvision classifier with an fc head (the paper: resnet50)")
    p.add_argument("--backbone-weights", default="imagenet", help="imagenet (the paper) | PATH to a torchvision "
                   "state dict | none (random)")
    p.add_argument("--size", default="128x256", help="WxH of the network's input (the paper: 128x256)")
    p.add_argument("--P", type=int, default=32, help="identities per batch")
    p.add_argument("--K", type=int, default=8, help="images per identity in a batch")
    p.add_argument("--steps", type=int, default=20000, help="optimiser steps (0: save the untrained model)")
    p.add_argument("--lr", type=float, default=1e-5, help="backbone learning rate")
    p.add_argument("--lr-classifier", type=float, default=1e-4)
    p.add_argument("--margin", type=float, default=0.5, help="triplet margin")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="the paper does not say; torchreid's default")
    p.add_argument("--seed", type=int, default=0)
    n = p.add_argument_group("not in the paper: the network and schedule (the CPU demo's)")
    n.add_argument("--width-mult", type=float, default=1.0, help="ResNet channel widths x this (random weights only)")
    n.add_argument("--bnneck", action="store_true", help="BatchNorm1d between feature and classifier (Bag of "
                   "Tricks): needed from random weights, where the batch-hard triplet collapses every feature")
    n.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    n.add_argument("--lr-steps", type=int, nargs="*", default=[], help="steps where the learning rates drop by --gamma")
    n.add_argument("--gamma", type=float, default=0.1)
    m = p.add_argument_group("not in the paper: how generated images join the batches (default: pooled, as the paper)")
    m.add_argument("--max-aug-share", type=float, default=1.0,
                   help="cap on the share of generated images in each identity's K slots")
    m.add_argument("--extra-per-id", type=int, default=0, help="CamStyle-style mixing instead of pooling: PK batches "
                   "of real images only (as without augmentation), plus this many generated images of each identity")
    m.add_argument("--extra-label-smoothing", type=float, default=0.0,
                   help="with --extra-per-id: label smoothing of the generated images' cross-entropy (CamStyle)")
    m.add_argument("--extra-weight", type=float, default=1.0,
                   help="with --extra-per-id: weight of the generated images' mean cross-entropy (CamStyle: 1)")
    m.add_argument("--extra-triplet", choices=["all", "real"], default="all",
                   help="with --extra-per-id: the triplet loss over real + generated images, or real only")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs)")
    r.add_argument("--workers", type=int, default=2, help="data loader processes")
    r.add_argument("--preload", action="store_true", help="decode + resize the train images once, into memory "
                   "(small data sets on a CPU; use --workers 0)")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    r.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    r.add_argument("--log-every", type=int, default=10)
    util.old_flag(p, "--data-root", "--data")
    util.old_flag(p, "--iters", "--steps", type=int)
    util.old_flag(p, "--ckpt-every", "--save-every", type=int)
    p.add_argument("--height", type=int, help=argparse.SUPPRESS)  # old spellings of --size
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.height is not None or args.width is not None:
        h, w = util.parse_size(args.size)
        args.size = f"{args.width or w}x{args.height or h}"
        print(f"note: --height/--width are now --size WxH ({args.size}; the old spelling goes in the next release)",
              file=sys.stderr)
    del args.height, args.width
    args.size = util.parse_size(args.size)
    for name in ("P", "K", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("steps", "warmup", "workers", "threads", "margin", "weight_decay", "extra_per_id", "extra_weight"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if args.extra_count is not None and args.extra_count < 0:
        raise UserError(f"--extra-count {args.extra_count}: must be 0 or more")
    if not (args.lr > 0 and args.lr_classifier > 0 and args.gamma > 0 and args.width_mult > 0):
        raise UserError("--lr, --lr-classifier, --gamma and --width-mult must be > 0")
    if not (0 <= args.max_aug_share <= 1 and 0 <= args.extra_label_smoothing < 1):
        raise UserError("--max-aug-share must be in [0, 1] and --extra-label-smoothing in [0, 1)")
    util.check_output_dir(args.out)
    return args


def batch_stream(sampler, start, real, labels, is_aug, args):
    """PK batches from step `start` on, as lists of train indices: the PK stream resumes at the
    global batch number; generated images join by CamStyle mixing, by a cap, or pooled."""
    stream = ([int(real[j]) for j in b] for b in sampler.iterate(start))
    if args.extra_per_id > 0 and is_aug.any():
        extra_by_label = {lab: np.flatnonzero(is_aug & (labels == lab)) for lab in np.unique(labels)}
        return (add_extra(b, i, labels, args.K, args.extra_per_id, extra_by_label, args.seed)
                for i, b in enumerate(stream, start))
    if args.max_aug_share < 1.0:
        real_by_label = {lab: np.flatnonzero((labels == lab) & ~is_aug) for lab in np.unique(labels)}
        return (cap_augmented(b, labels, is_aug, args.K, args.max_aug_share, real_by_label) for b in stream)
    return stream


# settings a rerun may change without changing the result (the rest must match the checkpoint's)
FREE_TO_CHANGE = ("steps", "save_every", "log_every", "workers", "device", "threads", "preload", "out", "data",
                  "extra_train", "no_size_check", "dataset")
CHECKPOINT_KEYS = ("model", "optimizer", "step", "num_classes", "rank_rngs")  # what save_checkpoint writes


def resume(ck, path, model, optimizer, num_classes, rank):
    """ck: the checkpoint read from path (util.load_checkpoint), or None. -> (the step it reached,
    this rank's RNG state to restore), (0, None) without one; weights and optimiser restored."""
    if ck is None:
        return 0, None
    if ck["num_classes"] != num_classes:
        raise UserError(f"checkpoint '{path}' was trained on {ck['num_classes']} identities, the data has "
                        f"{num_classes}: use another --out or delete the checkpoint")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    print(f"resumed from {path} at step {ck['step']}")
    return ck["step"], ck["rank_rngs"][rank] if rank < len(ck["rank_rngs"]) else ck["rng"]


def save_checkpoint(path, step, model, optimizer, num_classes, args, world):
    """Every rank calls it (each sends its RNG state); rank 0 writes."""
    rngs = [util.rng_state()]
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, util.rng_state())
    if int(os.environ.get("RANK", 0)) == 0:
        util.save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                             num_classes=num_classes, args=vars(args), rank_rngs=rngs)


def load_data(args, rank, world):
    """-> (train items, labels, is_aug mask, the PK sampler, the image data set, mixing?)."""
    data = util.load_reid_dataset(args.data, extra_train=args.extra_train, extra_count=args.extra_count,
                                  check_sizes=not args.no_size_check, name=None if args.dataset == "auto" else args.dataset)
    train, n_bad = models.check_images(data["train"], "train images")
    labels = np.array([lab for _, lab, _ in train])
    is_aug = np.array([path in data["extra"] for path, _, _ in train])  # from --extra-train, whatever the name
    if rank == 0:
        print(f"read {args.data}: {len(train)} train images ({is_aug.sum()} generated) of "
              f"{data['num_classes']} identities" + (f"; skipped {n_bad} unreadable" if n_bad else ""))
    mixing = args.extra_per_id > 0 and is_aug.any()
    real = np.flatnonzero(~is_aug) if mixing else np.arange(len(train))  # what the PK sampler draws from
    sampler = PKSampler(labels[real], args.P, args.K, seed=args.seed, rank=rank, world_size=world)
    augment = [T.RandomHorizontalFlip(), T.Pad(10), T.RandomCrop(args.size)]
    normalize = T.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD)
    # preloaded images are uint8 tensors already at the input size: the same augmentation on them
    transform = T.Compose(augment + [T.ConvertImageDtype(torch.float), normalize] if args.preload else
                          [T.Resize(args.size)] + augment + [T.ToTensor(), normalize])
    dataset = models.ImageDataset(train, transform, preload=args.size if args.preload else None)
    dataset.unreadable = n_bad  # (args.json records it)
    return data["num_classes"], labels, is_aug, real, sampler, dataset, mixing


def main():
    args = parse_args()
    rank, world, device = util.setup_ddp(args.device)  # DDP: the identities of each PK batch split over ranks
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    ckpt_path, log_path, out = (os.path.join(args.out, f) for f in ("checkpoint.pt", "log.csv", "model.pt"))
    # a rerun with other settings stops here, before the data are read
    ck = util.load_checkpoint(ckpt_path, args, keep=FREE_TO_CHANGE, restore_rng=False, need=CHECKPOINT_KEYS,
                              writer="04_train_reid.py") if os.path.exists(ckpt_path) else None
    num_classes, labels, is_aug, real, sampler, dataset, mixing = load_data(args, rank, world)

    # model, optimiser, resume
    model = models.build_reid_model(args.arch, num_classes, args.backbone_weights, args.bnneck,
                                    args.width_mult).to(device, memory_format=torch.channels_last)
    base_lrs = [args.lr, args.lr_classifier]
    optimizer = torch.optim.Adam([
        dict(params=model.backbone.parameters(), lr=base_lrs[0]),
        dict(params=[q for q in [*model.neck.parameters(), *model.classifier.parameters()] if q.requires_grad],
             lr=base_lrs[1]),
    ], weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))  # one kernel for all tensors
    start, rng = resume(ck, ckpt_path, model, optimizer, num_classes, rank)
    del ck  # (its tensors are in the model and optimiser now)
    if start >= args.steps and os.path.exists(out):
        print(f"{args.out} is already trained to step {start}; nothing to do")
        return
    if master:
        unreadable = dict(unreadable_images=dataset.unreadable) if dataset.unreadable else {}  # (skipped, as 02, 05 do)
        util.save_json(os.path.join(args.out, "args.json"), dict(vars(args), size=f"{args.size[1]}x{args.size[0]}", **unreadable))
        log = util.CsvLog(log_path, ["step", "loss", "triplet", "ce", "acc", "lr", "sec_per_step"], start)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_stream(sampler, start, real, labels, is_aug, args),
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    batches = iter(loader) if start < args.steps else iter(())  # (--steps 0: save the untrained model)
    if rng is not None:  # after the loader drew its seed, as the uninterrupted run's loader had
        util.set_rng_state(rng)
    n_real = args.P // world * args.K if mixing else None  # with mixing: the batch's rows that are real images

    # the loop
    model.train()
    t0 = time.time()
    bar = tqdm(total=args.steps, initial=start, desc="train re-id", disable=not master, mininterval=1.0)
    step = start
    for x, y, _ in batches:
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * learning_rate_factor(step, args)
        # channels-last (NHWC) images and weights: the faster convolutions of oneDNN and cuDNN, the same function
        x, y = x.to(device, non_blocking=True, memory_format=torch.channels_last), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            feat, logits = ddp_model(x)
        loss, l_tri, l_ce = reid_loss(feat.float(), logits.float(), y, args.margin, n_real, args.extra_weight,
                                      args.extra_label_smoothing, args.extra_triplet)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if master and (step % args.log_every == 0 or step == args.steps):
            acc = (logits.argmax(1) == y).float().mean().item()
            log.add(step, f"{loss.item():.5f}", f"{l_tri.item():.5f}", f"{l_ce.item():.5f}", f"{acc:.4f}",
                    f"{optimizer.param_groups[0]['lr']:.3g}", f"{(time.time() - t0) / (step - start):.4f}")
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(ckpt_path, step, model, optimizer, num_classes, args, world)
        if step >= args.steps:
            break
    bar.close()
    if master:
        state = dict(state_dict=model.state_dict(), arch=args.arch, num_classes=num_classes, bnneck=args.bnneck,
                     width_mult=args.width_mult, height=args.size[0], width=args.size[1], iterations=step)
        util.atomic_write(out, lambda tmp: torch.save(state, tmp))
        print(f"wrote {out} ({step} steps, {time.time() - t0:.0f} s), {log_path}, {ckpt_path}")
    if world > 1:
        models.check_ranks_agree(model, world, master)


if __name__ == "__main__":
    util.run_main(main)
