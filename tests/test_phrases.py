"""common/phrases.py: phrases found in response text and mapped back to the sampled tokens, on the
byte-level tiny tokenizer and on a real 49k BPE tokenizer (SmolLM2's); phrase files; the n-gram miner.
"""

import random
import re

import pytest
import torch

from common import UsageError
from common.arithmetic import PLANNING_WORDS, demonstration, train_problem
from common.data import DEFAULT_DATA_DIR
from common.model import load_tokenizer
from common.phrases import (NgramDocumentFrequency, find_phrases, index_phrases, load_phrases, phrase_token_mask,
                            response_token_spans, tokens_covering)

DATA = DEFAULT_DATA_DIR  # the phrase lists shipped with the project
UNICODE_TEXT = "Wait, the naïve sum is 3 € … 😀 so: let’s check it. 答案"


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request):
    if request.param == "tiny":
        return request.getfixturevalue("tiny_tokenizer")
    return load_tokenizer(str(request.getfixturevalue("real_model_dir")))


def completions(tokenizer, id_rows, width=None):
    """Right-padded completion ids [B, C] and their mask, as a rollout holds them: each row ends
    with EOS (in the mask) and is padded after it (outside the mask)."""
    rows = [ids + [tokenizer.eos_token_id] for ids in id_rows]
    width = width or max(map(len, rows)) + 3
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, values in enumerate(rows):
        ids[row, :len(values)] = torch.tensor(values)
        mask[row, :len(values)] = 1
    return ids, mask


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def marked_text(tokenizer, ids, mask, phrases):
    """The decoded text of each run of marked tokens, per row."""
    marked, _ = phrase_token_mask(tokenizer, ids, mask, phrases)
    runs = []
    for row in range(ids.shape[0]):
        flags = marked[row].tolist()
        starts = [t for t, flag in enumerate(flags) if flag and (t == 0 or not flags[t - 1])]
        ends = [t + 1 for t, flag in enumerate(flags) if flag and (t + 1 == len(flags) or not flags[t + 1])]
        runs.append([tokenizer.decode(ids[row, start:end]) for start, end in zip(starts, ends)])
    return runs


def test_token_spans_rebuild_the_text_exactly(tokenizer):
    texts = [UNICODE_TEXT, "first 44-21=23\n\nthen 23+62=85\n\n\\boxed{85}", "  leading spaces and\ttabs\n"]
    ids, mask = completions(tokenizer, [encode(tokenizer, text) for text in texts])
    rebuilt, token_ends = response_token_spans(tokenizer, ids, mask)
    assert rebuilt == texts
    for row, ends in enumerate(token_ends):
        assert len(ends) == mask[row].sum() and ends[-1] == len(texts[row])
        assert ends[-1] == ends[-2], "the EOS token spans no text"
        assert all(a <= b for a, b in zip(ends, ends[1:]))


def test_each_token_gets_its_own_text(tokenizer):
    text = "Let me verify: 12+7=19, then wait."
    ids, mask = completions(tokenizer, [encode(tokenizer, text)])
    _, [ends] = response_token_spans(tokenizer, ids, mask)
    starts = [0] + ends[:-1]
    pieces = [text[start:end] for start, end in zip(starts, ends)][:-1]  # the EOS has no text
    assert pieces == [tokenizer.decode([token]) for token in ids[0, :len(pieces)].tolist()]


def test_a_non_canonical_split_is_mapped_by_the_sampled_ids(tokenizer):
    # A model may sample "wa" "it" where the tokenizer would write one token: the mask must follow the ids.
    sampled = encode(tokenizer, "ok ") + encode(tokenizer, "wa") + encode(tokenizer, "it") + encode(tokenizer, ", 5")
    ids, mask = completions(tokenizer, [sampled])
    marked, counts = phrase_token_mask(tokenizer, ids, mask, index_phrases(["wait"]))
    first = len(encode(tokenizer, "ok "))
    last = first + len(encode(tokenizer, "wa")) + len(encode(tokenizer, "it"))
    assert marked[0].nonzero().flatten().tolist() == list(range(first, last))
    assert counts == {"wait": 1}


@pytest.mark.parametrize("text, spans, counts", [
    ("Wait, that is wrong.", [(0, 4)], {"wait": 1}),
    ("WAIT!", [(0, 4)], {"wait": 1}),
    ("I awaited the waiter", [], {}),  # whole words only
    ("also, so be it", [(6, 8)], {"so": 1}),  # "so" is not inside "also"
    # Any whitespace between words, either apostrophe; overlapping phrases are all found, but a
    # use of "but wait" is not also counted as a use of "wait".
    ("But   wait,\nlet’s go", [(0, 10), (6, 10), (12, 17)], {"but wait": 1, "let's": 1}),
    ("hmm, hmm", [(0, 4)], {"hmm,": 1}),  # punctuation is a word of its own
    ("## Step 2: Is there a simpler way?", [(0, 7), (11, 34)], {"## step": 1, "is there a simpler way?": 1}),
])
def test_matching_is_case_insensitive_on_whole_words(text, spans, counts):
    phrases = index_phrases(["wait", "but wait", "so", "let's", "hmm,", "## step", "is there a simpler way?"])
    assert find_phrases([text], phrases) == ([spans], counts)


def test_tokens_partly_covered_count_and_eos_and_padding_never_do(tokenizer):
    texts = ["Wait, the sum is 5. wait", " wait, and wait", "nothing here"]
    ids, mask = completions(tokenizer, [encode(tokenizer, text) for text in texts])
    marked, counts = phrase_token_mask(tokenizer, ids, mask, index_phrases(["wait"]))
    assert marked.shape == ids.shape and marked.dtype == torch.float
    assert (marked <= mask).all(), "only response tokens can be planning tokens"
    lengths = mask.sum(dim=1)
    assert (marked[torch.arange(3), lengths - 1] == 0).all(), "the EOS token is never a planning token"
    assert counts == {"wait": 4}
    runs = marked_text(tokenizer, ids, mask, index_phrases(["wait"]))
    # Every run of marked tokens writes "wait", with at most the space or comma a token carries along.
    assert [[run.strip(" ,") for run in row] for row in runs] == [["Wait", "wait"], ["wait", "wait"], []]
    assert all(re.fullmatch(r" ?wait,?", run, re.IGNORECASE) for row in runs for run in row)


def test_on_the_builtin_task_exactly_the_planning_words_are_tagged(tokenizer):
    rng = random.Random(0)
    texts = [demonstration(train_problem(1, index), rng) for index in range(200)]
    assert {"wait", "check"} <= {word for text in texts for word in text.split()}, "some demonstrations must self-correct"
    ids, mask = completions(tokenizer, [encode(tokenizer, text) for text in texts])
    grams = index_phrases(load_phrases(DATA / "arithmetic_strategic_grams.txt", "--strategic-grams"))
    runs = marked_text(tokenizer, ids, mask, grams)
    one_token_per_byte = len(tokenizer) < 300
    for text, row in zip(texts, runs):
        expected = [word for word in re.findall(r"[a-z]+", text) if word in PLANNING_WORDS]
        # A BPE token may carry the blank line before the word along; a byte token carries nothing else.
        assert (row if one_token_per_byte else [run.strip() for run in row]) == expected


def test_the_papers_list_tags_only_wait_on_the_builtin_task(tiny_tokenizer):
    # Why the built-in task has a list of its own: of its four planning words the paper's list knows one.
    grams = index_phrases(load_phrases(DATA / "hicra_strategic_grams.txt", "--strategic-grams"))
    _, counts = find_phrases(["first 44-21=22\n\nwait 44-21=23\n\nthen 23+62=85\n\ncheck 23+62=85\n\n\\boxed{85}"], grams)
    assert counts == {"wait": 1}


def test_the_shipped_lists_are_the_papers_249_grams_and_the_builtin_tasks_planning_words():
    # The paper's Listing 1 as printed (its bytes are pinned by tests/test_data.py against data/README.md).
    paper = load_phrases(DATA / "hicra_strategic_grams.txt", "--strategic-grams")
    assert len(paper) == 249 and "let me verify" in paper and "wait" in paper and "consider the case where" in paper
    assert load_phrases(DATA / "arithmetic_strategic_grams.txt", "--strategic-grams") == sorted(PLANNING_WORDS)


@pytest.mark.parametrize("content, message", [(None, "cannot read it"), ("\n  \n", "no phrase in it"),
                                              (b"\xff\xfe wait", "cannot read it")])
def test_unusable_phrase_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "grams.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message) as error:
        load_phrases(path, "--strategic-grams")
    assert str(error.value).startswith(f"--strategic-grams {path}") and "\n" not in str(error.value)


def test_tokens_covering_takes_partial_overlaps_and_empty_tokens_only_inside():
    # Tokens: "ab" [0,2), "" [2,2), "cd" [2,4), "e" [4,5), "" [5,5) (EOS); width 6 (one padding).
    ends = [[2, 2, 4, 5, 5]]
    assert tokens_covering(ends, [[(1, 3)]], 6).tolist() == [[1, 1, 1, 0, 0, 0]]
    assert tokens_covering(ends, [[(2, 4)]], 6).tolist() == [[0, 0, 1, 0, 0, 0]]
    assert tokens_covering(ends, [[(4, 5), (0, 1)]], 6).tolist() == [[1, 0, 0, 1, 0, 0]]
    assert tokens_covering(ends, [[]], 6).sum() == 0


def test_the_miner_counts_each_response_once_and_ranks_by_document_frequency(tmp_path):
    mined = NgramDocumentFrequency()
    mined.add(["Let me check this. Let me check this again.", "so let me check this now", "we can see that"])
    assert mined["let me check"] == 2, "two responses contain it, one of them twice"
    assert mined["let me check this."] == 1 and mined["let me check this now"] == 1  # punctuation stays
    assert all(3 <= len(ngram.split()) <= 5 for ngram in mined)
    assert "let me" not in mined and mined["we can see that"] == 1
    top = mined.top(4)  # the three in two responses, in alphabetical order, then the first of the rest
    assert top == ["let me check", "let me check this", "me check this", "can see that"]
    path = tmp_path / "mined.txt"
    path.write_text("".join(ngram + "\n" for ngram in mined.top(249)))
    assert load_phrases(path, "--strategic-grams") == sorted(mined), "the miner writes what the trainer reads"
    # Its counts survive a checkpoint (saved with torch.save, loaded with weights_only=True).
    torch.save({"mined": mined.state_dict()}, tmp_path / "state.pt")
    restored = NgramDocumentFrequency()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["mined"])
    assert restored == mined and restored.top(4) == top


class SlowTokenizer:
    """A tokenizer without the Rust backend: only transformers' batch_decode."""

    def __init__(self, tokenizer):
        self.batch_decode = tokenizer.batch_decode


def test_transformers_decoding_gives_the_same_spans(tokenizer):
    ids, mask = completions(tokenizer, [encode(tokenizer, UNICODE_TEXT), encode(tokenizer, "wait, then")])
    assert response_token_spans(SlowTokenizer(tokenizer), ids, mask) == response_token_spans(tokenizer, ids, mask)
