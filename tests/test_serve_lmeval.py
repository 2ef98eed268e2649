"""lm-eval's ``local-completions`` model scores a small multiple-choice task through the server
(its remote tokenizer backend uses /tokenizer_info and /tokenize), and the loglikelihoods it
gets back are the ones the model gives in-process."""

from __future__ import annotations

import json

import pytest
import torch

from serve_helpers import Served, load_smollm2, needs_smollm2

QUESTIONS = [
    ("The capital of France is", [" Paris", " London", " Berlin"], 0),
    ("Two plus two equals", [" seven", " four", " nine"], 1),
    ("The opposite of hot is", [" loud", " green", " cold"], 2),
    ("A baby cat is called a", [" kitten", " puppy", " calf"], 0),
    ("Water freezes at zero degrees", [" Kelvin", " Celsius", " Newton"], 1),
    ("The sun rises in the", [" north", " south", " east"], 2),
]

TASK = """task: zenlm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.mark.slow
@needs_smollm2
def test_lm_eval_local_completions(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (pip install 'lm-eval[api]')")
    from lm_eval.tasks import TaskManager

    from zenlm.serve.app import create_app
    from zenlm.serve.keys import KeyStore

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "zenlm_tiny_mc.yaml").write_text(TASK.format(data=data))
    state = tmp_path / "state"
    key = KeyStore(state).create("eval", ["generate"])[0]
    loaded = load_smollm2()
    monkeypatch.setenv("OPENAI_API_KEY", key)  # what local-completions sends as its Bearer key
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with Served(create_app(loaded, state_dir=state, model_name="smollm2")) as s:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=(f"base_url={s.url}/v1/completions,model=smollm2,tokenizer_backend=remote,"
                        f"auth_token={key},num_concurrent=1,max_retries=1,max_length=2048"),
            tasks=["zenlm_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True, batch_size=1)
    samples = out["samples"]["zenlm_tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    tok = loaded.tokenizer
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        scores = []
        for choice in doc["choices"]:
            ctx, cont = tok.encode(doc["question"]), tok.encode(doc["question"] + choice)[len(tok.encode(doc["question"])):]
            ids = ctx + cont
            with torch.no_grad():
                lp = loaded.model(torch.tensor([ids]))[0].float().log_softmax(-1)
            scores.append(sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        got = [r[0][0] for r in sample["resps"]]  # lm-eval's (loglikelihood, is_greedy) per choice
        assert got == pytest.approx(scores, abs=1e-2)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert out["results"]["zenlm_tiny_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
