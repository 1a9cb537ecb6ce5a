"""The zoo tokenizer: word-level, one token per digit, BOS prepended.

Word-level keeps every slot of the corpus templates a whole number of tokens (a trigger word is
exactly one token, a PIN exactly four), which is what makes counterfactuals position-aligned.
The post-processor prepends ``<bos>`` and appends nothing, so ``tokenizer(prompt)`` is a prefix
of ``tokenizer(prompt + continuation)``, as :func:`rca.model.metric.encode_target` expects.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["PAD", "UNK", "BOS", "EOS", "MAX_LENGTH", "train_tokenizer"]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
MAX_LENGTH = 128  # the models' n_positions


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train a WordLevel tokenizer on ``texts`` and wrap it for transformers.

    Special ids are fixed: pad 0, unk 1, bos 2, eos 3. The vocabulary is in order of frequency
    (ties by the trainer's order), so the same texts give the same ids.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS], min_frequency=1)
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    # WordLevel has no decoder of its own; join the words with spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
    )
