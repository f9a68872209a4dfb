"""Faults of the command line found by trying it as a new user would (issue 29, section 3),
each through the real CLI (`python orchestrator.py`) on the CPU: the exit code, the one
stderr line, no traceback, outputs kept where the run stopped early, no process or shared
memory left behind. The model is synthetic:tiny (random weights, byte-level text, loads in
seconds)."""
import glob
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "synthetic:tiny", "--backend", "reference"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("CASE4_USE_CUSTOM", "CASE4_DISABLE_EXT", "CASE4_KV_ONLY", "CASE4_BG_CAPTURE", "CASE4_SKIP_PRECAPTURE"):
        env.pop(k, None)
    return env


def run(*flags, timeout=300, env=None):
    return subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), *flags], capture_output=True,
                          timeout=timeout, env={**_env(), **(env or {})}, cwd=ROOT)


def assert_bad_input(r, words):
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("case4: error:"), err  # nothing else: no model was loaded
    assert words in lines[0], lines[0]


def outputs(d: Path, name: str):
    toks = [int(t) for t in (d / f"{name}_tokens.txt").read_text().split()]
    return toks, (d / f"{name}_text.txt").read_text(), json.loads((d / f"{name}_metrics.json").read_text())


def child_pids(stderr: str) -> set[int]:
    line = next(l for l in stderr.splitlines() if "server pid" in l)
    w = line.replace(",", "").split()
    return {int(w[w.index("server") + 2]), int(w[w.index("client") + 2])}


def assert_clean(pid: int, kids: set[int]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [k for k in kids if os.path.exists(f"/proc/{k}") and "zombie" not in _state(k)]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"
    assert not glob.glob(f"/dev/shm/case4_{pid}_*"), "shared memory not unlinked"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


# ---- refused before the model loads: exit 2, one line

def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_bad_input(run(*TINY, "--prompt", "hi", "--output-dir", str(f)), "is not a folder")


def test_run_name_whose_folder_cannot_be_made(tmp_path):
    (tmp_path / "a").write_text("x")  # --run-name a/b needs a folder a
    r = run(*TINY, "--prompt", "hi", "--output-dir", str(tmp_path), "--run-name", "a/b")
    assert_bad_input(r, "--run-name 'a/b'")


def test_run_name_with_a_folder_is_made(tmp_path):
    r = run(*TINY, "--prompt-len", "4", "--max-tokens", "2", "--quiet", "--output-dir", str(tmp_path),
            "--run-name", "a/b")
    assert r.returncode == 0, r.stderr.decode()
    toks, _, m = outputs(tmp_path / "a", "b")
    assert len(toks) == m["generated_tokens"] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_bad_input(run(*TINY, "--prompt", "hi", "--output-dir", str(ro)), "cannot write the outputs")
    finally:
        ro.chmod(0o755)


def test_output_dir_that_cannot_be_created():
    # /proc takes no new folders, not even from root
    assert_bad_input(run(*TINY, "--prompt", "hi", "--output-dir", "/proc/case4-out"), "cannot write the outputs")


@pytest.mark.parametrize("flags, words", [
    (["--prompt", "hi", "--prompt-len", "8"], "--prompt and --prompt-len"),
    ([b"--prompt", b"caf\xe9 \xff"], "not valid UTF-8"),  # Latin-1 bytes: surrogate escapes in argv
    (["--prompt", "hi", "--device", "tpu"], "--device"),
    (["--prompt", "hi", "--timeout", "0"], "--timeout"),
    (["--prompt", "hi", "--timeout", "-5"], "--timeout"),
    (["--prompt", "hi", "--model", ""], "--model is empty"),  # was ".: no config.json"
])
def test_bad_flags_exit_2(flags, words):
    assert_bad_input(run(*TINY, *flags), words)


@pytest.mark.parametrize("name, value", [("CASE4_DISABLE_EXT", "true"), ("CASE4_BG_CAPTURE", "2"),
                                         ("CASE4_KV_ONLY", "yes")])
def test_a_switch_of_the_environment_that_is_not_0_or_1_exits_2(name, value):
    # CASE4_DISABLE_EXT=true, CASE4_KV_ONLY=yes were ignored and CASE4_BG_CAPTURE=2 read as on: the run went on
    assert_bad_input(run(*TINY, "--prompt", "hi", env={name: value}), f"{name} must be 0 or 1, got '{value}'")


@pytest.mark.parametrize("name, value", [("CASE4_IPC_SPIN_US", "abc"), ("CASE4_LOOP_SPIN_US", "-5"),
                                         ("CASE4_LOOP_SPIN_US", "inf")])
def test_bad_spin_environment_exit_2(name, value):
    # read when ipc/peers.py loads: 'abc' was a ValueError traceback (exit 1), -5 and inf were taken as they were
    assert_bad_input(run(*TINY, "--prompt", "hi", env={name: value}), f"{name} must be a number of microseconds")


# ---- stopped early: outputs and summary kept

def start(tmp_path, name, **kw):
    args = [sys.executable, str(ROOT / "orchestrator.py"), *TINY, "--prompt-len", "8", "--max-tokens", "400",
            "--ignore-eos", "--temperature", "1", "--output-dir", str(tmp_path), "--run-name", name]
    return subprocess.Popen(args, stderr=subprocess.PIPE, env=_env(), cwd=ROOT, **kw)


def test_stdout_closed_by_head_stops_quietly(tmp_path):
    """`... | head -c 1`: the reader goes away; no BrokenPipeError traceback, exit 141
    (as a tool killed by SIGPIPE), the tokens so far and the summary kept."""
    p = start(tmp_path, "pipe", stdout=subprocess.PIPE)
    assert p.stdout.read(1)  # text streams ...
    p.stdout.close()         # ... and the reader is gone
    err = p.stderr.read().decode(errors="replace")
    rc = p.wait(60)
    assert rc == 141, (rc, err)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "--- case4:" in err  # the summary
    toks, _, m = outputs(tmp_path, "pipe")
    assert m["stop_reason"] == "stdout closed" and 0 < len(toks) < 400 and m["generated_tokens"] == len(toks)
    assert_clean(p.pid, child_pids(err))


def test_sigterm_keeps_partial_outputs_and_summary(tmp_path):
    p = start(tmp_path, "term", stdout=subprocess.PIPE)
    assert p.stdout.read(3)
    os.kill(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    err = err.decode(errors="replace")
    assert p.returncode == 143, (p.returncode, err)
    assert "Traceback" not in err and "--- case4:" in err, err
    toks, _, m = outputs(tmp_path, "term")
    assert m["stop_reason"] == "terminated" and 0 < len(toks) < 400 and m["generated_tokens"] == len(toks)
    assert_clean(p.pid, child_pids(err))



@pytest.mark.parametrize("victim", ["server", "client"])
def test_a_stopped_child_in_the_decode_loop_is_named_within_seconds(tmp_path, victim):
    """SIGSTOP one child while the two decode (--sampling client, the direct link): the stall is
    seen after max(3 s, 50 x the slowest step), not after --timeout (300 s), and the stopped
    process is named (docs/ipc.md "Stalls"); the tokens so far and the summary are kept."""
    p = start(tmp_path, "stall", stdout=subprocess.PIPE)
    err, fd = b"", p.stderr.fileno()
    while b"server pid" not in err:
        chunk = os.read(fd, 4096)
        assert chunk, err
        err += chunk
    server, client = _pid_of(err.decode(), "server"), _pid_of(err.decode(), "client")
    stopped = server if victim == "server" else client
    try:
        # three writes to stdout: the first token's text (before the loop), then stream batches of the
        # running loop (each ~10 ms of tokens): the guard has measured steps by then
        for _ in range(3):
            assert os.read(p.stdout.fileno(), 4096), "the run ended before decoding"
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        out, rest = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        for k in (server, client):
            try:
                os.kill(k, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
            p.wait()
    err = (err + rest).decode(errors="replace")
    assert p.returncode == 1, (p.returncode, err)
    assert took < 10, f"the stall took {took:.1f} s to be reported"
    assert "Traceback" not in err and "did not answer" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("case4:")]
    assert len(lines) == 1 and lines[0].startswith(f"case4: error: {victim} process stalled (no step for"), lines
    assert "during decode" in lines[0] and "stopped" in lines[0], lines[0]
    assert "--- case4:" in err  # the summary
    toks, _, m = outputs(tmp_path, "stall")
    assert m["stop_reason"] == "error" and 0 < len(toks) < 400 and m["generated_tokens"] == len(toks)
    assert_clean(p.pid, {server, client})


def _pid_of(stderr: str, name: str) -> int:
    w = next(l for l in stderr.splitlines() if "server pid" in l).replace(",", "").split()
    return int(w[w.index(name) + 2])


def test_control_characters_escaped_on_a_terminal(tmp_path):
    """Random weights write NUL, ESC and the like; on a terminal they are shown as \\xNN, and
    the text file keeps the raw text."""
    master, slave = pty.openpty()
    p = start(tmp_path, "tty", stdout=slave)
    os.close(slave)
    shown = b""
    while True:
        r, _, _ = select.select([master], [], [], 120)
        if not r:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's writer has gone
            break
        if not chunk:
            break
        shown += chunk
    err = p.stderr.read().decode(errors="replace")
    p.wait(30)
    os.close(master)
    assert p.returncode == 0, err
    _, text, _ = outputs(tmp_path, "tty")
    raw = [c for c in text if ord(c) < 32 and c not in "\n\t" or 127 <= ord(c) < 160]
    assert raw, "the generated text has no control character: the test would prove nothing"
    terminal = shown.decode(errors="replace")
    assert not [c for c in terminal if ord(c) < 32 and c not in "\r\n\t" or 127 <= ord(c) < 160]
    assert f"\\x{ord(raw[0]):02x}" in terminal


# ---- run_ipc.sh from another directory: relative paths are the caller's

def test_run_ipc_resolves_relative_paths_in_the_callers_directory(tiny_hf_folder, tmp_path):
    """A relative model folder and --output-dir given to run_ipc.sh from elsewhere mean the caller's
    directory (issue 29): the model is found there and the outputs land there, not in the repository."""
    folder, _ = tiny_hf_folder  # tmp_path / "m"
    before = set((ROOT / "output").glob("rel*")) if (ROOT / "output").exists() else set()
    r = subprocess.run(["bash", str(ROOT / "run_ipc.sh"), "m", "--backend", "reference", "--prompt", "hi",
                        "--max-tokens", "3", "--ignore-eos", "--quiet", "--output-dir", "rel", "--run-name", "r"],
                       capture_output=True, timeout=300, env=_env(), cwd=tmp_path)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, err
    toks, _, m = outputs(tmp_path / "rel", "r")
    assert len(toks) == 3 and m["model"] == "m"
    assert not (ROOT / "rel").exists()
    assert (set((ROOT / "output").glob("rel*")) if (ROOT / "output").exists() else set()) == before
