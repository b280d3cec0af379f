"""`jielong generate` and `jielong chat` print the model's words exactly (flows/terminal.py): piped output is
the model's text byte for byte, a status line goes to stderr only when it is a terminal, and chat, driven
through tmux, edits lines with readline and keeps its notices off stdout. With a real tiny model trained here."""

from __future__ import annotations

import json
import os
import pty
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import run_chain, small_overrides
from jielong.tasks.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The json module"
TOKENS = 200
CLI = [sys.executable, "-m", "jielong.flows.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A pretrained tiny model with room for 200 new tokens (256-token context)."""
    workspace = tmp_path_factory.mktemp("exact") / "ws"
    cfg = load_config("tiny", small_overrides(workspace, "model.context_length=256", "pretrain.steps=20"))
    return run_chain(cfg, "pretrain")["pretrain"].path / "model"


def model_text(model_dir: Path, chat: bool = False, prompt: str = PROMPT, tokens: int = TOKENS) -> str:
    """What the model produces, computed in a process like the CLI's (same threads, same numbers)."""
    code = ("import json, sys; from jielong.models.generate import Decoding, Generator\n"
            f"g = Generator({str(model_dir)!r}); d = Decoding(temperature=1.0)\n"
            f"t = g.reply([{{'role': 'user', 'content': {prompt!r}}}], {tokens}, d) if {chat} "
            f"else g.continue_text({prompt!r}, {tokens}, d)\n"
            "print(json.dumps(t))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> str:
    return model_text(model_dir)


def generate_command(model_dir: Path) -> list[str]:
    return [*CLI, "generate", PROMPT, "--model", str(model_dir), "--max-new-tokens", str(TOKENS), "--temperature", "1.0"]


def test_generate_piped_is_the_model_output_byte_for_byte(model_dir: Path, expected: str):
    # what a console re-wrapping at 150 columns (or trimming line ends) would have changed
    assert max(len(line) for line in expected.split("\n")) > 150 or any(
        line != line.rstrip() for line in expected.split("\n")), expected
    piped = subprocess.run(["bash", "-c", " ".join(map(shlex.quote, generate_command(model_dir))) + " | cat"],
                           capture_output=True, timeout=300, cwd=ROOT)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == expected.encode("utf-8")
    assert piped.stderr == b"", "no status line and no progress bars when stderr is not a terminal"


def test_a_status_line_goes_to_stderr_only_when_it_is_a_terminal(model_dir: Path, expected: str):
    master, slave = pty.openpty()
    process = subprocess.Popen(generate_command(model_dir), stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other end closed
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = process.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    assert process.returncode == 0, bytes(seen)
    assert stdout == expected.encode("utf-8"), "the terminal on stderr changes nothing on stdout"
    assert b"loading the model\xe2\x80\xa6" in seen and b"generating\xe2\x80\xa6" in seen
    assert seen.endswith(b"\r\x1b[K"), "the status line is erased at the end"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_chat_in_a_terminal_edits_lines_and_keeps_notices_off_stdout(model_dir: Path, tmp_path: Path):
    session = f"jielong-test-{os.getpid()}"
    errors, home = tmp_path / "stderr.txt", tmp_path / "ws"
    command = " ".join(map(shlex.quote, [*CLI, "chat", "--model", str(model_dir), "--max-new-tokens", "6",
                                         "--temperature", "1.0", "--set", f"workspace={home}"]))
    # stdout stays on the terminal (readline needs it); stderr goes to a file, so the pane shows stdout only
    # (tmux trims the spaces that end a line: an empty prompt shows as "you>")
    shell = f"cd {shlex.quote(str(ROOT))} && {command} 2>{shlex.quote(str(errors))}; echo EXITED $?; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", shell], check=True,
                   env={**os.environ, "TERM": "xterm"})
    try:
        def pane() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

        def wait_for(predicate, what: str) -> str:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                shown = pane()
                if predicate(shown):
                    return shown
                if "EXITED" in shown:
                    break
                time.sleep(0.3)
            raise AssertionError(f"{what} never showed; pane:\n{pane()}\nstderr:\n{errors.read_text()}")

        def keys(*sent: str) -> None:
            subprocess.run(["tmux", "send-keys", "-t", session, *sent], check=True)

        wait_for(lambda shown: shown.count("you>") == 1, "the first prompt")
        keys("-l", "Hello wrld")
        keys("Left", "Left", "Left")
        keys("-l", "o")
        keys("Enter")
        shown = wait_for(lambda shown: shown.count("you>") == 2, "the second prompt")
        assert "you> Hello world" in shown and "^[[D" not in shown, "the arrow keys moved the cursor"
        keys("-l", "/reset")
        keys("Enter")
        wait_for(lambda shown: shown.count("you>") == 3, "the prompt after /reset")
        keys("Up", "Up", "Enter")  # history: /reset, then Hello world
        wait_for(lambda shown: shown.count("you>") == 4, "the prompt after the recalled line")
        keys("C-d")
        shown = wait_for(lambda shown: "EXITED" in shown, "the end of the chat")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

    lines = [line for line in shown.splitlines() if line.strip()]
    assert lines[-1].endswith("EXITED 0"), "Ctrl-D ends the chat (its newline went to stderr, the file)"
    reply = model_text(model_dir, chat=True, prompt="Hello world", tokens=6)
    asked = [i for i, line in enumerate(lines) if line == "you> Hello world"]
    assert len(asked) == 2, "the line typed, then recalled with Up"
    reset = lines.index("you> /reset")
    assert lines[reset + 1] == "you> Hello world", "/reset printed nothing on stdout"
    if reply:  # the reply of the first turn, as the model gave it (the pane holds stdout only)
        assert lines[asked[0] + 1] == reply.replace("\n", " ").strip() or reply.split("\n")[0] in shown
    notices = errors.read_text()
    assert "(new conversation)" in notices and "/reset starts over" in notices
    assert (home / "chat_history").read_text().count("Hello world") >= 1, "the history is kept"
