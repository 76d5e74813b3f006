"""Evaluation for Memory-R2: LoCoMo data loading (Maharana et al. 2024; the paper's split), the synthetic world,
then evaluation.

The loader turns one LoCoMo-schema sample into plain dataclasses and repairs the
file's known quirks in one place, so nothing downstream ever sees raw JSON.
"""
import argparse
import copy
import datetime
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from model import CheckpointError, load_checkpoint, train_tokenizer
from memory import QA, Conversation, MemoryBank, Session, Turn, bloat_cost, encodable, retrieve_for_facts, short_date
from memr2 import (CHAT_MAX_NEW, AnswerAgent, RLConfig, bleu1, chunk_turns, dialogue_tokens, exact_match, memory_tokens,
                   model_reader, qa_scores, read_conversations, row_reward, token_f1)

# =============================================================================
# LoCoMo data loading
# =============================================================================

# The integers do NOT follow the paper's listing order, and mem0-derived papers
# name them differently; store the integer everywhere and map names only here.
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL = 5

# Official split of the Memory-R1 code. conv-47 is in no part, on purpose.
LOCOMO_SPLIT = {
    "train": ["conv-43"],
    "val": ["conv-44"],
    "test": ["conv-26", "conv-30", "conv-41", "conv-42", "conv-48", "conv-49", "conv-50"],
}

DATE_FORMAT = "%I:%M %p on %d %B, %Y"  # "1:56 pm on 8 May, 2023"; strptime takes one-digit days
SESSION_KEY = re.compile(r"^session_(\d+)$")  # excludes session_<n>_date_time and friends
DIA_ID = re.compile(r"D(\d+):(\d+)")
BLIP_PREFIX = re.compile(r"^a photo(?:graphy)? of\s+", re.I)  # every BLIP caption starts so


class DataError(Exception):
    """A data file that is missing, unreadable or not in the LoCoMo schema."""


def parse_date(s: str) -> datetime.datetime:
    try:
        return datetime.datetime.strptime(s.strip(), DATE_FORMAT)
    except ValueError as e:
        raise DataError(f"unparseable session date {s!r}") from e


def _turn(raw: dict) -> Turn:
    text = raw["text"]
    if raw.get("blip_caption"):
        # Drop BLIP's own "a photo of" so the text does not read "a photo of a photo of".
        text += f" [shares a photo of {BLIP_PREFIX.sub('', raw['blip_caption'])}]"
    return Turn(speaker=raw["speaker"], dia_id=raw["dia_id"], text=text)


def _clean_evidence(raw: list[str], known: set[str], dropped: dict) -> list[str]:
    """Split, parse and normalise evidence strings; keep only ids of real turns."""
    out = []
    for entry in raw:
        # One string may hold several ids ("D8:6; D9:17", "D9:1 D4:4 D4:6").
        tokens = [t for t in re.split(r"[;,\s]+", entry) if t]
        ids = []
        for tok in tokens:
            m = DIA_ID.fullmatch(tok)  # rejects garbage such as "D" and "D:11:26"
            dia = f"D{int(m[1])}:{int(m[2])}" if m else None  # "D30:05" -> "D30:5"
            if dia in known:
                ids.append(dia)
            else:
                dropped["bad_evidence_ids"] += 1  # unparseable, or a turn that does not exist
        # A repair: an entry that was not already one clean id but still yielded ids.
        if ids and ids != [entry]:
            dropped["repaired_evidence"] += 1
        out += [i for i in dict.fromkeys(ids) if i not in out]  # keep order; normalising can repeat ids
    return out


def parse_conversation(sample: dict, drop_adversarial=True, drop_empty_evidence=True) -> Conversation:
    """One sample in LoCoMo's schema -> Conversation. Also reads synthetic samples."""
    conv = sample["conversation"]
    # Sessions come from the session_<n> keys that exist, sorted by integer: date keys
    # can outnumber sessions (conv-26: 19 vs 35) and a string sort puts 10 before 2.
    indices = sorted(int(m[1]) for m in map(SESSION_KEY.match, conv) if m)
    sessions = [
        Session(index=n, date=conv[f"session_{n}_date_time"], turns=[_turn(t) for t in conv[f"session_{n}"]])
        for n in indices
    ]
    known = {t.dia_id for s in sessions for t in s.turns}

    dropped = {"adversarial": 0, "empty_evidence": 0, "bad_evidence_ids": 0, "repaired_evidence": 0}
    qa = []
    for q in sample["qa"]:
        # Filter category 5 before touching "answer": most of them only have
        # "adversarial_answer" (a distractor, not the truth).
        if q["category"] == ADVERSARIAL and drop_adversarial:
            dropped["adversarial"] += 1
            continue
        evidence = _clean_evidence(q["evidence"], known, dropped)
        if not evidence and drop_empty_evidence:
            dropped["empty_evidence"] += 1
            continue
        qa.append(QA(
            question=q["question"],
            answer=str(q.get("answer", "")),  # some answers are ints (2022); kept cat-5 may lack one
            evidence=evidence,
            category=int(q["category"]),
            sessions=sorted({int(DIA_ID.fullmatch(e)[1]) for e in evidence}),
        ))
    return Conversation(
        sample_id=sample["sample_id"],
        speakers=(conv["speaker_a"], conv["speaker_b"]),
        sessions=sessions,
        qa=qa,
        dropped=dropped,
    )


def load_locomo(path) -> list[Conversation]:
    """Read locomo10.json; any problem with the file becomes one clear DataError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read LoCoMo file {path}: {e.strerror or e}") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"LoCoMo file {path} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise DataError(f"LoCoMo file {path}: expected a list of samples, got {type(data).__name__}")
    convs = []
    for i, sample in enumerate(data):
        problem = sample_problem(sample)
        if problem:
            sid = sample.get("sample_id") if isinstance(sample, dict) else None
            raise DataError(f"LoCoMo file {path}: sample {i}{f' ({sid})' if isinstance(sid, str) else ''}: {problem}")
        try:
            convs.append(parse_conversation(sample))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"LoCoMo file {path}: sample {i} is malformed ({type(e).__name__}: {e})") from e
    return convs


def sample_problem(sample) -> str:
    """What is wrong with one LoCoMo sample, as "field must be ...", or "". The parser trusts
    these types; checked here, a bad file names its sample and field instead of silently
    dropping questions or turning a null text into "None"."""
    def bad(v, types, where, what):
        if isinstance(v, str) and not encodable(v):  # "\ud800" in the file: the tokenizer cannot encode it
            return True, f"{where} is not valid Unicode text (a lone surrogate, {json.dumps(v)[:40]})"
        return not isinstance(v, types) or isinstance(v, bool), f"{where} must be {what}, got {json.dumps(v)[:40]}"

    def checks():  # (failed, message), lazily, in reading order
        yield bad(sample, dict, "the sample", "an object")
        conv = sample.get("conversation")
        yield bad(sample.get("sample_id"), str, "sample_id", "a string")
        yield bad(conv, dict, "conversation", "an object")
        for key in ("speaker_a", "speaker_b"):
            yield bad(conv.get(key), str, key, "a string")
        for key in filter(SESSION_KEY.match, conv):
            date = conv.get(f"{key}_date_time")
            yield bad(date, str, f"{key}_date_time", "a date string")
            try:
                parse_date(date)
            except DataError as e:
                yield True, f"{key}_date_time: {e} (expected e.g. '1:56 pm on 8 May, 2023')"
            yield bad(conv[key], list, key, "a list of turns")
            for j, t in enumerate(conv[key]):
                yield bad(t, dict, f"{key}[{j}]", "an object")
                for f in ("speaker", "dia_id", "text"):
                    yield bad(t.get(f), str, f"{key}[{j}].{f}", "a string")
                yield bad(t.get("blip_caption", ""), (str, type(None)), f"{key}[{j}].blip_caption", "a string")
        yield bad(sample.get("qa"), list, "qa", "a list")
        for j, q in enumerate(sample["qa"]):
            yield bad(q, dict, f"qa[{j}]", "an object")
            yield bad(q.get("question"), str, f"qa[{j}].question", "a string")
            yield bad(q.get("category"), int, f"qa[{j}].category", "an integer")
            yield bad(q.get("evidence"), list, f"qa[{j}].evidence", "a list of dia_id strings")
            for e in q["evidence"]:
                yield bad(e, str, f"qa[{j}].evidence", "a list of dia_id strings")
            yield bad(q.get("answer", ""), (str, int, float), f"qa[{j}].answer", "a string or a number")
    return next((msg for failed, msg in checks() if failed), "")


def locomo_split(convs: list[Conversation]) -> dict[str, list[Conversation]]:
    """Official train/val/test parts, in LOCOMO_SPLIT order; conversations in no part are left out."""
    by_id = {c.sample_id: c for c in convs}
    missing = [sid for ids in LOCOMO_SPLIT.values() for sid in ids if sid not in by_id]
    if missing:
        raise DataError(f"LoCoMo split needs conversations that were not loaded: {', '.join(missing)}")
    return {part: [by_id[sid] for sid in ids] for part, ids in LOCOMO_SPLIT.items()}

# =============================================================================
# end of LoCoMo data loading
# =============================================================================


# ============================================================================ synthetic world
# A world a ~1M-parameter model can learn on a CPU, yet where memory management matters:
# two speakers whose attributes CHANGE over sessions (moves, new jobs, a pet that dies, a
# trip planned then cancelled), one-off events to remember with their dates, and small
# talk as noise. It writes LoCoMo's JSON schema, so `parse_conversation` reads both, plus a
# "gold_facts" map (dia_id -> the fact that turn states) from which the teacher works.

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
         "Mallory", "Nina", "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Wendy"]
POOLS = {  # closed value lists; `novel_rate` of values are made-up words instead, so the
    # model must learn to copy values rather than memorise them (cpu-feasibility note 2)
    "city": ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Rome", "Seoul"],
    "job": ["baker", "nurse", "teacher", "pilot", "chef", "farmer", "lawyer", "painter", "driver", "dentist"],
    "hobby": ["chess", "hiking", "painting", "fishing", "yoga", "cooking", "running", "pottery"],
    "pet": ["Rex", "Milo", "Bella", "Luna", "Max", "Coco", "Daisy", "Rocky"],
    "plan": ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Rome", "Seoul"],
    "visit": ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Rome", "Seoul"],
    "book": ["Dune", "Emma", "Ulysses", "Beloved", "Matilda", "Rebecca", "Heidi", "Ivanhoe"],
}
# attribute -> (what the speaker says, the fact in memory, the question, its LoCoMo category)
SAY = {
    "city": ["I moved to {v} last week.", "We just settled in {v}.", "My new home is in {v}."],
    "job": ["I started a new job as a {v}.", "I work as a {v} now.", "Guess what, I am a {v} now."],
    "hobby": ["Lately I am really into {v}.", "My new hobby is {v}.", "I spend my weekends on {v} now."],
    "pet": ["I adopted a pet named {v}.", "Meet {v}, my new pet!", "We got a pet, we call it {v}."],
    "plan": ["I am planning a trip to {v}.", "Next month I want to travel to {v}.", "I booked a trip to {v}."],
    "visit": ["I visited {v} on the weekend.", "I was in {v} for a few days.", "Just got back from {v}."],
    "book": ["I read a book called {v}.", "I finished reading {v}.", "I loved the book {v}."],
    "pet-": ["Sadly my pet {v} died.", "We lost {v}, my pet, this week."],
    "plan-": ["I cancelled my trip to {v}.", "The trip to {v} is off, I cancelled it."],
    "job-": ["I quit my job as a {v}.", "I am no longer a {v}, I quit."],
    "hobby-": ["I gave up {v}, no time.", "I stopped doing {v}."],
}
FACT = {"city": "{s} lives in {v}", "job": "{s} works as a {v}", "hobby": "{s} enjoys {v}",
        "pet": "{s} has a pet named {v}", "plan": "{s} plans a trip to {v}", "visit": "{s} visited {v}",
        "book": "{s} read the book {v}", "pet-": "{s}'s pet {v} died", "plan-": "{s} cancelled the trip to {v}",
        "job-": "{s} quit the job as a {v}", "hobby-": "{s} gave up {v}"}
QUESTION = {"city": "Where does {s} live?", "job": "What work does {s} do?", "hobby": "What hobby does {s} enjoy?",
            "pet": "What is the name of {s}'s pet?", "plan": "Where does {s} plan a trip?"}
WHEN = {"city": "When did {s} move to {v}?", "visit": "When did {s} visit {v}?", "book": "When did {s} read {v}?"}
PAIR = {"city": "Where do {s} and {o} live?", "job": "What work do {s} and {o} do?"}
SMALL_TALK = ["How have you been?", "The weather is lovely today.", "Haha, that is so funny.", "See you soon!",
              "I had a long day at home.", "Did you sleep well?", "That sounds great!", "Tell me more.",
              "I am a bit tired today.", "Good to hear from you!", "What a week it has been.", "Same here, honestly."]
STATE, EVENTS = ("city", "job", "hobby", "pet", "plan"), ("visit", "book")
REMOVABLE = ("pet", "plan", "job", "hobby")  # a state that can end: the answer becomes "none"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _made_up(rng, capital):
    w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
    w += rng.choice(["", "n", "k", "r", "s"])
    return w.capitalize() if capital else w


def make_world(seed: int, n_sessions: int = 32, facts_per_session: int = 2, noise_turns: int = 1,
               event_rate: float = 0.25, delete_rate: float = 0.45, novel_rate: float = 0.3) -> dict:
    """One conversation in LoCoMo's schema. Knobs: sessions, facts and small-talk turns per
    session, share of one-off events, how often a pet dies / a trip is cancelled, and the
    share of made-up values. Same seed -> identical world."""
    rng = random.Random(seed)
    a, b = rng.sample(NAMES, 2)
    state = {s: {} for s in (a, b)}  # speaker -> attr -> (value, dia_id that set it)
    conv = {"speaker_a": a, "speaker_b": b}
    gold, day, used = {}, rng.randint(0, 200), set()
    for n in range(1, n_sessions + 1):
        day += rng.randint(1, 9)
        d, m = 1 + day % 28, (day // 28) % 12
        conv[f"session_{n}_date_time"] = f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(['am', 'pm'])} on {d} {MONTHS[m]}, {2023 + day // 336}"
        kinds = ["fact"] * facts_per_session + ["talk"] * noise_turns
        rng.shuffle(kinds)
        turns, changed = [], set()
        for k, kind in enumerate(kinds, 1):
            dia = f"D{n}:{k}"
            s = rng.choice((a, b)) if kind == "fact" else (a, b)[k % 2]
            if kind == "talk":
                turns.append({"speaker": s, "dia_id": dia, "text": rng.choice(SMALL_TALK)})
                continue
            attr = rng.choice(EVENTS) if rng.random() < event_rate else rng.choice(STATE)
            if (s, attr) in changed:  # one change per attribute per session keeps gold ops unambiguous
                attr = rng.choice(EVENTS)
            changed.add((s, attr))
            cur = state[s].get(attr)
            if attr in REMOVABLE and cur and rng.random() < delete_rate:
                attr, v = attr + "-", cur[0]  # the pet dies, the trip is cancelled, a job or hobby is given up
                del state[s][attr[:-1]]
            else:
                pool = POOLS[attr]
                v = _made_up(rng, attr != "job" and attr != "hobby") if rng.random() < novel_rate else rng.choice(pool)
                while (cur and v == cur[0]) or (s, attr, v) in used:  # events are one-off
                    v = _made_up(rng, attr != "job" and attr != "hobby")
                used.add((s, attr, v))
                if attr in STATE:
                    state[s][attr] = (v, dia)
            turns.append({"speaker": s, "dia_id": dia, "text": rng.choice(SAY[attr]).format(v=v)})
            gold[dia] = {"speaker": s, "attr": attr, "value": v, "fact": FACT[attr].format(s=s, v=v),
                         "date": conv[f"session_{n}_date_time"]}
        conv[f"session_{n}"] = turns
    return {"sample_id": f"world-{seed}", "conversation": conv, "qa": _questions(a, b, gold), "gold_facts": gold}


def _questions(a, b, gold):
    """Questions about the final state (asked after the last session, as in LoCoMo), with
    the evidence turn that set each answer. A state removed by a death/cancellation has
    answer "none" and the removal turn as evidence."""
    qa, last = [], {}
    for dia, g in gold.items():  # insertion order = dialogue order
        attr = g["attr"].rstrip("-")
        if attr in STATE:
            last[(g["speaker"], attr)] = (g["value"] if not g["attr"].endswith("-") else "none", dia, g)
        else:
            qa.append({"question": WHEN[attr].format(s=g["speaker"], v=g["value"]),
                       "answer": short_date(g["date"]), "evidence": [dia], "category": 2})
    for (s, attr), (v, dia, g) in last.items():
        qa.append({"question": QUESTION[attr].format(s=s), "answer": v, "evidence": [dia], "category": 4})
        if attr == "city":
            qa.append({"question": WHEN["city"].format(s=s, v=v), "answer": short_date(g["date"]),
                       "evidence": [dia], "category": 2})
    for attr in PAIR:
        (va, da, _), (vb, db, _) = last.get((a, attr), ("",) * 3), last.get((b, attr), ("",) * 3)
        if va and vb and va != vb and "none" not in (va, vb):  # set-based F1 would not give 1 to "X and X"
            qa.append({"question": PAIR[attr].format(s=a, o=b), "answer": f"{va} and {vb}",
                       "evidence": [da, db], "category": 1})
    return qa


# --------------------------------------------------------------------------- the teacher
def _template_regex(template):
    """"{s} lives in {v}" -> a regex with named groups s, o (the other speaker) and v."""
    rx = re.escape(template).replace(r"\{s\}", "(?P<s>.+?)").replace(r"\{o\}", "(?P<o>.+?)")
    return re.compile("^" + rx.replace(r"\{v\}", "(?P<v>.+)") + "$")


_FACT_RE = {attr: _template_regex(t) for attr, t in FACT.items()}
_Q_RE = [(kind, attr, _template_regex(t)) for kind, table in (("now", QUESTION), ("when", WHEN), ("pair", PAIR))
         for attr, t in table.items()]


def read_fact(content: str):
    """Memory content -> (attr, speaker, value), or None when it is not a world fact."""
    for attr, rx in _FACT_RE.items():
        m = rx.match(content)
        if m:
            return attr, m["s"], m["v"]
    return None


def lookup_answer(question: str, entries: list) -> str:
    """The exact reader: answer a world question by lookup in `entries` (what retrieval shows),
    the newest matching entry winning (the paper's answer agent prefers the newest memory on
    conflicts). A stored ending ("X's pet Rex died") is read as the state's removal, as any
    competent reader would. It is the synthetic world's frozen answer agent, gives the learned
    answerer its SFT targets, and checks that the teacher's gold memory answers everything."""
    def newest(speaker, attr, value=None):
        hits = [(e.session, int(e.memory_id[1:]), f) for e in entries if (f := read_fact(e.content))
                and f[0].rstrip("-") == attr and f[1] == speaker and value in (None, f[2])]
        return max(hits, key=lambda h: h[:2])[2] if hits else None

    def current(speaker, attr):
        f = newest(speaker, attr)
        return f[2] if f and not f[0].endswith("-") else "none"
    for kind, attr, rx in _Q_RE:
        m = rx.match(question)
        if not m:
            continue
        if kind == "now":
            return current(m["s"], attr)
        if kind == "when":
            e = [e for e in entries if (f := read_fact(e.content)) == (attr, m["s"], m["v"])]
            return max(e, key=lambda e: (e.session, int(e.memory_id[1:]))).session_time if e else "none"
        vals = [current(sp, attr) for sp in (m["s"], m["o"])]
        return "none" if vals == ["none", "none"] else " and ".join(vals)
    return "none"


def teacher_ops(facts: list, retrieved: list, rng=None, noise: float = 0.0) -> list:
    """Gold manager operations for `facts` given the memories the manager is shown. The
    same person+attribute already stored -> UPDATE it (NOOP if identical); a death or a
    cancellation -> DELETE it; otherwise INSERT. With `noise`, each op is corrupted with
    that probability the way a sloppy manager would: UPDATE becomes a duplicate INSERT,
    DELETE becomes NOOP, INSERT is dropped (so SFT leaves room for RL)."""
    ops = []
    for f in facts:
        parsed = read_fact(f["fact"])
        attr = parsed[0] if parsed else None
        base = (attr or "").rstrip("-")
        hit = next((e for e in retrieved if (r := read_fact(e.content)) and r[0] == base and r[1] == f["speaker"]
                    and base in STATE), None) if attr else None
        # (key order = the order the model writes them: decision, content, then what it copies)
        insert = {"op": "INSERT", "content": f["fact"], "speaker": f["speaker"], "dia_id": f["dia_id"]}
        if attr and attr.endswith("-"):
            op = {"op": "DELETE", "memory_id": hit.memory_id} if hit else {"op": "NOOP"}
        elif hit and hit.content == f["fact"]:
            op = {"op": "NOOP"}
        elif hit:
            op = {"op": "UPDATE", "content": f["fact"], "memory_id": hit.memory_id, "dia_id": f["dia_id"]}
        else:
            op = insert
        if rng is not None and noise > 0 and rng.random() < noise:
            if op["op"] == "UPDATE":
                op = insert
            elif op["op"] == "DELETE":
                op = {"op": "NOOP"}
            elif op["op"] == "INSERT":
                continue
        ops.append(op)
    return ops


def noisy_teacher(noise: float):
    """The SFT teacher: gold ops corrupted at rate `noise` (see teacher_ops)."""
    return lambda facts, shown, rng: teacher_ops(facts, shown, rng, noise)


def teacher_trace(sample: dict, conv, n_chunks: int, noise: float = 0.0, seed: int = 0,
                  per_fact: int = 2, cap: int = 6, manager=None):
    """Replay the world with the teacher -> (steps, final bank). One step per chunk:
    (session, chunk_turns, gold_facts, retrieved_memories, ops); the ops are applied to the
    teacher's own bank, so later chunks see the (possibly noisy) memory the teacher made.
    `manager(facts, shown, rng) -> ops` replaces the teacher's manager (the scripted ones
    of `SCRIPTED`); the facts are gold, missed at rate noise / 2."""
    rng = random.Random(seed)
    manager = manager or noisy_teacher(noise)
    bank, steps = MemoryBank(), []
    gold = sample["gold_facts"]
    for sess in conv.sessions:
        for chunk in chunk_turns(sess.turns, n_chunks):
            facts = [{"speaker": gold[t.dia_id]["speaker"], "dia_id": t.dia_id, "fact": gold[t.dia_id]["fact"]}
                     for t in chunk if t.dia_id in gold and not (noise and rng.random() < noise / 2)]
            # copies: later UPDATEs rewrite entries in place, and a step must show the memory as it was
            retrieved = [copy.copy(e) for e in retrieve_for_facts(bank, facts, per_fact, cap)]
            ops = manager(facts, retrieved, rng)
            steps.append((sess, chunk, facts, retrieved, ops))
            bank.apply(ops, sess.index, short_date(sess.date))
    return steps, bank


def teacher_memory(sample, conv, n_chunks, noise=0.0, seed=0, manager=None) -> MemoryBank:
    """The bank the teacher ends with; at noise 0 this is the oracle (gold) memory."""
    return teacher_trace(sample, conv, n_chunks, noise, seed, manager=manager)[1]


# ------------------------------------------------------------------ scripted managers (reward sensitivity)
def _insert(f):
    return {"op": "INSERT", "content": f["fact"], "speaker": f["speaker"], "dia_id": f["dia_id"]}


def _swap(kind, new):
    """The teacher, with every `kind` op replaced by new(fact) (None: dropped)."""
    def manager(facts, shown, rng):
        ops = [new(f) if o["op"] == kind else o for f, o in zip(facts, teacher_ops(facts, shown))]
        return [o for o in ops if o is not None]
    return manager


# Each one fails at exactly one kind of decision, fed the gold facts; the reward must notice.
SCRIPTED = {
    "oracle": lambda facts, shown, rng: teacher_ops(facts, shown),
    "insert-only": lambda facts, shown, rng: [_insert(f) for f in facts],  # never UPDATE or DELETE
    "no-delete": _swap("DELETE", lambda f: {"op": "NOOP"}),
    "duplicate-updates": _swap("UPDATE", _insert),  # a new entry instead of rewriting the old one
    "drop-half": lambda facts, shown, rng: [o for o in teacher_ops(facts, shown)
                                            if o["op"] != "INSERT" or rng.random() < 0.5],
    "empty": lambda facts, shown, rng: [],
}


def exact_answerer(cfg: RLConfig) -> AnswerAgent:
    """The synthetic world's frozen answer agent: `lookup_answer` over what retrieval shows."""
    return AnswerAgent(lambda items: [lookup_answer(q, mem) for mem, q in items], cfg, "exact")


def sensitivity(samples: list, convs: list, tok, cfg: RLConfig) -> dict:
    """name -> test metrics of each scripted manager: F1 per category, the final bloat cost
    c(M_S, T_S), and the reward F1 - lam * c as a local reward computes it (the global reward
    of a session is the same F1 restricted to that session's questions, minus the same
    penalty). A reward that cannot rank these cannot teach memory management."""
    answerer, out = exact_answerer(cfg), {}
    for name, manager in SCRIPTED.items():
        banks = [teacher_memory(s, c, cfg.chunks, manager=manager) for s, c in zip(samples, convs)]
        res = score(answerer, tok, banks, convs)
        T = [dialogue_tokens(tok, c)[-1] for c in convs]
        res["bloat_c"] = 100 * sum(bloat_cost(memory_tokens(tok, b), t, cfg.phi) for b, t in zip(banks, T)) / len(banks)
        rewards = []
        for b, c, t in zip(banks, convs, T):
            f1, pen = qa_scores(answerer, tok, [b], c.qa, t, cfg)
            rewards.append(row_reward(f1[0], pen[0], finished=True))
        res["reward"] = 100 * sum(rewards) / len(rewards)
        out[name] = res
    return out


# ------------------------------------------------------------------ decisions scored against the teacher
def _wrote(ops, kind, content=None, memory_id=None):
    """Whether `ops` hold a `kind` op with this content / memory id (None: any)."""
    return any(str(o.get("op", "")).upper() == kind and content in (None, o.get("content"))
               and memory_id in (None, o.get("memory_id")) for o in ops)


def decision_counts(decisions: list, gold: dict) -> Counter:
    """Score chunks' decisions (memr2.Decision) against the teacher, given the SAME facts and
    the SAME shown memories: extractor facts vs the chunk's gold facts (exact text), and per
    extracted fact the manager's op vs the teacher's (INSERT of the fact, UPDATE / DELETE of
    the right id, NOOP = the fact not written). `right` counts gold facts extracted exactly
    AND handled as the teacher would: a row's true quality is right / fact_gold."""
    c = Counter()
    for d in decisions:
        want = {t.dia_id: gold[t.dia_id]["fact"] for t in d.turns if t.dia_id in gold}
        c["fact_gold"] += len(want)
        c["fact_pred"] += len(d.facts)
        exact = {f["dia_id"] for f in d.facts if want.get(f["dia_id"]) == f["fact"]}
        c["fact_hit"] += len(exact)
        done = set()
        for f, op in zip(d.facts, teacher_ops(d.facts, d.shown)):
            kind, mid = op["op"], op.get("memory_id")
            ok = (not _wrote(d.ops, "INSERT", f["fact"]) and not _wrote(d.ops, "UPDATE", f["fact"]) if kind == "NOOP"
                  else _wrote(d.ops, kind, None if kind == "DELETE" else f["fact"], mid))
            c[f"{kind}_gold"] += 1
            c[f"{kind}_hit"] += ok
            if ok and f["dia_id"] in exact and f["dia_id"] not in done:
                done.add(f["dia_id"])
                c["right"] += 1
    return c


def decision_metrics(c: Counter) -> dict:
    """Counts -> per-op accuracy (x100; NaN where the teacher never asked for that op)."""
    pct = lambda a, b: 100 * c[a] / c[b] if c[b] else float("nan")
    return {"fact_recall": pct("fact_hit", "fact_gold"), "fact_precision": pct("fact_hit", "fact_pred"),
            **{f"acc_{k}": pct(f"{k}_hit", f"{k}_gold") for k in ("INSERT", "UPDATE", "DELETE", "NOOP")}}


def make_judge(sample: dict):
    """judge(session, decisions) -> the share of the session's gold facts extracted and
    handled right: the true quality of one row, for the credit-assignment diagnostic."""
    def judge(sess, decisions):
        c = decision_counts(decisions, sample["gold_facts"])
        return c["right"] / c["fact_gold"] if c["fact_gold"] else float("nan")
    return judge


# ============================================================================ evaluation
def score(answerer, tok, banks: list, convs: list, names=CATEGORIES) -> dict:
    """Answer every question of each conversation from its final bank; F1, BLEU-1 and exact
    match overall and per category (x100), M-Fail, memory size. M-Fail is the share of the
    questions' gold evidence turns missing from the bank; answers of "none" (a removed
    state) are left out of it, since the right memory holds nothing about them."""
    pairs = [(b, q) for b, c in zip(banks, convs) for q in c.qa]
    preds = answerer.answer([(b, q.question) for b, q in pairs])
    per = {}
    for (b, q), pred in zip(pairs, preds):
        cat = names.get(q.category, str(q.category))
        for key in ("overall", cat):
            d = per.setdefault(key, {"f1": [], "bleu1": [], "em": []})
            d["f1"].append(token_f1(pred, q.answer))
            d["bleu1"].append(bleu1(pred, q.answer))
            d["em"].append(exact_match(pred, q.answer))
    ev = [d in b.dia_ids() for b, q in pairs if q.answer != "none" for d in q.evidence]
    out = {f"{m}_{k}": 100 * sum(v) / len(v) for k, d in per.items() for m, v in d.items()}
    out |= {"n_questions": len(pairs), "m_fail": 100 * (1 - sum(ev) / len(ev)) if ev else (0.0 if pairs else math.nan),
            "mem_entries": sum(len(b.entries) for b in banks) / len(banks),
            "mem_tokens": sum(memory_tokens(tok, b) for b in banks) / len(banks)}
    return out


def evaluate(model, tok, answerer, convs: list, cfg: RLConfig, samples=None) -> dict:
    """Greedy read of each whole conversation (test n = 1), then `score`, plus the ops mix;
    with the synthetic `samples`, every decision is also scored against the teacher."""
    trace = []
    banks, counts, unfinished = read_conversations(model, tok, convs, cfg, temperature=0.0, trace=trace)
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
    return [teacher_memory(s, c, cfg.chunks) for s, c in zip(samples, convs)]


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


# ============================================================================ splits and the CLI
def synthetic_split(sizes: dict, n_sessions: int = 32) -> dict:
    """split -> (samples, conversations) of synthetic worlds from disjoint, fixed seed ranges:
    train, val and test never share a world, tuning on val never sees a test seed, and every
    training seed of an experiment is measured on the same test worlds (paired comparisons)."""
    offsets, out = {"train": 100_000, "val": 150_000, "test": 190_000}, {}
    for k, n in sizes.items():
        samples = [make_world(offsets[k] + i, n_sessions) for i in range(n)]
        out[k] = (samples, [parse_conversation(s) for s in samples])
    return out


# Two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy at run time).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


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
    return f"{r['algo']} {'->'.join(map(str, r['stages']))}" + (f" mb{r['minibatch']}" if r.get("minibatch", 64) != 64 else "")


def _fmt(ci, digits=1) -> str:
    return "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}]".format(*ci, d=digits)


def compare(run_dirs: list, out_dir: Path) -> str:
    """Experiment report from finished runs (result.json + metrics.jsonl), written to out_dir:
    per arm the mean +- std over seeds of the test metrics and the cost (optimizer steps,
    generated tokens, minutes); paired differences of test F1 between arms with a t-based
    95 % interval over seeds and the per-seed values; the credit diagnostic per stage (the
    within-group correlation of advantage and true quality, local vs global rows); mean
    validation curves. PNGs of the curves where matplotlib is installed (not needed)."""
    runs = []
    for d in run_dirs:
        runs.append(read_run_result(Path(d)))
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
    md += ["", f"Test questions per run: {nq}. Base pipeline (SFT only) test F1: {sum(base) / len(base):.1f}; "
               f"oracle memory: {sum(oracle) / len(oracle) if oracle else math.nan:.1f}.", "",
           "Paired differences of test F1, first arm minus second, same seeds: mean [t-based 95 % interval] and per seed:", ""]
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa = {r["seed"]: r["trained"]["f1_overall"] for r in arms[a]}
            sb = {r["seed"]: r["trained"]["f1_overall"] for r in arms[b]}
            d = [sa[s] - sb[s] for s in sorted(sa.keys() & sb.keys())]
            if d:
                md.append(f"- {a} vs {b}: {_fmt(t_interval(d))} over {len(d)} seeds; per seed "
                          + ", ".join(f"{x:+.1f}" for x in d))
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


def _credit(rs: list, stage, kind: str) -> list:
    """Per seed, the stage's mean credit correlation of `kind` ("G", "L", or the paired
    difference "L-G"), seeds where it is undefined (NaN: no group with reward variance) left out."""
    c = [r["credit"][str(stage)] for r in rs]
    xs = [x["L"] - x["G"] for x in c] if kind == "L-G" else [x[kind] for x in c]
    return [x for x in xs if x == x]


def _plots(arms: dict, curves: dict, out_dir: Path) -> None:
    """Validation curves and the credit diagnostic per stage, as PNG, if matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    color = {arm: f"C{i}" for i, arm in enumerate(arms)}  # one colour per arm in both panels
    for arm, pts in curves.items():
        ax[0].plot([x for x, _, _ in pts], [f for _, _, f in pts], marker="o", color=color[arm], label=arm)
    ax[0].set(xlabel="RL steps (a stage's step 0 is its warm start, re-validated)", ylabel="val F1",
              title="validation F1 (mean over seeds)")
    ax[0].legend(fontsize=7)
    for arm, rs in arms.items():
        for kind, style in (("G", "--"), ("L", "-")):
            ys = [t_interval(_credit(rs, s, kind) or [math.nan]) for s in rs[0]["stages"]]
            if all(math.isnan(y[0]) for y in ys):  # an arm without local rows
                continue
            ax[1].errorbar([str(s) for s in rs[0]["stages"]], [y[0] for y in ys], yerr=[[y[0] - y[1] for y in ys], [y[2] - y[0] for y in ys]],
                           linestyle=style, marker="o", capsize=3, color=color[arm],
                           label=f"{arm} {'global' if kind == 'G' else 'local'}")
    ax[1].axhline(0, color="grey", lw=0.5)
    ax[1].set(xlabel="stage (sessions)", ylabel="corr(advantage, true quality)", title="credit diagnostic (95 % t-interval)")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)


def read_run_result(d: Path) -> dict:
    """A finished run's result.json plus its validation curve; a missing or damaged file is a DataError."""
    try:
        r = json.loads((d / "result.json").read_text())
        vals = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        r["val_curve"] = [(v["stage"], v["step"], v["f1_overall"]) for v in vals if v["phase"] == "val"]
        for k in ("algo", "stages", "seed", "base", "trained"):
            r[k]
        rl = [v for v in vals if v["phase"] == "rl"]
        r["cost"] = {"updates": sum(v.get("updates", 0) for v in rl), "gen_tokens": sum(v.get("gen_tokens", 0) for v in rl)}
        r["credit"] = {}  # stage -> {kind: mean over its steps of the credit correlation}
        for s in r["stages"]:
            for kind in ("G", "L"):
                xs = [x for v in rl if v["stage"] == s and (x := v.get(f"credit_corr_{kind}", math.nan)) == x]
                r["credit"].setdefault(str(s), {})[kind] = sum(xs) / len(xs) if xs else math.nan
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


def run_answerer(path: Path, data: str, cfg: RLConfig, tok):
    """The answer agent a run was trained with (its args.json says), else the exact reader
    on the synthetic world and the run's SFT model on LoCoMo."""
    args = next((json.loads((p / "args.json").read_text()) for p in (path, path.parent) if (p / "args.json").exists()), {})
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


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + error lines -> one line, exit status 1
        raise SystemExit(f"error: {message}")


def cli_compare(argv: list) -> None:
    """python eval.py compare RUN_DIR... [--out results]"""
    ap = OneLineParser(prog="eval.py compare", description="Table of an experiment's runs.")
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
    ap = OneLineParser(prog="eval.py sensitivity",
                       description="Reward of scripted managers fed the gold facts, on the test worlds.")
    ap.add_argument("--worlds", type=positive_int, default=24, help="synthetic test worlds")
    args = ap.parse_args(argv)
    cfg = RLConfig()
    samples, convs = synthetic_split({"test": args.worlds})["test"]
    tok = world_tokenizer(synthetic_split({"train": 50})["train"][0])
    res = sensitivity(samples, convs, tok, cfg)
    print(f"{args.worlds} test worlds, {sum(len(c.qa) for c in convs)} questions, exact reader, "
          f"lambda {cfg.lam}, phi {cfg.phi} (x100)\n")
    print(report_table(res, SENSITIVITY_COLS))


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
    ap = OneLineParser(description="Evaluate a Memory-R2 checkpoint: F1, BLEU-1, EM per category, M-Fail, memory size, ops.")
    ap.add_argument("path", help="a run dir (runs/<name>) or a checkpoint dir")
    ap.add_argument("--data", choices=["synthetic", "locomo"], default="synthetic")
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--locomo-path", default=str(Path(__file__).parent / "data" / "locomo10.json"))
    ap.add_argument("--worlds", type=positive_int, default=24, help="synthetic worlds in the split")
    ap.add_argument("--chunks", type=positive_int, default=None, help="chunks per session (default: 2, LoCoMo: 10)")
    ap.add_argument("--convs", type=positive_int, default=None, help="evaluate only the first N conversations of the split")
    ap.add_argument("--sessions", type=positive_int, default=None,
                    help="keep the first N sessions of each conversation and the questions about them")
    args = ap.parse_args(argv)
    try:
        ckpt = find_checkpoint(Path(args.path))
        ck = load_checkpoint(ckpt)
        out = ckpt / f"eval-{args.data}-{args.split}.json"
        out.write_text("{}")  # fail now, not after the whole evaluation, if the result cannot be written
        samples, convs = eval_data(args)
        cfg = RLConfig(chunks=args.chunks if args.chunks is not None else (10 if args.data == "locomo" else 2))
        if ck["model"].cfg.chat_format:  # a pretrained instruct model: room for its JSON
            cfg.max_new = dict(CHAT_MAX_NEW)
        answerer = run_answerer(Path(args.path), args.data, cfg, ck["tok"])
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # the result file, tried first: a read-only checkpoint fails before the evaluation
        raise SystemExit(f"error: cannot write {e.filename}: {e.strerror or e}")
    table = {f"{ckpt} (answerer {answerer.name})": evaluate(ck["model"], ck["tok"], answerer, convs, cfg, samples)}
    if samples is not None:
        table["oracle memory (teacher)"] = score(answerer, ck["tok"], oracle_banks(samples, convs, cfg), convs)
    print(report_table(table))
    if samples is not None:
        print("\nDecisions against the teacher (x100):\n\n" + report_table(table, DECISION_COLS))
    out.write_text(json.dumps(table, indent=1))
    print(f"wrote {out}")


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    jobs = {"compare": cli_compare, "sensitivity": cli_sensitivity}
    if argv[:1] and argv[0] in jobs:
        return jobs[argv[0]](argv[1:])
    cli_evaluate(argv)


if __name__ == "__main__":
    import sys
    sys.stdout.reconfigure(errors="backslashreplace")  # a non-ASCII path on an ASCII terminal (stderr does this already)
    main()
