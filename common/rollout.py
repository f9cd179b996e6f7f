"""Rollout: batched sampling of completions for a list of prompt strings.

`generate` is the one entry point every trainer calls; it uses `transformers` generate. A faster
engine (vLLM) only has to return the same `Rollout` to drop in.
"""

from dataclasses import dataclass

import torch

from common import UsageError
from common.data import render_prompt


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] right-padded sampled tokens
    completion_mask: torch.Tensor  # [B, C] 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    texts: list[str]  # decoded completions, without the EOS and padding
    logprobs: torch.Tensor | None = None  # [B, C] log-prob of each sampled token under the sampler


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the generation config's.

    Chat models often stop on a turn-end token (`<|im_end|>`) that differs from the
    tokenizer's EOS, and list it only in `generation_config.eos_token_id`.
    """
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def check_context_length(model, tokenizer, name: str, prompts: list[str], max_new_tokens: int):
    """Raise a one-line UsageError if a prompt plus `max_new_tokens` exceeds the model's context.

    Past `max_position_embeddings`, generate() neither stops nor warns: positions beyond the
    trained range give garbage (Qwen2.5-Math-7B: 4,096 tokens). A config that declares no limit
    is not checked.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or not prompts:
        return
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    too_long = sum(length + max_new_tokens > limit for length in lengths)
    if too_long:
        raise UsageError(
            f"{too_long} of {len(prompts)} prompts of {name} do not fit the model's context of {limit} tokens "
            f"(max_position_embeddings): the longest is {max(lengths)} tokens, plus --max-new-tokens "
            f"{max_new_tokens} makes {max(lengths) + max_new_tokens}; lower --max-new-tokens or drop the long prompts"
        )


def check_prompts_fit(model, tokenizer, problem_sets: dict[str, list[dict]], template: str, max_new_tokens: int):
    """check_context_length on every problem of every named set, rendered with `template`.

    Trainers call it at start-up on everything the run will prompt with (the training problems
    and every held-out set), so that a long prompt stops the run before any work is done.
    """
    for name, problems in problem_sets.items():
        prompts = [render_prompt(tokenizer, problem["question"], template) for problem in problems]
        check_context_length(model, tokenizer, name, prompts, max_new_tokens)


def completion_mask_and_truncation(completion_ids: torch.Tensor, eos_ids: list[int]):
    """Mask [B, C] that is 1 up to and including the first EOS, and [B] whether no EOS came."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # Number of EOS tokens strictly before each position: 0 up to and including the first EOS.
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    return (eos_before == 0).long(), ~is_eos.any(dim=1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False, return_logprobs: bool = False) -> Rollout:
    """Sample one completion per prompt string (repeat a prompt G times for a group of G).

    Prompts are complete strings, already rendered by a template (which adds any BOS token), so
    the tokenizer adds no special tokens. Sampling is from the full distribution softmax(logits /
    temperature): no top-k or top-p, so that `logprobs` are the exact sampling log-probs.
    `return_logprobs` keeps every step's logits ([B, C, vocab] in memory); use it for checks
    and small runs.
    """
    was_training = model.training
    model.eval()  # turns off dropout, and lets generate use the KV cache under gradient checkpointing
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=not greedy, **sampling,
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True, output_logits=return_logprobs,
    )
    model.train(was_training)
    prompt_length = encoded["input_ids"].shape[1]
    completion_ids = output.sequences[:, prompt_length:]  # [B, C]
    completion_mask, truncated = completion_mask_and_truncation(completion_ids, eos_ids)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    logprobs = None
    if return_logprobs:
        logits = torch.stack(output.logits, dim=1).float()  # [B, C, vocab]
        if not greedy:
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        logprobs = logprobs * completion_mask
    return Rollout(encoded["input_ids"], encoded["attention_mask"], completion_ids, completion_mask,
                   truncated, texts, logprobs)
