"""The dataset cache of a sweep's preparation (harness.running.prepare): a probe that differs from an earlier one only
in its name, rows or memory budget reuses its dataset; anything the dataset is made from makes another."""

from __future__ import annotations

import json

import pytest

from harness.inputs import data
from harness.running import prepare
from harness.running.derive import derive
from harness.spec.scenario import parse_scenario

SCENARIO = """\
version: 1
name: pc
model: {{preset: tiny-llama, dtype: float32}}
method: {{kind: lora, lora_r: 4}}
data: {data}
train: {{micro_batch: 1, steps: 2, warmup_steps: 1}}
hardware: {{device: cpu}}
frameworks:
  - {{name: dummy, label: d-sim, overrides: {{sim_gib_per_token: 0.015625}}}}
  - {{name: dummy, label: d-two, overrides: {{sim_gib_per_token: 0.03125}}}}
"""


def _scenario(tmp_path, data_section: str = "{seq_len: 16}"):
    path = tmp_path / "pc.yaml"
    path.write_text(SCENARIO.format(data=data_section))
    return parse_scenario(path.read_text(), str(path))


def _built(monkeypatch) -> list[int]:
    """Counts the datasets built (not copied from the cache)."""
    calls: list[int] = []
    real = data.build_examples

    def counted(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(data, "build_examples", counted)
    return calls


def test_a_probe_differing_in_name_rows_or_budget_reuses_the_dataset_and_gets_the_same_bytes(tmp_path, env,
                                                                                              monkeypatch):
    built = _built(monkeypatch)
    sc = _scenario(tmp_path)
    first = prepare.prepare(sc, tmp_path / "a" / "data")
    other = derive(sc, "pc.d-two.8gib.seq_len16", hardware={"memory_budget_gib": 8}, measure={"repeats": 1})
    other = other.model_copy(update={"frameworks": other.frameworks[1:]})
    second = prepare.prepare(other, tmp_path / "b" / "data")
    assert len(built) == 1
    assert second["dataset_sha256_16"] == first["dataset_sha256_16"]
    assert second["dataset_meta"] == first["dataset_meta"]
    assert (tmp_path / "b" / "data" / "dataset.jsonl").read_bytes() == (tmp_path / "a" / "data" / "dataset.jsonl"
                                                                      ).read_bytes()
    assert not list((env / "cache" / "datasets").glob("*.tmp-*"))


@pytest.mark.parametrize("change", ["seq_len", "steps", "seed"])
def test_what_the_dataset_is_made_from_makes_another(tmp_path, env, monkeypatch, change):
    built = _built(monkeypatch)
    sc = _scenario(tmp_path)
    first = prepare.prepare(sc, tmp_path / "a" / "data")
    changed = {"seq_len": {"data": {"seq_len": 24}}, "steps": {"train": {"steps": 3}},
               "seed": {"data": {"seed": 7}}}[change]
    second = prepare.prepare(derive(sc, **changed), tmp_path / "b" / "data")
    assert len(built) == 2 and second["dataset_sha256_16"] != first["dataset_sha256_16"]


def test_a_jsonl_file_rewritten_or_a_tokenizer_changed_is_built_again(tmp_path, env, monkeypatch):
    built = _built(monkeypatch)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(4)))
    sc = _scenario(tmp_path, f"{{source: jsonl, path: {rows}, seq_len: 128}}")
    prepare.prepare(sc, tmp_path / "a" / "data")
    prepare.prepare(sc, tmp_path / "b" / "data")
    assert len(built) == 1
    rows.write_text(rows.read_text().replace("a3", "a three"))
    third = prepare.prepare(sc, tmp_path / "c" / "data")
    assert len(built) == 2 and "a three" in (tmp_path / "c" / "data" / "dataset.jsonl").read_text()
    ckpt = third["checkpoint"]
    key = prepare.dataset_key(sc, ckpt)
    with open(f"{ckpt}/tokenizer_config.json", "a") as f:
        f.write(" ")
    assert prepare.dataset_key(sc, ckpt) != key
    assert prepare.dataset_key(sc, "some-org/some-hub-model") is None  # not ours to fingerprint: never cached


def test_a_damaged_cache_entry_is_not_used(tmp_path, env, monkeypatch):
    built = _built(monkeypatch)
    sc = _scenario(tmp_path)
    prepare.prepare(sc, tmp_path / "a" / "data")
    (entry,) = (env / "cache" / "datasets").iterdir()
    (entry / "dataset.jsonl").unlink()  # half of an entry: built again, not copied
    got = prepare.prepare(sc, tmp_path / "b" / "data")
    assert len(built) == 2 and (tmp_path / "b" / "data" / "dataset.jsonl").stat().st_size > 0
    assert got["dataset_meta"]
