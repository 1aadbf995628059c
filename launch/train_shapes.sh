#!/usr/bin/env bash
# Trains the embedded default model from scratch: the synthetic captioned-shapes data, then every stage with
# `python -m unclip_jax.train`, then a bundle. CPU-sized (configs/*.py:shapes); a GPU just runs it faster.
#   bash launch/train_shapes.sh [OUT_DIR]          (default runs/shapes; BUNDLE=dir to choose where the bundle goes)
# Resumable: stop it at any point and rerun the same command (finished steps are skipped, training resumes).
# TRAIN_FLAGS: extra flags for every `python -m unclip_jax.train`, e.g. a short rehearsal
#   N=200 TRAIN_FLAGS="--config.num_train_steps=4 --config.eval_every=0" bash launch/train_shapes.sh /tmp/r
# Steps, each timed in OUT_DIR/times.json:
#   1. data      two shapes datasets of N (20000) 64x64 images: "full" (every colour x shape pair) for CLIP, and
#                "train" without the HOLDOUT pairs for the prior, decoder and upsampler (zero-shot composition)
#   2. clip      contrastive CLIP on "full" (32x32 inputs)
#   3. embed     CLIP embeddings of "train", precomputed once (python -m unclip_jax.data.precompute)
#   4. prior     diffusion prior on the embeddings
#   5. decoder   16x16 decoder on "train" + embeddings
#   6. upsampler 16 -> 64 super-resolution on "train"
#   7. bundle    EMA weights of every stage -> BUNDLE (python -m unclip_jax.convert from-training), fp16
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/runs/shapes}"
bundle="${BUNDLE:-$out/bundle}"
n="${N:-20000}"
holdout="${HOLDOUT:-red triangle,green circle,blue square,purple triangle}"
read -r -a flags <<< "${TRAIN_FLAGS:-}"
source "$root/launch/steps.sh"   # $py (the venv, set up if missing), environment, $out, cd $root, step
data="$out/data"
full="$data/image_text/full/1.0.0"; train="$data/image_text/train/1.0.0"; emb="$data/embeddings/train_clip/1.0.0"
step data bash -c "'$py' -m unclip_jax.shapes.data --out '$data' --n $n --size 64 --name full --seed 0 --overwrite && \
  '$py' -m unclip_jax.shapes.data --out '$data' --n $n --size 64 --name train --seed 1 --holdout '$holdout' --overwrite"
step clip "$py" -m unclip_jax.train --config=configs/clip.py:shapes --workdir="$out/clip" \
  --config.data.dirs="('$full',)" "${flags[@]}"
step embed "$py" -m unclip_jax.data.precompute --data "$train" --clip "$out/clip" --out "$data" --name train_clip \
  --batch-size 256 --overwrite
step prior "$py" -m unclip_jax.train --config=configs/prior.py:shapes --workdir="$out/prior" --config.data.dirs="('$emb',)" "${flags[@]}"
step decoder "$py" -m unclip_jax.train --config=configs/decoder.py:shapes --workdir="$out/decoder" \
  --config.data.dirs="('$train', '$emb')" "${flags[@]}"
step upsampler "$py" -m unclip_jax.train --config=configs/upsampler.py:shapes --workdir="$out/upsampler" \
  --config.data.dirs="('$train',)" "${flags[@]}"
export_bundle() {   # EMA weights of every stage -> one fp16 bundle
  local c
  for c in clip:clip prior:prior decoder:decoder upsampler:super_res_first; do
    "$py" -m unclip_jax.convert from-training --workdir "$out/${c%%:*}" --component "${c##*:}" --dtype float16 \
      "$bundle" || return 1
  done
}
step bundle export_bundle
echo "bundle: $bundle"; cat "$times"
