#!/usr/bin/env python3
"""Opens a page in headless Chromium (Debian's `chromium`), waits until a
JavaScript condition holds, evaluates an expression in the page and saves a
screenshot — the DevTools protocol over a pipe (`--remote-debugging-pipe`), so
nothing but the standard library is needed here.

    run_page.py URL READY_JS VALUE_JS SCREENSHOT.png OUT.json [TIMEOUT_S]

OUT.json holds the value of VALUE_JS (which must be JSON-serialisable). Exits 1
with the page's last state when READY_JS stays false.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


class Browser:
    def __init__(self, width: int = 1300, height: int = 1300) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            sys.exit("chromium not found (scripts/setup.sh installs Debian's chromium)")
        self.profile = tempfile.mkdtemp(prefix="dpo-chromium-")
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # the child reads commands on fd 3, answers on fd 4
            # Through fresh numbers first: a pipe may already sit on 3 or 4.
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(r, 3)
            os.dup2(w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id = 0
        self.buffer = b""

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") != self.next_id:
                continue  # an event, or an older answer
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def main(url: str, ready: str, value: str, shot: str, out: str, timeout: float) -> None:
    b = Browser()
    try:
        target = b.call("Target.createTarget", {"url": url})["targetId"]
        session = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def evaluate(expr: str):
            r = b.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
            if "exceptionDetails" in r:
                return None
            return r["result"].get("value")

        deadline = time.time() + timeout
        while not evaluate(f"Boolean({ready})"):
            if time.time() > deadline:
                state = evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                sys.exit(f"page not ready after {timeout} s: {ready}\n{state}")
            time.sleep(0.25)
        time.sleep(0.5)  # let the charts paint before the screenshot
        result = evaluate(f"JSON.stringify({value})")
        shot_data = b.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
        with open(shot, "wb") as f:
            f.write(base64.b64decode(shot_data))
        with open(out, "w") as f:
            f.write(result if result is not None else "null")
    finally:
        b.close()


if __name__ == "__main__":
    if len(sys.argv) not in (6, 7):
        sys.exit(__doc__)
    main(*sys.argv[1:6], float(sys.argv[6]) if len(sys.argv) == 7 else 60.0)
