"""Rollout speed of vLLM against transformers, the cost of a weight sync, and the check's numbers
(a benchmark, not a test).

    python benchmarks/benchmark_vllm.py [--models tiny 18m 135m] [--dtypes float32 bfloat16] [--repeats 3]

For each model and dtype, in a fresh process each (one vLLM engine per process): one rollout
batch of the built-in task (16 prompts x 8 samples, up to 96 new tokens, temperature 1, the chat
template) sampled `--repeats` times with `transformers` generate and with the colocated vLLM engine
(after a short warm-up call each), reported as completion tokens per second; the engine's start-up
time; the time of one weight sync; and the check's statistic, the mean |log pi_trainer -
log pi_vllm| per token, on the engine's own samples: right after a sync, and with the sync skipped
after one AdamW step at learning rate 1e-6 and then 1e-4 (what the check must catch).

Models: `tiny` is the built-in 0.8M-parameter model; `18m` is a Qwen2 of hidden size 512 and 6
layers on the same byte-level tokenizer, randomly initialised in a temporary folder (so its
samples mostly run to the full 96 tokens); `135m` is SmolLM2-135M-Instruct, the real test model
of tests/real_model.py. Needs vLLM (README: "vLLM rollouts"). Threads: OMP_NUM_THREADS, as set
by the caller. Compare numbers from one invocation only: these machines are noisy.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common.arithmetic import train_problem  # noqa: E402
from common.build_tiny import build_tokenizer  # noqa: E402
from common.data import render_prompt  # noqa: E402
from common.model import load_model, load_tokenizer  # noqa: E402
from common.rollout import generate, sampler_mismatch  # noqa: E402
from grpo import completion_logprobs  # noqa: E402

NUM_PROMPTS, GROUP_SIZE, MAX_NEW_TOKENS = 16, 8, 96


def model_folder(name: str, scratch: Path) -> str:
    if name == "tiny":
        return "tiny"
    if name == "135m":
        import real_model
        return str(real_model.real_model_dir())
    from transformers import Qwen2Config, Qwen2ForCausalLM  # 18m: built here, randomly initialised
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(scratch / "18m")
    tokenizer.save_pretrained(scratch / "18m")
    return str(scratch / "18m")


def micro_batches(rollout, size: int = 16):
    """(input_ids, attention_mask, completion mask) of the rollout, `size` sequences at a time."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    for start in range(0, input_ids.shape[0], size):
        yield (input_ids[start:start + size], attention_mask[start:start + size],
               rollout.completion_mask[start:start + size])


@torch.no_grad()
def trainer_logprobs(policy, rollout) -> torch.Tensor:
    """The trainer's log-probs [B, C] of the rollout's completions, as grpo.py computes them."""
    return torch.cat([completion_logprobs(policy, ids, attention, mask.shape[1], 1.0)[0]
                      for ids, attention, mask in micro_batches(rollout)])


def adamw_step(policy, rollout, learning_rate: float):
    """One AdamW step raising the log-probs of the sampled tokens (Adam's first step moves every
    weight by about the learning rate, whatever the loss)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    tokens = rollout.completion_mask.sum()
    for ids, attention, mask in micro_batches(rollout):
        (-(completion_logprobs(policy, ids, attention, mask.shape[1], 1.0)[0] * mask).sum() / tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model: str, dtype: str, repeats: int) -> dict:
    """Everything for one model and dtype, in this process."""
    from common.vllm_engine import VLLMEngine  # here: the parent process never imports vLLM
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(model, Path(scratch))
        policy, tokenizer = load_model(folder, "cpu", dtype), load_tokenizer(folder)
        prompts = [render_prompt(tokenizer, train_problem(0, i)["question"], "chat") for i in range(NUM_PROMPTS)]
        batch = [prompt for prompt in prompts for _ in range(GROUP_SIZE)]
        result = {"model": model, "dtype": dtype, "parameters": sum(p.numel() for p in policy.parameters())}

        def tokens_per_second(sample) -> float:
            sample(batch[:GROUP_SIZE], 8)  # warm-up
            tokens, started = 0, time.time()
            for _ in range(repeats):
                tokens += sample(batch, MAX_NEW_TOKENS).completion_mask.sum().item()
            return tokens / (time.time() - started)

        torch.manual_seed(0)
        result["hf_tokens_per_s"] = tokens_per_second(lambda prompts, length: generate(policy, tokenizer, prompts, length))
        started = time.time()
        longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
        engine = VLLMEngine(policy, tokenizer, folder, max_model_len=longest + MAX_NEW_TOKENS, batch_size=len(batch),
                            seed=0, gpu_memory_utilization=0.3, sleep_mode=None, check_threshold=None)
        result["vllm_start_s"] = time.time() - started
        result["vllm_tokens_per_s"] = tokens_per_second(engine.generate)
        started = time.time()
        for _ in range(repeats):
            engine.sync()
        result["sync_s"] = (time.time() - started) / repeats

        def mismatch() -> float:
            rollout = engine.generate(batch, MAX_NEW_TOKENS)
            return sampler_mismatch(trainer_logprobs(policy, rollout), rollout.logprobs,
                                    rollout.completion_mask)["sampler_logp_diff"]

        result["diff_synced"] = mismatch()
        rollout = engine.generate(batch, MAX_NEW_TOKENS)
        for learning_rate in (1e-6, 1e-4):  # the engine keeps the weights of before both steps
            adamw_step(policy, rollout, learning_rate)
            result[f"diff_stale_lr{learning_rate:g}"] = mismatch()
        engine.sync()
        result["diff_resynced"] = mismatch()
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "18m", "135m"], choices=["tiny", "18m", "135m"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rollout batches and syncs per engine")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)  # a child process's job
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.repeats)))
        return
    columns = ("model", "dtype", "parameters", "hf_tokens_per_s", "vllm_tokens_per_s", "speedup", "vllm_start_s", "sync_s",
               "diff_synced", "diff_stale_lr1e-06", "diff_stale_lr0.0001", "diff_resynced")
    print(" ".join(f"{name:>19}" for name in columns))
    for model in args.models:
        for dtype in args.dtypes:
            child = subprocess.run([sys.executable, __file__, "--one", model, dtype, "--repeats", str(args.repeats)],
                                   cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
            if child.returncode:
                print(f"{model} {dtype} failed:\n{child.stderr[-3000:]}")
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            row["speedup"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
            print(" ".join(f"{row[name]:>19.3g}" if isinstance(row[name], float) else f"{row[name]:>19}" for name in columns),
                  flush=True)


if __name__ == "__main__":
    main()
