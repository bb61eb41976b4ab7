"""
Stage 04: train the Re-ID model on the (optionally augmented) training split.

Paper recipe (section 4.2) as the defaults: torchvision ResNet50, 2048-d pooled feature,
batch-hard triplet loss (margin 0.5) + cross-entropy, summed; PK batches P=32 x K=8; Adam with
lr 1e-5 for the backbone and 1e-4 for the classifier; 20,000 iterations; 256x128 input with
horizontal flip + pad/crop. Rerunning the same command resumes from <out>/checkpoint.pt.

  python 04_train_reid.py --data-root data/market1501 --out runs/market1501/reid/base
  python 04_train_reid.py --data-root runs/demo/world --extra-train runs/demo/augmented/vi/bounding_box_train \\
      --arch resnet18 --width-mult 0.25 --bnneck --lr 1e-3 --lr-classifier 1e-3 --height 64 --width 32 --P 16 --K 4 \\
      --iters 2400 --lr-steps 1800 --extra-per-id 1 --extra-label-smoothing 0.1 --extra-weight 0.25 --preload \\
      --workers 0 --out runs/demo/reid/vi_s0      # the CPU demo: from scratch, BNNeck, CamStyle mixing (docs/reid.md)
  torchrun --nproc_per_node 2 04_train_reid.py ...     # DDP: P identities split over the GPUs
"""
import os
import csv
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

# -----------------------------------------------------------------------------
# arguments

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data-root", required=True, help="Market-1501-layout folder (bounding_box_train/ ...)")
p.add_argument("--extra-train", nargs="*", default=[], help="folders of generated images (same naming) merged into train")
p.add_argument("--extra-count", type=int, default=None,
               help="use only this many generated images: a fixed subset, nested across counts (Table 2)")
p.add_argument("--out", required=True, help="output folder: model.pt, checkpoint.pt, log.csv, args.json")
p.add_argument("--no-size-check", action="store_true", help="skip the Market/Duke image-count sanity check")
p.add_argument("--dataset", choices=["auto", "market1501", "dukemtmc"], default="auto", help="which official image "
               "counts to check (auto: from the folder name, e.g. Market-1501-v15.09.15 or DukeMTMC-reID)")
p.add_argument("--arch", default="resnet50", help="torchvision ResNet (resnet18 for CPU demo runs)")
p.add_argument("--width-mult", type=float, default=1.0, help="ResNet channel widths x this (from scratch only)")
p.add_argument("--backbone-weights", default="none", help="PATH to a torchvision state dict | imagenet | none")
p.add_argument("--height", type=int, default=256)
p.add_argument("--width", type=int, default=128)
p.add_argument("--P", type=int, default=32, help="identities per batch")
p.add_argument("--K", type=int, default=8, help="images per identity in a batch")
p.add_argument("--iters", type=int, default=20000)
p.add_argument("--lr", type=float, default=1e-5, help="backbone learning rate")
p.add_argument("--lr-classifier", type=float, default=1e-4)
p.add_argument("--warmup", type=int, default=0, help="iterations of linear learning-rate warm-up")
p.add_argument("--lr-steps", type=int, nargs="*", default=[], help="iterations where the learning rates drop by --gamma")
p.add_argument("--gamma", type=float, default=0.1)
p.add_argument("--weight-decay", type=float, default=5e-4, help="the paper does not say; torchreid's default")
p.add_argument("--margin", type=float, default=0.5, help="triplet margin")
p.add_argument("--max-aug-share", type=float, default=1.0,
               help="cap on the share of generated images (--extra-train) in each identity's K slots")
p.add_argument("--extra-per-id", type=int, default=0, help="CamStyle-style mixing instead of pooling: PK batches "
               "of real images only (as without augmentation), plus this many generated images of each identity")
p.add_argument("--extra-label-smoothing", type=float, default=0.0,
               help="with --extra-per-id: label smoothing of the generated images' cross-entropy (CamStyle)")
p.add_argument("--extra-weight", type=float, default=1.0,
               help="with --extra-per-id: weight of the generated images' mean cross-entropy beside the real images' "
               "(CamStyle: 1)")
p.add_argument("--extra-triplet", choices=["all", "real"], default="all",
               help="with --extra-per-id: the triplet loss over real + generated images, or real only")
p.add_argument("--workers", type=int, default=2)
p.add_argument("--preload", action="store_true", help="decode + resize the train images once, into memory "
               "(small data sets on a CPU; use --workers 0)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--amp", action="store_true", help="bf16 autocast")
p.add_argument("--ckpt-every", type=int, default=500, help="iterations between checkpoints")
p.add_argument("--log-every", type=int, default=10)
p.add_argument("--bnneck", action="store_true", help="BatchNorm1d between feature and classifier (Bag of "
               "Tricks; not in the paper): needed to train from scratch, where the batch-hard triplet collapses")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


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


def main():
    args = p.parse_args()
    # DDP under torchrun: one process per GPU; identities of each PK batch split over ranks
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    # -------------------------------------------------------------------------
    # data
    data = util.load_reid_dataset(args.data_root, extra_train=args.extra_train, extra_count=args.extra_count,
                                    check_sizes=not args.no_size_check,
                                    name=None if args.dataset == "auto" else args.dataset)
    train, n_bad = models.check_images(data["train"], "train images")
    labels = np.array([lab for _, lab, _ in train])
    is_aug = np.array([path in data["extra"] for path, _, _ in train])  # from --extra-train, whatever the name
    if master:
        print(f"read {args.data_root}: {len(train)} train images ({is_aug.sum()} generated) of "
              f"{data['num_classes']} identities" + (f"; skipped {n_bad} unreadable" if n_bad else ""))
    mixing = args.extra_per_id > 0 and is_aug.any()
    real = np.flatnonzero(~is_aug) if mixing else np.arange(len(train))  # what the PK sampler draws from
    sampler = PKSampler(labels[real], args.P, args.K, seed=args.seed, rank=rank, world_size=world)
    size = (args.height, args.width)
    augment = [T.RandomHorizontalFlip(), T.Pad(10), T.RandomCrop(size)]
    normalize = T.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD)
    # preloaded images are uint8 tensors already at the input size: the same augmentation on them
    transform = T.Compose(augment + [T.ConvertImageDtype(torch.float), normalize] if args.preload else
                          [T.Resize(size)] + augment + [T.ToTensor(), normalize])
    dataset = models.ImageDataset(train, transform, preload=size if args.preload else None)

    # -------------------------------------------------------------------------
    # model, optimizer, resume
    model = models.build_reid_model(args.arch, data["num_classes"], args.backbone_weights, args.bnneck,
                                    args.width_mult).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([
        dict(params=model.backbone.parameters(), lr=args.lr),
        dict(params=[q for q in [*model.neck.parameters(), *model.classifier.parameters()] if q.requires_grad],
             lr=args.lr_classifier),
    ], weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))  # one kernel for all tensors
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.csv")
    start = 0
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["num_classes"] != data["num_classes"]:
            raise util.UserError(f"checkpoint '{ckpt_path}' was trained on {ckpt['num_classes']} identities, the data "
                                   f"has {data['num_classes']}: use another --out or delete the checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["iteration"]
        torch.set_rng_state(ckpt["rng_torch"])
        np.random.set_state(ckpt["rng_numpy"])
        random.setstate(ckpt["rng_python"])
        if master:
            print(f"resumed from {ckpt_path} at iteration {start}")
    if start >= args.iters and os.path.exists(os.path.join(args.out, "model.pt")):
        if master:
            print(f"{args.out} is already trained to iteration {start}; nothing to do")
        return
    if master:
        util.save_json(os.path.join(args.out, "args.json"), vars(args))
        # keep the log consistent with the checkpoint: drop rows written after it
        rows = []
        if start and os.path.exists(log_path):
            with open(log_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start]
        fields = ["iteration", "loss", "triplet", "ce", "acc", "lr", "sec_per_iter"]
        util.save_text(log_path, ",".join(fields) + "\n" + "".join(",".join(r[k] for k in fields) + "\n" for r in rows))
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def save_checkpoint(it):
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), iteration=it,
                     num_classes=data["num_classes"], rng_torch=torch.get_rng_state(),
                     rng_numpy=np.random.get_state(), rng_python=random.getstate(), args=vars(args))
        util.atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

    # -------------------------------------------------------------------------
    # training loop: iteration-based, the PK stream resumes at the global batch number
    batches = ([int(real[j]) for j in b] for b in sampler.iterate(start))
    n_real = args.P // world * args.K  # rows of a batch that are real images when mixing
    if mixing:
        extra_by_label = {lab: np.flatnonzero(is_aug & (labels == lab)) for lab in np.unique(labels)}
        batches = (add_extra(b, i, labels, args.K, args.extra_per_id, extra_by_label, args.seed)
                   for i, b in enumerate(batches, start))
    elif args.max_aug_share < 1.0:
        real_by_label = {lab: np.flatnonzero((labels == lab) & ~is_aug) for lab in np.unique(labels)}
        batches = (cap_augmented(b, labels, is_aug, args.K, args.max_aug_share, real_by_label) for b in batches)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    model.train()
    log = open(log_path, "a") if master else None
    t0 = time.time()
    bar = tqdm(total=args.iters, initial=start, desc="train re-id", disable=not master, mininterval=1.0)
    it = start
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    for x, y, _ in (loader if it < args.iters else []):  # --iters 0 saves the untrained model
        # iteration-based schedule, a pure function of the iteration (so resuming needs no state):
        # linear warm-up, then a drop by gamma at each of --lr-steps (paper: constant)
        factor = min(1.0, (it + 1) / args.warmup) if args.warmup else 1.0
        factor *= args.gamma ** sum(it >= m for m in args.lr_steps)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * factor
        # channels-last (NHWC) images and weights: oneDNN's and cuDNN's faster convolutions (the same
        # function; tools/bench_memory_format.py times both layouts)
        x, y = x.to(device, non_blocking=True, memory_format=torch.channels_last), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            feat, logits = ddp_model(x)
        feat, logits = feat.float(), logits.float()
        if mixing:  # cross-entropy: mean over real + weight x mean over generated (smoothed) images
            tri = slice(None) if args.extra_triplet == "all" else slice(0, n_real)
            l_tri = common.triplet_loss(feat[tri], y[tri], args.margin)
            l_ce = F.cross_entropy(logits[:n_real], y[:n_real])
            if len(y) > n_real:
                l_ce = l_ce + args.extra_weight * F.cross_entropy(logits[n_real:], y[n_real:],
                                                                  label_smoothing=args.extra_label_smoothing)
        else:
            l_tri = common.triplet_loss(feat, y, args.margin)
            l_ce = F.cross_entropy(logits, y)
        loss = l_tri + l_ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        it += 1
        bar.update(1)
        if master and (it % args.log_every == 0 or it == args.iters):
            acc = (logits.argmax(1) == y).float().mean().item()
            dt = (time.time() - t0) / (it - start)
            log.write(f"{it},{loss.item():.5f},{l_tri.item():.5f},{l_ce.item():.5f},{acc:.4f},{optimizer.param_groups[0]['lr']:.3g},{dt:.4f}\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if master and (it % args.ckpt_every == 0 or it == args.iters):
            save_checkpoint(it)
        if it >= args.iters:
            break
    bar.close()
    if master:
        log.close()
        out = os.path.join(args.out, "model.pt")
        state = dict(state_dict=model.state_dict(), arch=args.arch, num_classes=data["num_classes"], bnneck=args.bnneck,
                     width_mult=args.width_mult, height=args.height, width=args.width, iterations=it)
        util.atomic_write(out, lambda tmp: torch.save(state, tmp))
        print(f"wrote {out} ({it} iterations, {time.time() - t0:.0f} s), {log_path}, {ckpt_path}")
    if world > 1:
        diff = models.ranks_weight_difference(model)
        if master:
            print(f"{world} ranks hold identical weights" if diff == 0 else f"ranks differ by {diff:.3g}")
        if diff:
            raise RuntimeError(f"the {world} DDP ranks ended with different weights (max difference {diff:.3g})")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    util.run_main(main)
