"""tunebench's own trainer: a Llama / Mistral / Qwen2 / Phi-3 / Gemma-2 / Mixtral decoder on the fused ops of
``kernels.ops``.

A library: it knows nothing of the benchmark harness (``adapters_for_tools/tunebench`` translates a scenario into
:class:`~kernels.trainer.config.TrainerConfig` and feeds it tokenised rows).

- :mod:`kernels.trainer.config`: architecture, method, loop settings.
- :mod:`kernels.trainer.model`: the decoder; :mod:`~kernels.trainer.attention`, :mod:`~kernels.trainer.linear`
  (LoRA / DoRA / QLoRA projections), :mod:`~kernels.trainer.opset` (fused op or reference),
  :mod:`~kernels.trainer.moe` (Mixtral's experts) and :mod:`~kernels.trainer.torch_ops` (the family parts without
  a fused kernel yet) are its parts.
- :mod:`kernels.trainer.offload`: per-layer recomputation, host offload of weights and checkpointed inputs.
- :mod:`kernels.trainer.plan` and :mod:`kernels.trainer.planner`: the knobs above chosen to a memory budget.
- :mod:`kernels.trainer.loading`: the model from a transformers checkpoint, with the method applied.
- :mod:`kernels.trainer.batches` and :mod:`kernels.trainer.train`: data order, collation and the loop.
- :mod:`kernels.trainer.preference`: DPO and ORPO (pairs, their collation, TRL's losses), the preference step and
  its loop; :mod:`kernels.trainer.kto`: KTO's labelled rows, KL sequences and loss.
- :mod:`kernels.trainer.save`: PEFT adapters / HF checkpoints that transformers and PEFT load.
- NF4 storage for QLoRA is :mod:`kernels.ops.nf4` (the trainer also reads bitsandbytes 4-bit checkpoints).

See ``kernels/trainer/README.md`` for the design and the memory budget.
"""
