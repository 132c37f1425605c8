"""The worker's hardware: its CPU's instruction sets and its GPU, for the job's report and
for the defaults that depend on them.

Torch-free at import (the API imports the method modules, which import this one); the GPU
is read with ``torch.cuda`` inside :func:`detect_gpu`, which only the worker calls.

Why the CPU matters: int8 kernels multiply uint8 activations by int8 weights. On x86 CPUs
without VNNI they do it with ``vpmaddubsw``, which adds pairs of products into int16 and
saturates; 7-bit weights (``reduce_range``) keep the sums in range, at the cost of one bit
of weight precision. With AVX512-VNNI, AVX-VNNI or AMX the products go straight into
int32 and full-range weights are both safe and more accurate. ARM CPUs have no such
overflow either.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

CPUINFO = Path("/proc/cpuinfo")

INSTRUCTION_SETS = (
    "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "bf16", "sve",
)  # fmt: skip
"""The instruction sets squish looks for (Linux ``/proc/cpuinfo`` names; the last five
are ARM's: NEON, int8 dot product, int8 matrix multiply, bf16, SVE)."""

_VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@dataclass(frozen=True)
class Cpu:
    """The worker's CPU.

    Attributes:
        arch: ``platform.machine()``, lower case (``x86_64``, ``aarch64``, ...).
        name: the model name the kernel reports, if any.
        instruction_sets: those of :data:`INSTRUCTION_SETS` it has, sorted; empty when
            they could not be read (no ``/proc/cpuinfo``).
    """

    arch: str
    name: str | None
    instruction_sets: tuple[str, ...]

    @property
    def x86(self) -> bool:
        return self.arch in _X86

    @property
    def vnni(self) -> bool:
        """Has an int8 dot-product instruction that accumulates in int32 (VNNI or AMX)."""
        return bool(_VNNI.intersection(self.instruction_sets))

    @property
    def int8_overflows(self) -> bool:
        """Whether u8 x s8 int8 kernels saturate here: x86 without VNNI (also when the
        instruction sets are unknown: assume the older CPU, whose default is safe)."""
        return self.x86 and not self.vnni

    def describe(self) -> str:
        """``x86_64 with AVX512-VNNI`` / ``x86_64 without VNNI (AVX2)``: for log lines."""
        if not self.x86:
            return self.arch
        if self.vnni:
            found = sorted(_VNNI.intersection(self.instruction_sets))
            return f"{self.arch} with {', '.join(s.upper().replace('_', '-') for s in found)}"
        widest = "AVX2" if "avx2" in self.instruction_sets else "unknown instruction sets"
        return f"{self.arch} without VNNI ({widest})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "name": self.name,
            "instruction_sets": list(self.instruction_sets),
            "vnni": self.vnni,
            "int8_overflows": self.int8_overflows,
        }


@dataclass(frozen=True)
class Gpu:
    """The worker's first CUDA device, and how many there are."""

    name: str
    count: int
    compute_capability: str
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "compute_capability": self.compute_capability,
            "memory_bytes": self.memory_bytes,
        }


def parse_cpuinfo(text: str, arch: str) -> Cpu:
    """The CPU that a ``/proc/cpuinfo`` text describes (its first processor's ``flags``
    on x86, ``Features`` on ARM)."""
    flags: set[str] = set()
    name: str | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and name is None:
            name = value.strip() or None
    found = tuple(sorted(s for s in INSTRUCTION_SETS if s in flags))
    return Cpu(arch=arch.lower(), name=name, instruction_sets=found)


def detect_cpu(cpuinfo: str | None = None, arch: str | None = None) -> Cpu:
    """This machine's CPU; ``cpuinfo`` and ``arch`` stand in for ``/proc/cpuinfo`` and
    ``platform.machine()`` (tests force a CPU with them)."""
    arch = arch or platform.machine() or "unknown"
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    return parse_cpuinfo(cpuinfo, arch)


@functools.cache
def worker_cpu() -> Cpu:
    """The CPU of the machine this process runs on, read once."""
    return detect_cpu()


def detect_gpu() -> Gpu | None:
    """The first CUDA device torch sees, or None (imports torch: worker only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return Gpu(
        name=str(props.name),
        count=int(torch.cuda.device_count()),
        compute_capability=f"{props.major}.{props.minor}",
        memory_bytes=int(props.total_memory),
    )


def worker_hardware(device: str) -> dict[str, Any]:
    """What a job's report says about the machine: the CPU, and the GPU on a ``gpu`` job
    (a ``cpu`` job does not import torch for it)."""
    hardware: dict[str, Any] = {"cpu": worker_cpu().to_dict()}
    if device == "gpu":
        gpu = detect_gpu()
        if gpu is not None:
            hardware["gpu"] = gpu.to_dict()
    return hardware


@runtime_checkable
class HardwareDefaults(Protocol):
    """Params whose defaults depend on the worker's hardware: the pipeline fills them in
    before the step runs, so the step's recorded params are the ones that ran."""

    def for_hardware(self, fmt: str, cpu: Cpu) -> Any:
        """A copy with every hardware-dependent default that was left unset filled in."""
        ...

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


class _Log(Protocol):
    def log(self, message: str, level: str = ..., data: dict | None = ...) -> None: ...


def fill_defaults(params: Any, fmt: str, log: _Log, *, method: str) -> Any:
    """``params`` with the defaults that depend on this worker's CPU filled in; ``log`` (a
    reporter) is told which were chosen and for what CPU. Params without such defaults,
    or with them all given, come back as they are."""
    if not isinstance(params, HardwareDefaults):
        return params
    cpu = worker_cpu()
    filled = params.for_hardware(fmt, cpu)
    before, after = params.model_dump(mode="json"), filled.model_dump(mode="json")
    chosen = {key: value for key, value in after.items() if before.get(key) != value}
    if chosen:
        shown = ", ".join(f"{key}={str(value).lower()}" for key, value in chosen.items())
        log.log(
            f"{method}: {shown} chosen for this worker's CPU ({cpu.describe()}); a rerun on "
            "another CPU may choose otherwise: set it in the step's params to fix it",
            data={**chosen, "cpu": cpu.to_dict()},
        )
    return filled
