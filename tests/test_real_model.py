"""The path `--model Qwen2.5-Math-7B` takes, on a real pretrained model: SmolLM2-135M-Instruct
(30-layer Llama, 49k-token BPE, ChatML template), loaded from a plain model folder exactly as a
hub download would be, on real GSM8K and MATH-500 prompts.

What this model exposes that the byte-level tiny model hides: its pad token *is* its EOS token
(`<|im_end|>`, id 2), its `bos_token` is the chat marker `<|im_start|>` that its tokenizer never
prepends, its chat template injects a default system prompt, and prompts are a few dozen to a
few hundred BPE tokens whose lengths differ widely in a batch.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import grpo
from common import UsageError
from common.data import BOXED_INSTRUCTION, DEFAULT_DATA_DIR, load_problems, render_prompt
from common.model import load_model, load_tokenizer
from common.rollout import check_context_length, eos_token_ids, generate
from grpo import Args, completion_logprobs, update_policy
from grpo_runs import read_metrics, read_steps, run_grpo

SMOLLM_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SHORT_QUESTION = "What is 2+3? Reply with only the number."


@pytest.fixture(scope="module")
def real(real_model_dir):
    return load_model(str(real_model_dir), "cpu"), load_tokenizer(str(real_model_dir))


@pytest.fixture(scope="module")
def questions():
    """The first GSM8K test question (plain text with a Unicode apostrophe) and the first
    MATH-500 problem (LaTeX with backslashes and $...$)."""
    return (load_problems(str(DEFAULT_DATA_DIR / "gsm8k_test.jsonl"))[0]["question"],
            load_problems(str(DEFAULT_DATA_DIR / "math500.jsonl"))[0]["question"])


def batch_of(rollout):
    return (torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1),
            torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1))


def test_loads_as_a_hub_model_would(real):
    model, tokenizer = real
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert len(tokenizer) == 49152 and tokenizer.padding_side == "left"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert eos_token_ids(model, tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert model.config.max_position_embeddings == 8192


@pytest.mark.parametrize("which", ["gsm8k", "math500"])
def test_templates_render_real_prompts(real, questions, which):
    _, tokenizer = real
    question = questions[0] if which == "gsm8k" else questions[1]
    turn = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    rendered = {template: render_prompt(tokenizer, question, template) for template in ("chat", "chat-boxed", "plain")}
    assert rendered["chat"] == SMOLLM_SYSTEM + turn  # the model's own default system prompt
    assert rendered["chat-boxed"] == f"<|im_start|>system\n{BOXED_INSTRUCTION}<|im_end|>\n" + turn
    # bos_token is <|im_start|>, which SmolLM2's tokenizer never prepends: "plain" must not add it.
    assert rendered["plain"] == f"Question:\n{question}\n{BOXED_INSTRUCTION}\nAnswer:\n"
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for template, prompt in rendered.items():
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == prompt, f"{template}: BPE round trip lost text"
        assert ids.count(im_start) == (0 if template == "plain" else 3), "chat markers must be single tokens"
        assert len(ids) < len(prompt) / 2, "a BPE tokenizer merges characters"


def test_generation_stops_at_eos_with_left_padding_and_truncation_flags(real, questions):
    model, tokenizer = real
    prompts = [render_prompt(tokenizer, q, "chat") for q in (*questions, SHORT_QUESTION)]
    rollout = generate(model, tokenizer, prompts, max_new_tokens=24, greedy=True)
    eos = tokenizer.eos_token_id
    assert rollout.prompt_mask[:, -1].all(), "left padding: every prompt ends where generation starts"
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        mask = rollout.prompt_mask[row]
        padding = len(mask) - len(ids)
        assert mask.tolist() == [0] * padding + [1] * len(ids)
        assert rollout.prompt_ids[row, padding:].tolist() == ids
        assert (rollout.prompt_ids[row, :padding] == tokenizer.pad_token_id).all()
    finished = (~rollout.truncated).nonzero().flatten().tolist()
    truncated = rollout.truncated.nonzero().flatten().tolist()
    assert finished and truncated, "expected the short question to finish and the long ones to be cut"
    for row in finished:
        completion, length = rollout.completion_ids[row], rollout.completion_mask[row].sum().item()
        # pad == EOS here: the first EOS must stay inside the mask, the padding after it outside.
        assert completion[length - 1] == eos and eos not in completion[:length - 1].tolist()
        assert rollout.completion_mask[row, length:].sum() == 0 and (completion[length:] == tokenizer.pad_token_id).all()
        assert rollout.texts[row] == tokenizer.decode(completion[:length - 1]) and "<|im_end|>" not in rollout.texts[row]
    for row in truncated:
        assert rollout.completion_mask[row].all() and eos not in rollout.completion_ids[row].tolist()
        assert rollout.completion_ids.shape[1] == 24


def test_sampled_logprobs_match_the_trainers_forward_pass(real, questions):
    model, tokenizer = real
    torch.manual_seed(0)
    prompts = [render_prompt(tokenizer, q, "chat-boxed") for q in (*questions, SHORT_QUESTION)]
    rollout = generate(model, tokenizer, prompts, max_new_tokens=16, temperature=0.8, return_logprobs=True)
    input_ids, attention_mask = batch_of(rollout)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, input_ids, attention_mask, rollout.completion_ids.shape[1], 0.8)
    mask = rollout.completion_mask.bool()
    assert (logp[mask] - rollout.logprobs[mask]).abs().max() < 1e-4  # measured 1.3e-5 in fp32


def test_one_update_moves_log_probs_the_way_the_advantages_point(real_model_dir, questions):
    model, tokenizer = load_model(str(real_model_dir), "cpu"), load_tokenizer(str(real_model_dir))
    torch.manual_seed(0)
    prompt = render_prompt(tokenizer, questions[0], "chat")
    rollout = generate(model, tokenizer, [prompt, prompt], max_new_tokens=12)
    input_ids, attention_mask = batch_of(rollout)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mask": rollout.completion_mask.float(),
             "advantages": torch.tensor([1.0, -1.0]).view(-1, 1) * rollout.completion_mask}
    args = Args(learning_rate=1e-5, warmup_steps=1, micro_batch_size=2, max_new_tokens=12)

    def sequence_logprobs():
        with torch.no_grad():
            logp, _ = completion_logprobs(model, input_ids, attention_mask, batch["mask"].shape[1], args.temperature)
        return (logp * batch["mask"]).sum(dim=1)

    before = sequence_logprobs()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics, old_logp = update_policy(model, None, optimizer, scheduler, batch, args)
    after = sequence_logprobs()
    assert metrics["skipped_sequences"] == 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert after[0] > before[0] and after[1] < before[1]
    # pi_old, returned for the rollout engine's check, is the policy before the update
    assert torch.allclose((old_logp * batch["mask"]).sum(dim=1), before, atol=1e-4)


def test_grpo_trains_on_gsm8k_and_its_checkpoint_reloads_with_the_same_logprobs(real_model_dir, monkeypatch, tmp_path):
    saved = {}

    def save_and_remember(run_dir, step, policy, *rest):
        saved.update(run_dir=run_dir, step=step, policy=policy)
        save_checkpoint(run_dir, step, policy, *rest)

    save_checkpoint = grpo.save_checkpoint
    monkeypatch.setattr(grpo, "save_checkpoint", save_and_remember)
    grpo.main(["--model", str(real_model_dir), "--dataset", str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl"),
               "--eval-dataset", "gsm8k", "--eval-size", "2", "--total-steps", "2", "--num-prompts", "2",
               "--group-size", "2", "--max-new-tokens", "16", "--learning-rate", "1e-5", "--eval-every", "0",
               "--kl-coef", "0.04", "--runs-dir", str(tmp_path)])
    [run_dir] = tmp_path.iterdir()
    assert run_dir.name.startswith("gsm8k_train__grpo__1__") and saved["step"] == 2
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["eval"]["gsm8k"]["pass@1"] is not None
    # With a KL term every sequence goes through the training pass, beside a reference model
    # loaded from the same folder; at step 1 policy and reference agree, so the KL is ~0.
    assert metrics[0]["skipped_sequences"] == 0 and abs(metrics[0]["kl"]) < 1e-6
    checkpoint = run_dir / "checkpoints" / "step_2"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True)
    tokenizer = load_tokenizer(str(checkpoint))
    problem = load_problems(str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl"))[0]
    encoded = tokenizer([render_prompt(tokenizer, problem["question"], "chat") + "Let me think.<|im_end|>"],
                        return_tensors="pt", add_special_tokens=False)
    policy = saved["policy"]
    policy.eval()
    with torch.no_grad():
        in_memory, _ = completion_logprobs(policy, encoded["input_ids"], encoded["attention_mask"], 5, 1.0)
        from_disk, _ = completion_logprobs(reloaded, encoded["input_ids"], encoded["attention_mask"], 5, 1.0)
    assert torch.equal(in_memory, from_disk)


def test_eval_only_runs_on_slices_of_the_four_benchmarks(real_model_dir, tmp_path):
    result = run_grpo("--eval-only", "--model", str(real_model_dir), "--eval-dataset", "math500,aime24,amc23,gsm8k",
                      "--eval-size", "2", "--eval-samples", "2", "--max-new-tokens", "32", "--template", "chat-boxed",
                      "--runs-dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    lines = read_metrics(run_dir)
    assert [line["eval_dataset"] for line in lines] == ["math500", "aime24", "amc23", "gsm8k"]
    for line in lines:
        assert line["problems"] == 2 and 0.0 <= line["mean@2"] <= line["pass@2"] <= 1.0 and 0.0 <= line["pass@1"] <= 1.0
    assert "aime24" in result.stdout and "pass@2" in result.stdout


def test_prompts_that_leave_no_room_for_the_response_are_refused(real, questions):
    model, tokenizer = real
    prompts = [render_prompt(tokenizer, q, "chat") for q in questions]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    check_context_length(model, tokenizer, "gsm8k+math500", prompts, 8192 - longest)  # exactly fits
    with pytest.raises(UsageError, match="1 of 2 prompts of gsm8k\\+math500 do not fit the model's context of 8192 tokens"):
        check_context_length(model, tokenizer, "gsm8k+math500", prompts, 8192 - longest + 1)
