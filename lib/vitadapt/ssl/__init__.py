"""Self-supervised objectives: DinoV2 (DINO + iBOT + KoLeo), MAE, UpStep (clustering + CVR + gate)."""
