"""config_schema: every declared field rejects a wrong type and an out-of-range value naming the
dotted field; every experiment config validates; unknown / missing fields and the cross-field
rules fire with the field's name. No model is built (the whole file runs in seconds)."""
import dataclasses
import glob
import importlib
import math
import os
import re

import ml_collections
import pytest

import config_schema
import models
import samplers
from config_schema import SCHEMA, validate

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
EXPERIMENTS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not os.path.basename(p).startswith("__") and os.path.basename(p) != "default.py")


def _load(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config()


def _base(field: config_schema.Field) -> ml_collections.ConfigDict:
  """A valid config whose model uses ``field``: the MLP toy config for MLP fields, else digits."""
  return _load("toy_gmm_2d" if field.models == config_schema.VECTOR_MODELS else "digits_vp")


def _with(config: ml_collections.ConfigDict, dotted: str, value) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``dotted`` set to ``value`` (any type: built from a dict)."""
  d = config.to_dict()
  section, _, key = dotted.partition(".")
  if key:
    d[section][key] = value
  else:
    d[section] = value
  return ml_collections.ConfigDict(d)


def _wrong_types(field: config_schema.Field) -> list:
  return {"int": ["x", 1.5, True, None], "float": ["x", True, None, (1.0,)],
          "bool": ["yes", 1, None], "str": [3, None, ("a",)],
          "ints": ["abc", 3, (1.5,), (True,)], "floats": ["abc", 3, ("a",)]}[field.kind]


def _out_of_range(field: config_schema.Field) -> list:
  if field.choices is not None:
    return ["bogus", field.options()[0].upper()]  # choices are case-sensitive
  bad, step = [], (1 if field.kind in ("int", "ints") else 0.5)
  if field.ge is not None:
    bad.append(field.ge - step)
  if field.gt is not None:
    bad.append(field.gt)
  if field.le is not None:
    bad.append(field.le + step)
  if field.lt is not None:
    bad.append(field.lt)
  if field.kind == "float":
    bad += [math.nan, math.inf]
  if field.kind in ("ints", "floats"):
    bad = [(v,) for v in bad] + ([()] if field.nonempty else [])
  return bad


def _expect(config, dotted: str) -> None:
  with pytest.raises(ValueError, match=rf"^{re.escape(dotted)}\b"):
    validate(config)


@pytest.mark.parametrize("dotted", list(SCHEMA))
def test_every_field_rejects_wrong_type_and_range(dotted):
  field = SCHEMA[dotted]
  base = _base(field)
  validate(base)
  out_of_range = _out_of_range(field)
  if field.kind != "bool" and (field.kind != "str" or field.choices is not None):
    assert out_of_range, f"{dotted} declares no range or choices"
  for value in _wrong_types(field) + out_of_range:
    with pytest.raises(ValueError, match=rf"^{re.escape(dotted)} must be .*, got "):
      validate(_with(base, dotted, value))


def test_error_message_form():
  config = _load("toy_gmm_2d")
  with pytest.raises(ValueError, match=r"^eval\.rtol must be a positive finite number, got -1$"):
    validate(_with(config, "eval.rtol", -1))
  with pytest.raises(ValueError, match=r"^eval\.divergence must be one of \('exact', 'hutchinson'\)"):
    validate(_with(config, "eval.divergence", "bogus"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_validates(name):
  module = importlib.import_module(f"configs.{name}")
  validate(module.get_config())


def test_every_config_field_is_declared_and_every_declared_field_set():
  """Each experiment config holds exactly the declared fields its model uses (no extras)."""
  for name in EXPERIMENTS:
    config = _load(name)
    keys = {f"{s}.{k}" for s in config_schema.SECTIONS for k in config[s]} | {"seed"}
    used = {k for k, f in SCHEMA.items() if f.models is None or config.model.name in f.models}
    assert keys == used, (name, keys ^ used)


def test_unknown_and_missing_fields():
  config = _load("toy_gmm_2d")
  config.training.nonexistent = 1
  with pytest.raises(ValueError, match=r"^training\.nonexistent: unknown config field "
                                       r"\(known fields of training: batch_size, "):
    validate(config)
  config = _load("toy_gmm_2d")
  config.extra_section = ml_collections.ConfigDict({"a": 1})
  with pytest.raises(ValueError, match=r"^extra_section: unknown config field"):
    validate(config)
  d = _load("toy_gmm_2d").to_dict()
  del d["eval"]["bound_time_samples"]
  with pytest.raises(ValueError, match=r"^eval\.bound_time_samples: missing config field"):
    validate(ml_collections.ConfigDict(d))
  del d["sampling"]
  with pytest.raises(ValueError, match=r"^sampling: missing config section"):
    validate(ml_collections.ConfigDict(d))
  # A plain nested dict is accepted too.
  validate(_load("toy_gmm_2d").to_dict())


def test_model_fields_follow_model_name():
  toy, digits = _load("toy_gmm_2d"), _load("digits_vp")
  d = toy.to_dict()
  del d["model"]["widths"]
  with pytest.raises(ValueError, match=r"^model\.widths: missing config field \(model\.name='mlp'"):
    validate(ml_collections.ConfigDict(d))
  toy.model.nf = 32
  with pytest.raises(ValueError, match=r"^model\.nf: not a field of model\.name='mlp'"):
    validate(toy)
  digits.model.name = "mlp"
  with pytest.raises(ValueError, match=r"^model\.fourier_scale|^model\.widths"):
    validate(digits)
  # Every module field of every registered network is a declared model field of that network.
  families = {"mlp": config_schema.VECTOR_MODELS, "ncsnpp": config_schema.IMAGE_MODELS,
              "ddpmpp": config_schema.IMAGE_MODELS, "unet": config_schema.IMAGE_MODELS}
  assert set(models.registered_models()) >= set(families)
  for name, family in families.items():
    declared = {k.split(".", 1)[1] for k, f in SCHEMA.items()
                if k.startswith("model.") and (f.models is None or name in f.models)}
    module_fields = {f.name for f in dataclasses.fields(models._MODELS[name])} - {"parent", "name"}
    assert module_fields <= declared, (name, module_fields - declared)
    assert set(family) <= set(models.registered_models())


@pytest.mark.parametrize("base,changes,field", [
    ("toy_gmm_2d", {"training.batch_size": 512}, "training.ref_batch_size"),
    ("toy_gmm_2d", {"sde.eps": 5.0}, "sde.T"),
    ("toy_gmm_2d", {"sde.beta_max": 0.5}, "sde.beta_max"),
    ("toy_two_gaussians_64d", {"sde.sigma_max": 1e-3}, "sde.sigma_max"),
    ("digits_vp", {"data.image_size": 16}, "data.image_size"),
    ("digits_vp", {"data.num_channels": 3}, "data.num_channels"),
    ("digits_vp", {"data.train_split": "training"}, "data.train_split"),
    ("digits_vp", {"eval.split": "val"}, "eval.split"),
    ("digits_vp", {"model.ch_mult": (1, 2, 2, 2, 2)}, "model.ch_mult"),
    ("digits_vp", {"model.center_input": True}, "model.center_input"),
    ("digits_vp", {"data.dataset": "gmm_2d", "data.image_size": 0, "data.num_channels": 0},
     "model.name"),
    ("toy_gmm_2d", {"model.parameterization": "scale_by_sigma"}, "model.parameterization"),
    ("toy_gmm_2d", {"sampling.method": "ode", "sampling.c": 1.0}, "sampling.c"),
    ("toy_gmm_2d", {"sampling.method": "ddim", "sampling.c": 2.0}, "sampling.c"),
    ("toy_gmm_2d", {"sampling.perturbation": "case4"}, "sampling.perturbation_epsilon"),
    ("toy_gmm_2d", {"sampling.perturbation_epsilon": 0.02}, "sampling.perturbation_epsilon"),
    ("toy_gmm_2d", {"sampling.perturbation": "case1", "sampling.perturbation_epsilon": 0.02,
                    "sampling.perturbation_edge": 0.5}, "sampling.perturbation_edge"),
    ("toy_gmm_2d", {"sampling.method": "pc", "sampling.c": 1.0, "sampling.adaptive": True},
     "sampling.adaptive"),
    ("toy_gmm_2d", {"sampling.method": "exponential", "sampling.adaptive": True},
     "sampling.adaptive"),
    ("toy_gmm_2d", {"sampling.method": "ode", "sampling.solver": "heun"}, "sampling.solver"),
    ("toy_gmm_2d", {"sampling.method": "sde", "sampling.adaptive": True}, "sampling.solver"),
    ("toy_two_gaussians_64d", {"sampling.method": "heun", "sampling.c": 1.0}, "sampling.c"),
])
def test_cross_field_rules(base, changes, field):
  config = _load(base)
  for dotted, value in changes.items():
    config = _with(config, dotted, value)
  if field == "model.parameterization" and "scale_by_sigma" not in SCHEMA[field].options():
    pytest.skip("no VE-only parameterization registered")
  _expect(config, field)


def test_valid_cross_field_combinations():
  """The rules do not refuse what the samplers support."""
  config = _load("toy_gmm_2d")
  for changes in ({"sampling.method": "pc", "sampling.c": 1.0},
                  {"sampling.method": "sde", "sampling.solver": "heun", "sampling.adaptive": True},
                  {"sampling.method": "exponential", "sampling.c": 2.0},
                  {"sampling.method": "pc", "sampling.c": 2.0},
                  {"sampling.method": "exponential", "sde.name": "vesde"},
                  {"sampling.perturbation": "case5", "sampling.perturbation_epsilon": 0.02,
                   "sampling.perturbation_edge": 0.9},
                  {"sampling.method": "ode", "sampling.solver": "dopri5", "sampling.c": 0.0}):
    c = config
    for dotted, value in changes.items():
      c = _with(c, dotted, value)
    validate(c)


def test_sections_limit_the_check():
  from configs.default import get_default_config
  config = get_default_config()  # the shared base: no network fields yet
  with pytest.raises(ValueError, match=r"^model\."):
    validate(config)
  validate(config, sections=("training", "optim", "sampling", "eval", "data", "sde", "seed"))
  config.training.batch_size = 1024
  with pytest.raises(ValueError, match=r"^training\.ref_batch_size"):
    validate(config, sections=("training",))
  with pytest.raises(ValueError, match="unknown config section"):
    validate(config, sections=("trainig",))


def test_sampler_registry_matches_schema():
  assert SCHEMA["sampling.method"].options() == samplers.registered_samplers()
  assert set(samplers.SAMPLING_METHODS) <= set(samplers.registered_samplers())
  with pytest.raises(ValueError, match="registered twice"):
    samplers.register_sampler("ode")(lambda cfg, sde: None)


def test_validate_returns_typed_frozen_sections():
  """validate returns the config as typed, frozen sections (what run_lib hands the science
  modules): every SCHEMA field is an attribute of its section, cast to its declared kind (an int
  where a float is declared becomes a float, a list of ints a tuple), a network family's fields of
  another family are None, unvalidated sections are None, and a section cannot be changed."""
  config = _with(_with(_load("digits_vp"), "sde.T", 1), "model.ch_mult", [1, 2])
  cfg = validate(config)
  assert type(cfg.sde.T) is float and cfg.sde.T == 1.0
  assert type(cfg.model.ch_mult) is tuple and cfg.model.ch_mult == (1, 2)
  assert cfg.model.widths is None and "widths" not in cfg.model.to_dict()  # an MLP field
  assert cfg.seed == config.seed and type(cfg.training.batch_size) is int
  kinds = {"int": int, "float": float, "bool": bool, "str": str, "ints": tuple, "floats": tuple}
  for name, field in SCHEMA.items():
    section, _, key = name.partition(".")
    value = getattr(getattr(cfg, section), key) if key else getattr(cfg, section)
    assert value is None and field.models or type(value) is kinds[field.kind], name
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.sampling.c = 1.0
  partial = validate(config, sections=("training",))
  assert partial.training == cfg.training and partial.sampling is None
