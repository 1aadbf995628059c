"""Precomputed CLIP embeddings: written in dataset order and equal to transformers' CLIPModel on the same inputs."""
import numpy as np
import pytest
import torch
import transformers

from unclip_jax.data import image_processing, pipeline, precompute, tokenizer
from unclip_jax.shapes import data as shapes

N = 5   # not a multiple of the batch size: the padded last batch must be trimmed


def _tiny_hf_clip(path):
  text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
  vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, hidden_act="quick_gelu")
  model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.eval().save_pretrained(path)
  return model


def test_embeddings_match_transformers_in_dataset_order(tmp_path):
  data = shapes.build(tmp_path / "data", N, image_size=40, seed=3)
  torch_model = _tiny_hf_clip(tmp_path / "hf")
  out = precompute.precompute(data, tmp_path / "hf", tmp_path / "emb", batch_size=2)
  rows, features = pipeline.open_source(out)
  assert len(rows) == N and set(features) == {"image_emb", "text_emb", "text_enc", "text_mask", "tokens"}
  source, _ = pipeline.open_source(data)
  captions = [source[i]["caption"].decode() for i in range(N)]
  ids, mask = tokenizer.tokenize(captions)
  pixels = image_processing.preprocess([source[i]["image"] for i in range(N)], size=32, crop_size=32)
  with torch.no_grad():
    want = torch_model(input_ids=torch.from_numpy(ids).long(),
                       pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  got = {k: np.stack([rows[i][k] for i in range(N)]) for k in features}
  np.testing.assert_array_equal(got["tokens"], ids)
  np.testing.assert_array_equal(got["text_mask"], mask)
  # CLIPModel returns unit embeddings; ours are the unnormalised projections (what Karlo's prior/decoder consume)
  # (transformers 5: the towers' pooler_output inside CLIPModel's output is the projected, unnormalised embedding)
  text_emb = want.text_model_output.pooler_output.numpy()
  image_emb = want.vision_model_output.pooler_output.numpy()
  np.testing.assert_allclose(got["text_emb"], text_emb, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got["image_emb"], image_emb, atol=1e-4, rtol=1e-4)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit(got["text_emb"]), want.text_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(got["text_enc"], want.text_model_output.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)


def test_bad_sources_are_named(tmp_path):
  data = shapes.build(tmp_path / "data", 2, image_size=16, seed=0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    precompute.precompute(data, tmp_path / "nope", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    precompute.precompute(data, tmp_path / "empty", tmp_path / "out")
  assert precompute.main(["--data", str(data), "--clip", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
