"""Downloads on first use (DESIGN.md, "Errors": datasets and FID weights download where there is
network; offline they fail fast, saying how to provide them).

* ``unreachable(url)``: a TCP connection to the URL's host (or to the HTTPS proxy of the
  environment) within ``PROBE_TIMEOUT_S`` seconds, DNS included, run in a daemon thread so that no
  resolver or firewall can stall the caller longer; the reason when it fails, else None. It runs
  before a download, so an offline machine fails in seconds instead of hanging in a library's
  download loop (TFDS and urllib have no timeout of their own).
* ``once_per_run(prepare, what)``: in a run of several processes (``jax.distributed``) only process 0
  downloads (several hosts writing one shared folder would corrupt it); the others wait at a
  barrier, then use what it wrote. Every process must call it at the same point.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Callable

import jax

PROBE_TIMEOUT_S = 10.0


def cache_dir() -> str:
  """scorelab's cache folder: ``$SCORELAB_CACHE``, else ``$XDG_CACHE_HOME/scorelab``, else
  ``~/.cache/scorelab`` (FID weights, verified dataset arrays; the XLA cache in ``xla/``)."""
  if os.environ.get("SCORELAB_CACHE"):
    return os.environ["SCORELAB_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "scorelab")


def _endpoint(url: str) -> tuple[str, int] | None:
  """(host, port) a download of ``url`` connects to first: the environment's proxy for its scheme
  (``https_proxy`` ...) if one is set and the host is not excluded, else the URL's own host."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https") or not parts.hostname:
    return None  # file:// and the like need no network
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname):
    p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return p.hostname, p.port or (443 if p.scheme == "https" else 80)
  return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def unreachable(url: str, timeout_s: float | None = None) -> str | None:
  """Why ``url`` cannot be downloaded now (no route, no DNS, no answer within ``timeout_s``
  seconds, default ``PROBE_TIMEOUT_S``), or None when its host (or proxy) accepts a TCP
  connection. Returns within about ``timeout_s`` seconds whatever the network does."""
  timeout_s = PROBE_TIMEOUT_S if timeout_s is None else float(timeout_s)
  endpoint = _endpoint(url)
  if endpoint is None:
    return None
  outcome: list[str | None] = []

  def probe() -> None:
    try:
      with socket.create_connection(endpoint, timeout=timeout_s):
        outcome.append(None)
    except OSError as e:
      outcome.append(f"{type(e).__name__}: {e}")

  thread = threading.Thread(target=probe, name=f"probe {endpoint[0]}", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if not outcome:
    return f"{endpoint[0]}:{endpoint[1]} did not answer within {timeout_s:g} s"
  return None if outcome[0] is None else f"{endpoint[0]}:{endpoint[1]}: {outcome[0]}"


def once_per_run(prepare: Callable[[], None], what: str) -> None:
  """Runs ``prepare()`` on process 0 only; with several processes the others wait until it has
  finished (a barrier every process reaches) and process 0 raises its error after the barrier
  (so no process is left waiting). Callers check afterwards that the result is there."""
  if jax.process_count() == 1:
    prepare()
    return
  error = None
  if jax.process_index() == 0:
    try:
      prepare()
    except Exception as e:  # noqa: BLE001  (re-raised below, once every process is released)
      error = e
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(f"downloads: {what}")
  if error is not None:
    raise error
