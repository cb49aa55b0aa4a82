"""The frozen base's number format on this device: bf16 where the hardware has a fast bf16 path, fp32 otherwise.

    precision  auto   bf16 on a fast bf16 path (CUDA with bf16; a CPU with AMX), fp32 everywhere else
               fp32   the base in fp32
               bf16   the base's weights in bf16; refused where the hardware has no bf16 arithmetic at all
               int8   the decoder blocks' linear weights in int8 (participants.int8_weights), where memory binds;
                      CPU only

What is trained (LoRA, gates) and the optimizer's state stay fp32 whatever the base: PEFT keeps its adapter in
fp32 (`autocast_adapter_dtype`) and casts the adapter's input to it, and the hook branches of lora_hooks compute
in fp32. Why AVX-512 bf16 alone does not count as fast: on this machine kind's CPUs without AMX (AVX-512 bf16
only), oneDNN's bf16 matmul (brgemm avx512_core_bf16) runs at 0.55-0.7x the fp32 speed for SmolLM2's layer
shapes, at 1 and 2 threads; bf16 there only halves the weights' memory, which `bf16` still gives when asked. On
an AMX CPU a bf16 forward pass of SmolLM2 ran 3.1-4.3x faster than fp32 at 2 threads, an AdamW LoRA step 1.3-2.0x.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}  # int8: loaded in fp32, then packed


@dataclass(frozen=True)
class Bf16Hardware:
    """What the device's hardware does with bf16."""
    fast: bool  # a fast path: tensor cores or AMX tiles
    native: bool  # bf16 arithmetic in hardware at all (AVX-512 bf16 counts; fast implies native)
    what: str  # in words, for hardware lines and refusals


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_hardware(device: torch.device) -> Bf16Hardware:
    """Detect the bf16 path of `device`: CUDA's bf16 support; on a CPU, AMX tiles the OS lets this process use
    (torch's own check), else the AVX-512 bf16 flag."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Bf16Hardware(ok, ok, f"CUDA {torch.cuda.get_device_name(device)}" + ("" if ok else " without bf16"))
    if device.type != "cpu":
        return Bf16Hardware(False, False, f"{device.type} (bf16 support unknown)")
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx_bf16" in _cpu_flags())()
    avx512 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in _cpu_flags())()
    if amx:
        return Bf16Hardware(True, True, "CPU with AMX bf16")
    if avx512:
        return Bf16Hardware(False, True, "CPU with AVX-512 bf16, no AMX (bf16 matmul slower than fp32 there)")
    return Bf16Hardware(False, False, "CPU without bf16 arithmetic")


def resolve_precision(asked: str, device: torch.device, hardware: Bf16Hardware | None = None) -> str:
    """`auto` made concrete ("fp32" or "bf16"); bf16 or int8 asked for on hardware without it is refused, naming what fits.
    `hardware` is injectable so that the choice is testable on any host."""
    if asked not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {asked!r}")
    if asked == "int8":
        from participants.int8_weights import int8_supported

        why = int8_supported(device)
        if why:
            raise ValueError(f"precision int8 asked for, but {why}: use precision fp32 or auto")
        return asked
    hw = hardware or bf16_hardware(device)
    if asked == "auto":
        return "bf16" if hw.fast else "fp32"
    if asked == "bf16" and not hw.native:
        raise ValueError(f"precision bf16 asked for, but this device ({hw.what}) has no bf16 arithmetic: "
                         f"use precision fp32 (or auto, which picks fp32 here)")
    return asked


def describe(device: torch.device, precision: str, hardware: Bf16Hardware | None = None) -> str:
    """One hardware line: where it runs, the base's format and why, threads, torch."""
    hw = hardware or bf16_hardware(device)
    return (f"{hw.what}; base {precision}; {torch.get_num_threads()} torch threads; torch {torch.__version__}")
