"""Tokenizer, a small Llama-style Transformer, and batched KV-cache sampling. Checkpoints,
Hugging Face and GGUF models, chat formats and the MiniLM sentence encoder are in checkpoint.py."""
import contextlib
import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.fsdp import FSDPModule
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


class Roles(nn.Module):
    """Separate weights for the two trained roles (the paper's separated-parameters ablation):
    `ext` writes facts, `mgr` operations; both start as copies of one model. A call picks its part
    with `for_role`; the parts' state dicts are prefixed "ext." and "mgr.", so a checkpoint holds both."""
    def __init__(self, ext: Transformer, mgr: Transformer):
        super().__init__()
        self.ext, self.mgr = ext, mgr
        self.cfg = ext.cfg

    @classmethod
    def of(cls, model: Transformer) -> "Roles":
        return cls(copy.deepcopy(model), copy.deepcopy(model))


def for_role(model, role: str):
    """The weights a call of `role` runs on: the model itself, or a Roles' part ("mgr" the manager's;
    "ext" and any other role the extractor's)."""
    return (model.mgr if role == "mgr" else model.ext) if isinstance(model, Roles) else model


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
    Greedy decoding (temperature 0) with draft > 0 guesses ahead (`decode_with_guesses`); otherwise one
    token a step (`decode_one_by_one`).
    """
    out, finished = [[] for _ in prompts], [False] * len(prompts)
    cfg, device = model.cfg, next(model.parameters()).device
    eos_id = cfg.eos_id if eos_id == -1 else eos_id
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
        next_pos = pos[:, -1] + P + 1  # (B,) position of each row's first new token
        if temperature == 0 and draft:
            ctx = [list(prefix) + prompts[i] for i in rows]  # what a row's guesses are looked up in
            new = decode_with_guesses(model, cache, mask, logits, next_pos, caps, eos_id, ctx, draft)
        else:
            new = decode_one_by_one(model, cache, mask, logits, next_pos, caps, eos_id, temperature, generator)
        for j, row in enumerate(rows):
            out[row], finished[row] = new[j], new[j][-1] == eos_id
    finally:
        model.train(was_training)
    return out, finished


def _feed(model, cache, tokens: list, mask, pos):
    """tokens (B, 1 + D) into the cache at positions pos -> their logits (B, 1 + D, V). Finished
    rows feed junk (cheaper than shrinking the batch); positions are clamped to stay in range."""
    feed = torch.tensor(tokens, device=mask.device)
    return model.lm_head(model.hidden_states(feed, pos.clamp(max=model.cfg.max_seq_len - 1), mask, cache))


def decode_one_by_one(model, cache, mask, logits, next_pos, caps: list, eos_id, temperature: float, generator) -> list:
    """The plain loop: each step samples (argmax at temperature 0) every row's next token from
    logits (B, 1, V) and feeds it. -> the new ids per row, at most caps[j] of them."""
    B = len(caps)
    new, done = [[] for _ in range(B)], [False] * B
    while True:
        pick = sample_next(logits[:, 0], temperature, generator).tolist()
        for j in range(B):
            if not done[j]:
                new[j].append(pick[j])
                done[j] = pick[j] == eos_id or len(new[j]) >= caps[j]
        if all(done):
            return new
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = _feed(model, cache, [[r[-1]] for r in new], mask, next_pos[:, None])  # (B, 1, V)
        next_pos = next_pos + 1


def decode_with_guesses(model, cache, mask, logits, next_pos, caps: list, eos_id, ctx: list, draft: int) -> list:
    """Greedy decoding that feeds each row's newest token with up to `draft` guesses at the tokens
    after it, GUESSES_PER_PASS over the batch (`lookup_draft`: the roles copy facts and memories from
    their prompts), and keeps the guesses the row's own argmax agrees with: the token-by-token greedy
    output in fewer forward passes. A rejected guess's slot stays in the cache, masked out like a pad,
    unless every row rejected it. ctx: each row's prefix + prompt, extended here. -> new ids per row."""
    B, start = len(caps), [len(c) for c in ctx]
    new, done, guess, D, fed_any = [[] for _ in range(B)], [False] * B, [[] for _ in range(B)], 0, False
    index = [{} for _ in range(B)]
    while True:
        # logits[:, i] follows the i-th token fed: a row keeps its guesses up to the first one its
        # argmax disagrees with, then takes the argmax there.
        pick, kept = logits.argmax(-1).tolist(), []
        for j in range(B):
            n = next((i for i, g in enumerate(guess[j]) if g != pick[j][i]), len(guess[j]))
            kept.append(n)
            if n < len(guess[j]):  # the rejected guesses' slots
                mask[j, mask.shape[1] - D + n:mask.shape[1] - D + len(guess[j])] = False
            for t in ([] if done[j] else guess[j][:n] + [pick[j][n]]):
                new[j].append(t)
                done[j] = t == eos_id or len(new[j]) >= caps[j]
                if done[j]:
                    break
        if all(done):
            return new
        if fed_any:  # the newest token follows the one fed before it and the guesses kept
            next_pos = next_pos + 1 + torch.tensor(kept, device=mask.device)
            dead = D - max(kept)  # the last guesses, rejected by every row: their slots are dropped
            cache.length -= dead
            mask = mask[:, :mask.shape[1] - dead]
        k = min(draft, GUESSES_PER_PASS // (B - sum(done)))
        for j in range(B):
            ctx[j] += new[j][len(ctx[j]) - start[j]:]
            room = caps[j] - len(new[j]) - 1  # a step adds its kept guesses and one more token
            guess[j] = [] if done[j] or not k else lookup_draft(ctx[j], index[j], min(k, room))
        # Feed each row's newest token (not yet in the cache) and its guesses at what follows it.
        D = max(map(len, guess))
        fed = torch.tensor([[True] * (1 + len(g)) + [False] * (D - len(g)) for g in guess], device=mask.device) if D else \
            mask.new_ones(B, 1)  # (B, 1 + D): which fed slots hold real tokens
        mask = torch.cat([mask, fed], dim=1)
        tokens = [[r[-1]] + g + [0] * (D - len(g)) for r, g in zip(new, guess)]
        logits = _feed(model, cache, tokens, mask, next_pos[:, None] + torch.arange(1 + D, device=mask.device))
        fed_any = True
