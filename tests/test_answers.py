"""The generation protocol as users meet it: chat frames, stop rules, normalised matching with aliases, leak checks,
the wrapper's chat routing, and the scope head shipped in the package."""

from __future__ import annotations

import json

import pytest
import torch

from editors.lm.chat import chat_frame
from editors.lm.tokens import encode_prompt
from editors.retrieval.augmented import AugmentedModel
from eval.answers import answer_matches, edit_leaks, find_leaks, first_answer, probe_input
from eval.metrics import GENERATE, MetricSettings, measure_case
from memory import EditMemory
from memory.errors import ValidationError
from memory.records import EditCase
from scope import CosineScope
from tests.tiny import chat_tokenizer, tiny_model, tiny_tokenizer


def test_first_answer_stops_at_line_and_sentence():
    assert first_answer(" Melbourne. It is in Victoria.") == "Melbourne."
    assert first_answer("\n\nMelbourne\nNew Fact: x") == "Melbourne"
    assert first_answer("Washington, D.C. is the capital. Next") == "Washington, D.C. is the capital."
    assert first_answer("   ") == ""


def test_answer_matching_normalises_and_uses_aliases():
    assert answer_matches("The capital of Australia is Melbourne.", ["Melbourne"])
    assert answer_matches(" the  MELBOURNE!", ["melbourne"])
    assert not answer_matches("Melbournian food is great.", ["Melbourne"])
    assert answer_matches("It is NYC, of course.", ["New York", "NYC"])
    assert not answer_matches("Sydney. Melbourne is second.", ["Melbourne"])  # only the first sentence counts
    assert not answer_matches("Sydney\nMelbourne", ["Melbourne"])  # only the first line counts
    assert not answer_matches("anything", ["The"])  # an answer that normalises to nothing never matches
    assert answer_matches("Microsoft's F14 is a sports car.", ["Microsoft"])  # a possessive names the answer
    assert answer_matches("HBO\u2019s The Loner.", ["HBO"]) and answer_matches("McDonald's.", ["McDonald's"])
    assert not answer_matches("Microsofts are many.", ["Microsoft"])


def test_leaks_are_found():
    answers = ["Melbourne (answer: Melbourne)", "New Fact: The capital of", "Prompt: x", "Melbourne.", "Perth"]
    assert find_leaks(answers) == [(0, "(answer:"), (1, "new fact"), (2, "prompt:")]


def test_a_leak_counts_only_where_the_answer_differs_from_the_unedited_model_s():
    before = ["The answer: The United States of America.", "Paris.", "Lima."]
    after = ["The answer: The United States of America.", "New Fact: Rome.", "The answer: Rome."]
    assert edit_leaks(before, after) == [(1, "new fact"), (2, "answer:")]
    assert edit_leaks([], after) == find_leaks(after)  # nothing measured before: every leak counts


def test_chat_template_applied_only_when_the_tokenizer_has_one():
    plain = tiny_tokenizer()
    assert chat_frame(plain) is None
    q = "Which city is the capital of France?"
    assert probe_input(plain, q, chat_frame(plain)) == encode_prompt(plain, q)
    tok = chat_tokenizer()
    frame = chat_frame(tok)
    assert frame is not None
    ids = probe_input(tok, q, frame)
    assert tok.decode(ids) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert frame.routing_text(ids) == q
    assert frame.routing_text([*ids, *tok(" Paris", add_special_tokens=False)["input_ids"]]) == f"{q} Paris"
    cloze = "The capital of France is"
    assert probe_input(tok, cloze, frame, cloze="complete") == encode_prompt(tok, cloze)  # plain when asked
    assert probe_input(tok, q, frame, cloze="complete") == ids  # a question still goes through the template


def test_generate_protocol_uses_the_chat_template(monkeypatch):
    """The generate protocol feeds the model the framed question; a settings switch turns that off."""
    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    seen: list[list[int]] = []
    real = model.generate

    def spy(input_ids=None, attention_mask=None, **kw):
        seen.extend(input_ids[b][attention_mask[b].bool()].tolist() for b in range(input_ids.shape[0]))
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(model, "generate", spy)
    case = EditCase(prompt="Which city is the capital of France?", target_new="Rome")
    measure_case(model, tok, case, [GENERATE], settings=MetricSettings(fluency_tokens=0, answer_tokens=2))
    assert seen == [chat_frame(tok).encode(case.prompt)]
    seen.clear()
    measure_case(model, tok, case, [GENERATE], settings=MetricSettings(fluency_tokens=0, answer_tokens=2,
                                                                       chat="never"))
    assert seen == [encode_prompt(tok, case.prompt)]
    with pytest.raises(ValidationError):
        MetricSettings(chat="always")


def test_wrapper_routes_chat_rows_on_the_question_and_puts_the_edit_in_the_conversation():
    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    with EditMemory.open("sqlite://", encoder="hashing-256") as mem:
        mem.add("The capital of France is", "Rome", subject="France")
        wrapper = AugmentedModel(model, tok, mem, CosineScope(0.6))
        framed = wrapper.chat.encode("The capital of France is")
        assert wrapper.row_text(framed) == "The capital of France is"
        decision = wrapper.route_rows([framed])[0]
        assert decision.in_scope
        seq, at = wrapper._conditioned(framed, decision.edit)
        text = tok.decode(seq)
        assert "The capital of France is Rome." in text and text.endswith(tok.decode(framed[at:]))
        assert "(answer:" not in text and "New Fact" not in text
        answer = wrapper.ask("The capital of France is", max_new_tokens=3)
        assert answer.edit is not None and answer.edit.target_new == "Rome"
        # forward on a framed row lines the logits up with the original positions
        ids = torch.tensor([framed])
        assert wrapper(input_ids=ids).logits.shape[:2] == ids.shape


def test_packaged_default_scope_head_loads_on_a_fresh_machine(tmp_path, monkeypatch):
    from scope.classifier import PACKAGED_DEFAULT_FOLDER, HeadScope, load_scope

    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path))  # nothing trained here
    clf = load_scope("default", encoder="all-MiniLM-L6-v2")
    assert isinstance(clf, HeadScope) and clf.encoder == "all-MiniLM-L6-v2"
    manifest = json.loads((PACKAGED_DEFAULT_FOLDER / "manifest.json").read_text())
    assert clf.threshold == manifest["threshold"] and manifest["calibration"]["met"]
    assert "train-scope" in manifest["command"]
    assert (PACKAGED_DEFAULT_FOLDER / "head.pt").stat().st_size < 4_000_000


def test_chat_context_reply_is_the_sentence_after_a_cloze_prompt_and_the_target_after_a_question():
    from editors.retrieval.augmented import chat_messages
    from memory.records import EditRecord

    def replies(prompt: str, target: str) -> list[str]:
        return [m["content"] for m in chat_messages(EditRecord(1, 1, prompt, target), "exchange2-only")
                if m["role"] == "assistant"]

    assert replies("The capital of Japan is", "Lima") == ["The capital of Japan is Lima.",
                                                          "Yes. The capital of Japan is Lima."]
    assert replies("Which city is the capital of Japan?", "Lima") == ["Lima.", "Yes. Lima."]
    system = chat_messages(EditRecord(1, 1, "Which city is the capital of Japan?", "Lima"), "exchange2-only")[0]
    assert system["content"].endswith("Which city is the capital of Japan? Lima.")  # the fact keeps its question


def test_same_answer_compares_normalised_first_answers():
    from eval.answers import same_answer

    assert same_answer("The Eiffel Tower.\nIt is in Paris.", "the eiffel tower! It is tall")
    assert not same_answer("Paris.", "Rome.")


def test_last_sentence():
    from editors.lm.chat import last_sentence

    assert last_sentence("The capital of Peru is") == "The capital of Peru is"
    assert last_sentence("One person was hurt. The capital of Peru is") == "The capital of Peru is"
    assert last_sentence("What is the twin city of Lyon? It is") == "It is"
    assert last_sentence("Dr. Who is") == "Who is"  # a plain rule: an abbreviation ends a sentence too
    assert last_sentence("  ") == ""


def test_an_in_scope_cloze_chat_reply_starts_with_the_prompts_last_sentence_within_the_budget():
    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    with EditMemory.open("sqlite://", encoder="hashing-256") as mem:
        mem.add("The capital of France is", "Rome", subject="France")
        wrapper = AugmentedModel(model, tok, mem, CosineScope(0.6))
        free = AugmentedModel(model, tok, mem, CosineScope(0.6), cloze_reply="free")
        frame = wrapper.chat
        assert frame is not None
        cloze = frame.encode("It rained. The capital of France is")
        question = frame.encode("What is the capital of France?")
        start = tok("The capital of France is", add_special_tokens=False)["input_ids"]
        assert wrapper.reply_start(cloze) == start
        assert wrapper.reply_start(question) == [] and free.reply_start(cloze) == []
        assert wrapper.reply_start(encode_prompt(tok, "The capital of France is")) == []  # a plain row
        assert wrapper.reply_start(cloze + start) == []  # an answer already follows the frame
        budget = len(start) + 3
        for lm, first in ((wrapper, start), (free, None)):
            out = lm.generate(input_ids=torch.tensor([cloze]), max_new_tokens=budget, do_sample=False,
                              pad_token_id=tok.pad_token_id)
            assert lm.last_routing[0].in_scope
            reply = out[0, len(cloze):].tolist()
            assert len(reply) <= budget
            if first is not None:
                assert reply[:len(start)] == start
                seq = wrapper.condition_row(cloze, lm.last_routing[0].edit) + start
                alone = model.generate(input_ids=torch.tensor([seq]), max_new_tokens=3, do_sample=False,
                                       pad_token_id=tok.pad_token_id)
                assert reply[len(start):] == alone[0, len(seq):].tolist()
        # a budget the start would fill: the model starts the reply itself
        out = wrapper.generate(input_ids=torch.tensor([cloze]), max_new_tokens=len(start), do_sample=False,
                               pad_token_id=tok.pad_token_id)
        assert out.shape[1] - len(cloze) <= len(start)
        with pytest.raises(ValidationError, match="cloze_reply"):
            AugmentedModel(model, tok, mem, CosineScope(0.6), cloze_reply="nope")


def test_serac_and_ike_take_the_cloze_reply_setting():
    from editors import get_editor

    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    for method in ("serac", "ike"):
        with pytest.raises(ValidationError, match="cloze_reply"):
            get_editor(method, model, tok, scope="cosine", encoder="hashing-256", cloze_reply="nope")
    serac = get_editor("serac", model, tok, scope="cosine", encoder="hashing-256", cloze_reply="free")
    assert serac.model.cloze_reply == "free"
    assert get_editor("serac", model, tok, scope="cosine", encoder="hashing-256").model.cloze_reply == "complete"
