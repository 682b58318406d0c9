"""ipywidgets forms that launch runs inside the kernel.

:func:`ablation_panel` turns a dict of knobs into a small form with a *Run* button; pressing it calls
``run_fn(**values)`` and shows what it returns. The form is plain ipywidgets, so it also works headless (the
tests set the widget values and press the button programmatically).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Panel", "ablation_panel"]


def _control(name: str, default: Any, options):
    import ipywidgets as w
    style = {"description_width": "110px"}
    if options is not None:
        options = list(options)
        if default not in options:
            raise ValueError(f"{name}: default {default!r} is not among its options {options}")
        return w.Dropdown(options=options, value=default, description=name, style=style)
    if isinstance(default, bool):
        return w.Checkbox(value=default, description=name, style=style)
    if isinstance(default, int):
        return w.IntText(value=default, description=name, style=style)
    if isinstance(default, float):
        return w.FloatText(value=default, description=name, style=style)
    if isinstance(default, str):
        return w.Text(value=default, description=name, style=style)
    raise ValueError(f"{name}: cannot make a control for {default!r} ({type(default).__name__}); give options, or "
                     f"a bool, int, float or str default")


class Panel:
    """A form of named controls, a Run button and an output area.

    ``values()`` is what ``run_fn`` receives; ``run()`` (or clicking the button) calls it, keeps the return
    value in ``last_result`` (an exception in ``last_error``) and displays it in the output area.
    """

    def __init__(self, fields: dict[str, tuple[Any, Any]], run_fn: Callable[..., Any], title: str = "",
                 button: str = "Run"):
        import ipywidgets as w
        if not fields:
            raise ValueError("fields is empty: give at least one {name: (default, options or None)}")
        self.run_fn = run_fn
        self.controls = {}
        for name, spec in fields.items():
            default, options = spec if isinstance(spec, tuple) and len(spec) == 2 else (spec, None)
            self.controls[name] = _control(name, default, options)
        self.button = w.Button(description=button, button_style="primary")
        self.status = w.Label("")
        self.output = w.Output()
        self.button.on_click(lambda _: self.run())
        head = [w.HTML(f"<b>{title}</b>")] if title else []
        self.widget = w.VBox(head + list(self.controls.values()) + [w.HBox([self.button, self.status]), self.output])
        self.last_result: Any = None
        self.last_error: BaseException | None = None
        self.calls: list[dict] = []

    def values(self) -> dict[str, Any]:
        return {name: c.value for name, c in self.controls.items()}

    def set(self, **values) -> "Panel":
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; valid: {', '.join(self.controls)}")
        for k, v in values.items():
            self.controls[k].value = v
        return self

    def run(self):
        import time

        from IPython.display import display
        params = self.values()
        self.calls.append(params)
        self.button.disabled = True
        self.status.value = "running ..."
        t0 = time.perf_counter()
        self.output.clear_output()
        try:
            with self.output:       # captures what run_fn prints; in a live kernel it would also swallow an
                try:                # exception raised inside it, so the exception is caught here, first
                    self.last_result, self.last_error = self.run_fn(**params), None
                except Exception as e:  # shown in the form; the kernel stays usable
                    self.last_result, self.last_error = None, e
                if self.last_result is not None:
                    display(self.last_result)
        finally:
            self.button.disabled = False
        e = self.last_error
        self.status.value = (f"failed: {type(e).__name__}: {str(e)[:200]}" if e is not None
                             else f"done in {time.perf_counter() - t0:.1f} s")
        return self.last_result

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


def ablation_panel(fields: dict[str, tuple[Any, Any]], run_fn: Callable[..., Any], title: str = "") -> Panel:
    """A :class:`Panel` for ``fields`` = ``{name: (default, options)}`` (``options``: a list for a dropdown, or
    ``None`` for a text box typed by the default: bool, int, float or str) that calls ``run_fn(**values)``."""
    return Panel(fields, run_fn, title or "Re-run one configuration")
