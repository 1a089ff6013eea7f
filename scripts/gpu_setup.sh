#!/usr/bin/env bash
# On an offline GPU box: install the packages carried in .whl/ into /tmp/site (wheels with pip --no-deps,
# pre-pruned trees as .tar.xz), then `export PYTHONPATH=/tmp/site` in the calling shell.
#   source scripts/gpu_setup.sh
set -e
mkdir -p /tmp/site
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
for t in .whl/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C /tmp/site; done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export TUNEBENCH_CACHE=${TUNEBENCH_CACHE:-/tmp/tbcache} PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
set +e
