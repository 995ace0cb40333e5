"""A stage's config (wsss.config): kinds and sections left out, a flag added since at its declared
default no change, a changed value still one."""
from __future__ import annotations

from wsss.config import add_section, artifact_config, compare, differences, same_value
from wsss.run import Parser, runtime


def parser() -> Parser:
    p = Parser()
    p.add_argument("--lr", type=float, default=0.01)
    runtime(p.add_argument("--workers", type=int, default=2))
    add_section(p, "a", lambda q: q.add_argument("--a-steps", type=int, default=3))
    add_section(p, "b", lambda q: q.add_argument_group("b").add_argument("--b-weight", default="0.5", type=float))
    return p


def test_a_run_records_the_flags_of_its_sections_and_of_none():
    args = parser().parse_args(["--b-weight", "2"])
    assert args._sections == {"a_steps": "a", "b_weight": "b"}
    assert artifact_config(args) == {"a_steps": 3, "b_weight": 2.0, "lr": 0.01}
    assert artifact_config(args, sections=["a"]) == {"a_steps": 3, "lr": 0.01}


def test_another_sections_flag_and_a_runtime_flag_in_an_old_record_are_no_change():
    args = parser().parse_args(["--b-weight", "2"])
    old = {"a_steps": 3, "b_weight": 9.0, "lr": 0.01, "workers": 8}  # an older version recorded every flag
    assert compare(args, old, sections=["a"]) == ({"a_steps": 3, "lr": 0.01}, [])
    assert compare(args, old)[1] == ["  --b-weight: 9.0 -> 2.0"]


def test_a_flag_added_since_is_no_change_at_its_declared_default_and_one_otherwise():
    old = {"lr": 0.01}  # made before --a-steps existed
    assert compare(parser().parse_args([]), old, sections=["a"])[1] == []
    assert compare(parser().parse_args(["--a-steps", "4"]), old, sections=["a"])[1] == ["  --a-steps: (unset) -> 4"]
    # a declared default given as text compares as argparse converts it
    assert compare(parser().parse_args([]), old, sections=["b"])[1] == []


def test_the_declared_default_is_the_definitions_not_a_presets():
    p = parser()
    assert p.parse_args([])._defaults["a_steps"] == 3
    p.set_defaults(a_steps=7)  # what a preset does
    args = p.parse_args([])
    assert args.a_steps == 7 and args._defaults["a_steps"] == 3
    assert compare(args, {"lr": 0.01}, sections=["a"])[1] == ["  --a-steps: (unset) -> 7"]


def test_a_recorded_value_that_changed_or_went_is_a_difference(tmp_path):
    assert differences({"lr": 0.01}, {"lr": 0.02}, {"lr": 0.02}) == ["  --lr: 0.01 -> 0.02"]
    assert differences({"gone": 1}, {}) == ["  --gone: 1 -> (unset)"]
    (tmp_path / "data").mkdir()
    assert same_value(str(tmp_path / "data") + "/", str(tmp_path / "data"))
