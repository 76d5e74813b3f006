"""The memory bank: the environment the agent writes (paper Sec. 3: memory, retrieval, bloat penalty),
and the dialogue it reads (Turn, Session, QA, Conversation).

A bank is a plain dict memory_id -> Entry. The model never touches it directly: it emits
JSON, `parse_facts` / `parse_operations` read that JSON without ever raising, and
`MemoryBank.apply` executes the operations, rejecting (and counting) the bad ones.
Retrieval, chosen per bank: "bm25", a lexical scorer that needs no model, or "minilm", the
paper's kind (cosine similarity of sentence embeddings) with a local encoder,
all-MiniLM-L6-v2, instead of its hosted one. Both are deterministic: the same memory always
retrieves the same entries, which keeps rollouts reproducible.
"""
import copy
import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch


# ----------------------------------------------------------------------------- the dialogue
# What the agent reads, session by session. eval.py fills these from LoCoMo or from the
# synthetic world; memr2.py only reads them, so they live here, left of the algorithm.
@dataclass
class Turn:
    speaker: str
    dia_id: str  # "D<session>:<turn>"
    text: str  # what was said: the dialogue length T counts it (as the official code counts `text`)
    caption: str = ""  # an image turn's " [shares a photo of ...]": prompts show it after the text, T leaves it out


@dataclass
class Session:
    index: int  # the n of session_<n>
    date: str  # raw date string; parse_date / short_date interpret it
    turns: list[Turn]


@dataclass
class QA:
    question: str
    answer: str
    evidence: list[str]  # cleaned dia_ids, each one a real turn of this conversation
    category: int
    sessions: list[int]  # sorted distinct session indices of the evidence
    placed: int = 0  # the session that puts it in the reward pool: a stage of S sessions asks it if placed <= S.
    # The official loader's: the latest evidence string's FIRST id ("D8:6; D9:17" reads as D8:6); 0: max(sessions)


@dataclass
class Conversation:
    sample_id: str
    speakers: tuple[str, str]
    sessions: list[Session]  # sorted by session index
    qa: list[QA]
    dropped: dict  # what cleaning dropped or repaired, for reporting


# ----------------------------------------------------------------------------- the bank
# The paper's prompts ask for facts of at most 20 words; an UPDATE merges a state's earlier
# claims into its entry (memory is monotonic), so an entry may need more. 40 words hold every
# merged entry of the synthetic world (its longest is measured in a test) and still stop a
# policy that runs on.
MAX_CONTENT_WORDS = 40
OPS = ("INSERT", "UPDATE", "DELETE", "NOOP")


@dataclass
class Entry:
    memory_id: str
    speaker: str  # whom the fact is about
    content: str
    session: int  # index of the session that last wrote it (recency, for ranking)
    session_time: str  # the date of the session that FIRST wrote it, shown to the answer agent;
    # an UPDATE keeps it, as the official memory does, so a date a question needs belongs in the content
    dia_ids: list = field(default_factory=list)  # source turns, for M-Fail
    first_session: int = 0  # index of the session that FIRST wrote it (the official session_id); 0: `session`

    def __post_init__(self):
        self.first_session = self.first_session or self.session


class MemoryBank:
    """A dict of entries plus an id counter. Ids are "m1", "m2", ...: short (cheap for a
    tiny model to copy) and deterministic (same ops -> same bank)."""

    def __init__(self, retriever: str = "bm25"):
        if retriever not in RETRIEVERS:
            raise ValueError(f"unknown retriever {retriever!r} (use {' or '.join(RETRIEVERS)})")
        self.entries: dict[str, Entry] = {}
        self.next_id = 1
        self.retriever = retriever
        # content -> unit vector (D,) of "minilm" retrieval, filled by `entry_vectors`, so `apply`
        # never embeds: an UPDATE's new content is embedded once, at the next retrieval.
        self.vecs: dict[str, torch.Tensor] = {}

    def snapshot(self) -> "MemoryBank":
        # A deepcopy, embeddings included: a local branch restores this and its writes never reach the parent.
        return copy.deepcopy(self)

    def apply(self, ops: list, session: int, session_time: str) -> Counter:
        """Execute ops in order, each on the bank the earlier ones left (as the official manager
        does: two ops on one id both apply, an UPDATE after a DELETE finds no id). Returns counts
        of applied ops by kind and of rejected ones as "rejected_<reason>". A rejected op changes nothing."""
        counts = Counter()
        for op in ops:
            counts[self._apply_one(op, session, session_time)] += 1
        return counts

    def _apply_one(self, op, session, session_time) -> str:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            return "rejected_unknown_op"
        kind = op["op"].upper()
        if kind not in OPS:
            return "rejected_unknown_op"
        if kind == "NOOP":
            return "NOOP"
        # The official manager rejects an INSERT or UPDATE without a source turn, after taking the
        # first of a list or of "D1:2, D1:3"; a DELETE needs none.
        dia_id = op.get("dia_id")
        if isinstance(dia_id, list):
            dia_id = dia_id[0] if dia_id else None
        if isinstance(dia_id, str) and "," in dia_id:
            dia_id = dia_id.split(",")[0].strip()
        no_source = not isinstance(dia_id, str) or not dia_id
        dia_ids = [] if no_source else [dia_id]
        if kind == "INSERT":
            speaker, bad = op.get("speaker"), _content_problem(op.get("content"))
            if not isinstance(speaker, str) or not speaker.strip():
                return "rejected_bad_fields"
            if bad or no_source:
                return bad or "rejected_no_dia_id"
            same = next((e for e in self.entries.values()
                         if e.speaker == speaker.strip() and e.content == op["content"].strip()), None)
            if same:  # an exact duplicate merges into the stored entry (official memory): new source, same date
                same.session = session
                same.dia_ids += [d for d in dia_ids if d not in same.dia_ids]
                return "INSERT"
            mid = f"m{self.next_id}"
            self.next_id += 1
            self.entries[mid] = Entry(mid, speaker.strip(), op["content"].strip(), session, session_time, dia_ids)
            return "INSERT"
        # UPDATE and DELETE address an existing entry by id.
        mid = op.get("memory_id")
        if not isinstance(mid, str) or mid not in self.entries:
            return "rejected_unknown_id"
        if kind == "UPDATE":
            bad = _content_problem(op.get("content"))
            if bad or no_source:
                return bad or "rejected_no_dia_id"
            e = self.entries[mid]
            e.content, e.session = op["content"].strip(), session  # the first date stays
            e.dia_ids = e.dia_ids + [d for d in dia_ids if d not in e.dia_ids]  # keep old sources
        else:
            del self.entries[mid]
        return kind

    def num_tokens(self, count) -> int:
        """Memory size in tokens of the contents, with `count(str) -> int` the same counter that
        counts the dialogue (the official code counts both in words, regex \\b\\w+\\b; here the
        model's tokenizer)."""
        return sum(count(e.content) for e in self.entries.values())

    def dia_ids(self) -> set:
        """Union of the source turns still stored: evidence outside it is an M-Fail."""
        return {d for e in self.entries.values() for d in e.dia_ids}


def short_date(date: str) -> str:
    """LoCoMo session date "1:56 pm on 8 May, 2023" -> "8 May 2023", the form answers use."""
    return date.split(" on ")[-1].replace(",", "").strip()


def _content_problem(content) -> str:
    if not isinstance(content, str) or not content.strip():
        return "rejected_empty_content"
    if len(content.split()) > MAX_CONTENT_WORDS:
        return "rejected_too_long"
    return ""


# ----------------------------------------------------------------------------- parsing
def _load_list(text, key):
    """json text -> (list under `key`, reason or ""). Never raises on model output."""
    try:
        obj = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return [], "invalid_json"
    if not encodable(obj):
        return [], "unencodable_text"
    if not isinstance(obj, dict) or key not in obj:
        return [], f"no_{key}_key"
    items = obj[key]
    if not isinstance(items, list):
        return [], f"{key}_not_a_list"
    return items, ""


def encodable(obj) -> bool:
    """False when a string in the parsed JSON is not valid Unicode text: a "\\ud800" escape
    decodes to a lone surrogate, which the tokenizer cannot encode, so one such fact in the
    memory would crash every later prompt that shows it."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_facts(text: str) -> tuple[list, str]:
    """Extractor output {"facts":[{"speaker","dia_id","fact"}]} -> (facts, reason).
    Items with missing or non-string fields are dropped; the reason says so."""
    items, reason = _load_list(text, "facts")
    keys = ("speaker", "dia_id", "fact")
    facts = [{k: f[k].strip() for k in keys} for f in items
             if isinstance(f, dict) and all(isinstance(f.get(k), str) and f[k].strip() for k in keys)]
    if len(facts) < len(items):
        reason = reason or "bad_fact_items"
    return facts, reason


def parse_operations(text: str) -> tuple[list, str]:
    """Manager output {"operations":[...]} -> (ops, reason). Field checks happen in
    `MemoryBank.apply`, which rejects and counts bad ops one by one."""
    items, reason = _load_list(text, "operations")
    ops = [o for o in items if isinstance(o, dict)]
    if len(ops) < len(items):
        reason = reason or "bad_op_items"
    return ops, reason


# ----------------------------------------------------------------------------- retrieval
_STOP = set("a an the is are was were be been do does did to of in on at for and or with what "
            "when where who which how that this it its s has have had".split())


@functools.lru_cache(maxsize=1 << 16)
def terms(text: str) -> tuple:
    """Lower-case word tokens minus stop words, with a crude plural/verb 's' strip so that
    'lives' matches 'live', 'pets' matches 'pet' and 'hobbies' matches 'hobby'. Cached: the
    same entries are scored against every fact and question of a rollout."""
    out = []
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if w in _STOP:
            continue
        if len(w) > 4 and w.endswith("ies"):
            w = w[:-3] + "y"
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return tuple(out)


@functools.lru_cache(maxsize=1 << 16)
def _counts(text: str) -> Counter:  # a document's term counts (read only)
    return Counter(terms(text))


def bm25(query: str, docs: list, k1=1.2, b=0.75) -> list:
    """BM25 score of each doc string against the query; deterministic, no model."""
    tfs = [_counts(d) for d in docs]
    if not tfs:
        return []
    lens = [sum(tf.values()) for tf in tfs]
    avg = sum(lens) / len(lens) or 1.0
    df = Counter(w for tf in tfs for w in tf)
    n = len(tfs)
    q = dict.fromkeys(terms(query))  # distinct, in a fixed order (a set's order changes with the hash seed)
    scores = []
    for tf, L in zip(tfs, lens):
        s = 0.0
        for w in q:
            if w in tf:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                s += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * L / avg))
        # rounded: equal matches summed in another order differ in the last bit, and must tie
        # (a tie goes to the newest entry; the last bit would pick one by the term order)
        scores.append(round(s, 9))
    return scores


RETRIEVERS = ("bm25", "minilm")
MIN_COSINE = 0.1  # "minilm": the official code's similarity floor


@functools.cache
def minilm():
    """(encoder, tokenizer), loaded once per process on first use. The encoder's code (checkpoint.py)
    is imported here too: a "bm25" run never reads the weights, and BM25 needs no other file."""
    from checkpoint import load_minilm
    return load_minilm()


def embed_texts(texts: list) -> torch.Tensor:
    """(N, D) unit vectors of texts under all-MiniLM-L6-v2."""
    from checkpoint import embed
    return embed(*minilm(), texts)


@functools.lru_cache(maxsize=1 << 14)
def query_vector(text: str) -> torch.Tensor:
    """Unit vector (D,) of a fact or question: the same ones come back across rollouts and steps."""
    return embed_texts([text])[0]


def entry_vectors(bank: MemoryBank) -> torch.Tensor:
    """(N, D) unit vectors of the entries' contents, in entry order. Each distinct content is embedded
    once, in one batch with the other new ones, and kept in bank.vecs; contents no longer stored are
    dropped, so the cache stays the size of the bank and a snapshot copies only what it needs."""
    contents = [e.content for e in bank.entries.values()]
    new = [c for c in dict.fromkeys(contents) if c not in bank.vecs]
    if new:
        bank.vecs.update((c, v.clone()) for c, v in zip(new, embed_texts(new)))  # clone: a row, not the batch
    if len(bank.vecs) > len(contents):
        bank.vecs = {c: bank.vecs[c] for c in contents}
    return torch.stack([bank.vecs[c] for c in contents]) if contents else torch.empty(0, 0)


def scored(bank: MemoryBank, query: str) -> list:
    """[(entry, score)] of the entries that match `query`, best first: BM25 score > 0, or cosine >=
    MIN_COSINE. One score for the whole bank: BM25's statistics (idf, average length) come from ALL
    entries, so scores of two speakers' entries are comparable. Ties go to the newest entry (latest
    session, then latest written), so a stale duplicate never hides the current one."""
    ents = list(bank.entries.values())  # dict order = write order; UPDATE keeps the position
    if not ents:
        return []
    if bank.retriever == "bm25":
        scores, keep = bm25(query, [e.content for e in ents]), lambda s: s > 0
    else:
        scores, keep = (entry_vectors(bank) @ query_vector(query)).tolist(), lambda s: s >= MIN_COSINE
    order = sorted(range(len(ents)), key=lambda i: (-scores[i], -ents[i].session, -i))
    return [(ents[i], scores[i]) for i in order if keep(scores[i])]


def rank(bank: MemoryBank, query: str) -> list:
    """The entries that match `query`, best first (`scored` without the scores)."""
    return [e for e, _ in scored(bank, query)]


def retrieve_for_facts(bank: MemoryBank, facts: list, per_fact: int, cap: int) -> list:
    """Manager retrieval (paper Sec. 3; official sizes 5 and 25), the official rule: per fact the
    top `per_fact` memories of the same speaker; each memory once, with its best score over the
    facts; the `cap` best kept, best first (equal scores in the order the facts found them)."""
    best = {}  # memory_id -> (entry, best score); insertion order = the order the facts found them
    for f in facts:
        same = [(e, s) for e, s in scored(bank, f["fact"]) if e.speaker == f["speaker"]]
        for e, s in same[:per_fact]:
            if e.memory_id not in best or s > best[e.memory_id][1]:
                best[e.memory_id] = (e, s)  # a key set again keeps its place
    return [e for e, _ in sorted(best.values(), key=lambda es: -es[1])[:cap]]


def retrieve_for_question(bank: MemoryBank, question: str, per_speaker: int, by_session: bool = False) -> list:
    """Answer-agent retrieval (paper Sec. 3; official size 30): the top `per_speaker` memories of
    each speaker, in the order of one score over the whole bank (best first: easier for a tiny
    learned reader, and with BM25 the asked speaker's entries share the question's name, so they
    come first), or with `by_session` in the official code's order, for an LLM reader: by the
    session that first wrote the entry, then score, then the oldest written first."""
    kept, out = Counter(), []
    for e, s in scored(bank, question):
        if kept[e.speaker] < per_speaker:
            kept[e.speaker] += 1
            out.append((e, s))
    if by_session:
        written = {mid: i for i, mid in enumerate(bank.entries)}
        out.sort(key=lambda es: (es[0].first_session, -es[1], written[es[0].memory_id]))
    return [e for e, _ in out]


# ----------------------------------------------------------------------------- bloat cost
def bloat_cost(memory_tokens: int, dialogue_tokens: int, phi: float) -> float:
    """c(M, T_t) = max(0, tok(M) - phi*T_t) / T_t (paper Eq. for the compression penalty): memory up to phi of the
    dialogue read so far is free, beyond that the cost grows linearly."""
    if dialogue_tokens <= 0:
        return 0.0
    return max(0.0, memory_tokens - phi * dialogue_tokens) / dialogue_tokens
