"""The captioned-shapes experiment behind the embedded default model: its dataset and its evaluation."""
