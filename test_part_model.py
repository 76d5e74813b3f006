"""Tests for model.py: KV-cache sampling, padding/positions, tokenizer and checkpoints. Tiny models only."""
import json
import os

import pytest
import torch

from model import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, CheckpointError, ModelConfig, Transformer, decode,
                   encode, generate, left_pad, load_checkpoint, load_tokenizer, save_checkpoint, save_tokenizer,
                   train_tokenizer)

TINY = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48)


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
    prompts = prompts_of_lengths([3, 9, 1, 6, 12])
    out, finished = generate(model, prompts, 20, temperature=0, eos_id=None)
    refs = [greedy_by_recompute(model, p, 20) for p in prompts]
    assert out == refs
    assert finished == [False] * len(prompts)
    assert len({tuple(r) for r in refs}) == len(refs)  # the rows really differ
    assert all(len(set(r)) > 3 for r in refs)  # and are not a single repeated token


def test_row_stops_at_eos_and_keeps_it(model):
    prompts = prompts_of_lengths([3, 9, 6])
    free, _ = generate(model, prompts, 15, temperature=0, eos_id=None)
    eos = free[1][4]  # make row 1 stop at its 5th greedy token
    out, finished = generate(model, prompts, 15, temperature=0, eos_id=eos)
    for row, ref_full in enumerate(free):
        ref = ref_full[:ref_full.index(eos) + 1] if eos in ref_full else ref_full
        assert out[row] == ref == greedy_by_recompute(model, prompts[row], 15, eos_id=eos)
        assert finished[row] == (eos in ref_full)
    assert finished[1] and out[1][-1] == eos and len(out[1]) <= 5


def test_left_padded_logits_equal_prompt_alone(model):
    prompts = prompts_of_lengths([4, 11, 7])
    idx, pos, mask = left_pad(prompts, "cpu")
    batched = model(idx, pos=pos, attn_mask=mask)  # (B, L, V)
    for row, p in enumerate(prompts):
        alone = model(torch.tensor([p]))[0]  # (len, V)
        torch.testing.assert_close(batched[row, -len(p):], alone, atol=1e-5, rtol=0)
    assert pos[0].tolist() == [0] * 7 + [0, 1, 2, 3]  # positions restart at each row's first real token


def test_sampling_reproducible_with_generator_seed(model):
    prompts = prompts_of_lengths([3, 8])

    def run(seed, **kw):
        return generate(model, prompts, 12, temperature=1.0, eos_id=None,
                        generator=torch.Generator().manual_seed(seed), **kw)[0]

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(5, top_p=0.9) == run(5, top_p=0.9)


def test_temperature_zero_is_argmax_and_full_softmax_sampling_matches_probs():
    from model import sample_next
    torch.manual_seed(0)
    logits = torch.randn(3, 5) * 2
    assert sample_next(logits, 0.0, 1.0).tolist() == logits.argmax(-1).tolist()
    row = logits[:1].expand(20000, 5)  # many draws from the same distribution
    draws = sample_next(row, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.02, rtol=0)
    # tiny top_p keeps only the most likely token
    assert (sample_next(row[:100], 1.0, 1e-6, torch.Generator().manual_seed(0)) == logits[0].argmax()).all()


def test_context_overflow_caps_new_tokens(model):
    full = prompts_of_lengths([48])[0]  # == max_seq_len
    near = prompts_of_lengths([45])[0]
    out, finished = generate(model, [full, near, [BOS_ID]], 10, temperature=0, eos_id=None)
    assert out[0] == [] and finished[0] is False
    assert len(out[1]) == 3 and finished[1] is False
    assert len(out[2]) == 10
    assert generate(model, [], 5) == ([], [])


def test_generate_restores_training_mode(model):
    model.train()
    generate(model, [[BOS_ID, 9]], 2)
    assert model.training


@pytest.fixture(scope="module")
def tok():
    texts = ["the cat sat on the mat", "Memory agents ADD, UPDATE, DELETE facts.", "naïve café — 東京 🚀"] * 5
    return train_tokenizer(texts, vocab_size=300)


def test_tokenizer_round_trip_and_special_ids(tok, tmp_path):
    for text in ["the cat sat", "naïve café — 東京 🚀", "unseen ✓ ß text\n\twith  spaces ", ""]:
        assert decode(tok, encode(tok, text)) == text
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(7))
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert encode(tok, "<bos>hi<eos>")[0] == BOS_ID and encode(tok, "<bos>hi<eos>")[-1] == EOS_ID
    assert decode(tok, [BOS_ID] + encode(tok, "hi") + [EOS_ID]) == "hi"
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert encode(load_tokenizer(tmp_path / "tokenizer.json"), "naïve 🚀") == encode(tok, "naïve 🚀")


def test_checkpoint_round_trip_logits_optimizer_and_tensors(tok, tmp_path):
    model = varied_model()
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
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tie survives the round trip
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
    save_checkpoint(tmp_path / "c", Transformer(TINY), tok, {})
    ck = load_checkpoint(tmp_path / "c")
    assert ck["optimizer_state"] is None and ck["tensors"] == {}


def test_corrupt_or_missing_checkpoint_raises_checkpoint_error(tok, tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "nope")
    path = tmp_path / "ckpt"
    save_checkpoint(path, Transformer(TINY), tok, {"step": 1})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    save_checkpoint(path, Transformer(TINY), tok, {"step": 1})
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(path)
    save_checkpoint(path, Transformer(TINY), tok, {"step": 1})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, d_model=64)))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)
    os.remove(path / "meta.json")
    with pytest.raises(CheckpointError, match="missing meta.json"):
        load_checkpoint(path)


def test_atomic_save_replaces_existing_and_leaves_no_temp_dirs(tok, tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, Transformer(TINY), tok, {"step": 1})
    save_checkpoint(path, Transformer(TINY), tok, {"step": 2})
    assert load_checkpoint(path)["meta"] == {"step": 2}
    assert os.listdir(tmp_path) == ["ckpt"]
