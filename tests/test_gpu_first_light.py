"""GPU first light (``scripts/gpu_first_light.sh``): its CPU rehearsal (``--smoke``) installs the
carried wheels, describes the machine, sweeps, gates and packs everything into one tarball; a
stage out of time is stopped without losing what the stages before it wrote; and what the GPU
machine's torch 2.11 lacks is reported, not a crash."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch.nn
import torch.nn.functional as F

from harness.environment import PROJECT_ROOT
from harness.listing import describe
from harness.sweep.cases import load_cases
from harness.sweep.runner import declared_unsupported, plan_jobs
from implementations.torch_linear_ce import TorchLinearCrossEntropy

SCRIPT = PROJECT_ROOT / "scripts" / "gpu_first_light.sh"


def driver():
    """scripts/gpu_first_light.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_first_light", PROJECT_ROOT / "scripts" / "gpu_first_light.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, first_light_probe 0.1, standing in for the carried peers."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "first_light_probe-0.1-py3-none-any.whl"
    info = "first_light_probe-0.1.dist-info"
    files = {
        "first_light_probe.py": "ANSWER = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: first-light-probe\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def first_light(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, in smoke mode, with this interpreter as $PYTHON."""
    return subprocess.run(["bash", str(SCRIPT), str(out), "--smoke", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env={**os.environ, "PYTHON": sys.executable}, timeout=1500)


def stages(out: Path) -> dict[str, dict]:
    return {s["stage"]: s for s in json.loads((out / "stages.json").read_text())["stages"]}


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.slow
def test_the_smoke_run_installs_sweeps_gates_and_packs_it_all(tmp_path):
    out = tmp_path / "fl"
    done = first_light(out, "--wheels", str(probe_wheel(tmp_path / "wheels").parent))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [(name, s["status"]) for name, s in stages(out).items()] == [
        ("wheels", "ok"), ("environment", "ok"), ("sweep", "ok"), ("gate", "ok")]
    assert "missing: liger_kernel, cut_cross_entropy, lmhead_bench" in stages(out)["wheels"]["detail"]

    # The wheel went into the site folder, which every later stage (and the harness's children) had first.
    facts = json.loads((out / "env" / "facts.json").read_text())
    assert "first-light-probe 0.1" in facts["pythonpath_distributions"]
    assert facts["device_kind"] == "cpu" and facts["packages"]["torch"]
    assert "LM-head implementations here" in (out / "env" / "list.txt").read_text()

    log = (out / "first_light.log").read_text()
    assert log == done.stdout  # everything the stages printed, and nothing else
    for stage in ("wheels", "environment", "sweep", "gate"):
        assert f"=== stage {stage}: ok, " in log
    assert "-m harness list" in log and "torch-eager" in log

    results = out / "results"
    sweep_run = only([p for p in results.iterdir() if not p.name.endswith("-check")])
    rows = csv_rows(sweep_run / "rows.csv")
    measured = {(r["case"], r["implementation"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert measured == {
        ("table1-tiny/N=32/bfloat16", impl, mode) for impl in ("torch-eager", "chunked")
        for mode in ("forward", "forward_backward")} | {
        ("llama3-tiny/N=32/bfloat16", impl, "forward_backward") for impl in ("torch-eager", "chunked")}
    assert {r["status"] for r in rows if r["implementation"] == "cce-exact"} == {"unsupported"}

    check_run = only(list(results.glob("*-check")))
    properties = {(r["implementation"], r["property"]): r["status"] for r in csv_rows(check_run / "properties.csv")}
    assert properties == {
        (impl, prop): "pass" for impl in ("chunked", "torch-eager")
        for prop in ("equivalence/bfloat16", "autograd/grad-subsets")} | {
        ("cce-exact", prop): "unsupported" for prop in ("equivalence/bfloat16", "autograd/grad-subsets")}
    assert "<testsuites" in (out / "junit.xml").read_text()

    with tarfile.open(out / "first_light.tar.gz") as archive:
        names = set(archive.getnames())
        packed_log = archive.extractfile("first_light.log").read().decode()
    relative = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert names == relative - {"first_light.tar.gz"}
    assert packed_log == log  # packed after the last line was written


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_stage_out_of_time_is_stopped_and_a_killed_run_keeps_the_stages_before(tmp_path):
    # The sweep gets 4 s, and the whole run is killed while the gate runs, as a device call is at its
    # limit: what the stages before wrote must be in the tarball and the log copied out after each.
    out, copies = tmp_path / "fl", tmp_path / "copies"
    argv = ["bash", str(SCRIPT), str(out), "--smoke", "--stage-timeout", "sweep=4", "--copy-to", str(copies),
            "--wheels", str(tmp_path / "no-wheels"), "--site", str(tmp_path / "site")]  # killed: it cannot clean up
    with open(tmp_path / "stdout.txt", "w") as stdout:
        run = subprocess.Popen(argv, cwd=PROJECT_ROOT, env={**os.environ, "PYTHON": sys.executable}, stdout=stdout,
                               stderr=subprocess.STDOUT)
    try:
        log = out / "first_light.log"
        wait_for(lambda: log.exists() and "stage gate (budget" in log.read_text(errors="replace"), 600)
        wait_for(lambda: children(run.pid), 30)  # the gate's process: a group of its own
    finally:
        stages_left = children(run.pid)
        run.kill()
        run.wait()
        for pid in stages_left:
            os.killpg(pid, signal.SIGKILL)

    sweep = stages(out)["sweep"]
    assert sweep["status"] == "timeout" and sweep["seconds"] < 4 + 1  # at its budget, not at the harness's pace
    assert "sweep: out of time, interrupting (SIGINT)" in (tmp_path / "stdout.txt").read_text()
    with tarfile.open(copies / "first_light.tar.gz") as archive:
        names = set(archive.getnames())
        packed = json.load(archive.extractfile("stages.json"))
    assert {"env/facts.json", "env/list.txt", "first_light.log", "stages.json"} <= names
    assert [(s["stage"], s["status"]) for s in packed["stages"]] == [
        ("wheels", "ok"), ("environment", "ok"), ("sweep", "timeout")]
    assert "=== stage sweep: timeout" in (copies / "first_light.log").read_text()


def test_bad_input_is_one_line_and_runs_nothing(tmp_path, capsys):
    main = driver().main
    assert main([str(tmp_path / "a"), "--smoke", "--stage-timeout", "sweep=soon"]) == 2
    assert capsys.readouterr().err == "error: --stage-timeout sweep=soon: 'soon' is not a number of seconds\n"
    assert main([str(tmp_path / "a"), "--stage-timeout", "bench=5"]) == 2
    assert "unknown stage 'bench'; stages: wheels, environment, sweep, gate" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "first_light.log").write_text("an earlier run\n")
    assert main([str(tmp_path / "used")]) == 2
    assert "is not empty: give a new folder" in capsys.readouterr().err


def test_missing_and_doubled_wheels_are_named():
    wheels_note = driver().wheels_note
    found = [Path(f"w/liger_kernel-{v}-py3-none-any.whl") for v in ("0.8.4", "0.8.5")]
    assert wheels_note(Path("w"), found) == (
        "installing liger_kernel-0.8.4-py3-none-any.whl, liger_kernel-0.8.5-py3-none-any.whl; more than one wheel "
        "of liger_kernel: keep one version of each; missing: cut_cross_entropy, lmhead_bench")
    assert wheels_note(Path("w"), []) == (
        "no wheels in w: the peers must be installed already (missing: liger_kernel, cut_cross_entropy, lmhead_bench)")


def test_the_gpu_stages_are_skipped_where_the_environment_stage_saw_no_gpu(tmp_path):
    gpu_missing = driver().gpu_missing
    assert gpu_missing(tmp_path) is None  # not described: they run, and the sweep's --device cuda says
    (tmp_path / "env").mkdir()
    facts = tmp_path / "env" / "facts.json"
    facts.write_text(json.dumps({"device_kind": "cpu", "gpu_missing": None, "packages": {"torch": "2.11.0+cu130"}}))
    assert gpu_missing(tmp_path) == ("no GPU: torch 2.11.0+cu130 sees no CUDA GPU "
                                     "(on a CPU machine, rehearse with --smoke)")
    # The GPU plan's sweep and gate then run nothing (the GPU cases would take hours on a CPU).
    module = driver()
    log = module.Log(tmp_path / "first_light.log")
    for stage in ("sweep", "gate"):
        result = module.run_stage(stage, module.GPU_PLAN, 5.0, out=tmp_path, wheels=tmp_path, site=tmp_path,
                                  log=log, env={})
        assert (result.status, result.detail) == ("skipped", gpu_missing(tmp_path))
    log.close()
    assert not (tmp_path / "results").exists()
    facts.write_text(json.dumps({"device_kind": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}))
    assert gpu_missing(tmp_path) is None


def test_on_the_gpu_machines_torch_2_11_torch_linear_ce_says_it_is_unavailable(monkeypatch):
    # torch 2.11 has neither; the listing and the sweep must say so, not fail.
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    monkeypatch.delattr(torch.nn, "LinearCrossEntropyOptions", raising=False)
    impl = TorchLinearCrossEntropy()
    row = describe(impl, "cuda")
    assert row["here"] == "no" and row["how / why not"].startswith("needs torch >= 2.13")
    jobs = [j for j in plan_jobs(load_cases(["gpu_smoke:cce-table1"]), None) if j.implementation == impl.name]
    assert len(jobs) == 1
    assert declared_unsupported(jobs[0], "cuda").startswith("needs torch >= 2.13 for F.linear_cross_entropy")
