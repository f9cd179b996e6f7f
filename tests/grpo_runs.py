"""Running a trainer as a user does (a subprocess, offline) and reading what it logged; shared by tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

from common.data import DEFAULT_DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
# The smallest run that trains the real test model (SmolLM2-135M, slow on CPU) on GSM8K problems.
REAL_MODEL_GSM8K_RUN = ["--dataset", str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl"), "--eval-dataset", "gsm8k",
                        "--eval-size", "2", "--total-steps", "2", "--num-prompts", "2", "--group-size", "2",
                        "--max-new-tokens", "16", "--learning-rate", "1e-5", "--eval-every", "0"]


def run_trainer(script: str, *flags, timeout=240, env=None):
    """`python <script> <flags>` in a subprocess from the project root, offline, with `env` added."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_grpo(*flags, timeout=240, env=None):
    return run_trainer("grpo.py", *flags, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
