"""The experiment protocol every notebook shares (see ARCHITECTURE.md).

- :mod:`~vitadapt.protocol.setup`: config -> torch, run record, dry-run decision, data and backbone, sources;
- :mod:`~vitadapt.protocol.grid`: jobs (variants x seeds, one-factor ablations) through the resumable job store;
- :mod:`~vitadapt.protocol.probe`: frozen features, linear probe and kNN rows;
- :mod:`~vitadapt.protocol.tables`: mean ± std, paired deltas, costs, "diverged" cells;
- :mod:`~vitadapt.protocol.figures`: bar panels and training curves;
- :mod:`~vitadapt.protocol.counts`: trainable parameters on the meta device (no weights, no memory);
- :mod:`~vitadapt.protocol.report`: summaries, rows of the shared results schema, metrics.json (always with
  ``results``), and the published numbers beside ours.

Experiment modules (:mod:`vitadapt.experiments`) keep only what differs between methods.
"""
