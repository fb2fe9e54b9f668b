"""The reuse mode (reuse_workers): what one job changes, the next job on the same worker
must not see; what cannot be undone replaces the worker. (One process per job, the
default, is tested in test_process_per_job.py.)"""

from __future__ import annotations

import psutil
import pytest
from conftest import wait_until


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    from conftest import start_pool

    handle = start_pool(tmp_path_factory.mktemp("iso"), pool_size=1, reuse_workers=True)
    yield handle
    handle.pool.shutdown(grace=5)


# (what job A does, what job B prints, what B must print as in a fresh interpreter)
CASES = {
    "cwd": ("import os; os.chdir('/')",
            "import os; print(os.getcwd() == os.path.dirname(__file__))", "True"),
    "environment": ("import os; os.environ['LEAK'] = '1'",
                    "import os; print(os.environ.get('LEAK'))", "None"),
    "sys_path": ("import sys; sys.path.insert(0, '/leak')",
                 "import sys; print('/leak' in sys.path)", "False"),
    "sys_argv": ("import sys; sys.argv.append('x')", "import sys; print(len(sys.argv))", "1"),
    "job_modules": ("open('helper.py', 'w').write('V = 1')\nimport helper",
                    "import sys; print('helper' in sys.modules)", "False"),
    "logging_handlers": ("import logging; logging.basicConfig(level=logging.DEBUG)",
                         "import logging; print(len(logging.root.handlers), logging.root.level)", "0 30"),
    "warnings_filters": ("import warnings; warnings.simplefilter('error')",
                         "import warnings; warnings.warn('w'); print('survived')", "survived"),
    "default_dtype": ("import torch; torch.set_default_dtype(torch.float64)",
                      "import torch; print(torch.get_default_dtype())", "torch.float32"),
    "grad_mode": ("import torch; torch.set_grad_enabled(False)",
                  "import torch; print(torch.is_grad_enabled())", "True"),
    "threads": ("import torch; torch.set_num_threads(1)",
                "import torch; print(torch.get_num_threads() == __import__('os').cpu_count())", "True"),
    "deterministic": ("import torch; torch.use_deterministic_algorithms(True)",
                      "import torch; print(torch.are_deterministic_algorithms_enabled())", "False"),
    "builtins": ("import builtins; builtins.leak = 1; builtins.print = None",
                 "import builtins; print(hasattr(builtins, 'leak'))", "False"),
    "signal_handlers": ("import signal; signal.signal(signal.SIGUSR1, signal.SIG_IGN)",
                        "import signal; print(signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)", "True"),
    "replaced_stdout": ("import sys, io; sys.stdout = io.StringIO()", "print('visible')", "visible"),
    "closed_stdout": ("import sys; sys.stdout.close()", "print('visible')", "visible"),
    "closed_fd1": ("import os; os.close(1)", "print('visible')", "visible"),
    "recursion_limit": ("import sys; sys.setrecursionlimit(50)", "import sys; print(sys.getrecursionlimit())",
                        "1000"),
    "main_globals": ("SECRET = 42", "print('SECRET' in globals())", "False"),
    "excepthook": ("import sys; sys.excepthook = lambda *a: None", "raise ValueError('shown')", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_does_not_leak_to_next_job(one_worker, name):
    change, probe, expected = CASES[name]
    first = one_worker.run(change)
    second = one_worker.run(probe)
    assert second.worker.pid == first.worker.pid, "both jobs must run on the same worker"
    if expected is None:
        assert "ValueError: shown" in second.stderr
    else:
        assert second.stdout.strip() == expected, second.stderr


@pytest.mark.parametrize("code, reason", [
    ("import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()",
     "threads still running"),
    ("import torch\ntorch.matmul = lambda *a: None", "module torch patched: matmul"),
    ("import json\njson.dumps = str", "module json patched: dumps"),
])
def test_unrestorable_leftovers_replace_the_worker(make_pool, code, reason):
    pool = make_pool(reuse_workers=True)
    first = pool.run(code)
    wait_until(lambda: pool.pool.stats().respawns_recent)
    assert reason in " ".join(pool.pool.stats().respawns_recent[0]["detail"])
    pool.wait_full()
    second = pool.run("print('clean')")
    assert second.worker.pid != first.worker.pid
    assert second.stdout == "clean\n"
    assert pool.pool.stats().respawns_by_reason == {"dirty": 1}


def test_worker_is_recycled_after_max_jobs(make_pool):
    pool = make_pool(max_jobs_per_worker=2, reuse_workers=True)
    pids = [pool.run("print(1)").worker.pid for _ in range(2)]
    pool.wait_full()
    third = pool.run("print(1)").worker.pid
    assert pids[0] == pids[1] != third
    assert pool.pool.stats().respawns_by_reason == {"recycled": 1}


def test_a_typical_training_script_leaves_the_worker_clean(one_worker):
    code = (
        "import torch\nfrom torch import nn\n"
        "model = nn.Linear(4, 1)\nopt = torch.optim.Adam(model.parameters(), lr=0.01)\n"
        "for epoch in range(3):\n    opt.zero_grad()\n"
        "    loss = model(torch.randn(8, 4)).pow(2).mean()\n    loss.backward()\n    opt.step()\n"
        "print('METRICS: {\"training_loss\": %f}' % loss.item())\n"
    )
    first = one_worker.run(code)
    assert first.success, first.stderr
    assert one_worker.run(code).worker.pid == first.worker.pid
    assert not one_worker.pool.stats().respawns_by_reason, one_worker.pool.stats().respawns_recent


def test_processes_a_job_leaves_are_killed_and_the_worker_stays(one_worker):
    code = ("import os, subprocess, time\n"
            "child = subprocess.Popen(['sleep', '300'])\n"
            "r, w = os.pipe()\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        os.write(w, str(os.getpid()).encode())\n        time.sleep(300)\n    os._exit(0)\n"
            "print(child.pid, os.read(r, 20).decode(), flush=True)\n")
    first = one_worker.run(code)
    leftovers = [int(pid) for pid in first.stdout.split()]
    wait_until(lambda: not any(_alive(pid) for pid in leftovers))
    uid = next(w["uid"] for w in one_worker.pool.stats().workers if w["pid"] == first.worker.pid)
    assert [p.pid for p in psutil.process_iter(["uids"])
            if p.info["uids"].real == uid and _alive(p.pid)] == [first.worker.pid]
    assert one_worker.run("print(1)").worker.pid == first.worker.pid, one_worker.pool.stats().respawns_recent


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
