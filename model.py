"""Tokenizer, a small Llama-style Transformer, batched KV-cache sampling and pickle-free checkpoints."""
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


def save_tokenizer(tok: Tokenizer, path) -> None:
    tok.save(str(path))


def load_tokenizer(path) -> Tokenizer:
    path = str(path)
    if os.path.isdir(path):  # accept the checkpoint directory as well as the file itself
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # grouped-query attention when < n_head
    d_model: int = 128
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True


def rotate(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (B, 1, T, hd/2). Rotates the pairs (x[i], x[i + hd/2]).
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys/values of all layers for the slots seen so far; slots are columns of the (left-padded) batch."""

    def __init__(self, n_layer: int, max_len: int):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.max_len, self.length = max_len, 0

    def update(self, layer: int, k, v):
        # k, v: (B, Hkv, T, hd) for the new slots -> all filled slots (B, Hkv, length + T, hd)
        L, T = self.length, k.shape[2]
        if L + T > self.max_len:
            raise ValueError(f"KV cache overflow: {L + T} > {self.max_len} slots")
        if self.k[layer] is None:  # allocate lazily so the dtype follows autocast
            B, H, _, hd = k.shape
            self.k[layer] = k.new_empty(B, H, self.max_len, hd)
            self.v[layer] = v.new_empty(B, H, self.max_len, hd)
        self.k[layer][:, :, L:L + T] = k
        self.v[layer][:, :, L:L + T] = v
        return self.k[layer][:, :, :L + T], self.v[layer][:, :, :L + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head, self.hd = cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * self.hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * self.hd, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

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
        hidden = 64 * math.ceil(8 * cfg.d_model / 3 / 64)  # SwiGLU's usual 8/3 d, rounded up to a multiple of 64
        self.w_gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(cfg.d_model, eps=1e-6), Attention(cfg)
        self.mlp_norm, self.mlp = nn.RMSNorm(cfg.d_model, eps=1e-6), MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Rotary tables for every position; not persistent, since they are recomputed from the config.
        hd = cfg.d_model // cfg.n_head
        inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # (hd/2,)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)  # (max_seq_len, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.apply(self._init)
        for block in self.layers:  # GPT-2 style: shrink the residual-branch outputs with depth
            for w in (block.attn.wo.weight, block.mlp.w_down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

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
        for i, block in enumerate(self.layers):
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


def sample_next(logits, temperature: float, top_p: float, generator=None):
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p (at least 1 token).
    p_sorted, order = probs.sort(-1, descending=True)
    p_sorted[p_sorted.cumsum(-1) - p_sorted >= top_p] = 0.0
    choice = torch.multinomial(p_sorted, 1, generator=generator)  # multinomial renormalises
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_id: int | None = EOS_ID, generator: torch.Generator | None = None,
             ) -> tuple[list[list[int]], list[bool]]:
    """Sample continuations for prompts of different lengths -> (new ids per row, finished-with-EOS per row).

    A finished row's ids end with eos_id. eos_id=None never stops early. A row gets at most
    max_seq_len - len(prompt) new tokens; running out of room counts as unfinished.
    """
    out, finished = [[] for _ in prompts], [False] * len(prompts)
    cfg, device = model.cfg, next(model.parameters()).device
    caps = [min(max_new_tokens, cfg.max_seq_len - len(p)) for p in prompts]
    rows = [i for i, c in enumerate(caps) if c > 0]
    if not rows:
        return out, finished
    if any(len(prompts[i]) == 0 for i in rows):
        raise ValueError("generate: empty prompt (start prompts with BOS)")
    was_training = model.training
    model.eval()
    try:
        idx, pos, mask = left_pad([prompts[i] for i in rows], device)  # (B, L)
        B, L = idx.shape
        steps = max(caps[i] for i in rows)
        cap = torch.tensor([caps[i] for i in rows], device=device)  # (B,)
        # Every generated slot is a real token, so the mask can be extended to its final width up front.
        mask = torch.cat([mask, mask.new_ones(B, steps)], dim=1)  # (B, L + steps)
        next_pos = pos[:, -1] + 1  # (B,) position of each row's first new token
        cache = KVCache(cfg.n_layer, L + steps)
        logits = model.lm_head(model.hidden_states(idx, pos, mask[:, :L], cache)[:, -1])  # (B, V)
        tokens = torch.zeros(B, steps, dtype=torch.long, device=device)
        n_new = torch.zeros(B, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        eos = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(steps):
            nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
            tokens[:, t] = nxt
            n_new += (~done).long()
            if eos_id is not None:
                eos |= (nxt == eos_id) & ~done
            done |= eos | (n_new >= cap)
            if t == steps - 1 or bool(done.all()):
                break
            # Finished rows keep decoding junk (cheaper than shrinking the batch); clamp so positions stay in range.
            p = (next_pos + t).clamp(max=cfg.max_seq_len - 1)[:, None]  # (B, 1)
            logits = model.lm_head(model.hidden_states(nxt[:, None], p, mask[:, :L + t + 1], cache)[:, -1])
        for j, (row, n, e) in enumerate(zip(rows, n_new.tolist(), eos.tolist())):
            out[row], finished[row] = tokens[j, :n].tolist(), e
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
    head, name = os.path.split(path)
    if os.path.isdir(head or "."):
        remove_stale(head or ".", name)  # what an interrupted save left, e.g. our own tmp name
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        save_file(sd, os.path.join(tmp, "model.safetensors"))
        _write_json(os.path.join(tmp, "config.json"), asdict(model.cfg))
        _write_json(os.path.join(tmp, "meta.json"), meta)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        if optimizer is not None:
            save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
            _write_json(os.path.join(tmp, "optimizer.json"), {"scalars": scalars, "param_groups": osd["param_groups"]})
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      os.path.join(tmp, "tensors.safetensors"))
        for f in os.listdir(tmp):  # on disk before anything points at them
            _fsync(os.path.join(tmp, f))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(path, tmp)


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
    opt_tensors = load("optimizer.safetensors", load_file, optional=True)
    opt_json = load("optimizer.json", _read_json, optional=True)
    optimizer_state = None
    if opt_tensors is not None or opt_json is not None:
        if opt_tensors is None or opt_json is None:
            raise CheckpointError(f"checkpoint {path}: optimizer.safetensors and optimizer.json must come together")
        try:
            state = {}
            for key, v in opt_tensors.items():
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
            for i, d in opt_json["scalars"].items():
                state.setdefault(int(i), {}).update(d)
            # JSON turned tuples (AdamW's betas) into lists; only "params" is a real list.
            groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
                      for g in opt_json["param_groups"]]
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: bad optimizer state ({one_line(e)})") from e
        optimizer_state = {"state": state, "param_groups": groups}
    tensors = load("tensors.safetensors", load_file, optional=True) or {}
    return {"model": model.to(device), "tok": tok, "meta": meta, "optimizer_state": optimizer_state,
            "tensors": tensors}


def _read_json(f):
    with open(f) as fh:
        return json.load(fh)


def one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
