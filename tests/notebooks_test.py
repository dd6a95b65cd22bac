"""The notebooks of notebooks/: each runs top to bottom in smoke mode, and is saved with its outputs.

The install cell, one copy in every notebook, is run here as plain Python (with zaremba_jax made
unimportable, and pip replaced by a recorder) and in a Jupyter kernel: with nothing to install from,
it stops with one line saying what to set, not a traceback.

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
    install = code_cells(nb)[0]
    self.assertEqual(tagged(nb, "install"), [install])
    self.assertTrue(source(install).startswith("# Where to install zaremba_jax from"))
    self.assertIn('\nSOURCE = ""\n', source(install))  # the one thing to set, unset
    self.assertNotIn("OWNER/REPO", source(install))
    self.assertEqual(nb["metadata"]["kernelspec"]["name"], run_notebooks.KERNEL)

  def test_the_install_cells_are_one_cell_copied(self):
    self.assertLen({source(tagged(read(name), "install")[0]) for name in NOTEBOOKS}, 1)

  @each_notebook
  def test_says_where_its_saved_outputs_come_from(self, name):
    top = source(read(name)["cells"][0])
    self.assertIn("ZAREMBA_JAX_SMOKE=1", top)  # what CI runs
    self.assertIn("2-core CPU", top)
    self.assertIn("python -m scripts.run_notebooks", top)
    steps = run_notebooks.SHORT_STEPS.get(name)
    if steps:  # a short run of the real model, and where the full run's numbers are
      self.assertIn(f"short run of the real model** (`ZAREMBA_JAX_STEPS={steps}`", top)
      self.assertIn("README.md#results", top)

  @each_notebook
  def test_the_saved_outputs_are_the_short_runs(self, name):
    text = "".join(source({"source": o.get("text", "")}) for cell in code_cells(read(name))
                   for o in cell["outputs"])
    self.assertNotIn("smoke mode on", text)
    steps = run_notebooks.SHORT_STEPS.get(name)
    if steps:
      self.assertIn(f"a short run: {steps} steps of the real model", text)
      self.assertIn(f"stopping after --max_train_steps={steps}", text)

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


def install_cell() -> str:
  return source(tagged(read("quickstart"), "install")[0])


class InstallCellTest(absltest.TestCase):
  """The install cell as plain Python: zaremba_jax hidden, pip and the jax probe recorded."""

  def run_cell(self, source_value="", jax_probe="0.10.2 cpu", gpu=False):
    """Runs the cell in a fresh folder; returns (the exception or None, the pip commands run)."""
    code = install_cell().replace('\nSOURCE = ""\n', f"\nSOURCE = {source_value!r}\n", 1)
    commands = []

    def fake_run(args, **kwargs):
      del kwargs
      commands.append(list(args))
      if args[:2] == [sys.executable, "-c"]:  # the probe of the runtime's jax
        return mock.Mock(returncode=0 if jax_probe else 1, stdout=jax_probe or "")
      if args[0] == "nvidia-smi":
        return mock.Mock(returncode=0)
      return mock.Mock(returncode=1)  # pip: fails here, so the cell stops after it

    folder = self.create_tempdir().full_path
    with mock.patch.dict(sys.modules, {"zaremba_jax": None}), contextlib.chdir(folder), \
        mock.patch("subprocess.run", fake_run), \
        mock.patch("shutil.which", lambda name: "/usr/bin/nvidia-smi" if gpu else None):
      try:
        exec(compile(code, "install", "exec"), {})  # pylint: disable=exec-used
      except Exception as e:  # pylint: disable=broad-except
        return e, [c for c in commands if "pip" in c]
    return None, [c for c in commands if "pip" in c]

  def test_unset_is_one_clear_line_and_installs_nothing(self):
    error, pip = self.run_cell()
    self.assertEqual(type(error).__name__, "InstallError")
    self.assertEqual(pip, [])
    (line,) = error._render_traceback_()  # pylint: disable=protected-access
    self.assertTrue(line.startswith("InstallError: zaremba_jax is not installed here and SOURCE is"
                                    " empty: set SOURCE at the top of this cell"), line)

  def test_a_github_address_or_a_checkout_is_what_pip_installs(self):
    _, pip = self.run_cell("someone/zaremba_jax")
    self.assertEqual(pip, [[sys.executable, "-m", "pip", "install", "-q",
                            "zaremba-jax @ git+https://github.com/someone/zaremba_jax@main"]])
    _, pip = self.run_cell(helpers.REPO)
    self.assertEqual(pip[0][-1], helpers.REPO)
    error, pip = self.run_cell(self.create_tempdir().full_path)  # a folder, but not a checkout
    self.assertIn("is a folder but not a checkout", str(error))
    self.assertEqual(pip, [])

  def test_jax_is_added_only_where_the_runtimes_does_not_fit(self):
    cases = {("0.10.2 cpu", False): [], ("0.11.2 gpu", True): [],  # working: kept
             ("0.10.2 cpu", True): ["jax[cuda12]==0.10.2"],  # CPU jax on a GPU: CUDA added
             ("0.7.1 gpu", True): ["jax[cuda12]>=0.10.2,<0.12"],  # too old for the package
             ("0.7.1 cpu", False): ["jax>=0.10.2,<0.12"], (None, False): ["jax>=0.10.2,<0.12"]}
    for (probe, gpu), want in cases.items():
      _, pip = self.run_cell("someone/zaremba_jax", jax_probe=probe, gpu=gpu)
      self.assertEqual(pip[0][5:-1], want, (probe, gpu))


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
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    self.assertIn("devices: [CpuDevice(id=0)]", text)  # the install cell shows where jax runs
    if name == "table1":  # README's measured rows, read without training
      self.assertRegex(text, r"[1-9]\d* measured rows from README.md")

  def test_the_install_cell_unset_stops_with_one_line_in_a_kernel(self):
    self.assertIsNone(self.kernel_problem, self.kernel_problem)
    import nbclient  # pylint: disable=import-outside-toplevel
    import nbformat  # pylint: disable=import-outside-toplevel
    nb = nbformat.v4.new_notebook(metadata=read("quickstart")["metadata"])
    nb.cells = [nbformat.v4.new_code_cell("import sys; sys.modules['zaremba_jax'] = None"),
                nbformat.v4.new_code_cell(install_cell())]
    with self.assertRaises(nbclient.exceptions.CellExecutionError):
      run_notebooks.execute(nb, self.create_tempdir().full_path)
    (error,) = nb.cells[1].outputs
    self.assertEqual(error["output_type"], "error")
    self.assertLen(error["traceback"], 1)  # the message alone: no traceback, no source lines
    self.assertRegex(error["traceback"][0], r"^InstallError: zaremba_jax is not installed here and"
                     r" SOURCE is empty: set SOURCE at the top of this cell")


if __name__ == "__main__":
  absltest.main()
