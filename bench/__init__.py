"""Benchmarks: run exported artifacts on CPU, in the LiteRT-LM engine or through a delegate; speed and quality."""
