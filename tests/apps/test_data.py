"""Synthetic retrieval data and the local text loader."""

import random
import re

import pytest
import torch

from s2attn.apps import data

pytestmark = pytest.mark.quick  # `make test-quick`


@pytest.mark.parametrize("seq_len", [16, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_sample(seq_len, depth):
    ids, n = data.passkey_sample(seq_len, depth, random.Random(seq_len))
    text = data.decode(ids)
    assert len(ids) == seq_len and n == 5
    key = re.search(r" #(\d{5})\. ", text).group(1)
    assert len(set(key)) == n  # distinct digits: the token before each one names it uniquely
    assert text.endswith(data.QUESTION + key)
    assert text.count(data.CUE) == 2 and sum(c.isdigit() for c in text) == 2 * n  # needle and answer only
    hay = seq_len - 16  # filler tokens around the needle
    assert text.index(" #") == round(depth * hay)


def test_passkey_needs_room():
    with pytest.raises(ValueError, match="seq_len=15"):
        data.passkey_sample(15, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        data.passkey_sample(200, 1.5, random.Random(0))
    with pytest.raises(ValueError, match="digits=11"):
        data.passkey_sample(200, 0.5, random.Random(0), digits=11)


@pytest.mark.parametrize("seq_len", [256, 999, 4096])
def test_mqar_sample(seq_len):
    ids, supervised = data.mqar_sample(seq_len, random.Random(1), num_queries=8)
    assert len(ids) == len(supervised) == seq_len
    text = data.decode(ids)
    context, queries = text.split("|")
    table = dict(re.findall(r"([a-z]{3}):(\d\d)", context))
    assert len(table) == len(re.findall(r"[a-z]{3}:", context))  # distinct keys
    asked = re.findall(r"([a-z]{3}):(\d\d)", queries)
    assert len(asked) == 8 and all(table[k] == v for k, v in asked)
    answers = "".join(c for c, s in zip(text, supervised) if s)
    assert answers == "".join(v for _, v in asked)


def test_mqar_needs_room():
    with pytest.raises(ValueError, match="seq_len=100"):
        data.mqar_sample(100, random.Random(0), num_queries=64)


@pytest.mark.parametrize("seq_len", [1, 300, 2049])
def test_copy_sample(seq_len):
    ids, supervised = data.copy_sample(seq_len, random.Random(seq_len))
    assert len(ids) == len(supervised) == seq_len
    # every supervised run, with the unsupervised token before it, repeats a span that started earlier
    runs = re.finditer(r"01+", "".join("1" if s else "0" for s in supervised))
    spans = [(m.start(), m.end()) for m in runs]
    assert seq_len < 300 or len(spans) > 3
    for a, b in spans:
        copied = ids[a:b]
        assert any(ids[j : j + len(copied)] == copied for j in range(a - len(copied) + 1)), (a, b)


def test_batches_and_labels():
    stream = data.batches("mix", 4, 300, seed=3)
    ids, labels = next(stream)
    assert ids.shape == labels.shape == (4, 300) and ids.dtype == labels.dtype == torch.int64
    assert int(ids.max()) < data.VOCAB_SIZE
    kept = labels != data.IGNORE
    assert torch.equal(labels[kept], ids[kept]) and bool(kept.any(1).all())
    again, _ = next(data.batches("mix", 4, 300, seed=3))
    assert torch.equal(ids, again)  # seeded


def test_text_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello world " * 20)
    b.write_text("héllo again " * 20)
    text = data.TextFiles([a, b])
    ids, labels = next(data.batches("text", 2, 64, text=text))
    assert ids.shape == (2, 64) and torch.equal(ids, labels)
    with pytest.raises(ValueError, match="seq_len=10000"):
        text.window(10000, random.Random(0))
    with pytest.raises(FileNotFoundError, match="missing"):
        data.TextFiles([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="--data"):
        next(data.batches("text", 1, 64))
    with pytest.raises(ValueError, match="task='bogus'"):
        next(data.batches("bogus", 1, 64))
