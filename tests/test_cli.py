"""``python -m harness``: every command's help works, and a command needs only its own extras."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness.cli import COMMANDS, main
from harness.environment import PROJECT_ROOT, host_environment, missing_gpu


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help_and_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert f"python -m harness {command}" in capsys.readouterr().out


def run_without(packages: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m harness ARGV`` in a fresh process in which importing any of ``packages`` fails."""
    block = "".join(f"sys.modules[{name!r}] = None; " for name in packages)  # import then raises ImportError
    code = f"import sys; {block}from harness.cli import main; sys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          timeout=300)


WITHOUT_EXTRAS = ["seaborn", "matplotlib", "hypothesis", "playwright"]


@pytest.mark.slow
def test_a_sweep_runs_without_the_report_and_check_extras(tmp_path):
    cases = tmp_path / "tiny.toml"
    cases.write_text('dtypes = ["float32"]\n[[case]]\nname = "tiny"\nvocab = 64\ndim = 8\ntokens = 4\n')
    done = run_without(WITHOUT_EXTRAS, ["sweep", str(cases), "--impl", "torch-eager", "--dry-run"])
    assert done.returncode == 0, done.stderr
    assert "torch-eager\ttiny/N=4/float32" in done.stdout
    assert run_without(WITHOUT_EXTRAS, ["list"]).returncode == 0


@pytest.mark.slow
def test_a_command_whose_extra_is_missing_says_which_in_one_line():
    done = run_without(["hypothesis"], ["check", "--impl", "torch-eager"])
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: `check` needs the package 'hypothesis', which is not installed "
                                   "(pip install 'lmhead-bench[test]'); the other commands do not need it")


@pytest.fixture
def cuda_build_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_a_cuda_build_that_sees_no_gpu_is_said_loudly_and_recorded(cuda_build_without_gpu, capsys, tmp_path):
    warning = missing_gpu()
    assert warning.startswith("WARNING: torch ") and "CUDA 13.0" in warning
    assert "CUDA_VISIBLE_DEVICES=''" in warning and "\n" not in warning
    assert host_environment(["harness"])["gpu_missing"] == warning  # in every run's meta.json

    cases = tmp_path / "tiny.toml"
    cases.write_text('dtypes = ["float32"]\n[[case]]\nname = "tiny"\nvocab = 64\ndim = 8\ntokens = 4\n')
    assert main(["sweep", str(cases), "--impl", "torch-eager", "--dry-run"]) == 0
    assert warning in capsys.readouterr().err


def test_a_cpu_build_or_a_visible_gpu_gives_no_warning(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert missing_gpu() is None
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert missing_gpu() is None


@pytest.mark.parametrize("command", ["list", "sweep", "report", "compare"])
def test_the_help_of_the_commands_a_user_starts_with_has_examples(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"  python -m harness {command}" in out
