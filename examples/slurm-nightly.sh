#!/bin/bash
# tunebench nightly on a Slurm cluster: every run of the suite is submitted as a Slurm job of its own, through
# submitit (docs/nightly.md, "Runs as cluster jobs"). Run this on a login node, e.g. from its crontab:
#
#   0 2 * * * /srv/tunebench/examples/slurm-nightly.sh >> /shared/tunebench/nightly.log 2>&1
#
# The runner stays on the login node (it only submits, waits and judges: no GPU, little CPU); one job builds the
# checkpoint and dataset, then each (framework, repeat) runs in a job on a GPU node of its own (--exclusive by
# default: another job's load on the node would be measured). A job that dies (time limit, node failure) becomes
# a stored row with the job's error; rerunning this script resumes the sweep, and
#   python -m harness run SCENARIO --retry-failed --cluster slurm ...
# does the failed runs again. Results, the work area, the cache and the toolkit environments must be on a
# filesystem the nodes share. Exit code as the nightly command's: 0 ok, 1 regression, 2 bad input, 3 inconclusive.
set -euo pipefail

cd "$(dirname "$0")/.."                          # the tunebench checkout (shared with the nodes)
SHARED=${TUNEBENCH_SHARED:-/shared/tunebench}   # edit: a folder every node mounts at the same path
export TUNEBENCH_WORK="$SHARED/work"            # job files, inputs and run scratch
export TUNEBENCH_CACHE="$SHARED/cache"          # generated checkpoints
export TUNEBENCH_ENVS="$SHARED/envs"            # toolkit environments (python -m harness env create ...)

python -m harness nightly scenarios/suites/nightly_gpu.yaml \
    --results "$SHARED/results" --reports "$SHARED/reports" \
    --cluster slurm --partition gpu --gpus-per-job 1 --cpus-per-job 16 --time-limit-min 60 \
    --slurm-param account=ml-bench
