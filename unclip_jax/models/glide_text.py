"""GLIDE's text transformer (`Text2ImUNet.get_text_emb`, Nichol et al. 2021): tokens -> decoder conditioning.

  xf_in   = where(mask, token_embedding(tokens) + positional_embedding, padding_embedding)        # [B, ctx, W]
  xf_out  = final_ln(transformer(xf_in))        pre-LN blocks, bidirectional, NO attention mask   # [B, ctx, W]
  xf_proj = transformer_proj(xf_out[:, -1])     the LAST position (usually a pad)                 # [B, Temb]

  block   x += c_proj(attn(c_qkv(ln_1(x))));  x += mlp.c_proj(gelu_exact(mlp.c_fc(ln_2(x))))
  attn    c_qkv features are per-head interleaved [q_h0, k_h0, v_h0, q_h1, ...] (d = W/H each);
          softmax((q·d^-1/4)(k·d^-1/4)ᵀ) v, i.e. the usual d^-1/2 scale split over q and k (GLIDE's fp16 trick)

The UNet (models/unet.py, `class_embed_type="identity"`, `cross_attention_dim = W`) takes `class_labels = xf_proj`
(added to the time embedding) and `encoder_hidden_states = xf_out` in every attention block, with no text mask.
`conditioning` returns exactly those keyword arguments, the same dict shape as `UnCLIPTextProj.conditioning`, so
the decoder's sampler and trainer switch pathway by `model.text_encoder` ("text_proj" or "glide").

Without `xf_padding` GLIDE has no `padding_embedding` and ignores the mask; without `xf_final_ln` no `final_ln`.
Parameter names are GLIDE's keys (`transformer.resblocks.3.attn.c_qkv.weight` ↔
`transformer/resblocks_3/attn/c_qkv/kernel`, kernel columns kept in GLIDE's interleaved order), so
`convert/glide.py` only transposes.

Tokens: GLIDE uses GPT-2 BPE (`end_token = n_vocab - 1 = 50256`, no BOS/EOS), which unclip_jax does not ship. Any
GPT-2 BPE tokenizer can feed `padded_tokens_and_mask`, e.g. transformers 5 `GPT2Tokenizer(vocab=<vocab.json>,
merges=<merges.txt>)` from local files (GLIDE's `encoder.json` / `vocab.bpe`; `vocab_file=`/`merges_file=` are
silently ignored and give a 1-token tokenizer) with `ids = tok(caption.lower())["input_ids"]`: GLIDE's encoder
lowercases first. The unconditional (classifier-free guidance) input is the empty list: all `end_token`, mask False.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import layers

Dtype = Any

GLIDE_END_TOKEN = 50256                   # GPT-2 BPE <|endoftext|> = n_vocab - 1


def split_qkv(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GLIDE's fused projection output -> q, k, v.

  Args:
    qkv: [B, T, 3·H·d], features per-head interleaved [q_h0, k_h0, v_h0, q_h1, ...], each d long.
    heads: H.
  Returns:
    q, k, v, each [B, T, H, d].
  """
  b, t, f = qkv.shape
  if f % (3 * heads):
    raise ValueError(f"fused qkv width {f} is not divisible by 3·heads = {3 * heads}")
  d = f // (3 * heads)
  qkv = qkv.reshape(b, t, heads, 3 * d)
  return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]


class GlideAttention(nn.Module):
  """GLIDE `MultiheadAttention`: fused per-head c_qkv, unmasked softmax, c_proj.  [B, T, W] -> [B, T, W]."""
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, w = x.shape
    if w % self.heads:
      raise ValueError(f"xf_width {w} is not divisible by xf_heads={self.heads}")
    q, k, v = split_qkv(layers.dense(3 * w, ("embed", "heads"), self.dtype, "c_qkv")(x), self.heads)  # [B, T, H, d]
    s = (w // self.heads) ** -0.25                                 # d^-1/4 on q and on k (= d^-1/2 overall)
    out = jax.nn.dot_product_attention(q * s, k * s, v, scale=1.0)  # softmax in float32      [B, T, H, d]
    return layers.dense(w, ("heads", "embed"), self.dtype, "c_proj")(out.reshape(b, t, w))


class GlideMLP(nn.Module):
  """c_fc (4W) -> exact GELU -> c_proj.  [B, T, W] -> [B, T, W]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = x.shape[-1]
    h = layers.exact_gelu(layers.dense(4 * w, ("embed", "mlp"), self.dtype, "c_fc")(x))
    return layers.dense(w, ("mlp", "embed"), self.dtype, "c_proj")(h)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)).  [B, T, W] -> [B, T, W]."""
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + GlideAttention(self.heads, self.dtype, name="attn")(layers.layer_norm(self.dtype, "ln_1")(x))
    x = x + GlideMLP(self.dtype, name="mlp")(layers.layer_norm(self.dtype, "ln_2")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class GlideTransformer(nn.Module):
  """`layers` blocks named `resblocks_{i}` (GLIDE `transformer.resblocks.{i}`).  [B, T, W] -> [B, T, W]."""
  layers: int
  heads: int
  dtype: Dtype = jnp.float32
  remat: str = "none"

  def setup(self):
    block = layers.maybe_remat(ResidualAttentionBlock, self.remat)
    self.resblocks = [block(self.heads, self.dtype) for _ in range(self.layers)]

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.resblocks:
      x = block(x)
    return x


class GlideTextEncoder(nn.Module):
  """GLIDE `Text2ImUNet` text encoder (`get_text_emb`), GLIDE hyper-parameter names.

  Attributes:
    n_vocab: token vocabulary (GPT-2 BPE: 50257).
    text_ctx: sequence length; inputs are always exactly this long (padded).
    xf_width: transformer width W (= the UNet's cross_attention_dim).
    xf_layers, xf_heads: depth and heads (head width W / heads).
    xf_final_ln: LayerNorm after the last block (`final_ln`).
    xf_padding: pads get the learned per-position `padding_embedding` (needs the mask); else the mask is unused.
    time_embed_dim: width of xf_proj, the UNet's time-embedding width (4·block_out_channels[0]).
    dtype: compute dtype; parameters are float32, outputs float32.
    remat: remat policy of each block (`layers.REMAT_POLICIES`; "none" off).
  """
  n_vocab: int = 50257
  text_ctx: int = 128
  xf_width: int = 512
  xf_layers: int = 16
  xf_heads: int = 8
  xf_final_ln: bool = True
  xf_padding: bool = True
  time_embed_dim: int = 768
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @property
  def end_token(self) -> int:
    """GPT-2 BPE convention: the last id is <|endoftext|>, used as the pad."""
    return self.n_vocab - 1

  def setup(self):
    if self.xf_width % self.xf_heads:
      raise ValueError(f"xf_width={self.xf_width} is not divisible by xf_heads={self.xf_heads}")
    w, ctx = self.xf_width, self.text_ctx
    self.token_embedding = nn.Embed(
        self.n_vocab, w, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.positional_embedding = self.param(
        "positional_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
        (ctx, w), jnp.float32)
    if self.xf_padding:
      self.padding_embedding = self.param(
          "padding_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
          (ctx, w), jnp.float32)
    self.transformer = GlideTransformer(self.xf_layers, self.xf_heads, self.dtype, self.remat)
    if self.xf_final_ln:
      self.final_ln = layers.layer_norm(self.dtype, None)
    self.transformer_proj = layers.dense(self.time_embed_dim, (None, "embed"), self.dtype, None)

  def embed(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Transformer input xf_in [B, ctx, W] (compute dtype): token + position, pads -> padding_embedding.

    Args:
      tokens: [B, text_ctx] int token ids in [0, n_vocab).
      mask: [B, text_ctx] bool, True on real tokens; required with xf_padding, ignored without.
    """
    self._check(tokens, mask)
    xf_in = self.token_embedding(tokens.astype(jnp.int32)).astype(jnp.float32) + self.positional_embedding[None]
    if self.xf_padding:
      xf_in = jnp.where(mask.astype(bool)[..., None], xf_in, self.padding_embedding[None])
    return nn.with_logical_constraint(xf_in.astype(self.dtype), ("batch", "length", "embed"))

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`get_text_emb`.

    Args:
      tokens: [B, text_ctx] int (see `padded_tokens_and_mask`).
      mask: [B, text_ctx] bool, True on real tokens (required with xf_padding).
    Returns:
      (xf_proj [B, time_embed_dim], xf_out [B, text_ctx, xf_width]), float32. xf_out is token-major (GLIDE's
      NCL permute is left out: our UNet takes [B, T, C] tokens).
    """
    xf_out = self.transformer(self.embed(tokens, mask))
    if self.xf_final_ln:
      xf_out = self.final_ln(xf_out)
    xf_proj = self.transformer_proj(xf_out[:, -1])                # the last position, whether real or pad
    return xf_proj.astype(jnp.float32), xf_out.astype(jnp.float32)

  def conditioning(self, tokens: jax.Array, mask: jax.Array | None = None) -> dict:
    """UNet keyword arguments: dict(encoder_hidden_states=xf_out [B, ctx, W], class_labels=xf_proj [B, Temb],
    attention_mask=None) — GLIDE has no text mask in the UNet. For guidance, pass [uncond; cond] token rows."""
    xf_proj, xf_out = self(tokens, mask)
    return dict(encoder_hidden_states=xf_out, class_labels=xf_proj, attention_mask=None)

  def _check(self, tokens, mask):
    ctx = self.text_ctx
    if tokens.ndim != 2 or tokens.shape[1] != ctx:
      raise ValueError(f"tokens must be [B, text_ctx={ctx}] (pad with padded_tokens_and_mask), got shape "
                       f"{tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if mask is None:
      if self.xf_padding:
        raise ValueError("mask [B, text_ctx] (True on real tokens) is required with xf_padding=True")
    elif mask.shape != tokens.shape:
      raise ValueError(f"mask must have the tokens' shape {tokens.shape}, got {mask.shape}")


# ---- tokens -----------------------------------------------------------------------------------------------------
def padded_tokens_and_mask(token_lists: Sequence[Sequence[int]], text_ctx: int,
                           end_token: int = GLIDE_END_TOKEN) -> tuple[np.ndarray, np.ndarray]:
  """GLIDE `padded_tokens_and_mask` for a batch of already-tokenized captions (host side, numpy).

  Each list is truncated to `text_ctx` and right-padded with `end_token`; the mask is True on the real tokens.
  The unconditional input is the empty list. Any GPT-2 BPE tokenizer produces the ids (module docstring).

  Returns:
    (tokens [B, text_ctx] int32, mask [B, text_ctx] bool).
  """
  if isinstance(text_ctx, bool) or not isinstance(text_ctx, (int, np.integer)) or text_ctx <= 0:
    raise ValueError(f"text_ctx must be a positive int, got {text_ctx!r}")
  if isinstance(end_token, bool) or not isinstance(end_token, (int, np.integer)) or end_token < 0:
    raise ValueError(f"end_token must be a non-negative int, got {end_token!r}")
  if isinstance(token_lists, (str, bytes)) or not isinstance(token_lists, Sequence) and not isinstance(
      token_lists, np.ndarray):
    raise ValueError(f"token_lists must be a list of token-id lists, got {type(token_lists).__name__}")
  tokens = np.full((len(token_lists), text_ctx), end_token, np.int32)
  mask = np.zeros((len(token_lists), text_ctx), bool)
  for i, ids in enumerate(token_lists):
    if isinstance(ids, (str, bytes, int, np.integer)):
      raise ValueError(f"token_lists[{i}] must be a list of token ids (tokenize first), got {ids!r}")
    ids = list(ids)[:text_ctx]
    for j in ids:
      if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or j < 0:
        raise ValueError(f"token_lists[{i}] holds {j!r}; token ids must be non-negative ints")
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = True
  return tokens, mask


def drop_text(tokens: jax.Array, mask: jax.Array, drop: jax.Array,
              end_token: int = GLIDE_END_TOKEN) -> tuple[jax.Array, jax.Array]:
  """Replaces the rows where `drop` [B] bool is True by the empty caption (all `end_token`, mask False), the null
  input of classifier-free guidance.  tokens, mask [B, ctx] -> same shapes."""
  if drop.shape != tokens.shape[:1] or mask.shape != tokens.shape:
    raise ValueError(f"drop must be [{tokens.shape[0]}] and mask {tokens.shape}, got {drop.shape} and {mask.shape}")
  d = drop.astype(bool)[:, None]
  return jnp.where(d, jnp.asarray(end_token, tokens.dtype), tokens), jnp.where(d, False, mask.astype(bool))



def conditioning(model: GlideTextEncoder, params, tokens: jax.Array, mask: jax.Array | None) -> dict:
  """`model.conditioning` with `params`: dict(encoder_hidden_states=xf_out, class_labels=xf_proj,
  attention_mask=None), the UNet's keyword arguments (same shape of dict as `UnCLIPTextProj.conditioning`)."""
  return model.apply({"params": params}, tokens, mask, method=GlideTextEncoder.conditioning)
