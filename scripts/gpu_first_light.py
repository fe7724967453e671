"""GPU first light: the harness's first run on a lent GPU, in one command that ends within 8 minutes.

    python3 scripts/gpu_first_light.py OUTDIR [--smoke] [--copy-to DIR] [--stage-timeout STAGE=SECONDS ...]

(``scripts/gpu_first_light.sh`` runs this with ``${PYTHON:-python3}``.) Stages, one after another,
each with a time budget of its own, each one's files kept whatever a later one does:

1. ``wheels``: installs the wheels carried in ``.whl/`` (liger-kernel, cut-cross-entropy, the
   project's own) with ``pip install --no-index --no-deps --target SITE``; the later stages get
   SITE on their PYTHONPATH. Missing wheels are reported, not fatal.
2. ``environment``: nvidia-smi (where there is one), the harness's description of the machine
   (``env/facts.json``: versions, device, GPU) and ``python -m harness list`` (``env/list.txt``).
3. ``sweep``: ``python -m harness sweep`` over the CCE paper's Table 1 head and Llama-3 8B's
   (``cases/gpu_smoke.toml``), every implementation the case file names.
4. ``gate``: ``python -m harness check``, ci profile, explicit examples only, over the CUDA paths
   (chunked, cce, cce-exact, liger, torch-eager, torch-compile), with JUnit XML.

The sweep runs before the gate: its rows are the run's headline, and a cut-off call then loses the
gate, whose explicit examples can be rerun cheaply. Each stage's commands run in a process group
of their own; at the stage's budget less a grace period the group gets SIGINT (the harness then
stops its children and keeps what they measured), at the budget SIGKILL, as ``timeout -s INT -k``
would. After every stage OUTDIR is packed into ``OUTDIR/first_light.tar.gz`` (and, with
``--copy-to DIR``, the tarball and the log are copied there), so a run cut off later still leaves
everything finished before it. The sweep's and the gate's run folders land in ``OUTDIR/results/``,
the layout of the project's ``results/``.

``--smoke`` runs the same stages on a CPU machine with tiny cases (``cases/first_light_smoke.toml``)
and a tiny gate, so that this script is tested before any GPU time is spent. Only the standard
library is imported here: the stages run the harness in processes of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("wheels", "environment", "sweep", "gate")
LOG_NAME = "first_light.log"
TARBALL_NAME = "first_light.tar.gz"
STAGES_NAME = "stages.json"
# The wheels the GPU machine lacks, by the distribution name in a wheel's file name.
EXPECTED_WHEELS = ("liger_kernel", "cut_cross_entropy", "lmhead_bench")
# Seconds between SIGINT and SIGKILL: the harness stops its children and writes what it has.
GRACE_S = 10.0
# Exit statuses that mean a command ran to its end: the gate's 1 is its verdict (a property failed).
FINISHED_STATUSES = {"gate": (0, 1)}

# What the environment stage prints: the harness's own description of the host and the device (as
# a run's meta.json records them), plus the packages the stages need, and where the peers import from.
FACTS_SCRIPT = """
import importlib.metadata, importlib.util, json, os, sys
from harness.environment import device_environment, host_environment, local_device
facts = {**host_environment(["first-light"]), **device_environment(local_device())}
for name in ("hypothesis", "pyarrow", "rich", "seaborn", "matplotlib", "transformers", "lmhead-bench"):
    try:
        facts["packages"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        facts["packages"][name] = None
facts["imported_from"] = {name: getattr(importlib.util.find_spec(name), "origin", None)
                          for name in ("harness", "liger_kernel", "cut_cross_entropy", "triton")}
facts["python_executable"] = sys.executable
facts["pythonpath"] = os.environ.get("PYTHONPATH", "")
paths = [p for p in facts["pythonpath"].split(os.pathsep) if p]
facts["pythonpath_distributions"] = sorted(f"{d.metadata['Name']} {d.version}"
                                           for d in importlib.metadata.distributions(path=paths)) if paths else []
with open(sys.argv[1], "w") as handle:
    json.dump(facts, handle, indent=2, sort_keys=True, default=str)
print(json.dumps(facts, indent=2, sort_keys=True, default=str))
"""


@dataclass(frozen=True)
class Plan:
    """What the stages run, and each stage's budget in seconds."""

    name: str
    sweep_cases: tuple[str, ...]
    sweep_options: tuple[str, ...]
    gate_implementations: tuple[str, ...]
    gate_options: tuple[str, ...]
    budgets: dict[str, float]
    needs_gpu: bool


GPU_PLAN = Plan(
    name="gpu",
    sweep_cases=("gpu_smoke:cce-table1,llama3-8b-n8192",),
    # 14 jobs, 12 processes with cold compile caches (torch 2.11 has no torch-linear-ce: recorded
    # unsupported without one); torch-compile's, the slowest, compiles in
    # well under 90 s. The gpu preset's timing: 0.1 s of repetitions, at least 5.
    sweep_options=("--device", "cuda", "--timeout", "90", "--measure-time", "0.1", "--min-repeats", "5"),
    # All six at once (their cases are small; compiling, most of the gate's time, shares 16 cores),
    # so that a slow one (torch-compile compiles once per option set) cannot keep the others out.
    gate_implementations=("chunked", "cce", "cce-exact", "liger", "torch-eager", "torch-compile"),
    gate_options=("--profile", "ci", "--max-examples", "0", "--no-behaviour", "--jobs", "6", "--timeout", "90"),
    # 470 s in all, each stage's packing (a second or two) besides: within 8 minutes.
    budgets={"wheels": 20, "environment": 60, "sweep": 270, "gate": 120},
    needs_gpu=True,
)

SMOKE_PLAN = Plan(
    name="smoke",
    sweep_cases=("first_light_smoke",),
    sweep_options=("--timeout", "120", "--measure-time", "0.05", "--min-repeats", "3"),
    # What runs here in seconds, and cce-exact, which is unavailable without a GPU and must say so.
    gate_implementations=("chunked", "torch-eager", "cce-exact"),
    gate_options=("--profile", "ci", "--max-examples", "0", "--no-behaviour", "--jobs", "2", "--timeout", "120",
                  "--property", "equivalence/bfloat16", "--property", "autograd/grad-subsets"),
    # Generous: the CPU machine is shared.
    budgets={"wheels": 60, "environment": 120, "sweep": 480, "gate": 300},
    needs_gpu=False,
)


@dataclass(frozen=True)
class Command:
    """One command of a stage: ``argv`` run from the repository root; its output also into ``output``."""

    label: str
    argv: tuple[str, ...]
    output: Path | None = None
    shown: str = ""  # what the log shows instead of argv (a script passed with -c)


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # ok | failures (the gate's verdict) | error | timeout | skipped
    seconds: float
    budget_s: float
    detail: str = ""
    returncodes: tuple[int | None, ...] = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class FirstLightError(Exception):
    """Bad input to this script: one line, exit status 2."""


class Log:
    """The run's log: every line of every stage, also echoed on stdout, flushed as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._handle.write(text)
            self._handle.flush()
            sys.stdout.write(text)
            sys.stdout.flush()

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def close(self) -> None:
        self._handle.close()


def python() -> str:
    """The interpreter the stages run: this one (``gpu_first_light.sh`` starts it from $PYTHON)."""
    return sys.executable


def stage_environment(site: Path | None) -> dict[str, str]:
    """The stages' environment: unbuffered output, wide tables, SITE first on PYTHONPATH when wheels
    were installed there (the harness hands PYTHONPATH on to its own children)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_command(command: Command, *, env: dict[str, str], deadline: float, log: Log) -> tuple[int | None, bool]:
    """Run ``command`` until it ends or ``deadline`` (time.monotonic()); (exit status, whether it was stopped).

    Its process group gets SIGINT ``GRACE_S`` before the deadline (or halfway through a short
    budget) and SIGKILL at the deadline."""
    log.line(f"$ {command.shown or ' '.join(command.argv)}")
    output = open(command.output, "w", encoding="utf-8") if command.output else None  # its folder exists
    # A process group of its own, to signal it whole, but not a session of its own: whatever ends this
    # script's session (a device call's cleanup at its limit) ends the stage too.
    process = subprocess.Popen(command.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, process_group=0, text=True, errors="replace")

    def copy_output() -> None:
        for line in process.stdout:
            log.write(line)
            if output is not None:
                output.write(line)

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    remaining = deadline - time.monotonic()
    interrupt_at = deadline - min(GRACE_S, max(remaining, 0.0) / 2)
    stopped = False
    try:
        process.wait(timeout=max(0.0, interrupt_at - time.monotonic()))
    except subprocess.TimeoutExpired:
        stopped = True
        log.line(f"[first light] {command.label}: out of time, interrupting (SIGINT)")
        _stop(process, deadline, log, command.label)
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches this process group only, not the stage's
        _stop(process, time.monotonic() + GRACE_S, log, command.label)
        raise
    reader.join(timeout=5)
    if output is not None:
        output.close()
    return process.returncode, stopped


def _stop(process: subprocess.Popen, deadline: float, log: Log, label: str) -> None:
    """SIGINT to the command's process group, SIGKILL if it is still there at ``deadline``."""
    _signal_group(process, signal.SIGINT)
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.line(f"[first light] {label}: still running at the stage's limit, killed (SIGKILL)")
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def wheel_files(wheels: Path) -> list[Path]:
    return sorted(wheels.glob("*.whl")) if wheels.is_dir() else []


def wheel_distribution(path: Path) -> str:
    """The distribution name of a wheel file, as its file name spells it (``liger_kernel``)."""
    return path.name.split("-", 1)[0].lower()


def wheels_note(wheels: Path, found: list[Path]) -> str:
    names = [wheel_distribution(path) for path in found]
    missing = [name for name in EXPECTED_WHEELS if name not in names]
    if not found:
        return f"no wheels in {wheels}: the peers must be installed already (missing: {', '.join(missing)})"
    note = f"installing {', '.join(path.name for path in found)}"
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # pip refuses the whole install then
        note += f"; more than one wheel of {', '.join(twice)}: keep one version of each"
    return note + (f"; missing: {', '.join(missing)}" if missing else "")


def stage_commands(stage: str, plan: Plan, out: Path, wheels: Path, site: Path) -> list[Command]:
    results = out / "results"
    if stage == "wheels":
        found = wheel_files(wheels)
        if not found:
            return []
        return [Command("pip install", (python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                                        *map(str, found)))]
    if stage == "environment":
        commands = []
        if shutil.which("nvidia-smi"):
            commands.append(Command("nvidia-smi", ("nvidia-smi",), out / "env" / "nvidia-smi.txt"))
        facts = out / "env" / "facts.json"
        commands.append(Command("facts", (python(), "-c", FACTS_SCRIPT, str(facts)),
                                shown=f"{python()} -c FACTS_SCRIPT {facts}  (FACTS_SCRIPT: {__file__})"))
        commands.append(Command("harness list", (python(), "-m", "harness", "list"), out / "env" / "list.txt"))
        return commands
    if stage == "sweep":
        return [Command("sweep", (python(), "-m", "harness", "sweep", *plan.sweep_cases, "--results-dir",
                                  str(results), *plan.sweep_options))]
    if stage == "gate":
        implementations = [arg for name in plan.gate_implementations for arg in ("--impl", name)]
        return [Command("gate", (python(), "-m", "harness", "check", *implementations, *plan.gate_options,
                                 "--out", str(results), "--junit-xml", str(out / "junit.xml")))]
    raise ValueError(f"unknown stage {stage!r}")


def gpu_missing(out: Path) -> str | None:
    """Why the GPU stages cannot run, when the environment stage found no CUDA GPU; None otherwise.

    Without its description (env/facts.json not written, say a slow first import of torch) they
    run anyway: the sweep's ``--device cuda`` then fails at once where there is no GPU."""
    try:
        facts = json.loads((out / "env" / "facts.json").read_text())
    except (OSError, ValueError):
        return None
    if facts.get("device_kind") != "cuda":
        why = facts.get("gpu_missing") or f"torch {facts.get('packages', {}).get('torch')} sees no CUDA GPU"
        return f"no GPU: {why} (on a CPU machine, rehearse with --smoke)"
    return None


def run_stage(stage: str, plan: Plan, budget: float, *, out: Path, wheels: Path, site: Path, log: Log,
              env: dict[str, str]) -> StageResult:
    start = time.monotonic()
    deadline = start + budget
    detail = ""
    if stage == "wheels":
        detail = wheels_note(wheels, wheel_files(wheels))
        log.line(f"[first light] {detail}")
    if stage in ("sweep", "gate") and plan.needs_gpu:
        reason = gpu_missing(out)
        if reason is not None:
            return StageResult(stage, "skipped", 0.0, budget, reason)
    codes = []
    stopped = False
    if stage == "environment":
        (out / "env").mkdir(exist_ok=True)
    for command in stage_commands(stage, plan, out, wheels, site):
        if time.monotonic() >= deadline:
            stopped = True
            break
        code, stopped = run_command(command, env=env, deadline=deadline, log=log)
        codes.append(code)
        if stopped:
            break
    seconds = time.monotonic() - start
    finished = FINISHED_STATUSES.get(stage, (0,))
    if stopped:
        status = "timeout"
        detail = f"stopped at its budget of {budget:g} s"
    elif any(code not in finished for code in codes):
        status = "error"
        detail = f"exit statuses {codes}" + (f"; {detail}" if detail else "")
    elif any(code != 0 for code in codes):
        status, detail = "failures", "the gate found failing properties (exit status 1)"
    else:
        status = "ok"
    if stage == "environment" and not (out / "env" / "facts.json").exists():
        detail += "; env/facts.json was not written: the GPU stages run without knowing whether there is a GPU"
    return StageResult(stage, status, seconds, budget, detail.lstrip("; "), tuple(codes))


def write_stages(out: Path, plan: Plan, results: list[StageResult], started: str) -> None:
    data = {"plan": plan.name, "started": started, "stages": [r.to_json() for r in results]}
    _replace(out / STAGES_NAME, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def pack(out: Path, copy_to: Path | None) -> None:
    """OUTDIR, all of it but the tarball, into OUTDIR/first_light.tar.gz (replaced whole, never half
    written); the tarball and the log copied to ``copy_to`` too."""
    tarball = out / TARBALL_NAME

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as archive:
            for path in sorted(out.rglob("*")):
                if path.is_file() and not path.name.startswith(TARBALL_NAME):
                    archive.add(path, arcname=str(path.relative_to(out)), recursive=False)

    _replace(tarball, write)
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for path in (out / LOG_NAME, tarball):
            _replace(copy_to / path.name, lambda tmp, source=path: shutil.copyfile(source, tmp))


def _replace(path: Path, write) -> None:
    """``write(tmp)`` then rename tmp over ``path``: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def parse_stage_timeouts(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        stage, _, seconds = item.partition("=")
        if stage not in STAGES:
            raise FirstLightError(f"--stage-timeout {item}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        try:
            budgets[stage] = float(seconds)
        except ValueError:
            raise FirstLightError(f"--stage-timeout {item}: {seconds!r} is not a number of seconds") from None
        if budgets[stage] <= 0:
            raise FirstLightError(f"--stage-timeout {item}: the seconds must be > 0")
    return budgets


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_first_light.sh",
                                     description="GPU first light: wheels, environment, sweep and gate, "
                                                 "each with a time budget, packed into OUTDIR/first_light.tar.gz")
    parser.add_argument("outdir", type=Path, help="where the log, the results and the tarball go (created)")
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU rehearsal: tiny cases (cases/first_light_smoke.toml), a tiny gate")
    parser.add_argument("--copy-to", type=Path, metavar="DIR",
                        help="also copy the log and the tarball here after every stage (on the GPU machine: $OUT)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", metavar="DIR",
                        help="the carried wheels (default: .whl/ in the repository)")
    parser.add_argument("--site", type=Path, metavar="DIR",
                        help="where the wheels are installed (default: /tmp/site; --smoke: a temporary folder)")
    parser.add_argument("--stage-timeout", action="append", default=[], metavar="STAGE=SECONDS",
                        help=f"a stage's budget instead of the plan's (stages: {', '.join(STAGES)}; repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        budgets_given = parse_stage_timeouts(args.stage_timeout)
        out = args.outdir.resolve()
        if out.exists() and any(out.iterdir()):
            raise FirstLightError(f"{out} is not empty: give a new folder, so that runs do not mix")
    except FirstLightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    plan = dataclasses.replace(plan, budgets={**plan.budgets, **budgets_given})
    # The stages must be stoppable by SIGINT even where this script was started with it ignored
    # (a background job): a child inherits an ignored signal, not a handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out.mkdir(parents=True, exist_ok=True)
    temporary_site = args.site is None and args.smoke
    site = Path(tempfile.mkdtemp(prefix="first-light-site-")) if temporary_site else (args.site or Path("/tmp/site"))
    copy_to = args.copy_to.resolve() if args.copy_to else None
    log = Log(out / LOG_NAME)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    total = sum(plan.budgets[s] for s in STAGES)
    log.line(f"[first light] {plan.name} plan, started {started}, from {ROOT} with {python()}; "
             f"budgets: {', '.join(f'{s} {plan.budgets[s]:g} s' for s in STAGES)} ({total:g} s in all)")
    results: list[StageResult] = []
    wall = time.monotonic()
    try:
        for stage in STAGES:
            installed = any(r.stage == "wheels" and r.returncodes == (0,) for r in results)
            env = stage_environment(site if installed else None)
            log.line(f"\n=== [{dt.datetime.now():%H:%M:%S}] stage {stage} (budget {plan.budgets[stage]:g} s)")
            result = run_stage(stage, plan, plan.budgets[stage], out=out, wheels=args.wheels, site=site,
                               log=log, env=env)
            results.append(result)
            log.line(f"=== stage {stage}: {result.status}, {result.seconds:.1f} s of {result.budget_s:g} s"
                     + (f" ({result.detail})" if result.detail else ""))
            write_stages(out, plan, results, started)
            pack(out, copy_to)
        log.line(f"\n[first light] done in {time.monotonic() - wall:.1f} s:")
        for r in results:
            log.line(f"  {r.stage:<12} {r.status:<9} {r.seconds:7.1f} s of {r.budget_s:5g} s  {r.detail}")
        log.line(f"[first light] everything is in {out / TARBALL_NAME}"
                 + (f" (copied to {copy_to})" if copy_to else ""))
    finally:
        log.close()
        pack(out, copy_to)  # the log's last lines too
        if temporary_site:
            shutil.rmtree(site, ignore_errors=True)
    ran_to_end = all(r.status in ("ok", "failures") for r in results)
    return 0 if ran_to_end else 1


if __name__ == "__main__":
    sys.exit(main())
