"""ORPO with TRL alone, the way TRL's own scripts run DPO and KTO: ``python -m adapters_for_tools.trl.rerun_orpo
--config trl_orpo.yaml``.

TRL 1.16 keeps ``ORPOTrainer`` in ``trl.experimental.orpo`` and ships no script for it; this is that script, and the
adapter builds its trainer with :func:`orpo_trainer`, so a rerun trains exactly what the run trained. Unlike the
other trainers ORPO takes no model path: the model is loaded here, with the script's ``ModelConfig`` (dtype,
attention, 4-bit quantisation), and the trainer gets the instance.
"""

from __future__ import annotations

from typing import Any


def orpo_trainer(args, model_args, train_dataset, callbacks: list[Any] | None = None):  # noqa: ANN001, ANN201
    """An ``ORPOTrainer`` for parsed script arguments (``ORPOConfig``, ``ModelConfig``) on ``train_dataset``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config, get_quantization_config
    from trl.experimental.orpo import ORPOTrainer

    kwargs: dict[str, Any] = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                              **(args.model_init_kwargs or {})}
    quant = get_quantization_config(model_args)
    if quant is not None:
        kwargs.update({"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}})
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    args.model_init_kwargs = None  # ORPOTrainer refuses them with a loaded model
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    return ORPOTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                       peft_config=get_peft_config(model_args), callbacks=callbacks)


def main(argv: list[str] | None = None) -> int:
    """Parse ``--config trl_orpo.yaml`` as TRL's scripts do, train, save into ``output_dir``."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_dataset
    from trl.experimental.orpo import ORPOConfig

    parser = TrlParser((ScriptArguments, ORPOConfig, ModelConfig, DatasetMixtureConfig))
    script_args, args, model_args, dataset_args = parser.parse_args_and_config(args=argv)
    dataset = get_dataset(dataset_args)
    trainer = orpo_trainer(args, model_args, dataset[script_args.dataset_train_split])
    trainer.train()
    trainer.save_model(args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
