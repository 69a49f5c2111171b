"""Tests of the fusion losses and the colour conversions they rest on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from textfusion_jax import color
from configs import default
from textfusion_jax import losses

WEIGHTS = default.get_config().loss


def _images(seed=0, shape=(2, 20, 24)):
  k_vis, k_ir, k_fused = jax.random.split(jax.random.key(seed), 3)
  vis = jax.random.uniform(k_vis, shape + (3,))
  ir = jax.random.uniform(k_ir, shape + (1,))
  fused = jax.random.uniform(k_fused, shape + (3,))
  return fused, vis, ir


def test_ycbcr_round_trip_and_known_values():
  rgb = jax.random.uniform(jax.random.key(0), (4, 5, 3))
  np.testing.assert_allclose(color.ycbcr_to_rgb(color.rgb_to_ycbcr(rgb)), rgb,
                             atol=1e-6)
  white, red = jnp.array([1.0, 1.0, 1.0]), jnp.array([1.0, 0.0, 0.0])
  np.testing.assert_allclose(color.rgb_to_ycbcr(white), [1.0, 0.5, 0.5],
                             atol=1e-6)
  np.testing.assert_allclose(color.rgb_to_ycbcr(red),
                             [0.299, 0.5 - 0.168736, 1.0], atol=1e-6)
  np.testing.assert_allclose(color.rgb_to_y(rgb)[..., 0],
                             color.rgb_to_ycbcr(rgb)[..., 0], atol=1e-6)


def test_loss_is_zero_when_fused_equals_every_target():
  _, vis, _ = _images()
  # IR equal to the visible luma, bit for bit as the loss computes it.
  ir = color.rgb_to_ycbcr(vis)[..., :1]
  total, parts = losses.fusion_loss(vis, vis, ir, WEIGHTS)
  # Complementarity needs two sources: with one, F - VIS is flat (corr 0).
  assert float(parts.pop("complementarity")) == pytest.approx(2.0)
  for name, value in parts.items():
    assert abs(float(value)) < 1e-6, name
  assert abs(float(total) - 2.0 * WEIGHTS["complementarity"]) < 1e-5


def test_intensity_and_colour_vanish_on_the_max_intensity_grey_image():
  _, _, ir = _images()
  grey = jax.random.uniform(jax.random.key(5), ir.shape)
  vis = jnp.repeat(grey, 3, axis=-1)  # Grey: Y = grey, CbCr = 0.5.
  fused = jnp.repeat(jnp.maximum(ir, grey), 3, axis=-1)
  _, parts = losses.fusion_loss(fused, vis, ir, WEIGHTS)
  assert float(parts["intensity"]) < 1e-6
  assert float(parts["color"]) < 1e-6
  # The same image is far from the visible one alone.
  _, parts_vis = losses.fusion_loss(vis, vis, ir, WEIGHTS)
  assert float(parts_vis["intensity"]) > 0.1


def test_parts_are_positive_and_weighted_into_the_total():
  fused, vis, ir = _images()
  total, parts = losses.fusion_loss(fused, vis, ir, WEIGHTS, reference=vis)
  assert set(parts) == set(losses.LOSS_TERMS)
  for name, value in parts.items():
    assert value.dtype == jnp.float32 and value.shape == ()
    assert float(value) > 0, name
  expected = sum(WEIGHTS[name] * float(parts[name]) for name in parts)
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  # Weights are read from the mapping, not fixed.
  heavier = default.get_config().loss
  heavier.ssim = 100.0
  total_heavy, _ = losses.fusion_loss(fused, vis, ir, heavier, reference=vis)
  np.testing.assert_allclose(float(total_heavy - total),
                             99.0 * float(parts["ssim"]), rtol=1e-4)


def test_vis_target_replaces_the_visible_input_in_the_targets():
  _, clean, _ = _images()
  dark = 0.2 * clean
  ir = color.rgb_to_y(clean)
  _, with_target = losses.fusion_loss(clean, dark, ir, WEIGHTS,
                                      vis_target=clean)
  _, without = losses.fusion_loss(clean, dark, ir, WEIGHTS)
  for term in ("intensity", "gradient", "color"):
    assert float(with_target[term]) < 1e-5, term
  assert float(without["color"]) > 1e-3
  # SSIM also scores against the clean image: only the IR half is left.
  _, ir_only = losses.fusion_loss(clean, clean, ir, WEIGHTS)
  np.testing.assert_allclose(float(with_target["ssim"]),
                             float(ir_only["ssim"]), rtol=1e-6)
  assert float(without["ssim"]) > float(with_target["ssim"]) + 1e-3


def test_reference_term_is_the_rgb_l1_to_the_reference_fusion():
  fused, vis, ir = _images()
  _, parts = losses.fusion_loss(fused, vis, ir, WEIGHTS, reference=vis)
  np.testing.assert_allclose(float(parts["reference"]),
                             float(jnp.mean(jnp.abs(fused - vis))), rtol=1e-6)
  _, same = losses.fusion_loss(fused, vis, ir, WEIGHTS, reference=fused)
  assert float(same["reference"]) == 0.0
  # No reference (clean or synthetic training): the term is 0 and so is its
  # share of the total, whatever the weight.
  weighted = default.get_config().loss
  weighted.reference = 10.0
  total, parts = losses.fusion_loss(fused, vis, ir, weighted)
  total_0, _ = losses.fusion_loss(fused, vis, ir, WEIGHTS)
  assert float(parts["reference"]) == 0.0
  np.testing.assert_allclose(float(total), float(total_0), rtol=1e-6)


def test_sobel_magnitude_on_a_step_edge():
  y = jnp.zeros((1, 6, 8, 1)).at[:, :, 4:].set(1.0)
  grad = losses.sobel_magnitude(y)[0, :, :, 0]
  np.testing.assert_allclose(grad[:, 3:5], 4.0)  # 1 + 2 + 1 on each side
  np.testing.assert_allclose(grad[:, :3], 0.0)  # edge padding: no border
  np.testing.assert_allclose(grad[:, 5:], 0.0)  # edges.


def test_ssim_of_constant_images_matches_closed_form():
  a, b = 0.3, 0.7
  value = losses.ssim(jnp.full((1, 16, 16, 1), a), jnp.full((1, 16, 16, 1), b))
  c1 = 0.01**2
  # rtol: float32 variances E[x^2] - E[x]^2 of a constant are ~1e-8, not 0.
  np.testing.assert_allclose(value, [(2 * a * b + c1) / (a * a + b * b + c1)],
                             rtol=1e-4)
  noise = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  np.testing.assert_allclose(losses.ssim(noise, noise), 1.0, atol=1e-5)
  assert float(losses.ssim(noise, 1.0 - noise).max()) < 0.0


def test_ssim_shrinks_its_window_on_small_images():
  x = jax.random.uniform(jax.random.key(2), (2, 5, 7, 1))
  value = losses.ssim(x, 0.5 * x)
  assert value.shape == (2,) and bool(jnp.all(jnp.isfinite(value)))


def test_loss_is_jittable_with_finite_gradients():
  fused, vis, ir = _images()
  loss = jax.jit(lambda f, v, i: losses.fusion_loss(f, v, i, WEIGHTS)[0])
  grad = jax.jit(jax.grad(lambda f, v, i: losses.fusion_loss(
      f, v, i, WEIGHTS)[0]))
  np.testing.assert_allclose(
      loss(fused, vis, ir), losses.fusion_loss(fused, vis, ir, WEIGHTS)[0],
      rtol=1e-5)
  for point in (fused, vis):  # A generic point and the all-targets-met kink.
    g = grad(point, vis, color.rgb_to_y(vis) if point is vis else ir)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  # bfloat16 model outputs are scored in float32.
  total, _ = losses.fusion_loss(fused.astype(jnp.bfloat16), vis, ir, WEIGHTS)
  assert total.dtype == jnp.float32


@pytest.mark.parametrize("weights", [
    {"intensity": 1.0, "gradient": 1.0, "ssim": 1.0},
    {"intensity": 1.0, "gradient": 1.0, "ssim": 1.0, "colour": 1.0},
])
def test_weights_must_name_every_term(weights):
  fused, vis, ir = _images()
  with pytest.raises(ValueError, match="loss weights"):
    losses.fusion_loss(fused, vis, ir, weights)


def test_complementarity_is_zero_for_the_sum_and_high_for_a_copy():
  rng = np.random.default_rng(3)
  ir = jnp.asarray(rng.random((2, 16, 16, 1)), jnp.float32)
  vis_y = jnp.asarray(rng.random((2, 16, 16, 1)), jnp.float32)
  np.testing.assert_allclose(
      losses.complementarity(ir + vis_y - 0.5, ir, vis_y), 0.0, atol=1e-5)
  copy = losses.complementarity(vis_y, ir, vis_y)
  # corr(IR, 0) = 0 and corr(VIS, VIS - IR) ~ 0.7 for independent sources.
  assert np.all(np.asarray(copy) > 1.1)
  mean = losses.complementarity((ir + vis_y) / 2, ir, vis_y)
  assert np.all(np.asarray(mean) < np.asarray(copy))
