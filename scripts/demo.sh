#!/usr/bin/env bash
# One command: set up everything (venv with the CPU extra, tiny model, demo data) and run the
# demo job on local Ray. Extra arguments go to `persqa-ray run` (e.g. --set prompt.seed=3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY=.venv/bin/python
$PY scripts/make_tiny_model.py models/tiny-qwen2-vl
$PY scripts/make_demo_data.py demo_data
echo "[demo] running: persqa-ray run configs/demo.yaml --overwrite $*"
start=$(date +%s)
.venv/bin/persqa-ray run configs/demo.yaml --overwrite "$@"
echo "[demo] wall time $(( $(date +%s) - start )) s (includes Ray start and a ~30 s vLLM engine start)"
cat <<'NOTE'

[demo] Output: demo_output/ (Parquet partitioned by status, plus demo_output/_summary.json).
[demo] The tiny model has random weights: its answers are random text that only has the right
[demo] form (they begin with <mam>). For real answers, point engine.model at a real VLM, e.g.
[demo]   persqa-ray run configs/gpu.yaml        # Qwen/Qwen2.5-VL-3B-Instruct on a GPU node
[demo] or --set engine.model=/path/to/Qwen2.5-VL-3B-Instruct on this config.
NOTE
