"""Data: dialogues, the chat tokenizer and template, packing, TFDS datasets and the grain input pipeline.

Light modules are re-exported here; the TFDS/grain parts are imported from their modules so that inference
code does not pay for them: ``ism_jax.data.builders`` (datasets), ``ism_jax.data.import_jsonl`` (JSONL
import and CLI), ``ism_jax.data.pipeline`` (train iterator and eval batches), ``ism_jax.data.synthetic``
(the synthetic task and answer scoring). See docs/DATA.md.
"""

from ism_jax.data.chat_template import (
    EncodedDialogue,
    encode_answer,
    encode_dialogue,
    encode_query_block,
    stop_token_id,
)
from ism_jax.data.dialogue import (
    ANSWER_ROLE,
    QUERY_ROLES,
    ROLES,
    DataFormatError,
    Message,
    Round,
    parse_openai_record,
    parse_sharegpt_record,
    read_jsonl,
    split_rounds,
)
from ism_jax.data.packing import (
    FirstFitPacker,
    PackingStats,
    answer_numbers,
    expand_triplets,
    pack_examples,
    prepare_examples,
    select_targets,
    truncate_rounds,
)
from ism_jax.data.tokenizer import ChatTokenizer

__all__ = [
    "ANSWER_ROLE",
    "ChatTokenizer",
    "DataFormatError",
    "EncodedDialogue",
    "FirstFitPacker",
    "Message",
    "PackingStats",
    "QUERY_ROLES",
    "ROLES",
    "Round",
    "answer_numbers",
    "encode_answer",
    "encode_dialogue",
    "encode_query_block",
    "expand_triplets",
    "pack_examples",
    "parse_openai_record",
    "parse_sharegpt_record",
    "prepare_examples",
    "read_jsonl",
    "select_targets",
    "split_rounds",
    "stop_token_id",
    "truncate_rounds",
]
