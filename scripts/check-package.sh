#!/usr/bin/env bash
# What a user of the published package gets: build the wheel, install it into a fresh virtual environment
# against constraints.txt, and run the CLI there. Then check that pip resolves the same install on the other
# supported Pythons (3.12, 3.13). Full installs there would download a CUDA build of torch (several GB): this
# machine keeps torch only for Python 3.11 on disk, so those two are resolved (pip --dry-run), not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m build --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/adn-*.whl)
echo "built $(basename "$wheel")"

# The wheel carries the package and nothing else (no tests, docs, run records).
"$PYTHON" - "$wheel" <<'EOF'
import sys
import zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
stray = [n for n in names if not (n.startswith("adn/") or n.startswith("adn-"))]
assert not stray, f"files outside the package in the wheel: {stray[:5]}"
assert "adn/cli/__init__.py" in names and "adn/core/skip.py" in names, "the wheel lacks adn's modules"
print(f"wheel holds {len(names)} files, all under adn/")
EOF

base=$(command -v python3.11 || command -v python3)
"$base" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet -c constraints.txt "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/adn" --help > "$work/help.txt"
grep -q "adn train" "$work/help.txt" || grep -q "train" "$work/help.txt"
(cd "$work" && venv/bin/python -c "import adn, adn.cli; print('fresh venv: adn', adn.__version__, 'imports; adn --help runs')")

for version in 3.12 3.13; do
    interpreter=""
    # (pyenv's shims exist for every installed version but run only the selected ones: try each candidate)
    for candidate in "$(command -v "python$version" 2>/dev/null || true)" "$HOME"/.pyenv/versions/"$version"*/bin/python"$version"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c pass 2>/dev/null; then
            interpreter=$candidate
            break
        fi
    done
    if [ -z "$interpreter" ]; then
        echo "Python $version: not on this machine, skipped"
        continue
    fi
    "$interpreter" -m venv "$work/venv$version"
    "$work/venv$version/bin/pip" install --quiet --dry-run --ignore-installed --report "$work/report$version.json" \
        -c constraints.txt "$wheel[timm,onnx,serve]" 2>&1 | grep -v "^WARNING: Location" || true
    "$PYTHON" - "$work/report$version.json" "$version" <<'EOF'
import json
import sys
report = json.load(open(sys.argv[1]))
chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
assert "torch" in chosen and "adn" in chosen, f"pip did not resolve adn with torch: {sorted(chosen)[:10]}"
print(f"Python {sys.argv[2]}: pip resolves adn {chosen['adn']} with torch {chosen['torch']} and "
      f"{len(chosen) - 2} other packages within constraints.txt")
EOF
done
