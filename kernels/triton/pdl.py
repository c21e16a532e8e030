"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-step kernels.

Normally a kernel starts only once the one before it in the stream has finished, so every kernel of a decode
step pays its launch, its ramp-up (the first DRAM round trips) and its predecessor's tail in series -- about
3 us per kernel on the H100, and a decode step runs ~150 kernels. With PDL a kernel launched with
``launch_pdl=True`` may start as soon as every program of the kernel before it has called
``gdc_launch_dependents``; it then does whatever does not depend on its predecessor (a projection streams
its weight tile) and calls ``gdc_wait``, which returns once the predecessor has completed and its writes are
visible.

The rules every kernel here follows, which make the chain safe:
* ``pdl_trigger`` first (the next kernel may launch; all of this kernel's programs are resident by then, so
  waiting programs of the next kernel can never starve this one);
* ``pdl_wait`` before reading anything an earlier kernel writes and before writing anything, so a kernel never
  overwrites data its predecessor still reads, and every kernel completes only after its predecessor did (the
  ordering is transitive along the chain, also for kernels that read no output of their direct predecessor).
  Reads before the wait are only of data no kernel of the chain writes: weights, and what was written before
  the chain began -- host copies into the step's input buffers and the recurrent state a layer wrote in an
  earlier step (a chain starts behind a kernel launched without the attribute, such as the step's first, the
  embedding, which starts only once all earlier work of the stream has finished).
Kernels launched without the attribute (cuBLAS, flashinfer, torch) keep full stream order on both sides.

``BATON_PDL=0`` turns it off (for measuring with and without, and as an escape hatch); it is off under
Triton's interpreter and on GPUs older than sm_90.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch_args(device: torch.device) -> dict:
    """Extra launch arguments for a PDL-aware kernel: its ``PDL`` constexpr, plus ``launch_pdl`` when on."""
    enabled = (
        device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET", "0") != "1"
        and os.environ.get("BATON_PDL", "1") != "0"
        and _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())
    )
    return {"PDL": True, "launch_pdl": True} if enabled else {"PDL": False}


@triton.jit
def pdl_trigger(ENABLED: tl.constexpr):
    """Allow the next kernel in the stream to launch (it will wait for this one before touching data)."""
    if ENABLED:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(ENABLED: tl.constexpr):
    """Block until the previous kernel in the stream has completed and its writes are visible."""
    if ENABLED:
        tl.extra.cuda.gdc_wait()
