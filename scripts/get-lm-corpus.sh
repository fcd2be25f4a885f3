#!/usr/bin/env bash
# Installs the default text corpus of `adn train-lm` / `adn eval-lm`: the English documentation of Python 3.11,
# Debian package python3.11-doc (its reStructuredText sources under /usr/share/doc/python3.11/html/_sources).
# Elsewhere pass --text PATH (a text file or a folder of .txt/.md/.rst files).
set -u
DIR=/usr/share/doc/python3.11/html/_sources
if [ -d "$DIR" ]; then
  echo "LM corpus: found in $DIR"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "LM corpus: installing Debian package python3.11-doc"
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    if $SUDO apt-get install -y -qq python3.11-doc >/dev/null 2>&1 && [ -d "$DIR" ]; then
      echo "LM corpus: installed in $DIR"
      exit 0
    fi
  fi
fi
echo "LM corpus: python3.11-doc is not available here; pass --text PATH to adn train-lm / eval-lm" >&2
exit 1
