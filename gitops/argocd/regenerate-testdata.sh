#!/bin/sh
# Rewrites the QLoRAJob health check's testdata/ and health_test.yaml from a live run: the
# operator drives real QLoRAJobs on the local cluster (started if it is not running), and every
# object it wrote is checked against health.lua and kstatus before it is saved.
#   gitops/argocd/regenerate-testdata.sh      # from the repository root, after `make demo` or `make test`
set -eu
cd "$(dirname "$0")/../.."
QLORA_ARGOCD_TESTDATA=write exec "${PYTHON:-.venv/bin/python}" -m pytest tests/test_gitops_health.py -q -k "live or operator_wrote"
