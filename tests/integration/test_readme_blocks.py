"""Every Python block in the README runs as printed.

A block is an excerpt of a `docs/examples/` module, word for word (those modules have their
own tests), unless the line before it says how it runs here instead: `<!-- runs on its own -->`,
or `<!-- runs after docs/examples/NAME.py -->`, in a fresh copy of that module's namespace (the
`jobs` and `app` the surrounding text talks about).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from offload import Offload

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
BLOCK = re.compile(
    r"(?:<!-- runs (?:on its own|after (?P<after>\S+)) -->\n(?P<runs>))?"
    r"```python\n(?P<code>.*?)```",
    re.S,
)


def readme_blocks() -> list[tuple[int, str | None, str]]:
    """(line, how it runs, code): how is None for an excerpt, "" on its own, else a path."""
    readme = (ROOT / "README.md").read_text()
    return [
        (
            readme.count("\n", 0, m.start("code")) + 1,
            None if m["runs"] is None else (m["after"] or ""),
            m["code"],
        )
        for m in BLOCK.finditer(readme)
    ]


BLOCKS = readme_blocks()


def test_the_readme_has_python_blocks_and_each_kind_is_covered() -> None:
    assert len(BLOCKS) >= 9
    assert {after is None for _, after, _ in BLOCKS} == {True, False}


@pytest.mark.parametrize(("line", "after", "code"), BLOCKS, ids=[f"line {b[0]}" for b in BLOCKS])
def test_a_readme_block_runs_as_printed(
    line: int, after: str | None, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # an app's default data directory is ./offload-data
    monkeypatch.setenv("DASHBOARD_PASSWORD", "from-the-test")
    if after is None:
        excerpt_of = [p.name for p in EXAMPLES.glob("*.py") if code.strip() in p.read_text()]
        assert excerpt_of, (
            f"README line {line}: not word for word in any docs/examples module; copy it from "
            "the module it shows, or mark how it runs (<!-- runs on its own --> or "
            "<!-- runs after docs/examples/NAME.py -->)"
        )
        return  # the module's own tests run it
    namespace: dict[str, object]
    if after == "":
        namespace = {"__name__": f"readme_line_{line}"}
    else:
        assert (ROOT / after).is_file(), f"README line {line} runs after a missing {after}"
        namespace = runpy.run_path(str(ROOT / after), run_name=f"readme_line_{line}")
    try:
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
    finally:
        for value in namespace.values():
            if isinstance(value, Offload):
                value.close()
