"""Time per GRPO step and its split, from real grpo.py runs (a benchmark, not a test).

    python benchmarks/benchmark_grpo_step.py [--steps 12] [--threads 1 2] [extra grpo.py flags ...]

Runs grpo.py at the reference batch (8 prompts x 8 samples, up to 32 new tokens; the tiny model
unless the extra flags name a --model) once per thread count, then prints the mean of each
timing in metrics.jsonl, skipping the first two steps (warm-up). Compare numbers from one
invocation only: these machines are noisy.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("time_generate", "time_score", "time_train", "time_step")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps per run (the first two are not counted)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to compare")
    args, grpo_flags = parser.parse_known_args()
    print(f"{'threads':>7} " + " ".join(f"{name:>14}" for name in TIMINGS) + f" {'tokens/s':>9}")
    for threads in args.threads:
        with tempfile.TemporaryDirectory() as runs:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, "grpo.py", "--num-prompts", "8", "--group-size", "8", "--max-new-tokens", "32",
                       "--total-steps", str(args.steps), "--eval-size", "8", "--eval-every", "0", "--runs-dir", runs,
                       *grpo_flags]
            subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
            [run_dir] = Path(runs).iterdir()
            steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]
        means = {name: statistics.mean(step[name] for step in steps) for name in (*TIMINGS, "tokens_per_sec")}
        print(f"{threads:>7} " + " ".join(f"{means[name]:>13.3f}s" for name in TIMINGS) + f" {means['tokens_per_sec']:>9.0f}")


if __name__ == "__main__":
    main()
