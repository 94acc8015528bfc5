"""Where the test suite's time goes, from pytest's JUnit XML: the slowest files and tests.

    .venv/bin/python -m pytest -n 2 --dist worksteal tests --junitxml=/tmp/suite.xml \
        -o junit_duration_report=total
    python bench/suite_durations.py /tmp/suite.xml --top 15 [--before /tmp/old.xml]

A file's time is the sum of its tests' times (setup, call and teardown: `junit_duration_report=total`),
i.e. worker-seconds; with 2 workers the wall time is about half the total. `--before` adds the same
file's time in an earlier run as a column.
"""

from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def file_times(path: str) -> tuple[dict[str, float], dict[str, int], list[tuple[float, str]]]:
    """({file: seconds}, {file: number of tests}, [(seconds, test id)]) of one JUnit XML report."""
    seconds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        # classname is the dotted module path (tests.train.test_trainer), plus a class if any
        parts = case.get("classname", "").split(".")
        while parts and not parts[-1].startswith("test_"):
            parts.pop()
        file = "/".join(parts) + ".py"
        t = float(case.get("time", 0.0))
        seconds[file] += t
        counts[file] += 1
        tests.append((t, f"{file}::{case.get('name')}"))
    return dict(seconds), dict(counts), sorted(tests, reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("junit_xml")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--before", help="an earlier run's JUnit XML, for a before / after column")
    args = p.parse_args()
    seconds, counts, tests = file_times(args.junit_xml)
    before = file_times(args.before)[0] if args.before else None
    total = sum(seconds.values())
    print(f"{len(tests)} tests, {total:.0f} worker-seconds in all\n")
    head = "| file | tests | s |" + (" s before |" if before else "")
    print(head)
    print("|---|---:|---:|" + ("---:|" if before else ""))
    for file, t in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        row = f"| {file} | {counts[file]} | {t:.0f} |"
        if before is not None:
            row += f" {before.get(file, 0.0):.0f} |"
        print(row)
    print(f"\nslowest {args.top} tests:")
    for t, name in tests[: args.top]:
        print(f"  {t:7.1f} s  {name}")


if __name__ == "__main__":
    main()
