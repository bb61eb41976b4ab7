"""Generator tests (issue 5): reference attention, pose guiders, null condition, 02 training with
resume, 03 generation with the reference cache, sharding, rerun after a kill, bad inputs.
Tiny models built from configs, tiny data made here; offline (HF_HUB_OFFLINE=1), CPU only."""
import os
import sys
import csv
import copy
import time
import signal
import importlib.util
import subprocess

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

torch.set_num_threads(1)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
           OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
W, H = 16, 32  # image size of the tiny world (width, height)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", "").replace("0", "s0", 1), os.path.join(ROOT, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def script(name, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)

# -----------------------------------------------------------------------------
# tiny data: a Market-layout world with condition maps, and a target set

def person(rng_seed, pid, pose, w=W, h=H):
    """A 'person': a coloured body whose horizontal position/width follows `pose` on a camera
    background, plus its depth/normal/skeleton maps (same silhouette)."""
    rng = np.random.default_rng(pid)
    top, bottom = rng.integers(60, 255, 3), rng.integers(60, 255, 3)
    bg = np.random.default_rng(rng_seed).integers(0, 60, 3)
    img = np.zeros((h, w, 3), np.uint8) + bg.astype(np.uint8)
    x0 = 2 + pose % (w // 2)
    x1 = min(w - 1, x0 + w // 3 + pose % 3)
    mask = np.zeros((h, w), bool)
    mask[3:h - 2, x0:x1] = True
    img[3:h // 2, x0:x1] = top
    img[h // 2:h - 2, x0:x1] = bottom
    depth = (mask * 200).astype(np.uint8)
    normal = np.zeros((h, w, 3), np.uint8)
    normal[mask] = (128, 128, 255)
    skel = np.zeros((h, w, 3), np.uint8)
    skel[3:h - 2, (x0 + x1) // 2] = (255, 0, 0)
    return img, dict(depth=depth, normal=normal, skeleton=skel), mask


def make_world(root, n_pids=3, per_pid=3):
    data, cond = os.path.join(root, "world"), os.path.join(root, "conditions")
    for pid in range(1, n_pids + 1):
        for k in range(per_pid):
            cam = 1 + k % 2
            stem = f"{pid:04d}_c{cam}s1_{k:06d}_00"
            img, maps, _ = person(cam, pid, pose=pid + 3 * k)
            common.save_image(os.path.join(data, "bounding_box_train", stem + ".png"), img)
            for kind, m in maps.items():
                common.save_image(common.cond_path(os.path.join(cond, "bounding_box_train"), stem, kind), m)
    return data, cond


def make_targets(root, n=5, name="t"):
    d = os.path.join(root, "targets", name)
    rows = []
    for i in range(n):
        tid = f"t{i:03d}"
        _, maps, _ = person(0, 1, pose=2 * i + 1)
        for kind, m in maps.items():
            common.save_image(common.cond_path(os.path.join(d, "maps"), tid, kind), m)
        rows.append(f"{tid},{i},test,{10 + i},{36 * i}")
    common.save_text(os.path.join(d, "targets.csv"), "target_id,pose_id,pose_source,elevation,azimuth\n" + "\n".join(rows) + "\n")
    return d


def tiny_unet(cross=16):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=(H // 2, W // 2), in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=8, norm_num_groups=8)


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    den = tiny_unet()
    return common.Generator(copy.deepcopy(den), den, common.build_guiders(den.conv_in.out_channels, 2))


def make_sd_folder(root):
    """A tiny 'stable-diffusion-v1-5'-style folder (unet/ vae/ scheduler/) and an image encoder
    folder with an image_encoder/ subfolder, as lambdalabs/sd-image-variations-diffusers has."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    sd, enc = os.path.join(root, "sd15"), os.path.join(root, "imgvar")
    tiny_unet().save_pretrained(os.path.join(sd, "unet"))
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32).save_pretrained(os.path.join(sd, "vae"))
    DDPMScheduler.from_config(common.SD15_SCHEDULE).save_pretrained(os.path.join(sd, "scheduler"))
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=16, patch_size=8, projection_dim=16)).save_pretrained(os.path.join(enc, "image_encoder"))
    return sd, enc


def batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    conds = {k: torch.rand(B, common.COND_CHANNELS[k], H, W, generator=g) for k in common.COND_KINDS}
    return (torch.randn(B, 4, H // 2, W // 2, generator=g), torch.tensor([10, 700])[:B], torch.randn(B, 1, 16, generator=g),
            conds, torch.randn(B, 4, H // 2, W // 2, generator=g))
