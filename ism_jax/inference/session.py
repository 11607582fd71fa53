"""Chat with a trained model: text in, text out, the KV cache kept between rounds.

    session = ChatSession.load("runs/default")          # checkpoint + tokenizer + config of a training run
    session.ask("Hi! How are you?")                      # -> the model's answer (str)
    session.ask("And tomorrow?")                         # round 2 reuses round 1's cache (ism, causal)

Each round is laid out exactly as in training (:mod:`ism_jax.data.chat_template`): the query block
``[<s>] <|user|> text <|eot|> <|assistant|>`` then the answer ``content <|eot|>``. Decoding stops on the
end-of-turn token; an answer cut by the token budget gets its end of turn appended, so the history always
matches the training layout. Under ``ism`` and ``causal`` a round prefills only its own tokens; a ``prefix``
session re-runs the whole history every round (its mask makes cache reuse impossible).

:class:`ChatBatch` holds several independent conversations that advance together (one prefill and one decode
step per round for all of them); :class:`ChatSession` is a batch of one.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh

from ism_jax.data.chat_template import encode_answer, encode_query_block, stop_token_id
from ism_jax.data.dialogue import Message
from ism_jax.data.tokenizer import ChatTokenizer, check_vocab_fits
from ism_jax.inference.dialogues import DialogueBatch, PromptTooLongError, RoundResult
from ism_jax.inference.engine import DEFAULT_MIN_BUCKET, Engine
from ism_jax.inference.sampling import SamplingParams
from ism_jax.masks import SegmentType
from ism_jax.model import Transformer
from ism_jax.workdir import restore

Query = str | Sequence[Message]


class ChatBatch:
  """``batch_size`` independent conversations with one model, advanced round by round.

  Args:
    model: a trained :class:`~ism_jax.model.Transformer`.
    tokenizer: the tokenizer it was trained with: a :class:`~ism_jax.data.tokenizer.ChatTokenizer`, or a
      Hugging Face one (:func:`ism_jax.convert.load_hf_tokenizer`), whose own chat format is then used.
    batch_size: number of conversations.
    kind: mask kind the model was trained with (default ``model.config.mask``).
    max_len: KV cache slots per conversation (its longest dialogue in tokens).
    max_new_tokens: default answer token budget.
    sampling: default :class:`SamplingParams` (greedy by default).
    system: a system prompt put at the start of every conversation.
    mesh: run sharded on this mesh (the model must be sharded on it already).
    seed: sampling seed.
    min_bucket: smallest padded prefill length.
  """

  def __init__(self, model: Transformer, tokenizer: ChatTokenizer, *, batch_size: int = 1,
               kind: str | None = None, max_len: int = 2048, max_new_tokens: int = 256,
               sampling: SamplingParams = SamplingParams(), system: str | None = None,
               mesh: Mesh | None = None, seed: int = 0, min_bucket: int = DEFAULT_MIN_BUCKET):
    check_vocab_fits(tokenizer, model.config.vocab_size, "use the tokenizer the model was trained with")
    self.tokenizer = tokenizer
    self.kind = model.config.mask if kind is None else kind
    self.max_new_tokens = max_new_tokens
    self.sampling = sampling
    self.system = system
    self.engine = Engine(model, batch_size=batch_size, max_len=max_len, mesh=mesh, seed=seed,
                         min_bucket=min_bucket)
    self.dialogues = DialogueBatch(self.engine, kind=self.kind, eot_id=stop_token_id(tokenizer))
    self._messages: list[list[Message]] = [[] for _ in range(batch_size)]
    self.last_round: RoundResult | None = None

  @classmethod
  def load(cls, workdir: str, *, step: int | None = None, max_len: int | None = None,
           attention_impl: str | None = None, compute_dtype: str | None = None, **kwargs):
    """Builds a chat from a training workdir (latest checkpoint unless ``step``).

    ``max_len`` defaults to the run's ``data.seq_len`` (the longest dialogue it trained on);
    ``attention_impl``/``compute_dtype`` override the model config; other arguments as for the class.

    Raises:
      FileNotFoundError: naming the missing workdir, tokenizer file or checkpoint.
    """
    overrides = {k: v for k, v in (("attention_impl", attention_impl), ("compute_dtype", compute_dtype)) if v}
    run = restore(workdir, step, overrides)
    max_len = int(run.run_config.data.seq_len) if max_len is None else max_len
    return cls(run.model, run.tokenizer, max_len=max_len, **kwargs)

  @classmethod
  def pretrained(cls, source: str, *, kind: str = "causal", max_len: int = 2048,
                 attention_impl: str | None = None, compute_dtype: str | None = None, **kwargs):
    """A chat with an untouched pretrained model: a ``.gguf`` file, an HF directory or ``"smollm2"``.

    ``kind`` defaults to ``"causal"``: a pretrained chat model was trained with the causal mask, and
    another mask changes what it computes (docs/INFERENCE.md); fine-tune it with ISM first to chat under
    ``ism``. Other arguments as for :meth:`load`.
    """
    from ism_jax.convert import load_pretrained, load_pretrained_tokenizer  # pylint: disable=import-outside-toplevel
    if compute_dtype is None and jax.default_backend() == "cpu":
      compute_dtype = "float32"  # bfloat16 matmuls are slow on CPUs
    overrides = {k: v for k, v in (("attention_impl", attention_impl), ("compute_dtype", compute_dtype)) if v}
    _, model = load_pretrained(source, mask=kind, **overrides)
    return cls(model, load_pretrained_tokenizer(source), max_len=max_len, kind=kind, **kwargs)

  @property
  def batch_size(self) -> int:
    return self.engine.batch_size

  def history(self, row: int = 0) -> list[Message]:
    """The conversation of ``row`` so far (every round's query messages, then the answer)."""
    return list(self._messages[row])

  def reset(self, rows: Sequence[int] | None = None) -> None:
    """Starts new conversations in ``rows`` (all by default)."""
    rows = range(self.batch_size) if rows is None else list(rows)
    for b in rows:
      self._messages[b] = []
    self.dialogues.reset(rows)

  def _query_messages(self, row: int, query: Query) -> list[Message]:
    messages = [Message("user", query)] if isinstance(query, str) else list(query)
    if not self._messages[row] and self.system is not None:
      messages = [Message("system", self.system)] + messages
    return messages

  def _query_tokens(self, row: int, messages: list[Message]) -> list[int]:
    return encode_query_block(self.tokenizer, messages, first=len(self.dialogues.tokens(row)) == 0)

  def ask(self, queries: Sequence[Query | None], *, max_new_tokens: int | Sequence[int] | None = None,
          sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[str | None]:
    """One round: each conversation's query (a user text, or a list of system/user/tool messages) is
    answered; ``None`` skips a conversation this round. Returns the answer texts.

    Raises:
      PromptTooLongError: a conversation plus its query exceeds ``max_len`` (nothing is changed).
    """
    if len(queries) != self.batch_size:
      raise ValueError(f"expected {self.batch_size} queries (one per conversation, None to skip), got "
                       f"{len(queries)}")
    messages = [None if q is None else self._query_messages(b, q) for b, q in enumerate(queries)]
    tokens = [None if m is None else self._query_tokens(b, m) for b, m in enumerate(messages)]
    result = self.dialogues.ask(tokens, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                sampling=sampling or self.sampling)
    self.last_round = result
    answers = []
    for b, answer in enumerate(result.answers):
      if answer is None:
        answers.append(None)
        continue
      text = self.tokenizer.decode(answer)
      self._messages[b] += messages[b] + [Message("assistant", text)]
      answers.append(text)
    return answers

  def room_problem(self, row: int, query: Query) -> str | None:
    """Why ``query`` would not fit in conversation ``row`` now, or ``None`` when it fits."""
    tokens = self._query_tokens(row, self._query_messages(row, query))
    try:
      self.dialogues.check_room(row, len(tokens))
    except PromptTooLongError as e:
      return str(e)
    return None

  def add_round(self, row: int, query: Query, answer: str) -> None:
    """Appends a finished round (e.g. an earlier answer given in the input) without generating.

    Its tokens reach the cache with the next :meth:`ask`, laid out exactly as in training.
    """
    messages = self._query_messages(row, query)
    query_tokens = self._query_tokens(row, messages)
    answer_tokens = encode_answer(self.tokenizer, answer)
    self.dialogues.check_room(row, len(query_tokens) + len(answer_tokens))
    self.dialogues.append(row, query_tokens, SegmentType.QUERY)
    self.dialogues.append(row, answer_tokens, SegmentType.ANSWER)
    self._messages[row] += messages + [Message("assistant", answer)]


class ChatSession:
  """One conversation: ``ask(text) -> answer``, the KV cache kept between rounds.

  Arguments as for :class:`ChatBatch` (without ``batch_size``); :meth:`load` builds one from a training
  workdir.
  """

  def __init__(self, model: Transformer, tokenizer: ChatTokenizer, **kwargs):
    if kwargs.pop("batch_size", 1) != 1:
      raise ValueError("a ChatSession holds one conversation; use ChatBatch for several")
    self.batch = ChatBatch(model, tokenizer, batch_size=1, **kwargs)

  @classmethod
  def load(cls, workdir: str, *, step: int | None = None, max_len: int | None = None,
           attention_impl: str | None = None, compute_dtype: str | None = None, **kwargs) -> "ChatSession":
    """See :meth:`ChatBatch.load`."""
    return cls.from_batch(ChatBatch.load(workdir, step=step, max_len=max_len, attention_impl=attention_impl,
                                         compute_dtype=compute_dtype, batch_size=1, **kwargs))

  @classmethod
  def pretrained(cls, source: str, **kwargs) -> "ChatSession":
    """See :meth:`ChatBatch.pretrained`."""
    return cls.from_batch(ChatBatch.pretrained(source, batch_size=1, **kwargs))

  @classmethod
  def from_batch(cls, batch: ChatBatch) -> "ChatSession":
    """Wraps a :class:`ChatBatch` of one conversation."""
    if batch.batch_size != 1:
      raise ValueError(f"a ChatSession wraps a ChatBatch of one conversation, got batch_size="
                       f"{batch.batch_size}")
    session = object.__new__(cls)
    session.batch = batch
    return session

  @property
  def kind(self) -> str:
    return self.batch.kind

  @property
  def tokenizer(self) -> ChatTokenizer:
    return self.batch.tokenizer

  @property
  def engine(self) -> Engine:
    return self.batch.engine

  def ask(self, query: Query, *, max_new_tokens: int | None = None, sampling: SamplingParams | None = None
          ) -> str:
    """Answers one query (a user text, or a list of system/user/tool messages) and keeps it in the history.

    Raises:
      PromptTooLongError: the conversation plus the query exceeds ``max_len`` (nothing is changed).
    """
    return self.batch.ask([query], max_new_tokens=max_new_tokens, sampling=sampling)[0]

  def add_round(self, query: Query, answer: str) -> None:
    """Appends a finished round (query and answer) without generating."""
    self.batch.add_round(0, query, answer)

  def history(self) -> list[Message]:
    """The conversation so far."""
    return self.batch.history(0)

  def tokens(self):
    """The conversation as token ids ``[T]``, laid out as in training."""
    return self.batch.dialogues.tokens(0)

  def reset(self) -> None:
    """Starts a new conversation."""
    self.batch.reset()

  @property
  def stats(self) -> dict[str, float] | None:
    """Time to first token, decode time and decode tokens/s of the last round (``None`` before the first)."""
    r = self.batch.last_round
    if r is None:
      return None
    return {"ttft_s": r.ttft_s, "decode_s": r.decode_s, "decode_tokens_per_s": r.decode_tokens_per_s}
