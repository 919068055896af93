"""The structural rules of issue 16, on the source: no import cycle among PocketFlow's modules
(function-local imports included), no module over 400 lines, no function over 60."""
import importlib.util

from conftest import ROOT

spec = importlib.util.spec_from_file_location("check_structure", ROOT / "scripts" / "check_structure.py")
cs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cs)


def test_the_cycle_finder_finds_a_cycle_and_a_clean_graph_passes():
    assert cs.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cs.cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_sees_function_local_and_from_imports():
    g = cs.import_graph(cs.modules())
    assert "pocketflow.schema" in g["pocketflow.config"]
    assert "pocketflow.learners.base" in g["pocketflow.learners"]


def test_no_import_cycle_among_pocketflow_modules():
    found = cs.cycles(cs.import_graph(cs.modules()))
    assert not found, found


def test_no_module_or_function_too_big_to_know():
    mod_rows, fn_rows = cs.sizes(cs.modules())
    assert not [r for r in mod_rows if r[0] > cs.MAX_MODULE], mod_rows[:5]
    assert not [r for r in fn_rows if r[0] > cs.MAX_FUNCTION], fn_rows[:5]
