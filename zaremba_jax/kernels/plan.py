"""The plan: every choice of kernel form that depends on the platform, the precision or a size.

A `Plan` is resolved once for one use of the model (training windows, a validation stream, the
batch-1 test stream, one-token generation) by `resolve`, the only place in the package that asks
which backend it runs on: a pure function of the use, the backend and what the native library
offers. `plan_for` is `resolve` as the model calls it: it asks `native.offers()`, and builds the
native library only when the plan it gets uses it. The kernels read the plan's fields and never
look at the platform themselves. What each choice buys, as measured, is in docs/performance.md.
"""

import dataclasses

import jax

from zaremba_jax.kernels import native
from zaremba_jax.kernels import recurrence

KERNELS = ("fast", "reference")

# Evaluation's softmax in row blocks: measured on the 2-core CPU (docs/performance.md), it pays
# off in bfloat16 while the output weights are small enough to be read again for every block
# from cache (the small word model's 4 MB: validation +16%, batch-1 test +30%); the medium
# model's 13 MB gained nothing, and float32 evaluation lost.
OUTPUT_BLOCK_ROWS = 64
OUTPUT_BLOCK_MAX_WEIGHT_BYTES = 8_000_000
# The native float32 product of a few rows beat XLA's where W_hh is cache-sized (char_small's
# [100, 200] step 130 -> 79 us, medium's [20, 650] 190 -> 164 us) and lost where it streams from
# memory (large's [20, 1500]: 1,351 -> 2,299 us); bfloat16 won at every size.
NATIVE_F32_MAX_WEIGHT_BYTES = 8_000_000


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the kernels run for one use of the model. The defaults are the plain forms."""

  # Which implementation: the fast kernels, or the reference (the paper's cell, autodiff).
  kernels: str = "fast"
  # Matmul input type, float32 or bfloat16; parameters, state and sums stay float32.
  dtype: str = "float32"
  # Feed the first layer (E W_ih + b)[tokens], projecting each vocabulary row once, when the
  # stream has more tokens than the vocabulary has rows (the same numbers, fewer products).
  first_layer_per_vocab_row: bool = False
  # The forward loop's product h W_hh, one of `recurrence.PRODUCTS` (which also says what a loop
  # under a gradient runs instead): XLA's, against W_hh or W_hh^T, on 1-D state vectors for
  # batch 1, or the package's native CPU kernels (native.py), which in bfloat16 read the weights
  # as bfloat16 (XLA's matrix-vector product reads them as float32; its few-row product runs at a
  # third of the kernel's rate).
  recurrent_product: str = "xla"
  # A single row's bfloat16 projections (one token's input and output layers) in `native.vecmat`,
  # which reads the weights as bfloat16.
  native_one_row_products: bool = False
  # Weight gradients x^T dy with x^T materialised first, so the product stays bfloat16.
  weight_grads_via_gather: bool = False
  # The forward loop also emits the backward's per-step factors (else the backward makes them
  # from stored gates in one pass over all steps).
  factors_in_forward_loop: bool = False
  # Evaluation's softmax folds its bias into the product as one more row of W.
  fold_output_bias: bool = False
  # Evaluation's softmax runs over blocks of this many rows (0: all rows at once), so that each
  # block's logits stay in cache through the max, exp and sum that follow the product.
  output_rows_per_block: int = 0

  def __post_init__(self):
    if self.kernels not in KERNELS:
      raise ValueError(f"--kernels={self.kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {self.dtype!r} is unknown; use float32 or bfloat16")
    product = recurrence.PRODUCTS.get(self.recurrent_product)
    if product is None:
      raise ValueError(f"recurrent_product={self.recurrent_product!r} is unknown; use one of "
                       f"{', '.join(recurrence.PRODUCTS)}")
    if product.native not in (None, self.dtype):
      raise ValueError(f"recurrent_product={self.recurrent_product!r} is a {product.native} "
                       f"product; this plan's dtype is {self.dtype}")
    if self.native_one_row_products and self.dtype != "bfloat16":
      raise ValueError("native_one_row_products are bfloat16 products; this plan's dtype is "
                       f"{self.dtype}")

  @property
  def native_precisions(self) -> frozenset[str]:
    """The precisions of the native products this plan runs (empty: none; nothing to build)."""
    product = recurrence.PRODUCTS[self.recurrent_product]
    return frozenset(([product.native] if product.native else [])
                     + (["bfloat16"] if self.native_one_row_products else []))

  def resolved_for(self, *, batch_size: int, vocab_size: int, stream_tokens: int,
                   hidden_size: int | None = None) -> "Plan":
    """This plan's kernels and dtype, planned for another use (see `plan_for`)."""
    return plan_for(kernels=self.kernels, dtype=self.dtype, batch_size=batch_size,
                    vocab_size=vocab_size, stream_tokens=stream_tokens, hidden_size=hidden_size)


def plan_for(**use) -> Plan:
  """`resolve(**use)` with the native products this machine offers (`native.offers()`).

  Only a plan that runs native products builds the library (`native.load()`: once per process,
  then from the cache folder); if that fails (one warning), the plan is resolved again without
  them. Any other plan, on any backend, never starts the compiler.
  """
  plan = resolve(**use, native_offers=native.offers())
  if plan.native_precisions and native.load() is not None:
    plan = resolve(**use)
  return plan


def resolve(*, kernels: str = "fast", dtype: str = "float32", batch_size: int, vocab_size: int,
            stream_tokens: int, hidden_size: int | None = None, backend: str | None = None,
            native_offers: frozenset[str] = frozenset()) -> Plan:
  """The plan for `batch_size` rows over `stream_tokens` tokens of a `vocab_size` vocabulary.

  Decides only: it builds nothing and reads nothing but its arguments (and, for those not given,
  jax's backend).

  Args:
    kernels: "fast", or "reference" for the plain forms (every choice below off).
    dtype: "float32" or "bfloat16" (matmul inputs).
    batch_size: rows of the stream (1 for the paper's test protocol and for generation).
    vocab_size: rows of the embedding.
    stream_tokens: tokens one first-layer projection serves: a training window's B x T, or a
      whole evaluation stream when evaluation makes the projection once for all its windows.
    hidden_size: the model's; given, evaluation's softmax may run in row blocks.
    backend: "cpu", "gpu", "tpu"; default: where jax runs.
    native_offers: the precisions whose native products may run ("float32", "bfloat16"; as
      `native.offers()` gives them); default none: XLA's products.
  """
  backend = backend or jax.default_backend()
  dtype = str(dtype)
  if kernels == "reference":
    return Plan(kernels=kernels, dtype=dtype)
  cpu = backend == "cpu"
  bf16_on_cpu = cpu and dtype == "bfloat16"
  output_in_blocks = (bf16_on_cpu and hidden_size is not None and vocab_size >= 1000
                      and 2 * hidden_size * vocab_size <= OUTPUT_BLOCK_MAX_WEIGHT_BYTES)
  batch1 = cpu and batch_size == 1
  # A batch-1 stream, not a single token: one transposition serves many steps.
  transposed = bf16_on_cpu and batch_size > 1 or batch1 and stream_tokens > 1
  native_here = cpu and dtype in native_offers and (
      dtype == "bfloat16" or hidden_size is not None
      and 16 * hidden_size * hidden_size <= NATIVE_F32_MAX_WEIGHT_BYTES)
  return Plan(
      kernels=kernels,
      dtype=dtype,
      first_layer_per_vocab_row=vocab_size < stream_tokens,
      recurrent_product=_recurrent_product(dtype, batch1, transposed, native_here),
      native_one_row_products=native_here and dtype == "bfloat16",
      weight_grads_via_gather=bf16_on_cpu,
      factors_in_forward_loop=cpu,
      fold_output_bias=cpu and dtype == "float32",
      output_rows_per_block=OUTPUT_BLOCK_ROWS if output_in_blocks else 0,
  )


def _recurrent_product(dtype: str, batch1: bool, transposed: bool, native_here: bool) -> str:
  """The forward loop's product: on 1-D vectors at batch 1 on the CPU; against W_hh^T where
  `transposed`; in the native kernels where they run (in float32 not h W on vectors, where
  XLA's was faster: docs/performance.md). `recurrence.PRODUCTS` has each one's form under a
  gradient."""
  bf16 = dtype == "bfloat16"
  if batch1:
    if native_here and bf16:
      return "native_bf16_matvec" if transposed else "native_bf16_vecmat"
    if native_here and transposed:
      return "native_f32_matvec"
    return "xla_matrix_first" if transposed else "xla_vector"
  if native_here:
    return "native_bf16_pairs" if bf16 else "native_f32_matmul"
  return "xla_transposed" if transposed else "xla"
