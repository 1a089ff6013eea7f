"""Scenarios derived from a validated one by changing a few settings (a memory budget, a probe's seq_len).

The changed scenario is validated again, whole, as the file would be (cross-section rules included: a budget on a
cpu, a seq_len beyond the model's maximum), so a derived run is an ordinary run of a valid scenario.
"""

from __future__ import annotations

from typing import Any

from harness.spec.scenario import Scenario, scenario_from_dict


def derive(sc: Scenario, name: str | None = None, **sections: dict[str, Any]) -> Scenario:
    """``sc`` with some settings changed.

    Args:
        sc: the validated scenario.
        name: a new scenario name (its sweeps are then stored as ``<name>-<time>``); default: the same.
        **sections: per section, the keys to set, e.g. ``hardware={"memory_budget_gib": 24}``.

    Returns:
        The new scenario, validated, with ``sc``'s source path (relative data paths still resolve).

    Raises:
        harness.spec.scenario.ScenarioError: the changed scenario is not valid (its line numbers are those of the
            resolved scenario, not of the file: the key path names the setting).
    """
    d = sc.to_dict()
    if name is not None:
        d["name"] = name
    for section, values in sections.items():
        d[section] = {**(d.get(section) or {}), **values}
    out = scenario_from_dict(d, sc.source_path or "<derived>")
    out.source_path = sc.source_path
    return out
