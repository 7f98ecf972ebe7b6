#!/usr/bin/env bash
# Runs every example program (CI), or the ones named as arguments; stops with a non-zero exit status at the
# first one that fails. Examples named distributed_* run on two local processes launched by torchrun (the
# torch.distributed.run module of the same Python), gloo on the loopback interface, on a free port.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if [ $# -eq 0 ]; then set -- *.py; fi
for example in "$@"; do
    echo "== $example"
    case "$example" in
        distributed_*)
            # OMP_NUM_THREADS=1: one thread per rank (torchrun would set it too, with a warning).
            GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nnodes 1 \
                --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$(free_port)" "$example" ;;
        *)
            "$PYTHON" "$example" ;;
    esac
done
