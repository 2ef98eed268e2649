"""`zenlm audit memorization --run RUN`: how much a chat run memorised the canaries planted in
its training data (exposure, Carlini et al. 2019; see ``privacy/canaries.py``).

A run trained with ``--canaries N`` holds ``canaries.json`` and is measured as it is. A run
without canaries is audited by training it again, same recipe (DP settings included), with
``--canaries N --repeats R`` planted, into ``RUN/memorization-audit/``: the exposure then
speaks for that recipe. The report goes to ``RUN/memorization.json``.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_subcommand(sub) -> None:
    """Add ``memorization`` to the ``audit`` command group's subparsers."""
    p = sub.add_parser("memorization", help="exposure of canaries planted in a chat run's training data")
    p.add_argument("--run", required=True, help="a chat fine-tune run folder")
    p.add_argument("--canaries", type=int, help="a run without canaries: plant this many and train it again")
    p.add_argument("--repeats", type=int, default=10, help="times each planted canary appears (default 10)")
    p.add_argument("--candidates", type=int, default=10_000,
                   help="random secrets each canary is ranked among (default 10,000)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def retrain_with_canaries(run: Path, n: int, repeats: int, log=print) -> Path:
    """Train ``run``'s recipe again with ``n`` canaries planted ``repeats`` times each."""
    import yaml

    import zenlm
    from zenlm.train.finetune import finetune, resolve_finetune

    raw = yaml.safe_load((run / "config.yaml").read_text())
    out = run / "memorization-audit"
    raw["canaries"] = {**(raw.get("canaries") or {}), "n": n, "repeats": repeats}
    raw.setdefault("train", {})["out_dir"] = str(out)
    cfg = resolve_finetune(raw)
    finetune(cfg, zenlm.load(cfg.base), log=log)
    return out


def measure(run: str | Path, *, canaries: int | None = None, repeats: int = 10,
            candidates: int = 10_000, log=print) -> dict:
    """The memorisation report of ``run`` (written to ``RUN/memorization.json``)."""
    import yaml

    import zenlm
    from zenlm.errors import ConfigError
    from zenlm.io import atomic_write_json
    from zenlm.privacy.canaries import audit, load_canaries

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run folder (no config.yaml)")
    task = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("task")
    if task != "chat":
        raise ConfigError(f"{run} is a {task or 'pretraining'} run: the memorisation audit "
                          f"scores text by likelihood, so it needs a chat run")
    measured = run
    planted = load_canaries(run)
    if planted is None:
        if not canaries:
            raise ConfigError(f"{run} has no canaries.json: pass --canaries N to train it again "
                              f"with N canaries planted")
        measured = retrain_with_canaries(run, canaries, repeats, log=log)
        planted = load_canaries(measured)
    loaded = zenlm.load(str(measured))
    report = audit(loaded.model, loaded.tokenizer, planted["canaries"], candidates=candidates,
                   system=planted.get("system"))
    summary = json.loads((measured / "summary.json").read_text()) if (measured / "summary.json").is_file() else {}
    report.update(run=str(measured), repeats=planted["config"].repeats,
                  privacy=summary.get("privacy"))
    atomic_write_json(run / "memorization.json", report)
    return report


def run(args) -> int:
    report = measure(args.run, canaries=args.canaries, repeats=args.repeats,
                     candidates=args.candidates)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    pr = report.get("privacy")
    dp = f"DP epsilon {pr['epsilon']:.2f}" if pr else "no DP"
    print(f"{report['run']}: {len(report['canaries'])} canaries x {report['repeats']} repeats, "
          f"ranked among {report['candidates'] - 1:,} random secrets ({dp})")
    for c in report["canaries"]:
        print(f"  {c['secret']}: rank {c['rank']:,}, exposure {c['exposure']:.2f} bits")
    print(f"exposure: mean {report['mean_exposure']:.2f}, max {report['max_exposure']:.2f} bits; "
          f"chance {report['chance_exposure']:.2f}, at most {report['max_measurable']:.2f}")
    return 0
