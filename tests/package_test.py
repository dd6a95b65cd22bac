"""The package installs and runs: presets by name, and `zaremba-jax` from a fresh environment.

PresetTest: the preset reader of config.py (nested flagfiles, comments, errors) and main's
--preset (the same flags as --flagfile, from any folder; every other flag overrides it, wherever it
stands).

InstalledPackageTest: `pip install --no-deps --no-build-isolation` of a copy of the checkout into a
fresh virtual environment, then the installed `zaremba-jax` command, run from another folder, trains
the small preset (shrunk) on a tiny corpus and answers a query.
"""

import ast
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver

from zaremba_jax import config as config_lib
from zaremba_jax import main as main_lib
from tests import helpers

PRESETS = {"small", "medium", "large", "word200", "char_small", "char_large",
           # the successors' regularizers (regularizers.py)
           "small_tied_pr", "small_variational_tied", "medium_variational",
           "large_variational_tied", "awd_lstm",
           "wt2_medium"}  # another corpus (data.py, --corpus)


class PresetTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(flagsaver.flagsaver())

  def parse(self, *args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(main_lib.expand_presets(["main", *args]))
    return main_lib.config_from_flags()

  def in_folder(self, folder):
    cwd = os.getcwd()
    os.chdir(folder)
    self.addCleanup(os.chdir, cwd)

  def test_the_presets_are_the_experiments_flagfiles(self):
    self.assertEqual(set(config_lib.preset_names()), PRESETS)
    self.assertEqual(pathlib.Path(str(config_lib.presets_folder())).resolve(),
                     pathlib.Path(helpers.REPO, "experiments").resolve())

  def test_preset_is_the_flagfile(self):
    self.in_folder(helpers.REPO)  # --flagfile=experiments/... paths are relative to the checkout
    for name in sorted(PRESETS):
      from_flagfile = self.parse(f"--flagfile=experiments/{name}.flags")
      self.assertEqual(self.parse(f"--preset={name}"), from_flagfile, name)
      self.assertEqual(self.parse("--preset", name), from_flagfile, name)
      self.assertEqual(config_lib.preset(name), from_flagfile, name)

  def test_nested_flagfile_from_another_folder(self):
    self.in_folder(self.create_tempdir().full_path)
    word200 = config_lib.preset("word200")
    self.assertEqual(word200, config_lib.preset("small").replace(num_steps=50))
    self.assertEqual(config_lib.preset_flags("word200"),
                     config_lib.preset_flags("small") + ["--num_steps=50"])
    self.assertEqual(self.parse("--preset=word200"), word200)

  def test_every_other_flag_overrides_the_preset_before_or_after_it(self):
    config = self.parse("--preset=large", "--hidden_size=32")
    self.assertEqual((config.hidden_size, config.dropout), (32, 0.65))
    config = self.parse("--hidden_size=32", "--preset=large")  # was silently dropped
    self.assertEqual((config.hidden_size, config.dropout, config.num_steps), (32, 0.65, 35))
    self.assertEqual(flags.FLAGS.preset, "large")
    config = self.parse("--preset=small", "--preset=word200")  # the later preset wins
    self.assertEqual(config, config_lib.preset("word200"))
    self.assertEqual(config_lib.preset("large", dtype="bfloat16").dtype, "bfloat16")

  def test_a_preset_inside_a_flagfile_is_refused_in_one_line(self):
    folder = self.create_tempdir().full_path
    flagfile = os.path.join(folder, "mine.flags")
    with open(flagfile, "w") as f:
      f.write("--preset=small\n--hidden_size=64\n")
    run = subprocess.run([sys.executable, "-m", "zaremba_jax.main", f"--flagfile={flagfile}"],
                         cwd=folder, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": helpers.REPO}, timeout=120)
    self.assertEqual(run.returncode, 1)
    self.assertEqual(run.stderr, "error: --preset=small inside a --flagfile is not read; give it"
                     " on the command line, or nest --flagfile=experiments/small.flags\n")

  def test_unknown_preset_names_the_known_ones(self):
    with self.assertRaisesRegex(ValueError, "'tiny' is unknown; use one of .*small.*word200"):
      config_lib.preset("tiny")
    with self.assertRaisesRegex(ValueError, "'tiny' is unknown"):
      main_lib.expand_presets(["main", "--preset=tiny"])
    run = subprocess.run([sys.executable, "-m", "zaremba_jax.main", "--preset=tiny"],
                         cwd=self.create_tempdir().full_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": helpers.REPO}, timeout=120)
    self.assertEqual(run.returncode, 1)
    self.assertEqual(len(run.stderr.strip().splitlines()), 1, run.stderr)
    # Sorted; the successors' presets (awd_lstm, small_tied_pr, ...) fall among them.
    self.assertRegex(run.stderr, "--preset='tiny' is unknown; use one of (.*, )?char_large,"
                     " char_small, large, (.*, )?medium, (.*, )?small, (.*, )?word200")

  def test_reader_follows_absl_flagfile_rules(self):
    folder = pathlib.Path(self.create_tempdir().full_path)
    (folder / "base.flags").write_text("# a header\n\n--hidden_size=64\n  // indented comment\n"
                                       "--num_steps=7\n")
    (folder / "child.flags").write_text("--flagfile=some/where/base.flags\n--num_steps=9\n")
    (folder / "loop_a.flags").write_text("--flagfile=experiments/loop_b.flags\n")
    (folder / "loop_b.flags").write_text("--flagfile=experiments/loop_a.flags\n")
    (folder / "stray.flags").write_text("--flagfile=/elsewhere/other.flags\n")
    (folder / "extra.flags").write_text("--workdir=runs/x\n")
    self.enter_context(mock.patch.object(config_lib, "presets_folder", return_value=folder))
    self.assertEqual(config_lib.preset_names(),
                     ("base", "child", "extra", "loop_a", "loop_b", "stray"))
    self.assertEqual(config_lib.preset_flags("child"),
                     ["--hidden_size=64", "--num_steps=7", "--num_steps=9"])
    child = config_lib.preset("child")
    self.assertEqual((child.hidden_size, child.num_steps), (64, 9))
    with self.assertRaisesRegex(ValueError, "cycle: loop_a -> loop_b -> loop_a"):
      config_lib.preset_flags("loop_a")
    with self.assertRaisesRegex(ValueError, "nests --flagfile=/elsewhere/other.flags, which is not"
                                " one of the presets"):
      config_lib.preset_flags("stray")
    self.assertEqual(config_lib.preset_flags("extra"), ["--workdir=runs/x"])  # fine on the CLI
    with self.assertRaisesRegex(ValueError, "--workdir is not a field of Config"):
      config_lib.preset("extra")

  def test_config_imports_neither_jax_nor_absl(self):
    tree = ast.parse(pathlib.Path(config_lib.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imported.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        imported.add((node.module or "").split(".")[0])
    self.assertEqual(imported & {"jax", "absl", "flax", "numpy"}, set())


def _setuptools_version():
  try:
    import setuptools  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


class InstalledPackageTest(absltest.TestCase):

  def run_in(self, cwd, args, stdin=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, env=env,
                         timeout=timeout)
    self.assertEqual(run.returncode, 0, f"{' '.join(map(str, args))}\nstdout:\n{run.stdout}\n"
                     f"stderr:\n{run.stderr}")
    return run

  def test_pip_install_then_the_command_trains_and_answers(self):
    version = _setuptools_version()
    if version is None or version < (77,):
      self.skipTest(f"setuptools>=77 is needed to build the package here (found {version}); "
                    "pip install -r requirements.txt installs it")
    tmp = pathlib.Path(self.create_tempdir().full_path)

    # A copy of what the build reads, so the build's build/ and *.egg-info/ land there and not in
    # the checkout (pip builds in place).
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
      shutil.copy2(os.path.join(helpers.REPO, name), src / name)
    for name in ("zaremba_jax", "experiments"):
      shutil.copytree(os.path.join(helpers.REPO, name), src / name,
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    # A fresh environment that sees the packages of the one running this test and nothing else.
    # `python -m venv --system-site-packages` is not enough: when the running interpreter is itself a
    # virtual environment (as in CI), a venv made from it has the base interpreter underneath, whose
    # site-packages lack this environment's packages (and may hold others). So the new venv gets a
    # .pth file that adds the running interpreter's own site-packages folders (their .pth files
    # included); its own site-packages stays first on sys.path, so the installed copy is the one
    # imported. pip and setuptools come from there too: no network, nothing downloaded.
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], capture_output=True, text=True, check=True).stdout
    outer = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
      outer.append(site.getusersitepackages())
    pathlib.Path(purelib.strip(), "outer_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in outer))
    self.assertNotEqual(sysconfig.get_path("purelib"), purelib.strip())

    self.run_in(tmp, [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                      "--no-index", "--disable-pip-version-check", "-q", str(src)])
    shutil.rmtree(src)  # from here on only the installed copy exists

    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    check = self.run_in(elsewhere, [str(python), "-c", (
        "import zaremba_jax, zaremba_jax.config as c; print(zaremba_jax.__file__);"
        " print(c.presets_folder()); print(c.preset('word200').num_steps, c.preset_names());"
        " from zaremba_jax.kernels import native; print(native.SOURCE.is_file())")])
    module_file, folder, word200, native_source = check.stdout.strip().splitlines()
    self.assertEqual(native_source, "True")  # the native kernels' source ships with the package
    self.assertTrue(module_file.startswith(str(venv)), module_file)
    self.assertTrue(folder.startswith(str(venv)), folder)
    self.assertEqual(word200, f"50 {tuple(sorted(PRESETS))}")

    command = str(venv / "bin" / "zaremba-jax")
    data = helpers.write_tiny_corpus(str(tmp), n_lines=(1000, 200, 200))
    workdir = tmp / "run"
    train = self.run_in(elsewhere, [command, "--preset=small", "--hidden_size=16",
                                    "--max_train_steps=20", f"--data_dir={data}",
                                    f"--workdir={workdir}"])
    self.assertIn("summary: valid", train.stdout)
    query = self.run_in(elsewhere, [command, "--mode=query", f"--workdir={workdir}"],
                        stdin="3 w1 w2\n")
    (answer,) = query.stdout.strip().splitlines()
    self.assertEqual(answer.split()[:2], ["w1", "w2"])
    self.assertLen(answer.split(), 5)


if __name__ == "__main__":
  absltest.main()
