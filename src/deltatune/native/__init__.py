"""C sources deltatune compiles on first use, and the build that does it (:mod:`deltatune.native.build`).

- :mod:`deltatune.native.dropout` — dropout's keep-masks, masked copy and masked gradient for training on the CPU.

The mixed-adapter serving kernels live with serving (``deltatune/serving/csrc``) and are built here too.
"""
