"""TEMPO: prefix-tree values give token credit where a group's responses branch (arXiv 2509.18314), in one file.

Docs: docs/tempo.md. This is grpo.py with TEMPO's changes, marked
`# ALGO LOGIC: ...` to `# ALGO LOGIC END`: the advantage of each token is GRPO's plus the change
of the prefix tree's value at the token, so credit lands where good and bad responses parted.

    python tempo.py                   # tiny built-in model + arithmetic task, CPU, about 4 minutes
    python tempo.py --model Qwen3-1.7B --dataset DigitalLearningGmbH/MATH-lighteval --eval-dataset math500 \\
        --group-size 7 --num-prompts 512 --num-minibatches 8 --max-new-tokens 8192 --learning-rate 1e-6 \\
        --clip-eps-high 0.28 --warmup-steps 0 --total-steps 15        # the authors' train_math_tempo.sh
"""

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import UsageError, distributed
from common.cli import arg, parse_args
from common.evaluation import eval_run_name
from common.model import PRECISIONS, check_training_fits, default_device, load_model, load_tokenizer
from common.rollout import ROLLOUT_ENGINES, check_prompts_fit, make_rollout_engine, truncated_importance_weights
from common.runs import (TRACKERS, RunLog, import_tracker, latest_checkpoint, new_run_dir, print_summary,
                         restore_checkpoint, save_checkpoint)
# SLOT: the task: math problems from data sets, scored by math-verify, evaluated by pass@k.
from common.data import PROMPT_TEMPLATES, ProblemStream, load_eval_problems, render_prompt
from common.evaluation import Evaluator
from common.verify import score_batch
# SLOT END

METHOD = Path(__file__).stem  # run folders and messages are named after the file
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo")


@dataclass
class Args:
    # The task: the model, its training data and held-out sets.
    seed: int = arg(1, "seed of sampling, data order and initialisation")
    model: str = arg("tiny", "alias (Qwen2.5-Math-7B), hub id, local folder, or 'tiny'")
    dataset: str = arg("arithmetic", "'arithmetic' (built-in), a .jsonl/.parquet file or a hub data set")
    eval_dataset: str = arg("arithmetic", "held-out sets, comma-separated (math500, aime24, amc23, gsm8k, a file...)")
    data_dir: str | None = arg(None, "folder of local benchmark copies (default: this repository's data/)")
    prompt_key: str | None = arg(None, "field holding the question (default: question/problem/prompt)")
    answer_key: str | None = arg(None, "field holding the answer (default: answer, else solution's \\boxed{})")
    template: str = arg("chat", "chat template, with a \\boxed{} instruction, or plain text", choices=PROMPT_TEMPLATES)

    # Rollouts: what one step samples.
    total_steps: int = arg(80, "policy update steps (one batch of rollouts each)", min=1)
    num_prompts: int = arg(16, "prompts per step", min=1)
    group_size: int = arg(8, "G: sampled responses per prompt")
    max_new_tokens: int = arg(96, "longest response, in tokens", min=1)
    temperature: float = arg(1.0, "sampling temperature of rollouts")

    # Optimisation.
    learning_rate: float = arg(1e-4, "AdamW learning rate (papers: 1e-6 for 1.5B-7B models)")
    warmup_steps: int = arg(5, "linear learning-rate warm-up, then constant")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    num_epochs: int = arg(1, "passes over each batch of rollouts (PPO epochs)", min=1)
    num_minibatches: int = arg(1, "optimizer steps per pass over a batch", min=1)
    micro_batch_size: int = arg(64, "sequences per forward/backward (gradient accumulation)", min=1)

    # The GRPO loss: advantage, clipped surrogate, KL.
    scale_by_std: bool = arg(True, "divide advantages by the group std (off: Dr.GRPO)")
    advantage_eps: float = arg(1e-6, "added to the group std (verl 1e-6, TRL 1e-4)")
    clip_eps_low: float = arg(0.2, "lower clip range of the ratio")
    clip_eps_high: float = arg(0.2, "upper clip range of the ratio (DAPO clip-higher: 0.28)")
    dual_clip: float | None = arg(None, "dual-clip bound c for negative advantages (verl: 3; default: off)")
    kl_coef: float = arg(0.0, "beta of the KL-to-reference loss (DeepSeekMath 0.04); 0 loads no reference")
    kl_estimator: str = arg("k3", "estimator of the KL per token", choices=KL_ESTIMATORS)
    loss_aggregation: str = arg("token-mean", "how token losses are averaged", choices=LOSS_AGGREGATIONS)
    shuffle_rewards: bool = arg(False, "control: permute rewards within the batch")

    # TEMPO: the prefix tree's TD term.
    td_coef: float = arg(1.0, "weight of TEMPO's prefix-tree TD term (authors' code: 1; 0 is GRPO)")

    # Held-out evaluation.
    eval_every: int = arg(20, "steps between held-out evaluations (0: only before and after)")
    eval_size: int = arg(0, "held-out problems evaluated per set (0: all)", min=0)
    eval_samples: int = arg(0, "k: also sample k responses per problem for mean@k and pass@k (0: greedy only)", min=0)
    eval_only: bool = arg(False, "only evaluate --model on --eval-dataset, then exit")
    eval_batch_size: int = arg(250, "prompts per evaluation generate call")

    # Run folders, checkpoints, resume.
    save_every: int = arg(0, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = arg(2, "newest checkpoints kept on disk")
    resume: str | None = arg(None, "run folder to continue from its last checkpoint")
    runs_dir: str = arg("runs", "parent folder of run folders")

    # Device, precision, memory.
    device: str | None = arg(None, "cpu or cuda (default: cuda if available)")
    dtype: str | None = arg(None, "default: bf16-mixed (fp32 weights, bf16 compute) on GPUs", choices=PRECISIONS)
    gradient_checkpointing: bool | None = arg(None, "recompute activations in backward (default: on with CUDA)")
    trust_remote_code: bool = arg(False, "allow a hub model's own code to run (off: safer)")

    # Who samples: transformers or vLLM, and the check that the sampler is the policy.
    rollout: str = arg("auto", "who samples (auto: vLLM when CUDA and vLLM are present)", choices=ROLLOUT_ENGINES)
    vllm_gpu_memory_utilization: float = arg(0.3, "GPU share vLLM holds while sampling (weights, KV cache)")
    vllm_sleep_mode: bool | None = arg(None, "vLLM frees its GPU memory while training (default: on with CUDA)")
    sync_check_threshold: float | None = arg(None, "vLLM vs trainer log-prob gap that stops a run (default: 1e-3)")
    tis_cap: float | None = arg(None, "C: truncated importance weight min(pi / pi_vllm, C) (TRL: 2-3; default: off)")

    # Experiment tracking.
    track: bool = arg(False, "also send every metrics line to an experiment tracker")
    tracker: str = arg("trackio", "trackio (local, offline) or wandb", choices=TRACKERS)
    track_project: str = arg("cleancredit", "the tracker's project; the run is named after the run folder")


# ALGO LOGIC: the arithmetic, pure functions: GRPO's, then TEMPO's advantage from the group's prefix tree.
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> torch.Tensor:
    """Group-relative advantage of each response (DeepSeekMath section 4.1.2), rewards [P, G] -> [P, G].

        A_i = (r_i - mean_j r_j) / (std_j r_j + eps)       std with Bessel's correction (ddof=1)
        A_i =  r_i - mean_j r_j                            scale_by_std=False (Dr.GRPO, arXiv 2503.20783)

    A group whose rewards are all equal carries no signal and gets exactly 0. A group of one also
    gets 0 (verl would give A = r); there is nothing to compare a lone response with.
    """
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


def tempo_advantages(rewards: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, td_coef: float = 1.0,
                     eps: float = 1e-6, scale_by_std: bool = True):
    """TEMPO's token advantages (arXiv 2509.18314): rewards [P, G], ids and mask [P, G, T] -> three [P, G, T].

    The G responses of a group form a prefix tree whose node s is a token prefix, with value
    V(s) = mean reward of the responses through s (V(root) = mu). Token t of response i leads
    from node s_t to node s_{t+1}:

        delta_{i,t} = V(s_{t+1}) - V(s_t)                                  (0 unless s_t branches)
        A_{i,t}     = [(r_i - mu) + td_coef * delta_{i,t}] / (sigma + eps)   (sigma: group std, ddof=1)

    as in the authors' `compute_tempo_outcome_advantage` (td_coef 1 there; scale_by_std=False
    drops the division, Dr.GRPO style). Along a response the deltas add up to r_i - mu, so the TD
    term is one more copy of the outcome advantage, put on the tokens where the group parted;
    td_coef = 0 is grpo_advantages on every token.

    A response's tokens are those under `mask` (1 on a prefix of the row), its EOS included: a
    response that is a strict prefix of another leaves their shared node by its EOS, the other by
    its next token, so the node branches. Padding matches nothing. A response without EOS
    (truncated) ends at its last real token and no token of it carries its end; a response that
    continues through that node branches there, as in the authors' code (a truncated rollout is
    full-length, so in a batch from `generate` only an identical response passes its end).
    A group of one and a group of equal rewards get exactly 0; the authors' code gives NaN (the
    std of one value) and float32 noise up to about 0.06 there.

    Returns the advantages, the TD term alone and the branch tokens (emitted at a node with two or
    more children, counting a response that ends there). Work is O(G^2 T), linear in a group's
    tokens for a given G, and vectorised: each response is compared once with each other one,
    position by position ([P, G, G, T] booleans), instead of a Python loop over tokens.
    """
    num_prompts, group_size, length = ids.shape
    real = mask.bool()
    agree = (ids.unsqueeze(2) == ids.unsqueeze(1)) & real.unsqueeze(2) & real.unsqueeze(1)  # [P, G, G, T]
    # shared[p, i, k]: length of the common prefix of responses i and k, their first disagreement.
    shared = torch.cat([~agree, torch.ones_like(agree[..., :1])], dim=3).byte().argmax(dim=3)  # [P, G, G]
    # The node at depth d of response i's path is passed by the k with shared[p, i, k] >= d: count them
    # and add up their rewards by shared length, then sum from the deepest level to the root.
    levels = torch.zeros(num_prompts, group_size, length + 1, dtype=rewards.dtype, device=rewards.device)
    passing = levels.scatter_add(2, shared, torch.ones_like(shared, dtype=rewards.dtype)).flip(2).cumsum(2).flip(2)
    reward_sum = levels.scatter_add(2, shared, rewards.unsqueeze(1).expand_as(shared)).flip(2).cumsum(2).flip(2)
    value = reward_sum / passing.clamp(min=1)  # [P, G, T + 1] V of the nodes along each response
    branch = (passing[..., 1:] < passing[..., :-1]) & real  # someone through s_t does not take this token
    delta = torch.where(branch, value[..., 1:] - value[..., :-1], 0.0)
    if group_size < 2:  # nothing to compare a lone response with (as grpo_advantages)
        return torch.zeros_like(delta), torch.zeros_like(delta), branch
    scale = rewards.std(dim=1, keepdim=True).unsqueeze(2) + eps if scale_by_std else 1.0
    all_equal = (rewards == rewards[:, :1]).all(dim=1).view(-1, 1, 1)
    td_term = torch.where(all_equal, 0.0, td_coef * delta / scale)
    return grpo_advantages(rewards, eps, scale_by_std).unsqueeze(2) * mask + td_term, td_term, branch


def clipped_surrogate(logp, old_logp, advantages, eps_low=0.2, eps_high=0.2, dual_clip=None):
    """Per-token PPO clipped loss (to minimise) and whether clipping was active, all [B, T].

        l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),   rho_t = pi_theta / pi_old

    eps_high > eps_low is DAPO's clip-higher (arXiv 2503.14476). With `dual_clip` c, the loss of
    a negative advantage is also capped at -c A (verl), so a huge ratio cannot blow it up.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss, clipped > unclipped


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled tokens, with d = log pi_ref - log pi_theta.

    k1 = -d;  k2 = d^2 / 2;  k3 = exp(d) - d - 1 (unbiased and non-negative; DeepSeekMath eq. 4).
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d ** 2
    if estimator == "k3":
        return torch.expm1(d) - d  # exp(d) - 1 via expm1: no cancellation, so never below 0 near d = 0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def aggregate_loss(token_loss, mask, mode, num_sequences=None, num_tokens=None, max_len=None):
    """Reduce per-token losses [B, T] under `mask` to the scalar loss.

    token-mean:          sum_{i,t} m l / sum m              (verl default, DAPO)
    seq-mean-token-mean: mean_i (sum_t m l / L_i)           (the DeepSeekMath paper)
    seq-mean-token-sum:  mean_i sum_t m l
    dr-grpo:             sum_{i,t} m l / (B * L_max)        (Dr.GRPO as in TRL; L_max = max_new_tokens)

    The totals default to this batch. When the batch is one micro-batch of a larger one, pass the
    larger one's B (`num_sequences`) and token count, so that the micro-batch losses add up to it.
    """
    num_sequences = mask.shape[0] if num_sequences is None else num_sequences
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    max_len = mask.shape[1] if max_len is None else max_len
    masked = token_loss * mask
    if mode == "token-mean":
        return masked.sum() / num_tokens
    if mode == "seq-mean-token-mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / num_sequences
    if mode == "seq-mean-token-sum":
        return masked.sum() / num_sequences
    if mode == "dr-grpo":
        return masked.sum() / (num_sequences * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def rows_with_gradient(advantages: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Indices of the sequences the update runs forward and backward: those the loss above can move.

    A sequence whose advantages are all 0 has a clipped surrogate of 0 for any ratio, so with no KL
    term it is left out (the same gradient, less work; the normaliser still counts its tokens). A
    method that adds any other per-token term (an entropy bonus, an SFT term) returns every
    sequence here, or that term never trains on the zero-advantage ones.
    """
    if kl_coef > 0:
        return torch.arange(advantages.shape[0])
    return torch.nonzero((advantages != 0).any(dim=1)).flatten().cpu()
# ALGO LOGIC END


# Plumbing: start-up checks, log-probs, the update. The rest is in common/.
def check_args(args: Args):
    """Fail at start-up, in one line, on arguments that cannot work (the command line checked each
    flag's allowed values and minimum already)."""
    batch_size = args.num_prompts * args.group_size
    minibatch_size = batch_size // args.num_minibatches
    problems = [
        (args.temperature <= 0, f"--temperature must be positive (got {args.temperature})"),
        (batch_size % args.num_minibatches,
         f"--num-minibatches ({args.num_minibatches}) must divide the batch of {batch_size} sequences"),
        (args.micro_batch_size < minibatch_size and minibatch_size % args.micro_batch_size,
         f"--micro-batch-size ({args.micro_batch_size}) must divide the minibatch of {minibatch_size} sequences"),
        # ALGO LOGIC: the method's own settings.
        (args.group_size < 2,
         f"--group-size must be at least 2 (got {args.group_size}): GRPO compares responses within a group"),
        # ALGO LOGIC END
    ]
    for failed, message in problems:
        if failed:
            raise UsageError(message)


def completion_logprobs(model, input_ids, attention_mask, completion_length, temperature):
    """Log-prob and entropy [B, C] of the last `completion_length` tokens under `model`.

    Positions count real tokens only (left padding skipped), as in generation, and the logits
    are divided by the sampling temperature, so these are the log-probs the sampler used.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    # The logits at position t predict token t + 1: the last C + 1 positions hold the predictions of the C
    # completion tokens and one past the end, which [:, :-1] drops.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=completion_length + 1).logits[:, :-1].float() / temperature  # [B, C, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, input_ids[:, -completion_length:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy


@torch.no_grad()
def frozen_logprobs(model, batch, args):
    """Log-probs and entropies [B, C] of the whole batch's completions under `model`, without gradients.

    Under torchrun each rank scores its share of the rows, and every rank receives all of them.
    """
    rows = torch.arange(batch["mask"].shape[0])
    own = [completion_logprobs(model, batch["input_ids"][idx], batch["attention_mask"][idx], batch["mask"].shape[1],
                               args.temperature) for idx in distributed.micro_batches(rows, args.micro_batch_size)]
    logp, entropy = (distributed.gather_rows(torch.cat(parts), rows) for parts in zip(*own))
    return logp, entropy


def policy_gradient_pass(policy, batch, indices, args, old_logp, ref_logp, normaliser):
    """Forward and backward over the sequences `indices` of one minibatch, in micro-batches.

    `indices` are the minibatch's sequences that rows_with_gradient picked; `normaliser` counts the
    whole minibatch (its sequences and tokens), so the loss normalisation is that of the full
    minibatch even when sequences are left out. Under torchrun each rank runs its share of
    `indices` and the ranks' gradients are summed. Returns this rank's summed statistics.
    """
    stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0.0}
    for idx in distributed.micro_batches(indices, args.micro_batch_size):
        mask = batch["mask"][idx]
        logp, entropy = completion_logprobs(policy, batch["input_ids"][idx], batch["attention_mask"][idx],
                                            mask.shape[1], args.temperature)
        if old_logp[idx].isnan().any():  # first pass over an on-policy batch: pi_old is this very policy
            old_logp[idx] = logp.detach()
        # ALGO LOGIC: the GRPO loss: clipped surrogate with each token's advantage, plus KL.
        token_loss, clipped = clipped_surrogate(logp, old_logp[idx], batch["advantages"][idx],
                                                args.clip_eps_low, args.clip_eps_high, args.dual_clip)
        if args.kl_coef > 0:
            kl = kl_penalty(logp, ref_logp[idx], args.kl_estimator)
            token_loss = token_loss + args.kl_coef * kl
            stats["kl"] += (kl.detach() * mask).sum().item()
        loss = aggregate_loss(token_loss, mask, args.loss_aggregation, max_len=args.max_new_tokens, **normaliser)
        # ALGO LOGIC END
        loss.backward()
        stats["loss"] += loss.item()
        stats["clipped"] += (clipped.float() * mask).sum().item()
        stats["entropy"] += (entropy * mask).sum().item()
        stats["tokens"] += mask.sum().item()
    return stats


def update_policy(policy, ref_model, optimizer, scheduler, batch, args):
    """num_epochs passes over the batch, num_minibatches optimizer steps each.

    `batch`: input_ids and attention_mask [B, P + C] (prompt and completion), mask and advantages
    [B, C] (completion tokens only). Returns the step metrics and pi_old [B, C], the log-probs
    before the update (NaN on sequences left out), against which the rollout engine is checked.
    """
    size = batch["input_ids"].shape[0]
    # pi_old: NaN until the first pass fills it with the policy's own log-probs, which on an on-policy batch are
    # pi_old exactly, so a single-minibatch update needs no extra forward pass.
    old_logp = torch.full_like(batch["mask"], float("nan"), dtype=torch.float)
    trained = rows_with_gradient(batch["advantages"], args.kl_coef)  # the method's choice (its first marked block)
    if args.num_minibatches > 1:  # later minibatches run after an update: pi_old needs its own pass
        old_logp = frozen_logprobs(policy, batch, args)[0]
    ref_logp = frozen_logprobs(ref_model, batch, args)[0] if ref_model is not None else None
    summed = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0.0}
    minibatch_size = size // args.num_minibatches
    for _ in range(args.num_epochs):
        order = torch.randperm(size)
        for start in range(0, size, minibatch_size):
            minibatch = order[start:start + minibatch_size]
            normaliser = {"num_sequences": len(minibatch),
                          "num_tokens": batch["mask"][minibatch].sum().clamp(min=1)}
            optimizer.zero_grad(set_to_none=True)
            stats = policy_gradient_pass(policy, batch, minibatch[torch.isin(minibatch, trained)], args,
                                         old_logp, ref_logp, normaliser)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            summed = {key: summed[key] + stats[key] for key in summed}
    policy.zero_grad(set_to_none=True)  # not needed until the next update: their memory goes to the rollouts
    scheduler.step()
    # Under torchrun the ranks agree again: statistics summed, and pi_old from the rank that computed each row.
    summed, old_logp = distributed.sum_over_ranks(summed), distributed.merge_rows(old_logp, trained)
    updates = args.num_epochs * args.num_minibatches
    tokens = max(summed["tokens"], 1.0)
    return {"loss": summed["loss"] / updates, "kl": summed["kl"] / tokens if ref_model is not None else None,
            "clip_fraction": summed["clipped"] / tokens,
            "entropy": summed["entropy"] / tokens if summed["tokens"] else None,
            "skipped_sequences": size - len(trained)}, old_logp


def main(argv=None):
    try:
        args = parse_args(Args, argv, __doc__)
        check_args(args)
        tracker = import_tracker(args.tracker) if args.track else None
        device = distributed.start(args.device or default_device())  # under torchrun: this rank's device
        checkpoint = latest_checkpoint(Path(args.resume)) if args.resume else None
        policy_source = str(checkpoint) if checkpoint else args.model
        # SLOT: the training problems and the held-out sets.
        train_stream = (None if args.eval_only
                        else ProblemStream(args.dataset, args.seed, args.prompt_key, args.answer_key))
        eval_sets = {name: load_eval_problems(name, args.eval_size, args.prompt_key, args.answer_key, args.data_dir)
                     for name in args.eval_dataset.split(",")}
        # SLOT END
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        tokenizer = load_tokenizer(policy_source, trust_remote_code=args.trust_remote_code)
        # Mixed precision, the default on GPUs: the weights and AdamW's states stay fp32, where a step of 1e-6 is not
        # rounded away as in bf16 weights; every forward computes in bf16 (autocast), the dtype vLLM samples in.
        policy = load_model(policy_source, device, args.dtype, args.trust_remote_code, args.gradient_checkpointing)
        policy.train()
        # Every prompt this run will render, training and held-out, must leave room for a full response.
        training = {} if args.eval_only else {args.dataset: train_stream.problems or [
            train_stream[i] for i in range(args.total_steps * args.num_prompts)]}
        longest_prompt = check_prompts_fit(policy, tokenizer, {**training, **eval_sets}, args.template,
                                           args.max_new_tokens)
        # The reference is the starting model, frozen; with no KL term it is not even loaded.
        ref_model = (load_model(args.model, device, args.dtype, args.trust_remote_code, frozen=True)
                     if args.kl_coef > 0 else None)
        engine = make_rollout_engine(args.rollout, policy, tokenizer, policy_source,
                                     max_model_len=longest_prompt + args.max_new_tokens,
                                     batch_size=args.num_prompts * args.group_size, seed=args.seed,
                                     trust_remote_code=args.trust_remote_code,
                                     gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                     sleep_mode=args.vllm_sleep_mode, check_threshold=args.sync_check_threshold,
                                     importance_sampling=args.tis_cap is not None)
        # SLOT: held-out evaluation: greedy pass@1 (and mean@k, pass@k) by the verifier.
        evaluate = Evaluator(engine, eval_sets, args.template, args.max_new_tokens, args.eval_batch_size,
                             args.eval_samples, args.temperature)
        # SLOT END
        if args.eval_only:
            run_dir = new_run_dir(args.runs_dir, eval_run_name(eval_sets), "eval", args.seed)
            return evaluate.run_only(RunLog(run_dir, args, None, tracker, args.track_project), args.model)

        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
        warmup = max(args.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        checkpointed = {"optimizer": optimizer, "scheduler": scheduler}  # what a checkpoint holds beside the policy
        # SLOT: the models in memory beside the policy: trained (weights, gradients, AdamW) and frozen.
        trained_models, frozen_models = [policy], [ref_model]
        # SLOT END
        check_training_fits(trained_models, frozen_models, args.learning_rate, engine)
        start_step = restore_checkpoint(checkpoint, policy, checkpointed) if checkpoint else 0
        run_dir = (Path(args.resume) if checkpoint
                   else new_run_dir(args.runs_dir, Path(args.dataset).stem, METHOD, args.seed))
        run_log = RunLog(run_dir, args, start_step if checkpoint else None, tracker, args.track_project)
    except UsageError as error:
        sys.exit(f"{METHOD}.py: error: {error}")
    print(f"run folder: {run_dir}")

    # The headline number is greedy pass@1 on the first held-out set; all sets are logged under "eval".
    eval_results = initial_results = evaluate()
    eval_accuracy = next(iter(eval_results.values()))["pass@1"]
    print(f"held-out greedy accuracy at step {start_step}: {eval_accuracy:.3f}")
    if not checkpoint:  # the start is in the record (a resumed run's log holds it already)
        run_log.log({"step": 0, "eval_accuracy": eval_accuracy, "eval": eval_results})
    batch_size = args.num_prompts * args.group_size
    started, history = time.time(), []
    progress = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps,
                    disable=not distributed.is_main())
    for step in progress:
        step_start = time.time()
        # ALGO LOGIC: sample G responses to each prompt, then score each with the verifier (reward 1 or 0).
        problems = [train_stream[(step - 1) * args.num_prompts + i] for i in range(args.num_prompts)]
        prompts = [render_prompt(tokenizer, problem["question"], args.template) for problem in problems]
        rollout = engine.generate([prompt for prompt in prompts for _ in range(args.group_size)],
                                  args.max_new_tokens, args.temperature)
        generate_time = time.time() - step_start

        score_start = time.time()
        answers = [problem["answer"] for problem in problems for _ in range(args.group_size)]
        rewards = torch.tensor(score_batch(rollout.texts, answers), device=device).view(-1, args.group_size)
        score_time = time.time() - score_start
        # ALGO LOGIC END

        train_start = time.time()
        mask = rollout.completion_mask.float()  # [B, C]: 1 on response tokens, up to and including EOS
        train_rewards = (rewards.flatten()[torch.randperm(batch_size)].view_as(rewards) if args.shuffle_rewards
                         else rewards)
        # ALGO LOGIC: TEMPO's advantage: GRPO's plus the change of prefix-tree value at branch tokens.
        group_ids = rollout.completion_ids.view(args.num_prompts, args.group_size, -1)  # [P, G, C], EOS included
        advantages, td_term, branch = tempo_advantages(train_rewards, group_ids, mask.view_as(group_ids), args.td_coef,
                                                       args.advantage_eps, args.scale_by_std)
        advantages = advantages.view_as(mask)  # [B, C]
        td_mass, outcome_mass = td_term.abs().sum().item(), (advantages - td_term.view_as(mask)).abs().sum().item()
        branching = branch.any(dim=1)  # [P, C]: the group's tree branches at this depth
        first_branch = branching.byte().argmax(dim=1)[branching.any(dim=1)].float()  # groups that branch at all
        tree_metrics = {"branch_token_fraction": branch.sum().item() / mask.sum().item(),
                        "first_branch_depth": first_branch.mean().item() if len(first_branch) else None,
                        "td_mass_share": td_mass / (td_mass + outcome_mass) if td_mass + outcome_mass else 0.0}
        # ALGO LOGIC END
        batch = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "mask": mask,
                 "advantages": advantages}
        if args.tis_cap is not None:  # correct for the sampler not being exactly the policy (one more forward pass)
            batch["advantages"] = batch["advantages"] * truncated_importance_weights(
                frozen_logprobs(policy, batch, args)[0], rollout.logprobs, args.tis_cap)
        update, old_logp = update_policy(policy, ref_model, optimizer, scheduler, batch, args)
        train_time = time.time() - train_start
        # vLLM: stop the run if it did not sample from the policy (pi_old), then push it the updated weights.
        update |= engine.check_and_sync(rollout, old_logp)

        completion_tokens = rollout.completion_mask.sum().item()
        step_time = time.time() - step_start
        evaluated = (args.eval_every and step % args.eval_every == 0) or step == args.total_steps
        if evaluated:
            eval_results = evaluate()
            eval_accuracy = next(iter(eval_results.values()))["pass@1"]
        metrics = {"step": step, "reward_mean": rewards.mean().item(), **update,
                   "eval_accuracy": eval_accuracy if evaluated else None, "eval": eval_results if evaluated else None,
                   "response_length": completion_tokens / len(rollout.texts),
                   "truncated_fraction": rollout.truncated.float().mean().item(),
                   "learning_rate": scheduler.get_last_lr()[0], "time_generate": generate_time,
                   "time_score": score_time, "time_train": train_time, "time_step": step_time,
                   "tokens_per_sec": completion_tokens / step_time}
        # SLOT: TEMPO's tree statistics beside GRPO's metrics.
        metrics.update(tree_metrics)
        # SLOT END
        history.append(metrics)
        run_log.log(metrics)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", eval=f"{eval_accuracy:.3f}")
        if (args.save_every and step % args.save_every == 0) or step == args.total_steps:
            save_checkpoint(run_dir, step, policy, tokenizer, checkpointed, args.keep_checkpoints)

    run_log.close()
    if history:  # empty when resuming a run that had already finished
        # SLOT: the end-of-run summary, with TEMPO's tree statistics averaged over the run's steps.
        depths = [m["first_branch_depth"] for m in history if m["first_branch_depth"] is not None]
        branch_share = sum(m["branch_token_fraction"] for m in history) / len(history)
        td_share = sum(m["td_mass_share"] for m in history) / len(history)
        tree_lines = {"branch tokens": f"{100 * branch_share:.1f}% of response tokens; a group's first branch at "
                                       f"depth {sum(depths) / max(len(depths), 1):.1f} tokens",
                      "TD term": f"{100 * td_share:.1f}% of the advantages' absolute mass"}
        print_summary(f"{METHOD}, {args.model} on {args.dataset}, seed {args.seed}", history, batch_size,
                      initial_results, eval_results, time.time() - started, run_dir, tree_lines)
        # SLOT END


if __name__ == "__main__":
    main()
    distributed.close()  # under torchrun: once every rank is done
