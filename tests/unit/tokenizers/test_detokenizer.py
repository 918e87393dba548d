"""TextStream (llama/tokenizers/detokenizer.py): streamed text must equal tokenizer.decode of the ids, cut at
the first stop string, without ever streaming text that is later taken back, at bounded cost.

Checked against three byte-fallback tokenizers: the golden tokenizer.model, one from make_tiny,
and one that keeps extra whitespace as Meta's Llama tokenizer does (its leading-space rule differs).
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from llama.tokenizers.base import Tokenizer
from llama.tokenizers.detokenizer import TextStream
from llama.tokenizers.load import load_tokenizer
from tests.conftest import GOLDEN_CKPT

TEXTS = [
    "naïve café 😀 日本語 €",
    "  hello world",
    " The capital of France is Paris.",
    "Les modèles de langue sont utiles. 🦙 ça va? — ≠ ∑ ℃",
    "a  b   c\tnaïve\u00a0😀😀x",
    "日本語の文です。 キスト 少し",
]
WORDS = ["naïve", "café", "😀", "日本語", "€", "hello", "world", "the", "🦙", "ça", "x", "1 2", "?!",
         "Ω", "ß", "中", "\u200d", "é", "ray"]
SEPARATORS = ["", " ", "  ", "\n", "\t"]


def _train_keep_whitespace(path: Path) -> None:
    """A tiny tokenizer with remove_extra_whitespaces off, like Meta's; make_tiny's turns it on."""
    import sentencepiece as spm

    text = "\n".join(TEXTS + [" ".join(WORDS), "hello  world   again", "the quick brown fox"]) * 3
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, remove_extra_whitespaces=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    from llama.checkpoints.make_tiny import train_tokenizer

    root = tmp_path_factory.mktemp("detok")
    train_tokenizer(root / "tiny.model", vocab_size=320)
    _train_keep_whitespace(root / "keepspace.model")
    assert (GOLDEN_CKPT / "tokenizer.model").is_file(), GOLDEN_CKPT
    toks = {
        "golden": load_tokenizer(GOLDEN_CKPT / "tokenizer.model"),
        "tiny": load_tokenizer(root / "tiny.model"),
        "keepspace": load_tokenizer(root / "keepspace.model"),
    }
    sp = toks["keepspace"].sp_model
    space = sp.piece_to_id("▁")
    assert sp.decode([space, space]) == " "  # the Meta-style leading-space rule is really in play
    return toks


@pytest.fixture(scope="module")
def golden_tok(tokenizers) -> Tokenizer:
    return tokenizers["golden"]


def ids_of(tok: Tokenizer, pieces: list[str]) -> list[int]:
    ids = [tok.sp_model.piece_to_id(p) for p in pieces]
    assert [tok.id_to_piece(i) for i in ids] == pieces
    return ids


def byte_id(tok: Tokenizer, b: int) -> int:
    return ids_of(tok, [f"<0x{b:02X}>"])[0]


def reference(tok: Tokenizer, ids: list[int], stop: tuple[str, ...], keep_stop: bool = False,
              skip_special: bool = False) -> tuple[str, int | None]:
    """What the stream must produce, from whole decodes: the text, and the push (1-based) that
    completed the first stop string, or None. keep_stop: the text runs to the end of the earliest
    stop string (the longest of those starting there); skip_special: decoded without special tokens."""
    def decode(part: list[int]) -> str:
        specials = set(tok.special_tokens.values()) if skip_special else set()
        return tok.decode([t for t in part if t not in specials])

    for k in range(1, len(ids) + 1):
        full = decode(ids[:k])
        hits = [(full.find(s), -len(s)) for s in stop if s in full]
        if hits:
            first, minus_length = min(hits)
            return full[:first - minus_length if keep_stop else first], k
    return decode(ids), None


def check(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = (), keep_stop: bool = False,
          skip_special: bool = False) -> TextStream:
    """Push `ids` one by one and check invariants 1-3 after every push and at flush."""
    want, stop_at = reference(tok, ids, stop, keep_stop, skip_special)
    stream = TextStream(tok, stop, keep_stop=keep_stop, skip_special=skip_special)
    max_held = max((len(s) for s in stop), default=1) - 1 + 3  # stop-string prefix + open bytes
    out = []
    for k, token in enumerate(ids, 1):
        out.append(stream.push(token))
        assert stream.text == "".join(out)
        if stream.stopped:
            assert k == stop_at, (ids, stop)
            assert stream.text == want
            with pytest.raises(RuntimeError):
                stream.push(token)
            break
        full = reference(tok, ids[:k], (), skip_special=skip_special)[0]
        assert full.startswith(stream.text), (ids[:k], stop)
        assert len(full) - len(stream.text) <= max_held, (ids[:k], stop)
    else:
        assert stop_at is None, (ids, stop)
    out.append(stream.flush())
    assert "".join(out) == want == stream.text, (ids, stop)
    assert stream.flush() == ""
    return stream


def random_ids(rng: random.Random, tok: Tokenizer, n: int, controls: bool = False) -> list[int]:
    """Three mixes: uniform over the vocabulary, encoded text glued from words, and a soup
    of byte pieces, bare "▁" and <unk> that hits the edge cases far more often."""
    sp = tok.sp_model
    ordinary = [i for i in range(tok.n_words) if controls or not sp.is_control(i)]
    kind = rng.randrange(3)
    if kind == 0:
        return [rng.choice(ordinary) for _ in range(n)]
    if kind == 1:
        ids: list[int] = []
        while len(ids) < n:
            text = rng.choice(SEPARATORS).join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            ids += tok.encode(rng.choice(["", " ", "  "]) + text, bos=False, eos=False)
        return ids[:n]
    special = [sp.piece_to_id("▁"), 0] + [byte_id(tok, b) for b in (0x41, 0x20, 0x80, 0x82, 0x98,
               0x9F, 0xA9, 0xAC, 0xBF, 0xC3, 0xC0, 0xE2, 0xE0, 0xED, 0xF0, 0xF4, 0xF8, 0xFF)]
    if controls:
        special += [i for i in range(tok.n_words) if sp.is_control(i)]
    return [rng.choice(special) if rng.random() < 0.7 else rng.choice(ordinary) for _ in range(n)]


def random_stops(rng: random.Random, tok: Tokenizer, ids: list[int]) -> tuple[str, ...]:
    """Mostly substrings of the text itself (so they do occur, often across tokens and inside
    multibyte runs, U+FFFD included), plus strings that may never occur."""
    full = tok.decode(ids)
    stops = []
    for _ in range(rng.randint(1, 3)):
        if full and rng.random() < 0.75:
            a = rng.randrange(len(full))
            stops.append(full[a:a + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(WORDS) + rng.choice(["", " ", "x"]))
    return tuple(stops)


@pytest.mark.parametrize("name", ["golden", "tiny", "keepspace"])
def test_random_ids_stream_exactly_without_stops(tokenizers, name):
    tok = tokenizers[name]
    rng = random.Random(f"nostop-{name}")
    for _ in range(400):
        check(tok, random_ids(rng, tok, rng.randint(1, 40)))


@pytest.mark.parametrize("keep_stop", [False, True], ids=["cut_before", "include_stop_str_in_output"])
@pytest.mark.parametrize("name", ["golden", "tiny", "keepspace"])
def test_random_ids_cut_at_first_stop(tokenizers, name, keep_stop):
    tok = tokenizers[name]
    rng = random.Random(f"stop-{name}")
    stopped = 0
    for _ in range(400):
        ids = random_ids(rng, tok, rng.randint(1, 40))
        stops = random_stops(rng, tok, ids)
        stream = check(tok, ids, stops, keep_stop=keep_stop)
        stopped += stream.stopped
        assert not (keep_stop and stream.stopped) or stream.text.endswith(stops)
    assert stopped > 200  # the stops mostly do occur, so the cut path is well exercised


@pytest.mark.parametrize("name", ["golden", "keepspace"])
def test_control_ids_anywhere(tokenizers, name):
    # The engine never pushes EOS, but a model may sample BOS, even many times before any text.
    tok = tokenizers[name]
    rng = random.Random(f"controls-{name}")
    for _ in range(200):
        ids = random_ids(rng, tok, rng.randint(1, 30), controls=True)
        check(tok, ids)
        check(tok, ids, random_stops(rng, tok, ids))
    bos, space = tok.bos_id, tok.sp_model.piece_to_id("▁")
    a = tok.encode("a", bos=False, eos=False)
    for ids in ([bos] * 50 + a, [space, bos, bos] + a, [bos, space, bos, space] + a, [space] * 30 + a,
                [space, bos] + [space] + a):
        check(tok, ids)


@pytest.mark.parametrize("name", ["golden", "tiny", "keepspace"])
def test_encoded_texts(tokenizers, name):
    tok = tokenizers[name]
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        stream = check(tok, ids)
        # Complete characters only: no U+FFFD ever streamed for text that has none.
        assert "\ufffd" not in stream.text
        for a in range(0, len(text), 3):
            for n in (1, 2, 5):
                check(tok, ids, (text[a:a + n],))


def test_first_token_loses_its_leading_space(tokenizers):
    for tok in tokenizers.values():
        for text in ["  hello world", " x", "hello", "\u2581a"]:
            ids = tok.encode(text, bos=False, eos=False)
            stream = TextStream(tok)
            assert stream.push(ids[0]) == tok.decode(ids[:1])  # no space a whole decode would drop
            check(tok, ids)


def test_bare_space_pieces_at_the_start(tokenizers):
    # golden/tiny drop every leading "▁" while nothing is written; keepspace drops only the first.
    for name, tok in tokenizers.items():
        space = tok.sp_model.piece_to_id("▁")
        ids = [space, space] + tok.encode("hi there", bos=False, eos=False)
        stream = check(tok, ids)
        assert stream.text == ("  hi there" if name == "keepspace" else "hi there")


def test_incomplete_bytes_are_held_until_the_character_completes(golden_tok):
    tok = golden_tok
    e2, x82, xac = (byte_id(tok, b) for b in (0xE2, 0x82, 0xAC))
    a = tok.encode("a", bos=False, eos=False)

    stream = TextStream(tok)
    assert [stream.push(i) for i in (e2, x82, xac)] == ["", "", "€"]

    stream = TextStream(tok)
    stream.push(a[0])
    assert stream.push(e2) == "" and stream.push(x82) == ""
    assert stream.flush() == tok.decode(a + [e2, x82]).removeprefix("a")  # U+FFFD as decode shows it
    assert stream.text == tok.decode(a + [e2, x82])

    # A byte that cannot continue the sequence settles it: the broken bytes are final now.
    stream = TextStream(tok)
    assert stream.push(e2) == ""
    assert stream.push(a[0]) == tok.decode([e2] + a)
    assert stream.flush() == ""

    # 😀 as four byte pieces right after text, each partial push streaming nothing.
    emoji = [byte_id(tok, b) for b in "😀".encode()]
    ids = tok.encode("hi", bos=False, eos=False) + emoji
    stream = TextStream(tok)
    pushed = [stream.push(i) for i in ids]
    assert pushed[-4:] == ["", "", "", "😀"]
    assert "".join(pushed) == "hi😀"


def test_stop_string_split_across_tokens_is_never_partly_streamed(golden_tok):
    tok = golden_tok
    ids = tok.encode("hello world and more", bos=False, eos=False)
    stream = TextStream(tok, ("lo wo",))
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    assert stream.stopped and "".join(deltas) == "hel" == stream.text
    assert stream.flush() == ""


def test_stop_inside_multibyte_region(golden_tok):
    tok = golden_tok
    text = "café 😀 日本語 € end"
    ids = tok.encode(text, bos=False, eos=False)
    for stop, want in [("😀", "café "), ("本", "café 😀 日"), ("€", "café 😀 日本語 "), ("é 😀", "caf"),
                       ("€ end", "café 😀 日本語 "), ("😀 x", text)]:
        stream = check(tok, ids, (stop,))
        assert stream.text == want
        assert stream.stopped == (stop in text)
    # A stop string with U+FFFD matches decode's view of bytes still open (é is <0xC3><0xA9>), since
    # invariant 2 is defined on decode(ids pushed so far).
    assert check(tok, ids, ("\ufffd",)).text == "caf"
    e2, x82 = byte_id(tok, 0xE2), byte_id(tok, 0x82)
    stream = check(tok, tok.encode("ab", bos=False, eos=False) + [e2, x82], ("b\ufffd",))
    assert stream.stopped and stream.text == "a"


def test_stop_at_the_very_first_token(golden_tok):
    tok = golden_tok
    ids = tok.encode("hello world", bos=False, eos=False)
    first = tok.decode(ids[:1])
    stream = TextStream(tok, (first[:2],))
    assert stream.push(ids[0]) == "" and stream.stopped and stream.text == ""
    assert stream.flush() == ""
    with pytest.raises(RuntimeError):
        stream.push(ids[1])


def test_earliest_occurrence_wins_over_list_order(golden_tok):
    tok = golden_tok
    ids = tok.encode("hello world", bos=False, eos=False)
    stream = check(tok, ids, ("world", "lo"))
    assert stream.stopped and stream.text == "hel"
    # Both complete at the same push, the later-listed one starting earlier.
    stream = check(tok, ids, ("d", "o wor"))
    assert stream.text == "hell"


def test_held_stop_prefix_that_never_completes_is_flushed(golden_tok):
    tok = golden_tok
    ids = tok.encode("hello wor", bos=False, eos=False)
    stream = TextStream(tok, ("world",))
    streamed = "".join(stream.push(i) for i in ids)
    assert not stream.stopped and streamed == "hello " and stream.text == "hello "
    assert stream.flush() == "wor"
    assert stream.text == "hello wor"
    assert stream.flush() == ""


def test_flush_and_push_errors(golden_tok):
    tok = golden_tok
    stream = TextStream(tok)
    assert stream.flush() == "" and stream.flush() == "" and stream.text == ""
    with pytest.raises(RuntimeError):
        stream.push(tok.encode("a", bos=False, eos=False)[0])
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(tok, ("ok", ""))
    with pytest.raises(ValueError, match="vocabulary"):
        TextStream(tok).push(tok.n_words)


def test_work_per_push_is_bounded(golden_tok):
    """Total ids passed to decode grows linearly with the generation, not quadratically."""
    rng = random.Random(7)

    def decoded_ids(n: int, stop: tuple[str, ...]) -> tuple[int, int]:
        tok = load_tokenizer(golden_tok.path)
        calls, total = 0, 0
        real = tok.decode

        def counting(ids: list[int]) -> str:
            nonlocal calls, total
            calls, total = calls + 1, total + len(ids)
            return real(ids)

        tok.decode = counting
        ids: list[int] = []
        while len(ids) < n:
            ids += tok.encode(" ".join(rng.choice(WORDS) for _ in range(50)), bos=False, eos=False)
        stream = TextStream(tok, stop)
        calls, total = 0, 0
        for i in ids[:n]:
            stream.push(i)
        stream.flush()
        return calls, total

    for stop in [(), ("zzz", "\ufffd\ufffdq")]:
        calls, total = decoded_ids(2000, stop)
        assert calls <= 2 * 2000 and total < 20 * 2000, (calls, total)
        calls4, total4 = decoded_ids(4000, stop)
        assert total4 < 2.2 * total, (total, total4)


# ---- byte-level tokenizers (Llama 3): one incremental UTF-8 decoder ---------------------------
class ByteLevelTokenizer(Tokenizer):
    """A byte-level vocabulary, as Llama 3's: tokens are raw byte runs (whole characters, split
    characters, invalid bytes) and two control tokens whose decoded text is their name."""

    kind = "bytelevel"

    def __init__(self, pieces: list[bytes], specials: list[str]):
        self.pieces, self.specials = pieces, specials
        self.n_words = len(pieces) + len(specials)
        self.bos_id = self.eos_id = len(pieces)
        self.special_tokens = {s: len(pieces) + k for k, s in enumerate(specials)}
        self.path = Path("bytelevel")

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        data, ids = s.encode("utf-8"), []
        while data:  # greedy longest match: good enough to build test sequences
            k = max((i for i, p in enumerate(self.pieces) if p and data.startswith(p)), key=lambda i: len(self.pieces[i]))
            ids.append(k)
            data = data[len(self.pieces[k]):]
        return ids

    def decode(self, t: list[int]) -> str:
        out, run = [], b""
        for i in t:
            if i < len(self.pieces):
                run += self.pieces[i]
            else:  # a control token: its text, after the bytes before it (as tiktoken joins bytes)
                out.append(run.decode("utf-8", "replace") + self.specials[i - len(self.pieces)])
                run = b""
        return "".join(out) + run.decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id] if token_id < len(self.pieces) else b""


@pytest.fixture(scope="module")
def bytelevel() -> ByteLevelTokenizer:
    chars = "aé€😀日 x\n"
    pieces = [bytes([b]) for b in range(256)] + [c.encode() for c in chars] + [w.encode() for w in WORDS]
    pieces += [c.encode()[:2] for c in "€😀日"] + [c.encode()[1:] for c in "€😀日"] + [b"\xe2\x82\xac\xf0", b"\x9f\x98"]
    return ByteLevelTokenizer(pieces, ["<|begin_of_text|>", "<|eot_id|>"])


def test_byte_level_streams_exactly_with_split_and_invalid_bytes_and_control_tokens(bytelevel):
    rng = random.Random("bytelevel")
    stopped = 0
    for _ in range(600):
        ids = [rng.randrange(bytelevel.n_words) if rng.random() < 0.3 else rng.randrange(256, bytelevel.n_words - 2)
               for _ in range(rng.randint(1, 40))]
        check(bytelevel, ids)
        stopped += check(bytelevel, ids, random_stops(rng, bytelevel, ids)).stopped
    assert stopped > 250


def test_byte_level_include_stop_str_and_skip_special_tokens(bytelevel):
    rng = random.Random("bytelevel-vllm")
    kept = skipped = 0
    specials = list(bytelevel.special_tokens.values())
    for _ in range(400):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(bytelevel.n_words) if rng.random() < 0.3
               else rng.randrange(256, bytelevel.n_words - 2) for _ in range(rng.randint(1, 40))]
        stops = random_stops(rng, bytelevel, ids)
        kept += check(bytelevel, ids, stops, keep_stop=True).stopped
        text = check(bytelevel, ids, skip_special=True).text
        skipped += "<|" in bytelevel.decode(ids) and "<|" not in text
        check(bytelevel, ids, stops, keep_stop=True, skip_special=True)
    assert kept > 150 and skipped > 100
    eot = bytelevel.special_tokens["<|eot_id|>"]
    stream = TextStream(bytelevel, ("x<|",), skip_special=True)  # a skipped token's text cannot match
    assert [stream.push(t) for t in (bytelevel.encode("x", False, False)[0], eot)] == ["", ""]
    assert not stream.stopped and stream.flush() == "x"


def test_byte_level_holds_a_split_character_until_it_completes(bytelevel):
    euro = bytelevel.pieces.index("€".encode()[:2]), bytelevel.pieces.index(b"\xac")
    stream = TextStream(bytelevel)
    assert stream.push(euro[0]) == "" and stream.push(euro[1]) == "€"
    assert TextStream(bytelevel).push(bytelevel.special_tokens["<|eot_id|>"]) == "<|eot_id|>"
