"""The gate's results as JUnit XML (``python -m harness check --junit-xml PATH``), for CI systems.

One ``<testsuite>`` per implementation, one ``<testcase>`` per property (``classname`` the
implementation, ``name`` the property). A failed property is a ``<failure>`` whose message is
the detail's first line and whose text is the whole detail (with the traceback of an error the
implementation raised) and the reproducer; unsupported and not-applicable properties are
``<skipped>`` with the reason; a known failure is ``<skipped>`` too, its message starting with
"known failure", so that it neither fails the build nor passes unnoticed.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from harness.check.reproduce import split_detail
from harness.check.run_property import FAIL, KNOWN_FAILURE, NOT_APPLICABLE, UNSUPPORTED, PropertyResult


def junit_tree(results: list[PropertyResult], suite: str) -> ET.ElementTree:
    root = ET.Element("testsuites", name=suite)
    by_implementation: dict[str, list[PropertyResult]] = {}
    for result in results:
        by_implementation.setdefault(result.implementation, []).append(result)
    for implementation, group in by_implementation.items():
        element = ET.SubElement(
            root, "testsuite", name=implementation, tests=str(len(group)),
            failures=str(sum(r.status == FAIL for r in group)),
            skipped=str(sum(r.status in (UNSUPPORTED, NOT_APPLICABLE, KNOWN_FAILURE) for r in group)),
            errors="0", time=f"{sum(r.seconds for r in group):.3f}",
        )
        for result in group:
            case = ET.SubElement(element, "testcase", classname=implementation, name=result.property,
                                 time=f"{result.seconds:.3f}")
            if result.status == FAIL:
                summary, _ = split_detail(result.detail)
                failure = ET.SubElement(case, "failure", message=summary[:1000], type="CheckFailure")
                failure.text = f"{result.detail}\nreproduce: {result.reproducer}" if result.reproducer else result.detail
            elif result.status == KNOWN_FAILURE:
                ET.SubElement(case, "skipped", message=f"known failure: {result.detail}"[:1000])
            elif result.status in (UNSUPPORTED, NOT_APPLICABLE):
                ET.SubElement(case, "skipped", message=f"{result.status}: {result.detail}"[:1000])
            out = f"{result.examples} cases checked, {result.refused} refused at run time"
            ET.SubElement(case, "system-out").text = out
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(path: Path, results: list[PropertyResult], suite: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_tree(results, suite).write(path, encoding="utf-8", xml_declaration=True)
