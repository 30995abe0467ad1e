"""The embedded task: tokenizer round trip, the four levels, demonstrations, the worked-steps check,
the held-out split, and that --seed (not the base-model cache) decides a run."""
import importlib.util
import os
import re

import pytest
import torch
from transformers import AutoTokenizer

import builtin_task

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _terms(problem):
    return [(int(t), int(k)) if k else int(t) for t, k in re.findall(r"(\d)(?:\*(\d))?", problem.removesuffix("=?"))]


def test_tokenizer_survives_save_and_reload(tmp_path):
    tok = builtin_task.build_tiny_tokenizer()
    builtin_task.tiny_model_config(tok).save_pretrained(tmp_path)  # a Qwen2 config beside it, as in a model dir
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    row = builtin_task.make_task(1, seed=3, levels=(4,))[0]
    prompt = common.format_prompt(tok, row["problem"], "Think, then answer.")
    assert prompt == common.format_prompt(again, row["problem"], "Think, then answer.")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    for text in (prompt, row["demo"] + "<|im_end|>", "any other text: ünïcode 123 7*3"):
        assert tok(text)["input_ids"] == again(text)["input_ids"], text
    ids = again(row["demo"], add_special_tokens=False)["input_ids"]
    assert again.decode(ids + [again.eos_token_id], skip_special_tokens=True) == row["demo"]  # </think> kept
    assert again.eos_token == "<|im_end|>" and again.pad_token == "<|endoftext|>"
    longest = max(len(again(r["demo"], add_special_tokens=False)["input_ids"]) for r in builtin_task.make_task(300, 0))
    assert longest + 1 <= builtin_task.SETTINGS["max_response_len"]  # every demonstration + EOS fits


def test_levels_by_hand():
    assert builtin_task.make_task(1, 0, levels=(1,))[0] == {
        "problem": "8+3+5=?", "answer": "16", "demo": "8+3=11\n11+5=16\n</think>\n\\boxed{16}", "level": 1,
        "stratum": None}
    assert builtin_task._demo([5, 1, (6, 3)]) == "6*3=18\n18+5=23\n23+1=24\n</think>\n\\boxed{24}"  # product first
    assert builtin_task._problem([5, 1, (6, 3)]) == "5+1+6*3=?" and builtin_task._value([5, 1, (6, 3)]) == 24
    sizes = {level: len(builtin_task._level_problems(level)) for level in builtin_task.LEVELS}
    assert sizes == {1: 9 ** 3, 2: 9 ** 4, 3: 576, 4: 1152}
    # A slipping teacher writes a partial sum one too high and goes on from it: the answer is then wrong.
    class Always:
        def random(self):
            return 0.0
    assert builtin_task._demo([9, 9, 9], slip=Always()) == "9+9=19\n19+9=29\n</think>\n\\boxed{29}"


def test_problems_answers_and_demonstrations_are_right():
    rows = builtin_task.make_task(60, seed=0)
    assert sorted({r["level"] for r in rows}) == [1, 2, 3, 4] and len(rows) == 240
    verifier = common.Verifier(num_workers=0)
    for r in rows:
        terms = _terms(r["problem"])
        products = [t for t in terms if isinstance(t, tuple)]
        n_terms, where = builtin_task.LEVELS[r["level"]]
        assert len(terms) == n_terms and all(1 <= (t[0] if isinstance(t, tuple) else t) <= 9 for t in terms)
        assert len(products) == (where != "none") and (where != "first" or isinstance(terms[0], tuple))
        value = sum(t[0] * t[1] if isinstance(t, tuple) else t for t in terms)
        assert int(r["answer"]) == value
        steps = r["demo"].split("</think>")[0].strip().splitlines()
        assert len(steps) == n_terms - 1 + len(products)  # one line per product, one per addition
        lefts = []
        for line in steps:
            a, op, b, c = re.fullmatch(r"(\d+)([+*])(\d+)=(\d+)", line).groups()
            assert int(c) == (int(a) * int(b) if op == "*" else int(a) + int(b))
            lefts += [int(a)] if op == "+" else []
        assert max(lefts) <= builtin_task.MAX_LEFT_OPERAND  # only additions the base knows
        assert builtin_task.steps_correct(r["problem"], r["demo"])
    assert verifier([r["demo"] for r in rows], [r["answer"] for r in rows]) == [1.0] * len(rows)


def test_times_table_facts_have_no_shortcut():
    """Levels 3-4 need a fact the base lacks: no first line "t+X=p" with a digit X, and the misreading
    t+k is far from the product, so neither a slip nor a wrong-steps shortcut lands on the answer."""
    assert builtin_task.FACTS and all(t * k - t >= 10 and t * k - (t + k) >= 7 and t * k <= 27 for t, k in builtin_task.FACTS)


def test_steps_correct_sees_wrong_reasons():
    p = "7+6+3+9=?"
    assert builtin_task.steps_correct(p, "7+6=13\n13+3=16\n16+9=25\n</think>\n\\boxed{25}")
    # right answer, two cancelling errors: the verifier rewards it, the steps check does not
    assert not builtin_task.steps_correct(p, "7+6=13\n13+3=17\n17+9=25\n</think>\n\\boxed{25}")
    assert not builtin_task.steps_correct(p, "7+6=13\n13+9=22\n22+3=25\n</think>\n\\boxed{25}")  # another order
    assert not builtin_task.steps_correct("6*3+2+4=?", "6+2=8\n8+4=12\n</think>\n\\boxed{24}")
    assert builtin_task.steps_correct("2+4+6*3=?", "6*3=18\n18+2=20\n20+4=24\n</think>\n\\boxed{24}")


def test_held_out_problems_never_train():
    held_out = builtin_task.make_task(builtin_task.HELDOUT_PER_LEVEL, builtin_task.EVAL_SEED)
    names = {r["problem"] for r in held_out}
    assert len(names) == len(held_out) == 4 * builtin_task.HELDOUT_PER_LEVEL
    train = builtin_task.make_task(builtin_task.TRAIN_PER_LEVEL, seed=0, exclude=names)
    assert not names & {r["problem"] for r in train}
    assert len({r["problem"] for r in train}) == len(train) == 4 * builtin_task.TRAIN_PER_LEVEL  # equal per level
    assert builtin_task.make_task(5, seed=7) == builtin_task.make_task(5, seed=7)  # deterministic
    assert builtin_task.make_task(3, seed=7, levels=(2,)) == builtin_task.make_task(5, seed=7, levels=(2,))[:3]  # prefix


def test_base_cache_key_has_the_task_version(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_task, "_pretrain", lambda *a, **k: None)
    monkeypatch.setattr(builtin_task, "_build_probe", lambda *a, **k: {})  # sampling it is 9 s a build
    path = builtin_task.build_base_model(str(tmp_path))
    assert path.endswith(f"-v{builtin_task.TASK_VERSION}-seed0")
    monkeypatch.setattr(builtin_task, "TASK_VERSION", builtin_task.TASK_VERSION + 1)
    assert builtin_task.build_base_model(str(tmp_path)) != path  # a new task version never reuses an old base


def test_seed_decides_the_run_not_the_base_cache(tmp_path, monkeypatch, trainer_in_process):
    """The first run on a machine builds the base inside setup(), which seeds torch itself; it must
    still draw exactly what the same command draws with the base already cached."""
    import grpo

    def pretrain(model, tokenizer, exclude, seed, **kw):  # a stand-in build that uses the torch RNG
        torch.manual_seed(seed)
        torch.rand(100)
    monkeypatch.setattr(builtin_task, "_pretrain", pretrain)
    draws = []
    for run in ("cold", "warm"):
        cfg = common.parse_config(grpo.Config, [
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / run), "--seed", "3",
            "--no-compile", "--eval_data", "", "--verifier_workers", "0"])
        r = common.setup(cfg, global_batch=cfg.prompts_per_minibatch)
        draws.append((torch.rand(4).tolist(), r.next_prompts(4)))
    assert draws[0] == draws[1]


def test_evaluation_measures_right_answers_for_wrong_reasons():
    """eval_wrong_steps_builtin: the share of rewarded samples whose worked steps are wrong."""
    rows = [{"problem": "7+6+3+9=?", "prompt_ids": [1], "answer": "25", "level": 2, "prompt_text": ""},
            {"problem": "6*3+2+4=?", "prompt_ids": [2], "answer": "24", "level": 3, "prompt_text": ""}]
    texts = {1: ["7+6=13\n13+3=16\n16+9=25\n</think>\n\\boxed{25}",  # right, right steps
                 "7+6=13\n13+3=17\n17+9=25\n</think>\n\\boxed{25}"],  # right, two cancelling errors
             2: ["6*3=18\n18+2=20\n20+4=24\n</think>\n\\boxed{24}",  # right, right steps
                 "6+2=8\n8+4=12\n</think>\n\\boxed{12}"]}  # wrong: not rewarded, not counted

    class Scripted:
        def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None, seed=None):
            return [[common.Sample(p, [], [], t, True) for t in texts[p[0]][:n]] for p in prompts]

    sets = [common.EvalSet("builtin", "builtin", 2, rows)]
    per_problem = {}
    m = common.evaluate_sets(sets, Scripted(), common.Verifier(num_workers=0), common.Dist(), temperature=0.6,
                             max_tokens=48, seed=0, per_problem=per_problem)
    assert m["eval_accuracy_builtin"] == 0.75 and m["eval_accuracy_builtin_level3"] == 0.5
    assert m["eval_wrong_steps_builtin"] == 1 / 3
    # every problem's counts, in the set's order: 2 and 1 rewarded of 2 samples; 1 and 1 of them with right steps
    assert per_problem["builtin"] == {"k": 2, "problems": common.problems_digest(rows), "correct": [2, 1],
                                      "right_steps": [1, 1]}
    assert common.problems_digest(rows) != common.problems_digest(rows[::-1])
    sets = [common.EvalSet("held", "held.jsonl", 2, rows)]  # the task's problems from a file: checked alike
    assert common.evaluate_sets(sets, Scripted(), common.Verifier(num_workers=0), common.Dist(), temperature=0.6,
                                max_tokens=48, seed=0)["eval_wrong_steps_held"] == 1 / 3
    other = [dict(r, problem="What is " + r["problem"]) for r in rows]  # another task's problems: none to check
    assert "eval_wrong_steps_other" not in common.evaluate_sets(
        [common.EvalSet("other", "other.jsonl", 2, other)], Scripted(), common.Verifier(num_workers=0), common.Dist(),
        temperature=0.6, max_tokens=48, seed=0)
    assert builtin_task.is_task_problem("5+7*3=?") and not builtin_task.is_task_problem("5+7*3=? ")


def test_yardstick_tells_a_miscopied_multiplier_from_other_wrong_steps():
    spec = importlib.util.spec_from_file_location("yardstick", os.path.join(ROOT, "scripts", "yardstick.py"))
    yardstick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(yardstick)
    right = "7*3=21\n21+6=27\n27+5=32\n</think>\n\\boxed{32}"
    assert builtin_task.steps_correct("7*3+6+5=?", right)
    assert not yardstick.only_multiplier_wrong("7*3+6+5=?", right)  # nothing wrong
    assert yardstick.only_multiplier_wrong("7*3+6+5=?", right.replace("7*3=", "7*4="))
    assert not yardstick.only_multiplier_wrong("7*3+6+5=?", right.replace("7*3=21", "7*4=20"))  # the fact too
    assert not yardstick.only_multiplier_wrong("7*3+6+5=?", right.replace("27+5", "26+5"))  # a sum wrong
    assert not yardstick.only_multiplier_wrong("1+2+3=?", "1+2=3\n3+3=6\n</think>\n\\boxed{6}")  # no product


def test_strata_of_the_facts():
    """Levels 3-4 fall into strata by their fact (the base's prior, builtin_task.STRATA), a fact and its mirror
    share one, a held-out fact is the generalisation stratum, and no training demonstration shows it."""
    assert set(builtin_task.STRATA) == set(builtin_task.FACTS)
    strata = builtin_task.STRATA
    assert all(strata[(k, t)] == s for (t, k), s in strata.items() if (k, t) in strata)  # mirrors share a stratum
    assert builtin_task.stratum([5, 1, 2]) is None
    assert builtin_task.stratum([(7, 3), 1, 2]) == "moderate" and builtin_task.stratum([4, (4, 4), 2]) == "weak"
    assert builtin_task.stratum([(5, 5), 1, 2]) == "needle" and builtin_task.stratum([(3, 5), 1, 2]) == "moderate"
    (fact,) = builtin_task.GENERALISATION_FACTS
    assert builtin_task.STRATA[fact] == "moderate" and builtin_task.stratum([fact, 1, 2]) == "generalisation"
    assert builtin_task.TEACHER_FACT_PROB["needle"] == 0 and set(builtin_task.TEACHER_FACT_PROB) == \
        set(builtin_task.STRATA.values())
    held = builtin_task.rows("eval")
    assert {r["stratum"] for r in held if r["level"] >= 3} == {"moderate", "weak", "needle", "generalisation"}
    assert all((r["stratum"] is None) == (r["level"] <= 2) for r in held)
    train = builtin_task.rows("train")
    assert all(f"{fact[0]}*{fact[1]}" not in r["prompt"] for r in train) and \
        {r["stratum"] for r in train if r["level"] >= 3} == {"moderate", "weak", "needle"}
    # the teacher's habit: t*1=t, then the running sum goes on from t (a wrong answer)
    assert builtin_task._demo([(6, 3), 4, 5], habit=True) == "6*1=6\n6+4=10\n10+5=15\n</think>\n\\boxed{15}"


def test_key_tokens_are_the_fact_digits_after_the_star():
    tokens = ["6", "*", "3", "=", "1", "8", "\n", "1", "8", "+", "4", "=", "2", "2", "\n", "</think>"]
    assert [t for t, k in zip(tokens, builtin_task.key_tokens(tokens)) if k] == ["3", "1", "8"]
    assert not any(builtin_task.key_tokens(["1", "+", "2", "=", "3", "\n"]))  # levels 1-2: no fact line


def test_probe_measured_on_the_base_is_the_base(tiny_model_dir, monkeypatch):
    """The probe's stored log-probs are the base's own: measured on the model that built it, the KL from the
    base is 0 up to float rounding, and each group has its base response and its demonstration."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(builtin_task, "PROBE_PER_GROUP", 1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    probe = builtin_task._build_probe(lm, tok, seed=0)
    items = probe["items"]
    assert [(x["kind"], x["group"]) for x in items[:2]] == [("base", items[0]["group"]), ("demo", items[0]["group"])]
    assert {x["group"] for x in items} == {"level1", "level2", "moderate", "weak", "needle", "generalisation"}
    assert all(len(x["base_logp"]) == len(x["response_ids"]) == len(x["tokens"]) == len(x["key"]) for x in items)
    assert all(any(x["key"]) == (x["kind"] == "demo" and x["group"] not in ("level1", "level2")) for x in items)
    metrics, logps = common.measure_probe(common.PolicyModel(lm, compile=False), probe, tok.pad_token_id, "cpu")
    assert abs(metrics["probe_kl_base"]) < 1e-5  # float32, two different forwards of the same model
    demo = [-a for x in items if x["kind"] == "demo" for a in x["base_logp"]]
    assert metrics["probe_demo_nll"] == pytest.approx(sum(demo) / len(demo), rel=1e-5)
    assert metrics["probe_entropy"] > 0 and [len(lp) for lp in logps] == [len(x["response_ids"]) for x in items]


def test_evaluation_reports_each_stratum():
    """eval_accuracy_<set>_stratum_<S> (and pass@k) beside the levels: a problem counts in its level and stratum."""
    rows = [{"problem": "7+6+3+9=?", "prompt_ids": [1], "answer": "25", "level": 2, "stratum": None, "prompt_text": ""},
            {"problem": "6*3+2+4=?", "prompt_ids": [2], "answer": "24", "level": 3, "stratum": "moderate",
             "prompt_text": ""},
            {"problem": "5*5+2+4=?", "prompt_ids": [3], "answer": "31", "level": 4, "stratum": "needle",
             "prompt_text": ""}]
    texts = {1: "7+6=13\n13+3=16\n16+9=25\n</think>\n\\boxed{25}", 2: "6*3=18\n18+2=20\n20+4=24\n</think>\n\\boxed{24}",
             3: "3*1=3\n3+2=5\n5+4=9\n</think>\n\\boxed{9}"}

    class Scripted:
        def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None, seed=None):
            return [[common.Sample(p, [], [], texts[p[0]], True)] * n for p in prompts]

    m = common.evaluate_sets([common.EvalSet("builtin", "builtin", 2, rows)], Scripted(),
                             common.Verifier(num_workers=0), common.Dist(), temperature=0.6, max_tokens=48, seed=0,
                             pass_k=True)
    assert m["eval_accuracy_builtin_stratum_moderate"] == 1.0 and m["eval_accuracy_builtin_stratum_needle"] == 0.0
    assert m["eval_accuracy_builtin_level3"] == 1.0 and m["eval_accuracy_builtin"] == pytest.approx(2 / 3)
    assert m["eval_pass@2_builtin_stratum_moderate"] == 1.0 and "eval_accuracy_builtin_stratum_None" not in m
    assert common.format_eval(m, [common.EvalSet("builtin", "builtin", 2)]) == \
        "builtin 0.667 (level 2 1.000, 3 1.000, 4 0.000; moderate 1.000, needle 0.000)"
