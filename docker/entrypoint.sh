#!/bin/sh
# The image's entry point: `docker run IMAGE ARGS...` runs `lmforge ARGS...`
#   docker run lmforge:dev --help                 -> lmforge --help
#   docker run lmforge:dev pretrain --config ...  -> lmforge pretrain --config ...
# unless the first argument is a program on PATH (sh, python3, ray, lmforge, ...), which then runs
# as given: Kubeflow Pipelines' components (`sh -c ...`, `python3 -m kfp...`), `ray start` for the Ray
# head and workers. (Kubernetes' `command:` replaces this entry point altogether.)
set -e
if [ "$#" -eq 0 ]; then
  exec lmforge --help
fi
case "$1" in
  -*) exec lmforge "$@" ;;
esac
if command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec lmforge "$@"
