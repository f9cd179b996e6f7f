"""Phrases in sampled responses: find them in the text, mark the tokens that wrote them, mine new ones.

A method that looks for phrases ("wait", "let's try") in the *text* of a response and acts on the
*tokens* that wrote them needs each sampled token's character span. Re-tokenizing the decoded
text (`return_offsets_mapping`) is not enough: a model may sample a non-canonical split ("w" "ait"
where the tokenizer would write "wait"), and the trainer trains on the sampled ids. So the spans
here come from decoding the sampled ids themselves.

Matching is word by word on lowercased text, so "Wait," and " wait" both hold the phrase "wait"
however the tokenizer cut them, and "so" is not found inside "also".
"""

import os
import re
from bisect import bisect_left, bisect_right
from collections import Counter
from pathlib import Path

import torch

from common import UsageError

DECODE_WINDOW = 4  # tokens of left context per token: enough for any UTF-8 character (at most 4 bytes)


def load_phrases(path, flag: str) -> list[str]:
    """The phrases of a file, one per line: lowercased, runs of spaces collapsed, blank lines skipped.

    A file that cannot be read or holds no phrase is a one-line UsageError naming `flag`.
    """
    try:
        phrases = {" ".join(line.lower().split()) for line in Path(path).read_text(encoding="utf-8").splitlines()} - {""}
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path}: cannot read it ({error})") from None
    if not phrases:
        raise UsageError(f"{flag} {path}: no phrase in it (write one phrase per line)")
    return sorted(phrases)


# A word: a run of letters and digits, or one other character that is not a space ("let's" is
# "let" "'" "s", so the paper's "now let" is found in "now let's").
WORD = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list[tuple[str, int, int]]:
    """The words of a text as (lowercased word with ' for ’, start, end) character spans."""
    return [(match.group().lower().replace("’", "'"), match.start(), match.end()) for match in WORD.finditer(text)]


def index_phrases(phrases: list[str]) -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """The phrases by their first word, longest first: {word: [(the phrase's words, the phrase)]}.

    Matching goes word by word, so it is case-insensitive, whole words only ("so" is not found
    in "also"), blind to the whitespace between words, and reads ’ as '.
    """
    index = {}
    for phrase in sorted(phrases, key=lambda phrase: (-len(words_of(phrase)), phrase)):
        words = tuple(word for word, _, _ in words_of(phrase))
        index.setdefault(words[0], []).append((words, phrase))
    return index


def find_phrases(texts: list[str], index: dict) -> tuple[list[list[tuple[int, int]]], Counter]:
    """The (start, end) of every phrase occurrence in each text, and the count of each phrase over all texts.

    At each word the longest phrase starting there is found, overlaps included (every character a
    phrase covers is found). The counts skip overlaps: the leftmost, longest phrase is counted and
    the next count starts after it, so "but wait" is one use of "but wait" and not also one of "wait".
    """
    spans, counts = [], Counter()
    for text in texts:
        words, found, counted_to = words_of(text), [], 0
        lowered = tuple(word for word, _, _ in words)
        for position, (word, start, _) in enumerate(words):
            for phrase_words, phrase in index.get(word, ()):
                if lowered[position:position + len(phrase_words)] == phrase_words:
                    found.append((start, words[position + len(phrase_words) - 1][2]))
                    if start >= counted_to:
                        counts[phrase] += 1
                        counted_to = found[-1][1]
                    break
        spans.append(found)
    return spans, counts


def response_token_spans(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                         window: int = DECODE_WINDOW) -> tuple[list[str], list[list[int]]]:
    """The text of each response and the character offset where each of its tokens ends.

    Token t of a response spans characters [ends[t-1], ends[t]) of its text (from 0 for t = 0);
    only the tokens under `completion_mask` [B, C] are listed. Special tokens (EOS) decode to
    nothing and so span nothing. Token t's text is what decoding ids[t-window:t+1] adds to
    decoding ids[t-window:t]: the left context makes leading spaces and multi-token characters
    come out as they do in the whole text, at a cost linear in the length. A token that only
    starts a multi-byte character spans nothing; the token that completes it gets the character.
    The text is the pieces joined, equal to decoding the ids without clean-up of spaces.
    """
    rows = [ids[:length] for ids, length in zip(completion_ids.tolist(), completion_mask.sum(dim=1).tolist())]
    windows = [row[t - window if t > window else 0:t + stop] for row in rows for t in range(len(row)) for stop in (0, 1)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the same decoding, without transformers' per-call overhead
    decoded = iter(backend.decode_batch(windows, skip_special_tokens=True) if backend is not None else
                   tokenizer.batch_decode(windows, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    texts, token_ends = [], []
    for row in rows:
        pieces, ends = [], []
        for _ in row:
            before, after = next(decoded), next(decoded)
            # Not a prefix when `before` ends in U+FFFD, a character this token finishes; a U+FFFD at the
            # end of `after` is a character this token starts but does not finish (the next one adds it).
            common = len(before) if after.startswith(before) else len(os.path.commonprefix([before, after]))
            pieces.append(after[common:].rstrip("\ufffd"))
            ends.append((ends[-1] if ends else 0) + len(pieces[-1]))
        texts.append("".join(pieces))
        token_ends.append(ends)
    return texts, token_ends


def tokens_covering(token_ends: list[list[int]], char_spans: list[list[tuple[int, int]]], width: int) -> torch.Tensor:
    """[B, width] float: 1 on every token whose characters overlap one of its row's (start, end) spans.

    A token only partly inside a span counts (" wait" for the span of "wait"). A token that spans no
    characters (the first bytes of a character the next token completes, or EOS) counts only
    strictly inside a span, so never at a response's end.
    """
    covered = torch.zeros(len(token_ends), width)
    for row, (ends, spans) in enumerate(zip(token_ends, char_spans)):
        for start, end in spans:
            # Token t overlaps [start, end) iff ends[t] > start and its own start, ends[t-1], < end.
            first, last = bisect_right(ends, start), min(bisect_left(ends, end), len(ends) - 1)
            covered[row, first:last + 1] = 1.0
    return covered


def phrase_token_mask(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                      index: dict) -> tuple[torch.Tensor, Counter]:
    """[B, C] float, 1 on the sampled tokens that write a phrase of `index` (see index_phrases), on
    the device of `completion_ids`; and the count of each phrase over the batch (see find_phrases)."""
    texts, token_ends = response_token_spans(tokenizer, completion_ids, completion_mask)
    spans, counts = find_phrases(texts, index)
    return tokens_covering(token_ends, spans, completion_ids.shape[1]).to(completion_ids.device), counts


class NgramDocumentFrequency(Counter):
    """For each word n-gram, how many of the texts added so far contain it (a text counts once).

    Words are the text's whitespace-separated pieces, lowercased, punctuation kept ("wait," "but").
    `state_dict`/`load_state_dict` let a trainer keep the counts in its checkpoints.
    """

    def add(self, texts: list[str], sizes=(3, 4, 5)):
        for words in (text.lower().split() for text in texts):
            self.update({" ".join(words[i:i + n]) for n in sizes for i in range(len(words) - n + 1)})

    def top(self, k: int) -> list[str]:
        """The k n-grams in the most texts, ties in alphabetical order."""
        return sorted(self, key=lambda ngram: (-self[ngram], ngram))[:k]

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict):
        self.clear()
        self.update(state)
