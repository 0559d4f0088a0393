"""The Colab notebooks in notebooks/: committed without outputs, one papermill `parameters` cell and
an "Open in Colab" badge each; every notebook runs top to bottom at scale="smoke" (papermill, the
python3 kernel, cwd notebooks/) and writes its figures (PNGs with content; a workdir's sample grid
equal to the samples.npz beside it, conftest.assert_grid_png) and shows figures inline. Those that
train and evaluate a digits U-Net, or repeat an experiment smoke run of the default suite, are
marked slow (-m slow)."""
from __future__ import annotations

import base64
import glob
import io
import json
import os

import numpy as np
import pytest
from conftest import assert_grid_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
BADGE = "https://colab.research.google.com/github/scorelab/scorelab/blob/main/notebooks/{}.ipynb"

# notebook -> PNGs (relative to out_dir) its smoke run must write
EXPECTED = {
    "quickstart": ["loss_curve.png", "digits_vp/eval/samples.png"],
    "diffusion_time": ["toy/elbo_vs_T.png"],
    "ode_vs_sde": ["L_vs_h2.png", "early_late.png"],
    "ct_elbo": ["ct_elbo.png", "toy_gmm_2d/eval/samples.png"],
    "scoreflow": ["is_variance.png", "vp_likelihood_is/eval/samples.png"],
    "stf": ["two_gaussians/variance_vs_t.png", "two_gaussians/ratio_vs_t.png"],
    "controllable": ["guided.png", "inpainting.png"],
}
# Slow (-m slow): smoke runs that train and evaluate a digits U-Net (> 1 min on 2 shared cores);
# and ode_vs_sde / diffusion_time, which run experiments/pulse_perturbations.py and
# diffusion_time_toy.py at the same smoke scale as the default suite's test_pulse_experiment_smoke
# and test_diffusion_time_toy_smoke (36 s of repeated work). The stf notebook keeps papermill's
# path (kernel, parameters cell, inline figures) in the default suite.
SLOW = {"quickstart", "scoreflow", "ct_elbo", "controllable", "ode_vs_sde", "diffusion_time"}


def _names() -> list[str]:
  return sorted(os.path.basename(p)[:-len(".ipynb")]
                for p in glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


def test_every_notebook_is_listed():
  assert _names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_is_clean(name):
  """No outputs or execution counts, exactly one `parameters` cell (with scale and out_dir), a
  first markdown cell with the title and the Colab badge, the python3 kernel."""
  with open(os.path.join(NOTEBOOKS, f"{name}.ipynb")) as f:
    nb = json.load(f)
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, name
  tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters'"
  source = "".join(tagged[0]["source"])
  assert "scale = " in source and "out_dir = " in source
  first = nb["cells"][0]
  assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")
  assert BADGE.format(name) in "".join(first["source"])


def test_readme_links_every_notebook():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  for name in EXPECTED:
    assert BADGE.format(name) in readme, name


# the optional parts (parameter -> PNGs it adds), slow: each trains several models
OPTIONAL = {
    "diffusion_time": ({"run_digits": True}, ["digits/bpd_vs_T.png", "digits/samples_vs_T.png"]),
    "stf": ({"run_digits": True}, ["digits/loss_traces.png"]),
    "scoreflow": ({"run_script": True}, ["bpd_cells.png"]),
    "ct_elbo": ({"run_script": True}, ["training/elbo_vs_training.png"]),
}


def _execute(name: str, tmp_path, extra: dict, pngs: list[str]) -> None:
  papermill = pytest.importorskip("papermill")
  out = tmp_path / "out"
  papermill.execute_notebook(
      os.path.join(NOTEBOOKS, f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
      parameters=dict(scale="smoke", out_dir=str(out), **extra), kernel_name="python3",
      cwd=NOTEBOOKS, progress_bar=False)
  for png in pngs:
    _check_png(out / png)
  with open(tmp_path / f"{name}.ipynb") as f:
    executed = json.load(f)
  images = [o["data"]["image/png"] for c in executed["cells"] if c["cell_type"] == "code"
            for o in c["outputs"] if "image/png" in o.get("data", {})]
  assert images, f"{name}: no figure shown inline"
  for data in images:
    _decode_png(base64.b64decode("".join(data)), f"{name}: an inline figure")


def _decode_png(data: bytes, what: str):
  """``data`` as a PIL image: a PNG of at least 16 x 16 pixels that is not of one colour."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as im:
    assert im.format == "PNG" and min(im.size) >= 16, (what, im.format, im.size)
    pixels = np.asarray(im.convert("RGB"))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, f"{what}: one colour"
  return pixels


def _check_png(path) -> None:
  """A figure decodes to a PNG with content; a workdir's ``eval/samples.png`` of images is the grid
  of the ``samples.npz`` beside it (conftest.assert_grid_png, centering from the workdir's
  config.json); toy samples are a scatter plot (any figure)."""
  with open(path, "rb") as f:
    _decode_png(f.read(), str(path))
  npz = os.path.join(os.path.dirname(path), "samples.npz")
  if os.path.basename(path) == "samples.png" and os.path.exists(npz):
    with np.load(npz) as z:
      samples = z["samples"]
    if samples.ndim == 4:
      with open(os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")) as f:
        centered = json.load(f)["data"]["centered"]
      assert_grid_png(str(path), samples, centered)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(EXPECTED)])
def test_notebook_runs_at_smoke_scale(name, tmp_path):
  _execute(name, tmp_path, {}, EXPECTED[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_notebook_optional_part_at_smoke_scale(name, tmp_path):
  extra, pngs = OPTIONAL[name]
  _execute(name, tmp_path, extra, EXPECTED[name] + pngs)
