"""
The paper's shared machinery, in the paper's order.
  1. reference attention: the reference U-Net's self-attention inputs become extra keys/values
     of the denoising U-Net's self-attention (paper 3.4, Figure 4)
  2. the generator: pose guiders, the null condition, Generator (both U-Nets + guiders)
  3. sampling: DDIM with classifier-free guidance
  4. Re-ID: batch-hard triplet loss; mAP/CMC by the Market-1501 protocol, one query at a time
Bodies, cameras and condition maps are in body.py; loading and saving networks in models.py;
errors, atomic writes and Re-ID data sets on disk in util.py; the same evaluation vectorised (what
05 runs, equal to section 4's) in evaluate_fast.py.
"""
import math
import functools

import numpy as np
import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# 1. Reference attention
# The reference U-Net runs once on the clean reference latent (t = 0); in every
# BasicTransformerBlock it stores the input of self-attention (attn1). The denoising U-Net's
# block of the SAME qualified name then attends over concat([its own tokens, the stored ones]).
# Forward pre-hooks on attn1 do this without copying any attention code.

REF_KEY = "diffid_reference"  # key in cross_attention_kwargs that carries the reference context


def _reference_hook(name, module, args, kwargs):
    """Forward pre-hook on attn1 (self-attention) of every BasicTransformerBlock of both U-Nets.
    The context rides in cross_attention_kwargs, so it arrives with the call that uses it, and
    gradient checkpointing's recomputation during backward sees the same context as the forward
    (state set on a module around a call is gone by then). Contexts:
      {"write": bank}: reference U-Net: store attn1's input under this block's qualified name.
      {"read": bank, "index": idx, "null": mask or None}: denoising U-Net: keys/values from
         concat([h, bank[name][idx]], tokens), queries from h only, so the output keeps h's
         tokens (the paper's "first half"). Rows with idx -1 (the null condition) get their
         reference tokens masked out: their attention is exactly over h.
    No context: plain self-attention, the U-Net is untouched."""
    ctx = kwargs.pop(REF_KEY, None)
    if ctx is None:
        return args, kwargs
    h = args[0] if args else kwargs["hidden_states"]
    if "write" in ctx:
        ctx["write"][name] = h
        return args, kwargs
    if kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
        raise RuntimeError(f"reference attention: {name}.attn1 already has a context or mask")
    ref = ctx["read"][name].to(h.dtype)[ctx["index"].clamp(min=0)]
    kwargs["encoder_hidden_states"] = torch.cat([h, ref], dim=1)
    if ctx["null"] is not None:
        mask = h.new_zeros(h.shape[0], 1, h.shape[1] + ref.shape[1])
        mask[ctx["null"], :, h.shape[1]:] = float("-inf")
        kwargs["attention_mask"] = mask
    return args, kwargs


def _drop_reference_kwarg(module, args, kwargs):
    # attn2 receives the same cross_attention_kwargs; the processor would warn about the key
    kwargs.pop(REF_KEY, None)
    return args, kwargs


def attach_reference_attention(reference_unet, denoising_unet):
    """Hook every BasicTransformerBlock's attn1 of both U-Nets. Blocks are paired by qualified
    name (e.g. 'down_blocks.1.attentions.0.transformer_blocks.0'), never by width or order of
    calls: two blocks of one width exist at several depths. Returns the block names."""
    from diffusers.models.attention import BasicTransformerBlock
    def blocks(unet):
        return [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    names = blocks(reference_unet)
    if not names or names != blocks(denoising_unet):
        raise ValueError("reference and denoising U-Net must have the same config with attention blocks")
    for unet in (reference_unet, denoising_unet):
        if getattr(unet, "_diffid_hooked", False):
            raise ValueError("reference attention hooks are already attached to this U-Net")
        unet._diffid_hooked = True
        for n in names:
            block = unet.get_submodule(n)
            block.attn1.register_forward_pre_hook(functools.partial(_reference_hook, n), with_kwargs=True)
            if block.attn2 is not None:
                block.attn2.register_forward_pre_hook(_drop_reference_kwarg, with_kwargs=True)
    return names

# -----------------------------------------------------------------------------
# 2. The generator: pose guiders (one per condition map), the null condition, both U-Nets

COND_KINDS = ("depth", "normal", "skeleton")  # the condition maps (their encoding: body.py)
COND_CHANNELS = {"depth": 1, "normal": 3, "skeleton": 3}
GUIDER_WIDTHS = (16, 32, 96, 256)  # pose guider widths, as in the paper's relatives (AnimateAnyone)


class PoseGuider(nn.Module):
    """One condition map -> features at latent resolution. Conv 3x3 -> 16 + SiLU, then per level
    a stride-1 and a stride-2 conv (widths GUIDER_WIDTHS), `levels` = log2 of the VAE factor,
    then ONE zero-initialised conv: the generator starts as the plain U-Net, and the zero conv
    still gets a gradient because its input is not zero (two zero layers in series would not)."""

    def __init__(self, in_channels, out_channels, levels, widths=GUIDER_WIDTHS):
        super().__init__()
        level_widths = [widths[min(i, len(widths) - 1)] for i in range(levels + 1)]
        layers = [nn.Conv2d(in_channels, level_widths[0], 3, padding=1), nn.SiLU()]
        for width, next_width in zip(level_widths[:-1], level_widths[1:]):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(width, next_width, 3, padding=1, stride=2), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(level_widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return self.out(self.body(x))


def build_guiders(conv_in_channels, vae_factor, widths=GUIDER_WIDTHS):
    """One guider per condition; output widths split conv_in's output channels (320 for SD-1.5)
    so that their concatenation can be added to the projected noisy latent."""
    levels = int(round(math.log2(vae_factor)))
    if 2 ** levels != vae_factor:
        raise ValueError(f"VAE downsampling factor {vae_factor} is not a power of 2")
    n_kinds = len(COND_KINDS)
    out_channels = [conv_in_channels // n_kinds + (i < conv_in_channels % n_kinds) for i in range(n_kinds)]
    return nn.ModuleDict({kind: PoseGuider(COND_CHANNELS[kind], channels, levels, widths)
                          for kind, channels in zip(COND_KINDS, out_channels)})


def null_condition(emb, index, drop):
    """THE null condition, shared by training (dropout, p=0.1) and sampling (the unconditional
    branch of classifier-free guidance): no reference (index -1) AND a zero CLIP embedding,
    dropped together. Pose maps stay in both branches."""
    emb = torch.where(drop[:, None, None], torch.zeros_like(emb), emb)
    index = torch.where(drop, torch.full_like(index, -1), index)
    return emb, index


class Generator(nn.Module):
    """Everything that trains: reference U-Net, denoising U-Net, pose guiders."""

    def __init__(self, reference_unet, denoising_unet, guiders):
        super().__init__()
        self.reference_unet, self.denoising_unet, self.guiders = reference_unet, denoising_unet, guiders
        self.block_names = attach_reference_attention(reference_unet, denoising_unet)
        self._pose = None
        # pose features are added to conv_in's OUTPUT (the projected noisy latent, paper 3.4);
        # conv_in is never inside a checkpointed segment, so state set around the call is safe
        denoising_unet.conv_in.register_forward_hook(self._add_pose)

    def _add_pose(self, module, args, out):
        return out if self._pose is None else out + self._pose.to(out.dtype)

    def reference(self, latents, emb):
        """Reference U-Net on clean reference latents at t = 0 -> bank {block name: attn1 input}.
        A fresh bank every call: nothing from an earlier reference or micro-batch can leak in."""
        bank = {}
        t = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        self.reference_unet(latents, t, encoder_hidden_states=emb, cross_attention_kwargs={REF_KEY: {"write": bank}})
        return bank

    def pose(self, conds):
        """{kind: (B, C, H, W) maps in [0, 1]} -> (B, conv_in channels, h, w)."""
        return torch.cat([self.guiders[k](conds[k]) for k in COND_KINDS], dim=1)

    def denoise(self, noisy, t, emb, pose, bank=None, index=None):
        """Denoising U-Net prediction. bank=None: no reference attention at all; else row i
        attends to reference index[i] of the bank (-1: none)."""
        kw = None
        if bank is not None:
            null = index < 0
            kw = {REF_KEY: {"read": bank, "index": index, "null": null if bool(null.any()) else None}}
        self._pose = pose
        try:
            return self.denoising_unet(noisy, t, encoder_hidden_states=emb, cross_attention_kwargs=kw).sample
        finally:
            self._pose = None

    def forward(self, noisy, t, emb, conds, ref_latents, ref_emb, index):
        """One training prediction in one call (what DDP wraps)."""
        return self.denoise(noisy, t, emb, self.pose(conds), self.reference(ref_latents, ref_emb), index)

# -----------------------------------------------------------------------------
# 3. Sampling: DDIM + classifier-free guidance

@torch.no_grad()
def sample_latents(gen, scheduler, noise, emb, pose, bank, index, steps=25, guidance=3.5):
    """DDIM + classifier-free guidance, `steps` sampling steps. noise (B, 4, h, w); emb (B, 1, D)
    CLIP embedding of each row's reference; pose (B, C, h, w) guider features (computed once,
    reused every step); bank + index: reference features (computed ONCE per reference by the
    caller) and which one each row uses. The unconditional branch is null_condition(): the
    training null exactly."""
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    guided = guidance != 1.0
    if guided:  # [uncond rows; cond rows] in one batch
        emb_null, index_null = null_condition(emb, index, torch.ones_like(index, dtype=torch.bool))
        emb, index, pose = torch.cat([emb_null, emb]), torch.cat([index_null, index]), torch.cat([pose, pose])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
        eps = gen.denoise(model_input, t, emb, pose, bank, index)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps.float(), t, latents).prev_sample
    return latents

# -----------------------------------------------------------------------------
# 4. Re-ID: batch-hard triplet loss (paper 4.2), mAP and CMC (the Market-1501 protocol)

def pairwise_euclidean(x, y):
    """Euclidean distances between rows of x and rows of y (torch), clamped before the sqrt so
    the gradient stays finite when two features coincide."""
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * x @ y.t()
    return d2.clamp_min(1e-12).sqrt()


def triplet_loss(features, labels, margin=0.5):
    """Batch-hard triplet loss (Hermans et al. 2017; the paper's margin 0.5): for each anchor,
    the farthest positive and the nearest negative in the batch, hinge on their difference."""
    d = pairwise_euclidean(features, features)
    same = labels[:, None] == labels[None, :]
    hardest_pos = d.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(same, float("inf")).amin(1)
    return torch.relu(hardest_pos - hardest_neg + margin).mean()

# The Market-1501 protocol (torchreid's eval_market1501; every toolkit shares it), per query:
#   1. rank the whole gallery by distance, ties kept in gallery order (a stable sort);
#   2. drop what the query is not scored on: junk images (pid -1; util.list_split already leaves
#      them out when it reads a split) and the gallery items of the query's own pid seen by the
#      query's own camera (too easy);
#   3. a query with no match left is skipped (and counted);
#   4. AP = mean over its matches of the precision at each match (no interpolation);
#      CMC@k = 1 if a match is within the first k; mINP = #matches / rank of the last match.
# mAP, CMC and mINP are the means over the valid queries. evaluate_fast.py computes the same
# numbers without a loop over queries (what 05 runs); the tests hold it to this one.

JUNK_PID = -1


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The protocol above, one query at a time. distmat (num_query, num_gallery); pids and camids
    int arrays. -> dict(mAP, mINP, cmc (length min(max_rank, gallery without junk)),
    num_valid_queries, num_skipped_queries)."""
    distmat, q_pids, g_pids, q_camids, g_camids = map(np.asarray, (distmat, q_pids, g_pids, q_camids, g_camids))
    check_rank_inputs(distmat, q_pids, g_pids)
    max_rank = min(max_rank, int((g_pids != JUNK_PID).sum()))
    cmcs, aps, inps = [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")                                           # 1
        pids, cams = g_pids[order], g_camids[order]
        dropped = (pids == JUNK_PID) | ((pids == q_pids[i]) & (cams == q_camids[i]))            # 2
        matches = pids[~dropped] == q_pids[i]
        if not matches.any():                                                                    # 3
            continue
        hit_ranks = np.flatnonzero(matches) + 1          # 1-based ranks of the matches
        aps.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))                       # 4
        cmcs.append((np.arange(1, max_rank + 1) >= hit_ranks[0]).astype(float))
        inps.append(len(hit_ranks) / hit_ranks[-1])
    if not aps:
        raise ValueError("no query has a match in the gallery from another camera")
    return dict(mAP=float(np.mean(aps)), mINP=float(np.mean(inps)), cmc=np.mean(cmcs, 0),
                num_valid_queries=len(aps), num_skipped_queries=len(q_pids) - len(aps))


def check_rank_inputs(distmat, q_pids, g_pids):
    """What both evaluators refuse: a distance matrix that does not fit the ids, or NaN in it."""
    num_q, num_g = distmat.shape
    if num_q != len(q_pids) or num_g != len(g_pids):
        raise ValueError(f"distmat is {distmat.shape} but there are {len(q_pids)} query / {len(g_pids)} gallery ids")
    if np.isnan(distmat).any():
        raise ValueError("distmat contains NaN")
