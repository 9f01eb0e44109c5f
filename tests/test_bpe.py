"""engine/bpe.py: GPT-2 byte-level BPE on a small hand-made vocabulary, against Hugging Face
`tokenizers` when it is installed."""
import json

import pytest

from engine.bpe import BPETokenizer, bytes_to_unicode

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "in")]
TEXT = "the cat sat in the hat, isn't it? 12 cats\n\n  spaces\té 日本 🙂 the_end"


def make_vocab():
    alphabet = sorted(set(bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    return vocab


def write_files(tmp_path, vocab):
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n",
                                         encoding="utf-8")


def test_round_trip_and_merges(tmp_path):
    vocab = make_vocab()
    write_files(tmp_path, vocab)
    tok = BPETokenizer.from_dir(str(tmp_path))
    assert tok.vocab_size == 256 + len(MERGES)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode(" the cat") == [vocab["Ġthe"], vocab["Ġcat"]]
    assert tok.encode("the") == [vocab["t"], vocab["he"]]
    assert BPETokenizer.from_dir(str(tmp_path / "missing")) is None


def test_matches_hugging_face_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers not installed")
    vocab = make_vocab()
    write_files(tmp_path, vocab)
    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(tmp_path / "vocab.json"),
                                                               str(tmp_path / "merges.txt")))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ours = BPETokenizer.from_dir(str(tmp_path))
    for text in (TEXT, "in the cathedral the cat's in", " leading and trailing  "):
        assert ours.encode(text) == ref.encode(text).ids, text


def test_tokenizer_json(tmp_path):
    vocab = make_vocab()
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab,
                                                                   "merges": [f"{a} {b}" for a, b in MERGES]}}))
    tok = BPETokenizer.from_dir(str(tmp_path))
    assert tok.encode(" the cat") == [vocab["Ġthe"], vocab["Ġcat"]] and tok.decode(tok.encode(TEXT)) == TEXT
