"""Text: the host-side caption tokenizers, text encoders and the trainable text aligner."""

from .._registry import Registry
from ._abstract import AbstractTextEncoder as AbstractTextEncoder
from ._caption_tokenizer import CAPTION_TOKENIZERS as CAPTION_TOKENIZERS
from ._caption_tokenizer import AbstractCaptionTokenizer as AbstractCaptionTokenizer
from ._caption_tokenizer import caption_tokenizer_record as caption_tokenizer_record

TEXT_ENCODERS: Registry = Registry("text encoder", AbstractTextEncoder, "fluid.text_encoders")

# The name the rest of fluid annotates caption tokenizers with.
CaptionTokenizer = AbstractCaptionTokenizer

from ._aligner import TextAligner as TextAligner
from ._class_labels import ClassLabelEncoder as ClassLabelEncoder
from ._class_labels import ClassLabelTokenizer as ClassLabelTokenizer
from ._class_labels import load_mar_class_labels as load_mar_class_labels
from ._learned import LearnedTextEncoder as LearnedTextEncoder
from ._load import load_caption_tokenizer as load_caption_tokenizer
from ._sentencepiece import TextTokenizer as TextTokenizer
from ._sentencepiece import train_text_tokenizer as train_text_tokenizer
from ._t5 import T5TextEncoder as T5TextEncoder
from ._t5_tokenizer import T5CaptionTokenizer as T5CaptionTokenizer

TEXT_ENCODERS.register("learned", LearnedTextEncoder)
TEXT_ENCODERS.register("t5", T5TextEncoder)
TEXT_ENCODERS.register("class_labels", ClassLabelEncoder)
CAPTION_TOKENIZERS.register("sentencepiece", TextTokenizer)
CAPTION_TOKENIZERS.register("t5", T5CaptionTokenizer)
CAPTION_TOKENIZERS.register("class_labels", ClassLabelTokenizer)
