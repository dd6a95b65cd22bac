"""A checkpoint's validation perplexity under other evaluation protocols than ours.

  python -m scripts.eval_protocols --workdir=runs/word200_s0 --data_dir=$PTB   # from the repo root

Ours carries the state through the whole validation stream at the training batch. A number
reported elsewhere may come from another protocol; this prints the first member's perplexity
under ours and under the alternatives: without <eos> or <unk> targets, the mean of per-window
perplexities, the state reset to zero at every window, and (as a check on overfitting) the
training text's first tokens.
"""

import argparse
import functools
import math

from absl import flags
import jax
import numpy as np

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import data as data_lib
from zaremba_jax import evaluation
from zaremba_jax import model as model_lib


def jit_evaluate(model):
  return jax.jit(functools.partial(evaluation.evaluate_members, model=model))


def protocols(workdir: str, data_dir: str) -> dict:
  """{protocol: the first member's validation perplexity} for the checkpoint in `workdir`."""
  trained = checkpoint_lib.load_trained(workdir, say=lambda _: None)
  params = jax.tree.map(lambda x: x[:1], trained.params)  # the first member
  config, corpus = trained.config, data_lib.corpus_for(trained.config, data_dir)
  evaluator = evaluation.Evaluator(config, corpus, trained.model)
  result = evaluator(params, "valid", tokens=True)
  nll_P, mask_P = result["token_nll"][0], result["mask"] > 0
  inputs_NxBxT, targets_NxBxT, weights_NxBxT = evaluator.windows["valid"]
  targets_P = np.asarray(targets_NxBxT).reshape(-1)
  ppl = lambda keep_P: math.exp(nll_P[keep_P].sum() / keep_P.sum())
  out = {f"carried state, batch {config.batch_size} (ours)": ppl(mask_P)}
  for token in ("<eos>", "<unk>"):
    if token in corpus.vocab:
      keep_P = mask_P & (targets_P != corpus.vocab.index(token))
      out[f"  without {token} targets"] = ppl(keep_P)
  shape = np.asarray(inputs_NxBxT).shape
  window_nll_N = nll_P.reshape(shape).sum(axis=(1, 2)) / np.asarray(weights_NxBxT).sum(axis=(1, 2))
  out["  mean of per-window perplexities"] = float(np.mean(np.exp(window_nll_N)))
  # Each window alone, from a zero state.
  one_window = jit_evaluate(model_lib.planned_for(trained.model, shape[1], shape[1] * shape[2]))
  total = count = 0.0
  for k in range(shape[0]):
    member_nll_K, _, n_K = one_window(params, *(a[k:k + 1] for a in evaluator.windows["valid"]))
    total, count = total + float(member_nll_K[0]), count + float(n_K[0])
  out[f"state reset every {shape[2]}-step window, batch {shape[1]}"] = math.exp(total / count)
  train_windows = data_lib.eval_windows(
      data_lib.batchify(corpus.train[:len(corpus.valid)], config.batch_size), config.num_steps)
  planned = model_lib.planned_for(trained.model, config.batch_size, train_windows[0].size)
  member_nll_K, _, n_K = jit_evaluate(planned)(params, *train_windows)
  out[f"training text (its first {len(corpus.valid)} tokens), carried state"] = math.exp(
      float(member_nll_K[0]) / float(n_K[0]))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", required=True)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  print(f"{args.workdir}: validation perplexity of the first member")
  for name, value in protocols(args.workdir, args.data_dir).items():
    print(f"{name}: {value:.2f}")


if __name__ == "__main__":
  main()
