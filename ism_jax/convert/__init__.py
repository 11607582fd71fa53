"""Hugging Face Llama / Qwen2 / Mistral checkpoints in and out (see docs/HF.md).

    config, model = load_hf_model("/ckpt/Qwen2.5-0.5B-Instruct", mesh=mesh, scan_layers=True)
    tokenizer = load_hf_tokenizer("/ckpt/Qwen2.5-0.5B-Instruct")  # tokenizer + its chat format
    example = tokenizer.encode_dialogue(messages)  # EncodedDialogue with the ISM query/answer split
    save_hf_model(model, "/out/finetuned", source="/ckpt/Qwen2.5-0.5B-Instruct")
"""

from ism_jax.convert.hf_chat import ChatMLFormat, HFChatTokenizer, Llama3Format, load_hf_tokenizer
from ism_jax.convert.hf_config import (ARCHITECTURES, HFConversionError, hf_config_from_model,
                                       model_config_from_hf)
from ism_jax.convert.hf_tokenizer import HFTokenizer
from ism_jax.convert.hf_weights import load_hf_model, load_weights, save_hf_model

__all__ = [
    "ARCHITECTURES",
    "ChatMLFormat",
    "HFChatTokenizer",
    "HFConversionError",
    "HFTokenizer",
    "Llama3Format",
    "hf_config_from_model",
    "load_hf_model",
    "load_hf_tokenizer",
    "load_weights",
    "model_config_from_hf",
    "save_hf_model",
]
