"""`python train.py`: the whole Memory-R2 method on a 2-core CPU in minutes.

1. data: synthetic train/val/test worlds (or LoCoMo), a BPE tokenizer, a ~1M-param model;
2. SFT warm start on the teacher's traces (extractor, manager, answerer roles);
3. LoGo-GRPO over a session curriculum (8 -> 16 -> 32), validating before training and
   every few steps; the best-validation checkpoint of a stage starts the next;
4. test evaluation of the SFT model (the base pipeline), the trained model and the oracle
   memory, written to runs/<name>/report.md, with every step in metrics.jsonl.
`--preset gpu` scales the model and the groups up for one GPU; `--resume runs/<name>`
continues an interrupted run from its last checkpoint.
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm import tqdm

import eval as E
from memr2 import (CHAT_MAX_NEW, AnswerAgent, Cell, RLConfig, answer_prompt, cell_logprobs, extractor_prompt, facts_target,
                   logo_step, manager_prompt, ops_target)
from memory import retrieve_for_question
from model import (EOS_ID, CheckpointError, ModelConfig, Transformer, autocast, encode, is_hf_dir, load_checkpoint,
                   pick_device, save_checkpoint, train_tokenizer)

PRESETS = {  # model size, SFT budget and group sizes; RL knobs not listed keep RLConfig's defaults
    "tiny": dict(d_model=128, n_layer=4, n_head=4, vocab=1024, sft_steps=2500, sft_batch=32, n=4, K=4,
                 train_worlds=800, val_worlds=2, test_worlds=4, steps="10,5,5"),
    "gpu": dict(d_model=384, n_layer=8, n_head=6, vocab=2048, sft_steps=8000, sft_batch=64, n=16, K=4,
                train_worlds=2000, val_worlds=4, test_worlds=16, steps="10,5,5"),
}


class UserError(Exception):
    """A mistake in flags or files: reported as one line, never a traceback."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--algo", choices=["logo", "grpo", "local"], default="logo")
    ap.add_argument("--stages", default="8,16,32", help="session caps of the curriculum; '32' trains directly")
    ap.add_argument("--steps-per-stage", default=None, help="RL steps per stage, e.g. 10,5,5 (preset default)")
    ap.add_argument("--val-every", type=int, default=5, help="validate every this many RL steps")
    for name in ("n", "K", "chunks", "ppo_epochs"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("p", "lam", "phi", "lr"):
        ap.add_argument("--" + name, type=float, default=None)
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--teacher-noise", type=float, default=0.6,
                    help="rate of wrong/missing teacher ops in SFT data: above 0.5 the SFT model's greedy choice is wrong too")
    ap.add_argument("--sessions", type=int, default=32, help="sessions per synthetic conversation")
    ap.add_argument("--data", choices=["synthetic", "locomo"], default="synthetic")
    ap.add_argument("--locomo-path", default=str(Path(__file__).parent / "data" / "locomo10.json"))
    ap.add_argument("--init", default=None, help="start RL from this SFT checkpoint dir instead of training one")
    ap.add_argument("--init-hf", default=None, help="start RL from a pretrained Hugging Face Llama/Qwen2 model dir (no SFT)")
    ap.add_argument("--grad-ckpt", action="store_true", help="recompute each block in backward (less memory, ~1/3 more time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs")
    ap.add_argument("--name", default=None, help="run name (default: <algo>-<stages>-s<seed>)")
    ap.add_argument("--resume", default=None, help="continue runs/<name> from its last checkpoint")
    ap.add_argument("--no-final-eval", action="store_true", help="skip the test evaluation (experiments)")
    args = ap.parse_args(argv)
    pre = PRESETS[args.preset]
    args.sft_steps = args.sft_steps if args.sft_steps is not None else pre["sft_steps"]
    if args.init_hf:  # a pretrained model is the warm start: the loaders read its directory like an SFT one
        if args.init:
            raise UserError("pass --init or --init-hf, not both")
        if not is_hf_dir(args.init_hf):
            raise UserError(f"--init-hf {args.init_hf}: not a Hugging Face model dir (no config.json with a model type)")
        args.init = args.init_hf
    try:
        args.stages = [int(s) for s in args.stages.split(",")]
        args.steps = [int(s) for s in (args.steps_per_stage or pre["steps"]).split(",")]
    except ValueError:
        raise UserError("--stages and --steps-per-stage take comma-separated integers, e.g. 8,16,32")
    if len(args.steps) == 1:
        args.steps *= len(args.stages)
    if len(args.steps) != len(args.stages) or min(args.stages) < 1 or min(args.steps) < 0:
        raise UserError(f"--steps-per-stage needs one count >= 0 per stage ({len(args.stages)} stages)")
    args.name = args.name or f"{args.algo}-{'-'.join(map(str, args.stages))}-s{args.seed}"
    return args


def rl_config(args) -> RLConfig:
    cfg = RLConfig(algo=args.algo, n=PRESETS[args.preset]["n"], K=PRESETS[args.preset]["K"])
    for f in ("n", "K", "chunks", "ppo_epochs", "p", "lam", "phi", "lr"):
        if getattr(args, f) is not None:
            setattr(cfg, f, getattr(args, f))
    cfg.p = 0.0 if cfg.algo == "grpo" else cfg.p  # plain GRPO = LoGo without local rerollouts
    if args.init_hf and args.chunks is None:
        cfg.chunks = 6  # the paper's N for a pretrained model; the tiny model's short context needs 2
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
            split = E.locomo_split(E.load_locomo(args.locomo_path))
        except E.DataError as e:
            raise UserError(str(e))
        return {k: (None, v) for k, v in split.items()}
    pre = PRESETS[args.preset]
    return E.synthetic_split({k: pre[f"{k}_worlds"] for k in ("train", "val", "test")}, args.sessions)


def sft_examples(samples, convs, cfg: RLConfig, noise: float, seed: int) -> list:
    """(role, prompt, target) triples from the teacher: the gold extractor output, the
    (noisy) teacher's manager ops given the memory it has made so far, and for the answer
    agent the exact-lookup answer over what retrieval shows it."""
    ex = []
    for i, (s, c) in enumerate(zip(samples, convs)):
        steps, bank = E.teacher_trace(s, c, cfg.chunks, noise, seed + i)
        for sess, chunk, facts, shown, ops in steps:
            ex.append(("ext", extractor_prompt(chunk), facts_target(facts)))
            if facts:
                ex.append(("mgr", manager_prompt(shown, facts), ops_target(ops)))
        for b in (bank, E.teacher_memory(s, c, cfg.chunks)):  # noisy and clean memories alike
            for q in c.qa:
                mem = retrieve_for_question(b, q.question, cfg.qa_top_k)
                ex.append(("ans", answer_prompt(mem, q.question), E.lookup_answer(q.question, mem)))
    return ex


# ============================================================================ SFT
def sft(model, tok, examples, args, device, log) -> None:
    """Supervised warm start: cross-entropy on target tokens only, computed with the same
    fused log-prob kernel the RL loss uses (loss = -mean token log-prob). The manager gets
    the most samples: it is the hard role (cpu-feasibility note 3); the answerer, frozen
    after this, sets the quality of every reward."""
    rng = random.Random(args.seed)
    max_len = model.cfg.max_seq_len
    data = {}
    for role, prompt, target in examples:
        p, t = encode(tok, prompt), encode(tok, target) + [EOS_ID]
        if len(p) + len(t) <= max_len:
            data.setdefault(role, []).append(Cell(p, t, True))
    weights = {"ext": 0.2, "mgr": 0.4, "ans": 0.4}
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.1, betas=(0.9, 0.95))
    steps, bs, warm = args.sft_steps, PRESETS[args.preset]["sft_batch"], min(100, args.sft_steps // 10 + 1)
    model.train()
    bar = tqdm(range(steps), desc="SFT", dynamic_ncols=True, disable=steps == 0)
    for step in bar:
        lr = args.sft_lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        roles = rng.choices(list(weights), weights=list(weights.values()), k=bs)
        batch = sorted((rng.choice(data[r]) for r in roles), key=lambda c: len(c.prompt) + len(c.response))
        with autocast(device):
            logp, _, _ = cell_logprobs(model, batch, 1.0, 256)
        loss = -logp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log({"phase": "sft", "step": step, "loss": loss.item(), "lr": lr})


# ============================================================================ pretrained models
def param_count(c: ModelConfig) -> int:
    """Parameters of a model with config c, from the shapes alone (no model is built)."""
    attn = c.d_model * c.hd * (2 * c.n_head + 2 * c.n_kv_head) + (c.hd * (c.n_head + 2 * c.n_kv_head) if c.qkv_bias else 0)
    layer = attn + 3 * c.d_model * c.hidden + 2 * c.d_model
    return c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.n_layer * layer + c.d_model


def memory_estimate(c: ModelConfig, rl: RLConfig, grad_ckpt: bool, prompt_len: int = 768) -> dict:
    """GiB one GPU needs for LoGo-GRPO with model c: a back-of-the-envelope count, printed before a run.

    weights: policy fp32 (4 B/param) + its grads (4) + AdamW moments (8) + the frozen KL reference
    and answer agent, deep copies in fp32 (4 + 4) = 24 bytes per parameter.
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
    est = {"params_B": P / 1e9, "weights_GiB": 24 * P / gib, "activations_GiB": act / gib, "kv_cache_GiB": kv / gib,
           "head_GiB": 2 * 256 * c.vocab_size * 4 / gib}
    est["total_GiB"] = sum(v for k, v in est.items() if k.endswith("GiB"))
    return est


def prepare_pretrained(model, cfg: RLConfig, args, device) -> None:
    """A pretrained start (no SFT; N = 6 chunks, set in rl_config): room for a real tokenizer's
    JSON, optional gradient checkpointing, and the memory estimate printed before anything heavy."""
    if model.cfg.chat_format:
        cfg.max_new = dict(CHAT_MAX_NEW)
    model.grad_ckpt = args.grad_ckpt
    est = memory_estimate(model.cfg, cfg, args.grad_ckpt)
    print(f"pretrained {args.init_hf}: {est['params_B']:.2f}B params, chat format {model.cfg.chat_format or 'none'}; "
          f"estimated GPU memory {est['total_GiB']:.1f} GiB (weights+grads+AdamW+reference+answerer "
          f"{est['weights_GiB']:.1f}, activations {est['activations_GiB']:.1f}, KV cache {est['kv_cache_GiB']:.1f})")
    if device.type == "cuda" and est["total_GiB"] > torch.cuda.get_device_properties(device).total_memory / 2 ** 30:
        print("warning: the estimate exceeds this GPU's memory" + ("" if args.grad_ckpt else "; try --grad-ckpt"))


# ============================================================================ checkpoints
def save_rl_state(path, policy, tok, opt, meta, rng, gen):
    """Everything a resume needs: weights, optimizer, curriculum position, both RNGs."""
    meta = meta | {"py_rng": _jsonable(rng.getstate())}
    save_checkpoint(path, policy, tok, meta, opt, {"torch_gen": gen.get_state(), "torch_rng": torch.get_rng_state()})


def _jsonable(state):
    return json.loads(json.dumps(state))


def _tuple(x):
    return tuple(_tuple(i) for i in x) if isinstance(x, list) else x


def load_ckpt(path, device):
    try:
        return load_checkpoint(path, device)
    except CheckpointError as e:
        raise UserError(str(e))


# ============================================================================ the run
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UserError(str(e))
    run = Path(args.out) / args.name
    if args.resume:
        run = Path(args.resume)
        if not (run / "args.json").exists():
            raise UserError(f"--resume {run}: not a run directory (no args.json)")
        saved = json.loads((run / "args.json").read_text())
        args = parse_args(saved["argv"])  # the run continues with the flags it started with
        args.resume = str(run)
    elif (run / "last").exists():
        raise UserError(f"{run} already holds a run: pass --resume {run} or another --name")
    cfg = rl_config(args)
    data = load_data(args)  # before anything is written: a bad data path leaves no half run behind
    run.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (run / "args.json").write_text(json.dumps({"argv": argv if argv is not None else sys.argv[1:], "cfg": asdict(cfg)}, indent=1))
    t0 = time.time()
    metrics_f = run / "metrics.jsonl"
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    def log(rec):
        with open(metrics_f, "a") as f:
            f.write(json.dumps(rec) + "\n")
        pos["lines"] += 1  # saved with every checkpoint: a resume cuts the log back to it

    pos = {"stage": 0, "step": 0, "best": None, "gstep": 0, "fails": 0, "lines": 0}
    if metrics_f.exists() and not args.resume:
        metrics_f.unlink()  # a fresh run (e.g. one that failed before its first checkpoint)

    # --- SFT warm start (or a given / saved one); it also becomes the frozen answerer and the KL reference
    sft_dir = Path(args.init) if args.init else run / "sft"
    if (sft_dir / "model.safetensors").exists() or args.init_hf:
        ck = load_ckpt(sft_dir, device)
        model, tok = ck["model"], ck["tok"]
        print(f"SFT model from {sft_dir}")
        if args.init_hf:
            prepare_pretrained(model, cfg, args, device)
    elif args.init:
        raise UserError(f"--init {sft_dir}: no checkpoint there")
    else:
        if args.data == "locomo":
            raise UserError("--data locomo has no teacher traces: pass --init <an SFT checkpoint> (e.g. runs/<name>/sft)")
        samples, convs = data["train"]
        examples = sft_examples(samples, convs, cfg, args.teacher_noise, args.seed)
        tok = train_tokenizer([p + t for _, p, t in examples[:20000]], PRESETS[args.preset]["vocab"])
        pre = PRESETS[args.preset]
        model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=pre["d_model"], n_layer=pre["n_layer"],
                                        n_head=pre["n_head"], n_kv_head=pre["n_head"])).to(device)
        print(f"SFT: {len(examples)} examples, model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {device}")
        sft(model, tok, examples, args, device, log)
        save_checkpoint(sft_dir, model, tok, {"kind": "sft"})
    ref = copy.deepcopy(model).eval()  # KL reference: the SFT model, frozen
    for p in ref.parameters():
        p.requires_grad_(False)
    answerer = AnswerAgent(copy.deepcopy(model).eval(), tok, cfg)  # frozen answer agent
    policy = model
    val = data["val"][1]

    # --- RL curriculum; `pos` is where we are, restored on resume
    rng, gen = random.Random(args.seed), torch.Generator(device=device)
    gen.manual_seed(args.seed)
    opt, new_opt = None, lambda: torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.999))
    if args.resume and (run / "last").exists():
        ck = load_ckpt(run / "last", device)
        policy.load_state_dict(ck["model"].state_dict())
        pos = ck["meta"]["pos"]
        rng.setstate(_tuple(ck["meta"]["py_rng"]))
        gen.set_state(ck["tensors"]["torch_gen"])
        torch.set_rng_state(ck["tensors"]["torch_rng"])
        opt = new_opt()
        opt.load_state_dict(ck["optimizer_state"])
        # metrics written after the checkpoint was saved would be repeated: drop them
        lines = metrics_f.read_text().splitlines()[:pos["lines"]]
        metrics_f.write_text("".join(l + "\n" for l in lines))
        print(f"resumed {run} at stage {pos['stage']} step {pos['step']}")
    elif args.resume and metrics_f.exists():
        pos["lines"] = len(metrics_f.read_text().splitlines())  # interrupted before RL began: keep the SFT log
    train_convs = data["train"][1]
    for si in range(pos["stage"], len(args.stages)):
        S = args.stages[si]
        if opt is None or pos["step"] == 0:
            if si > 0 and pos["step"] == 0:  # warm start from the previous stage's best
                best_dir = run / f"best-stage{si - 1}"
                if best_dir.exists():
                    policy.load_state_dict(load_ckpt(best_dir, device)["model"].state_dict())
            opt = new_opt()  # each stage starts its optimizer afresh, from the warm-start weights
        if pos["step"] == 0:  # validate before training; the start is the first best candidate
            v = E.evaluate(policy, tok, answerer, val, cfg)
            pos["best"] = v["f1_overall"]
            save_checkpoint(run / f"best-stage{si}", policy, tok, {"val_f1": v["f1_overall"], "step": 0})
            log({"phase": "val", "stage": S, "step": 0, "gstep": pos["gstep"], **v})
            print(f"stage {S} sessions: val F1 {v['f1_overall']:.1f} before training")
        bar = tqdm(range(pos["step"], args.steps[si]), desc=f"RL {S} sessions", dynamic_ncols=True)
        for step in bar:
            ts = time.time()
            conv = train_convs[rng.randrange(len(train_convs))]
            policy.train()
            with autocast(device):
                stats = logo_step(policy, ref, answerer, tok, conv, S, cfg, opt, rng, gen)
            pos["step"], pos["gstep"] = step + 1, pos["gstep"] + 1
            ops = stats.pop("ops")
            rec = {"phase": "rl", "stage": S, "step": step + 1, "gstep": pos["gstep"], "algo": cfg.algo,
                   "conv": conv.sample_id, "step_time": time.time() - ts, **stats, **{f"ops_{k}": v for k, v in ops.items()}}
            if stats.get("skipped_updates"):
                pos["fails"] += 1
                if pos["fails"] >= 3:
                    raise UserError(f"non-finite loss in {pos['fails']} steps: stopping (lower --lr?)")
            bar.set_postfix(reward=f"{stats['reward_global']:.3f}", f1=f"{stats['train_f1']:.3f}", loss=f"{stats.get('loss', 0):.3f}")
            if (step + 1) % args.val_every == 0 or step + 1 == args.steps[si]:
                v = E.evaluate(policy, tok, answerer, val, cfg)
                rec["val_f1"] = v["f1_overall"]
                log({"phase": "val", "stage": S, "step": step + 1, "gstep": pos["gstep"], **v})
                if v["f1_overall"] > pos["best"]:
                    pos["best"] = v["f1_overall"]
                    save_checkpoint(run / f"best-stage{si}", policy, tok, {"val_f1": v["f1_overall"], "step": step + 1})
            log(rec)
            save_rl_state(run / "last", policy, tok, opt, {"pos": pos}, rng, gen)
        print(f"stage {S} sessions: best val F1 {pos['best']:.1f}")
        pos.update(stage=si + 1, step=0)
        save_rl_state(run / "last", policy, tok, opt, {"pos": pos}, rng, gen)

    # --- final: the last stage's best checkpoint vs. the base pipeline and the oracle memory
    final = load_ckpt(run / f"best-stage{len(args.stages) - 1}", device)["model"] if args.stages else policy
    result = {"run": str(run), "minutes": (time.time() - t0) / 60}
    if not args.no_final_eval:
        samples, test = data["test"]
        base = load_ckpt(sft_dir, device)["model"]
        table = {"base pipeline (SFT only)": E.evaluate(base, tok, answerer, test, cfg),
                 f"Memory-R2 ({cfg.algo}, {'->'.join(map(str, args.stages))})": E.evaluate(final, tok, answerer, test, cfg)}
        if samples is not None:
            table["oracle memory (teacher)"] = E.score(answerer, E.oracle_banks(samples, test, cfg), test)
        result["test"] = table
        write_report(run, args, cfg, table, result["minutes"], device)
        print(E.report_table(table))
        names = list(table)
        (run / "result.json").write_text(json.dumps({
            "algo": cfg.algo, "stages": args.stages, "steps": args.steps, "seed": args.seed, "minutes": result["minutes"],
            "base": table[names[0]], "trained": table[names[1]], "oracle": table.get(names[2]) if len(names) > 2 else None},
            indent=1))
    log({"phase": "done", **result})
    return result


def write_report(run, args, cfg, table, minutes, device):
    val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    curve = " ".join(f"{r['stage']}:{r['step']}={r['f1_overall']:.1f}" for r in val if r.get("phase") == "val")
    (run / "report.md").write_text(
        f"# Memory-R2 run `{run.name}`\n\n"
        f"algo {cfg.algo}, stages {args.stages}, steps {args.steps}, n={cfg.n} K={cfg.K} p={cfg.p} "
        f"lambda={cfg.lam} phi={cfg.phi}, data {args.data}, seed {args.seed}, {minutes:.1f} min on {device}\n\n"
        f"## Test (x100)\n\n{E.report_table(table)}\n\n## Validation F1 (stage:step=F1)\n\n{curve}\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: resume with --resume <run dir> (the last finished step is saved)", file=sys.stderr)
        sys.exit(130)
