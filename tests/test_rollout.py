"""Rollout on the shipped tiny model: masks, truncation, and log-probs that match the trainer's."""

import pytest
import torch

from common.data import render_prompt
from common.model import load_model, load_tokenizer
from common.rollout import completion_mask_and_truncation, eos_token_ids, generate
from grpo import completion_logprobs


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu"), load_tokenizer("tiny")


def test_mask_ends_at_first_eos_and_flags_truncation():
    eos = 7
    ids = torch.tensor([[1, 2, eos, 3, eos], [eos, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    mask, truncated = completion_mask_and_truncation(ids, [eos, 99])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_sampled_completions_stop_at_eos(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    prompts = [render_prompt(tokenizer, q, "chat") for q in ("Compute 12+34.", "Compute 99-10+11-40.")] * 4
    rollout = generate(model, tokenizer, prompts, max_new_tokens=96, temperature=1.0)
    eos = eos_token_ids(model, tokenizer)
    lengths = rollout.completion_mask.sum(dim=1)
    for row in range(len(prompts)):
        ids = rollout.completion_ids[row]
        if rollout.truncated[row]:
            assert lengths[row] == ids.shape[0] == 96
            assert not torch.isin(ids, torch.tensor(eos)).any()
        else:
            last = ids[lengths[row] - 1].item()
            assert last in eos, "the mask must end on the EOS token itself"
            assert not torch.isin(ids[: lengths[row] - 1], torch.tensor(eos)).any()
            assert rollout.texts[row] == tokenizer.decode(ids[: lengths[row] - 1])
    assert not rollout.truncated.all(), "the warm-started model should finish most answers"


def test_short_budget_truncates(tiny):
    model, tokenizer = tiny
    prompts = [render_prompt(tokenizer, "Compute 12+34-20.", "chat")] * 2
    rollout = generate(model, tokenizer, prompts, max_new_tokens=5, greedy=True)
    assert rollout.truncated.all()
    assert rollout.completion_mask.sum().item() == 10


@pytest.mark.parametrize("greedy", [True, False])
def test_sampler_logprobs_match_training_forward(tiny, greedy):
    """The trainer's forward (with left padding) reproduces the log-probs the sampler drew from."""
    model, tokenizer = tiny
    torch.manual_seed(1)
    # Different prompt lengths force left padding, which the position ids must skip.
    questions = ["Compute 12+34.", "Compute 99-10+11-40.", "Compute 50-25+13."]
    prompts = [render_prompt(tokenizer, q, "chat") for q in questions]
    rollout = generate(model, tokenizer, prompts, max_new_tokens=64, temperature=0.7, greedy=greedy,
                       return_logprobs=True)
    assert (rollout.prompt_mask == 0).any(), "the test needs left padding"
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, input_ids, attention_mask, rollout.completion_ids.shape[1],
                                      1.0 if greedy else 0.7)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(logp[mask], rollout.logprobs[mask], atol=1e-4)
