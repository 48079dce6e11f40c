"""`make test`'s scheduling: the server group names real tests, and xdist runs it as one unit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import SERVER_GROUP, pytest_xdist_make_scheduler

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("prefix", SERVER_GROUP)
def test_every_server_group_entry_names_a_test_that_exists(prefix: str) -> None:
    path, _, name = prefix.partition("::")
    tree = ast.parse((REPO / path).read_text())
    tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
             and node.name.startswith("test_")}
    assert tests, f"{path}: no test functions (renamed or moved? update SERVER_GROUP)"
    if name:
        assert name in tests, f"{path} has no {name}: update SERVER_GROUP"


def test_the_server_group_is_one_scheduling_unit_and_the_rest_are_single_tests() -> None:
    class Config:
        def __init__(self, dist: str) -> None:
            self.dist = dist

        def getvalue(self, name: str) -> object:
            return {"dist": self.dist, "tx": ["2*popen"]}.get(name)

    assert pytest_xdist_make_scheduler(Config("loadfile"), None) is None  # xdist's own
    scheduler = pytest_xdist_make_scheduler(Config("load"), None)
    assert scheduler._split_scope("test/test_e2e_lynx.py::test_x[mixtral-mini]") == "servers"
    assert scheduler._split_scope(
        "test/test_eval_gate.py::test_the_gate_passes_the_default_with_real_pruning") == "servers"
    other = "test/test_eval_gate.py::test_the_paired_delta_and_its_standard_error"
    assert scheduler._split_scope(other) == other
