"""
Run under torchrun (2 CPU processes, gloo) by test_generator.py / test_reid.py: does DDP really
train ONE model with the project's networks? Each rank feeds its own data through the DDP-wrapped
model, and through an unwrapped copy of the same weights (its local gradient); the DDP gradient
must equal the mean of the ranks' local gradients, and after an optimiser step every rank must
hold the same weights. Writes <out>/rank<r>.json with what it measured.

  torchrun --nproc_per_node 2 tests/ddp_worker.py generator|reid OUT
"""
import os
import sys
import copy

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stages import load_stage  # noqa: E402  (and the repository root on sys.path)
import common  # noqa: E402
import util  # noqa: E402
import models  # noqa: E402


def tiny_generator():
    from diffusers import UNet2DConditionModel
    den = UNet2DConditionModel(sample_size=(16, 8), layers_per_block=1, block_out_channels=(16, 32),
                               down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                               cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    gen = common.Generator(copy.deepcopy(den), den, common.build_guiders(den.conv_in.out_channels, 2))
    with torch.no_grad():  # non-zero guider outputs, so that every part gets a gradient
        for g in gen.guiders.values():
            g.out.weight.normal_(0, 0.01)
    return gen


def main():
    what, out = sys.argv[1], sys.argv[2]
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    if what == "generator":
        model = tiny_generator()
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
        B = 2
        conds = {k: torch.rand(B, common.COND_CHANNELS[k], 32, 16, generator=g) for k in common.COND_KINDS}
        batch = (torch.randn(B, 4, 16, 8, generator=g), torch.randint(0, 1000, (B,), generator=g),
                 torch.randn(B, 1, 16, generator=g), conds, torch.randn(B, 4, 16, 8, generator=g),
                 torch.randn(B, 1, 16, generator=g), torch.tensor([0, -1]))
        target = torch.randn(B, 4, 16, 8, generator=g)
        loss_fn = lambda m: F.mse_loss(m(*batch), target)
        s02 = load_stage("02_train_generator.py")  # what 02 does before wrapping: freeze the reference
        models.freeze_unused_reference(model, (16, 8), 16)  # U-Net's layers that get no gradient
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # as 02 wraps it
    else:
        model = models.build_reid_model("resnet18", 8, bnneck=True).eval()  # eval: BN statistics fixed, so the
        g = torch.Generator().manual_seed(100 + rank)                       # local and DDP passes see the same model
        x, y = torch.randn(8, 3, 32, 16, generator=g), torch.arange(4).repeat_interleave(2) + 4 * rank

        def loss_fn(m):
            feat, logits = m(x)
            return common.triplet_loss(feat, y) + F.cross_entropy(logits, y)
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # as 04 wraps it
    local = copy.deepcopy(model)
    loss_fn(local).backward()  # this rank's own gradient, no communication
    loss_fn(ddp).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mine = {n: p.grad.clone() if p.grad is not None else None for n, p in local.named_parameters() if n in names}
    mean_err, n_checked = 0.0, 0
    for n, p in model.named_parameters():
        if n not in names or mine[n] is None:
            continue
        avg = mine[n].clone()
        torch.distributed.all_reduce(avg)
        avg /= world
        mean_err = max(mean_err, float((p.grad - avg).abs().max() / (avg.abs().max() + 1e-12)))
        n_checked += 1
    other = mine[names[-1]].clone()
    torch.distributed.all_reduce(other)  # the ranks' local gradients differ (else the check proves nothing)
    differ = float((other / world - mine[names[-1]]).abs().max())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    same = models.ranks_weight_difference(model)
    util.save_json(os.path.join(out, f"rank{rank}.json"), dict(rank=rank, world=world, checked=n_checked,
                     max_rel_err_vs_mean_of_local=mean_err, local_grads_differ=differ, weight_difference=same))


if __name__ == "__main__":
    util.run_main(main)  # as the stages end: the process group torn down after main() returns
