#!/usr/bin/env bash
# Installs Fashion-MNIST for offline use where Debian's apt is available (package dataset-fashion-mnist,
# files in /usr/share/datasets/fashion-mnist). Elsewhere adn lets torchvision download it at first use.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST: found in $DIR"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    if $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 && [ -d "$DIR" ]; then
      echo "Fashion-MNIST: installed in $DIR"
      exit 0
    fi
  fi
fi
echo "Fashion-MNIST: apt package not available here; torchvision will download it on first use"
exit 0
