"""Runs the notebooks of notebooks/ top to bottom and saves them with their outputs.

  python -m scripts.run_notebooks                                  # all four, from the repo root
  python -m scripts.run_notebooks notebooks/quickstart.ipynb      # one
  python -m scripts.run_notebooks --smoke --no_save                # CI's smoke mode, write nothing

The outputs GitHub shows under each cell are the ones this wrote: a short run of each notebook's real
model (`ZAREMBA_JAX_STEPS`, SHORT_STEPS below: minutes each on a 2-core CPU; the notebooks say so at
the top), on real PTB ($ZAREMBA_JAX_DATA, else ../shared/data/ptb beside the checkout; it stops if
neither has it, and downloads nothing). `--smoke` runs them as tests/notebooks_test.py does:
`ZAREMBA_JAX_SMOKE=1`, a narrower model for a minute, on a tiny corpus where PTB is not at hand.
Each notebook runs in a fresh temporary folder (its runs/ go there) in the Jupyter kernel `python3`,
which must be this interpreter: `python -m ipykernel install --sys-prefix` in the virtual
environment.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(REPO, "notebooks")
KERNEL = "python3"
CELL_TIMEOUT_S = 300  # one cell; a smoke run's cells take seconds to a minute on 2 cores
SHORT_CELL_TIMEOUT_S = 3600  # one cell of a short run (a training cell: minutes)
# The saved outputs' short runs: train steps of each notebook's real model (0: it trains nothing).
SHORT_STEPS = {"quickstart": 500, "characters": 300}


def notebook_paths() -> list[str]:
  return sorted(os.path.join(FOLDER, name) for name in os.listdir(FOLDER)
                if name.endswith(".ipynb"))


def kernel_problem() -> str | None:
  """Why the `python3` kernel would not run this interpreter's environment, or None if it does.

  A `python3` kernelspec left elsewhere on the Jupyter path (the user's, the system's) can name
  another Python, which lacks this environment's packages; its errors would say nothing of why.
  """
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # pylint: disable=import-outside-toplevel
  try:
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
  except NoSuchKernel:
    return f"no Jupyter kernel {KERNEL!r}; run: {sys.executable} -m ipykernel install --sys-prefix"
  python = spec.argv[0]
  try:
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    prefix = f"nothing ({e})"
  if os.path.realpath(prefix) != os.path.realpath(sys.prefix):
    return (f"the Jupyter kernel {KERNEL!r} ({spec.resource_dir}) runs {python}, whose environment"
            f" is {prefix}, not this one ({sys.prefix}); run: {sys.executable} -m ipykernel install"
            f" --sys-prefix, and remove the other kernelspec if it still comes first")
  return None


def smoke_environment(data_dir: str | None, smoke: bool = True, steps: int = 0) -> dict:
  """os.environ for the kernel: smoke mode, or else a short run of `steps` steps of the real model
  (0: a notebook that trains nothing); the repo importable, PTB's folder (if given)."""
  env = dict(os.environ)
  env.pop("ZAREMBA_JAX_SMOKE", None)
  env.pop("ZAREMBA_JAX_STEPS", None)
  if smoke:
    env["ZAREMBA_JAX_SMOKE"] = "1"
  elif steps:
    env["ZAREMBA_JAX_STEPS"] = str(steps)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env.pop("ZAREMBA_JAX_DATA", None)
  if data_dir:
    env["ZAREMBA_JAX_DATA"] = os.path.abspath(data_dir)
  return env


def execute(nb, cwd: str, data_dir: str | None = None, timeout: int = CELL_TIMEOUT_S,
            smoke: bool = True, steps: int = 0):
  """Runs the notebook `nb` (an nbformat node, changed in place) in folder `cwd`: in smoke mode, or
  (smoke=False) as a short run of `steps` train steps of the real model.

  Raises nbclient's CellExecutionError at the first cell that fails or runs past `timeout` seconds.
  """
  import nbclient  # pylint: disable=import-outside-toplevel
  # The kernel inherits this process's environment.
  with mock.patch.dict(os.environ, smoke_environment(data_dir, smoke, steps), clear=True):
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                                     record_timing=False, resources={"metadata": {"path": cwd}})
    client.execute()
  return nb


def default_data_dir() -> str | None:
  """$ZAREMBA_JAX_DATA, else ../shared/data/ptb beside the checkout if it is there, else None."""
  beside = os.path.join(REPO, "..", "shared", "data", "ptb")
  if os.environ.get("ZAREMBA_JAX_DATA"):
    return os.environ["ZAREMBA_JAX_DATA"]
  return beside if os.path.isfile(os.path.join(beside, "ptb.train.txt")) else None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("notebooks", nargs="*", help="default: every notebook in notebooks/")
  parser.add_argument("--no_save", action="store_true", help="run them, write nothing back")
  parser.add_argument("--smoke", action="store_true", help="CI's smoke mode (ZAREMBA_JAX_SMOKE=1)"
                      " instead of the short runs whose outputs are saved")
  args = parser.parse_args(argv)
  problem = kernel_problem()
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 1
  import nbformat  # pylint: disable=import-outside-toplevel
  data_dir = default_data_dir()
  if not args.smoke and data_dir is None:
    print("error: the short runs train on real PTB: set $ZAREMBA_JAX_DATA to its folder (or run"
          " --smoke)", file=sys.stderr)
    return 1
  print(f"data: {data_dir or 'a tiny corpus each notebook writes'}")
  for path in args.notebooks or notebook_paths():
    tic = time.time()
    nb = nbformat.read(path, as_version=4)
    name = os.path.basename(path)[:-len(".ipynb")]
    steps = 0 if args.smoke else SHORT_STEPS.get(name, 0)
    with tempfile.TemporaryDirectory() as cwd:
      execute(nb, cwd, data_dir, CELL_TIMEOUT_S if args.smoke else SHORT_CELL_TIMEOUT_S,
              smoke=args.smoke, steps=steps)
    mode = "smoke mode" if args.smoke else f"{steps} steps" if steps else "no training"
    print(f"{os.path.relpath(path)}: ran in {time.time() - tic:.0f} s ({mode})", flush=True)
    if not args.no_save:
      nbformat.write(nb, path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
