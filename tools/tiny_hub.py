"""
Tiny random weights under the real path's default hub ids, in a local Hugging Face cache laid out
as the hub's own (HF_HOME/hub/models--org--name/snapshots/<hash>/): with HF_HOME pointing here and
HF_HUB_OFFLINE=1 the ids resolve exactly as they would online, so `run_all.sh market1501` runs its
real code on a machine that cannot reach the hub. The tests and tools/rehearse.py use it.

  python tools/tiny_hub.py --out /tmp/hf
  HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 bash run_all.sh market1501 ...

  SD-1.5 (unet/ vae/ scheduler/): a 2-level U-Net, a VAE with SD's factor 8, SD-1.5's noise schedule
  the image-variations repo (image_encoder/): a one-layer CLIP vision model
  ViTPose (COCO-17): a 2-layer backbone; its input at --vitpose-size (the real model's 192x256 by default)
"""
import os
import sys
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshots
SD15, ENCODER = "stable-diffusion-v1-5/stable-diffusion-v1-5", "lambdalabs/sd-image-variations-diffusers"
VITPOSE = "usyd-community/vitpose-base-simple"
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", clip_sample=False, steps_offset=1)


def hub_repo(home, repo_id):
    """The folder a hub repo's files sit in inside an HF cache, its refs/main naming the snapshot."""
    d = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(d, "refs"), exist_ok=True)
    with open(os.path.join(d, "refs", "main"), "w") as f:
        f.write(SNAPSHOT)
    return os.path.join(d, "snapshots", SNAPSHOT)


def build(home, schedule=SD15_SCHEDULE, vitpose_size=(256, 192)):
    """Write the three repos under home (seeded: the same weights every time); vitpose_size is
    (height, width).
    -> dict(home, sd, enc, vitpose) of their snapshot folders."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, VitPoseBackboneConfig, VitPoseConfig,
                              VitPoseForPoseEstimation, VitPoseImageProcessor)
    torch.manual_seed(0)
    sd = hub_repo(home, SD15)
    UNet2DConditionModel(sample_size=(16, 8), layers_per_block=1, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                         cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).save_pretrained(f"{sd}/unet")
    AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                  norm_num_groups=4, sample_size=64).save_pretrained(f"{sd}/vae")  # 4 levels: factor 8, like SD's
    DDPMScheduler.from_config(schedule).save_pretrained(f"{sd}/scheduler")
    enc = hub_repo(home, ENCODER)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=16, patch_size=8,
                                                   projection_dim=16)).save_pretrained(f"{enc}/image_encoder")
    vp = hub_repo(home, VITPOSE)
    bb = VitPoseBackboneConfig(image_size=list(vitpose_size), patch_size=[16, 16], hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, mlp_ratio=2, out_indices=[2])
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=bb, num_labels=17)).save_pretrained(vp)
    VitPoseImageProcessor(size={"height": vitpose_size[0], "width": vitpose_size[1]}).save_pretrained(vp)
    return dict(home=home, sd=sd, enc=enc, vitpose=vp)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the folder to use as HF_HOME")
    ap.add_argument("--vitpose-size", default="192x256", help="WxH of ViTPose's input, as every --size "
                    "(the real model's: 192x256); multiples of its 16-pixel patches")
    args = ap.parse_args(argv)
    size = util.parse_size(args.vitpose_size, "--vitpose-size")
    if any(v % 16 for v in size):
        raise util.UserError(f"--vitpose-size {args.vitpose_size}: width and height must be multiples of 16 (e.g. 192x256)")
    util.check_output_dir(args.out)
    paths = build(args.out, vitpose_size=size)
    print(f"wrote tiny weights under {args.out}: {SD15}, {ENCODER}, {VITPOSE}; use HF_HOME={args.out} HF_HUB_OFFLINE=1")
    return paths


if __name__ == "__main__":
    util.run_main(main)
