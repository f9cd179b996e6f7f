"""Rollout on the shipped tiny model: masks, truncation, and log-probs that match the trainer's."""

import pytest
import torch

from common.data import render_prompt
from common.model import load_model, load_tokenizer
from common.rollout import completion_mask_and_truncation, concat_rollouts, eos_token_ids, generate, select_rollout
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


def test_rows_of_several_draws_joined_keep_their_tokens_and_log_probs(tiny):
    """concat_rollouts + select_rollout (prime.py's filter): rows from generate calls of different prompt
    and completion widths, padded again, hold the same tokens and get the same log-probs."""
    model, tokenizer = tiny
    torch.manual_seed(2)
    first = generate(model, tokenizer, [render_prompt(tokenizer, q, "chat") for q in ("Compute 12+34.", "Compute 99-10+11-40.")],
                     max_new_tokens=64, return_logprobs=True)
    second = generate(model, tokenizer, [render_prompt(tokenizer, "Compute 10+11.", "chat")] * 2,
                      max_new_tokens=8, return_logprobs=True)
    assert first.prompt_ids.shape[1] != second.prompt_ids.shape[1] and first.completion_ids.shape[1] > 8
    sources = [(first, 1), (second, 0), (first, 0)]  # rows 1, 2, 0 of the two draws joined
    joined = select_rollout(concat_rollouts([first, second], tokenizer.pad_token_id), [1, 2, 0])
    input_ids = torch.cat([joined.prompt_ids, joined.completion_ids], dim=1)
    attention_mask = torch.cat([joined.prompt_mask, joined.completion_mask], dim=1)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, input_ids, attention_mask, joined.completion_ids.shape[1], 1.0)
    for row, (source, index) in enumerate(sources):
        assert joined.prompt_ids[row][joined.prompt_mask[row].bool()].tolist() == \
            source.prompt_ids[index][source.prompt_mask[index].bool()].tolist()
        length = source.completion_mask[index].sum()
        assert joined.completion_mask[row].sum() == length
        assert joined.completion_ids[row, :length].tolist() == source.completion_ids[index, :length].tolist()
        assert joined.texts[row] == source.texts[index] and joined.truncated[row] == source.truncated[index]
        assert torch.allclose(logp[row, :length], source.logprobs[index, :length], atol=1e-4)
        assert torch.equal(joined.logprobs[row, :length], source.logprobs[index, :length])
    # Columns that are padding in every selected row are dropped.
    assert joined.prompt_mask[:, 0].any() and joined.completion_mask[:, -1].any()
    assert select_rollout(joined, [1]).completion_ids.shape[1] == second.completion_mask[0].sum()
