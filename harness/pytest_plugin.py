"""The gate as test items of a kernel author's own pytest suite (the ``pytest11`` entry point ``lmhead``).

A test that takes the ``lmhead_gate`` fixture becomes one test item per (implementation, property)::

    # tests/test_lmhead_gate.py
    def test_lmhead_gate(lmhead_gate):
        lmhead_gate.check()

    $ pytest --lmhead-impl my_kernels.lce:linear_ce
    tests/test_lmhead_gate.py::test_lmhead_gate[my_kernels.lce:linear_ce-equivalence/float32] PASSED
    ...

The implementations come from ``--lmhead-impl NAME`` (repeatable: a built-in's name or
``package.module:attr``) and from the test's marker, ``@pytest.mark.lmhead_gate("pkg.mod:fn",
properties=[...], dtypes=[...], profile="ci", max_examples=None)``, whose keywords override the
command line's for that test. So ``-k``, ``-x``, ``--lf``, ``--junit-xml`` and xdist see the gate's
items as any others. A failure's message starts with the reproducer, a command that reruns the
failing case as printed in a new shell, followed by the reason and the traceback of an error the
implementation raised. An unsupported or not-applicable property is skipped with its reason. A
known failure of a built-in (declared beside its adapter, ``harness.known``) is an xfail: ``strict`` on the
property its example names (a pass there means it may be fixed), with its reason.

The gate runs as ``python -m harness check`` runs it (``harness.check.engine``): in child
processes, each property with a time limit and each process with a memory limit, so a crash or a
hang fails its item and the session goes on. One child per implementation runs the properties
this session will run, in their order, each item waiting for its own result; under xdist each
item has a child of its own, since its worker does not know which items it will get.
``--lmhead-in-process`` runs them in the pytest process instead (no isolation, no limits), for a
debugger. Profile ``ci`` by default (a fixed set of cases: the same on every run).

The plugin imports no more than ``harness`` until a test asks for the gate; ``-p no:lmhead`` turns
it off.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from harness.errors import HarnessError

PROFILE_NAMES = ("ci", "dev", "thorough")  # harness.check.profiles.PROFILES, without importing Hypothesis
FIXTURE = "lmhead_gate"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lmhead", "lmhead-bench correctness gate (tests that take the lmhead_gate fixture)")
    group.addoption("--lmhead-impl", action="append", default=[], metavar="NAME",
                    help="gate this implementation: a built-in's name or package.module:attr (repeatable)")
    group.addoption("--lmhead-property", action="append", default=[], metavar="ID",
                    help="gate only these properties (repeatable; default: all), e.g. equivalence/float32")
    group.addoption("--lmhead-dtype", action="append", default=[], metavar="NAME",
                    help="gate only these dtypes (repeatable): float32, bfloat16, float16")
    group.addoption("--lmhead-profile", default="ci", choices=PROFILE_NAMES,
                    help="cases drawn besides the explicit examples: ci (the same on every run; default), dev, thorough")
    group.addoption("--lmhead-max-examples", type=int, metavar="N",
                    help="exactly N drawn cases per property instead of the profile's budget (0: explicit examples only)")
    group.addoption("--lmhead-in-process", action="store_true",
                    help="run the gate in the pytest process: no crash isolation, no time or memory limit (debugging)")
    group.addoption("--lmhead-timeout", type=float, metavar="SECONDS",
                    help="time limit of each property (default: from the profile)")
    group.addoption("--lmhead-max-memory", type=float, metavar="GIB",
                    help="memory limit of each child process (default: 90%% of the memory available; 0: none)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{FIXTURE}(*implementations, properties=None, dtypes=None, profile=None, max_examples=None): the "
        "implementations (and options) the lmhead_gate fixture gates in this test, besides --lmhead-impl",
    )
    config.stash[_RUNNER] = GateRunner(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    runner = config.stash.get(_RUNNER, None)
    if runner is not None:
        runner.stop()


# --- collection: one item per (implementation, property) ----------------------------------------------


@dataclass(frozen=True)
class GateItem:
    """What one item gates: an implementation's property, under settings shared by its batch."""

    implementation: str  # the name the reproducer repeats
    property: str
    settings: object  # harness.check.engine.GateSettings
    known_failure: str = ""  # the reason of the known failures whose example is this property ("": none)
    target: object = field(default=None, compare=False)  # harness.check.run_property.Target


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if FIXTURE not in metafunc.fixturenames:
        return
    try:
        params = _gate_params(metafunc)
    except HarnessError as exc:  # a bad name or option: one line, not a traceback
        pytest.fail(f"lmhead_gate: {exc}", pytrace=False)
    if not params:
        reason = "no implementation to gate: pass --lmhead-impl NAME or mark the test @pytest.mark.lmhead_gate(NAME)"
        params = [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-implementation")]
    metafunc.parametrize(FIXTURE, params, indirect=True)


def _gate_params(metafunc: pytest.Metafunc) -> list:
    from harness.api import gate_target
    from harness.check.engine import GateSettings, check_dtypes, child_limits, selected_properties
    from harness.environment import local_device

    config = metafunc.config
    marker = metafunc.definition.get_closest_marker(FIXTURE)
    marked = dict(marker.kwargs) if marker else {}
    unknown = set(marked) - {"properties", "dtypes", "profile", "max_examples"}
    if unknown:
        raise HarnessError(f"@pytest.mark.{FIXTURE} takes no keyword {sorted(unknown)[0]!r}")
    implementations = [*(marker.args if marker else ()), *config.getoption("lmhead_impl")]
    in_process = config.getoption("lmhead_in_process")
    profile = marked.get("profile") or config.getoption("lmhead_profile")
    max_examples = marked.get("max_examples", config.getoption("lmhead_max_examples"))
    dtypes = check_dtypes(marked.get("dtypes") or config.getoption("lmhead_dtype") or None)
    properties = selected_properties(marked.get("properties") or config.getoption("lmhead_property") or None, dtypes)
    settings = GateSettings(
        profile=profile, max_examples=max_examples, device=local_device(), dtypes=dtypes, in_process=in_process,
        limits=child_limits(profile, max_examples, timeout_s=config.getoption("lmhead_timeout"),
                            max_memory_gib=config.getoption("lmhead_max_memory")),
    )
    params = []
    for implementation in dict.fromkeys(implementations):
        target = gate_target(implementation, isolated=not in_process)
        expected = _known_failures_by_property(target, settings.device)
        for prop in properties:
            item = GateItem(target.given, prop.id, settings, expected.get(prop.id, ""), target)
            marks = []
            if item.known_failure:
                marks.append(pytest.mark.xfail(strict=True, raises=KnownFailureSeen, reason=item.known_failure))
            params.append(pytest.param(item, id=f"{target.given}-{prop.id}", marks=marks))
    return params


def _known_failures_by_property(target, device: str) -> dict[str, str]:
    """property id -> the reasons of the known failures of a built-in whose example is that property
    (a plugin has none: ``harness.check.run_property.known_issues``)."""
    from harness.check.run_property import known_issues
    from harness.known import KnownLimitation

    reasons: dict[str, list[str]] = {}
    for known in known_issues(target, device):
        if not isinstance(known, KnownLimitation):
            reasons.setdefault(known.example.split(":")[0], []).append(known.reason)
    return {prop: "known failure: " + "; ".join(dict.fromkeys(r)) for prop, r in reasons.items()}


# --- running ------------------------------------------------------------------------------------------


class KnownFailureSeen(Exception):
    """A built-in's known failure showed, as expected (the item's ``xfail`` expects exactly this)."""


class Gate:
    """The ``lmhead_gate`` fixture: ``check()`` gates one property of one implementation."""

    def __init__(self, item: GateItem, runner: GateRunner, node: pytest.Item) -> None:
        self.item, self._runner, self._node = item, runner, node
        self.report = None  # the harness.PropertyReport, once checked

    @property
    def implementation(self) -> str:
        return self.item.implementation

    @property
    def property(self) -> str:
        return self.item.property

    def check(self):
        """Run the property (or take its result from the implementation's child process) and turn it
        into the item's outcome: pass, fail (the reproducer first), skip, or xfail. Returns the
        ``harness.PropertyReport`` of a pass."""
        from harness.api import property_report

        self.report = property_report(self._runner.result(self._node, self.item))
        status, detail = self.report.status, self.report.detail
        if status == "pass":
            return self.report
        if status == "known-failure":
            if self.item.known_failure:
                raise KnownFailureSeen(detail)
            pytest.xfail(f"known failure: {detail}")
        if status in ("unsupported", "n/a"):
            pytest.skip(f"{status}: {detail}")
        pytest.fail(failure_message(self.report), pytrace=False)


def failure_message(report) -> str:
    """The reproducer on the first line (it runs as printed), then the reason and any traceback."""
    lines = [report.reproducer] if report.reproducer else []
    lines.append(f"{report.implementation} {report.property}: {report.detail}")
    if report.traceback:
        lines += ["", report.traceback]
    return "\n".join(lines)


@pytest.fixture
def lmhead_gate(request: pytest.FixtureRequest) -> Gate:
    """One (implementation, property) of the gate; ``lmhead_gate.check()`` runs it (see the module docstring)."""
    return Gate(request.param, request.config.stash[_RUNNER], request.node)


class GateRunner:
    """Runs the gate for the items of this session: one batch (child process stream) per implementation."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._batches: dict[tuple[str, object], _Batch] = {}
        self._cancel = threading.Event()

    def result(self, node: pytest.Item, item: GateItem):
        """The ``PropertyResult`` of ``item``: run now (in process), or from its implementation's batch."""
        from harness.check.engine import check_target

        if item.settings.in_process:
            return _property_result(check_target(item.target, [item.property], item.settings))
        key = (item.implementation, item.settings)
        batch = self._batches.get(key)
        if batch is None or not batch.will_run(item.property):
            batch = _Batch(item.target, self._planned(node, item), item.settings, self._cancel)
            self._batches[key] = batch
        return batch.wait(item.property)

    def _planned(self, node: pytest.Item, item: GateItem) -> list[str]:
        """The properties of ``item``'s batch: its own, then those of the session's later items of the
        same implementation and settings (only its own under xdist, whose worker does not know them)."""
        if hasattr(self._config, "workerinput"):
            return [item.property]
        items = node.session.items
        later = items[items.index(node):] if node in items else [node]
        planned = []
        for other in later:
            param = getattr(getattr(other, "callspec", None), "params", {}).get(FIXTURE)
            if isinstance(param, GateItem) and (param.implementation, param.settings) == (item.implementation, item.settings):
                planned.append(param.property)
        return list(dict.fromkeys(planned))

    def stop(self) -> None:
        """Kill the children still running (``-x``, Ctrl-C, the end of the session)."""
        self._cancel.set()
        for batch in self._batches.values():
            batch.join()


def _property_result(stream):
    from harness.check.run_property import PropertyResult

    return next(item for item in stream if isinstance(item, PropertyResult))


class _Batch:
    """One implementation's properties in child processes, in a thread of their own, so that a
    property runs (and its time and memory limits are watched) while pytest reports the items before it."""

    def __init__(self, target, property_ids: list[str], settings, cancel: threading.Event) -> None:
        self._property_ids = property_ids
        self._results: dict[str, object] = {}
        self._delivered: set[str] = set()
        self._error: BaseException | None = None
        self._done = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(target, settings, cancel), daemon=True,
                                        name=f"lmhead-gate {target.given}")
        self._thread.start()

    def will_run(self, property_id: str) -> bool:
        with self._changed:
            return property_id in self._property_ids and property_id not in self._delivered

    def _run(self, target, settings, cancel) -> None:
        from harness.check.engine import check_target
        from harness.check.run_property import PropertyResult

        try:
            for result in check_target(target, self._property_ids, settings, cancel=cancel):
                if isinstance(result, PropertyResult):
                    with self._changed:
                        self._results[result.property] = result
                        self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - a harness bug: the waiting item raises it
            self._error = exc
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def wait(self, property_id: str):
        with self._changed:
            self._changed.wait_for(lambda: property_id in self._results or self._done)
            if property_id in self._results:
                self._delivered.add(property_id)
                return self._results.pop(property_id)
        if self._error is not None:
            raise self._error
        raise RuntimeError(f"the gate stopped before it checked {property_id}")

    def join(self) -> None:
        self._thread.join(timeout=30)


_RUNNER = pytest.StashKey[GateRunner]()
