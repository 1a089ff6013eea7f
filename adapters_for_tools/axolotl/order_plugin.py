"""An Axolotl plugin that makes its preference trainers read the rows in file order.

Axolotl's DPO and ORPO trainers take transformers' default ``train_sampling_strategy`` (``random``: a seeded
shuffle), and its YAML has no key that reaches them (``curriculum_sampling`` is its SFT trainer's). Axolotl merges
what a plugin's ``get_training_args`` returns into the trainer's arguments, so listing this plugin in the YAML
(``plugins: [adapters_for_tools.axolotl.order_plugin.FileOrderPlugin]``, as the axolotl adapter writes it for
``rl:`` runs) gives the same order every framework reads, in the saved config itself: a rerun with
``python -m axolotl.cli.train axolotl.yml`` needs only this file on ``PYTHONPATH`` beside Axolotl.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin


class FileOrderPlugin(BasePlugin):
    """Sets ``train_sampling_strategy: sequential`` on an ``rl:`` run's trainer arguments."""

    def get_training_args(self, cfg):
        return {"train_sampling_strategy": "sequential"} if cfg.rl else None
