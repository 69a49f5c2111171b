"""Tests of FusionNet, its building blocks and presets (tiny preset, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from textfusion_jax import color
from textfusion_jax import gaussian
from textfusion_jax import layers
from configs import default
from textfusion_jax import losses
from textfusion_jax import model as model_lib

AXIS_NAMES = {"conv_h", "conv_w", "channels_in", "channels_out", "text_embed",
              None}
BATCH, HEIGHT, WIDTH = 2, 37, 53  # Odd sizes: the model must pad and crop.


def _config(**overrides):
  config = model_lib.model_config("tiny")
  config.update(overrides)
  return config


def _inputs(seed=0, batch=BATCH, height=HEIGHT, width=WIDTH):
  k_vis, k_ir, k_text = jax.random.split(jax.random.key(seed), 3)
  # Kept away from 0 and 1 so that the output clipping rarely engages.
  vis = jax.random.uniform(k_vis, (batch, height, width, 3), minval=0.1,
                           maxval=0.9)
  ir = jax.random.uniform(k_ir, (batch, height, width, 1))
  text = jax.random.normal(k_text, (batch, 512))
  return vis, ir, text


@nnx.jit
def _forward(model, vis, ir, text):
  return model(vis, ir, text)


@pytest.fixture(scope="module")
def tiny():
  return model_lib.FusionNet(_config(), rngs=nnx.Rngs(0))


def _perturb_zero_init(model, seed=1, scale=0.5):
  """Gives the zero-initialised text-MLP output layers random weights."""
  mlps = list(model.modulation) + [model.vis_correction]
  keys = iter(jax.random.split(jax.random.key(seed), 2 * len(mlps)))
  for mod in mlps:
    for var in (mod.out.kernel, mod.out.bias):
      var[...] = scale * jax.random.normal(next(keys), var[...].shape)


def test_output_shape_dtype_and_range_for_odd_sizes(tiny):
  vis, ir, text = _inputs()
  fused = _forward(tiny, vis, ir, text)
  assert fused.shape == (BATCH, HEIGHT, WIDTH, 3)
  assert fused.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(fused)))
  assert float(fused.min()) >= 0.0 and float(fused.max()) <= 1.0
  # At init the 'fusion' head returns its rule with unit gains: both
  # sources' contrast about their mean brightness, the visible chroma kept.
  y_vis = color.rgb_to_ycbcr(vis)[..., :1]
  zero = jnp.zeros_like(ir)
  rule = jnp.clip(model_lib.fuse_luma(y_vis, ir, zero, zero, zero), 0, 1)
  error = jnp.abs(color.rgb_to_y(fused) - rule)
  assert 0.0 < float(error.mean()) < 0.05
  assert float(jnp.abs(color.rgb_to_y(fused) - y_vis).mean()) > 0.1


def test_fuse_luma_gains_scale_each_sources_contrast():
  rng = np.random.default_rng(0)
  y_vis, ir = (jnp.asarray(rng.random((1, 8, 9, 1)), jnp.float32)
               for _ in range(2))
  zero = jnp.zeros_like(ir)
  base = model_lib.fuse_luma(y_vis, ir, zero, zero, zero)
  np.testing.assert_allclose(
      base, y_vis + ir - (y_vis.mean() + ir.mean()) / 2, atol=1e-6)
  half_ir = model_lib.fuse_luma(y_vis, ir, zero + np.log(0.5), zero, zero)
  np.testing.assert_allclose(base - half_ir, 0.5 * (ir - ir.mean()),
                             atol=1e-6)
  shifted = model_lib.fuse_luma(y_vis, ir, zero, zero, zero + 0.1)
  np.testing.assert_allclose(shifted - base, 0.1, atol=1e-6)


def test_input_stride_runs_at_half_resolution_with_full_size_output():
  config = _config(input_stride=2)
  model = model_lib.FusionNet(config, rngs=nnx.Rngs(0))
  vis, ir, text = _inputs()
  fused = _forward(model, vis, ir, text)
  assert fused.shape == (BATCH, HEIGHT, WIDTH, 3)
  assert model.vis_encoder.embed.in_features == 12
  assert model.head.out_features == 3 * 4


def test_gaussian_blur_matches_scipys_mirrored_filter():
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).uniform(size=(2, 29, 31, 3)).astype(np.float32)
  for sigma in (1.0, 2.0, 4.0):
    want = ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="mirror",
                                   truncate=3.0)
    np.testing.assert_allclose(gaussian.blur(jnp.asarray(x), sigma), want,
                               atol=2e-6)
  # Smaller than the window: edge padding, and a flat image stays flat.
  flat = jnp.full((1, 5, 4, 1), 0.3)
  np.testing.assert_allclose(gaussian.blur(flat, 4.0), flat, atol=1e-6)


def test_visible_smoothing_follows_the_head_logits():
  vis, _, _ = _inputs(height=24, width=20)
  sigmas = (1.0, 3.0)
  logits = lambda a, b: jnp.broadcast_to(jnp.array([a, b], jnp.float32),
                                         vis.shape[:3] + (2,))
  smooth = lambda l: model_lib.smooth_visible(vis, l, sigmas)
  np.testing.assert_allclose(smooth(logits(-60, -60)), vis, atol=1e-6)
  np.testing.assert_allclose(smooth(logits(-60, 60)),
                             gaussian.blur(vis, 3.0), atol=1e-6)
  # Zero logits (an untrained head): mostly the sharp image.
  w_sharp = 1 / (1 + 2 * np.exp(-3.0))
  want = (w_sharp * vis + (1 - w_sharp) / 2 *
          (gaussian.blur(vis, 1.0) + gaussian.blur(vis, 3.0)))
  np.testing.assert_allclose(smooth(logits(0, 0)), want, atol=1e-6)
  # Per pixel: left half sharp, right half the widest blur.
  left = jnp.arange(vis.shape[2]) < 10
  mixed = smooth(jnp.where(left[None, None, :, None], -60.0, 60.0) *
                 jnp.array([0.0, 1.0]) - 60.0 * jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(mixed[:, :, :10], vis[:, :, :10], atol=1e-6)
  np.testing.assert_allclose(mixed[:, :, 10:],
                             gaussian.blur(vis, 3.0)[:, :, 10:], atol=1e-6)


def test_smoothing_adds_one_head_channel_per_sigma_at_full_resolution():
  config = _config(input_stride=2, vis_smoothing_sigmas=(1.0, 2.0, 4.0))
  model = model_lib.FusionNet(config, rngs=nnx.Rngs(0))
  assert model.head.out_features == (3 + 3) * 4
  vis, ir, text = _inputs()
  fused = _forward(model, vis, ir, text)
  assert fused.shape == (BATCH, HEIGHT, WIDTH, 3)
  assert bool(jnp.all(jnp.isfinite(fused)))


def test_kv_pooling_equals_attention_to_a_pooled_context():
  rngs = nnx.Rngs(0)
  attn = layers.TokenAttention(8, 2, dtype=jnp.float32, rngs=rngs,
                               cross=True, max_kv_tokens=16)
  full = layers.TokenAttention(8, 2, dtype=jnp.float32, rngs=nnx.Rngs(0),
                               cross=True)
  x = jax.random.normal(jax.random.key(1), (1, 9, 10, 8))
  context = jax.random.normal(jax.random.key(2), (1, 9, 10, 8))
  factor = layers.kv_pool_factor(9, 10, 16)
  assert factor == 3 and -(-9 // 3) * -(-10 // 3) <= 16
  # The projections are linear: pooling the projected keys/values equals
  # projecting the pooled context, for the same (unpooled) queries.
  q = full.qkv.q(x)
  k, v = jnp.split(full.qkv.kv(layers.avg_pool(context, factor)), 2, axis=-1)
  split = lambda t: t.reshape(1, -1, 2, 4)
  expected = full.proj(jax.nn.dot_product_attention(
      split(q), split(k), split(v)).reshape(1, 9, 10, 8))
  np.testing.assert_allclose(attn(x, context), expected, atol=1e-5)
  # And it is not full attention: pooling changes the result.
  assert float(jnp.abs(full(x, context) - expected).max()) > 1e-3
  assert layers.kv_pool_factor(12, 12, 256) == 1  # a 96x96 crop: no pooling


def test_ycbcr_output_keeps_visible_chroma():
  model = model_lib.FusionNet(_config(output="ycbcr"), rngs=nnx.Rngs(0))
  vis, ir, text = _inputs()
  fused = _forward(model, vis, ir, text)
  assert fused.shape == (BATCH, HEIGHT, WIDTH, 3)
  assert float(fused.min()) >= 0.0 and float(fused.max()) <= 1.0
  inside = jnp.all((fused > 1e-4) & (fused < 1 - 1e-4), axis=-1)
  assert float(inside.mean()) > 0.9
  fused_cbcr = color.rgb_to_ycbcr(fused)[..., 1:]
  vis_cbcr = color.rgb_to_ycbcr(vis)[..., 1:]
  err = jnp.abs(fused_cbcr - vis_cbcr).max(axis=-1)
  assert float(jnp.where(inside, err, 0.0).max()) < 1e-5
  assert float(jnp.abs(color.rgb_to_y(fused) - color.rgb_to_y(vis)).max()) > 0


def test_pad_to_multiple_handles_tiny_and_one_pixel_axes():
  x = jnp.arange(2 * 1 * 3, dtype=jnp.float32).reshape(2, 1, 3, 1)
  padded = model_lib._pad_to_multiple(x, 8)
  assert padded.shape == (2, 8, 8, 1)
  # Width 3 is reflected (0 1 2 1 0 1 2 1); height 1 is edge-padded.
  np.testing.assert_array_equal(padded[0, 0, :, 0], [0, 1, 2, 1, 0, 1, 2, 1])
  np.testing.assert_array_equal(padded, jnp.repeat(padded[:, :1], 8, axis=1))
  assert model_lib._pad_to_multiple(x, 1) is x


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
  model16 = model_lib.FusionNet(_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
  for _, param in nnx.to_flat_state(nnx.state(model16, nnx.Param)):
    assert param[...].dtype == jnp.float32
  vis, ir, text = _inputs()
  fused32 = _forward(tiny, vis, ir, text)
  fused16 = _forward(model16, vis, ir, text)
  assert fused16.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(fused16)))
  # Compare the learnt residuals, not the outputs (both are near `vis`).
  r32, r16 = fused32 - vis, fused16 - vis
  rel = float(jnp.linalg.norm(r16 - r32) / jnp.linalg.norm(r32))
  assert 0.0 < rel < 0.1, rel  # Not bit-identical: bfloat16 really ran.


def test_text_has_no_effect_at_init_and_an_effect_when_modulated():
  model = model_lib.FusionNet(_config(), rngs=nnx.Rngs(0))
  vis, ir, text = _inputs()
  other_text = jax.random.normal(jax.random.key(9), text.shape)
  np.testing.assert_array_equal(_forward(model, vis, ir, text),
                                _forward(model, vis, ir, other_text))
  _perturb_zero_init(model)
  a = _forward(model, vis, ir, text)
  b = _forward(model, vis, ir, other_text)
  assert float(jnp.abs(a - b).mean()) > 1e-3


def test_modulation_shares_one_text_embedding_across_the_batch():
  mod = layers.TextModulation(16, 8, 4, rngs=nnx.Rngs(0))
  mod.out.kernel[...] = jax.random.normal(jax.random.key(1), (8, 8))
  x = jax.random.normal(jax.random.key(2), (3, 5, 5, 4))
  text = jax.random.normal(jax.random.key(3), (1, 16))
  np.testing.assert_allclose(mod(x, text), mod(x, jnp.repeat(text, 3, 0)),
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(mod(x, text) - x).mean()) > 1e-3


def test_gradients_reach_every_parameter_under_jax_jit():
  # Three levels: the tiny preset's two have no middle decoder level, so no
  # `reduce` conv, which every deeper preset has.
  model = model_lib.FusionNet(_config(num_blocks=(1, 1, 1), heads=(1, 2, 2)),
                              rngs=nnx.Rngs(0))
  assert len(model.reduce) == 1
  vis, ir, text = _inputs(height=24, width=20)
  weights = default.get_config().loss
  # The functional split/merge path that a training step uses.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grads_of(params):
    def loss_fn(params):
      fused = nnx.merge(graphdef, params, rest)(vis, ir, text)
      return losses.fusion_loss(fused, vis, ir, weights)[0]
    return jax.grad(loss_fn)(params)

  def zero_grad_paths(grads):
    return [path for path, g in nnx.to_flat_state(grads)
            if not bool(jnp.any(g[...] != 0))]

  # At init only the hidden layers behind the zeroed text-MLP outputs are
  # cut off from the loss.
  at_init = zero_grad_paths(grads_of(params))
  behind_zero_outputs = [p for p in at_init if p[-2] == "hidden" and (
      p[0] == "modulation" or p[0] == "vis_correction")]
  assert at_init and at_init == behind_zero_outputs, at_init
  assert any(p[0] == "vis_correction" for p in at_init)

  _perturb_zero_init(model)
  grads = grads_of(nnx.state(model, nnx.Param))
  for _, g in nnx.to_flat_state(grads):
    assert bool(jnp.all(jnp.isfinite(g[...])))
  assert zero_grad_paths(grads) == []


def test_every_param_carries_logical_axis_names(tiny):
  params = nnx.state(tiny, nnx.Param)
  specs = nnx.get_partition_spec(params)
  flat_specs = dict(nnx.to_flat_state(specs))
  seen = set()
  for path, param in nnx.to_flat_state(params):
    names = param.get_metadata().get("out_sharding")
    assert names is not None, path
    assert len(names) == param[...].ndim, path
    assert set(names) <= AXIS_NAMES, (path, names)
    assert tuple(flat_specs[path].get_value()) == tuple(names)
    if param[...].ndim == 4:  # 3x3 conv kernels
      assert names[:2] == ("conv_h", "conv_w"), path
    seen.update(names)
  assert AXIS_NAMES <= seen


def test_parameters_are_placed_eagerly_under_a_mesh():
  mesh = jax.make_mesh((1, 1), ("fsdp", "data"))
  rules = (("channels_out", "fsdp"), ("text_embed", "data"),
           ("channels_in", None), ("conv_h", None), ("conv_w", None))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    mod = layers.TextModulation(16, 8, 4, rngs=nnx.Rngs(0))
    conv = layers.conv3x3(4, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
  spec = jax.sharding.PartitionSpec
  assert mod.hidden.kernel[...].sharding.spec == spec("data", "fsdp")
  assert conv.kernel[...].sharding.spec == spec(None, None, None, "fsdp")


def test_preset_sizes():
  counts = {}
  for preset in model_lib.PRESETS:
    config = model_lib.model_config(preset)
    abstract = nnx.eval_shape(
        lambda config=config: model_lib.FusionNet(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    counts[preset] = model_lib.count_params(abstract)
  # The counts model_config's docstring states.
  assert counts == {"tiny": 82_290, "small": 2_750_905,
                    "base": 64_776_402, "large": 253_484_850}, counts
  small_64 = model_lib.model_config("small")
  small_64.text_dim = 64
  assert model_lib.count_params(nnx.eval_shape(
      lambda: model_lib.FusionNet(small_64, rngs=nnx.Rngs(0)))) == 2_177_465


def test_count_params_matches_concrete_model(tiny):
  expected = sum(p[...].size for _, p in
                 nnx.to_flat_state(nnx.state(tiny, nnx.Param)))
  assert model_lib.count_params(tiny) == expected


@pytest.mark.parametrize("overrides, message", [
    (dict(heads=(1,)), "heads"),
    (dict(num_blocks=(1,), heads=(1,)), "at least 2 levels"),
    (dict(heads=(1, 3)), "split"),
    (dict(output="grey"), "output"),
    (dict(dtype="float16"), "dtype"),
    (dict(ffn="mlp"), "config.model.ffn='mlp': must be one of"),
    (dict(dim=5, heads=(1, 1)), "even"),
    (dict(vis_smoothing_sigmas=(1.0,), output="rgb"),
     "needs config.model.output='fusion'"),
    (dict(vis_smoothing_sigmas=(2.0, 0.0)), "must be > 0"),
    (dict(vis_smoothing_sigmas=("wide",)), "must be > 0"),
])
def test_bad_configs_are_rejected(overrides, message):
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(lambda: model_lib.FusionNet(_config(**overrides),
                                               rngs=nnx.Rngs(0)))


def test_depthwise_cpu_path_matches_lax_conv():
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 5))
  probe = jax.random.normal(jax.random.key(2), (2, 7, 6, 5))

  def lax_dw(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision=jax.lax.Precision.HIGHEST)

  def loss(fn):
    return lambda x, k: jnp.sum(jnp.sin(fn(x, k)) * probe)

  np.testing.assert_allclose(layers._depthwise_cpu(x, kernel),
                             lax_dw(x, kernel), atol=1e-5)
  for ours, ref in zip(jax.grad(loss(layers._depthwise_cpu), (0, 1))(x, kernel),
                       jax.grad(loss(lax_dw), (0, 1))(x, kernel)):
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_pixel_shuffle_order_and_inverse():
  x = jnp.arange(1 * 2 * 3 * 8, dtype=jnp.float32).reshape(1, 2, 3, 8)
  y = layers.pixel_shuffle(x, 2)
  assert y.shape == (1, 4, 6, 2)
  # torch.PixelShuffle: output[c, 2h+i, 2w+j] = input[c*4 + i*2 + j, h, w].
  for c, i, j in [(0, 0, 1), (1, 1, 0), (1, 1, 1)]:
    assert y[0, 2 * 1 + i, 2 * 2 + j, c] == x[0, 1, 2, c * 4 + i * 2 + j]
  np.testing.assert_array_equal(layers.pixel_unshuffle(y, 2), x)


def test_folded_text_standardization_equals_standardizing_the_input():
  model = model_lib.FusionNet(_config(), rngs=nnx.Rngs(0))
  _perturb_zero_init(model, scale=0.02)  # Small: keep outputs off the clip.
  vis, ir, text = _inputs()
  mean = 0.5 * jax.random.normal(jax.random.key(3), (512,))
  std = jax.random.uniform(jax.random.key(4), (512,), minval=0.5, maxval=2.0)
  graphdef, params = nnx.split(model, nnx.Param)
  plain = nnx.to_pure_dict(params)
  folded = model_lib.fold_text_standardization(plain, mean, std)
  assert set(folded) == set(plain)

  def run(p, t):
    state = nnx.state(nnx.merge(graphdef, params), nnx.Param)
    nnx.replace_by_pure_dict(state, p)
    return _forward(nnx.merge(graphdef, state), vis, ir, t)

  expected = run(plain, (text - mean) / std)
  np.testing.assert_allclose(run(folded, text), expected, atol=2e-5)
  # The fold changed something: raw embeddings give another output.
  assert float(jnp.max(jnp.abs(run(plain, text) - expected))) > 1e-3
  # A constant dimension is not divided by ~0, and one caption for all
  # (zero std everywhere) only removes the mean.
  floored = model_lib.fold_text_standardization(plain, mean,
                                                std.at[0].set(0.0))
  hidden = floored["modulation"][0]["hidden"]["kernel"]
  assert float(jnp.max(jnp.abs(hidden[0]))) < float(
      20 * jnp.max(jnp.abs(plain["modulation"][0]["hidden"]["kernel"][0])))
  np.testing.assert_allclose(
      run(model_lib.fold_text_standardization(plain, mean, 0 * std), text),
      run(plain, text - mean), atol=2e-5)


def test_min_gain_modulation_is_identity_at_init_and_floored():
  mod = layers.TextModulation(4, 8, 3, rngs=nnx.Rngs(0), min_gain=0.5)
  x = jnp.ones((2, 5, 5, 3))
  text = jax.random.normal(jax.random.key(1), (2, 4))
  np.testing.assert_allclose(mod(x, text), x)  # zero-initialised output
  mod.out.bias[...] = jnp.array([-50.0, 0.0, 3.0, 0.0, 0.0, 0.0])
  out = mod(x, text)[0, 0, 0]
  np.testing.assert_allclose(out, [0.5, 1.0, 0.5 + 0.5 * np.exp(3.0)],
                             rtol=1e-5)


def test_pixel_normalisation_keeps_a_bounded_gradient_at_zero():
  """An all-black crop gives all-zero queries at init: the gradient of its
  normalisation was 1e12 times the upstream one (then 1.9e14 global norm)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 64, 3, 4)), jnp.float32)
  np.testing.assert_allclose(
      layers._l2_normalize_pixels(x),  # pylint: disable=protected-access
      x / jnp.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
  upstream = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(
      layers._l2_normalize_pixels(v) * upstream))(jnp.zeros_like(x))  # pylint: disable=protected-access
  # 1 / sqrt(1e-6 * 64 pixels) = 125 times the upstream gradient at most.
  assert float(jnp.max(jnp.abs(grad))) <= 125.1 * float(
      jnp.max(jnp.abs(upstream)))


def test_remat_keeps_parameters_and_gradients_and_saves_less():
  vis, ir, text = _inputs(batch=1, height=24, width=20)
  grads, residuals = {}, {}
  for remat in (False, True):
    model = model_lib.FusionNet(_config(remat=remat), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # A smooth loss: the fusion loss's max and abs terms turn the last-bit
    # differences of a recomputed forward pass into gradients up to 2.5 %
    # apart on one CPU (AMD EPYC), while the model's own agree within 4e-6.
    def loss_fn(params, graphdef=graphdef, rest=rest):
      fused = nnx.merge(graphdef, params, rest)(vis, ir, text)
      return jnp.sum((fused - vis) ** 2)

    # The pullback jax.vjp returns is a pytree over the residuals: the
    # values the backward pass keeps from the forward one.
    pullback = jax.eval_shape(lambda p, f=loss_fn: jax.vjp(f, p)[1], params)
    residuals[remat] = sum(leaf.size for leaf in jax.tree.leaves(pullback))
    grads[remat] = jax.jit(jax.grad(loss_fn))(params)
  plain, rematted = (jax.tree.leaves(grads[r]) for r in (False, True))
  assert len(plain) == len(rematted)
  for a, b in zip(plain, rematted):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(a))))
  assert residuals[True] < 0.7 * residuals[False], residuals


def test_a_rematerialised_block_runs_inside_plain_jax_transforms():
  """Captured by jax.jit or jax.grad (not split and merged), as a user's own
  code may call it: nnx.remat's default write-back raised a trace error."""
  block = layers.TransformerBlock(8, 2, 2.0, "gdfn", dtype=jnp.float32,
                                  rngs=nnx.Rngs(0), remat=True)
  x = jax.random.normal(jax.random.key(0), (1, 6, 5, 8))
  expected = block._forward(x)  # pylint: disable=protected-access
  np.testing.assert_allclose(jax.jit(lambda x: block(x))(x), expected,
                             rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(block(x) ** 2))(x)
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_allclose(block(x), expected, rtol=1e-5, atol=1e-6)
