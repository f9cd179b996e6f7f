"""GiGPO: Group-in-Group Policy Optimization for LLM agents (arXiv 2505.10978), in one file.

Docs: docs/gigpo.md. This is grpo.py with an agent's episodes in place of single
answers, changed only in the blocks marked `# ALGO LOGIC: ...` to `# ALGO LOGIC END`. G episodes
start from the same state of the same task; every turn is one training sample. Its advantage is
the episode-level GRPO advantage of its episode plus omega times a step-level one: the turns of
all G episodes that stand in the same environment state (an anchor state) form a step group, and
each turn is compared with its group on its discounted return.

    python gigpo.py                   # built-in key-and-door worlds, tiny agent model, CPU, minutes
    python gigpo.py --model Qwen2.5-1.5B-Instruct --dataset games/train --eval-dataset games/test \\
        --max-new-tokens 512 --max-turns 50 --kl-coef 0.01 --learning-rate 1e-6     # TextWorld games
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
# SLOT: an agent's tasks are environments, played an episode at a time (common/envs.py).
import difflib
import math
from dataclasses import replace

from common.envs import KEYDOOR, EpisodeEvaluator, TaskStream, load_eval_tasks, run_episodes, stack_turns
from common.runs import trend
# SLOT END

METHOD = Path(__file__).stem  # run folders and messages are named after the file
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo")


@dataclass
class Args:
    # The task: the model, its training data and held-out sets.
    seed: int = arg(1, "seed of sampling, task order and initialisation")
    model: str = arg("tiny-agent", "alias (Qwen2.5-1.5B-Instruct), hub id, folder, or 'tiny-agent'")
    dataset: str = arg(KEYDOOR, "training tasks: 'keydoor' (built-in), a TextWorld game (.z8/.ulx) or a folder of them")
    eval_dataset: str = arg(KEYDOOR, "held-out tasks, comma-separated: keydoor, TextWorld games or folders")
    template: str = arg("chat", "prompt template: the tokenizer's chat template", choices=("chat",))

    # Rollouts: what one step samples.
    total_steps: int = arg(60, "policy update steps (one batch of episodes each)", min=1)
    num_prompts: int = arg(4, "tasks per step (each played G times from the same start)", min=1)
    group_size: int = arg(8, "G: episodes per task (paper: 8)")
    max_new_tokens: int = arg(16, "longest response of one turn, in tokens (papers: 512 with <think>)", min=1)
    temperature: float = arg(1.0, "sampling temperature of rollouts")

    # Optimisation.
    learning_rate: float = arg(1e-4, "AdamW learning rate (paper: 1e-6 for 1.5B-7B models)")
    warmup_steps: int = arg(5, "linear learning-rate warm-up, then constant")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    num_epochs: int = arg(1, "passes over each batch of rollouts (PPO epochs)", min=1)
    num_minibatches: int = arg(1, "optimizer steps per pass over a batch (its turns, padded to a multiple)", min=1)
    micro_batch_size: int = arg(256, "turns per forward/backward (gradient accumulation)", min=1)

    # The GRPO loss: advantage, clipped surrogate, KL.
    scale_by_std: bool = arg(True, "divide advantages by their group's std (authors' mean_std_norm; off: mean_norm)")
    advantage_eps: float = arg(1e-6, "added to the group std")
    clip_eps_low: float = arg(0.2, "lower clip range of the ratio")
    clip_eps_high: float = arg(0.2, "upper clip range of the ratio (DAPO clip-higher: 0.28)")
    dual_clip: float | None = arg(None, "dual-clip bound c for negative advantages (verl: 3; default: off)")
    kl_coef: float = arg(0.0, "beta of the KL-to-reference loss (paper: 0.01 with k3); 0 loads no reference")
    kl_estimator: str = arg("k3", "estimator of the KL per token", choices=KL_ESTIMATORS)
    loss_aggregation: str = arg("token-mean", "how token losses are averaged", choices=LOSS_AGGREGATIONS)
    shuffle_rewards: bool = arg(False, "control: permute episode returns, and step returns, within the batch")

    # GiGPO: episodes, step groups and the environment.
    max_turns: int = arg(12, "turns before an episode is cut off (ALFWorld runs: 50)", min=1)
    history_length: int = arg(0, "recent (observation, action) pairs in each prompt (verl-agent: 2)", min=0)
    gamma: float = arg(0.95, "discount of the step returns that step groups compare (paper: 0.95)")
    step_advantage_weight: float = arg(1.0, "omega: weight of the step-level advantage (0: GRPO)")
    episode_stats: str = arg("episodes", "mean/std over episodes (paper) or rows", choices=("episodes", "steps"))
    similarity_threshold: float | None = arg(None, "group anchors at this difflib ratio (authors: 0.9; default: exact)")
    invalid_action_penalty: float = arg(0.1, "penalty of a turn with no <action>...</action> (paper: 0.1)", min=0)
    minibatch_rows: int = arg(0, "turns per minibatch, instead of --num-minibatches (ALFWorld: 256; 0: off)", min=0)
    invalid_action_penalty_form: str = arg("turn", "turn: the authors' form; reward: older", choices=("turn", "reward"))

    # Held-out evaluation.
    eval_every: int = arg(20, "steps between held-out evaluations (0: only before and after)")
    eval_size: int = arg(0, "held-out tasks evaluated per set (0: all)", min=0)
    eval_samples: int = arg(0, "k: also play k sampled episodes per task for mean@k and pass@k (0: greedy only)", min=0)
    eval_only: bool = arg(False, "only evaluate --model on --eval-dataset, then exit")
    eval_batch_size: int = arg(250, "episodes played at once in evaluation")

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


# ALGO LOGIC: the GRPO arithmetic and GiGPO's, pure functions.
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


# GiGPO's arithmetic (section 4 of the paper). The episode level is grpo_advantages over episode
# returns; the step level groups turns by anchor state.
def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """Discounted return of every turn of one episode (eq. 5): R_t = r_t + gamma R_{t+1}, R_T = r_T."""
    returns, running = [], 0.0
    for reward in reversed(rewards):
        running = reward + gamma * running
        returns.append(running)
    return returns[::-1]


def penalised_returns(rewards: list[list[float]], invalid: list[list[bool]], gamma: float, penalty: float,
                      form: str = "turn") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Episode returns [E], turn penalties [N] and step returns [N] of E episodes' turn rewards,
    with the invalid-action penalty (section 5 of the paper) placed one of two ways:

        turn:   as verl-agent (ray_trainer.py): the step returns are the discounted returns of the
                environment's rewards (compute_step_discounted_returns); then the penalty comes off
                the invalid turn's own step return and episode score only (apply_invalid_action_penalty)
        reward: the invalid turn's reward is -penalty, so it lowers the episode return and, discounted,
                the returns of the turns before it
    """
    if form == "reward":
        rewards = [[reward - penalty * bad for reward, bad in zip(*episode)] for episode in zip(rewards, invalid)]
    turn_penalty = torch.tensor([penalty * bad if form == "turn" else 0.0 for episode in invalid for bad in episode])
    step_returns = torch.tensor([value for episode in rewards for value in discounted_returns(episode, gamma)])
    return torch.tensor([sum(episode) for episode in rewards]), turn_penalty, step_returns - turn_penalty


def group_relative(values: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                   scale_by_std: bool = True) -> torch.Tensor:
    """grpo_advantages within each group of a flat batch: values [N], group_ids [N] -> [N].

    A group of one, or one whose values are all equal, gets 0.
    """
    advantages = torch.zeros_like(values)
    for group in group_ids.unique():
        members = group_ids == group
        advantages[members] = grpo_advantages(values[members].view(1, -1), eps, scale_by_std).view(-1)
    return advantages


def step_groups(anchors: list[str], task_ids: list[int], similarity_threshold: float | None = None) -> torch.Tensor:
    """Step-group id [N] of every turn: turns of the same task whose anchor states match (eq. 6).

    Matching is exact by default, so revisits of a state within one episode join its group too.
    With `similarity_threshold`, the authors' later code for observations that rarely repeat
    exactly: a turn joins the first group of its task whose first anchor has a
    difflib.SequenceMatcher ratio of at least the threshold with its own, else starts a group.
    The turn's anchor goes first, as in verl-agent's `are_similar(obs, rep)` (gigpo/core_gigpo.py):
    ratio() is not symmetric, since above 200 characters difflib ignores the frequent characters
    of the second string only.
    """
    ids, groups_of_task = [], {}  # task -> [(its first anchor, group id)]
    for anchor, task in zip(anchors, task_ids):
        groups = groups_of_task.setdefault(task, [])
        if similarity_threshold is None:
            match = next((group for first, group in groups if first == anchor), None)
        else:
            match = next((group for first, group in groups
                          if difflib.SequenceMatcher(None, anchor, first).ratio() >= similarity_threshold), None)
        if match is None:
            match = sum(map(len, groups_of_task.values()))  # a new group: the next unused id
            groups.append((anchor, match))
        ids.append(match)
    return torch.tensor(ids)


def gigpo_advantages(episode_returns: torch.Tensor, step_returns: torch.Tensor, turn_episode: torch.Tensor,
                     turn_step_group: torch.Tensor, omega: float = 1.0, eps: float = 1e-6, scale_by_std: bool = True,
                     episode_stats: str = "episodes", turn_penalty: torch.Tensor | None = None) -> torch.Tensor:
    """Advantage of every turn [N] (eq. 8):  A_{i,t} = A^E_i + omega * A^S_{i,t}.

    episode_returns [P, G]: the total reward R_i of each of the G episodes of each task.
    step_returns [N]: the discounted return R_{i,t} of each turn; turn_episode [N]: its episode's
    index into episode_returns.flatten(); turn_step_group [N]: its step group (step_groups);
    turn_penalty [N]: taken off the turn's episode score R_i, as the authors' code does for an
    invalid action (penalised_returns).

        A^E_i     = (R_i - mean_j R_j) / F          over the task's G episodes (eq. 3; "episodes", the paper)
        A^S_{i,t} = (R_{i,t} - mean_g R) / F        over the turn's step group (eq. 7)
        F = std + eps (scale_by_std: the authors' mean_std_norm) or 1 (mean_norm)

    The authors' code takes the episode mean and std over the step rows instead, so that longer
    episodes weigh more ("steps"). Where a group has one member, their code uses mean 0 and std 1
    (A = R) at the episode level; here, as in grpo_advantages, it gets 0, and so does every turn of
    a task whose G episode returns are all equal ("episodes"), penalised or not.
    """
    task = turn_episode // episode_returns.shape[1]
    scores = episode_returns.flatten()[turn_episode] - (0 if turn_penalty is None else turn_penalty)
    if episode_stats == "episodes":  # the mean and std of the G returns, applied to each turn's score
        centred = scores - episode_returns.mean(dim=1)[task]
        scale = episode_returns.std(dim=1)[task] + eps if scale_by_std else 1.0
        signal = (episode_returns != episode_returns[:, :1]).any(dim=1)[task]
        episode_level = torch.where(signal, centred / scale, torch.zeros_like(centred))
    else:
        episode_level = group_relative(scores, task, eps, scale_by_std)
    return episode_level + omega * group_relative(step_returns, turn_step_group, eps, scale_by_std)
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
        # ALGO LOGIC: the method's own settings: GRPO's group, GiGPO's discount, similarity and minibatches.
        (args.group_size < 2,
         f"--group-size must be at least 2 (got {args.group_size}): GRPO compares responses within a group"),
        (not 0 <= args.gamma <= 1, f"--gamma must lie in [0, 1] (got {args.gamma})"),
        (args.similarity_threshold is not None and not 0 < args.similarity_threshold < 1,
         "--similarity-threshold must lie in (0, 1); leave it unset for exact anchors"),
        (args.minibatch_rows and args.num_minibatches > 1, "give --minibatch-rows or --num-minibatches, not both"),
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
        # SLOT: the training tasks and the held-out ones: environments to play, each task's "question" its first prompt.
        train_stream = None if args.eval_only else TaskStream(args.dataset, args.seed)
        eval_sets = {name: load_eval_tasks(name, args.eval_size) for name in args.eval_dataset.split(",")}
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
        # SLOT: later turns' prompts outgrow the first ones (other observations, the history), up to the context
        # that run_episodes checks every turn against: a vLLM engine must hold that much.
        longest_prompt = policy.config.max_position_embeddings - args.max_new_tokens
        # SLOT END
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
        # SLOT: held-out tasks are played to the end: greedy success rate (as pass@1), return, turns.
        evaluate = EpisodeEvaluator(engine, eval_sets, args.template, args.max_new_tokens, args.eval_batch_size,
                                    args.eval_samples, args.temperature, args.max_turns, args.history_length)
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
        # ALGO LOGIC: play G episodes of each task, one engine.generate call per turn for the episodes still running,
        # until their environment says done or --max-turns (common/envs.py); the environments give the rewards.
        tasks = [train_stream[(step - 1) * args.num_prompts + i] for i in range(args.num_prompts)]
        episodes = run_episodes(engine, [task for task in tasks for _ in range(args.group_size)], args.template,
                                args.max_new_tokens, args.max_turns, args.history_length, args.temperature)
        generate_time = time.time() - step_start

        # Each episode's return R_i, each turn's discounted return R_{i,t} (eq. 5) and step group (eq. 6);
        # from here on the batch is every turn of every episode, with the sampler's log-probs where it gives them.
        score_start = time.time()
        turns = [turn for episode in episodes for turn in episode.turns]
        episode_returns, turn_penalty, step_returns = (values.to(device) for values in penalised_returns(
            [[turn.reward for turn in episode.turns] for episode in episodes],
            [[turn.action is None for turn in episode.turns] for episode in episodes],
            args.gamma, args.invalid_action_penalty, args.invalid_action_penalty_form))
        rewards = episode_returns.view(args.num_prompts, args.group_size)
        turn_episode = torch.tensor([index for index, episode in enumerate(episodes) for _ in episode.turns],
                                    device=device)
        turn_step_group = step_groups([turn.anchor for turn in turns], (turn_episode // args.group_size).tolist(),
                                      args.similarity_threshold).to(device)
        rollout = stack_turns(turns, tokenizer.pad_token_id)
        score_time = time.time() - score_start
        # ALGO LOGIC END

        train_start = time.time()
        mask = rollout.completion_mask.float()  # [B, C]: 1 on response tokens, up to and including EOS
        train_rewards = (rewards.flatten()[torch.randperm(batch_size)].view_as(rewards) if args.shuffle_rewards
                         else rewards)
        # ALGO LOGIC: GiGPO's advantage, episode level plus omega times step level, the same on every token of a turn.
        train_step_returns = step_returns[torch.randperm(len(turns))] if args.shuffle_rewards else step_returns
        advantages = gigpo_advantages(train_rewards, train_step_returns, turn_episode, turn_step_group,
                                      args.step_advantage_weight, args.advantage_eps, args.scale_by_std,
                                      args.episode_stats, turn_penalty).view(-1, 1) * mask  # [N, C]
        if args.minibatch_rows:  # this step's count of minibatches follows its number of turns
            args = replace(args, num_minibatches=math.ceil(len(turns) / args.minibatch_rows))
        if len(turns) % args.num_minibatches:  # equal minibatches: copy random turns, as verl-agent's adjust_batch does
            copies = torch.randperm(len(turns))[:-len(turns) % args.num_minibatches]
            rows = torch.cat([torch.arange(len(turns)), copies])
            rollout = stack_turns([turns[row] for row in rows], tokenizer.pad_token_id)
            mask, advantages = mask[rows], advantages[rows]
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
        # SLOT: the agent's metrics. reward_mean above is the mean episode return; lengths are per turn.
        group_sizes = torch.bincount(turn_step_group)
        group_sizes = group_sizes[group_sizes > 0]
        metrics.update({
            "turns": len(turns), "success_rate": sum(episode.won for episode in episodes) / len(episodes),
            "episode_turns": len(turns) / len(episodes),
            "invalid_action_rate": sum(turn.action is None for turn in turns) / len(turns),
            "grouped_turn_fraction": group_sizes[group_sizes > 1].sum().item() / len(turns),
            "step_group_size": group_sizes.float().mean().item(),
        })
        # SLOT END
        history.append(metrics)
        run_log.log(metrics)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", eval=f"{eval_accuracy:.3f}")
        if (args.save_every and step % args.save_every == 0) or step == args.total_steps:
            save_checkpoint(run_dir, step, policy, tokenizer, checkpointed, args.keep_checkpoints)

    run_log.close()
    if history:  # empty when resuming a run that had already finished
        # SLOT: the end-of-run summary: the batch it takes shares of is a step's turns, and GiGPO's lines follow it.
        batch_size = sum(m["turns"] for m in history) / len(history)
        agent_lines = {label: trend(history, key)
                       for key, label in (("success_rate", "sampled success rate"),
                                          ("episode_turns", "turns per episode"),
                                          ("grouped_turn_fraction", "turns in step groups of 2+"),
                                          ("invalid_action_rate", "invalid actions"))}
        print_summary(f"{METHOD}, {args.model} on {args.dataset}, seed {args.seed}", history, batch_size,
                      initial_results, eval_results, time.time() - started, run_dir, agent_lines)
        # SLOT END


if __name__ == "__main__":
    main()
    distributed.close()  # under torchrun: once every rank is done
