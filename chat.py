"""Chat with a trained model, interactively or over a JSONL file of conversations.

    python chat.py --workdir runs/default                                    # interactive
    python chat.py --workdir runs/default --input chats.jsonl --output answers.jsonl
    python chat.py --pretrained smollm2                  # SmolLM2-135M-Instruct as shipped (causal mask)

``--pretrained`` takes ``smollm2``, a ``.gguf`` file or a Hugging Face checkpoint directory and chats with
the untouched model under the causal mask it was pretrained with (``--kind`` to try another).

The KV cache is kept between rounds (``ism``, ``causal``); a ``prefix`` model recomputes its history each
round. Sampling: ``--temperature 0`` (default) is greedy; ``--top_k`` and ``--top_p`` restrict sampling.

JSONL input, one conversation per line (every other field, e.g. ``"id"``, is copied to the output):

* ``{"turns": ["first user message", "second", ...], "system": "optional"}``: one answer per turn.
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI) or ``{"conversations": [...]}``
  (ShareGPT): the assistant messages given are kept as history; the final query block (the messages after
  the last assistant message) is answered.

Output, one line per input line and in the same order::

    {"id": ..., "answers": ["...", ...], "stop_reasons": ["end_of_turn", ...], "messages": [...]}

with ``"error"`` instead of the remaining answers when a conversation does not fit in ``--max_len``.
Conversations run ``--batch_size`` at a time; a finished one frees its row for the next.
See docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Iterator, TextIO

from ism_jax.data.dialogue import (DataFormatError, Message, jsonl_records, parse_openai_record,
                                   parse_sharegpt_record, split_dialogue)
from ism_jax.inference.dialogues import PromptTooLongError
from ism_jax.inference.sampling import SamplingParams
from ism_jax.masks import MASK_KINDS


@dataclasses.dataclass
class Conversation:
  """One input line as rounds: ``(query messages, given answer or None = generate)``."""

  extra: dict[str, Any]  # fields copied to the output (e.g. "id")
  rounds: list[tuple[list[Message], str | None]]
  answers: list[str] = dataclasses.field(default_factory=list)
  stop_reasons: list[str] = dataclasses.field(default_factory=list)
  messages: list[Message] = dataclasses.field(default_factory=list)
  error: str | None = None
  next_round: int = 0

  def output(self) -> dict[str, Any]:
    record = dict(self.extra, answers=self.answers, stop_reasons=self.stop_reasons,
                  messages=[{"role": m.role, "content": m.content} for m in self.messages])
    if self.error is not None:
      record["error"] = self.error
    return record


def parse_conversation(record: Any, where: str, system: str | None) -> Conversation:
  """Turns one JSON record into rounds (see the module docstring for the accepted shapes)."""
  if not isinstance(record, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "turns" in record:
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
      raise DataFormatError(f"{where}: \"turns\" must be a non-empty list of strings")
    first_system = record.get("system", system)
    if first_system is not None and not isinstance(first_system, str):
      raise DataFormatError(f"{where}: \"system\" must be a string")
    rounds = [([Message("user", t)], None) for t in turns]
    if first_system:
      rounds[0] = ([Message("system", first_system)] + rounds[0][0], None)
    extra = {k: v for k, v in record.items() if k not in ("turns", "system")}
    return Conversation(extra=extra, rounds=rounds)
  if "messages" in record:
    messages, field = parse_openai_record(record, where), "messages"
  elif "conversations" in record:
    messages, field = parse_sharegpt_record(record, where), "conversations"
  else:
    raise DataFormatError(f"{where}: expected a \"turns\", \"messages\" (OpenAI) or \"conversations\" "
                          f"(ShareGPT) field, found {sorted(record)}")
  if system and not any(m.role == "system" for m in messages):
    messages = [Message("system", system)] + messages
  complete, pending = split_dialogue(messages)
  if not pending:
    raise DataFormatError(f"{where}: nothing to answer: the conversation does not end with a user, system or "
                          "tool message; append the query to answer, or use {\"turns\": [...]}")
  rounds = [(list(r.query), r.answer.content) for r in complete] + [(list(pending), None)]
  extra = {k: v for k, v in record.items() if k not in (field, "system")}
  return Conversation(extra=extra, rounds=rounds)


def read_conversations(stream: TextIO, name: str, system: str | None) -> Iterator[Conversation]:
  """The conversations of a JSONL stream, in order (errors name ``name:line``)."""
  for where, record in jsonl_records(stream, name):
    yield parse_conversation(record, where, system)


def _start(chat, row: int, conversation: Conversation) -> None:
  """Puts a conversation into a free row and appends its leading given rounds."""
  chat.reset([row])
  _advance_given(chat, row, conversation)


def _advance_given(chat, row: int, conversation: Conversation) -> None:
  while conversation.next_round < len(conversation.rounds):
    query, answer = conversation.rounds[conversation.next_round]
    if answer is None:
      return
    try:
      chat.add_round(row, query, answer)
    except PromptTooLongError as e:
      conversation.error = str(e)
      return
    conversation.messages += query + [Message("assistant", answer)]
    conversation.next_round += 1


def _finished(conversation: Conversation) -> bool:
  return conversation.error is not None or conversation.next_round >= len(conversation.rounds)


def answer_all(chat, conversations: list[Conversation], write, max_new_tokens: int) -> None:
  """Runs every conversation through ``chat`` (a ChatBatch), ``batch_size`` at a time; a finished one frees
  its row for the next. Outputs go through ``write(record)`` in input order."""
  source = iter(enumerate(conversations))
  rows: list[tuple[int, Conversation] | None] = [None] * chat.batch_size
  outputs: dict[int, dict] = {}
  written = 0
  while True:
    for b in range(chat.batch_size):
      while rows[b] is None or _finished(rows[b][1]):
        if rows[b] is not None:
          outputs[rows[b][0]] = rows[b][1].output()
          rows[b] = None
        rows[b] = next(source, None)
        if rows[b] is None:
          break
        _start(chat, b, rows[b][1])
    while written in outputs:
      write(outputs.pop(written))
      written += 1
    if all(r is None for r in rows):
      return
    queries = [None] * chat.batch_size
    for b, item in enumerate(rows):
      if item is not None:
        query = item[1].rounds[item[1].next_round][0]
        item[1].error = chat.room_problem(b, query)
        queries[b] = query if item[1].error is None else None
    if all(q is None for q in queries):
      continue
    answers = chat.ask(queries, max_new_tokens=max_new_tokens)
    for b, answer in enumerate(answers):
      if answer is not None:
        conversation = rows[b][1]
        conversation.messages += list(queries[b]) + [Message("assistant", answer)]
        conversation.answers.append(answer)
        conversation.stop_reasons.append(chat.last_round.stop_reasons[b])
        conversation.next_round += 1
        _advance_given(chat, b, conversation)


def interactive(session, show_stats: bool, stdin: TextIO, stdout: TextIO) -> None:
  """A read-answer loop: ``/reset`` starts a new conversation, ``/quit`` (or end of input) leaves."""
  print(f"chat ({session.kind} mask, {session.engine.max_len}-token cache). /reset starts over, /quit "
        "leaves.", file=stdout)
  while True:
    print("you> ", end="", file=stdout, flush=True)
    line = stdin.readline()
    if not line or line.strip() == "/quit":
      print(file=stdout)
      return
    text = line.rstrip("\n")
    if text.strip() == "/reset":
      session.reset()
      print("(new conversation)", file=stdout)
      continue
    if not text.strip():
      continue
    try:
      answer = session.ask(text)
    except PromptTooLongError as e:
      print(f"error: {e}", file=stdout)
      continue
    print(f"model> {answer}", file=stdout)
    if show_stats:
      s = session.stats
      print(f"  (first token {s['ttft_s'] * 1e3:.1f} ms, {s['decode_tokens_per_s']:.1f} tokens/s)",
            file=stdout)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training run directory (checkpoints + tokenizer)")
  source.add_argument("--pretrained", help="'smollm2', a .gguf file or a Hugging Face checkpoint directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--input", default=None, help="JSONL conversations to answer (non-interactive mode)")
  parser.add_argument("--output", default="-", help="where to write answers as JSONL ('-' = stdout)")
  parser.add_argument("--kind", choices=MASK_KINDS, default=None,
                      help="mask kind (default: the run's; causal with --pretrained)")
  parser.add_argument("--max_len", type=int, default=None,
                      help="KV cache slots per conversation (default: the run's data.seq_len; 2048 with "
                           "--pretrained)")
  parser.add_argument("--max_new_tokens", type=int, default=256, help="answer token budget per round")
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass; 1 = all")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--system", default=None, help="system prompt for conversations that have none")
  parser.add_argument("--batch_size", type=int, default=8, help="conversations run together (JSONL mode)")
  parser.add_argument("--attention_impl", default=None, help="override the model's attention_impl")
  parser.add_argument("--stats", action="store_true", help="print time to first token and tokens/s")
  return parser


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
  args = build_parser().parse_args(argv)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)  # orbax's informational warnings while restoring the checkpoint
  from ism_jax.inference.session import ChatBatch, ChatSession  # pylint: disable=import-outside-toplevel
  try:
    conversations = []
    if args.input is not None:  # every line is checked before the model is loaded
      with open(args.input, encoding="utf-8") as f:
        conversations = list(read_conversations(f, args.input, args.system))
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    batch_size = 1 if args.input is None else args.batch_size
    common = dict(attention_impl=args.attention_impl, batch_size=batch_size,
                  max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                  system=args.system if args.input is None else None)
    if args.pretrained is not None:
      chat = ChatBatch.pretrained(args.pretrained, kind=args.kind or "causal", max_len=args.max_len or 2048,
                                  **common)
    else:
      chat = ChatBatch.load(args.workdir, step=args.step, max_len=args.max_len, kind=args.kind, **common)
    if args.input is None:
      interactive(ChatSession.from_batch(chat), args.stats, stdin, stdout)
      return 0
    out = stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
      write = lambda record: print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
      answer_all(chat, conversations, write, args.max_new_tokens)
    finally:
      if out is not stdout:
        out.close()
    print(f"answered {len(conversations)} conversations from {args.input}", file=sys.stderr)
    return 0
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
