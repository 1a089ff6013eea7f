"""One package per fine-tuning framework. ``contract.py`` says what an adapter provides; ``dummy/`` is the template."""
