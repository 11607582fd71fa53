"""Writes notebooks/ism_colab_tpu.ipynb from the cells below (edit here, then run this script).

    python scripts/make_notebook.py
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# ISM on a Colab TPU

Train a small chat model with the **Intermittent Semi-working Mask** (ISM) on the Chit-Chat corpus, then talk
to it while watching the KV cache carry over from round to round.

*Runtime → Change runtime type → TPU (v5e-1).* The notebook also runs on CPU or GPU (slowly on CPU).

What ISM is: in a dialogue `Q1 A1 Q2 A2 …` every user query block is bidirectional within itself, answers are
causal, and no token ever sees a later block. One sequence trains every round, and the keys/values of past
rounds never change, so the cache is reused at inference."""),
    ("code", """# Parameters. The test suite runs this notebook on CPU with TINY = True (seconds of training).
TINY = False  # tiny model and a few steps (for CI); False = the real run on the TPU
INSTALL = True  # clone and install the package (False when it is already installed)
REPO_URL = "https://github.com/ism-jax/ism_jax.git"  # the repository to install (your fork or clone)
WORKDIR = "/content/ism_run"  # checkpoints, metrics and the tokenizer of this run
DATA_DIR = "/content/data"  # the chitchat dataset is built here (about a minute)"""),
    ("md", "## 1. Install\nClones the repository and installs it with its pinned dependencies."),
    ("code", """import os
import subprocess
import sys

REPO_DIR = os.path.abspath("ism_jax_repo" if INSTALL else ".")  # holds configs/
if INSTALL:
  if not os.path.isdir(REPO_DIR):
    clone = subprocess.run(["git", "clone", "--depth", "1", REPO_URL, REPO_DIR],
                           capture_output=True, text=True)
    if clone.returncode:
      raise RuntimeError(f"could not clone REPO_URL={REPO_URL!r} ({clone.stderr.strip()}); set REPO_URL "
                         "in the parameters cell to the git URL of your copy of ism_jax")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_DIR], check=True)
  sys.path.insert(0, REPO_DIR)"""),
    ("md", "## 2. Devices"),
    ("code", """import jax

print("backend:", jax.default_backend())
for device in jax.devices():
  print(" ", device.device_kind, device)"""),
    ("md", """## 3. The mask of an example dialogue

A system prompt and a user message form the first query block (they arrive together); then an answer, a
second query and a second answer. Each mask is built from the per-token `segment_types` alone."""),
    ("code", """import jax.numpy as jnp
import matplotlib.pyplot as plt
from ism_jax import SegmentType, make_attention_mask

Q, A = SegmentType.QUERY, SegmentType.ANSWER
labels = ["sys", "sys", "usr", "usr", "ans", "ans", "ans", "usr", "usr", "ans", "ans"]
segment_types = jnp.array([[Q, Q, Q, Q, A, A, A, Q, Q, A, A]])

fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
for ax, kind in zip(axes, ["causal", "prefix", "ism"]):
  mask = make_attention_mask(segment_types, kind=kind)[0]
  ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
  ax.set_title(kind)
  ax.set_xticks(range(len(labels)), labels, rotation=90)
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xlabel("key")
axes[0].set_ylabel("query")
plt.tight_layout()
plt.show()"""),
    ("md", """ISM differs from causal only inside each query block (the open upper triangles); unlike
prefix, the first round never sees the second, so its keys and values stay valid when the dialogue grows."""),
    ("md", """## 4. Train on Chit-Chat

The run config starts from `configs/scratch_tiny.py`. On a TPU the model is larger, computes in bfloat16 and
attention runs in the block-sparse Pallas TPU kernel (`attention_impl = "auto"`)."""),
    ("code", """from ism_jax.training import config as config_lib
from ism_jax.training.loop import train

config = config_lib.load_config_file(os.path.join(REPO_DIR, "configs", "scratch_tiny.py"))
config.data.data_dir = DATA_DIR
on_tpu = jax.default_backend() == "tpu"
if on_tpu and not TINY:
  config.model.embed_dim, config.model.num_layers, config.model.mlp_dim = 512, 8, 1536
  config.model.num_heads, config.model.num_kv_heads, config.model.head_dim = 8, 4, 64
  config.model.compute_dtype = "bfloat16"
  config.training.global_batch_size = 32
  config.training.num_steps = 1500
if TINY:
  config.model.embed_dim, config.model.num_layers, config.model.mlp_dim = 64, 2, 128
  config.model.num_heads, config.model.num_kv_heads, config.model.head_dim = 2, 1, 32
  config.data.seq_len = 128
  config.data.eval_max_dialogues = 8
  config.training.num_steps = 12
  config.training.log_every = 2
  config.training.eval_every = 0
  config.training.checkpoint_every = 12
  config.sample.enabled = False
print("attention:", config.model.attention_impl, "| mask:", config.model.mask)
summary = train(config, WORKDIR)"""),
    ("md", "## 5. Loss curve"),
    ("code", """from ism_jax.training.metrics import read_metrics

records = [r for r in read_metrics(WORKDIR) if "loss" in r]
plt.figure(figsize=(6, 3.5))
plt.plot([r["step"] for r in records], [r["loss"] for r in records])
plt.xlabel("step")
plt.ylabel("train loss (answer tokens)")
plt.title("ISM on Chit-Chat")
plt.show()"""),
    ("md", """## 6. Chat, reusing the KV cache

`ChatSession` keeps the cache between rounds: each round prefills only its new query block, so the time to
first token stays flat as the conversation grows. For comparison, a session with the `prefix` mask must
recompute the whole history every round (its mask changes the keys and values of earlier rounds). Each
session first holds the same conversation once and forgets it, so that every program the timed rounds
need is already compiled."""),
    ("code", """from ism_jax.inference import ChatSession

MAX_LEN = 128 if TINY else 1024
sessions = {kind: ChatSession.load(WORKDIR, max_len=MAX_LEN, max_new_tokens=8 if TINY else 48, kind=kind)
            for kind in ("ism", "prefix")}
questions = ["Hi! How was your weekend?", "What did you eat?", "Do you like cooking?", "What about tomorrow?",
             "Any plans for the holidays?", "Sounds fun. Who is going?"]
for session in sessions.values():  # warm-up conversation: compiles the prefill and decode programs
  for question in questions:
    session.ask(question)
  session.reset()
ttft_ms = {kind: [] for kind in sessions}
for round_index, question in enumerate(questions, 1):
  cached = len(sessions["ism"].tokens())
  answers = {kind: session.ask(question) for kind, session in sessions.items()}
  for kind, session in sessions.items():
    ttft_ms[kind].append(1000 * session.stats["ttft_s"])
  print(f"round {round_index}: {cached} tokens already cached | time to first token: "
        f"ism {ttft_ms['ism'][-1]:.1f} ms, prefix {ttft_ms['prefix'][-1]:.1f} ms")
  print(f"  user:      {question}")
  print(f"  assistant: {answers['ism']}")"""),
    ("code", """rounds = range(1, len(questions) + 1)
plt.figure(figsize=(6, 3.5))
for kind, label in (("ism", "ism (cache reused)"), ("prefix", "prefix (history recomputed)")):
  plt.plot(rounds, ttft_ms[kind], marker="o", label=label)
plt.xlabel("round")
plt.ylabel("time to first token (ms)")
plt.legend()
plt.show()"""),
]


def build() -> nbformat.NotebookNode:
  cells = []
  for kind, source in CELLS:
    cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
    if kind == "code" and source.startswith("# Parameters."):
      cell.metadata["tags"] = ["parameters"]
    cells.append(cell)
  notebook = new_notebook(cells=cells)
  notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  notebook.metadata["accelerator"] = "TPU"
  notebook.metadata["colab"] = {"provenance": [], "gpuType": "V5E1"}
  return notebook


if __name__ == "__main__":
  path = os.path.join(os.path.dirname(__file__), "..", "notebooks", "ism_colab_tpu.ipynb")
  nbformat.write(build(), path)
  print("wrote", os.path.normpath(path))
