"""The README's table "paper claim → printed → reproduced here → command", filled from the
experiments' own outputs: every script in experiments/ with a ``summarize(result) -> rows``
function is read against ``experiments/results/<script>/result.json`` (its committed run, else the
default-size run in ``experiments/results/<script>/default/``; the
command shows ``--long`` / ``--full`` when that run was not at the default scale).

  python experiments/claims.py            # rewrites the block between the README's markers
  python experiments/claims.py --check    # exits 1 when the README's block is not what it makes

The CIFAR-10 table scripts (a module-level ``TABLE`` and ``reproduced(result)``, e.g.
``ode_vs_sde_cifar.py``) fill a second block, "Reproducing the papers' CIFAR-10 tables", between
its own markers in the README:
their "reproduced" cell is blank until ``results/<script>/result.json`` is committed.

tests/test_experiments.py runs ``--check``, so the table cannot be typed by hand or go stale.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- claims:begin (experiments/claims.py) -->", "<!-- claims:end -->"
COLUMNS = ("claim", "paper", "printed", "reproduced", "command")
TABLES_BEGIN = "<!-- cifar-tables:begin (experiments/claims.py) -->"
TABLES_END = "<!-- cifar-tables:end -->"
TABLE_FIELDS = ("table", "checkpoint", "command", "device_time", "printed")


def _module(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules.setdefault(spec.name, mod)  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def _experiments_with(attribute: str):
  """(name, module) of every experiments/*.py script (in name order) that defines ``attribute``."""
  sys.path.insert(0, ROOT)
  for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
    name = os.path.basename(path)[:-3]
    if name != "claims":
      mod = _module(path)
      if hasattr(mod, attribute):
        yield name, mod


def collect(results_dir: str) -> tuple[list[dict], list[str]]:
  """(claim rows of every experiment with committed results, scripts without results)."""
  rows, missing = [], []
  for name, mod in _experiments_with("summarize"):
    result = os.path.join(results_dir, name, "result.json")
    if not os.path.exists(result):  # only a default-size run committed (in default/)
      result = os.path.join(results_dir, name, "default", "result.json")
    if not os.path.exists(result):
      missing.append(name)
      continue
    with open(result) as f:
      committed = json.load(f)
    for row in mod.summarize(committed):
      rows.append(dict(row, command=_at_scale(row["command"], committed.get("scale", "default")),
                       results=os.path.relpath(os.path.dirname(result), ROOT)))
  return rows, missing


def collect_tables(results_dir: str) -> list[dict]:
  """The rows of the CIFAR-10 table scripts: their ``TABLE`` with ``reproduced`` from their
  committed result.json (blank without one)."""
  rows = []
  for name, mod in _experiments_with("TABLE"):
    result = os.path.join(results_dir, name, "result.json")
    reproduced = ""
    if os.path.exists(result):
      with open(result) as f:
        reproduced = mod.reproduced(json.load(f))
    rows.append(dict(mod.TABLE, script=name, reproduced=reproduced))
  return rows


def tables_markdown(rows: list[dict]) -> str:
  lines = ["| table | checkpoint (where the authors publish it) | command | device time | printed "
           "| reproduced |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['table']} | {r['checkpoint']} | `{r['command']}` | {r['device_time']} | "
                 f"{r['printed']} | {r['reproduced']} |")
  return "\n".join(lines)


def _at_scale(command: str, scale: str) -> str:
  """The command that made the committed run (``--long`` / ``--full`` when not the default)."""
  return command if scale == "default" else command.replace(" --out DIR", f" --{scale} --out DIR")


def markdown(rows: list[dict], missing: list[str]) -> str:
  lines = ["| paper claim | paper | printed | reproduced here | command (results) |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['claim']} | {r['paper']} | {r['printed']} | {r['reproduced']} | "
                 f"`{r['command']}` ([results]({r['results']}/table.md)) |")
  if missing:
    lines += ["", "No committed run yet: " + ", ".join(f"`{m}.py`" for m in missing)
              + " (run it, copy DIR/result.json, table.md and the PNGs to "
              "experiments/results/<name>/, then `python experiments/claims.py`)."]
  return "\n".join(lines)


def replace_block(text: str, block: str, source: str, begin: str = BEGIN, end: str = END) -> str:
  if begin not in text or end not in text:
    raise ValueError(f"{source} has no {begin!r} ... {end!r} markers")
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  return f"{head}{begin}\n{block}\n{end}{tail}"


def _tables_file(readme: str) -> str:
  """Where the CIFAR-10 tables block lives: the README's section "Reproducing the papers' CIFAR-10
  tables"."""
  return readme


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default=os.path.join(HERE, "results"))
  parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
  parser.add_argument("--tables", default="", help="file with the CIFAR-10 tables block (default: "
                      "the README)")
  args = parser.parse_args(argv)
  status = 0
  blocks = {args.readme: [(markdown(*collect(args.results)), BEGIN, END)]}
  tables = args.tables or _tables_file(args.readme)
  blocks.setdefault(tables, []).append((tables_markdown(collect_tables(args.results)),
                                        TABLES_BEGIN, TABLES_END))
  for path, parts in blocks.items():
    with open(path) as f:
      text = f.read()
    new = text
    for block, begin, end in parts:
      new = replace_block(new, block, path, begin, end)
    if args.check:
      if new != text:
        print(f"{path}: a generated table is stale; run python experiments/claims.py")
        status = 1
    elif new != text:
      with open(path, "w") as f:
        f.write(new)
  return status


if __name__ == "__main__":
  sys.exit(main())
