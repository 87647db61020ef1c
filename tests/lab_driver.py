"""A throwaway JupyterLab server and Debian's chromium driven by Selenium, for tests/test_lab_browser.py.

``LabServer(root, state, env, log)`` starts ``jupyter lab`` from this interpreter on a free loopback port with a random token, its
settings, workspaces and runtime files in a temporary folder (so the user's own Lab setup cannot change what
the test sees), and always shuts it down: the server's own /api/shutdown first (it stops its kernels), then
SIGTERM and SIGKILL to its process group (the kernels run in sessions of their own, so only the
server's shutdown stops them). ``LabPage`` does what a user does in the page: open a notebook, pick
Run → Run All Cells and File → Save Notebook from the menu bar, press an arrow key on a slider.

The JupyterLab 4.6 / ipywidgets 8.1 DOM this relies on (looked up in a live page):
- menu bar entries ``#jp-MainMenu .lm-MenuBar-item`` (text "Run"), menu items ``.lm-Menu-item[data-command]``
  (Run All Cells is ``runmenu:run-all``, Save is ``docmanager:save``);
- the visible notebook is the ``.jp-NotebookPanel`` without ``lm-mod-hidden``; a code cell's prompt
  ``.jp-InputPrompt`` reads ``[ ]:`` (not run), ``[*]:`` (queued or running) or ``[7]:``;
- the toolbar's ``.jp-Notebook-ExecutionIndicator`` has ``data-status`` idle / busy / connecting / ...
  (it reads "idle" before the kernel has started, so ``open`` also waits for "Idle" in the status bar, and
  ``run_all`` for a cell with a count);
- a traceback renders exactly like stderr (``data-mime-type="application/vnd.jupyter.stderr"``, no other mark),
  so errors are read from the notebook as Lab saves it (outputs of type "error"), not from the page;
- an IntSlider is a ``.widget-slider`` with a noUiSlider handle ``.noUi-handle`` (focusable; an arrow key moves
  it one step) and a ``.widget-readout``; ``interact`` draws its figure as an ``img`` in a ``.widget-output``.
"""
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL_HINT = "apt-get install chromium chromium-driver (`make browser` does it as root)"


def missing() -> str | None:
    """Why the browser test cannot run here, or None when everything it needs is installed."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: {INSTALL_HINT}"
    for module in ("selenium", "jupyterlab", "ipywidgets"):
        try:
            __import__(module)
        except ImportError:
            return f"python package {module} missing: pip install -e '.[test]' into the venv"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """``with LabServer(root, state, env, log) as server:`` serves the folder ``root`` at ``server.url(...)``
    until the block ends; Lab's settings, workspaces and runtime files go to ``state``, its output to ``log``."""

    def __init__(self, root: Path, state: Path, env: dict, log: Path, timeout: float = 90):
        self.root, self.state, self.env, self.log, self.timeout = Path(root), Path(state), env, Path(log), timeout
        self.port, self.token, self.process = free_port(), secrets.token_hex(16), None

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def _request(self, path: str, method: str = "GET", timeout: float = 5):
        request = urllib.request.Request(self.url(path), method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def __enter__(self):
        s = self.state
        env = dict(self.env, JUPYTER_CONFIG_DIR=str(s / "config"), JUPYTER_DATA_DIR=str(s / "data"),
                   JUPYTER_RUNTIME_DIR=str(s / "runtime"), IPYTHONDIR=str(s / "ipython"))
        command = [sys.executable, "-m", "jupyter", "lab", "--ServerApp.open_browser=False",
                   "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                   "--ServerApp.allow_root=True",  # CI runs as root
                   f"--LabApp.user_settings_dir={s / 'settings'}", f"--LabApp.workspaces_dir={s / 'workspaces'}",
                   # no network: no news feed, no update check, no PyPI extension manager
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly"]
        self.root.mkdir(parents=True, exist_ok=True)
        news = s / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True, exist_ok=True)
        news.write_text('{"fetchNews": "false"}')  # no "get Jupyter news?" toast over the page
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # its own process group, for stop()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self._request("api/status", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"jupyter lab did not answer /api/status in {self.timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self, grace: float = 20):
        """Shut the server down (its kernels too) however the test ended; escalate if it does not exit."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self._request("api/shutdown", method="POST")
        except OSError:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
        self.process.wait(grace)

    def __exit__(self, *exc):
        self.stop()


def chromium(width: int = 1400, height: int = 1100):
    """Headless Debian chromium through its own chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox",  # no sandbox: CI runs as root
                "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def cleared_copy(notebook: Path, folder: Path) -> Path:
    """``notebook`` copied into ``folder`` without outputs or execution counts, so that every count the test
    sees was made by this run (the notebook in the repository is never opened: Lab autosaves)."""
    nb = json.loads(Path(notebook).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(notebook).name
    target.write_text(json.dumps(nb, indent=1))
    return target


def saved_run(path: Path) -> tuple[list, list]:
    """What a saved notebook records of its run: the execution count of each code cell (None: not run), and
    (cell index, ename, evalue) of every error output."""
    cells = json.loads(Path(path).read_text())["cells"]
    counts = [cell["execution_count"] for cell in cells if cell["cell_type"] == "code"]
    errors = [(i, out["ename"], out["evalue"]) for i, cell in enumerate(cells)
              for out in cell.get("outputs", []) if out["output_type"] == "error"]
    return counts, errors


class LabPage:
    """A notebook open in the Lab page that ``driver`` shows; every wait polls the DOM up to ``timeout`` s."""

    NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the visible (current) notebook tab

    def __init__(self, driver, server: LabServer, timeout: float = 120):
        self.driver, self.server, self.timeout = driver, server, timeout

    def _wait(self, condition, message: str, timeout: float | None = None):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # stale: an element found a moment ago was replaced (an Output widget redraws its image); look again
        return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.25,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)

    def find(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, f"{self.NOTEBOOK} {css}")

    def open(self, name: str):
        """Open ``name`` (relative to the server's root) and wait until its kernel is connected and idle."""
        self.driver.get(self.server.url(f"lab/tree/{name}?token={self.server.token}"))
        self._wait(lambda d: self.find(".jp-CodeCell") and self.kernel_status() == "idle"
                   and "Idle" in self.status_bar() and self.kernel_ready(name),
                   f"{name} did not open with an idle kernel")
        return self

    def kernel_ready(self, name: str) -> bool:
        """The server's view: a session for ``name`` whose kernel has started and is idle (with a second
        notebook open, the page's indicators can still describe the first one's kernel)."""
        try:
            sessions = self.server._request("api/sessions")
        except OSError:
            return False
        return any(s.get("path") == name and (s.get("kernel") or {}).get("execution_state") == "idle"
                   for s in sessions or [])

    def status_bar(self) -> str:
        from selenium.webdriver.common.by import By

        return " ".join(e.text for e in self.driver.find_elements(By.CSS_SELECTOR, "#jp-main-statusbar"))

    def kernel_status(self) -> str | None:
        found = self.find(".jp-Notebook-ExecutionIndicator")
        return found[0].get_attribute("data-status") if found else None

    def menu(self, title: str, command: str):
        """Click ``title`` in the menu bar, then the item that runs ``command``."""
        from selenium.webdriver.common.by import By

        bar = self.driver.find_elements(By.CSS_SELECTOR, "#jp-MainMenu .lm-MenuBar-item")
        top = [item for item in bar if item.text == title]
        if not top:
            raise LookupError(f"no {title!r} in Lab's menu bar {[item.text for item in bar]}")
        top[0].click()
        item = self._wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'.lm-Menu-item[data-command="{command}"]'),
                          f"no {command} in the {title} menu", timeout=10)
        item[0].click()

    def prompts(self) -> list[str]:
        # textContent, not .text: Lab skips painting cells outside the viewport, and Selenium's .text is
        # the painted text only
        return [e.get_attribute("textContent") for e in self.find(".jp-CodeCell .jp-InputPrompt")]

    def run_all(self, quiet: float = 2.0) -> list[str]:
        """Run → Run All Cells; return the prompts once a cell has run, none is queued, and the kernel has
        been idle for ``quiet`` seconds in a row (Lab stops at a failing cell: the cells after it keep
        ``[ ]:``; a cell whose input is hidden shows no prompt at all)."""
        self.menu("Run", "runmenu:run-all")
        from selenium.common.exceptions import TimeoutException

        started = lambda d: any(p == "[*]:" or p[1:-2].isdigit() for p in self.prompts())  # noqa: E731
        try:  # a click that reached the notebook queues or runs a cell within seconds
            self._wait(started, "", timeout=15)
        except TimeoutException:  # it met a notebook not ready yet and did nothing (nothing ran): click again
            self.menu("Run", "runmenu:run-all")
        idle_since = None

        def finished(_):
            nonlocal idle_since
            prompts = self.prompts()
            done = (any(p[1:-2].isdigit() for p in prompts) and "[*]:" not in prompts
                    and self.kernel_status() == "idle")
            idle_since = (idle_since or time.monotonic()) if done else None
            return done and time.monotonic() - idle_since >= quiet

        self._wait(finished, "Run All Cells did not finish")
        return self.prompts()

    def save(self, path: Path) -> tuple[list, list]:
        """File → Save Notebook; wait until ``path`` on disk changed; return ``saved_run(path)``."""
        before = path.stat().st_mtime_ns
        self.menu("File", "docmanager:save")
        self._wait(lambda _: path.stat().st_mtime_ns != before, f"{path.name} was not saved", timeout=30)
        return saved_run(path)

    def slider_state(self) -> tuple | None:
        """(readout text, image src) of the first slider and interact's figure, or None while either is missing."""
        readout, image = self.find(".widget-slider .widget-readout"), self.find(".widget-output img")
        if not (readout and image):
            return None
        return readout[0].get_attribute("textContent"), image[0].get_attribute("src")

    def nudge(self, key_name: str = "ARROW_RIGHT") -> tuple:
        """Press an arrow key on the first slider; return (readout, image src) before and after the redraw."""
        from selenium.webdriver.common.keys import Keys

        before = self._wait(lambda _: self.slider_state(), "no ipywidgets slider with a figure below it", 60)
        self.find(".widget-slider .noUi-handle")[0].send_keys(getattr(Keys, key_name))  # focuses it first

        def redrawn(_):
            now = self.slider_state()
            return now if now and now[0] != before[0] and now[1] != before[1] else None

        return before, self._wait(redrawn, "the figure did not redraw after the slider moved", timeout=60)

    def screenshot(self, path: Path, scroll_to: str | None = None):
        if scroll_to and self.find(scroll_to):
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", self.find(scroll_to)[0])
            time.sleep(0.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
