"""XLA flags for the test processes and the CLI subprocesses they start.

Most of the suite's time is XLA compiling many small programs on the CPU,
and LLVM's optimisation passes are much of that. The tests compile at LLVM
level 1 instead of XLA's default 2. Measured on 2 cores, fresh caches:
tests/test_model.py took 151 s at level 2, 93 s at level 1 and 76 s at
level 0; the fixture-parity evaluation, which runs more than it compiles,
took 16 s, 15 s and about 200 s (level 0 leaves the loops unvectorised).
The programs compute the same things; float rounding can differ in the last
bits, which no test's tolerance depends on. Set TEXTFUSION_TEST_XLA_OPT=1 to
run the suite with XLA's default optimisation, as users' runs compile.
"""

import os

LIGHT_LLVM_OPT = "--xla_backend_optimization_level=1"


def flags_for_tests(extra: str = "") -> str:
  """This process's XLA_FLAGS plus the tests' own, plus `extra`."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  level_set = any(f.startswith("--xla_backend_optimization_level")
                  for f in flags)  # a level the caller chose wins
  if os.environ.get("TEXTFUSION_TEST_XLA_OPT", "") != "1" and not level_set:
    flags.append(LIGHT_LLVM_OPT)
  if extra:
    flags.append(extra)
  return " ".join(flags)


def host_devices(count: int) -> str:
  """XLA_FLAGS for a subprocess that fakes `count` CPU devices."""
  return flags_for_tests(f"--xla_force_host_platform_device_count={count}")
