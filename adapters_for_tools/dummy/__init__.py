"""dummy: the adapter template and test double — a tiny plain PyTorch loop with the common hook.

Copy this package to start a new adapter. It trains the scenario's model with a hand-written loop (no
toolkit), so it also exercises the harness end to end. ``overrides`` understood (for tests):
``crash: true`` (exit without a result), ``raise: "message"``, ``oom: true``, ``sleep_s: N`` per step,
``loss_scale: x`` (multiply the reported loss: a planted divergence).
"""

from adapters_for_tools.base import AdapterInfo

INFO = AdapterInfo(
    name="dummy",
    description="template adapter and test double (plain PyTorch loop, LoRA via PEFT)",
    env="base",
    methods=frozenset({"full", "lora", "dora"}),
    requires=("torch", "transformers", "peft"),
    version_of="torch",
)
