"""XLA options for the suite's few execution-heavy tests.

conftest.py compiles the suite at LLVM -O0 (``--xla_backend_optimization_level=0``): its programs
are small and run briefly, so LLVM's optimization was the largest part of XLA:CPU's compile time,
and O0 cut the suite's CPU time by 26 % (1664 -> 1230 CPU-s, 2 cores). A test whose program runs
long (thousands of EM steps over tens of thousands of paths) compiles it at XLA's default level
with ``optimized_jit`` instead (O0 made the Appendix-G pulse check 6x slower).
"""
import functools

import jax

OPTIMIZATION_FLAG = "xla_backend_optimization_level"
XLA_DEFAULT_OPTIMIZATION = {OPTIMIZATION_FLAG: 3}  # XLA's own default (DebugOptions)

optimized_jit = functools.partial(jax.jit, compiler_options=XLA_DEFAULT_OPTIMIZATION)
