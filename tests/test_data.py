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


def nanogpt_char_dir(tmp_path, n_train=300, n_val=40):
    """What nanoGPT's data/shakespeare_char/prepare.py writes: train.bin, val.bin (uint16) and
    meta.pkl = {vocab_size, itos {int: char}, stoi {char: int}}."""
    import pickle
    chars = "".join(chr(ord("a") + i) for i in range(20))
    itos = dict(enumerate(chars))
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    (np.arange(n_train) % 20).astype(np.uint16).tofile(tmp_path / "train.bin")
    (np.arange(n_val) % 20).astype(np.uint16).tofile(tmp_path / "val.bin")
    return chars


def test_nanogpt_meta_pkl_gives_the_vocabulary(tmp_path):
    chars = nanogpt_char_dir(tmp_path)
    d = load_dataset(str(tmp_path / "train.bin"), block_size=8)
    assert d.vocab_size == 20 and isinstance(d.tokenizer, CharTokenizer) and d.tokenizer.chars == chars
    assert d.tokenizer.decode(d.val[:3]) == "abc"
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 25}))      # meta.json wins
    assert load_dataset(str(tmp_path / "train.bin"), block_size=8).vocab_size == 25


def test_meta_pkl_never_runs_code(tmp_path):
    import copyreg
    import pickle
    import pickletools
    nanogpt_char_dir(tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    copyreg.add_extension(open.__module__, "open", 0x7ff0)        # registered while loading, too
    try:
        payloads = [pickle.dumps({"vocab_size": 20, "x": Evil()}, protocol=p) for p in (0, 2, 4)]
        assert any(op.name.startswith("EXT") for op, _, _ in pickletools.genops(payloads[1]))   # via copyreg
        payloads.append(pickle.dumps({"vocab_size": 20, "s": {1, 2}}))         # a set needs no global
        payloads.append(pickle.dumps([1, 2]))
        payloads.append(b"\x80\x04garbage")
        for raw in payloads:
            (tmp_path / "meta.pkl").write_bytes(raw)
            with pytest.raises(DataError, match="meta.pkl") as e:
                load_dataset(str(tmp_path / "train.bin"), block_size=8)
            assert "\n" not in str(e.value) and not marker.exists()
            if raw in payloads[:3]:
                assert "io.open" in str(e.value)                                 # find_class refused it
    finally:
        copyreg.remove_extension(open.__module__, "open", 0x7ff0)


def test_uint32_bin_read_as_uint16_is_refused_with_a_hint(tmp_path):
    tokens = (np.arange(1000) % 50).astype("<u4")
    tokens.tofile(tmp_path / "data.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50}))
    with pytest.raises(DataError, match=r'every second uint16 is 0.*"dtype": "uint32"') as e:
        load_dataset(str(tmp_path / "data.bin"), block_size=8)
    assert "\n" not in str(e.value)
    big = (np.arange(1000) * 97 % 60000 + 70000).astype("<u4")                 # ids above 65535
    big.tofile(tmp_path / "big.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50304}))
    with pytest.raises(DataError, match=r'>= vocab size 50304 \(if it holds uint32 tokens'):
        load_dataset(str(tmp_path / "big.bin"), block_size=8)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50, "dtype": "uint32"}))   # declared: read right
    d = load_dataset(str(tmp_path / "data.bin"), block_size=8)
    assert np.array_equal(np.concatenate([d.train, d.val]), tokens) and d.train.dtype == np.uint16
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 140000, "dtype": "uint32"}))
    d = load_dataset(str(tmp_path / "big.bin"), block_size=8)
    assert np.array_equal(np.concatenate([d.train, d.val]), big) and d.train.dtype == np.int32
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50, "dtype": "int8"}))
    with pytest.raises(DataError, match="dtype 'int8' is not one of uint16, uint32"):
        load_dataset(str(tmp_path / "data.bin"), block_size=8)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": "50"}))
    with pytest.raises(DataError, match="vocab_size must be a positive integer, got '50'"):
        load_dataset(str(tmp_path / "data.bin"), block_size=8)


def test_val_bin_makes_val_fraction_a_note(tmp_path):
    nanogpt_char_dir(tmp_path)
    d = load_dataset(str(tmp_path / "train.bin"), val_fraction=0.3, block_size=8)
    assert (len(d.train), len(d.val)) == (300, 40)
    assert len(d.notes) == 1 and "val.bin" in d.notes[0] and "val_fraction 0.3 does not apply" in d.notes[0]
    (tmp_path / "val.bin").unlink()
    d = load_dataset(str(tmp_path / "train.bin"), val_fraction=0.3, block_size=8)
    assert (len(d.train), len(d.val)) == (210, 90) and d.notes == []


def test_id_tokenizer_refuses_text_in_one_line():
    with pytest.raises(DataError, match="reads whitespace-separated token ids, not text: 'hello'") as e:
        IdTokenizer(10).encode("1 hello 2")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="a tokenizer is a JSON object"):
        tokenizer_from_json("byte")
