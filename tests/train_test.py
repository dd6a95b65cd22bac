"""Schedule, loss scaling, clipping, the test protocol, and learning on a tiny corpus."""

import functools
import io
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import data as data_lib
from zaremba_jax import loop
from zaremba_jax import model as model_lib
from zaremba_jax import reporting
from zaremba_jax import train as train_lib
from tests import helpers
from tests import reference


class ScheduleTest(parameterized.TestCase):

  def test_large_preset_every_epoch(self):
    # Paper, section 4.1: 14 epochs at 1, then / 1.15 after each epoch; 55 epochs.
    want = [1.0] * 14 + [1.15 ** -k for k in range(1, 42)]
    self.assertLen(want, 55)
    steps_per_epoch = 7
    schedule = train_lib.make_schedule(1.0, 14, 1.15, steps_per_epoch)
    for epoch in range(1, 56):
      self.assertAlmostEqual(train_lib.learning_rate_for_epoch(epoch, 1.0, 14, 1.15),
                             want[epoch - 1], places=12)
      first, last = (epoch - 1) * steps_per_epoch, epoch * steps_per_epoch - 1
      for step in (first, last):
        np.testing.assert_allclose(float(schedule(step)), want[epoch - 1], rtol=2e-6,
                                   err_msg=f"epoch {epoch}, step {step}")
    self.assertEqual(train_lib.learning_rate_for_epoch(15, 1.0, 14, 1.15), 1 / 1.15)

  def test_small_preset(self):
    rates = [train_lib.learning_rate_for_epoch(e, 1.0, 4, 2.0) for e in range(1, 14)]
    self.assertEqual(rates, [1, 1, 1, 1, 0.5, 0.25, 0.125, 0.0625, 2 ** -5, 2 ** -6, 2 ** -7,
                             2 ** -8, 2 ** -9])


class LossAndOptimizerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.config = helpers.tiny_config(num_steps=6)
    self.model = model_lib.make_model(self.config, 13)
    self.carry = model_lib.zero_state(2, 4, 16)
    rng = np.random.default_rng(0)
    self.inputs = rng.integers(0, 13, size=(4, 6)).astype(np.int32)
    self.targets = rng.integers(0, 13, size=(4, 6)).astype(np.int32)
    self.params = self.model.init(jax.random.key(0), self.inputs, self.carry,
                                  train=False)["params"]

  def test_loss_is_summed_over_time_and_averaged_over_batch(self):
    def losses(params):
      nll, _ = self.model.apply({"params": params}, self.inputs, self.carry, train=False,
                                targets_BxT=self.targets)
      loss, nll_sum = train_lib.sequence_loss(nll)
      logits, _ = self.model.apply({"params": params}, self.inputs, self.carry, train=False)
      mean = optax.softmax_cross_entropy_with_integer_labels(logits, self.targets).mean()
      return loss, nll_sum, mean
    loss, nll_sum, mean = losses(self.params)
    self.assertAlmostEqual(float(loss), float(mean) * 6, places=4)
    self.assertAlmostEqual(float(nll_sum), float(mean) * 24, places=3)
    grad_loss = jax.grad(lambda p: losses(p)[0])(self.params)
    grad_mean = jax.grad(lambda p: losses(p)[2])(self.params)
    for g_loss, g_mean in zip(jax.tree.leaves(grad_loss), jax.tree.leaves(grad_mean)):
      np.testing.assert_allclose(g_loss, 6 * g_mean, rtol=1e-4, atol=1e-7)

  def test_clipping_scales_a_known_gradient_to_the_bound(self):
    tx = train_lib.make_optimizer(self.config.replace(max_grad_norm=5.0, learning_rate=1.0), 10)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([6.0, 0.0]), "b": jnp.array([8.0])}  # norm 10
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-3.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-4.0], rtol=1e-6)
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}  # under the bound: untouched
    updates, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(updates["b"], [-0.4], rtol=1e-6)

  def test_train_step_is_sgd_on_the_summed_loss(self):
    config = self.config.replace(max_grad_norm=1e9, learning_rate=0.5)
    tx = train_lib.make_optimizer(config, 100)
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=self.params,
                                 opt_state=tx.init(self.params), carry=self.carry,
                                 key=jax.random.key(0))
    def loss(params):
      logits, _ = self.model.apply({"params": params}, self.inputs, self.carry, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, self.targets).sum() / 4
    want = jax.tree.map(lambda p, g: p - 0.5 * g, self.params, jax.grad(loss)(self.params))
    new_state, metrics = train_lib.train_step(state, self.inputs, self.targets, model=self.model,
                                              tx=tx)
    for got, exp in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    self.assertEqual(int(new_state.step), 1)
    _, want_carry = self.model.apply({"params": self.params}, self.inputs, self.carry,
                                     train=False)
    np.testing.assert_allclose(new_state.carry.h_LxBxH, want_carry.h_LxBxH, rtol=1e-6)
    self.assertGreater(float(metrics["grad_norm"]), 0.0)


class TrainStepFromACarryTest(absltest.TestCase):
  """Train steps that start from a non-zero carry, against jax.grad of the paper's model written
  out (reference.lstm_forward) and run from that carry."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # No clipping, so that a step is p - lr * grad; weights large enough that the carry matters.
    cls.config = helpers.tiny_config(batch_size=3, num_steps=4, hidden_size=8, init_scale=0.5,
                                     max_grad_norm=1e9, learning_rate=0.5)
    cls.model = model_lib.make_model(cls.config, 11)
    cls.tx = train_lib.make_optimizer(cls.config, 100)
    rng = np.random.default_rng(4)
    cls.inputs_KxBxT, cls.targets_KxBxT = (
        rng.integers(0, 11, size=(2, 3, 4)).astype(np.int32) for _ in range(2))
    cls.carry = reference.random_carry(rng, 2, 3, 8)
    cls.initial = train_lib.create_train_state(cls.config, cls.model, cls.tx, jax.random.key(0))

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))

  def state(self):
    """A fresh copy (jit_train_steps donates its argument) holding the non-zero carry."""
    state = jax.tree.map(lambda a: a.copy(), self.initial)
    return state.replace(carry=model_lib.LSTMState(*(a.copy() for a in self.carry)))

  @staticmethod
  @jax.jit
  def reference_step(params, carry, inputs, targets):
    """(params after one SGD step at 0.5, carry after the window, nll_sum, gradient norm)."""
    def loss(params):
      logits, carry_out = reference.lstm_forward(params, inputs, carry)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)
      return nll.sum() / inputs.shape[0], (carry_out, nll.sum())
    (_, (carry_out, nll_sum)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    norm = jnp.sqrt(sum((g ** 2).sum() for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), carry_out, nll_sum, norm

  def assert_trees_close(self, got, want, what):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6,
                                 err_msg=f"{what}{jax.tree_util.keystr(path)}")

  def test_train_step_starts_from_the_incoming_carry(self):
    state = self.state()
    params0 = state.params
    want_params, want_carry, want_nll, want_norm = self.reference_step(
        params0, self.carry, self.inputs_KxBxT[0], self.targets_KxBxT[0])
    # The reference from a zero carry lands elsewhere, so a step that ignored the carry would fail.
    zero = tuple(jnp.zeros_like(a) for a in self.carry)
    from_zero = self.reference_step(params0, zero, self.inputs_KxBxT[0], self.targets_KxBxT[0])
    self.assertGreater(max(float(jnp.abs(a - b).max()) for a, b in
                           zip(jax.tree.leaves(from_zero[0]), jax.tree.leaves(want_params))), 1e-3)
    step = jax.jit(functools.partial(train_lib.train_step, model=self.model, tx=self.tx))
    new_state, metrics = step(state, self.inputs_KxBxT[0], self.targets_KxBxT[0])
    self.assertEqual(int(new_state.step), 1)
    self.assert_trees_close(new_state.params, want_params, "params")
    self.assert_trees_close(tuple(new_state.carry), want_carry, "carry")
    np.testing.assert_allclose(metrics["nll_sum"], want_nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], want_norm, rtol=1e-5)

  def test_jitted_steps_carry_the_state_from_window_to_window(self):
    state = self.state()
    params, carry, nlls = state.params, self.carry, []
    for inputs, targets in zip(self.inputs_KxBxT, self.targets_KxBxT):
      params, carry, nll_sum, _ = self.reference_step(params, carry, inputs, targets)
      nlls.append(nll_sum)
    steps = jax.jit(functools.partial(train_lib.train_steps, model=self.model, tx=self.tx),
                    donate_argnums=0)
    new_state, metrics = steps(state, self.inputs_KxBxT, self.targets_KxBxT)
    self.assertEqual(int(new_state.step), 2)
    self.assert_trees_close(new_state.params, params, "params")
    self.assert_trees_close(tuple(new_state.carry), carry, "carry")
    np.testing.assert_allclose(metrics["nll_sum"], nlls, rtol=1e-5)


class EvaluateTest(absltest.TestCase):

  def test_batch_one_test_pass_equals_token_by_token_loop(self):
    # Weights large enough that the tokens move the NLL (at init 0.1 they hardly do), so that this
    # also checks the first layer's table, which the 24-token stream (more than 9 rows) takes.
    config = helpers.tiny_config(init_scale=1.0)
    model = model_lib.make_model(config, 9)
    stream = np.random.default_rng(3).integers(0, 9, size=23).astype(np.int32)
    params = model.init(jax.random.key(2), stream[None, :5], model_lib.zero_state(2, 1, 16),
                        train=False)["params"]
    windows = data_lib.eval_windows(data_lib.batchify(stream, 1), 8)  # 22 predictions, padded
    nll, nll_NxBxT, count = jax.jit(functools.partial(train_lib.evaluate, model=model))(
        params, *windows)
    self.assertAlmostEqual(float(nll_NxBxT.sum()), float(nll), places=3)
    carry, want = model_lib.zero_state(2, 1, 16), 0.0
    for t in range(len(stream) - 1):  # one token at a time, the state carried throughout
      logits, carry = model.apply({"params": params}, stream[None, t:t + 1], carry, train=False)
      want -= float(jax.nn.log_softmax(logits[0, 0])[stream[t + 1]])
    self.assertEqual(int(count), 22)
    self.assertAlmostEqual(float(nll), want, places=3)


class TinyRunTest(absltest.TestCase):

  def test_training_drives_perplexity_down(self):
    folder = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    workdir = self.create_tempdir().full_path
    out = io.StringIO()
    config = helpers.tiny_config(max_max_epoch=4, max_epoch=3, hidden_size=24)
    result = loop.train_and_evaluate(config, folder, workdir, reporting.Reporter(workdir, out))
    # 11 words + <eos>: a uniform guess has perplexity 12; counting sequences are learnable.
    self.assertLess(result["valid"], 4.0)
    self.assertLess(result["test"], 4.0)
    lines = [l for l in out.getvalue().splitlines() if "train ppl" in l]
    first = float(lines[0].split("train ppl")[1].split()[0])
    last = float(lines[-1].split("train ppl")[1].split()[0])
    self.assertLess(last, first / 2)
    self.assertIn("summary: valid ppl", out.getvalue().splitlines()[-1])

  def test_progress_lines_are_evenly_spaced_through_each_epoch(self):
    folder = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    corpus = data_lib.load_corpus(folder, "word")
    # Pick a window length whose epoch is 4k+1 windows long: with 4 lines an epoch, a line lands
    # one window before the end unless the loop skips it.
    for num_steps in range(3, 12):
      config = helpers.tiny_config(num_steps=num_steps, max_max_epoch=1, log_per_epoch=4)
      steps = data_lib.num_train_windows(data_lib.batchify(corpus.train, 4), num_steps)
      if steps % 4 == 1 and steps >= 17:
        break
    else:
      self.fail("no window length gives a 4k+1-window epoch")
    workdir = self.create_tempdir().full_path
    loop.train_and_evaluate(config, folder, workdir, reporting.Reporter(workdir, io.StringIO()))
    steps_logged = [r["step"] for r in helpers.read_metrics(workdir) if r["split"] == "train"]
    log_every = steps // 4
    self.assertEqual(steps_logged, [log_every, 2 * log_every, 3 * log_every, steps])


class StepsPerCallTest(parameterized.TestCase):
  """A run's bits do not depend on how its steps are grouped into calls."""

  @parameterized.named_parameters(
      ("paper", dict(dropout=0.3)),
      # Weight decay and NT-ASGD together once made the one-window program round the first
      # clipped step differently from the many-window one (an ulp, then the runs diverged: 0.09
      # apart in a parameter after 40 steps of this config). lr 3 makes the gradient norm cross
      # the clip of 5 after a few steps; which configs showed it depended on XLA's fusions (every
      # switch at once happened not to), hence both.
      ("decay_and_averaging", dict(dropout=0.3, tie_weights=True, weight_decay=1e-3,
                                   nt_asgd=True, learning_rate=3.0)),
      ("every_switch", dict(dropout=0.3, locked_dropout=True, dropout_recurrent=0.2,
                            weight_drop=0.2, dropout_embedding=0.1, tie_weights=True,
                            weight_decay=1e-3, nt_asgd=True, nonmono=1, learning_rate=3.0)),
  )
  def test_steps_per_call_does_not_change_the_run(self, switches):
    folder = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    results = []
    for per_call in (1, 7):  # 7: groups cut short by progress lines and the step cap
      config = helpers.tiny_config(max_train_steps=40, steps_per_call=per_call, **switches)
      results.append(loop.train_and_evaluate(config, folder, None,
                                             reporting.Reporter(None, io.StringIO())))
    one, grouped = results
    self.assertEqual(grouped["state"].step.tolist(), [40])  # one member
    for part in ("params", "average"):
      for x, y in zip(jax.tree.leaves(getattr(one["state"], part)),
                      jax.tree.leaves(getattr(grouped["state"], part))):
        np.testing.assert_array_equal(x, y, err_msg=part)
    self.assertEqual((one["valid"], one["test"]), (grouped["valid"], grouped["test"]))


class CarryResetTest(absltest.TestCase):

  def test_carry_is_zero_at_each_epoch_start_and_only_there(self):
    """The carry each call of the loop's jitted train steps starts from: zeros at an epoch's first
    window, and everywhere else the carry the previous call returned."""
    folder = helpers.write_tiny_corpus(self.create_tempdir().full_path, n_lines=(100, 20, 20))
    config = helpers.tiny_config(max_max_epoch=3, steps_per_call=4)
    # Counted here from the token stream: each of the batch_size rows cut from it gives
    # (row length - 1) // num_steps windows (the targets run one token ahead).
    n_train = len(data_lib.read_words(f"{folder}/ptb.train.txt"))
    steps_per_epoch = (n_train // config.batch_size - 1) // config.num_steps
    calls = []  # (first step, carry in, windows, carry out) of each call
    jit_train_steps = loop.Run.jit_train_steps

    def observed(run):
      train_steps = jit_train_steps(run)
      def call(state, inputs_KxBxT, targets_KxBxT):
        step, carry_in = int(state.step[0]), [np.array(a) for a in state.carry]  # before donation
        state, metrics = train_steps(state, inputs_KxBxT, targets_KxBxT)
        calls.append((step, carry_in, len(inputs_KxBxT), [np.array(a) for a in state.carry]))
        return state, metrics
      return call

    with mock.patch.object(loop.Run, "jit_train_steps", observed):
      loop.train_and_evaluate(config, folder, None, reporting.Reporter(None, io.StringIO()))
    self.assertEqual(sum(k for _, _, k, _ in calls), 3 * steps_per_epoch)
    self.assertGreater(len(calls), 3 * 3)  # several calls an epoch, so "only there" is tested
    previous_out = None
    for step, carry_in, k, carry_out in calls:
      window = step % steps_per_epoch
      self.assertLessEqual(window + k, steps_per_epoch, f"the call at step {step} crosses an"
                           f" epoch's end, where the carry must be reset")
      if window == 0:
        for a in carry_in:
          np.testing.assert_array_equal(a, 0.0, err_msg=f"carry at the epoch start, step {step}")
      else:
        self.assertGreater(np.abs(carry_in[1]).max(), 0.0, f"carry reset at step {step}")
        for a, b in zip(carry_in, previous_out):
          np.testing.assert_array_equal(a, b, err_msg=f"carry into step {step} is not the one the"
                                        f" previous call returned")
      previous_out = carry_out


if __name__ == "__main__":
  absltest.main()
