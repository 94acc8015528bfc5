"""The `path:line` pointers in docs/ppo.md (PPO implementation details) point at their anchors."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers.scripts import ROOT, load_script

pointers = load_script("docs/pointers.py")


def test_ppo_doc_pointers_are_current():
    with open(os.path.join(ROOT, "docs", "ppo.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(pointers.POINTER.findall(text)) >= 40  # the regex still sees the pointers
    _, problems = pointers.update(text)
    assert not problems, "stale pointers; run `python docs/pointers.py docs/ppo.md`:\n" + "\n".join(problems)


def test_pointer_tool_rewrites_and_reports(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("a = 1\n\nb = 2\nc = 3\n")
    doc = tmp_path / "doc.md"
    rel = os.path.relpath(src, ROOT)
    doc.write_text(f"see `{rel}:1-2` <!-- b = 2 --> and `{rel}:9` <!-- nowhere -->\n")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "docs", "pointers.py"), "--check", str(doc)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and "is now" in out.stdout and "0 lines" in out.stdout
    new, problems = pointers.update(doc.read_text())
    assert f"`{rel}:3-4` <!-- b = 2 -->" in new and f"`{rel}:9` <!-- nowhere -->" in new
    assert len(problems) == 2
