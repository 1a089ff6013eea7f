"""tunebench's own prediction of a frontier cell (its adapter's ``predicts_fit``): the planner's cost model run on the
CPU for a planning row's probe scenario, before anything loads; rows that do not plan predict nothing."""

from __future__ import annotations

import pytest

from adapters_for_tools import registry
from harness.running.frontier import probe_scenario
from harness.spec.scenario import load_scenario


@pytest.fixture(scope="module")
def lora_frontier():  # noqa: ANN201
    return load_scenario("scenarios/llama8b_lora_frontier.yaml")


def _predict(sc, row: str, budget: float, seq_len: int) -> bool | None:  # noqa: ANN001
    probe = probe_scenario(sc, budget, "seq_len", seq_len, row)
    overrides = next(f.overrides for f in sc.frameworks if f.key == row)
    return registry.load_adapter("tunebench").predicts_fit(probe, overrides)


def test_the_planned_row_predicts_what_its_budget_holds(lora_frontier):  # noqa: ANN001
    """8B bf16 LoRA, one row: under 8 GiB a plan streaming the weights fits 2,048 tokens and not the whole 131,072;
    more memory never holds less, and the fixed rows (no plan) predict nothing."""
    assert _predict(lora_frontier, "tunebench-planned", 8.0, 2048) is True
    assert _predict(lora_frontier, "tunebench-planned", 8.0, 131072) is False
    assert _predict(lora_frontier, "tunebench-planned", 40.0, 131072) is True
    assert _predict(lora_frontier, "tunebench-lean", 8.0, 2048) is None
    assert _predict(lora_frontier, "tunebench", 40.0, 2048) is None
