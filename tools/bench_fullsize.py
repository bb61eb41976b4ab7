"""
The generator at the paper's size, with random weights: SD-1.5's U-Net (x2: reference + denoising)
and VAE configs, a CLIP ViT-L/14 vision encoder with a 768-d projection, pose guiders summing to
320 channels. Saved as local diffusers / transformers folders (the layout of
stable-diffusion-v1-5/stable-diffusion-v1-5 and lambdalabs/sd-image-variations-diffusers), loaded back through
the same from_pretrained path as 02 --pretrained / --image-encoder, then:
  1. parameter counts, and the memory of a full 02 step computed from them (weights, gradients,
     AdamW state: fp32, and with 8-bit AdamW);
  2. the forward + backward of one 02 training step at 192x384, batch 1 (what 02 runs per step,
     minus the optimiser): seconds and peak memory (fp32 on a CPU; bf16 autocast with --amp);
  3. 03_generate.py as a user runs it, on a generator folder made from those weights: seconds per
     image and the peak memory of that process.
Writes a JSON report (--out) and prints it. Not a test: minutes and a large share of a machine's
memory on a CPU (see docs/fullsize.md).

  python tools/bench_fullsize.py --work /tmp/fullsize --out docs/fullsize_cpu.json [--device cuda --amp]
"""
import os
import sys
import time
import shutil
import resource
import argparse
import subprocess

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common  # noqa: E402
import util  # noqa: E402
import models  # noqa: E402

GIB = 2 ** 30


def peak_rss(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def build_folders(work):
    """SD-1.5-sized folders with random weights (skipped when they exist)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    sd, enc = os.path.join(work, "sd15"), os.path.join(work, "image-variations")
    if not os.path.isfile(os.path.join(sd, "unet", "config.json")):
        # diffusers' defaults ARE SD-1.5's U-Net but for the context width: 768 (CLIP ViT-L/14)
        UNet2DConditionModel(sample_size=64, cross_attention_dim=768).save_pretrained(os.path.join(sd, "unet"))
        AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                      sample_size=512).save_pretrained(os.path.join(sd, "vae"))
        DDPMScheduler.from_config(models.SD15_SCHEDULE).save_pretrained(os.path.join(sd, "scheduler"))
    if not os.path.isfile(os.path.join(enc, "image_encoder", "config.json")):
        CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                       num_attention_heads=16, image_size=224, patch_size=14,
                                                       projection_dim=768)).save_pretrained(os.path.join(enc, "image_encoder"))
    return sd, enc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the weights (large: see docs/fullsize.md) and the generated images")
    ap.add_argument("--out", required=True, help="JSON report")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--images", type=int, default=4, help="images 03 generates")
    ap.add_argument("--ddim-steps", type=int, default=4, help="DDIM sampling steps per image 03 generates")
    ap.add_argument("--data", default=None, help="Market-layout root with maps for 03 (default: a tiny demo world)")
    args = ap.parse_args()
    args.device = util.pick_device(args.device)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection
    device = torch.device(args.device)
    H, W = 384, 192
    t0 = time.time()
    sd, enc_dir = build_folders(args.work)
    print(f"folders: {sd}, {enc_dir} ({time.time() - t0:.0f} s)")

    # ---- load through the path 02 --pretrained / --image-encoder takes
    unet = models.from_pretrained(UNet2DConditionModel, sd, "unet")
    vae = models.from_pretrained(AutoencoderKL, sd, "vae").eval().requires_grad_(False)
    enc = models.from_pretrained(CLIPVisionModelWithProjection, enc_dir, "image_encoder").eval().requires_grad_(False)
    ref = UNet2DConditionModel.from_config(unet.config)
    ref.load_state_dict(unet.state_dict())
    gen = common.Generator(ref, unet, common.build_guiders(unet.conv_in.out_channels, models.vae_factor(vae)))
    count = lambda m: sum(p.numel() for p in m.parameters())
    n = dict(unet=count(unet), vae=count(vae), image_encoder=count(enc), guiders=count(gen.guiders))
    n_train = 2 * n["unet"] + n["guiders"]
    # a full 02 step: fp32 weights + gradients + AdamW's two moments = 16 bytes per trained parameter;
    # bitsandbytes' AdamW8bit keeps the moments in 1 byte each = 10 bytes; frozen VAE + encoder on top
    frozen = 4 * (n["vae"] + n["image_encoder"])
    mem = dict(trained_parameters=n_train, fp32_adamw_gib=(16 * n_train + frozen) / GIB,
               fp32_adamw8bit_gib=(10 * n_train + frozen) / GIB,
               bf16_weights_fp32_master_adamw_gib=(18 * n_train + 2 * (n["vae"] + n["image_encoder"])) / GIB)
    print(f"parameters: U-Net {n['unet'] / 1e6:.0f}M (x2), guiders {n['guiders'] / 1e6:.2f}M, VAE {n['vae'] / 1e6:.0f}M, "
          f"image encoder {n['image_encoder'] / 1e6:.0f}M; trained {n_train / 1e6:.0f}M")
    print(f"a full 02 step without activations: fp32 AdamW {mem['fp32_adamw_gib']:.1f} GiB, "
          f"8-bit AdamW {mem['fp32_adamw8bit_gib']:.1f} GiB")

    # ---- one 02 training step's forward + backward (the optimiser step aside)
    gen.to(device).train()
    vae.to(device)
    enc.to(device)
    g = torch.Generator().manual_seed(0)
    img = lambda: (torch.rand(1, 3, H, W, generator=g) * 2 - 1).to(device)
    conds = {k: torch.rand(1, common.COND_CHANNELS[k], H, W, generator=g).to(device) for k in common.COND_KINDS}
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    sched = DDPMScheduler.from_config(models.SD15_SCHEDULE)
    times = []
    for rep in range(2):  # the first one also pays for allocation; both are reported
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        with autocast():
            tgt, refimg = img(), img()
            z, ref_lat, emb = models.encode_latents(vae, tgt), models.encode_latents(vae, refimg), models.clip_embed(enc, refimg)
            noise = torch.randn(z.shape, generator=g).to(device)
            timesteps = torch.randint(0, 1000, (1,), generator=g).to(device)
            pred = gen(sched.add_noise(z, noise, timesteps), timesteps, emb, conds, ref_lat, emb, torch.zeros(1, dtype=torch.long, device=device))
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t)
        gen.zero_grad(set_to_none=False)
        print(f"02 forward + backward at {W}x{H}, batch 1: {times[-1]:.1f} s")
    step = dict(seconds=times, peak_rss_gib=peak_rss() / GIB,
                peak_cuda_gib=torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None)
    print(f"peak memory of this process: {step['peak_rss_gib']:.1f} GiB (RSS)")

    # ---- 03 as a user runs it, on a generator folder of these weights (what 02 --pretrained writes)
    gfolder = os.path.join(args.work, "generator")
    if not os.path.isfile(os.path.join(gfolder, "args.json")):
        models.save_generator(gfolder, gen.cpu())
        models.save_pretrained_atomic(DDPMScheduler.from_config(models.SD15_SCHEDULE), os.path.join(gfolder, "scheduler"))
        util.save_json(os.path.join(gfolder, "args.json"), dict(pretrained=sd, image_encoder=enc_dir,
                                                                  image_encoder_subfolder="image_encoder", size_hw=[H, W]))
    del gen, unet, ref, vae, enc
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = args.data or os.path.join(args.work, "world")
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], cwd=here, check=True)
    if args.data is None and not os.path.isdir(data):
        run("demo/world.py", "--out", data, "--small", "--workers", "1")
    targets = os.path.join(args.work, "targets")
    if not os.path.isfile(os.path.join(targets, "targets.csv")):
        run("01_render_smpl.py", "targets", "--out", targets, "--num-poses", "1", "--views-per-pose", args.images,
            "--size", f"{W}x{H}")
    out = os.path.join(args.work, "augmented")
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    # through a small wrapper process: a child forked from this (large) process would count our
    # pages in its peak memory until it execs
    wrap = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
           "print('peak', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    p = subprocess.run([sys.executable, "-c", wrap, sys.executable, "03_generate.py", "--generator", gfolder, "--data", data,
                        "--targets", targets, "--out", out, "--refs-per-pid", "1", "--targets-per-ref", str(args.images),
                        "--num-images", str(args.images), "--ddim-steps", str(args.ddim_steps), "--batch-size", str(args.images),
                        "--device", args.device, *(["--amp"] if args.amp else [])],
                       cwd=here, check=True, stdout=subprocess.PIPE, text=True)
    print(p.stdout)
    gen_s = time.time() - t
    peak03 = int(p.stdout.strip().splitlines()[-1].split()[1]) * 1024
    made = len(os.listdir(os.path.join(out, "bounding_box_train")))
    generate = dict(images=made, ddim_steps=args.ddim_steps, guidance=3.5, seconds=gen_s, seconds_per_image=gen_s / made,
                    peak_rss_gib=peak03 / GIB)
    print(f"03: {made} images at {W}x{H}, {args.ddim_steps} DDIM steps with guidance (model loading included): "
          f"{gen_s:.0f} s; peak memory of the 03 process {generate['peak_rss_gib']:.1f} GiB")
    report = dict(device=args.device, amp=args.amp, torch=torch.__version__, threads=torch.get_num_threads(),
                  resolution=[W, H], parameters=n, memory_computed=mem, train_step=step, generate=generate)
    util.save_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    util.run_main(main)
