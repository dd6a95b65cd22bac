"""Devices and hosts for K members x B batch rows: the mesh, the shardings, host <-> device.

K independent models ("members") train as one program: every leaf of the TrainState has a leading
member axis of size K, and the member step is `jax.vmap` over it. All members read the same data
(int32 [steps, B, T] windows); each of the B batch rows is its own stream with its own carried LSTM
state, so rows split over devices like any data-parallel batch. Nothing here knows the model's math.

The mesh has two axes, ("members", "batch"), both `AxisType.Auto` (jax 0.10's `jax.make_mesh`
defaults to Explicit, which this model cannot run under). Members go over the devices first: with
D devices, "members" gets gcd(K, D) of them and "batch" the rest. Members never talk to each other,
so the members axis is the outer one (it may span hosts) and the batch axis, whose gradient
all-reduce runs every step, is the inner one (consecutive devices: the same host where it fits).

Shardings of a member-stacked TrainState (`state_sharding`):
  every leaf                      P("members")               [K, ...]
  the LSTM carry, [K, L, B, H]    P("members", None, "batch")
Inputs [steps, B, T]: P(None, "batch") (`batch_sharding`).

Multi-process runs (several hosts, or several processes on one machine): call
`initialize_distributed` before any other jax call; every process then runs the same program on the
same global arrays, each holding only its own devices' shards. `put_batch` and `put` build global
arrays from host data that every process has in full; `to_host` brings one back to every process
(a collective when the array is spread over processes: all processes must call it together).
"""

import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MEMBERS = "members"
BATCH = "batch"
AXES = (MEMBERS, BATCH)

# Where the batch rows are in the arrays this module places.
CARRY_BATCH_AXIS = 2   # the carry [K, L, B, H]
INPUT_BATCH_AXIS = 1   # the inputs [steps, B, T]


class MeshError(ValueError):
  """The members, batch rows and devices do not fit together. The message says what to do."""


# ---------------------------------------------------------------------------------------------
# Layout

def parse_spec(spec: str) -> dict[str, int]:
  """`"members=2,batch=2"` -> {"members": 2, "batch": 2}; either name may be left out."""
  sizes = {}
  for part in spec.split(","):
    match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
    if not match:
      raise MeshError(f"cannot read --mesh={spec!r}: write it as 'members=M,batch=N'")
    name, size = match.group(1), int(match.group(2))
    if name not in AXES:
      raise MeshError(f"--mesh={spec!r} names an unknown axis {name!r}; the axes are"
                      f" 'members' and 'batch'")
    if name in sizes:
      raise MeshError(f"--mesh={spec!r} gives the {name} axis twice")
    if size < 1:
      raise MeshError(f"--mesh={spec!r} gives the {name} axis size {size}; sizes are >= 1")
    sizes[name] = size
  return sizes


def layout(members: int, batch_size: int, num_devices: int,
           spec: str | None = None) -> tuple[int, int]:
  """The (members, batch) mesh shape for `num_devices` devices; pure, for tests and messages.

  Automatic: members first, gcd(members, num_devices) devices on the members axis, the rest on
  the batch axis, which must divide `batch_size`. `spec` ("members=M,batch=N", or one of the two
  with the other inferred) overrides it.
  """
  if members < 1 or batch_size < 1 or num_devices < 1:
    raise MeshError(f"need >= 1 member, batch row and device; got {members} members,"
                    f" {batch_size} rows, {num_devices} devices")
  if spec:
    sizes = parse_spec(spec)
    m = sizes.get(MEMBERS)
    b = sizes.get(BATCH)
    if m is None:
      m = num_devices // b if num_devices % b == 0 else None
    elif b is None:
      b = num_devices // m if num_devices % m == 0 else None
    if m is None or b is None or m * b != num_devices:
      raise MeshError(f"--mesh={spec} does not cover the {num_devices} devices; give"
                      f" members*batch={num_devices}")
    if members % m:
      raise MeshError(f"--mesh={spec}: {members} members do not divide over {m} devices; give"
                      f" a members axis that divides {members}")
    if batch_size % b:
      raise MeshError(f"--mesh={spec}: {batch_size} batch rows do not divide over {b} devices;"
                      f" use --batch_size divisible by {b} or a batch axis that divides"
                      f" {batch_size}")
    return m, b
  m = math.gcd(members, num_devices)
  b = num_devices // m
  if batch_size % b:
    raise MeshError(f"{batch_size} batch rows do not divide over {b} devices left after"
                    f" members ({members} members on {m} of {num_devices} devices); use"
                    f" --batch_size divisible by {b} or --mesh=members=M,batch=N")
  return m, b


def make_mesh(members: int, batch_size: int, spec: str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("members", "batch") mesh of Auto axes over `devices` (default: all, every process's).

  The shape comes from `layout`; raises MeshError when the numbers do not fit.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = layout(members, batch_size, len(devices), spec)
  # jax.make_mesh, not Mesh(np.reshape(...)): it orders TPU devices by topology. On CPU and GPU it
  # reshapes the list in order, so "batch" (the inner axis) runs over consecutive devices.
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def members_one_by_one(backend: str | None = None, num_devices: int | None = None) -> bool:
  """Whether several members in one program run one after another (`lax.map`), each with the
  one-model kernels, rather than side by side (`vmap`): on a CPU run of one device, where the
  batched products of a vmap leave the tuned matmul paths (docs/performance.md); wherever the
  members spread over devices, side by side."""
  backend = backend or jax.default_backend()
  num_devices = jax.device_count() if num_devices is None else num_devices
  return backend == "cpu" and num_devices == 1


def describe(mesh: Mesh) -> str:
  """One line for the log: "2 members x 2 batch over 4 devices (2 processes)"."""
  processes = len({d.process_index for d in mesh.devices.flat})
  return (f"{mesh.shape[MEMBERS]} members x {mesh.shape[BATCH]} batch over {mesh.devices.size}"
          f" {mesh.devices.flat[0].platform} devices ({processes} process"
          f"{'es' if processes > 1 else ''})")


# ---------------------------------------------------------------------------------------------
# Shardings

def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def member_sharding(mesh: Mesh) -> NamedSharding:
  """[K, ...]: members split, everything else whole on each device."""
  return NamedSharding(mesh, P(MEMBERS))


def carry_sharding(mesh: Mesh) -> NamedSharding:
  """The LSTM carry [K, L, B, H]: members and batch rows split."""
  return NamedSharding(mesh, P(MEMBERS, None, BATCH))


def batch_sharding(mesh: Mesh, batch_axis: int = INPUT_BATCH_AXIS) -> NamedSharding:
  """Inputs shared by all members, rows split: [steps, B, T] (batch_axis=1) or [B, T] (0)."""
  return NamedSharding(mesh, P(*(None,) * batch_axis, BATCH))


def is_carry(path) -> bool:
  """Whether a leaf's key path runs through a field (or dict key) named `carry`."""
  return any(getattr(entry, "name", getattr(entry, "key", None)) == "carry" for entry in path)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def state_sharding(mesh: Mesh, abstract_state, carry: Callable[[Any], bool] = is_carry):
  """NamedShardings for a member-stacked TrainState-like pytree (arrays or ShapeDtypeStructs).

  Every leaf gets P("members"); the leaves whose key path satisfies `carry` (by default: those
  under a field named `carry`, i.e. TrainState.carry's c and h, [K, L, B, H]) get
  P("members", None, "batch"). Pass `carry=lambda path: False` for a tree without batch rows
  (params alone). Checks the shapes and raises MeshError naming the leaf that does not fit.
  """
  m, b = mesh.shape[MEMBERS], mesh.shape[BATCH]

  def leaf_sharding(path, leaf):
    shape = tuple(leaf.shape)
    if not shape or shape[0] % m:
      raise MeshError(f"state leaf {_path_name(path)} of shape {shape} has no leading member axis"
                      f" divisible by the mesh's {m} member devices")
    if not carry(path):
      return member_sharding(mesh)
    if len(shape) != 4 or shape[CARRY_BATCH_AXIS] % b:
      raise MeshError(f"carry leaf {_path_name(path)} of shape {shape} is not [K, L, B, H] with B"
                      f" divisible by the mesh's {b} batch devices")
    return carry_sharding(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


# ---------------------------------------------------------------------------------------------
# Host -> devices

def _from_host(value, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds in full; each process copies only the
  slices its own devices hold (no cross-process traffic, unlike jax.device_put's equality check)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index],
                                      dtype=value.dtype)


def put_batch(mesh: Mesh, array_SxBxT, batch_axis: int = INPUT_BATCH_AXIS) -> jax.Array:
  """The whole global batch (a host array, the same on every process) placed rows-split.

  In a multi-process run each process copies only the rows of its own devices.
  """
  if array_SxBxT.shape[batch_axis] % mesh.shape[BATCH]:
    raise MeshError(f"{array_SxBxT.shape[batch_axis]} batch rows do not divide over the mesh's"
                    f" {mesh.shape[BATCH]} batch devices")
  return _from_host(array_SxBxT, batch_sharding(mesh, batch_axis))


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def put(tree, shardings):
  """Places a pytree of host values (the same on every process) with matching `shardings`.

  For a state made outside jit, e.g. `put(state, state_sharding(mesh, state))`. Typed PRNG keys
  are placed through their key data: in a multi-process run `jax.device_put` refuses them
  ("device_put's second argument must be a Device or a Sharding which represents addressable
  devices"), and checks other leaves equal across processes by gathering them. (Making the state
  inside `jax.jit(..., out_shardings=...)` avoids the host copy altogether.)
  """
  def place(x, sharding):
    if _is_key(x):
      data = _from_host(jax.device_get(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return _from_host(jax.device_get(x), sharding)
  return jax.tree.map(place, tree, shardings)


# ---------------------------------------------------------------------------------------------
# Devices -> host

def fetch(mesh: Mesh | None, tree):
  """`tree` as numpy on the host: `to_host` on a mesh, a plain device_get without one."""
  return jax.device_get(tree) if mesh is None else to_host(tree)


def to_host(tree):
  """Every array of `tree` as a numpy array of its global value, on every process.

  Fully addressable or fully replicated arrays are read locally; an array spread over processes
  is gathered with `multihost_utils.process_allgather` -- a collective: every process must call
  `to_host` on it, in the same order. Typed PRNG keys come back as their key data.
  """
  def get(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


# ---------------------------------------------------------------------------------------------
# Processes

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False,
                           initialization_timeout: int = 300,
                           heartbeat_timeout_seconds: int = 100,
                           shutdown_timeout_seconds: int = 300) -> bool:
  """Joins this process to a multi-process run; must come before any other jax call.

  Does nothing (returns False) unless `coordinator_address` is given ("host:port" of process 0)
  or `auto` is set (jax then detects the cluster: TPU pods, Slurm, Open MPI). On CPU,
  cross-process collectives use gloo. A dead peer makes the others wait up to the timeouts
  (seconds), so lower them in tests.

  Returns:
    Whether jax.distributed was initialized.
  """
  if coordinator_address is None and not auto:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # If any jax call came first, this raises "jax.distributed.initialize() must be called before
  # any JAX calls that might initialise the XLA backend. ...".
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                             shutdown_timeout_seconds=shutdown_timeout_seconds)
  return True


def is_primary() -> bool:
  """Whether this is process 0: the one that logs and writes files only one process should."""
  return jax.process_index() == 0
