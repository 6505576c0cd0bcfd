# A short run of the coverage-guided fuzz target (the 10-minute run is `make fuzz`): it must finish
# its time budget without a crash, an assertion or a hang.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fuzz_target_runs_clean_for_15_seconds(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "fuzz_client_hello.py"), "-max_total_time=15", "-timeout=5",
         f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr and not list(tmp_path.glob("crash-*"))
