#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice and run the same command on every worker (gcloud --worker=all).
#
#   launch/tpu_pod.sh create   NAME ZONE ACCELERATOR [RUNTIME]     e.g. create ng-v5p v5p-128 us-east5-a
#   launch/tpu_pod.sh setup    NAME ZONE                           copy this checkout, install, on all workers
#   launch/tpu_pod.sh train    NAME ZONE CONFIG WORKDIR [--config.a.b=v ...]
#   launch/tpu_pod.sh aot      NAME ZONE --topology v5p-128 --model sd35_medium    (compile only)
#   launch/tpu_pod.sh delete   NAME ZONE
#
# WORKDIR is a path every worker sees: a gs://BUCKET/PATH is mounted with gcsfuse at /gcs/BUCKET on every worker
# (installed by `setup`) and the job runs with --workdir /gcs/BUCKET/PATH (orbax writes checkpoints there from every
# host); an NFS/Filestore path is used as is. Every worker runs the same command; jax.distributed is initialised from the TPU environment (normguard_jax/parallel/distributed.py).
# Rerunning `train` with the same WORKDIR resumes from the latest checkpoint (also after a preemption: the
# SIGTERM handler saves first). XLA/libtpu flags: launch/libtpu_flags.env.
set -euo pipefail
cmd=${1:?create|setup|train|aot|delete}; name=${2:?NAME}; zone=${3:?ZONE}; shift 3
repo_dir='~/normguard_jax'
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  create)
    accel=${1:?ACCELERATOR e.g. v5p-128}; runtime=${2:-v2-alpha-tpuv5}
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$runtime" ;;
  setup)
    tar czf /tmp/normguard_jax.tgz --exclude .venv --exclude .git --exclude digits_demo -C "$(dirname "$0")/.." .
    gcloud compute tpus tpu-vm scp /tmp/normguard_jax.tgz "$name":/tmp/ --zone "$zone" --worker=all
    ssh_all "mkdir -p $repo_dir && tar xzf /tmp/normguard_jax.tgz -C $repo_dir && cd $repo_dir && \
      python3 -m venv .venv && .venv/bin/pip install -q 'jax[tpu]' -r requirements.txt && \
      (command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) && \
        echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
        curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && \
        sudo apt-get update -q && sudo apt-get install -yq gcsfuse))" ;;
  train)
    config=${1:?CONFIG}; workdir=${2:?WORKDIR}; shift 2
    if [[ "$workdir" == gs://* ]]; then
      path=${workdir#gs://}; bucket=${path%%/*}
      ssh_all "mountpoint -q /gcs/$bucket || (sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket && \
        gcsfuse --implicit-dirs $bucket /gcs/$bucket)"
      workdir=/gcs/$path
    fi
    ssh_all "cd $repo_dir && source launch/libtpu_flags.env && \
      .venv/bin/python -m normguard_jax.train --config $config --workdir $workdir $* 2>&1 | tee -a ~/train.log" ;;
  aot)
    ssh_all "cd $repo_dir && source launch/libtpu_flags.env && .venv/bin/python -m normguard_jax.parallel.aot $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
