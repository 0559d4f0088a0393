"""Progress of long phases (train, eval stages, sampling, fitting): one line when a phase starts,
then items done, rate and ETA at least every ``every_s`` seconds.

On a terminal the report is a tqdm bar; otherwise (logs, CI, notebooks writing to files) plain absl
log lines, so a run is never silent for minutes.
"""
from __future__ import annotations

import sys
import time

from absl import logging


class Progress:
  """``with Progress('bits/dim (ODE)', total=360, unit='images') as p: ... p.update(n)``.

  ``update(n, **postfix)`` adds n items; ``postfix`` values (e.g. ``loss=0.12``) are shown with the
  rate. ``resumed(n)``: n items done by an earlier, interrupted run (counted, never in the rate).
  The final line gives items, seconds and the mean rate.
  """

  def __init__(self, name: str, total: int | None, unit: str = "items", every_s: float = 10.0,
               bar: bool | None = None):
    self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
    self.done = self.skipped = 0
    self._bar = None
    use_bar = sys.stderr.isatty() if bar is None else bar
    if use_bar:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, desc=name, unit=f" {unit}", dynamic_ncols=True)

  def __enter__(self) -> "Progress":
    self.t0 = self._last = time.time()
    logging.info("%s: started (%s %s)", self.name, self.total if self.total else "?", self.unit)
    return self

  def update(self, n: int = 1, **postfix) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      return
    now = time.time()
    if now - self._last >= self.every_s or (self.total and self.done >= self.total):
      self._last = now
      logging.info("%s", self.line(now, postfix))

  def resumed(self, n: int) -> None:
    """n items already done before a preemption (results kept on disk): logged, counted as done,
    left out of the rate and ETA."""
    self.done += n
    self.skipped += n
    if self._bar is not None:
      self._bar.update(n)
    logging.info("%s: resumed at %d/%s %s (done before the interruption)", self.name, n,
                 self.total if self.total else "?", self.unit)

  def line(self, now: float, postfix: dict | None = None) -> str:
    el = max(now - self.t0, 1e-9)
    rate = (self.done - self.skipped) / el
    text = f"{self.name}: {self.done}"
    if self.total:
      eta = (self.total - self.done) / max(rate, 1e-12)
      text += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), ETA {eta:.0f} s"
    else:
      text += f" {self.unit}"
    text += f", {rate:.3g} {self.unit}/s, {el:.0f} s elapsed"
    if postfix:
      text += ", " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in postfix.items())
    return text

  def __exit__(self, *exc) -> None:
    if self._bar is not None:
      self._bar.close()
    el = time.time() - self.t0
    logging.info("%s: %s after %d %s in %.1f s (%.3g %s/s)%s", self.name,
                 "stopped" if exc[0] else "done", self.done, self.unit, el,
                 (self.done - self.skipped) / max(el, 1e-9), self.unit,
                 f", {self.skipped} resumed" if self.skipped else "")
