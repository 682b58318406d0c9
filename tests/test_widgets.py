"""The ablation panel, headless: widget values become the run's parameters."""

import pytest

pytest.importorskip("ipywidgets")

from vitadapt.widgets import ablation_panel  # noqa: E402


def test_setting_widgets_gives_the_runs_parameters():
    calls = []
    fields = {"cvr": ("drift", ["drift", "norm", "both", "none"]), "cvr_weight": (1.0, None),
              "lora_rank": (8, [2, 8, 32]), "steps": (10, None), "ensemble": (True, None), "domain": ("aid", None)}
    panel = ablation_panel(fields, lambda **kw: calls.append(kw) or "result")
    assert panel.values() == {k: v for k, (v, _) in fields.items()}
    panel.controls["cvr"].value = "none"
    panel.controls["cvr_weight"].value = 10.0
    panel.controls["lora_rank"].value = 32
    panel.controls["steps"].value = 3
    panel.controls["ensemble"].value = False
    panel.controls["domain"].value = "digits"
    panel.button.click()                               # what a user's click does
    assert calls == [{"cvr": "none", "cvr_weight": 10.0, "lora_rank": 32, "steps": 3, "ensemble": False,
                      "domain": "digits"}]
    assert panel.last_result == "result" and panel.last_error is None
    assert "done" in panel.status.value
    panel.set(steps=5).run()
    assert calls[-1]["steps"] == 5 and panel.calls == calls


def test_errors_are_shown_not_raised_and_bad_fields_fail():
    def boom(**kw):
        raise ValueError("lora_rank=0 is not valid")
    panel = ablation_panel({"lora_rank": (8, None)}, boom)
    panel.button.click()
    assert isinstance(panel.last_error, ValueError) and "lora_rank=0" in panel.status.value
    assert not panel.button.disabled
    with pytest.raises(ValueError, match="not among its options"):
        ablation_panel({"cvr": ("l2", ["drift", "none"])}, boom)
    with pytest.raises(ValueError, match="cannot make a control"):
        ablation_panel({"x": ([1], None)}, boom)
    with pytest.raises(ValueError, match="unknown field"):
        panel.set(rank=2)
    with pytest.raises(ValueError, match="empty"):
        ablation_panel({}, boom)


def test_errors_are_recorded_in_a_live_kernel_too():
    """In a kernel (an IPython shell exists) the Output widget's context manager shows and swallows an exception
    raised inside it: the panel must still record it and say "failed", not "done"."""
    from IPython.core.interactiveshell import InteractiveShell
    had = InteractiveShell.initialized()
    InteractiveShell.instance()
    try:
        def boom(**kw):
            raise ValueError("rank=0 is not valid")
        panel = ablation_panel({"rank": (8, None)}, boom)
        panel.button.click()
        assert isinstance(panel.last_error, ValueError) and panel.status.value.startswith("failed: ValueError")
        ok = ablation_panel({"rank": (8, None)}, lambda **kw: kw["rank"] * 2)
        ok.button.click()
        assert ok.last_result == 16 and ok.last_error is None and ok.status.value.startswith("done")
    finally:
        if not had:
            InteractiveShell.clear_instance()


def test_upstep_panel_fields_drive_run_single_parameters():
    from vitadapt.config import build_config
    from vitadapt.experiments import upstep as U
    cfg = build_config(U.UpStepConfig, "smoke", "21_upstep_ablations")
    seen = []
    panel = ablation_panel(U.panel_fields(cfg), lambda **kw: seen.append(kw))
    panel.set(cvr="none", gate="cv_signal", lora_rank=16, steps=4, lr=0.01)
    panel.run()
    kw = dict(seen[0])
    seed, domain = kw.pop("seed"), kw.pop("domain")
    assert seed in cfg.seeds and domain == cfg.target_for_ablations
    import dataclasses
    vcfg = dataclasses.replace(cfg, **kw)              # every other knob is a valid config override
    assert (vcfg.cvr, vcfg.gate, vcfg.lora_rank, vcfg.steps, vcfg.lr) == ("none", "cv_signal", 16, 4, 0.01)
