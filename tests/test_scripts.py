"""scripts/test.sh: the README's test command. Given test files (or file::test ids) it runs those alone; given
only options (-k ...) it runs the whole tests/ folder with them."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected(*args) -> int:
    r = subprocess.run(["bash", "scripts/test.sh", "--co", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"(\d+)(?:/(\d+))? tests? collected", r.stdout)
    assert m, r.stdout[-2000:]
    return int(m.group(1))


def test_a_file_runs_alone_and_options_keep_the_whole_suite():
    assert collected("tests/test_stream_events.py") == 2
    assert collected("tests/test_stream_events.py::test_generation_hands_on_batches_with_empty_text") == 1
    assert collected("-k", "test_generation_hands_on_batches_with_empty_text or test_a_file_runs_alone") == 2
