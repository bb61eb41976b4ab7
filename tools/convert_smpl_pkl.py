"""
Convert an official SMPL model pickle (e.g. SMPL_NEUTRAL.pkl from https://smpl.is.tue.mpg.de,
which stores its arrays as chumpy objects) into a chumpy-free .npz that smplx and
01_render_smpl.py --smpl-model load directly. chumpy is NOT needed: its classes are replaced by
a stub while unpickling and only their array payload is kept.

  python tools/convert_smpl_pkl.py SMPL_NEUTRAL.pkl models/SMPL_NEUTRAL.npz

The licence of the SMPL files applies to the output as well: do not commit or share it.
"""
import os
import sys
import pickle
import argparse

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import util

KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


class ChumpyStub:
    """Stands in for chumpy.Ch (and friends) while unpickling: keeps the pickled state."""

    def __init__(self, *a, **k):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def array(self):
        s = self.state
        if isinstance(s, dict):
            for key in ("x", "a", "r"):
                if key in s and not isinstance(s[key], ChumpyStub):
                    return np.asarray(s[key])
            for v in s.values():
                if isinstance(v, np.ndarray):
                    return v
        if isinstance(s, tuple):
            for v in s:
                if isinstance(v, dict) and "x" in v:
                    return np.asarray(v["x"])
        raise ValueError("a chumpy object without an array payload")


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] == "chumpy":
            return ChumpyStub
        return super().find_class(module, name)


def to_array(v):
    if isinstance(v, ChumpyStub):
        return v.array()
    if hasattr(v, "toarray"):  # J_regressor is a scipy sparse matrix in the official files
        return v.toarray()
    return np.asarray(v)


def convert(src, dst):
    if not os.path.exists(src):
        raise util.UserError(f"SMPL pickle '{src}' not found: download SMPL from https://smpl.is.tue.mpg.de")
    try:
        with open(src, "rb") as f:
            d = Unpickler(f, encoding="latin1").load()
    except Exception as e:
        raise util.UserError(f"cannot read '{src}' as an SMPL pickle ({type(e).__name__}: {str(e)[:80]})")
    if not isinstance(d, dict) or any(k not in d for k in KEYS):
        raise util.UserError(f"'{src}' is not an SMPL model pickle: expected keys {list(KEYS)}")
    out = {k: to_array(d[k]) for k in KEYS}
    out["kintree_table"] = out["kintree_table"].astype(np.int64)
    out["f"] = out["f"].astype(np.int32)
    for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        out[k] = out[k].astype(np.float32)
    util.atomic_write(dst, lambda tmp: np.savez_compressed(tmp, **out), suffix=".npz")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="official SMPL .pkl (chumpy inside)")
    ap.add_argument("dst", help="output .npz")
    args = ap.parse_args()
    out = convert(args.src, args.dst)
    print(f"read {args.src}; wrote {args.dst} ({len(out['v_template'])} vertices, shapedirs "
          f"{out['shapedirs'].shape[-1]} components)")


if __name__ == "__main__":
    util.run_main(main)
