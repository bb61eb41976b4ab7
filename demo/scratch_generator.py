"""
The demo's stand-in for SD-1.5: a generator folder of tiny, randomly initialised networks, in the
layout 02_train_generator.py writes, so that `02 --init FOLDER` trains it like any other:

  - a small AutoencoderKL (factor 8, 4 latent channels, like SD's), trained here on the training
    images: a CPU cannot afford SD's VAE, and a random VAE encodes nothing;
  - a tiny CLIPVisionModelWithProjection (random, or --image-encoder: demo/image_encoder.py's);
  - two identical tiny U-Nets (every block with attention, as SD-1.5's) and the pose guiders,
    randomly initialised: the paper's row (V) starts from such a folder, and demo/pretrain.py
    pretrains the demo generator from it.

  python demo/scratch_generator.py --data runs/demo/world --out runs/demo/scratch_v --size 64x128
  python 02_train_generator.py --init runs/demo/scratch_v --data runs/demo/world ...

Rerunning reuses a VAE already trained into --out.
"""
import os
import sys
import copy
import argparse

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import models  # noqa: E402
import util  # noqa: E402
from util import UserError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the images the VAE trains on: a Market-1501-layout root "
                   "(bounding_box_train/) or, with --stage 1, a folder of <video_id>/<frame> images")
    p.add_argument("--out", required=True, help="generator folder to write")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2, help="which layout --data has (as 02's --stage)")
    p.add_argument("--size", default="64x128", help="WxH of the images the generator will train on")
    p.add_argument("--image-encoder", help="a CLIPVisionModelWithProjection folder (e.g. demo/image_encoder.py's) "
                   "instead of a random tiny one")
    p.add_argument("--unet-channels", default="32,64", help="U-Net block widths (every block has attention)")
    p.add_argument("--vae-channels", default="16,32,64,64", help="VAE block widths; factor 2^(len-1) (8, like SD)")
    p.add_argument("--guider-widths", default="8,16,32,64", help="pose guider conv widths, full resolution's then one "
                   "per level (SD-1.5's 16,32,96,256 are sized for its 320-channel conv_in)")
    p.add_argument("--clip-dim", type=int, default=64, help="the random tiny CLIP's projection dim = the U-Nets' "
                   "cross-attention dim")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-batch-size", type=int, default=8)
    p.add_argument("--vae-chroma-weight", type=float, default=4.0, help="extra weight of the colour (opponent "
                   "red-green, yellow-blue) part of the VAE's reconstruction error; 0: plain RGB loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    args.size = util.parse_size(args.size)
    for name in ("unet_channels", "vae_channels", "guider_widths"):
        v = getattr(args, name)
        if not all(c.strip().isdigit() and int(c) > 0 for c in v.split(",")):
            raise UserError(f"--{name.replace('_', '-')} '{v}' is not a list of positive integers (e.g. 32,64)")
    if min(args.vae_steps, args.vae_batch_size, args.clip_dim) < 1:
        raise UserError("--vae-steps, --vae-batch-size and --clip-dim must be at least 1")
    f = 2 ** (len(int_list(args.vae_channels)) - 1)
    if args.size[0] % (8 * f) or args.size[1] % (8 * f):  # the VAE's factor, then the U-Net's three halvings
        raise UserError(f"--size {args.size[1]}x{args.size[0]}: width and height must be multiples of {8 * f}")
    return args


def int_list(s):
    return tuple(int(c) for c in s.split(","))


def list_images(data, stage):
    """The images in the order 02 lists them (the VAE's sample of them depends on it)."""
    if stage == 2:
        return [path for path, _, _ in util.list_split(os.path.join(data, util.SPLIT_DIRS["train"]))]
    if not os.path.isdir(data):
        raise UserError(f"video folder '{data}' does not exist")
    return [os.path.join(data, v, f) for v in sorted(os.listdir(data)) if os.path.isdir(os.path.join(data, v))
            for f in sorted(os.listdir(os.path.join(data, v))) if f.lower().endswith(util.IMAGE_EXTS)]


def tiny_unet(channels, latent_hw, cross_dim):
    from diffusers import UNet2DConditionModel
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_hw, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=min(8, channels[0]))


def train_vae(args, images, device):
    """The small AutoencoderKL: L1 + MSE reconstruction and a light KL on (up to 2,000 of) the
    images; scaling_factor 1/std of the latents, like SD's. A small VAE trained briefly on RGB
    errors learns luminance (edges) first and returns clothes nearly grey, yet clothing colour is
    most of what tells the demo's people apart: the colour part of the error counts
    --vae-chroma-weight more (docs/generator.md)."""
    from diffusers import AutoencoderKL
    ch = int_list(args.vae_channels)
    torch.manual_seed(args.seed + 11)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
                        up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch, layers_per_block=1,
                        latent_channels=4, norm_num_groups=min(32, ch[0]), sample_size=max(args.size)).to(device)
    rng = np.random.default_rng([args.seed, 3])
    pick = rng.permutation(len(images))[:2000]
    imgs = torch.stack([models.load_image_tensor(images[i], args.size) for i in tqdm(pick, desc="loading VAE images", leave=False)])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    bar = tqdm(range(args.vae_steps), desc="training VAE")
    for step in bar:
        x = imgs[torch.from_numpy(rng.integers(len(imgs), size=args.vae_batch_size))].to(device)
        post = vae.encode(x).latent_dist
        err = vae.decode(post.sample()).sample - x
        chroma = torch.stack([err[:, 0] - err[:, 1], (err[:, 0] + err[:, 1]) / 2 - err[:, 2]], 1)  # opponent colour axes
        loss = (err.abs().mean() + err.pow(2).mean() + args.vae_chroma_weight * (chroma.abs().mean() + chroma.pow(2).mean())
                + 1e-6 * post.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(imgs[i:i + 64].to(device)).latent_dist.mean for i in range(0, min(len(imgs), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    print(f"VAE: reconstruction loss {loss.item():.4f}, latent std {z.std().item():.3f}")
    return vae.cpu()


def main():
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPVisionModelWithProjection
    args = parse_args()
    device = torch.device(util.pick_device(args.device))
    images = list_images(args.data, args.stage)
    if not images:
        raise UserError(f"no images in '{args.data}' for the VAE to train on")
    print(f"read {len(images)} images from '{args.data}'")
    vae_dir = os.path.join(args.out, "vae")
    if os.path.isdir(vae_dir):  # trained by an earlier, interrupted run
        vae = models.from_pretrained(AutoencoderKL, vae_dir, what="VAE")
        print(f"VAE from '{vae_dir}'")
    else:
        vae = train_vae(args, images, device)
        models.save_pretrained_atomic(vae, vae_dir)
    f = models.vae_factor(vae)
    if args.image_encoder:
        enc = models.from_pretrained(CLIPVisionModelWithProjection, args.image_encoder, what="image encoder")
    else:
        enc = models.tiny_clip(args.clip_dim, args.seed + 7)
    unet = tiny_unet(int_list(args.unet_channels), (args.size[0] // f, args.size[1] // f), enc.config.projection_dim)
    ref = copy.deepcopy(unet)  # both U-Nets start from the same weights (paper 3.4)
    torch.manual_seed(args.seed + 5)
    guiders = common.build_guiders(unet.conv_in.out_channels, f, int_list(args.guider_widths))
    models.save_generator(args.out, common.Generator(ref, unet, guiders))
    models.save_pretrained_atomic(enc, os.path.join(args.out, "image_encoder"))
    models.save_pretrained_atomic(DDPMScheduler.from_config(models.SD15_SCHEDULE), os.path.join(args.out, "scheduler"))
    built = {k: v for k, v in vars(args).items() if k != "size"}
    util.save_json(os.path.join(args.out, "args.json"), dict(
        built, size=f"{args.size[1]}x{args.size[0]}", built_by="demo/scratch_generator.py", pretrained=None,
        image_encoder=args.image_encoder, image_encoder_subfolder=None, vae_factor=f))
    print(f"wrote '{args.out}': reference_unet/, denoising_unet/, guiders.safetensors, vae/, image_encoder/, "
          f"scheduler/, args.json (random U-Nets and guiders, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
          f"parameters per U-Net)")


if __name__ == "__main__":
    util.run_main(main)
