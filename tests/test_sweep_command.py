"""``python -m harness sweep``: isolation of misbehaving cases, resume, torchrun, one-line errors.

The tests that start real worker processes on tiny cases (V=256, D=16) take a few seconds each
and are in the full tier (``slow``); the implementations that misbehave are in
``tests/sweep_plugins.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from harness.case import Case
from harness.cli import main
from harness.isolation import child_environment
from tests.sweep_plugins import companions_running
from harness.registry import builtin_names
from harness.results import list_runs, read_meta, read_rows
from harness.environment import PROJECT_ROOT
from harness.onednn import onednn_linear
from harness.sweep.cases import SweepCase
from harness.sweep.measure import TimingSettings
from harness.sweep.presets import KNOWN_FAILURES
from harness.sweep.rows import mode_results
from harness.sweep.runner import SweepSettings, run_job

PLUGINS = "tests.sweep_plugins"
QUICK = ["--measure-time", "0.01", "--min-repeats", "1"]


def case_file(tmp_path: Path, tokens=(32,)) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        'dtypes = ["float32"]\n[[case]]\nname = "tiny"\nvocab = 256\nhidden = 16\n'
        f"tokens = {list(tokens)}\n"
    )
    return path


def only_run(results: Path) -> Path:
    runs = list_runs(results)
    assert len(runs) == 1
    return runs[0]


def statuses(rows) -> dict[tuple[str, str], str]:
    """(implementation, mode) -> status (ok when it has metric rows)."""
    return {(row.implementation, row.mode): row.status for row in rows.itertuples()}


@pytest.mark.slow
def test_crash_and_out_of_memory_become_rows_while_the_other_cases_are_recorded(tmp_path):
    results = tmp_path / "results"
    impls = ["torch-eager", f"{PLUGINS}:Aborting", f"{PLUGINS}:Segfaulting",
             f"{PLUGINS}:OutOfMemory", f"{PLUGINS}:IllegalMemoryAccess", f"{PLUGINS}:not_implemented"]
    argv = ["sweep", str(case_file(tmp_path)), "--out", str(results), *QUICK]
    for impl in impls:
        argv += ["--impl", impl]
    assert main(argv) == 0

    rows = read_rows(only_run(results))
    got = statuses(rows)
    modes = ("forward", "forward_backward", "backward")
    assert all(got[("torch-eager", mode)] == "ok" for mode in modes)
    assert {got[("test-abort", mode)] for mode in modes} == {"crash"}
    assert {got[("test-segfault", mode)] for mode in modes} == {"crash"}
    assert {got[("test-oom", mode)] for mode in modes} == {"oom"}
    assert {got[("test-illegal-access", mode)] for mode in modes} == {"crash"}
    assert {got[(f"{PLUGINS}:not_implemented", mode)] for mode in modes} == {"unsupported"}

    reasons = {(row.implementation, row.mode): row.reason for row in rows.itertuples() if row.metric == "status"}
    assert "SIGABRT" in reasons[("test-abort", "forward")] and "during forward" in reasons[("test-abort", "forward")]
    assert reasons[("test-abort", "backward")].startswith("not measured:")
    assert "sweep_plugins.py:" in reasons[("test-abort", "forward")]  # where it died, from faulthandler
    assert "SIGSEGV" in reasons[("test-segfault", "forward")]
    assert "OutOfMemoryError" in reasons[("test-oom", "forward")]
    assert "illegal memory access" in reasons[("test-illegal-access", "forward")]
    assert reasons[("test-illegal-access", "backward")] == ("not measured: the process stopped after a fatal error "
                                                            "in an earlier mode")
    assert "implements no loss" in reasons[(f"{PLUGINS}:not_implemented", "forward")]

    eager = rows[(rows["implementation"] == "torch-eager") & (rows["mode"] == "forward_backward")]
    assert {"time_median", "time_p20", "time_p80", "first_call", "peak_memory", "tflops", "matmul_fraction",
            "memory_over_lower_bound", "memory_over_logits"} <= set(eager.metric)
    meta = read_meta(only_run(results))
    assert meta["kind"] == "sweep" and meta["finished"] and meta["matmul_tflops"]["float32"] > 0
    # The rate matmul_fraction divides by is the fastest routine's, each routine's kept beside it.
    routines = meta["matmul_routines"]["float32"]
    assert "torch.mm" in routines and meta["matmul_tflops"]["float32"] == max(routines.values())
    assert ("onednn" in routines) == (onednn_linear() is not None)


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_stopped_and_each_of_its_modes_is_a_timeout():
    """The limit covers the whole job, the worker's start included: stopped at 2 s, the hanging
    plugin is a timeout whether it was still starting or already hanging."""
    modes = ["forward", "forward_backward"]
    settings = SweepSettings(modes=tuple(modes), device="cpu", timing=TimingSettings(measure_time=0.01, min_repeats=1),
                             timeout_s=2, max_memory_bytes=None, child_env=child_environment())
    job = {"kind": "case", "case": SweepCase("tiny", "tiny", Case(tokens=(8,), dim=4, vocab=16)).to_json(),
           "implementation": f"{PLUGINS}:Hanging", "modes": modes, "device": "cpu",
           "timing": settings.timing.to_json()}
    outcome = run_job(job, settings)
    assert outcome.failure == ("timeout", "exceeded the time limit of 2 s")
    results = mode_results(outcome, modes)
    assert {result["status"] for result in results.values()} == {"timeout"}
    assert all("exceeded the time limit of 2 s" in result["reason"] for result in results.values())


@pytest.mark.slow
def test_a_case_holding_more_host_memory_than_the_limit_is_stopped_and_recorded_as_oom(tmp_path):
    results = tmp_path / "results"
    argv = ["sweep", str(case_file(tmp_path)), "--out", str(results), "--max-memory", "1.5",
            "--impl", f"{PLUGINS}:HostMemoryHog", "--impl", "torch-eager", "--mode", "forward", *QUICK]
    assert main(argv) == 0
    rows = read_rows(only_run(results))
    got = statuses(rows)
    assert got[("test-memory-hog", "forward")] == "oom"
    assert got[("torch-eager", "forward")] == "ok"
    [reason] = rows[rows["implementation"] == "test-memory-hog"]["reason"]
    assert "--max-memory" in reason


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_sweep_process(argv: list[str], env_extra: dict[str, str], *, torchrun: int = 0,
                      sigint_ignored: bool = False):
    """The sweep in a process of its own; ``sigint_ignored`` starts it as a shell's background job
    (``nohup ... &``) would, with SIGINT ignored."""
    env = {**os.environ, **env_extra}
    launcher = [sys.executable, "-m", "harness"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
                    "-m", "harness"]
    return subprocess.run([*launcher, "sweep", *argv], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=_ignore_interrupts if sigint_ignored else None)


def worker_runs(log: Path) -> Counter:
    """How many worker processes ran each token count, from the plugin's call log."""
    seen = {tuple(line.split()[1:3]) for line in log.read_text().splitlines()}  # (tokens, worker pid)
    return Counter(int(tokens) for tokens, _ in seen)


@pytest.mark.slow
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["interactive", "background-job"])
def test_resume_completes_an_interrupted_run_without_repeating_finished_cases(tmp_path, sigint_ignored):
    """Ctrl-C arrives while the third of six jobs runs; --resume RUN runs the rest, and nothing twice.

    The sweep handles Ctrl-C itself, so this holds whether it inherits SIGINT's default handling or,
    as a shell's background job does, SIGINT ignored.
    """
    results = tmp_path / "results"
    log = tmp_path / "calls.log"
    env = {
        "LMHEAD_TEST_CALL_LOG": str(log),
        "LMHEAD_TEST_INTERRUPT_TOKENS": "48",
        "LMHEAD_TEST_INTERRUPT_MARKER": str(tmp_path / "interrupted"),
    }
    argv = [str(case_file(tmp_path, tokens=(32, 48, 64))), "--out", str(results),
            "--impl", "torch-eager", "--impl", f"{PLUGINS}:Counting", "--mode", "forward", *QUICK]
    interrupted = run_sweep_process(argv, env, sigint_ignored=sigint_ignored)
    assert interrupted.returncode == 130, interrupted.stderr
    run_dir = only_run(results)
    assert "--resume" in interrupted.stderr
    before = read_rows(run_dir)
    assert set(zip(before.case, before.implementation)) == {
        ("tiny/N=32/float32", "torch-eager"), ("tiny/N=32/float32", "test-counting"), ("tiny/N=48/float32", "torch-eager"),
    }

    resumed = run_sweep_process(["--resume", run_dir.name, "--out", str(results)], env)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(run_dir)
    assert len({(r.case, r.implementation) for r in rows.itertuples()}) == 6
    assert not rows.duplicated(subset=["case", "implementation", "mode", "metric"]).any()
    assert set(rows.status) == {"ok"}
    # The interrupted job ran twice (stopped, then resumed); the finished ones once.
    assert worker_runs(log) == Counter({32: 1, 48: 2, 64: 1})
    assert len(read_meta(run_dir)["resumed"]) == 1


@pytest.mark.slow
def test_torchrun_spreads_the_cases_over_two_processes_into_one_run(tmp_path):
    results = tmp_path / "results"
    log = tmp_path / "calls.log"
    argv = [str(case_file(tmp_path, tokens=(16, 32, 48, 64))), "--out", str(results), "--device", "cpu",
            "--impl", f"{PLUGINS}:Counting", "--mode", "forward", *QUICK]
    done = run_sweep_process(argv, {"LMHEAD_TEST_CALL_LOG": str(log), "OMP_NUM_THREADS": "1"}, torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run(results)
    rows = read_rows(run_dir)
    assert sorted(set(rows.case)) == [f"tiny/N={n}/float32" for n in (16, 32, 48, 64)]
    assert not rows.duplicated(subset=["case", "implementation", "mode", "metric"]).any()
    sweep_processes = {}
    for line in log.read_text().splitlines():
        _, tokens, _, parent = line.split()
        sweep_processes.setdefault(parent, set()).add(int(tokens))
    # Round-robin: rank 0 took the 1st and 3rd case, rank 1 the 2nd and 4th.
    assert sorted(sweep_processes.values(), key=min) == [{16, 48}, {32, 64}]
    assert read_meta(run_dir)["world_size"] == 2


def test_preset_plan_on_this_cpu_machine_includes_every_built_in_but_its_known_failures_with_their_reason(capsys):
    assert main(["sweep", "--preset", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    planned = {line.split("\t")[0] for line in out.splitlines() if "\t" in line}
    left_out = {name for name, _ in KNOWN_FAILURES}
    assert set(builtin_names()) - left_out <= planned
    assert not planned & left_out
    for name, why in KNOWN_FAILURES:
        assert f"left out of the preset: {name}: {why} (run it with --impl {name})" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["models", "--impl", "no-such-impl"], "unknown implementation 'no-such-impl'"),
        (["models", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["no-such-file"], "case file 'no-such-file' not found"),
        (["models", "--device", "tpu"], "unknown device 'tpu'"),
        (["--resume", "no-such-run"], "--resume no-such-run: no run folder"),
    ],
)
def test_bad_input_is_one_line_error_and_exit_status_2(argv, message, capsys, tmp_path):
    assert main(["sweep", *argv, "--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert "\n" not in err


def test_a_case_file_naming_an_unknown_implementation_is_reported_with_file_and_entry(tmp_path, capsys):
    path = tmp_path / "cases.toml"
    path.write_text('dtypes = ["float32"]\n[[case]]\nname = "x"\nvocab = 8\nhidden = 4\ntokens = 2\n'
                    'implementations = ["torch-eagre"]\n')
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cases.toml: entry 'x': unknown implementation 'torch-eagre'" in err


def test_cuda_device_without_a_gpu_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["sweep", "models", "--device", "cuda", "--dry-run"]) == 2
    assert "no CUDA GPU is available here" in capsys.readouterr().err


@pytest.mark.slow
def test_meta_records_the_arguments_that_resume_needs(tmp_path):
    results = tmp_path / "results"
    argv = ["sweep", str(case_file(tmp_path)), "--out", str(results), "--impl", "torch-eager",
            "--mode", "forward", *QUICK]
    assert main(argv) == 0
    meta = read_meta(only_run(results))
    assert meta["arguments"]["impl"] == ["torch-eager"]
    assert meta["arguments"]["cases"] == [str(case_file(tmp_path).resolve())]
    for key in ("device_name", "packages", "git_commit", "host", "command", "created", "device_memory_bytes"):
        assert key in meta, key
    json.dumps(meta)  # plain data
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the sweep put the handler back


@pytest.mark.slow
def test_each_job_compiles_into_empty_caches_of_its_own_so_first_call_is_always_cold(tmp_path):
    results = tmp_path / "results"
    argv = ["sweep", str(case_file(tmp_path, tokens=(8, 16))), "--impl", f"{PLUGINS}:ReportsCompileCaches",
            "--mode", "forward", "--out", str(results), *QUICK]
    assert main(argv) == 0
    run = only_run(results)
    reasons = sorted(read_rows(run)["reason"])
    assert len(reasons) == 2 and all(reason.endswith("empty=True") for reason in reasons)
    triton, inductor = reasons[0].split()[1:3]
    assert triton.endswith("/triton") and inductor.endswith("/inductor")
    assert reasons[0].split()[1] != reasons[1].split()[1]  # the second job does not see the first's
    assert not Path(inductor).exists()  # removed with its job
    assert read_meta(run)["compile_caches"].startswith("per job")


def test_the_results_folder_is_named_with_out_as_in_check_and_results_dir_still_works(tmp_path, capsys):
    argv = ["sweep", str(case_file(tmp_path)), "--impl", "torch-eager", "--dry-run"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main([*argv, "--results-dir", str(tmp_path / "b")]) == 0
    assert "note: --results-dir is deprecated; use --out" in capsys.readouterr().err


@pytest.mark.slow
def test_a_case_with_companions_runs_beside_that_many_busy_processes_and_meta_says_so(tmp_path, capsys, monkeypatch):
    cases = tmp_path / "loaded.toml"
    cases.write_text('dtypes = ["float32"]\n[[case]]\nname = "tiny-loaded"\nvocab = 256\ndim = 16\ntokens = 32\n'
                     'companions = 1\n[[case]]\nname = "tiny"\nvocab = 256\ndim = 16\ntokens = 48\n'
                     '[[case]]\nname = "tiny-beside-loader"\nvocab = 256\ndim = 16\ntokens = 40\n'
                     'companions = 1\ncompanion_session = "job"\n')
    log = tmp_path / "neighbours.log"
    monkeypatch.setenv("LMHEAD_TEST_CALL_LOG", str(log))
    results = tmp_path / "results"
    argv = ["sweep", str(cases), "--out", str(results), "--impl", f"{PLUGINS}:CountsCompanions",
            "--mode", "forward", *QUICK]
    assert main(argv) == 0
    run_dir = only_run(results)
    meta = read_meta(run_dir)
    assert meta["companions"] == {"tiny-loaded/N=32/float32": 1, "tiny-beside-loader/N=40/float32": 1}
    assert meta["companion_sessions"] == {"tiny-loaded/N=32/float32": "own", "tiny-beside-loader/N=40/float32": "job"}
    assert set(read_rows(run_dir).status) == {"ok"}
    seen = {tuple(map(int, line.split()[1::2])) for line in log.read_text().splitlines()}  # (tokens, all, in session)
    assert seen == {(32, 1, 0), (48, 0, 0), (40, 1, 1)}, \
        "one companion beside each loaded case's job, in its session where asked; none beside the other"
    err = " ".join(capsys.readouterr().err.split())
    assert "beside 1 companion process)" in err and "beside 1 companion process in its session)" in err
    assert not list(companions_running()), "stopped after the job"
