"""The plan: every choice of kernel form that depends on the platform, the precision or a size.

A `Plan` is resolved once for one use of the model (training windows, a validation stream, the
batch-1 test stream, one-token generation) by `resolve`, the only place in the package that asks
which backend it runs on. The kernels read its fields and never look at the platform themselves.
What each choice buys, as measured, is in docs/performance.md.
"""

import dataclasses

import jax

from zaremba_jax.kernels import native

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
  # Batch 1: run the forward loop on 1-D state vectors (matrix-vector products).
  batch1_as_vector: bool = False
  # The forward loop's products outside a gradient in the package's native CPU kernels
  # (native.py): in bfloat16 they read the weights as bfloat16 (XLA's matrix-vector product reads
  # them as float32; its few-row product runs at a third of the kernel's rate), and a single
  # token's projections take them too; in float32, a batch's step and the batch-1 stream's W^T h.
  native_products: bool = False
  # The forward loop multiplies by W_hh^T [4H, H], transposed once per call (contracting both
  # last axes; for a vector, W^T h with the matrix first), not by W_hh.
  recurrent_product_transposed: bool = False
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
  # Several members in one program run one after another (lax.map), each with the one-model
  # kernels, instead of side by side (vmap, whose batched products are other kernels).
  members_one_by_one: bool = False

  def __post_init__(self):
    if self.kernels not in KERNELS:
      raise ValueError(f"--kernels={self.kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {self.dtype!r} is unknown; use float32 or bfloat16")

  def resolved_for(self, *, batch_size: int, vocab_size: int, stream_tokens: int,
                   hidden_size: int | None = None) -> "Plan":
    """This plan's kernels and dtype, resolved for another use (see `resolve`)."""
    return resolve(kernels=self.kernels, dtype=self.dtype, batch_size=batch_size,
                   vocab_size=vocab_size, stream_tokens=stream_tokens, hidden_size=hidden_size)


def resolve(*, kernels: str = "fast", dtype: str = "float32", batch_size: int, vocab_size: int,
            stream_tokens: int, hidden_size: int | None = None, backend: str | None = None,
            num_devices: int | None = None) -> Plan:
  """The plan for `batch_size` rows over `stream_tokens` tokens of a `vocab_size` vocabulary.

  Args:
    kernels: "fast", or "reference" for the plain forms (every choice below off).
    dtype: "float32" or "bfloat16" (matmul inputs).
    batch_size: rows of the stream (1 for the paper's test protocol and for generation).
    vocab_size: rows of the embedding.
    stream_tokens: tokens one first-layer projection serves: a training window's B x T, or a
      whole evaluation stream when evaluation makes the projection once for all its windows.
    hidden_size: the model's; given, evaluation's softmax may run in row blocks.
    backend: "cpu", "gpu", "tpu"; default: where jax runs.
    num_devices: devices the members are spread over; default: every device of the run.
  """
  backend = backend or jax.default_backend()
  num_devices = jax.device_count() if num_devices is None else num_devices
  dtype = str(dtype)
  if kernels == "reference":
    return Plan(kernels=kernels, dtype=dtype)
  cpu = backend == "cpu"
  bf16_on_cpu = cpu and dtype == "bfloat16"
  output_in_blocks = (bf16_on_cpu and hidden_size is not None and vocab_size >= 1000
                      and 2 * hidden_size * vocab_size <= OUTPUT_BLOCK_MAX_WEIGHT_BYTES)
  return Plan(
      kernels=kernels,
      dtype=dtype,
      first_layer_per_vocab_row=vocab_size < stream_tokens,
      batch1_as_vector=cpu and batch_size == 1,
      native_products=cpu and native.available() and (
          dtype == "bfloat16" or hidden_size is not None
          and 16 * hidden_size * hidden_size <= NATIVE_F32_MAX_WEIGHT_BYTES),
      # A batch-1 stream, not a single token: one transposition serves many steps.
      recurrent_product_transposed=(bf16_on_cpu and batch_size > 1
                                    or cpu and batch_size == 1 and stream_tokens > 1),
      weight_grads_via_gather=bf16_on_cpu,
      factors_in_forward_loop=cpu,
      fold_output_bias=cpu and dtype == "float32",
      output_rows_per_block=OUTPUT_BLOCK_ROWS if output_in_blocks else 0,
      members_one_by_one=cpu and num_devices == 1,
  )
