"""What every test module needs first: the repository root on sys.path (for common.py) and a
loader for the stage scripts, whose names start with a digit and so cannot be imported."""
import os
import sys
import importlib.util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_stage(filename):
    spec = importlib.util.spec_from_file_location("stage_" + filename[:-3], os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
