"""engine/data.py: tokenizers, the default corpus, dataset files and the seeded batcher."""
import json

import numpy as np
import pytest

from engine.data import (DEFAULT_CORPUS_BYTES, Batcher, ByteTokenizer, CharTokenizer, DataError, IdTokenizer,
                         default_corpus, load_dataset, tokenizer_from_json)

TEXT = "Hello, wörld! ∑ 日本語 \n\ttabs and emoji 🙂 " * 3


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16 and ids.max() < 256 and len(ids) == len(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tokenizer_from_json(json.loads(json.dumps(tok.to_json()))).decode(ids) == TEXT


def test_char_tokenizer_round_trip_and_json():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.vocab_size == len(set(TEXT)) and list(tok.chars) == sorted(set(TEXT))
    ids = tok.encode(TEXT)
    assert ids.max() == tok.vocab_size - 1 and tok.decode(ids) == TEXT
    again = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))
    assert again.chars == tok.chars and np.array_equal(again.encode(TEXT), ids)
    with pytest.raises(DataError, match="not in the tokenizer"):
        tok.encode("Z")


def test_id_tokenizer():
    tok = IdTokenizer(10)
    assert tok.decode(tok.encode("1 2 9")) == "1 2 9"
    with pytest.raises(DataError):
        tok.encode("10")


def test_default_corpus_deterministic_and_non_trivial():
    a, b = default_corpus(), default_corpus()
    assert a == b
    size = len(a.encode())
    assert 1_000_000 < size <= DEFAULT_CORPUS_BYTES
    files = [line[len("# file: "):] for line in a.splitlines() if line.startswith("# file: ")]
    assert len(files) > 100 and files == sorted(files)
    assert not any(f.startswith(("test/", "site-packages/")) or "/tests/" in f for f in files)
    assert "def " in a and "class " in a and "import " in a


def test_text_file_splits(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 100, encoding="utf-8")
    d = load_dataset(str(path), "byte", val_fraction=0.1, block_size=8)
    assert (len(d.train), len(d.val)) == (900, 100) and d.vocab_size == 256
    assert d.train.dtype == np.uint16 and bytes(d.train[:10].astype(np.uint8)) == b"abcdefghij"
    d = load_dataset(str(path), "char", val_fraction=0.1, block_size=8)
    assert d.vocab_size == 10 and d.tokenizer.decode(d.val[:3]) == "abc"


def test_bin_file_with_meta_and_flag(tmp_path):
    tokens = (np.arange(1000) % 50).astype("<u2")
    path = tmp_path / "data.bin"
    tokens.tofile(path)
    with pytest.raises(DataError, match="vocab-size"):
        load_dataset(str(path), block_size=8)
    d = load_dataset(str(path), block_size=8, vocab_size=64)
    assert d.vocab_size == 64 and np.array_equal(np.concatenate([d.train, d.val]), tokens)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50}))
    d = load_dataset(str(path), block_size=8)
    assert d.vocab_size == 50 and isinstance(d.tokenizer, IdTokenizer)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 40}))
    with pytest.raises(DataError, match="token id 49 >= vocab size 40"):
        load_dataset(str(path), block_size=8)


def test_bin_train_val_pair_with_chars(tmp_path):
    chars = "".join(chr(ord("a") + i) for i in range(20))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 20, "chars": chars}))
    (np.arange(300) % 20).astype("<u2").tofile(tmp_path / "train.bin")
    (np.arange(40) % 20).astype("<u2").tofile(tmp_path / "val.bin")
    d = load_dataset(str(tmp_path / "train.bin"), block_size=8)
    assert (len(d.train), len(d.val)) == (300, 40)
    assert d.tokenizer.decode(d.val[:3]) == "abc"


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"text\x00more text" * 50, "binary"),
    (b"\xff\xfe bad utf-8" * 50, "not UTF-8"),
    (b"short", "too short"),
])
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(str(path), block_size=16)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_odd_bin(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.txt"))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="odd size"):
        load_dataset(str(tmp_path / "odd.bin"), vocab_size=10)


def test_too_short_names_sizes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x" * 100)
    with pytest.raises(DataError, match=r"90 train \+ 10 val tokens.*block_size\+1 = 17"):
        load_dataset(str(path), block_size=16)


def test_batcher_windows_reproducible_and_state_round_trip():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Batcher(tokens, 4, 16, seed=7), Batcher(tokens, 4, 16, seed=7)
    x, y = a.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:]) and np.array_equal(y[:, -1], x[:, -1] + 1)
    assert np.array_equal(b.next()[0], x)
    for _ in range(3):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))        # the checkpoint manifest is JSON
    assert state["position"] == 4
    expected = [a.next() for _ in range(3)]
    c = Batcher(tokens, 4, 16, seed=123)
    c.load_state_dict(state)
    for ex, got in zip(expected, (c.next() for _ in range(3))):
        assert np.array_equal(ex[0], got[0]) and np.array_equal(ex[1], got[1])
    assert c.position == 7
    # every window start is drawn, including the last one (len - T - 1)
    small = Batcher(np.arange(18, dtype=np.uint16), 64, 16, seed=0)
    assert set(small.next()[0][:, 0]) == {0, 1}
