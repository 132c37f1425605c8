"""The worker's hardware: CPU instruction sets read from /proc/cpuinfo, the GPU from torch."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from worker import hardware
from worker.schemas import HardwareInfo

TWO_XEONS = """\
processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8

processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8
"""


def test_instruction_sets_are_read_from_cpuinfo() -> None:
    cpu = hardware.detect_cpu(TWO_XEONS, "x86_64")
    assert cpu.name == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.instruction_sets == (
        "amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_vnni", "avx512f",
    )  # fmt: skip
    assert cpu.vnni and not cpu.int8_overflows
    assert cpu.describe() == "x86_64 with AMX-INT8, AVX512-VNNI"


@pytest.mark.parametrize(
    ("cpuinfo", "arch", "vnni", "overflows"),
    [
        ("flags : sse2 avx avx2 fma", "x86_64", False, True),  # Haswell .. Skylake client
        ("flags : avx2 avx512f avx512_vnni", "x86_64", True, False),  # Cascade Lake, Zen 4
        ("flags : avx2 avx_vnni", "x86_64", True, False),  # Alder Lake
        ("Features : fp asimd asimddp i8mm", "aarch64", False, False),  # ARM: no u8 x s8 saturation
        ("", "x86_64", False, True),  # unreadable: assume the older CPU, whose default is safe
    ],
)
def test_where_int8_kernels_overflow(cpuinfo: str, arch: str, vnni: bool, overflows: bool) -> None:
    cpu = hardware.detect_cpu(cpuinfo, arch)
    assert (cpu.vnni, cpu.int8_overflows) == (vnni, overflows)


def test_this_worker_is_read_once_and_reported_as_typed() -> None:
    this = hardware.worker_cpu()
    assert this is hardware.worker_cpu()
    assert this == hardware.detect_cpu()
    report = hardware.worker_hardware("cpu")
    assert report == {"cpu": this.to_dict()}
    assert HardwareInfo.model_validate(report).to_json() == report  # absent gpu stays absent


def test_a_gpu_job_reports_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 * 2**30)
    cuda = SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 2, get_device_properties=lambda i: props
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    report = hardware.worker_hardware("gpu")
    assert report["gpu"] == {
        "name": "NVIDIA H200", "count": 2, "compute_capability": "9.0",
        "memory_bytes": 141 * 2**30,
    }  # fmt: skip
    assert HardwareInfo.model_validate(report).to_json()["gpu"]["count"] == 2
    assert "gpu" not in hardware.worker_hardware("cpu")  # a cpu job does not look
    cuda.is_available = lambda: False
    assert "gpu" not in hardware.worker_hardware("gpu")
