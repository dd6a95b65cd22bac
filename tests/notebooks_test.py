"""The notebooks of notebooks/: each runs top to bottom in smoke mode, and is saved with its outputs.

The slowest tests of the suite: each notebook runs in its own Jupyter kernel (`python3`, which must
be this interpreter), as scripts/run_notebooks.py runs them to save their outputs, with
ZAREMBA_JAX_SMOKE=1, in a temporary folder, on the real PTB where the tests find it (else the
notebooks write a tiny corpus), downloading nothing. About two minutes for the four on a 2-core CPU.
"""

import contextlib
import importlib.util
import json
import os
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import data as data_lib
from scripts import run_notebooks
from tests import helpers

NOTEBOOKS = ("characters", "from_torch_to_jax", "quickstart", "table1")
WITH_DATA = ("characters", "quickstart", "table1")  # those that train, and so have the smoke cell
WITH_PLOTS = ("characters", "quickstart", "table1")
BADGE = ("[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/{name}.ipynb)")
MISSING = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
NO_JUPYTER = (f"{', '.join(MISSING)} not installed (pip install -r requirements-dev.txt): the notebooks"
              f" cannot be run")


def path_of(name: str) -> str:
  return os.path.join(run_notebooks.FOLDER, f"{name}.ipynb")


def read(name: str) -> dict:
  with open(path_of(name), encoding="utf-8") as f:
    return json.load(f)


def source(cell) -> str:
  return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells(nb) -> list:
  return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def tagged(nb, tag: str) -> list:
  return [cell for cell in nb["cells"] if tag in cell.get("metadata", {}).get("tags", [])]


def each_notebook(test):
  return parameterized.named_parameters((name, name) for name in NOTEBOOKS)(test)


class NotebookFilesTest(parameterized.TestCase):
  """What each notebook file holds, read as JSON (no Jupyter needed)."""

  def test_the_folder_holds_the_four(self):
    self.assertEqual(sorted(os.path.basename(p)[:-len(".ipynb")]
                            for p in run_notebooks.notebook_paths()), sorted(NOTEBOOKS))

  @each_notebook
  def test_opens_with_its_colab_badge_then_the_install_cell(self, name):
    nb = read(name)
    self.assertEqual(nb["cells"][0]["cell_type"], "markdown")
    self.assertIn(BADGE.format(name=name), source(nb["cells"][0]))
    install = source(code_cells(nb)[0])
    for part in ("import zaremba_jax", "except ImportError:",
                 '%pip install -q "zaremba-jax @ git+https://github.com/OWNER/REPO@main"'):
      self.assertIn(part, install)
    self.assertEqual(nb["metadata"]["kernelspec"]["name"], run_notebooks.KERNEL)

  @each_notebook
  def test_says_its_outputs_are_from_the_smoke_mode(self, name):
    top = source(read(name)["cells"][0])
    self.assertIn("ZAREMBA_JAX_SMOKE=1", top)
    self.assertIn("2-core CPU", top)
    if name in WITH_DATA:  # and where the full run's numbers are
      self.assertIn("README.md#results", top)

  @each_notebook
  def test_is_saved_with_the_outputs_of_a_run(self, name):
    cells = code_cells(read(name))
    self.assertEqual([cell["execution_count"] for cell in cells], list(range(1, len(cells) + 1)),
                     "run: python -m scripts.run_notebooks (it saves the outputs)")
    for cell in cells:
      self.assertNotIn("error", [output["output_type"] for output in cell["outputs"]])
    images = [o for cell in cells for o in cell["outputs"] if "image/png" in o.get("data", {})]
    if name in WITH_PLOTS:
      self.assertNotEmpty(images)

  def test_the_notebooks_that_train_share_one_smoke_cell(self):
    cells = {name: tagged(read(name), "smoke-setup") for name in NOTEBOOKS}
    for name in WITH_DATA:
      self.assertLen(cells[name], 1, name)
    sources = {source(cells[name][0]) for name in WITH_DATA}
    self.assertLen(sources, 1, "the smoke-setup cells differ: keep them one cell, copied")

  def test_the_smoke_cell_without_ptb_writes_a_tiny_corpus_the_presets_can_read(self):
    code = source(tagged(read("quickstart"), "smoke-setup")[0])
    folder = self.create_tempdir().full_path
    env = {k: v for k, v in os.environ.items() if k not in ("ZAREMBA_JAX_SMOKE", "ZAREMBA_JAX_DATA")}
    namespace = {}
    with mock.patch.dict(os.environ, env, clear=True), contextlib.chdir(folder):
      exec(compile(code, "smoke-setup", "exec"), namespace)  # pylint: disable=exec-used
      self.assertIsNone(namespace["DATA_DIR"])  # not smoke: the API finds PTB (or downloads it)
      namespace["PTB_BESIDE_REPO"] = os.path.join(folder, "no-ptb-here")
      data_dir = namespace["smoke_data_dir"]()
      self.assertEqual(data_dir, "smoke_data")
      words = data_lib.load_corpus(data_dir, "word")
      chars = data_lib.load_corpus(data_dir, "char")
    self.assertIn("company", words.vocab)
    # Enough for the smoke runs' shapes: the small preset's 20 x 20 windows, char_small's 100 x 50.
    for corpus, batch, steps in ((words, 20, 20), (chars, 100, 50)):
      self.assertGreaterEqual(data_lib.num_train_windows(data_lib.batchify(corpus.train, batch), steps), 10)
      data_lib.batchify(corpus.valid, batch)
    if helpers.HAVE_PTB:  # and, given PTB's folder, that folder
      with mock.patch.dict(os.environ, {"ZAREMBA_JAX_DATA": helpers.PTB_DIR}):
        self.assertEqual(namespace["smoke_data_dir"](), helpers.PTB_DIR)


@absltest.skipIf(MISSING, NO_JUPYTER)
class NotebookRunTest(parameterized.TestCase):
  """Each notebook, top to bottom, in a kernel of this interpreter, in smoke mode."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.kernel_problem = run_notebooks.kernel_problem()

  @each_notebook
  def test_runs_top_to_bottom_in_smoke_mode(self, name):
    self.assertIsNone(self.kernel_problem, self.kernel_problem)
    import nbformat  # pylint: disable=import-outside-toplevel
    nb = nbformat.read(path_of(name), as_version=4)
    # First, where the kernel's Python lives, and whether the notebook sees the smoke switch.
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        "import os, sys; print(sys.prefix); print(os.environ['ZAREMBA_JAX_SMOKE'])"))
    run_notebooks.execute(nb, self.create_tempdir().full_path,
                          helpers.PTB_DIR if helpers.HAVE_PTB else None)  # raises at a failing cell
    self.assertEqual(nb.cells[0].outputs[0]["text"].split(), [sys.prefix, "1"])
    for cell in nb.cells:
      if cell.cell_type == "code":
        self.assertIsNotNone(cell.execution_count, cell.source)
        self.assertNotIn("error", [output["output_type"] for output in cell.outputs])


if __name__ == "__main__":
  absltest.main()
