"""PURE: min-form credit assignment for process rewards (arXiv 2504.15275, code CJReinforce/PURE), in one file.

A process reward model (PRM) scores every step of a response. Summing those scores into returns
(sum-form) lets a policy farm steps the PRM likes; PURE gives each state the minimum of its
future step rewards instead (min-form, by the authors' softmax approximation), so one bad step
caps everything before it. Optional verifiable rewards (solved or not) on a share of prompts.

Docs: docs/pure.md. This is grpo.py with PURE's changes, marked `# ALGO LOGIC: ...` to
`# ALGO LOGIC END`; `diff grpo.py pure.py` shows the method and nothing else.

    python pure.py                    # tiny model + arithmetic task + a flawed toy PRM, CPU, minutes
    python pure.py --credit sum --verifiable-fraction 0     # the sum-form ablation, PRM reward only
    python pure.py --model Qwen2.5-Math-7B --prm jinachris/PURE-PRM-7B --template chat-boxed \\
        --dataset data/gsm8k_train.jsonl --eval-dataset gsm8k --group-size 4 --temperature 0.5 \\
        --learning-rate 5e-7 --kl-reward-coef 0.001
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
# SLOT: the process reward model and the step splitting it reads; the KL's own temperature.
from dataclasses import replace

from common.prm import PRM_TEMPLATES, ToyArithmeticPRM, load_discriminative_prm, split_into_steps
from common.runs import trend
# SLOT END

METHOD = Path(__file__).stem  # run folders and messages are named after the file
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo")
# ALGO LOGIC: how step rewards become returns.
CREDITS = ("softmax-min", "min", "sum", "mean")
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
    num_prompts: int = arg(32, "prompts per step", min=1)
    group_size: int = arg(4, "G: sampled responses per prompt (PURE: 4)")
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
    clip_eps_low: float = arg(0.2, "lower clip range of the ratio")
    clip_eps_high: float = arg(0.2, "upper clip range of the ratio (DAPO clip-higher: 0.28)")
    dual_clip: float | None = arg(None, "dual-clip bound c for negative advantages (verl: 3; default: off)")
    kl_coef: float = arg(0.0, "beta of the KL-to-reference loss (DeepSeekMath 0.04); 0 loads no reference")
    kl_estimator: str = arg("k3", "estimator of the KL per token", choices=KL_ESTIMATORS)
    loss_aggregation: str = arg("token-mean", "how token losses are averaged", choices=LOSS_AGGREGATIONS)
    shuffle_rewards: bool = arg(False, "control: permute the verifier's outcomes (not the PRM's scores)")

    # PURE: the PRM, min-form credit, and what the reward mixes in.
    prm: str = arg("toy", "process reward model: 'toy' (flawed on purpose) or a token-classification PRM")
    prm_noise: float = arg(1.0, "toy PRM: std of the noise on each step's logit (+-2)")
    prm_separator: str = arg("\\n", "text after each step, read by the PRM's head; \\n: newline (Qwen-PRM: <extra_0>)")
    prm_labels: str = arg("0,1", "the head's outputs for 'incorrect,correct'; r = p(correct) - p(incorrect)")
    prm_template: str = arg("question", "what the PRM sees before the steps: bare or templated", choices=PRM_TEMPLATES)
    prm_batch_size: int = arg(8, "responses per PRM forward pass", min=1)
    prm_trust_remote_code: bool = arg(False, "allow the PRM's own code to run (Qwen2.5-Math-PRM needs it)")
    credit: str = arg("softmax-min", "step rewards to returns: min-form (softmax, exact), sum, mean", choices=CREDITS)
    min_form_temperature: float = arg(0.1, "T of the softmax min-form (-> the minimum as T -> 0)")
    verifiable_fraction: float = arg(0.1, "share of prompts whose reference answer counts (paper: ~0.1)")
    verifiable_coef: float = arg(1.0, "weight of the verifiable reward")
    kl_reward_coef: float = arg(0.0, "beta of the KL in the per-token reward (paper: 0.001); 0 loads no reference")
    kl_reward_estimator: str = arg("k1", "KL estimator inside the reward (authors' default: k1)", choices=KL_ESTIMATORS)
    kl_reward_at_sampling_temperature: bool = arg(False, "reward's KL at --temperature (default: at 1, as the authors)")
    whitening: str = arg("authors", "whitening of advantages over the batch", choices=("authors", "trained", "none"))

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


# ALGO LOGIC: PURE's credit assignment (pure functions), then grpo.py's loss arithmetic unchanged.
# Step rewards arrive padded, [B, K] (K = most steps in the batch), with a boolean step mask.
def min_form_softmax(step_rewards: torch.Tensor, step_mask: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """PURE's min-form as the authors implement it (their default): reweight, then take ordinary returns.

        w_k = softmax_k(-r_k / T),    rhat_k = w_k r_k,    sum_k rhat_k -> min_k r_k  as T -> 0

    The weights span the whole response, so the steps after the worst one get returns near 0, not
    their own future minimum (that is `min_form_exact`).
    """
    weights = torch.softmax((-step_rewards / temperature).masked_fill(~step_mask, float("-inf")), dim=-1)
    return weights * step_rewards * step_mask


def min_form_exact(step_rewards: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """The exact min-form (the paper's definition): the return of step k is min_{j >= k} r_j.

    Written as rewards rhat_k = m_k - m_{k+1} (m_k = min_{j >= k} r_j, m_{K+1} = 0), whose gamma = 1
    returns give the cumulative minimum back, so both min-forms share the rest of the pipeline.
    """
    future_min = step_rewards.masked_fill(~step_mask, float("inf")).flip(-1).cummin(dim=-1).values.flip(-1)
    future_min = future_min.masked_fill(~step_mask, 0.0)
    return (future_min - torch.nn.functional.pad(future_min[:, 1:], (0, 1))) * step_mask


def transform_step_rewards(step_rewards, step_mask, credit="softmax-min", temperature=0.1):
    """rhat [B, K], the step rewards whose gamma = 1 returns the policy is trained on.

    softmax-min: the authors' min-form (default); min: the exact min-form;
    sum: rhat_k = r_k, plain summed returns (the ablation the paper shows collapsing);
    mean: rhat_k = r_k / K, the authors' own ablation switch (`--disable_weighted_reward`: uniform
    weights 1/K in the same softmax slot), so a response totals the *mean* of its steps, not the sum.
    """
    if credit == "softmax-min":
        return min_form_softmax(step_rewards, step_mask, temperature)
    if credit == "min":
        return min_form_exact(step_rewards, step_mask)
    if credit == "sum":
        return step_rewards * step_mask
    if credit == "mean":
        return step_rewards * step_mask / step_mask.sum(dim=-1, keepdim=True)
    raise ValueError(f"unknown credit assignment {credit!r}")


def leave_one_out_token_baseline(totals: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reward per token of the other responses of the group, [P, G] (the authors' `--reward_baseline token`):

        b_i = sum_{j != i} R_j / sum_{j != i} L_j      R_j = sum_k rhat_{j,k},  L_j = tokens of response j

    Step k of response i then earns rhat_k - b_i n_k (n_k = its tokens), so a step must earn more
    than its length's share; a per-step baseline instead favours fewer, longer steps (PURE README).
    """
    return (totals.sum(dim=1, keepdim=True) - totals) / (lengths.sum(dim=1, keepdim=True) - lengths)


def verifiable_rewards(solved: torch.Tensor, has_reference: torch.Tensor) -> torch.Tensor:
    """Verifiable reward of each response with a leave-one-out baseline, [P, G] (added at EOS):

        v_i = solved_i - 1 (0 or -1),    v_i - (1 / (G - 1)) sum_{j != i} v_j

    A prompt without a reference answer (has_reference False) gives 0 to all its responses.
    """
    rewards = (solved - 1.0) * has_reference.unsqueeze(1)
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (rewards.shape[1] - 1)


def pure_advantages(step_rewards, step_mask, step_ends, step_lengths, mask, solved, has_reference,
                    credit="softmax-min", temperature=0.1, verifiable_coef=1.0, kl=None, kl_coef=0.0,
                    whitening="authors"):
    """Per-token advantages [B, C] from PRM step scores r [B, K] (PURE's reward pipeline).

    step_ends [B, K]: token position of each step's end (its blank line's last token, or EOS);
    step_lengths [B, K]: n_k, its tokens before that end; mask [B, C]: response tokens incl. EOS;
    solved [P, G] verifier outcomes; has_reference [P]; kl [B, C] per-token KL estimates or None.

        reward_t  = sum over steps ending at t of (rhat_k - b n_k)          b: leave-one-out, per token
                  + c_v (v_i - mean_{j != i} v_j)  at the last token
                  - beta KL_t                                              (KL in the reward, as the authors)
        A_t       = sum_{t' >= t} reward_t'                               (gamma = 1)

    Step-end tokens (separators and EOS) get advantage 0, as in the authors' code; the other
    tokens are whitened over the batch, (A - mean) / sqrt(var), with mean and var divided by the
    number of trained tokens N. "authors" (their replay_buffer.normalize, the default): the end
    tokens, zeroed before whitening, still add (0 - mean)^2 to the squared sum, so var is
    [sum_trained (A - mean)^2 + ends * mean^2] / N; "trained": var over the trained tokens alone.
    Returns the advantages and rhat.
    """
    size, group_size = step_rewards.shape[0], solved.shape[1]
    rhat = transform_step_rewards(step_rewards, step_mask, credit, temperature)
    lengths = mask.sum(dim=1)
    baseline = leave_one_out_token_baseline(rhat.sum(dim=1).view(-1, group_size),
                                            lengths.view(-1, group_size)).flatten()
    rewards = torch.zeros_like(mask, dtype=rhat.dtype)
    rewards.scatter_add_(1, step_ends, (rhat - baseline.unsqueeze(1) * step_lengths) * step_mask)
    last = lengths.long() - 1
    verifiable = verifiable_rewards(solved, has_reference).flatten()
    rewards[torch.arange(size, device=mask.device), last] += verifiable_coef * verifiable
    if kl is not None:
        rewards = rewards - kl_coef * kl * mask
    returns = rewards.flip(-1).cumsum(dim=-1).flip(-1)
    ends = torch.zeros_like(mask).scatter_add_(1, step_ends, step_mask.to(mask.dtype)) > 0
    trained = mask.bool() & ~ends
    if whitening != "none" and trained.any():
        mean = returns[trained].mean()
        spread = (returns * trained - mean) ** 2 * (mask if whitening == "authors" else trained)
        returns = (returns - mean) * (spread.sum() / trained.sum()).clamp(min=1e-8).rsqrt()
    return returns * trained, rhat


def has_reference_answer(question: str, seed: int, fraction: float) -> bool:
    """Whether this prompt's reference answer is used: a fixed `fraction` of prompts, chosen by
    question text and seed, so a prompt keeps its status across epochs and resumed runs (the
    authors' data had answers for about 879 of 8k MATH prompts)."""
    return random.Random(f"reference\x00{seed}\x00{question}").random() < fraction


def pad_steps(steps, step_scores, device):
    """The steps of B responses as [B, K] tensors: scores, mask, end positions, lengths (padding: 0)."""
    width = max(len(response.ends) for response in steps)
    def padded(rows, dtype):
        return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=dtype, device=device)
    return (padded(step_scores, torch.float), padded([[1] * len(r.ends) for r in steps], torch.bool),
            padded([r.ends for r in steps], torch.long), padded([r.lengths for r in steps], torch.float))


def pure_metrics(step_rewards, step_mask, has_reference, prm_time) -> dict:
    """What the PRM saw: steps per response, its mean step score, each response's minimum and sum
    of step scores (averaged), and the share of responses whose minimum (which sets the min-form
    return) is at a step other than the last."""
    counts = step_mask.sum(dim=1)
    lowest = step_rewards.masked_fill(~step_mask, float("inf")).min(dim=1)
    return {"steps_per_response": counts.float().mean().item(),
            "prm_step_score": (step_rewards[step_mask]).mean().item(),
            "prm_min_score": lowest.values.mean().item(),
            "prm_sum_score": (step_rewards * step_mask).sum(dim=1).mean().item(),
            "min_before_last_fraction": (lowest.indices != counts - 1).float().mean().item(),
            "verifiable_prompts": has_reference.float().mean().item(), "time_prm": prm_time}


def reward_kl(policy, reference, sampled, args) -> torch.Tensor:
    """Per-token KL estimate [B, C] of the policy before its update against the reference, for the reward.

    At temperature 1 by default, as the authors' actor (openrlhf/models/actor.py; they sample at 0.5),
    the quantity their 0.001 was tuned on; --kl-reward-at-sampling-temperature divides by --temperature.
    The PPO ratio stays at the sampling temperature (theirs is at 1): pi_old is then the distribution
    the tokens were drawn from, and the vLLM check compares the trainer's log-probs with the sampler's.
    """
    at = args if args.kl_reward_at_sampling_temperature else replace(args, temperature=1.0)
    return kl_penalty(frozen_logprobs(policy, sampled, at)[0], frozen_logprobs(reference, sampled, at)[0],
                      args.kl_reward_estimator)


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
        # ALGO LOGIC: the method's own settings: GRPO's group, PURE's reward mix and PRM.
        (args.group_size < 2,
         f"--group-size must be at least 2 (got {args.group_size}): GRPO compares responses within a group"),
        (not 0 <= args.verifiable_fraction <= 1,
         f"--verifiable-fraction must lie in [0, 1] (got {args.verifiable_fraction})"),
        (args.min_form_temperature <= 0, f"--min-form-temperature must be positive (got {args.min_form_temperature})"),
        (not all(label.strip().isdigit() for label in args.prm_labels.split(",")) or args.prm_labels.count(",") != 1,
         f"--prm-labels takes two output indices 'incorrect,correct', such as 0,1 (got {args.prm_labels!r})"),
        (args.prm == "toy" and args.dataset != "arithmetic",
         f"--prm toy only knows the built-in task (--dataset arithmetic); "
         f"pass a trained PRM with --prm for {args.dataset}"),
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
        # ALGO LOGIC: the frozen PRM, and the frozen reference the KL-in-reward needs.
        if args.prm == "toy":
            prm = ToyArithmeticPRM(args.prm_noise, args.seed)
        else:
            prm = load_discriminative_prm(args.prm, device, args.dtype, args.prm_separator.replace("\\n", "\n"),
                                          tuple(int(label) for label in args.prm_labels.split(",")), args.prm_template,
                                          args.prm_batch_size, args.prm_trust_remote_code)
            for name, problems in training.items():
                prm.check_fits(name, [problem["question"] for problem in problems], args.max_new_tokens)
        reward_ref_model = None
        if args.kl_reward_coef > 0:
            reward_ref_model = load_model(args.model, device, args.dtype, args.trust_remote_code, frozen=True)
        # ALGO LOGIC END

        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
        warmup = max(args.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        checkpointed = {"optimizer": optimizer, "scheduler": scheduler}  # what a checkpoint holds beside the policy
        # SLOT: the models in memory beside the policy: trained (weights, gradients, AdamW) and frozen.
        trained_models, frozen_models = [policy], [ref_model, reward_ref_model, getattr(prm, "model", None)]
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
        # ALGO LOGIC: sample G responses to each prompt, score each with the verifier (1 or 0), each step with the PRM.
        problems = [train_stream[(step - 1) * args.num_prompts + i] for i in range(args.num_prompts)]
        prompts = [render_prompt(tokenizer, problem["question"], args.template) for problem in problems]
        rollout = engine.generate([prompt for prompt in prompts for _ in range(args.group_size)],
                                  args.max_new_tokens, args.temperature)
        generate_time = time.time() - step_start

        score_start = time.time()
        answers = [problem["answer"] for problem in problems for _ in range(args.group_size)]
        rewards = torch.tensor(score_batch(rollout.texts, answers), device=device).view(-1, args.group_size)
        score_time = time.time() - score_start

        # The PRM scores every step; a step ends at a blank line ("\n\n") or at EOS.
        prm_start = time.time()
        steps = split_into_steps(rollout.completion_ids, rollout.completion_mask, tokenizer)
        questions = [problem["question"] for problem in problems for _ in range(args.group_size)]
        step_scores = prm.score_steps(questions, [response.texts for response in steps])
        step_rewards, step_mask, step_ends, step_lengths = pad_steps(steps, step_scores, device)  # [B, K] each
        has_reference = torch.tensor([has_reference_answer(problem["question"], args.seed, args.verifiable_fraction)
                                      for problem in problems], device=device)
        prm_time = time.time() - prm_start
        # ALGO LOGIC END

        train_start = time.time()
        mask = rollout.completion_mask.float()  # [B, C]: 1 on response tokens, up to and including EOS
        train_rewards = (rewards.flatten()[torch.randperm(batch_size)].view_as(rewards) if args.shuffle_rewards
                         else rewards)
        # ALGO LOGIC: PURE's advantages: min-form returns of step rewards, verifiable reward at EOS, KL in the reward.
        kl = None
        if reward_ref_model is not None:  # pi_old and pi_ref on the sampled tokens, before any update
            sampled = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "mask": mask}
            kl = reward_kl(policy, reward_ref_model, sampled, args)
        advantages, _ = pure_advantages(step_rewards, step_mask, step_ends, step_lengths, mask, train_rewards,
                                        has_reference, args.credit, args.min_form_temperature, args.verifiable_coef, kl,
                                        args.kl_reward_coef, args.whitening)  # [B, C]
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
        # SLOT: PURE's metrics (reward_mean above is the verifier's accuracy on the samples, the real goal).
        metrics.update(pure_metrics(step_rewards, step_mask, has_reference, prm_time))
        # SLOT END
        history.append(metrics)
        run_log.log(metrics)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", eval=f"{eval_accuracy:.3f}")
        if (args.save_every and step % args.save_every == 0) or step == args.total_steps:
            save_checkpoint(run_dir, step, policy, tokenizer, checkpointed, args.keep_checkpoints)

    run_log.close()
    if history:  # empty when resuming a run that had already finished
        # SLOT: the end-of-run summary, with what the PRM saw beside the verifier's "sampled reward".
        prm_lines = {label: trend(history, key)
                     for key, label in (("prm_step_score", "PRM step score"), ("prm_min_score", "PRM min per response"),
                                        ("prm_sum_score", "PRM sum per response"),
                                        ("steps_per_response", "steps per response"))}
        print_summary(f"{METHOD}, {args.model} on {args.dataset}, seed {args.seed}", history, batch_size,
                      initial_results, eval_results, time.time() - started, run_dir, prm_lines)
        # SLOT END


if __name__ == "__main__":
    main()
    distributed.close()  # under torchrun: once every rank is done
