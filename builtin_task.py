"""The built-in task: a tiny tokenizer, a tiny Qwen2, arithmetic problems and a pre-trained "base".

common.py uses it only for --data builtin / --model builtin / --eval_data builtin, through four names:
SETTINGS (its budgets and k), rows(split) (the training or held-out rows), build_base_model(cache_dir)
(the base model's directory, built once and cached) and steps_correct(problem, response) (the
eval_wrong_steps metric). The trainers never import it. docs/task.md says why it is built as it is.
"""
import itertools
import json
import os
import random
import re
import shutil
import tempfile

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm

# transformers is imported in the functions that build the tokenizer and model: common imports this module, and
# the grading pool's fork server imports common (common.py says why that must stay light).

# Everything is generated locally and deterministically (no hub downloads). The task is a yardstick for
# the question every fusion method answers: on problems the base model never solves, on-policy RL has
# no signal, and demonstrations bring it. So it has two kinds of level:
#
#   reachable     level 1  a+b+c            level 2  a+b+c+d                      (digits 1-9)
#   out of reach  level 3  t*k+b, b+t*k     level 4  three terms, one of them t*k
#
# A demonstration writes one line per step: the product first ("7*3=21"), then the running sum of the
# other terms in order ("21+5=26"). The base is pre-trained on levels 1-2 only, so it knows addition but
# has never seen "*": levels 3-4 need a handful of times-table facts and the rule "multiply first", which
# a demonstration shows in one line and which the base's own samples never contain. Every addition has a
# left operand of at most 27 (the base's range), so that one line is all a demonstration must teach.
# Digits are 1-9: with a 0, "skipping the 0" gives right answers for wrong reasons. The base learns
# from a fallible teacher that sometimes writes a partial sum one too high (never too low, so a slipped
# chain ends at a wrong answer): it solves levels 1-2 often, not always (mass for RL to sharpen).

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, eos (as in Qwen2.5)
# Added but not special: decode(skip_special_tokens=True) keeps them, so graders still find them.
ADDED = ["<think>", "</think>", "\\boxed{"]
# Qwen-style template; the generation prompt opens the thinking block like Qwen2.5-Math-16k-think.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
# Held-out problems are make_task(n, EVAL_SEED) with n <= HELDOUT_PER_LEVEL; the base never sees them.
EVAL_SEED, HELDOUT_PER_LEVEL = 1234, 200
TRAIN_PER_LEVEL = 250  # builtin training problems per level: equal, so every level weighs the same in training
TASK_VERSION = 4  # part of the base model's cache key: bump whenever the task or the base changes
# Settings of the builtin task, used when the data is "builtin" and the flag is left at 0 (auto): its
# budgets (demonstration + EOS <= 30 tokens) and k = 4 evaluation samples per problem (200 problems per
# level x 4 samples keep the evaluation's sampling sd <= 0.016 per level, docs/task.md). File data gets the
# papers' budgets instead (FILE_DATA_SETTINGS) and 1 evaluation sample per problem.
SETTINGS = {"max_prompt_len": 64, "max_response_len": 48, "eval_samples": 4}
MAX_LEFT_OPERAND = 27  # the largest partial sum the base adds to (level 2: 9+9+9)
# The times-table facts t*k of levels 3-4. Chosen so that no wrong-steps shortcut reaches the product:
# it is at least 10 above t (a first line "t+X" with a digit X cannot land on it, a shortcut RL finds
# otherwise) and far from the misreading t+k. Products stay within the base's range of left operands.
FACTS = [(t, k) for k in (3, 4, 5) for t in range(2, 10) if t * k - t >= 10 and t * k <= MAX_LEFT_OPERAND]
# The strata of levels 3-4: the base's prior on a problem's fact, set by how often the pre-training teacher
# writes that fact's line right (otherwise it writes its habit `t*1=t` and sums on from t). One base holds
# every regime the fusion methods are argued in: a fact the base already gives some probability (moderate),
# one it gives little (weak), one it never saw (needle).
# A fact and its mirror (5*3 and 3*5) share a stratum: a policy that knows one finds the other (a first lab saw GRPO
# learn 4*5 = 20 from the weak 5*4 = 20, so a mirror across strata would leak a needle).
STRATA = {(5, 3): "moderate", (3, 5): "moderate", (6, 3): "moderate", (7, 3): "moderate", (8, 3): "moderate",
          (9, 3): "moderate", (4, 4): "weak", (6, 4): "weak", (5, 4): "needle", (4, 5): "needle", (5, 5): "needle"}
# stratum -> probability that the pre-training teacher writes its facts right, tuned so that the base lands near pass@1
# 0.05-0.15 and pass@64 >= 0.9 (moderate), pass@1 <= 0.03 and pass@64 0.3-0.8 (weak), pass@64 = 0 (needle), at
# the evaluation temperature 0.6 (docs/task.md has the measured base; scripts/yardstick.py measures it)
TEACHER_FACT_PROB = {"moderate": 0.45, "weak": 0.20, "needle": 0.0}
# Moderate facts that no training demonstration shows (they appear only in held-out problems): the base knows
# them as weakly as the other moderate facts, so RL can sharpen them and SFT can only carry them over.
GENERALISATION_FACTS = frozenset({(6, 3)})
# level: (number of terms, whether one of them is a product t*k)
LEVELS = {1: (3, "none"), 2: (4, "none"), 3: (3, "first"), 4: (3, "later")}


def _problem(terms) -> str:
    """terms: ints and at most one (t, k) product -> "5+7*3=?"."""
    return "+".join(f"{t[0]}*{t[1]}" if isinstance(t, tuple) else str(t) for t in terms) + "=?"


def parse_problem(problem: str) -> list:
    """"5+7*3=?" -> [5, (7, 3)]: the inverse of _problem."""
    return [(int(t), int(k)) if k else int(t) for t, k in re.findall(r"(\d)(?:\*(\d))?", problem.removesuffix("=?"))]


def is_task_problem(problem: str) -> bool:
    """Whether a problem string is one of this task's ("5+7*3=?"): its worked steps can be checked
    (steps_correct), also when its rows come from a file (the lab's held-out subsets)."""
    return re.fullmatch(r"\d(\*\d)?(\+\d(\*\d)?)*=\?", problem) is not None


def _value(terms) -> int:
    return sum(t[0] * t[1] if isinstance(t, tuple) else t for t in terms)


def _fact(terms):
    """The (t, k) product of a problem's terms, or None (levels 1-2)."""
    return next((t for t in terms if isinstance(t, tuple)), None)


def stratum(terms) -> str | None:
    """The stratum of a level-3/4 problem (None for levels 1-2): generalisation, or STRATA of its fact."""
    fact = _fact(terms)
    if fact is None:
        return None
    return "generalisation" if fact in GENERALISATION_FACTS else STRATA[fact]


def _slip_prob(s: int) -> float:
    """Probability that the base's teacher writes partial sum s as s + 1."""
    return min(0.5, (s / 25) ** 2)


def _demo(terms, slip=None, habit=False):
    """The worked solution: the product first, then a running sum over the other terms in order. With
    `slip` (a random.Random) each written sum s is one too high with probability _slip_prob(s) and the
    chain goes on from the written value, so the answer is right only when every step is. habit: the
    pre-training teacher's habit on a fact it does not write right: `t*1=t`, then the sum goes on from t."""
    products = [(t, 1) if habit else (t, k) for t, k in (x for x in terms if isinstance(x, tuple))]
    lines = [f"{t}*{k}={t * k}\n" for t, k in products]
    addends = [t * k for t, k in products] + [t for t in terms if not isinstance(t, tuple)]
    total = addends[0]
    for t in addends[1:]:
        s = total + t
        if slip is not None and slip.random() < _slip_prob(s):
            s += 1
        lines.append(f"{total}+{t}={s}\n")
        total = s
    return "".join(lines) + "</think>\n\\boxed{" + str(total) + "}"


def _level_problems(level: int) -> list:
    """Every problem of a level, in a fixed order (lists of ints with at most one (t, k) product)."""
    n_terms, product = LEVELS[level]
    out = []
    for digits in itertools.product(range(1, 10), repeat=n_terms - (product != "none")):
        if product == "none":
            if sum(digits[:-1]) <= MAX_LEFT_OPERAND:
                out.append(list(digits))
            continue
        for t, k in FACTS:
            if t * k + sum(digits[:-1]) > MAX_LEFT_OPERAND:
                continue
            for where in ([0] if product == "first" else range(1, n_terms)):
                out.append(list(digits[:where]) + [(t, k)] + list(digits[where:]))
    return out


def steps_correct(problem: str, response: str) -> bool:
    """Whether a response's worked steps (the text before </think>) are exactly the right running sums
    of `problem`: what the answer-only verifier cannot see (a right answer for wrong reasons)."""
    return response.split("</think>")[0].strip() == _demo(parse_problem(problem)).split("</think>")[0].strip()


def make_task(n_per_level, seed, levels=(1, 2, 3, 4), exclude=frozenset(), without_facts=frozenset()):
    """Rows {problem, answer, demo, level, stratum}: up to n_per_level distinct problems per level, not in
    `exclude` and with no fact of `without_facts`, drawn without replacement from a shuffle seeded by (seed,
    level); a smaller n gives a prefix of a larger n."""
    rows = []
    for level in levels:
        problems = _level_problems(level)
        random.Random(f"{seed}:{level}").shuffle(problems)
        taken = [p for p in problems if _problem(p) not in exclude and _fact(p) not in without_facts][:n_per_level]
        rows += [{"problem": _problem(p), "answer": str(_value(p)), "demo": _demo(p), "level": level,
                  "stratum": stratum(p)} for p in taken]
    return rows


def build_tiny_tokenizer():
    """Byte-level BPE (a few hundred tokens) trained on task text with exactly the Qwen2 normaliser and
    pre-tokeniser: with a Qwen2 config, AutoTokenizer reloads a Qwen2Tokenizer that rebuilds this
    pipeline from vocab + merges, so anything else would change the ids after a save/load round trip.
    The Qwen2 regex splits numbers into single digits, which suits arithmetic."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # The trainer would learn merges across "<|im_end|>" etc., so train only on the text between them.
    split = re.compile("|".join(map(re.escape, SPECIAL + ADDED)))
    texts = [f"<|im_start|>{role}\n{r['problem']}<|im_end|>\n<|im_start|>assistant\n<think>\n{r['demo']}<|im_end|>\n"
             for role in ("system", "user") for r in make_task(200, seed=0)]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # any text encodes
    bpe.train_from_iterator([piece for t in texts for piece in split.split(t) if piece], trainer)
    trained = json.loads(bpe.to_str())["model"]
    # Build it the way from_pretrained will rebuild it; the specials keep ids 0-2 from the trainer.
    tok = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"])
    tok.add_tokens(ADDED)  # one token each; the Qwen2 regex alone would split "\boxed" from "{"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model_config(tokenizer):
    """0.6M-parameter Qwen2. On 2 CPU cores its cost is mostly matmul FLOPs, so narrow MLPs (256)
    buy steps; 4 layers are needed to find the next term in the prompt reliably."""
    from transformers import Qwen2Config
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _pretrain(model, tokenizer, exclude, seed, steps=1200, batch_size=32, lr=3e-3, share2=0.35, share_x1=0.15,
              share_facts=0.15, fact_prob=None):
    """Plain SFT on level-1/2 problems (a share2 fraction at level 2, none of them held out) with the
    fallible teacher's demonstrations, plus a share_x1 fraction of three-term problems with one t*1
    term anywhere (the notation and the rule "the product's line comes first"), plus a share_facts
    fraction of level-3/4 problems whose fact has a teacher probability (fact_prob, default
    TEACHER_FACT_PROB) above 0: the teacher writes the fact's line right with that probability and its
    habit `t*1=t` otherwise, so the base gives each stratum's facts about that prior and the needle
    facts none. Cross-entropy on demo + eos only (prompt masked), AdamW, 5% warm-up, then linear decay to 0."""
    fact_prob = TEACHER_FACT_PROB if fact_prob is None else fact_prob
    rng = random.Random(seed)
    pools = {level: [p for p in _level_problems(level) if _problem(p) not in exclude] for level in (1, 2)}
    pools["x1"] = [list(p[:i]) + [(t, 1)] + list(p[i:]) for t in range(1, 10) for p in itertools.product(range(1, 10), repeat=2)
                   for i in range(3)]
    pools["facts"] = [p for level in (3, 4) for p in _level_problems(level)
                      if _problem(p) not in exclude and fact_prob[STRATA[_fact(p)]] > 0]

    def example():
        u = rng.random()
        pool = "x1" if u < share_x1 else "facts" if u < share_x1 + share_facts else \
            2 if u < share_x1 + share_facts + share2 else 1
        terms = rng.choice(pools[pool])
        habit = pool == "facts" and rng.random() >= fact_prob[STRATA[_fact(terms)]]
        p = tokenizer.apply_chat_template([{"role": "user", "content": _problem(terms)}], tokenize=False,
                                      add_generation_prompt=True)  # common.format_prompt, no system prompt
        p = tokenizer(p, add_special_tokens=False)["input_ids"]
        t = tokenizer(_demo(terms, slip=rng, habit=habit) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return p + t, [-100] * len(p) + t

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm)))
    model.train()
    for _ in (bar := tqdm(range(steps), desc="pre-training the tiny base model", mininterval=2)):
        batch = [example() for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)  # right padding; pad is never a target
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        loss = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def build_base_model(cache_dir, seed=0):
    """Directory with the pre-trained tiny base (safetensors) and its tokenizer; built once (about a
    minute on 2 CPU cores), then reused. Written to a temporary directory and renamed into place, so
    an interrupted build never leaves a directory that looks complete."""
    path = os.path.join(cache_dir, f"tiny-qwen2-arith-v{TASK_VERSION}-seed{seed}")
    if os.path.isdir(path):
        return path
    from transformers import AutoModelForCausalLM
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_model_config(tokenizer))
    _pretrain(model, tokenizer, {r["problem"] for r in make_task(HELDOUT_PER_LEVEL, EVAL_SEED)}, seed)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)  # same file system, so the rename is atomic
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, PROBE_FILE), "w") as f:
        json.dump(_build_probe(model, tokenizer, seed), f)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same build first: keep its copy
        shutil.rmtree(tmp)
    return path


# The probe: a fixed set of held-out prompts, each with one response the base wrote (T = 1) and with its
# demonstration, and the base's log-probability of every token; the trainers measure each checkpoint on it
# (common.measure_probe), so every method is compared on the same tokens: how far it moved from the base
# and towards the demonstrations, how its entropy moves, which tokens it changed.
PROBE_FILE, PROBE_PER_GROUP = "probe.json", 12  # problems per level 1-2 and per stratum of levels 3-4


def key_tokens(tokens: list[str]) -> list[bool]:
    """Which tokens of a demonstration (its decoded tokens, EOS included) are its key tokens: the digits of
    the fact line after `*` (the multiplier and the product), what the base must know to solve a level-3/4
    problem. None for a demonstration without a fact line (levels 1-2)."""
    text, out, star, line_done = "", [], False, False
    for tok in tokens:
        out.append(not line_done and star and tok.strip().isdigit())
        star, text = star or "*" in tok, text + tok
        line_done = line_done or "\n" in tok
    return out if "*" in text.split("\n")[0] else [False] * len(tokens)


def _build_probe(model, tokenizer, seed) -> dict:
    """PROBE_PER_GROUP held-out problems per group (level 1, level 2, each stratum), the base's own response
    to each (sampled at temperature 1, seeded) and its demonstration, with the base's log-probability of
    every response token at temperature 1."""
    groups = {}
    for r in make_task(HELDOUT_PER_LEVEL, EVAL_SEED):
        groups.setdefault(r["stratum"] or f"level{r['level']}", []).append(r)
    chosen = [r for g in sorted(groups) for r in groups[g][:PROBE_PER_GROUP]]
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc(tokenizer.apply_chat_template([{"role": "user", "content": r["problem"]}], tokenize=False,
                                                 add_generation_prompt=True)) for r in chosen]
    model.eval()
    responses = []
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed + 7)
        for prompt in prompts:  # one at a time: no padding, nothing depends on the batch
            out = model.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=SETTINGS["max_response_len"], eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
            responses.append(out[:out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out)
    items = []
    for r, prompt, own in zip(chosen, prompts, responses):
        demo = enc(r["demo"]) + [tokenizer.eos_token_id]
        for kind, response in (("base", own), ("demo", demo)):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
            tokens = [tokenizer.decode([t]) for t in response]
            items.append({"kind": kind, "group": r["stratum"] or f"level{r['level']}", "problem": r["problem"],
                          "prompt_ids": prompt, "response_ids": response, "tokens": tokens,
                          "base_logp": logp.tolist(),
                          "key": key_tokens(tokens) if kind == "demo" else [False] * len(response)})
    return {"task_version": TASK_VERSION, "items": items}


def probe(cache_dir, seed=0) -> dict:
    """The probe of the base built in cache_dir (build_base_model writes it beside the weights)."""
    with open(os.path.join(build_base_model(cache_dir, seed), PROBE_FILE)) as f:
        return json.load(f)


def rows(split: str) -> list[dict]:
    """The task's rows {prompt, answer, demo, level, stratum} for split "train" or "eval": the held-out
    problems, or TRAIN_PER_LEVEL training problems per level, none of them held out and none with a
    GENERALISATION_FACTS fact."""
    held_out = make_task(HELDOUT_PER_LEVEL, EVAL_SEED)
    raw = held_out if split == "eval" else make_task(TRAIN_PER_LEVEL, seed=0, exclude={r["problem"] for r in held_out},
                                                     without_facts=GENERALISATION_FACTS)
    return [{"prompt": r["problem"], "answer": r["answer"], "demo": r["demo"], "level": r["level"],
             "stratum": r["stratum"]} for r in raw]
