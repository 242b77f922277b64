#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice and run the same command on every worker (gcloud --worker=all).
#
#   launch/tpu_pod.sh create   NAME ZONE ACCELERATOR [RUNTIME]     e.g. create ng-v5p v5p-128 us-east5-a
#   launch/tpu_pod.sh setup    NAME ZONE                           copy this checkout, install, on all workers
#   launch/tpu_pod.sh train    NAME ZONE CONFIG WORKDIR [--skip-aot] [--config.a.b=v ...]
#   launch/tpu_pod.sh aot      NAME ZONE --config CONFIG --topology v5p-128 [--config.a.b=v ...]   (compile only)
#   launch/tpu_pod.sh delete   NAME ZONE
#
# WORKDIR is a path every worker sees: a gs://BUCKET/PATH is mounted with gcsfuse at /gcs/BUCKET on every worker
# (installed by `setup`) and the job runs with --workdir /gcs/BUCKET/PATH (orbax writes checkpoints there from every
# host); an NFS/Filestore path is used as is. Every worker runs the same command; jax.distributed is initialised from the TPU environment (normguard_jax/parallel/distributed.py).
# Rerunning `train` with the same WORKDIR resumes from the latest checkpoint (also after a preemption: the
# SIGTERM handler saves first). XLA/libtpu flags: launch/libtpu_flags.env.
# Before it starts, `train` compiles the recipe's programs ahead of time for the slice's topology on worker 0 (JAX on
# its CPU, normguard_jax/parallel/aot.py) and refuses to start a run whose step, rollout or VAE decode does not fit
# the chips' HBM (exit 3) or whose config does not build (exit 2); --skip-aot skips the check.
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
    skip_aot=0; overrides=()
    for a in "$@"; do if [ "$a" = --skip-aot ]; then skip_aot=1; else overrides+=("$a"); fi; done
    set -- ${overrides[@]+"${overrides[@]}"}
    if [ "$skip_aot" = 0 ]; then
      accel=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format='value(acceleratorType)')
      echo "AOT check: $config on $accel (worker 0, compile only; --skip-aot skips it)" >&2
      rc=0
      gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 --command "cd $repo_dir && \
        source launch/libtpu_flags.env && JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 \
        .venv/bin/python -m normguard_jax.parallel.aot --config $config --topology $accel $*" || rc=$?
      if [ "$rc" = 3 ]; then
        echo "refusing to start: the run does not fit $accel's HBM (see the table above); lower the per-chip rows" \
             "(rl.num_microbatches, rollout.chunk, model.decode_batch) or use a larger slice" >&2
        exit 3
      elif [ "$rc" != 0 ]; then
        echo "refusing to start: the AOT check failed (exit $rc); fix the config, or pass --skip-aot" >&2
        exit "$rc"
      fi
    fi
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
