"""Runs the notebooks of notebooks/ top to bottom in smoke mode, and saves them with their outputs.

  python -m scripts.run_notebooks                                  # all four, from the repo root
  python -m scripts.run_notebooks notebooks/quickstart.ipynb      # one
  python -m scripts.run_notebooks --no_save                        # run only, write nothing

The outputs GitHub shows under each cell are the ones this wrote: `ZAREMBA_JAX_SMOKE=1` on a 2-core
CPU (the notebooks say so at the top). Each notebook runs in a fresh temporary folder (its runs/ go
there) in the Jupyter kernel `python3`, which must be this interpreter: `python -m ipykernel install
--sys-prefix` in the virtual environment. PTB is read from $ZAREMBA_JAX_DATA, else ../shared/data/ptb
beside the checkout, else the notebooks write a tiny corpus; nothing is downloaded.
tests/notebooks_test.py runs `execute` without saving.
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


def smoke_environment(data_dir: str | None) -> dict:
  """os.environ for the kernel: smoke mode, the repo importable, PTB's folder (if given)."""
  env = dict(os.environ)
  env["ZAREMBA_JAX_SMOKE"] = "1"
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env.pop("ZAREMBA_JAX_DATA", None)
  if data_dir:
    env["ZAREMBA_JAX_DATA"] = os.path.abspath(data_dir)
  return env


def execute(nb, cwd: str, data_dir: str | None = None, timeout: int = CELL_TIMEOUT_S):
  """Runs the notebook `nb` (an nbformat node, changed in place) in smoke mode, in folder `cwd`.

  Raises nbclient's CellExecutionError at the first cell that fails or runs past `timeout` seconds.
  """
  import nbclient  # pylint: disable=import-outside-toplevel
  # The kernel inherits this process's environment.
  with mock.patch.dict(os.environ, smoke_environment(data_dir), clear=True):
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
  args = parser.parse_args(argv)
  problem = kernel_problem()
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 1
  import nbformat  # pylint: disable=import-outside-toplevel
  data_dir = default_data_dir()
  print(f"data: {data_dir or 'a tiny corpus each notebook writes'}")
  for path in args.notebooks or notebook_paths():
    tic = time.time()
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as cwd:
      execute(nb, cwd, data_dir)
    print(f"{os.path.relpath(path)}: ran in {time.time() - tic:.0f} s", flush=True)
    if not args.no_save:
      nbformat.write(nb, path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
