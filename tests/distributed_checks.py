"""Checks that run inside `torchrun` (or plain python, as the reference), for tests/test_distributed.py.

    torchrun --standalone --nproc-per-node 2 tests/distributed_checks.py parity BATCH_FILE OUT_FILE
    torchrun --standalone --nproc-per-node 2 tests/distributed_checks.py generate OUT_FILE
    torchrun --standalone --nproc-per-node 2 tests/distributed_checks.py fail

Rank 0 writes what it measured to OUT_FILE (torch.save) for the test to compare.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import distributed  # noqa: E402  (the rest is imported where used: `fail` starts fast)

# grpo.py's update on one fixed batch of 8 responses, of which `trained` have a non-zero advantage
# (row 5 has none: 7 trained rows split 4 + 3 over two ranks). micro_batch_size 1 leaves one rank an
# empty micro-batch; "one trained row" leaves one rank nothing at all.
PARITY_CONFIGS = {
    "token-mean": dict(loss_aggregation="token-mean", micro_batch_size=3),
    "seq-mean-token-mean": dict(loss_aggregation="seq-mean-token-mean", micro_batch_size=1),
    "seq-mean-token-sum": dict(loss_aggregation="seq-mean-token-sum", micro_batch_size=2),
    "dr-grpo": dict(loss_aggregation="dr-grpo", micro_batch_size=3),
    "2 epochs": dict(loss_aggregation="token-mean", num_epochs=2, micro_batch_size=2),
    "kl, 2 epochs x 2 minibatches": dict(loss_aggregation="token-mean", kl_coef=0.1, num_epochs=2, num_minibatches=2,
                                         micro_batch_size=3),
    "one trained row": dict(loss_aggregation="token-mean", micro_batch_size=3, trained_rows=[2]),
    "gradient checkpointing": dict(loss_aggregation="token-mean", micro_batch_size=3, gradient_checkpointing=True),
}
STEPS = 3


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor).detach().clone()


def parity(batch_file: str, out_file: str):
    """For each configuration: the gradients of every optimizer step (before clipping), the clipped
    norm, the metrics and pi_old of each update, and the parameters after STEPS updates."""
    import grpo
    from common.model import load_model

    device = distributed.start("cpu")
    batch = torch.load(batch_file, weights_only=True)
    clip = torch.nn.utils.clip_grad_norm_
    results = {}
    for name, config in PARITY_CONFIGS.items():
        torch.manual_seed(0)
        args = grpo.Args(**{key: value for key, value in config.items() if key != "trained_rows"})
        policy = load_model("tiny", device, gradient_checkpointing=args.gradient_checkpointing)
        policy.train()
        ref_model = load_model("tiny", device).requires_grad_(False) if args.kl_coef > 0 else None
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        recorded = {"gradients": [], "norms": [], "metrics": [], "old_logp": []}

        def recording_clip(parameters, max_norm, **kwargs):
            parameters = list(parameters)
            recorded["gradients"].append({n: full(p.grad) for n, p in policy.named_parameters() if p.grad is not None})
            norm = clip(parameters, max_norm, **kwargs)
            recorded["norms"].append(full(norm))
            return norm

        torch.nn.utils.clip_grad_norm_ = recording_clip
        trained = torch.zeros(batch["mask"].shape[0], 1)
        trained[config.get("trained_rows", [0, 1, 2, 3, 4, 6, 7])] = 1
        step_batch = {**batch, "advantages": batch["advantages"] * trained}
        for _ in range(STEPS):
            metrics, old_logp = grpo.update_policy(policy, ref_model, optimizer, scheduler, step_batch, args)
            recorded["metrics"].append(metrics)
            recorded["old_logp"].append(old_logp)
        torch.nn.utils.clip_grad_norm_ = clip
        recorded["parameters"] = {n: full(p) for n, p in policy.named_parameters()}
        results[name] = recorded
    if distributed.is_main():
        torch.save(results, out_file)
    distributed.close()


def uneven_generation(out_file: str):
    """Each rank generates greedily on the sharded tiny model with its own prompt and its own length
    (4 tokens on rank 0, 40 on rank 1), so rank 0 is done long before rank 1."""
    from common.build_tiny import build_tokenizer
    from common.data import render_prompt
    from common.model import load_model
    from common.rollout import generate

    device = distributed.start("cpu")
    tokenizer = build_tokenizer()
    policy = load_model("tiny", device)
    question = ["Compute 12+34.", "Compute 99-10+11-40."][distributed.rank() % 2]
    started = time.time()
    rollout = generate(policy, tokenizer, [render_prompt(tokenizer, question, "chat")], 4 + 36 * distributed.rank(),
                       greedy=True)
    outputs = distributed.gather_objects({"question": question, "tokens": rollout.completion_ids[0].tolist(),
                                          "seconds": time.time() - started})
    if distributed.is_main():
        torch.save(outputs, out_file)
    distributed.close()


def failing_rank():
    """Rank 1 stops with a one-line error while rank 0 is busy for ten minutes and then waits in a collective."""
    distributed.start("cpu")
    if distributed.rank() == 1:
        time.sleep(2)
        sys.exit("distributed_checks.py: error: rank 1 stops here on purpose")
    time.sleep(600)
    distributed.barrier()
    distributed.close()


if __name__ == "__main__":
    {"parity": parity, "generate": uneven_generation, "fail": failing_rank}[sys.argv[1]](*sys.argv[2:])
