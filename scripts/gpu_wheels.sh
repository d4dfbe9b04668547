#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) for scripts/gpu_check.sh: the pure-Python wheels, for Python 3.12,
# of what saetrain needs and the GPU machine's image lacks (hydra-core, omegaconf, antlr4 runtime,
# datasets and the two of its requirements the image does not hold: dill, multiprocess). Run it
# from any machine where pip reaches PyPI; the GPU machine itself has no network.
#
#   bash scripts/gpu_wheels.sh            # then carry ".whl" in the device run
#
# Versions are the ones the CPU development environment tests with. gguf is not needed there
# (no GGUF model travels); torch, triton, transformers, safetensors, numpy, pyarrow, pandas,
# xxhash, fsspec, huggingface-hub, ... are in the image (/work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pyver=${WHEEL_PYTHON:-3.12}  # the Python the wheels are for (the GPU image has 3.12)
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

WHEELS=(
    hydra-core==1.3.8
    omegaconf==2.3.1
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
dest=.whl
rm -rf "$dest"
mkdir -p "$dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "${WHEELS[@]}"
# antlr4-python3-runtime 4.9.3 (omegaconf 2.3 and hydra-core pin 4.9.*) is published only as a
# source archive: build its wheel here (pure Python, py3-none-any).
"$py" -m pip wheel -q --no-deps --no-binary=antlr4-python3-runtime -w "$dest" \
    antlr4-python3-runtime==4.9.3
ls -l "$dest"
du -ch "$dest"/*.whl | tail -1
