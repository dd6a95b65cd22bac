"""Every command README.md shows is run somewhere: here, by CI's .ci/run, or by the test it names.

WHERE lists each command of README's ```sh blocks and install table with what runs it; a command
added to README without an entry here (or an entry README no longer has) fails
test_every_command_is_accounted_for. The first block's run and the Modes block run here, as
written, in a fresh folder on a tiny corpus ($ZAREMBA_JAX_DATA, since the commands give no
--data_dir), with `python` the interpreter running the tests.
"""

import importlib.util
import os
import re
import subprocess
import sys

from absl.testing import absltest

from tests import helpers

SMOKE = "python -m zaremba_jax.main --preset=small --max_train_steps=200 --workdir=runs/smoke"
TESTS = "python -m pytest -q -n 2 --dist worksteal tests"
MODES = (
    "python -m zaremba_jax.main --mode=evaluate --workdir=runs/smoke",
    'echo "5 the company said" | python -m zaremba_jax.main --mode=query --workdir=runs/smoke',
    'python -m zaremba_jax.main --mode=sample --workdir=runs/smoke --prime="the company"'
    " --sample_len=20",
    "python -m zaremba_jax.plot runs/smoke --out curves.png",
)
CPU_INSTALL = ("python3 -m venv .venv", ". .venv/bin/activate",
               "python -m pip install -r requirements.txt",
               "python -m pip install -r requirements-dev.txt",
               "python -m ipykernel install --sys-prefix")
PACKAGE = "python -m pip install --no-deps ."
GPU = ('pip install "jax[cuda13]==0.11.2" orbax-checkpoint==0.12.4 flax optax absl-py numpy'
       " pytest")
WHERE = {
    SMOKE: "ReadmeCommandsTest.test_the_first_run_then_the_modes (here)",
    TESTS: ".ci/run (test_the_test_command_is_cis)",
    **{command: "ReadmeCommandsTest.test_the_first_run_then_the_modes (here)" for command in MODES},
    **{command: ".ci/run (test_the_cpu_install_is_cis)" for command in CPU_INSTALL},
    PACKAGE: "tests/package_test.py (pip install --no-deps, offline)",
    GPU: "by hand on an H200, 2026-11-27 (BUILD.md, Install): CI has no GPU",
    "zaremba-jax --preset=small": "tests/package_test.py (the installed command, --preset=small)",
    "python -m zaremba_jax.main --preset=small": "a prose equivalence; its run is SMOKE's",
}


def readme() -> str:
  with open(os.path.join(helpers.REPO, "README.md"), encoding="utf-8") as f:
    return f.read()


def readme_commands() -> list[str]:
  """The lines of README's ```sh blocks, and the backticked commands of its Install table."""
  text = readme()
  commands = [line.split("  #")[0].strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)
              for line in block.splitlines() if line.strip()]
  install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
  for row in install.splitlines():
    if row.startswith("| ") and not row.startswith(("| where", "| ---")):
      commands += [c for c in re.findall(r"`([^`]+)`", row.split(" | ")[1])
                   if re.match(r"(python|pip|\. |zaremba-jax)", c)]
  return commands


def ci_lines(quiet: bool = True) -> list[str]:
  """.ci/run's command lines, comments left out, and pip's -q too unless `quiet`."""
  with open(os.path.join(helpers.REPO, ".ci", "run"), encoding="utf-8") as f:
    lines = [line.split("  #")[0].strip() for line in f
             if line.strip() and not line.startswith("#")]
  return lines if quiet else [re.sub(r"(pip install) -q\b", r"\1", line) for line in lines]


class ReadmeTest(absltest.TestCase):

  def test_every_command_is_accounted_for(self):
    found = readme_commands()
    self.assertEqual(sorted(set(found)), sorted(WHERE), "README's commands and WHERE differ: say"
                     " in WHERE what runs each command README shows")
    self.assertEqual(found[:2], [SMOKE, TESTS])  # the two commands first

  def test_the_test_command_is_cis(self):
    self.assertIn(TESTS, ci_lines())  # the very line

  def test_the_cpu_install_is_cis(self):
    lines = ci_lines(quiet=False)
    for command in CPU_INSTALL:
      self.assertIn(command, lines)

  def test_under_two_hundred_lines(self):
    self.assertLess(len(readme().splitlines()), 200)


class ReadmeCommandsTest(absltest.TestCase):

  def test_the_first_run_then_the_modes(self):
    folder = self.create_tempdir().full_path
    # Enough lines that 200 steps of 20 x 20 windows stay inside one epoch.
    data = helpers.write_tiny_corpus(self.create_tempdir().full_path, n_lines=(16000, 200, 200))
    # `python` is this interpreter: its folder (a venv's bin/) first on PATH.
    env = {**os.environ, "ZAREMBA_JAX_DATA": data, "JAX_PLATFORMS": "cpu",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join([helpers.REPO] + [p for p in [os.environ.get("PYTHONPATH")]
                                                           if p])}
    run = lambda command: subprocess.run(["bash", "-c", command], cwd=folder, env=env,
                                         capture_output=True, text=True, timeout=600)
    helpfull = subprocess.Popen(["bash", "-c", "python -m zaremba_jax.main --helpfull"], cwd=folder,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    smoke = run(SMOKE)
    self.assertEqual(smoke.returncode, 0, smoke.stderr[-2000:])
    self.assertRegex(smoke.stdout, r"summary: valid ppl [\d.]+  test ppl [\d.]+")
    self.assertIn("stopping after --max_train_steps=200", smoke.stdout)
    modes = MODES if importlib.util.find_spec("matplotlib") else MODES[:-1]  # the plot is an extra
    started = {command: subprocess.Popen(["bash", "-c", command], cwd=folder, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command in modes}
    outputs = {command: (proc.wait(timeout=600),) + proc.communicate()
               for command, proc in started.items()}
    for command, (rc, _, stderr) in outputs.items():
      self.assertEqual(rc, 0, f"{command}\n{stderr[-2000:]}")
    evaluate, query, sample = (outputs[c][1] for c in MODES[:3])
    self.assertRegex(evaluate, r"summary: valid ppl [\d.]+  test ppl [\d.]+  \(checkpoint 200\)")
    self.assertEqual(query.split()[:3], ["the", "company", "said"])
    self.assertLen(query.split(), 8)
    self.assertGreater(len(sample.split()), 2)  # the prime, then what follows
    self.assertIn("note: not in the vocabulary", outputs[MODES[2]][2])  # the tiny corpus's
    if MODES[3] in outputs:
      self.assertGreater(os.path.getsize(os.path.join(folder, "curves.png")), 1000)
    out, err = helpfull.communicate(timeout=600)
    self.assertEqual(helpfull.returncode, 1, err[-2000:])  # absl's exit status after any --help
    self.assertIn("--preset", out)
    self.assertIn("--[no]tensorboard", out)


if __name__ == "__main__":
  absltest.main()
