"""Memory-R2 / LoGo-GRPO: the algorithm, top to bottom (paper Sec. 3-4; official code where more specific).

One transformer, switched by a role prompt, is the fact extractor and the memory manager (the
policy); a frozen answer agent reads the memory. Per chunk of a session the extractor writes
facts, the manager writes INSERT / UPDATE / DELETE / NOOP operations on the bank, applied at
once. The reward is the answer agent's token F1 minus a memory-bloat penalty.

LoGo-GRPO in PPO terms. The episode is one conversation; the state is the dialogue so far
plus the memory bank; an action is one model call (a chunk's facts, or its operations), and
a row is one role's calls in one session, all sharing the row's reward. There is no critic:
the baseline of a row is the mean reward of its group, the advantage (r - mean) / std goes to
every call of the row, and the PPO ratio is taken per call (the call's mean token log-ratio,
exponentiated, then clipped). What a group compares decides the credit:
  global: n rollouts of sessions 1..S; the group is the n rows at the same session index,
          rewarded by F1 on the questions whose evidence lies in that session, answered
          from each rollout's FINAL memory. The members entered the session with different
          memories, so part of a reward gap is the luck of other sessions;
  local:  a session re-rolled K times from one rollout's snapshot of the memory before it,
          rewarded right after that session: the K branches start from identical memory,
          so their reward differences come from that session's actions alone.
Both kinds go into one pool and one clipped loss. The file reads in the method's order, each
name defined before its first use: role prompts, rollouts, the answer agent, rewards,
advantages, the loss, one episode's pool, the update, the step's logged numbers, one step; the
fused log-prob kernel that keeps the loss from holding (tokens x vocab) logits is the appendix.
"""
import copy
import itertools
import json
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable
from checkpoint import chat_prompt
from model import Roles, decode, encode, for_role, generate
from memory import (MemoryBank, bloat_cost, parse_facts, parse_operations, retrieve_for_facts,
                    retrieve_for_question, short_date)
from parallel import even_parts, gather_over_ranks, gathered, int_over_ranks, sharded, step_size, sum_gradients

# ============================================================================ role prompts
# The outputs are JSON: the facts schema is the official one; the operations schema is compact
# ("op", and an explicit NOOP, one op per fact; the official manager writes "operation" and leaves
# a NOOP out of its list). The inputs are compact lines, since the tiny model's context is 384
# tokens (so histories reset at every chunk, not every session).
ROLE = {"ext": "<ext>Extract facts.\n", "mgr": "<mgr>Update memory.\n", "ans": "<ans>Answer.\n"}
SEP = "<sep>"


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# Every id, date or source a role must copy comes AFTER the text it belongs to, and what a
# role must match against (the question, the new facts) comes BEFORE the lines it searches.
# Attention is causal: "[m3]" at the end of "Ann lives in Oslo [m3]" has seen its line and
# the new facts, so the model can find it by content; put first, it would have seen nothing.
def extractor_prompt(turns, date: str) -> str:
    # The session's date comes first, a deviation: the official fact prompt shows speaker, text
    # and dia_id only (and asks for absolute times). The synthetic world needs it: a fact whose
    # date a question needs carries it, since an UPDATE keeps an entry's first date.
    return ROLE["ext"] + f"Date: {short_date(date)}\n" + "\n".join(
        f"{t.speaker}: {t.text}{t.caption} ({t.dia_id})" for t in turns) + SEP


def manager_prompt(memories, facts) -> str:
    new = "".join(f"{f['fact']} ({f['dia_id']})\n" for f in facts)
    mem = "".join(f"{e.content} [{e.memory_id}]\n" for e in memories)
    return ROLE["mgr"] + new + "Memory:\n" + mem + SEP


def answer_prompt(memories, question: str) -> str:
    mem = "".join(f"{e.content} ({e.session_time})\n" for e in memories)
    return ROLE["ans"] + "Q: " + question + "\n" + mem + SEP


def facts_target(facts) -> str:
    # Keys in the order the model can best write them: the fact, then its subject, then its source.
    return _compact({"facts": [{"fact": f["fact"], "speaker": f["speaker"], "dia_id": f["dia_id"]} for f in facts]})


def ops_target(ops) -> str:
    return _compact({"operations": ops})


def chunk_turns(turns, n_chunks: int) -> list:
    """N chunks of ceil(#turns/N) consecutive turns, the official code's chunking: where the turns
    run out the last chunks are empty, and each still gets its extractor call, as the official
    code makes N calls per session."""
    size = max(1, math.ceil(len(turns) / n_chunks))
    return [turns[i * size:(i + 1) * size] for i in range(n_chunks)]


# ---------------------------------------------------------------- the same roles for an instruct model
# An instruct model (its config names a chat format) gets the same inputs in its chat template:
# a system prompt with the role's task as the paper describes it, one worked example, then the
# real input with the reply schema. The tiny model's prompts above are untouched.
CHAT_SYSTEM = {
    "ext": "You are the fact extractor of a memory agent. You read new turns of a long conversation between "
           "two people, each turn ending with its id in parentheses, and extract every fact worth remembering "
           "about the speakers: personal details, events, plans, preferences, relationships and their dates.",
    "mgr": "You are the memory manager of a memory agent. You get new facts, each with the id of its source "
           "turn, and the related memories already stored, each with its id in brackets. Memory is monotonic: "
           "nothing true is ever lost. For each new fact you choose one operation: INSERT it as a new memory; "
           "UPDATE a memory about the same thing when the fact changes, extends or ends it (keep the memory_id, "
           "write merged content that keeps every earlier claim); DELETE a memory only when the fact proves it "
           "false (not merely outdated); NOOP if the memory already holds it.",
    "ans": "You answer questions about a long conversation between two people, using only the memories given, "
           "each with the date of its session. When memories conflict, trust the most recent one.",
}
# The reply format comes last, right before the answer: SmolLM2-135M went on with the dialogue
# instead of writing JSON when the format was only in the system prompt.
CHAT_USER = {
    "ext": ("New turns:\n", '\n\nExtract the facts, one per item, at most 20 words each, naming the person. Reply '
            'with JSON only: {"facts": [{"fact": "...", "speaker": "<whom the fact is about>", "dia_id": "<id of '
            'its turn>"}]}, or {"facts": []} if there is nothing to remember.'),
    "mgr": ("New facts:\n", '\nReply with JSON only: {"operations": [{"op": "INSERT", "content": "...", "speaker": '
            '"...", "dia_id": "..."}, {"op": "UPDATE", "content": "...", "memory_id": "m1", "dia_id": "..."}, '
            '{"op": "DELETE", "memory_id": "m2"}, {"op": "NOOP"}]}'),
    "ans": ("", "\nAnswer in a few words (a name, a date, a short phrase), with no explanation."),
}
# One worked example per role, as a first user/assistant exchange: with it SmolLM2-135M wrote valid
# facts JSON for 6 of 6 LoCoMo chunks, without it for none (it broke the list or ran on).
CHAT_EXAMPLE = {
    "ext": ("Date: 8 May 2023\nAnna: I just adopted a puppy named Rex! (D1:1)\nTom: Congrats! I started a new job as a "
            "nurse last week. (D1:2)",
            '{"facts": [{"fact": "Anna adopted a puppy named Rex", "speaker": "Anna", "dia_id": "D1:1"}, '
            '{"fact": "Tom started a new job as a nurse", "speaker": "Tom", "dia_id": "D1:2"}]}'),
    "mgr": ("Tom works as a teacher now (D3:2)\nAnna's puppy Rex died (D3:5)\nTom never lived in Rome (D3:7)\n"
            "Memory:\nTom started a new job as a nurse [m2]\nAnna adopted a puppy named Rex [m1]\nTom lives in Rome [m3]\n",
            '{"operations": [{"op": "UPDATE", "content": "Tom works as a teacher, before that as a nurse", '
            '"memory_id": "m2", "dia_id": "D3:2"}, {"op": "UPDATE", "content": "Anna adopted a puppy named Rex, '
            'who died", "memory_id": "m1", "dia_id": "D3:5"}, {"op": "DELETE", "memory_id": "m3"}]}'),
    "ans": ("Memories:\nAnna adopted a puppy named Rex (8 May 2023)\nTom started a new job as a nurse (8 May 2023)\n"
            "Question: What is the name of Anna's puppy?", "Rex"),
}
CHAT_MAX_NEW = {"ext": 256, "mgr": 256, "ans": 32}  # JSON in a real tokenizer takes more tokens


def as_chat(model, role: str, prompt: str) -> str:
    """A role prompt as the model reads it: unchanged for the tiny model, else in its chat format."""
    fmt = model.cfg.chat_format
    if not fmt:
        return prompt
    body = prompt[len(ROLE[role]):].removesuffix(SEP)
    if role == "ans":  # "Q: question\n" + memory lines -> the memories first, the question last
        q, _, mem = body.partition("\n")
        body = f"Memories:\n{mem}\nQuestion: {q[3:]}"
    head, tail = CHAT_USER[role]
    example, reply = CHAT_EXAMPLE[role]
    return chat_prompt(fmt, [("system", CHAT_SYSTEM[role]), ("user", head + example + tail), ("assistant", reply),
                             ("user", head + body + tail)])


def chat_ids(model, tok, role: str, prompts: list) -> tuple[list, list]:
    """Role prompts as the model reads them -> (the ids every one starts with, the rest of each). For a
    chat model that shared part is the system prompt and worked example, the same in every call of the
    role, so generate computes its K/V once; the tiny model's role prompts share nothing worth it."""
    ids = [encode(tok, as_chat(model, role, p)) for p in prompts]
    if not model.cfg.chat_format or not ids:
        return [], ids
    # The role's prompt around an empty input, up to the first token where a real prompt differs
    # (a BPE merge across the boundary ends the shared part a token early); each row keeps >= 1 token.
    fixed = encode(tok, as_chat(model, role, ROLE[role] + SEP))
    n = min(len(fixed), *(len(p) - 1 for p in ids))
    for p in ids:
        n = next((i for i in range(n) if p[i] != fixed[i]), n)
    return fixed[:n], [p[n:] for p in ids]


# ============================================================================ configuration
@dataclass
class RLConfig:
    """LoGo-GRPO knobs. Defaults are the paper's where they fit the tiny model (0.56M
    parameters) on a CPU; the README lists every deviation and why."""
    algo: str = "logo"  # logo | grpo (global groups only: never branches, whatever p) | local (local only)
    n: int = 4  # global group size (paper 16)
    K: int = 4  # local group size
    p: float = 0.5  # per-session branch probability
    chunks: int = 2  # chunks per session N (paper 6; our sessions have 4 turns; config_for below)
    temperature: float = 0.5  # sampling AND log-prob temperature (paper 1; see README)
    local_decoding: str = "sampled"  # sampled (at `temperature`, as the rollouts) | greedy (the official code's)
    lam: float = 0.3  # bloat penalty weight
    phi: float = 0.7  # free share of the dialogue length (the paper's; the right memory stays free, see README)
    q_global: int = 64  # reward questions per step (global), shared by all rollouts
    q_local: int = 16  # reward questions per branch (local), shared by its K branches
    retriever: str = "bm25"  # bm25 | minilm (the paper's kind: cosine of sentence embeddings)
    per_fact: int = 2  # manager retrieval: top per fact (paper 5) ...
    mem_cap: int = 6  # ... capped overall (paper 25)
    qa_top_k: int = 4  # answer retrieval: top per speaker (paper 30) ...
    qa_by_session: bool = False  # ... best first, or by session then score (paper)
    max_new: dict = field(default_factory=lambda: {"ext": 128, "mgr": 192, "ans": 16})
    lr: float = 5e-5  # the paper's 2e-6 is for a 7B model and moves nothing here; 1e-4 breaks extraction (results/README.md)
    ppo_epochs: int = 2
    minibatch: int = 64  # cells per optimizer step, fixed order
    eps: float = 0.2  # ratio clip
    dual_clip: float = 3.0  # bound on the loss of a negative advantage
    ratio_cap: float = 3.0  # cap on a call's mean log-ratio
    beta_kl: float = 1e-3
    beta_h: float = 1e-3
    grad_clip: float = 1.0
    logprob_chunk: int = 256  # rows per chunk of the fused log-prob kernel


# The RLConfig fields a model's context decides, in one place. RLConfig's own values fit the tiny
# model's 384 tokens on the synthetic world (4-turn sessions); a pretrained model's context has
# room for the official code's N and retrieval sizes and order.
PRETRAINED = dict(chunks=6, per_fact=5, mem_cap=25, qa_top_k=30, qa_by_session=True)
LOCOMO_CHUNKS = 10  # the tiny model on LoCoMo: about 2 of a session's ~22 turns fit one chunk's prompt


def config_for(pretrained: bool, data: str, **given) -> RLConfig:
    """The one builder of an RLConfig, for train.py and eval.py alike: RLConfig's own values (the tiny
    model on the synthetic world), then what the model and data set decide, then every field `given`
    names that is not None (a preset, a flag, a run's args.json). pretrained: a Hugging Face chat
    model (train.py --init-hf; a checkpoint with a chat format): the paper's N and retrieval sizes,
    and room for JSON in a real tokenizer. The tiny model on LoCoMo: LOCOMO_CHUNKS chunks a session."""
    model_data = (dict(PRETRAINED, max_new=dict(CHAT_MAX_NEW)) if pretrained
                  else {"chunks": LOCOMO_CHUNKS} if data == "locomo" else {})
    return RLConfig(**model_data | {k: v for k, v in given.items() if v is not None})


# ============================================================================ rollouts
@dataclass
class Cell:
    """One model call: a (row, chunk) cell of the loss. Only `response` is trained (the loss
    mask is "the response", never inferred from token ids)."""
    prompt: list
    response: list  # sampled ids, ending with EOS when finished
    finished: bool
    role: str = ""  # "ext" or "mgr": with separate weights (model.Roles), whose weights score it


class Group(NamedTuple):
    """A GRPO group id. Global: all rollouts' rows of session t for one role. Local: the K
    branches re-rolled from rollout `source`'s memory before session t, for one role."""
    kind: str  # "G" (global) or "L" (local)
    session: int
    role: str
    source: int = -1  # the rollout a local group branched from


@dataclass
class Decision:
    """What one chunk's two calls decided for batch member b: the facts extracted from
    `turns`, the memories the manager was shown, and the operations it wrote."""
    b: int
    turns: list
    facts: list
    shown: list
    ops: list


@dataclass
class Row:
    """One role's calls for one (rollout, session) pair (the official code's row)."""
    role: str
    group: Group = None  # the GRPO group it belongs to
    cells: list = field(default_factory=list)
    reward: float = 0.0
    adv: float = 0.0
    decisions: list = field(default_factory=list)  # its chunks' Decisions (read by the diagnostics only)
    quality: float = float("nan")  # diagnostic only: share of gold decisions right (synthetic world)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.cells)


def sample_cells(model, tok, prompts: list, role: str, cfg: RLConfig, temperature: float, gen=None):
    """Batched KV-cache sampling -> list of Cells. Training rollouts sample plainly (no top-k,
    no top-p) so the loss's log-probs belong to the distribution that was sampled."""
    model = for_role(model, role)
    prefix, rest = chat_ids(model, tok, role, prompts)
    outs, done = generate(model, rest, cfg.max_new[role], temperature=temperature, eos_id=model.cfg.eos_id,
                          generator=gen, prefix=prefix)
    return [Cell(prefix + r, o, d, role) for r, o, d in zip(rest, outs, done)]


def run_session(model, tok, banks: list, sessions: list, cfg: RLConfig, temperature: float, gen=None, trace=None):
    """Run sessions[b] on banks[b] for every b in one batch, writing to the banks in place
    -> (extractor rows, manager rows, op counts per bank). Training passes one session n + K
    times (rollouts and branches), evaluation session t of several conversations. A `trace`
    list collects every chunk's Decision. A call cut off unfinished ends its bank's session
    there (the official stop_when_truncated): the session's later chunks are not read."""
    B = len(banks)
    ext, mgr, counts = [Row("ext") for _ in range(B)], [Row("mgr") for _ in range(B)], [Counter() for _ in range(B)]
    chunks = [chunk_turns(s.turns, cfg.chunks) for s in sessions]
    # Extractor: the new turns only, so no chunk waits for another's memory: every chunk of every
    # row is one batch (in training the B rows are the same session). A chunk after a cut-off
    # call then drops its extractor cell, as the official code never makes that call.
    calls = [(b, k) for b in range(B) for k in range(len(chunks[b]))]
    cells = sample_cells(model, tok, [extractor_prompt(chunks[b][k], sessions[b].date) for b, k in calls], "ext", cfg,
                         temperature, gen)
    ext_cells, facts, bad = dict(zip(calls, cells)), {}, {}
    for (b, k), c in ext_cells.items():
        facts[b, k], why = parse_facts(decode(tok, c.response)) if c.finished else ([], "unfinished")
        bad[b, k] = why == "invalid_json"
    stopped = [False] * B  # bank b's session ended at a cut-off call
    for k in range(max(map(len, chunks))):
        # Manager, chunk by chunk: facts + memories retrieved from each row's own bank as the
        # earlier chunks left it. With no facts there is nothing to decide, so the call is skipped
        # (it would only learn "[]").
        live = [b for b in range(B) if k < len(chunks[b]) and not stopped[b]]
        for b in live:
            ext[b].cells.append(ext_cells[b, k])
            counts[b]["facts"] += len(facts[b, k])
            counts[b]["bad_facts_json"] += bad[b, k]
            stopped[b] = not ext_cells[b, k].finished
        todo = [b for b in live if facts[b, k]]
        shown = {b: retrieve_for_facts(banks[b], facts[b, k], cfg.per_fact, cfg.mem_cap) for b in todo}
        cells = sample_cells(model, tok, [manager_prompt(shown[b], facts[b, k]) for b in todo], "mgr", cfg, temperature, gen)
        ops = {b: [] for b in live}
        for b, c in zip(todo, cells):
            mgr[b].cells.append(c)
            ops[b], why = parse_operations(decode(tok, c.response)) if c.finished else ([], "unfinished")
            counts[b]["bad_ops_json"] += why == "invalid_json"
            stopped[b] = not c.finished
        for b in range(B):
            if trace is not None and k < len(chunks[b]):  # an unread chunk: its facts missed, nothing written
                # copies: a later UPDATE rewrites entries in place
                trace.append(Decision(b, chunks[b][k], facts[b, k] if b in ops else [],
                                      [copy.copy(e) for e in shown.get(b, [])], ops.get(b, [])))
            if b in ops:
                counts[b].update(banks[b].apply(ops[b], sessions[b].index, short_date(sessions[b].date)))
    return ext, mgr, counts


# ============================================================================ answer agent
class AnswerAgent:
    """The frozen answer agent (paper Sec. 3): retrieval shows the top memories per speaker and
    `read([(memories, question)]) -> [answer]` answers: `model_reader` or the synthetic world's
    exact reader (eval.py), recorded by `name`. Never updated, so answers are cached."""

    def __init__(self, read, cfg: RLConfig, name: str):
        self.read, self.top_k, self.by_session, self.name, self.cache = read, cfg.qa_top_k, cfg.qa_by_session, name, {}

    def answer(self, asked: list) -> list:
        """asked: [(bank, question)] -> [answer string]."""
        shown = [(retrieve_for_question(bank, q, self.top_k, self.by_session), q) for bank, q in asked]
        keys = [(q, tuple((e.memory_id, e.session, e.content, e.session_time) for e in mem)) for mem, q in shown]
        todo = {k: s for k, s in zip(keys, shown) if k not in self.cache}
        self.cache.update(zip(todo, self.read(list(todo.values()))))
        return [self.cache[k] for k in keys]


def model_reader(model, tok, cfg: RLConfig):
    """A frozen model in the answerer role, greedy, in batches of 64 prompts."""
    for p in model.parameters():
        p.requires_grad_(False)

    def read(items):
        prompts, out = [answer_prompt(mem, q) for mem, q in items], []
        for i in range(0, len(prompts), 64):
            prefix, rest = chat_ids(model, tok, "ans", prompts[i:i + 64])
            outs, _ = generate(model, rest, cfg.max_new["ans"], temperature=0.0, prefix=prefix)
            out += [decode(tok, o).strip() for o in outs]
        return out
    return read


# ============================================================================ the reward's metric (token F1 of the official code)
def normalize_answer(s: str) -> list:
    """SQuAD-style: lower-case, no punctuation, no articles, collapsed whitespace."""
    s = "".join(ch for ch in str(s).lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", s).split()


def token_f1(pred: str, gold: str) -> float:
    """Token F1 over the SET of shared tokens (the official code's mem0-style variant)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return float(p == g)
    common = set(p) & set(g)
    if not common:
        return 0.0
    prec, rec = len(common) / len(p), len(common) / len(g)
    return 2 * prec * rec / (prec + rec)


# ============================================================================ rewards (official code: per-session global, immediate local)
def dialogue_tokens(tok, conv) -> list:
    """T_t: cumulative dialogue tokens after each session, counted over the turns' text (as the
    official code does: no "Speaker: ", no image caption) with the model's tokenizer (the same one
    that counts memory; the official code counts words)."""
    total, out = 0, []
    for s in conv.sessions:
        total += sum(len(encode(tok, t.text)) for t in s.turns)
        out.append(total)
    return out


def memory_tokens(tok, bank) -> int:
    return bank.num_tokens(lambda s: len(encode(tok, s)))


def penalty(tok, bank, T: int, cfg: RLConfig) -> float:
    return cfg.lam * bloat_cost(memory_tokens(tok, bank), T, cfg.phi)


def row_reward(f1: list, pen: float, finished: bool) -> float:
    """One row's reward, global or local alike: mean F1 over its questions (0 if none) minus
    its bloat penalty lam * c(M, T); 0 if a call was cut off unfinished."""
    return (sum(f1) / len(f1) if f1 else 0.0) - pen if finished else 0.0


def global_rewards(f1: list, qas: list, n_sessions: int, penalties: list, finished: list) -> list:
    """r[i][t] = row_reward of rollout i at session t: F1 (rollout i's FINAL memory) over the
    sampled questions whose evidence includes session t, minus rollout i's final penalty. A
    question spanning several sessions counts for each. f1: [n][q], finished: [n][S]."""
    return [[row_reward([f1[i][j] for j, q in enumerate(qas) if t in q.sessions], penalties[i], finished[i][t - 1])
             for t in range(1, n_sessions + 1)] for i in range(len(f1))]


def sample_questions(qas: list, max_sessions: int, k: int, rng: random.Random) -> list:
    """Up to k questions placed within the first max_sessions sessions (QA.placed: where all
    their evidence lies, or as the official loader reads a string of several ids, where its first
    one does); one subset shared by every member of a group, so rewards stay comparable."""
    pool = [q for q in qas if q.sessions and (q.placed or max(q.sessions)) <= max_sessions]
    return rng.sample(pool, min(k, len(pool)))


def qa_scores(answerer: AnswerAgent, tok, banks: list, qs: list, T: int, cfg: RLConfig):
    """The reward's two parts for each bank, as both group kinds use them: F1 per question
    [b][q] (answered from that bank) and the bloat penalty lam * c(M, T) [b]."""
    answers = answerer.answer([(b, q.question) for b in banks for q in qs])
    f1 = [[token_f1(answers[i * len(qs) + j], q.answer) for j, q in enumerate(qs)] for i in range(len(banks))]
    return f1, [penalty(tok, b, T, cfg) for b in banks]


# ============================================================================ advantages (GRPO: per group and role)
def group_advantages(rewards: list) -> list:
    """(r - mean) / (std + 1e-6) with the unbiased std; a singleton group keeps A = r."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if len(rewards) == 1:
        return r.tolist()
    return ((r - r.mean()) / (r.std(unbiased=True) + 1e-6)).tolist()


def assign_advantages(rows: list) -> dict:
    """Group rows by their group id and set row.adv. Zero-variance groups are KEPT with A = 0
    (as the official code does; they still add KL and entropy) and counted."""
    groups = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    zero, stds = Counter(), {"G": [], "L": []}
    for gid, members in groups.items():
        rewards = [row.reward for row in members]
        for row, a in zip(members, group_advantages(rewards)):
            row.adv = a
        if len(members) > 1:
            std = torch.tensor(rewards).std().item()
            stds[gid.kind].append(std)
            zero[gid.kind] += std < 1e-9
    return {f"zero_var_frac_{k}": zero[k] / max(1, len(v)) for k, v in stds.items()} | {
        f"group_std_{k}": sum(v) / max(1, len(v)) for k, v in stds.items()}


# ============================================================================ the loss (per-call clipped surrogate, official code)
def length_buckets(lengths: list, k: int = 3) -> list:
    """Sorted sequence lengths -> at most k contiguous (start, end) runs, cut where the padded
    area (run size x its longest sequence) is least. One batch padded to its longest sequence
    is ~60 % real tokens here (extractor and manager calls differ in length); three runs ~90 %."""
    n = len(lengths)
    area = lambda cuts: sum((b - a) * lengths[b - 1] for a, b in zip((0, *cuts), (*cuts, n)))
    cuts = min((c for j in range(min(k, n)) for c in itertools.combinations(range(1, n), j)), key=area)
    return list(zip((0, *cuts), (*cuts, n)))


def cell_logprobs(model, cells: list, temperature: float, chunk: int, with_entropy=False):
    """Log-probs of every response token of `cells` under `model` -> (logp (N,), ent (N,) or
    None, cell index of each token (N,)). Cells run shortest first in <= 3 length buckets, each
    a right-padded batch, so plain causal attention needs no mask; the head runs only on
    response positions. Tokens come bucket by bucket: `owner` says whose each one is. With
    separate weights (model.Roles) each role's cells run through its own part."""
    if isinstance(model, Roles):
        parts = [(part, [i for i, c in enumerate(cells) if for_role(model, c.role) is part]) for part in (model.ext, model.mgr)]
        outs = [(cell_logprobs(part, [cells[i] for i in idx], temperature, chunk, with_entropy), idx)
                for part, idx in parts if idx]
        ent = torch.cat([o[1] for o, _ in outs]) if with_entropy else None
        owner = torch.cat([torch.tensor(idx, device=o[2].device)[o[2]] for o, idx in outs])  # back to `cells` indices
        return torch.cat([o[0] for o, _ in outs]), ent, owner
    dev = next(model.parameters()).device
    seqs = [c.prompt + c.response for c in cells]
    order = sorted(range(len(cells)), key=lambda i: len(seqs[i]))
    lengths = [len(seqs[i]) for i in order]
    logps, ents, owners = [], [], []
    for a, b in length_buckets(lengths):
        L = lengths[b - 1]
        idx = torch.zeros(b - a, L, dtype=torch.long)
        sel = torch.zeros(b - a, L, dtype=torch.bool)  # (B, L): position t predicts token t+1
        for r, i in enumerate(order[a:b]):
            idx[r, :len(seqs[i])] = torch.tensor(seqs[i])
            sel[r, len(cells[i].prompt) - 1:len(seqs[i]) - 1] = True
        idx, sel = idx.to(dev), sel.to(dev)
        h = model.hidden_states(idx)  # (B, L, D)
        out = fused_logprobs(h[sel], model.lm_head.weight, idx[:, 1:][sel[:, :-1]], temperature, with_entropy, chunk)
        lp, e = out if with_entropy else (out, None)
        logps.append(lp)
        ents.append(e)
        owners.append(torch.tensor(order[a:b], device=dev)[:, None].expand(-1, L)[sel])  # (n_b,)
    return torch.cat(logps), torch.cat(ents) if with_entropy else None, torch.cat(owners)


def logo_grpo_loss(logp, old_logp, ref_logp, entropy, owner, adv, cfg: RLConfig, share=(1.0, 1.0)):
    """Clipped surrogate with one ratio per model call (the paper's "turn-level"; not a dialogue
    Turn), averaged over (row, chunk) cells, minus an entropy bonus, plus a k3 KL to the
    reference. Tokens: logp/old/ref/entropy/owner (N,); cells: adv (n_cells,).
      l_c   = mean over the cell's tokens of (logp - old_logp)
      r_c   = exp(min(l_c, ratio_cap))
      L_c   = max(-A r_c, -A clip(r_c, 1-eps, 1+eps)); for A < 0 also min(L_c, -A * dual_clip)
      loss  = mean_c L_c - beta_h * mean_tok(H) + beta_kl * mean_tok(KL_k3)
    Cells, not tokens, are averaged: a long output weighs as much as a short one. `share`:
    these cells' and tokens' shares of an update made of several parts (ppo_update); each
    mean and each logged figure is scaled by it, so the parts add up to the whole's."""
    n_cells = adv.shape[0]
    count = torch.zeros(n_cells, device=logp.device).index_add_(0, owner, torch.ones_like(logp))
    log_ratio = torch.zeros(n_cells, device=logp.device).index_add_(0, owner, logp - old_logp) / count.clamp(min=1)
    ratio = torch.exp(torch.clamp(log_ratio, max=cfg.ratio_cap))  # (n_cells,)
    plain, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.eps, 1 + cfg.eps)  # (n_cells,) each
    ppo = torch.maximum(plain, clipped)
    dual = (adv < 0) & (ppo > -adv * cfg.dual_clip)  # where the dual clip bounds the loss
    surr = torch.where(dual, -adv * cfg.dual_clip, ppo)
    valid = count > 0
    pg = surr[valid].mean() * share[0]
    d = ref_logp - logp
    kl = torch.clamp(torch.exp(d) - d - 1, -10, 10).mean() * share[1]
    ent = entropy.mean() * share[1] if entropy is not None else torch.zeros((), device=logp.device)
    loss = pg - cfg.beta_h * ent + cfg.beta_kl * kl
    # The official metrics: a clip counts only where it is active (the clipped term wins the
    # max), the dual clip only where it bounds a negative advantage's loss, and the cap apart.
    capped = log_ratio > cfg.ratio_cap
    frac = lambda m: m[valid].float().mean().item() * share[0]
    return loss, {"pg_loss": pg.item(), "kl": kl.item(), "entropy": ent.item(), "clip_frac": frac(clipped > plain),
                  "dual_clip_frac": frac(dual), "ratio_cap_frac": frac(capped)}


# ============================================================================ one episode's pool: rollouts, branches, rewards, advantages
@dataclass
class Branch:
    """A local branch point: session t re-run K times from rollout `source`'s memory before t."""
    session: int
    source: int  # the global rollout whose memory was copied
    banks: list  # the K branches' memories: deepcopies of the source's before the session, written by it
    pairs: list = field(default_factory=list)  # the K branches' (extractor row, manager row)


def play_session(policy, tok, banks: list, session, groups: list, cfg: RLConfig, temperature: float, gen) -> tuple:
    """One session on every bank (in place), decoded at `temperature` -> ([(extractor row, manager
    row)] per bank, op counts per bank); groups[b] is bank b's rows' group, its role left to fill in."""
    trace = []
    ext, mgr, counts = run_session(policy, tok, banks, [session] * len(banks), cfg, temperature, gen, trace)
    for i, (e, m) in enumerate(zip(ext, mgr)):
        e.group, m.group = groups[i]._replace(role="ext"), groups[i]._replace(role="mgr")
        e.decisions = m.decisions = [d for d in trace if d.b == i]
    return list(zip(ext, mgr)), counts


def rollouts(policy, tok, conv, S: int, cfg: RLConfig, algo_rng, gen) -> tuple:
    """Global rollouts and local re-rolls, all with theta_old. n rollouts of sessions 1..S from
    empty memory; before each session a coin (p) may pick a branch point: K deepcopies of one
    rollout's memory as it is then. The K branches re-roll that session, sampled in the same batch
    as the n rollouts (they start at the same moment), or with `local_decoding` greedy in a batch
    of their own (the official code decodes them with its validation settings, greedy, so the K
    come out alike and their group carries no advantage); they never continue past it.
    -> (the rollouts' final banks, by_session: by_session[t-1][i] is the (extractor row,
    manager row) pair of rollout i at session t, branches, the rollouts' op counts)."""
    banks, by_session, branches, counts = [MemoryBank(cfg.retriever) for _ in range(cfg.n)], [], [], Counter()
    for t, session in enumerate(conv.sessions[:S], 1):
        br, local, groups = None, [], [Group("G", t, None)] * cfg.n  # groups: one per bank, role to fill in
        if cfg.algo != "grpo" and algo_rng.random() < cfg.p:  # plain GRPO never branches
            i = algo_rng.randrange(cfg.n)
            br = Branch(t, i, [banks[i].snapshot() for _ in range(cfg.K)])  # each branch writes its own copy
            local = br.banks
            groups += [Group("L", t, None, i)] * cfg.K
            branches.append(br)
        if cfg.local_decoding == "sampled" or not local:
            pairs, c = play_session(policy, tok, banks + local, session, groups, cfg, cfg.temperature, gen)
        else:
            pairs, c = play_session(policy, tok, banks, session, groups[:cfg.n], cfg, cfg.temperature, gen)
            pairs += play_session(policy, tok, local, session, groups[cfg.n:], cfg, 0.0, gen)[0]
        by_session.append(pairs[:cfg.n])
        if br:
            br.pairs = pairs[cfg.n:]
        counts += sum(c[:cfg.n], Counter())
    return banks, by_session, branches, counts


def assign_rewards(answerer, tok, conv, S: int, banks: list, by_session: list, branches: list, q_global: list,
                   q_seed: float, cfg: RLConfig) -> tuple:
    """Rewards, both kinds through `qa_scores` and `row_reward` (rules: docs/method.md, 'Rewards').
    -> (global F1 [n][q], global penalties [n], finished [n][S], global rewards [n][S])."""
    dialogue = dialogue_tokens(tok, conv)  # T_t after each session t
    f1, pens = qa_scores(answerer, tok, banks, q_global, dialogue[S - 1], cfg)
    finished = [[e.finished and m.finished for e, m in (by_session[t][i] for t in range(S))] for i in range(cfg.n)]
    r_global = global_rewards(f1, q_global, S, pens, finished)
    for t in range(S):
        for i, (e, m) in enumerate(by_session[t]):
            e.reward = m.reward = r_global[i][t]
    for br in branches:  # one question subset per branch point, drawn from its own seed
        qs = sample_questions(conv.qa, br.session, cfg.q_local, random.Random(f"{q_seed}:{br.session}"))
        lf1, lpen = qa_scores(answerer, tok, br.banks, qs, dialogue[br.session - 1], cfg)
        for (e, m), f, p in zip(br.pairs, lf1, lpen):
            e.reward = m.reward = row_reward(f, p, e.finished and m.finished)
    return f1, pens, finished, r_global


@dataclass
class Episode:
    """One training conversation of a step with its own random streams: `data_rng` picks the
    questions, `algo_rng` the branch points, `gen` the samples, so one seed asks every algorithm
    the same questions. `judge` (optional) scores rows against a teacher for the credit
    diagnostic (`episode_numbers`); it never touches the reward. Under torchrun every rank rolls
    out its own episodes."""
    conv: object
    data_rng: random.Random
    algo_rng: random.Random
    gen: torch.Generator
    judge: object = None


@dataclass
class EpisodeStep:
    """One episode's part of a step: the pool of rows the loss trains on, and what the step's
    numbers are read from (`episode_numbers`)."""
    S: int  # sessions played (the stage's cap, or fewer where the conversation is shorter)
    pool: list
    global_rows: list
    local_rows: list
    banks: list  # the global rollouts' final memories
    branches: list
    f1: list  # [n][q] global rollouts' F1 per reward question
    pens: list  # [n] their bloat penalties
    finished: list  # [n][S]
    r_global: list  # [n][S]
    counts: Counter  # op counts of the global rollouts
    groups: dict  # assign_advantages' zero-variance shares and group spreads


def episode_pool(policy, answerer: AnswerAgent, tok, w: Episode, S: int, cfg: RLConfig) -> EpisodeStep:
    """One episode's global rollouts, local re-rolls, rewards and advantages. Its groups stay
    inside it: an episode's rows never meet another's."""
    conv = w.conv
    S = min(S, len(conv.sessions))
    q_global = sample_questions(conv.qa, S, cfg.q_global, w.data_rng)
    q_seed = w.data_rng.random()  # local subsets derive from it, so no arm shifts another's draws
    banks, by_session, branches, counts = rollouts(policy, tok, conv, S, cfg, w.algo_rng, w.gen)
    f1, pens, finished, r_global = assign_rewards(answerer, tok, conv, S, banks, by_session, branches, q_global, q_seed, cfg)
    # Advantages per (group, role), then one merged pool with no weight between its parts.
    global_rows = [row for pairs in by_session for pair in pairs for row in pair]
    local_rows = [row for br in branches for pair in br.pairs for row in pair]
    pool = (global_rows if cfg.algo != "local" else []) + local_rows
    groups = assign_advantages(pool)
    return EpisodeStep(S, pool, global_rows, local_rows, banks, branches, f1, pens, finished, r_global, counts, groups)


# ============================================================================ the update (PPO epochs over mini-batches; the loss above)
def clipped_step(model, opt, clip: float) -> float | None:
    """Clip, step -> the gradient norm; or None, gradients dropped, if the norm is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
    if not math.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return None
    opt.step()
    return norm


def guarded_step(model, loss, opt, clip: float) -> float | None:
    """Backward, clip, step -> the gradient norm; or None, changing nothing, when the loss or
    the gradient norm is not finite. A finite loss can still have NaN gradients, and one NaN
    step would turn every weight (and every later checkpoint) into NaN."""
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    return clipped_step(model, opt, clip)


def ppo_update(policy, ref, pools: list, cfg: RLConfig, opt) -> dict:
    """Old and reference log-probs once (no grad, the same kernel and temperature as the
    update, so the first ratio is exactly 1), then ppo_epochs passes over fixed-order
    mini-batches of cells. `pools` holds one pool of rows per episode of this process.

    Several episodes (in one process, or one per torchrun rank) make one update as one process
    holding all of them would: optimizer step j takes the j-th mini-batch of every episode, and
    its loss is the mean over all those cells (tokens, for KL and entropy; the official code
    averages over the global mini-batch). Each episode's part is weighted by its share of the
    step's cells, its gradient accumulated, and the sum taken over ranks. Every rank takes as
    many steps as the episode with the most mini-batches; a non-finite loss or gradient on any
    rank skips that update everywhere, and is counted. A step of fewer cells than a full one
    (minibatch x every episode) has its loss scaled by how full it is, as the official code
    scales a partial last mini-batch by len / mini-batch size."""
    episodes = [[(c, row.adv) for row in pool for c in row.cells if c.response] for pool in pools]
    batches = [[cells[i:i + cfg.minibatch] for i in range(0, len(cells), cfg.minibatch)] for cells in episodes]
    dev = next(policy.parameters()).device
    steps = int_over_ranks(max(map(len, batches)), dev, biggest=True)
    full = cfg.minibatch * int_over_ranks(len(pools), dev)  # cells of a full step
    if not steps:
        return {"cells": 0, "skipped_updates": 0}
    with torch.no_grad(), gathered(policy):
        olds = [[cell_logprobs(policy, [c for c, _ in mb], cfg.temperature, cfg.logprob_chunk)[0] for mb in bs]
                for bs in batches]
        refs = [[cell_logprobs(ref, [c for c, _ in mb], cfg.temperature, cfg.logprob_chunk)[0] for mb in bs]
                for bs in batches]
    agg, n, skipped = Counter(), 0, 0
    policy.train()
    for _ in range(cfg.ppo_epochs):
        for j in range(steps):
            parts = [(bs[j], old[j], rf[j]) for bs, old, rf in zip(batches, olds, refs) if j < len(bs)]
            size = step_size(parts, dev)  # [cells, tokens] of step j over every episode and rank
            opt.zero_grad(set_to_none=True)
            finite, s = True, Counter()
            for part in even_parts(policy, parts, dev):  # None: a sharded rank's extra pass, weighted 0
                mb, old, rf = part or ([(Cell([1], [2], True), 0.0)], torch.zeros(1, device=dev), torch.zeros(1, device=dev))
                logp, ent, owner = cell_logprobs(policy, [c for c, _ in mb], cfg.temperature, cfg.logprob_chunk, True)
                adv = torch.tensor([a for _, a in mb], dtype=torch.float32, device=dev)
                share = (len(mb) / size[0], len(logp) / size[1]) if part else (0.0, 0.0)
                loss, ps = logo_grpo_loss(logp, old, rf, ent, owner, adv, cfg, share)
                finite = finite and bool(torch.isfinite(loss))
                if finite or sharded(policy):  # a NaN gradient under FSDP is caught by the norm, on every rank
                    (loss * min(1.0, size[0] / full)).backward()  # accumulates: the parts of one step sum to its loss
                s.update(ps | {"loss": loss.item()})
            finite = sum_gradients(policy, finite)
            grad_norm = clipped_step(policy, opt, cfg.grad_clip) if finite else None
            if grad_norm is None:
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            for rank_s in gather_over_ranks(dict(s)):
                agg.update(rank_s)
            agg.update({"grad_norm": grad_norm})
            n += 1
    cells = int_over_ranks(sum(map(len, episodes)), dev)
    return {k: v / max(1, n) for k, v in agg.items()} | {"cells": cells, "updates": n, "skipped_updates": skipped}


# ============================================================================ the step's numbers (logged only, never in the loss)
def _nanmean(xs):
    xs = [x for x in xs if x == x]  # NaN-free; one value comes back as it is (a count stays an int in the log)
    return float("nan") if not xs else xs[0] if len(xs) == 1 else sum(xs) / len(xs)


def credit_correlation(rows: list) -> dict:
    """Does a row's advantage say how good its own decisions were? Per group kind, the pooled
    within-group correlation of advantage and true quality (the teacher's score of the row's
    decisions), over manager rows of groups whose rewards vary; qualities are centred per group."""
    groups = {}
    for row in rows:
        if row.role == "mgr" and row.quality == row.quality:
            groups.setdefault(row.group, []).append(row)
    out = {}
    for kind in ("G", "L"):
        a, q = [], []
        for gid, members in groups.items():
            rewards = [row.reward for row in members]
            if gid.kind == kind and len(members) > 1 and max(rewards) > min(rewards):
                qm = sum(row.quality for row in members) / len(members)
                a += [row.adv for row in members]
                q += [row.quality - qm for row in members]
        den = math.sqrt(sum(x * x for x in a) * sum(y * y for y in q))
        out[f"credit_corr_{kind}"] = sum(x * y for x, y in zip(a, q)) / den if den > 0 else float("nan")
    return out


def update_credit(rows: list) -> dict:
    """Which way the loss pushes UPDATE: the manager rows that wrote one, by their advantage's sign
    (a positive advantage raises the row's every token, its UPDATE's too; a negative one lowers them)."""
    adv = [row.adv for row in rows if row.role == "mgr"
           and any(str(op.get("op", "")).upper() == "UPDATE" for d in row.decisions for op in d.ops)]
    return {"update_rows_pos": sum(a > 0 for a in adv), "update_rows_neg": sum(a < 0 for a in adv)}


def episode_numbers(w: Episode, st: EpisodeStep, cfg: RLConfig, tok) -> dict:
    """One episode's numbers for the log: rewards, group statistics, cost, memory size, op counts
    and, with a judge (synthetic world), the credit diagnostic."""
    if w.judge:  # a manager row's true quality: the teacher's score of its chunks' decisions
        for row in st.global_rows + st.local_rows:
            if row.role == "mgr":
                row.quality = w.judge(row.decisions)
    mean = lambda xs: sum(xs) / max(1, len(xs))
    n, S = cfg.n, st.S
    return {"conv": w.conv.sample_id, **st.groups, **credit_correlation(st.pool),
            "reward_global": sum(map(sum, st.r_global)) / (n * S), "train_f1": mean([mean(row) for row in st.f1]),
            "local_reward": mean([row.reward for row in st.local_rows]),
            "local_distinct": mean([len({json.dumps(sorted((e.speaker, e.content) for e in b.entries.values()))
                                         for b in br.banks}) for br in st.branches]),
            "branches": len(st.branches), "local_share": len(st.local_rows) / max(1, len(st.pool)),
            "gen_tokens": sum(len(c.response) for row in st.global_rows + st.local_rows for c in row.cells),
            "unfinished_frac": 1 - sum(map(sum, st.finished)) / (n * S),
            "mem_tokens": mean([memory_tokens(tok, b) for b in st.banks]),
            "mem_entries": mean([len(b.entries) for b in st.banks]),
            "bloat": sum(st.pens) / (n * cfg.lam) if cfg.lam else 0.0,
            "quality_G": _nanmean([row.quality for row in st.global_rows if row.role == "mgr"]),
            "quality_L": _nanmean([row.quality for row in st.local_rows if row.role == "mgr"]),
            **update_credit(st.pool), "ops": {k: v / n for k, v in st.counts.items()}}


def mean_over_episodes(per: list) -> dict:
    """Per-episode stats -> one dict: a number's mean over the episodes that have it (NaN where
    none has), an op count's mean with 0 where an episode made none, the conversation ids joined."""
    out = {}
    for k in per[0]:
        if k == "conv":
            out[k] = ",".join(s[k] for s in per)
        elif k == "ops":
            out[k] = {op: _nanmean([s[k].get(op, 0) for s in per]) for op in dict.fromkeys(o for s in per for o in s[k])}
        else:
            out[k] = _nanmean([s[k] for s in per])
    return out


# ============================================================================ one LoGo-GRPO step (paper Alg. 1)
def rl_step(policy, ref, answerer: AnswerAgent, tok, episodes: list, S: int, cfg: RLConfig, opt) -> dict:
    """One policy update (paper Alg. 1) for any --algo (logo, grpo, local): each Episode's
    rollouts, rewards and advantages, then one update on their pools (`ppo_update`; under
    torchrun, with every rank's episodes). -> the step's numbers: the mean over the episodes
    of every rank, then the update's."""
    with gathered(policy):
        steps = [episode_pool(policy, answerer, tok, ep, S, cfg) for ep in episodes]
    numbers = [episode_numbers(ep, st, cfg, tok) for ep, st in zip(episodes, steps)]
    out = mean_over_episodes([x for rank_numbers in gather_over_ranks(numbers) for x in rank_numbers])
    return out | ppo_update(policy, ref, [st.pool for st in steps], cfg, opt)


# ============================================================================ appendix: the fused log-prob kernel
# An optimisation, not part of the method: `cell_logprobs` above could compute
# log_softmax(h @ W.T / tau) and gather the targets, at the cost of the full (N, V) logits.
# This kernel never holds them: rows go through in chunks of C, each chunk's fp32 logits
# buffer is reused, and backward recomputes them; only O(N) row stats (max m, log-sum s,
# entropy) are saved besides h, W, y. Derivation: docs/method.md, 'The fused log-prob kernel'.

def _chunk_logits(h, w32, inv_t, out):
    # (C, H) @ (H, V) -> (C, V), fp32; forward and backward share this so P matches lse
    torch.mm(h.to(out.dtype), w32.t(), out=out)
    return out.mul_(inv_t) if inv_t != 1.0 else out


class FusedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size):
        N, V = hidden.shape[0], weight.shape[0]
        C, inv_t = max(1, min(int(chunk_size), N)), 1.0 / float(temperature)
        # fp32 head for bf16/fp16/fp32 inputs (fp64 stays fp64, so gradcheck is meaningful)
        acc = dict(dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
        # explicit dtypes, autocast off: a backward run outside autocast recomputes the same Z
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w32 = weight.to(acc["dtype"])                        # (V, H), cast once per call
            logp, mx, logs = (torch.empty(N, **acc) for _ in range(3))
            ent = torch.empty(N, **acc) if with_entropy else None
            zbuf = torch.empty(C if N else 0, V, **acc)           # (C, V), reused by every chunk
            pbuf = torch.empty_like(zbuf) if with_entropy else None
            for r0 in range(0, N, C):
                r1 = min(r0 + C, N)
                z = _chunk_logits(hidden[r0:r1], w32, inv_t, zbuf[: r1 - r0])   # (c, V)
                zy = z.gather(1, targets[r0:r1, None])                           # (c, 1), before z is reused
                m = z.amax(dim=1, keepdim=True)                                  # (c, 1)
                z.sub_(m)                                                        # z - m <= 0, exact near the max
                if with_entropy:
                    p = torch.exp(z, out=pbuf[: r1 - r0])                        # (c, V) unnormalised probs
                    ls = p.sum(dim=1, keepdim=True).log_()                       # (c, 1)
                    # S = lse - sum p*z = -sum p*(z - lse): the log-prob is z - lse, never log(P)
                    # (an underflowed p would give 0 * -inf = NaN); no lse - E[z] cancellation
                    ent[r0:r1] = -(p.mul_(z.sub_(ls)).sum(dim=1) * (-ls.squeeze(1)).exp())
                else:
                    ls = z.exp_().sum(dim=1, keepdim=True).log_()                # (c, 1), z is spent
                # lse = m + log s is kept as the pair (m, log s): rounding m + log s to one fp32
                # costs up to ulp(m) in log p_y, i.e. the whole 1 - p_y signal of a confident row
                mx[r0:r1], logs[r0:r1] = m.squeeze(1), ls.squeeze(1)
                logp[r0:r1] = ((zy - m) - ls).squeeze(1)
        ctx.set_materialize_grads(False)    # an unused entropy output -> grad None, costs nothing
        ctx.inv_t, ctx.C = inv_t, C
        ctx.save_for_backward(hidden, weight, targets, mx, logs, *([ent] if with_entropy else []))
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g, e=None):
        h, W, y, mx, logs, *rest = ctx.saved_tensors
        ent = rest[0] if rest else None
        need_h, need_w = ctx.needs_input_grad[:2]
        nones = (None, None, None, None)                         # targets, tau, flag, chunk size
        if (g is None and e is None) or not (need_h or need_w):
            return (None, None) + nones
        N, H, V, C, inv_t = h.shape[0], h.shape[1], W.shape[0], ctx.C, ctx.inv_t
        acc = dict(dtype=mx.dtype, device=h.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            w32 = W.to(acc["dtype"])                                            # (V, H)
            # G is linear in (g, e): fold 1/tau (from z = W h / tau) and 1/s (P = e^(z-m) / s)
            # into per-row scalars, O(N) work instead of extra (C, V) passes
            r = (-logs).exp_().mul_(inv_t)                                      # (N,)  1 / (s tau)
            g = g.to(acc["dtype"]) if g is not None else torch.zeros(N, **acc)  # (N,)
            if e is not None:   # G = -e^(z-m) (a (z-m) + b) + g onehot/tau, with LP + S = (z-m) + (S - log s)
                e = e.to(acc["dtype"])
                a, b = e * r, (g + e * (ent - logs)) * r                        # (N,), (N,)
            dh = torch.empty(N, H, **acc) if need_h else None                   # (N, H)
            dW = torch.zeros(V, H, **acc) if need_w else None                   # (V, H) fp32 accumulator
            zbuf = torch.empty(C if N else 0, V, **acc)
            pbuf = torch.empty_like(zbuf) if e is not None else None
            gt = g * inv_t                                                      # (N,) onehot term
            for r0 in range(0, N, C):
                r1 = min(r0 + C, N)
                hc = h[r0:r1]
                z = _chunk_logits(hc, w32, inv_t, zbuf[: r1 - r0])              # (c, V), same ops as forward
                z.sub_(mx[r0:r1, None])                                         # z - m, as in forward
                if e is None:   # G = (g onehot - P g) / tau, built in the one buffer
                    G = z.exp_().mul_(-(g[r0:r1] * r[r0:r1])[:, None])
                else:           # G = (g onehot - P (g + e (LP + S))) / tau
                    p = torch.exp(z, out=pbuf[: r1 - r0])
                    G = z.mul_(a[r0:r1, None]).add_(b[r0:r1, None]).mul_(p).neg_()
                G.scatter_add_(1, y[r0:r1, None], gt[r0:r1, None])              # + g/tau at the target
                if need_h:
                    torch.mm(G, w32, out=dh[r0:r1])                             # (c, V) @ (V, H)
                if need_w:
                    dW.addmm_(G.t(), hc.to(acc["dtype"]))                       # (V, c) @ (c, H), fp32 sum
        return (dh.to(h.dtype) if need_h else None,
                dW.to(W.dtype) if need_w else None) + nones


def fused_logprobs(hidden, weight, targets, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_size: int = 256):
    """hidden (N, H) any float dtype, weight (V, H), targets (N,) int64 -> logp (N,) fp32,
    or (logp, ent) when with_entropy. Same code path for old / ref / current passes."""
    return FusedLogProb.apply(hidden, weight, targets.long(), float(temperature), bool(with_entropy),
                              int(chunk_size))
