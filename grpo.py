"""GRPO: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300), in one file.

Docs: README.md. Every other trainer of this project is this file with one method's changes,
marked `# ALGO LOGIC` (study these) apart from the plumbing.

    python grpo.py                    # tiny built-in model + arithmetic task, CPU, about 4 minutes
    python grpo.py --model Qwen2.5-Math-1.5B --dataset ../shared/data/gsm8k_train.jsonl \\
        --eval-dataset ../shared/data/gsm8k_test.jsonl --template plain --learning-rate 1e-6
"""

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from common import UsageError
from common.data import PROMPT_TEMPLATES, ProblemStream, load_eval_problems, render_prompt
from common.model import load_model, load_tokenizer
from common.rollout import check_context_length, generate
from common.verify import score_batch


@dataclass
class Args:
    seed: int = field(default=1, metadata={"help": "seed of sampling, data order and initialisation"})
    model: str = field(default="tiny", metadata={"help": "alias (Qwen2.5-Math-7B), hub id, local folder, or 'tiny'"})
    dataset: str = field(default="arithmetic", metadata={"help": "'arithmetic' (built-in), a .jsonl/.parquet file or a hub data set"})
    eval_dataset: str = field(default="arithmetic", metadata={"help": "held-out sets, comma-separated: arithmetic, math500, aime24, amc23, gsm8k, a file or a hub data set"})
    data_dir: str | None = field(default=None, metadata={"help": "folder with local copies of the named benchmarks (default: ../shared/data if present)"})
    prompt_key: str | None = field(default=None, metadata={"help": "field holding the question (default: question/problem/prompt)"})
    answer_key: str | None = field(default=None, metadata={"help": "field holding the answer (default: answer, else solution's \\boxed{})"})
    template: str = field(default="chat", metadata={"help": f"prompt template, one of {PROMPT_TEMPLATES}"})
    total_steps: int = field(default=80, metadata={"help": "policy update steps (one batch of rollouts each)"})
    num_prompts: int = field(default=16, metadata={"help": "prompts per step"})
    group_size: int = field(default=8, metadata={"help": "G: sampled responses per prompt"})
    max_new_tokens: int = field(default=96, metadata={"help": "longest response, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (papers: 1e-6 for 1.5B-7B models)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear learning-rate warm-up, then constant"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    num_epochs: int = field(default=1, metadata={"help": "passes over each batch of rollouts (PPO epochs)"})
    num_minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass over a batch"})
    micro_batch_size: int = field(default=64, metadata={"help": "sequences per forward/backward (gradient accumulation)"})
    scale_by_std: bool = field(default=True, metadata={"help": "divide advantages by the group std (off: Dr.GRPO)"})
    advantage_eps: float = field(default=1e-6, metadata={"help": "added to the group std (verl 1e-6, TRL 1e-4)"})
    clip_eps_low: float = field(default=0.2, metadata={"help": "lower clip range of the ratio"})
    clip_eps_high: float = field(default=0.2, metadata={"help": "upper clip range of the ratio (DAPO clip-higher: 0.28)"})
    dual_clip: float | None = field(default=None, metadata={"help": "dual-clip bound c for negative advantages (verl: 3)"})
    kl_coef: float = field(default=0.0, metadata={"help": "beta of the KL-to-reference loss (DeepSeekMath 0.04); 0 loads no reference"})
    kl_estimator: str = field(default="k3", metadata={"help": "KL estimator: k1, k2 or k3"})
    loss_aggregation: str = field(default="token-mean", metadata={"help": "how token losses are averaged: token-mean, seq-mean-token-mean, seq-mean-token-sum or dr-grpo"})
    shuffle_rewards: bool = field(default=False, metadata={"help": "control: permute rewards within the batch"})
    eval_every: int = field(default=20, metadata={"help": "steps between held-out evaluations (0: only before and after)"})
    eval_size: int = field(default=0, metadata={"help": "held-out problems evaluated per set (0: all)"})
    eval_samples: int = field(default=0, metadata={"help": "k: also sample k responses per problem for mean@k and pass@k (0: greedy only)"})
    eval_only: bool = field(default=False, metadata={"help": "only evaluate --model on --eval-dataset, then exit"})
    eval_batch_size: int = field(default=250, metadata={"help": "prompts per evaluation generate call"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk"})
    resume: str | None = field(default=None, metadata={"help": "run folder to continue from its last checkpoint"})
    runs_dir: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "recompute activations in backward to save memory (default: on with CUDA, off on CPU)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow a hub model's own code to run (off: safer)"})


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo")


# ALGO LOGIC: the GRPO arithmetic, pure functions.
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


# Plumbing: arguments, log-probs, the update, evaluation, checkpoints.
def parse_args(argv=None) -> Args:
    def build_parser(with_defaults: bool) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                         argument_default=None if with_defaults else argparse.SUPPRESS)
        for f in dataclasses.fields(Args):
            flag, default = "--" + f.name.replace("_", "-"), {"default": f.default} if with_defaults else {}
            if f.type in (bool, bool | None):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"], **default)
            else:
                value_type = int if f.type is int else float if f.type in (float, float | None) else str
                parser.add_argument(flag, type=value_type, help=f.metadata["help"], **default)
        return parser

    args = Args(**vars(build_parser(with_defaults=True).parse_args(argv)))
    if args.resume is None:
        return args
    # Resume continues with the run's own arguments; flags given on this command line override them.
    saved = Path(args.resume) / "args.json"
    if not saved.is_file():
        sys.exit(f"grpo.py: error: --resume {args.resume}: not a run folder (no args.json in it)")
    return Args(**{**json.loads(saved.read_text()), **vars(build_parser(with_defaults=False).parse_args(argv))})


def check_args(args: Args):
    """Fail at start-up, in one line, on arguments that cannot work."""
    batch_size = args.num_prompts * args.group_size
    minibatch_size = batch_size // max(args.num_minibatches, 1)
    problems = [
        (args.group_size < 2, f"--group-size must be at least 2 (got {args.group_size}): GRPO compares responses within a group"),
        (args.num_prompts < 1 or args.total_steps < 1, "--num-prompts and --total-steps must be positive"),
        (args.max_new_tokens < 1, f"--max-new-tokens must be positive (got {args.max_new_tokens})"),
        (args.temperature <= 0, f"--temperature must be positive (got {args.temperature})"),
        (args.num_epochs < 1 or args.micro_batch_size < 1, "--num-epochs and --micro-batch-size must be positive"),
        (args.eval_size < 0 or args.eval_samples < 0, "--eval-size and --eval-samples must be 0 or more"),
        (args.num_minibatches < 1 or batch_size % args.num_minibatches,
         f"--num-minibatches ({args.num_minibatches}) must divide the batch of {batch_size} sequences"),
        (args.micro_batch_size < minibatch_size and minibatch_size % args.micro_batch_size,
         f"--micro-batch-size ({args.micro_batch_size}) must divide the minibatch of {minibatch_size} sequences"),
        (args.template not in PROMPT_TEMPLATES, f"--template must be one of {PROMPT_TEMPLATES} (got {args.template!r})"),
        (args.kl_estimator not in ("k1", "k2", "k3"), f"--kl-estimator must be k1, k2 or k3 (got {args.kl_estimator!r})"),
        (args.loss_aggregation not in LOSS_AGGREGATIONS,
         f"--loss-aggregation must be one of {LOSS_AGGREGATIONS} (got {args.loss_aggregation!r})"),
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
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=completion_length + 1).logits[:, :-1].float() / temperature  # [B, C, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, input_ids[:, -completion_length:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy


def policy_gradient_pass(policy, batch, indices, args, old_logp, ref_logp, totals):
    """Forward and backward over the sequences `indices` of one minibatch, in micro-batches.

    Sequences with zero advantage carry no policy gradient (the surrogate is 0 for any ratio),
    so with no KL term they are left out entirely; `totals` still counts them, so the loss
    normalisation is exactly that of the full minibatch. Returns summed statistics.
    """
    stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0.0}
    for start in range(0, len(indices), args.micro_batch_size):
        idx = indices[start:start + args.micro_batch_size]
        mask = batch["mask"][idx]
        logp, entropy = completion_logprobs(policy, batch["input_ids"][idx], batch["attention_mask"][idx],
                                            mask.shape[1], args.temperature)
        if old_logp[idx].isnan().any():  # first pass over an on-policy batch: pi_old is this very policy
            old_logp[idx] = logp.detach()
        # ALGO LOGIC: the GRPO loss: clipped surrogate with the group advantage on every token, plus KL.
        token_loss, clipped = clipped_surrogate(logp, old_logp[idx], batch["advantages"][idx].unsqueeze(1),
                                                args.clip_eps_low, args.clip_eps_high, args.dual_clip)
        if args.kl_coef > 0:
            kl = kl_penalty(logp, ref_logp[idx], args.kl_estimator)
            token_loss = token_loss + args.kl_coef * kl
            stats["kl"] += (kl.detach() * mask).sum().item()
        loss = aggregate_loss(token_loss, mask, args.loss_aggregation, max_len=args.max_new_tokens, **totals)
        loss.backward()
        stats["loss"] += loss.item()
        stats["clipped"] += (clipped.float() * mask).sum().item()
        stats["entropy"] += (entropy * mask).sum().item()
        stats["tokens"] += mask.sum().item()
    return stats


@torch.no_grad()
def frozen_logprobs(model, batch, args):
    """Log-probs [B, C] of the whole batch's completions under `model`, without gradients."""
    return torch.cat([completion_logprobs(model, batch["input_ids"][start:start + args.micro_batch_size],
                                          batch["attention_mask"][start:start + args.micro_batch_size],
                                          batch["mask"].shape[1], args.temperature)[0]
                      for start in range(0, batch["mask"].shape[0], args.micro_batch_size)])


def update_policy(policy, ref_model, optimizer, scheduler, batch, args):
    """num_epochs passes over the batch, num_minibatches optimizer steps each. Returns step metrics."""
    size = batch["input_ids"].shape[0]
    old_logp = torch.full_like(batch["mask"], float("nan"), dtype=torch.float)
    trained = torch.arange(size) if args.kl_coef > 0 else torch.nonzero(batch["advantages"] != 0).flatten()
    if args.num_minibatches > 1:  # later minibatches run after an update: pi_old needs its own pass
        old_logp = frozen_logprobs(policy, batch, args)
    ref_logp = frozen_logprobs(ref_model, batch, args) if ref_model is not None else None
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0.0}
    minibatch_size = size // args.num_minibatches
    for _ in range(args.num_epochs):
        order = torch.randperm(size)
        for start in range(0, size, minibatch_size):
            minibatch = order[start:start + minibatch_size]
            normaliser = {"num_sequences": len(minibatch), "num_tokens": batch["mask"][minibatch].sum().clamp(min=1)}
            optimizer.zero_grad(set_to_none=True)
            stats = policy_gradient_pass(policy, batch, minibatch[torch.isin(minibatch, trained)], args,
                                         old_logp, ref_logp, normaliser)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            totals = {key: totals[key] + stats[key] for key in totals}
    scheduler.step()
    updates = args.num_epochs * args.num_minibatches
    tokens = max(totals["tokens"], 1.0)
    return {"loss": totals["loss"] / updates, "kl": totals["kl"] / tokens if ref_model is not None else None,
            "clip_fraction": totals["clipped"] / tokens, "entropy": totals["entropy"] / tokens if totals["tokens"] else None,
            "skipped_sequences": size - len(trained)}


def evaluate(model, tokenizer, problems, args) -> dict:
    """Greedy pass@1 on held-out problems; with --eval-samples k also, from k samples at
    --temperature per problem, mean@k (mean accuracy) and pass@k (share with any correct)."""
    greedy_correct, sampled_correct = [], []
    for start in range(0, len(problems), args.eval_batch_size):
        chunk = problems[start:start + args.eval_batch_size]
        prompts = [render_prompt(tokenizer, problem["question"], args.template) for problem in chunk]
        answers = [problem["answer"] for problem in chunk]
        greedy_correct += score_batch(generate(model, tokenizer, prompts, args.max_new_tokens, greedy=True).texts, answers)
        if args.eval_samples:
            k = args.eval_samples
            rollout = generate(model, tokenizer, [p for p in prompts for _ in range(k)], args.max_new_tokens, args.temperature)
            sampled_correct += torch.tensor(score_batch(rollout.texts, [a for a in answers for _ in range(k)])).view(-1, k).tolist()
    results = {"pass@1": sum(greedy_correct) / len(problems)}
    if args.eval_samples:
        sampled = torch.tensor(sampled_correct)  # [problems, k]
        results[f"mean@{args.eval_samples}"] = sampled.mean().item()
        results[f"pass@{args.eval_samples}"] = sampled.max(dim=1).values.mean().item()
    return results


def evaluate_all(model, tokenizer, eval_sets, args) -> dict:
    """evaluate() on every held-out set: {name: {"pass@1": ..., ...}}."""
    return {name: evaluate(model, tokenizer, problems, args) for name, problems in eval_sets.items()}


def run_eval_only(policy, tokenizer, eval_sets, args):
    """--eval-only: score --model on each held-out set, on screen and in the run folder's metrics.jsonl."""
    run_dir = Path(args.runs_dir) / f"{'+'.join(Path(name).stem for name in eval_sets)}__eval__{args.seed}__{int(time.time())}"
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
    print(f"evaluating {args.model} ({args.template} template), run folder {run_dir}")
    with (run_dir / "metrics.jsonl").open("w") as metrics_file:
        for name, problems in eval_sets.items():
            started = time.time()
            results = evaluate(policy, tokenizer, problems, args)
            metrics_file.write(json.dumps({"step": 0, "eval_dataset": name, "problems": len(problems), **results,
                                           "time_eval": time.time() - started}) + "\n")
            print(f"  {name:<24} {len(problems):>5} problems  " + "  ".join(f"{key} {value:.3f}" for key, value in results.items()))


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, optimizer, scheduler, args):
    """Write checkpoints/step_N atomically: build it under a temporary name, then rename it.

    A kill during the save leaves only the temporary folder, which resume ignores.
    """
    checkpoints = run_dir / "checkpoints"
    final, partial = checkpoints / f"step_{step}", checkpoints / f"partial_step_{step}"
    shutil.rmtree(partial, ignore_errors=True)
    policy.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               partial / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in sorted(checkpoints.glob("step_*"), key=lambda p: int(p.name[5:]))[:-args.keep_checkpoints]:
        shutil.rmtree(old)


def latest_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    if not found:
        raise UsageError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    return found[-1]


def print_summary(args, run_dir, initial_accuracy, final_accuracy, history, elapsed):
    """One screen at the end of a run: accuracy before and after, reward trend, where the time went."""
    def mean(key, steps):
        return sum(m[key] for m in steps) / max(len(steps), 1)
    first, last = history[:10], history[-10:]
    batch_size = args.num_prompts * args.group_size
    print(f"\n{'=' * 72}\nGRPO, {args.model} on {args.dataset}, seed {args.seed}, steps {history[0]['step'] - 1}-{history[-1]['step']}"
          f"\n  held-out greedy accuracy   {initial_accuracy:.3f} -> {final_accuracy:.3f} "
          f"({100 * (final_accuracy - initial_accuracy):+.1f} points on {args.eval_dataset.split(',')[0]})"
          f"\n  sampled reward             {mean('reward_mean', first):.3f} (first {len(first)} steps) -> "
          f"{mean('reward_mean', last):.3f} (last {len(last)})"
          f"\n  response length            {mean('response_length', history):.1f} tokens, "
          f"{100 * mean('truncated_fraction', history):.1f}% truncated"
          f"\n  zero-advantage sequences   {100 * mean('skipped_sequences', history) / batch_size:.1f}% (skipped in training)"
          f"\n  time per step              {mean('time_step', history):.2f}s: generate {mean('time_generate', history):.2f}s, "
          f"score {mean('time_score', history):.3f}s, train {mean('time_train', history):.2f}s"
          f"\n  wall time                  {elapsed:.0f}s with evaluations\n  run folder                 {run_dir}\n{'=' * 72}")


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.resume:
            run_dir = Path(args.resume)
            checkpoint = latest_checkpoint(run_dir)
            policy_source = str(checkpoint)
        else:
            task = Path(args.dataset).stem
            run_dir = Path(args.runs_dir) / f"{task}__grpo__{args.seed}__{int(time.time())}"
            policy_source = args.model
        train_stream = None if args.eval_only else ProblemStream(args.dataset, args.seed, args.prompt_key, args.answer_key)
        eval_sets = {name: load_eval_problems(name, args.eval_size, args.prompt_key, args.answer_key, args.data_dir)
                     for name in args.eval_dataset.split(",")}
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        tokenizer = load_tokenizer(policy_source, trust_remote_code=args.trust_remote_code)
        # Checkpointing trades about a third more compute for activations a 1.5B-7B model cannot hold
        # otherwise; the CPU-sized default model needs no such trade.
        gradient_checkpointing = device.startswith("cuda") if args.gradient_checkpointing is None else args.gradient_checkpointing
        policy = load_model(policy_source, device, args.dtype, args.trust_remote_code, gradient_checkpointing)
        policy.train()
        # Every prompt this run will render, training and held-out, must leave room for a full response.
        training = [] if args.eval_only else [(args.dataset, train_stream.problems or [
            train_stream[i] for i in range(args.total_steps * args.num_prompts)])]
        for name, problems in [*training, *eval_sets.items()]:
            prompts = [render_prompt(tokenizer, problem["question"], args.template) for problem in problems]
            check_context_length(policy, tokenizer, name, prompts, args.max_new_tokens)
        ref_model = None
        if args.kl_coef > 0:  # the reference is the starting model, frozen
            ref_model = load_model(args.model, device, args.dtype, args.trust_remote_code).requires_grad_(False)
    except UsageError as error:
        sys.exit(f"grpo.py: error: {error}")
    if args.eval_only:
        return run_eval_only(policy, tokenizer, eval_sets, args)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(args.warmup_steps, 1)))
    start_step = 0
    if args.resume:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start_step = state["step"]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()  # drop steps logged after the checkpoint
        (run_dir / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= start_step))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    print(f"run folder: {run_dir}")

    # The headline number is greedy pass@1 on the first held-out set; all sets are logged under "eval".
    eval_results = evaluate_all(policy, tokenizer, eval_sets, args)
    eval_accuracy = initial_accuracy = next(iter(eval_results.values()))["pass@1"]
    print(f"held-out greedy accuracy at step {start_step}: {initial_accuracy:.3f}")
    batch_size = args.num_prompts * args.group_size
    started, history = time.time(), []
    progress = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps)
    for step in progress:
        step_start = time.time()
        problems = [train_stream[(step - 1) * args.num_prompts + i] for i in range(args.num_prompts)]
        prompts = [render_prompt(tokenizer, problem["question"], args.template) for problem in problems]
        rollout = generate(policy, tokenizer, [prompt for prompt in prompts for _ in range(args.group_size)],
                           args.max_new_tokens, args.temperature)
        generate_time = time.time() - step_start

        score_start = time.time()
        answers = [problem["answer"] for problem in problems for _ in range(args.group_size)]
        rewards = torch.tensor(score_batch(rollout.texts, answers)).view(args.num_prompts, args.group_size)
        score_time = time.time() - score_start

        train_start = time.time()
        # ALGO LOGIC: the group-relative advantage, the same on every token of a response.
        train_rewards = rewards.flatten()[torch.randperm(batch_size)].view_as(rewards) if args.shuffle_rewards else rewards
        advantages = grpo_advantages(train_rewards, args.advantage_eps, args.scale_by_std).flatten()
        batch = {"input_ids": torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1),
                 "attention_mask": torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1),
                 "mask": rollout.completion_mask.float(), "advantages": advantages.to(device)}
        update = update_policy(policy, ref_model, optimizer, scheduler, batch, args)
        train_time = time.time() - train_start

        completion_tokens = rollout.completion_mask.sum().item()
        step_time = time.time() - step_start
        evaluated = (args.eval_every and step % args.eval_every == 0) or step == args.total_steps
        if evaluated:
            eval_results = evaluate_all(policy, tokenizer, eval_sets, args)
            eval_accuracy = next(iter(eval_results.values()))["pass@1"]
        metrics = {"step": step, "reward_mean": rewards.mean().item(), **update,
                   "eval_accuracy": eval_accuracy if evaluated else None, "eval": eval_results if evaluated else None,
                   "response_length": completion_tokens / batch_size, "truncated_fraction": rollout.truncated.float().mean().item(),
                   "learning_rate": scheduler.get_last_lr()[0], "time_generate": generate_time, "time_score": score_time,
                   "time_train": train_time, "time_step": step_time, "tokens_per_sec": completion_tokens / step_time}
        history.append(metrics)
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
        progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", eval=f"{eval_accuracy:.3f}")
        if (args.save_every and step % args.save_every == 0) or step == args.total_steps:
            save_checkpoint(run_dir, step, policy, tokenizer, optimizer, scheduler, args)

    metrics_file.close()
    if history:  # empty when resuming a run that had already finished
        print_summary(args, run_dir, initial_accuracy, eval_accuracy, history, time.time() - started)


if __name__ == "__main__":
    main()
