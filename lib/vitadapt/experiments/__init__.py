"""One module per notebook: its config dataclass and the functions its cells call."""
