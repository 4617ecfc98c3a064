"""`vicuna_cli.train.memory`: freed training tensors go back to the kernel (glibc)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from vicuna_cli.train import memory

# Reproduces what training does to glibc: one big tensor freed (it raises the dynamic mmap
# threshold to its size), then many mid-size blocks (activations, gradients) freed while a small
# allocations made between them (kept, like the optimizer state) stop the heap from shrinking.
PROBE = r"""
import json, sys
from vicuna_cli.train.memory import return_freed_memory
applied = return_freed_memory() if sys.argv[1] == "on" else False
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
big = b"x" * (16 << 20)  # under 32 MB, the most the dynamic threshold grows to
del big
before = rss()
blocks, kept = [], []
for _ in range(50):
    blocks.append(b"y" * (4 << 20))
    kept.append(b"z" * (256 << 10))
del blocks
print(json.dumps({"applied": applied, "kept_mb": rss() - before}))
"""


def _probe(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=environment, timeout=60)
    return json.loads(out.stdout)


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the fix is glibc's mallopt")


@glibc
def test_freed_blocks_return_to_the_kernel() -> None:
    hoarded = _probe("off")
    freed = _probe("on")
    assert hoarded["applied"] is False and freed["applied"] is True
    assert hoarded["kept_mb"] > 150  # 200 MB of freed 4 MB blocks stay in the heap by default
    assert freed["kept_mb"] < 20


@glibc
def test_user_malloc_tuning_is_left_alone() -> None:
    assert _probe("on", MALLOC_MMAP_THRESHOLD_="65536")["applied"] is False
    assert _probe("on", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")["applied"] is False


def test_other_platforms_are_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.platform, "system", lambda: "Darwin")
    assert memory.return_freed_memory() is False
