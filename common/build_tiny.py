"""Rebuild the built-in tiny model in `common/tiny_model/` (shipped with the project).

    python -m common.build_tiny

A character-level tokenizer and a 0.8M-parameter Qwen2 model, both made in code (nothing is
downloaded), warm-started by supervised training on the imperfect demonstrations of
`common/arithmetic.py` until greedy accuracy on a validation set (training-stream problems, not
the held-out set), checked every `--eval-every` steps, first exceeds `--target-accuracy`.
Reinforcement learning needs that warm start: from a cold model almost every group is all-wrong
and carries no signal. Everything is seeded and single-threaded, so the same torch version
rebuilds the same weights.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from common.arithmetic import demonstration, train_problem
from common.data import render_prompt
from common.rollout import generate
from common.verify import score_batch

TINY_MODEL_DIR = Path(__file__).parent / "tiny_model"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SFT_SEED = 0  # seed of the warm-up's demonstration stream, apart from the RL training seeds
VALIDATION_SEED = -1


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges (one token per byte) plus ChatML's special tokens."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      additional_special_tokens=["<|im_start|>"], padding_side="left")
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_model(tokenizer, max_position_embeddings: int = 256) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def supervised_batch(tokenizer, problems: list[dict], rng: random.Random):
    """Token ids, attention mask and labels (-100 on prompt and padding) for prompt + demonstration + EOS."""
    return demonstration_batch(tokenizer, [problem["question"] for problem in problems],
                               [demonstration(problem, rng) for problem in problems])


def demonstration_batch(tokenizer, questions: list[str], answers: list[str]):
    """Token ids, attention mask and labels (-100 on prompt and padding) for chat prompt + answer + EOS."""
    prompts = [render_prompt(tokenizer, question, "chat") for question in questions]
    answers = [answer + tokenizer.eos_token for answer in answers]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    answer_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in answers]
    length = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), length), -100)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        input_ids[row, :len(p) + len(a)] = torch.tensor(p + a)
        labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
        attention_mask[row, :len(p) + len(a)] = 1
    return input_ids, attention_mask, labels


def supervised_step(model, optimizer, scheduler, input_ids, attention_mask, labels) -> torch.Tensor:
    """One step of cross-entropy on the labelled tokens, gradients clipped to norm 1; returns the loss."""
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss


def greedy_accuracy(model, tokenizer, problems: list[dict]) -> float:
    prompts = [render_prompt(tokenizer, problem["question"], "chat") for problem in problems]
    rollout = generate(model, tokenizer, prompts, max_new_tokens=96, greedy=True)
    return sum(score_batch(rollout.texts, [p["answer"] for p in problems])) / len(problems)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help="folder to write the model to")
    parser.add_argument("--target-accuracy", type=float, default=0.5, help="stop at the first evaluation above this")
    parser.add_argument("--max-steps", type=int, default=4000, help="give up (and fail) after this many steps")
    parser.add_argument("--batch-size", type=int, default=32, help="demonstrations per step")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up of the learning rate")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between validation evaluations")
    parser.add_argument("--validation-size", type=int, default=200, help="validation problems (from the training stream)")
    args = parser.parse_args()

    # One thread: the sums inside each matrix product then run in a fixed order, so the weights
    # come out bit for bit the same on every run; for a model this small it is no slower.
    torch.set_num_threads(1)
    torch.manual_seed(SFT_SEED)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup_steps))
    validation = [train_problem(VALIDATION_SEED, index) for index in range(args.validation_size)]
    demo_rng = random.Random(SFT_SEED)
    start = time.time()
    model.train()
    for step in range(1, args.max_steps + 1):
        problems = [train_problem(SFT_SEED, (step - 1) * args.batch_size + i) for i in range(args.batch_size)]
        loss = supervised_step(model, optimizer, scheduler, *supervised_batch(tokenizer, problems, demo_rng))
        if step % args.eval_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, validation)
            print(f"step {step}: loss {loss.item():.4f}, validation greedy accuracy {accuracy:.3f}, {time.time() - start:.0f}s")
            if accuracy > args.target_accuracy:
                break
    else:
        raise SystemExit(f"build_tiny: accuracy stayed below {args.target_accuracy} after {args.max_steps} steps")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    settings = {name: value for name, value in vars(args).items() if name != "out"}
    (args.out / "warm_start.json").write_text(json.dumps(
        {"steps": step, "validation_greedy_accuracy": accuracy, **settings}, indent=1))
    print(f"saved {args.out} after {step} steps, {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
