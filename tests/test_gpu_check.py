"""bench/gpu_check.sh --cpu-smoke: the GPU check script end to end on the CPU at
toy sizes, so it cannot rot before a GPU comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_writes_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("AUTOTRANSFER_SIMULATED_GPUS", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    assert result["mode"] == "cpu-smoke"
    [row] = result["throughput"]
    assert row["freeze"] == 0.75 and row["placement"]["device"] == "cpu"
    assert min(row["engine_img_s"], row["plain_img_s"], row["reference_img_s"]) > 0
    [study] = result["studies"]
    assert study["trials"] == 2 and study["failed"] == [] and study["startup_s_median"] >= 0
    [device] = study["devices"]  # each trial recorded the simulated GPU it ran on
    assert json.loads(device)["device"] == "cuda:0" and json.loads(device)["simulated"]
    assert result["oom"]["outcome"] == "oom" and result["oom"]["within_1_gib"]
    md = (tmp_path / "gpu-cpu-smoke.md").read_text()
    assert "## Training throughput" in md and "## Study" in md and "## Out of memory" in md
