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
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from model import CheckpointError, load_checkpoint, packaged_minilm, train_tokenizer
from memory import (QA, RETRIEVERS, Conversation, Entry, MemoryBank, Session, Turn, bloat_cost, encodable, minilm, rank,
                    retrieve_for_facts, short_date)
from memr2 import (CHAT_MAX_NEW, PRETRAINED, AnswerAgent, Decision, RLConfig, chunk_turns, context_sizes, dialogue_tokens,
                   gather_over_ranks, memory_tokens, model_reader, normalize_answer, qa_scores, ranks, row_reward,
                   run_session, sample_questions, this_rank, token_f1)

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
# A world the tiny model (0.56M parameters) can learn on a CPU, with the official memory semantics
# (the official manager prompt, prompt/math/multi_turn_mamrp.py: memory is MONOTONIC). Two
# speakers' states CHANGE over sessions (moves, new jobs, new pets); a change, and a state
# that ends (a pet dies, a trip is cancelled), is an UPDATE that merges into the state's one
# entry and keeps every earlier claim; a later turn may prove an earlier claim false ("I never
# lived in Oslo"), and only that is a DELETE. One-off events (a visit, a book) are entries of
# their own. Questions ask about every session (LoCoMo asks 4.3-8.0 per session): the current
# state, earlier states, what happened, when, both speakers, and corrected claims. It writes
# LoCoMo's JSON schema, so `parse_conversation` reads both, plus a "gold_facts" map
# (dia_id -> the fact that turn states) from which the teacher works.

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
         "Mallory", "Nina", "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Wendy"]
POOLS = {  # closed value lists; `novel_rate` of values are made-up words instead, so the
    # model must learn to copy values rather than memorise them
    "city": ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Rome", "Seoul"],
    "job": ["baker", "nurse", "teacher", "pilot", "chef", "farmer", "lawyer", "painter", "driver", "dentist"],
    "hobby": ["chess", "hiking", "painting", "fishing", "yoga", "cooking", "running", "pottery"],
    "pet": ["Rex", "Milo", "Bella", "Luna", "Max", "Coco", "Daisy", "Rocky"],
    "plan": ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Rome", "Seoul"],
    "visit": ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Rome", "Seoul"],
    "book": ["Dune", "Emma", "Ulysses", "Beloved", "Matilda", "Rebecca", "Heidi", "Ivanhoe"],
}
STATE, EVENTS = ("city", "job", "hobby", "pet", "plan"), ("visit", "book")
ENDS = {"pet": "died", "plan": "cancelled", "job": "quit", "hobby": "gave up"}  # a state that can end, and its word
# What a speaker says, per turn kind: "set" a state or an event, "end" a state, "never": a correction
SAY = {
    "set": {"city": ["I moved to {v} last week.", "We just settled in {v}.", "My new home is in {v}."],
            "job": ["I started a new job as a {v}.", "I work as a {v} now.", "Guess what, I am a {v} now."],
            "hobby": ["Lately I am really into {v}.", "My new hobby is {v}.", "I spend my weekends on {v} now."],
            "pet": ["I adopted a pet named {v}.", "Meet {v}, my new pet!", "We got a pet, we call it {v}."],
            "plan": ["I am planning a trip to {v}.", "Next month I want to travel to {v}.", "I booked a trip to {v}."],
            "visit": ["I visited {v} on the weekend.", "I was in {v} for a few days.", "Just got back from {v}."],
            "book": ["I read a book called {v}.", "I finished reading {v}.", "I loved the book {v}."]},
    "end": {"pet": ["Sadly my pet {v} died.", "We lost {v}, my pet, this week."],
            "plan": ["I cancelled my trip to {v}.", "The trip to {v} is off, I cancelled it."],
            "job": ["I quit my job as a {v}.", "I am no longer a {v}, I quit."],
            "hobby": ["I stopped doing {v}, no time.", "I gave up {v} for good."]},
    "never": {"city": ["Sorry, I got that wrong: I never lived in {v}.", "Correction: I never actually moved to {v}."],
              "job": ["Actually I never worked as a {v}, I only applied.", "I misspoke, I was never a {v}."],
              "hobby": ["Honestly I never did {v}, I only talked about it.", "I never enjoyed {v}, I got that wrong."],
              "pet": ["Actually, {v} was never mine, I was only looking after it.", "{v} was never my pet, it was my sister's."],
              "plan": ["Correction: I never planned a trip to {v}.", "I never booked {v}, I mixed it up."],
              "visit": ["Actually I never went to {v}, that was my brother.", "I never visited {v}, I got that wrong."],
              "book": ["I never read {v} after all, I mixed it up.", "Correction: I never finished {v}, or even began it."]},
}
# The facts, as the extractor writes them. A move keeps its date in the text: an UPDATE keeps
# the entry's FIRST date (as the official memory does), so a date a question needs is content.
FACT = {
    "set": {"city": "{s} lives in {v} since {d}", "job": "{s} has a job as a {v}", "hobby": "{s} has the hobby {v}",
            "pet": "{s} has a pet named {v}", "plan": "{s} plans a trip to {v}", "visit": "{s} visited {v}",
            "book": "{s} read the book {v}"},
    "end": {"pet": "{s}'s pet {v} died", "plan": "{s} cancelled the trip to {v}", "job": "{s} quit the job as a {v}",
            "hobby": "{s} gave up the hobby {v}"},
    "never": {"city": "{s} never lived in {v}", "job": "{s} never had a job as a {v}", "hobby": "{s} never had the hobby {v}",
              "pet": "{s} never had a pet named {v}", "plan": "{s} never planned a trip to {v}",
              "visit": "{s} never visited {v}", "book": "{s} never read the book {v}"},
}
BEFORE = "; before: "  # a state's entry: its newest fact, then its earlier values, newest first
QUESTIONS = {  # question kind -> attr -> template; {o} is the other speaker
    "now": {"city": "Where does {s} live?", "job": "What job does {s} have?", "hobby": "What hobby does {s} have?",
            "pet": "What is the name of {s}'s pet?", "plan": "Where does {s} plan a trip?"},
    "before": {"city": "Where did {s} live before {v}?", "job": "What job did {s} have before {v}?",
               "hobby": "What hobby did {s} have before {v}?", "pet": "What pet did {s} have before {v}?",
               "plan": "Where did {s} plan a trip before {v}?"},
    "after": {"city": "Where did {s} live after {v}?", "job": "What job did {s} have after {v}?",
              "hobby": "What hobby did {s} have after {v}?", "pet": "What pet did {s} have after {v}?",
              "plan": "Where did {s} plan a trip after {v}?"},
    "first": {"city": "Where did {s} live first?", "job": "What was {s}'s first job?", "hobby": "What was {s}'s first hobby?",
              "pet": "What was {s}'s first pet?", "plan": "Where did {s} first plan a trip?"},
    "all": {"city": "Which places did {s} live in?", "job": "What jobs did {s} have?",
            "hobby": "What hobbies did {s} have?", "pet": "What pets did {s} have?", "plan": "Where did {s} plan trips to?"},
    "did": {"city": "Did {s} live in {v}?", "job": "Did {s} have a job as a {v}?", "hobby": "Did {s} have the hobby {v}?",
            "pet": "Did {s} have a pet named {v}?", "plan": "Did {s} plan a trip to {v}?", "visit": "Did {s} visit {v}?",
            "book": "Did {s} read the book {v}?"},
    "happened": {"pet": "What happened to {s}'s pet {v}?", "plan": "What happened to {s}'s trip to {v}?",
                 "job": "What happened to {s}'s job as a {v}?", "hobby": "What happened to {s}'s hobby {v}?"},
    "when": {"city": "When did {s} move to {v}?", "visit": "When did {s} visit {v}?", "book": "When did {s} read {v}?"},
    "pair": {"city": "Where do {s} and {o} live?", "job": "What jobs do {s} and {o} have?"},
}
CATEGORY = {"now": 4, "did": 4, "happened": 4, "before": 2, "after": 2, "first": 2, "when": 2, "all": 1, "pair": 1}
SMALL_TALK = ["How have you been?", "The weather is lovely today.", "Haha, that is so funny.", "See you soon!",
              "I had a long day at home.", "Did you sleep well?", "That sounds great!", "Tell me more.",
              "I am a bit tired today.", "Good to hear from you!", "What a week it has been.", "Same here, honestly."]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _made_up(rng, capital):
    w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
    w += rng.choice(["", "n", "k", "r", "s"])
    return w.capitalize() if capital else w


@dataclass
class Claim:
    """One value a speaker stated for an attribute, as the generator tracks the truth."""
    value: str
    dia: str  # the turn that stated it
    session: int
    ended: str = ""  # the turn that ended it (a state), or ""


def make_world(seed: int, n_sessions: int = 32, facts_per_session: int = 3, noise_turns: int = 1,
               event_rate: float = 0.25, end_rate: float = 0.3, correct_rate: float = 0.18,
               novel_rate: float = 0.3) -> dict:
    """One conversation in LoCoMo's schema. Knobs: sessions, facts and small-talk turns per
    session, share of one-off events, how often a state ends, how often a turn corrects an
    earlier claim, and the share of made-up values. Same seed -> identical world."""
    rng = random.Random(seed)
    a, b = rng.sample(NAMES, 2)
    hist = {(s, attr): [] for s in (a, b) for attr in STATE + EVENTS}  # true claims, oldest first
    wrong = []  # (speaker, attr, corrected Claim, correcting turn)
    fixed = set()  # sessions that lost a claim to a correction: one each, so every session keeps a question
    conv = {"speaker_a": a, "speaker_b": b}
    gold, day, used = {}, rng.randint(0, 200), set()
    for n in range(1, n_sessions + 1):
        day += rng.randint(1, 9)
        d, m = 1 + day % 28, (day // 28) % 12
        conv[f"session_{n}_date_time"] = f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(['am', 'pm'])} on {d} {MONTHS[m]}, {2023 + day // 336}"
        date = short_date(conv[f"session_{n}_date_time"])
        kinds = ["fact"] * facts_per_session + ["talk"] * noise_turns
        rng.shuffle(kinds)
        turns, touched = [], set()
        for k, kind in enumerate(kinds, 1):
            dia = f"D{n}:{k}"
            s = rng.choice((a, b)) if kind == "fact" else (a, b)[k % 2]
            if kind == "talk":
                turns.append({"speaker": s, "dia_id": dia, "text": rng.choice(SMALL_TALK)})
                continue
            # A correction needs a claim from an earlier session that is still the whole of its
            # entry (an event, or a state with one value): DELETE removes an entry, never part of one.
            fixable = [(attr, c) for (sp, attr), h in hist.items() if sp == s and attr not in touched
                       for c in (h if attr in EVENTS else h[:1] if len(h) == 1 and not h[0].ended else [])
                       if c.session < n and c.session not in fixed]
            if fixable and rng.random() < correct_rate:
                attr, claim = rng.choice(fixable)
                how, v = "never", claim.value
                hist[(s, attr)].remove(claim)
                wrong.append((s, attr, claim, dia))
                fixed.add(claim.session)
            else:
                attr = rng.choice(EVENTS) if rng.random() < event_rate else rng.choice(STATE)
                if attr in touched:  # one turn per attribute per session keeps gold ops unambiguous
                    attr = rng.choice([e for e in EVENTS if e not in touched] or ["book"])
                h = hist[(s, attr)]
                if attr in ENDS and h and not h[-1].ended and rng.random() < end_rate:
                    how, v = "end", h[-1].value
                    h[-1].ended = dia
                else:
                    how, v = "set", None
                    while v is None or (s, attr, v) in used:  # a value is never stated twice
                        v = (_made_up(rng, attr not in ("job", "hobby")) if rng.random() < novel_rate
                             else rng.choice(POOLS[attr]))
                    used.add((s, attr, v))
                    h.append(Claim(v, dia, n))
            touched.add(attr)
            turns.append({"speaker": s, "dia_id": dia, "text": rng.choice(SAY[how][attr]).format(v=v)})
            gold[dia] = {"speaker": s, "attr": attr, "kind": how, "value": v, "date": date,
                         "fact": FACT[how][attr].format(s=s, v=v, d=date)}
        conv[f"session_{n}"] = turns
    return {"sample_id": f"world-{seed}", "conversation": conv, "qa": _questions(a, b, hist, wrong, gold),
            "gold_facts": gold}


def _questions(a, b, hist, wrong, gold):
    """Questions asked after the last session (as in LoCoMo), each with the turns that decide
    its answer as evidence, so every session is asked about where it stated something."""
    qa = []

    def ask(kind, attr, answer, evidence, **f):
        qa.append({"question": QUESTIONS[kind][attr].format(**f), "answer": answer, "evidence": evidence,
                   "category": CATEGORY[kind]})
    last = {}  # (speaker, attr) -> its current value ("none" if ended) and the turn that decided it
    for (s, attr), h in hist.items():
        if attr in EVENTS:
            for c in h:
                ask("when", attr, gold[c.dia]["date"], [c.dia], s=s, v=c.value)
                ask("did", attr, "yes", [c.dia], s=s, v=c.value)
            continue
        for c in h:
            ask("did", attr, "yes", [c.dia], s=s, v=c.value)
            if c.ended:
                ask("happened", attr, ENDS[attr], [c.dia, c.ended], s=s, v=c.value)
        for u, v in zip(h, h[1:]):
            ask("before", attr, u.value, [u.dia, v.dia], s=s, v=v.value)
            ask("after", attr, v.value, [u.dia, v.dia], s=s, v=u.value)
        if h:
            ask("first", attr, h[0].value, [h[0].dia], s=s)
        if len(h) > 1:
            ask("all", attr, ", ".join(c.value for c in h), [c.dia for c in h], s=s)
        if h:
            last[(s, attr)] = ("none", h[-1].ended) if h[-1].ended else (h[-1].value, h[-1].dia)
            if attr == "city":  # a move's date is in its fact: asked of the current city only
                ask("when", attr, gold[h[-1].dia]["date"], [h[-1].dia], s=s, v=h[-1].value)
    for s, attr, claim, fix in wrong:
        ask("did", attr, "no", [claim.dia, fix], s=s, v=claim.value)
        if attr in STATE and not hist[(s, attr)]:
            last[(s, attr)] = ("none", fix)
    for (s, attr), (v, dia) in last.items():
        ask("now", attr, v, [dia], s=s)
    for attr in QUESTIONS["pair"]:
        (va, da), (vb, db) = last.get((a, attr), ("", "")), last.get((b, attr), ("", ""))
        if va and vb and va != vb and "none" not in (va, vb):  # set-based F1 would not give 1 to "X and X"
            ask("pair", attr, f"{va} and {vb}", [da, db], s=a, o=b)
    return qa


# --------------------------------------------------------------------------- reading an entry
def _template_regex(template):
    """"{s} lives in {v} since {d}" -> a regex with named groups s, o (the other speaker), v, d.
    Names and values are single words; a date is the rest of the line."""
    rx = re.escape(template)
    for name, pat in (("s", r"[^\s',;?]+"), ("o", r"[^\s',;?]+"), ("v", r"[^\s',;?]+"), ("d", r"[^;?]+?")):
        rx = rx.replace(re.escape("{" + name + "}"), f"(?P<{name}>{pat})")
    return re.compile("^" + rx + "$")


_FACT_RE = [(how, attr, _template_regex(t)) for how, table in FACT.items() for attr, t in table.items()]
_Q_RE = [(kind, attr, _template_regex(t)) for kind, table in QUESTIONS.items() for attr, t in table.items()]


def read_fact(text: str):
    """One fact -> (kind, attr, speaker, value, date or None), or None when it is no world fact."""
    for how, attr, rx in _FACT_RE:
        m = rx.match(text)
        if m:
            return how, attr, m["s"], m["v"], m.groupdict().get("d")
    return None


def read_entry(content: str):
    """A memory line -> (its newest fact as read_fact reads it, [(earlier value, ended)] newest
    first), or None. "Nina has a pet named Milo; before: Rex died, Max" -> the Milo fact, [(Rex,
    True), (Max, False)]."""
    head, _, tail = content.partition(BEFORE)
    f = read_fact(head)
    if not f:
        return None
    items = [(w.split()[0], len(w.split()) > 1) for w in tail.split(", ") if w.strip()] if tail else []
    return f, items


def merged(old: str, fact: str) -> str:
    """The teacher's UPDATE content: the new fact, then every value the entry held, newest first.
    An ending keeps the history as it is (its value is already the head's)."""
    (how, attr, _, v, _), items = read_entry(old)
    f = read_fact(fact)
    if f[0] == "set":
        items = [(v, how == "end")] + items
    # (a model-written entry may mark an ending the attribute cannot have: its word is then left out)
    return fact + (BEFORE + ", ".join(f"{x} {ENDS.get(attr, '')}".strip() if e else x for x, e in items) if items else "")


def timeline(entries: list, speaker: str, attr: str) -> tuple:
    """What `entries` say about one speaker's attribute -> ([(value, ended)] oldest first,
    corrected values). Entries are read oldest first; a value stated again moves to its newest
    mention, so one merged entry and the same claims spread over many entries read alike; a
    stored correction ("X never lived in Oslo") removes the value, as any competent reader would."""
    line, never = [], set()
    for e in sorted(entries, key=lambda e: (e.session, int(e.memory_id[1:]))):
        r = read_entry(e.content)
        if not r or r[0][1] != attr or r[0][2] != speaker:
            continue
        (how, _, _, v, _), items = r
        if how == "never":
            never.add(v)
            line = [c for c in line if c[0] != v]
            continue
        for x, ended in items[::-1] + [(v, how == "end")]:
            line = [c for c in line if c[0] != x] + [(x, ended)]
    return line, never


def exact_answer(question: str, entries: list) -> str:
    """The exact reader: answer a world question from `entries` (what retrieval shows). It is
    the synthetic world's frozen answer agent, gives the learned answerer its SFT targets, and
    checks that the teacher's gold memory answers everything."""
    for kind, attr, rx in _Q_RE:
        m = rx.match(question)
        if not m:
            continue
        if kind == "pair":
            vals = [exact_answer(QUESTIONS["now"][attr].format(s=p), entries) for p in (m["s"], m["o"])]
            return "none" if vals == ["none", "none"] else " and ".join(vals)
        line, never = timeline(entries, m["s"], attr)
        values = [x for x, _ in line]
        v = m.groupdict().get("v")
        if kind == "now":
            return line[-1][0] if line and not line[-1][1] else "none"
        if kind == "did":
            return "yes" if v in values else "no"
        if kind == "first":
            return values[0] if values else "none"
        if kind == "all":
            return ", ".join(values) or "none"
        if kind == "happened":
            return ENDS[attr] if (v, True) in line else "none"
        if kind in ("before", "after"):
            i = values.index(v) if v in values else -1
            j = i - 1 if kind == "before" else i + 1
            return values[j] if i >= 0 and 0 <= j < len(values) else "none"
        # when: a move's date is in its fact; an event's is the date of the entry that holds it
        if v in never:
            return "none"
        hits = [(e, f) for e in entries if (r := read_entry(e.content)) and (f := r[0])[:4] == ("set", attr, m["s"], v)]
        if not hits:
            return "none"
        e, f = max(hits, key=lambda h: (h[0].session, int(h[0].memory_id[1:])))
        return f[4] or e.session_time
    return "none"


# --------------------------------------------------------------------------- the teacher
def _entry_of(f, shown, value=None):
    """The shown entry that holds the fact's speaker and attribute (and value, if given), or None."""
    for e in shown:
        r = read_entry(e.content)
        if r and r[0][0] in ("set", "end") and r[0][1:3] == f[1:3] and value in (None, r[0][3]):
            return e
    return None


def teacher_op(fact: dict, shown: list) -> dict:
    """The gold manager operation for one fact given the memories the manager is shown (the
    official manager prompt's rules): a new value of a stored state -> UPDATE that entry with
    the merged content (nothing stored is dropped); a state that ends -> UPDATE too; a claim
    proven false -> DELETE its entry; what memory already holds -> NOOP; anything else -> INSERT."""
    insert = {"op": "INSERT", "content": fact["fact"], "speaker": fact["speaker"], "dia_id": fact["dia_id"]}
    f = read_fact(fact["fact"])
    if f is None:
        return insert
    how, attr, _, v, _ = f
    if any(e.content == fact["fact"] for e in shown):
        return {"op": "NOOP"}
    if how == "never":
        hit = _entry_of(f, shown, v)
        return {"op": "DELETE", "memory_id": hit.memory_id} if hit else {"op": "NOOP"}
    hit = _entry_of(f, shown, v if how == "end" else None) if attr in STATE else None
    if hit is None:
        return insert
    # (key order = the order the model writes them: decision, content, then what it copies)
    return {"op": "UPDATE", "content": merged(hit.content, fact["fact"]), "memory_id": hit.memory_id,
            "dia_id": fact["dia_id"]}


def teacher_ops(facts: list, shown: list, rng=None, noise: float = 0.0) -> list:
    """Gold manager operations for `facts`. With `noise`, each op is corrupted with that
    probability the way a sloppy manager would: UPDATE becomes an INSERT of the bare fact,
    DELETE becomes NOOP, INSERT is dropped (so SFT leaves room for RL)."""
    ops = []
    for f in facts:
        op = teacher_op(f, shown)
        if rng is not None and noise > 0 and rng.random() < noise:
            if op["op"] == "UPDATE":
                op = _insert(f)
            elif op["op"] == "DELETE":
                op = {"op": "NOOP"}
            elif op["op"] == "INSERT":
                continue
        ops.append(op)
    return ops


def noisy_teacher(noise: float):
    """The random-noise SFT teacher: gold ops corrupted at rate `noise` (see teacher_ops)."""
    return lambda facts, shown, rng: teacher_ops(facts, shown, rng, noise)


# An untrained manager's habits: an instruct model that never learned the ops mostly INSERTs
# (SmolLM2-135M-Instruct as the manager on LoCoMo conv-26: 95.6 % INSERT, no UPDATE). Of the
# ops the teacher would get right, these shares go wrong, always the same way; the rest stay
# right, so a model that imitates the habits takes the wrong op greedily (it is the mode) and
# still samples the right one at temperature 1 (what RL can reinforce).
HABIT = {"UPDATE as INSERT": 0.6, "UPDATE replaces": 0.1, "DELETE as NOOP": 0.7}


def habit_teacher(rates: dict = HABIT):
    """The habit-start SFT teacher: per op, an UPDATE becomes an INSERT of the bare fact (a
    duplicate next to the stored entry) or replaces the stored claims with the new one
    (not merged), a DELETE of a disproved claim becomes NOOP; INSERT and NOOP stay right and
    no fact is missed (extraction stays good)."""
    def manager(facts, shown, rng):
        ops = []
        for f, op in zip(facts, teacher_ops(facts, shown)):
            u = rng.random()
            if op["op"] == "UPDATE" and u < rates["UPDATE as INSERT"]:
                op = _insert(f)
            elif op["op"] == "UPDATE" and u < rates["UPDATE as INSERT"] + rates["UPDATE replaces"]:
                op = dict(op, content=f["fact"])
            elif op["op"] == "DELETE" and u < rates["DELETE as NOOP"]:
                op = {"op": "NOOP"}
            ops.append(op)
        return ops
    return manager


def sft_teacher(kind: str, noise: float):
    """--teacher -> (manager, fact miss rate) for teacher_trace: the habit start misses no
    fact; the noise teacher misses them at half its op noise."""
    return (habit_teacher(), 0.0) if kind == "habit" else (noisy_teacher(noise), noise / 2)


def teacher_trace(sample: dict, conv, cfg: RLConfig, manager=None, miss: float = 0.0, seed: int = 0):
    """Replay the world with a teacher, chunked and retrieving as `cfg` says (the policy's
    chunks and retrieval) -> (steps, final bank). One step per chunk:
    (session, chunk_turns, gold_facts, retrieved_memories, ops); the ops are applied to the
    teacher's own bank, so later chunks see the (possibly imperfect) memory the teacher made.
    `manager(facts, shown, rng) -> ops`: the gold ops by default, else an SFT teacher
    (`sft_teacher`) or a scripted manager (`SCRIPTED`); the facts are gold, missed at rate `miss`."""
    rng = random.Random(seed)
    manager = manager or SCRIPTED["oracle"]
    bank, steps = MemoryBank(cfg.retriever), []
    gold = sample["gold_facts"]
    for sess in conv.sessions:
        for chunk in chunk_turns(sess.turns, cfg.chunks):
            facts = [{"speaker": gold[t.dia_id]["speaker"], "dia_id": t.dia_id, "fact": gold[t.dia_id]["fact"]}
                     for t in chunk if t.dia_id in gold and not (miss and rng.random() < miss)]
            # copies: later UPDATEs rewrite entries in place, and a step must show the memory as it was
            retrieved = [copy.copy(e) for e in retrieve_for_facts(bank, facts, cfg.per_fact, cfg.mem_cap)]
            ops = manager(facts, retrieved, rng)
            steps.append((sess, chunk, facts, retrieved, ops))
            bank.apply(ops, sess.index, short_date(sess.date))
    return steps, bank


def teacher_memory(sample, conv, cfg: RLConfig, manager=None, miss=0.0, seed=0) -> MemoryBank:
    """The bank a teacher ends with; the gold ops' is the oracle memory."""
    return teacher_trace(sample, conv, cfg, manager, miss, seed)[1]


# ------------------------------------------------------------------ scripted managers (reward sensitivity)
def _insert(f):
    return {"op": "INSERT", "content": f["fact"], "speaker": f["speaker"], "dia_id": f["dia_id"]}


def _swap(kind, new):
    """The teacher, with every `kind` op replaced by new(fact, op) (None: dropped)."""
    def manager(facts, shown, rng):
        ops = [new(f, o) if o["op"] == kind else o for f, o in zip(facts, teacher_ops(facts, shown))]
        return [o for o in ops if o is not None]
    return manager


# Each one fails at exactly one kind of decision, fed the gold facts; the reward must notice.
SCRIPTED = {
    "oracle": lambda facts, shown, rng: teacher_ops(facts, shown),
    "insert-only": lambda facts, shown, rng: [_insert(f) for f in facts],  # never UPDATE or DELETE
    "replace-updates": _swap("UPDATE", lambda f, o: dict(o, content=f["fact"])),  # drops the earlier claims
    "duplicate-updates": _swap("UPDATE", lambda f, o: _insert(f)),  # a new entry instead of merging
    "no-delete": _swap("DELETE", lambda f, o: {"op": "NOOP"}),  # corrected claims kept
    "drop-half": lambda facts, shown, rng: [o for o in teacher_ops(facts, shown)
                                            if o["op"] != "INSERT" or rng.random() < 0.5],
    "empty": lambda facts, shown, rng: [],
    "habit (SFT teacher)": habit_teacher(),  # several kinds at once, at the HABIT rates: the start RL works from
}


def exact_answerer(cfg: RLConfig) -> AnswerAgent:
    """The synthetic world's frozen answer agent: `exact_answer` over what retrieval shows."""
    return AnswerAgent(lambda items: [exact_answer(q, mem) for mem, q in items], cfg, "exact")


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


# ------------------------------------------------------------------ decisions scored against the teacher
def _wrote(ops, kind, content=None, memory_id=None):
    """Whether `ops` hold a `kind` op with this content / memory id (None: any)."""
    return any(str(o.get("op", "")).upper() == kind and content in (None, o.get("content"))
               and memory_id in (None, o.get("memory_id")) for o in ops)


def decision_counts(decisions: list, gold: dict) -> Counter:
    """Score chunks' decisions (memr2.Decision) against the teacher, given the SAME facts and
    the SAME shown memories: extractor facts vs the chunk's gold facts (exact text), and per
    extracted fact the manager's op vs the teacher's (INSERT of the fact, UPDATE of the right id
    with the merged content, DELETE of the right id, NOOP = the fact not written). `right` counts
    gold facts extracted exactly AND handled as the teacher would: a row's true quality is
    right / fact_gold."""
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
            ok = (not any(str(o.get("content", "")).startswith(f["fact"]) for o in d.ops) if kind == "NOOP"
                  else _wrote(d.ops, kind, op.get("content"), mid))
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
    """judge(decisions) -> the share of the gold facts of a row's chunks extracted and handled
    right: the true quality of one row, for the credit-assignment diagnostic."""
    def judge(decisions):
        c = decision_counts(decisions, sample["gold_facts"])
        return c["right"] / c["fact_gold"] if c["fact_gold"] else float("nan")
    return judge


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


# ============================================================================ retrieval recall (BM25 vs MiniLM)
def turn_bank(conv, retriever: str) -> MemoryBank:
    """Every turn of a conversation stored as one entry "speaker: text" (its source turn as dia_id),
    as if the manager had kept everything: retrieval alone decides what the answer agent sees."""
    bank = MemoryBank(retriever)
    for sess in conv.sessions:
        for t in sess.turns:
            mid = f"m{bank.next_id}"
            bank.next_id += 1
            bank.entries[mid] = Entry(mid, t.speaker, f"{t.speaker}: {t.text}", sess.index, short_date(sess.date), [t.dia_id])
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
    md += ["", f"Test questions per run: {nq}. Base pipeline (SFT only) test F1: {sum(base) / len(base):.1f}; "
               f"oracle memory: {sum(oracle) / len(oracle) if oracle else math.nan:.1f}."]
    md += ["", "Trained minus the SFT start (the same base model in every run), mean [t-based 95 % interval] over seeds:", ""]
    for arm, rs in arms.items():
        parts = []
        for name, c in (("F1", "f1_overall"), ("UPDATE acc", "acc_UPDATE"), ("DELETE acc", "acc_DELETE"),
                        ("INSERT acc", "acc_INSERT")):
            d = [x for r in rs if (x := r["trained"].get(c, math.nan) - r["base"].get(c, math.nan)) == x]  # NaN-free
            parts.append(f"{name} {_fmt(t_interval(d)) if len(d) > 1 else '-'}")
        md.append(f"- {arm}: " + "; ".join(parts))
    md += ["", "Paired differences of test F1 between arms, first minus second, same seeds: mean [t-based 95 % interval] "
               "and per seed:", ""]
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


def check_comparable(run_dirs: list, runs: list) -> None:
    """A DataError unless the runs make one experiment: each run once, each seed once per arm, one
    step plan per arm, and one setup (result.json's "setup": data, sessions, SFT start, RL knobs...)
    in every run that records it. Else the table would count a run twice or average runs of
    different starts, e.g. LoCoMo's base F1 with the synthetic world's, into one number."""
    where, seeds, plans, setups = {}, {}, {}, []
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
    for d, setup in setups[1:]:
        d0, s0 = setups[0]
        differ = [k for k in sorted(s0.keys() & setup.keys()) if s0[k] != setup[k]]
        if differ:
            more = f"; also {', '.join(differ[1:])}" if differ[1:] else ""
            raise DataError(f"{d0} and {d} differ in {differ[0]} ({s0[differ[0]]} against {setup[differ[0]]}{more}): "
                            "not one experiment, compare them separately")


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
        r = json.loads((d / "result.json").read_text())
        vals = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        r["val_curve"] = [(v["stage"], v["step"], v["f1_overall"]) for v in vals if v["phase"] == "val"]
        for k in ("algo", "stages", "seed", "base", "trained"):
            r[k]
        rl = [v for v in vals if v["phase"] == "rl"]
        r["reward_curve"] = [(v["gstep"], v["reward_global"]) for v in rl]  # x = RL steps taken, as the plots' x
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


def run_args(path: Path) -> dict:
    """The args.json of the run that `path` (a run dir or a checkpoint inside one) belongs to; {} outside a run."""
    f = next((p / "args.json" for p in (path, path.parent) if (p / "args.json").exists()), None)
    try:
        return json.loads(f.read_text()) if f else {}
    except ValueError:
        raise DataError(f"{f} is not JSON: the run's flags cannot be read") from None


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
    ap = OneLineParser(prog="eval.py recall", description="Retrieval recall of BM25 and MiniLM: LoCoMo's test questions "
                       "over stored turns, synthetic facts over the gold memory; the encoder's time.")
    ap.add_argument("--locomo-path", default=str(Path(__file__).parent / "data" / "locomo10.json"))
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
    print(f"LoCoMo test split ({len(convs)} conversations, {sum(len(c.qa) for c in convs)} questions): evidence "
          f"recall@k over all stored turns (x100), {torch.get_num_threads()} torch thread(s)\n")
    print("| retriever | questions | R@1 | R@5 | R@10 | R@30 |\n|---|---|---|---|---|---|")
    secs = {}
    for r in RETRIEVERS:
        res, secs[r] = turn_recall(convs, r)
        for cat in cats:
            print(f"| {r} {cat} | {res[cat]['questions']} | " + " | ".join(f"{res[cat][f'R@{k}']:.1f}" for k in (1, 5, 10, 30)) + " |")
    turns = sum(len(s.turns) for c in convs for s in c.sessions) / len(convs)
    print(f"\nseconds per conversation ({turns:.0f} turns, all its questions): "
          + ", ".join(f"{r} {sum(v) / len(v):.2f}" for r, v in secs.items()) + f"; loading the encoder {load_s:.1f} once\n")
    print(f"Synthetic test worlds ({args.worlds}): facts that UPDATE or DELETE a stored entry, is that entry among the "
          "top k of the fact's speaker (x100); F1 of the exact reader on the gold memory (top-4 per speaker)\n")
    print("| retriever | facts | R@1 | R@2 | R@5 | R@10 | gold-memory F1 |\n|---|---|---|---|---|---|---|")
    for r in RETRIEVERS:
        cfg = RLConfig(retriever=r)
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
    ap = OneLineParser(description="Evaluate a Memory-R2 checkpoint: F1, BLEU-1, EM per category, M-Fail, memory size, ops.",
                       epilog="other jobs (each with its own --help): 'eval.py compare RUN... --out DIR' (an experiment's "
                              "table and figures), 'eval.py sensitivity' (scripted managers' rewards), 'eval.py recall' "
                              "(retrieval recall of BM25 and MiniLM)")
    ap.add_argument("path", help="a run dir (runs/<name>) or a checkpoint dir")
    ap.add_argument("--data", choices=["synthetic", "locomo"], default="synthetic")
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--locomo-path", default=str(Path(__file__).parent / "data" / "locomo10.json"))
    ap.add_argument("--worlds", type=positive_int, default=24, help="synthetic worlds in the split")
    ap.add_argument("--chunks", type=positive_int, default=None, help="chunks per session (default: the run's; else memr2.context_sizes: 2, LoCoMo 10, a pretrained model 6)")
    ap.add_argument("--convs", type=positive_int, default=None, help="evaluate only the first N conversations of the split")
    ap.add_argument("--sessions", type=positive_int, default=None,
                    help="keep the first N sessions of each conversation and the questions about them")
    ap.add_argument("--retriever", choices=RETRIEVERS, default=None,
                    help="memory retrieval (default: the run's, else bm25); the sizes are the run's, else the paper's "
                         "for a pretrained chat model and 2/6/4 for ours")
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
        # N and retrieval as the model's context decides, or as the run had them (args.json; its N only
        # where it read the same data), or as a flag says
        run, sizes = run_args(Path(args.path)), context_sizes(bool(ck["model"].cfg.chat_format), args.data)
        sizes |= {k: v for k, v in run.get("cfg", {}).items()
                  if k in ("retriever", *PRETRAINED) and (k != "chunks" or run.get("data", "synthetic") == args.data)}
        cfg = RLConfig(**sizes)
        cfg.chunks = args.chunks or cfg.chunks
        cfg.retriever = args.retriever or cfg.retriever
        if cfg.retriever == "minilm":
            packaged_minilm()  # not installed: one line now, not after reading the conversations
        if ck["model"].cfg.chat_format:  # a pretrained instruct model: room for its JSON
            cfg.max_new = dict(CHAT_MAX_NEW)
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
    if argv[:1] and argv[0] in jobs:
        return jobs[argv[0]](argv[1:])
    cli_evaluate(argv)


if __name__ == "__main__":
    import sys
    sys.stdout.reconfigure(errors="backslashreplace")  # a non-ASCII path on an ASCII terminal (stderr does this already)
    main()
