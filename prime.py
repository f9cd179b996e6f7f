"""PRIME: Process Reinforcement through IMplicit rEwards (arXiv 2502.01456), in one file.

Docs: docs/prime.md. This is grpo.py with PRIME's changes, marked `# ALGO LOGIC: ...`
to `# ALGO LOGIC END`: an implicit process reward model (PRM), a causal LM trained online on the
policy's own rollouts with their outcome labels, gives every token a reward q_t = log pi_phi - log
pi_ref against a frozen reference; leave-one-out baselines per reward source, returns and batch
whitening turn those and the outcome into per-token advantages; a filter keeps prompts of middling
accuracy. Defaults follow the authors' code (PRIME-RL/PRIME), the paper's wording is a flag.

    python prime.py                   # tiny built-in model + arithmetic task, CPU, a few minutes
    python prime.py --model Qwen2.5-Math-1.5B --dataset data/gsm8k_train.jsonl \\
        --eval-dataset gsm8k --template plain --learning-rate 5e-7 --prm-learning-rate 1e-6 \\
        --group-size 4 --accuracy-lower-bound 0.2 --accuracy-upper-bound 0.8 --max-new-tokens 1024
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
# SLOT: PRIME's imports: the filter joins the rollouts of several draws into one batch.
import math

from common.rollout import concat_rollouts, select_rollout
from common.runs import trend
# SLOT END

METHOD = Path(__file__).stem  # run folders and messages are named after the file
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo")
# ALGO LOGIC: PRIME's switches.
PRM_ORDERS = ("reward-then-update", "update-then-reward")
PROCESS_BASELINES = ("code", "paper")
# ALGO LOGIC END


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
    group_size: int = arg(4, "G: sampled responses per prompt (paper: 4)")
    max_new_tokens: int = arg(96, "longest response, in tokens", min=1)
    temperature: float = arg(1.0, "sampling temperature of rollouts")

    # Optimisation.
    learning_rate: float = arg(2e-4, "AdamW learning rate of the policy (tiny model: 2e-4; paper: 5e-7 for 7B)")
    warmup_steps: int = arg(5, "linear learning-rate warm-up, then constant")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    num_epochs: int = arg(1, "passes over each batch of rollouts (PPO epochs)", min=1)
    num_minibatches: int = arg(1, "optimizer steps per pass over a batch", min=1)
    micro_batch_size: int = arg(64, "sequences per forward/backward (gradient accumulation)", min=1)

    # The GRPO loss: advantage, clipped surrogate, KL.
    clip_eps_low: float = arg(0.2, "lower clip range of the ratio")
    clip_eps_high: float = arg(0.2, "upper clip range of the ratio (DAPO clip-higher: 0.28)")
    dual_clip: float | None = arg(None, "dual-clip bound c for negative advantages (verl: 3; default: off)")
    kl_coef: float = arg(0.0, "beta of the KL-to-reference loss (DeepSeekMath 0.04); 0 loads no reference")
    kl_estimator: str = arg("k3", "estimator of the KL per token", choices=KL_ESTIMATORS)
    loss_aggregation: str = arg("token-mean", "how token losses are averaged", choices=LOSS_AGGREGATIONS)
    shuffle_rewards: bool = arg(False, "control: permute rewards within the batch")

    # PRIME: the implicit PRM, trained online, and the prompt filter.
    prm_model: str | None = arg(None, "initial implicit PRM: alias, hub id or folder (default: --model)")
    prm_reference: str | None = arg(None, "frozen reference pi_ref of the PRM (default: --model)")
    prm_learning_rate: float = arg(1e-3, "AdamW learning rate of the PRM (paper: 1e-6 for 7B)")
    prm_warmup_steps: int = arg(0, "linear warm-up of the PRM's learning rate, then constant (authors: none)")
    prm_max_grad_norm: float = arg(10.0, "gradient clipping norm of the PRM (authors' run script: 10)")
    prm_beta: float = arg(0.05, "beta of the PRM loss BCE(sigmoid(beta * sum_t q_t), r_o)")
    prm_order: str = arg("reward-then-update", "PRM rewards before its update (authors) or after", choices=PRM_ORDERS)
    process_baseline: str = arg("code", "process baseline: the authors' code or the paper", choices=PROCESS_BASELINES)
    accuracy_lower_bound: float = arg(0.2, "filter: keep prompts whose sampled accuracy is at least this (paper: 0.2)")
    accuracy_upper_bound: float = arg(0.8, "filter: keep prompts whose sampled accuracy is at most this (paper: 0.8)")
    max_extra_draws: int = arg(2, "filter: most extra draws per step while short of --num-prompts", min=0)

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


# ALGO LOGIC: the PRIME arithmetic, pure functions (arXiv 2502.01456 section 3; the authors' `compute_rloo_returns`,
# `compute_ce_dpo_loss_rm`, `filter`), then what it keeps of GRPO's. Rows [B] of a batch hold the G responses of each
# prompt next to each other; `mask` [B, C] is 1 on response tokens, which start at column 0.
def implicit_process_rewards(prm_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q_t = log pi_phi(y_t | y_<t) - log pi_ref(y_t | y_<t) on response tokens, 0 elsewhere, [B, C].

    The paper's process reward is r_t = beta * q_t; summed over a response, beta * sum_t q_t is the
    implicit outcome reward that the PRM loss trains (implicit_prm_loss).
    """
    return (prm_logp - ref_logp) * mask


def implicit_prm_loss(q: torch.Tensor, mask: torch.Tensor, outcomes: torch.Tensor, beta: float) -> torch.Tensor:
    """The PRM's cross-entropy on outcome labels r_o in {0, 1}, mean over responses:

        L_CE = -[ r_o log sigmoid(beta sum_t q_t) + (1 - r_o) log(1 - sigmoid(beta sum_t q_t)) ]

    Computed from the logit beta * sum_t q_t: the same number as the authors' sigmoid-then-BCE,
    without its overflow for long responses.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(beta * (q * mask).sum(dim=1), outcomes.to(q.dtype))


def prm_accuracy(q: torch.Tensor, mask: torch.Tensor, outcomes: torch.Tensor, beta: float) -> float:
    """Share of responses where the PRM's verdict sigmoid(beta sum_t q_t) > 0.5 agrees with the verifier."""
    predicted_correct = torch.sigmoid(beta * (q * mask).sum(dim=1)) > 0.5
    return (predicted_correct == (outcomes > 0.5)).float().mean().item()


def prm_pairwise_accuracy(q: torch.Tensor, mask: torch.Tensor, outcomes: torch.Tensor, group_size: int) -> float | None:
    """Share of (right, wrong) pairs of responses to the same prompt that the PRM orders right, by
    sum_t q_t (a tie counts 1/2); None without such a pair. Only the order within a group reaches
    the advantages, so this is the accuracy that matters for credit; the authors log it as `dpo_acc`
    (averaged per group, an all-equal group counting 1/2)."""
    scores = (q * mask).sum(dim=1).view(-1, group_size)
    labels = outcomes.view(-1, group_size)
    right_over_wrong = labels.unsqueeze(2) > labels.unsqueeze(1)  # [P, G, G]: response i right, j wrong
    if not right_over_wrong.any():
        return None
    score_gap = scores.unsqueeze(2) - scores.unsqueeze(1)
    agreement = (score_gap > 0).float() + 0.5 * (score_gap == 0).float()
    return agreement[right_over_wrong].mean().item()


def normalise_process_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_t / (max over the batch of |sum_{s >= t} r_s| + 1e-6), [B, C] (the authors' `prime_norm: batch_norm`).

    Every return-to-go of the process rewards then lies in [-1, 1]. The divisor scales with the
    rewards, so the paper's r_t = beta * q_t and q_t itself give the same result: beta cancels here
    and acts only inside the PRM loss. (The authors' code passes q_t; so does this trainer.)
    """
    rewards = rewards * mask
    return rewards / (returns_to_go(rewards, mask).abs().max() + 1e-6)


def leave_one_out_process_rewards(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                                  form: str = "code") -> torch.Tensor:
    """Process rewards minus a leave-one-out baseline from the other responses of the group, [B, C].

    With rbar_j the mean (not the sum) of r over response j's tokens and G the group size:
        code  (authors' code, the default): r'_{i,t} = r_{i,t} G / (G - 1) - (1 / (G - 1)) sum_j rbar_j
        paper (its wording):                r'_{i,t} = r_{i,t} - (1 / (G - 1)) sum_{j != i} rbar_j
    The code form is the paper's plus (r_{i,t} - rbar_i) / (G - 1): equal on one-token responses only.
    """
    grouped, grouped_mask = rewards.view(-1, group_size, rewards.shape[1]), mask.view(-1, group_size, mask.shape[1])
    mean_per_response = (grouped * grouped_mask).sum(dim=2) / grouped_mask.sum(dim=2).clamp(min=1)  # [P, G]
    total = mean_per_response.sum(dim=1, keepdim=True)  # [P, 1]
    if form == "code":
        shaped = grouped * group_size / (group_size - 1) - (total / (group_size - 1)).unsqueeze(2)
    elif form == "paper":
        shaped = grouped - ((total - mean_per_response) / (group_size - 1)).unsqueeze(2)
    else:
        raise ValueError(f"unknown process baseline {form!r}")
    return (shaped * grouped_mask).view_as(rewards)


def leave_one_out_outcome_rewards(outcomes: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """r_o_i - mean_{j != i} r_o_j on the last token of each response, 0 elsewhere, [B, C]."""
    grouped = outcomes.view(-1, group_size).to(mask.dtype)
    shaped = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    placed = torch.zeros_like(mask)
    last_token = mask.sum(dim=1).long() - 1
    placed[torch.arange(mask.shape[0], device=mask.device), last_token] = shaped.flatten()
    return placed


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{s >= t} r_s over response tokens (gamma = 1, as the authors ran both sources), [B, C]."""
    return (rewards * mask).flip(dims=[1]).cumsum(dim=1).flip(dims=[1]) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over all valid tokens of the batch, not per group; var with
    Bessel's correction (verl's `masked_whiten`). 0 off the mask."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    variance = ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def prime_advantages(process_rewards: torch.Tensor, outcomes: torch.Tensor, mask: torch.Tensor, group_size: int,
                     process_baseline: str = "code") -> torch.Tensor:
    """PRIME's per-token advantages [B, C] from process rewards [B, C] and outcome rewards [B]:

        1. process rewards / the batch max of |their return-to-go| (so beta cancels)
        2. a leave-one-out baseline per source: the process rewards on every token, the outcome
           on the last token (RLOO)
        3. returns with gamma = 1, summed over the two sources (the authors' rm and verifier weights
           of 5 never reach this sum in their code, so there are none here)
        4. whitened over all valid tokens of the batch
    """
    process = leave_one_out_process_rewards(normalise_process_rewards(process_rewards, mask), mask, group_size,
                                            process_baseline)
    outcome = leave_one_out_outcome_rewards(outcomes, mask, group_size)
    return whiten(returns_to_go(process, mask) + returns_to_go(outcome, mask), mask)


def prompts_in_band(rewards: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """The prompt filter, rewards [P, G] -> [P] bool: is the group's accuracy within [lower, upper]?"""
    accuracy = rewards.mean(dim=1)
    return (accuracy >= lower) & (accuracy <= upper)


# The GRPO arithmetic PRIME keeps: the clipped surrogate, the KL estimators, the loss aggregation.
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
        # ALGO LOGIC: the method's own settings: GRPO's group, PRIME's accuracy band and PRM.
        (args.group_size < 2,
         f"--group-size must be at least 2 (got {args.group_size}): GRPO compares responses within a group"),
        (not 0 <= args.accuracy_lower_bound <= args.accuracy_upper_bound <= 1,
         f"--accuracy-lower-bound ({args.accuracy_lower_bound}) and --accuracy-upper-bound "
         f"({args.accuracy_upper_bound}) must satisfy 0 <= lower <= upper <= 1"),
        (args.prm_learning_rate <= 0 or args.prm_beta <= 0, "--prm-learning-rate and --prm-beta must be positive"),
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
# ALGO LOGIC: the prompt filter's draws (sample -> verify -> filter), and the implicit PRM's step.
def fill_batch(in_band: torch.Tensor, num_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which groups (of all drawn, in draw order) make a step's batch of `num_prompts`, and which of them train.

    The first `num_prompts` in-band groups; if fewer were drawn, the first groups the filter dropped
    top the batch up (they keep its size and train nothing; the step leaves their tokens out of the
    loss's normaliser). Returns indices [num_prompts] and trained [num_prompts] bool.
    """
    kept = in_band.nonzero().flatten()[:num_prompts]
    topped_up = (~in_band).nonzero().flatten()[:num_prompts - len(kept)]
    return torch.cat([kept, topped_up]), torch.arange(num_prompts) < len(kept)


def sample_filtered(engine, tokenizer, problems, reserve, step, args, device):
    """Sample G responses to each prompt, verify them, and keep the prompts whose accuracy lies in
    [--accuracy-lower-bound, --accuracy-upper-bound] (the authors' `filter`). While fewer than
    --num-prompts are kept, sample as many more of the reserve's prompts as are missing at the keep
    rate so far, at most --max-extra-draws times (at places fixed per step: a resumed run draws the
    same); fill_batch picks the batch. All draws come from the policy before its update, so one
    engine check and sync after it covers them. Returns the batch's rollout [B], rewards [P, G], which
    groups train [P], the filter's metrics, and the seconds spent generating and scoring."""
    generate_time = score_time = 0.0
    draws, drawn_rewards, in_band = [], [], torch.zeros(0, dtype=torch.bool)
    with engine.awake():  # a vLLM engine that sleeps between rollouts wakes once for all of a step's draws
        while len(draws) <= args.max_extra_draws and (not draws or in_band.sum() < args.num_prompts):
            if draws:
                kept, missing = int(in_band.sum()), args.num_prompts - int(in_band.sum())
                count = min(args.num_prompts, math.ceil(missing * len(in_band) / kept)) if kept else args.num_prompts
                first = ((step - 1) * args.max_extra_draws + len(draws) - 1) * args.num_prompts
                problems = [reserve[first + i] for i in range(count)]
            draw_start = time.time()
            prompts = [render_prompt(tokenizer, problem["question"], args.template) for problem in problems]
            draws.append(engine.generate([prompt for prompt in prompts for _ in range(args.group_size)],
                                         args.max_new_tokens, args.temperature))
            score_start = time.time()
            answers = [problem["answer"] for problem in problems for _ in range(args.group_size)]
            scores = torch.tensor(score_batch(draws[-1].texts, answers), device=device)
            drawn_rewards.append(scores.view(-1, args.group_size))
            generate_time += score_start - draw_start
            score_time += time.time() - score_start
            in_band = torch.cat([in_band, prompts_in_band(drawn_rewards[-1], args.accuracy_lower_bound,
                                                          args.accuracy_upper_bound).cpu()])
    groups, trained = fill_batch(in_band, args.num_prompts)
    rows = [group * args.group_size + member for group in groups.tolist() for member in range(args.group_size)]
    rollout = select_rollout(concat_rollouts(draws, tokenizer.pad_token_id), rows)
    # reward_mean covers every response sampled this step: the filtered batch sits near 0.5 by design.
    metrics = {"reward_mean": torch.cat(drawn_rewards).mean().item(), "filter_keep_rate": in_band.float().mean().item(),
               "filter_draws": len(draws), "trained_prompts": int(trained.sum())}
    return rollout, torch.cat(drawn_rewards)[groups.to(device)], trained, metrics, generate_time, score_time



def update_prm(prm, prm_reference, prm_optimizer, prm_scheduler, batch, outcomes, args):
    """One optimizer step of the PRM on L_CE over `batch` (input_ids, attention_mask, mask), in micro-batches.

    Returns the process rewards q [B, C] and the step's metrics. By default q comes from the very
    forward pass that computes the loss, so it is the PRM before this update, as in the authors' code
    (their `update: after`); with --prm-order update-then-reward a second, gradient-free pass after
    the step gives it (their `update: before`). Both score the batch that the current policy sampled,
    before the policy moves: the PRM never trains against another policy's rollouts. Log-probs are at
    temperature 1: the PRM and reference score the tokens as language models, not as the sampler.
    """
    size, width = batch["mask"].shape
    all_rows = torch.arange(size)
    micro_batches = distributed.micro_batches(all_rows, args.micro_batch_size)  # under torchrun: this rank's share

    def token_logprobs(model, rows):
        return completion_logprobs(model, batch["input_ids"][rows], batch["attention_mask"][rows], width, 1.0)[0]

    with torch.no_grad():
        ref_logp = distributed.gather_rows(torch.cat([token_logprobs(prm_reference, rows) for rows in micro_batches]),
                                           all_rows)  # [B, C]
    prm_optimizer.zero_grad(set_to_none=True)
    q_before, loss_total = [], 0.0
    for rows in micro_batches:
        q = implicit_process_rewards(token_logprobs(prm, rows), ref_logp[rows], batch["mask"][rows])
        # the batch mean: each micro-batch's mean weighted by its share of the rows
        loss = implicit_prm_loss(q, batch["mask"][rows], outcomes[rows], args.prm_beta) * q.shape[0] / size
        loss.backward()
        loss_total += loss.item()
        q_before.append(q.detach())
    q_before = distributed.gather_rows(torch.cat(q_before), all_rows)
    loss_total = distributed.sum_over_ranks({"loss": loss_total})["loss"]
    grad_norm = torch.nn.utils.clip_grad_norm_(prm.parameters(), args.prm_max_grad_norm)
    prm_optimizer.step()
    prm_scheduler.step()
    prm_optimizer.zero_grad(set_to_none=True)  # free the gradients before the policy's update
    q_rewards = q_before
    if args.prm_order == "update-then-reward":
        with torch.no_grad():
            q_rewards = distributed.gather_rows(torch.cat([
                implicit_process_rewards(token_logprobs(prm, rows), ref_logp[rows], batch["mask"][rows])
                for rows in micro_batches]), all_rows)
    rewards = args.prm_beta * q_rewards[batch["mask"].bool()]  # the paper's r_t = beta * q_t
    return q_rewards, {"prm_loss": loss_total,
                       "prm_accuracy": prm_accuracy(q_before, batch["mask"], outcomes, args.prm_beta),
                       "prm_pairwise_accuracy": prm_pairwise_accuracy(q_before, batch["mask"], outcomes,
                                                                      args.group_size),
                       "prm_grad_norm": grad_norm.item(), "process_reward_mean": rewards.mean().item(),
                       "process_reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0}
# ALGO LOGIC END


def main(argv=None):
    try:
        args = parse_args(Args, argv, __doc__)
        check_args(args)
        tracker = import_tracker(args.tracker) if args.track else None
        device = distributed.start(args.device or default_device())  # under torchrun: this rank's device
        checkpoint = latest_checkpoint(Path(args.resume)) if args.resume else None
        policy_source = str(checkpoint) if checkpoint else args.model
        # SLOT: the training problems and the held-out sets. The filter's extra prompts come from a second
        # walk over the training problems, seeded -1 - seed: a walk no run with a seed of 0 or more trains on.
        train_stream = (None if args.eval_only
                        else ProblemStream(args.dataset, args.seed, args.prompt_key, args.answer_key))
        reserve_stream = (None if args.eval_only or not args.max_extra_draws else
                          ProblemStream(args.dataset, -1 - args.seed, args.prompt_key, args.answer_key))
        eval_sets = {name: load_eval_problems(name, args.eval_size, args.prompt_key, args.answer_key, args.data_dir)
                     for name in args.eval_dataset.split(",")}
        # SLOT END
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        tokenizer = load_tokenizer(policy_source, trust_remote_code=args.trust_remote_code)
        # ALGO LOGIC: a PRM and its reference score the policy's token ids, so they must share its tokenizer.
        for name in ({args.prm_model, args.prm_reference} - {None}) if not args.eval_only else ():
            if load_tokenizer(name, args.trust_remote_code).get_vocab() != tokenizer.get_vocab():
                raise UsageError(f"{name} has another tokenizer than the policy; "
                                 "a PRM must score the policy's own tokens")
        # ALGO LOGIC END
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
        # ALGO LOGIC: the implicit PRM, trained: from the checkpoint on resume, else --prm-model or the policy's
        # starting weights. Its reference, frozen: --prm-reference or the starting model, never the checkpoint.
        # The reference computes exactly as the PRM does (the same precision, not a bf16 copy), so q_t is exactly 0
        # where the PRM has not moved: max-normalisation would blow rounding noise up to rewards of size 1.
        prm = load_model(str(checkpoint / "prm") if checkpoint else args.prm_model or args.model, device, args.dtype,
                         args.trust_remote_code, args.gradient_checkpointing)
        prm.train()
        prm_reference = load_model(args.prm_reference or args.model, device, args.dtype, args.trust_remote_code)
        prm_reference.requires_grad_(False)
        prm_optimizer = torch.optim.AdamW(prm.parameters(), lr=args.prm_learning_rate, weight_decay=0.0)
        prm_warmup = max(args.prm_warmup_steps, 1)
        prm_scheduler = torch.optim.lr_scheduler.LambdaLR(prm_optimizer, lambda step: min(1.0, (step + 1) / prm_warmup))
        checkpointed.update(prm=prm, prm_optimizer=prm_optimizer, prm_scheduler=prm_scheduler)
        # ALGO LOGIC END
        # SLOT: the models in memory beside the policy: trained (weights, gradients, AdamW) and frozen.
        trained_models, frozen_models = [policy, prm], [ref_model, prm_reference]
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
        # ALGO LOGIC: sample G responses to each prompt, verify them, and filter (sample_filtered): a batch of
        # --num-prompts groups whose accuracy lies in the band, its rewards, and which of its groups train.
        problems = [train_stream[(step - 1) * args.num_prompts + i] for i in range(args.num_prompts)]
        rollout, rewards, trained_prompts, filter_metrics, generate_time, score_time = sample_filtered(
            engine, tokenizer, problems, reserve_stream, step, args, device)
        # ALGO LOGIC END

        train_start = time.time()
        mask = rollout.completion_mask.float()  # [B, C]: 1 on response tokens, up to and including EOS
        train_rewards = (rewards.flatten()[torch.randperm(batch_size)].view_as(rewards) if args.shuffle_rewards
                         else rewards)
        # ALGO LOGIC: PRIME's advantages. The PRM gives the trained groups' process rewards q and takes its
        # step on their outcome labels; leave-one-out baselines, returns and whitening make the advantages.
        # Topped-up groups get 0, stay out of the PRM's step and, with mask 0, out of the loss's token count:
        # a short step's trained tokens weigh what a full step's do.
        trained = trained_prompts.repeat_interleave(args.group_size).to(device)  # [B] bool
        mask = mask * trained.unsqueeze(1)
        advantages = torch.zeros_like(mask)  # [B, C]
        prm_metrics = dict.fromkeys(("prm_loss", "prm_accuracy", "prm_pairwise_accuracy", "prm_grad_norm",
                                     "process_reward_mean", "process_reward_std"))
        if trained.any():
            prm_batch = {"input_ids": rollout.input_ids[trained], "attention_mask": rollout.attention_mask[trained],
                         "mask": mask[trained]}
            q, prm_metrics = update_prm(prm, prm_reference, prm_optimizer, prm_scheduler, prm_batch,
                                        train_rewards.flatten()[trained], args)
            advantages[trained] = prime_advantages(q, train_rewards.flatten()[trained], mask[trained], args.group_size,
                                                   args.process_baseline)
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
        # SLOT: PRIME's metrics: the filter's, and the PRM's (its accuracy from before its update).
        metrics.update(**filter_metrics, **prm_metrics)
        # SLOT END
        history.append(metrics)
        run_log.log(metrics)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", eval=f"{eval_accuracy:.3f}")
        if (args.save_every and step % args.save_every == 0) or step == args.total_steps:
            save_checkpoint(run_dir, step, policy, tokenizer, checkpointed, args.keep_checkpoints)

    run_log.close()
    if history:  # empty when resuming a run that had already finished
        # SLOT: the end-of-run summary, with PRIME's lines: does the PRM learn to predict the verifier (its
        # accuracy on each step's responses before it trains on them), and what did the filter keep.
        prime_lines = {label: trend(history, key) + ", before each update"
                       for key, label in (("prm_accuracy", "PRM accuracy"),
                                          ("prm_pairwise_accuracy", "PRM pairwise accuracy"))
                       if any(m[key] is not None for m in history)}
        kept = sum(m["filter_keep_rate"] for m in history) / len(history)
        draws = sum(m["filter_draws"] for m in history) / len(history)
        short_steps = sum(m["trained_prompts"] < args.num_prompts for m in history)
        prime_lines["prompt filter"] = (f"kept {100 * kept:.1f}% of drawn prompts, {draws:.2f} draws per step, "
                                        f"{short_steps} of {len(history)} steps short of {args.num_prompts} prompts")
        print_summary(f"{METHOD}, {args.model} on {args.dataset}, seed {args.seed}", history, batch_size,
                      initial_results, eval_results, time.time() - started, run_dir, prime_lines)
        # SLOT END


if __name__ == "__main__":
    main()
    distributed.close()  # under torchrun: once every rank is done
