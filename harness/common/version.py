"""tunebench's own version (also readable where the package is not pip-installed, as on the GPU box)."""

__version__ = "0.1.0"
