"""Fixtures several test files share: made once per test session (they cost tens of seconds)."""
import os
import sys
import subprocess

import pytest

from stages import ROOT  # noqa: E402  (puts the repository root on sys.path)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """demo/world.py --small (a few identities, Market-1501 layout, per-image SMPL), read-only:
    a test that changes files copies it first."""
    out = tmp_path_factory.mktemp("small_world") / "world"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "world.py"), "--out", str(out), "--small",
                        "--workers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return out
