"""One module per foreign checkpoint format; each maps state dicts and configs, never model code."""
