"""
The Market-1501 evaluation of common.evaluate_rank (common.py section 4: the protocol, one query
at a time), computed without a loop over queries: the same mAP, CMC and mINP, what 05_evaluate.py
and the tools run on full-size galleries. tests/test_reid.py holds the two equal on random
problems with ties, distractors, junk and same-camera-only queries.

How: instead of argsorting whole rows and gathering pids and cameras, each row's distances
become unique integer keys (order-preserving float bits << 32 | gallery index) and are sorted;
the few same-pid items of a query are found in the sorted row by binary search, and the ranks
among the kept gallery follow from counting the removed ones before each. Queries go in chunks,
so memory is O(chunk x gallery) (full query x gallery index arrays are what blow memory up).
"""
import numpy as np

from common import JUNK_PID, check_rank_inputs


def sortable_keys(dist, cols):
    """float32 distances -> uint64 keys whose plain order is (distance, gallery index) order:
    the IEEE bits of a float are made monotone (flip all bits of negatives, the sign bit of
    the rest) and the gallery index fills the low 32 bits, so keys are unique and a fast
    unstable sort gives exactly the stable argsort."""
    bits = dist.view(np.uint32)
    bits = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    return (bits << np.uint64(32)) | cols.astype(np.uint64)


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, chunk=128):
    """Same arguments and result as common.evaluate_rank. float32 distances take the fast path
    (sortable_keys); other dtypes are ranked with numpy's stable argsort (same result, slower)."""
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    check_rank_inputs(distmat, q_pids, g_pids)
    if (g_pids == JUNK_PID).any():  # junk is never ranked: drop its columns (the order of the rest stays)
        scored = g_pids != JUNK_PID
        distmat, g_pids, g_camids = distmat[:, scored], g_pids[scored], g_camids[scored]
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    fast = distmat.dtype == np.float32 and num_g < 2 ** 32
    g_index = np.arange(num_g)
    first_hit, aps, inps = [], [], []
    for start in range(0, num_q, chunk):
        dist = np.ascontiguousarray(distmat[start:start + chunk])
        chunk_pids, chunk_cams = q_pids[start:start + chunk], q_camids[start:start + chunk]
        # same-pid gallery items of each query (the positives plus the same-camera ones that the
        # protocol removes): a handful per row, so everything after the sort is sparse
        rows, cols = np.nonzero(chunk_pids[:, None] == g_pids[None, :])
        if fast:
            keys = sortable_keys(dist, g_index[None, :])
            keys.sort(axis=1)
            item_keys = sortable_keys(dist[rows, cols], cols)
            pos = np.empty(len(rows), dtype=np.int64)  # 0-based rank of each item in its row's full ranking
            bounds = np.searchsorted(rows, np.arange(len(dist) + 1))
            for r in range(len(dist)):
                lo, hi = bounds[r], bounds[r + 1]
                if lo < hi:
                    pos[lo:hi] = np.searchsorted(keys[r], item_keys[lo:hi])
        else:
            order = np.argsort(dist, axis=1, kind="stable")
            rank_of = np.empty_like(order)
            np.put_along_axis(rank_of, order, np.arange(num_g)[None, :].repeat(len(dist), 0), axis=1)
            pos = rank_of[rows, cols]
        # walk each row's same-pid items in rank order: removed items shift later ranks up by one
        by_rank = np.lexsort((pos, rows))
        rows, pos, removed = rows[by_rank], pos[by_rank], (g_camids[cols[by_rank]] == chunk_cams[rows[by_rank]])
        removed_before = np.cumsum(removed) - removed      # exclusive count over all rows...
        removed_before -= removed_before[np.searchsorted(rows, rows)]  # ...made per row
        keep = ~removed
        rank = (pos - removed_before)[keep] + 1            # 1-based rank among the kept gallery
        hit_rows = rows[keep]
        hit_no = np.arange(len(hit_rows)) - np.searchsorted(hit_rows, hit_rows) + 1  # k-th positive of its row
        n_pos = np.bincount(hit_rows, minlength=len(dist))
        valid = n_pos > 0
        prec_sum = np.bincount(hit_rows, weights=hit_no / rank, minlength=len(dist))
        last = np.zeros(len(dist), dtype=np.int64)
        np.maximum.at(last, hit_rows, rank)
        first = np.full(len(dist), np.iinfo(np.int64).max)
        np.minimum.at(first, hit_rows, rank)
        first_hit.append(first[valid])
        aps.append(prec_sum[valid] / n_pos[valid])
        inps.append(n_pos[valid] / last[valid])
    first_hit, aps, inps = np.concatenate(first_hit), np.concatenate(aps), np.concatenate(inps)
    num_valid = len(aps)
    if num_valid == 0:
        raise ValueError("no query has a match in the gallery from another camera")
    cmc = (first_hit[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(0)
    return dict(mAP=float(aps.mean()), mINP=float(inps.mean()), cmc=cmc,
                num_valid_queries=int(num_valid), num_skipped_queries=int(num_q - num_valid))
