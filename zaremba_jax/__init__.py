"""zaremba_jax: the LSTM language models of Zaremba, Sutskever & Vinyals (2014) in JAX/Flax.

From Python (zaremba_jax/api.py; README.md, "Python API"):

  from zaremba_jax import api
  config = api.preset("small").replace(max_train_steps=200)
  api.train(config, workdir="runs/try")
  api.sample(api.load("runs/try"), prime="the", length=20)

`preset`, `load`, `evaluate`, `query_sentences`, `next_token_distribution` and `StopTraining` are
also here (`zaremba_jax.load(...)`); `train` and `sample` are not, as those names are the package's
modules `zaremba_jax.train` and `zaremba_jax.sample`: call `api.train` and `api.sample` (and
`api.score`, `api.export`, beside the modules `zaremba_jax.score` and `zaremba_jax.export`).
"""

import importlib

__version__ = "0.1.0"

# Imported on first use, so that `import zaremba_jax` (and the command line's --help) does not
# wait for jax.
_API = ("preset", "preset_names", "load", "evaluate", "query_sentences",
        "next_token_distribution", "StopTraining", "Config")


def __getattr__(name):
  if name in _API or name == "api":
    api = importlib.import_module("zaremba_jax.api")
    return api if name == "api" else getattr(api, name)
  raise AttributeError(f"module 'zaremba_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_API) | {"api"})
