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
classes (\\p{L}, \\p{N}); with the ``regex`` package installed it is used exactly,
otherwise Python's ``re`` approximates letters by ``[^\\W\\d_]`` and digits by ``\\d``.
"""
import json
import os

try:
    import regex as _re
    _PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
except ImportError:                                            # pragma: no cover - depends on the install
    import re as _re
    _PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


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
    def __init__(self, vocab, merges):
        self.encoder = dict(vocab)                              # symbol string -> id
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = _re.compile(_PATTERN)
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
            return cls(vocab, [tuple(ln.split(" ")) for ln in lines])
        tok_path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tok_path):
            with open(tok_path, encoding="utf-8") as f:
                model = json.load(f)["model"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return cls(model["vocab"], merges)
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

    def encode(self, text):
        ids = []
        for word in self.pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            try:
                ids.extend(self.encoder[s] for s in self._bpe(mapped))
            except KeyError as e:
                raise ValueError(f"BPE symbol {e.args[0]!r} is not in vocab.json") from None
        return ids

    def decode(self, ids):
        text = "".join(self.decoder.get(int(i), "") for i in ids)
        return bytes(self.byte_decoder[c] for c in text if c in self.byte_decoder).decode("utf-8", errors="replace")
