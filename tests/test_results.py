"""SearchResult / ParetoResult: the status enum, JSON (string status), the table, sequence access."""

from __future__ import annotations

import dataclasses
import json

import pytest
from _search_cases import monotone_indicators, small_analysis

import fxmpq
from fxmpq import Budget, SearchStatus


@pytest.fixture(scope="module")
def case():
    a = small_analysis(False)
    names = [m.name for m in a.searchable]
    ind = monotone_indicators(names, (2, 4, 8), lambda: [0.9, 0.4, 0.1])
    return a, ind, fxmpq.search(a, ind, Budget.uniform(4, 4))


def test_status_is_an_enum_equal_to_its_string(case) -> None:
    _, _, res = case
    assert res.status is SearchStatus.OPTIMAL and res.optimal
    assert res.status == "optimal" and f"{res.status}" == "optimal"
    feasible = dataclasses.replace(res, status="feasible")  # a string is coerced to the enum
    assert feasible.status is SearchStatus.FEASIBLE and not feasible.optimal
    with pytest.raises(ValueError):
        dataclasses.replace(res, status="solved")


def test_json_writes_the_status_string(case, tmp_path) -> None:
    _, _, res = case
    data = json.loads(res.to_json(tmp_path / "search.json"))
    assert data["status"] == "optimal" and type(data["status"]) is str
    assert json.loads((tmp_path / "search.json").read_text()) == data
    assert fxmpq.Policy.from_json(json.dumps(data["policy"])) == res.policy
    assert data["limits"] == res.limits and data["n_vars"] == res.n_vars


def test_from_dict_reads_back_what_to_dict_wrote(case) -> None:
    a, ind, res = case
    back = fxmpq.SearchResult.from_dict(json.loads(res.to_json()))
    assert back == dataclasses.replace(res, layer_values={})  # per-layer objective values are not stored
    assert back.status is SearchStatus.OPTIMAL
    assert back.table(a, ind).splitlines()[-1] == res.table(a, ind).splitlines()[-1]
    with pytest.raises(KeyError):
        fxmpq.SearchResult.from_dict({"objective": 1.0})


def test_table_rows_and_footer(case) -> None:
    a, ind, res = case
    lines = res.table(a, ind).splitlines()
    assert lines[0].split() == ["layer", "W/A", "I_w", "I_a", "objective", "bitops", "%"]
    assert set(lines[1]) == {"-"}
    body = {ln.split()[0]: ln.split() for ln in lines[2:2 + len(a.layers) + 1]}
    assert set(body) == {*a.names, "total"}
    assert body["stem"][1].endswith("*") and not body["conv1"][1].endswith("*")  # pinned marked
    assert float(body["total"][1]) == pytest.approx(res.objective, rel=1e-5)  # empty cells fall out of split()
    assert f"bitops: {res.totals['bitops']:.6g} <= {res.limits['bitops']:.6g}" in lines
    assert lines[-1].startswith("status optimal, gap 0")


def test_pareto_result_is_a_sequence(case) -> None:
    a, ind, _ = case
    par = fxmpq.pareto(a, ind, metric="size", points=3)
    assert len(par) == 3 and list(par) == list(par.results) and par[0] is par.results[0]
    assert all(r.status is SearchStatus.OPTIMAL for r in par)
