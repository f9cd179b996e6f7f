"""Rebuild the built-in agent model in `common/tiny_agent_model/` (shipped with the project).

    python -m common.build_tiny_agent

The agent counterpart of `common/build_tiny.py`, for the built-in environment (common/keydoor.py):
a byte-level BPE tokenizer trained on that environment's prompts, with a ChatML chat template,
and a 0.8M-parameter Qwen2 model warm-started by imitating the environment's noisy expert, turn by
turn, in exactly the prompts a trainer shows (task, commands, the last HISTORY_LENGTH
(observation, action) pairs, the observation; answer `<action>...</action>`). The expert's
habit of walking to the locked door before it has the key is imitated with the rest, so greedy
play fails on many layouts and reinforcement learning has something to fix. Nothing is downloaded; everything is seeded and
single-threaded, so the same torch and tokenizers versions rebuild the same files.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from common import build_tiny
from common.build_tiny import CHATML_TEMPLATE, build_model, demonstration_batch, supervised_step
from common.data import render_prompt
from common.envs import KEYDOOR, EpisodeEvaluator, agent_prompt, describe_task
from common.keydoor import KeyDoorEnv, expert_action, train_seed
from common.model import TINY_AGENT_MODEL_DIR, load_tokenizer
from common.rollout import TransformersEngine

SFT_SEED = 0  # seed of the demonstration layouts, apart from the RL training seeds (1, 2, 3, ...)
VALIDATION_SEED = -1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 400  # more than the environment's prompts need: training stops when every word is one token
HISTORY_LENGTH, MAX_TURNS = 0, 12  # gigpo.py's defaults: the prompts it will show
BATCH_SIZE, LEARNING_RATE, WARMUP_STEPS = 64, 2e-3, 20  # demonstration turns per step; AdamW, linear warm-up
VALIDATION_SIZE, EVAL_EVERY = 200, 500  # validation layouts (training stream, never held out), every 500 steps


def expert_turns(seed: int, history_length: int, max_turns: int, rng: random.Random) -> list[tuple[str, str]]:
    """(user message, response) of every turn of one expert episode on layout `seed`."""
    env, history, turns = KeyDoorEnv(), [], []
    observation = env.reset(seed)
    for _ in range(max_turns):
        action = expert_action(env, rng)
        turns.append((agent_prompt(env.task, env.admissible_actions(), history[-history_length:] if history_length else [],
                                   observation), f"<action>{action}</action>"))
        history.append((observation, action))
        observation, _, done, _ = env.step(action)
        if done:
            break
    return turns


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) trained on `texts`, split into words as Qwen2's tokenizer does.

    The same normaliser and word splitting as transformers' Qwen2Tokenizer, which is what
    AutoTokenizer loads for a Qwen2 model folder, so the saved tokenizer reloads unchanged.
    <action> and </action> are added tokens, as chat models add their tool-call tags.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens(["<action>", "</action>"])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
                                      padding_side="left")
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_AGENT_MODEL_DIR, help="folder to write the model to")
    parser.add_argument("--episodes", type=int, default=20000, help="expert episodes to imitate")
    parser.add_argument("--steps", type=int, default=1500, help="supervised steps")
    args = parser.parse_args()

    rng = random.Random(SFT_SEED)
    torch.manual_seed(SFT_SEED)
    torch.set_num_threads(1)  # a fixed order of every sum, so the same weights on every rebuild
    samples = [turn for index in range(args.episodes)
               for turn in expert_turns(train_seed(SFT_SEED, index), HISTORY_LENGTH, MAX_TURNS, rng)]
    rng.shuffle(samples)
    # Trained on whole rendered prompts (ChatML markers included, rendered by the byte tokenizer).
    byte_tokenizer = build_tiny.build_tokenizer()
    tokenizer = build_tokenizer([text for prompt, response in samples[:5000]
                                 for text in (render_prompt(byte_tokenizer, prompt, "chat"), response)], VOCAB_SIZE)
    model = build_model(tokenizer, max_position_embeddings=1024)
    # Train and validate with the tokenizer as a trainer will load it from the saved folder.
    model.config.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    tokenizer = load_tokenizer(str(args.out))
    print(f"{len(samples)} demonstration turns from {args.episodes} expert episodes; model "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    validation = {"validation": [describe_task(KEYDOOR, train_seed(VALIDATION_SEED, i)) for i in range(VALIDATION_SIZE)]}
    evaluate = EpisodeEvaluator(TransformersEngine(model, tokenizer), validation, "chat", 16, 250, 1, 1.0, MAX_TURNS,
                                HISTORY_LENGTH)
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        batch = samples[((step - 1) * BATCH_SIZE) % len(samples):][:BATCH_SIZE]
        loss = supervised_step(model, optimizer, scheduler, *demonstration_batch(
            tokenizer, [prompt for prompt, _ in batch], [response for _, response in batch]))
        if step % EVAL_EVERY == 0 or step == args.steps:
            results = evaluate()["validation"]
            print(f"step {step}: loss {loss.item():.4f}, validation success greedy {results['pass@1']:.3f}, "
                  f"sampled {results['mean@1']:.3f}, {time.time() - start:.0f}s")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    settings = {name: value for name, value in vars(args).items() if name != "out"}
    (args.out / "warm_start.json").write_text(json.dumps(
        {"validation_success_greedy": results["pass@1"], "validation_success_sampled": results["mean@1"], **settings}, indent=1))
    print(f"saved {args.out} after {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
