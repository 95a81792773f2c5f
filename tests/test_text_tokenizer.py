"""The host-side SentencePiece caption tokenizer."""

import json
import typing

import numpy as np
import pytest

from fluid import CAPTION_TOKENIZERS, AbstractCaptionTokenizer, InvalidComponentError
from fluid.data.shapes import caption_corpus
from fluid.text import TextTokenizer, load_caption_tokenizer, train_text_tokenizer

PAD, BOS, EOS, UNK = 0, 1, 2, 3
CORPUS = caption_corpus(500)


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(CORPUS, vocab_size=64)


def test_round_trip(tok):
    captions = CORPUS[:50]
    ids, mask = tok.encode(captions, 24)
    assert tok.decode(ids) == captions
    for row, caption in zip(ids, captions):
        assert tok.decode(row) == caption
    # The word model gives one id per word of the closed shapes vocabulary.
    assert tok.pieces("a red circle to the left of a square") == [
        "▁a", "▁red", "▁circle", "▁to", "▁the", "▁left", "▁of", "▁a", "▁square"
    ]


def test_padding_and_mask(tok):
    ids, mask = tok.encode(["a red circle", "two squares", "a circle and a blue square"], 12)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (3, 12)
    lengths = mask.sum(1)
    np.testing.assert_array_equal(lengths, [5, 4, 8])  # BOS + words + EOS
    for row, m, n in zip(ids, mask, lengths):
        np.testing.assert_array_equal(m, np.arange(12) < n)  # real tokens first, then padding
        assert row[0] == BOS and row[n - 1] == EOS
        assert np.all(row[n:] == PAD) and np.all(row[1 : n - 1] > UNK)
    assert ids.max() < tok.vocab_size


def test_truncation_keeps_eos(tok):
    ids, mask = tok.encode(["a circle to the left of a square"], 5)
    full, _ = tok.encode(["a circle to the left of a square"], 16)
    assert mask.all()
    np.testing.assert_array_equal(ids[0], [*full[0, :4], EOS])
    ids, mask = tok.encode(["a circle"], 2)
    np.testing.assert_array_equal(ids[0], [BOS, EOS])
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["a circle"], 1)


def test_empty_caption_is_bos_eos(tok):
    ids, mask = tok.encode(["", "a circle"], 6)
    np.testing.assert_array_equal(ids[0], [BOS, EOS, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(mask[0], [True, True, False, False, False, False])
    assert tok.decode(ids[0]) == ""
    ids, mask = tok.encode([], 6)
    assert ids.shape == mask.shape == (0, 6)


def test_unknown_words_and_bad_input(tok):
    ids, mask = tok.encode(["a circle zzzz"], 8)
    assert UNK in ids[0].tolist()
    # (Under the test suite's beartype hook the annotation may report it first.)
    with pytest.raises(TypeError, match="captions"):
        tok.encode(["a circle", 3], 8)
    with pytest.raises(TypeError, match="sequence of captions"):
        tok.encode("a circle", 8)
    with pytest.raises(TypeError, match="str"):
        train_text_tokenizer(["a circle", None])


def test_save_load_and_bytes(tok, tmp_path):
    path = tmp_path / "text.model"
    tok.save(path)
    loaded = TextTokenizer.load(path)
    again = TextTokenizer.from_bytes(tok.to_bytes())
    ids, mask = tok.encode(CORPUS[:40] + [""], 20)
    for other in (loaded, again):
        assert other.vocab_size == tok.vocab_size
        other_ids, other_mask = other.encode(CORPUS[:40] + [""], 20)
        np.testing.assert_array_equal(other_ids, ids)
        np.testing.assert_array_equal(other_mask, mask)


def test_training_is_deterministic():
    a = train_text_tokenizer(CORPUS, vocab_size=64)
    b = train_text_tokenizer(CORPUS, vocab_size=64)
    assert a.to_bytes() == b.to_bytes()


@pytest.mark.parametrize("model_type", ["word", "unigram", "bpe"])
def test_vocabulary_may_be_smaller_than_asked(model_type):
    tok = train_text_tokenizer(CORPUS, vocab_size=1000, model_type=model_type)
    assert 5 <= tok.vocab_size <= 1000
    ids, _ = tok.encode(CORPUS[:20], 32)
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == CORPUS[:20]


def test_rejects_models_with_other_special_ids():
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=20, model_type="word",
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="pad_id=0"):
        TextTokenizer.from_bytes(model.getvalue())


def test_save_records_the_class_and_the_loader_reads_it(tok, tmp_path):
    path = tmp_path / "text_tokenizer.model"
    tok.save(path)
    assert path.read_bytes() == tok.to_bytes()  # the model file stays SentencePiece's own
    record = json.loads((tmp_path / "text_tokenizer.json").read_text())
    assert record == {"caption_tokenizer": "sentencepiece"}
    assert CAPTION_TOKENIZERS.get(record["caption_tokenizer"]) is TextTokenizer
    loaded = load_caption_tokenizer(path)
    assert type(loaded) is TextTokenizer and loaded.to_bytes() == tok.to_bytes()
    (tmp_path / "text_tokenizer.json").write_text('{"caption_tokenizer": "nope"}')
    with pytest.raises(KeyError, match="unknown caption tokenizer 'nope'"):
        load_caption_tokenizer(path)
    with pytest.raises(ValueError, match="must not end in .json"):
        tok.save(tmp_path / "tokenizer.json")


def test_a_tokenizer_file_without_a_record_still_loads(tok, tmp_path):
    # What run folders held before the record: the SentencePiece model alone.
    path = tmp_path / "text_tokenizer.model"
    path.write_bytes(tok.to_bytes())
    loaded = load_caption_tokenizer(path)
    assert type(loaded) is TextTokenizer and loaded.to_bytes() == tok.to_bytes()


@typing.final
class _Unregistered(AbstractCaptionTokenizer):
    vocab_size = 5

    def encode(self, captions, max_len):
        return np.ones((len(captions), max_len), np.int32), np.ones((len(captions), max_len), bool)

    def decode(self, ids):
        return ""

    def pieces(self, caption):
        return []

    def to_bytes(self):
        return b""

    @classmethod
    def from_bytes(cls, data):
        return cls()


def test_every_caption_tokenizer_implements_the_interface(tmp_path):
    for name in CAPTION_TOKENIZERS.names():
        assert issubclass(CAPTION_TOKENIZERS.get(name), AbstractCaptionTokenizer)
    # A class the loader could not find again is refused before anything is written.
    with pytest.raises(InvalidComponentError, match="not a registered caption tokenizer"):
        _Unregistered().save(tmp_path / "x.model")
    assert not list(tmp_path.iterdir())
