"""A CLIP tokenizer over a small byte-level BPE vocabulary learned from the tiny domain's captions.

The base alphabet is CLIP's: the 256 byte symbols and their end-of-word variants, so any text
(words never seen, such as "<castle>" or "forest") still tokenizes, into smaller pieces.
"""

from __future__ import annotations

import collections

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE: merge the most frequent adjacent pair until every word is one symbol.

    Ties are broken by the pair itself, so the result is deterministic.
    """
    byte_map = bytes_to_unicode()
    corpus = collections.Counter()
    for word in words:
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        corpus[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for symbols, count in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged


def build_tokenizer(words: list[str], model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIPTokenizer whose merges make each of `words` a single token."""
    alphabet = list(bytes_to_unicode().values())
    merges = learn_merges(sorted(set(words)))
    vocab: dict[str, int] = {}
    for token in alphabet + [a + END_OF_WORD for a in alphabet] + [a + b for a, b in merges] + list(SPECIAL_TOKENS):
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
