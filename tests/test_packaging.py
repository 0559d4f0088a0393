"""pyproject.toml's flat-layout module list stays complete, so `pip install .[fid]` installs every
top-level module of the repository."""
import glob
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_lists_every_top_level_module_and_package():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    tool = tomllib.load(f)["tool"]["setuptools"]
  modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
  packages = {os.path.basename(os.path.dirname(p))
              for p in glob.glob(os.path.join(ROOT, "*", "__init__.py"))} - {"tests"}
  assert set(tool["py-modules"]) == modules
  assert set(tool["packages"]) == packages
