"""The signed lineage card: written by real runs and exports, verified file by file; a swapped
data shard, an edited config or an edited card is named; Ed25519 and HMAC signatures."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

import zenlm
from helpers import TRAINED_STEPS, run_cli
from zenlm.errors import CardError
from zenlm.io import sha256_file
from zenlm.privacy import card as lc


def quiet(*a, **k):
    pass


@pytest.fixture
def own_home(tmp_path, monkeypatch):
    """A key folder of this test's own (cards signed here do not leak into other tests)."""
    home = tmp_path / "home"
    monkeypatch.setenv("ZENLM_HOME", str(home))
    return home


@pytest.fixture
def small_run(tmp_path, make_cfg, prepared, own_home):
    """A fresh tiny run on a private copy of the prepared data (so the data can be tampered)."""
    from zenlm.train.loop import pretrain

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    run = tmp_path / "run"
    pretrain(make_cfg(run, data_dir=data, max_steps=3), log=quiet)
    return run, data


def test_a_real_run_carries_a_card_that_verifies(trained_run, prepared):
    card = lc.read_card(trained_run)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert card["kind"] == "lm" and card["steps"] == TRAINED_STEPS == summary["step"]
    assert card["tokens"] == summary["tokens"] and card["zenlm_version"] == zenlm.__version__
    assert card["config"] == yaml.safe_load((trained_run / "config.yaml").read_text())
    assert card["privacy"]["epsilon"] is None and card["privacy"]["dp"] is False
    assert card["parent"] is None
    [data] = card["data"]
    assert data["files"]["train.bin"] == sha256_file(prepared / "train.bin")
    assert data["files"]["manifest.json"] == sha256_file(prepared / "manifest.json")
    assert data["sources"] == json.loads((prepared / "manifest.json").read_text())["sources"]
    files = card["files"]
    assert "card.json" not in files and "config.yaml" in files and "summary.json" in files
    assert any(f.startswith("checkpoints/step_") and f.endswith("model.safetensors") for f in files)
    assert all(sha256_file(trained_run / f) == d for f, d in files.items())
    assert card["signature"]["scheme"] == "hmac-sha256"  # no key pair in the tests' key folder
    res = lc.verify_card(trained_run)
    assert res["files"] == len(files) and str(prepared / "train.bin") in res["data_checked"]


def test_verify_names_a_swapped_shard_an_edited_config_and_an_edited_card(small_run):
    run, data = small_run
    assert lc.verify_card(run)["scheme"] == "hmac-sha256"
    saved = {p: p.read_bytes() for p in (data / "train.bin", run / "config.yaml", run / "card.json")}

    def restore():
        for p, b in saved.items():
            p.write_bytes(b)
        lc.verify_card(run)  # whole again

    # a data shard swapped for another (val.bin in train.bin's place)
    shutil.copy(data / "val.bin", data / "train.bin")
    with pytest.raises(CardError, match=f"data file {data / 'train.bin'} does not match the card"):
        lc.verify_card(run)
    restore()
    # an edited config (one value, still valid YAML)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.03"))
    assert (run / "config.yaml").read_text() != text
    with pytest.raises(CardError, match="config.yaml does not match the card"):
        lc.verify_card(run)
    restore()
    # an edited card: steps changed, or its record of config.yaml changed to fit an edit
    card = json.loads((run / "card.json").read_text())
    card["steps"] = 1000
    (run / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="edited after it was signed"):
        lc.verify_card(run)
    restore()
    (run / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.03"))
    card = json.loads(saved[run / "card.json"])
    card["files"]["config.yaml"] = sha256_file(run / "config.yaml")
    (run / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="edited after it was signed"):
        lc.verify_card(run)
    restore()
    # a file added, a file removed
    (run / "extra.txt").write_text("x")
    with pytest.raises(CardError, match="extra.txt is not in the card"):
        lc.verify_card(run)
    (run / "extra.txt").unlink()
    (run / "loss.png").unlink()
    with pytest.raises(CardError, match="loss.png is missing"):
        lc.verify_card(run)


def test_ed25519_cards_verify_where_the_public_key_is_trusted(small_run, tmp_path, monkeypatch):
    run, _ = small_run
    priv, pub = lc.keygen()
    with pytest.raises(CardError, match="already exists"):
        lc.keygen()
    summary = json.loads((run / "summary.json").read_text())
    card = lc.write_run_card(run, "lm", yaml.safe_load((run / "config.yaml").read_text()), summary)
    sig = card["signature"]
    assert sig["scheme"] == "ed25519" and sig["public_key"] == pub.read_text().strip()
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    assert lc.verify_card(run)["scheme"] == "ed25519"
    # another machine: untrusted until it is given the public key
    monkeypatch.setenv("ZENLM_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(CardError, match="not trusted here"):
        lc.verify_card(run)
    assert lc.verify_card(run, [pub])["key_id"] == sig["key_id"]
    # a card re-signed by someone else's key after an edit is valid but untrusted
    monkeypatch.setenv("ZENLM_HOME", str(tmp_path / "mallory"))
    lc.keygen()
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "# edited\n")
    forged = dict(card, files=lc.file_hashes(run))
    (run / "card.json").write_text(json.dumps(lc.sign(forged)))
    monkeypatch.setenv("ZENLM_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(CardError, match="not trusted here"):
        lc.verify_card(run, [pub])
    # the original card (config.yaml as it signed it), with its signature bytes changed
    (run / "config.yaml").write_text((run / "config.yaml").read_text().removesuffix("# edited\n"))
    value = card["signature"]["value"]
    card["signature"]["value"] = ("00" if value[:2] != "00" else "ff") + value[2:]
    (run / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="Ed25519 signature does not match"):
        lc.verify_card(run, [pub])


def test_hmac_cards_verify_only_where_their_secret_is(small_run, tmp_path, monkeypatch):
    run, _ = small_run
    assert lc.read_card(run)["signature"]["scheme"] == "hmac-sha256"
    monkeypatch.setenv("ZENLM_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(CardError, match="which this machine does not hold"):
        lc.verify_card(run)


def test_cli_show_and_verify(small_run):
    run, data = small_run
    r = run_cli("card", "show", run)
    assert r.returncode == 0, r.stderr
    assert "steps" in r.stdout and "hmac-sha256" in r.stdout and str(data) in r.stdout
    r = run_cli("card", "show", run, "--json")
    assert json.loads(r.stdout) == lc.read_card(run)
    r = run_cli("card", "verify", run)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "# edited\n")
    r = run_cli("card", "verify", run)
    assert r.returncode == 2 and "config.yaml does not match the card" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_hf_export_carries_the_lineage_and_a_readme(trained_run, loaded, tmp_path):
    out = zenlm.export_hf(loaded, tmp_path / "hf")
    card = lc.read_card(out)
    assert card["kind"] == "export-hf" and card["parent"]["model"] == str(trained_run)
    assert card["parent"]["sha256"] == lc.tree_sha256(trained_run)
    src = lc.read_card(trained_run)
    assert card["parent"]["card_signature"] == src["signature"]["value"]
    assert card["lineage"]["steps"] == src["steps"] and card["lineage"]["data"] == src["data"]
    assert {"README.md", "config.json", "model.safetensors"} <= set(card["files"])
    assert lc.verify_card(out)["parent"] == "checked"
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and str(trained_run) in readme
    assert f"{src['steps']} steps" in readme and "not trained with differential privacy" in readme
    assert src["data"][0]["files"]["train.bin"][:16] in readme


def test_a_finetune_card_names_its_parent_and_data(tmp_path, trained_run, own_home):
    from zenlm.train.finetune import finetune, resolve_finetune

    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{w} value {i}\t{w}\n" for i in range(40)
                                                  for w in ("return", "import")))
    cfg = resolve_finetune({"task": "classify", "base": str(trained_run),
                            "data": {"train": str(train), "text_col": "sentence"},
                            "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8,
                                      "progress": False, "device": "cpu"}})
    finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    card = lc.read_card(tmp_path / "run")
    assert card["kind"] == "classify" and card["steps"] == 2
    assert card["parent"]["model"] == str(trained_run)
    assert card["parent"]["sha256"] == lc.tree_sha256(trained_run)
    assert card["parent"]["card_signature"] == lc.read_card(trained_run)["signature"]["value"]
    assert card["data"][0]["files"] == {"train.tsv": sha256_file(train)}
    assert "adapter/adapter_model.safetensors" in card["files"]
    res = lc.verify_card(tmp_path / "run")
    assert res["parent"] == "checked" and str(train) in res["data_checked"]
    train.write_text(train.read_text().replace("return value 3", "return value 4"))
    with pytest.raises(CardError, match="train.tsv does not match the card"):
        lc.verify_card(tmp_path / "run")
