"""Training and evaluation data, generated on the fly or read from local files (nothing is downloaded).

One tokenizer serves everything: UTF-8 bytes, vocabulary 256. A batch is a pair
``(input_ids, labels)`` of int64 tensors ``(batch, seq_len)``; ``labels`` holds the token at
every position the loss is taken on and ``-100`` elsewhere (the ``transformers`` convention:
the model shifts them, so ``labels[t]`` is predicted from the tokens before ``t``).

Tasks:

* ``passkey``: a key of 5 distinct digits after a cue byte (``" #71593. "``) hidden at a given
  depth in repetitive filler text, asked for at the end by the cue again (``" #"``); the loss is on
  the key's digits (the last tokens of the sequence). The cue and the digits occur nowhere else,
  so one induction head (find the current token earlier, copy what followed it) retrieves the
  key at any distance: a byte-level look-up needs no multi-byte prefix matching.
* ``mqar``: multi-query associative recall: ``key:value`` pairs fill the context, then a
  query section repeats some keys; the loss is on the values of the queries.
* ``copy``: random lowercase words in which, half of the time, the next span repeats an earlier
  span from anywhere before it; the loss is on the repeated tokens. Predicting them needs
  content-based look-up at every distance (induction), the mechanism passkey retrieval uses,
  with hundreds of supervised tokens per sequence instead of five.
* ``mix``: each sequence is one of the three, at random.
* ``text``: random windows of local text files; the loss is on every token.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

VOCAB_SIZE = 256
IGNORE = -100
TASKS = ("passkey", "mqar", "copy", "mix", "text")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CUE = "#"  # marks the key in the needle and asks for it at the end; not in FILLER
QUESTION = f" {CUE}"


def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids."""
    return list(text.encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _filler(length: int, rng: random.Random) -> str:
    start = rng.randrange(len(FILLER))
    reps = (start + length) // len(FILLER) + 1
    return (FILLER * reps)[start : start + length]


def passkey_sample(seq_len: int, depth: float, rng: random.Random, digits: int = 5) -> tuple[list[int], int]:
    """One passkey sequence of exactly ``seq_len`` tokens; returns ``(ids, answer_len)``.

    The needle ``" #<key>. "`` starts after a fraction ``depth`` (0 = start, 1 = just before the
    question) of the filler; the sequence ends with the question ``" #"`` and the answer (the key's
    ``digits`` distinct digits), its last ``answer_len`` tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: expected a fraction in [0, 1]")
    if not 1 <= digits <= len(string.digits):
        raise ValueError(f"digits={digits}: expected 1 to {len(string.digits)} (the key's digits are distinct)")
    key = "".join(rng.sample(string.digits, digits))
    needle = f" {CUE}{key}. "
    hay = seq_len - passkey_min_len(digits)
    if hay < 0:
        raise ValueError(f"seq_len={seq_len}: a passkey sequence needs at least {passkey_min_len(digits)} tokens")
    text = _filler(hay, rng)
    cut = round(depth * hay)
    ids = encode(text[:cut] + needle + text[cut:] + QUESTION + key)
    return ids, digits


def passkey_min_len(digits: int = 5) -> int:
    """Tokens of a passkey sequence without filler: the needle ``" #<key>. "``, the question, the answer."""
    return len(f" {CUE}. ") + digits + len(QUESTION) + digits


def mqar_min_len(num_queries: int = 1, key_len: int = 3, value_len: int = 2) -> int:
    """Tokens of the shortest mqar sequence: as many pairs as queries, the separator, the queries."""
    return 2 + 2 * num_queries * (key_len + value_len + 2)


def min_seq_len(task: str) -> int:
    """The shortest sequence :func:`sample` builds for ``task`` (``text``: one token; the files must hold
    the sequence length)."""
    return {"passkey": passkey_min_len(), "mqar": mqar_min_len(), "mix": max(passkey_min_len(), mqar_min_len())}.get(
        task, 1)


def mqar_sample(seq_len: int, rng: random.Random, num_queries: int = 64, key_len: int = 3,
                value_len: int = 2) -> tuple[list[int], list[bool]]:
    """One multi-query associative-recall sequence of exactly ``seq_len`` tokens.

    Layout: ``" abc:17 xyz:42 ... | xyz:42 abc:17"`` (distinct keys of ``key_len`` lowercase
    letters, values of ``value_len`` digits). Returns ``(ids, supervised)`` where ``supervised``
    marks the value tokens of the queries.
    """
    item = key_len + value_len + 2  # "key:value "
    queries_len = 2 + num_queries * item
    pairs = (seq_len - queries_len) // item
    if pairs < num_queries:
        raise ValueError(f"seq_len={seq_len}: too short for num_queries={num_queries} mqar queries "
                         f"(needs {mqar_min_len(num_queries, key_len, value_len)} tokens)")
    keys: set[str] = set()
    while len(keys) < pairs:
        keys.add("".join(rng.choice(string.ascii_lowercase) for _ in range(key_len)))
    table = {k: "".join(rng.choice(string.digits) for _ in range(value_len)) for k in sorted(keys)}
    order = list(table)
    rng.shuffle(order)
    asked = rng.sample(order, num_queries)
    head = " " * (seq_len - queries_len - pairs * item)
    text = head + "".join(f"{k}:{table[k]} " for k in order) + "| "
    supervised = [False] * len(text)
    for k in asked:
        text += f"{k}:"
        supervised += [False] * (key_len + 1) + [True] * value_len + [False]
        text += f"{table[k]} "
    return encode(text), supervised


def copy_sample(seq_len: int, rng: random.Random, span: tuple[int, int] = (8, 48)) -> tuple[list[int], list[bool]]:
    """One copy-task sequence of exactly ``seq_len`` tokens; returns ``(ids, supervised)``.

    Spans of ``span`` tokens alternate at random between fresh random words and copies of an
    earlier span starting anywhere in the sequence so far; ``supervised`` marks the copies'
    tokens after their first (which is not predictable)."""
    ids: list[int] = []
    supervised: list[bool] = []
    while len(ids) < seq_len:
        n = rng.randint(*span)
        if len(ids) > n and rng.random() < 0.5:
            start = rng.randrange(len(ids) - n)
            ids += ids[start : start + n]
            supervised += [False] + [True] * (n - 1)
        else:
            words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
                             for _ in range(n))
            ids += encode(" " + words)[:n]
            supervised += [False] * n
    return ids[:seq_len], supervised[:seq_len]


class TextFiles:
    """Random windows of the concatenation of local text files (bytes, separated by a blank line)."""

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise ValueError("paths: expected at least one text file")
        chunks = []
        for p in paths:
            p = Path(p)
            if not p.is_file():
                raise FileNotFoundError(f"--data {str(p)!r}: not a file")
            chunks.append(p.read_bytes())
        self.tokens = torch.frombuffer(bytearray(b"\n\n".join(chunks)), dtype=torch.uint8).to(torch.int64)

    def window(self, seq_len: int, rng: random.Random) -> list[int]:
        if len(self.tokens) < seq_len:
            raise ValueError(f"seq_len={seq_len}: the text files hold only {len(self.tokens)} bytes")
        start = rng.randrange(len(self.tokens) - seq_len + 1)
        return self.tokens[start : start + seq_len].tolist()


def sample(task: str, seq_len: int, rng: random.Random, text: TextFiles | None = None) -> tuple[list[int], list[int]]:
    """One sequence ``(ids, labels)`` of ``task`` (see :data:`TASKS`)."""
    if task == "mix":
        task = rng.choice(("passkey", "mqar", "copy"))
    if task == "passkey":
        ids, n = passkey_sample(seq_len, rng.random(), rng)
        return ids, [IGNORE] * (seq_len - n) + ids[-n:]
    if task == "mqar":
        ids, sup = mqar_sample(seq_len, rng, num_queries=min(64, max(1, seq_len // 64)))
        return ids, [t if s else IGNORE for t, s in zip(ids, sup)]
    if task == "copy":
        ids, sup = copy_sample(seq_len, rng)
        return ids, [t if s else IGNORE for t, s in zip(ids, sup)]
    if task == "text":
        if text is None:
            raise ValueError("task='text' needs text files (--data PATH ...)")
        ids = text.window(seq_len, rng)
        return ids, list(ids)
    raise ValueError(f"task={task!r}: expected one of {TASKS}")


def batches(task: str, batch_size: int, seq_len: int, seed: int | str = 0,
            text: TextFiles | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless, seeded stream of ``(input_ids, labels)`` batches, each ``(batch_size, seq_len)`` int64."""
    rng = random.Random(seed)
    while True:
        rows = [sample(task, seq_len, rng, text) for _ in range(batch_size)]
        yield (torch.tensor([r[0] for r in rows], dtype=torch.int64),
               torch.tensor([r[1] for r in rows], dtype=torch.int64))


__all__ = ["CUE", "FILLER", "IGNORE", "TASKS", "TextFiles", "VOCAB_SIZE", "batches", "copy_sample", "decode", "encode",
           "min_seq_len", "mqar_min_len", "mqar_sample", "passkey_min_len", "passkey_sample", "sample"]
