#!/usr/bin/env bash
# One command: install what the tests need (if not there yet), then run the whole suite.
# Extra arguments go to pytest (e.g. -m 'not slow', -k decode).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
.venv/bin/python scripts/make_tiny_model.py models/tiny-qwen2-vl
echo "[test] ruff check"
.venv/bin/ruff check persqa_ray tests scripts
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "[test] pytest collected no tests: failing loudly (exit 5 is not a pass)" >&2
  exit 1
fi
exit $rc
