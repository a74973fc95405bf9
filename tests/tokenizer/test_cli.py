"""`hanyeong tokenizer ...` as a user runs it: exit codes, one-line errors, stdin/stdout."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO


def hanyeong(*args, input: bytes | None = None, check: bool = True):
    result = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", *map(str, args)], input=input, capture_output=True, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr.decode())
    return result


def assert_one_line_error(result, fragment: str):
    err = result.stderr.decode().strip()
    assert result.returncode == 1, err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("args", [[], ["tokenizer"], ["tokenizer", "train"], ["tokenizer", "report"]])
def test_help_everywhere(args):
    result = hanyeong(*args, "--help")
    assert b"Usage" in result.stdout


def test_train_encode_decode_export_report(tmp_path, small_corpus):
    out = tmp_path / "tok"
    result = hanyeong("tokenizer", "train", small_corpus, "--out", out, "--vocab-size", 1500, "--workers", 2, "--no-cache", "-q")
    assert b"1,500 ids" in result.stdout and (out / "tokenizer.json").is_file()

    text = "오늘 영화 정말 재밌었다\nThe game is afoot!\n"
    ids = hanyeong("tokenizer", "encode", "-t", out, input=text.encode()).stdout
    assert len(ids.decode().splitlines()) == 2
    assert hanyeong("tokenizer", "decode", "-t", out, input=ids).stdout.decode() == text

    hanyeong("tokenizer", "encode", "-t", out, "--npy", tmp_path / "ids.npy", input=text.encode())
    assert np.load(tmp_path / "ids.npy").dtype == np.int32
    assert hanyeong("tokenizer", "decode", "-t", out, tmp_path / "ids.npy").stdout.decode() == text

    hanyeong("tokenizer", "export", "-t", out, "--format", "tiktoken", "--out", tmp_path / "tt")
    assert (tmp_path / "tt" / "tokenizer.tiktoken").is_file()

    (tmp_path / "ko.txt").write_text("\n".join(["오늘 영화 정말 재밌었다"] * 20), encoding="utf-8")
    report = hanyeong("tokenizer", "report", "-t", out, "--text", tmp_path / "ko.txt", "--compare", out, "--json",
                      "--plot", tmp_path / "r.png")
    parsed = json.loads(report.stdout)
    assert parsed["texts"][0]["language"] == "ko" and len(parsed["results"]) == 2
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_user_mistakes_are_one_line_and_exit_1(tmp_path, small_tokenizer_dir):
    assert_one_line_error(hanyeong("tokenizer", "train", tmp_path / "nope", "--out", tmp_path / "o", check=False), "no such file")
    assert_one_line_error(
        hanyeong("tokenizer", "train", tmp_path, "--out", tmp_path / "o", "--ko-share", 2, check=False), "ko_share"
    )
    assert_one_line_error(
        hanyeong("tokenizer", "train", tmp_path, "--out", tmp_path / "o", "--morphemes", "Q", check=False), "morpheme category"
    )
    assert_one_line_error(
        hanyeong("tokenizer", "encode", "-t", small_tokenizer_dir, input=b"\xff\xfe bad", check=False), "not valid UTF-8"
    )
    assert_one_line_error(hanyeong("tokenizer", "decode", "-t", small_tokenizer_dir, input=b"1 2 99999\n", check=False),
                          "outside the vocabulary")
    assert_one_line_error(hanyeong("tokenizer", "encode", "-t", tmp_path, input=b"x", check=False), "no tokenizer.json")
    assert_one_line_error(
        hanyeong("tokenizer", "export", "-t", small_tokenizer_dir, "--format", "sp", "--out", tmp_path, check=False),
        "only 'tiktoken'",
    )


def run_in_terminal(*args, cwd=REPO, timeout: float = 120) -> str:
    """`hanyeong ARGS` on a pseudo-terminal, as a user sees it: its stdout and stderr as one text."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # 40 rows, 100 columns
    process = subprocess.Popen([sys.executable, "-m", "orchestration.cli", *map(str, args)], cwd=cwd,
                               stdin=follower, stdout=follower, stderr=follower,
                               env={**os.environ, "COLUMNS": "100"})  # fmt: skip
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=30) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode("utf-8", errors="replace")


def screen_lines(text: str) -> list[str]:
    """What stays on the terminal's lines: of each line, what its last carriage return left."""
    return [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]


def test_a_skipped_file_is_reported_on_its_own_line_above_the_progress_bar(tmp_path, small_corpus):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    english = (small_corpus / "en.txt").read_text(encoding="utf-8").splitlines()
    (corpus / "a.txt").write_text("\n".join(english[:400]) + "\n", encoding="utf-8")
    (corpus / "bad.txt").write_bytes(b"\xff\xfe not UTF-8 \xc3\x28\n" * 10)
    (corpus / "c.txt").write_text("\n".join(english[400:800]) + "\n", encoding="utf-8")
    screen = screen_lines(run_in_terminal("tokenizer", "train", corpus, "--out", tmp_path / "tok", "--vocab-size", 600,
                                          "--no-morphemes", "--workers", 1, "--no-cache"))  # fmt: skip
    skipped = [line for line in screen if "bad.txt" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {corpus / 'bad.txt'}: not valid UTF-8"), screen
    assert any(line.startswith("read: 100%") for line in screen), screen  # the bar went on below it
