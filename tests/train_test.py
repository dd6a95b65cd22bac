"""Schedule, loss scaling, clipping, the test protocol, and learning on a tiny corpus."""

import io

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
    nll, count = train_lib.jit_evaluate(model)(params, *windows)
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

  def test_steps_per_call_does_not_change_the_run(self):
    folder = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    results = []
    for per_call in (1, 7):  # 7: groups cut short by progress lines and the step cap
      config = helpers.tiny_config(dropout=0.3, max_train_steps=40, steps_per_call=per_call)
      results.append(loop.train_and_evaluate(config, folder, None,
                                             reporting.Reporter(None, io.StringIO())))
    one, grouped = results
    self.assertEqual(int(grouped["state"].step), 40)
    for x, y in zip(jax.tree.leaves(one["state"].params), jax.tree.leaves(grouped["state"].params)):
      np.testing.assert_array_equal(x, y)
    self.assertEqual((one["valid"], one["test"]), (grouped["valid"], grouped["test"]))


if __name__ == "__main__":
  absltest.main()
