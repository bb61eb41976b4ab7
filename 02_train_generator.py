"""
Stage 02: train the Diff-ID generator (paper 3.4 + 4.1): a reference U-Net and a denoising
U-Net of identical config plus one pose guider per condition map (depth, normal, skeleton);
the VAE and the CLIP image encoder stay frozen.

  stage 2 (default): pairs (reference, target) = two different images of one person id, from a
      Market-1501-layout root and the condition maps of its training images:
        python 02_train_generator.py --data runs/demo/world --conditions runs/demo/conditions \\
            --out runs/demo/generator --from-scratch --resolution 64x128 --lr 5e-4 --steps 4800
  stage 1: pairs = two frames of one video far apart; generic layout <data>/<video_id>/<frame>.png
      with maps <conditions>/<video_id>/<frame>.{depth,normal,skeleton}.png. A stage-2 run starts
      from a stage-1 folder with --init.

Weights: --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 (or a local diffusers folder with unet/ vae/
[scheduler/]) + --image-encoder (CLIP vision with projection, e.g. lambdalabs/sd-image-variations-
diffusers with --image-encoder-subfolder image_encoder), or --from-scratch: tiny configs for a CPU
(a small AutoencoderKL trained on the training images first, a tiny frozen CLIP: random, or
pretrained on the demo's corpus by demo/image_encoder.py and given with --image-encoder).

Writes into --out: reference_unet/, denoising_unet/ (diffusers folders), guiders.safetensors,
scheduler/ (the noise schedule trained with; 03 samples with the same config), vae/ and
image_encoder/ when built here, args.json, checkpoint.pt (resume: rerun the same command),
log.csv, samples/step_XXXXXX.png (reference | depth | normal | skeleton | generated | target).
Multi-GPU: torchrun --nproc_per_node N 02_train_generator.py ...
"""
import os
import csv
import json
import copy
import time
import random
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
    w = p.add_argument_group("weights (exactly one of --pretrained, --from-scratch, --init)")
    w.add_argument("--pretrained", help="SD-1.5 hub id or local diffusers folder (unet/, vae/, [scheduler/])")
    w.add_argument("--image-encoder", help="CLIPVisionModelWithProjection hub id or folder (needed with --pretrained; "
                   "with --from-scratch it replaces the random tiny one, e.g. demo/image_encoder.py's)")
    w.add_argument("--image-encoder-subfolder", default=None, help="subfolder of --image-encoder (default: "
                   "image_encoder/ when the encoder is there, as in lambdalabs/sd-image-variations-diffusers)")
    w.add_argument("--from-scratch", action="store_true", help="tiny configs for CPU / the demo world")
    w.add_argument("--init", help="start from a generator folder written by this script (stage 1 -> stage 2)")
    s = p.add_argument_group("--from-scratch model sizes")
    s.add_argument("--unet-channels", default="32,64", help="U-Net block widths (every block has attention)")
    s.add_argument("--vae-channels", default="16,32,64,64", help="VAE block widths; factor 2^(len-1) (8, like SD)")
    s.add_argument("--guider-widths", default="8,16,32,64", help="pose guider conv widths, full resolution's then "
                   "one per level (--pretrained keeps SD-1.5's 16,32,96,256, sized for its 320-channel conv_in; "
                   "on the tiny U-Nets those took most of a training step)")
    s.add_argument("--clip-dim", type=int, default=64, help="random tiny CLIP's projection dim = U-Net "
                   "cross-attention dim (with --image-encoder: that encoder's)")
    s.add_argument("--vae-steps", type=int, default=600)
    s.add_argument("--vae-lr", type=float, default=1e-3)
    s.add_argument("--vae-batch-size", type=int, default=8)
    s.add_argument("--vae-chroma-weight", type=float, default=4.0, help="extra weight of the colour (opponent "
                   "red-green, yellow-blue) part of the VAE's reconstruction error; 0: plain RGB loss")
    t = p.add_argument_group("training")
    t.add_argument("--resolution", default="192x384", help="WIDTHxHEIGHT of images and maps (paper: 192x384)")
    t.add_argument("--steps", type=int, default=30000, help="optimizer steps in total (a rerun resumes)")
    t.add_argument("--batch-size", type=int, default=4, help="per process and micro-step")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--drop-prob", type=float, default=0.1, help="null condition (reference + CLIP dropped together)")
    t.add_argument("--min-snr-gamma", type=float, default=0.0, help="weight each sample's loss by min(SNR, gamma) / SNR "
                   "(Hang et al. 2023; Moore-AnimateAnyone and Champ use 5); 0: the plain MSE of the paper's eq. 1")
    t.add_argument("--ema", type=float, default=0.0, help="keep an exponential moving average of the weights with this "
                   "decay (e.g. 0.999) and export it (what 03 samples with) instead of the last weights; 0: off")
    t.add_argument("--amp", action="store_true", help="bf16 autocast (use on GPU; on a 2-core CPU with AVX512-BF16 the demo trained no faster)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward: less "
                   "memory for about a third more time (with --optimizer adamw8bit: SD-1.5 size on 24 GB GPUs)")
    t.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw", help="adamw8bit: bitsandbytes' "
                   "8-bit AdamW, 2 bytes of optimiser state per parameter instead of 8 (CUDA)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    t.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    t.add_argument("--cache-encodings", action="store_true", help="encode every training image once (the frozen "
                   "VAE's posterior mean and CLIP embedding do not change, so training is the same) and hold them on "
                   "the device: on the CPU demo the encoders are ~15%% of a step; also decodes the condition maps once, into "
                   "memory. Memory: the latents, ~18 KB per image at 192x384, and the maps, 7 bytes per pixel (0.5 MB "
                   "per image at 192x384: fine for Market-1501, too much for a large stage-1 corpus)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=500, help="checkpoint + export every N steps (and at the end)")
    t.add_argument("--sample-every", type=int, default=500, help="validation grid every N steps (0: only at the end)")
    t.add_argument("--sample-steps", type=int, default=25)
    t.add_argument("--guidance", type=float, default=3.5)
    t.add_argument("--num-val", type=int, default=4, help="rows of the validation grid")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.pretrained, args.from_scratch, args.init)) != 1:
        raise UserError("give exactly one of --pretrained PATH_OR_ID, --from-scratch, --init GENERATOR_FOLDER")
    if args.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, on a CUDA machine); "
                        "or use --optimizer adamw")
    if args.pretrained and not args.image_encoder:
        raise UserError("--pretrained needs --image-encoder (a CLIPVisionModelWithProjection, e.g. "
                        "lambdalabs/sd-image-variations-diffusers --image-encoder-subfolder image_encoder)")
    try:
        wd, ht = (int(v) for v in args.resolution.lower().split("x"))
    except ValueError:
        raise UserError(f"--resolution '{args.resolution}' is not WIDTHxHEIGHT (e.g. 192x384)")
    args.size = (ht, wd)
    for name in ("unet_channels", "vae_channels", "guider_widths"):
        v = getattr(args, name)
        if not all(c.strip().isdigit() and int(c) > 0 for c in v.split(",")):
            raise UserError(f"--{name.replace('_', '-')} '{v}' is not a list of positive integers (e.g. 32,64)")
    if args.from_scratch:  # its VAE's factor is known before the VAE trains: fail before, not after
        check_resolution(args, 2 ** (len(int_list(args.vae_channels)) - 1))
    return args


def int_list(s):
    return tuple(int(c) for c in s.split(","))


def check_resolution(args, f):
    """Width and height must pass the VAE (factor f) and the U-Net's three halvings."""
    if args.size[0] % (8 * f) or args.size[1] % (8 * f):
        raise UserError(f"--resolution {args.resolution}: width and height must be multiples of {8 * f}")

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


def check_conditions(items, groups, skip_missing=False):
    """-> groups without the images that lack maps (only with skip_missing; else a clear error).
    Real photos whose SMPL fit was skipped (01b: too few confident keypoints) have no maps."""
    bad = [i for i, (_, c, s) in enumerate(items)
           if not all(os.path.isfile(body.cond_path(c, s, k)) for k in common.COND_KINDS)]
    if bad and not skip_missing:
        _, c, s = items[bad[0]]
        raise UserError(f"condition maps missing for {len(bad)} of {len(items)} images (e.g. "
                        f"'{body.cond_path(c, s, 'depth')}'): make them with 'python 01_render_smpl.py "
                        f"conditions', or pass --skip-missing-conditions to train without those images")
    if bad:
        print(f"skipping {len(bad)} images without condition maps (e.g. '{items[bad[0]][0]}')")
    bad = set(bad)
    groups = [[i for i in g if i not in bad] for g in groups]
    return [g for g in groups if len(g) >= 2]


class PairData(torch.utils.data.Dataset):
    """Sample k of the run -> (target, reference, target's maps). Everything random is drawn from
    rng(seed, k), so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, items, groups, size, seed, stage, min_gap):
        self.items, self.groups, self.size, self.seed, self.stage, self.min_gap = items, groups, size, seed, stage, min_gap
        self.members = [i for g in groups for i in g]  # targets: images that have a partner
        self.group_of = {i: gi for gi, g in enumerate(groups) for i in g}
        self._perm = (None, None)
        self.cached = False  # True: return item indices instead of images (--cache-encodings)
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
        (tp, tc, ts), (rp, _, _) = self.items[tgt], self.items[ref]
        if self.maps is not None:  # (the PNGs hold 8 bits: the same floats as load_conditions gives)
            conds = {kind: v[tgt].float() / 255 for kind, v in self.maps.items()}
        else:
            conds = body.load_conditions(tc, ts, self.size)
        if self.cached:  # the training loop looks the images' encodings up by index
            return tgt, ref, conds
        return models.load_image_tensor(tp, self.size), models.load_image_tensor(rp, self.size), conds


@torch.no_grad()
def encode_all(items, size, vae, enc, device, autocast, batch_size=64):
    """-> (VAE latents, CLIP embeddings) of every item, on the device (--cache-encodings)."""
    lat, emb = [], []
    for i in tqdm(range(0, len(items), batch_size), desc="encoding the images once"):
        x = torch.stack([models.load_image_tensor(p, size) for p, _, _ in items[i:i + batch_size]]).to(device)
        with autocast():
            lat.append(models.encode_latents(vae, x).float())
            emb.append(models.clip_embed(enc, x).float())
    lat, emb = torch.cat(lat), torch.cat(emb)
    print(f"cached the latents and CLIP embeddings of {len(items)} images "
          f"({(lat.numel() + emb.numel()) * 4 / 2 ** 20:.1f} MB on {device})")
    return lat, emb


def min_snr_weights(noise_sched, t, gamma):
    """Per-sample loss weights of min-SNR-gamma: the many low-noise timesteps, which an epsilon
    loss weights heavily though they teach little, count as much as a timestep of SNR gamma."""
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_sched, t)
    return snr.clamp(max=gamma) / (snr if noise_sched.config.prediction_type == "epsilon" else snr + 1)


def batches(start_micro, batch_size, rank, world):
    """Infinite batch sampler: micro-step m of process r gets samples ((m*world + r)*B ...)."""
    m = start_micro
    while True:
        base = (m * world + rank) * batch_size
        yield list(range(base, base + batch_size))
        m += 1

# -----------------------------------------------------------------------------
# models

def tiny_unet(args, latent_hw, cross_dim):
    from diffusers import UNet2DConditionModel
    ch = int_list(args.unet_channels)
    n = len(ch)
    return UNet2DConditionModel(
        sample_size=latent_hw, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=min(8, ch[0]))


def train_vae(args, items, device):
    """The small AutoencoderKL of --from-scratch: L1 + MSE reconstruction, a light KL, on (up to
    2,000 of) the training images; scaling_factor set to 1/std of the latents like SD's.
    A small VAE trained briefly on RGB errors learns luminance (edges) first and returns clothes
    nearly grey, yet clothing colour is most of what tells the demo's people apart: the colour
    part of the error gets --vae-chroma-weight more (docs/generator.md, "The demo VAE's colours")."""
    from diffusers import AutoencoderKL
    ch = int_list(args.vae_channels)
    torch.manual_seed(args.seed + 11)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
                        up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch, layers_per_block=1,
                        latent_channels=4, norm_num_groups=min(32, ch[0]), sample_size=max(args.size)).to(device)
    rng = np.random.default_rng([args.seed, 3])
    pick = rng.permutation(len(items))[:2000]
    imgs = torch.stack([models.load_image_tensor(items[i][0], args.size) for i in tqdm(pick, desc="loading VAE images", leave=False)])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    bar = tqdm(range(args.vae_steps), desc="training VAE")
    for it in bar:
        x = imgs[torch.from_numpy(rng.integers(len(imgs), size=args.vae_batch_size))].to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        d = rec - x
        chroma = torch.stack([d[:, 0] - d[:, 1], (d[:, 0] + d[:, 1]) / 2 - d[:, 2]], 1)  # opponent colour axes
        loss = (d.abs().mean() + d.pow(2).mean() + args.vae_chroma_weight * (chroma.abs().mean() + chroma.pow(2).mean())
                + 1e-6 * post.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(imgs[i:i + 64].to(device)).latent_dist.mean for i in range(0, min(len(imgs), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    print(f"VAE: reconstruction loss {loss.item():.4f}, latent std {z.std().item():.3f}")
    return vae.cpu()


def freeze_unused_reference(gen, latent_hw, cross_dim):
    """Only the INPUT of each attn1 of the reference U-Net is used, so whatever comes after the
    last one (its attn1/attn2/ff, proj_out, conv_out, ...) gets no gradient: freeze it, so DDP
    needs no find_unused_parameters and AdamW's weight decay does not shrink weights for nothing.
    Found by a probe (one tiny forward + backward) rather than a list of names per config."""
    gen.reference_unet.zero_grad(set_to_none=True)
    bank = gen.reference(torch.zeros(1, 4, *latent_hw), torch.zeros(1, 1, cross_dim))
    sum(v.float().sum() for v in bank.values()).backward()
    frozen = [n for n, p in gen.reference_unet.named_parameters() if p.grad is None]
    for n, p in gen.reference_unet.named_parameters():
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    return frozen


def build(args, items, device, is_main):
    """-> (Generator, vae, image_encoder, noise-schedule config, sources dict)."""
    from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler
    from transformers import CLIPVisionModelWithProjection
    resume = os.path.isfile(os.path.join(args.out, "checkpoint.pt"))
    if resume and os.path.isfile(os.path.join(args.out, "args.json")):  # e.g. a folder of an older recipe
        with open(os.path.join(args.out, "args.json")) as f:
            prev = json.load(f)
        start = lambda a: "--init" if a.get("init") else "--pretrained" if a.get("pretrained") else "--from-scratch"
        if start(prev) != start(vars(args)):
            raise UserError(f"'{args.out}' holds a run started with {start(prev)}, this command asks for "
                            f"{start(vars(args))}: rerun that run's command to resume it, or pass a new --out")
    if resume or args.init:  # the architecture (and, for --init, the weights) of a folder 02 wrote
        gen, vae, enc, schedule, prev = models.load_generator(args.out if resume else args.init)
        sources = {k: prev.get(k) for k in ("pretrained", "image_encoder", "image_encoder_subfolder")}
        owned = not prev.get("pretrained")
        print(f"model from '{args.out if resume else args.init}' ({'resume' if resume else 'init'})")
        return gen, vae, enc, schedule, sources, owned
    if args.pretrained:
        unet = models.from_pretrained(UNet2DConditionModel, args.pretrained, "unet", what="pretrained weights")
        vae = models.from_pretrained(AutoencoderKL, args.pretrained, "vae", what="pretrained weights")
        sub = args.image_encoder_subfolder
        if sub is None and not models.has_file(args.image_encoder, "config.json") and \
                models.has_file(args.image_encoder, "image_encoder/config.json"):
            sub = "image_encoder"  # e.g. lambdalabs/sd-image-variations-diffusers, a hub id or a local copy
        enc = models.from_pretrained(CLIPVisionModelWithProjection, args.image_encoder, sub, what="image encoder")
        if models.has_file(args.pretrained, "scheduler/scheduler_config.json"):  # the weights' own schedule
            schedule = dict(models.from_pretrained(DDPMScheduler, args.pretrained, "scheduler", what="noise schedule").config)
        else:
            schedule = dict(models.SD15_SCHEDULE)
            print(f"'{args.pretrained}' has no scheduler/: training with SD-1.5's noise schedule")
        sources = dict(pretrained=args.pretrained, image_encoder=args.image_encoder, image_encoder_subfolder=sub)
        owned = False
        print(f"weights: U-Net + VAE from '{args.pretrained}', image encoder from '{args.image_encoder}'")
    else:
        vae_dir = os.path.join(args.out, "vae")
        if os.path.isdir(vae_dir):  # trained by an earlier, interrupted run
            vae = models.from_pretrained(AutoencoderKL, vae_dir, what="VAE")
            print(f"VAE from '{vae_dir}'")
        else:
            vae = train_vae(args, items, device)
            if is_main:
                models.save_pretrained_atomic(vae, vae_dir)
                print(f"wrote {vae_dir}")
        f = models.vae_factor(vae)
        if args.image_encoder:  # e.g. pretrained on the demo's corpus by demo/image_encoder.py
            enc = models.from_pretrained(CLIPVisionModelWithProjection, args.image_encoder,
                                         args.image_encoder_subfolder, what="image encoder")
            print(f"image encoder from '{args.image_encoder}'")
        else:
            enc = models.tiny_clip(args.clip_dim, args.seed + 7)
        unet = tiny_unet(args, (args.size[0] // f, args.size[1] // f), enc.config.projection_dim)
        schedule = dict(models.SD15_SCHEDULE)
        sources = dict(pretrained=None, image_encoder=args.image_encoder, image_encoder_subfolder=args.image_encoder_subfolder)
        owned = True
    if enc.config.projection_dim != unet.config.cross_attention_dim:
        raise UserError(f"image encoder projection dim {enc.config.projection_dim} != U-Net cross_attention_dim "
                        f"{unet.config.cross_attention_dim}: pick a matching image encoder")
    ref = copy.deepcopy(unet)  # both U-Nets start from the same weights (paper 3.4)
    torch.manual_seed(args.seed + 5)
    widths = int_list(args.guider_widths) if owned else common.GUIDER_WIDTHS
    gen = common.Generator(ref, unet, common.build_guiders(unet.conv_in.out_channels, models.vae_factor(vae), widths))
    return gen, vae.eval().requires_grad_(False), enc.eval().requires_grad_(False), schedule, sources, owned

# -----------------------------------------------------------------------------
# validation grid

@torch.no_grad()
def sample_grid(gen, vae, enc, schedule, val, args, device, autocast):
    from diffusers import DDIMScheduler
    gen.eval()
    tgt, refs, conds = val
    with autocast():
        ref_lat = models.encode_latents(vae, refs.to(device))
        emb = models.clip_embed(enc, refs.to(device))
        bank = gen.reference(ref_lat, emb)
        pose = gen.pose({k: v.to(device, memory_format=torch.channels_last) for k, v in conds.items()})
        noise = torch.randn(ref_lat.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
        idx = torch.arange(len(refs), device=device)
        z = common.sample_latents(gen, DDIMScheduler.from_config(schedule), noise, emb, pose, bank, idx,
                                  steps=args.sample_steps, guidance=args.guidance)
        out = models.decode_latents(vae, z)
    gen.train()
    cells = [models.to_uint8(refs)] + [models.to_uint8(conds[k].expand(-1, 3, -1, -1) * 2 - 1) for k in common.COND_KINDS]
    cells += [models.to_uint8(out), models.to_uint8(tgt)]
    rows = [np.concatenate([c[i] for c in cells], axis=1) for i in range(len(refs))]
    return np.concatenate(rows, axis=0)

# -----------------------------------------------------------------------------

def main():
    args = parse_args()
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    device = torch.device(args.device)
    is_main = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    amp_dtype = torch.bfloat16
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp)

    # ---- data
    items, groups = (list_pairs_stage2 if args.stage == 2 else list_pairs_stage1)(args.data, args.conditions)
    groups = check_conditions(items, groups, args.skip_missing_conditions)
    if not groups:
        raise UserError(f"no training pairs in '{args.data}': need 2+ images (with maps) per "
                        f"{'person id' if args.stage == 2 else 'video'}")
    print(f"read {len(items)} images in {len(groups)} {'ids' if args.stage == 2 else 'videos'} from '{args.data}', "
          f"maps from '{args.conditions}'")
    data = PairData(items, groups, args.size, args.seed, args.stage, args.min_frame_gap)

    # ---- models
    os.makedirs(args.out, exist_ok=True)
    if is_main:
        util.remove_stale_temps(args.out)  # e.g. a checkpoint whose save a kill interrupted
    gen, vae, enc, schedule, sources, owned = build(args, items, device, is_main)
    f = models.vae_factor(vae)
    check_resolution(args, f)
    latent_hw = (args.size[0] // f, args.size[1] // f)
    frozen = freeze_unused_reference(gen, latent_hw, gen.denoising_unet.config.cross_attention_dim)
    print(f"reference U-Net: {len(frozen)} tensors after its last attention input frozen (get no gradient)")
    if args.gradient_checkpointing:
        gen.reference_unet.enable_gradient_checkpointing()
        gen.denoising_unet.enable_gradient_checkpointing()
    # channels-last (NHWC) weights and maps: oneDNN's and cuDNN's faster convolutions (the same
    # function; tools/bench_memory_format.py times both layouts)
    gen.to(device, memory_format=torch.channels_last).train()
    vae.to(device)
    enc.to(device)
    n_train = sum(p.numel() for p in gen.parameters() if p.requires_grad)
    print(f"trainable parameters: {n_train / 1e6:.2f}M (reference U-Net, denoising U-Net, {len(gen.guiders)} pose guiders)")
    from diffusers import DDPMScheduler
    noise_sched = DDPMScheduler.from_config(schedule)
    alphas = noise_sched.alphas_cumprod.to(device)
    params = [p for p in gen.parameters() if p.requires_grad]
    if args.optimizer == "adamw8bit":
        import bitsandbytes
        opt = bitsandbytes.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        # fused: one kernel for all 600-odd tensors (on 2 CPU cores 4x faster than the per-tensor loop)
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))

    ema = None
    if args.ema:  # diffusers' EMAModel: a shadow copy of every weight (its decay ramps up over the first steps)
        from diffusers.training_utils import EMAModel
        ema = EMAModel(list(gen.parameters()), decay=args.ema, foreach=True)
        print(f"EMA of the weights (decay {args.ema}): exported and sampled instead of the last weights")

    # ---- resume
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.csv")
    start = 0
    if os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        gen.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if ema is not None:
            if "ema" not in ck:
                raise UserError(f"'{ckpt_path}' was trained without --ema: resume without it, or use a new --out")
            ema.load_state_dict(ck["ema"])
        start = ck["step"]
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        torch.set_rng_state(ck["rng"]["torch"])
        if torch.cuda.is_available() and ck["rng"].get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        print(f"resumed from '{ckpt_path}' at step {start}")
    model = torch.nn.parallel.DistributedDataParallel(gen, device_ids=[device] if device.type == "cuda" else None) if ddp else gen
    log_rows = []
    if os.path.isfile(log_path):  # keep the rows up to the checkpoint: steps after it are redone
        with open(log_path) as fh:
            log_rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
    if is_main:
        run_args = {k: v for k, v in vars(args).items() if k != "size"}
        run_args.update(sources, resolution=[args.size[1], args.size[0]], vae_factor=f,
                        size_hw=list(args.size), conditions_kinds=list(common.COND_KINDS))
        util.save_json(os.path.join(args.out, "args.json"), run_args)
        models.save_pretrained_atomic(DDPMScheduler.from_config(schedule), os.path.join(args.out, "scheduler"))
        if owned:  # parts built here (from scratch) travel with the generator folder
            for sub, m in (("vae", vae), ("image_encoder", enc)):
                if not os.path.isdir(os.path.join(args.out, sub)):
                    models.save_pretrained_atomic(m, os.path.join(args.out, sub))
    if start >= args.steps:
        print(f"nothing to do: already trained {start} steps (--steps {args.steps})")
        return

    # fixed validation pairs (first rows of a fixed shuffle)
    vk = np.random.default_rng([args.seed, 4]).integers(0, 2 ** 40, size=args.num_val)
    vs = [data[int(k)] for k in vk]
    val = (torch.stack([v[0] for v in vs]), torch.stack([v[1] for v in vs]),
           {k: torch.stack([v[2][k] for v in vs]) for k in common.COND_KINDS})

    cache = encode_all(items, args.size, vae, enc, device, autocast) if args.cache_encodings else None
    data.cached = cache is not None  # (after the validation pairs above, which need the images)
    if data.cached:  # the targets' maps too, decoded once (PNG decoding was ~5% of a demo step)
        data.maps = {k: torch.zeros(len(items), common.COND_CHANNELS[k], *args.size, dtype=torch.uint8)
                     for k in common.COND_KINDS}
        for i in tqdm(sorted(set(data.members)), desc="maps", mininterval=1.0):
            for k, v in body.load_conditions(*items[i][1:], args.size).items():
                data.maps[k][i] = (v * 255).round().to(torch.uint8)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches(start * args.grad_accum, args.batch_size, rank, world),
                                         num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    it = iter(loader)

    @contextlib.contextmanager
    def ema_weights():  # the EMA weights in gen for a while (export, samples), then the trained ones back
        if ema is None:
            yield
            return
        ema.store(gen.parameters())
        ema.copy_to(gen.parameters())
        try:
            yield
        finally:
            ema.restore(gen.parameters())

    def save(step):
        with ema_weights():
            models.save_generator(args.out, gen)
        rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        ck = dict(model=gen.state_dict(), opt=opt.state_dict(), step=step, rng=rng, args=vars(args))
        if ema is not None:
            ck["ema"] = ema.state_dict()
        util.atomic_write(ckpt_path, lambda tmp: torch.save(ck, tmp))  # written last: it marks a complete save

    def write_log():
        def w(tmp):
            with open(tmp, "w", newline="") as fh:
                wr = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "sec_per_step", "samples_per_sec"])
                wr.writeheader()
                wr.writerows(log_rows)
        util.atomic_write(log_path, w)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training", disable=not is_main)
    losses, t_last = [], time.time()
    for step in bar:
        for micro in range(args.grad_accum):
            tgt, ref, conds = next(it)
            conds = {k: v.to(device, memory_format=torch.channels_last) for k, v in conds.items()}
            # noise, timesteps and condition dropout from rng(seed, step, micro, rank): resumable exactly
            g = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 256 + micro) * 4096 + rank)
            if cache is not None:  # tgt, ref: item indices
                z, ref_lat, ref_emb = cache[0][tgt], cache[0][ref], cache[1][ref]
            else:
                tgt, ref = tgt.to(device), ref.to(device)
                with autocast():
                    z = models.encode_latents(vae, tgt)
                    ref_lat = models.encode_latents(vae, ref)
                    ref_emb = models.clip_embed(enc, ref)
                z, ref_lat, ref_emb = z.float(), ref_lat.float(), ref_emb.float()
            B = z.shape[0]
            noise = torch.randn(z.shape, generator=g).to(device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (B,), generator=g).to(device)
            drop = (torch.rand(B, generator=g) < args.drop_prob).to(device)
            emb, index = common.null_condition(ref_emb, torch.arange(B, device=device), drop)
            a = alphas[t].view(B, 1, 1, 1)
            noisy = a.sqrt() * z + (1 - a).sqrt() * noise  # = DDPMScheduler.add_noise
            target = noise if noise_sched.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
            sync = contextlib.nullcontext() if (not ddp or micro == args.grad_accum - 1) else model.no_sync()
            with sync:
                with autocast():
                    pred = model(noisy, t, emb, conds, ref_lat, ref_emb, index)
                if args.min_snr_gamma:
                    per = F.mse_loss(pred.float(), target, reduction="none").mean((1, 2, 3))
                    loss = (per * min_snr_weights(noise_sched, t, args.min_snr_gamma)).mean()
                else:
                    loss = F.mse_loss(pred.float(), target)  # paper eq. 1
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
                log_rows.append(dict(step=done, loss=f"{np.mean(losses):.5f}", lr=args.lr, sec_per_step=f"{dt:.4f}",
                                     samples_per_sec=f"{args.batch_size * args.grad_accum * world / dt:.2f}"))
                write_log()
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", s_per_step=f"{dt:.3f}")
            losses, t_last = [], time.time()
        if is_main and ((args.sample_every and done % args.sample_every == 0) or done == args.steps):
            with ema_weights():
                grid = sample_grid(gen, vae, enc, schedule, val, args, device, autocast)
            util.save_image(os.path.join(args.out, "samples", f"step_{done:06d}.png"), grid)
        if is_main and (done % args.save_every == 0 or done == args.steps):
            save(done)
    if ddp:
        diff = models.ranks_weight_difference(gen)
        if is_main:
            print(f"{world} ranks hold identical weights" if diff == 0 else f"ranks differ by {diff:.3g}")
        if diff:
            raise RuntimeError(f"the {world} DDP ranks ended with different weights (max difference {diff:.3g})")
        torch.distributed.destroy_process_group()
    if is_main:
        print(f"wrote '{args.out}': reference_unet/, denoising_unet/, guiders.safetensors, scheduler/, "
              f"checkpoint.pt (step {args.steps}), log.csv, samples/")


if __name__ == "__main__":
    util.run_main(main)
