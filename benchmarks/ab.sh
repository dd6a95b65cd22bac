#!/usr/bin/env bash
# Same-machine A/B of package versions: benchmarks/throughput.py (JAX alone) run in each source
# tree given, in order and then in reverse (A B, B A), each run its own process, so drift on the
# machine hits every tree alike. A persistent compilation cache makes the second pass start fast.
# The trees are `git archive` snapshots (a device machine gets the working tree, not the history):
#   mkdir -p .ab/acc4c8c && git archive acc4c8c | tar -x -C .ab/acc4c8c
#   OUT=/tmp/ab PRESETS=small,char_small,large ARGS=--test_len=2048 bash benchmarks/ab.sh . .ab/acc4c8c
# On this project's 2-core CPU, JAX runs with the persistent cache enabled came out ~7% slower than
# without it (char_small bfloat16 training, two alternating rounds, 2026-11-27): compare the trees of
# one ab.sh run with each other, not with benchmarks/throughput.py tables.
# Needs python3 on PATH with requirements.txt installed. Prints training words/s per preset,
# system, tree and pass; each run's table and JSON are in $OUT.
set -u
OUT=${OUT:-/tmp/ab}; PRESETS=${PRESETS:-small,medium,large}; ARGS=${ARGS:-}; TIMEOUT_S=${TIMEOUT_S:-600}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ab_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
mkdir -p "$OUT"
trees=("$@"); reversed=(); for ((k = ${#trees[@]} - 1; k >= 0; k--)); do reversed+=("${trees[k]}"); done
for pass in 1 2; do
  [ "$pass" = 1 ] && order=("${trees[@]}") || order=("${reversed[@]}")
  for k in "${!order[@]}"; do
    tree=${order[k]}; name="${pass}_$(basename "$(cd "$tree" && pwd)")"
    echo "pass $pass: $tree ($(date +%T))"
    # shellcheck disable=SC2086
    (cd "$tree" && timeout "$TIMEOUT_S" python3 benchmarks/throughput.py --presets="$PRESETS" --no_torch \
       $ARGS --json="$OUT/$name.json") > "$OUT/$name.log" 2>&1 || echo "  failed: see $OUT/$name.log"
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "[12]_*.json"))):
  pass_, tree = os.path.basename(path)[:-5].split("_", 1)
  for result in json.load(open(path))["results"]:
    for system, r in result["systems"].items():
      rows.setdefault((result["preset"], system, tree), {})[pass_] = r["train_wps"]
print(f"{'preset':<11} {'system':<14} {'tree':<12} {'pass 1':>10} {'pass 2':>10}   training words/s")
for (preset, system, tree), v in sorted(rows.items()):
  print(f"{preset:<11} {system:<14} {tree:<12} {v.get('1', 0):>10.0f} {v.get('2', 0):>10.0f}")
PY
