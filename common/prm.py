"""Process reward models (PRMs): one score per reasoning step, behind one function.

    prm.score_steps(prompts, responses_as_steps) -> list[list[float]]

`prompts` are the questions, `responses_as_steps` each response cut into its steps (texts), and
the result holds one score r_k in [-1, 1] per step: p(step correct) - p(step incorrect). A
trainer that uses process rewards only needs this function, so every PRM below is a drop-in:

- `ToyArithmeticPRM`: the built-in task's own step checker (`common.arithmetic.check_step`)
  turned into a PRM with seeded noise and one deliberate flaw (see its docstring), so that what
  a policy does to a PRM can be watched on a CPU in minutes.
- `DiscriminativePRM`: a trained PRM loaded through transformers' standard classes: a
  token-classification head read at a step-separator token appended after every step (the layout
  TRL's PRMTrainer trains, and the one of the PURE authors' PRM).

`split_into_steps` cuts sampled responses into steps at blank lines ("\\n\\n"), mapped to token
positions, which is how PURE (arXiv 2504.15275) and Qwen2.5-Math's PRMs delimit steps.
"""

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification

from common import UsageError
from common.arithmetic import check_step
from common.data import PROMPT_TEMPLATES, render_prompt
from common.model import load_tokenizer, resolve_model, weights_dtype
from common.verify import score

# What the PRM sees before the steps: the bare question (how TRL's PRM data sets hold it), or the
# question rendered with one of the policy templates, with the PRM's own tokenizer.
PRM_TEMPLATES = ("question", *PROMPT_TEMPLATES)


@dataclass
class ResponseSteps:
    """One response cut into steps. Positions index the response's tokens (0 = first sampled token).

    Step k runs from the token after ends[k-1] up to and including ends[k]; its end token is the
    one that completes its blank line, or for the last step the EOS (or the last token of a
    truncated response). lengths[k] counts the step's tokens before its end token.
    """
    texts: list[str]
    ends: list[int]
    lengths: list[int]


def newline_run_ends(pieces: list[str]) -> list[int]:
    """Indices of the tokens (given as decoded texts) that complete a blank line, i.e. at which a
    run of two or more consecutive newlines is first reached.

    Works on any tokenizer: a separator may be one token ("\\n\\n", ".\\n\\n") or two ("\\n", "\\n"),
    and only newline characters are counted, which byte-level pieces always decode exactly (a piece
    holding part of a multi-byte character decodes to a replacement character, which is not a
    newline). A token that decodes to nothing breaks a run, as a space between newlines would.
    After a separator the run starts again, so "\\n\\n\\n\\n" ends two steps, the second one empty.
    """
    ends, run = [], 0
    for index, piece in enumerate(pieces):
        content = piece.strip("\n")
        if not content:  # only newlines, or nothing at all
            run = run + len(piece) if piece else 0
            if run >= 2:
                ends.append(index)
                run = 0
            continue
        leading, trailing = len(piece) - len(piece.lstrip("\n")), len(piece) - len(piece.rstrip("\n"))
        if run + leading >= 2 or "\n\n" in piece:
            ends.append(index)
            run = 0
        else:
            run = trailing
    return ends


def split_into_steps(completion_ids: torch.Tensor, completion_mask: torch.Tensor, tokenizer) -> list[ResponseSteps]:
    """Each response [B, C] (mask 1 up to and including EOS) cut into steps at blank lines.

    The last step ends at the last token of the response (its EOS, or where a truncated response
    stops). Step texts are decoded from the step's own tokens, stripped of surrounding whitespace,
    so the PRM reads exactly what the policy wrote.
    """
    pieces: dict[int, str] = {}
    responses = []
    for ids, length in zip(completion_ids.tolist(), completion_mask.sum(dim=1).tolist()):
        ids = ids[:int(length)]
        for token in ids:
            if token not in pieces:
                pieces[token] = tokenizer.decode([token])
        ends = newline_run_ends([pieces[token] for token in ids[:-1]]) + [len(ids) - 1]
        starts = [0] + [end + 1 for end in ends[:-1]]
        texts = [tokenizer.decode(ids[start:end + 1], skip_special_tokens=True).strip() for start, end in zip(starts, ends)]
        responses.append(ResponseSteps(texts, ends, [end - start for start, end in zip(starts, ends)]))
    return responses


class ToyArithmeticPRM:
    """A PRM for the built-in arithmetic task, made from its exact step checker, noisy and flawed on purpose.

    How it rates a step (good or bad):
    - a final-answer step (one holding \\boxed{}) is good if the boxed value is the answer to the
      question (the PRM works it out from the question, as a strong PRM would);
    - an equation step ("then 23+62=85", any planning word) is good if the arithmetic is right;
    - anything else (an empty step, free text, a line cut off by truncation) is bad.

    The flaw, of the kind the PURE authors found in real PRMs (theirs gave positive scores to
    steps with no content, such as "thanks"): an equation is judged only on its own arithmetic,
    never on whether it moves the solution forward. A true but irrelevant calculation
    ("then 10+10=20") is rated as good as a real step, and a restated line (an equation already
    written earlier in the response, such as "check 23+62=85" after "then 23+62=85") is rated
    *more* confidently good: a PRM is surest of a line it has just seen. Restated lines cost no
    thinking and earn more than real steps of the same length, so under sum-form credit a policy
    can farm them, even against PURE's per-token baseline; under min-form credit they add nothing.

    The noise: a good step gets logit +CONFIDENCE (a restated one +RESTATED_CONFIDENCE), a bad one
    -CONFIDENCE, plus Gaussian noise of standard deviation `noise`; the score is p(good) - p(bad)
    = tanh(logit / 2). With the default noise 1.0 a new step scores 0.69 on average in the right
    direction (0.76 without noise) and lands on the wrong side of 0 with probability Phi(-2) =
    2.3%; a restated line scores 0.93 on average (0.96 without noise). The noise is drawn from a
    generator seeded by (seed, question, the steps so far), so the same response always gets the
    same scores, as from a real model, and two runs with the same seed see the same PRM.
    """

    CONFIDENCE = 2.0
    RESTATED_CONFIDENCE = 4.0

    def __init__(self, noise: float = 1.0, seed: int = 0):
        if noise < 0:
            raise UsageError(f"the toy PRM's noise must be 0 or more (got {noise})")
        self.noise, self.seed = noise, seed

    def score_steps(self, prompts: list[str], responses_as_steps: list[list[str]]) -> list[list[float]]:
        return [self._score_response(question, steps) for question, steps in zip(prompts, responses_as_steps, strict=True)]

    def _score_response(self, question: str, steps: list[str]) -> list[float]:
        answer, seen, scores = str(arithmetic_answer(question)), set(), []
        for k, step in enumerate(steps):
            if "\\boxed{" in step:
                logit = self.CONFIDENCE if score(step, answer) == 1.0 else -self.CONFIDENCE
            elif check_step(step) is True:  # the flaw: true arithmetic is all it asks of an equation
                equation = step.split()[-1]
                logit = self.RESTATED_CONFIDENCE if equation in seen else self.CONFIDENCE
                seen.add(equation)
            else:
                logit = -self.CONFIDENCE
            rng = random.Random(f"{self.seed}\x00{question}\x00" + "\x00".join(steps[:k + 1]))
            scores.append(math.tanh((logit + self.noise * rng.gauss(0.0, 1.0)) / 2))
        return scores


_QUESTION = re.compile(r"^Compute (\d+(?:[+-]\d+)+)\.$")


def arithmetic_answer(question: str) -> int:
    """The value of a built-in task question ("Compute 44-21+62." -> 85); ValueError for any other text."""
    match = _QUESTION.match(question.strip())
    if match is None:
        raise ValueError(f"not a question of the built-in arithmetic task: {question!r}")
    tokens = re.findall(r"[+-]?\d+", match[1])
    return sum(int(token) for token in tokens)


class DiscriminativePRM:
    """A trained PRM with a per-token classification head, read at a separator after each step.

    The input is the prompt (see PRM_TEMPLATES), then each step followed by `separator`, each
    piece tokenized on its own and concatenated (as TRL's PRMTrainer builds its training rows),
    so that every separator is exactly its own tokens wherever it falls. The head's logits are
    read at the last token of each separator; with p = softmax over the head's outputs,
    r = p[correct] - p[incorrect], where `labels` = (incorrect, correct) are the two output
    indices. For a two-output head this is 2 p(correct) - 1: Qwen2.5-Math-PRM's "probability of
    positive", moved to [-1, 1].
    """

    def __init__(self, model, tokenizer, separator: str = "\n", labels: tuple[int, int] = (0, 1),
                 template: str = "question", batch_size: int = 8):
        self.model, self.tokenizer, self.template, self.batch_size = model, tokenizer, template, batch_size
        self.incorrect, self.correct = labels
        self.separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
        if not self.separator_ids:
            raise UsageError(f"the PRM separator {separator!r} is no token at all for this PRM's tokenizer")
        # A BOS goes first where the tokenizer itself would add one (Llama, Mistral; not Qwen).
        bos = tokenizer.bos_token_id
        self.bos_ids = [bos] if bos is not None and tokenizer("Q")["input_ids"][:1] == [bos] else []

    def prompt_ids(self, question: str) -> list[int]:
        if self.template == "question":
            return self.bos_ids + self.tokenizer(question, add_special_tokens=False)["input_ids"]
        return self.tokenizer(render_prompt(self.tokenizer, question, self.template), add_special_tokens=False)["input_ids"]

    def check_fits(self, name: str, questions: list[str], max_new_tokens: int):
        """A one-line UsageError, at start-up, if a question as the PRM reads it plus a response of
        `max_new_tokens` of the PRM's tokens would not fit the PRM's context."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(self.prompt_ids(question)) for question in questions)
        if limit is not None and longest + max_new_tokens > limit:
            raise UsageError(f"prompts of {name} do not fit the PRM's context of {limit} tokens: the longest is "
                             f"{longest} tokens as the PRM reads it, plus --max-new-tokens {max_new_tokens}; "
                             "lower --max-new-tokens or use a PRM with a longer context")

    def build_input(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of prompt + (step + separator) per step, and the position read for each step."""
        ids, positions = self.prompt_ids(question), []
        for step in steps:
            ids += self.tokenizer(step, add_special_tokens=False)["input_ids"] + self.separator_ids
            positions.append(len(ids) - 1)
        return ids, positions

    @torch.no_grad()
    def score_steps(self, prompts: list[str], responses_as_steps: list[list[str]]) -> list[list[float]]:
        inputs = [self.build_input(question, steps) for question, steps in zip(prompts, responses_as_steps, strict=True)]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids, _ in inputs)
        if limit is not None and longest > limit:
            raise ValueError(f"a PRM input of {longest} tokens exceeds the PRM's context of {limit} tokens; "
                             "lower --max-new-tokens")
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk], device=device)
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk], device=device)
            output = self.model(input_ids=input_ids, attention_mask=attention_mask)
            logits = output.logits if hasattr(output, "logits") else output[0]  # [b, width, labels]
            probs = logits.float().softmax(dim=-1)
            for row, (_, positions) in enumerate(chunk):
                at = probs[row, positions]  # [steps, labels]
                scores.append((at[:, self.correct] - at[:, self.incorrect]).tolist())
        return scores


def load_discriminative_prm(name: str, device: str, dtype=None, separator: str = "\n", labels: tuple[int, int] = (0, 1),
                            template: str = "question", batch_size: int = 8, trust_remote_code: bool = False) -> DiscriminativePRM:
    """A DiscriminativePRM from a local folder or hub id, safetensors only.

    It loads through AutoModelForTokenClassification. A checkpoint whose head is something else
    (Qwen2.5-Math-PRM-7B's two-layer head, a causal LM's vocabulary head) would load with a freshly
    initialised head and give random scores, so missing head weights stop the load with a one-line
    error. With `trust_remote_code`, a repository that registers its PRM class only as AutoModel
    (Qwen2.5-Math-PRM-7B) loads through that class instead, and must return per-token logits with
    one output per label.
    """
    if template not in PRM_TEMPLATES:
        raise UsageError(f"unknown PRM template {template!r}; use one of {', '.join(PRM_TEMPLATES)}")
    try:
        source = resolve_model(name)
        tokenizer = load_tokenizer(name, trust_remote_code)
    except UsageError as err:
        raise UsageError(f"--prm: {err}") from err
    dtype = weights_dtype(dtype, device, frozen=True)  # frozen: bf16-mixed gives bf16 weights, as for a reference model
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        auto_map = getattr(config, "auto_map", None) or {}
        own_class = trust_remote_code and "AutoModelForTokenClassification" not in auto_map and "AutoModel" in auto_map
        model_class = AutoModel if own_class else AutoModelForTokenClassification
        model, info = model_class.from_pretrained(source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                  output_loading_info=True)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"cannot load the PRM {name!r} ({'folder ' + source if Path(source).is_dir() else 'hub id, needs network access'}): {reason}") from err
    missing = info["missing_keys"]
    if missing:
        hint = "" if trust_remote_code else "; if it ships its own code (auto_map in config.json), pass --prm-trust-remote-code"
        raise UsageError(f"the PRM {name!r} has no token-classification head of this layout (missing weights: "
                         f"{', '.join(sorted(missing)[:3])}): it would score with random weights{hint}")
    outputs = model.config.num_labels
    if not all(0 <= label < outputs for label in labels) or labels[0] == labels[1]:
        raise UsageError(f"--prm-labels {labels[0]},{labels[1]} must be two different outputs of the PRM's head, "
                         f"which has {outputs} (0-{outputs - 1})")
    model.to(device).eval()
    prm = DiscriminativePRM(model, tokenizer, separator, labels, template, batch_size)
    with torch.no_grad():  # one separator through the model: the head must give per-token logits, one per label
        output = model(input_ids=torch.tensor([prm.separator_ids], device=device))
    logits = output.logits if hasattr(output, "logits") else output[0]
    if tuple(logits.shape) != (1, len(prm.separator_ids), outputs):
        raise UsageError(f"the PRM {name!r} does not return per-token logits with one output per label "
                         f"(got shape {tuple(logits.shape)} for {len(prm.separator_ids)} tokens and {outputs} labels)")
    return prm
