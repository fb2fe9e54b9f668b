"""A job behaves as `python main.py` would: each case runs cold and warm and compares."""

from __future__ import annotations

import pytest
from conftest import run_cold

# (name, code): each is run both ways; exit status, stdout and stderr must match.
PARITY_CASES = {
    "prints": "print('hello')\nimport sys\nprint('to err', file=sys.stderr)\n",
    "exception_traceback": "def f():\n    raise ValueError('boom')\n\nf()\n",
    "sys_exit_int": "import sys\nprint('before')\nsys.exit(7)\n",
    "sys_exit_message": "import sys\nsys.exit('fatal: bad config')\n",
    "sys_exit_none": "raise SystemExit\n",
    "sys_exit_large": "import sys\nsys.exit(256 + 3)\n",
    "os_exit": "import os\nprint('lost in buffer')\nos._exit(5)\n",
    "os_exit_flushed": "import os, sys\nprint('kept', flush=True)\nos._exit(0)\n",
    "sigsegv": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    "name_file_argv": (
        "import sys, os\nprint(__name__, os.path.basename(__file__), len(sys.argv),\n"
        "      os.path.basename(sys.argv[0]), os.path.basename(os.getcwd()) == os.path.basename(\n"
        "      os.path.dirname(__file__)), sys.path[0] == os.path.dirname(__file__))\n"
    ),
    "c_level_output": "import os\nos.write(1, b'raw fd 1\\n')\nos.write(2, b'raw fd 2\\n')\n",
    "child_process_output": (
        "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'print(\"from child\")'])\n"
    ),
    "non_utf8": "import os\nos.write(1, b'bad \\xff\\xfe bytes\\n')\n",
    "stdout_not_a_tty": "import sys\nprint(sys.stdout.isatty(), sys.stdout.encoding, sys.stderr.errors)\n",
    "stdin_empty": "import sys\nprint(repr(sys.stdin.read()))\n",
    "pickle_main_class": (
        "import pickle\nclass Point:\n    def __init__(self, x): self.x = x\n"
        "p = pickle.loads(pickle.dumps(Point(3)))\nprint(type(p).__module__, p.x)\n"
    ),
    "spawn_multiprocessing": (
        "import multiprocessing as mp\n\ndef square(x):\n    return x * x\n\n"
        "if __name__ == '__main__':\n    with mp.get_context('spawn').Pool(2) as p:\n"
        "        print(p.map(square, [1, 2, 3]))\n"
    ),
    "dataloader_workers": (
        "import torch\nfrom torch.utils.data import DataLoader, Dataset\n\n"
        "class Squares(Dataset):\n    def __len__(self): return 8\n"
        "    def __getitem__(self, i): return torch.tensor([i * i])\n\n"
        "if __name__ == '__main__':\n    dl = DataLoader(Squares(), batch_size=4, num_workers=2)\n"
        "    print([b.flatten().tolist() for b in dl])\n"
    ),
    "keyboard_interrupt": "raise KeyboardInterrupt\n",
    "non_daemon_thread_joined": (
        "import threading, time\ndef late():\n    time.sleep(0.2)\n    print('thread done', flush=True)\n"
        "threading.Thread(target=late).start()\nprint('main done')\n"
    ),
    "atexit_runs": "import atexit\natexit.register(lambda: print('bye'))\nprint('hi')\n",
    "recursion_error": "def f(n):\n    return f(n + 1)\nf(0)\n",
}


def _normalise(text: str, job_dir: str) -> str:
    lines = text.replace(job_dir, "<job>").splitlines()
    # CPython < 3.13 elides repeated recursion frames with a count that depends on the
    # stack depth at which the script started; compare the rest.
    return "\n".join(line for line in lines if "Previous line repeated" not in line)


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_job_matches_cold_python(name, shared_pool, tmp_path):
    code = PARITY_CASES[name]
    cold = run_cold(code, tmp_path)
    warm = shared_pool.run(code, job_id=f"parity-{name}")
    cold_dir = str(tmp_path / "cold")
    warm_dir = str(shared_pool.pool.config.jobs_dir / f"parity-{name}")
    assert warm.return_code == cold.returncode
    assert _normalise(warm.stdout, warm_dir) == _normalise(cold.stdout.decode("utf-8", "replace"), cold_dir)
    assert _normalise(warm.stderr, warm_dir) == _normalise(cold.stderr.decode("utf-8", "replace"), cold_dir)


def test_syntax_error_matches_cold_python_without_a_worker(shared_pool, tmp_path):
    code = "x = 1\ndef broken(:\n    pass\n"
    cold = run_cold(code, tmp_path)
    warm = shared_pool.run(code, job_id="syntax")
    assert warm.return_code == cold.returncode == 1
    assert warm.error_type == "syntax_error"
    assert warm.worker is None
    warm_dir = str(shared_pool.pool.config.jobs_dir / "syntax")
    assert _normalise(warm.stderr, warm_dir) == _normalise(cold.stderr.decode(), str(tmp_path / "cold"))


@pytest.mark.parametrize("code, error_type", [
    ("raise ValueError('x')", "exception"),
    ("import sys; sys.exit(2)", "exit"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGABRT)", "signal"),
    ("print('fine')", None),
])
def test_error_type_names_the_outcome(shared_pool, code, error_type):
    result = shared_pool.run(code)
    assert result.error_type == error_type
    assert result.success is (error_type is None)


def test_output_is_capped_keeping_head_and_tail(make_pool):
    pool = make_pool(max_output_bytes=4096)
    result = pool.run("import sys\nsys.stdout.write('HEAD' + 'x' * 100000 + 'TAIL')\n")
    assert result.stdout.startswith("HEAD")
    assert result.stdout.endswith("TAIL")
    assert result.stdout_truncated_bytes == 100008 - 4096
    assert result.stderr_truncated_bytes == 0


def test_the_result_has_every_pool_field(shared_pool):
    result = shared_pool.run("print('x')").to_dict()
    for key in ("job_id", "paper_id", "status", "success", "execution_time", "return_code", "stdout",
                "stderr", "timeout", "peak_memory_mb", "error_type", "error_message", "queue_time",
                "started_at", "finished_at", "worker", "stdout_truncated_bytes", "stderr_truncated_bytes"):
        assert key in result
    assert result["worker"]["pid"] > 0


def test_peak_memory_is_the_jobs_own(shared_pool):
    small = shared_pool.run("print(1)")
    big = shared_pool.run("import time\nb = bytearray(300 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])\n"
                          "time.sleep(0.3)\n")
    assert big.peak_memory_mb - small.peak_memory_mb > 250
