"""tunebench's own trainer: a Llama/Mistral/Qwen2 decoder on the fused ops of ``kernels.ops``.

- :mod:`kernels.trainer.model`: the model, LoRA/DoRA/QLoRA/full, loading transformers checkpoints.
- :mod:`kernels.trainer.train`: the loop (data order, loss normalisation and optimizer as the hf baseline).
- :mod:`kernels.trainer.save`: PEFT adapters / HF checkpoints that transformers and PEFT load.
- NF4 storage for QLoRA is :mod:`kernels.ops.nf4` (the trainer also reads bitsandbytes 4-bit checkpoints).
- ``python -m kernels.trainer.profile_step``: step time, tokens/s, memory and a CUDA profile at 8B shapes.

See ``kernels/trainer/README.md`` for the design and the memory budget.
"""
