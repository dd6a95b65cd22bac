"""The benchmark table compares each of our systems with PyTorch in the same precision."""

import io

from absl.testing import absltest

from benchmarks import throughput


def row(train, evaluate, test):
  return {"train_wps": train, "eval_wps": evaluate, "test_wps": test, "compile_s": 1.0,
          "peak_bytes": None}


class PrintTableTest(absltest.TestCase):

  def test_ratios_are_against_the_same_precision(self):
    results = [{"preset": "small", "systems": {
        "jax float32": row(300, 200, 100),
        "torch float32": row(100, 100, 100),
        "jax bfloat16": row(600, 150, 50),
        "torch bf16 autocast": row(200, 300, 100),
    }}]
    out = io.StringIO()
    throughput.print_table(results, out)
    lines = {line.split()[1] + " " + line.split()[2]: line.split()
             for line in out.getvalue().splitlines()[2:]}
    # train, eval, batch-1 ratios sit after each words/s column.
    self.assertEqual(lines["jax float32"][4:9:2], ["3.00x", "2.00x", "1.00x"])
    self.assertEqual(lines["jax bfloat16"][4:9:2], ["3.00x", "0.50x", "0.50x"])
    self.assertEqual(lines["torch float32"][4], "-")

  def test_without_pytorch_there_is_no_ratio(self):
    results = [{"preset": "small", "systems": {"jax float32": row(300, 200, 100)}}]
    out = io.StringIO()
    throughput.print_table(results, out)
    self.assertEqual(out.getvalue().splitlines()[2].split()[4], "-")


if __name__ == "__main__":
  absltest.main()
