"""`hanyeong chat` on a pseudo-terminal (Korean and English turns, /reset, /exit, Ctrl-D) and
`hanyeong model generate`; streamed replies equal the whole-row decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import REPO, cli


def chat_in_terminal(args: list[str], lines: list[str], timeout: float = 120) -> tuple[str, int]:
    """`hanyeong chat ARGS` on a pseudo-terminal, typing each line after the "> " prompt
    (None: Ctrl-D); everything the terminal showed, and the exit code."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "chat", *args], cwd=REPO,
                               stdin=follower, stdout=follower, stderr=follower, env={**os.environ})  # fmt: skip
    os.close(follower)
    seen, pending, deadline = b"", list(lines), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        if pending and seen.endswith(b"> "):
            line = pending.pop(0)
            os.write(leader, b"\x04" if line is None else line.encode() + b"\n")
    os.close(leader)
    return seen.decode("utf-8", errors="replace"), process.wait(timeout=30)


def test_chat_in_a_terminal_takes_korean_and_english_turns_and_resets(tiny_ckpt, small_tokenizer_dir):
    args = [str(tiny_ckpt), "-t", str(small_tokenizer_dir), "--max-new-tokens", "12", "--temperature", "0"]
    shown, code = chat_in_terminal(args, ["안녕하세요, 오늘 날씨 어때요?", "Tell me about Seoul.", "/reset",
                                          "서울에 대해 알려 주세요.", "/exit"])  # fmt: skip
    assert code == 0, shown
    assert "안녕하세요, 오늘 날씨 어때요?" in shown and "Tell me about Seoul." in shown  # echoed as typed
    assert "(conversation reset)" in shown and shown.count("> ") >= 5
    shown, code = chat_in_terminal(args, ["hello", None])  # Ctrl-D ends it too
    assert code == 0, shown


def test_streamed_reply_equals_the_whole_reply(tiny_ckpt, small_tokenizer_dir):
    from orchestration.eval.talk import SamplingConfig, Talker, chat_loop

    talker = Talker.load(tiny_ckpt, "torch", small_tokenizer_dir, SamplingConfig(max_new_tokens=40))
    written = []
    turns = iter(["한국어로 답해 주세요.", "/exit"])
    chat_loop(talker, "You are helpful.", lambda prompt: next(turns), written.append)
    streamed = "".join(written).split("\n", 1)[1].rstrip("\n")  # after the help line
    whole = talker.complete(["한국어로 답해 주세요."], chat=True, system="You are helpful.")[0]
    assert streamed == whole


def test_generate_command(tiny_ckpt, small_tokenizer_dir, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("대한민국의 수도는\nThe capital of Korea is\n", encoding="utf-8")
    code, out, _ = cli(monkeypatch, capsys, "model", "generate", str(tiny_ckpt), "-t", str(small_tokenizer_dir),
                       "--prompts", str(prompts), "--max-new-tokens", "5", "--json")  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["대한민국의 수도는", "The capital of Korea is"]
    code, _, err = cli(monkeypatch, capsys, "model", "generate", str(tiny_ckpt), "-t", str(small_tokenizer_dir))
    assert code == 1 and err == "error: give --prompt TEXT or --prompts FILE\n"
    code, _, err = cli(monkeypatch, capsys, "model", "generate", str(tiny_ckpt), "-t", str(small_tokenizer_dir),
                       "-p", "x", "--top-p", "0")  # fmt: skip
    assert code == 1 and err.startswith("error: top_p must be in (0, 1]")


def test_generate_refuses_bad_prompt_files_and_a_missing_checkpoint(tiny_ckpt, small_tokenizer_dir, tmp_path,
                                                                     monkeypatch, capsys):  # fmt: skip
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("\n \n", encoding="utf-8")
    latin.write_bytes("café\n".encode("latin-1"))
    for path, says in ((empty, "no prompt in it"), (latin, "not UTF-8 text"), (tmp_path / "none.txt", "no such file")):
        code, _, err = cli(monkeypatch, capsys, "model", "generate", str(tiny_ckpt), "-t", str(small_tokenizer_dir),
                           "--prompts", str(path))  # fmt: skip
        assert code == 1 and err == f"error: {path}: {says}" + ("\n" if says != "no prompt in it" else " (one a line)\n")
    code, _, err = cli(monkeypatch, capsys, "chat", str(tmp_path / "nope"))
    assert code == 1 and err == f"error: {tmp_path / 'nope'}: no checkpoint there (no spec.json)\n"
