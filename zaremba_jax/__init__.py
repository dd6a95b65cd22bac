"""zaremba_jax: the LSTM language models of Zaremba, Sutskever & Vinyals (2014) in JAX/Flax."""

__version__ = "0.1.0"
