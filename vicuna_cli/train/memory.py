"""Stop glibc's malloc from hoarding the memory that training frees.

Measured on `vicuna train sft` (SmolLM2-135M, fp32, CPU, --max-length 2048, 3 steps of batch 2):
with glibc's default *dynamic* mmap threshold, the first freed multi-MB tensor raises the
threshold to its size (up to 32 MB), so from then on the activations, recomputed layers and
gradients of every step are carved out of the heap. `zero_grad(set_to_none=True)` and the end of
each backward free them, but the heap keeps the holes (748 MB free inside a 2.3 GB heap when the
longest step's backward began) and grows again: peak RSS 3,761 MB. Fixing the threshold (which
turns the dynamic adjustment off) puts every block of 128 KiB or more in its own mapping, given
back to the kernel on free: the same run peaked at 2,735 MB, with identical losses (3 steps: 247 s
vs 225 s without the fix, in concurrent runs on a loaded shared machine, i.e. within its noise).

That fix had a price: every block of the threshold or more is a fresh mapping, page-faulted and
zeroed by the kernel on each step. At 128 KiB (glibc's starting value) it was ~25 % of `train rm`'s
CPU time, so the threshold is 1 MiB: activations and gradients of the multi-MB kind that caused the
hoarding still go back to the kernel, the many small per-head blocks are reused from the heap.
Measured 2026-12-03 in-process on `vicuna train rm` (HH-RLHF harmless-base pairs, embedded model,
fp32, --threads 1, 3 steps of 8 pairs, --max-length 256; getrusage around each optimizer step, one
run per setting, machine at load 8-13 so user time is good to ~10 %), CPU s per step, peak RSS:

    setting                       user   sys    minor faults/step   peak RSS
    fixed 128 KiB (before)        12.4   4.58   2.29 M              3,248 MB
      the same, a second run      13.5   5.14   2.25 M              3,249 MB
    fixed 1 MiB (now)             12.2   1.91   0.87 M              3,399 MB
    fixed 4 MiB                   13.4   1.07   0.32 M              3,588 MB
    fixed 32 MiB                  13.5   1.24   0.31 M              3,588 MB
    glibc's dynamic default       13.1   0.86   0.32 M              3,557 MB

Losses were identical in every setting (0.6539, 0.7101, 0.7685), and a 6-step run at 1 MiB wrote
the same weights, byte for byte, as one at 128 KiB. The probe is now `python
benchmarks/bench_malloc.py --data TRAIN.jsonl` (bench_rm.py's work-dir/train.jsonl, 1,489 pairs;
same child and flags); re-run with it at 13:03 on a quieter machine (load 2.6-3.5), 3 steps:
128 KiB user 11.50 + sys 3.82 s per step, 2.24 M faults, 3,251 MB; 1 MiB 11.00 + 1.52 s, 0.90 M,
3,440 MB. The sft case above keeps its win at 1 MiB: BENCHMARKS.md's sft command
(--max-length 2048, 3 steps of 2, gradient checkpointing, --threads 1, 745 cleaned conversations)
peaked at 2,786 MB with 128 KiB and 2,802 MB with 1 MiB (/usr/bin/time -v; user+sys 82 s vs 76 s),
identical losses (5.4829, 3.1928, 4.0003).

glibc only (`mallopt` with these options is glibc's; elsewhere this does nothing). Users who tune
malloc themselves (MALLOC_*_ variables or glibc.malloc tunables) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD = 1024 * 1024  # see the docstring: 128 KiB cost 2.4x the sys time for 5 % less peak RSS
_TUNING_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _TUNING_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
