"""
Building, loading and saving the networks around the paper's machinery (common.py): the frozen
VAE and CLIP image encoder (latents, image embeddings), pretrained weights from a local folder or
a hub id, the generator folders 02 writes and 03 reads, the Re-ID network with its image data
set and feature extraction, and the DDP check that every rank holds the same weights.
"""
import os
import copy
import json
import contextlib
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import COND_KINDS, Generator, PoseGuider, build_guiders, sample_latents
from util import UserError, atomic_write, load_json, save_json

# -----------------------------------------------------------------------------
# the frozen VAE and CLIP image encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SD-1.5's noise schedule: the default for a generator built from scratch. A pretrained folder's
# own scheduler/ wins. 02 saves the schedule it trained with; 03 samples with that same config.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                     steps_offset=1)

def vae_factor(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(vae, images):
    """images (B, 3, H, W) in [-1, 1] -> scaled latents (the posterior mean: deterministic)."""
    z = vae.encode(images.to(vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, z):
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor + shift).sample.clamp(-1, 1)


def clip_pixels(image_encoder, images):
    """images (B, 3, H, W) in [-1, 1] -> the encoder's pixel_values. The whole crop is resized to
    the encoder's square input (CLIP's own preprocessing centre-crops the short side, which cuts
    head and feet off a person crop), then normalised with CLIP's mean and std."""
    s = image_encoder.config.image_size
    x = F.interpolate((images.float() + 1) / 2, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(image_encoder.dtype)


@torch.no_grad()
def clip_embed(image_encoder, images):
    """images (B, 3, H, W) in [-1, 1] -> (B, 1, D) image_embeds, the cross-attention context of
    both U-Nets."""
    return image_encoder(pixel_values=clip_pixels(image_encoder, images)).image_embeds[:, None]


@torch.no_grad()
def encode_images(paths, size, vae, image_encoder, device, autocast, batch_size=64):
    """-> (VAE latents, CLIP embeddings) of every image file, on the device (02 --cache-encodings)."""
    lat, emb = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="encoding the images once"):
        x = torch.stack([load_image_tensor(p, size) for p in paths[i:i + batch_size]]).to(device)
        with autocast():
            lat.append(encode_latents(vae, x).float())
            emb.append(clip_embed(image_encoder, x).float())
    lat, emb = torch.cat(lat), torch.cat(emb)
    print(f"cached the latents and CLIP embeddings of {len(paths)} images "
          f"({(lat.numel() + emb.numel()) * 4 / 2 ** 20:.1f} MB on {device})")
    return lat, emb


def tiny_clip(projection_dim=64, seed=0):
    """A small random CLIPVisionModelWithProjection: the demo's stand-in for CLIP (64x64 input,
    2 layers), frozen in 02 as CLIP is in the paper; demo/image_encoder.py can pretrain it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8, projection_dim=projection_dim)
    return CLIPVisionModelWithProjection(cfg)


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def load_image_tensor(path, size):
    """Image file -> (3, H, W) float in [-1, 1] at size (height, width)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


# -----------------------------------------------------------------------------
# weights: from_pretrained for local folders and hub ids, atomic save_pretrained, generator folders

def save_pretrained_atomic(model, folder):
    """save_pretrained into a temp dir beside `folder`, then swap it in: an interrupted save never
    leaves a half-written model folder behind. The swap is two renames (folder -> folder.old, temp
    -> folder); a kill between them leaves only folder.old, which recover_folder() (called here and
    by from_pretrained) moves back, so a resumed run always finds a complete folder."""
    folder = os.path.abspath(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    recover_folder(folder)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp_")
    try:
        model.save_pretrained(tmp)
        swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp, folder):
    """Replace `folder` by the complete folder `tmp` (beside it): folder -> folder.old, tmp ->
    folder, then drop folder.old; recover_folder() finishes or undoes a swap a kill interrupted."""
    folder = os.path.abspath(folder)
    recover_folder(folder)
    if os.path.isdir(folder):
        os.replace(folder, folder + ".old")
        os.replace(tmp, folder)
        shutil.rmtree(folder + ".old")
    else:
        os.replace(tmp, folder)


def recover_folder(folder):
    """Finish or undo a swap of save_pretrained_atomic that a kill interrupted."""
    old = os.path.abspath(folder) + ".old"
    if os.path.isdir(old):
        if os.path.isdir(folder):
            shutil.rmtree(old)          # killed after the swap: the new folder is complete
        else:
            os.replace(old, folder)     # killed between the renames: the previous folder comes back


def from_pretrained(cls, path_or_id, subfolder=None, what="weights"):
    """cls.from_pretrained(local folder or hub id) with one clear line for the usual mistakes
    (missing path, not a diffusers/transformers folder, hub unreachable) instead of a traceback.
    The same call loads SD-1.5 ("stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder "unet") and the
    folders 02 writes."""
    config_name = getattr(cls, "config_name", None) or "config.json"
    recover_folder(path_or_id)
    where = os.path.join(path_or_id, subfolder) if subfolder else path_or_id
    if os.path.isdir(path_or_id):
        if not os.path.isfile(os.path.join(where, config_name)):
            raise UserError(f"{what} '{path_or_id}' is not a diffusers/transformers folder: "
                            f"'{os.path.join(where, config_name)}' is missing")
    elif os.path.exists(path_or_id):
        raise UserError(f"{what} '{path_or_id}' is a file, not a folder: give a diffusers/transformers folder or a hub id")
    elif path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") != 1:
        raise UserError(f"{what} '{path_or_id}' does not exist (give a local folder or a hub id like "
                        f"'stable-diffusion-v1-5/stable-diffusion-v1-5')")
    kw = {"subfolder": subfolder} if subfolder else {}
    import transformers
    transformers.utils.logging.disable_progress_bar()  # (a bar per loaded model: noise in the stage's output)
    if cls.__module__.startswith("diffusers.models"):
        from diffusers.utils import is_accelerate_available
        kw["low_cpu_mem_usage"] = is_accelerate_available()  # no warning per model when it is absent
    try:
        with warnings.catch_warnings():  # huggingface_hub deprecation noise on every hub lookup
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return cls.from_pretrained(path_or_id, **kw)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {what} from '{where}': {msg}")


def load_config(cls, path_or_id, subfolder=None):
    """cls's config (no weights) from a local folder or hub id; one clear line when it is not there."""
    try:
        return cls.load_config(path_or_id, subfolder=subfolder)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read the config of '{path_or_id}'{f' ({subfolder}/)' if subfolder else ''}: {msg}")


def has_file(path_or_id, filename):
    """Whether a local folder, or a hub repo (its local cache under HF_HUB_OFFLINE=1), has this file:
    how a hub id and a local folder of the same layout get the same treatment."""
    if os.path.isdir(path_or_id):
        return os.path.isfile(os.path.join(path_or_id, filename))
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(path_or_id, filename)  # a config-sized file; offline it comes from the cache
        return True
    except Exception:
        return False


def save_guiders(path, guiders):
    from safetensors.torch import save_file
    meta = {"config": json.dumps({k: dict(in_channels=g.body[0].in_channels, out_channels=g.out.out_channels,
                                          widths=[m.out_channels for m in g.body if isinstance(m, nn.Conv2d)])
                                  for k, g in guiders.items()})}
    sd = {k: v.detach().cpu().contiguous() for k, v in guiders.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def load_guiders(path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise UserError(f"pose guider weights '{path}' are missing")
    try:  # a truncated copy, or another file under this name: one line
        with safe_open(path, "pt") as f:
            cfg = json.loads(f.metadata()["config"])
        guiders = nn.ModuleDict()
        for k in COND_KINDS:
            c = cfg[k]
            w = c["widths"][0::2]  # the body's convs: first, then (stride-1, stride-2) per level
            guiders[k] = PoseGuider(c["in_channels"], c["out_channels"], len(w) - 1, widths=tuple(w))
        guiders.load_state_dict(load_file(path))
    except Exception as e:
        why = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
        raise UserError(f"pose guider weights '{path}' cannot be read ({type(e).__name__}: {why}): the generator "
                        f"folder is damaged; copy it again, or train it again with 02_train_generator.py")
    return guiders


def save_generator(folder, gen):
    save_pretrained_atomic(gen.reference_unet, os.path.join(folder, "reference_unet"))
    save_pretrained_atomic(gen.denoising_unet, os.path.join(folder, "denoising_unet"))
    save_guiders(os.path.join(folder, "guiders.safetensors"), gen.guiders)


def write_generator_files(args, schedule, sources, carries_frozen_parts, vae, enc, n_unreadable=0):
    """The rest of the folder 02 writes (save_generator writes the trained parts): args.json (02's
    settings, where the frozen parts come from, how many training images could not be read),
    scheduler/, and vae/ + image_encoder/ when the generator owns them."""
    from diffusers import DDPMScheduler
    run_args = dict(vars(args), size=f"{args.size[1]}x{args.size[0]}", **sources)
    run_args.update(size_hw=list(args.size), vae_factor=vae_factor(vae), conditions_kinds=list(COND_KINDS))
    if n_unreadable:
        run_args["unreadable_images"] = n_unreadable
    save_json(os.path.join(args.out, "args.json"), run_args)
    save_pretrained_atomic(DDPMScheduler.from_config(schedule), os.path.join(args.out, "scheduler"))
    if carries_frozen_parts:
        for sub, m in (("vae", vae), ("image_encoder", enc)):
            if not os.path.isdir(os.path.join(args.out, sub)):
                save_pretrained_atomic(m, os.path.join(args.out, sub))


def load_generator(folder):
    """-> (Generator, vae, image_encoder, noise-schedule config, args dict) from a folder that
    02_train_generator.py wrote. The VAE / image encoder come from the folder when 02 trained or
    brought them (demo/scratch_generator.py's), else from the pretrained sources recorded in args.json."""
    from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler
    from transformers import CLIPVisionModelWithProjection
    args_path = os.path.join(folder, "args.json")
    if not os.path.isfile(args_path):
        raise UserError(f"'{folder}' is not a generator folder written by 02_train_generator.py (no args.json)")
    args = load_json(args_path)
    ref = from_pretrained(UNet2DConditionModel, os.path.join(folder, "reference_unet"), what="reference U-Net")
    den = from_pretrained(UNet2DConditionModel, os.path.join(folder, "denoising_unet"), what="denoising U-Net")
    gen = Generator(ref, den, load_guiders(os.path.join(folder, "guiders.safetensors")))
    own = lambda sub: os.path.isdir(os.path.join(folder, sub))
    vae = (from_pretrained(AutoencoderKL, os.path.join(folder, "vae"), what="VAE") if own("vae") else
           from_pretrained(AutoencoderKL, args["pretrained"], "vae", what="VAE"))
    enc = (from_pretrained(CLIPVisionModelWithProjection, os.path.join(folder, "image_encoder"), what="image encoder")
           if own("image_encoder") else
           from_pretrained(CLIPVisionModelWithProjection, args["image_encoder"], args.get("image_encoder_subfolder"),
                           what="image encoder"))
    schedule = dict(from_pretrained(DDPMScheduler, os.path.join(folder, "scheduler"), what="noise schedule").config)
    return gen, vae.eval().requires_grad_(False), enc.eval().requires_grad_(False), schedule, args


def generator_from_pretrained(pretrained, image_encoder, encoder_subfolder=None, random_unets=False, seed=0):
    """A new generator from SD-1.5 (paper 3.4): both U-Nets start from its U-Net, the pose guiders
    at random; its VAE and the CLIP image encoder, frozen. random_unets: the U-Net's architecture
    with random weights (Table 1's row (V)). -> (Generator, vae, image_encoder, noise-schedule
    config, sources dict: where the frozen parts come from, for args.json)."""
    from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler
    from transformers import CLIPVisionModelWithProjection
    if random_unets:
        torch.manual_seed(seed + 9)
        unet = UNet2DConditionModel.from_config(load_config(UNet2DConditionModel, pretrained, "unet"))
    else:
        unet = from_pretrained(UNet2DConditionModel, pretrained, "unet", what="pretrained weights")
    vae = from_pretrained(AutoencoderKL, pretrained, "vae", what="pretrained weights")
    sub = encoder_subfolder
    if sub is None and not has_file(image_encoder, "config.json") and has_file(image_encoder, "image_encoder/config.json"):
        sub = "image_encoder"  # e.g. lambdalabs/sd-image-variations-diffusers, a hub id or a local copy
    enc = from_pretrained(CLIPVisionModelWithProjection, image_encoder, sub, what="image encoder")
    if enc.config.projection_dim != unet.config.cross_attention_dim:
        raise UserError(f"image encoder projection dim {enc.config.projection_dim} != U-Net cross_attention_dim "
                        f"{unet.config.cross_attention_dim}: pick a matching image encoder")
    if has_file(pretrained, "scheduler/scheduler_config.json"):  # the weights' own schedule
        schedule = dict(from_pretrained(DDPMScheduler, pretrained, "scheduler", what="noise schedule").config)
    else:
        schedule = dict(SD15_SCHEDULE)
        print(f"'{pretrained}' has no scheduler/: training with SD-1.5's noise schedule")
    print(f"weights: {'random U-Nets of the architecture of' if random_unets else 'U-Net +'} VAE from "
          f"'{pretrained}', image encoder from '{image_encoder}'")
    ref = copy.deepcopy(unet)  # both U-Nets start from the same weights (paper 3.4)
    torch.manual_seed(seed + 5)  # the guiders' random initialisation
    gen = Generator(ref, unet, build_guiders(unet.conv_in.out_channels, vae_factor(vae)))
    sources = dict(pretrained=pretrained, image_encoder=image_encoder, image_encoder_subfolder=sub)
    return gen, vae.eval().requires_grad_(False), enc.eval().requires_grad_(False), schedule, sources


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



@torch.no_grad()
def sample_grid(gen, vae, enc, schedule, val, device, autocast, seed, ddim_steps, guidance):
    """02's validation grid: one row per (target, reference, maps) of val, the columns reference |
    depth | normal | skeleton | generated | target, as uint8 (H, W, 3)."""
    from diffusers import DDIMScheduler
    gen.eval()
    tgt, refs, conds = val
    with autocast():
        ref_lat = encode_latents(vae, refs.to(device))
        emb = clip_embed(enc, refs.to(device))
        bank = gen.reference(ref_lat, emb)
        pose = gen.pose({k: v.to(device, memory_format=torch.channels_last) for k, v in conds.items()})
        noise = torch.randn(ref_lat.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        idx = torch.arange(len(refs), device=device)
        z = sample_latents(gen, DDIMScheduler.from_config(schedule), noise, emb, pose, bank, idx,
                           steps=ddim_steps, guidance=guidance)
        out = decode_latents(vae, z)
    gen.train()
    cells = [to_uint8(refs)] + [to_uint8(conds[k].expand(-1, 3, -1, -1) * 2 - 1) for k in COND_KINDS]
    cells += [to_uint8(out), to_uint8(tgt)]
    rows = [np.concatenate([c[i] for c in cells], axis=1) for i in range(len(refs))]
    return np.concatenate(rows, axis=0)


@contextlib.contextmanager
def ema_weights(gen, ema):
    """The EMA weights in gen for a while (export, samples), then the trained ones back."""
    if ema is None:
        yield
        return
    ema.store(gen.parameters())
    ema.copy_to(gen.parameters())
    try:
        yield
    finally:
        ema.restore(gen.parameters())


# -----------------------------------------------------------------------------
# the Re-ID network, its images, its features; DDP's check

def build_reid_model(arch, num_classes, weights=None, bnneck=False, width_mult=1.0):
    """torchvision trunk (ResNet50 in the paper; any torchvision classifier with an fc head,
    e.g. resnet18 or shufflenet_v2_x0_5 for CPU runs) -> global average pool -> feature (2048-d
    for resnet50, the paper's triplet feature) -> linear classifier (cross-entropy). By default no
    BNNeck: the paper uses the pooled feature for both losses. bnneck=True (Luo et al. 2019, "Bag of Tricks") puts a
    BatchNorm1d between the feature and a bias-free classifier: the triplet loss still sees the
    pooled feature, cross-entropy a normalised copy, so a trunk trained from scratch cannot satisfy
    both by shrinking every feature to one point. forward() returns (pooled feature, logits) either
    way; the pooled feature is what 05 ranks. weights: None, 'imagenet' (torchvision download), or
    a path to a torchvision state dict for the trunk. width_mult: a ResNet with every channel
    width scaled (0.25: 1/16 of the compute), for the CPU demo, where it buys 8x the iterations."""
    import torchvision  # only the Re-ID stages need it

    if arch not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown --arch '{arch}': use a torchvision classifier with an fc head "
                        f"(resnet50, resnet18, shufflenet_v2_x0_5, regnet_x_400mf, ...)")
    trunk = torchvision.models.get_model(arch, weights=None)
    if not isinstance(getattr(trunk, "fc", None), torch.nn.Linear):
        raise UserError(f"--arch '{arch}' has no fc head: use a ResNet, ResNeXt, RegNet or ShuffleNetV2")
    if width_mult != 1.0:
        if not isinstance(trunk, torchvision.models.ResNet) or weights not in (None, "none"):
            raise UserError(f"--width-mult works on a ResNet trained from scratch, not '{arch}' with weights '{weights}'")
        trunk = slim_resnet(trunk, width_mult)
    if weights == "imagenet":
        url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
        try:
            state = torch.hub.load_state_dict_from_url(url, progress=False)
        except Exception as e:
            raise UserError(f"cannot download ImageNet weights for {arch} from {url} ({type(e).__name__}); "
                            f"on a machine without internet download that file elsewhere and pass "
                            f"--backbone-weights PATH, or use --backbone-weights none")
        trunk.load_state_dict(state)
    elif weights not in (None, "none"):
        if not os.path.isfile(weights):
            raise UserError(f"backbone weights file '{weights}' does not exist")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            missing, _ = trunk.load_state_dict(state, strict=False)
        except Exception as e:
            raise UserError(f"backbone weights '{weights}' cannot be read as a torchvision {arch} state dict "
                            f"({type(e).__name__}): download the file again, or use --backbone-weights none")
        if [k for k in missing if not k.startswith("fc.")]:
            raise UserError(f"'{weights}' is not a torchvision {arch} state dict (missing {missing[:3]} ...)")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feat_dim = trunk.fc.in_features
            trunk.fc = torch.nn.Identity()  # trunk(x) is now the globally pooled feature
            self.backbone = trunk
            self.neck = torch.nn.BatchNorm1d(self.feat_dim) if bnneck else torch.nn.Identity()
            if bnneck:
                self.neck.bias.requires_grad_(False)  # a scale per channel, no shift (Bag of Tricks)
            self.classifier = torch.nn.Linear(self.feat_dim, num_classes, bias=not bnneck)

        def forward(self, x):
            f = self.backbone(x)
            return f, self.classifier(self.neck(f))

    return Net()


def slim_resnet(net, mult):
    """The same torchvision ResNet (blocks, depths, strides) with channel widths 64, 128, 256, 512
    scaled by mult; its own _make_layer builds the stages, its own initialisation follows."""
    w = [max(8, round(64 * mult * 2 ** i)) for i in range(4)]
    block = type(net.layer1[0])
    depths = [len(getattr(net, f"layer{i + 1}")) for i in range(4)]
    net.inplanes = w[0]
    net.conv1 = torch.nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(w[0])
    for i in range(4):
        setattr(net, f"layer{i + 1}", net._make_layer(block, w[i], depths[i], stride=1 if i == 0 else 2))
    net.fc = torch.nn.Linear(w[3] * block.expansion, net.fc.out_features)
    for m in net.modules():  # torchvision ResNet's initialisation
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return net


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageDataset:
    """Map-style data set over [(path, label, camid)] for torch's DataLoader (which needs only
    __len__ and __getitem__): returns (transform(RGB image), label, camid). preload=(H, W):
    decode and resize every image once, into one uint8 tensor; transform then gets a uint8
    (3, H, W) tensor instead of a PIL image (on a CPU, decoding 64 small JPEGs per step costs
    as much as the step of a slim network)."""

    def __init__(self, items, transform, preload=None):
        self.items, self.transform, self.images = items, transform, None
        if preload:
            import torchvision.transforms as T
            load = T.Compose([T.Resize(preload), T.PILToTensor()])
            self.images = torch.empty(len(items), 3, *preload, dtype=torch.uint8)
            for i, (path, _, _) in enumerate(tqdm(items, desc="preloading images", mininterval=1.0)):
                with Image.open(path) as im:
                    self.images[i] = load(im.convert("RGB"))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, camid = self.items[i]
        if self.images is not None:
            return self.transform(self.images[i]), label, camid
        with Image.open(path) as im:
            img = im.convert("RGB")
        return self.transform(img), label, camid


def check_images(items, what="images", bar=True):
    """Decode every image once; corrupt or unreadable files are dropped with a warning naming
    them, so that training never dies on image 9,000 of an epoch. Returns (kept, num_bad).
    bar=None: a progress bar on a terminal only."""
    kept, bad = [], 0
    for it in tqdm(items, desc=f"checking {what}", leave=False, mininterval=1.0, disable=None if bar is None else not bar):
        try:
            with Image.open(it[0]) as im:
                im.load()
            kept.append(it)
        except Exception as e:
            bad += 1
            warnings.warn(f"skipping unreadable image '{it[0]}' ({type(e).__name__}: {e})")
    if not kept:
        raise UserError(f"none of the {len(items)} {what} could be read")
    return kept, bad


def unreadable_images(paths, what="images"):
    """-> [(path, why)] of the image files that do not decode (for callers that stop rather than skip)."""
    bad = []
    for path in tqdm(paths, desc=f"checking {what}", leave=False, mininterval=1.0, disable=None):
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:
            bad.append((path, f"{type(e).__name__}: {e}"))
    return bad


def ranks_weight_difference(module):
    """Under DDP every rank must end with the same weights (a rank whose gradients were not
    averaged with the others' trains a model of its own). -> the largest difference between the
    ranks' per-tensor sums and sums of squares (0.0 when they hold identical weights)."""
    p = [q.detach().double() for q in module.parameters()]
    v = torch.stack([q.sum() for q in p] + [(q * q).sum() for q in p])
    everyone = [torch.zeros_like(v) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, v)
    return float(torch.stack(everyone).amax(0).sub(torch.stack(everyone).amin(0)).max())


def check_ranks_agree(module, world, is_main):
    """After DDP training: stop with an error when the ranks' weights differ."""
    diff = ranks_weight_difference(module)
    if is_main:
        print(f"{world} ranks hold identical weights" if diff == 0 else f"ranks differ by {diff:.3g}")
    if diff:
        raise RuntimeError(f"the {world} DDP ranks ended with different weights (max difference {diff:.3g})")


def extract_features(model, items, device, height, width, batch_size=128, workers=2, flip=False):
    """The pooled feature (what the triplet loss and the evaluation rank) of every image of
    [(path, pid, camid)], in order; flip: averaged with the mirrored image's."""
    import torchvision.transforms as T
    transform = T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=batch_size, num_workers=workers,
                                         shuffle=False)
    feats = []
    with torch.no_grad():
        for x, _, _ in tqdm(loader, desc="features", leave=False, mininterval=1.0):
            x = x.to(device, memory_format=torch.channels_last)  # (as 04 trains)
            f = model(x)[0]
            if flip:
                f = (f + model(x.flip(3))[0]) / 2
            feats.append(f.float().cpu())
    return torch.cat(feats)


def load_reid_model(path, device="cpu"):
    """model.pt written by 04_train_reid.py -> (network in eval mode, the checkpoint dict)."""
    if os.path.isdir(path):
        raise UserError(f"model file '{path}' is a folder: pass the model.pt that 04_train_reid.py wrote in it")
    if not os.path.isfile(path):
        raise UserError(f"model file '{path}' does not exist: train it with 04_train_reid.py")
    try:  # weights_only: tensors and plain values only, so loading a shared file never runs code from it
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = build_reid_model(ckpt["arch"], ckpt["num_classes"], bnneck=ckpt.get("bnneck", False),
                                 width_mult=ckpt.get("width_mult", 1.0))
        model.load_state_dict(ckpt["state_dict"])
    except UserError:
        raise
    except Exception as e:
        why = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"'{path}' is not a Re-ID model written by 04_train_reid.py ({type(e).__name__}: {why}): "
                        f"train one with 04, or pass the model.pt it wrote")
    return model.to(device, memory_format=torch.channels_last).eval(), ckpt
