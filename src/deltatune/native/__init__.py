"""C sources deltatune compiles on first use, and the build that does it (:mod:`deltatune.native.build`).

- :mod:`deltatune.native.dropout` — dropout's keep-masks, masked copy and masked gradient for training on the CPU;
- :mod:`deltatune.native.dequant` — 4-bit weights: a tile dequantized in one pass, and x · Wᵀ for few rows with W
  decoded in registers.

The mixed-adapter serving kernels live with serving (``deltatune/serving/csrc``) and are built here too.
"""
