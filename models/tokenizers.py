"""A small tokenizer for models with random weights that must still come with tokenizer files (onnxruntime-genai
folders, its model builder): byte-level BPE trained offline on CPython's documentation text."""
from __future__ import annotations


def byte_level_tokenizer(vocab_size: int = 512):
    """A transformers PreTrainedTokenizerFast with `vocab_size` entries (<unk>, <s>, </s> first)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
