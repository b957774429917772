"""Tokenizers round-trip any text, match Hugging Face's loader, and never inject control tokens."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luca.tokenizer import EOT, IM_END, IM_START, Tokenizer, byte_tokenizer, train_bpe

CORPUS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n",
    "The quick brown fox jumps over the lazy dog. 1234567890 times!\n",
    "Größe, naïve café — 東京 and emoji 🦊🦊 in a sentence.\r\n\ttabs\tand  spaces   ",
] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400)


TEXT = st.text(st.characters(codec="utf-8"), max_size=200)
CODEY = st.lists(st.sampled_from(["def ", "  ", "\n", "\t", "x=1", "ä", "🦊", "<|im_start|>", "'s", "123", " \n "]),
                 max_size=30).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(TEXT, CODEY))
def test_roundtrip_property(bpe, text):
    for tok in (bpe, byte_tokenizer()):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert not (set(ids) & tok.special_ids)


def test_vocab_size_exact_and_specials(bpe):
    assert 300 < bpe.vocab_size <= 400  # the trainer stops early when merges run out
    assert byte_tokenizer().vocab_size == 259
    assert byte_tokenizer().encode("A\xff") == [65, 0xC3, 0xBF]
    assert bpe.encode(EOT, allow_special=True) == [bpe.eot_id]
    assert bpe.encode(f"a{IM_START}b", allow_special=True)[1] == bpe.im_start_id


def test_digits_are_split_one_by_one(bpe):
    ids = bpe.encode("1234567890")
    assert len(ids) == 10


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_hf_fast_tokenizer_gives_identical_ids(tmp_path, bpe, kind):
    transformers = pytest.importorskip("transformers")
    tok = bpe if kind == "bpe" else byte_tokenizer()
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    for text in CORPUS[:3] + ["  leading spaces", "x\n\n\ny", "'S 'll CAPS"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    reloaded = Tokenizer.load(tmp_path)
    assert reloaded.encode(CORPUS[2]) == tok.encode(CORPUS[2])
    assert reloaded.kind == kind


def test_chat_template_matches_transformers(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    for gen in (False, True):
        for m in (msgs, msgs[1:]):
            assert hf.apply_chat_template(m, tokenize=False, add_generation_prompt=gen) == bpe.render_chat(m, gen)
    ids = bpe.encode_chat(msgs[1:2])
    # The user's literal "<|im_end|>" stays text: exactly one im_end id, the template's own.
    assert ids.count(bpe.im_end_id) == 1 and ids.count(bpe.im_start_id) == 1
    assert bpe.decode(ids) == bpe.render_chat(msgs[1:2])


def test_default_system_prompt_is_stored(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(bpe.tok, "bpe", default_system="You are luca.")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False) == tok.render_chat(msgs)
    assert Tokenizer.load(tmp_path).render_chat(msgs).startswith(f"{IM_START}system\nYou are luca.{IM_END}")
