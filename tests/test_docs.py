"""The documentation points at things that exist: files it links to, modules it runs with
`python -m`, and the train.py flags its flag tables list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from utils.args import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench/RESULTS.md"]
FLAG_TABLES = [REPO / "README.md", REPO / "docs/training.md"]
NOT_OURS = {"torch.distributed.run", "pytest", "pip", "venv"}

CODE_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)")
FLAG = re.compile(r"`(--[a-z][a-z0-9_]*)")


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def relative_links(text: str) -> list[str]:
    """Link targets outside code blocks, without their #anchor; web and in-page links left out."""
    targets = LINK.findall(CODE_BLOCK.sub("", text))
    return [t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "#"))]


def module_exists(module: str) -> bool:
    path = REPO / module.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def flag_table_flags(text: str) -> list[str]:
    """The backticked flags in the rows of every table whose first column is `flag`."""
    flags, in_table = [], False
    for line in text.splitlines():
        if line.startswith("| flag |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            flags += FLAG.findall(line)
    return flags


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_at_existing_files(page: Path) -> None:
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page_id(page)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_m_modules_exist(page: Path) -> None:
    modules = set(MODULE.findall(page.read_text())) - NOT_OURS
    missing = sorted(m for m in modules if not module_exists(m))
    assert not missing, f"{page_id(page)} runs modules that do not exist: {missing}"


@pytest.mark.parametrize("page", FLAG_TABLES, ids=page_id)
def test_flag_tables_list_real_train_flags(page: Path) -> None:
    known = {option for action in build_parser()._actions for option in action.option_strings}
    flags = flag_table_flags(page.read_text())
    assert flags, f"{page_id(page)} has no flag table"
    unknown = sorted(set(flags) - known)
    assert not unknown, f"{page_id(page)} lists flags train.py does not have: {unknown}"


def test_the_training_page_lists_every_train_flag() -> None:
    listed = set(flag_table_flags((REPO / "docs/training.md").read_text()))
    flags = {
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    missing = sorted(flags - listed)
    assert not missing, f"docs/training.md's flag table lacks {missing}"


def test_the_loader_table_lists_exactly_build_train_loaders_arguments() -> None:
    import inspect

    from datas.SmolLM.load_data import build_train_loader

    rows, in_table = [], False
    for line in (REPO / "docs/data.md").read_text().splitlines():
        if line.startswith("| argument |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            rows += re.findall(r"`(\w+)`", line.split(" | ")[0])
    assert sorted(rows) == sorted(inspect.signature(build_train_loader).parameters)
