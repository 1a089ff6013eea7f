#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine (CPU only): the package with its dev tools, the TRL and
# LitGPT environments the adapter tests train in, and a headless Chromium for the trend page's browser check
# (from the system's package manager when it is missing and we may install; without it those tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -e ".[dev]"
python -m harness env create trl
python -m harness env create litgpt
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium not installed: the trend page's browser test will skip"
fi
