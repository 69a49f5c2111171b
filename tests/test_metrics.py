"""Tests of the JAX fusion metrics against the float64 oracle and references.

The full 180-triple parity run against the reference evaluator's values goes
through the evaluation CLI (tests/test_evaluate.py); here the oracle itself is
checked against those values, and the JAX functions against the oracle on
small images that all share one compiled (8, 64, 64) bucket.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline import image_io
from textfusion_jax import metrics
from textfusion_jax import metrics_reference
from input_pipeline.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "metrics"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "reference_fused_mean.json").is_file(),
    reason=f"metric fixtures not found at {FIXTURES}")

BATCH, SIDE = 8, 64  # the one batched shape these tests compile
# Per-image tolerance of the parity targets: relative, or absolute near zero.
REL, ABS = 1e-3, 1e-4


def load_triple(fused_set: str, stem: str) -> tuple[np.ndarray, ...]:
  return tuple(
      image_io.as_grey_u8(image_io.read_image(FIXTURES / d / f"{stem}.png"))
      for d in (fused_set, "ir", "vi"))


def assert_close(actual: dict, expected: dict, rel: float = REL,
                 abs_: float = ABS, context: str = "") -> None:
  for name in metrics.METRIC_NAMES:
    got, want = float(actual[name]), float(expected[name])
    assert got == pytest.approx(want, rel=rel, abs=abs_), (
        f"{context} {name}: got {got!r}, expected {want!r}")


def textured(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A smooth image with edges and flat areas, integer grey levels."""
  y, x = np.mgrid[:h, :w]
  image = (128 + 60 * np.sin(x / 5.0 + rng.uniform(0, 6)) *
           np.cos(y / 7.0 + rng.uniform(0, 6)) + rng.normal(0, 8, (h, w)))
  image[: h // 3, : w // 3] = rng.integers(0, 256)  # a flat patch
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def batched(fused, ir, vis) -> list[dict[str, float]]:
  """Runs the (8, 64, 64) compiled function on zero-padded images."""
  n = len(fused)
  stacks = []
  for images in (fused, ir, vis):
    stack = np.zeros((BATCH, SIDE, SIDE), np.uint8)
    for i, image in enumerate(images):
      stack[i, :image.shape[0], :image.shape[1]] = image
    stacks.append(stack)
  size_arr = np.full((BATCH, 2), SIDE, np.int32)
  size_arr[:n] = [x.shape for x in fused]
  values = jax.device_get(metrics.batched_all_metrics(*stacks, size_arr))
  return [{m: float(values[m][i]) for m in metrics.METRIC_NAMES}
          for i in range(n)]


@needs_fixtures
@pytest.mark.parametrize("fused_set,stem", [("fused_mean", "roadscene_13"),
                                            ("fused_color", "roadscene_5")])
def test_oracle_matches_reference_values(fused_set, stem):
  reference = json.loads(
      (FIXTURES / f"reference_{fused_set}.json").read_text())["per_image"][stem]
  f, a, b = load_triple(fused_set, stem)
  assert_close(metrics_reference.all_metrics(f, a, b), reference,
               context=f"oracle {fused_set}/{stem}")


def test_batched_padded_results_match_oracle():
  rng = np.random.default_rng(0)
  shapes = [(64, 64), (41, 41), (50, 63), (64, 45)]
  triples = [tuple(textured(rng, *shape) for _ in range(3)) for shape in shapes]
  results = batched(*zip(*triples))
  for shape, triple, result in zip(shapes, triples, results):
    assert_close(result, metrics_reference.all_metrics(*triple),
                 context=f"{shape}")


def test_vmap_and_batched_equal_single_image_jit():
  rng = np.random.default_rng(1)
  triples = [tuple(textured(rng, SIDE, SIDE) for _ in range(3))
             for _ in range(3)]
  # batched_all_metrics maps over the batch on CPU, so vmap is tested as well.
  vmapped = jax.device_get(jax.jit(jax.vmap(metrics.all_metrics))(
      *(np.stack(images) for images in zip(*triples))))
  from_batch = batched(*zip(*triples))
  single = jax.jit(metrics.all_metrics)
  for i, triple in enumerate(triples):
    alone = jax.device_get(single(*triple))
    assert_close(from_batch[i], alone, rel=1e-5, abs_=1e-5)
    assert_close({m: v[i] for m, v in vmapped.items()}, alone, rel=1e-5,
                 abs_=1e-5)


def test_single_metric_functions_equal_all_metrics():
  rng = np.random.default_rng(2)
  f, a, b = (textured(rng, SIDE, SIDE).astype(np.float32) for _ in range(3))
  together = jax.device_get(jax.jit(metrics.all_metrics)(f, a, b))

  @jax.jit
  def one_by_one(f, a, b):
    return {name: getattr(metrics, name.lower())(
        *((f,) if name in ("EN", "SD", "SF", "AG") else (f, a, b)))
            for name in metrics.METRIC_NAMES}

  assert_close(jax.device_get(one_by_one(f, a, b)), together, rel=1e-5,
               abs_=1e-5)


def oracle_with_documented_substitutes(f, a, b) -> dict[str, float]:
  """The reference's values, with the module's values where it gives NaN.

  A NaN correlation term (zero variance) counts as 0 in CC and SCD; Qabf
  without source edges is 0; PSNR with MSE = 0 is +inf.
  """
  values = metrics_reference.all_metrics(f, a, b)
  f, a, b = (x.astype(np.float64) for x in (f, a, b))
  # pylint: disable-next=protected-access
  corr = lambda x, y: np.nan_to_num(metrics_reference._corr(x, y))
  substitutes = {
      "CC": lambda: (corr(a, f) + corr(b, f)) / 2,
      "SCD": lambda: corr(a, f - b) + corr(b, f - a),
      "Qabf": lambda: 0.0,
      "PSNR": lambda: math.inf,
  }
  for name, value in values.items():
    if math.isnan(value):
      assert name in substitutes, f"unexpected NaN in the oracle's {name}"
      values[name] = substitutes[name]()
  return values


def test_zero_variance_images_match_reference_never_nan():
  rng = np.random.default_rng(3)
  img = lambda: textured(rng, 48, 56)
  const = lambda v: np.full((48, 56), v, np.uint8)
  f, a, b = img(), img(), img()
  cases = {
      "constant F": (const(90), a, b),
      "constant IR": (f, const(17), b),
      "constant VIS": (f, a, const(200)),
      "all equal constant": (const(60), const(60), const(60)),
      "all black": (const(0), const(0), const(0)),
      "black F": (const(0), a, b),
      "F equals VIS": (b, a, b),
      "constant sources": (f, const(30), const(30)),
  }
  results = batched(*zip(*cases.values()))
  for (label, triple), result in zip(cases.items(), results):
    assert not any(math.isnan(v) for v in result.values()), (label, result)
    expected = oracle_with_documented_substitutes(*triple)
    for name in metrics.METRIC_NAMES:
      want, got = expected[name], result[name]
      if math.isinf(want):
        assert got == want, (label, name, got, want)
      else:
        assert got == pytest.approx(want, rel=REL, abs=ABS), (label, name, got,
                                                              want)
  # The quirks the documentation promises, spelled out.
  assert results[0]["VIF"] == 0.0 and results[0]["MI"] == 0.0
  assert results[0]["CC"] == 0.0
  # pylint: disable-next=protected-access
  vifp_vis = metrics_reference._vifp(b.astype(float), f.astype(float))
  assert results[1]["VIF"] == pytest.approx(1.0 + vifp_vis)
  assert results[3]["PSNR"] == math.inf and results[5]["PSNR"] == -math.inf


def test_rgb_to_grey_follows_the_opencv_rule():
  rng = np.random.default_rng(4)
  rgb = rng.integers(0, 256, (200_000, 3)).astype(np.uint8)
  exact = rgb.astype(np.int64) @ np.array([299, 587, 114])
  ties = exact % 1000 == 500
  assert ties.sum() > 0
  host = image_io.rgb_to_grey_u8(rgb).astype(np.int64)
  device = np.asarray(jax.jit(metrics.rgb_to_grey)(rgb)).astype(np.int64)
  # Host and device agree exactly, so files and in-training scores match.
  np.testing.assert_array_equal(device, host)
  np.testing.assert_array_equal(device[~ties], np.rint(exact[~ties] / 1000))
  np.testing.assert_array_equal(device[ties] % 2, 0)  # ties to even
  assert device.min() >= 0 and device.max() <= 255


def test_to_grey_levels_rounds_and_clips():
  values = np.array([[-3.0, 0.4, 0.6, 254.5, 255.49, 300.0]], np.float32)
  np.testing.assert_array_equal(
      np.asarray(metrics.to_grey_levels(values)),
      [[0, 0, 1, 254, 255, 255]])


def test_bad_shapes_raise_clear_errors():
  ok = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.all_metrics(ok, ok, np.zeros((64, 63), np.float32))
  with pytest.raises(ValueError, match="at least 41x41"):
    metrics.all_metrics(*(np.zeros((40, 64), np.float32),) * 3)
  with pytest.raises(ValueError, match=r"\(H, W\)"):
    metrics.all_metrics(*(np.zeros((2, 64, 64), np.float32),) * 3)


def test_vif_window_is_separable_and_never_zeroed():
  for scale in range(1, 5):
    window = metrics_reference.vif_window(scale)
    # pylint: disable-next=protected-access
    taps = np.array(metrics._vif_taps(scale))
    assert np.all(window > 0)
    np.testing.assert_allclose(np.outer(taps, taps), window, rtol=1e-12)


def test_per_source_parts_add_up_and_match_single_source_metrics():
  rng = np.random.default_rng(7)
  f, a, b = (textured(rng, 60, 52) for _ in range(3))
  got = batched([f], [a], [b])[0]
  values = jax.device_get(metrics.all_metrics(*(x.astype(np.float32)
                                                for x in (f, a, b))))
  for name in ("MI", "VIF", "SSIM", "Qabf"):
    assert values[f"{name}_ir"] + values[f"{name}_vis"] == pytest.approx(
        values[name], rel=1e-5)
    assert values[name] == pytest.approx(got[name], rel=1e-4)
  assert (values["CC_ir"] + values["CC_vis"]) / 2 == pytest.approx(
      values["CC"], rel=1e-5)
  # Each part is the metric against that source alone: with both sources
  # equal to one of them, a sum is twice the part and a mean equals it.
  for source, key in ((a, "ir"), (b, "vis")):
    alone = jax.device_get(metrics.all_metrics(
        *(x.astype(np.float32) for x in (f, source, source))))
    for name in ("MI", "VIF", "SSIM"):
      assert values[f"{name}_{key}"] == pytest.approx(alone[name] / 2,
                                                      rel=1e-4), name
    assert values[f"CC_{key}"] == pytest.approx(alone["CC"], rel=1e-5)
  # Qabf's parts are each source's share of one edge-weighted sum.
  assert values["Qabf_ir"] != pytest.approx(values["Qabf_vis"], rel=1e-3)
  ir_copy = jax.device_get(metrics.all_metrics(
      *(x.astype(np.float32) for x in (a, a, b))))
  assert ir_copy["Qabf_ir"] > ir_copy["Qabf_vis"]


def test_a_concrete_size_outside_the_arrays_is_refused():
  """size=(h, w) past the arrays scored the zeroed padding as image (EN
  12.4 bits, above the 8-bit maximum); below MIN_SIZE it is unscorable."""
  rng = np.random.default_rng(0)
  triple = [rng.integers(0, 256, (50, 50)).astype(np.float32)
            for _ in range(3)]
  for size in ((100, 100), (30, 30), (50, 51)):
    with pytest.raises(UserError, match=rf"size=\({size[0]}, {size[1]}\) "
                       "must lie within the 50x50 arrays"):
      metrics.all_metrics(*triple, size=size)
  whole = metrics.all_metrics(*triple)
  assert float(metrics.all_metrics(*triple, size=(50, 50))["EN"]) == float(
      whole["EN"])


def test_trivial_fusions_of_uint8_images_do_not_wrap():
  from textfusion_jax import fusion_baselines  # pylint: disable=g-import-not-at-top
  ir, vis = np.array([200, 3], np.uint8), np.array([100, 4], np.uint8)
  for xp in (np, jnp):
    mean = fusion_baselines.trivial_fusion("rule_mean", xp.asarray(ir),
                                           xp.asarray(vis))
    np.testing.assert_array_equal(np.asarray(mean), [150, 4])
