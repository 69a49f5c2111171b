"""Joining a multi-process (multi-host) JAX job, before anything uses devices.

Two ways in, both through `jax.distributed.initialize`:

* explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I`
  on every host (process 0 runs the coordinator at HOST:PORT);
* auto-detected (`--multihost`): JAX reads the job from its environment on
  Cloud TPU pods, SLURM (`srun`) and Open MPI (`mpirun`).

Afterwards `jax.devices()` lists every process's devices, so the mesh spans
the whole job; `jax.process_index()` picks each process's data shard and
process 0 alone writes logs and evaluation outputs.

JAX aborts the whole process (a fatal C++ error, no Python exception) when
the coordinator never answers or a process never joins, so a worker first
polls the coordinator's port itself, and every process runs a watchdog that
fails with one line after `timeout_s`, before JAX's own deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Iterator

import jax

from textfusion_jax import errors
from textfusion_jax.errors import UserError

_BARRIERS = itertools.count()


def _host_port(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"--coordinator_address={address!r}: expected HOST:PORT")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once HOST:PORT accepts TCP connections, else a one-line error."""
  host, port = _host_port(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise UserError(
            f"cannot reach the coordinator at {address} within {timeout_s:g}"
            f" s ({error.strerror or error}); start process 0 there first or"
            " fix --coordinator_address") from None
      time.sleep(0.5)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: int = 300, auto_flag: str = "--multihost",
               auto_remedy: str = "pass --coordinator_address, "
               "--num_processes and --process_id instead") -> None:
  """Joins the job described by the flags; a no-op for a single process.
  `auto_flag` and `auto_remedy` word the error of a CLI whose auto-detect
  flag has another name."""
  explicit = {"--coordinator_address": coordinator_address,
              "--num_processes": num_processes, "--process_id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if auto and given:
    raise UserError(f"--multihost detects the job itself; drop "
                    f"{', '.join(given)} or drop --multihost")
  if auto:
    try:
      with _watchdog(timeout_s, "the detected job's processes"):
        jax.distributed.initialize(
            initialization_timeout=timeout_s + _JAX_GRACE_S)
    except (ValueError, RuntimeError) as error:
      first = str(error).strip().splitlines()[0] if str(error) else ""
      raise UserError(f"{auto_flag}: JAX detected no multi-process job "
                      f"(Cloud TPU pod, SLURM, Open MPI) here ({first[:200]})"
                      f"; {auto_remedy}") from None
    return
  if not given:
    return
  missing = [name for name, value in explicit.items() if value is None]
  if missing:
    raise UserError(f"{', '.join(given)} also needs {', '.join(missing)} "
                    "(a multi-process job names the coordinator, the process "
                    "count and this process's id)")
  if num_processes < 1:
    raise UserError(f"--num_processes={num_processes}: must be at least 1")
  if not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} is out of range for "
                    f"--num_processes={num_processes} (0..{num_processes - 1})")
  _host_port(coordinator_address)
  if process_id != 0:
    wait_for_coordinator(coordinator_address, timeout_s)
  with _watchdog(timeout_s, f"the job's {num_processes} processes "
                 f"(coordinator {coordinator_address})"):
    jax.distributed.initialize(coordinator_address, num_processes,
                               process_id,
                               initialization_timeout=timeout_s + _JAX_GRACE_S)


# JAX's own deadline comes this much after the watchdog's, so the one-line
# error always wins the race with its abort.
_JAX_GRACE_S = 15


@contextlib.contextmanager
def _watchdog(timeout_s: float, who: str) -> Iterator[None]:
  """Exits the process with one line if the block outlives `timeout_s`."""

  def expire() -> None:
    errors.fail(f"{who} did not all join within {timeout_s:g} s; start "
                "every process with the same --coordinator_address and "
                "--num_processes, and each --process_id once",
                exit_now=True)

  timer = threading.Timer(timeout_s, expire)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here; nothing to do for one process.

  Cross-process CPU collectives (gloo) give up after 30 s, so processes must
  enter a newly compiled program together: one still compiling, or still in
  process-0-only work (TensorBoard, writing images), would time the others
  out. Callers compile first, then meet here with a generous timeout.
  """
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Orbax's barrier (the distributed runtime's, with a timeout); names must
  # be unique, and every process passes the same barriers in the same order.
  ocp.multihost.sync_global_processes(f"textfusion_{next(_BARRIERS)}_{name}",
                                      timeout=timeout_s)
