"""64x64 decoder: GLIDE/ADM UNet conditioned on CLIP image embeddings and text (Karlo decoder sizes).

`model` is read by `unclip_jax.stages.builders.unet` (UNet fields) and by the text pathway named in
`model.text_encoder`:
  "text_proj" (Karlo): `builders.text_proj` (clip_embedding_dim, clip_extra_context_tokens, cross_attention_dim;
    time_embed_dim, None = 4·block_out_channels[0]);
  "glide": `builders.glide_text` (text_ctx, xf_width = cross_attention_dim, xf_layers, xf_heads, xf_final_ln,
    xf_padding, n_vocab);
  "glide_clip" (the unCLIP paper's decoder): `builders.glide_clip`, the "glide" fields plus clip_embedding_dim and
    clip_extra_context_tokens; trains on the caption tokens of the embedding datasets (padded to text_ctx).
The tiny variant runs any: `--config.model.text_encoder=glide` (or `glide_clip`) switches it to a 2-layer GLIDE
text encoder.
`paper`: the unCLIP paper's 64² decoder sizes (see the variant).
Compute dtype and remat policy are the top-level `dtype` / `remat_policy` (config_lib.base_config).
"""
import ml_collections as mlc

from unclip_jax import config_lib

VARIANTS = ("tiny", "karlo", "glide", "paper", "shapes", "shapes2", "shapes2_text")


def get_config(arg: str = ""):
  variant = config_lib.select_variant(arg, VARIANTS, default="karlo")
  c = config_lib.base_config("decoder")
  c.variant = variant
  c.model = mlc.ConfigDict(dict(
      image_size=64,
      conditioning="none",          # "none" | "inpaint" (GLIDE: extra [image·mask, mask] channels)
      in_channels=None,             # None: derived from `conditioning` (3 or 7); else must agree with it
      out_channels=6,               # [eps, v] (learned_range variance)
      block_out_channels=(320, 640, 960, 1280), layers_per_block=3,
      attention_levels=(False, True, True, True), mid_block_attention=True, head_dim=64,
      # "auto" (cuDNN flash attention on CUDA GPUs in bf16/fp16, Pallas splash on TPU, else XLA) | "xla" | "cudnn"
      # | "splash" (models.layers.resolve_attention)
      attention="auto",
      cross_attention_dim=1536, class_embed_type="identity",
      time_scale_shift="scale_shift", norm_num_groups=32, dropout=0.1,
      time_embed_dim=None,          # None: 4·block_out_channels[0]
      flip_sin_to_cos=True, freq_shift=0.0, center_input_sample=False,   # timestep sinusoid / input options
      clip_embedding_dim=768, clip_extra_context_tokens=4,     # text_proj
      # "text_proj" (Karlo: CLIP text + image embeddings) | "glide" (GLIDE transformer) | "glide_clip" (the paper's:
      # GLIDE transformer + CLIP image embedding)
      text_encoder="text_proj",
      # GLIDE text transformer ("glide", "glide_clip"): end_token = n_vocab - 1 pads (GPT-2 BPE's <|endoftext|>, and
      # CLIP BPE's end of text when n_vocab = 49408); with xf_padding pads get a learned embedding whatever their id.
      text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True, n_vocab=50257,
  ))
  c.diffusion = config_lib.diffusion_config(prediction="eps", variance="learned_range", loss="hybrid")
  c.sampling = config_lib.sampling_config(steps="25", guidance_scale=8.0, clip_range=1.0)
  c.sampling.update(config_lib.inpainting_config())
  # None: plain guidance over [uncond; cond]. A number: a separate scale for the text, three branches
  # [uncond; CLIP image only; image + text] guided as u + s·(i − u) + s_text·(c − i) (samplers.SamplerSettings).
  c.sampling.text_guidance_scale = None
  c.clip_drop_prob = 0.1
  c.text_drop_prob = 0.5
  # What dropped text (training) and the uncond branch (sampling) see: "zeros" (zero embedding/tokens, all tokens
  # masked) or "empty_prompt" (the CLIP encoding of "", as Karlo and diffusers' UnCLIPPipeline).
  c.null_text = "zeros"
  # False: a GLIDE-style text-only decoder. The CLIP image embedding is never seen: every row, in training and in
  # both guidance halves, gets text_proj's learned null image embedding, so only the CLIP text conditions the UNet.
  c.image_conditioning = True
  if variant == "glide":
    # GLIDE base trunk (Nichol et al. 2021); the text comes from GlideTextEncoder (xf_width 512), no text_proj.
    c.model.update(block_out_channels=(192, 384, 576, 768), cross_attention_dim=512, text_encoder="glide")
    c.sampling.update(steps="100", guidance_scale=3.0)
    c.text_drop_prob = 0.2          # GLIDE: 20% of captions replaced by the empty token sequence
  if variant == "paper":
    # Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents" (arXiv:2204.06125),
    # Appendix C, Table 3, column "64" (the decoder, 3.5B): GLIDE's 64² trunk, 512 channels × (1, 2, 3, 4), 3 res blocks
    # per level, attention at 32, 16 and 8 (and the middle block), 64-wide heads, dropout 0.1; its text transformer:
    # context 256, width 2048, 24 layers, 32 heads (the xf_* fields; the UNet attends to width-2048 tokens); 1000 cosine
    # steps, sampled with 250 steps and the learned variance; batch 2048, 800K iterations, lr 1.2e-4, Adam β2 0.999, ε
    # 1e-8, EMA 0.9999. CLIP embeddings are the paper's ViT-H/16 (1024 wide). As in the paper (§2.1) the UNet gets
    # the GLIDE transformer's tokens plus 4 tokens projected from the CLIP image embedding, which is also added to
    # the time embedding: text_encoder "glide_clip" (models/glide_clip.py). 3.5B = the UNet + the transformer + the
    # CLIP projections (tests/test_paper_configs.py). Trained here, its captions are CLIP BPE ids (what the embedding
    # datasets store and the pipeline's tokenizer gives, n_vocab >= 49408); `--config.model.text_encoder=text_proj`
    # gives the Karlo-style conditioning at this size.
    c.model.update(block_out_channels=(512, 1024, 1536, 2048), layers_per_block=3,
                   attention_levels=(False, True, True, True), mid_block_attention=True, head_dim=64,
                   cross_attention_dim=2048, clip_embedding_dim=1024, dropout=0.1, text_encoder="glide_clip",
                   text_ctx=256, xf_width=2048, xf_layers=24, xf_heads=32)
    c.sampling.update(steps="250")
    c.batch_size = 2048
    c.num_train_steps = 800_000
    c.optim.update(lr=1.2e-4, b2=0.999, eps=1e-8, ema_decay=0.9999)
  if variant in ("shapes", "shapes2", "shapes2_text"):
    # 16² (the classifier reads bicubic 16->64 real images 100% right on colour, shape and background: the facts
    # survive at this size), so 2 CPU cores afford enough steps; the upsampler takes it to 64².
    c.model.update(image_size=16, block_out_channels=(32, 64, 96), layers_per_block=1,
                   attention_levels=(False, True, True), head_dim=32, cross_attention_dim=64,
                   clip_embedding_dim=64, norm_num_groups=8, dropout=0.0)
    # v-prediction (not Karlo's ε): x̂0 stays accurate at the high-noise steps that fix colours and layout, where
    # ε-prediction's x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ amplifies small errors (ᾱ ≈ 0 at T under the cosine schedule).
    c.diffusion.prediction = "v"
    # min-SNR-5 weighting (Hang et al. 2023): the MSE of nearly clean steps (SNR > 5, edges the upsampler redraws
    # anyway) weighs less, the mid-noise steps where a 5-10 px shape becomes a circle or a square weigh more.
    c.diffusion.loss_weighting = "min_snr"
    c.sampling.update(steps="25", guidance_scale=3.0)
    c.batch_size = 32
    c.num_train_steps = 14000
    c.optim.update(lr=7e-4, warmup_steps=200, ema_decay=0.999)
    c.eval_every, c.eval_examples = 2000, 16
    c.log_every, c.ckpt_every = 100, 1000
    c.dtype = "float32"
  if variant in ("shapes2", "shapes2_text"):
    # Two-object shapes (unclip_jax.shapes.pairs): objects of 20-40 % of the side are 4.8-9.6 px at 24², the sizes
    # the single-object model draws right at 16², so the decoder runs at 24² and the upsampler takes it to 96².
    # "shapes2_text" is the same UNet as a GLIDE-style text-only decoder (image_conditioning False), the control of
    # the binding study (unCLIP paper §7).
    c.model.image_size = 24
    c.image_conditioning = variant == "shapes2"
    # 4,500 steps: what fits one 3-hour session on 2 CPU cores with CLIP, the prior and the evaluation (both decoders
    # side by side: ~0.65 steps/s each beside the prior, ~0.95 after); 2,000 were too few (docs/binding.md).
    c.num_train_steps = 4500
    c.ckpt_every = 500
  if variant == "tiny":
    c.model.update(image_size=16, block_out_channels=(16, 32, 48), layers_per_block=2,
                   attention_levels=(False, True, True), head_dim=8, cross_attention_dim=24,
                   clip_embedding_dim=32, norm_num_groups=8, dropout=0.0,
                   text_ctx=8, xf_width=24, xf_layers=2, xf_heads=4, n_vocab=50)   # xf_width = cross_attention_dim
    c.batch_size = 8
  return c
