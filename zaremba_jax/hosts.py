"""Several processes (hosts): joining, the same run everywhere, preemption, a peer that is lost.

A run of P processes is P copies of the same command, one with each --process_id (mesh.py starts
`jax.distributed`). What a user meets there, and what this module makes of it (docs/hosts.md):

- Joining: process 0 says at once what it waits for; --init_timeout ends the wait with one line
  naming the process ids that never joined (each process signs in with a file in
  WORKDIR/hosts/ before it joins: JAX itself does not say who is missing).
- The same run: every process compares its Config, its data's digests and the package version
  with process 0's (`check_same_run`, a `process_allgather`) and a difference is refused on every
  process with one line naming the fields and both values.
- Preemption: SIGTERM or SIGINT on any process is turned into JAX's own preemption notice, and
  every process asks JAX's preemption sync point at each step boundary (`Preemption`), so all stop
  at the same step and save one checkpoint together.
- A lost peer (killed, its host gone) or coordinator: the first failed collective or coordination
  call in our code, or JAX's own ending of the process, leaves with a few lines (which process
  stopped answering, the newest checkpoint on disk, that the same commands resume) and exit
  status 3 (`EXIT_PEER_LOST`).

JAX 0.10.2 ends a process whose coordination service reports an error (a peer's missed heartbeats,
the coordinator gone, a join that timed out) by a fatal log and abort(), with a C++ stack trace;
its hook for that (`missed_heartbeat_callback`) fails with std::bad_cast in this jaxlib, and
jax.distributed.initialize does not pass it. So, in a multi-process run only: JAX's and XLA's own
messages (file descriptor 2) go to WORKDIR/hosts/process_I.log instead of the terminal, where
Python's sys.stderr still goes, and a SIGABRT handler reads that log's last lines, prints ours
and leaves with os._exit.
"""

import ctypes
import datetime
import hashlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time

EXIT_REFUSED = 1     # the processes differ, or not all joined within --init_timeout
EXIT_PEER_LOST = 3   # a peer or the coordinator stopped answering during the run

HOSTS_DIR = "hosts"  # in the workdir: sign-in files and each process's native log

# The key JAX's own SIGTERM notifier writes (xla/tsl preemption_sync_manager.cc): every process
# watches it and then agrees on the step to stop at.
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"

# What a failed collective or coordination call says when a peer is gone.
_PEER_MARKERS = ("Gloo", "gloo", "Connection reset", "Connection closed", "UNAVAILABLE",
                 "heartbeat", "Barrier failed", "DEADLINE_EXCEEDED", "coordination service",
                 "Socket closed", "is not connected", "CANCELLED")


class _State:
  """This process's place in a multi-process run (one per process; empty in a single one)."""

  def __init__(self):
    self.process_id = None
    self.num_processes = 1
    self.address = None
    self.workdir = None
    self.log_path = None
    self.terminal = None   # a file on the terminal's stderr, past the redirection
    self.abort_handler = None
    self.started = 0.0     # when this process began to wait for the others
    self.init_timeout = 0
    self.leaving = False


_state = _State()


def active() -> bool:
  """Whether this process is one of several."""
  return _state.num_processes > 1


def _say(line: str) -> None:
  out = _state.terminal or sys.stderr
  out.write(line + "\n")
  out.flush()


# ---------------------------------------------------------------------------------------------
# Joining

def _hosts_dir(workdir: str | None) -> str | None:
  return os.path.join(os.path.abspath(workdir), HOSTS_DIR) if workdir else None


def _sign_in(folder: str, process_id: int) -> None:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"process_{process_id}.joined"), "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)


def missing_ids(folder: str | None, num_processes: int, since: float) -> list[int] | None:
  """The process ids with no sign-in file in `folder` written after `since` (None: unknown)."""
  if not folder:
    return None
  missing = []
  for pid in range(num_processes):
    path = os.path.join(folder, f"process_{pid}.joined")
    if not os.path.exists(path) or os.path.getmtime(path) < since:
      missing.append(pid)
  return missing


def _never_joined_line() -> str:
  timeout = _state.init_timeout
  missing = missing_ids(_hosts_dir(_state.workdir), _state.num_processes,
                        _state.started - timeout)
  if missing is None:
    who = "some of them (give every process the same --workdir to learn which)"
  elif missing:
    who = "process id" + ("s " if len(missing) > 1 else " ") + ", ".join(map(str, missing))
  else:
    who = "unknown (every process signed in: are their --coordinator_address the same?)"
  return (f"error: not all {_state.num_processes} processes joined at {_state.address} within"
          f" --init_timeout={timeout} s; never joined: {who}. Start every process with the"
          f" same --coordinator_address and --num_processes, or raise --init_timeout")


def _redirect_native_output(folder: str, process_id: int) -> str:
  """Points file descriptor 2 (JAX's C++ logs, gloo, faulthandler) at a log file; Python's
  sys.stderr keeps the terminal."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"process_{process_id}.log")
  sys.stderr.flush()
  terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
  log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(log, 2)
  os.close(log)
  _state.terminal = terminal
  sys.stderr = terminal
  return path


def start(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
          *, workdir: str | None, init_timeout: int, peer_timeout: int, initialize) -> bool:
  """Joins this process to a multi-process run (nothing without `coordinator_address`).

  `initialize(initialization_timeout=, heartbeat_timeout_seconds=, shutdown_timeout_seconds=)`
  starts jax.distributed (mesh.initialize_distributed). Before it: the native log redirection,
  the abort handler, this process's sign-in file; process 0 prints the waiting line. A wait past
  `init_timeout` seconds ends with one line and exit status 1.

  Returns:
    Whether this is a multi-process run.
  """
  if coordinator_address is None:
    return False
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if process_id >= num_processes:
    raise ValueError(f"--process_id={process_id} must be below --num_processes={num_processes}")
  _state.process_id, _state.num_processes = process_id, num_processes
  _state.address, _state.workdir = coordinator_address, workdir
  folder = _hosts_dir(workdir) or tempfile.mkdtemp(prefix="zaremba_jax_hosts_")
  _state.log_path = _redirect_native_output(folder, process_id)
  _install_abort_handler()
  _state.started, _state.init_timeout = time.time(), init_timeout
  if workdir:
    _sign_in(folder, process_id)
  if process_id == 0:
    _say(f"waiting for {num_processes - 1} of {num_processes} processes at {coordinator_address},"
         f" up to {init_timeout} s (JAX's own messages: {_state.log_path})")

  timer = threading.Timer(init_timeout, lambda: _leave(_never_joined_line(), EXIT_REFUSED))
  timer.daemon = True
  timer.start()
  initialize(initialization_timeout=init_timeout, heartbeat_timeout_seconds=peer_timeout,
             shutdown_timeout_seconds=peer_timeout)
  timer.cancel()
  if process_id == 0:
    _say(f"all {num_processes} processes joined")
  return True


# ---------------------------------------------------------------------------------------------
# Leaving when a peer is lost

def newest_checkpoint(workdir: str | None) -> int | None:
  """The newest complete checkpoint's step on disk (Orbax renames a finished save to its step)."""
  if not workdir:
    return None
  folder = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(folder):
    return None
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()]
  return max(steps) if steps else None


def stopped_ids(text: str) -> list[int]:
  """The process ids a JAX error names as gone: the coordinator when it cannot be reached, else
  the tasks listed after 'stopped sending heartbeats):' (one a line, 'N' or '/job:...task:N')
  or named in 'Task N heartbeat timeout'."""
  if "Failed to send RPC to coordination service" in text or "leader task" in text:
    return [0]
  ids = {int(n) for n in re.findall(r"Task (\d+) heartbeat timeout", text)}
  listed = text.split("stopped sending heartbeats):", 1)
  if len(listed) == 2:
    for line in listed[1].strip().splitlines():
      found = re.fullmatch(r"\s*(?:/job:\S*/task:)?(\d+)\s*", line)
      if not found:
        break
      ids.add(int(found.group(1)))
  return sorted(ids)


def _who_stopped(text: str) -> str:
  """'process 1 stopped answering', from a JAX error or the native log's last lines."""
  others = [pid for pid in range(_state.num_processes) if pid != _state.process_id]
  ids = stopped_ids(text)
  ids = [pid for pid in ids if pid != _state.process_id]
  if not ids and len(others) == 1:
    ids = others
  if not ids:
    return "a peer process stopped answering"
  names = [f"process {pid}{' (the coordinator)' if pid == 0 else ''}" for pid in ids]
  return f"{', '.join(names)} stopped answering"


def _lost_lines(text: str) -> list[str]:
  step = newest_checkpoint(_state.workdir)
  where = (f"the newest checkpoint on disk is step {step} in {_state.workdir}" if step is not None
           else "no checkpoint on disk yet")
  return [f"error: {_who_stopped(text)}; this process stops too (JAX's messages:"
          f" {_state.log_path})",
          f"{where}; run the same commands on every process again to resume"]


def _leave(text: str, status: int) -> None:
  """Prints `text` (lines) once and ends this process at once: no atexit handlers (JAX's shutdown
  barrier would wait for the lost peer), no Python teardown."""
  if _state.leaving:
    os._exit(status)
  _state.leaving = True
  try:
    _say(text)
  finally:
    os._exit(status)


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error` (or an exception it was raised from) is a collective or coordination call
  that failed because a peer or the coordinator is gone; only in a multi-process run."""
  if not active():
    return False
  seen = 0
  while error is not None and seen < 10:
    if any(marker in str(error) for marker in _PEER_MARKERS) or isinstance(error, TimeoutError):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def leave_if_peer_lost(error: BaseException) -> None:
  """Ends this process with the lost-peer lines (exit status 3) if `error` is a peer failure;
  returns otherwise (the caller re-raises)."""
  if is_peer_failure(error):
    text = str(error)
    cause = error.__cause__ or error.__context__
    while cause is not None:
      text += "\n" + str(cause)
      cause = cause.__cause__ or cause.__context__
    _leave("\n".join(_lost_lines(text)), EXIT_PEER_LOST)


def _native_log_tail(limit: int = 20000) -> str:
  try:
    with open(_state.log_path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - limit))
      return f.read().decode("utf-8", "replace")
  except OSError:
    return ""


def _on_abort(signum):
  """SIGABRT: JAX's fatal log has gone to the native log; say what it means, in our words."""
  del signum
  tail = _native_log_tail()
  fatal = tail[tail.rfind("Terminating process because"):] if "Terminating process" in tail else ""
  if "RegisterTask" in fatal:
    _leave(_never_joined_line(), EXIT_REFUSED)
  elif fatal:
    _leave("\n".join(_lost_lines(fatal)), EXIT_PEER_LOST)
  _leave(f"error: JAX aborted this process; its messages are in {_state.log_path}", 134)


def _install_abort_handler() -> None:
  """A C-level SIGABRT handler (Python's own run only between bytecodes of the main thread,
  after abort() has already ended the process)."""
  handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
  _state.abort_handler = handler_type(_on_abort)  # kept alive: C holds only the pointer
  libc = ctypes.CDLL(None, use_errno=True)
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = [ctypes.c_int, handler_type]
  libc.signal(signal.SIGABRT, _state.abort_handler)


# ---------------------------------------------------------------------------------------------
# The same run everywhere

def run_fields(config, corpus, **extra) -> dict:
  """What must be equal on every process: the Config's fields, the data's digests, the package's
  (and jax's) version, and `extra` (e.g. restart)."""
  import jax
  import zaremba_jax
  fields = dict(config.to_dict())
  for split in ("train", "valid", "test"):
    fields[f"{split} data digest"] = hashlib.sha256(corpus.split(split).tobytes()).hexdigest()[:16]
  fields["vocabulary digest"] = hashlib.sha256("\n".join(corpus.vocab).encode()).hexdigest()[:16]
  fields["zaremba_jax version"] = zaremba_jax.__version__
  fields["jax version"] = jax.__version__
  fields.update(extra)
  return fields


def differences(everyone: list[dict]) -> list[str]:
  """'process 1: hidden_size=100, process 0: hidden_size=200' for each field that differs from
  process 0's (everyone[0]), process by process."""
  reference = everyone[0]
  lines = []
  for pid, fields in enumerate(everyone[1:], start=1):
    for name in sorted(set(reference) | set(fields)):
      if fields.get(name) != reference.get(name):
        lines.append(f"process {pid}: {name}={fields.get(name)}, process 0:"
                     f" {name}={reference.get(name)}")
  return lines


def gather_fields(fields: dict) -> list[dict]:
  """Every process's `fields`, in process order (a collective: every process calls it)."""
  import numpy as np
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(fields, sort_keys=True).encode(), dtype=np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(blobs[i, :int(lengths.reshape(-1)[i])]).decode())
          for i in range(blobs.shape[0])]


class MismatchError(ValueError):
  """The processes were not started the same way. The message says what differs."""


def check_same_run(config, corpus, **extra) -> None:
  """Refuses (MismatchError, on every process) a run whose processes differ from process 0."""
  if not active():
    return
  try:
    everyone = gather_fields(run_fields(config, corpus, **extra))
  except Exception as e:  # pylint: disable=broad-except
    leave_if_peer_lost(e)
    raise
  diffs = differences(everyone)
  if diffs:
    raise MismatchError(f"the processes were started differently: {'; '.join(diffs)}; start every"
                        f" process with the same flags, data and package version")


# ---------------------------------------------------------------------------------------------
# Preemption

class Preemption:
  """Turns a signal on one process into a stop of every process at the same step.

  `notice()` writes JAX's preemption notice (as JAX's SIGTERM notifier would); `reached(step)`,
  called at every step boundary with the global step, asks JAX's preemption sync point for each
  step since the last call (JAX counts calls one by one, Orbax's saves ask it with the step
  too). JAX then has every process stop at the first step past the fastest one's.
  """

  def __init__(self):
    self.last = None
    self.noticed = False

  def notice(self) -> None:
    if self.noticed:
      return
    self.noticed = True
    from jax._src import distributed
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    distributed.global_state.client.key_value_set(_PREEMPTION_NOTICE_KEY, now,
                                                  allow_overwrite=True)

  def reached(self, step: int) -> bool:
    from jax.experimental import multihost_utils
    first = step if self.last is None else self.last + 1
    self.last = step
    hit = False
    for s in range(first, step + 1):
      hit = multihost_utils.reached_preemption_sync_point(s) or hit
    return hit


def leave_now(reason: str) -> None:
  """A second signal: stop at once, without a checkpoint (the others then see a lost peer)."""
  step = newest_checkpoint(_state.workdir)
  _leave(f"second {reason}: stopping at once without a checkpoint"
         f"{f'; the newest on disk is step {step}' if step is not None else ''}", 1)
