"""TEMPO's advantage against a per-token Python loop and against the rest of a step (a benchmark, not a test).

    python benchmarks/benchmark_tempo.py [--num-prompts 16] [--repeats 20]

For G = 8 and 16 and responses of up to 256 and 1,024 tokens, it builds a batch of rollouts shaped
like real ones (each response follows an earlier one of its group for a random stretch, then goes
its own way; most end with EOS somewhere in the second half, the rest are cut off at the limit,
and padding follows) and times, on the CPU:

- `tempo_advantages` of tempo.py (median of --repeats calls);
- the explicit trie of tests/test_tempo.py, which visits every token in Python (once; the two are
  checked to agree first);
- `update_policy` of tempo.py on the same batch (log-prob forward, backward, optimizer step) with
  the tiny model: the training part of a step, median of 3 after a warm-up.

Generation, the larger part of a step on a CPU, is left out, so the share printed is an upper bound
on the advantage's share of a whole step. Compare numbers from one invocation only.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tempo.py and common/ in the project root, the trie in tests/

from common.model import load_model, load_tokenizer  # noqa: E402
from tempo import Args, tempo_advantages, update_policy  # noqa: E402
from test_tempo import explicit_trie_advantages  # noqa: E402

PROMPT_LENGTH = 32


def synthetic_rollouts(num_prompts, group_size, length, vocab_size, eos, pad, generator):
    """ids and mask [P, G, T] of response tokens in [0, vocab_size), EOS included, then padding."""
    ids = torch.randint(0, vocab_size, (num_prompts, group_size, length), generator=generator)
    for i in range(1, group_size):
        followed = torch.randint(0, i, (num_prompts,), generator=generator)
        split = torch.randint(0, length + 1, (num_prompts,), generator=generator)
        shared = torch.arange(length) < split.unsqueeze(1)  # [P, T]
        ids[:, i] = torch.where(shared, ids[torch.arange(num_prompts), followed], ids[:, i])
    ends = torch.randint(length // 2, length + 1, (num_prompts, group_size), generator=generator)  # T: cut off
    positions = torch.arange(length)
    ids = torch.where(positions == ends.unsqueeze(2), eos, ids)
    mask = (positions <= ends.unsqueeze(2)).float()
    return torch.where(mask.bool(), ids, pad), mask


def median_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts per batch (tempo.py's default: 16)")
    parser.add_argument("--repeats", type=int, default=20, help="calls of tempo_advantages per timing")
    args = parser.parse_args()
    policy, tokenizer = load_model("tiny", "cpu"), load_tokenizer("tiny")
    generator = torch.Generator().manual_seed(0)
    print(f"{args.num_prompts} prompts, torch threads: {torch.get_num_threads()}")
    print(f"{'G':>3} {'tokens':>6} {'tempo_advantages':>17} {'trie loop':>10} {'speed-up':>9} {'update_policy':>14} "
          f"{'share':>7} {'branch tokens':>14}")
    for group_size in (8, 16):
        for length in (256, 1024):
            ids, mask = synthetic_rollouts(args.num_prompts, group_size, length, 256, tokenizer.eos_token_id,
                                           tokenizer.pad_token_id, generator)
            rewards = torch.randint(0, 2, (args.num_prompts, group_size), generator=generator).float()

            advantages, _, branch = tempo_advantages(rewards, ids, mask)
            start = time.perf_counter()
            responses = [[row[:int(n)] for row, n in zip(group, lengths)]
                         for group, lengths in zip(ids.tolist(), mask.sum(dim=2).tolist())]
            expected, _ = explicit_trie_advantages(rewards.tolist(), responses)
            trie_seconds = time.perf_counter() - start
            for p, group in enumerate(expected):
                for i, row in enumerate(group):
                    assert torch.allclose(advantages[p, i, :len(row)], torch.tensor(row), atol=1e-5), (p, i)
            fast_seconds = median_seconds(lambda: tempo_advantages(rewards, ids, mask), args.repeats)

            flat_mask = mask.view(-1, length)
            prompt = torch.randint(0, 256, (flat_mask.shape[0], PROMPT_LENGTH), generator=generator)
            batch = {"input_ids": torch.cat([prompt, ids.view(-1, length)], dim=1),
                     "attention_mask": torch.cat([torch.ones_like(prompt), flat_mask.long()], dim=1),
                     "mask": flat_mask, "advantages": advantages.view(-1, length).float()}
            step_args = Args(num_prompts=args.num_prompts, group_size=group_size, max_new_tokens=length)
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            update_policy(policy, None, optimizer, scheduler, batch, step_args)  # warm-up
            train_seconds = median_seconds(lambda: update_policy(policy, None, optimizer, scheduler, batch, step_args), 3)

            print(f"{group_size:>3} {length:>6} {1e3 * fast_seconds:>14.2f} ms {trie_seconds:>8.2f} s "
                  f"{trie_seconds / fast_seconds:>8.0f}x {train_seconds:>12.2f} s {100 * fast_seconds / train_seconds:>6.2f}% "
                  f"{100 * branch.sum().item() / mask.sum().item():>13.1f}%")


if __name__ == "__main__":
    main()
