"""The import rules of ../shared/DESIGN.md ("Import rules"), read from the source with ``ast``.

Every import counts, also the deferred ones inside functions (``import config_schema`` in a
function body is still an arrow) and ``importlib.import_module("name")`` with a literal name. The
floors: entry (main, modes/, run_lib) > schema (config_schema, configs/) > science, networks
(models/), data, evaluation, import > infrastructure. The rules checked:

* science (sde_lib, losses, samplers, likelihood, auxiliary, hutchinson, dequantization, flows,
  controllable) never imports the schema or the entry: the math takes typed sections
  (``config_schema.validate`` at the boundary) and validates no ConfigDict;
* networks (models/) and data (datasets, toy_data) never import the entry;
* the schema never imports the entry;
* infrastructure (checkpoints, parallel, progress, pytrees, training) never imports science,
  networks, data or evaluation;
* a mode never imports another mode (what two modes share lives in run_lib or below).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENTRY = {"main", "run_lib", "modes"}
SCHEMA = {"config_schema", "configs"}
SCIENCE = {"sde_lib", "losses", "samplers", "likelihood", "auxiliary", "hutchinson",
           "dequantization", "flows", "controllable"}
NETWORKS = {"models"}
DATA = {"datasets", "toy_data"}
EVALUATION = {"evaluation", "inception_weights"}
IMPORT = {"score_sde_import", "edm_pickle"}
INFRASTRUCTURE = {"checkpoints", "downloads", "parallel", "progress", "pytrees", "training"}

# (floor of the importing module, floors it must not import, why)
RULES = (
    (SCIENCE, SCHEMA | ENTRY, "science takes typed config sections; it never reads the schema or "
     "the entry"),
    (NETWORKS | DATA, ENTRY, "networks and data never import the entry"),
    (SCHEMA, ENTRY, "the schema never imports the entry"),
    (INFRASTRUCTURE, SCIENCE | NETWORKS | DATA | EVALUATION, "infrastructure never imports the "
     "science, networks, data or evaluation"),
)


def _package(path: str) -> str:
  """The top-level project name of a module path: 'losses.py' -> 'losses', 'models/mlp.py' ->
  'models'."""
  return os.path.relpath(path, ROOT).split(os.sep)[0].removesuffix(".py")


def imported_names(source: str, package: str = "") -> set[str]:
  """Top-level names of every module ``source`` imports, at any depth of the tree (deferred imports
  in function bodies too); relative imports resolve to ``package``."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.add(package if node.level else node.module.split(".")[0])
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      names.add(node.args[0].value.split(".")[0])
  return names


def _modules() -> dict[str, list[str]]:
  """Project name -> its source files (top-level modules, and the models / modes / configs
  packages)."""
  out: dict[str, list[str]] = {}
  for entry in sorted(os.listdir(ROOT)):
    path = os.path.join(ROOT, entry)
    if entry.endswith(".py"):
      out.setdefault(entry[:-3], []).append(path)
    elif entry in ("models", "modes", "configs"):
      out[entry] = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
  return out


def violations(files: list[str]) -> list[str]:
  """'file imports name (rule)' for every import of ``files`` that a rule forbids."""
  found = []
  for path in files:
    package = _package(path)
    with open(path) as f:
      names = imported_names(f.read(), package)
    for floor, forbidden, why in RULES:
      if package in floor:
        found += [f"{os.path.relpath(path, ROOT)} imports {n} ({why})"
                  for n in sorted(names & forbidden) if n != package]
  return found


def test_every_layered_module_exists():
  """Every top-level module and package is on exactly the floors named here, and they exist (a new
  or renamed module must be placed on a floor, not silently skip the rules)."""
  present = set(_modules())
  layered = ENTRY | SCHEMA | SCIENCE | NETWORKS | DATA | EVALUATION | IMPORT | INFRASTRUCTURE
  assert layered == present, (sorted(layered - present), sorted(present - layered))


@pytest.mark.parametrize("floor", ["science", "networks_and_data", "schema", "infrastructure"])
def test_import_rules(floor):
  """No module imports a floor that DESIGN.md's import rules forbid it (deferred imports count)."""
  members = {"science": SCIENCE, "networks_and_data": NETWORKS | DATA, "schema": SCHEMA,
             "infrastructure": INFRASTRUCTURE}[floor]
  files = [p for name, paths in _modules().items() if name in members for p in paths]
  assert files
  assert violations(files) == []


def test_the_reader_sees_deferred_and_dynamic_imports():
  """The import reader finds a deferred import in a function body, ``from`` imports, relative
  imports and ``importlib.import_module`` with a literal name: the rules can fail."""
  source = (
      "import jax\n"
      "from sde_lib import bcast\n"
      "def f():\n"
      "  if True:\n"
      "    import config_schema  # deferred\n"
      "  from modes.train import train\n"
      "  from . import utils\n"
      "  return importlib.import_module('run_lib.x')\n")
  assert imported_names(source, "models") == {"jax", "sde_lib", "config_schema", "modes", "models",
                                              "run_lib"}


def imported_modules(source: str, package: str = "") -> set[str]:
  """Dotted names ``source`` imports at any depth: ``import a.b`` -> 'a.b', ``from a import b`` ->
  'a' and 'a.b' (b may be a module), relative imports resolved to ``package``, and
  ``importlib.import_module`` with a literal name."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = package if node.level else node.module
      if node.level and node.module:
        base = f"{package}.{node.module}"
      names.add(base)
      names.update(f"{base}.{alias.name}" for alias in node.names)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      names.add(node.args[0].value)
  return names


def mode_imports(path: str, modes: set[str]) -> list[str]:
  """'file imports modes.x' for every other mode module ``x`` a mode file imports."""
  with open(path) as f:
    names = imported_modules(f.read(), "modes")
  own = "modes." + os.path.basename(path).removesuffix(".py")
  return [f"{os.path.relpath(path, ROOT)} imports {n} (a mode never imports another mode)"
          for n in sorted(names) if n.count(".") >= 1 and n.split(".")[1] in modes
          and ".".join(n.split(".")[:2]) != own]


def test_modes_never_import_modes():
  """No file of modes/ (the registry ``modes/__init__`` aside) imports another mode or a name of
  it: a mode is one file, and what two modes share lives in run_lib or below."""
  files = [p for p in _modules()["modes"] if not p.endswith("__init__.py")]
  modes = {os.path.basename(p).removesuffix(".py") for p in files}
  assert len(modes) >= 8
  assert [v for p in files for v in mode_imports(p, modes)] == []


def test_the_mode_rule_can_fail(tmp_path):
  """The mode rule sees a private name imported from a mode, a deferred ``from modes import
  fit_prior``, a relative import and ``importlib``; the registry import is allowed."""
  path = tmp_path / "train_classifier.py"
  path.write_text("from modes import register_mode\n"
                  "from modes.train import _Preemption\n"
                  "def f():\n"
                  "  from modes import fit_prior\n"
                  "  from .evaluate import evaluate\n"
                  "  return importlib.import_module('modes.sample')\n")
  found = mode_imports(str(path), {"train", "fit_prior", "evaluate", "sample", "train_classifier"})
  assert [line.split(" imports ")[1].split(" (")[0] for line in found] == [
      "modes.evaluate", "modes.evaluate.evaluate", "modes.fit_prior", "modes.sample", "modes.train",
      "modes.train._Preemption"]


def test_starting_the_cli_loads_no_heavy_library():
  """``import main`` (every ``main.py`` run, each process of a multi-host job) loads neither
  TensorFlow, TFP / distrax (flows: only when a flow is fitted or loaded), scikit-learn nor torch:
  they cost 4-6 s per process. A mode imports what it needs when it runs."""
  import subprocess
  import sys
  heavy = ("tensorflow", "tensorflow_probability", "distrax", "sklearn", "torch")
  code = f"import sys, main; print(sorted(m for m in {heavy!r} if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=True).stdout
  assert out.strip().splitlines()[-1] == "[]", out
