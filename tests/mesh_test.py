"""zaremba_jax.mesh: the layout, the shardings of a vmapped member step, two processes.

The device count is fixed when jax starts, so the multi-device checks run in subprocesses: one with
4 simulated CPU devices (meshes over 1, 2 and 4 of them), and two processes of 2 devices each joined
by jax.distributed (gloo). Both run the toy step below (`_child_main`) and write their results; this
process compares them with the same step run plainly on one device.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT_S = 90  # a hung child (e.g. a dead distributed peer) fails the test, never blocks
# The toy: K members, L layers, B rows, H units, S windows of T tokens over V words.
K, L, B, H, S, T, V = 2, 2, 8, 8, 3, 5, 11
# The meshes the children run: (devices used, --mesh spec or None for automatic, ways), a way
# being "donate" (output shardings given and the state donated, as the training loop will) or
# "propagate" (output shardings left to XLA). Each case is one compilation (~2 s on a busy CPU).
DEVICE_CASES = ((1, None, ("donate",)), (2, None, ("donate",)), (4, None, ("donate", "propagate")),
                (2, "members=1,batch=2", ("donate",)),
                (4, "members=1,batch=4", ("donate", "propagate")))
PROCESS_CASES = ((4, None, ("donate",)), (4, "members=1,batch=4", ("donate",)))  # 2 processes


class Carry(NamedTuple):
  c_LxBxH: jax.Array
  h_LxBxH: jax.Array


@flax.struct.dataclass
class ToyState:
  """A TrainState-like pytree, every leaf with a leading member axis."""
  step: jax.Array
  params: dict
  carry: Carry
  key: jax.Array


def toy_state() -> ToyState:
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(0, 0.3, (K, H, H)).astype(np.float32),
            "emb": rng.normal(0, 0.5, (K, V, H)).astype(np.float32)}
  carry = Carry(rng.normal(0, 0.5, (K, L, B, H)).astype(np.float32),
                rng.normal(0, 0.5, (K, L, B, H)).astype(np.float32))
  return ToyState(step=np.zeros((K,), np.int32), params=params, carry=carry,
                  key=jax.random.split(jax.random.key(7), K))


def toy_inputs() -> np.ndarray:
  return np.random.default_rng(1).integers(0, V, (S, B, T)).astype(np.int32)


def member_steps(state: ToyState, inputs_SxBxT):
  """One member's S steps: an embedding gather, a recurrence on the carry, dropout, SGD."""
  def step(state, inputs_BxT):
    def loss_fn(params):
      x_BxH = params["emb"][inputs_BxT].mean(1)
      c, h = state.carry
      keep = jax.random.bernoulli(jax.random.fold_in(state.key, state.step), 0.8, h.shape)
      new_h = jnp.tanh(h @ params["w"] + x_BxH[None] + c) * keep / 0.8
      new_c = 0.5 * c + new_h
      return (new_h ** 2).sum() / inputs_BxT.shape[0], Carry(new_c, new_h)
    (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    return state.replace(step=state.step + 1, params=params, carry=carry), loss
  return jax.lax.scan(step, state, inputs_SxBxT)


def toy_train(state, inputs_SxBxT):
  """All members, the same inputs: (state with the member axis, losses [K, S])."""
  return jax.vmap(member_steps, in_axes=(0, None))(state, inputs_SxBxT)


def results(state: ToyState, losses) -> dict:
  """The outputs compared across runs, as host arrays."""
  host = mesh_lib.to_host({"c": state.carry.c_LxBxH, "h": state.carry.h_LxBxH,
                           "w": state.params["w"], "emb": state.params["emb"],
                           "step": state.step, "key": state.key, "losses": losses})
  return host


def run_on_mesh(mesh, donate: bool) -> tuple[dict, dict]:
  """The toy step on `mesh`, its results and what the output shardings were."""
  state, inputs = toy_state(), toy_inputs()
  state_sh = mesh_lib.state_sharding(mesh, state)
  if donate:  # as the training loop will: output shardings given, the state donated
    step = jax.jit(toy_train, in_shardings=(state_sh, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(state_sh, mesh_lib.member_sharding(mesh)), donate_argnums=0)
  else:  # output shardings left to XLA's propagation
    step = jax.jit(toy_train, in_shardings=(state_sh, mesh_lib.batch_sharding(mesh)))
  placed_inputs = mesh_lib.put_batch(mesh, inputs)
  out, losses = step(mesh_lib.put(state, state_sh), placed_inputs)
  carry_want = mesh_lib.carry_sharding(mesh)
  member_want = mesh_lib.member_sharding(mesh)
  info = {
      "mesh": dict(mesh.shape),
      "carry_spec": str(out.carry.c_LxBxH.sharding.spec),
      "carry_ok": all(x.sharding.is_equivalent_to(carry_want, 4) for x in out.carry),
      "carry_shard_shape": list(out.carry.h_LxBxH.sharding.shard_shape((K, L, B, H))),
      "w_spec": str(out.params["w"].sharding.spec),
      "w_ok": out.params["w"].sharding.is_equivalent_to(member_want, 3),
      "w_shard_shape": list(out.params["w"].sharding.shard_shape((K, H, H))),
      "key_ok": out.key.sharding.is_equivalent_to(member_want, 1),
      # Rows of the inputs this process holds, and whether each shard holds the right ones.
      "input_rows": sorted({r for s in placed_inputs.addressable_shards
                            for r in range(B)[s.index[1]]}),
      "input_shards_ok": all(np.array_equal(np.asarray(s.data), inputs[s.index])
                             for s in placed_inputs.addressable_shards),
  }
  return results(out, losses), info


def _child_main(mode: str, out_dir: str, *args: str) -> None:
  """The subprocesses' entry point: `devices` (one process, 4 devices) or `process PID PORT`."""
  cases = []
  if mode == "process":
    pid, port = int(args[0]), int(args[1])
    mesh_lib.initialize_distributed(f"127.0.0.1:{port}", 2, pid, initialization_timeout=30,
                                    heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    for _, spec, ways in PROCESS_CASES:
      cases.append((f"{spec}", mesh_lib.make_mesh(K, B, spec), ways))
    name = f"process{pid}"
  else:
    assert jax.device_count() == 4, jax.devices()
    for n, spec, ways in DEVICE_CASES:
      cases.append((f"{n}:{spec}", mesh_lib.make_mesh(K, B, spec, devices=jax.devices()[:n]),
                    ways))
    name = "devices"
  infos, arrays = {}, {}
  for case, mesh, ways in cases:
    for way in ways:
      tag = f"{case}:{way}"
      out, infos[tag] = run_on_mesh(mesh, donate=way == "donate")
      arrays.update({f"{tag}/{k}": v for k, v in out.items()})
  np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(infos, f)


def child_env(**changes) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS")}
  env.update(JAX_PLATFORMS="cpu", **changes)
  return env


def child_command(*args) -> list[str]:
  return [sys.executable, "-c", "import sys; from tests import mesh_test;"
          " mesh_test._child_main(*sys.argv[1:])", *map(str, args)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LayoutTest(parameterized.TestCase):

  @parameterized.parameters(
      (2, 20, 1, (1, 1)), (2, 20, 2, (2, 1)), (2, 20, 4, (2, 2)), (3, 20, 2, (1, 2)),
      (4, 20, 8, (4, 2)), (6, 4, 4, (2, 2)), (1, 20, 4, (1, 4)), (5, 1, 5, (5, 1)))
  def test_automatic_layout_puts_members_first(self, members, batch, devices, want):
    self.assertEqual(mesh_lib.layout(members, batch, devices), want)

  def test_members_one_by_one_only_on_a_single_cpu_device(self):
    self.assertTrue(mesh_lib.members_one_by_one("cpu", 1))
    self.assertFalse(mesh_lib.members_one_by_one("cpu", 4))  # spread over devices: side by side
    self.assertFalse(mesh_lib.members_one_by_one("gpu", 1))

  def test_rows_that_do_not_divide_are_refused_with_the_numbers(self):
    with self.assertRaisesRegex(mesh_lib.MeshError,
                                r"^20 batch rows do not divide over 3 devices left after members"
                                r".*--batch_size divisible by 3 or --mesh="):
      mesh_lib.layout(2, 20, 3)
    with self.assertRaisesRegex(mesh_lib.MeshError, "20 batch rows do not divide over 8 devices"):
      mesh_lib.layout(1, 20, 8)
    self.assertTrue(issubclass(mesh_lib.MeshError, ValueError))

  @parameterized.parameters(
      ("members=2,batch=2", 2, 20, 4, (2, 2)), ("members=1,batch=4", 2, 20, 4, (1, 4)),
      (" batch = 4 , members = 1 ", 2, 20, 4, (1, 4)), ("batch=2", 2, 20, 4, (2, 2)),
      ("members=1", 3, 20, 2, (1, 2)))
  def test_spec_overrides_the_layout(self, spec, members, batch, devices, want):
    self.assertEqual(mesh_lib.layout(members, batch, devices, spec), want)

  @parameterized.parameters(
      ("members:2", "write it as 'members=M,batch=N'"), ("members=2,", "write it as"),
      ("members=two", "write it as"), ("model=2", "unknown axis 'model'"),
      ("members=2,members=2", "gives the members axis twice"),
      ("members=0,batch=4", "sizes are >= 1"),
      ("members=2,batch=4", r"does not cover the 4 devices; give members\*batch=4"),
      ("batch=3", "does not cover the 4 devices"),
      ("members=4,batch=1", "2 members do not divide over 4 devices"),
      ("members=1,batch=4", "6 batch rows do not divide over 4 devices"))
  def test_bad_specs_say_what_is_wrong(self, spec, message):
    with self.assertRaisesRegex(mesh_lib.MeshError, message) as e:
      mesh_lib.layout(2, 6, 4, spec)
    self.assertNotIn("\n", str(e.exception))

  def test_make_mesh_has_auto_axes(self):
    mesh = mesh_lib.make_mesh(2, 20)
    self.assertEqual(mesh.axis_names, ("members", "batch"))
    self.assertEqual(mesh.axis_types, (jax.sharding.AxisType.Auto,) * 2)
    self.assertEqual(dict(mesh.shape), {"members": 1, "batch": 1})
    self.assertIn("1 members x 1 batch over 1", mesh_lib.describe(mesh))


class ShardingTest(absltest.TestCase):

  def test_train_state_carry_splits_rows_everything_else_members(self):
    """On the real, member-stacked TrainState of train.py."""
    from zaremba_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    from zaremba_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    from tests import helpers  # pylint: disable=g-import-not-at-top
    config = helpers.tiny_config()
    model = model_lib.make_model(config, 13)
    tx = train_lib.make_optimizer(config, 10)
    abstract = jax.eval_shape(jax.vmap(
        lambda key: train_lib.create_train_state(config, model, tx, key)),
        jax.random.split(jax.random.key(0), 3))
    mesh = mesh_lib.make_mesh(3, config.batch_size)
    shardings = mesh_lib.state_sharding(mesh, abstract)
    specs = jax.tree_util.tree_flatten_with_path(shardings)[0]
    carry = [(p, s.spec) for p, s in specs if jax.tree_util.keystr(p).startswith(".carry")]
    self.assertLen(carry, 2)
    for path, spec in carry:
      self.assertEqual(spec, jax.sharding.PartitionSpec("members", None, "batch"), path)
    others = [(p, s.spec) for p, s in specs if not jax.tree_util.keystr(p).startswith(".carry")]
    self.assertGreater(len(others), 4)
    for path, spec in others:
      self.assertEqual(spec, jax.sharding.PartitionSpec("members"), path)

  def test_leaves_that_do_not_fit_are_named(self):
    mesh = mesh_lib.make_mesh(1, 4)
    bad = {"params": {"w": jax.ShapeDtypeStruct((), jnp.float32)}}
    with self.assertRaisesRegex(mesh_lib.MeshError, r"\['params'\]\['w'\] of shape \(\)"):
      mesh_lib.state_sharding(mesh, bad)
    bad = {"carry": jax.ShapeDtypeStruct((2, 4, 5), jnp.float32)}
    with self.assertRaisesRegex(mesh_lib.MeshError, r"carry leaf \['carry'\].*\[K, L, B, H\]"):
      mesh_lib.state_sharding(mesh, bad)
    plain = mesh_lib.state_sharding(mesh, bad, carry=lambda path: False)
    self.assertEqual(plain["carry"].spec, jax.sharding.PartitionSpec("members"))

  def test_specs(self):
    mesh = mesh_lib.make_mesh(1, 4)
    P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
    self.assertEqual(mesh_lib.batch_sharding(mesh).spec, P(None, "batch"))
    self.assertEqual(mesh_lib.batch_sharding(mesh, batch_axis=0).spec, P("batch"))
    self.assertEqual(mesh_lib.carry_sharding(mesh).spec, P("members", None, "batch"))
    self.assertEqual(mesh_lib.replicated(mesh).spec, P())

  def test_put_and_to_host_round_trip_on_one_process(self):
    mesh = mesh_lib.make_mesh(K, B)
    inputs = toy_inputs()
    placed = mesh_lib.put_batch(mesh, inputs)
    self.assertEqual(placed.sharding, mesh_lib.batch_sharding(mesh))
    np.testing.assert_array_equal(mesh_lib.to_host(placed), inputs)
    state = toy_state()
    back = mesh_lib.to_host(mesh_lib.put(state, mesh_lib.state_sharding(mesh, state)))
    np.testing.assert_array_equal(back.params["w"], state.params["w"])
    np.testing.assert_array_equal(back.key, jax.random.key_data(state.key))

  def test_initialize_distributed_needs_to_be_asked(self):
    self.assertFalse(mesh_lib.initialize_distributed(None, None, None))
    self.assertTrue(mesh_lib.is_primary())


class DevicesTest(absltest.TestCase):
  """The toy step on meshes over 1, 2, 4 simulated devices, and on two processes x 2 devices."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    state, losses = jax.jit(toy_train)(jax.device_put(toy_state()), toy_inputs())
    cls.want = results(state, losses)  # one device, no mesh

  def check_results(self, arrays, tag):
    for name, want in self.want.items():
      got = arrays[f"{tag}/{name}"]
      if np.issubdtype(want.dtype, np.floating):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{tag}/{name}")
      else:
        np.testing.assert_array_equal(got, want, err_msg=f"{tag}/{name}")

  def check_shardings(self, info, tag, members, batch):
    self.assertEqual(info["mesh"], {"members": members, "batch": batch}, tag)
    self.assertTrue(info["carry_ok"], f"{tag}: carry came out {info['carry_spec']}")
    self.assertEqual(info["carry_shard_shape"], [K // members, L, B // batch, H], tag)
    self.assertTrue(info["w_ok"], f"{tag}: params came out {info['w_spec']}")
    self.assertEqual(info["w_shard_shape"], [K // members, H, H], tag)
    self.assertTrue(info["key_ok"], tag)
    self.assertTrue(info["input_shards_ok"], tag)

  def run_children(self, commands, env):
    """Runs the commands at once; fails if any fails or all have not ended in CHILD_TIMEOUT_S.

    (A peer that dies makes the other abort within heartbeat_timeout_seconds; the timeout is the
    backstop.) Output goes to files, not pipes, so a chatty child cannot block on a full pipe.
    """
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
             for c, log in zip(commands, logs)]
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
      for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
        p.wait()
      self.fail(f"children still running after {CHILD_TIMEOUT_S} s (hung?): {commands}")
    for p, log in zip(procs, logs):
      log.seek(0)
      self.assertEqual(p.returncode, 0, f"child {p.args[3:]} failed:\n{log.read()[-3000:]}")
      log.close()

  def load(self, folder, name):
    with open(os.path.join(folder, f"{name}.json")) as f:
      info = json.load(f)
    return info, dict(np.load(os.path.join(folder, f"{name}.npz")))

  def test_one_process_1_2_4_devices(self):
    folder = self.create_tempdir().full_path
    self.run_children([child_command("devices", folder)],
                      child_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    infos, arrays = self.load(folder, "devices")
    for n, spec, ways in DEVICE_CASES:
      members, batch = mesh_lib.layout(K, B, n, spec)
      for way in ways:
        tag = f"{n}:{spec}:{way}"
        self.check_shardings(infos[tag], tag, members, batch)
        self.check_results(arrays, tag)
    self.assertEqual(infos["4:None:donate"]["mesh"], {"members": 2, "batch": 2})

  def test_two_processes(self):
    folder = self.create_tempdir().full_path
    port = free_port()
    self.run_children([child_command("process", folder, pid, port) for pid in (0, 1)],
                      child_env(JAX_NUM_CPU_DEVICES="2"))
    for pid in (0, 1):
      infos, arrays = self.load(folder, f"process{pid}")
      for n, spec, ways in PROCESS_CASES:
        members, batch = mesh_lib.layout(K, B, n, spec)
        for way in ways:
          tag = f"{spec}:{way}"
          self.check_shardings(infos[tag], tag, members, batch)
          self.check_results(arrays, tag)
      # Automatic: members split over the processes, each process holds every row.
      self.assertEqual(infos["None:donate"]["input_rows"], list(range(B)))
      # members=1,batch=4: the rows split over the processes, each holds only its own half.
      half = B // 2
      self.assertEqual(infos["members=1,batch=4:donate"]["input_rows"],
                       list(range(pid * half, (pid + 1) * half)))


if __name__ == "__main__":
  absltest.main()
