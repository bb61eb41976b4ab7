"""
Benchmark of the evaluator: evaluate_fast.evaluate_rank (vectorised, what 05 runs) against
common.evaluate_rank (the protocol, one query at a time) on a Market-sized random problem (the
official test split's query and gallery counts, 751 ids, 6 cameras, distractors). Prints both
times, the ratio, the fast one's peak extra memory, and whether the numbers agree (exit 1 if not).

  python tools/bench_evaluate.py [--repeats 5]
"""
import os
import sys
import time
import argparse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common  # noqa: E402
import evaluate_fast  # noqa: E402
import util  # noqa: E402


def market_sized_problem(seed=0, num_q=3368, num_g=15913, num_ids=751, num_cams=6, dim=64):
    """Random but Market-shaped: 751 identities with several images each over 6 cameras, pid-0
    distractors in the gallery, distances from noisy per-identity features (float32); the noise
    is set so that mAP is that of a good model on Market-1501."""
    rng = np.random.default_rng(seed)
    g_pids = np.concatenate([rng.integers(1, num_ids + 1, num_g - 2798), np.zeros(2798, int)])
    q_pids = rng.integers(1, num_ids + 1, num_q)
    q_cams, g_cams = rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g)
    centres = rng.normal(size=(num_ids + 1, dim)).astype(np.float32)
    q = centres[q_pids] + 1.0 * rng.normal(size=(num_q, dim)).astype(np.float32)
    g = centres[g_pids] + 1.0 * rng.normal(size=(num_g, dim)).astype(np.float32)
    g[g_pids == 0] = 1.5 * rng.normal(size=((g_pids == 0).sum(), dim))
    d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None] - 2 * q @ g.T
    return np.sqrt(np.maximum(d2, 0)).astype(np.float32), q_pids, g_pids, q_cams, g_cams


def benchmark(args):
    import tracemalloc
    problem = market_sized_problem()
    print(f"Market-sized random problem: {problem[0].shape[0]} queries x {problem[0].shape[1]} gallery, "
          f"{len(np.unique(problem[2]))} gallery ids, 6 cameras, float32 distances")
    evaluate_fast.evaluate_rank(*problem)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fast = evaluate_fast.evaluate_rank(*problem)
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    evaluate_fast.evaluate_rank(*problem)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t = time.perf_counter()
    ref = common.evaluate_rank(*problem)
    t_ref = time.perf_counter() - t
    same = (abs(fast["mAP"] - ref["mAP"]) < 1e-6 and abs(fast["mINP"] - ref["mINP"]) < 1e-6
            and np.abs(fast["cmc"] - ref["cmc"]).max() < 1e-6 and fast["num_valid_queries"] == ref["num_valid_queries"])
    med = float(np.median(times))
    print(f"evaluate_fast        : median {med:.3f} s over {args.repeats} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}), peak extra memory {peak / 2**20:.0f} MiB")
    print(f"common.evaluate_rank : {t_ref:.2f} s (1 run)")
    print(f"speed-up             : {t_ref / med:.1f}x")
    print(f"same numbers (1e-6)  : {same}  mAP {fast['mAP']:.6f} vs {ref['mAP']:.6f}, "
          f"R1 {fast['cmc'][0]:.6f} vs {ref['cmc'][0]:.6f}, mINP {fast['mINP']:.6f} vs {ref['mINP']:.6f}")
    if not same:
        sys.exit(1)



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the fast evaluator")
    benchmark(ap.parse_args())


if __name__ == "__main__":
    util.run_main(main)
