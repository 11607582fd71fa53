"""Exports a training workdir's model as a Hugging Face checkpoint (safetensors, config.json, tokenizer).

    python scripts/export_hf.py --workdir runs/default --out exports/smollm2-ism
    python scripts/export_hf.py --workdir runs/default --out exports/smollm2-ism --reference

The run's ``init_from`` (a Hugging Face directory, a ``.gguf`` file or ``smollm2``) gives the architecture
and the config fields kept (token ids, context length); the workdir's own tokenizer files are copied. With
``--reference`` the export also holds ``ism_jax_logits.npz``: this model's float32 causal logits on a chat,
which ``scripts/make_gguf_fixtures.py --verify OUT`` compares with what transformers computes from the
export (the check of docs/HF.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ism_jax.convert import load_hf_tokenizer, save_hf_model  # noqa: E402
from ism_jax.convert.pretrained import resolve  # noqa: E402
from ism_jax.data.dialogue import Message  # noqa: E402
from ism_jax.masks import SegmentType  # noqa: E402
from ism_jax.workdir import restore  # noqa: E402

CHAT = [Message("user", "Hi! What should I cook tonight?"), Message("assistant", "How about a quick pasta?"),
        Message("user", "Sounds good. Which sauce?"), Message("assistant", "Tomato and basil is easy.")]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="training run directory")
  parser.add_argument("--out", required=True, help="output directory (created)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--reference", action="store_true", help="also write ism_jax_logits.npz")
  args = parser.parse_args(argv)
  restored = restore(args.workdir, model_overrides={"compute_dtype": "float32", "attention_impl": "xla"})
  run_config, model, tokenizer_path = restored.run_config, restored.model, restored.tokenizer_path
  source = resolve(run_config.init_from) if run_config.init_from else None
  files = save_hf_model(model, args.out, source=source, dtype=args.dtype)
  if os.path.isdir(tokenizer_path):  # the tokenizer the run trained with, as it was installed
    for name in os.listdir(tokenizer_path):
      shutil.copyfile(os.path.join(tokenizer_path, name), os.path.join(args.out, name))
  print(f"wrote {', '.join(files)} and config.json to {args.out}")
  if args.reference:
    tokenizer = load_hf_tokenizer(args.out)
    tokens = tokenizer.encode_dialogue(CHAT).tokens
    types = np.full((1, len(tokens)), SegmentType.ANSWER, np.int32)
    logits = np.asarray(model(tokens[None], types, kind="causal")[0], np.float32)
    text = "Tomato and basil is easy, 123 ok?"
    np.savez(os.path.join(args.out, "ism_jax_logits.npz"), tokens=tokens, logits=logits, text=np.array(text),
             text_ids=np.array(tokenizer.encode(text)))
    print(f"wrote {args.out}/ism_jax_logits.npz ({logits.shape[0]} positions)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
