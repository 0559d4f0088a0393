"""Installing adds one name: scorelab runs from a clone and is not installable as a library, so
`pip install .` puts only the `scorelab` distribution's metadata into site-packages, never its
generic top-level modules (`datasets`, `models`, `main`, `configs`, ...), which would shadow other
packages such as Hugging Face's `datasets`."""
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_copy(dest: str) -> str:
  """What `pip install .` could package from the clone: pyproject.toml, every top-level module and
  every top-level package (a copy, so the build writes nothing into the repository)."""
  os.makedirs(dest)
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), dest)
  for path in glob.glob(os.path.join(ROOT, "*.py")):
    shutil.copy(path, dest)
  for init in glob.glob(os.path.join(ROOT, "*", "__init__.py")):
    package = os.path.dirname(init)
    shutil.copytree(package, os.path.join(dest, os.path.basename(package)),
                    ignore=shutil.ignore_patterns("__pycache__"))
  return dest


def _fake_hugging_face_datasets(site: str) -> None:
  """A stand-in for Hugging Face's `datasets` package (offline: only its name matters here)."""
  os.makedirs(os.path.join(site, "datasets"))
  with open(os.path.join(site, "datasets", "__init__.py"), "w") as f:
    f.write("HUGGING_FACE = True\n")


def test_pip_install_adds_only_scorelab_metadata_and_shadows_no_package(tmp_path):
  src = _source_copy(str(tmp_path / "src"))
  installed, other = str(tmp_path / "installed"), str(tmp_path / "other")
  _fake_hugging_face_datasets(other)
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                  "--no-index", "--no-compile", "--disable-pip-version-check", "--quiet",
                  "--target", installed, src], check=True, cwd=src)
  added = os.listdir(installed)
  assert len(added) == 1 and added[0].startswith("scorelab-") and added[0].endswith(".dist-info"), added
  # A fresh interpreter (not in the clone) with the installed folder ahead of the other package's
  # on its path finds the other package's `datasets`.
  probe = "import datasets; print(datasets.__file__); print(getattr(datasets, 'HUGGING_FACE', False))"
  out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([installed, other])),
                       capture_output=True, text=True)
  assert out.stdout.split() == [os.path.join(other, "datasets", "__init__.py"), "True"], out.stdout
