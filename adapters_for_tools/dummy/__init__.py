"""dummy: the adapter template and test double — a tiny plain PyTorch loop with the common hook.

Copy this package to start a new adapter: ``INFO`` and the overrides model here (light), ``run`` in
``adapter.py`` (heavy); ``adapters_for_tools/contract.py`` says what each must provide. It trains the scenario's
model with a hand-written loop (no toolkit), so it also exercises the harness end to end; its overrides plant
failures for the tests.
"""

from __future__ import annotations

from pydantic import Field

from adapters_for_tools.contract import AdapterInfo, Overrides


class DummyOverrides(Overrides):
    """Planted failures and slowness (``frameworks: [{name: dummy, overrides: {oom: true}}]``)."""

    crash: bool = False  # exit the worker without a result (a crash the runner must record)
    raise_: str | None = Field(None, alias="raise")  # raise RuntimeError with this message
    oom: bool = False  # raise a CUDA out-of-memory error
    sleep_s: float = Field(0.0, ge=0)  # sleep this long after each optimizer step (timeouts, progress)
    leave_child_s: float = Field(0.0, ge=0)  # start a helper process that outlives the worker by this long
    loss_scale: float = Field(1.0, gt=0)  # multiply the reported loss: a planted divergence
    # Simulated memory, the CPU test double of a memory budget: the run "needs" sim_base_gib + sim_gib_per_token x
    # (micro_batch x seq_len) and raises an out-of-memory error when that is above hardware.memory_budget_gib
    sim_gib_per_token: float | None = Field(None, gt=0)
    sim_base_gib: float = Field(0.0, ge=0)
    # a row that says it chooses its settings from the memory budget (as tunebench's plan does): the frontier then
    # measures it under every budget instead of taking a smaller budget's run at the same value
    sim_plan: bool = False
    # what such a row's own model predicts per token (predicts_fit, asked by the frontier before it probes): the
    # simulated need's rate when left out; another rate plants a wrong prediction
    sim_predicted_gib_per_token: float | None = Field(None, gt=0)


INFO = AdapterInfo(
    name="dummy",
    description="template adapter and test double (plain PyTorch loop, LoRA via PEFT)",
    env="base",
    methods=frozenset({"full", "lora", "dora"}),
    requires=("torch", "transformers", "peft"),
    version_of="torch",
    overrides=DummyOverrides,
    extra={"simulated_memory": "sim_gib_per_token"},  # the override that lets a memory budget apply on a cpu
    budget_overrides=frozenset({"sim_plan"}),
)
