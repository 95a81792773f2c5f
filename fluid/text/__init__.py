"""Text: the host-side caption tokenizer, text encoders and the trainable text aligner."""

from .._registry import Registry
from ._abstract import AbstractTextEncoder as AbstractTextEncoder

TEXT_ENCODERS: Registry = Registry("text encoder", AbstractTextEncoder, "fluid.text_encoders")

from ._aligner import TextAligner as TextAligner  # noqa: E402
from ._learned import LearnedTextEncoder as LearnedTextEncoder  # noqa: E402
from ._sentencepiece import TextTokenizer as TextTokenizer  # noqa: E402
from ._sentencepiece import train_text_tokenizer as train_text_tokenizer  # noqa: E402

TEXT_ENCODERS.register("learned", LearnedTextEncoder)
