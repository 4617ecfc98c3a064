"""The Triton kernels' parity checks (tests/kernels_interpreted_checks.py), run on CPU by Triton's
interpreter in a fresh process: TRITON_INTERPRET=1 only takes effect if it is set before triton
is first imported, and in this session transformers (through torch._dynamo) may have imported it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

CHECKS = Path(__file__).with_name("kernels_interpreted_checks.py")


def test_triton_kernels_match_references_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        cwd=CHECKS.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # every check ran and passed: nothing skipped, deselected or xfailed
    summary = re.search(r"^(\d+) passed(, \d+ warnings?)? in [\d.]+s", output.strip().splitlines()[-1])
    assert summary and int(summary.group(1)) == 17, output[-2000:]
