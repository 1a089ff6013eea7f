"""Cluster settings: where the runs of a sweep go when they are submitted as jobs instead of run here.

The ``cluster:`` section of a suite file (:mod:`harness.spec.suite`), or the ``--cluster ...`` options of ``run``
and ``nightly``; :mod:`harness.running.cluster` turns it into a submitit executor. Example::

    cluster:
      executor: slurm            # slurm: sbatch through submitit; local: submitit's local executor (tests, one box)
      partition: gpu
      gpus_per_job: 1            # every run is one job on a node of its own (exclusive: true)
      cpus_per_job: 16
      time_limit_min: 60         # leave out: derived from the scenario's timeout
      slurm_params: {account: ml-bench, qos: normal}   # any other sbatch option, --key=value
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EXECUTORS = ("local", "slurm")
# sbatch options this model sets itself: giving them again under slurm_params would be two answers to one question
_OWN_SBATCH = {"partition": "partition", "gpus-per-node": "gpus_per_job", "cpus-per-task": "cpus_per_job",
               "time": "time_limit_min", "mem": "mem_gib", "exclusive": "exclusive"}


class ClusterSettings(BaseModel):
    """How a sweep's runs are submitted as jobs (one run per job)."""

    # as a scenario: a value is the type YAML read it as, and no number is infinite or NaN
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    executor: Literal["local", "slurm"]
    partition: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.,-]+$")
    gpus_per_job: int = Field(default=1, ge=0, le=64)
    cpus_per_job: int | None = Field(default=None, ge=1, le=4096)
    mem_gib: float | None = Field(default=None, gt=0, le=65536)
    time_limit_min: int | None = Field(default=None, ge=1, le=60 * 24 * 30)
    # at most this many jobs at once; local jobs share this machine, so by default they run one at a time
    max_parallel: int | None = Field(default=None, ge=1, le=10000)
    exclusive: bool = True  # slurm: a node to itself while it measures (another job's load is measured otherwise)
    setup: list[str] = Field(default_factory=list, max_length=50)  # shell lines before each job (module load, ...)
    slurm_params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    python: str | None = Field(default=None, min_length=1)  # the interpreter on the nodes (default: this one)

    @field_validator("slurm_params")
    @classmethod
    def _sbatch_names(cls, v: dict) -> dict:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
                raise ValueError(f"{name!r}: an sbatch long option name (e.g. account, qos, constraint)")
            if (own := name.replace("_", "-")) in _OWN_SBATCH:
                raise ValueError(f"{name!r}: set it as cluster.{_OWN_SBATCH[own]}")
        return v

    def parallel(self) -> int | None:
        """How many jobs may run at once (None: no limit but the scheduler's)."""
        return self.max_parallel or (1 if self.executor == "local" else None)

    def job_time_limit_min(self, work_s: float) -> int:
        """The job's time limit in minutes: as set, else ``work_s`` (the longest the job's own timeouts let it
        work) plus ten minutes to start the job and import its interpreter's packages."""
        if self.time_limit_min is not None:
            return self.time_limit_min
        return math.ceil(work_s / 60) + 10
