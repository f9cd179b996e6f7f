"""Tests of PURE's arithmetic in pure.py and of the PRM pieces in common/prm.py.

The exact vectors come from ../shared/spec/methods.md section 4 (6 decimals there). Properties run
under hypothesis in float64, with tolerances from float rounding. The step splitting is checked
on the byte-level tiny tokenizer and on SmolLM2's 49k BPE tokenizer (real_model_dir), and the
discriminative PRM loader on a tiny token-classification PRM built here.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

from common import UsageError
from common.build_tiny import build_tokenizer
from common.data import DEFAULT_DATA_DIR
from common.prm import ToyArithmeticPRM, arithmetic_answer, load_discriminative_prm, newline_run_ends, split_into_steps
import pure
from grpo_runs import read_steps, run_trainer
from pure import (leave_one_out_token_baseline, min_form_exact, min_form_softmax, pad_steps, pure_advantages,
                  transform_step_rewards, verifiable_rewards)

PROPERTY = settings(max_examples=100, deadline=None)  # no deadline: the machine is shared
SPEC = 1e-6
ROUNDING = 1e-12
CREDITS = ["softmax-min", "min", "sum", "mean"]


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def returns_of(rhat: torch.Tensor) -> torch.Tensor:
    return rhat.flip(-1).cumsum(dim=-1).flip(-1)


STEP_SCORES = st.lists(st.floats(-1, 1), min_size=1, max_size=8)


@st.composite
def padded_step_scores(draw):
    """Step scores [B, K] with a mask: B responses of 1-8 steps each, padded with junk."""
    rows = draw(st.lists(STEP_SCORES, min_size=1, max_size=4))
    width = max(len(row) for row in rows)
    scores = f64([row + [draw(st.floats(-5, 5))] * (width - len(row)) for row in rows])
    mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows])
    return scores, mask


# ---------------------------------------------------------------------------------------------
# Credit assignment: the spec's vectors and the properties the issue names
# ---------------------------------------------------------------------------------------------

def test_spec_vector_softmax_min_form_and_exact_min_form():
    scores, mask = f64([[0.8, -0.4, 0.6]]), torch.tensor([[True, True, True]])
    rhat = min_form_softmax(scores, mask, 0.1)
    weights = rhat / scores
    assert weights[0].tolist() == pytest.approx([0.000006, 0.999948, 0.000045], abs=SPEC)
    assert rhat[0].tolist() == pytest.approx([0.000005, -0.399979, 0.000027], abs=SPEC)
    assert returns_of(rhat)[0].tolist() == pytest.approx([-0.399947, -0.399952, 0.000027], abs=SPEC)
    assert returns_of(min_form_exact(scores, mask))[0].tolist() == pytest.approx([-0.4, -0.4, 0.6], abs=ROUNDING)


def test_mean_form_is_the_authors_uniform_weight_switch_not_the_sum():
    scores, mask = f64([[0.8, -0.4, 0.6]]), torch.tensor([[True, True, True]])
    assert transform_step_rewards(scores, mask, "mean")[0].tolist() == pytest.approx([0.8 / 3, -0.4 / 3, 0.2], abs=ROUNDING)
    assert transform_step_rewards(scores, mask, "sum")[0].tolist() == pytest.approx([0.8, -0.4, 0.6], abs=ROUNDING)


@PROPERTY
@given(padded_step_scores(), st.floats(0.01, 10))
def test_softmax_min_form_total_lies_between_the_minimum_and_the_mean(batch, temperature):
    scores, mask = batch
    total = min_form_softmax(scores, mask, temperature).sum(dim=1)
    for row in range(scores.shape[0]):
        steps = scores[row][mask[row]]
        assert steps.min() - ROUNDING <= total[row] <= steps.mean() + ROUNDING


@PROPERTY
@given(STEP_SCORES)
def test_softmax_min_form_tends_to_the_minimum_as_the_temperature_falls(row):
    scores, mask = f64([row]), torch.ones(1, len(row), dtype=torch.bool)
    gaps = [min_form_softmax(scores, mask, t).sum().item() - min(row) for t in (1.0, 0.1, 0.01, 0.001)]
    assert all(later <= earlier + ROUNDING for earlier, later in zip(gaps, gaps[1:]))
    # At T the weight of a step above the minimum by d is at most exp(-d / T): the gap is below
    # (K - 1) max_d d exp(-d / T) <= (K - 1) T / e.
    assert gaps[-1] <= (len(row) - 1) * 0.001 / math.e + ROUNDING


@PROPERTY
@given(padded_step_scores())
def test_exact_min_form_returns_are_the_cumulative_minimum_from_the_end(batch):
    scores, mask = batch
    returns = returns_of(min_form_exact(scores, mask))
    for row in range(scores.shape[0]):
        steps = scores[row][mask[row]].tolist()
        expected = [min(steps[k:]) for k in range(len(steps))]
        assert returns[row][mask[row]].tolist() == pytest.approx(expected, abs=ROUNDING)
        assert (returns[row][~mask[row]] == 0).all()


@PROPERTY
@given(st.floats(-1, 1), st.sampled_from(CREDITS))
def test_a_single_step_response_gets_its_own_score(score, credit):
    rhat = transform_step_rewards(f64([[score]]), torch.tensor([[True]]), credit, 0.1)
    assert rhat.item() == pytest.approx(score, abs=ROUNDING)


def test_sum_form_pays_for_an_extra_good_step_and_min_form_does_not():
    """The exploit in one line: append a step the PRM likes to a response with one weak step."""
    base, padded = f64([[0.7, 0.2, 0.7]]), f64([[0.7, 0.2, 0.7, 0.7]])
    mask3, mask4 = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    gain = {credit: (transform_step_rewards(padded, mask4, credit).sum() - transform_step_rewards(base, mask3, credit).sum()).item()
            for credit in CREDITS}
    assert gain["sum"] == pytest.approx(0.7)
    assert gain["min"] == pytest.approx(0.0, abs=ROUNDING)
    # A step d = 0.5 above the minimum gets weight below exp(-d / T) = exp(-5): it moves the total by < d exp(-5).
    assert 0 < gain["softmax-min"] < 0.5 * math.exp(-5)
    assert 0 < gain["mean"] < 0.7 / 4 + ROUNDING


# ---------------------------------------------------------------------------------------------
# Baselines, verifiable reward, token advantages
# ---------------------------------------------------------------------------------------------

@PROPERTY
@given(st.lists(st.floats(-3, 3), min_size=2, max_size=6), st.data())
def test_leave_one_out_baselines_exclude_the_response_itself(totals, data):
    size = len(totals)
    lengths = data.draw(st.lists(st.integers(1, 50), min_size=size, max_size=size))
    index = data.draw(st.integers(0, size - 1))
    baseline = leave_one_out_token_baseline(f64([totals]), f64([lengths]))[0]
    others = [j for j in range(size) if j != index]
    assert baseline[index].item() == pytest.approx(sum(totals[j] for j in others) / sum(lengths[j] for j in others), abs=1e-12)
    changed = list(totals)
    changed[index] += 7.0
    changed_lengths = list(lengths)
    changed_lengths[index] += 11
    assert leave_one_out_token_baseline(f64([changed]), f64([changed_lengths]))[0][index].item() == pytest.approx(
        baseline[index].item(), abs=1e-12)


@PROPERTY
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=6), st.booleans())
def test_verifiable_reward_is_solved_minus_one_against_the_others_and_zero_without_a_reference(solved, has_reference):
    rewards = verifiable_rewards(f64([solved]), torch.tensor([has_reference]))[0]
    if not has_reference:
        assert (rewards == 0).all()
        return
    for i, value in enumerate(rewards.tolist()):
        others = [solved[j] - 1 for j in range(len(solved)) if j != i]
        assert value == pytest.approx((solved[i] - 1) - sum(others) / len(others), abs=ROUNDING)


def test_token_rewards_and_returns_by_hand():
    """Two responses of one prompt, unnormalised, worked by hand.

    Response 0: 6 tokens, steps end at 2 (n=2) and 5 (EOS, n=2), sum-form rewards 0.5, -0.5.
    Response 1: 4 tokens, one step ending at EOS 3 (n=3), reward 0.25.
    Baselines: b0 = 0.25 / 4, b1 = 0 / 6. Verifiable (has reference, solved [0, 1]):
    v = [-1, 0] -> [-1 - 0, 0 - (-1)] = [-1, 1].
    """
    scores = f64([[0.5, -0.5], [0.25, 0.0]])
    step_mask = torch.tensor([[True, True], [True, False]])
    ends, lengths = torch.tensor([[2, 5], [3, 0]]), f64([[2, 2], [3, 0]])
    mask = f64([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    advantages, rhat = pure_advantages(scores, step_mask, ends, lengths, mask, f64([[0.0, 1.0]]), torch.tensor([True]),
                                       credit="sum", normalize=False)
    b0 = 0.25 / 4
    r0 = [0, 0, 0.5 - 2 * b0, 0, 0, -0.5 - 2 * b0 - 1.0]
    r1 = [0, 0, 0, 0.25 + 1.0, 0, 0]
    expected = [[sum(r[t:]) for t in range(6)] for r in (r0, r1)]
    expected[0][2] = expected[0][5] = expected[1][3] = 0.0  # step ends: no advantage
    expected[1][4] = expected[1][5] = 0.0  # padding
    assert advantages.tolist() == [pytest.approx(row, abs=ROUNDING) for row in expected]
    assert rhat.tolist() == [[0.5, -0.5], [0.25, 0.0]]


@PROPERTY
@given(st.data(), st.sampled_from(CREDITS), st.booleans())
def test_step_ends_get_zero_advantage_and_the_rest_is_whitened(data, credit, with_kl):
    group_size = data.draw(st.integers(2, 4))
    size = 2 * group_size
    rows, ends, lengths, widths = [], [], [], []
    for _ in range(size):
        length = data.draw(st.integers(1, 12))
        cuts = sorted(data.draw(st.sets(st.integers(0, length - 2), max_size=3))) if length > 1 else []
        step_ends = cuts + [length - 1]
        starts = [0] + [end + 1 for end in step_ends[:-1]]
        rows.append(data.draw(st.lists(st.floats(-1, 1), min_size=len(step_ends), max_size=len(step_ends))))
        ends.append(step_ends)
        lengths.append([end - start for start, end in zip(starts, step_ends)])
        widths.append(length)
    from common.prm import ResponseSteps
    steps = [ResponseSteps([""] * len(e), e, n) for e, n in zip(ends, lengths)]
    step_rewards, step_mask, step_ends, step_lengths = pad_steps(steps, rows, "cpu")
    mask = f64([[1.0] * w + [0.0] * (12 - w) for w in widths])
    kl = torch.rand(size, 12, dtype=torch.float64) if with_kl else None
    solved = f64(data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=size, max_size=size))).view(2, group_size)
    advantages, _ = pure_advantages(step_rewards.double(), step_mask, step_ends, step_lengths.double(), mask, solved,
                                    torch.tensor([True, False]), credit, 0.1, 1.0, kl, 0.01, True)
    is_end = torch.zeros(size, 12, dtype=torch.bool)
    for row, row_ends in enumerate(ends):
        is_end[row, row_ends] = True
    assert (advantages[is_end] == 0).all() and (advantages[mask == 0] == 0).all()
    trained = advantages[(mask == 1) & ~is_end]
    if trained.numel() > 1 and trained.var(unbiased=False) > 1e-6:
        assert trained.mean().item() == pytest.approx(0.0, abs=1e-9)
        assert trained.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Step splitting, on the tiny byte-level tokenizer and on SmolLM2's BPE tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pieces, ends", [
    (["a", "\n\n", "b"], [1]),
    (["a", ".\n\n", "b"], [1]),
    (["a", "\n", "\n", "b"], [2]),
    (["a", "\n", " ", "\n", "b"], []),
    (["a", "\n", "", "\n", "b"], []),
    (["a\n", "\nb", "c"], [1]),
    (["\n\n\n\n"], [0]),
    (["\n", "\n", "\n", "\n"], [1, 3]),
    (["a", "\n", "b", "\n", "c"], []),
    (["x\n\ny"], [0]),
])
def test_blank_lines_end_steps_at_the_token_that_completes_them(pieces, ends):
    assert newline_run_ends(pieces) == ends


def completion_tensors(tokenizer, texts, eos_id, truncate=None):
    """Right-padded completion ids [B, C] and masks as generate() returns them (EOS kept in the mask)."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id] for text in texts]
    if truncate is not None:
        rows = [row[:truncate] for row in rows]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [eos_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


STEP_TEXT = st.text(st.sampled_from(list("abc xyz0123456789+-=.,$\\{}()é中")), min_size=1, max_size=12).filter(
    lambda text: text.strip())


@pytest.fixture(scope="module")
def smollm_tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_worked_answer_splits_into_its_steps_with_ends_on_the_separator_and_eos(which, request):
    tokenizer = build_tokenizer() if which == "tiny" else request.getfixturevalue("smollm_tokenizer")
    text = "first 44-21=23\n\nthen 23+62=85\n\n\\boxed{85}"
    ids, mask = completion_tensors(tokenizer, [text], tokenizer.eos_token_id)
    [steps] = split_into_steps(ids, mask, tokenizer)
    assert steps.texts == ["first 44-21=23", "then 23+62=85", "\\boxed{85}"]
    tokens = ids[0].tolist()
    assert steps.ends[-1] == len(tokens) - 1 and tokens[steps.ends[-1]] == tokenizer.eos_token_id
    for end in steps.ends[:-1]:
        assert tokenizer.decode(tokens[:end + 1]).endswith("\n\n")  # the end token completes the blank line
        assert not tokenizer.decode(tokens[:end]).endswith("\n\n")  # and no earlier token did
    starts = [0] + [end + 1 for end in steps.ends[:-1]]
    assert steps.lengths == [end - start for start, end in zip(starts, steps.ends)]
    if which == "tiny":  # one token per byte: "\n", "\n" is the separator, the second "\n" ends the step
        assert steps.ends[:2] == [15, 30] and steps.lengths[:2] == [15, 14]


@settings(max_examples=40, deadline=None)
@given(st.lists(STEP_TEXT, min_size=1, max_size=5), st.sampled_from(["\n\n", "\n\n\n"]))
def test_any_steps_joined_by_blank_lines_come_back_on_both_tokenizers(smollm_tokenizer, steps, separator):
    for tokenizer in (build_tokenizer(), smollm_tokenizer):
        ids, mask = completion_tensors(tokenizer, [separator.join(steps)], tokenizer.eos_token_id)
        [split] = split_into_steps(ids, mask, tokenizer)
        assert split.texts == [step.strip() for step in steps]


def test_a_truncated_response_ends_its_last_step_at_its_last_token():
    tokenizer = build_tokenizer()
    ids, mask = completion_tensors(tokenizer, ["first 44-21=23\n\nthen 23+6"], tokenizer.eos_token_id, truncate=24)
    [steps] = split_into_steps(ids, mask, tokenizer)
    assert steps.texts == ["first 44-21=23", "then 23+"] and steps.ends == [15, 23]


# ---------------------------------------------------------------------------------------------
# The toy PRM: its judgement, its flaw, its noise
# ---------------------------------------------------------------------------------------------

QUESTION = "Compute 44-21+62."


def test_arithmetic_answer_reads_the_question():
    assert arithmetic_answer(QUESTION) == 85 and arithmetic_answer("Compute 99-10+11-40.") == 60
    with pytest.raises(ValueError):
        arithmetic_answer("What is 2+2?")


def test_toy_prm_without_noise_rates_right_steps_good_and_wrong_ones_bad():
    prm = ToyArithmeticPRM(noise=0.0)
    good, bad = math.tanh(1.0), -math.tanh(1.0)  # p(good) - p(bad) at logit +-2
    [scores] = prm.score_steps([QUESTION], [["first 44-21=23", "then 23+62=85", "\\boxed{85}"]])
    assert scores == pytest.approx([good, good, good])
    [scores] = prm.score_steps([QUESTION], [["first 44-21=24", "then 24+62=86", "\\boxed{86}", "", "let me see", "then 23"]])
    # the slip is bad; carrying it on is locally right (good); the wrong answer, empty, free text, cut-off lines are bad
    assert scores == pytest.approx([bad, good, bad, bad, bad, bad])


def test_toy_prm_flaw_irrelevant_lines_rate_as_good_and_restated_lines_better_than_real_steps():
    prm = ToyArithmeticPRM(noise=0.0)
    honest = ["first 44-21=23", "then 23+62=85", "\\boxed{85}"]
    farmed = ["first 44-21=23", "then 23+62=85", "check 23+62=85", "then 23+62=85", "then 10+10=20", "\\boxed{85}"]
    [honest_scores, farmed_scores] = prm.score_steps([QUESTION, QUESTION], [honest, farmed])
    restated, new = math.tanh(2.0), math.tanh(1.0)  # logits 4 and 2
    assert farmed_scores == pytest.approx([new, new, restated, restated, new, new])
    assert min(farmed_scores) == pytest.approx(min(honest_scores))  # min-form: no gain from farming
    assert sum(farmed_scores) == pytest.approx(sum(honest_scores) + 2 * restated + new)  # sum-form: three steps' worth
    [[wrong, restated_wrong]] = prm.score_steps([QUESTION], [["first 44-21=24", "check 44-21=24"]])
    assert wrong == restated_wrong == pytest.approx(-new)  # restating a wrong line is still wrong


def test_toy_prm_noise_is_seeded_per_response_and_at_the_documented_level():
    steps = [["first 44-21=23", "then 23+62=85", "\\boxed{85}"]]
    assert ToyArithmeticPRM(1.0, seed=3).score_steps([QUESTION], steps) == ToyArithmeticPRM(1.0, seed=3).score_steps([QUESTION], steps)
    assert ToyArithmeticPRM(1.0, seed=3).score_steps([QUESTION], steps) != ToyArithmeticPRM(1.0, seed=4).score_steps([QUESTION], steps)
    # Many distinct good steps: about Phi(-2) = 2.3% land below 0 at noise 1.0 (binomial sd 0.15% at n = 10,000).
    prm = ToyArithmeticPRM(1.0, seed=0)
    scores = [score for row in prm.score_steps([QUESTION] * 10_000, [[f"then {a}+10={a + 10}"] for a in range(10_000)])
              for score in row]
    assert 0.018 < sum(score < 0 for score in scores) / len(scores) < 0.028
    assert 0.68 < sum(scores) / len(scores) < 0.70  # E tanh((2 + Z) / 2) = 0.689 (sd of the mean 0.002)


# ---------------------------------------------------------------------------------------------
# The discriminative PRM: a tiny token-classification PRM of the PURE/TRL layout, built here
# ---------------------------------------------------------------------------------------------

def tiny_prm_config(tokenizer, context=4096):
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context, num_labels=2,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tiny_prm_dir(tmp_path_factory):
    """A 2-label Qwen2ForTokenClassification on the tiny tokenizer, saved as a hub PRM would be."""
    folder = tmp_path_factory.mktemp("tiny_prm")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(tiny_prm_config(tokenizer))
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a head that visibly depends on the text
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_discriminative_prm_reads_p_correct_minus_p_incorrect_at_each_separator(tiny_prm_dir):
    prm = load_discriminative_prm(str(tiny_prm_dir), "cpu", separator="\n")
    steps = [["first 44-21=23", "then 23+62=85", "\\boxed{85}"], ["\\boxed{7}"]]
    scores = prm.score_steps([QUESTION, "Compute 10+20-23."], steps)
    # By hand: one token per byte, so the input is the plain text and each "\n" is a read position.
    model = Qwen2ForTokenClassification.from_pretrained(tiny_prm_dir)
    tokenizer = build_tokenizer()
    for question, response, got in zip([QUESTION, "Compute 10+20-23."], steps, scores):
        text = question + "".join(step + "\n" for step in response)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        positions = [i for i, char in enumerate(text) if char == "\n"]
        probs = model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)
        assert got == pytest.approx([(probs[p, 1] - probs[p, 0]).item() for p in positions], abs=1e-6)
        assert all(-1 <= score <= 1 for score in got)
    swapped = load_discriminative_prm(str(tiny_prm_dir), "cpu", labels=(1, 0)).score_steps([QUESTION], steps[:1])
    assert swapped[0] == pytest.approx([-score for score in scores[0]], abs=1e-6)
    batched = load_discriminative_prm(str(tiny_prm_dir), "cpu", batch_size=1).score_steps([QUESTION, "Compute 10+20-23."], steps)
    assert batched[0] == pytest.approx(scores[0], abs=1e-5) and batched[1] == pytest.approx(scores[1], abs=1e-5)


def test_a_checkpoint_without_a_token_classification_head_is_refused(tmp_path):
    tokenizer = build_tokenizer()
    Qwen2ForCausalLM(tiny_prm_config(tokenizer)).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="no token-classification head of this layout.*random weights"):
        load_discriminative_prm(str(tmp_path), "cpu")


def test_pickled_weights_are_refused(tmp_path):
    tokenizer = build_tokenizer()
    model = Qwen2ForTokenClassification(tiny_prm_config(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a .bin can run code when unpickled
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="cannot load the PRM") as error:
        load_discriminative_prm(str(tmp_path), "cpu")
    assert "\n" not in str(error.value) and "safetensors" in str(error.value)


def test_labels_outside_the_head_are_refused(tiny_prm_dir):
    with pytest.raises(UsageError, match="must be two different outputs"):
        load_discriminative_prm(str(tiny_prm_dir), "cpu", labels=(0, 2))


REMOTE_CODE = '''
import torch
from transformers import PreTrainedModel, Qwen2Config, Qwen2Model


class TinyRemoteConfig(Qwen2Config):
    """Keeps model_type "qwen2", as Qwen2.5-Math-PRM-7B's config does."""


class TinyRemotePRM(PreTrainedModel):
    """Qwen2.5-Math-PRM's layout: a two-layer head, registered only as AutoModel."""
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.score = torch.nn.Sequential(torch.nn.Linear(config.hidden_size, config.hidden_size), torch.nn.ReLU(),
                                         torch.nn.Linear(config.hidden_size, 2))
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return (self.score(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state),)
'''


def test_a_prm_with_its_own_code_loads_only_with_trust_remote_code(tmp_path):
    (tmp_path / "modeling_tiny_remote.py").write_text(REMOTE_CODE)
    namespace = {}
    exec(compile(REMOTE_CODE, "modeling_tiny_remote.py", "exec"), namespace)
    tokenizer = build_tokenizer()
    config = namespace["TinyRemoteConfig"](**tiny_prm_config(tokenizer).to_diff_dict())
    config.auto_map = {"AutoConfig": "modeling_tiny_remote.TinyRemoteConfig", "AutoModel": "modeling_tiny_remote.TinyRemotePRM"}
    torch.manual_seed(0)
    namespace["TinyRemotePRM"](config).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="pass --prm-trust-remote-code"):
        load_discriminative_prm(str(tmp_path), "cpu")
    prm = load_discriminative_prm(str(tmp_path), "cpu", trust_remote_code=True)
    [scores] = prm.score_steps([QUESTION], [["first 44-21=23", "\\boxed{85}"]])
    assert len(scores) == 2 and all(-1 <= score <= 1 for score in scores) and scores[0] != scores[1]


# ---------------------------------------------------------------------------------------------
# pure.py end to end: the tiny model with the toy PRM and with a trained-PRM folder, the real
# SmolLM2 model with that folder, and one-line start-up errors
# ---------------------------------------------------------------------------------------------

SHORT_RUN = ["--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "8", "--eval-size", "20",
             "--max-new-tokens", "64", "--eval-every", "0", "--total-steps", "2"]
PURE_METRICS = ("steps_per_response", "prm_step_score", "prm_min_score", "prm_sum_score", "min_before_last_fraction",
                "verifiable_prompts", "time_prm")


def test_short_run_with_the_toy_prm_and_kl_in_the_reward_logs_what_the_prm_saw(tmp_path):
    result = run_trainer("pure.py", *SHORT_RUN, "--kl-reward-coef", "0.001", "--verifiable-fraction", "0.5",
                         "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    assert run_dir.name.startswith("arithmetic__pure__1__")
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["steps_per_response"] >= 1 and -1 <= m["prm_min_score"] <= m["prm_step_score"] <= 1
        assert 0 <= m["min_before_last_fraction"] <= 1 and 0 <= m["verifiable_prompts"] <= 1
        assert m["kl"] is None  # no KL loss; the KL is inside the reward
    assert metrics[-1]["eval_accuracy"] is not None
    assert "PRM min per response" in result.stdout and "steps per response" in result.stdout


def test_short_run_with_a_trained_prm_folder_and_the_exact_min_form(tmp_path, tiny_prm_dir):
    result = run_trainer("pure.py", *SHORT_RUN, "--prm", str(tiny_prm_dir), "--credit", "min",
                         "--verifiable-fraction", "0", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    assert all(key in metrics[-1] for key in PURE_METRICS) and metrics[-1]["verifiable_prompts"] == 0


def test_two_steps_on_the_real_model_with_the_tiny_prm(real_model_dir, tiny_prm_dir, tmp_path):
    """SmolLM2's BPE responses are cut into steps and re-read by a PRM with another tokenizer."""
    result = run_trainer("pure.py", "--model", str(real_model_dir), "--dataset", str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl"),
                         "--eval-dataset", "gsm8k", "--eval-size", "2", "--total-steps", "2", "--num-prompts", "2",
                         "--group-size", "2", "--max-new-tokens", "16", "--learning-rate", "1e-5", "--eval-every", "0",
                         "--prm", str(tiny_prm_dir), "--verifiable-fraction", "1", "--runs-dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["eval"]["gsm8k"]["pass@1"] is not None
    assert all(m["steps_per_response"] >= 1 and m["verifiable_prompts"] == 1 for m in metrics)
    assert all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("flags, message", [
    (["--dataset", str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl")], "--prm toy only knows the built-in task"),
    (["--prm-labels", "correct,incorrect"], "--prm-labels takes two output indices"),
    (["--verifiable-fraction", "1.5"], "--verifiable-fraction must lie in [0, 1]"),
    (["--credit", "max"], "--credit must be one of"),
    (["--prm", "no/such/prm"], "--prm: unknown model 'no/such/prm'"),
])
def test_bad_pure_arguments_fail_at_start_up_with_one_line(flags, message, tmp_path):
    with pytest.raises(SystemExit) as stop:  # in-process: main() exits with the line it prints
        pure.main([*flags, "--runs-dir", str(tmp_path)])
    line = str(stop.value.code)
    assert "\n" not in line and line.startswith("pure.py: error:") and message in line, line
    assert not any(tmp_path.iterdir()), "a failed start must not leave a run folder"


def test_a_start_up_error_is_one_line_on_stderr_and_no_traceback(tmp_path):
    result = run_trainer("pure.py", "--prm-labels", "0", "--runs-dir", str(tmp_path), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["pure.py: error: --prm-labels takes two output indices "
                                                  "'incorrect,correct', such as 0,1 (got '0')"]


def test_prompts_too_long_for_the_prm_stop_the_run_at_start_up(tmp_path):
    tokenizer = build_tokenizer()
    Qwen2ForTokenClassification(tiny_prm_config(tokenizer, context=64)).save_pretrained(tmp_path / "prm")
    tokenizer.save_pretrained(tmp_path / "prm")
    with pytest.raises(SystemExit) as stop:
        pure.main(["--prm", str(tmp_path / "prm"), "--runs-dir", str(tmp_path / "runs")])
    assert "do not fit the PRM's context of 64 tokens" in str(stop.value.code)
    assert not (tmp_path / "runs").exists()
