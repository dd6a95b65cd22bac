"""K members trained as one program: each is exactly a single run with its own seed; averaging."""

import functools
import io
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import config as config_lib
from zaremba_jax import data as data_lib
from zaremba_jax import evaluation
from zaremba_jax import kernels
from zaremba_jax import members as members_lib
from zaremba_jax import loop
from zaremba_jax import model as model_lib
from zaremba_jax import reporting
from zaremba_jax import sample
from zaremba_jax import train as train_lib
from tests import helpers


def run(config, data, workdir=None):
  out = io.StringIO()
  result = loop.train_and_evaluate(config, data, workdir, reporting.Reporter(workdir, out))
  return result, out.getvalue()


class MembersEqualSingleRunsTest(absltest.TestCase):
  """Member i of --members=3 --seed=S against the single run with --seed=S+i."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = tempfile.mkdtemp()
    cls.data = helpers.write_tiny_corpus(root)
    # Dropout, so that each member's dropout key matters too; a step cap inside epoch 2.
    cls.config = helpers.tiny_config(dropout=0.3, max_train_steps=30, seed=5)
    cls.workdir = os.path.join(root, "run")
    cls.members, cls.members_log = run(cls.config.replace(members=3), cls.data, cls.workdir)
    cls.single_dirs = [os.path.join(root, f"single{i}") for i in range(3)]
    cls.singles = [run(cls.config.replace(seed=5 + i), cls.data, w)[0]
                   for i, w in enumerate(cls.single_dirs)]

  def test_parameters_equal_the_single_runs(self):
    for i, single in enumerate(self.singles):
      got = jax.tree.map(lambda x: x[i], self.members["state"].params)
      for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(got),
                                 jax.tree.leaves(single["state"].params)):
        np.testing.assert_allclose(g, want[0], rtol=1e-5, atol=1e-6,
                                   err_msg=f"member {i} {jax.tree_util.keystr(path)}")

  def test_member_perplexities_equal_the_single_runs(self):
    records = helpers.read_metrics(self.workdir)
    for split in ("valid", "test"):
      last = [r for r in records if r["split"] == split][-1]
      want = [s[split] for s in self.singles]
      np.testing.assert_allclose(last["member_perplexity"], want, rtol=1e-4, err_msg=split)
      # log(mean p) >= mean(log p) token by token (Jensen): the ensemble's perplexity is at most
      # the geometric mean of the members'.
      self.assertLessEqual(last["perplexity"], np.exp(np.log(want).mean()) * (1 + 1e-6), split)
    self.assertIn("members", self.members_log)  # the spread is on the progress lines

  def test_best_checkpoint_is_chosen_by_the_ensemble(self):
    records = [r for r in helpers.read_metrics(self.workdir) if r["split"] == "valid"]
    trained = checkpoint_lib.load_trained(self.workdir)
    best_step = min(records, key=lambda r: r["perplexity"])["step"]
    self.assertEqual(trained.step, best_step)
    self.assertEqual(jax.tree.leaves(trained.params)[0].shape[0], 3)


  def test_evaluate_averages_separate_runs_as_one_members_run(self):
    out = io.StringIO()
    reporter = reporting.Reporter(None, out)
    together = evaluation.evaluate_checkpoint(self.workdir, self.data, reporter=reporter,
                                        ensemble_sizes=(1, 3))
    apart = evaluation.evaluate_checkpoint(",".join(self.single_dirs), self.data,
                                     reporter=reporting.Reporter(None, io.StringIO()))
    for split in ("valid", "test"):
      self.assertAlmostEqual(together[split], apart[split], delta=1e-4 * apart[split])
    log = out.getvalue()
    self.assertIn("(average of the first 1 of 3 members)", log)
    # The valid line of the first member alone is member 0's valid perplexity.
    first = float(log.split("(average of the first 1 of 3 members)")[0].split("ppl")[-1])
    self.assertAlmostEqual(first, reporter.records[0]["member_perplexity"][0], places=2)
    with self.assertRaisesRegex(checkpoint_lib.CheckpointError, "give sizes from 1 to 3"):
      evaluation.evaluate_checkpoint(self.workdir, self.data, ensemble_sizes=(4,),
                               reporter=reporting.Reporter(None, io.StringIO()))

  def test_runs_of_another_level_are_refused(self):
    char_dir = os.path.join(self.create_tempdir().full_path, "char")
    run(self.config.replace(level="char", max_train_steps=2, max_max_epoch=1), self.data,
        char_dir)
    with self.assertRaisesRegex(checkpoint_lib.ResumeError, "is char-level than .*; average runs"
                                " of one level"):
      evaluation.evaluate_checkpoint(f"{self.workdir},{char_dir}", self.data,
                               reporter=reporting.Reporter(None, io.StringIO()))


def fresh_members(config, model, tx):
  """`config.members` fresh TrainStates stacked, as a run starts them (seeds seed, seed+1, ...)."""
  make_one = functools.partial(train_lib.create_train_state, config, model, tx)
  return members_lib.create(make_one, range(config.seed, config.seed + config.members))


class EnsembleTest(absltest.TestCase):
  """The ensemble's NLL is -log of the mean of the members' probabilities, by hand."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))
    self.config = helpers.tiny_config(init_scale=1.0, members=2)
    self.model = model_lib.make_model(self.config, 9)
    tx = train_lib.make_optimizer(self.config, 10)
    self.params = fresh_members(self.config, self.model, tx).params
    self.stream = np.random.default_rng(3).integers(0, 9, size=23).astype(np.int32)

  def by_hand(self):
    """Per member, token by token with the state carried: the probability of each target."""
    probs_KxN = []
    for k in range(2):
      p = jax.tree.map(lambda x: x[k], self.params)
      carry, probs = model_lib.zero_state(2, 1, 16), []
      for t in range(len(self.stream) - 1):
        logits, carry = self.model.apply({"params": p}, self.stream[None, t:t + 1], carry,
                                         train=False)
        probs.append(float(jax.nn.softmax(logits[0, 0])[self.stream[t + 1]]))
      probs_KxN.append(probs)
    return np.array(probs_KxN, np.float64)

  def test_ensemble_is_the_mean_of_probabilities(self):
    windows = data_lib.eval_windows(data_lib.batchify(self.stream, 1), 8)
    planned = model_lib.planned_for(self.model, 1, windows[0].size)
    member_nll, nll_KxNxBxT, count_K = jax.jit(functools.partial(
        evaluation.evaluate_members, model=planned))(self.params, *windows)
    count = count_K[0]
    probs_KxN = self.by_hand()
    self.assertEqual(int(count), 22)
    np.testing.assert_allclose(member_nll, -np.log(probs_KxN).sum(1), rtol=1e-4)
    nll_KxP = np.asarray(nll_KxNxBxT).reshape(2, -1)
    got = members_lib.ensemble_nll(nll_KxP, np.asarray(windows[2]).reshape(-1))
    want = -np.log(probs_KxN.mean(0)).sum()  # the mean of probabilities, not of log-probabilities
    self.assertAlmostEqual(got, want, places=3)
    self.assertGreater(abs(want + np.log(probs_KxN).mean(0).sum()), 1e-3)  # the two differ here

  def test_predictor_averages_probabilities(self):
    trained = checkpoint_lib.Trained(config=self.config, vocab=tuple(map(str, range(9))),
                                     model=self.model, params=self.params, step=0, epoch=0,
                                     path="")
    predictor = sample.Predictor(trained)
    logprobs_V, _ = predictor.feed(self.stream[:4], predictor.start())
    want = []
    for k in range(2):
      p = jax.tree.map(lambda x: x[k], self.params)
      logits, _ = self.model.apply({"params": p}, self.stream[None, :4],
                                   model_lib.zero_state(2, 1, 16), train=False)
      want.append(np.asarray(jax.nn.softmax(logits[0, -1]), np.float64))
    np.testing.assert_allclose(np.exp(np.asarray(logprobs_V, np.float64)), np.mean(want, 0),
                               rtol=1e-5, atol=1e-7)


class PerMemberClippingTest(absltest.TestCase):
  """Each member clips its own gradient: one member's huge gradient leaves the other's step."""

  def test_a_huge_gradient_does_not_shrink_another_members_step(self):
    config = helpers.tiny_config(members=2, max_grad_norm=1.0)
    model = model_lib.make_model(config, 13)
    tx = train_lib.make_optimizer(config, 100)
    state = fresh_members(config, model, tx)
    # Member 0's weights are blown up (a huge gradient, clipped hard); member 1's are as made.
    state = state.replace(params=jax.tree.map(lambda x: x.at[0].multiply(30.0), state.params))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, size=(2, 4, 6)), jnp.int32)
    member_1 = jax.tree.map(lambda x: x[1], state)  # before the call donates `state`
    steps = functools.partial(train_lib.train_steps, model=model, tx=tx)
    new, metrics = jax.jit(members_lib.lift(steps, (0, None, None)))(
        state, tokens[:, :, :-1], tokens[:, :, 1:])
    self.assertGreater(float(metrics["grad_norm"][0, 0]), 10 * float(metrics["grad_norm"][1, 0]))
    want, _ = jax.jit(steps)(member_1, tokens[:, :, :-1], tokens[:, :, 1:])
    for got, expected in zip(jax.tree.leaves(jax.tree.map(lambda x: x[1], new.params)),
                             jax.tree.leaves(want.params)):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


class ParamsOnlyTest(absltest.TestCase):
  """Inference reads the parameters alone: the optimizer state is never rebuilt or read."""

  def test_loads_beside_an_optimizer_state_of_another_shape(self):
    config = helpers.tiny_config(members=2)
    model = model_lib.make_model(config, 12)
    state = fresh_members(config, model, train_lib.make_optimizer(config, 10))
    # An optimizer state no optimizer of this config makes: a restore that built one to read
    # the whole TrainState would refuse the checkpoint.
    state = state.replace(opt_state={"momentum": jnp.ones((2, 3, 5))})
    workdir = self.create_tempdir().full_path
    ckpt = checkpoint_lib.Checkpointer(workdir)
    ckpt.save(7, state, {"config": config.to_dict(), "vocab": [f"w{i}" for i in range(12)],
                         "progress": {"epoch": 2, "window": 0}, "metrics": []})
    ckpt.close()
    trained = checkpoint_lib.load_trained(workdir)
    self.assertEqual(trained.step, 7)
    self.assertEqual(members_lib.count(trained.params), 2)
    for got, want in zip(jax.tree.leaves(trained.params), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(got, want)


class BadInputTest(absltest.TestCase):

  def test_zero_members_is_refused(self):
    with self.assertRaisesRegex(ValueError, "--members=0 must be at least 1"):
      config_lib.Config(members=0)

  def test_members_flag_is_refused_at_parse_time(self):
    import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
    proc = subprocess.run([sys.executable, "-m", "zaremba_jax.main", "--members=0"],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("members", proc.stderr)


if __name__ == "__main__":
  absltest.main()
