"""One-wave persistent launches with a grid-wide barrier: the one-launch GDN mixer with out_proj
(kernels/triton/gdn_out_decode.py).

A decode step is a chain of small dependent kernels; each boundary costs the predecessor's tail and the
successor's ramp-up even under PDL. Where a block's steps depend on each other across the whole grid
(out_proj needs every head's output), one launch whose programs all stay resident can replace a boundary by
a grid barrier. Measured on the H200 it does not always pay: a one-wave grid has few warps per SM, so less
memory in flight than a many-wave kernel (kernels/NOTES_fused.md).

``grid_barrier``: arrive on a counter (acq_rel), the last program to arrive resets it and bumps a generation
word; the others spin until the generation moves. It is safe only if all programs are resident at once: the
grid is the SMs times at most 8 warps' worth of programs per SM (``resident_programs``: resident whatever the
register count), and under PDL the kernel after ours starts only once every program here has called the
trigger, so it can never take the place of one of ours. The two int32 words belong to one launch site (one
layer) and stream, and are back at 0 and an arbitrary generation between launches. Under Triton's interpreter,
which runs programs one after another, a barrier would wait forever: callers run their phases as separate
launches there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def check_resident(programs_per_sm: int, num_warps: int) -> None:
    """Every program must be resident at once (the grid barrier waits for all of them). At most 8 warps per SM
    guarantees it whatever the kernel's register count: 8 x 32 threads x 255 registers fit an SM's 64K
    registers (and 256 threads, a few KiB of shared memory, are far from the other limits)."""
    if programs_per_sm < 1 or programs_per_sm * num_warps > 8:
        raise ValueError(f"programs_per_sm * num_warps must be in [1, 8] (all programs resident), got "
                         f"{programs_per_sm} x {num_warps}")


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the grid-stride loops take several items each
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_sync(sync: torch.Tensor, device: torch.device) -> None:
    if sync.shape != (2,) or sync.dtype != torch.int32 or sync.device != device:
        raise ValueError(f"sync must be an int32 [2] tensor on {device}")


@triton.jit
def grid_barrier(sync_ptr, num_programs):
    """Every program of the launch waits here until all have arrived; stores before it are visible to loads
    after it in every program (read such data with .cg: this SM's L1 may hold an older line).
    ``sync_ptr[0]``: arrivals (0 between barriers), ``sync_ptr[1]``: generation."""
    tl.debug_barrier()  # all threads of this program have stored
    generation = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")  # ordered before the release below
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        current = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        while current == generation:
            current = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
    tl.debug_barrier()
