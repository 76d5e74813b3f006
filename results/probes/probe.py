"""Probes of the curriculum: train.py with one rule changed, each rule a cause the later stages
might lose validation F1 by (results/README.md, 'Probes of the curriculum'). Not a training flag:
the rule lives here, with the runs it made, and the run's probe.json names it.

  python results/probes/probe.py RULE [train.py flags]      # one run
  python results/probes/probe.py table RUN_DIR...           # each rule's runs against the plain ones

  kl10        beta_kl 1e-2 instead of 1e-3: a stage stays closer to its warm start (its KL reference)
  stage-lr    a stage of S sessions trains at lr x (first stage's S) / S
  frozen-ext  with --separate-roles: only the manager's rows train, so the extractor stays the SFT
              model's (no extraction drift)
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import memr2  # noqa: E402
import train  # noqa: E402


def kl10():
    build = train.config_for
    train.config_for = lambda *a, **k: replace(build(*a, **k), beta_kl=1e-2)


def stage_lr():
    stage = train.train_stage

    def scaled(si, args, run, cfg, *rest):
        return stage(si, args, run, replace(cfg, lr=cfg.lr * args.stages[0] / args.stages[si]), *rest)
    train.train_stage = scaled


def frozen_ext():
    if "--separate-roles" not in sys.argv:
        sys.exit("frozen-ext needs --separate-roles (with shared weights the manager's updates move the extractor)")
    update = memr2.ppo_update
    memr2.ppo_update = lambda policy, ref, pools, *a: update(policy, ref, [[r for r in p if r.role == "mgr"] for p in pools], *a)


RULES = {"kl10": kl10, "stage-lr": stage_lr, "frozen-ext": frozen_ext}


def table(dirs: list) -> str:
    """Runs -> one line per arm (the rule from probe.json, else the flags' arm, as eval.py compare
    names it): test F1 minus the run's SFT start, each later stage's selected checkpoint minus its
    warm start (validation), the final one minus the first stage's best, validation fact recall
    at the end minus at the start, each mean [t-based 95 % interval] over seeds; then each arm
    minus the first one in test F1, paired by seed."""
    import eval as E
    arms = {}
    for d in map(Path, dirs):
        r = E.read_run_result(d)
        rule = json.loads((d / "probe.json").read_text())["rule"] if (d / "probe.json").exists() else ""
        recall = [json.loads(x)["fact_recall"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"phase": "val"' in x]
        r["recall_drift"] = recall[-1] - recall[0]
        arms.setdefault(E._arm(r) + (f" probe {rule}" if rule else ""), {})[r["seed"]] = r
    out = []
    for arm, rs in arms.items():
        out.append(f"- {arm} ({len(rs)} seeds): test F1 - start "
                   + E._fmt(E.t_interval([r["trained"]["f1_overall"] - r["base"]["f1_overall"] for r in rs.values()]))
                   + f"; {E.curriculum_kept(list(rs.values()))}"
                   + f"; fact recall end - start {E._fmt(E.t_interval([r['recall_drift'] for r in rs.values()]))}")
    first, *others = arms
    for arm in others:
        seeds = sorted(arms[arm].keys() & arms[first].keys())
        d = [arms[arm][s]["trained"]["f1_overall"] - arms[first][s]["trained"]["f1_overall"] for s in seeds]
        out.append(f"- {arm} minus {first}: test F1 {E._fmt(E.t_interval(d))} over seeds {seeds}")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        print(table(sys.argv[2:]))
        sys.exit()
    if len(sys.argv) < 2 or sys.argv[1] not in RULES:
        sys.exit(f"usage: python results/probes/probe.py {{{','.join(RULES)}}} [train.py flags]")
    rule = sys.argv.pop(1)
    RULES[rule]()
    result = train.main(sys.argv[1:])
    if result and result.get("run"):
        (Path(result["run"]) / "probe.json").write_text(json.dumps({"rule": rule}) + "\n")
