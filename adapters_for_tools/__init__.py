"""One package per fine-tuning framework. See ``base.py`` for the contract and ``dummy/`` for the template."""
