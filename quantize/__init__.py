"""Quantization: blockwise int4 weights (RTN, GPTQ, AWQ; QAT through distill/) in the form LiteRT runs."""
