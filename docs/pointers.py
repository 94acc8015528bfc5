"""Keep the `path:line` pointers of a Markdown document pointing at the right lines.

A pointer is written `` `path:N` `` or `` `path:N-M` `` followed by an anchor comment,
`` `jaxrlhf/train/ppo.py:186` <!-- has_eos = jnp.any( --> ``: the anchor is text that occurs on exactly one
line of `path`, line N. When code moves, rerun

    python docs/pointers.py docs/ppo.md           # rewrite N (and M, keeping the range length)
    python docs/pointers.py --check docs/ppo.md   # exit 1 listing stale or broken pointers

tests/test_doc_pointers.py runs the check, so stale pointers fail the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTER = re.compile(r"`(?P<path>[\w./-]+\.\w+):(?P<start>\d+)(?:-(?P<end>\d+))?` <!-- (?P<anchor>.+?) -->")


def _anchor_line(path: str, anchor: str) -> int:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        hits = [i + 1 for i, line in enumerate(f) if anchor in line]
    if len(hits) != 1:
        raise LookupError(f"{path}: anchor {anchor!r} is on {len(hits)} lines {hits[:5]}, needs exactly 1")
    return hits[0]


def update(text: str) -> tuple[str, list[str]]:
    """The text with every pointer's line numbers recomputed, and one message per changed or broken one."""
    problems: list[str] = []

    def fix(m: re.Match[str]) -> str:
        path, anchor = m.group("path"), m.group("anchor")
        start = int(m.group("start"))
        try:
            line = _anchor_line(path, anchor)
        except (LookupError, OSError) as err:
            problems.append(str(err))
            return m.group(0)
        span = f"{line}"
        if m.group("end"):
            span += f"-{line + int(m.group('end')) - start}"
        if line != start:
            problems.append(f"{path}:{start} is now {path}:{line} ({anchor!r})")
        return f"`{path}:{span}` <!-- {anchor} -->"

    return POINTER.sub(fix, text), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--check", action="store_true", help="report, do not rewrite")
    args = parser.parse_args(argv)
    status = 0
    for name in args.files:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        new, problems = update(text)
        for p in problems:
            print(f"{name}: {p}")
        broken = [p for p in problems if "anchor" in p and "is now" not in p]
        if args.check and problems or broken:
            status = 1
        if not args.check and new != text:
            with open(name, "w", encoding="utf-8") as f:
                f.write(new)
    return status


if __name__ == "__main__":
    sys.exit(main())
