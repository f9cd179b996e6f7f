"""Precision: bf16-mixed (fp32 master weights, bf16 compute) keeps the updates that bf16 weights lose,
computes the loss's log-probs in bf16 as a bf16 sampler does, checkpoints fp32, and a model that
cannot fit the GPU stops the run at start-up."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import common.model
import grpo
from common import UsageError
from common.model import check_training_fits, compute_dtype, load_model, lost_update_fraction
from common.rollout import TransformersEngine
from grpo_runs import read_metrics, run_grpo, sampled_tiny_batch

SHORT_RUN = ["--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "8", "--eval-size", "20",
             "--max-new-tokens", "64", "--eval-every", "2"]


@pytest.fixture(scope="module")
def tiny_batch():
    return sampled_tiny_batch()[1]


def one_adamw_step(model, batch, learning_rate):
    """The share of `model`'s weights that one AdamW step on the batch's log-likelihood changes."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    logp, _ = grpo.completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1], 1.0)
    (-(logp * batch["mask"]).sum() / batch["mask"].sum()).backward()
    optimizer.step()
    changed = sum((p.detach() != old).sum().item() for p, old in zip(model.parameters(), before))
    return changed / sum(old.numel() for old in before)


def test_one_step_at_lr_1e6_moves_a_real_model_under_mixed_precision_and_not_in_bf16(real_model_dir):
    """SmolLM2-135M on CPU, one AdamW step on the log-likelihood of two random 24-token sequences: its
    embeddings are tied to the output layer, so every weight gets a gradient. (Short: bf16 is slow on a CPU.)"""
    ids = torch.randint(1000, 40000, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mask": torch.ones(2, 12)}
    mixed = load_model(str(real_model_dir), "cpu", "bf16-mixed")
    assert mixed.dtype == torch.float32 and compute_dtype(mixed) == torch.bfloat16
    assert one_adamw_step(mixed, batch, 1e-6) > 0.99
    bf16 = load_model(str(real_model_dir), "cpu", "bfloat16")
    predicted_lost = lost_update_fraction(bf16, 1e-6)
    changed = one_adamw_step(bf16, batch, 1e-6)
    assert changed < 0.05 and predicted_lost > 0.95
    assert abs((1 - changed) - predicted_lost) < 0.02  # the start-up warning's figure is what happens


def test_mixed_precision_computes_the_losss_logprobs_in_bf16_and_keeps_fp32_gradients(tiny_batch):
    mixed, fp32 = load_model("tiny", "cpu", "bf16-mixed"), load_model("tiny", "cpu", "float32")
    bf16_copy = load_model("tiny", "cpu", "bfloat16")
    logits_dtypes = []
    mixed.lm_head.register_forward_hook(lambda module, inputs, output: logits_dtypes.append(output.dtype))
    args = (tiny_batch["input_ids"], tiny_batch["attention_mask"], tiny_batch["mask"].shape[1], 1.0)
    logp_mixed, _ = grpo.completion_logprobs(mixed, *args)
    assert logits_dtypes == [torch.bfloat16] and logp_mixed.dtype == torch.float32
    (logp_mixed * tiny_batch["mask"]).sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in mixed.parameters())
    with torch.no_grad():
        logp_fp32, logp_bf16 = grpo.completion_logprobs(fp32, *args)[0], grpo.completion_logprobs(bf16_copy, *args)[0]
    mask = tiny_batch["mask"].bool()
    # bf16 arithmetic, not fp32's, yet within the vLLM check's bf16 threshold of a sampler holding bf16 weights.
    assert (logp_mixed - logp_fp32)[mask].abs().mean() > 1e-3
    assert (logp_mixed.detach() - logp_bf16)[mask].abs().mean() < 0.2 / 2


def test_frozen_models_load_in_bf16_under_mixed_precision():
    frozen = load_model("tiny", "cpu", "bf16-mixed", frozen=True)
    assert frozen.dtype == torch.bfloat16 and compute_dtype(frozen) == torch.bfloat16
    assert not any(p.requires_grad for p in frozen.parameters())


def test_the_bf16_warning_gives_the_share_of_weights_a_step_cannot_move(capsys):
    mixed, bf16 = load_model("tiny", "cpu", "bf16-mixed"), load_model("tiny", "cpu", "bfloat16")
    capsys.readouterr()  # the loading progress bars
    check_training_fits([mixed], [None], 1e-6, TransformersEngine(None, None))
    assert capsys.readouterr().err == ""
    check_training_fits([bf16], [None], 1e-6, TransformersEngine(None, None))
    [line] = capsys.readouterr().err.splitlines()
    assert "warning: --dtype bfloat16" in line and f"{100 * lost_update_fraction(bf16, 1e-6):.1f}%" in line


class FakeGPUEngine:
    training_gpu_share = 0.3  # vLLM without sleep mode keeps its share while the trainer trains


def test_a_model_too_large_for_the_gpu_stops_with_the_estimate_and_the_ways_out(monkeypatch):
    policy, reference = load_model("tiny", "cpu", "bf16-mixed"), load_model("tiny", "cpu", "bf16-mixed", frozen=True)
    parameters = sum(p.numel() for p in policy.parameters())
    needed = 16 * parameters + 2 * parameters  # fp32 weights, gradients, two AdamW moments; a bf16 reference
    monkeypatch.setattr(common.model, "gpu_memory_bytes", lambda device: needed / 0.9 / 0.7 * 1.01)
    check_training_fits([policy], [reference, None], 1e-6, FakeGPUEngine())  # just fits
    monkeypatch.setattr(common.model, "gpu_memory_bytes", lambda device: needed / 0.9 / 0.7 * 0.99)
    with pytest.raises(UsageError) as error:
        check_training_fits([policy], [reference, reference], 1e-6, FakeGPUEngine())  # a shared model counts once
    message = str(error.value)
    assert "\n" not in message and f"{parameters / 1e9:.2f}B trained parameters x 16 bytes" in message
    for way_out in ("more GPUs", "a smaller model", "--dtype bfloat16", "vLLM's 30%"):
        assert way_out in message


def test_the_trainer_stops_before_its_first_step_when_the_gpu_is_too_small(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common.model, "gpu_memory_bytes", lambda device: 1024)
    with pytest.raises(SystemExit) as stop:
        grpo.main(["--runs-dir", str(tmp_path), "--eval-size", "5"])
    assert str(stop.value).startswith("grpo.py: error: training needs about") and not any(tmp_path.iterdir())


def test_mixed_precision_checkpoints_fp32_masters_and_resumes_exactly(tmp_path):
    flags = [*SHORT_RUN, "--total-steps", "4", "--save-every", "2", "--dtype", "bf16-mixed", "--runs-dir", str(tmp_path)]
    result = run_grpo(*flags)
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    final = run_dir / "checkpoints" / "step_4"
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    with safe_open(final / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    uninterrupted = read_metrics(run_dir)
    shutil.rmtree(final)  # as if the run had been killed after its step-2 checkpoint
    resumed = run_grpo("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = read_metrics(run_dir)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for before, after in zip(uninterrupted, again):
        for key in ("reward_mean", "loss", "response_length", "eval_accuracy", "entropy"):
            assert before[key] == after[key], (before["step"], key)
