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


def hf_reference(tmp_path):
    """(the tokenizers module, our vocab, Hugging Face's byte-level BPE over the same files)."""
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers not installed")
    vocab = make_vocab()
    write_files(tmp_path, vocab)
    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(tmp_path / "vocab.json"),
                                                               str(tmp_path / "merges.txt")))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizers, vocab, ref


def test_matches_hugging_face_tokenizers(tmp_path):
    tokenizers, vocab, ref = hf_reference(tmp_path)
    ref.add_special_tokens(["<|endoftext|>"])                  # id 264, past the vocabulary
    ours = BPETokenizer.from_dir(str(tmp_path))
    (tmp_path / "hf").mkdir()
    ref.save(str(tmp_path / "hf" / "tokenizer.json"))
    from_json = BPETokenizer.from_dir(str(tmp_path / "hf"))     # the tokenizer.json tokenizers writes
    for text in (TEXT, "in the cathedral the cat's in", " leading and trailing  "):
        assert ours.encode(text) == ref.encode(text).ids == from_json.encode(text), text
    assert from_json.encode("a<|endoftext|>") == ref.encode("a<|endoftext|>").ids == [vocab["a"], 264]


def test_tokenizer_json(tmp_path):
    vocab = make_vocab()
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "model": {"type": "BPE", "vocab": vocab, "dropout": None, "merges": [f"{a} {b}" for a, b in MERGES]}}))
    tok = BPETokenizer.from_dir(str(tmp_path))
    assert tok.encode(" the cat") == [vocab["Ġthe"], vocab["Ġcat"]] and tok.decode(tok.encode(TEXT)) == TEXT


# -- GPT-2's pre-tokenizer on random Unicode: the reference is OpenAI's encoder.py pattern
# compiled with `regex` (no GPT-2 vocabulary is needed: the split decides the ids) -------------
POOLS = ["abcXYZ", "0123456789", " ", "  \t\n\r", "'", "'s'll'd", ".,;!?-_()[]{}#@", "²³¹½⅓Ⅻ", "ΩΣπéñÅ",
         "\xa0\u2028\u2029\u3000\x1c\x1d\x85\x0b", "日本語中文", "🙂🚀", "\u0301\u0308", "مرحبا", "\u200b\u00ad"]


def random_strings(n, seed=0):
    import random
    import unicodedata
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.15:          # any assigned code point of Python's Unicode version
                while True:
                    c = chr(rng.randint(0, 0x3FFFF))
                    if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
                        break
                chars.append(c)
            else:
                chars.append(rng.choice(rng.choice(POOLS)))
        out.append("".join(chars))
    return out


def test_pre_tokenizer_splits_as_gpt2_with_and_without_regex():
    regex = pytest.importorskip("regex", reason="regex is a dependency (pip install -e .)")
    from engine.bpe import GPT2_PATTERN, compile_pattern
    ref = regex.compile(GPT2_PATTERN)
    default, fallback = compile_pattern(), compile_pattern(use_regex=False)
    assert isinstance(default, type(ref))                          # regex is used when installed
    for text in random_strings(3000) + ["²Ω", "x\x1cy", "a\x85 b", "  \u2028x", "it's 12 o'clock"]:
        want = ref.findall(text)
        assert default.findall(text) == want, repr(text)
        assert fallback.findall(text) == want, repr(text)


def test_ids_match_hugging_face_tokenizers_on_random_unicode(tmp_path):
    tokenizers, vocab, ref = hf_reference(tmp_path)
    ours = BPETokenizer.from_dir(str(tmp_path))
    for text in random_strings(1000, seed=1):
        assert ours.encode(text) == ref.encode(text).ids, repr(text)
        assert ours.decode(ours.encode(text)) == text


def test_endoftext_is_the_special_id(tmp_path):
    vocab = make_vocab()
    vocab["<|endoftext|>"] = len(vocab)
    write_files(tmp_path, vocab)
    tok = BPETokenizer.from_dir(str(tmp_path))
    eot = vocab["<|endoftext|>"]
    text = "the cat<|endoftext|> the<|endoftext|><|endoftext|>in"
    ids = tok.encode(text)
    assert ids == tok.encode("the cat") + [eot] + tok.encode(" the") + [eot, eot] + tok.encode("in")
    assert tok.decode(ids) == text
    plain = tok.encode(text, special=False)                 # as ordinary text: one symbol a byte here
    assert eot not in plain and tok.decode(plain) == text and len(tok.encode("<|endoftext|>", special=False)) == 13
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers not installed")
    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(tmp_path / "vocab.json"),
                                                               str(tmp_path / "merges.txt")))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.add_special_tokens(["<|endoftext|>"])
    assert ids == ref.encode(text).ids


def test_tokenizer_json_added_tokens_are_special(tmp_path):
    vocab = make_vocab()
    special = {"<|endoftext|>": len(vocab), "<|pad|>": len(vocab) + 1}
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": i, "content": s, "special": True} for s, i in special.items()],
        "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in MERGES]}}))
    tok = BPETokenizer.from_dir(str(tmp_path))
    assert tok.encode("<|pad|> the<|endoftext|>") == [special["<|pad|>"], vocab["Ġthe"], special["<|endoftext|>"]]
    assert tok.vocab_size == len(vocab) + 2 and tok.decode(tok.encode("x<|pad|>")) == "x<|pad|>"


@pytest.mark.parametrize("files, match", [
    ({"vocab.json": "[1, 2]", "merges.txt": "a b\n"}, "must map symbol strings to ids"),
    ({"vocab.json": '{"a": 0}', "merges.txt": "a b c\n"}, "is not two symbols"),
    ({"tokenizer.json": '{"model": {"type": "WordPiece", "vocab": {}}}'}, "not a BPE tokenizer"),
    ({"vocab.json": '{"a": 0}'}, "has vocab.json but no merges.txt"),
    ({"merges.txt": "a b\n"}, "has merges.txt but no vocab.json"),
    ({"tokenizer.json": '{"normalizer": {"type": "NFC"}, "model": {"type": "BPE", "vocab": {}, "merges": []}}'},
     "normalizer 'NFC' is not GPT-2's"),
    ({"tokenizer.json": '{"pre_tokenizer": {"type": "Sequence", "pretokenizers": []}, '
                        '"model": {"type": "BPE", "vocab": {}, "merges": []}}'}, "pre_tokenizer 'Sequence' is not"),
    ({"tokenizer.json": '{"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": true}, '
                        '"model": {"type": "BPE", "vocab": {}, "merges": []}}'}, "pre_tokenizer 'ByteLevel' is not"),
    ({"tokenizer.json": '{"model": {"type": "BPE", "vocab": {}, "merges": [], "dropout": 0.1}}'}, "BPE dropout 0.1"),
])
def test_bad_tokenizer_files_are_one_line(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        BPETokenizer.from_dir(str(tmp_path))
    assert "\n" not in str(e.value)
