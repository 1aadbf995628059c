"""Sampling pipelines: text -> CLIP -> prior -> decoder -> upsamplers, and the unCLIP image manipulations."""
