"""`deltatune serve`: an OpenAI-compatible HTTP server over the mixed-adapter engine (:mod:`deltatune.serving`)."""
