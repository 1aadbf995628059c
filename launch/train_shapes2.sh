#!/usr/bin/env bash
# The attribute-binding study (unCLIP paper §7) in miniature: two-object captioned shapes
# (python -m unclip_jax.shapes.pairs), an unCLIP stack trained on them and a GLIDE-style text-only decoder of the
# same size as its control. CPU-sized (configs/*.py:shapes2); a GPU runs it unchanged, faster. Resumable: stop it
# at any point and rerun the same command to continue (finished steps are skipped, the trainer resumes exactly).
#   bash launch/train_shapes2.sh [OUT_DIR]          (default runs/shapes2)
# Environment: N (20000 images per dataset), HOLDOUT_FRACTION (0.1 of the 252 object pairs),
#   TRAIN_FLAGS (extra flags for every `python -m unclip_jax.train`, e.g. a short rehearsal:
#   TRAIN_FLAGS="--config.num_train_steps=20 --config.eval_every=0").
# Steps, each timed in OUT_DIR/times.json (2 ‖ 7 and 4 ‖ 5 ‖ 6 run side by side):
#   1. data         "full" (every object pair and phrasing; CLIP and the judge) and "train" (without the held-out
#                   object pairs and phrasings; prior, decoders, upsampler), N images each at 96²
#   2. clip         contrastive CLIP on "full" (32² inputs)
#   3. embed        CLIP embeddings of "train"
#   4. prior        diffusion prior
#   5. decoder      unCLIP decoder, 24², CLIP image embedding + text (configs/decoder.py:shapes2)
#   6. decoder_text the same UNet conditioned on the text only (configs/decoder.py:shapes2_text)
#   7. upsampler    24 -> 96 super-resolution
#   8. bundle       OUT/bundle (unCLIP) and OUT/bundle_text (the text-only decoder with the same CLIP, prior and
#                   upsampler, whose prior output it ignores), fp16
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/runs/shapes2}"
n="${N:-20000}"
fraction="${HOLDOUT_FRACTION:-0.1}"
read -r -a flags <<< "${TRAIN_FLAGS:-}"
source "$root/launch/steps.sh"   # $py (the venv, set up if missing), environment, $out, cd $root, step
data="$out/data"
full="$data/image_text/full/1.0.0"; train="$data/image_text/train/1.0.0"; emb="$data/embeddings/train_clip/1.0.0"
step data bash -c "'$py' -m unclip_jax.shapes.pairs --out '$data' --n $n --size 96 --name full --seed 0 --overwrite && \
  '$py' -m unclip_jax.shapes.pairs --out '$data' --n $n --size 96 --name train --seed 1 --holdout-fraction $fraction --overwrite"
# the upsampler needs only the images: it trains beside CLIP; the prior and both decoders train side by side
step clip "$py" -m unclip_jax.train --config=configs/clip.py:shapes2 --workdir="$out/clip" \
  --config.data.dirs="('$full',)" "${flags[@]}" &
step upsampler "$py" -m unclip_jax.train --config=configs/upsampler.py:shapes2 --workdir="$out/upsampler" \
  --config.data.dirs="('$train',)" "${flags[@]}" &
wait_steps
step embed "$py" -m unclip_jax.data.precompute --data "$train" --clip "$out/clip" --out "$data" --name train_clip \
  --batch-size 256 --overwrite
step prior "$py" -m unclip_jax.train --config=configs/prior.py:shapes2 --workdir="$out/prior" \
  --config.data.dirs="('$emb',)" "${flags[@]}" &
for d in decoder:shapes2 decoder_text:shapes2_text; do
  step "${d%%:*}" "$py" -m unclip_jax.train --config="configs/decoder.py:${d##*:}" --workdir="$out/${d%%:*}" \
    --config.data.dirs="('$train', '$emb')" "${flags[@]}" &
done
wait_steps
export_bundle() {   # export_bundle BUNDLE DECODER_WORKDIR: EMA weights of every stage -> one fp16 bundle
  local c
  for c in clip:clip prior:prior "$2":decoder upsampler:super_res_first; do
    "$py" -m unclip_jax.convert from-training --workdir "$out/${c%%:*}" --component "${c##*:}" --dtype float16 \
      "$1" || return 1
  done
}
step bundle export_bundle "$out/bundle" decoder
step bundle_text export_bundle "$out/bundle_text" decoder_text
echo "bundles: $out/bundle $out/bundle_text"; cat "$times"
