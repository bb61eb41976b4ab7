"""
Does a stage keep its speed when another busy process shares the CPU? Times the demo's two
training steps (bench_memory_format.py's cases: a fine-tuning step of the shipped generator, 02;
a Re-ID iteration, 04) alone and beside one CPU-bound competitor, under two OpenMP wait policies:
torch's default (idle threads spin for a while before they sleep) and PASSIVE (they sleep at
once; what setup.sh sets). With 2 cores and one competitor the fair share is 2x the time alone;
spinning threads that steal each other's time make it far worse.

Every measurement runs in a fresh process (the policy is read when OpenMP starts); alone and
shared alternate over --rounds, so that drift of the machine hurts both alike. Run it on an
otherwise idle machine: "alone" must be alone.

  python tools/bench_shared_cores.py [--rounds 3] [--steps 8] [--threads 2]
"""
import os
import sys
import json
import time
import argparse
import statistics
import subprocess

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402

# libgomp (torch's OpenMP on Linux): an idle thread spins GOMP_SPINCOUNT times before it sleeps;
# 300,000 by default, 0 with OMP_WAIT_POLICY=PASSIVE
POLICIES = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin1k": {"GOMP_SPINCOUNT": "1000"},
            "spin10k": {"GOMP_SPINCOUNT": "10000"}, "spin100k": {"GOMP_SPINCOUNT": "100000"}}
CASES = ("generator", "reid")


def worker(case, steps, threads):
    """In a child process: build the case, warm up, print the median seconds per step as JSON."""
    import torch
    from bench_memory_format import generator_case, reid_case
    torch.set_num_threads(threads)
    model, opt, step = generator_case("assets/demo_generator") if case == "generator" else reid_case()
    fmt = torch.channels_last
    model.to(memory_format=fmt)
    step(fmt)  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step(fmt)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(median=statistics.median(times))))


def measure(case, policy, shared, steps, threads):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if shared else None
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", case, "--steps", str(steps),
                            "--threads", str(threads)], env=env, cwd=util.ROOT, capture_output=True, text=True)
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    if r.returncode:
        raise util.UserError(f"the {case} worker failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])["median"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alone / shared alternations per case and policy")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the timed step")
    p.add_argument("--policies", default="default,PASSIVE", help=f"comma-separated, of {', '.join(POLICIES)}")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)  # (the child process's mode)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.threads)
    if min(args.rounds, args.steps, args.threads) < 1:
        raise util.UserError("--rounds, --steps and --threads must be at least 1")
    policies, cases = args.policies.split(","), args.cases.split(",")
    for name, known in ((policies, POLICIES), (cases, CASES)):
        if set(name) - set(known):
            raise util.UserError(f"unknown {', '.join(sorted(set(name) - set(known)))}: choose from {', '.join(known)}")
    print(f"{os.cpu_count()} cores, {args.threads} torch thread(s), one competing busy process; "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'step':10s} {'wait policy':12s} {'alone ms':>9s} {'shared ms':>10s} {'shared/alone':>13s}")
    rows = []
    for case in cases:
        for policy in policies:
            t = {False: [], True: []}
            for _ in range(args.rounds):
                for shared in (False, True):
                    t[shared].append(measure(case, policy, shared, args.steps, args.threads))
            alone, shared = statistics.median(t[False]), statistics.median(t[True])
            rows.append(dict(case=case, policy=policy, alone_s=alone, shared_s=shared, ratio=shared / alone))
            print(f"{case:10s} {policy:12s} {1000 * alone:9.0f} {1000 * shared:10.0f} {shared / alone:13.2f}", flush=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (the worker imports bench_memory_format)
    util.run_main(main)
