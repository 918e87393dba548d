"""Incremental detokenizer: a request's sampled token ids in, text deltas that are safe to stream out.

Streamed text equals the non-streaming `tokenizer.decode(ids)` cut before the first stop string:
bytes not yet forming a character and text that may begin a stop string are held back, never
taken back. Work per token is bounded: for a byte-level tokenizer (Llama 3) each token's bytes
go through one incremental UTF-8 decoder; for sentencepiece only the last few ids are decoded
again (below).
"""
from __future__ import annotations

import codecs

from llama.tokenizers.base import Tokenizer

# Windowing, and why it is exact. sentencepiece decodes left to right; what it writes for a piece
# depends on only two things before it: whether anything has been written yet (a leading "▁" is
# dropped while nothing has been written, and a bare "▁" writes nothing then), and the byte-fallback
# bytes still waiting to form a character. At a "safe end" (no byte sequence left open) after some
# text has been written, both are settled: the ids before it can be replaced by any short id list
# that writes some text and also leaves no bytes open. We use the encoding of "a" as that stand-in
# (the anchor), so each push decodes anchor + the ids after the last safe end, the vLLM
# prefix/read-offset difference with a window of at most 4 ids.
# Assumes the model has no denormalizer rules (Meta's and make_tiny's have none); a denormalizer
# rewrites the whole text after decoding, which no window can reproduce.
_ANCHOR_TEXT = "a"
_SPACE_PIECE = "\u2581"  # sentencepiece's "▁"
_MAX_UTF8_LEN = 4


def _byte_value(piece: str) -> int:
    """The byte a byte-fallback piece such as "<0xE2>" stands for, or -1 for any other piece."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return -1
    return -1


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte <= 0xBF


def _utf8_length(lead: int) -> int:
    """Bytes in a UTF-8 sequence that starts with `lead`, by its bit pattern; 1 for a byte that
    cannot start a longer one. Deliberately lenient (no range checks on what follows), so we may
    hold an invalid sequence a token longer than needed but never stream bytes a decoder would
    still join with later ones."""
    if lead >> 5 == 0b110:
        return 2
    if lead >> 4 == 0b1110:
        return 3
    if lead >> 3 == 0b11110:
        return 4
    return 1


class TextStream:
    """Turns a request's generated token ids, pushed as they are sampled, into text deltas."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0,
                 keep_stop: bool = False, skip_special: bool = False) -> None:
        """`min_tokens`: no stop string matches that starts in the text of the first min_tokens
        tokens (vLLM's min_tokens: it checks stop strings only once more tokens are out).
        `keep_stop`: the text ends after the stop string found, not before it (vLLM's
        include_stop_str_in_output). `skip_special`: special tokens (tokenizer.special_tokens)
        write no text, as decode(ids, skip_special_tokens=True) (vLLM's skip_special_tokens);
        else their text is written, as decode(ids)."""
        stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r} in {stop!r}; "
                                 f"drop empty entries from `stop`.")
        self._tok = tokenizer
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        # decode() shows open bytes as U+FFFD; only a stop string containing one can match there.
        self._stop_sees_open_bytes = any("\ufffd" in s for s in stop)

        # Byte-level tokenizers: decode() is the UTF-8 of the tokens' bytes joined (a control
        # token's bytes are its text), so an incremental decoder gives the same text exactly.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if tokenizer.kind == "bytelevel" else None
        anchor = tokenizer.encode(_ANCHOR_TEXT, bos=False, eos=False)
        if self._utf8 is None and tokenizer.decode(anchor) != _ANCHOR_TEXT:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'path', tokenizer)} does not round-trip "
                             f"{_ANCHOR_TEXT!r} (got {tokenizer.decode(anchor)!r}); TextStream needs "
                             f"a sentencepiece model without denormalization rules.")
        self._anchor = anchor

        # The decode window: `_lead` (empty until text appears, then the anchor) + `_window`, the
        # ids from the prefix offset on. `_read` is the read offset into `_window`, always a safe
        # end; `_read_text` caches decode(_lead + _window[:_read]).
        self._lead: list[int] = []
        self._window: list[int] = []
        self._bytes: list[int] = []  # byte value of each id in _window, -1 for other pieces
        self._read = 0
        self._read_text = ""
        self._started = False  # whether the ids up to the read offset decode to any text

        # Stop matching. Text decoded up to the read offset is "checked"; `_tail` is its last
        # max_stop - 1 characters (all an occurrence ending in new text can reach back into) and
        # `_held` the suffix of it that may begin a stop string, not emitted yet.
        self._tail = ""
        self._held = ""

        self._min_tokens = min_tokens
        self._pushed = 0
        self._keep_stop = keep_stop
        self._skipped = frozenset(tokenizer.special_tokens.values()) if skip_special else frozenset()
        self._chunks: list[str] = []
        self._stopped = False
        self._closed = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        """Everything emitted so far: the concatenation of what push() and flush() returned."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def push(self, token_id: int) -> str:
        """Add one generated token (never EOS; the engine handles EOS) and return the text that is
        now safe to emit (may be ""). Once a stop string is found, `stopped` is True, the returned
        text ends right before it, and further pushes raise RuntimeError."""
        if self._stopped:
            raise RuntimeError("push() after a stop string ended the stream; stop pushing once "
                               "`stopped` is True.")
        if self._closed:
            raise RuntimeError("push() after flush(); a flushed stream is finished.")
        self._pushed += 1
        if not 0 <= token_id < self._tok.n_words:
            raise ValueError(f"token id {token_id} is outside the tokenizer's vocabulary "
                             f"[0, {self._tok.n_words}); the model's vocab_size must match the tokenizer.")
        if token_id in self._skipped:  # as if it were not there: decode(ids without it)
            return ""
        if self._utf8 is not None:
            return self._push_bytes(self._tok.token_bytes(token_id) or self._tok.decode([token_id]).encode("utf-8"))
        self._window.append(token_id)
        self._bytes.append(_byte_value(self._tok.id_to_piece(token_id)))

        end = self._safe_end()
        delta = ""
        if end > self._read:
            decoded = self._decode(end)
            delta = decoded[len(self._read_text):]
            self._read, self._read_text = end, decoded
        provisional = ""
        if self._stop_sees_open_bytes and end < len(self._window):
            provisional = self._decode(len(self._window))[len(self._read_text):]

        self._started = self._started or bool(delta)
        out = self._cut(delta, provisional)
        if not self._stopped:
            self._slide()
        return self._emit(out)

    def _push_bytes(self, data: bytes) -> str:
        delta = self._utf8.decode(data)
        provisional = self._utf8.getstate()[0].decode("utf-8", "replace") if self._stop_sees_open_bytes else ""
        return self._emit(self._cut(delta, provisional))

    def flush(self) -> str:
        """The stream ended (EOS, length, timeout, abort): return whatever was held back, open
        bytes as decode() shows them (U+FFFD). Idempotent: a second call returns ""."""
        if self._closed:
            return ""
        self._closed = True
        if self._stopped:
            return ""
        rest = ""
        if self._utf8 is not None:
            rest = self._utf8.decode(b"", final=True)
        elif self._read < len(self._window):
            rest = self._decode(len(self._window))[len(self._read_text):]
        out, self._held = self._held + rest, ""
        return self._emit(out)

    def _decode(self, end: int) -> str:
        """decode(lead + window[:end]); the cached read text is a prefix because the read offset
        is a safe end."""
        decoded = self._tok.decode(self._lead + self._window[:end])
        assert decoded.startswith(self._read_text), (self._lead, self._window, end)
        return decoded

    def _safe_end(self) -> int:
        """The largest window index that leaves no byte sequence open: the window's end, or the
        lead byte of a trailing sequence still short of continuation bytes (at most 3 ids back)."""
        n = len(self._window)
        i, follow = n - 1, 0
        while i >= 0 and follow < _MAX_UTF8_LEN - 1:
            b = self._bytes[i]
            if b < 0:  # a non-byte piece ends any byte run before it
                break
            if _is_continuation(b):
                follow, i = follow + 1, i - 1
                continue
            return i if follow + 1 < _utf8_length(b) else n
        return n

    def _slide(self) -> None:
        """Move the prefix offset up to the read offset so the next decode stays a few ids long."""
        if self._read == 0:
            return
        if self._started:
            del self._window[:self._read]
            del self._bytes[:self._read]
            self._lead, self._read, self._read_text = self._anchor, 0, _ANCHOR_TEXT
            return
        # No text yet, so the ids before the read offset are controls (no effect on what follows)
        # or bare "▁" pieces. The last "▁" matters: with remove_extra_whitespaces off (Meta's
        # tokenizer) it used up the one leading space to drop. Keep it, drop the rest.
        spaces = [j for j in range(self._read) if self._tok.id_to_piece(self._window[j]) == _SPACE_PIECE]
        keep = spaces[-1:]
        self._window[:self._read] = [self._window[j] for j in keep]
        self._bytes[:self._read] = [self._bytes[j] for j in keep]
        self._read = len(keep)

    def _cut(self, delta: str, provisional: str) -> str:
        """Stop-string matching over the new checked text `delta` (and `provisional`, the open
        bytes as decode() shows them now). Returns what may be emitted; updates held text."""
        if not self._stop:
            return delta
        if self._pushed <= self._min_tokens:  # not armed yet: emit it all, keep the tail for later matches
            self._tail = (self._tail + delta)[-(self._max_stop - 1):] if self._max_stop > 1 else ""
            return delta
        region = self._tail + delta + provisional
        unemitted = len(self._tail) - len(self._held)  # where the held text starts in region
        # Only from there: what was emitted before holds no stop string's start (_stop_prefix_len
        # keeps any back), except text emitted before min_tokens, where none may start.
        hits = [(k, -len(s)) for s in self._stop if (k := region.find(s, unemitted)) >= 0]
        if hits:
            first, minus_length = min(hits)  # the earliest; where two start there, the longer
            # An occurrence starting before the held text would mean a longer stop-string prefix
            # had been emitted, which _stop_prefix_len rules out.
            assert first >= unemitted, (region, first, unemitted)
            self._stopped = True
            self._held = ""
            return region[unemitted:first - minus_length if self._keep_stop else first]
        self._tail = (self._tail + delta)[-(self._max_stop - 1):] if self._max_stop > 1 else ""
        candidate = self._held + delta
        keep = self._stop_prefix_len(candidate)
        self._held = candidate[len(candidate) - keep:]
        return candidate[:len(candidate) - keep]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, out: str) -> str:
        if out:
            self._chunks.append(out)
        return out
