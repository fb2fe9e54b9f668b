"""The dashboard, driven in headless Chromium: first-line latency of the event stream,
and the screenshot shown in the README (docs/dashboard.png).

`python -m benchmarks.dashboard [--screenshot docs/dashboard.png]` (also run by
`make bench`). The job prints a line per epoch (flushed), saves a loss curve, and waits
at a gate file until the page has shown its live output; then it finishes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks.browser import Browser, find_chromium
from benchmarks.report import summarize

DOCS_PNG = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"

# A training-shaped job: epochs with a loss, a figure, METRICS, and a gate to hold it
# running while the page is looked at.
DEMO_JOB = textwrap.dedent("""
    import json, os, time
    losses = []
    for epoch in range(1, 6):
        loss = round(1.2 / epoch, 4)
        losses.append(loss)
        print(f"epoch {epoch}/5  loss {loss}", flush=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure(figsize=(4, 2.6))
    plt.plot(range(1, 6), losses, marker="o")
    plt.title("training loss"); plt.xlabel("epoch")
    plt.tight_layout(); plt.savefig("loss.png", dpi=80)
    print("saved loss.png", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.01)
    print("METRICS: " + json.dumps({"training_loss": losses[-1], "validation_accuracy": 0.91}))
""")


def first_line_latency(host: str, port: int, runs: int, token: str | None = None) -> dict[str, Any]:
    """Seconds from POST /jobs to the first output event of a job that prints one flushed
    line and then sleeps 2 s (so the line cannot come with the job's end)."""
    code = "import time\nprint('first', flush=True)\ntime.sleep(2)\n"
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    times = []
    for _ in range(runs):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        start = time.perf_counter()
        conn.request("POST", "/jobs", json.dumps({"paper_id": "latency", "code": code}),
                     {"Content-Type": "application/json", **auth})
        job_id = json.loads(conn.getresponse().read())["job_id"]
        conn.request("GET", f"/jobs/{job_id}/events", headers=auth)
        resp = conn.getresponse()
        while True:
            line = resp.readline()
            if not line or line.startswith(b"event: output"):
                break
        times.append(time.perf_counter() - start)
        resp.close()
        conn.close()
    return summarize(times)


def show_job(browser: Browser, base_url: str, submit, gate, screenshot: Path | None,
             token: str | None = None) -> dict[str, Any]:
    """Load the page (typing the token when asked), submit the demo job, open it, watch
    its output arrive while it runs, let it finish, wait for its figure; screenshot."""
    browser.goto(base_url + "/")
    if token:
        browser.wait_for("!document.getElementById('login').hidden")
        browser.type_into("#token", token)
        browser.eval("document.querySelector('#login-form button').click()")
    browser.wait_for("document.querySelectorAll('#workers tr').length > 0")
    job_id = submit(DEMO_JOB)
    browser.wait_for(f"document.querySelector('#jobs tr[data-job=\"{job_id}\"]') !== null")
    browser.eval(f"document.querySelector('#jobs tr[data-job=\"{job_id}\"]').click()")
    browser.wait_for("document.getElementById('job-output').textContent.includes('saved loss.png')")
    live_output = browser.eval("document.getElementById('job-output').textContent")
    gate(job_id)
    browser.wait_for("document.getElementById('job-result').textContent.includes('validation_accuracy')")
    browser.wait_for("(() => { const i = document.querySelector('#job-figures img');"
                     " return i && i.complete && i.naturalWidth > 0; })()")
    browser.wait_for("document.querySelector('#jobs tr[data-job] td:nth-child(4)').textContent !== ''")
    size = browser.screenshot(str(screenshot)) if screenshot else 0
    return {"job_id": job_id, "live_output": live_output, "screenshot_bytes": size}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.service import Service

    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshot", type=Path, default=DOCS_PNG, help=f"where to save it [{DOCS_PNG}]")
    parser.add_argument("--runs", type=int, default=10, help="first-line latency runs")
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("dashboard: chromium is not installed (deployment/system-deps.sh); skipped", file=sys.stderr)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-dash-"))
    work.chmod(0o711)
    with Service("cpu", work / "svc") as svc:
        latency = first_line_latency("127.0.0.1", svc.port, args.runs)
        # A few finished jobs for the chart and the table.
        earlier = ["print('ok')", "import time\ntime.sleep(0.5)\nprint('loss 0.8')",
                   "raise ValueError('diverged')", "import time\ntime.sleep(1)\nprint('loss 0.4')"]
        for i, code in enumerate(earlier):
            svc.request("POST", "/execute", {"paper_id": f"paper_{i}", "code": code})

        def submit(code: str) -> str:
            return svc.request("POST", "/jobs", {"paper_id": "resnet_demo", "code": code})[1]["job_id"]

        def gate(job_id: str) -> None:
            (work / "svc" / "jobs" / job_id / "go").touch()

        with Browser() as browser:
            shown = show_job(browser, f"http://127.0.0.1:{svc.port}", submit, gate, args.screenshot)
    print(json.dumps({"first_line_latency": latency, "screenshot": str(args.screenshot),
                      "screenshot_bytes": shown["screenshot_bytes"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
