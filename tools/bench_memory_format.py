"""
Benchmark of the memory layout the stages train in: channels-last (NHWC, what 02, 03 and 04 use)
against PyTorch's default contiguous NCHW, for the two models the demo spends its time on:
  - one fine-tuning step of the shipped demo generator (reference U-Net + denoising U-Net + pose
    guiders, forward, backward and AdamW), batch 16 at 64x128, the threads torch has;
  - one training iteration of the demo Re-ID network (ResNet18 at a quarter width with BNNeck,
    forward, backward and Adam), batch 80 at 64x32, ONE thread (run_all.sh runs two at a time).
The layouts alternate (--rounds), so that a machine whose speed drifts hurts both alike. Prints
the median times and the ratio, and checks that both layouts compute the same loss and gradients
(in float64, exit 1 if not).

  python tools/bench_memory_format.py [--rounds 3] [--steps 10] [--generator assets/demo_generator]
"""
import os
import sys
import time
import argparse
import statistics

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common  # noqa: E402
import models  # noqa: E402
import util  # noqa: E402

LAYOUTS = {"contiguous (NCHW)": torch.contiguous_format, "channels_last (NHWC)": torch.channels_last}


def generator_case(folder):
    """-> (model, step(fmt) -> loss): the fine-tuning step of 02 on random inputs."""
    gen = models.load_generator(folder)[0].train()
    g = torch.Generator().manual_seed(0)
    B = 16
    conds = {k: torch.rand(B, common.COND_CHANNELS[k], 128, 64, generator=g) for k in common.COND_KINDS}
    z, ref = torch.randn(B, 4, 16, 8, generator=g), torch.randn(B, 4, 16, 8, generator=g)
    emb, t = torch.randn(B, 1, gen.denoising_unet.config.cross_attention_dim, generator=g), torch.randint(0, 1000, (B,), generator=g)
    opt = torch.optim.AdamW(gen.parameters(), lr=0.0)  # lr 0: the weights stay, every round times the same step

    def step(fmt, dtype=torch.float32):
        c = {k: v.to(dtype, memory_format=fmt) for k, v in conds.items()}
        e = emb.to(dtype)
        loss = gen(z.to(dtype), t, e, c, ref.to(dtype), e, torch.arange(B)).square().mean()
        loss.backward()
        opt.step()
        return loss
    return gen, opt, step


def reid_case():
    net = models.build_reid_model("resnet18", 120, weights=None, bnneck=True, width_mult=0.25).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 3, 64, 32, generator=g), torch.randint(0, 120, (80,), generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=0.0)

    def step(fmt, dtype=torch.float32):
        feat, logits = net(x.to(dtype, memory_format=fmt))
        loss = torch.nn.functional.cross_entropy(logits, y) + feat.square().mean()
        loss.backward()
        opt.step()
        return loss
    return net, opt, step


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def compare(name, case, rounds, steps, threads):
    torch.set_num_threads(threads)
    model, opt, step = case
    # the same function in both layouts: loss and gradients of one step agree. In float64, because
    # in float32 BatchNorm's backward (a difference of means) turns summation-order rounding into
    # gradient differences far above rounding in a randomly initialised ResNet
    out = {}
    model.double()
    for label, fmt in LAYOUTS.items():
        model.to(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        out[label] = (step(fmt, torch.float64).item(), grads(model))
    model.float()
    opt.state.clear()  # (its float64 moments)
    (l0, g0), (l1, g1) = out.values()
    # relative to the whole gradient's norm: tensors whose gradient is ~0 would make a per-tensor ratio meaningless
    worst = (torch.cat([(a - b).flatten() for a, b in zip(g0, g1)]).norm() / torch.cat([a.flatten() for a in g0]).norm()).item()
    same = abs(l0 - l1) <= 1e-9 * abs(l0) and worst < 1e-9
    times = {label: [] for label in LAYOUTS}
    for _ in range(rounds):
        for label, fmt in LAYOUTS.items():
            model.to(memory_format=fmt)
            step(fmt)  # warm-up: the first call in a layout picks its kernels
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                step(fmt)
                times[label].append(time.perf_counter() - t0)
    med = {label: statistics.median(v) for label, v in times.items()}
    print(f"{name} ({threads} thread(s), {rounds} rounds x {steps} steps per layout):")
    for label, m in med.items():
        print(f"  {label:22s} median {1000 * m:7.1f} ms per step")
    a, b = med.values()
    print(f"  channels_last / contiguous: {b / a:.2f}; loss {l0:.6f} vs {l1:.6f}, gradients differ by "
          f"{worst:.1e} of their norm ({'the same' if same else 'DIFFERENT'})")
    return same


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="assets/demo_generator", help="a generator folder 02 wrote (default: the shipped one)")
    p.add_argument("--rounds", type=int, default=3, help="times the two layouts alternate")
    p.add_argument("--steps", type=int, default=10, help="timed steps per layout and round")
    args = p.parse_args()
    threads = torch.get_num_threads()
    ok = compare("demo generator fine-tuning step, batch 16, 64x128", generator_case(args.generator),
                 args.rounds, args.steps, threads)
    ok &= compare("demo Re-ID iteration, batch 80, 64x32", reid_case(), args.rounds, args.steps, 1)
    if not ok:
        print("error: the two layouts gave different results")
        sys.exit(1)


if __name__ == "__main__":
    util.run_main(main)
