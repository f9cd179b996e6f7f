"""The shared plumbing of every trainer: the command line, run folders, checkpoints, tracking."""

import dataclasses
import importlib
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from common import UsageError
from common.cli import parse_args
from common.model import load_model, load_tokenizer
from common.runs import RunLog, flatten_metrics, latest_checkpoint, restore_checkpoint, save_checkpoint
from grpo import Args
from grpo_runs import ROOT, TRAINERS, read_metrics, run_grpo


def help_lines(trainer: str) -> dict[str, str]:
    """{flag: its whole --help entry on one line} of `trainer`."""
    result = subprocess.run([sys.executable, trainer, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0
    entries = re.split(r"\n(?=  -)", result.stdout.split("\noptions:\n")[1])  # one per flag, wrapped lines joined
    return {entry.split()[0]: " ".join(entry.split()) for entry in entries}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_flag_of_every_trainer_shows_its_default(trainer):
    lines = help_lines(f"{trainer}.py")
    for field in dataclasses.fields(importlib.import_module(trainer).Args):
        line = lines["--" + field.name.replace("_", "-") + ("," if field.type in (bool, bool | None) else "")]
        assert "default: " in line, line


def test_help_shows_the_defaults_and_the_allowed_values():
    lines = help_lines("grpo.py")
    assert "--total-steps TOTAL_STEPS" in lines["--total-steps"] and "(default: 80)" in lines["--total-steps"]
    assert "(default: on)" in lines["--scale-by-std,"] and "(default: off)" in lines["--shuffle-rewards,"]
    assert "--template {chat,chat-boxed,plain}" in lines["--template"]
    assert "--kl-estimator {k1,k2,k3}" in lines["--kl-estimator"]
    assert "{token-mean,seq-mean-token-mean,seq-mean-token-sum,dr-grpo}" in lines["--loss-aggregation"]


@pytest.mark.parametrize("argv, message", [
    (["--kl-estimator", "k4"], "--kl-estimator must be one of k1, k2, k3 (got 'k4')"),
    (["--total-steps", "many"], "argument --total-steps: invalid int value: 'many'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--num-prompts", "0"], "--num-prompts must be positive (got 0)"),
    (["--eval-size", "-1"], "--eval-size must be 0 or more (got -1)"),
])
def test_command_line_mistakes_are_one_line_usage_errors(argv, message):
    with pytest.raises(UsageError) as error:
        parse_args(Args, argv)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_float_flag_of_every_trainer_refuses_nan_and_inf_in_one_line(trainer):
    args_class = importlib.import_module(trainer).Args
    float_fields = [field for field in dataclasses.fields(args_class) if field.type in (float, float | None)]
    assert len(float_fields) >= 5, "every trainer has float flags (learning rate, clip ranges, ...)"
    for field in float_fields:
        flag = "--" + field.name.replace("_", "-")
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(UsageError) as error:
                parse_args(args_class, [f"{flag}={value}"])  # "=": argparse would take a bare -inf for a flag
            assert str(error.value) == f"{flag} must be a finite number (got {float(value)})"
        parse_args(args_class, [flag, "0.5"])  # a finite value of the same flag parses


def test_a_resumed_run_refuses_a_non_finite_saved_value(tmp_path):
    saved = {**dataclasses.asdict(Args()), "learning_rate": float("nan")}
    (tmp_path / "args.json").write_text(json.dumps(saved))  # json writes NaN, and reads it back
    with pytest.raises(UsageError, match="--learning-rate must be a finite number"):
        parse_args(Args, ["--resume", str(tmp_path)])


def test_resume_keeps_the_saved_arguments_unless_typed_again(tmp_path):
    saved = dataclasses.asdict(Args(total_steps=7, learning_rate=3e-5, scale_by_std=False))
    (tmp_path / "args.json").write_text(json.dumps(saved))
    args = parse_args(Args, ["--resume", str(tmp_path), "--total-steps", "9", "--scale-by-std"])
    assert (args.total_steps, args.learning_rate, args.scale_by_std) == (9, 3e-5, True)
    with pytest.raises(UsageError, match="not a run folder"):
        parse_args(Args, ["--resume", str(tmp_path / "missing")])


def test_checkpoint_holds_extra_models_and_states_and_restores_them(tmp_path):
    policy, tokenizer, reward_model = load_model("tiny", "cpu"), load_tokenizer("tiny"), load_model("tiny", "cpu")
    with torch.no_grad():
        next(reward_model.parameters()).add_(1.0)  # so that it differs from the policy on disk
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, model in
                  (("optimizer", policy), ("reward_optimizer", reward_model))}
    for model, optimizer in zip((policy, reward_model), optimizers.values()):
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optimizer.step()
    state = {**optimizers, "reward_model": reward_model}
    random.seed(5)
    torch.manual_seed(5)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, policy, tokenizer, state, keep=2)
    expected_draws = (random.random(), torch.rand(3))
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step_3" and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]
    reloaded = load_model(str(checkpoint / "reward_model"), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), reward_model.parameters()))
    fresh = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, model in
             (("optimizer", policy), ("reward_optimizer", reward_model))}
    assert restore_checkpoint(checkpoint, policy, {**fresh, "reward_model": reward_model}) == 3
    for name in fresh:
        restored, original = fresh[name].state_dict()["state"], optimizers[name].state_dict()["state"]
        assert all(torch.equal(restored[k]["exp_avg"], original[k]["exp_avg"]) for k in original)
    assert (random.random(), torch.rand(3)).__repr__() == expected_draws.__repr__()


def test_resumed_log_drops_the_steps_after_the_checkpoint(tmp_path):
    args = Args()
    log = RunLog(tmp_path / "run", args)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 0.5})
    log.close()
    log = RunLog(tmp_path / "run", args, resume_step=2)
    log.log({"step": 3, "loss": 0.25})
    log.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "run")] == [(1, 0.5), (2, 0.5), (3, 0.25)]


def test_flatten_metrics_names_nested_values_by_path_and_drops_the_unmeasured():
    metrics = {"loss": 0.5, "kl": None, "skipped": 3, "eval": {"gsm8k": {"pass@1": 0.25}}, "set": "gsm8k", "done": True}
    assert flatten_metrics(metrics) == {"loss": 0.5, "skipped": 3, "eval/gsm8k/pass@1": 0.25}


def test_tracked_run_sends_the_same_steps_and_metrics_to_trackio(tmp_path):
    env_dir = tmp_path / "trackio"
    result = run_grpo("--num-prompts", "4", "--group-size", "4", "--max-new-tokens", "64", "--eval-size", "10",
                      "--eval-every", "2", "--total-steps", "3", "--track", "--track-project", "skeleton-test",
                      "--runs-dir", str(tmp_path / "runs"), env={"TRACKIO_DIR": str(env_dir)})
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = (tmp_path / "runs").iterdir()
    logged = read_metrics(run_dir)
    records = subprocess.run(
        [sys.executable, "-c", "import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
         "print(json.dumps([S.get_runs('skeleton-test'), S.get_logs('skeleton-test', sys.argv[1])]))", run_dir.name],
        env={**os.environ, "TRACKIO_DIR": str(env_dir)}, capture_output=True, text=True, check=True).stdout
    runs, tracked = json.loads(records.strip().splitlines()[-1])
    assert runs == [run_dir.name]
    assert [record["step"] for record in tracked] == [line["step"] for line in logged] == [0, 1, 2, 3]
    for record, line in zip(tracked, logged):
        expected = flatten_metrics({key: value for key, value in line.items() if key != "step"})
        assert {key for key in record if key not in ("step", "timestamp")} == set(expected)
        assert all(record[key] == pytest.approx(value) for key, value in expected.items())
    assert [("eval/arithmetic/pass@1" in record) for record in tracked] == [True, False, True, True]
    assert "eval/arithmetic/pass@1_low" in tracked[0] and "eval/arithmetic/greedy_correct" not in tracked[0]  # text


def test_an_unavailable_tracker_is_a_one_line_error_before_any_run_folder(tmp_path):
    blocked = tmp_path / "blocked" / "wandb"  # whether or not wandb is installed, importing it fails
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    result = run_grpo("--track", "--tracker", "wandb", "--total-steps", "1", "--runs-dir", str(tmp_path / "runs"),
                      env={"PYTHONPATH": str(blocked.parent)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and re.match(r"grpo\.py: error: --track needs wandb", lines[0]), result.stderr
    assert not (tmp_path / "runs").exists()
