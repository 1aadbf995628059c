"""Tokenization, dataset builders and input pipelines."""
