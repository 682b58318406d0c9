"""A form built from a notebook's parameters that launches a papermill run in a subprocess.

``Launcher(notebook)`` reads the notebook's parameters cell with ``papermill.inspect_notebook``, makes one
widget per parameter (a dropdown for the profile, a text box holding a YAML value for the rest; empty means
"the profile's value"), and on "Run" starts ``python -m vitadapt.runner --nb <notebook> --force -p ...`` in a
subprocess. A progress bar follows the executed cells of the running notebook; when the run ends, the tables it
saved (``*.csv`` in its output folder) are shown, or the error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from vitadapt.config import PROFILES, load_yaml
from vitadapt.paths import NOTEBOOKS, OUTPUTS, REPO_ROOT


def notebook_path(name: str) -> Path:
    nbs = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    for p in nbs:
        if name in (p.stem, p.name, p.stem[:2]):
            return p
    raise ValueError(f"notebook={name!r} is not valid; valid values: {', '.join(p.stem for p in nbs)}")


def notebook_parameters(path: Path) -> dict[str, dict]:
    import papermill as pm
    return pm.inspect_notebook(str(path))


def parse_value(text: str):
    """A form value: '' means None (take the profile's value); anything else is read as YAML."""
    text = text.strip()
    if not text:
        return None
    try:
        return load_yaml(text)                 # as -p and the config files: 5e-4 is a number
    except yaml.YAMLError as e:
        raise ValueError(f"value {text!r} is not valid YAML ({e.problem})") from None


def cell_progress(nb_file: Path) -> tuple[int, int]:
    """(finished code cells, code cells) of a notebook papermill is writing."""
    try:
        nb = json.loads(Path(nb_file).read_text())
    except (OSError, ValueError):
        return 0, 0
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    done = sum(1 for c in code if c.get("metadata", {}).get("papermill", {}).get("status") == "completed")
    return done, len(code)


class Launcher:
    def __init__(self, notebook: str, profile: str = "smoke"):
        import ipywidgets as W
        self.path = notebook_path(notebook)
        self.name = self.path.stem
        self.params = notebook_parameters(self.path)
        self.widgets: dict[str, W.Widget] = {}
        for name, p in self.params.items():
            if name == "profile":
                w = W.Dropdown(options=list(PROFILES), value=profile, description="profile")
            else:
                default = p["default"]
                w = W.Text(value="" if default == "None" else default, description=name,
                           placeholder="profile value", style={"description_width": "140px"})
            w.tooltip = p["help"]
            self.widgets[name] = w
        self.button = W.Button(description="Run", button_style="primary")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="cells")
        self.status = W.HTML()
        self.output = W.Output()
        self.button.on_click(lambda _: self.launch())
        self.form = W.VBox([W.HTML(f"<b>{self.name}</b>"), *self.widgets.values(), self.button, self.progress,
                            self.status, self.output])
        self.process: subprocess.Popen | None = None

    # ---- values ---------------------------------------------------------------------------------
    def parameters(self) -> dict:
        """The run's parameters from the form (those left empty are not passed)."""
        out = {}
        for name, w in self.widgets.items():
            value = w.value if name == "profile" else parse_value(w.value)
            if value is not None:
                out[name] = value
        return out

    def command(self) -> list[str]:
        params = self.parameters()
        cmd = [sys.executable, "-m", "vitadapt.runner", "--profile", params.pop("profile", "smoke"), "--nb",
               self.name, "--force"]
        for k, v in params.items():
            cmd += ["-p", k, json.dumps(v)]     # JSON is YAML: the runner parses it back
        return cmd

    @property
    def out_dir(self) -> Path:
        return OUTPUTS / self.parameters().get("profile", "smoke") / self.name

    # ---- running --------------------------------------------------------------------------------
    def launch(self, wait: bool = False) -> subprocess.Popen:
        if self.process is not None and self.process.poll() is None:
            self.status.value = "a run is already going"
            return self.process
        cmd = self.command()
        self.status.value = "running: <code>" + " ".join(cmd[1:]) + "</code>"
        self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        watcher = threading.Thread(target=self._watch, daemon=True)
        watcher.start()
        if wait:
            watcher.join()
        return self.process

    def _watch(self) -> None:
        out_dir = self.out_dir
        while self.process.poll() is None:
            running = sorted(out_dir.glob(f".{self.name}.running-*.ipynb"))
            if running:
                done, total = cell_progress(running[-1])
                self.progress.max, self.progress.value = max(total, 1), done
            time.sleep(0.5)
        log = self.process.stdout.read() if self.process.stdout else ""
        ok = self.process.returncode == 0
        self.progress.value = self.progress.max if ok else self.progress.value
        self.status.value = ("done" if ok else "FAILED") + f" (exit {self.process.returncode})"
        self.output.clear_output()
        with self.output:
            if ok:
                self.show_results(out_dir)
            else:
                print(log[-3000:])

    @staticmethod
    def show_results(out_dir: Path) -> None:
        import pandas as pd
        from IPython.display import display
        tables = sorted(out_dir.glob("*.csv"))
        for t in tables:
            print(t.name)
            display(pd.read_csv(t, index_col=0))
        if not tables and (out_dir / "metrics.json").exists():
            print(json.dumps(json.loads((out_dir / "metrics.json").read_text())["metrics"], indent=1)[:3000])
