"""tunebench harness: scenario -> isolated runs -> measured results -> tables, charts and reports."""

__version__ = "0.1.0"
