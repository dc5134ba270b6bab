"""The Python blocks of the README's "Library use" section run as printed."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Library use", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_library_use_blocks_run(tmp_path: Path) -> None:
    blocks = _library_blocks()
    assert len(blocks) == 2
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example saves model.pt
    try:
        for code in blocks:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(README), "exec"), {"__name__": "readme"})
            assert out.getvalue().strip()
    finally:
        os.chdir(cwd)
    assert (tmp_path / "model.pt").exists()
