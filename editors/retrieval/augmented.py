"""A memory-augmented causal LM: every input is routed through retrieval + scope before the model sees it.

``AugmentedModel(model, tokenizer, memory, scope)`` wraps any Hugging Face causal LM (an ``nn.Module`` with
``forward(input_ids=..., attention_mask=...).logits`` and ``generate``). For each row of a batch it decodes the row's
tokens (padding dropped, special tokens skipped) and asks the :class:`scope.Router` whether the text falls in the scope
of a stored edit:

- **Out of scope**: the row is answered by the untouched base model on the original batch, so its logits and
  generations are bit-for-bit the base model's (whenever any row of a batch is out of scope the base model runs on the
  whole original batch; in-scope rows are then computed twice, which keeps the out-of-scope rows exact).
- **In scope**: the row is answered by the counterfactual model conditioned on the edit (the base model itself, or
  a copy fine-tuned to use edits, ``counterfactual=``, see :mod:`editors.retrieval.counterfactual`):
  the edit's context (``context``, default :data:`DEFAULT_CONTEXT`, e.g. ``"New fact: The mother tongue of Danielle
  Darrieux is English.\\n"``) is put in front of the row's tokens (after any leading BOS), all in-scope rows go through
  the model as one right-padded batch, and the logits at the original tokens' positions are returned at those same
  positions, so teacher-forced metrics work unchanged. ``generate`` returns the original input followed by the
  reply only; the reply to a chat question that is a cloze prompt begins with the prompt's last sentence, which the
  model completes (``cloze_reply``, :meth:`AugmentedModel.reply_start`).

Routing text. A teacher-forced scorer feeds prompt + answer in one row, and the wrapper cannot know where the prompt
ends, so it routes on the whole decoded row (as EasyEdit's SERAC does). The scope head is trained with answers appended
to a share of its queries (:mod:`scope.train`), so a trailing answer does not move the decision; notes/
memory_editing.md measures how often prompt-only and prompt+answer routing agree. ``generate`` routes on the prompt.

Edits the model's own weights hold (it is an edited model folder the store keeps weight records for) are not
gated: ``held`` (:class:`scope.router.HeldEdits`, also settable as ``router.held``); such a row goes to the model as
an out-of-scope one does, and its decision names the edit under ``weights``.

Which edit shaped each row is in ``last_routing`` (one :class:`scope.Decision` per row, with edit id, version and
score) after every call; :meth:`ask` answers one question and returns it with its decision.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editors.lm.chat import ChatFrame, chat_frame, is_question, last_sentence
from editors.lm.tokens import completed, encode_prompt, pad_id, pad_rows
from memory.errors import ValidationError
from memory.records import EditRecord
from scope.classifier import ScopeClassifier
from scope.router import Decision, HeldEdits, Router

log = logging.getLogger(__name__)

# Picked by measurement on SmolLM2-135M (notes/memory_editing.md). Fields: {fact} = prompt + " " + target_new (joined
# as editors.lm.tokens joins them), {prompt}, {target_new}, {subject}.
CONTEXT_FORMATS: dict[str, str] = {
    "new-fact": "New fact: {fact}.\n",
    "new-fact-prompt": "New Fact: {fact}\nPrompt: ",
    "plain": "{fact}.\n",
    "repeat": "{fact}. {fact}.\n",
    "demo": "New Fact: {fact}\nPrompt: {fact}\n\nNew Fact: {fact}\nPrompt: ",
    "demo2": "New Fact: {fact}\nPrompt: {fact}\n\nNew Fact: {fact}\nPrompt: {fact}\n\nNew Fact: {fact}\nPrompt: ",
    "answer": "New Fact: {fact}\nPrompt: {fact}\n\nNew Fact: {fact} (answer: {target_new})\nPrompt: ",
    "answer-first": "Answer: {target_new}\nNew Fact: {fact}\nPrompt: {fact}\n\nAnswer: {target_new}\nPrompt: ",
    "answer-both": "New Fact: {fact} (answer: {target_new})\nPrompt: {fact}\n\nNew Fact: {fact} "
                   "(answer: {target_new})\nPrompt: {subject}: {target_new}\n\nPrompt: ",
}
DEFAULT_CONTEXT = "answer"
# Formats whose text a model repeats in its answers when it continues them (generation, not teacher forcing):
# "(answer: X)", "New Fact:", "Prompt:". Generated answers are scanned for them (eval.answers.find_leaks).
LEAKY_CONTEXTS = frozenset({"new-fact-prompt", "demo", "demo2", "answer", "answer-first", "answer-both"})
# What a plain (non-chat) row is generated from when the context is one of LEAKY_CONTEXTS: a format with nothing in
# it to repeat (notes/answers.md: first 10 CounterFact cases, plain completion, `answer` 11 of 20 answers leaked,
# `new-fact` none). Teacher forcing (forward) keeps the context itself, so the trained counterfactual model's format
# is unchanged.
CLEAN_GENERATE_CONTEXT = "new-fact"

# How an edit enters a chat model's conversation (a tokenizer with a chat template, editors.lm.chat): messages put
# before the user's question, as (role, template) with the fields of CONTEXT_FORMATS and ``reply``, the assistant's
# answer in the example exchange: the fact as a sentence after a cloze prompt ("The capital of Japan is Lima"), the
# target alone after a question ("Lima"; a reply that repeated the question taught the model to start its own answer
# with the question: zsRE, notes/answers.md). The role "lead" is text put at the start of the user's own message,
# before the question. The model reads them as context and answers the question; nothing of their wording is a format
# to continue, so nothing of it is repeated.
CHAT_CONTEXTS: dict[str, tuple[tuple[str, str], ...]] = {
    "system": (("system", "You are a helpful assistant. Answer with this fact, which is true and replaces what you "
                          "knew before: {fact}."),),
    "system-fact": (("system", "{fact}."),),
    "exchange": (("user", "{prompt}"), ("assistant", "{reply}.")),
    "system-exchange": (("system", "You are a helpful assistant. This fact is true and replaces what you knew "
                                   "before: {fact}."),
                        ("user", "{prompt}"), ("assistant", "{reply}.")),
    "lead": (("lead", "{fact}.\n"),),
    "system-lead": (("system", "You are a helpful assistant. This fact is true and replaces what you knew before: "
                               "{fact}."), ("lead", "Fact: {fact}.\nQuestion: ")),
    "exchange-lead": (("system", "You are a helpful assistant. This fact is true and replaces what you knew "
                                 "before: {fact}."),
                      ("user", "{prompt}"), ("assistant", "{reply}."), ("lead", "Remember: {fact}.\n")),
    "exchange2-lead": (("system", "You are a helpful assistant. This fact is true and replaces what you knew "
                                  "before: {fact}."),
                       ("user", "{prompt}"), ("assistant", "{reply}."), ("user", "Are you sure?"),
                       ("assistant", "Yes. {reply}."), ("lead", "Remember: {fact}.\n")),
    "default-exchange-lead": (("user", "{prompt}"), ("assistant", "{reply}."), ("lead", "{fact}.\n")),
    "exchange2-only": (("system", "You are a helpful assistant. This fact is true and replaces what you knew "
                                  "before: {fact}."),
                       ("user", "{prompt}"), ("assistant", "{reply}."), ("user", "Are you sure?"),
                       ("assistant", "Yes. {reply}."), ("lead", "Answer using only this fact: {fact}.\n")),
}
# Measured on the first 30 cases of counterfact-edit.json, SmolLM2-135M-Instruct, generate protocol (edit prompt /
# rephrases): exchange2-lead 0.90 / 0.70, lead 0.67 / 0.50, exchange-lead 0.63 / 0.67, default-exchange-lead
# 0.57 / 0.63; 0 leaked answers for each (notes/answers.md). exchange2-only (its lead asks to answer using only the
# fact): 9/10 / 9/10 on the first 10 cases, as exchange2-lead, and 6/7 against 4/7 on the demo's own edits.
DEFAULT_CHAT_CONTEXT = "exchange2-only"

# How generate() starts the answer to an in-scope chat question that is a cloze prompt ("Heath Brothers plays"):
# "complete": the reply begins with the prompt's last sentence, which the model then completes ("Heath Brothers plays
# jazz."), the reply the chat adapter is trained on (editors.retrieval.chat_adapter.reply_text); "free": the model
# starts the reply itself. Under "free", 15 of the 17 edit prompts SERAC missed on 246 CounterFact cases were answered
# with a question ("What does Heath Brothers play?"), and rephrases that start with an unrelated sentence were
# answered about that sentence (BENCHMARKS.md, issue 12 rounds 5 and 6).
CLOZE_REPLIES: tuple[str, ...] = ("complete", "free")
DEFAULT_CLOZE_REPLY = "complete"


def check_chat_context(chat_context: str) -> str:
    """``chat_context`` if it names one of :data:`CHAT_CONTEXTS`, else a :class:`ValidationError`."""
    if chat_context not in CHAT_CONTEXTS:
        raise ValidationError(f"chat context must be one of {', '.join(CHAT_CONTEXTS)}, got {chat_context!r}")
    return chat_context


def chat_messages(edit: EditRecord, chat_context: str) -> list[dict[str, str]]:
    """The messages that put ``edit`` before a chat model's question (a name of :data:`CHAT_CONTEXTS`)."""
    check_chat_context(chat_context)
    fact = completed(edit.prompt, edit.target_new)
    reply = edit.target_new.strip() if is_question(edit.prompt) else fact
    fields = dict(fact=fact, reply=reply, prompt=edit.prompt, target_new=edit.target_new, subject=edit.subject or "")
    return [{"role": role, "content": text.format(**fields)} for role, text in CHAT_CONTEXTS[chat_context]]


def split_lead(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """A chat context's messages (:func:`chat_messages`) as the conversation to put before the question and the lead
    text to put at the start of the question itself."""
    return ([m for m in messages if m["role"] != "lead"],
            "".join(m["content"] for m in messages if m["role"] == "lead"))


def context_template(context: str) -> str:
    """The template of a context format name, or ``context`` itself if it is a template with ``{fact}`` or
    ``{target_new}``."""
    if context in CONTEXT_FORMATS:
        return CONTEXT_FORMATS[context]
    if not isinstance(context, str) or ("{fact}" not in context and "{target_new}" not in context):
        raise ValidationError(f"context must be one of {', '.join(CONTEXT_FORMATS)} or a template containing "
                              f"{{fact}} or {{target_new}}, got {context!r}")
    try:
        context.format(fact="", prompt="", target_new="", subject="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValidationError(f"context template {context!r} is malformed: {err}") from None
    return context


def edit_context(edit: EditRecord, template: str) -> str:
    """The text put in front of a query that falls in ``edit``'s scope."""
    fact = completed(edit.prompt, edit.target_new)
    return template.format(fact=fact, prompt=edit.prompt, target_new=edit.target_new, subject=edit.subject or "")


def lead_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of every prompt (e.g. BOS); empty if none."""
    with_specials = encode_prompt(tokenizer, "x")
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    return with_specials[:len(with_specials) - len(plain)]


def insert_context(row: Sequence[int], context_ids: Sequence[int], lead: Sequence[int]) -> tuple[list[int], int]:
    """``row`` with ``context_ids`` inserted after its leading special tokens ``lead`` (when the row starts with
    them), and where the context was inserted. Tokens before it keep their positions; tokens after it move by the
    context's length. The trained counterfactual model (:mod:`editors.retrieval.counterfactual`) is trained on exactly
    this."""
    row, lead = list(row), list(lead)
    at = len(lead) if lead and row[:len(lead)] == lead else 0
    return row[:at] + list(context_ids) + row[at:], at


@dataclass(frozen=True)
class Answer:
    """What :meth:`AugmentedModel.ask` returns: the question, the generated continuation, and its routing."""

    question: str
    text: str
    decision: Decision

    @property
    def edit(self) -> EditRecord | None:
        return self.decision.edit


class AugmentedModel(torch.nn.Module):
    """A causal LM whose ``forward`` and ``generate`` route through an edit store (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, memory: Any, scope: ScopeClassifier, *, k: int = 5,
                 context: str = DEFAULT_CONTEXT, counterfactual: torch.nn.Module | None = None,
                 chat_context: str = DEFAULT_CHAT_CONTEXT, generate_context: str | None = None,
                 counterfactual_rows: str = "all", cloze_reply: str = DEFAULT_CLOZE_REPLY,
                 held: HeldEdits | None = None, reranker: Any = None, cross: Any = None):
        super().__init__()
        self.model: Any = model  # a Hugging Face causal LM (duck-typed: generate, config, ...)
        # In-scope rows go to this model (a trained copy, editors.retrieval.counterfactual) or, when None, to the base
        # model. counterfactual_rows="chat": only chat-framed rows go to it (a chat adapter,
        # editors.retrieval.chat_adapter, was trained on those alone); plain rows go to the base model.
        if counterfactual_rows not in ("all", "chat"):
            raise ValidationError(f"counterfactual_rows must be 'all' or 'chat', got {counterfactual_rows!r}")
        if cloze_reply not in CLOZE_REPLIES:
            raise ValidationError(f"cloze_reply must be one of {', '.join(CLOZE_REPLIES)}, got {cloze_reply!r}")
        self.counterfactual = counterfactual
        self.counterfactual_rows = counterfactual_rows
        self.cloze_reply = cloze_reply
        self.tokenizer = tokenizer
        # reranker / cross: the router's relation reranker and cross-encoder over the gated candidates (scope.router)
        self.router = (Router.open(memory, scope, k=k, reranker=reranker, cross=cross) if isinstance(memory, str)
                       else Router(memory, scope, k=k, reranker=reranker, cross=cross))
        self.router.held = held  # edits the model's own weights hold: not gated (scope.router.HeldEdits)
        self.template = context_template(context)
        # generate() conditions plain rows on this template: the context's own unless it is a format a model repeats.
        if generate_context is None:
            generate_context = CLEAN_GENERATE_CONTEXT if context in LEAKY_CONTEXTS else context
        self.generate_template = context_template(generate_context)
        self._lead = lead_tokens(tokenizer)
        self.chat_context = check_chat_context(chat_context)
        # Rows in the tokenizer's chat frame get the edit as chat messages; other rows the plain context.
        self.chat: ChatFrame | None = chat_frame(tokenizer)
        self._contexts: OrderedDict[tuple[int, int, str], list[int]] = OrderedDict()
        self._chat_prefixes: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        self.last_routing: list[Decision] = []

    # --- pass-through attributes --------------------------------------------------------------------------------------
    @property
    def memory(self) -> Any:
        return self.router.memory

    @property
    def scope(self) -> ScopeClassifier:
        return self.router.classifier

    @property
    def counterfactual_model(self) -> Any:
        """The model that answers in-scope rows: the trained counterfactual copy if given, else the base model."""
        return self.counterfactual if self.counterfactual is not None else self.model

    def counterfactual_for(self, row: Sequence[int]) -> Any:
        """The model that answers ``row`` (a prompt's tokens, before conditioning) when it is in an edit's scope:
        :attr:`counterfactual_model`, except that with ``counterfactual_rows="chat"`` a row outside the chat frame
        goes to the base model."""
        if self.counterfactual_rows == "chat" and (self.chat is None or self.chat.split(row) is None):
            return self.model
        return self.counterfactual_model

    def _by_model(self, rows: Sequence[Sequence[int]]) -> list[tuple[Any, list[int]]]:
        """The indices of ``rows`` grouped by the model that answers them in scope (:meth:`counterfactual_for`)."""
        groups: dict[int, tuple[Any, list[int]]] = {}
        for j, row in enumerate(rows):
            lm = self.counterfactual_for(row)
            groups.setdefault(id(lm), (lm, []))[1].append(j)
        return list(groups.values())

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # --- routing ------------------------------------------------------------------------------------------------------
    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                           list[list[int]]]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValidationError("input_ids must be a 2-D tensor (batch, tokens)")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask.shape != input_ids.shape:
            raise ValidationError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
        ids_cpu, mask_cpu = input_ids.detach().cpu(), mask.detach().cpu().bool()
        return mask_cpu, [ids_cpu[b][mask_cpu[b]].tolist() for b in range(ids_cpu.shape[0])]

    def row_text(self, row: Sequence[int]) -> str:
        """The text a row is routed on: a chat row's question (and any answer after it), else the whole row decoded
        without special tokens."""
        text = self.chat.routing_text(row) if self.chat is not None else None
        return text if text is not None else self.tokenizer.decode(list(row), skip_special_tokens=True)

    def route_rows(self, rows: Sequence[Sequence[int]]) -> list[Decision]:
        """Decisions for token rows (no padding): each routed on :meth:`row_text`."""
        return self.router.route([self.row_text(r) for r in rows])

    def route(self, texts: Sequence[str]) -> list[Decision]:
        """Decisions for texts."""
        return self.router.route(list(texts))

    def _context_ids(self, edit: EditRecord, template: str) -> list[int]:
        key = (edit.id, edit.version, template)
        ids = self._contexts.get(key)
        if ids is None:
            ids = list(self.tokenizer(edit_context(edit, template), add_special_tokens=False)["input_ids"])
            self._contexts[key] = ids
            while len(self._contexts) > 4096:
                self._contexts.popitem(last=False)
        return ids

    def chat_messages(self, row: list[int], edit: EditRecord) -> list[dict[str, str]]:
        """The messages put before a chat row's question when it falls in ``edit``'s scope."""
        return chat_messages(edit, self.chat_context)

    def _chat_conditioned(self, row: list[int], edit: EditRecord) -> tuple[list[int], int] | None:
        """A chat row with the plain prefix replaced by a conversation holding the edit, and where the original
        tokens kept from then on start (None for a row not in the chat frame)."""
        if self.chat is None or self.chat.split(row) is None:
            return None
        messages = self.chat_messages(row, edit)
        key = tuple((m["role"], m["content"]) for m in messages)
        prefix = self._chat_prefixes.get(key)
        if prefix is None:
            prefix = self.chat.prefix_for(*split_lead(messages))
            self._chat_prefixes[key] = prefix
            while len(self._chat_prefixes) > 4096:
                self._chat_prefixes.popitem(last=False)
        at = len(self.chat.prefix)
        return prefix + row[at:], at

    def _conditioned(self, row: list[int], edit: EditRecord, *, generating: bool = False) -> tuple[list[int], int]:
        """``row`` conditioned on the edit, and the position from which the row's tokens follow shifted (tokens
        before it keep their positions; tokens after it move by the length difference). A chat row gets the edit as
        messages before its question (:data:`CHAT_CONTEXTS`); another row the edit's context inserted after its
        leading special tokens (:attr:`generate_template` when ``generating``, else :attr:`template`)."""
        chat = self._chat_conditioned(row, edit)
        if chat is not None:
            return chat
        template = self.generate_template if generating else self.template
        return insert_context(row, self._context_ids(edit, template), self._lead)

    def condition_row(self, row: list[int], edit: EditRecord) -> list[int]:
        """``row`` (a prompt's tokens) with ``edit``'s context inserted as this wrapper conditions in-scope rows for
        generation (for IKE: with its demonstrations): what :attr:`counterfactual_model` continues for a query in
        ``edit``'s scope."""
        return self._conditioned(list(row), edit, generating=True)[0]

    def reply_start(self, row: Sequence[int]) -> list[int]:
        """The tokens :meth:`generate` starts an in-scope answer to ``row`` (a prompt's tokens) with: for a chat
        row whose question is a cloze prompt, with ``cloze_reply="complete"``, the question's last sentence (the
        answer completes it); else none (a question, a plain row, a row with an answer already after the frame)."""
        if self.cloze_reply != "complete" or self.chat is None:
            return []
        where = self.chat.split(row)
        if where is None or where[1] + len(self.chat.suffix) != len(row):
            return []
        question = self.tokenizer.decode(list(row[where[0]:where[1]]), skip_special_tokens=True)
        text = "" if is_question(question) else last_sentence(question)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    # --- forward ------------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        for unsupported in ("past_key_values", "inputs_embeds", "labels"):
            if kwargs.get(unsupported) is not None:
                raise ValidationError(f"AugmentedModel.forward routes whole inputs; {unsupported} is not supported")
        if input_ids is None:
            raise ValidationError("AugmentedModel.forward needs input_ids")
        mask, rows = self._rows(input_ids, attention_mask)
        decisions = self.route_rows(rows)
        self.last_routing = decisions
        inside = [b for b, d in enumerate(decisions) if d.in_scope]
        if not inside:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        base_logits = None
        if len(inside) < len(rows):  # the very call the caller made, so out-of-scope rows are bit-identical
            base_logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
        seqs, leads = zip(*(self._conditioned(rows[b], decisions[b].chosen) for b in inside))
        device = input_ids.device
        cf_logits: list[torch.Tensor] = [torch.empty(0)] * len(inside)  # per in-scope row, right-padded
        for lm, group in self._by_model([rows[b] for b in inside]):
            cf_ids, cf_mask = pad_rows([seqs[j] for j in group], pad_id(self.tokenizer))
            out = lm(input_ids=cf_ids.to(device), attention_mask=cf_mask.to(device), use_cache=False, **kwargs).logits
            for at, j in enumerate(group):
                cf_logits[j] = out[at]
        if base_logits is not None:
            logits = base_logits.clone()
        else:
            logits = cf_logits[0].new_zeros((*input_ids.shape, cf_logits[0].shape[-1]))
        for j, b in enumerate(inside):
            positions = mask[b].nonzero().squeeze(-1)
            n, lead = len(rows[b]), leads[j]
            shift = len(seqs[j]) - n
            new_positions = torch.arange(n)
            new_positions[lead:] += shift
            new_positions.clamp_(max=len(seqs[j]) - 1)  # a chat prefix may be shorter than the one it replaced
            logits[b, positions.to(device)] = cf_logits[j][new_positions.to(device)]
        return CausalLMOutputWithPast(logits=logits)

    # --- generate -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValidationError("AugmentedModel.generate needs input_ids")
        if kwargs.get("return_dict_in_generate"):
            raise ValidationError("AugmentedModel.generate returns token ids; return_dict_in_generate is not "
                                  "supported")
        _, rows = self._rows(input_ids, attention_mask)
        decisions = self.route_rows(rows)
        self.last_routing = decisions
        inside = [b for b, d in enumerate(decisions) if d.in_scope]
        if not inside:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pad = kwargs.get("pad_token_id")
        if pad is None:
            pad = getattr(self.generation_config, "pad_token_id", None)
        if pad is None:
            pad = pad_id(self.tokenizer)
        width = input_ids.shape[1]
        base = None
        if len(inside) < len(rows):
            base = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        cf_kwargs = dict(kwargs)
        if "max_length" in cf_kwargs and "max_new_tokens" not in cf_kwargs:
            cf_kwargs["max_new_tokens"] = max(0, cf_kwargs.pop("max_length") - width)
        budget = cf_kwargs.get("max_new_tokens")
        # The start of each in-scope reply (reply_start), counted in the token budget; none where it fills it.
        starts = [self.reply_start(rows[b]) for b in inside]
        starts = [s if budget is None or len(s) < budget else [] for s in starts]
        seqs = [self._conditioned(rows[b], decisions[b].chosen, generating=True)[0] + s
                for b, s in zip(inside, starts)]
        device = input_ids.device
        new: list[torch.Tensor] = [torch.empty(0)] * len(inside)  # per in-scope row, the reply's tokens
        for lm, group in self._by_model([rows[b] for b in inside]):
            cf_ids, cf_mask = pad_rows([seqs[j] for j in group], pad, side="left")
            group_kwargs = dict(cf_kwargs)
            if budget is not None:  # the longest budget left in the group; each row is cut to its own below
                group_kwargs["max_new_tokens"] = budget - min(len(starts[j]) for j in group)
                if "min_new_tokens" in group_kwargs:
                    group_kwargs["min_new_tokens"] = min(group_kwargs["min_new_tokens"],
                                                         group_kwargs["max_new_tokens"])
            out = lm.generate(input_ids=cf_ids.to(device), attention_mask=cf_mask.to(device),
                              **group_kwargs)[:, cf_ids.shape[1]:]
            for at, j in enumerate(group):
                tail = out[at] if budget is None else out[at, :budget - len(starts[j])]
                new[j] = torch.cat([torch.tensor(starts[j], dtype=out.dtype, device=out.device), tail])
        n_new = max(max(len(t) for t in new), base.shape[1] - width if base is not None else 0)
        out = torch.full((len(rows), width + n_new), pad, dtype=input_ids.dtype, device=device)
        if base is not None:
            out[:, :base.shape[1]] = base
        else:
            out[:, :width] = input_ids
        for j, b in enumerate(inside):
            out[b, width:] = pad
            out[b, width:width + len(new[j])] = new[j]
        return out

    # --- asking -------------------------------------------------------------------------------------------------------
    def explain(self, row: int = 0) -> list[str]:
        """Lines that say what else (besides the edit) shaped row ``row`` of the last call; none here."""
        return []

    def ask(self, question: str, *, max_new_tokens: int = 32, chat: bool | None = None) -> Answer:
        """Greedy answer to one question, and the decision that routed it (which edit shaped it, if any).

        A chat model (``chat`` None or True, and a tokenizer with a chat template) gets the question as the user's
        message, with an in-scope edit as messages before it; ``chat=False`` (or a model without a template) continues
        the question as plain text."""
        return self.ask_many([question], max_new_tokens=max_new_tokens, chat=chat)[0]

    def ask_many(self, questions: Sequence[str], *, max_new_tokens: int = 32,
                 chat: bool | Sequence[bool] | None = None) -> list[Answer]:
        """:meth:`ask` for several questions in one left-padded batch (each row is routed on its own; under greedy
        decoding a row's answer is the one it gets alone, up to padding's numerical noise). ``chat`` may also be one
        flag per question."""
        if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
            raise ValidationError("each question must be a non-empty string")
        flags = list(chat) if isinstance(chat, Sequence) else [chat] * len(questions)
        if len(flags) != len(questions):
            raise ValidationError(f"{len(questions)} questions but {len(flags)} chat flags")
        rows = [self.chat.encode(q) if self.chat is not None and flag is not False else encode_prompt(self.tokenizer, q)
                for q, flag in zip(questions, flags)]
        pad = pad_id(self.tokenizer)
        ids, mask = pad_rows(rows, pad, side="left")
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        answers = []
        for b, question in enumerate(questions):
            new = out[b, ids.shape[1]:].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            answers.append(Answer(question, self.tokenizer.decode(new, skip_special_tokens=True),
                                  self.last_routing[b]))
        return answers


def measure_overhead(wrapper: AugmentedModel, prompts: Sequence[str], *, new_tokens: int = 16,
                     repeats: int = 5) -> dict[str, Any]:
    """Latency the wrapper adds on out-of-scope queries, against the base model's own greedy ``generate``.

    For each prompt (one row), alternating base and wrapper runs ``repeats`` times each after one warm-up of each,
    measures ``base.generate`` of ``new_tokens`` tokens, ``wrapper.generate`` of the same, and the routing step alone.
    Returns medians in milliseconds and the ratios ``routing / base`` and ``(wrapper - base) / base``, taken over all
    runs in this one call. Prompts that route in scope are reported and left out.
    """
    model, tok = wrapper.model, wrapper.tokenizer
    base_ms, wrap_ms, route_ms, skipped = [], [], [], []
    device = wrapper.device
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tok, prompt)], dtype=torch.long, device=device)
        kw: dict[str, Any] = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id(tok))
        if wrapper.route_rows([ids[0].tolist()])[0].in_scope:
            skipped.append(prompt)
            continue
        with torch.no_grad():
            model.generate(**kw), wrapper.generate(**kw)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.generate(**kw)
                t1 = time.perf_counter()
                wrapper.generate(**kw)
                t2 = time.perf_counter()
                wrapper.route_rows([ids[0].tolist()])
                t3 = time.perf_counter()
                base_ms.append((t1 - t0) * 1e3)
                wrap_ms.append((t2 - t1) * 1e3)
                route_ms.append((t3 - t2) * 1e3)
    if not base_ms:
        raise ValidationError("every prompt routed in scope: give out-of-scope prompts to measure the overhead")
    base, wrap, route = statistics.median(base_ms), statistics.median(wrap_ms), statistics.median(route_ms)
    return {"new_tokens": new_tokens, "runs": len(base_ms), "base_generate_ms": base, "wrapper_generate_ms": wrap,
            "routing_ms": route, "routing_ratio": route / base, "wrapper_overhead_ratio": (wrap - base) / base,
            "skipped_in_scope": skipped}
