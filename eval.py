"""Evaluation for Memory-R2: read conversations into memories, score the answers (token F1, BLEU-1,
EM, M-Fail), report tables; what the reward makes of scripted managers; retrieval recall; the
experiment's statistics, table and figures; and the CLI (`python eval.py --help`). The data it
reads, LoCoMo and the synthetic world, is world.py's.
"""
import argparse
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, json_loads, load_checkpoint, packaged_minilm
from model import train_tokenizer
from memory import RETRIEVERS, Entry, MemoryBank, bloat_cost, minilm, rank, retrieve_for_facts, short_date
from memr2 import (LOCOMO_CHUNKS, PRETRAINED, AnswerAgent, Decision, RLConfig, chunk_turns, config_for, dialogue_tokens, memory_tokens,
                   model_reader, normalize_answer, qa_scores, row_reward, run_session, sample_questions, token_f1)
from parallel import gather_over_ranks, ranks, this_rank
from world import (CATEGORIES, LOCOMO_PATH, SCRIPTED, DataError, decision_counts, decision_metrics, exact_answerer, load_locomo,
                   locomo_split, synthetic_split, teacher_memory, teacher_ops, teacher_trace)

# ============================================================================ evaluation
def read_conversations(model, tok, convs: list, cfg: RLConfig, temperature: float = 0.0, gen=None, trace=None):
    """One rollout of each whole conversation from an empty memory, all conversations in one
    batch (evaluation: greedy). Returns (final banks, op counts, unfinished call count); with
    a `trace` list, each Decision's b is rewritten to the index of its conversation."""
    banks, counts, unfinished = [MemoryBank(cfg.retriever) for _ in convs], Counter(), 0
    # a real model reads a LoCoMo conversation for an hour on CPU; the bar shows only on a terminal
    for t in tqdm(range(max(len(c.sessions) for c in convs)), desc="reading sessions", leave=False, disable=None):
        live = [i for i, c in enumerate(convs) if t < len(c.sessions)]
        steps = []
        ext, mgr, c = run_session(model, tok, [banks[i] for i in live], [convs[i].sessions[t] for i in live],
                                  cfg, temperature, gen, steps)
        if trace is not None:
            trace += [Decision(live[d.b], d.turns, d.facts, d.shown, d.ops) for d in steps]
        counts += sum(c, Counter())
        unfinished += sum(not cell.finished for row in ext + mgr for cell in row.cells)
    return banks, counts, unfinished


# Reported beside F1, never rewarded.
def bleu1(pred: str, gold: str) -> float:
    """BLEU-1 as the official reward manager computes it (reported only): both strings get the
    same SQuAD normalisation as F1; clipped unigram precision x brevity penalty, BP = 1 if
    |pred| >= |gold| else exp(1 - |gold| / |pred|); 0 when either side is empty."""
    p, r = normalize_answer(pred), normalize_answer(gold)
    if not p or not r:
        return 0.0
    rc = Counter(r)
    p1 = sum(min(c, rc[w]) for w, c in Counter(p).items()) / len(p)
    bp = 1.0 if len(p) >= len(r) else math.exp(1 - len(r) / len(p))
    return bp * p1


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def score(answerer, tok, banks: list, convs: list) -> dict:
    """Answer every question of each conversation from its final bank; F1, BLEU-1 and exact
    match overall and per category (x100), M-Fail, memory size. M-Fail is the share of the
    questions' gold evidence turns missing from the bank; answers of "none" and "no" are left
    out of it, since a claim proven false leaves the right memory nothing to hold."""
    asked = [(b, q) for b, c in zip(banks, convs) for q in c.qa]
    preds = answerer.answer([(b, q.question) for b, q in asked])
    per = {}
    for (b, q), pred in zip(asked, preds):
        cat = CATEGORIES.get(q.category, str(q.category))
        for key in ("overall", cat):
            d = per.setdefault(key, {"f1": [], "bleu1": [], "em": []})
            d["f1"].append(token_f1(pred, q.answer))
            d["bleu1"].append(bleu1(pred, q.answer))
            d["em"].append(exact_match(pred, q.answer))
    ev = [d in b.dia_ids() for b, q in asked if q.answer not in ("none", "no") for d in q.evidence]
    out = {f"{m}_{k}": 100 * sum(v) / len(v) for k, d in per.items() for m, v in d.items()}
    if asked:  # the standard error of F1 over the questions: what decides if two checkpoints differ
        out["f1_se"] = 100 * sample_sd(per["overall"]["f1"]) / math.sqrt(len(asked))
    out |= {"n_questions": len(asked), "m_fail": 100 * (1 - sum(ev) / len(ev)) if ev else (0.0 if asked else math.nan),
            "mem_entries": sum(len(b.entries) for b in banks) / len(banks),
            "mem_tokens": sum(memory_tokens(tok, b) for b in banks) / len(banks)}
    return out


def evaluate(model, tok, answerer, convs: list, cfg: RLConfig, samples=None, temperature: float = 0.0) -> dict:
    """Greedy read of each whole conversation (test n = 1), then `score`, plus the ops mix;
    with the synthetic `samples`, every decision is also scored against the teacher. At a
    `temperature` > 0 the read is one sample (seed 0): how often the policy SAMPLES the right
    op, which is what RL can reinforce. Under torchrun each rank reads every ranks()-th
    conversation; the memories are gathered and every rank scores all of them (the same
    answers a single process gives)."""
    mine, trace = range(this_rank(), len(convs), ranks()), []
    gen = torch.Generator(next(model.parameters()).device).manual_seed(0) if temperature > 0 else None
    banks, counts, unfinished = (read_conversations(model, tok, [convs[i] for i in mine], cfg, temperature, gen, trace)
                                 if mine else ([], Counter(), 0))
    if ranks() > 1:
        parts = gather_over_ranks((list(mine), banks, counts, unfinished, [replace(d, b=mine[d.b]) for d in trace]))
        banks, counts, unfinished, trace = [None] * len(convs), Counter(), 0, []
        for idx, bs, c, u, tr in parts:
            for i, b in zip(idx, bs):
                banks[i] = b
            counts, unfinished, trace = counts + c, unfinished + u, trace + tr
    ops = sum(counts[k] for k in ("INSERT", "UPDATE", "DELETE")) or 1
    out = score(answerer, tok, banks, convs)
    if samples is not None:
        out |= decision_metrics(sum((decision_counts([d], samples[d.b]["gold_facts"]) for d in trace), Counter()))
    out |= {f"share_{k}": 100 * counts[k] / ops for k in ("INSERT", "UPDATE", "DELETE")}
    out |= {"rejected_ops": sum(v for k, v in counts.items() if k.startswith("rejected_")) / len(convs),
            "unfinished_calls": unfinished}
    return out


def oracle_banks(samples: list, convs: list, cfg: RLConfig) -> list:
    """The teacher's gold memory (noise 0): the ceiling of what memory management can give."""
    return [teacher_memory(s, c, cfg) for s, c in zip(samples, convs)]


F1_COLS = [("F1", "f1_overall")] + [(f"F1 {n}", f"f1_{n}") for n in ("single-hop", "multi-hop", "temporal", "open-domain")]
REPORT_COLS = F1_COLS[:1] + [("BLEU-1", "bleu1_overall"), ("EM", "em_overall")] + F1_COLS[1:] + [
    ("M-Fail", "m_fail"), ("mem tokens", "mem_tokens"), ("entries", "mem_entries"),
    ("INSERT %", "share_INSERT"), ("UPDATE %", "share_UPDATE"), ("DELETE %", "share_DELETE")]
DECISION_COLS = [("fact recall", "fact_recall"), ("fact precision", "fact_precision")] + [
    (f"{k} acc", f"acc_{k}") for k in ("INSERT", "UPDATE", "DELETE", "NOOP")]
SENSITIVITY_COLS = F1_COLS + [("c (x100)", "bloat_c"), ("mem tokens", "mem_tokens"), ("reward F1 - lam c", "reward")]


def report_table(results: dict, columns=REPORT_COLS) -> str:
    """{name: metrics} -> a markdown table (x100 scores; '-' where a metric does not apply), and
    a note under it for each row that had no question to answer."""
    cols = [(h, k) for h, k in columns if any(k in r for r in results.values())]
    lines = ["| model | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.1f}" if r.get(k, math.nan) == r.get(k, math.nan) and k in r
                                               else "-" for _, k in cols) + " |")
    lines += [f"\nnote: {name}: 0 questions (none in these conversations and sessions), so no F1, BLEU-1, EM or M-Fail"
              for name, r in results.items() if r.get("n_questions") == 0]
    return "\n".join(lines)


# ============================================================================ what the reward makes of scripted managers (docs/world.md)
def sensitivity(samples: list, convs: list, tok, cfg: RLConfig) -> dict:
    """name -> test metrics of each scripted manager: F1 per category, the final bloat cost
    c(M_S, T_S), and the reward F1 - lam * c as a local reward computes it (the global reward
    of a session is the same F1 restricted to that session's questions, minus the same
    penalty). A reward that cannot rank these cannot teach memory management."""
    answerer, out = exact_answerer(cfg), {}
    for name, manager in SCRIPTED.items():
        banks = [teacher_memory(s, c, cfg, manager) for s, c in zip(samples, convs)]
        res = score(answerer, tok, banks, convs)
        ends = [dialogue_tokens(tok, c)[-1] for c in convs]  # T_S of each world
        res["bloat_c"] = 100 * sum(bloat_cost(memory_tokens(tok, b), t, cfg.phi) for b, t in zip(banks, ends)) / len(banks)
        rewards = []
        for b, c, t in zip(banks, convs, ends):
            f1, pen = qa_scores(answerer, tok, [b], c.qa, t, cfg)
            rewards.append(row_reward(f1[0], pen[0], finished=True))
        res["reward"] = 100 * sum(rewards) / len(rewards)
        out[name] = res
    return out


def reward_density(convs: list, cfg: RLConfig, stages=(8, 16, 32), seed: int = 0) -> dict:
    """How many reward questions a row's group sees. Global: q_global questions drawn as a step
    draws them, and per session t <= S those whose evidence includes t; local: a branch at t
    draws q_local questions with evidence <= t, and those that include t are the ones its
    branches can differ on. -> {S: (global mean, global share of sessions with none, local
    mean, local share with none)}, plus "last": questions per session by last evidence."""
    rng, out = random.Random(seed), {}
    for S in stages:
        g, loc = [], []
        for c in convs:
            qs = sample_questions(c.qa, S, cfg.q_global, rng)
            g += [sum(t in q.sessions for q in qs) for t in range(1, S + 1)]
            loc += [sum(t in q.sessions for q in sample_questions(c.qa, t, cfg.q_local, rng)) for t in range(1, S + 1)]
        out[S] = (sum(g) / len(g), sum(x == 0 for x in g) / len(g), sum(loc) / len(loc), sum(x == 0 for x in loc) / len(loc))
    last = [sum(max(q.sessions) == s.index for q in c.qa) for c in convs for s in c.sessions]
    out["last"] = (sum(last) / len(last), min(last), max(last))
    return out


def memory_shares(samples: list, convs: list, tok, cfg: RLConfig) -> list:
    """tok(M_t) / T_t of the oracle memory after each session t, per world: what phi must leave
    free for the right memory to cost nothing."""
    out = []
    for s, c in zip(samples, convs):
        dialogue, bank, shares = dialogue_tokens(tok, c), MemoryBank(), {}
        for sess, _, _, _, ops in teacher_trace(s, c, cfg)[0]:
            bank.apply(ops, sess.index, short_date(sess.date))
            shares[sess.index] = memory_tokens(tok, bank) / dialogue[sess.index - 1]
        out.append([shares[t] for t in sorted(shares)])
    return out


# ============================================================================ retrieval recall (BM25 vs MiniLM)
def turn_bank(conv, retriever: str) -> MemoryBank:
    """Every turn of a conversation stored as one entry "speaker: text" (its source turn as dia_id),
    as if the manager had kept everything: retrieval alone decides what the answer agent sees."""
    bank = MemoryBank(retriever)
    for sess in conv.sessions:
        for t in sess.turns:
            mid = f"m{bank.next_id}"
            bank.next_id += 1
            bank.entries[mid] = Entry(mid, t.speaker, f"{t.speaker}: {t.text}{t.caption}", sess.index, short_date(sess.date), [t.dia_id])
    return bank


def turn_recall(convs: list, retriever: str, ks=(1, 5, 10, 30)) -> tuple:
    """Evidence recall@k over stored turns: per question, the share of its evidence turns among the
    top k of one ranking over all turns, averaged over questions, overall and per category (x100).
    -> (recall dict, seconds per conversation to score all its questions, turn embeddings included)."""
    per, secs = {}, []
    for c in convs:
        t0 = time.perf_counter()
        bank = turn_bank(c, retriever)
        tops = [[e.dia_ids[0] for e in rank(bank, q.question)[:max(ks)]] for q in c.qa]
        secs.append(time.perf_counter() - t0)
        for q, top in zip(c.qa, tops):
            r = [sum(d in top[:k] for d in q.evidence) / len(q.evidence) for k in ks]
            for key in ("overall", CATEGORIES[q.category]):
                per.setdefault(key, []).append(r)
    return {key: {f"R@{k}": 100 * sum(r[i] for r in rs) / len(rs) for i, k in enumerate(ks)} | {"questions": len(rs)}
            for key, rs in per.items()}, secs


def fact_recall(samples: list, convs: list, cfg: RLConfig, ks=(1, 2, 5, 10)) -> dict:
    """Facts -> the memories the manager should see, on synthetic worlds replayed by the gold teacher
    shown the WHOLE memory: for each fact whose gold op UPDATEs or DELETEs an entry, is that entry
    among the top k memories of the fact's speaker that retrieval shows for the fact? (x100)"""
    hits = []
    for sample, conv in zip(samples, convs):
        bank, gold = MemoryBank(cfg.retriever), sample["gold_facts"]
        for sess in conv.sessions:
            for chunk in chunk_turns(sess.turns, cfg.chunks):
                facts = [{"speaker": gold[t.dia_id]["speaker"], "dia_id": t.dia_id, "fact": gold[t.dia_id]["fact"]}
                         for t in chunk if t.dia_id in gold]
                ops = teacher_ops(facts, list(bank.entries.values()))  # one op per fact, in order
                for f, op in zip(facts, ops):
                    if op.get("memory_id"):
                        shown = [e.memory_id for e in retrieve_for_facts(bank, [f], max(ks), max(ks))]
                        hits.append([op["memory_id"] in shown[:k] for k in ks])
                bank.apply(ops, sess.index, short_date(sess.date))
    return {f"R@{k}": 100 * sum(h[i] for h in hits) / len(hits) for i, k in enumerate(ks)} | {"facts": len(hits)}


# ============================================================================ splits and the CLI
# Two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy at run time).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def questions_for_se(se: float = 1.5, f1: float = 50.0) -> int:
    """Questions that bound the standard error of an F1 (x100) near `f1` by `se`. A score in
    [0, 1] with mean m has variance <= m (1 - m), the most at m = 0.5: 1,112 questions keep
    SE <= 1.5 at any F1 (567 at F1 85). Validation asks at least this many (PRESETS)."""
    return math.ceil(f1 * (100 - f1) / se ** 2)


def running_mean(xs: list, k: int = 5) -> list:
    """The mean of each value and the k - 1 before it (fewer at the start)."""
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def sample_sd(xs: list) -> float:
    """Sample standard deviation (n - 1); 0.0 for fewer than two values. NaN-tolerant,
    unlike statistics.stdev: a missing metric gives NaN, not an error."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))


def t_interval(xs: list) -> tuple:
    """Mean and t-based 95 % interval of the mean: mean -+ t(0.975, n-1) * sd / sqrt(n)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    half = T975.get(n - 1, 1.96) * sample_sd(xs) / math.sqrt(n)
    return mean, mean - half, mean + half


def _arm(r: dict) -> str:
    return (f"{r['algo']} {'->'.join(map(str, r['stages']))}" + (f" mb{r['minibatch']}" if r.get("minibatch", 64) != 64 else "")
            + (f" local-{r['local_decoding']}" if r.get("local_decoding", "sampled") != "sampled" else "")
            + (" separate-roles" if not r.get("shared_weights", True) else "")
            + (" stage-minibatch" if r.get("stage_minibatch") else ""))


def _fmt(ci, digits=1) -> str:
    return "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}]".format(*ci, d=digits)


def _share(xs: list) -> str:
    """Shares -> "m % [lo, hi]" over them, or "m %" for one."""
    return "{:.0f} % [{:.0f}, {:.0f}]".format(*(100 * x for x in t_interval(xs))) if len(xs) > 1 else f"{100 * xs[0]:.0f} %"


def compare(run_dirs: list, out_dir: Path) -> str:
    """Experiment report from finished runs (result.json + metrics.jsonl), written to out_dir:
    per arm the mean +- std over seeds of the test metrics and the cost (optimizer steps,
    generated tokens, minutes); each arm minus the first run's arm, paired by seed, in test F1
    and each op's accuracy with a t-based 95 % interval; what the curriculum's later stages keep;
    the share of local groups without reward variance; UPDATE rows by advantage sign; the credit
    diagnostic per stage (the within-group correlation of advantage and true quality, local vs
    global rows); mean validation curves. PNGs of the curves where matplotlib is installed."""
    runs = []
    for d in run_dirs:
        runs.append(read_run_result(Path(d)))
    check_comparable(run_dirs, runs)
    arms = {}
    for r in runs:
        arms.setdefault(_arm(r), []).append(r)
    cols = ["f1_overall", "f1_single-hop", "f1_multi-hop", "f1_temporal", "m_fail", "mem_tokens",
            "acc_INSERT", "acc_UPDATE", "acc_DELETE", "fact_recall"]
    md = ["| arm | seeds | " + " | ".join(cols) + " | optimizer steps | generated tokens | minutes |", "|---" * (len(cols) + 5) + "|"]
    for arm, rs in arms.items():
        cells = [f"{sum(v) / len(v):.1f} ± {sample_sd(v):.1f}" for v in ([r["trained"].get(c, math.nan) for r in rs] for c in cols)]
        cost = [sum(r["cost"][k] for r in rs) / len(rs) for k in ("updates", "gen_tokens")] + [sum(r["minutes"] for r in rs) / len(rs)]
        md.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {cost[0]:.0f} | {cost[1]:.0f} | {cost[2]:.1f} |")
    base = [r["base"]["f1_overall"] for r in runs]
    oracle = [r["oracle"]["f1_overall"] for r in runs if r.get("oracle")]
    nq = runs[0]["trained"].get("n_questions", "?") if runs else "?"
    starts = {r.get("init") for r in runs}  # one shared SFT model, or one per seed
    md += ["", f"Test questions per run: {nq}. Base pipeline (SFT only) test F1: {sum(base) / len(base):.1f}"
               + (f" (mean over {len(starts)} SFT models, one per seed: "
                  + ", ".join(f"{b:.1f}" for b in sorted({r['base']['f1_overall'] for r in runs})) + ")" if len(starts) > 1 else "")
               + f"; oracle memory: {sum(oracle) / len(oracle) if oracle else math.nan:.1f}."]
    md += ["", "Trained minus each run's own SFT start, mean [t-based 95 % interval] over seeds:", ""]
    for arm, rs in arms.items():
        parts = []
        for name, c in (("F1", "f1_overall"), ("UPDATE acc", "acc_UPDATE"), ("DELETE acc", "acc_DELETE"),
                        ("INSERT acc", "acc_INSERT")):
            d = [x for r in rs if (x := r["trained"].get(c, math.nan) - r["base"].get(c, math.nan)) == x]  # NaN-free
            parts.append(f"{name} {_fmt(t_interval(d)) if len(d) > 1 else '-'}")
        md.append(f"- {arm}: " + "; ".join(parts))
    ref, *others = list(arms)  # the arm of the first run named: the others are measured against it
    md += ["", f"Each arm minus {ref}, paired by seed: mean [t-based 95 % interval] over the seeds both have; "
               "test F1 per seed:", ""]
    for a in others:
        by_seed = [{r["seed"]: r["trained"] for r in arms[x]} for x in (a, ref)]
        seeds = sorted(by_seed[0].keys() & by_seed[1].keys())
        if not seeds:
            continue
        diffs = {name: [by_seed[0][s].get(c, math.nan) - by_seed[1][s].get(c, math.nan) for s in seeds]
                 for name, c in (("F1", "f1_overall"), ("INSERT acc", "acc_INSERT"), ("UPDATE acc", "acc_UPDATE"),
                                 ("DELETE acc", "acc_DELETE"))}
        parts = [f"{name} {_fmt(t_interval(d)) if len(d) > 1 else '-'}"
                 for name, d in ((name, [x for x in d if x == x]) for name, d in diffs.items())]  # NaN-free
        md.append(f"- {a}: " + "; ".join(parts) + f" over {len(seeds)} seeds; F1 per seed "
                  + ", ".join(f"{x:+.1f}" for x in diffs["F1"]))
    md += ["", "The curriculum: per later stage, its selected checkpoint's validation F1 minus its warm start's "
               "(mean [t-based 95 % interval] over seeds; seed-stages within 1.5 of their warm start), and the "
               "final checkpoint minus the first stage's best:", ""]
    md += [f"- {arm}: {curriculum_kept(rs)}" for arm, rs in arms.items() if len(rs[0]["stages"]) > 1]
    md += ["", "Groups whose rewards are all equal (no advantage), share pooled over a stage's groups, global and local, "
               "mean [t-based 95 % interval] over seeds:", ""]
    for arm, rs in arms.items():
        parts = [f"{s} sessions " + ", ".join(kinds) for s in rs[0]["stages"]
                 if (kinds := [f"{name} {_share(xs)}" for kind, name in (("G", "global"), ("L", "local"))
                               if (xs := [x for r in rs if (x := r["zero_var"][str(s)][kind]) == x])])]
        if parts:
            md.append(f"- {arm}: " + "; ".join(parts))
    lines = []
    for arm, rs in arms.items():
        counts = {s: [r["update_rows"][str(s)] for r in rs if r["update_rows"][str(s)]] for s in rs[0]["stages"]}
        if any(counts.values()):
            lines.append(f"- {arm}: " + "; ".join(f"{s} sessions {sum(c[0] for c in cs)} / {sum(c[1] for c in cs)}"
                                                   f" ({len(cs)} seeds)" for s, cs in counts.items() if cs))
    if lines:  # runs that log it
        md += ["", "UPDATE's credit: manager rows that wrote an UPDATE, by the sign of their advantage, summed over a "
                   "stage's steps and the seeds (positive / negative):", "", *lines]
    md += ["", "Credit diagnostic: within-group correlation of a row's advantage with its true quality (teacher-scored "
               "decisions), mean over a stage's steps, then mean [t-based 95 % interval] over seeds; L - G paired by seed:", ""]
    for arm, rs in arms.items():
        for s in rs[0]["stages"]:
            g, l, dl = _credit(rs, s, "G"), _credit(rs, s, "L"), _credit(rs, s, "L-G")
            md.append(f"- {arm}, {s} sessions: global {_fmt(t_interval(g), 2) if g else '-'}, local "
                      f"{_fmt(t_interval(l), 2) if l else '-'}, local - global {_fmt(t_interval(dl), 2) if dl else '-'}")
    md += ["", "Validation F1, mean over seeds, as sessions:step (step 0 = the stage's warm start, logged only):", ""]
    curves = {}
    for arm, rs in arms.items():
        pts = {}
        for r in rs:
            for stage, step, f in r["val_curve"]:
                i = r["stages"].index(stage)  # x = RL steps taken so far, so arms with other stage plans line up
                pts.setdefault((sum(r["steps"][:i]) + step, i, stage, step), []).append(f)
        curves[arm] = [(x, f"{s}:{t}", sum(v) / len(v)) for (x, _, s, t), v in sorted(pts.items())]
        md.append(f"- {arm}: " + " ".join(f"{k}={f:.1f}" for _, k, f in curves[arm]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "runs.json").write_text(json.dumps(runs, indent=1))
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    _plots(arms, curves, out_dir)
    return "\n".join(md)


def check_comparable(run_dirs: list, runs: list) -> None:
    """A DataError unless the runs make one experiment: each run once, each seed once per arm, one
    step plan per arm, one SFT start per seed (result.json's "init"), and one setup (its "setup":
    data, sessions, SFT recipe, RL knobs...) in every run that records it. Else the table would count a run twice or average runs of
    different starts, e.g. LoCoMo's base F1 with the synthetic world's, into one number."""
    where, seeds, plans, setups, starts = {}, {}, {}, [], {}
    for d, r in zip(run_dirs, runs):
        arm = _arm(r)
        for seen, key, problem in ((where, Path(d).resolve(), "the same run: a run counts once"),
                                   (seeds, (arm, r["seed"]), f"both {arm} seed {r['seed']} (a copy?): a seed counts once per arm")):
            if key in seen:
                raise DataError(f"{seen[key]} and {d} are {problem}")
            seen[key] = d
        first, steps = plans.setdefault(arm, (d, r.get("steps")))
        if steps != r.get("steps"):
            raise DataError(f"{first} and {d} are both {arm} but train {steps} and {r.get('steps')} steps per stage: "
                            "compare them separately")
        if isinstance(r.get("setup"), dict):
            setups.append((d, r["setup"]))
        # one SFT start per seed, shared by the seed's arms: the differences are paired over seeds
        first, init = starts.setdefault(r["seed"], (d, r.get("init")))
        if init != r.get("init"):
            raise DataError(f"{first} and {d} are both seed {r['seed']} but start from {init} and {r.get('init')}: "
                            "a seed's arms share one SFT model")
    for d, setup in setups[1:]:
        d0, s0 = setups[0]
        # where the LoCoMo file lies matters to a LoCoMo run only (a synthetic run never reads it)
        differ = [k for k in sorted(s0.keys() & setup.keys()) if s0[k] != setup[k]
                  and not (k == "locomo_path" and s0.get("data") != "locomo")]
        if differ:
            more = f"; also {', '.join(differ[1:])}" if differ[1:] else ""
            raise DataError(f"{d0} and {d} differ in {differ[0]} ({s0[differ[0]]} against {setup[differ[0]]}{more}): "
                            "not one experiment, compare them separately")


def stage_selections(r: dict) -> list:
    """Per stage of a run, (its warm start's validation F1, its selected checkpoint's). A stage
    selects its best validation after step 0 (train.py: the warm start is logged, not a candidate);
    a stage of 0 steps passes its warm start on."""
    out = []
    for s in r["stages"]:
        vals = [(step, f) for stage, step, f in r["val_curve"] if stage == s]
        start = next((f for step, f in vals if step == 0), math.nan)  # NaN: a log cut before the stage
        out.append((start, max((f for step, f in vals if step > 0), default=start)))
    return out


def curriculum_kept(rs: list) -> str:
    """What the later stages of runs `rs` (one stage plan) keep: per later stage, its selected
    checkpoint's validation F1 minus its warm start's, mean [t-based 95 % interval] over the runs;
    the seed-stages within 1.5 of their warm start; the final checkpoint minus the first stage's best."""
    sel = [stage_selections(r) for r in rs]
    kept = [b - a for x in sel for a, b in x[1:]]
    return "; ".join([f"{s} sessions {_fmt(t_interval([x[i][1] - x[i][0] for x in sel]))}"
                      for i, s in enumerate(rs[0]["stages"][1:], 1)]
                     + [f"within 1.5: {sum(k >= -1.5 for k in kept)} of {len(kept)}",
                        f"final minus the first stage's best {_fmt(t_interval([x[-1][1] - x[0][1] for x in sel]))}"])


def _credit(rs: list, stage, kind: str) -> list:
    """Per seed, the stage's mean credit correlation of `kind` ("G", "L", or the paired
    difference "L-G"), seeds where it is undefined (NaN: no group with reward variance) left out."""
    c = [r["credit"][str(stage)] for r in rs]
    xs = [x["L"] - x["G"] for x in c] if kind == "L-G" else [x[kind] for x in c]
    return [x for x in xs if x == x]


OPS = ("INSERT", "UPDATE", "DELETE")


def _plots(arms: dict, curves: dict, out_dir: Path) -> None:
    """curves.png: validation F1 and training reward against RL steps per arm (the SFT start as
    a line), and the credit diagnostic per stage; ops.png: per-op accuracy of the SFT start
    and of each arm after RL. PNGs only where matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    color = {arm: f"C{i}" for i, arm in enumerate(arms)}  # one colour per arm in every panel
    start = [f for rs in arms.values() for r in rs for st, step, f in r["val_curve"][:1] if step == 0]
    if start:
        ax[0].axhline(sum(start) / len(start), color="grey", ls=":", label="SFT start")
    for arm, pts in curves.items():
        ax[0].plot([x for x, _, _ in pts], [f for _, _, f in pts], marker="o", color=color[arm], label=arm)
    ax[0].set(xlabel="RL steps", ylabel="validation F1", title="validation F1 (mean over seeds)")
    ax[0].legend(fontsize=7)
    for arm, rs in arms.items():
        by_step = {}
        for r in rs:
            for x, y in r["reward_curve"]:
                by_step.setdefault(x, []).append(y)
        xs = sorted(by_step)
        ys = [sum(by_step[x]) / len(by_step[x]) for x in xs]
        ax[1].plot(xs, running_mean(ys), color=color[arm], label=arm)
    ax[1].set(xlabel="RL steps", ylabel="reward_global (5-step mean)",
              title="training reward (sampled rollouts; the stage's sessions)")
    ax[1].legend(fontsize=7)
    for arm, rs in arms.items():
        for kind, style in (("G", "--"), ("L", "-")):
            ys = [t_interval(_credit(rs, s, kind) or [math.nan]) for s in rs[0]["stages"]]
            if all(math.isnan(y[0]) for y in ys):  # an arm without local rows
                continue
            ax[2].errorbar([str(s) for s in rs[0]["stages"]], [y[0] for y in ys], yerr=[[y[0] - y[1] for y in ys], [y[2] - y[0] for y in ys]],
                           linestyle=style, marker="o", capsize=3, color=color[arm],
                           label=f"{arm} {'global' if kind == 'G' else 'local'}")
    ax[2].axhline(0, color="grey", lw=0.5)
    ax[2].set(xlabel="stage (sessions)", ylabel="corr(advantage, true quality)", title="credit diagnostic (95 % t-interval)")
    if ax[2].get_legend_handles_labels()[0]:  # runs without the diagnostic draw nothing here
        ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
    # per-op accuracy: the SFT start (shared by every run), then each arm's mean +- std over seeds
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = {"SFT start": [r["base"] for rs in arms.values() for r in rs]} | {a: [r["trained"] for r in rs] for a, rs in arms.items()}
    w = 0.8 / len(bars)
    for j, (name, tables) in enumerate(bars.items()):
        vals = [[t.get(f"acc_{op}", math.nan) for t in tables] for op in OPS]
        ax.bar([i + j * w for i in range(len(OPS))], [sum(v) / len(v) for v in vals], w, yerr=[sample_sd(v) for v in vals],
               capsize=2, color="grey" if j == 0 else color[name], label=name)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(OPS))], [f"{op} acc" for op in OPS])
    ax.set(ylabel="% of the teacher's ops matched (test, greedy)", title="decisions before and after RL (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "ops.png", dpi=100)
    plt.close(fig)


def read_run_result(d: Path) -> dict:
    """A finished run's result.json plus its validation curve; a missing or damaged file is a DataError."""
    try:
        r = json_loads((d / "result.json").read_text())
        vals = [json_loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        r["val_curve"] = [(v["stage"], v["step"], v["f1_overall"]) for v in vals if v["phase"] == "val"]
        for k in ("algo", "stages", "seed", "base", "trained"):
            r[k]
        rl = [v for v in vals if v["phase"] == "rl"]
        r["reward_curve"] = [(v["gstep"], v["reward_global"]) for v in rl]  # x = RL steps taken, as the plots' x
        r["cost"] = {"updates": sum(v.get("updates", 0) for v in rl), "gen_tokens": sum(v.get("gen_tokens", 0) for v in rl)}
        r["credit"] = {}  # stage -> {kind: mean over its steps of the credit correlation}
        r["zero_var"], r["update_rows"] = {}, {}  # stage -> {kind: share of groups}; stage -> (rows A > 0, A < 0)
        for s in r["stages"]:
            at = [v for v in rl if v["stage"] == s]
            for kind in ("G", "L"):
                xs = [x for v in at if (x := v.get(f"credit_corr_{kind}", math.nan)) == x]
                r["credit"].setdefault(str(s), {})[kind] = sum(xs) / len(xs) if xs else math.nan
            # a step's share is over its own groups: 2 S global ones (a stage's steps alike), two local ones per
            # branch point (weighted by branches), so both come out pooled over the stage's groups
            br = sum(v.get("branches", 0) for v in at)
            g = [x for v in at if (x := v.get("zero_var_frac_G", math.nan)) == x]
            r["zero_var"][str(s)] = {"G": sum(g) / len(g) if g else math.nan,
                                     "L": sum(v.get("zero_var_frac_L", 0) * v.get("branches", 0) for v in at) / br if br else math.nan}
            r["update_rows"][str(s)] = ([sum(v["update_rows_pos"] for v in at), sum(v["update_rows_neg"] for v in at)]
                                        if at and all("update_rows_pos" in v for v in at) else None)  # None: not logged
        float(r["trained"]["f1_overall"]) + float(r["base"]["f1_overall"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{d}: not a finished run's result.json and metrics.jsonl ({type(e).__name__}: {e})") from e
    return r


def find_checkpoint(path: Path) -> Path:
    """A checkpoint dir, or a run dir -> its last stage's best checkpoint. Only names
    `best-stage<k>` count: `best-stage<k>@<n>` versions and `.tmp-*` leftovers are not checkpoints."""
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path  # ours, or a Hugging Face model dir (sharded or not)
    stages = sorted((p for p in path.glob("best-stage*") if re.fullmatch(r"best-stage\d+", p.name)),
                    key=lambda p: int(p.name[len("best-stage"):]))
    if not stages:
        raise DataError(f"{path}: no checkpoint (model.safetensors) and no best-stage* inside")
    return stages[-1]


def world_tokenizer(samples: list, vocab: int = 1024):
    """A BPE over the worlds' dialogue and facts, to count tokens where no run gives one."""
    texts = [t["text"] for s in samples for k, v in s["conversation"].items() if k.startswith("session_")
             and isinstance(v, list) for t in v] + [g["fact"] for s in samples for g in s["gold_facts"].values()]
    return train_tokenizer(texts, vocab)


def run_args(path: Path) -> dict:
    """The args.json of the run that `path` (a run dir or a checkpoint inside one) belongs to; {} outside a run."""
    f = next((p / "args.json" for p in (path, path.parent) if (p / "args.json").exists()), None)
    try:
        args = json_loads(f.read_text()) if f else {}
    except ValueError:
        raise DataError(f"{f} is not JSON: the run's flags cannot be read") from None
    cfg = args.get("cfg", {}) if isinstance(args, dict) else None
    if not isinstance(cfg, dict):
        raise DataError(f"{f} is not a JSON object with a cfg object: the run's flags cannot be read")
    for k in ("retriever", *PRETRAINED):  # what evaluation takes from the run's cfg
        v, d = cfg.get(k, getattr(RLConfig, k)), getattr(RLConfig, k)
        if type(v) is not type(d) or (v not in RETRIEVERS if k == "retriever" else type(d) is int and v < 1):
            raise DataError(f"{f}: cfg.{k} {json.dumps(v)[:40]} is not valid: the run's flags cannot be read")
    return args


def run_answerer(path: Path, data: str, cfg: RLConfig, tok):
    """The answer agent a run was trained with (its args.json says), else the exact reader
    on the synthetic world and the run's SFT model on LoCoMo."""
    args = run_args(path)
    if data == "synthetic" and args.get("answerer", "exact") == "exact":
        return exact_answerer(cfg)
    sft = next((p for p in (path / "sft", path.parent / "sft") if (p / "model.safetensors").exists()), path)
    return AnswerAgent(model_reader(load_checkpoint(sft)["model"], tok, cfg), cfg, f"learned:{sft}")


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer >= 1")
    return v


class UserError(Exception):
    """A mistake in flags or files: reported as one line, "error: ..." with exit status 1, never a
    traceback (eval.py, train.py and bench.py alike)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + error lines (exit status 2) -> our one line
        raise UserError(message)


def cli_compare(argv: list) -> None:
    """python eval.py compare RUN_DIR... [--out results]"""
    ap = Parser(prog="eval.py compare", description="Table of an experiment's runs.")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    missing = [d for d in args.runs if not (Path(d) / "result.json").exists()]
    if missing:
        raise SystemExit(f"error: no result.json in {missing[0]} (did that run finish its test evaluation?)")
    try:
        print(compare(args.runs, Path(args.out)))
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}")


def cli_sensitivity(argv: list) -> None:
    """python eval.py sensitivity [--worlds 24]"""
    ap = Parser(prog="eval.py sensitivity",
                       description="Reward of scripted managers fed the gold facts, on the test worlds.")
    ap.add_argument("--worlds", type=positive_int, default=24, help="synthetic test worlds")
    args = ap.parse_args(argv)
    cfg = config_for(False, "synthetic")
    samples, convs = synthetic_split({"test": args.worlds})["test"]
    tok = world_tokenizer(synthetic_split({"train": 50})["train"][0])
    res = sensitivity(samples, convs, tok, cfg)
    print(f"{args.worlds} test worlds, {sum(len(c.qa) for c in convs)} questions, exact reader, "
          f"lambda {cfg.lam}, phi {cfg.phi} (x100)\n")
    print(report_table(res, SENSITIVITY_COLS))
    d = reward_density(convs, cfg)
    print(f"\nquestions per session by last evidence: mean {d['last'][0]:.2f}, min {d['last'][1]}, max {d['last'][2]}")
    print("reward questions per session row (share of rows with none):")
    for S in (8, 16, 32):
        g, g0, loc, l0 = d[S]
        print(f"  {S} sessions: global {g:.2f} ({100 * g0:.0f} %), local {loc:.2f} ({100 * l0:.0f} %)")
    shares = memory_shares(samples, convs, tok, cfg)
    print("oracle memory share tok(M_t) / T_t after session t, mean (max) over the worlds:")
    print("  " + ", ".join(f"{t}: {sum(w[t - 1] for w in shares) / len(shares):.2f} ({max(w[t - 1] for w in shares):.2f})"
                           for t in (1, 2, 3, 4, 8, 16, 32) if t <= min(map(len, shares))))


def cli_recall(argv: list) -> None:
    """python eval.py recall [--worlds 24]"""
    ap = Parser(prog="eval.py recall", description="Retrieval recall of BM25 and MiniLM: LoCoMo's test questions "
                       "over stored turns, synthetic facts over the gold memory; the encoder's time.")
    ap.add_argument("--locomo-path", default=LOCOMO_PATH)
    ap.add_argument("--worlds", type=positive_int, default=24, help="synthetic test worlds")
    args = ap.parse_args(argv)
    try:
        convs = locomo_split(load_locomo(args.locomo_path))["test"]
        t0 = time.perf_counter()
        minilm()
        load_s = time.perf_counter() - t0
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    samples, worlds = synthetic_split({"test": args.worlds})["test"]
    cats = ["overall"] + [CATEGORIES[k] for k in (4, 1, 2, 3)]
    if not any(c.qa for c in convs):
        print(f"warning: {args.locomo_path}: the test split has no questions, so its recall table is empty")
    print(f"LoCoMo test split ({len(convs)} conversations, {sum(len(c.qa) for c in convs)} questions): evidence "
          f"recall@k over all stored turns (x100), {torch.get_num_threads()} torch thread(s)\n")
    print("| retriever | questions | R@1 | R@5 | R@10 | R@30 |\n|---|---|---|---|---|---|")
    secs = {}
    for r in RETRIEVERS:
        res, secs[r] = turn_recall(convs, r)
        for cat in cats:  # a category without questions (a cut file) has no recall: dashes
            row = res.get(cat, {"questions": 0})
            print(f"| {r} {cat} | {row['questions']} | "
                  + " | ".join(f"{row[f'R@{k}']:.1f}" if row["questions"] else "-" for k in (1, 5, 10, 30)) + " |")
    turns = sum(len(s.turns) for c in convs for s in c.sessions) / len(convs)
    print(f"\nseconds per conversation ({turns:.0f} turns, all its questions): "
          + ", ".join(f"{r} {sum(v) / len(v):.2f}" for r, v in secs.items()) + f"; loading the encoder {load_s:.1f} once\n")
    print(f"Synthetic test worlds ({args.worlds}): facts that UPDATE or DELETE a stored entry, is that entry among the "
          "top k of the fact's speaker (x100); F1 of the exact reader on the gold memory (top-4 per speaker)\n")
    print("| retriever | facts | R@1 | R@2 | R@5 | R@10 | gold-memory F1 |\n|---|---|---|---|---|---|---|")
    for r in RETRIEVERS:
        cfg = config_for(False, "synthetic", retriever=r)
        res = fact_recall(samples, worlds, cfg)
        banks = oracle_banks(samples, worlds, cfg)
        asked = [(b, q) for b, c in zip(banks, worlds) for q in c.qa]
        f1 = [token_f1(p, q.answer) for p, (_, q) in zip(exact_answerer(cfg).answer([(b, q.question) for b, q in asked]), asked)]
        print(f"| {r} | {res['facts']} | " + " | ".join(f"{res[f'R@{k}']:.1f}" for k in (1, 2, 5, 10))
              + f" | {100 * sum(f1) / len(f1):.1f} |")


def eval_data(args) -> tuple:
    """(samples or None, conversations) of the split, cut to --convs and --sessions. A session
    slice keeps only the questions whose evidence lies in the kept sessions."""
    if args.data == "locomo":
        samples, convs = None, locomo_split(load_locomo(args.locomo_path))[args.split]
    else:
        samples, convs = synthetic_split({args.split: args.worlds})[args.split]
    samples, convs = samples and samples[:args.convs], convs[:args.convs]
    if args.sessions:
        convs = [replace(c, sessions=c.sessions[:args.sessions],
                         qa=[q for q in c.qa if max(q.sessions) <= c.sessions[:args.sessions][-1].index])
                 for c in convs]
    return samples, convs


def cli_evaluate(argv: list) -> None:
    """python eval.py PATH [--data ...]: one checkpoint on a split, with the oracle beside it."""
    ap = Parser(description="Evaluate a Memory-R2 checkpoint: F1, BLEU-1, EM per category, M-Fail, memory size, ops.",
                       epilog="other jobs (each with its own --help): 'eval.py compare RUN... --out DIR' (an experiment's "
                              "table and figures), 'eval.py sensitivity' (scripted managers' rewards), 'eval.py recall' "
                              "(retrieval recall of BM25 and MiniLM)")
    ap.add_argument("path", help="a run dir (runs/<name>) or a checkpoint dir")
    ap.add_argument("--data", choices=["synthetic", "locomo"], default="synthetic")
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--locomo-path", default=LOCOMO_PATH)
    ap.add_argument("--worlds", type=positive_int, default=24, help="synthetic worlds in the split")
    ap.add_argument("--chunks", type=positive_int, default=None, help=f"chunks per session (default: the run's; else memr2.config_for: {RLConfig.chunks}, LoCoMo "
                         f"{LOCOMO_CHUNKS}, a pretrained model {PRETRAINED['chunks']})")
    ap.add_argument("--convs", type=positive_int, default=None, help="evaluate only the first N conversations of the split")
    ap.add_argument("--sessions", type=positive_int, default=None,
                    help="keep the first N sessions of each conversation and the questions about them")
    ap.add_argument("--retriever", choices=RETRIEVERS, default=None,
                    help="memory retrieval (default: the run's, else bm25); the sizes are the run's, else the paper's "
                         f"for a pretrained chat model and {RLConfig.per_fact}/{RLConfig.mem_cap}/{RLConfig.qa_top_k} for ours")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (the test); > 0: one read sampled at it (seed 0), as RL's rollouts sample")
    args = ap.parse_args(argv)
    if not 0 <= args.temperature <= 10:
        raise SystemExit(f"error: --temperature {args.temperature}: must be in [0, 10]")
    try:
        ckpt = find_checkpoint(Path(args.path))
        # best-stage<k> names its current version (a symlink) that a training run may replace while this one
        # reads: the version is read, and its result written beside it, not into a newer one's dir
        version = ckpt.resolve()
        ck = load_checkpoint(version)
        out = version / f"eval-{args.data}-{args.split}{f'-T{args.temperature:g}' if args.temperature else ''}.json"
        out.write_text("{}")  # fail now, not after the whole evaluation, if the result cannot be written
        samples, convs = eval_data(args)
        # N and retrieval as the model and data decide (a chat model is a pretrained one), or as the run
        # had them (args.json; its N only where it read the same data), or as a flag says
        run = run_args(Path(args.path))
        kept = {k: v for k, v in run.get("cfg", {}).items()
                if k in ("retriever", *PRETRAINED) and (k != "chunks" or run.get("data", "synthetic") == args.data)}
        cfg = config_for(bool(ck["model"].cfg.chat_format), args.data,
                         **kept | {k: v for k, v in (("chunks", args.chunks), ("retriever", args.retriever)) if v is not None})
        if cfg.retriever == "minilm":
            packaged_minilm()  # not installed: one line now, not after reading the conversations
        answerer = run_answerer(Path(args.path), args.data, cfg, ck["tok"])
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # the result file, tried first: a read-only checkpoint fails before the evaluation
        raise SystemExit(f"error: cannot write {e.filename}: {e.strerror or e}")
    table = {f"{ckpt} (answerer {answerer.name}, retriever {cfg.retriever}"
             f"{f', sampled at T {args.temperature:g}' if args.temperature else ''})":
             evaluate(ck["model"], ck["tok"], answerer, convs, cfg, samples, args.temperature)}
    if samples is not None:
        table["oracle memory (teacher)"] = score(answerer, ck["tok"], oracle_banks(samples, convs, cfg), convs)
    print(report_table(table))
    if samples is not None:
        print("\nDecisions against the teacher (x100):\n\n" + report_table(table, DECISION_COLS))
    try:
        out.write_text(json.dumps(table, indent=1))
    except FileNotFoundError:  # the run removed the old version (model.remove_stale)
        pass
    if ckpt.resolve() != version or not out.exists():
        raise SystemExit(f"error: {ckpt} was replaced by a training run during the evaluation: the table above is of "
                         f"the version it replaced and is not kept; evaluate {ckpt} again")
    print(f"wrote {ckpt / out.name}")


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    jobs = {"compare": cli_compare, "sensitivity": cli_sensitivity, "recall": cli_recall}
    try:
        if argv[:1] and argv[0] in jobs:
            return jobs[argv[0]](argv[1:])
        cli_evaluate(argv)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    import sys
    sys.stdout.reconfigure(errors="backslashreplace")  # a non-ASCII path on an ASCII terminal (stderr does this already)
    main()
