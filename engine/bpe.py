"""GPT-2's byte-level BPE tokenizer (Radford et al. 2019, section 2.2; OpenAI's encoder.py),
read from a Hugging Face GPT-2 directory, so ``sample.py --hf DIR`` takes and prints text.

1. Split the text into words with GPT-2's pattern (contractions, letters, digits, other
   symbols, each with an optional leading space; runs of whitespace).
2. Map each UTF-8 byte of a word to a printable character (``bytes_to_unicode``: the 188
   printable Latin-1 bytes map to themselves, the other 68 to U+0100...), so every byte
   string is a string over a 256-symbol alphabet, and the vocabulary is text.
3. Merge adjacent symbols greedily, always the pair of lowest rank in merges.txt, until no
   ranked pair is left; each final symbol is a vocabulary entry.

Decoding joins the symbols and maps them back to bytes. Files: ``vocab.json`` and
``merges.txt`` (or ``tokenizer.json``, which holds both). GPT-2's pattern uses Unicode
classes (\\p{L}, \\p{N}, \\s: White_Space), compiled with the ``regex`` package (a
dependency), as OpenAI's encoder.py does. Without it, Python's ``re`` gets the same classes
spelled out from ``unicodedata`` (identical for every character of Python's Unicode
version; ``re``'s own \\d, \\w and \\s differ: "²" is \\p{N} but not \\d, U+001C is \\s
only in ``re``).

Special tokens (``<|endoftext|>`` of vocab.json, the ``added_tokens`` of tokenizer.json)
are cut out of the text before step 1 and encoded as their own ids, as Hugging Face's
tokenizers do; ``encode(text, special=False)`` treats them as ordinary text.
"""
import json
import os
import sys
import unicodedata

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
# Unicode's White_Space property: what \s matches in ``regex`` (and in GPT-2's pattern)
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _class_of(major):
    """A ``re`` character class body of every code point whose general category starts with
    ``major`` ("L": letters, "N": numbers), as ranges."""
    out, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == major:
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            out.append(f"\\U{start:08x}" + (f"-\\U{prev:08x}" if prev > start else ""))
            start = None
    if start is not None:
        out.append(f"\\U{start:08x}" + (f"-\\U{prev:08x}" if prev > start else ""))
    return "".join(out)


def re_pattern():
    """GPT-2's pattern for Python's ``re``, its classes spelled out (no \\p{} in ``re``)."""
    L, N, S = _class_of("L"), _class_of("N"), WHITE_SPACE
    return (rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+""")


def compile_pattern(use_regex=True):
    """GPT-2's pre-tokenizer: ``regex`` when installed (and ``use_regex``), else ``re``."""
    if use_regex:
        try:
            import regex
            return regex.compile(GPT2_PATTERN)
        except ImportError:                                    # pragma: no cover - regex is a dependency
            pass
    import re
    return re.compile(re_pattern())


def bytes_to_unicode():
    """{byte: printable character}: printable Latin-1 bytes to themselves, the rest to 256+."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class BPETokenizer:
    """``vocab`` {symbol string: id}, ``merges`` [(a, b)] in rank order; ``special`` {text: id}
    of the tokens cut out before BPE (None: ``<|endoftext|>`` if the vocabulary has it)."""

    def __init__(self, vocab, merges, special=None, use_regex=True):
        self.encoder = dict(vocab)                              # symbol string -> id
        if special is None:
            special = {ENDOFTEXT: self.encoder[ENDOFTEXT]} if ENDOFTEXT in self.encoder else {}
        self.special = dict(special)                            # text -> id
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.decoder.update({i: s for s, i in self.special.items()})
        self.special_decoder = {i: s for s, i in self.special.items()}
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = compile_pattern(use_regex)
        self.vocab_size = max(self.decoder) + 1 if self.decoder else 0
        self._cache = {}

    @classmethod
    def from_dir(cls, directory):
        """From vocab.json + merges.txt, or tokenizer.json; None if the directory has neither."""
        vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
        if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_path, encoding="utf-8") as f:
                lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
            return cls(_check_vocab(vocab, vocab_path), [_merge(ln, merges_path) for ln in lines])
        tok_path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tok_path):
            with open(tok_path, encoding="utf-8") as f:
                tok = json.load(f)
            model = tok.get("model") if isinstance(tok, dict) else None
            if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
                raise ValueError(f"{tok_path}: not a BPE tokenizer (model.type must be BPE, with a vocab)")
            _check_gpt2_pipeline(tok, tok_path)
            merges = [_merge(m, tok_path) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
            added = tok.get("added_tokens") or []
            special = {t["content"]: int(t["id"]) for t in added if isinstance(t, dict) and "content" in t}
            return cls(_check_vocab(model["vocab"], tok_path), merges, special if added else None)
        for have, lack in ((vocab_path, merges_path), (merges_path, vocab_path)):
            if os.path.isfile(have):
                raise ValueError(f"{directory} has {os.path.basename(have)} but no {os.path.basename(lack)} "
                                 "(GPT-2's BPE needs both, or tokenizer.json)")
        return None

    def _bpe(self, word):
        """The symbols of one word (a string over the byte alphabet) after all merges."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):                             # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def _encode_ordinary(self, text, ids):
        for word in self.pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            try:
                ids.extend(self.encoder[s] for s in self._bpe(mapped))
            except KeyError as e:
                raise ValueError(f"BPE symbol {e.args[0]!r} is not in vocab.json") from None

    def encode(self, text, special=True):
        """Token ids of ``text``; ``special``: its special tokens (``<|endoftext|>``) as their
        own ids (Hugging Face's default), else as ordinary text."""
        ids = []
        if not special or not self.special:
            self._encode_ordinary(text, ids)
            return ids
        pos = 0
        while pos <= len(text):                                 # leftmost, then longest special token
            hits = [(text.find(s, pos), -len(s), s) for s in self.special]
            hits = [h for h in hits if h[0] >= 0]
            if not hits:
                break
            at, _, tok = min(hits)
            self._encode_ordinary(text[pos:at], ids)
            ids.append(self.special[tok])
            pos = at + len(tok)
        self._encode_ordinary(text[pos:], ids)
        return ids

    def decode(self, ids):
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self.special_decoder:
                out.append(self._decode_bytes(run))
                out.append(self.special_decoder[i])
                run = []
            else:
                run.append(i)
        out.append(self._decode_bytes(run))
        return "".join(out)

    def _decode_bytes(self, ids):
        text = "".join(self.decoder.get(i, "") for i in ids)
        return bytes(self.byte_decoder[c] for c in text if c in self.byte_decoder).decode("utf-8", errors="replace")


def _check_gpt2_pipeline(tok, path):
    """One-line ValueError unless tokenizer.json tokenizes as GPT-2: no normalizer, the
    ByteLevel pre-tokenizer with GPT-2's pattern and no added prefix space (or none given),
    no BPE dropout. Another pipeline (Llama 3's Split pattern, a prefix space) would give
    other ids without a word."""
    norm = tok.get("normalizer")
    if norm is not None:
        raise ValueError(f"{path}: normalizer {norm.get('type') if isinstance(norm, dict) else norm!r} is not "
                         "GPT-2's tokenization (none)")
    pre = tok.get("pre_tokenizer")
    if pre is not None and not (isinstance(pre, dict) and pre.get("type") == "ByteLevel"
                                and not pre.get("add_prefix_space", False) and pre.get("use_regex", True)):
        what = pre.get("type") if isinstance(pre, dict) else pre
        raise ValueError(f"{path}: pre_tokenizer {what!r} is not GPT-2's (ByteLevel with its pattern, "
                         "add_prefix_space false)")
    if tok["model"].get("dropout"):
        raise ValueError(f"{path}: BPE dropout {tok['model']['dropout']} is not GPT-2's tokenization")


def _merge(line, path):
    parts = line.split(" ")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{path}: merge {line!r} is not two symbols separated by one space")
    return tuple(parts)


def _check_vocab(vocab, path):
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 0 for k, v in vocab.items()):
        raise ValueError(f"{path}: the vocabulary must map symbol strings to ids >= 0")
    return vocab
