#!/usr/bin/env bash
# The GPU check (issue 10): run from the repository root of a CUDA machine, e.g. through the
# device tool with carry [".whl"]:   bash scripts/gpu_check.sh            (writes into $OUT)
#                                    bash scripts/gpu_check.sh --out DIR --parts env,e2e
# If hydra / omegaconf / datasets do not import and .whl/ exists (made beforehand on a machine
# with pip and a network by scripts/gpu_wheels.sh), the wheels are installed into a --target
# folder put on PYTHONPATH: nothing is fetched, nothing is installed into the system Python.
# Everything else is scripts/gpu_check.py (see --help); `--cpu-smoke` runs it at toy sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exec "$py" scripts/gpu_check.py --help
fi

if ! "$py" -c "import hydra, omegaconf, datasets" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site=${SAETRAIN_WHEEL_SITE:-/tmp/saetrain-site}
        echo "[gpu_check] installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $site"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl || echo "[gpu_check] wheel install failed" >&2
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "[gpu_check] hydra / omegaconf / datasets missing and no .whl/ (run" \
            "scripts/gpu_wheels.sh where pip works): the parts that need them will fail" >&2
    fi
fi

# saetrain from this tree, offline; Python's output unbuffered so that a timeout keeps the log.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET SAETRAIN_KERNELS
exec "$py" scripts/gpu_check.py "$@"
