"""What the interleaved A/B benchmarks share (train_step.py, peer_score_sde.py): one worker
process per variant that answers one-line requests with a ``TAG {json}`` line, and the JSON +
markdown report next to it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Callable


class WorkerProcess:
  """``python <script> <args>`` in ``cwd`` with ``env``; its stderr goes to a temporary log that
  is shown when it dies. It prints ``READY {json}`` (kept as ``info``) once it has compiled, then
  ``RESULT {json}`` for every request line."""

  def __init__(self, script: str, args: list[str], name: str, env: dict, cwd: str,
               close_timeout_s: float = 60):
    self.name, self.close_timeout_s = name, close_timeout_s
    self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}_", suffix=".log", delete=False)
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(script)] + args,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                 text=True, env=env, cwd=cwd)
    self.info = self._read("READY")

  def _read(self, tag: str) -> dict:
    for line in self.proc.stdout:
      if line.startswith(tag + " "):
        return json.loads(line[len(tag) + 1:])
    self.log.seek(0)
    raise RuntimeError(f"worker {self.name} died:\n{self.log.read()[-3000:]}")

  def request(self, line: str) -> dict:
    self.proc.stdin.write(line + "\n")
    self.proc.stdin.flush()
    return self._read("RESULT")

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=self.close_timeout_s)
    os.unlink(self.log.name)


def write_report(out: dict, path: str, markdown: Callable[[dict], str]) -> None:
  """``out`` as JSON at ``path`` and ``markdown(out)`` beside it (``.md``), and printed."""
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(markdown(out))
  print(markdown(out))
