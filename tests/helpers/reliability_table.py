"""The counted tables of docs/reliability.md, written from what the tests observed.

    HOPE_RELIABILITY_TABLE=docs/reliability.md .venv/bin/python -m pytest -q \
        tests/integration/test_bad_inputs.py tests/integration/test_launch_errors.py

rewrites the block between `<!-- NAME:begin -->` and `<!-- NAME:end -->` of that file for every
test module that ran (a count per category, then one row per case with the message it gave).
Without the variable nothing is written. A case counts as clear when its command exited 2 with no
traceback, a message naming the file or key, and nothing a later run would trust left behind.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

ENV = "HOPE_RELIABILITY_TABLE"


class Table:
    def __init__(self, name: str, placeholders: dict[str, str] | None = None):
        self.name, self.rows = name, []
        self.placeholders = placeholders or {}  # text -> shown as (temporary folders)

    def add(self, category: str, case: str, command: str, message: str, clear: bool) -> None:
        text = " / ".join(line.strip() for line in message.splitlines() if line.strip()) or "(no message)"
        for long, shown in sorted(self.placeholders.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(long, shown)
        text = re.sub(r"\s+", " ", text)
        self.rows.append((category, case, command, text[:600] + ("..." if len(text) > 600 else ""), clear))

    def render(self) -> str:
        cases, clear = Counter(r[0] for r in self.rows), Counter(r[0] for r in self.rows if r[4])
        lines = ["| category | cases | clear errors |", "|---|---:|---:|"]
        lines += [f"| {c} | {n} | {clear[c]} |" for c, n in cases.items()]
        lines += [f"| **total** | **{len(self.rows)}** | **{sum(clear.values())}** |", "",
                  "| category | case | command | what the user sees (stderr, lines joined by /) | clear |",
                  "|---|---|---|---|---|"]
        for c, case, cmd, msg, ok in self.rows:
            cell = msg.replace("|", r"\|")  # a | would end the table cell
            lines.append(f"| {c} | {case} | `{cmd}` | {cell} | {'yes' if ok else '**no**'} |")
        return "\n".join(lines)

    def fixture(self, repo: Path):
        """A module-scoped autouse fixture: temporary and repository paths shown as TMP / REPO,
        the table written when the module's tests are done."""
        import pytest

        @pytest.fixture(scope="module", autouse=True)
        def table(tmp_path_factory):
            self.placeholders.update({str(tmp_path_factory.getbasetemp()): "TMP", str(repo): "REPO"})
            yield self
            self.write()
        return table

    def write(self) -> None:
        target = os.environ.get(ENV)
        if not target or not self.rows:
            return
        path = Path(target)
        begin, end = f"<!-- {self.name}:begin -->", f"<!-- {self.name}:end -->"
        text = path.read_text() if path.exists() else ""
        block = f"{begin}\n{self.render()}\n{end}"
        if begin in text and end in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
        path.write_text(text)
