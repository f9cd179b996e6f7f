"""Running grpo.py as a user does (a subprocess, offline) and reading what it logged; shared by tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_grpo(*flags, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "grpo.py", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
