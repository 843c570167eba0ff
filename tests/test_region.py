"""Region targets: the pure form check, where a module target resolves from, and the one
line that names a broken target. (Imports that hang or crash are tested through the CLI,
in tests/test_bad_input.py, because they must never run in the test process either.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hardening.harness.region import describe_import_error, load_factory, parse_target


@pytest.mark.parametrize("target", ["mod", "mod:", ":build", "a b:build", "mod:not-ident", "x.py:build"])
def test_malformed_targets_are_refused_without_importing_anything(target: str) -> None:
    with pytest.raises(ValueError, match="region target"):
        parse_target(target)


def test_a_module_target_resolves_from_the_cwd_but_nothing_else_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cwd_region_for_test.py").write_text("import cwd_helper_for_test\ndef build(ctx): return ctx\n")
    (tmp_path / "cwd_helper_for_test.py").write_text("")
    monkeypatch.chdir(tmp_path)
    assert str(tmp_path) not in sys.path and "" not in sys.path
    try:
        with pytest.raises(ModuleNotFoundError, match="cwd_helper_for_test") as info:
            load_factory("cwd_region_for_test:build")
        assert "cwd_helper_for_test is in the current directory, which is not on sys.path" in describe_import_error(info.value)
        (tmp_path / "cwd_region_for_test.py").write_text("def build(ctx): return ctx\n")
        assert load_factory("cwd_region_for_test:build")(7) == 7
    finally:
        sys.modules.pop("cwd_region_for_test", None)


def test_a_missing_module_names_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        load_factory("surely_no_such_module:build")
    assert describe_import_error(info.value) == (
        f"cannot import surely_no_such_module: No module named 'surely_no_such_module' (looked in {tmp_path} and sys.path)"
    )


def test_an_error_at_import_names_the_user_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("x = 1\ny = x / 0\n")
    with pytest.raises(ZeroDivisionError) as info:
        load_factory(f"{tmp_path / 'broken.py'}:build")
    assert describe_import_error(info.value) == f"importing it raised ZeroDivisionError: division by zero ({tmp_path / 'broken.py'}:2)"


def test_a_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "syn.py").write_text("def build(ctx)\n    pass\n")
    with pytest.raises(SyntaxError) as info:
        load_factory(f"{tmp_path / 'syn.py'}:build")
    assert describe_import_error(info.value).startswith("SyntaxError: ") and f"{tmp_path / 'syn.py'}:1" in describe_import_error(info.value)
