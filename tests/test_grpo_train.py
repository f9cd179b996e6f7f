"""grpo.py as a trainer: the update's shortcuts are exact, and whole runs work, resume and fail cleanly."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo import Args, completion_logprobs, policy_gradient_pass
from grpo_runs import ON_CPU, ROOT, TRAINERS, read_metrics, read_steps, run_grpo, run_trainer, sampled_tiny_batch

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo"]
# A short run: 4 prompts x 4 samples, 20 held-out problems.
SHORT_RUN = ["--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "8", "--eval-size", "20",
             "--max-new-tokens", "64", "--eval-every", "2"]


@pytest.fixture(scope="module")
def sampled_batch():
    policy, batch = sampled_tiny_batch()
    # Second group all-equal (zero advantage), first group mixed; one zero inside it too.
    # Per token [B, C], as the trainer hands them to the loss: the response's value on its tokens.
    batch["advantages"] = torch.tensor([1.5, -0.5, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]).view(-1, 1) * batch["mask"]
    return policy, batch


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_skipping_zero_advantage_sequences_gives_the_same_gradient(sampled_batch, aggregation):
    policy, batch = sampled_batch
    args = Args(micro_batch_size=3, loss_aggregation=aggregation, max_new_tokens=48)
    size = batch["mask"].shape[0]
    totals = {"num_sequences": size, "num_tokens": batch["mask"].sum()}

    def gradient(indices):
        policy.zero_grad(set_to_none=True)
        old_logp = torch.full_like(batch["mask"], float("nan"))
        policy_gradient_pass(policy, batch, indices, args, old_logp, None, totals)
        return [p.grad.clone() for p in policy.parameters()]

    full = gradient(torch.arange(size))
    skipped = gradient(torch.nonzero(batch["advantages"].any(dim=1)).flatten())
    assert any(g.abs().sum() > 0 for g in full)
    for g_full, g_skip in zip(full, skipped):
        # Equal up to float32 summation order (micro-batches group the sequences differently).
        assert (g_full - g_skip).abs().max() <= 1e-5 * g_full.abs().max() + 1e-9


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_per_token_term_added_to_the_loss_trains_zero_advantage_sequences_once_they_are_chosen(trainer,
                                                                                                  monkeypatch):
    """The trap for whoever copies a trainer: its update leaves out zero-advantage sequences unless
    rows_with_gradient, in the method's marked block, picks them. An SFT-style term added to the
    loss (-0.1 log p on every token) on a batch whose advantages are all 0 trains nothing as the
    file stands, and trains once the marked block returns every sequence; nothing else changes."""
    module = importlib.import_module(trainer)
    policy, batch = sampled_tiny_batch()
    batch["advantages"] = torch.zeros_like(batch["mask"])
    surrogate = module.clipped_surrogate

    def with_sft_term(logp, *rest):
        token_loss, clipped = surrogate(logp, *rest)
        return token_loss - 0.1 * logp, clipped

    def gradient_norm():
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        norms = []
        parameters = list(policy.parameters())
        optimizer.step = lambda: norms.append(sum(p.grad.norm().item() for p in parameters if p.grad is not None))
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=0.0), lambda step: 1.0)
        args = module.Args(micro_batch_size=8, max_new_tokens=48)
        module.update_policy(policy, None, optimizer, scheduler, batch, args)
        return norms[0]

    monkeypatch.setattr(module, "clipped_surrogate", with_sft_term)
    assert gradient_norm() == 0.0
    monkeypatch.setattr(module, "rows_with_gradient", lambda advantages, kl_coef: torch.arange(advantages.shape[0]))
    assert gradient_norm() > 0.0


def test_first_pass_takes_old_logprobs_from_the_training_forward(sampled_batch):
    policy, batch = sampled_batch
    old_logp = torch.full_like(batch["mask"], float("nan"))
    policy_gradient_pass(policy, batch, torch.arange(8), Args(micro_batch_size=8), old_logp, None,
                         {"num_sequences": 8, "num_tokens": batch["mask"].sum()})
    with torch.no_grad():
        fresh, _ = completion_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1], 1.0)
    assert torch.allclose(old_logp, fresh, atol=1e-5)


def test_short_run_writes_metrics_and_a_loadable_checkpoint(tmp_path):
    result = run_grpo(*SHORT_RUN, "--total-steps", "3", "--save-every", "2", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    assert run_dir.name.startswith("arithmetic__grpo__1__")
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("reward_mean", "loss", "kl", "clip_fraction", "entropy", "response_length", "truncated_fraction",
                "skipped_sequences", "time_generate", "time_score", "time_train", "tokens_per_sec", "eval_accuracy"):
        assert key in metrics[0]
    assert metrics[1]["eval_accuracy"] is not None and metrics[0]["eval_accuracy"] is None
    assert 0.0 <= metrics[2]["reward_mean"] <= 1.0 and metrics[2]["response_length"] > 0
    assert json.loads((run_dir / "args.json").read_text())["total_steps"] == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_3"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_3", use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "held-out greedy accuracy" in result.stdout


def test_memory_switches_of_large_models_also_run_on_a_cpu(tmp_path):
    """--gradient-checkpointing and --dtype bfloat16, the GPU settings, through a whole run."""
    result = run_grpo(*SHORT_RUN, *ON_CPU, "--total-steps", "2", "--gradient-checkpointing", "--dtype", "bfloat16",
                      "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in read_steps(run_dir))
    config = json.loads((run_dir / "checkpoints" / "step_2" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is False  # use_cache: checkpointing was on


# Each trainer's own state beside the policy's: prime.py's PRM, its optimizer and the prompt filter.
@pytest.mark.parametrize("script, method_keys", [
    ("grpo.py", ()),
    ("prime.py", ("prm_loss", "prm_accuracy", "process_reward_std", "filter_keep_rate", "filter_draws")),
])
def test_killed_run_resumes_at_its_checkpoint_with_the_same_data(tmp_path, script, method_keys):
    flags = [*SHORT_RUN, *ON_CPU, "--total-steps", "6", "--save-every", "2"]
    reference = run_trainer(script, *flags, "--runs-dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    [reference_dir] = (tmp_path / "reference").iterdir()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, script, *flags, "--runs-dir", str(tmp_path / "killed")],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list((tmp_path / "killed").glob("*/checkpoints/step_2")):
        assert time.time() < deadline and process.poll() is None, "the run never wrote its step-2 checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    [killed_dir] = (tmp_path / "killed").iterdir()
    assert not (killed_dir / "checkpoints" / "step_6").exists(), "the run finished before it was killed"

    resumed = run_trainer(script, "--resume", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = read_steps(reference_dir), read_steps(killed_dir)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert read_metrics(killed_dir)[0] == read_metrics(reference_dir)[0], "the resumed run kept the start's evaluation"
    for before, after in zip(expected, got):
        for key in ("reward_mean", "loss", "response_length", "eval_accuracy", "skipped_sequences", *method_keys):
            assert before[key] == pytest.approx(after[key], abs=1e-6), (before["step"], key)


def test_eval_only_reports_each_set_and_trains_nothing(tmp_path):
    # The benchmarks by name (math500, gsm8k) are run on a real model in test_real_model.py: their
    # prompts do not fit the tiny model's 256-token context. Here: the built-in set and a file.
    sums = tmp_path / "sums.jsonl"
    sums.write_text("".join(json.dumps({"problem": f"Compute {a}+{a}.", "solution": f"\\boxed{{{2 * a}}}"}) + "\n"
                            for a in range(10, 16)))
    result = run_grpo("--eval-only", "--eval-dataset", f"arithmetic,{sums}", "--eval-size", "6",
                      "--eval-samples", "3", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("arithmetic+sums__eval__")
    lines = read_metrics(run_dir)
    assert [line["eval_dataset"] for line in lines] == ["arithmetic", str(sums)]
    for line in lines:
        assert line["problems"] == 6
        assert 0.0 <= line["mean@3"] <= line["pass@3"] <= 1.0 and 0.0 <= line["pass@1"] <= 1.0
    assert not (run_dir / "checkpoints").exists()
    assert "pass@3" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "5"], "--micro-batch-size (5) must divide"),
    (["--num-minibatches", "3"], "--num-minibatches (3) must divide"),
    (["--dataset", "no/such/file.jsonl"], "no/such/file.jsonl"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--template", "fancy"], "--template must be one of"),
])
def test_bad_arguments_fail_at_start_up_with_one_line(flags, message, tmp_path):
    result = run_grpo(*flags, "--runs-dir", str(tmp_path), timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpo.py: error:") and message in lines[0], result.stderr
    assert not any(tmp_path.iterdir()), "a failed start must not leave a run folder"


def test_prompts_longer_than_the_context_stop_the_run_at_start_up(tmp_path):
    result = run_grpo("--eval-dataset", "math500", "--runs-dir", str(tmp_path), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "grpo.py: error: 266 of 500 prompts of math500 do not fit the model's context of 256 tokens"), result.stderr
    assert not any(tmp_path.iterdir())
