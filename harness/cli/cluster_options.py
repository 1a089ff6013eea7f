"""The ``--cluster ...`` options of ``run`` and ``nightly``: each run of the sweep submitted as a job.

They set, or override key by key, the suite's ``cluster:`` section (:mod:`harness.spec.cluster`); the jobs go
through submitit (:mod:`harness.running.cluster`), imported only when a cluster is asked for: a plain ``run`` needs
no submitit (the GPU box's Python has none). Examples::

    python -m harness run scenarios/llama8b_qlora.yaml --cluster slurm --partition gpu --gpus-per-job 1
    python -m harness nightly SUITE.yaml --cluster slurm --slurm-param account=ml-bench --slurm-param qos=normal
    python -m harness nightly SUITE.yaml --no-cluster        # run here although the suite names a cluster
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pydantic import ValidationError

from harness.spec.cluster import EXECUTORS, ClusterSettings

if TYPE_CHECKING:
    from harness.running.cluster import ClusterLauncher

# option name -> ClusterSettings field
_FIELDS = {"partition": "partition", "gpus_per_job": "gpus_per_job", "cpus_per_job": "cpus_per_job",
           "mem_gib": "mem_gib", "time_limit_min": "time_limit_min", "max_parallel": "max_parallel"}


class ClusterOptionsError(ValueError):
    """Cluster settings that cannot be used; the message names the option or suite key."""


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Add the cluster options to a command's parser."""
    g = ap.add_argument_group("cluster", "submit each run as a job through submitit instead of running it here "
                                         "(docs/nightly.md); each option overrides the suite's cluster: key")
    g.add_argument("--cluster", choices=EXECUTORS, help="slurm, or local (submitit's local executor: this machine)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--gpus-per-job", type=int, metavar="N", help="GPUs of each run's job (default 1)")
    g.add_argument("--cpus-per-job", type=int, metavar="N")
    g.add_argument("--mem-gib", type=float, metavar="GIB", help="host memory of each job")
    g.add_argument("--time-limit-min", type=int, metavar="MIN",
                   help="each job's time limit (default: the scenario's timeouts + 10 min)")
    g.add_argument("--max-parallel", type=int, metavar="N",
                   help="at most N jobs at once (default: local 1, slurm no limit but the scheduler's)")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY[=VALUE]",
                   help="any other sbatch option, e.g. account=ml-bench (repeatable)")
    g.add_argument("--no-cluster", action="store_true", help="run here even when the suite has a cluster section")


def launcher_from(args: argparse.Namespace, base: ClusterSettings | None = None) -> ClusterLauncher | None:
    """The launcher the options and the suite's ``cluster:`` section ask for; None: run here.

    Raises:
        ClusterOptionsError: invalid settings (naming the option), cluster options without an executor, or Slurm
            asked for on a machine without Slurm's commands.
    """
    given = {field: getattr(args, opt) for opt, field in _FIELDS.items() if getattr(args, opt) is not None}
    params = dict(_slurm_param(p) for p in args.slurm_param)
    if args.no_cluster:
        return None
    if base is None and args.cluster is None:
        if given or params:
            flags = [f"--{o.replace('_', '-')}" for o, f in _FIELDS.items() if f in given] + \
                    (["--slurm-param"] if params else [])
            raise ClusterOptionsError(f"{', '.join(flags)}: needs --cluster slurm|local (or a cluster: section in "
                                      "the suite)")
        return None
    data = (base.model_dump() if base is not None else {}) | given
    if args.cluster is not None:
        data["executor"] = args.cluster
    data["slurm_params"] = data.get("slurm_params", {}) | params
    try:
        settings = ClusterSettings.model_validate(data)
    except ValidationError as e:
        raise ClusterOptionsError("; ".join(f"{_option(err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                                            for err in e.errors())) from None
    import submitit  # heavy, and only for a cluster

    from harness.running.cluster import ClusterLauncher  # imports submitit: only when a cluster is asked for

    if settings.executor == "slurm" and submitit.SlurmExecutor.affinity() < 0:
        raise ClusterOptionsError("--cluster slurm: Slurm's srun/sbatch are not on this machine's PATH (submit "
                                  "from a login node of the cluster)")
    return ClusterLauncher(settings)


def _slurm_param(text: str) -> tuple[str, str | bool]:
    key, sep, value = text.partition("=")
    return key.strip(), value if sep else True  # a bare name is an sbatch flag without a value (--requeue)


def _option(loc: tuple) -> str:
    name = str(loc[0]) if loc else "cluster"
    if name == "slurm_params":
        return "--slurm-param / cluster.slurm_params" + "".join(f"[{p}]" for p in loc[1:])
    opt = next((o for o, f in _FIELDS.items() if f == name), None)
    return f"--{opt.replace('_', '-')} / cluster.{name}" if opt else f"cluster.{name}"
