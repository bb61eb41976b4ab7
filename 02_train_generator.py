"""
Stage 02: train the Diff-ID generator (paper 3.4 + 4.1): a reference U-Net and a denoising U-Net
of one config, plus one pose guider per condition map (depth, normal, skeleton); the VAE and the
CLIP image encoder stay frozen. The loss is the paper's eq. 1 (diffusion_loss below). Stage 1:
pairs are two frames of one video far apart (<data>/<video_id>/<frame>); stage 2: two images of
one person id in a Market-1501-layout root.

  python 02_train_generator.py --stage 1 --data VIDEOS --conditions COND1 --out runs/x/generator_stage1 \
      --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 --image-encoder lambdalabs/sd-image-variations-diffusers \
      --size 768x768 --batch-size 2
  python 02_train_generator.py --data DATA --conditions COND --out runs/x/generator --init runs/x/generator_stage1
  torchrun --nproc_per_node N 02_train_generator.py ...      # DDP

--init takes a generator folder (this script's, or demo/scratch_generator.py's random tiny one).
Writes into --out: reference_unet/, denoising_unet/, guiders.safetensors, scheduler/ (03 samples
with it), vae/ + image_encoder/ when --init brought its own, args.json, checkpoint.pt (rerun the
same command to resume), log.csv, samples/step_*.png (reference | maps | generated | target).

Paper / open / chosen: eq. 1's epsilon MSE, AdamW lr 1e-5, weight decay 0.01 (paper); condition
dropout 0.1 drops the reference and the CLIP embedding together, gradient clipping 1.0 (open;
AnimateAnyone's, diffusers' defaults); --min-snr-gamma and --ema are not in the paper (the demo
uses both: docs/generator.md).
"""
import os
import time
import argparse
import contextlib
import importlib.util

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import body
import common
import util
import models
from util import UserError

# -----------------------------------------------------------------------------
# the paper's loss (eq. 1), with the null condition of classifier-free guidance

def diffusion_loss(model, noise_sched, z, ref_lat, ref_emb, conds, generator, drop_prob, min_snr_gamma=0.0):
    """Noise the target latents z at a random timestep, predict the noise from the pose maps and
    the reference (its latents through the reference U-Net, its CLIP embedding as cross-attention
    context), and return the MSE to the true noise (or v). With probability drop_prob a sample
    gets the null condition (no reference, zero embedding), the unconditional branch that
    sampling's guidance uses. Every random draw comes from `generator`: a resumed run redraws
    exactly what the uninterrupted one drew."""
    B, device = z.shape[0], z.device
    noise = torch.randn(z.shape, generator=generator).to(device)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (B,), generator=generator).to(device)
    drop = (torch.rand(B, generator=generator) < drop_prob).to(device)
    emb, index = common.null_condition(ref_emb, torch.arange(B, device=device), drop)
    noisy = noise_sched.add_noise(z, noise, t)
    target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(z, noise, t)
    pred = model(noisy, t, emb, conds, ref_lat, ref_emb, index).float()
    if not min_snr_gamma:
        return F.mse_loss(pred, target)
    per_sample = F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))
    return (per_sample * min_snr_weights(noise_sched, t, min_snr_gamma)).mean()


def min_snr_weights(noise_sched, t, gamma):
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023): the many low-noise timesteps,
    which an epsilon loss weights heavily though they teach little, count as much as a timestep
    of SNR gamma."""
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_sched, t)
    return snr.clamp(max=gamma) / (snr if noise_sched.config.prediction_type == "epsilon" else snr + 1)

# -----------------------------------------------------------------------------
# training pairs

def list_pairs_stage2(data, conditions):
    """-> items [(image path, condition folder, stem)], groups [[item indices of one pid]]."""
    cond_dir = os.path.join(conditions, util.SPLIT_DIRS["train"])
    train = util.list_split(os.path.join(data, util.SPLIT_DIRS["train"]))
    items, by_pid = [], {}
    for path, pid, _ in train:
        by_pid.setdefault(pid, []).append(len(items))
        items.append((path, cond_dir, os.path.splitext(os.path.basename(path))[0]))
    return items, [g for g in by_pid.values() if len(g) >= 2]


def list_pairs_stage1(data, conditions):
    """Generic video layout: <data>/<video_id>/<frame image>, frames in sorted name order."""
    if not os.path.isdir(data):
        raise UserError(f"video folder '{data}' does not exist")
    items, groups = [], []
    for vid in sorted(os.listdir(data)):
        d = os.path.join(data, vid)
        if not os.path.isdir(d):
            continue
        frames = sorted(f for f in os.listdir(d) if f.lower().endswith(util.IMAGE_EXTS))
        g = []
        for f in frames:
            g.append(len(items))
            items.append((os.path.join(d, f), os.path.join(conditions, vid), os.path.splitext(f)[0]))
        if len(g) >= 2:
            groups.append(g)
    return items, groups


class PairData(torch.utils.data.Dataset):
    """Sample k of the run -> (target, reference, target's maps). Everything random is drawn from
    rng(seed, k), so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, items, groups, size, seed, stage, min_gap):
        self.items, self.groups, self.size, self.seed, self.stage, self.min_gap = items, groups, size, seed, stage, min_gap
        self.members = [i for g in groups for i in g]  # targets: images that have a partner
        self.group_of = {i: gi for gi, g in enumerate(groups) for i in g}
        self._perm = (None, None)
        self.return_indices = False  # --cache-encodings: the loop looks the images' encodings up by index
        self.maps = None  # --cache-encodings: {kind: uint8 (N, C, H, W)}, every item's maps decoded once

    def __len__(self):
        return 2 ** 62  # indexed by a running sample counter, see batches()

    def pair(self, k):
        epoch, pos = divmod(k, len(self.members))
        if self._perm[0] != epoch:  # one shuffle per epoch over all targets
            self._perm = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.members)))
        tgt = self.members[self._perm[1][pos]]
        g = self.groups[self.group_of[tgt]]
        if self.stage == 1:  # frames far apart: at least min_gap (default a quarter of the video)
            gap = self.min_gap if self.min_gap >= 0 else len(g) // 4
            j = g.index(tgt)
            cands = [g[i] for i in range(len(g)) if abs(i - j) >= max(gap, 1)]
            cands = cands or [g[0] if j >= len(g) // 2 else g[-1]]
        else:
            cands = [i for i in g if i != tgt]
        ref = cands[np.random.default_rng([self.seed, 2, k]).integers(len(cands))]
        return tgt, ref

    def __getitem__(self, k):
        tgt, ref = self.pair(k)
        (tgt_path, cond_dir, stem), (ref_path, _, _) = self.items[tgt], self.items[ref]
        if self.maps is not None:  # (the PNGs hold 8 bits: the same floats as load_conditions gives)
            conds = {kind: v[tgt].float() / 255 for kind, v in self.maps.items()}
        else:
            conds = body.load_conditions(cond_dir, stem, self.size)
        if self.return_indices:
            return tgt, ref, conds
        return models.load_image_tensor(tgt_path, self.size), models.load_image_tensor(ref_path, self.size), conds

    def cache_maps(self):
        """--cache-encodings: every target's maps decoded once, into memory (8-bit, as the PNGs hold
        them), and items returned as indices (the loop looks their encodings up)."""
        self.maps = {k: torch.zeros(len(self.items), common.COND_CHANNELS[k], *self.size, dtype=torch.uint8)
                     for k in common.COND_KINDS}
        for i in tqdm(sorted(set(self.members)), desc="maps", mininterval=1.0):
            for kind, v in body.load_conditions(*self.items[i][1:], self.size).items():
                self.maps[kind][i] = (v * 255).round().to(torch.uint8)
        self.return_indices = True



def batches(start_micro, batch_size, rank, world):
    """Infinite batch sampler: micro-step m of process r gets samples ((m*world + r)*B ...)."""
    m = start_micro
    while True:
        base = (m * world + rank) * batch_size
        yield list(range(base, base + batch_size))
        m += 1


# -----------------------------------------------------------------------------
# the networks: SD-1.5 + CLIP (--pretrained), or a generator folder (--init, or this --out on resume)

def load_models(args):
    """-> (Generator, vae, image_encoder, noise-schedule config, sources dict, carries_frozen_parts):
    the last is True when the VAE and image encoder are the folder's own (they travel with it)."""
    resume = os.path.isfile(os.path.join(args.out, "checkpoint.pt"))
    if resume and os.path.isfile(os.path.join(args.out, "args.json")):
        prev = util.load_json(os.path.join(args.out, "args.json"))
        start = lambda a: "--init" if a.get("init") else "--pretrained" if a.get("pretrained") else "another start"
        if start(prev) != start(vars(args)):
            raise UserError(f"'{args.out}' holds a run started with {start(prev)}, this command asks for "
                            f"{start(vars(args))}: rerun that run's command to resume it, or pass a new --out")
    if resume or args.init:  # the architecture (and, for --init, the weights) of a generator folder
        gen, vae, enc, schedule, prev = models.load_generator(args.out if resume else args.init)
        sources = {k: prev.get(k) for k in ("pretrained", "image_encoder", "image_encoder_subfolder")}
        print(f"model from '{args.out if resume else args.init}' ({'resume' if resume else 'init'})")
        return gen, vae, enc, schedule, sources, not prev.get("pretrained")
    gen, vae, enc, schedule, sources = models.generator_from_pretrained(
        args.pretrained, args.image_encoder, args.image_encoder_subfolder, args.random_unets, args.seed)
    return gen, vae, enc, schedule, sources, False


# -----------------------------------------------------------------------------
# around the loop: optimiser, EMA, checkpoints, the log

def make_optimizer(params, args, device):
    if args.optimizer == "adamw8bit":  # bitsandbytes: 2 bytes of state per parameter instead of 8
        import bitsandbytes
        return bitsandbytes.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay)
    # fused: one kernel for all of the U-Nets' tensors instead of a loop over them
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))


# settings a rerun may change without changing the result (the rest must match the checkpoint's)
FREE_TO_CHANGE = ("steps", "save_every", "sample_every", "log_every", "workers", "device", "threads", "num_val",
                  "ddim_steps", "guidance", "cache_encodings", "gradient_checkpointing", "data", "conditions", "out",
                  "pretrained", "image_encoder", "image_encoder_subfolder", "init")


def resume(ckpt_path, args, gen, opt, ema):
    """-> the step the checkpoint reached (0 without one); weights, optimiser, EMA and RNGs restored."""
    if not os.path.isfile(ckpt_path):
        return 0
    ck = util.load_checkpoint(ckpt_path, args, keep=FREE_TO_CHANGE, need=("model", "opt", "step"),
                              writer="02_train_generator.py")
    gen.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    if ema is not None:
        if "ema" not in ck:
            raise UserError(f"'{ckpt_path}' was trained without --ema: resume without it, or use a new --out")
        ema.load_state_dict(ck["ema"])
    print(f"resumed from '{ckpt_path}' at step {ck['step']}")
    return ck["step"]


def save(out, step, gen, opt, ema, args):
    with models.ema_weights(gen, ema):
        models.save_generator(out, gen)
    extra = dict(ema=ema.state_dict()) if ema is not None else {}
    # written last: a checkpoint marks a complete save
    util.save_checkpoint(os.path.join(out, "checkpoint.pt"), model=gen.state_dict(), opt=opt.state_dict(), step=step,
                         args=vars(args), **extra)


def validation_batch(data, args):
    """The fixed pairs of the validation grid (the first rows of a fixed shuffle)."""
    keys = np.random.default_rng([args.seed, 4]).integers(0, 2 ** 40, size=args.num_val)
    pairs = [data[int(k)] for k in keys]
    return (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
            {k: torch.stack([p[2][k] for p in pairs]) for k in common.COND_KINDS})

# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="stage 2: Market-1501-layout root (uses bounding_box_train/); "
                   "stage 1: folder of <video_id>/<frame> images")
    p.add_argument("--conditions", required=True, help="stage 2: conditions root holding bounding_box_train/"
                   "<stem>.{depth,normal,skeleton}.png; stage 1: <video_id>/<frame>.*.png")
    p.add_argument("--out", required=True, help="generator folder to write (and resume from)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--skip-missing-conditions", action="store_true", help="train without images that have no "
                   "condition maps (real photos whose SMPL fit 01b skipped) instead of stopping")
    p.add_argument("--min-frame-gap", type=int, default=-1, help="stage 1: min frame distance of a pair "
                   "(-1: a quarter of the video)")
    w = p.add_argument_group("weights (one of --pretrained, --init)")
    w.add_argument("--pretrained", help="SD-1.5 hub id or local diffusers folder (unet/, vae/, [scheduler/])")
    w.add_argument("--image-encoder", help="with --pretrained: CLIPVisionModelWithProjection hub id or folder")
    w.add_argument("--image-encoder-subfolder", default=None, help="subfolder of --image-encoder (default: "
                   "image_encoder/ when the encoder is there, as in lambdalabs/sd-image-variations-diffusers)")
    w.add_argument("--init", help="start from a generator folder: this script's (stage 1 -> stage 2) or "
                   "demo/scratch_generator.py's")
    w.add_argument("--random-unets", action="store_true", help="with --pretrained: its U-Net's architecture with "
                   "random weights (the VAE and CLIP stay pretrained): Table 1's row (V)")
    t = p.add_argument_group("training")
    t.add_argument("--size", default="192x384", help="WxH of images and maps (paper: 192x384; stage 1 768x768)")
    t.add_argument("--steps", type=int, default=30000, help="optimiser steps in total (a rerun resumes)")
    t.add_argument("--batch-size", type=int, default=4, help="per process and micro-step")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    t.add_argument("--lr", type=float, default=1e-5, help="the paper's")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--drop-prob", type=float, default=0.1, help="null condition (reference + CLIP dropped together)")
    t.add_argument("--min-snr-gamma", type=float, default=0.0, help="not in the paper: weight each sample's loss by "
                   "min(SNR, gamma) / SNR (Hang et al. 2023); 0: the plain MSE of eq. 1")
    t.add_argument("--ema", type=float, default=0.0, help="not in the paper: export an exponential moving average of "
                   "the weights with this decay (e.g. 0.999) instead of the last weights; 0: off")
    t.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward: "
                   "less memory, more time")
    t.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw", help="adamw8bit: bitsandbytes' "
                   "8-bit AdamW, a quarter of the optimiser memory (CUDA)")
    t.add_argument("--cache-encodings", action="store_true", help="encode every training image once with the "
                   "frozen VAE and CLIP, and decode the targets' maps once, into memory (the same training, faster; "
                   "memory grows with the data: for Re-ID sets, not for a large stage-1 corpus)")
    t.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    r.add_argument("--workers", type=int, default=0, help="data loader processes")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--save-every", type=int, default=500, help="checkpoint + export every N steps (and at the end)")
    r.add_argument("--sample-every", type=int, default=500, help="validation grid every N steps (0: only at the end)")
    r.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps of the validation grid")
    r.add_argument("--guidance", type=float, default=3.5, help="guidance scale of the validation grid")
    r.add_argument("--num-val", type=int, default=4, help="rows of the validation grid")
    util.old_flag(p, "--resolution", "--size")
    util.old_flag(p, "--num-workers", "--workers", type=int)
    util.old_flag(p, "--sample-steps", "--ddim-steps", type=int)
    args = p.parse_args(argv)
    if bool(args.pretrained) == bool(args.init):
        raise UserError("give one of --pretrained PATH_OR_ID, --init GENERATOR_FOLDER (a random tiny one for the "
                        "demo: demo/scratch_generator.py)")
    if args.random_unets and not args.pretrained:
        raise UserError("--random-unets needs --pretrained (whose U-Net architecture, VAE and schedule it uses)")
    if args.pretrained and not args.image_encoder:
        raise UserError("--pretrained needs --image-encoder (a CLIPVisionModelWithProjection, e.g. "
                        "lambdalabs/sd-image-variations-diffusers)")
    if args.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, on a CUDA machine); "
                        "or use --optimizer adamw")
    args.size = util.parse_size(args.size)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "ddim_steps", "num_val"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("sample_every", "threads", "workers", "weight_decay", "max_grad_norm", "min_snr_gamma", "guidance"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if not (args.lr > 0 and 0 <= args.drop_prob <= 1 and 0 <= args.ema < 1):
        raise UserError(f"--lr {args.lr} must be > 0, --drop-prob {args.drop_prob} in [0, 1], --ema {args.ema} in [0, 1)")
    util.check_output_dir(args.out)
    return args


def load_pairs(args):
    items, groups = (list_pairs_stage2 if args.stage == 2 else list_pairs_stage1)(args.data, args.conditions)
    groups = body.check_conditions(items, groups, args.skip_missing_conditions)
    # images that cannot be decoded are skipped with a warning naming them, and counted (as 04 and 05 do)
    kept, n_bad = models.check_images([(items[i][0], i) for g in groups for i in g], "training images", bar=None)
    if n_bad:
        ok = {i for _, i in kept}
        groups = [g for g in ([i for i in g if i in ok] for g in groups) if len(g) >= 2]
    if not groups:
        raise UserError(f"no training pairs in '{args.data}': need 2+ images (with maps) per "
                        f"{'person id' if args.stage == 2 else 'video'}")
    print(f"read {len(items)} images in {len(groups)} {'ids' if args.stage == 2 else 'videos'} from '{args.data}', "
          f"maps from '{args.conditions}'" + (f"; skipped {n_bad} unreadable" if n_bad else ""))
    data = PairData(items, groups, args.size, args.seed, args.stage, args.min_frame_gap)
    data.unreadable = n_bad  # (args.json records it)
    return items, data


def prepare(gen, vae, enc, args, device):
    """Freeze what gets no gradient, move everything to the device; -> the trainable parameters."""
    f = models.vae_factor(vae)
    if args.size[0] % (8 * f) or args.size[1] % (8 * f):  # the VAE's factor, then the U-Net's three halvings
        raise UserError(f"--size {args.size[1]}x{args.size[0]}: width and height must be multiples of {8 * f}")
    latent_hw, cross_dim = (args.size[0] // f, args.size[1] // f), gen.denoising_unet.config.cross_attention_dim
    frozen = models.freeze_unused_reference(gen, latent_hw, cross_dim)
    print(f"reference U-Net: {len(frozen)} tensors after its last attention input frozen (get no gradient)")
    if args.gradient_checkpointing:
        gen.reference_unet.enable_gradient_checkpointing()
        gen.denoising_unet.enable_gradient_checkpointing()
    # channels-last (NHWC): the faster convolutions of oneDNN and cuDNN, the same function
    gen.to(device, memory_format=torch.channels_last).train()
    vae.to(device)
    enc.to(device)
    params = [p for p in gen.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M (two U-Nets, {len(gen.guiders)} pose guiders)")
    return params


def encode(tgt, ref, cache, vae, enc, device, autocast):
    """-> target latents, reference latents, reference CLIP embedding (from the cache: tgt, ref are indices)."""
    if cache is not None:
        return cache[0][tgt], cache[0][ref], cache[1][ref]
    with autocast():
        z, ref_lat = models.encode_latents(vae, tgt.to(device)), models.encode_latents(vae, ref.to(device))
        ref_emb = models.clip_embed(enc, ref.to(device))
    return z.float(), ref_lat.float(), ref_emb.float()


def main():
    args = parse_args()
    rank, world, device = util.setup_ddp(args.device)
    is_main = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    items, data = load_pairs(args)  # (target, reference) pairs and the target's pose maps

    # the two U-Nets and the guiders train; the VAE and CLIP stay frozen
    os.makedirs(args.out, exist_ok=True)
    if is_main:
        util.remove_stale_temps(args.out)  # e.g. a checkpoint whose save a kill interrupted
    gen, vae, enc, schedule, sources, carries_frozen_parts = load_models(args)
    params = prepare(gen, vae, enc, args, device)
    from diffusers import DDPMScheduler
    noise_sched = DDPMScheduler.from_config(schedule)
    opt = make_optimizer(params, args, device)
    ema = None
    if args.ema:  # diffusers' EMAModel: a shadow copy of every weight (its decay ramps up over the first steps)
        from diffusers.training_utils import EMAModel
        ema = EMAModel(list(gen.parameters()), decay=args.ema, foreach=True)
        print(f"EMA of the weights (decay {args.ema}): exported and sampled instead of the last weights")
    start = resume(os.path.join(args.out, "checkpoint.pt"), args, gen, opt, ema)
    model = torch.nn.parallel.DistributedDataParallel(gen, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else gen
    if is_main:
        models.write_generator_files(args, schedule, sources, carries_frozen_parts, vae, enc, data.unreadable)
        log = util.CsvLog(os.path.join(args.out, "log.csv"), ["step", "loss", "lr", "sec_per_step", "samples_per_sec"], start)
    if start >= args.steps:
        print(f"nothing to do: already trained {start} steps (--steps {args.steps})")
        return
    val = validation_batch(data, args)  # (before the cache: the grid needs the images themselves)
    cache = None
    if args.cache_encodings:  # the encoders are frozen: encoding each image once trains the same
        cache = models.encode_images([path for path, _, _ in items], args.size, vae, enc, device, autocast)
        data.cache_maps()
    it = iter(torch.utils.data.DataLoader(data, batch_sampler=batches(start * args.grad_accum, args.batch_size, rank, world),
                                          num_workers=args.workers, persistent_workers=args.workers > 0))

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training", disable=not is_main)
    losses, t_last = [], time.time()
    for step in bar:
        for micro in range(args.grad_accum):
            tgt, ref, conds = next(it)
            conds = {k: v.to(device, memory_format=torch.channels_last) for k, v in conds.items()}
            z, ref_lat, ref_emb = encode(tgt, ref, cache, vae, enc, device, autocast)
            # noise, timesteps and condition dropout from rng(seed, step, micro, rank): resumable exactly
            g = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 256 + micro) * 4096 + rank)
            # (this arithmetic, not a SeedSequence: the documented demo figures were made with these
            # draws, and other draws move them beyond their seed spread: docs/lab/2026-12-05-seeding-scheme.md)
            last = world == 1 or micro == args.grad_accum - 1  # DDP averages the gradients on the last micro-step only
            with contextlib.nullcontext() if last else model.no_sync():
                with autocast():
                    loss = diffusion_loss(model, noise_sched, z, ref_lat, ref_emb, conds, g, args.drop_prob,
                                          args.min_snr_gamma)
                (loss / args.grad_accum).backward()
            losses.append(loss.item())
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(gen.parameters())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            dt = (time.time() - t_last) / len(losses) * args.grad_accum
            if is_main:  # (rank 0's loss; the others only reset their window)
                log.add(done, f"{np.mean(losses):.5f}", args.lr, f"{dt:.4f}", f"{args.batch_size * args.grad_accum * world / dt:.2f}")
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", s_per_step=f"{dt:.3f}")
            losses, t_last = [], time.time()
        if is_main and ((args.sample_every and done % args.sample_every == 0) or done == args.steps):
            with models.ema_weights(gen, ema):
                grid = models.sample_grid(gen, vae, enc, schedule, val, device, autocast, args.seed, args.ddim_steps, args.guidance)
            util.save_image(os.path.join(args.out, "samples", f"step_{done:06d}.png"), grid)
        if is_main and (done % args.save_every == 0 or done == args.steps):
            save(args.out, done, gen, opt, ema, args)
    if world > 1:
        models.check_ranks_agree(gen, world, is_main)
    if is_main:
        print(f"wrote '{args.out}': reference_unet/, denoising_unet/, guiders.safetensors, scheduler/, "
              f"checkpoint.pt (step {args.steps}), log.csv, samples/")


if __name__ == "__main__":
    util.run_main(main)
