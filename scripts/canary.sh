#!/usr/bin/env bash
# Upstream canary: does engine still work on the newest releases that pyproject.toml's ranges allow?
#
#   scripts/canary.sh                 # build a clean venv with the newest allowed versions, run the checks
#   scripts/canary.sh --write-lock    # ... and, if every check passed, make that set the new requirements/lock.txt
#
# Steps: (1) a brand-new venv (no system site-packages), newest pip; (2) `pip install` of engine with
# every extra and NO lock, so pip picks the newest releases the ranges allow — except torch, held at
# $TORCH (default: the lock's; other torch builds download several GB; TORCH=2.14.1 to try one);
# llama-cpp-python is built with the portable flags (requirements.txt); (3) the versions that moved
# against the lock; (4) a `model=tiny` training run and which speed-ups took effect or fell back
# (engine/speed: a fallen-back switch means an upstream change to look at); (5) the fast test suite.
# With --write-lock and everything green, `pip freeze` of that venv becomes requirements/lock.txt:
# that is how the lock gets bumped. Takes 6-8 min to install (the llama.cpp build) + the fast suite.
set -uo pipefail
cd "$(dirname "$0")/.."
WRITE=0
[ "${1:-}" = "--write-lock" ] && WRITE=1
VENV=${CANARY_VENV:-/tmp/engine-canary}
LOCK=requirements/lock.txt
TORCH=${TORCH:-$(sed -n 's/^torch==//p' "$LOCK")}
EXTRAS="dev,quant,bench,export,loggers,sweep,cluster"

rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
echo "== install: newest allowed releases (torch held at $TORCH), llama-cpp-python built as requirements.txt says"
grep -v '^-c ' requirements.txt > "$VENV/requirements-unlocked.txt"  # requirements.txt without the lock
if ! PIP_NO_CACHE_DIR=1 "$PY" -m pip install -q -r "$VENV/requirements-unlocked.txt" "torch==$TORCH" ".[$EXTRAS]"; then
  echo "canary: install FAILED (the ranges in pyproject.toml no longer resolve or a build broke)"
  exit 1
fi
"$PY" -m pip check || echo "canary: pip check reported conflicts (above)"

echo "== versions that differ from $LOCK"
# Local version labels dropped (torch==2.13.0, not 2.13.0+cpu): `==2.13.0` still takes the CPU wheel
# where one is offered, and stays installable from PyPI elsewhere.
"$PY" -m pip freeze --exclude-editable | grep -v '^engine' | sed 's/+[A-Za-z0-9.]*$//' | sort > "$VENV/freeze.txt"
grep -v '^#' "$LOCK" | sort | diff - "$VENV/freeze.txt" | grep '^[<>]' || echo "(none)"

echo "== a model=tiny run: speed-ups"
WORK=$(mktemp -d)
(cd "$WORK" && HF_HUB_OFFLINE=1 "$VENV/bin/engine" model=tiny train.max_steps=2 precision=fp32 'stages=[prepare_data,train]' > run.log 2>&1)
RUN_RC=$?
grep -E '^\[engine\] speed-up' "$WORK/run.log" || true
[ $RUN_RC -eq 0 ] || { echo "canary: the model=tiny run FAILED (rc $RUN_RC):"; tail -20 "$WORK/run.log"; }
FELL_BACK=$(grep -c 'skipped, running the stock code' "$WORK/run.log")

echo "== the fast test suite"
HF_HUB_OFFLINE=1 "$PY" -m pytest -q -p no:warnings -p no:cacheprovider -o addopts="--strict-markers -m 'not slow'" tests > "$VENV/pytest.log" 2>&1
TEST_RC=$?
grep -E '^(FAILED|ERROR) ' "$VENV/pytest.log" || true
tail -1 "$VENV/pytest.log"

echo "== summary: run rc $RUN_RC, speed-ups fallen back $FELL_BACK, tests rc $TEST_RC"
if [ $RUN_RC -eq 0 ] && [ "$FELL_BACK" -eq 0 ] && [ $TEST_RC -eq 0 ]; then
  if [ $WRITE -eq 1 ]; then
    {
      echo "# The exact versions engine is tested with (Linux x86_64, Python 3.11), every extra included."
      echo "# Made by scripts/canary.sh --write-lock from a clean venv on $(date -u +%F): pip freeze after"
      echo "# the newest releases pyproject.toml allows passed the checks. Used as a constraints file:"
      echo "#   pip install -r requirements.txt .   (requirements.txt says -c requirements/lock.txt)"
      cat "$VENV/freeze.txt"
    } > "$LOCK"
    echo "canary: wrote $LOCK"
  fi
  exit 0
fi
echo "canary: NOT green; $LOCK left as it is"
exit 1
