"""Running a trainer as a user does (a subprocess, offline) and reading what it logged; shared by tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from common.data import DEFAULT_DATA_DIR, render_prompt
from common.model import load_model, load_tokenizer
from common.rollout import generate

ROOT = Path(__file__).resolve().parents[1]
# For a test that compares numbers exactly (two runs, a resumed run, a checkpoint against float32
# weights): with CUDA visible a trainer runs on the GPU in bfloat16, where such comparisons fail.
ON_CPU = ("--device", "cpu")
TRAINERS = sorted(path.stem for path in ROOT.glob("*.py"))  # grpo and every method file copied from it
# The smallest run that trains the real test model (SmolLM2-135M, slow on CPU) on GSM8K problems.
REAL_MODEL_GSM8K_RUN = ["--dataset", str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl"), "--eval-dataset", "gsm8k",
                        "--eval-size", "2", "--total-steps", "2", "--num-prompts", "2", "--group-size", "2",
                        "--max-new-tokens", "16", "--learning-rate", "1e-5", "--eval-every", "0"]


def run_trainer(script: str, *flags, timeout=240, env=None):
    """`python <script> <flags>` in a subprocess from the project root, offline, with `env` added."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_fails_at_start_up_with_one_line(script: str, flags, message: str, runs_dir: Path):
    """`python <script> <flags>` stops with one `<script>: error: ...` line holding `message`, and no run folder."""
    result = run_trainer(script, *flags, "--runs-dir", str(runs_dir), timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:") and message in lines[0], result.stderr
    assert not any(runs_dir.iterdir()), "a failed start must not leave a run folder"


def run_grpo(*flags, timeout=240, env=None):
    return run_trainer("grpo.py", *flags, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_steps(run_dir: Path) -> list[dict]:
    """The training steps' lines of a run's metrics.jsonl, after checking that its first line is the
    held-out evaluation before the first update (step 0) and the only one of its kind."""
    start, *steps = read_metrics(run_dir)
    assert start["step"] == 0 and set(start) == {"step", "eval_accuracy", "eval"}, start
    assert start["eval_accuracy"] == next(iter(start["eval"].values()))["pass@1"]
    assert all(line["step"] > 0 for line in steps)
    return steps


def sampled_tiny_batch():
    """The tiny model and a batch it sampled (seed 0): 2 arithmetic prompts x 4 responses of up to 48
    tokens, as the trainers hand it to their passes: input_ids and attention_mask [8, P + C], mask [8, C]."""
    policy, tokenizer = load_model("tiny", "cpu"), load_tokenizer("tiny")
    torch.manual_seed(0)
    prompts = [render_prompt(tokenizer, q, "chat") for q in ("Compute 12+34.", "Compute 99-10+11-40.")]
    rollout = generate(policy, tokenizer, [p for p in prompts for _ in range(4)], max_new_tokens=48)
    return policy, {"input_ids": torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1),
                    "attention_mask": torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1),
                    "mask": rollout.completion_mask.float()}
