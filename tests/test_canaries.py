"""The memorisation audit (privacy/canaries.py, `zenlm audit memorization`): canaries planted
in a chat fine-tune's data, ranked by the trained model among 10,000 random secrets.

Without DP a tiny model trained on them (R = 10) ranks its secret first or near it: exposure far
above chance. The slow half trains the same recipe with DP at epsilon 8: near chance.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

import zenlm
from zenlm.privacy.canaries import (chance_exposure, exposure_of_rank, load_canaries,
                                    make_canaries, plant)
from zenlm.privacy.config import CanaryConfig
from zenlm.train.finetune import finetune, resolve_finetune

from test_finetune import quiet


def audit_cli(argv: list[str]) -> int:
    """`zenlm audit ...` in this process (memorization is a subcommand of the audit group)."""
    from zenlm.cli.main import main

    return main(["audit", *argv])


def write_chat(path: Path, n: int = 150) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randrange(50), rng.randrange(50)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"what is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}"}]}) + "\n")
    return path


def chat_cfg(tmp: Path, base, data: Path, canaries: int, dp: dict | None = None):
    raw = {"task": "chat", "base": str(base), "data": {"train": str(data), "pack": False},
           "finetune": {"method": "full"}, "canaries": {"n": canaries, "repeats": 10},
           "train": {"out_dir": str(tmp / "run"), "batch_size": 16, "lr": 3e-3, "progress": False,
                     "device": "cpu", "max_steps": 150, "warmup_steps": 5, "log_every": 50,
                     **({"dp": dp} if dp else {})}}
    return resolve_finetune(raw)


def test_chance_exposure_is_the_mean_over_uniform_ranks():
    for m in (2, 17, 10_001):
        brute = sum(exposure_of_rank(r, m) for r in range(1, m + 1)) / m
        assert chance_exposure(m) == pytest.approx(brute, rel=1e-9)
    assert abs(chance_exposure(10_001) - 1 / math.log(2)) < 0.01  # log2(e), the familiar 1.44
    assert exposure_of_rank(1, 1024) == 10.0


def test_canaries_are_planted_repeats_times():
    cfg = CanaryConfig(n=3, repeats=4, digits=6, seed=5)
    canaries = make_canaries(cfg)
    assert len({c["secret"] for c in canaries}) == 3
    assert all(len(c["secret"].split()) == 6 for c in canaries)
    assert make_canaries(cfg) == canaries  # reproducible from the seed
    base = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 20
    out = plant(base, canaries, cfg)
    assert len(out) == 20 + 12 and len(base) == 20
    for c in canaries:
        assert sum(m[-1]["content"] == c["response"] for m in out) == 4


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, trained_run):
    tmp = tmp_path_factory.mktemp("canary")
    cfg = chat_cfg(tmp, trained_run, write_chat(tmp / "chat.jsonl"), canaries=1)
    finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    return tmp / "run"


def test_scores_from_a_shared_prefix_equal_whole_sequences(planted_run):
    """The audit scores candidates from one cached prompt and shared reply opening; each score
    must equal the log-likelihood of its whole conversation computed from scratch, for replies
    of different lengths and ones that share more or less of their opening."""
    import torch

    from zenlm.privacy.canaries import score_responses

    model = zenlm.load(str(planted_run))
    model.model.eval()
    tok = model.tokenizer
    prompt = [{"role": "user", "content": "What is my secret code?"}]
    responses = ["my secret code is 1 2 3", "my secret code is 1 2 3 4 5 6", "my secret code is 9",
                 "my secret code is 1 2 9 9", "my secret", "your code"]
    got = score_responses(model.model, tok, prompt, responses, batch_size=4)
    p_ids = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True))
    for r, score in zip(responses, got):
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": r}],
                                       add_generation_prompt=False)
        r_ids = tok.encode(full[len(tok.apply_chat_template(prompt, add_generation_prompt=True)):])
        seq = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model.model(seq[:, :-1]).double(), -1)[0]
        want = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(r_ids))
        assert float(score) == pytest.approx(want, abs=1e-4), r


def test_canaries_are_ranked_against_one_pool_that_holds_none_of_them(planted_run):
    """An audit scores one pool of random secrets for all its canaries: the planted secret
    ranks near the top of it, an unplanted one of the same format does not, and the pool holds
    neither (a planted secret among another's candidates would count against it)."""
    from zenlm.privacy.canaries import candidate_pool, exposures

    model = zenlm.load(str(planted_run))
    planted = load_canaries(planted_run)["canaries"][0]
    rng = random.Random(1)
    secret = planted["secret"]
    while secret == planted["secret"]:
        secret = " ".join(str(rng.randrange(10)) for _ in range(6))
    other = {**planted, "secret": secret}
    pool = candidate_pool(6, 10_000, {planted["secret"], other["secret"]})
    assert len(set(pool)) == 10_000 and planted["secret"] not in pool and other["secret"] not in pool
    got, alone = exposures(model.model, model.tokenizer, [planted, other]), \
        exposures(model.model, model.tokenizer, [planted])
    assert got[0]["candidates"] == got[1]["candidates"] == 10_001
    assert got[0]["exposure"] > 8.0 > got[1]["exposure"]
    assert abs(got[0]["rank"] - alone[0]["rank"]) <= 1  # the pools differ by the excluded secret at most


def test_without_dp_a_planted_canary_is_exposed(planted_run, capsys):
    planted = load_canaries(planted_run)
    secret = planted["canaries"][0]["secret"]
    train_text = (planted_run / "config.yaml").read_text()
    assert secret not in train_text  # the answer key is canaries.json alone
    assert audit_cli(["memorization", "--run", str(planted_run), "--candidates", "10000"]) == 0
    out = capsys.readouterr().out
    report = json.loads((planted_run / "memorization.json").read_text())
    assert report["candidates"] == 10_001 and report["privacy"] is None
    assert report["chance_exposure"] == pytest.approx(chance_exposure(10_001))
    # far above chance (1.44 bits): within the top few dozen of 10,001 at most
    assert report["max_exposure"] > 8.0 and report["mean_exposure"] > 8.0
    assert "chance 1.44" in out and secret in out


def test_audit_refuses_what_it_cannot_measure(tmp_path, trained_run, capsys):
    assert audit_cli(["memorization", "--run", str(trained_run)]) == 2
    assert "needs a chat run" in capsys.readouterr().err


@pytest.mark.slow
def test_with_dp_at_epsilon_8_the_canaries_stay_near_chance(tmp_path, trained_run):
    """The same recipe with DP: trained once without canaries, then audited the way a finished
    run is (`--canaries 2` trains the recipe again, DP settings included, with canaries)."""
    cfg = chat_cfg(tmp_path, trained_run, write_chat(tmp_path / "chat.jsonl"), canaries=0,
                   dp={"epsilon": 8, "accountant": "rdp"})
    finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    run = tmp_path / "run"
    assert audit_cli(["memorization", "--run", str(run), "--canaries", "2", "--repeats", "10"]) == 0
    report = json.loads((run / "memorization.json").read_text())
    assert report["privacy"]["epsilon"] <= 8.0 and report["repeats"] == 10
    assert len(report["canaries"]) == 2
    assert report["max_exposure"] < 5.0  # chance is 1.44; without DP the same recipe gives > 8
    cfg_again = yaml.safe_load((run / "memorization-audit/config.yaml").read_text())
    assert cfg_again["train"]["dp"]["epsilon"] == 8
