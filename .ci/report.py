#!/usr/bin/env python3
"""What .ci/run reads out of cargo-nextest's JUnit report and its own logs.

  report.py counts JUNIT_XML          "PASSED FAILED" on the first line, then one failed test
                                      name per line
  report.py slowest LOG_DIR JUNIT_XML the ten slowest steps: .ci/run's own (LOG_DIR/steps.tsv,
                                      "seconds TAB name"), every test nextest ran, and the
                                      stages the systemd and VM tiers time themselves (lines
                                      "NAME   12.3 s" in LOG_DIR/systemd.log and vm.log)
"""
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def steps(log_dir: Path):
    tsv = log_dir / "steps.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            seconds, _, name = line.partition("\t")
            yield float(seconds), name


def tests(junit: Path):
    if not junit.exists():
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        binary = case.get("classname", "")
        yield float(case.get("time", "0")), f"test {binary} {case.get('name', '')}"


STAGE = re.compile(r"^\s*(?:\d\d:\d\d:\d\d stage )?([a-z][\w :./+-]*?)\s+(\d+(?:\.\d+)?) s$")


def stages(log: Path, prefix: str):
    if not log.exists():
        return
    for line in log.read_text(errors="replace").splitlines():
        match = STAGE.match(line)
        if match:
            yield float(match.group(2)), f"{prefix}: {match.group(1).strip()}"


def counts(junit: Path) -> None:
    passed, failed = 0, []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname', '')} {case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            else:
                passed += 1
    print(passed, len(failed))
    for name in failed:
        print(name)


def slowest(log_dir: Path, junit: Path) -> None:
    rows = list(steps(log_dir)) + list(tests(junit))
    rows += list(stages(log_dir / "systemd.log", "systemd stage"))
    rows += list(stages(log_dir / "vm.log", "vm stage"))
    rows.sort(reverse=True)
    print("the ten slowest steps:")
    for seconds, name in rows[:10]:
        print(f"  {seconds:8.1f} s  {name}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "counts":
        counts(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "slowest":
        slowest(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
