"""The package as a user meets it: import hygiene, the compiled extension, backend selection."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfkd_fast
from dfkd_fast import backend, machine
from dfkd_fast.backend import Implementation, KernelKind, choose_implementation


def test_import_initialises_no_cuda_and_compiles_nothing():
    probe = (
        "import sys, torch, dfkd_fast\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'torch._inductor' not in sys.modules, 'inductor imported'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_dfkd_fast_distill_is_imported_on_first_use_and_callable():
    probe = (
        "import sys, dfkd_fast\n"
        "assert 'dfkd_fast.distill' not in sys.modules, 'imported with the package'\n"
        "assert callable(dfkd_fast.distill) and 'distill' in dfkd_fast.__all__\n"
        "assert dfkd_fast.distill.DistillConfig().method == 'pre-dfkd'\n"
        "try:\n"
        "    dfkd_fast.no_such_thing\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_thing' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_compiled_extension_is_loaded():
    assert dfkd_fast.extension_loaded(), dfkd_fast.extension_status()
    assert hasattr(torch.ops.dfkd_fast, "reparameterize")


X86_64_V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_64_V4_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def test_cpu_kernel_target_is_the_level_the_cpu_flags_allow():
    from dfkd_fast._extension import cpu_kernel_target

    target = cpu_kernel_target()
    flags = backend.cpu_flags()
    if platform.machine() != "x86_64" or not flags:
        pytest.skip("the instruction-set levels are x86-64's, read from /proc/cpuinfo")
    if target == "compiler default":
        pytest.skip("this build has no per-level clones (not GCC >= 12)")
    if X86_64_V3_FLAGS | X86_64_V4_FLAGS <= flags:
        expected = "x86-64-v4"
    elif X86_64_V3_FLAGS <= flags:
        expected = "x86-64-v3"
    else:
        expected = "x86-64"
    assert target == expected


def test_kernel_dtypes_on_cpu_use_the_extension():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        implementation = choose_implementation(
            "reparameterize", KernelKind.EXTENSION, torch.device("cpu"), dtype
        )
        assert implementation is Implementation.EXTENSION


def test_float64_runs_the_reference():
    implementation = choose_implementation(
        "reparameterize", KernelKind.EXTENSION, torch.device("cpu"), torch.float64
    )
    assert implementation is Implementation.REFERENCE
    mu = torch.randn(3, 4, dtype=torch.float64)
    torch.manual_seed(0)
    z64 = dfkd_fast.reparameterize(mu, mu)
    torch.manual_seed(0)
    z32 = dfkd_fast.reparameterize(mu.float(), mu.float())
    assert z64.dtype == torch.float64
    torch.testing.assert_close(z64.float(), z32, rtol=1e-5, atol=1e-5)


def test_context_manager_forces_the_reference_and_restores():
    cpu = torch.device("cpu")
    with dfkd_fast.use_backend("reference"):
        assert (
            choose_implementation("reparameterize", KernelKind.EXTENSION, cpu, torch.float32)
            is Implementation.REFERENCE
        )
    assert (
        choose_implementation("reparameterize", KernelKind.EXTENSION, cpu, torch.float32)
        is Implementation.EXTENSION
    )


def test_environment_variable_forces_the_reference(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV_VAR, "reference")
    assert backend.requested_backend() is backend.Backend.REFERENCE
    monkeypatch.setenv(backend.BACKEND_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DFKD_FAST_BACKEND"):
        backend.requested_backend()


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        with dfkd_fast.use_backend("cuda"):
            pass


def test_triton_ops_on_cpu_use_the_interpreter_or_their_cpu_kernel(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backend.TRITON_INTERPRET_ENV_VAR, raising=False)
    assert choose_implementation("kd_div", KernelKind.TRITON, cpu, torch.float32) is (
        Implementation.EXTENSION
    )
    assert choose_implementation("no_cpu_kernel", KernelKind.TRITON, cpu, torch.float32) is (
        Implementation.REFERENCE
    )
    monkeypatch.setenv(backend.TRITON_INTERPRET_ENV_VAR, "1")
    assert choose_implementation("kd_div", KernelKind.TRITON, cpu, torch.float32) is (
        Implementation.TRITON_INTERPRETER
    )
    cuda = torch.device("cuda")
    assert choose_implementation("kd_div", KernelKind.TRITON, cuda, torch.float32) is (
        Implementation.TRITON
    )


def test_missing_kernel_falls_back_to_the_reference_with_a_warning():
    with pytest.warns(RuntimeWarning, match="no compiled cpu kernel"):
        implementation = choose_implementation(
            "no_such_op", KernelKind.EXTENSION, torch.device("cpu"), torch.float32
        )
    assert implementation is Implementation.REFERENCE


def _readme_commands() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize(("cpuinfo", "expected"), [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512vl\n", True),
    ("flags\t: fpu avx2 amx_tile amx_bf16\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),
    ("model name\t: a CPU that lists no flags\n", None),
])
def test_bfloat16_instructions_are_read_from_the_cpu_flags(cpuinfo, expected):
    assert backend.cpu_has_bfloat16_instructions(cpuinfo) is expected


def test_the_machine_is_described_by_its_cpu_model_features_and_threads():
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold\n"
    assert machine.cpu_model(cpuinfo) == "Intel(R) Xeon(R) Gold"
    assert machine.cpu_model("processor\t: 0\n") == (platform.processor() or platform.machine())
    described = machine.machine_description()
    assert described["torch"] == torch.__version__
    assert described["threads"] == torch.get_num_threads()
    assert described["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(described["bfloat16_flags"]) <= backend.BFLOAT16_CPU_FLAGS
    assert json.loads(json.dumps(described)) == described  # plain data, for metrics.json
    assert "gpu" not in machine.machine_description("cpu")  # naming a GPU would start CUDA
    label = machine.machine_label({"cpu": "Xeon", "cpu_capability": "AVX512",
                                   "bfloat16_flags": ["amx_bf16", "avx512_bf16"], "threads": 2,
                                   "gpu": "NVIDIA H100"})  # fmt: skip
    assert label == "Xeon (AVX512, amx_bf16 avx512_bf16), 2 threads; NVIDIA H100"
    assert machine.machine_label({"cpu": "x86_64", "threads": 4}) == "x86_64, 4 threads"


def test_ci_runs_the_readme_test_command():
    setup_and_run, setup_and_test = _readme_commands()
    assert setup_and_run.endswith("dfkd-fast distill --resume")
    assert setup_and_test.endswith("python3 -m pytest")
    ci_script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert setup_and_test in ci_script.splitlines()


def test_console_script_points_at_the_cli():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    (script,) = [s for s in scripts if s.name == "dfkd-fast"]
    from dfkd_fast.cli import main

    assert script.load() is main
