"""What the zoo's tiny models share: a word-level tokenizer, chat templates, a text config, and
an image-only processor wrapper. Its own module so the per-family builders (``tiny_qwen3_vl.py``,
...) and ``tiny.py`` import it, not each other."""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "what is in the image ? a an of on color shape how many are there is it yes no left right top bottom "
    "red green blue yellow circle square triangle dog cat one two three four answer question describe "
    "picture with word single using phrase letter option from given choices directly ."
).split()
SPECIAL = [
    "<pad>", "<unk>", "<s>", "</s>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
    "<|vision_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>",
]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'video' %}<video>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(**extra_attrs) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary with every family's special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + ["USER:", "ASSISTANT:", "user", "assistant", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL[4:], **extra_attrs,
    )
    fast.padding_side = "left"
    return fast


def _text_config(vocab_size: int, **kw) -> dict:
    base = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def _finish(model, seed: int):
    model.eval()
    return model


def without_video(processor_cls):
    """``processor_cls`` accepting ``video_processor=None``.

    Video processors need torchvision, which we do not install (its PyPI wheel breaks the PIL
    image processors on CPU); transformers' processors refuse a missing one in their constructor.
    """

    class ImageOnlyProcessor(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = processor_cls.__name__
    return ImageOnlyProcessor


def _qwen_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
