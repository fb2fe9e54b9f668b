"""A headless Chromium driven over the DevTools protocol, standard library only.

Chromium is started with `--remote-debugging-pipe`: it reads protocol messages from fd 3
and writes them to fd 4, each JSON message ended by a NUL byte. No debugging port is
opened, so nothing but this process can drive it, and no websocket library is needed.
Used by tests/test_dashboard.py and by the dashboard benchmark (the README's screenshot).
Runs as root, hence `--no-sandbox`; it is only ever pointed at 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any


class BrowserError(Exception):
    """Chromium answered an error, died, or a wait ran out."""


def find_chromium() -> str | None:
    """The path of Debian's chromium (or another Chromium), if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page; `close()` (or `with`) ends it."""

    def __init__(self, binary: str | None = None, width: int = 1360, height: int = 900):
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("chromium is not installed (deployment/system-deps.sh installs it)")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: its protocol pipes at fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-sync", "--metrics-recording-only",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []  # everything Chromium reported (console, exceptions, log)
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True, name="cdp-reader")
        self._reader.start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(domain, session=True)
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, session=True)

    # --- the protocol ---------------------------------------------------------------

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(self._from_child, 1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += data
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._answers[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cond.notify_all()

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False,
             timeout: float = 30) -> dict[str, Any]:
        """Send one command; its result (BrowserError on an error answer)."""
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data):]
        with self._cond:
            done = lambda: msg_id in self._answers or self.proc.poll() is not None
            if not self._cond.wait_for(done, timeout):
                raise BrowserError(f"{method}: no answer within {timeout} s")
            answer = self._answers.pop(msg_id, None)
        if answer is None:
            raise BrowserError(f"{method}: chromium exited ({self.proc.returncode})")
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    # --- what tests do with a page ---------------------------------------------------

    def goto(self, url: str) -> None:
        """Load `url` and wait for its load event."""
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.05) -> Any:
        """Evaluate until truthy; its value (BrowserError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"not true within {timeout} s: {expression}\n{self.problems()}")
            time.sleep(interval)

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input and type `text` as keyboard input."""
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text}, session=True)

    def screenshot(self, path: str) -> int:
        """Save the page as a PNG (the whole page); its size in bytes."""
        height = int(self.eval("Math.max(document.documentElement.scrollHeight, window.innerHeight)"))
        width = int(self.eval("window.innerWidth"))
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": width,
                                                             "height": height, "scale": 1}}, session=True)
        data = base64.b64decode(shot["data"])
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def problems(self) -> list[str]:
        """Exceptions, console errors and log errors (CSP violations among them)."""
        out = []
        with self._cond:
            events = list(self.events)
        for e in events:
            params = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append(details.get("exception", {}).get("description", details.get("text", "")))
            elif e.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
                args = params.get("args", [])
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
            elif e.get("method") == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out

    def close(self) -> None:
        """End Chromium and everything it started; remove its profile."""
        try:
            if self.proc.poll() is None:
                try:
                    self.call("Browser.close", timeout=5)
                except BrowserError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, 9)
                    self.proc.wait(5)
        finally:
            for fd in (self._to_child, self._from_child):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
