"""Running a trainer as a user does (a subprocess, offline) and reading what it logged; shared by tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_trainer(script: str, *flags, timeout=240, env=None):
    """`python <script> <flags>` in a subprocess from the project root, offline, with `env` added."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_grpo(*flags, timeout=240, env=None):
    return run_trainer("grpo.py", *flags, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
