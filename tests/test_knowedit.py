"""KnowEdit: the WikiBio / ConvSent / Sanitation loaders and metrics (hand-made inputs with known answers, and real
slices when ../shared/data is there), the new editors' settings, and the bench's table, resume, shards and
"not run" cells on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from editors import EditRequest, get_editor
from eval.knowedit.bench import BenchSettings, build_table, cell_path, grid, run_bench, spearman, write_table
from eval.knowedit.cells import run_cell
from eval.knowedit.metrics import (
    convsent_success,
    kl_divergence,
    perplexity,
    response_logprobs,
    sanitation_success,
)
from eval.knowedit.tasks import TASKS, ConvSentCase, load_convsent, load_task, load_wikibio
from memory.errors import ValidationError
from tests.tiny import chat_tokenizer, same_weights, snapshot, target_logprobs, tiny_model

# ----------------------------------------------------------------------------------------------------- metrics


def test_convsent_formula_known_values():
    assert convsent_success(0.0, 0.0, 0.0) == pytest.approx(0.5)
    assert convsent_success(-1.0, -3.0, 0.5) == pytest.approx(1 / (1 + math.exp(-2)))  # gain > 0 caps at 1
    assert convsent_success(-1.0, -3.0, -math.log(4)) == pytest.approx(0.25 / (1 + math.exp(-2)))
    assert convsent_success(-50.0, 0.0, 0.0) == pytest.approx(0.0, abs=1e-20)


def test_kl_divergence_zero_for_equal_and_known_value():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    assert kl_divergence(p, p) == pytest.approx(0.0)
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        kl_divergence(p, q[:1])


def test_sanitation_containment():
    assert sanitation_success("Well, I don't know.", "I don't know.", "Birds") == 1.0
    assert sanitation_success("i DONT know", "I don't know.", "Birds") == 1.0  # normalised: case, punctuation
    assert sanitation_success("I don't knowledge", "I don't know.", None) == 0.0  # whole words only
    assert sanitation_success("I don't know blackbirds", "I don't know.", "Birds") == 1.0
    assert sanitation_success("I don't know, birds maybe", "I don't know.", "Birds") == 0.0  # answer still there
    assert sanitation_success("They are birds", "I don't know.", "Birds") == 0.0
    assert sanitation_success("I don't know", "I don't know.", None) == 1.0


def test_wikibio_perplexity_is_exp_of_mean_nll():
    assert perplexity(0.0) == 1.0
    model, tok = tiny_model("llama")
    lp = response_logprobs(model, tok, "The capital of France is", ["Paris.", "Rome"])
    ref = target_logprobs(model, tok, [EditRequest("The capital of France is", "Rome")])[0]
    n = len(tok(" Rome", add_special_tokens=False)["input_ids"])
    assert lp[1] == pytest.approx(float(ref) / n, rel=1e-5)
    assert perplexity(-lp[1]) == pytest.approx(math.exp(-float(ref) / n), rel=1e-5)


# ----------------------------------------------------------------------------------------------------- loaders


def test_wikibio_loader_hand_made(tmp_path):
    path = tmp_path / "wb.json"
    path.write_text(json.dumps([{"text": "A passage about ada lovelace. She was", "labels": " a mathematician.",
                                 "concept": "ada lovelace",
                                 "locality": {"Relation_Specificity": [{"prompt": "ada lovelace field", "ground_truth":
                                                                        ["mathematics", "math"]}]}},
                                {"text": "x", "labels": "y", "concept": "not here"}]))
    a, b = load_wikibio(path)
    assert (a.prompt, a.target_new, a.subject) == ("A passage about ada lovelace. She was", "a mathematician.",
                                                   "ada lovelace")
    assert a.locality[0].answer == "mathematics" and a.locality[0].aliases == ("math",)
    assert b.subject is None and b.locality == ()
    path.write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(ValidationError):
        load_wikibio(path)


def test_convsent_loader_hand_made(tmp_path):
    path = tmp_path / "cs.json"
    path.write_text(json.dumps([{"ent": "Tea", "pos": [" good ", "nice"], "neg": ["bad"]},
                                {"ent": "Rain", "pos": ["fresh"], "neg": ["wet", "cold", "grey"]}]))
    a, b = load_convsent(path)
    assert a.sentiment == "positive" and b.sentiment == "negative"
    assert a.request() == EditRequest("What do you think of Tea?", "good", subject="Tea")
    assert b.targets == ("wet", "cold", "grey") and b.opposite == ("fresh",)
    assert a.other_topic == "Rain" and a.other_responses == ("fresh", "wet", "cold")
    assert b.other_topic == "Tea"
    assert ConvSentCase.ask("X") == "What do you think of X?"


def test_real_slices(data_dir):
    folder = data_dir / "knowedit"
    for task in TASKS:
        cases = load_task(task, folder, 4)
        assert len(cases) == 4, task
    wikibio = load_task("WikiBio", folder, 2)
    assert wikibio[0].subject == "john russell reynolds" and wikibio[0].locality
    convsent = load_task("ConvSent", folder, 2)
    assert convsent[0].topic == "Estero" and convsent[0].positive and convsent[0].negative
    sanitation = load_task("Sanitation", folder, 2)
    assert sanitation[0].target_new == "I don't know." and sanitation[0].ground_truth == "Birds"
    assert len(load_task("Sanitation", folder)) == 80
    assert len(load_task("WikiBio", folder)) == 306 and len(load_task("ConvSent", folder)) == 800
    with pytest.raises(ValidationError):
        load_task("NoSuchTask", folder)


# ----------------------------------------------------------------------------------------------------- editors


def test_ft_m_settings_and_prompt_last_objective():
    model, tok = tiny_model("gpt2")
    editor = get_editor("ft_m", model, tok)
    assert editor.settings.objective == "target_new" and editor.settings.norm_constraint is None
    assert get_editor("ft", model, tok).settings.norm_constraint == 5e-4
    with pytest.raises(ValidationError):
        get_editor("ft", model, tok, objective="nope")
    request = EditRequest("The capital of France is", "Rome")
    before = target_logprobs(model, tok, [request])
    ft_l = get_editor("ft", model, tok, objective="prompt_last", norm_constraint=None, steps=5, lr=1e-2)
    saved = snapshot(model)
    handle = ft_l.apply([request])
    assert target_logprobs(model, tok, [request]) > before
    handle.restore()
    assert same_weights(model, saved)


def test_kn_edits_few_value_vectors():
    model, tok = tiny_model("llama")
    editor = get_editor("kn", model, tok, max_neurons=3)
    deltas = editor.compute([EditRequest("The capital of France is", "Rome", ground_truth="Paris")])
    changed = sum(int((d.abs().sum(0) > 0).sum()) for d in deltas.values())  # columns of down_proj touched
    assert 1 <= changed <= 3 and editor.last_stats["neurons"] == changed


def test_lora_handle_keeps_adapter(tmp_path):
    model, tok = tiny_model("llama")
    editor = get_editor("lora", model, tok, steps=5)
    handle = editor.apply([EditRequest("The capital of France is", "Rome")])
    assert handle.adapter and all("lora" in k for k in handle.adapter)
    assert not hasattr(model, "peft_config") and "lora" not in " ".join(n for n, _ in model.named_modules())
    handle.save(tmp_path / "h.pt")
    assert "adapter" in torch.load(tmp_path / "h.pt", weights_only=True)["state"]
    handle.restore()


# ----------------------------------------------------------------------------------------------------- bench


def test_spearman_known_values():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert spearman([1], [1]) is None and spearman([1, 1], [1, 2]) is None


def test_grid_shards_cover_every_cell_once(tmp_path):
    base = dict(data_dir=tmp_path, out_dir=tmp_path, methods=("a", "b", "c"))
    cells = [c for i in range(3) for c in grid(BenchSettings(**base, shard=(i, 3)))]
    assert sorted(cells) == sorted(grid(BenchSettings(**base))) and len(cells) == 3 * len(TASKS)
    with pytest.raises(ValidationError):
        BenchSettings(**base, shard=(3, 3))


@pytest.fixture(autouse=False)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDITMEM_STATS_CORPUS", raising=False)


def test_bench_end_to_end_on_tiny(data_dir, tmp_path, _private_cache):
    model, tok = tiny_model("llama")
    saved = snapshot(model)
    settings = BenchSettings(data_dir=data_dir / "knowedit", out_dir=tmp_path / "out", methods=("ft_m", "mend"),
                             tasks=("ZsRE", "ConvSent", "Sanitation", "WikiBio"), limit=1, protocol="both")
    table = run_bench(model, tok, settings, progress=False)
    assert same_weights(model, saved)
    assert set(table["not_run"]) == {"ZsRE", "ConvSent", "Sanitation", "WikiBio"}  # mend: no checkpoint
    assert "checkpoint" in table["not_run"]["ZsRE"]["mend"]
    rows = {(r["task"], r["metric"], r["protocol"]): r for r in table["rows"]}
    assert 0 <= rows[("ZsRE", "edit_succ", "teacher-forced")]["values"]["ft_m"] <= 100
    kl = rows[("ConvSent", "locality", "generate")]["values"]["ft_m"]
    cell = json.loads(cell_path(tmp_path / "out", "ConvSent", "ft_m").read_text())
    assert kl >= 0 and kl == cell["metrics"]["generate"]["locality"]  # a KL divergence, not scaled to percent
    assert rows[("WikiBio", "perplexity", "teacher-forced")]["values"]["ft_m"] >= 1
    assert ("Sanitation", "edit_succ gap (tf - gen)", "") in rows
    assert rows[("ZsRE", "edit_succ", "teacher-forced")]["published"]["ft_m"] == 99.98
    assert rows[("ConvSent", "locality", "teacher-forced")]["published"]["adalora"] == 0.18
    md = (tmp_path / "out" / "table.md").read_text()
    assert "not run [1]" in md and "[1] not run: MEND" in md and "lower is better" in md
    assert (tmp_path / "out" / "table.png").is_file()

    # resume: a finished cell is not run again (its file is kept as it is), a missing one is
    cell = cell_path(tmp_path / "out", "ZsRE", "ft_m")
    doctored = {**json.loads(cell.read_text()), "metrics": {"teacher-forced": {"edit_succ": 0.125}}}
    cell.write_text(json.dumps(doctored))
    cell_path(tmp_path / "out", "ConvSent", "ft_m").unlink()
    again = run_bench(model, tok, BenchSettings(**{**settings.__dict__, "resume": True}), progress=False)
    rows = {(r["task"], r["metric"], r["protocol"]): r for r in again["rows"]}
    assert rows[("ZsRE", "edit_succ", "teacher-forced")]["values"]["ft_m"] == 12.5
    assert cell_path(tmp_path / "out", "ConvSent", "ft_m").is_file()
    merged = write_table(tmp_path / "out", ("ft_m", "mend"), ("ZsRE",), ("teacher-forced",))  # --merge-only
    assert {r["task"] for r in merged["rows"]} == {"ZsRE"} and merged["published_source"]  # found via bench.json
    assert build_table(tmp_path / "out", ("ft_m",), ("ZsRE",), ("teacher-forced",), None)["rows"][0]["published"] == {}


def _spy_generate(monkeypatch, model):
    """Record every generate row (its unpadded input ids) and its new tokens."""
    seen: list[tuple[list[int], list[int]]] = []
    real = model.generate

    def spy(input_ids=None, attention_mask=None, **kw):
        out = real(input_ids=input_ids, attention_mask=attention_mask, **kw)
        for b in range(input_ids.shape[0]):
            seen.append((input_ids[b][attention_mask[b].bool()].tolist(), out[b, input_ids.shape[1]:].tolist()))
        return out

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_bench_generate_protocol_is_the_harness_one(monkeypatch, tmp_path):
    """Cells generate through measure_case: the chat template for a chat model (question as the user's message),
    plain completion with chat="never" or for a cloze prompt with cloze="complete"; Sanitation's containment is
    scored on the first answer to the framed question."""
    from editors.lm.chat import chat_frame
    from editors.lm.tokens import encode_prompt
    from eval.answers import first_answer
    from eval.metrics import GENERATE, MetricSettings
    from memory.records import EditCase, Probe

    model, _ = tiny_model("llama")
    tok = chat_tokenizer()
    frame = chat_frame(tok)
    assert frame is not None
    seen = _spy_generate(monkeypatch, model)
    quiet = MetricSettings(fluency_tokens=0, answer_tokens=3)
    ft = {"steps": 2}
    question = EditCase(prompt="Who wrote Hamlet?", target_new="I don't know.", ground_truth="Shakespeare",
                        locality=(Probe("Which city is the capital of France?", "Paris"),))
    recorded: list[str] = []
    import eval.knowedit.cells as cells

    real_success = cells.sanitation_success
    monkeypatch.setattr(cells, "sanitation_success",
                        lambda text, *a: recorded.append(text) or real_success(text, *a))
    run_cell(model, tok, "ft_m", "Sanitation", [question], [GENERATE], tmp_path / "s", ft, settings=quiet)
    inputs = [row for row, _ in seen]
    assert frame.encode(question.prompt) in inputs and frame.encode(question.locality[0].prompt) in inputs
    assert encode_prompt(tok, question.prompt) not in inputs
    after = [new for row, new in seen if row == frame.encode(question.prompt)][-1]  # the post-edit answer
    assert recorded == [first_answer(tok.decode(after, skip_special_tokens=True))]

    cloze = EditCase(prompt="The capital of Spain is", target_new="Lima", ground_truth="Madrid",
                     locality=(Probe("Which city is the capital of France?", "Paris"),))
    for settings, framed in ((quiet, True), (MetricSettings(fluency_tokens=0, answer_tokens=3, cloze="complete"),
                                             False)):
        seen.clear()
        run_cell(model, tok, "ft_m", "ZsRE", [cloze], [GENERATE], tmp_path / f"z{framed}", ft, settings=settings)
        inputs = [row for row, _ in seen]
        assert (frame.encode(cloze.prompt) in inputs) is framed
        assert (encode_prompt(tok, cloze.prompt) in inputs) is not framed
        assert frame.encode(cloze.locality[0].prompt) in inputs  # a question goes through the template either way
    seen.clear()
    never = MetricSettings(fluency_tokens=0, answer_tokens=3, chat="never")
    run_cell(model, tok, "ft_m", "Sanitation", [question], [GENERATE], tmp_path / "n", ft, settings=never)
    assert {tuple(row) for row, _ in seen} == {tuple(encode_prompt(tok, question.prompt)),
                                               tuple(encode_prompt(tok, question.locality[0].prompt))}


def test_progress_bar_counts_cells_that_cannot_run(data_dir, tmp_path, _private_cache, capsys):
    model, tok = tiny_model("llama")
    settings = BenchSettings(data_dir=data_dir / "knowedit", out_dir=tmp_path / "out", methods=("mend",),
                             tasks=("ZsRE", "Sanitation"), limit=2)
    table = run_bench(model, tok, settings, progress=True)
    assert set(table["not_run"]) == {"ZsRE", "Sanitation"}
    assert "4/4" in capsys.readouterr().err  # the bar ends full, not at 0/4


def test_bench_jobs_runs_shard_processes_and_merges_them_like_one_process(data_dir, tmp_path, _private_cache):
    from eval.knowedit.parallel import run_bench_jobs, shard_dir
    from tests.serving import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny")
    base = {"data_dir": data_dir / "knowedit", "methods": ("ft_m", "mend"), "tasks": ("ZsRE", "Sanitation"),
            "limit": 1, "protocol": "teacher-forced"}
    table = run_bench_jobs(str(folder), BenchSettings(**base, out_dir=tmp_path / "jobs"), 2, plots=False)
    assert [(t, m) for t in base["tasks"] for m in base["methods"] if cell_path(shard_dir(tmp_path / "jobs", 0, 2),
            t, m).is_file()] == [("ZsRE", "ft_m"), ("Sanitation", "ft_m")]  # shard 0 of 2: the even grid cells
    from editors.lm.loading import load_model

    model, tok = load_model(folder)
    one = run_bench(model, tok, BenchSettings(**base, out_dir=tmp_path / "one"), progress=False)
    values = [(r["task"], r["metric"], r["values"]) for r in table["rows"]]
    assert values and len(values) == len(one["rows"])
    for (task, metric, got), r in zip(values, one["rows"]):
        assert (task, metric) == (r["task"], r["metric"])
        assert got.keys() == r["values"].keys()
        for m, v in got.items():
            assert (v is None and r["values"][m] is None) or v == pytest.approx(r["values"][m], abs=1e-6)
    assert table["not_run"] == one["not_run"] and "mend" in table["not_run"]["ZsRE"]
    with pytest.raises(ValidationError, match="not both"):
        run_bench_jobs(str(folder), BenchSettings(**base, out_dir=tmp_path / "x", shard=(0, 2)), 2)
