"""tunebench harness: scenario -> isolated runs -> measured results -> tables, charts and reports."""

from harness.common.version import __version__

__all__ = ["__version__"]
