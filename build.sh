#!/usr/bin/env bash
# Builds dist/hepop: one self-contained executable (Python, pyarrow and DuckDB inside) with PyInstaller.
# Needs only Python 3 with pip and venv; makes its own virtual environment in .venv-build.
# Safe to run again: the environment is reused and the binary rebuilt from scratch.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv-build
.venv-build/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt pyinstaller==6.22.3

# The spec is generated here, not kept: pyarrow's hook bundles every pyarrow library, and the ones hepop
# never loads (Flight, GCS, Azure, HDFS, ORC) are dropped from it; S3 stays, for S3_URL. That takes a third off
# the binary, and so off the time a one-file binary takes to unpack at each start.
rm -rf build/spec && mkdir -p build/spec
.venv-build/bin/pyi-makespec --onefile --name hepop --specpath build/spec --collect-submodules duckdb \
  --exclude-module pandas --exclude-module tkinter --exclude-module pyarrow.flight --add-data "$PWD/ui:ui" \
  "$PWD/hepop.py" >/dev/null
.venv-build/bin/python - build/spec/hepop.spec <<'PY'
import sys
path = sys.argv[1]
spec = open(path).read()
unused = ("flight", "gcsfs", "azurefs", "hdfs", "orc")
spec = spec.replace("pyz = PYZ(", "a.binaries = [b for b in a.binaries if not (b[0].startswith('pyarrow/') and "
                    f"any(word in b[0] for word in {unused!r}))]\npyz = PYZ(", 1)
open(path, "w").write(spec)
PY
.venv-build/bin/pyinstaller --clean --noconfirm --log-level WARN --distpath dist --workpath build/work \
  build/spec/hepop.spec
version=$(dist/hepop --version)           # also proves that the binary starts
echo "built dist/hepop: $(du -h dist/hepop | cut -f1), $version"
