#!/usr/bin/env bash
# On an offline GPU box: install the packages carried in .whl/ into /tmp/site (wheels with pip --no-deps,
# pre-pruned trees as .tar.xz), `export PYTHONPATH=/tmp/site` in the calling shell, and install the framework
# bundles carried in .bundles/.
#   source scripts/gpu_setup.sh     (also defines step, used by the device scripts)
set -e
mkdir -p /tmp/site
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
for t in .whl/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C /tmp/site; done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export TUNEBENCH_CACHE=${TUNEBENCH_CACHE:-/tmp/tbcache} PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
# the per-framework offline bundles carried in .bundles/ (python -m harness env pack all), once per machine
mkdir -p "$TUNEBENCH_CACHE"
if [ ! -f "$TUNEBENCH_CACHE/.bundles-installed" ]; then  # once per machine (a warm machine keeps /tmp)
  for b in base trl unsloth llamafactory axolotl litgpt lmeval; do
    [ -f .bundles/$b.tar.xz ] && python3 -m harness env install .bundles/$b.tar.xz >/dev/null 2>&1 || echo "bundle $b: not installed"
  done
  touch "$TUNEBENCH_CACHE/.bundles-installed"
fi
set +e
# step [--new] SCENARIO ARGS..: one harness run with what is left of the caller's deadline $end (SIGINT on timeout:
# the runner stops cleanly and stores what finished); --resume unless --new; RETRY=1 adds --retry-failed.
step() {
  left=$(( end - $(date +%s) )); [ $left -gt 20 ] || return 1
  mode=--resume; [ "$1" = "--new" ] && { mode=--new; shift; }
  timeout -s INT $left python3 -m harness run "$@" $mode ${RETRY:+--retry-failed} --no-report 2>&1 | grep -v "━"
}
