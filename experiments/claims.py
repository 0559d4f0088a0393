"""The README's table "paper claim → printed → reproduced here → command", filled from the
experiments' own outputs: every script in experiments/ with a ``summarize(result) -> rows``
function is read against ``experiments/results/<script>/result.json`` (its committed run, else the
default-size run in ``experiments/results/<script>/default/``; the
command shows ``--long`` / ``--full`` when that run was not at the default scale).

  python experiments/claims.py            # rewrites the block between the README's markers
  python experiments/claims.py --check    # exits 1 when the README's block is not what it makes

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


def _module(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def collect(results_dir: str) -> tuple[list[dict], list[str]]:
  """(claim rows of every experiment with committed results, scripts without results)."""
  sys.path.insert(0, ROOT)
  rows, missing = [], []
  for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
    name = os.path.basename(path)[:-3]
    if name == "claims":
      continue
    mod = _module(path)
    if not hasattr(mod, "summarize"):
      continue
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


def replace_block(text: str, block: str, source: str) -> str:
  if BEGIN not in text or END not in text:
    raise ValueError(f"{source} has no {BEGIN!r} ... {END!r} markers")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default=os.path.join(HERE, "results"))
  parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
  args = parser.parse_args(argv)
  with open(args.readme) as f:
    text = f.read()
  new = replace_block(text, markdown(*collect(args.results)), args.readme)
  if args.check:
    if new != text:
      print(f"{args.readme}: the claims table is stale; run python experiments/claims.py")
      return 1
    return 0
  with open(args.readme, "w") as f:
    f.write(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
