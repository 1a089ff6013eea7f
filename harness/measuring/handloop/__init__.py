"""Plain hand-written training loops that check the harness's own figures, one module per tool.

Each loop trains the scenario the way the tool's adapter would, but with none of the harness's run machinery: no
worker, no ``StepMeter``, no ``TrainerCallback``, no Trainer. It loads the same checkpoint, feeds the same
tokenised rows in the same order, times each optimizer step between two device synchronisations (CUDA events on a
GPU), counts non-padding tokens from the tensors it feeds, drops the scenario's warmup steps and reads torch's peak
memory. It also reads back the settings it ran with, in the keys the adapters store as ``effective``, so that a
difference from the harness's figure comes with the settings that differ.

- :mod:`~harness.measuring.handloop.hf`: transformers + PEFT, with each setting the HF Trainer applies spelled out
  (:class:`~harness.measuring.handloop.knobs.HfKnobs`).
- :mod:`~harness.measuring.handloop.tunebench`: the trainer library (``kernels.trainer``) called directly.
- :mod:`adapters_for_tools.unsloth.handloop`: ``FastLanguageModel`` and the adapter's own trainer data, through the
  same plain loop as hf (its environment). It sits beside its adapter to build everything from the adapter's own
  functions; this layer loads it by name, as the worker loads adapters.

``python -m harness.measuring.handloop FRAMEWORK SCENARIO`` runs one loop in this process;
``python -m harness selfcheck`` runs each in its tool's environment and compares them with a stored sweep.
"""

from __future__ import annotations

# the tools with a hand loop, by adapter name, and the module of each (its ``run``)
LOOP_MODULES = {"hf": "harness.measuring.handloop.hf", "tunebench": "harness.measuring.handloop.tunebench",
                "unsloth": "adapters_for_tools.unsloth.handloop"}
FRAMEWORKS = tuple(LOOP_MODULES)
