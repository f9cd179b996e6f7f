"""A clone of the repository, alone in an empty folder, trains and evaluates offline.

What a new user does first: `git clone`, then run a trainer. Nothing may come from beside the
clone or from the network: the built-in model and task, and the benchmarks shipped in data/.
"""

import os
import shutil
import subprocess
import sys

import pytest

from grpo_runs import ROOT, read_metrics, read_steps


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A `git clone` of this repository (its committed files) in a folder that holds nothing else."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail(f"this test clones the repository with git: {ROOT} must be a git checkout", pytrace=False)
    folder = tmp_path_factory.mktemp("alone") / "cleancredit"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True, capture_output=True, timeout=120)
    assert sorted(path.name for path in folder.parent.iterdir()) == ["cleancredit"]
    return folder


def run_in(folder, *command, timeout=300):
    """`python <command>` from `folder`, offline, importing nothing but what the folder holds."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, *command], cwd=folder, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=timeout)


def test_a_fresh_clone_trains_a_step_of_the_built_in_task(clone):
    result = run_in(clone, "grpo.py", "--total-steps", "1", "--num-prompts", "4", "--group-size", "4",
                    "--max-new-tokens", "64", "--eval-size", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = (clone / "runs").iterdir()  # the default run folder, inside the clone
    [metrics] = read_steps(run_dir)  # the line after step 0's evaluation
    assert metrics["step"] == 1 and metrics["skipped_sequences"] < 16, "some group had signal and was trained"
    assert metrics["eval_accuracy"] is not None
    assert (run_dir / "checkpoints" / "step_1" / "model.safetensors").is_file()


def test_a_fresh_clone_evaluates_a_named_benchmark_from_its_own_data(clone, real_model_dir):
    # The tiny model's context (256 tokens) is shorter than MATH-500's longer prompts (up to 750
    # tokens among the first five), so the real test model (context 8192) reads them.
    result = run_in(clone, "grpo.py", "--model", str(real_model_dir), "--eval-only", "--eval-dataset", "math500",
                    "--eval-size", "5", "--max-new-tokens", "16", "--runs-dir", "eval-runs")
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = (clone / "eval-runs").iterdir()
    [line] = read_metrics(run_dir)
    assert line["eval_dataset"] == "math500" and line["problems"] == 5 and 0.0 <= line["pass@1"] <= 1.0
