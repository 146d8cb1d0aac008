"""Tokenizers: CLIP's byte-level BPE and a file-free word-level tokenizer, behind one interface.

Both turn a batch of strings into a fixed-size ``int32`` array ``[N, context_length]`` laid out as
``<|startoftext|> tokens... <|endoftext|> pad pad ...``. Texts that are too long are truncated so that
the end-of-text token is always the last one kept (the text tower pools at the first end-of-text).

* :class:`CLIPTokenizer` reads the vocabulary and merges of a Hugging Face CLIP checkpoint
  (``vocab.json`` + ``merges.txt``) or OpenAI's ``bpe_simple_vocab_16e6.txt.gz``. By default it cleans text
  as OpenAI's ``clip/simple_tokenizer.py`` does (``ftfy.fix_text``, HTML unescaped twice, whitespace collapsed,
  lower case), so its ids equal OpenAI's and open_clip's; with ``fix_unicode=False, unescape_html=False`` they
  equal ``transformers.CLIPTokenizer``'s (which does not run ftfy) built from the same files.
* :class:`WordTokenizer` needs no files: a word-level vocabulary built from a list of training captions,
  with ``<pad>``, ``<unk>``, ``<|startoftext|>`` and ``<|endoftext|>``.

Padding conventions differ between references: Hugging Face pads with the pad token, which for the OpenAI
checkpoints is ``<|endoftext|>`` (id 49407); OpenAI's ``clip.tokenize`` and open_clip pad with 0. Both give
the same features, because the causal text tower never lets a token see the padding after it. Our
:class:`CLIPTokenizer` pads with ``<|endoftext|>`` (Hugging Face's choice) unless ``pad_id`` says otherwise.
"""

from __future__ import annotations

import abc
import functools
import gzip
import html
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

__all__ = [
    "Tokenizer",
    "CLIPTokenizer",
    "WordTokenizer",
    "bytes_to_unicode",
    "clean_text",
    "SOT_TOKEN",
    "EOT_TOKEN",
]

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenizer: the special tokens, English contractions, runs of letters, single digits, runs of
# anything else that is not whitespace. Whitespace separates pieces and is dropped.
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_WORD_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|[\p{L}\p{M}]+|[\p{N}]+|[^\s\p{L}\p{N}]""")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character (GPT-2 / CLIP byte-level BPE).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to ``chr(256 + k)`` in increasing
    byte order, so that no byte maps to whitespace or a control character.

    Returns:
      A dict ``{byte: char}`` with 256 entries, in the order CLIP uses to lay out its base vocabulary.

    >>> table = bytes_to_unicode()
    >>> len(table), table[ord("a")], table[ord(" ")]
    (256, 'a', 'Ġ')
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ftfy.fix_text costs ~40 us for a short caption; training captions repeat every epoch, so remember the answers.
_fix_text = functools.lru_cache(maxsize=1 << 16)(ftfy.fix_text)


def clean_text(text: str, unescape_html: bool = True, fix_unicode: bool = True) -> str:
    """CLIP's text cleaning: ``ftfy.fix_text``, HTML unescape (twice), whitespace runs to one space, lower case.

    This is OpenAI's ``whitespace_clean(basic_clean(text)).lower()`` (``clip/simple_tokenizer.py``, also
    open_clip's), step for step. ftfy repairs what real text carries: curly quotes and apostrophes become
    ASCII (``it’s`` -> ``it's``), full-width forms become ASCII (``，：！`` -> ``,:!``, ``ＡＢＣ`` -> ``abc``),
    ligatures are split (``ﬁ`` -> ``fi``), mojibake is decoded back (``cafÃ©`` -> ``café``), control
    characters and terminal escapes are dropped, and the result is NFC-normalised.

    Args:
      text: the raw string.
      unescape_html: undo HTML entities twice (``&amp;amp;`` -> ``&``), as OpenAI does. (ftfy itself
        already unescapes once when the text holds no ``<``.)
      fix_unicode: run ``ftfy.fix_text`` first (OpenAI). ``False`` applies only Unicode NFC instead,
        which with ``unescape_html=False`` is the normaliser of Hugging Face's ``CLIPTokenizer``.

    Returns:
      The cleaned, stripped, lower-cased string.

    >>> clean_text("  A  Photo&amp;of\\tA CAT ")
    'a photo&of a cat'
    >>> print(clean_text("It’s “ＣＬＩＰ”，ﬁne！"))
    it's "clip",fine!
    >>> clean_text("It’s", fix_unicode=False)
    'it’s'
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r:.80}. Pass a Python string.")
    if fix_unicode:
        text = _fix_text(text)
    if unescape_html:
        text = html.unescape(html.unescape(text))
    if not fix_unicode:
        text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


class Tokenizer(abc.ABC):
    """The interface shared by mmjax tokenizers.

    Subclasses implement :meth:`encode` (text -> ids, no special tokens) and the id properties;
    :meth:`__call__` turns a batch of texts into a padded ``int32`` array ``[N, context_length]``:
    ``[sot_id, *encode(text)[:context_length - 2], eot_id, pad_id, ...]``.

    >>> tok = WordTokenizer.from_texts(["a cat", "a dog"])
    >>> tok(["a cat"], context_length=5).tolist() == [[tok.sot_id, tok.encode("a")[0],
    ...                                                   tok.encode("cat")[0], tok.eot_id, tok.pad_id]]
    True
    """

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the text tower's embedding rows)."""

    @property
    @abc.abstractmethod
    def sot_id(self) -> int:
        """Id of ``<|startoftext|>``."""

    @property
    @abc.abstractmethod
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``; the text tower pools at its first occurrence."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id written after the end-of-text token."""

    def __call__(self, texts: str | Sequence[str], context_length: int = 77, pad_id: int | None = None) -> np.ndarray:
        """Tokenize a batch into ``int32 [N, context_length]``, truncating with end-of-text kept last.

        Args:
          texts: one string or a sequence of N strings.
          context_length: the fixed length L (at least 2: start and end tokens).
          pad_id: padding value; defaults to :attr:`pad_id`.

        Returns:
          ``np.ndarray`` of dtype int32 and shape ``[N, L]``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(context_length, (int, np.integer)) or context_length < 2:
            raise ValueError(
                f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}."
            )
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r:.80}.")
        pad = self.pad_id if pad_id is None else int(pad_id)
        out = np.full((len(texts), context_length), pad, dtype=np.int32)
        for i, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text)[: context_length - 2] + [self.eot_id]
            out[i, : len(ids)] = ids
        return out


class CLIPTokenizer(Tokenizer):
    """CLIP's byte-level BPE tokenizer (lower-cased, ``</w>`` marks the end of a word).

    A text is cleaned (:func:`clean_text`: ftfy, as OpenAI does), split by CLIP's regular expression into words, each word's
    UTF-8 bytes are mapped to printable characters (:func:`bytes_to_unicode`), ``</w>`` is appended to the
    last character, and adjacent symbol pairs are merged greedily by merge rank (lowest first) until no
    ranked pair is left. Symbols missing from the vocabulary map to ``unk_id`` (``<|endoftext|>``, as in
    Hugging Face).

    Args:
      vocab: token string -> id.
      merges: ordered merge pairs ``(left, right)``; the position is the rank.
      pad_id: padding id; defaults to the end-of-text id (Hugging Face's convention). OpenAI pads with 0.
      unescape_html: see :func:`clean_text`.
      fix_unicode: clean with ``ftfy.fix_text`` (OpenAI's and open_clip's tokenizer, the default); ``False``
        (with ``unescape_html=False``) gives the ids of ``transformers.CLIPTokenizer``, which skips ftfy.

    Use :meth:`from_pretrained` to read files. Example with a two-letter vocabulary:

    >>> base = list(bytes_to_unicode().values())
    >>> vocab = base + [c + "</w>" for c in base] + ["hi</w>", SOT_TOKEN, EOT_TOKEN]
    >>> tok = CLIPTokenizer({t: i for i, t in enumerate(vocab)}, [("h", "i</w>")])
    >>> tok.encode("Hi hi!") == [vocab.index("hi</w>")] * 2 + [vocab.index("!</w>")]
    True
    >>> tok("hi", context_length=4).tolist() == [[tok.sot_id, vocab.index("hi</w>"), tok.eot_id, tok.eot_id]]
    True
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        pad_id: int | None = None,
        unescape_html: bool = True,
        fix_unicode: bool = True,
    ):
        for special in (SOT_TOKEN, EOT_TOKEN):
            if special not in vocab:
                raise ValueError(f"vocab must contain {special!r}; got a vocabulary of {len(vocab)} tokens without it.")
        self.vocab = dict(vocab)
        self.inverse_vocab = {i: t for t, i in self.vocab.items()}
        self.merges = [tuple(m) for m in merges]
        for i, m in enumerate(self.merges):
            if len(m) != 2:
                raise ValueError(f"merges[{i}] must be a pair of strings, got {m!r}.")
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.unescape_html = unescape_html
        self.fix_unicode = fix_unicode
        self._sot = self.vocab[SOT_TOKEN]
        self._eot = self.vocab[EOT_TOKEN]
        self._pad = self._eot if pad_id is None else int(pad_id)
        self._cache: dict[str, tuple[str, ...]] = {SOT_TOKEN: (SOT_TOKEN,), EOT_TOKEN: (EOT_TOKEN,)}

    # --- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> CLIPTokenizer:
        """Read a Hugging Face directory (``vocab.json`` + ``merges.txt``) or OpenAI's ``.txt.gz`` merges.

        For OpenAI's file the vocabulary is built from the merges, as ``clip/simple_tokenizer.py`` does:
        the 256 byte symbols, the same with ``</w>``, one token per merge (the first 48,894 merges), then
        ``<|startoftext|>`` and ``<|endoftext|>`` (ids 49406 and 49407).

        Args:
          path: a directory, or a ``.gz`` / ``.txt`` merges file.
          **kwargs: passed to the constructor (``pad_id``, ``unescape_html``, ``fix_unicode``); for OpenAI's file also
            ``num_merges`` (default 48894).
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            vocab_file = os.path.join(path, "vocab.json")
            merges_file = os.path.join(path, "merges.txt")
            for f in (vocab_file, merges_file):
                if not os.path.isfile(f):
                    raise ValueError(
                        f"path={path!r} is a directory without {os.path.basename(f)}; expected a Hugging Face "
                        "CLIP tokenizer directory (vocab.json + merges.txt) or OpenAI's bpe_simple_vocab_16e6.txt.gz."
                    )
            with open(vocab_file, encoding="utf-8") as fh:
                vocab = json.load(fh)
            with open(merges_file, encoding="utf-8") as fh:
                merges = _parse_merges(fh.read().split("\n"))
            return cls(vocab, merges, **kwargs)
        if os.path.isfile(path):
            num_merges = kwargs.pop("num_merges", 49152 - 256 - 2)
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
            merges = _parse_merges([""] + lines[1:])[:num_merges]  # the first line is a header, as OpenAI skips it
            return cls(cls.vocab_from_merges(merges), merges, **kwargs)
        raise ValueError(f"path={path!r} does not exist; give a tokenizer directory or a merges file.")

    @staticmethod
    def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
        """OpenAI's vocabulary layout: bytes, bytes + ``</w>``, merged pairs, start token, end token.

        >>> v = CLIPTokenizer.vocab_from_merges([("h", "i</w>")])
        >>> len(v), v["hi</w>"], v[EOT_TOKEN]
        (515, 512, 514)
        """
        base = list(bytes_to_unicode().values())
        tokens = base + [b + END_OF_WORD for b in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        return {t: i for i, t in enumerate(tokens)}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``vocab.json`` and ``merges.txt`` in Hugging Face's layout."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as fh:
            json.dump(self.vocab, fh, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as fh:
            fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))

    # --- the interface --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def sot_id(self) -> int:
        return self._sot

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def pad_id(self) -> int:
        return self._pad

    def bpe(self, word: str) -> tuple[str, ...]:
        """Merge the byte-symbols of one pre-token (already byte-mapped) into BPE tokens."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best_rank, best_i = None, -1
            for i in range(len(symbols) - 1):
                r = self.ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                break
            pair = (symbols[best_i], symbols[best_i + 1])
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        out = tuple(symbols)
        if len(self._cache) < 100_000:
            self._cache[word] = out
        return out

    def tokens(self, text: str) -> list[str]:
        """The BPE token strings of ``text`` (no start/end tokens)."""
        text = clean_text(text, unescape_html=self.unescape_html, fix_unicode=self.fix_unicode)
        out: list[str] = []
        for piece in _CLIP_PATTERN.findall(text):
            if piece in (SOT_TOKEN, EOT_TOKEN):
                out.append(piece)
                continue
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            out.extend(self.bpe(mapped))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens; unknown symbols map to the end-of-text id."""
        return [self.vocab.get(t, self._eot) for t in self.tokens(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids back to text (lower-cased, one space between words); start, end and pad ids are skipped."""
        specials = {self._sot, self._eot, self._pad} if skip_special else set()
        pieces = [self.inverse_vocab[int(i)] for i in ids if int(i) not in specials]
        data = bytearray()
        for piece in pieces:
            if piece in (SOT_TOKEN, EOT_TOKEN):
                data.extend(piece.encode("utf-8"))
                continue
            for ch in piece.replace(END_OF_WORD, " "):
                data.extend(b" " if ch == " " else bytes([self.byte_decoder[ch]]))
        return data.decode("utf-8", errors="replace").strip()


def _parse_merges(lines: Sequence[str]) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        if not line or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"merges line {n + 1} must hold two symbols separated by a space, got {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges


class WordTokenizer(Tokenizer):
    """Word-level tokenizer that needs no files, for the small caption sets mmjax ships.

    Words are runs of letters, runs of digits, or single punctuation marks of the cleaned, lower-cased text
    (:func:`clean_text` without ftfy: HTML unescape, NFC, whitespace, lower case; kept so that saved
    vocabularies keep their ids). Ids: ``<pad>`` 0, ``<unk>`` 1, ``<|startoftext|>`` 2, ``<|endoftext|>`` 3, then the
    vocabulary words.

    Args:
      words: vocabulary words (without the specials), in id order.

    >>> tok = WordTokenizer.from_texts(["A red shirt.", "a blue shirt"])
    >>> tok.vocab_size, tok.encode("a green shirt") == [tok.vocab["a"], tok.unk_id, tok.vocab["shirt"]]
    (9, True)
    """

    PAD, UNK = "<pad>", "<unk>"
    SPECIALS = (PAD, UNK, SOT_TOKEN, EOT_TOKEN)

    def __init__(self, words: Sequence[str]):
        words = [w for w in words if w not in self.SPECIALS]
        if len(set(words)) != len(words):
            dup = [w for w, c in Counter(words).items() if c > 1][:5]
            raise ValueError(f"words must be unique, got duplicates {dup}.")
        self.vocab = {t: i for i, t in enumerate(list(self.SPECIALS) + list(words))}
        self.inverse_vocab = {i: t for t, i in self.vocab.items()}

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordTokenizer:
        """Build the vocabulary from training texts: most frequent first, ties alphabetical (deterministic).

        Args:
          texts: training captions.
          min_count: keep words seen at least this often.
          max_size: keep at most this many words (specials not counted).
        """
        counts = Counter(w for t in texts for w in cls.split(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[:max_size] if max_size is not None else words)

    @staticmethod
    def split(text: str) -> list[str]:
        """Cleaned, lower-cased words of ``text``."""
        return _WORD_PATTERN.findall(clean_text(text, fix_unicode=False))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def sot_id(self) -> int:
        return 2

    @property
    def eot_id(self) -> int:
        return 3

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text``; unknown words map to ``<unk>`` (1)."""
        return [self.vocab.get(w, 1) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to space-joined words, skipping pad, start and end."""
        return " ".join(self.inverse_vocab[int(i)] for i in ids if int(i) not in (0, 2, 3))

    def to_json(self) -> str:
        """Serialise the vocabulary (words after the specials) as a JSON list."""
        return json.dumps([self.inverse_vocab[i] for i in range(len(self.SPECIALS), self.vocab_size)])

    @classmethod
    def from_json(cls, data: str) -> WordTokenizer:
        """Inverse of :meth:`to_json`."""
        return cls(json.loads(data))
