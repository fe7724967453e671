"""Case files: the shipped shapes, how an entry expands into cases, and one-line errors for bad files."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.case import Case, OptionValues
from harness.sweep.cases import CASES_DIR, SweepCase, load_case_file, load_cases, with_dtypes
from harness.sweep.presets import CPU_PRESET, GPU_FULL_PRESET, GPU_PRESET, PRESETS, DeviceDescription, choose_preset

# The real model heads the issue asks for: name -> (vocab, hidden, tied).
MODEL_HEADS = {
    "gpt2-small": (50257, 768, True),
    "llama2-7b": (32000, 4096, False),
    "mistral-7b-v0.3": (32768, 4096, False),
    "llama3-8b": (128256, 4096, False),
    "llama3.2-1b": (128256, 2048, True),
    "qwen2.5-7b": (152064, 3584, False),
    "olmo2-7b": (100352, 4096, False),
    "gemma2-2b": (256000, 2304, True),
    "command-r": (256000, 8192, True),
}


def write(tmp_path, text: str, name: str = "bad.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_models_file_holds_every_real_model_head_at_training_token_counts():
    cases = load_case_file(CASES_DIR / "models.toml")
    heads = {case.entry: (case.case.vocab, case.case.dim, case.tied) for case in cases}
    assert heads == MODEL_HEADS
    assert {case.case.num_tokens for case in cases} == {4096, 8192, 16384}
    assert {case.case.dtype for case in cases} == {"bfloat16"}


def test_gemma2_head_is_soft_capped_at_30_and_the_others_are_not():
    cases = load_case_file(CASES_DIR / "models.toml")
    for case in cases:
        assert case.case.option("softcap") == (30.0 if case.entry == "gemma2-2b" else None)
        assert case.case.option("logit_scale") == (0.0625 if case.entry == "command-r" else 1.0)


def test_vocabulary_sweep_varies_only_the_vocabulary():
    cases = load_case_file(CASES_DIR / "sweep_vocab.toml")
    assert len({case.case.vocab for case in cases}) == len(cases) >= 4
    assert len({(case.case.dim, case.case.tokens, case.case.dtype) for case in cases}) == 1
    assert all("/V=" in case.name for case in cases)


def test_token_sweep_varies_only_the_token_count():
    cases = load_case_file(CASES_DIR / "sweep_tokens.toml")
    assert len({case.case.tokens for case in cases}) == len(cases) >= 4
    assert len({(case.case.vocab, case.case.dim, case.case.dtype) for case in cases}) == 1


def test_every_shipped_case_file_loads_with_unique_case_names():
    names = [path.stem for path in sorted(CASES_DIR.glob("*.toml"))]
    cases = load_cases(names)
    assert len({case.name for case in cases}) == len(cases)


def test_an_entry_expands_to_every_combination_and_names_what_varies(tmp_path):
    path = write(tmp_path, """
dtypes = ["float32", "bfloat16"]
[[case]]
name = "demo"
vocab = [100, 200]
hidden = 16
tokens = [8, 32]
options = { softcap = 30, bias = true }
""")
    cases = load_case_file(path)
    assert len(cases) == 2 * 2 * 2
    assert cases[0].name == "demo/V=100/N=8/float32"
    assert cases[0].case.options == OptionValues.of(softcap=30.0, bias=True)
    assert cases[0].case.describe_options() == "reduction=mean, softcap=30.0, bias"


def test_an_entry_measures_random_or_peaked_logits_and_names_the_peaked_ones(tmp_path):
    path = write(tmp_path, "[[case]]\nname = 'x'\nvocab = 64\ndim = 8\ntokens = 4\ndtypes = ['float32']\n"
                           "logits = ['random', 'peaked']\n", name="logits.toml")
    cases = {case.name: case.case.logits for case in load_cases([str(path)])}
    assert cases == {"x/N=4/float32": "random", "x/peaked/N=4/float32": "peaked"}


def test_file_entry_filter_keeps_only_the_named_entries():
    cases = load_cases(["models:llama3-8b,gemma2-2b"])
    assert {case.entry for case in cases} == {"llama3-8b", "gemma2-2b"}


def test_dtype_override_renames_the_cases():
    cases = with_dtypes(load_cases(["models:gpt2-small"]), ["float32"])
    assert [case.name for case in cases] == [f"gpt2-small/N={n}/float32" for n in (4096, 8192, 16384)]
    assert {case.case.dtype for case in cases} == {"float32"}


def test_a_case_survives_the_trip_to_the_worker_as_json():
    case = load_cases(["models:gemma2-2b"])[0]
    assert SweepCase.from_json(case.to_json()) == case


def test_lower_bound_and_logits_sizes_follow_the_definitions():
    case = Case(tokens=(10,), dim=64, vocab=1000, dtype="bfloat16")
    assert case.gradient_bytes == (10 * 64 + 1000 * 64) * 2  # grad of hidden + grad of weight
    assert case.logits_bytes == 10 * 1000 * 2
    assert case.matmul_flops("forward") == 2 * 10 * 64 * 1000
    assert case.matmul_flops("forward_backward") == 6 * 10 * 64 * 1000


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[case]]\nname = 'llama3-8b'\nvocab = -5\nhidden = 8\ntokens = 4\ndtypes = ['float32']",
         "bad.toml: entry 'llama3-8b': 'vocab' must be a positive integer"),
        ("[[case]]\nname = 'x'\nhidden = 8\ntokens = 4\ndtypes = ['float32']", "entry 'x': missing 'vocab'"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float64']", "entry 'x': 'dtypes' must be among"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\nvocb = 3",
         "entry 'x': unknown key 'vocb'"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\noptions = { softcap = -1 }",
         "entry 'x': softcap must be a positive number"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\noptions = { temperature = 2 }",
         "entry 'x': unknown option 'temperature'"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\nmodes = ['inference']",
         "entry 'x': 'modes' must be"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\n"
         "[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']", "entry 'x': the name is used twice"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\nlogits = 'sharp'",
         "entry 'x': 'logits' must be among random, peaked"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\ncompanions = -1",
         "entry 'x': 'companions' must be a number of processes"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\ncompanions = 1\n"
         "companion_session = 'mine'", "entry 'x': 'companion_session' must be one of 'own', 'job', got 'mine'"),
        ("[[case]]\nname = 'x'\nvocab = 8\nhidden = 8\ntokens = 4\ndtypes = ['float32']\ncompanion_session = 'job'",
         "entry 'x': 'companion_session' says where companions run, but the entry has no 'companions'"),
        ("[[case]]\nvocab = 8", "entry 1: 'name' must be"),
        ("title = 'x'", "unknown top-level key 'title'"),
        ("description = 'nothing'", "no [[case]] entries"),
        ("[[case]\nname = 'x'", "not valid TOML"),
    ],
)
def test_malformed_case_file_is_one_error_naming_file_entry_and_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as error:
        load_cases([str(path)])
    assert message in str(error.value)
    assert str(error.value).count("\n") == 0


def test_missing_case_file_error_lists_the_shipped_ones():
    with pytest.raises(HarnessError, match="case file 'no-such-cases' not found.*models"):
        load_cases(["no-such-cases"])


def test_unknown_entry_in_filter_is_named():
    with pytest.raises(HarnessError, match="no entry 'llama9'"):
        load_cases(["models:llama9"])


def test_gpu_machine_gets_the_smoke_preset_and_cpu_machine_the_scaled_down_one():
    gpu = choose_preset(DeviceDescription(kind="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30))
    cpu = choose_preset(DeviceDescription(kind="cpu", name="AMD EPYC"))
    assert gpu is GPU_PRESET and cpu is CPU_PRESET
    assert PRESETS["gpu-full"] is GPU_FULL_PRESET


def test_the_gpu_smoke_preset_holds_the_cce_table_1_head_llama3_and_one_long_case_in_a_few_dozen_jobs():
    cases = load_cases(list(GPU_PRESET.case_files))
    shapes = {(c.case.vocab, c.case.dim, c.case.num_tokens, c.case.option("softcap"), c.case.logits) for c in cases}
    assert {(256000, 2304, 8192, None, "random"), (256000, 2304, 8192, 30.0, "random"),
            (256000, 2304, 8192, 30.0, "peaked"), (128256, 4096, 8192, None, "random")} <= shapes
    assert [c.case.num_tokens for c in cases].count(16384) == 1
    assert {c.case.dtype for c in cases} == {"bfloat16"}
    jobs = sum(len(c.implementations) for c in cases)  # each entry names its implementations
    assert jobs <= 30  # ~15 s a process (start, cold compilation): the 8 minutes of the budget
    assert GPU_PRESET.timeout_s * 4 <= 600  # one hanging job leaves most of a ten-minute command


def test_the_full_gpu_preset_has_every_real_model_shape():
    gpu_cases = load_cases(list(GPU_FULL_PRESET.case_files))
    assert set(MODEL_HEADS) <= {case.entry for case in gpu_cases}
    assert min(case.case.num_tokens for case in gpu_cases if case.entry in MODEL_HEADS) >= 4096
    assert {case.case.dtype for case in gpu_cases} == {"bfloat16"}


def test_cpu_preset_is_scaled_down_but_keeps_a_large_vocabulary_case():
    cases = load_cases(list(CPU_PRESET.case_files))
    assert max(case.case.num_tokens * case.case.vocab * case.case.dim for case in cases) < 2048 * 128256 * 4096 / 100
    assert max(case.case.vocab for case in cases) >= 100_000
