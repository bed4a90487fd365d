#!/bin/sh
# The operator image's install steps. operator/Dockerfile runs them, and so does
# tests/test_operator_image.py in a fresh virtualenv, from the same files: what is tested is what ships.
#
#   operator/image/install.sh deps VENV      # a virtualenv holding exactly constraints.txt
#   operator/image/install.sh project VENV   # + the qlora_api and qlora_operator packages
#
# Run from the build context's root (the Dockerfile's WORKDIR). PYTHON picks the interpreter.
set -eu
step=$1
venv=$2
here=$(dirname "$0")
pip="$venv/bin/python -m pip --no-input --disable-pip-version-check"

case "$step" in
deps)
  "${PYTHON:-python3}" -m venv "$venv"
  # --no-deps: the pinned closure is the whole list, so no resolver picks anything else;
  # --only-binary: wheels exist for every pin on amd64 and arm64, and the image has no compiler.
  $pip install --no-deps --only-binary=:all: --requirement "$here/constraints.txt"
  ;;
project)
  # The project is one wheel built by a pinned backend (PIP_CONSTRAINT reaches pip's isolated
  # build environment); --no-deps, since its dependencies are the layer below.
  PIP_CONSTRAINT="$here/build-constraints.txt" $pip install --no-deps --no-compile .
  # venv seeds setuptools; nothing here needs it at run time (pip check below would say so).
  $pip uninstall --quiet --yes setuptools 2>/dev/null || true
  # kubernetes ships a second, asyncio copy of its whole client (about 68 MB, half the image);
  # the operator uses the synchronous client and kopf its own aiohttp one.
  rm -rf "$venv"/lib/python3*/site-packages/kubernetes/aio
  # Byte-compile now: the root filesystem is read-only at run time.
  "$venv/bin/python" -m compileall -q "$venv/lib"
  # Every installed package's requirements are met, and the entrypoint imports.
  $pip check
  "$venv/bin/qlora-operator" --help >/dev/null
  # pip has done its work; the image runs no installer.
  $pip uninstall --quiet --yes pip
  ;;
*)
  echo "usage: $0 deps|project VENV" >&2
  exit 2
  ;;
esac
