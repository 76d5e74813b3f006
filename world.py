"""The data the agent reads: LoCoMo (Maharana et al. 2024) loaded and split as the paper splits
it, and a synthetic world whose right memory is known, with its exact reader, the SFT teachers,
the scripted managers of the reward's sensitivity check, and the scoring of decisions against the
teacher.

The loader turns one LoCoMo-schema sample into plain dataclasses and repairs the file's known
quirks in one place, so nothing downstream ever sees raw JSON. The synthetic world writes the
same schema, so one parser reads both.
"""
import copy
import datetime
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from checkpoint import json_loads
from memory import QA, Conversation, MemoryBank, Session, Turn, encodable, retrieve_for_facts, short_date
from memr2 import AnswerAgent, RLConfig, chunk_turns

# =============================================================================
# LoCoMo data loading
# =============================================================================

# The integers do NOT follow the paper's listing order, and mem0-derived papers
# name them differently; store the integer everywhere and map names only here.
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL = 5

# Official split of the Memory-R1 code. conv-47 is in no part, on purpose.
LOCOMO_PATH = str(Path(__file__).parent / "data" / "locomo10.json")  # the released file, shipped with its licence

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
    # The images are not released: an image turn shows its BLIP caption after its text (without
    # BLIP's own "a photo of", so it does not read "a photo of a photo of").
    cap = f" [shares a photo of {BLIP_PREFIX.sub('', raw['blip_caption'])}]" if raw.get("blip_caption") else ""
    return Turn(speaker=raw["speaker"], dia_id=raw["dia_id"], text=raw["text"], caption=cap)


def _clean_evidence(raw: list[str], known: set[str], dropped: dict) -> tuple[list[str], list[str]]:
    """Split, parse and normalise evidence strings; keep only ids of real turns. -> (the ids, the
    first id of each string that yields one: the official loader reads only that one)."""
    out, firsts = [], []
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
        firsts += ids[:1]
    return out, firsts


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
        evidence, firsts = _clean_evidence(q["evidence"], known, dropped)
        if not evidence and drop_empty_evidence:
            dropped["empty_evidence"] += 1
            continue
        qa.append(QA(
            question=q["question"],
            answer=str(q.get("answer", "")),  # some answers are ints (2022); kept cat-5 may lack one
            evidence=evidence,
            category=int(q["category"]),
            sessions=sorted({int(DIA_ID.fullmatch(e)[1]) for e in evidence}),
            placed=max((int(DIA_ID.fullmatch(e)[1]) for e in firsts), default=0),
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
            data = json_loads(f.read())
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
            yield q["category"] not in CATEGORIES, (f"qa[{j}].category must be one of LoCoMo's "
                                                    f"{', '.join(map(str, CATEGORIES))}, got {q['category']}")
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
    proven false -> DELETE its entry; what memory already holds -> NOOP; anything else -> INSERT,
    a correction whose entry is not shown included (the official decision order: no matching
    entry -> INSERT; a stored correction still tells the reader the claim is false)."""
    insert = {"op": "INSERT", "content": fact["fact"], "speaker": fact["speaker"], "dia_id": fact["dia_id"]}
    f = read_fact(fact["fact"])
    if f is None:
        return insert
    how, attr, _, v, _ = f
    if any(e.content == fact["fact"] for e in shown):
        return {"op": "NOOP"}
    if how == "never":
        hit = _entry_of(f, shown, v)
        return {"op": "DELETE", "memory_id": hit.memory_id} if hit else insert
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



# ============================================================================ splits
def synthetic_split(sizes: dict, n_sessions: int = 32) -> dict:
    """split -> (samples, conversations) of synthetic worlds from disjoint, fixed seed ranges:
    train, val and test never share a world, tuning on val never sees a test seed, and every
    training seed of an experiment is measured on the same test worlds (paired comparisons)."""
    offsets, out = {"train": 100_000, "val": 150_000, "test": 190_000}, {}
    for k, n in sizes.items():
        samples = [make_world(offsets[k] + i, n_sessions) for i in range(n)]
        out[k] = (samples, [parse_conversation(s) for s in samples])
    return out
