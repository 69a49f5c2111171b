"""Captioned degradations of real pairs: grammar, image model, pipeline."""

import numpy as np
from scipy import ndimage
import pytest

from configs import tiny
from input_pipeline import create_datasets
from input_pipeline import degradations
from input_pipeline import pipeline
from input_pipeline.captions import CaptionTable
from input_pipeline.errors import UserError


def test_the_64_sentences_follow_the_grammar_and_parse_back():
  sentences = [degradations.condition_sentence(l)
               for l in degradations.all_levels()]
  assert len(set(sentences)) == 64
  for index, levels in enumerate(degradations.all_levels()):
    assert degradations.levels_index(levels) == index
    assert degradations.parse_condition(sentences[index]) == levels
  assert sentences[0] == "clean visible image"
  assert degradations.condition_sentence((3, 1, 0)) == (
      "heavily underexposed, slightly noisy visible image")
  assert degradations.condition_sentence((0, 2, 3)) == (
      "moderately noisy, heavily hazy visible image")
  assert degradations.parse_condition(
      "  Heavily Underexposed,  slightly noisy visible image ") == (3, 1, 0)


@pytest.mark.parametrize("text", [
    "noisy visible image",                           # no adverb
    "slightly hazy, heavily underexposed visible image",  # out of order
    "slightly noisy, heavily noisy visible image",   # a kind twice
    "heavily underexposed",                          # no " visible image"
    "a person walks on a dark street",
    ""])
def test_other_text_is_not_a_condition_sentence(text):
  assert degradations.parse_condition(text) is None


def test_bad_levels_and_probabilities_name_the_field():
  with pytest.raises(UserError, match=r"levels=\(4, 0, 0\)"):
    degradations.condition_sentence((4, 0, 0))
  with pytest.raises(UserError, match=r"levels=\(1, 2\)"):
    degradations.levels_index((1, 2))
  with pytest.raises(UserError, match="config.data.degradations.level_probs"):
    degradations.check_level_probs((0.5, 0.5, 0.5),
                                   "config.data.degradations.level_probs")
  with pytest.raises(UserError, match="sum to 1"):
    degradations.check_level_probs((0.5, 0.4, 0.0, 0.0), "p")
  for not_numbers in ("abc", (0.25, "x", 0.25, 0.25), (float("nan"),) * 4,
                      None, 0.5):
    with pytest.raises(UserError, match="give 4 probabilities"):
      degradations.check_level_probs(not_numbers, "p")


def _flat(value=150):
  return np.full((64, 80, 3), value, np.uint8)


def test_each_kind_stays_inside_its_levels_range():
  rng = np.random.default_rng(0)
  for level, (low, high) in enumerate(degradations.KINDS[0][2]):
    out = degradations.degrade(_flat(), (level, 0, 0), rng)
    # Noise level 0 adds at most 1.5 levels of std; the mean is the gain.
    assert low - 0.01 <= out.mean() / 150 <= high + 0.01, level
  for level, (low, high) in enumerate(degradations.KINDS[1][2]):
    out = degradations.degrade(_flat(), (0, level, 0), rng).astype(float)
    gain = out.mean() / 150  # level-0 gain in [0.85, 1]
    assert low - 0.5 <= out.std() / gain <= high + 0.5, level
  ramp = np.tile(np.linspace(0, 255, 80, dtype=np.float32)[None, :, None],
                 (64, 1, 3)).astype(np.uint8)
  for level, (low, high) in enumerate(degradations.KINDS[2][2]):
    out = degradations.degrade(ramp, (0, 0, level), rng).astype(float)
    contrast = (out[:, -1].mean() - out[:, 0].mean()) / 255
    # Haze scales contrast by (1 - haze), underexposure level 0 by 0.85-1.
    assert 0.85 * (1 - high) - 0.02 <= contrast <= (1 - low) + 0.02, level


def test_degradation_draws_are_pure_functions_of_seed_epoch_record():
  rng = lambda: np.random.default_rng([3, 7, 11])
  a = degradations.degrade(_flat(), (2, 3, 1), rng())
  b = degradations.degrade(_flat(), (2, 3, 1), rng())
  np.testing.assert_array_equal(a, b)
  c = degradations.degrade(_flat(), (2, 3, 1), np.random.default_rng(1))
  assert not np.array_equal(a, c)


def test_prompted_target_undoes_what_the_prompt_names():
  image = np.random.default_rng(0).integers(20, 236, (24, 24, 3), np.uint8)
  for levels in degradations.all_levels():
    params = degradations.draw_parameters(levels, np.random.default_rng(1))
    # The true levels ask for the clean image back.
    same = degradations.prompted_target(image, params, levels, levels)
    assert np.abs(same.astype(int) - image).max() <= 1, levels
  levels = (2, 1, 0)
  params = degradations.draw_parameters(levels, np.random.default_rng(2))
  means = [degradations.prompted_target(image, params, levels,
                                        (named, 1, 0)).mean()
           for named in range(4)]
  # Naming heavier underexposure asks for a brighter image.
  assert means == sorted(means) and means[3] > means[0] + 100, means
  renamed = degradations.renamed_parameters(params, levels, (3, 1, 0))
  (lo, hi), (lo3, hi3) = (degradations.KINDS[0][2][2],
                          degradations.KINDS[0][2][3])
  assert np.isclose((renamed[0] - lo3) / (hi3 - lo3),
                    (params[0] - lo) / (hi - lo))
  with pytest.raises(ValueError, match="noise"):
    degradations.prompted_target(image, params, levels, (2, 2, 0))


def test_prompted_target_keeps_the_noise_the_prompt_leaves_unnamed():
  image = np.random.default_rng(0).integers(40, 216, (32, 32, 3), np.uint8)
  levels = (0, 3, 0)
  rng = np.random.default_rng(4)
  params = degradations.draw_parameters(levels, rng)
  noisy = degradations.apply(image, params, rng)
  error = lambda target: np.abs(target.astype(float) - image).mean()
  # Named noise: the true level asks for the clean image, a lower one for
  # part of the input's own noise (the larger the lower), "clean" for all.
  same = degradations.prompted_target(image, params, levels, levels, noisy)
  assert error(same) < 0.5
  kept = [error(degradations.prompted_target(image, params, levels,
                                             (0, named, 0), noisy))
          for named in (2, 1, 0)]
  assert kept == sorted(kept) and kept[0] > 2, kept
  assert abs(kept[2] - error(noisy)) < 0.1 * error(noisy), (kept, error(noisy))
  sigma, named_sigma = params[1], degradations.renamed_parameters(
      params, levels, (0, 1, 0))[1]
  residual = degradations.prompted_target(image, params, levels, (0, 1, 0),
                                          noisy).astype(float) - image
  np.testing.assert_allclose(
      residual.std(), (1 - named_sigma / sigma) *
      (noisy.astype(float) - image).std(), rtol=0.05)
  # Underexposed too: the kept noise is brightened with the image, as
  # brightening the input would (to within the 8-bit clipping).
  levels, named = (2, 3, 1), (2, 1, 1)
  params = degradations.draw_parameters(levels, rng)
  noisy = degradations.apply(image, params, rng)
  gain, sigma, haze = params
  named_sigma = degradations.renamed_parameters(params, levels, named)[1]
  dark = degradations.prompted_target(image, params, levels, named, noisy)
  noise = noisy.astype(float) - degradations.apply(image, params[:1] + (
      0.0,) + params[2:], rng).astype(float)
  unclipped = (noisy > 0) & (noisy < 255) & (dark > 0) & (dark < 255)
  np.testing.assert_allclose(
      (dark.astype(float) - image)[unclipped].std(),
      (1 - named_sigma / sigma) / (gain * (1 - haze)) *
      noise[unclipped].std(), rtol=0.1)
  assert (dark.astype(float) - image)[unclipped].std() > 2 * noise.std() * (
      1 - named_sigma / sigma)
  # More noise named than there is: the clean image, as the true prompt.
  less = (0, 1, 0)
  params = degradations.draw_parameters(less, rng)
  noisy = degradations.apply(image, params, rng)
  assert error(degradations.prompted_target(image, params, less, (0, 3, 0),
                                            noisy)) < 0.5
  with pytest.raises(ValueError, match="noise level 3 != true 1 needs"):
    degradations.prompted_target(image, params, less, (0, 3, 0))


def test_rename_one_level_may_rename_noise_and_keeps_the_default_draws():
  rng = np.random.default_rng(1)
  kinds = ("underexposed", "noisy", "hazy")
  seen = set()
  for _ in range(300):
    levels = tuple(int(l) for l in rng.integers(0, 4, 3))
    named = degradations.rename_one_level(levels, rng, kinds)
    changed = [k for k in range(3) if named[k] != levels[k]]
    assert len(changed) == 1, (levels, named)
    seen.add((changed[0], named[changed[0]]))
  assert len(seen) == 12  # every level of every kind is named sometimes
  # The default kinds draw exactly as before renamed_kinds existed, so
  # earlier runs' data (and resumes) stay the same.
  a, b = np.random.default_rng(7), np.random.default_rng(7)
  for levels in degradations.all_levels():
    kind = 0 if b.random() < 0.5 else 2
    expected = list(levels)
    expected[kind] = [l for l in range(4) if l != levels[kind]][
        int(b.integers(3))]
    assert degradations.rename_one_level(levels, a) == tuple(expected)
  for bad in ((), ("noisy", "noisy"), ("blurry",), "noisy", (["noisy"],)):
    with pytest.raises(UserError, match=r"kinds="):
      degradations.rename_one_level((1, 1, 1), a, bad)
  # Listed in another order, the same kinds draw the same.
  assert degradations.check_renamed_kinds(("hazy", "underexposed"), "k") == (
      degradations.DEFAULT_RENAMED_KINDS)
  with pytest.raises(UserError, match=r"renamed_kinds=\('fog',\)"):
    pipeline.DegradationSpec((0.25,) * 4, np.zeros((64, 4), np.float32),
                             renamed_kinds=("fog",))


def test_rename_levels_may_change_several_kinds_and_keeps_one_by_default():
  rng, again = np.random.default_rng(4), np.random.default_rng(4)
  for levels in degradations.all_levels():
    assert degradations.rename_levels(levels, rng) == (
        degradations.rename_one_level(levels, again))
  counts = {1: 0, 2: 0, 3: 0}
  for levels in degradations.all_levels() * 20:
    named = degradations.rename_levels(
        levels, rng, ("underexposed", "noisy", "hazy"), max_kinds=3)
    counts[sum(a != b for a, b in zip(levels, named))] += 1
    two = degradations.rename_levels(levels, rng, max_kinds=2)
    assert two[1] == levels[1] and two != levels
  assert min(counts.values()) > 300, counts  # 1, 2 and 3 kinds, alike
  # The pipeline passes it on: a batch with crops renamed in both kinds.
  table = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  plain = _first_batch(_records(), pipeline.DegradationSpec((0.25,) * 4,
                                                            table), seed=6)
  batch = _first_batch(_records(), pipeline.DegradationSpec(
      (0.25,) * 4, table, renamed_prob=1.0, renamed_max_kinds=2), seed=6)
  all_levels = degradations.all_levels()
  changed = [sum(a != b for a, b in zip(all_levels[t], all_levels[n]))
             for t, n in zip(plain["condition_index"],
                             batch["condition_index"])]
  assert 2 in changed and set(changed) <= {1, 2}, changed
  with pytest.raises(UserError, match=r"renamed_max_kinds=3: give a whole "
                     r"number from 1 to 2 \(the renamed kinds: underexposed, "
                     r"hazy\)"):
    pipeline.DegradationSpec((0.25,) * 4, np.zeros((64, 4), np.float32),
                             renamed_max_kinds=3)


def test_rename_one_level_changes_underexposure_or_haze_only():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(200):
    levels = tuple(int(l) for l in rng.integers(0, 4, 3))
    named = degradations.rename_one_level(levels, rng)
    changed = [k for k in range(3) if named[k] != levels[k]]
    assert len(changed) == 1 and changed[0] in (0, 2), (levels, named)
    seen.add((changed[0], named[changed[0]]))
  assert len(seen) == 8  # every level of both kinds is named sometimes


def _records(n=6, size=40):
  rng = np.random.default_rng(0)
  return [{"name": f"r{i}", "captions": [f"scene {i}"],
           "ir": rng.integers(0, 256, (size, size, 1), dtype=np.uint8),
           "vis": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)}
          for i in range(n)]


def _first_batch(source, degradation, seed=5, worker_count=0):
  table = CaptionTable(np.eye(len(source), 4, dtype=np.float32),
                       tuple(np.array([i], np.int32)
                             for i in range(len(source))))
  ds = pipeline.make_train_dataset(
      source, global_batch_size=4, crop_size=32, seed=seed,
      caption_table=table, degradation=degradation, shard_by_process=False,
      worker_count=worker_count)
  return next(iter(ds))


def test_pipeline_degrades_the_crop_keeps_it_clean_and_prompts_its_levels():
  source = _records()
  spec = pipeline.DegradationSpec(
      (0.25, 0.25, 0.25, 0.25),
      np.arange(64 * 4, dtype=np.float32).reshape(64, 4))
  plain = _first_batch(source, None)
  batch = _first_batch(source, spec)
  again = _first_batch(source, spec)
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  # Same crops and flips as without degradation: the clean crop is the target.
  np.testing.assert_array_equal(batch["vis_clean"], plain["vis"])
  np.testing.assert_array_equal(batch["ir"], plain["ir"])
  assert not np.array_equal(batch["vis"], batch["vis_clean"])
  np.testing.assert_array_equal(
      batch["text_emb"], spec.condition_table[batch["condition_index"]])
  # The reference loss's prompt: "clean visible image" (row 0) for every crop.
  np.testing.assert_array_equal(
      batch["text_emb_clean"],
      np.broadcast_to(spec.condition_table[0], batch["text_emb"].shape))


def test_renamed_prompts_ask_for_what_they_name():
  source = _records()
  table = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  plain = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table))
  batch = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table, renamed_prob=1.0))
  # Same input images; every prompt differs in one level and the target is
  # the prompted image, not the clean crop.
  np.testing.assert_array_equal(batch["vis"], plain["vis"])
  all_levels = degradations.all_levels()
  for i in range(4):
    true = all_levels[plain["condition_index"][i]]
    named = all_levels[batch["condition_index"][i]]
    assert sum(a != b for a, b in zip(true, named)) == 1
    np.testing.assert_array_equal(batch["text_emb"][i], table[
        batch["condition_index"][i]])
    assert not np.array_equal(batch["vis_clean"][i], plain["vis_clean"][i])


def test_renamed_noise_levels_keep_the_unnamed_noise_in_the_target():
  source = _records()
  table = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  plain = _first_batch(source, pipeline.DegradationSpec((0.25,) * 4, table))
  batch = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table, renamed_prob=1.0, renamed_kinds=("noisy",)))
  np.testing.assert_array_equal(batch["vis"], plain["vis"])
  all_levels = degradations.all_levels()
  lower = 0
  for i in range(4):
    true = all_levels[plain["condition_index"][i]]
    named = all_levels[batch["condition_index"][i]]
    assert named[0] == true[0] and named[2] == true[2] and named[1] != true[1]
    # Less noise named: part of the input's noise stays in the target;
    # more: the clean crop, as under the true prompt.
    off_clean = np.abs(batch["vis_clean"][i] - plain["vis_clean"][i]).mean()
    if named[1] < true[1]:
      lower += 1
      assert off_clean > 2 / 255, (true, named, off_clean * 255)
    else:
      assert off_clean < 1 / 255, (true, named, off_clean * 255)
  assert 0 < lower < 4  # seed 5 names less noise on some crops, not all
  # With Wiener targets, only the crops whose prompt names all the noise are
  # shrunk; a target that keeps noise stays as it is.
  wiener = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table, renamed_prob=1.0, wiener_target=True,
      renamed_kinds=("noisy",)))
  for i in range(4):
    true = all_levels[plain["condition_index"][i]]
    named = all_levels[batch["condition_index"][i]]
    same = np.array_equal(wiener["vis_clean"][i], batch["vis_clean"][i])
    assert same == (named[1] < true[1]), (true, named)


def test_prompted_affine_is_the_prompted_target_without_noise():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  renamed = 0
  for levels in degradations.all_levels():
    params = degradations.draw_parameters(levels, rng)
    scale, offset = degradations.prompted_affine(params, levels, levels)
    np.testing.assert_allclose(scale, 1.0, atol=1e-6)
    np.testing.assert_allclose(offset, 0.0, atol=1e-6)
    named = degradations.rename_one_level(levels, rng)
    scale, offset = degradations.prompted_affine(params, levels, named)
    mapped = np.clip(np.rint((image / 255 * scale + offset) * 255), 0, 255)
    target = degradations.prompted_target(image, params, levels, named)
    # Up to the target's rounding inside float32.
    assert np.abs(mapped - target).max() <= 1, (levels, named)
    renamed += not np.allclose(scale, 1.0)
  assert renamed > 40  # most renamings change the scale


def test_prompted_fusion_references_fuse_the_true_target():
  """With renamed_reference='prompted_fusion' the reference model fuses the
  true sentence's target; the batch's affine takes it to what the renamed
  prompt asks for (the prompted target)."""
  source = _records()
  table = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  plain = _first_batch(source, pipeline.DegradationSpec((0.25,) * 4, table))
  renamed = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table, renamed_prob=1.0))
  spec = pipeline.DegradationSpec((0.25,) * 4, table, renamed_prob=1.0,
                                  renamed_reference="prompted_fusion")
  batch = _first_batch(source, spec)
  for key in renamed:  # the same draws and targets as the default
    np.testing.assert_array_equal(batch[key], renamed[key])
  # Worker processes ship uint8 images: the new one is converted too.
  from_worker = _first_batch(source, spec, worker_count=1)
  assert set(from_worker) == set(batch)
  for key in batch:
    np.testing.assert_array_equal(from_worker[key], batch[key])
  np.testing.assert_array_equal(batch["reference_vis"], plain["vis_clean"])
  assert batch["reference_affine"].shape == (4, 2, 3)
  scale = batch["reference_affine"][:, :1, None]
  offset = batch["reference_affine"][:, 1:, None]
  mapped = np.clip(batch["reference_vis"] * scale + offset, 0, 1)
  np.testing.assert_allclose(mapped, batch["vis_clean"], atol=1.01 / 255)
  assert not np.allclose(batch["reference_affine"][:, 0], 1.0)
  # Unrenamed crops: the identity, and the reference fuses the target as
  # before; with Wiener targets the true (shrunk) target either way.
  for wiener, kind in ((False, "contrast"),
                       *((True, k) for k in degradations.WIENER_KINDS)):
    default = _first_batch(source, pipeline.DegradationSpec(
        (0.25,) * 4, table, wiener_target=wiener, wiener_kind=kind))
    unrenamed = _first_batch(source, pipeline.DegradationSpec(
        (0.25,) * 4, table, wiener_target=wiener, wiener_kind=kind,
        renamed_reference="prompted_fusion"))
    np.testing.assert_array_equal(unrenamed["reference_vis"],
                                  default["vis_clean"])
    np.testing.assert_allclose(unrenamed["reference_affine"][:, 0], 1.0,
                               atol=1e-6)
    np.testing.assert_allclose(unrenamed["reference_affine"][:, 1], 0.0,
                               atol=1e-6)
    shrunk = _first_batch(source, pipeline.DegradationSpec(
        (0.25,) * 4, table, renamed_prob=1.0, wiener_target=wiener,
        wiener_kind=kind, renamed_reference="prompted_fusion"))
    np.testing.assert_array_equal(shrunk["reference_vis"],
                                  default["vis_clean"])


def test_renamed_reference_errors_name_the_value():
  table = np.zeros((64, 4), np.float32)
  with pytest.raises(UserError, match=r"renamed_reference='fused': give one "
                     r"of fuse_prompted_target, prompted_fusion"):
    pipeline.DegradationSpec((0.25,) * 4, table, renamed_reference="fused")
  with pytest.raises(UserError, match=r"renamed_reference='prompted_fusion' "
                     r"cannot keep the noise.*drop 'noisy' from "
                     r"renamed_kinds$"):
    pipeline.DegradationSpec((0.25,) * 4, table,
                             renamed_kinds=("underexposed", "noisy"),
                             renamed_reference="prompted_fusion")


def test_wiener_gain_measures_the_signal_that_survives_the_noise():
  image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8)
  clean = degradations.wiener_gain(image, (1.0, 0.0, 0.0))
  assert 0.9999 < clean < 1.0  # only 8-bit rounding
  # Underexposure and haze shrink the signal, noise adds to N: lower gains.
  assert (degradations.wiener_gain(image, (1.0, 20.0, 0.0)) >
          degradations.wiener_gain(image, (0.3, 20.0, 0.0)) >
          degradations.wiener_gain(image, (0.3, 20.0, 0.5)))
  # S / (S + N) by hand: luma variance, luma noise std 0.894 sigma.
  luma = image.astype(np.float64) @ (0.299, 0.587, 0.114)
  s = luma.var() * (0.2 * 0.6)**2
  n = (np.sqrt(0.64 + 0.36 * (0.299**2 + 0.587**2 + 0.114**2)) * 10)**2
  assert np.isclose(degradations.wiener_gain(image, (0.2, 10.0, 0.4)),
                    s / (s + n + 1 / 12), rtol=1e-4)
  # A flat crop holds no signal to recover.
  assert degradations.wiener_gain(_flat(), (0.5, 5.0, 0.0)) == 0.0


def test_shrink_contrast_keeps_each_channels_mean():
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)
  half = degradations.shrink_contrast(image, 0.5).astype(float)
  np.testing.assert_allclose(half.mean((0, 1)), image.mean((0, 1)), atol=0.5)
  np.testing.assert_allclose(half.std((0, 1)), image.std((0, 1)) / 2,
                             rtol=0.02)
  np.testing.assert_array_equal(degradations.shrink_contrast(image, 1.0),
                                image)
  with pytest.raises(ValueError, match="1.5"):
    degradations.shrink_contrast(image, 1.5)


def test_wiener_targets_shrink_the_target_by_its_inputs_gain():
  source = _records()
  table = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  plain = _first_batch(source, pipeline.DegradationSpec((0.25,) * 4, table))
  batch = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table, wiener_target=True))
  np.testing.assert_array_equal(batch["vis"], plain["vis"])
  np.testing.assert_array_equal(batch["condition_index"],
                                plain["condition_index"])
  shrunk = 0
  for i in range(4):
    # In grey levels: in-process batches are floats in [0, 1].
    target, clean = batch["vis_clean"][i] * 255, plain["vis_clean"][i] * 255
    np.testing.assert_allclose(target.mean((0, 1)), clean.mean((0, 1)),
                               atol=1.0)
    assert target.std() <= clean.std() + 0.5
    shrunk += target.std() < 0.95 * clean.std()
  assert shrunk  # at least one crop of the batch is noisy enough


def _edges_and_shading(size: int = 64) -> np.ndarray:
  """A smooth shading (low frequencies) plus a fine checkerboard (the
  highest), in three tinted channels, uint8."""
  y, x = np.mgrid[:size, :size]
  luma = 60 + 100 * np.sin(np.pi * x / size) * np.sin(np.pi * y / size)
  luma = luma + 30 * ((x + y) % 2)
  return np.clip(np.rint(luma[..., None] * (1.0, 0.9, 0.8)), 0,
                 255).astype(np.uint8)


def test_spectral_wiener_filter_drops_the_fine_detail_noise_buries():
  image = _edges_and_shading()
  # Undegraded: only 8-bit rounding, so the image comes back.
  np.testing.assert_allclose(
      degradations.wiener_filter(image, (1.0, 0.0, 0.0)), image, atol=3)
  checker = lambda a: np.abs(np.diff(a.astype(float)[..., 0], axis=1)).mean()
  shading = lambda a: ndimage.uniform_filter(a.astype(float)[..., 0],
                                             8)[8:-8, 8:-8]
  light = degradations.wiener_filter(image, (0.6, 4.0, 0.0))
  moderate = degradations.wiener_filter(image, (0.35, 10.0, 0.36))
  heavy = degradations.wiener_filter(image, (0.15, 21.0, 0.5))
  # The checkerboard fades as the noise buries it (S/N below 1 once heavily
  # degraded), while the shading and the channel means stay; a whole-crop
  # gain flattens both alike.
  assert checker(image) > checker(light) > checker(moderate) > 2 * checker(
      heavy)
  np.testing.assert_allclose(shading(moderate), shading(image), atol=3)
  np.testing.assert_allclose(heavy.mean((0, 1)), image.mean((0, 1)), atol=1)
  contrast = degradations.wiener_target(image, image, (0.35, 10.0, 0.36),
                                        "contrast")
  assert np.abs(shading(contrast) - shading(image)).max() > 20
  # Another target (a renamed prompt's, here the image at 80 % brightness)
  # is filtered by the clean image's S / (S + N), not its own.
  dim = np.rint(image * 0.8).astype(np.uint8)
  np.testing.assert_allclose(
      degradations.wiener_target(dim, image, (0.15, 21.0, 0.5), "spectral"),
      heavy * 0.8, atol=1.5)
  # The squared gain leans the fusion further on the infrared.
  gain = degradations.wiener_gain(image, (0.35, 10.0, 0.36))
  squared = degradations.wiener_target(image, image, (0.35, 10.0, 0.36),
                                       "contrast_squared")
  np.testing.assert_allclose(squared.std((0, 1)),
                             image.std((0, 1)) * gain**2, rtol=0.02)
  with pytest.raises(ValueError, match="'wavelet'"):
    degradations.wiener_target(image, image, (1.0, 0.0, 0.0), "wavelet")


def test_spectral_wiener_targets_in_the_pipeline():
  source = _records()
  table = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  plain = _first_batch(source, pipeline.DegradationSpec((0.25,) * 4, table))
  batch = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table, wiener_target=True, wiener_kind="spectral"))
  np.testing.assert_array_equal(batch["vis"], plain["vis"])
  contrast = _first_batch(source, pipeline.DegradationSpec(
      (0.25,) * 4, table, wiener_target=True))
  np.testing.assert_array_equal(batch["condition_index"],
                                plain["condition_index"])
  for i in range(4):
    target, clean = batch["vis_clean"][i] * 255, plain["vis_clean"][i] * 255
    np.testing.assert_allclose(target.mean((0, 1)), clean.mean((0, 1)),
                               atol=1.5)
    assert target.std() <= clean.std() + 0.5
  assert not np.array_equal(batch["vis_clean"], plain["vis_clean"])
  assert not np.array_equal(batch["vis_clean"], contrast["vis_clean"])


def _reference_training(seed):
  """(mesh, trainer, batch): the tiny model trained with a reference term,
  and a random batch of the degraded pipeline's keys."""
  # pylint: disable=g-import-not-at-top
  from textfusion_jax import sharding as sharding_lib
  from textfusion_jax import train_step
  config = tiny.get_config()
  config.loss.reference = 5.0
  mesh = sharding_lib.make_mesh(config.mesh)
  trainer = train_step.ShardedTrainer(config, mesh)
  rng = np.random.default_rng(seed)
  size, count = config.data.crop_size, config.train.batch_size
  dim = config.model.text_dim
  batch = {"vis": rng.random((count, size, size, 3), np.float32) * 0.3,
           "vis_clean": rng.random((count, size, size, 3), np.float32),
           "ir": rng.random((count, size, size, 1), np.float32),
           "text_emb": rng.standard_normal((count, dim)).astype(np.float32),
           "text_emb_clean": np.repeat(
               rng.standard_normal((1, dim)).astype(np.float32), count, 0)}
  return mesh, trainer, batch


def test_reference_loss_pulls_towards_the_frozen_models_clean_fusion():
  """With config.loss.reference the train step's target is the *reference*
  model's fusion of the clean crop under the clean prompt, held fixed: its
  gradient and logged term equal those computed by hand, and the term
  differs from what the model's own clean fusion as target would give."""
  # pylint: disable=g-import-not-at-top
  import jax
  import optax
  from textfusion_jax import losses
  from textfusion_jax import sharding as sharding_lib
  mesh, trainer, batch = _reference_training(seed=0)
  with jax.set_mesh(mesh):
    state = trainer.init_state(jax.random.key(0))
    params = jax.tree.map(np.asarray, state.params)
    frozen = jax.tree.map(np.asarray,
                          trainer.init_state(jax.random.key(7)).params)

    # One compiled function, the reference params an argument (jitted: run
    # eagerly, op by op, this test took 6 minutes on 2 cores).
    @jax.jit
    def loss_with(params, reference_params):
      def loss_fn(p):
        fused = trainer.apply(p, batch["vis"], batch["ir"], batch["text_emb"])
        reference = trainer.apply(reference_params, batch["vis_clean"],
                                  batch["ir"], batch["text_emb_clean"])
        return losses.fusion_loss(fused, batch["vis"], batch["ir"],
                                  trainer.loss_weights,
                                  vis_target=batch["vis_clean"],
                                  reference=reference)
      return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (_, parts), grads = loss_with(params, frozen)
    # The model's own clean fusion as the target.
    (_, own_parts), _ = loss_with(params, params)
    _, metrics = trainer.jitted_train_step(
        state, sharding_lib.global_batch(batch, trainer.batch_sharding),
        jax.random.key(1), trainer.place_params(frozen))
    logged = metrics.compute()
  np.testing.assert_allclose(float(logged["loss_reference"]),
                             float(parts["reference"]), rtol=1e-4)
  np.testing.assert_allclose(float(logged["grad_norm"]),
                             float(optax.tree.norm(grads)), rtol=1e-4)
  # The model's own clean fusion as target would be off by well over the
  # tolerance above (rtol 1e-4).
  assert abs(float(own_parts["reference"]) / float(parts["reference"]) -
             1) > 1e-3


def test_prompted_fusion_reference_maps_the_frozen_fusion_of_the_true_target():
  """A batch with 'reference_affine' (renamed_reference='prompted_fusion'):
  the train step's reference term is the L1 to the frozen model's fusion of
  'reference_vis', scaled, offset and clipped per example; not of the
  prompted target 'vis_clean'."""
  # pylint: disable=g-import-not-at-top
  import jax
  from textfusion_jax import sharding as sharding_lib
  mesh, trainer, batch = _reference_training(seed=1)
  count = len(batch["vis"])
  # Offsets differ per channel, as the airlight's do.
  affine = np.stack([np.stack([np.full(3, s, np.float32),
                               np.float32(o) * np.float32([1.0, -0.5, 2.0])])
                     for s, o in zip(np.linspace(0.3, 3.0, count),
                                     np.linspace(-0.1, 0.2, count))])
  batch["reference_affine"] = affine
  batch["reference_vis"] = np.random.default_rng(2).random(
      batch["vis_clean"].shape, np.float32)
  with jax.set_mesh(mesh):
    state = trainer.init_state(jax.random.key(0))
    frozen = trainer.init_state(jax.random.key(7)).params
    apply = jax.jit(trainer.apply)
    fused = np.asarray(apply(state.params, batch["vis"], batch["ir"],
                             batch["text_emb"]))
    clean_prompt = (batch["ir"], batch["text_emb_clean"])
    of_true = np.asarray(apply(frozen, batch["reference_vis"], *clean_prompt))
    of_prompted = np.asarray(apply(frozen, batch["vis_clean"], *clean_prompt))
    _, metrics = trainer.jitted_train_step(
        state, sharding_lib.global_batch(batch, trainer.batch_sharding),
        jax.random.key(1), frozen)
    logged = float(metrics.compute()["loss_reference"])
  expected = np.clip(of_true * affine[:, :1, None] + affine[:, 1:, None],
                     0, 1)
  assert 0 < expected.mean() < 1 and (expected == 1).any()  # clipped, too
  np.testing.assert_allclose(logged, np.abs(fused - expected).mean(),
                             rtol=1e-4)
  assert abs(logged / np.abs(fused - of_prompted).mean() - 1) > 1e-2


def test_degradations_need_real_pairs_and_valid_probabilities(tmp_path):
  config = tiny.get_config()
  config.loss.reference = 2.0
  with pytest.raises(UserError, match=r"config.loss.reference=2.0 needs "
                     r"config.data.degradations.enabled"):
    create_datasets(config, lambda: None)
  config.loss.reference = 0.0
  config.data.degradations.enabled = True
  with pytest.raises(UserError, match="needs real pairs"):
    create_datasets(config, lambda: None)
  # pylint: disable=g-import-not-at-top
  from tests.test_train import _write_folder_dataset
  from textfusion_jax.text import encoder as text_encoder
  config.data.source = "folder"
  config.data.train_dir = str(_write_folder_dataset(tmp_path / "t", "ab", 0))
  config.data.eval_dir = str(_write_folder_dataset(tmp_path / "e", "c", 1))

  def refused(pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
      create_datasets(config, lambda: text_encoder.from_config(config.text))

  config.data.degradations.level_probs = (0.2, 0.2, 0.2, 0.2, 0.2)
  refused(r"config.data.degradations.level_probs"
          r"=\(0.2, 0.2, 0.2, 0.2, 0.2\)")
  config.data.degradations.level_probs = (0.4, 0.2, 0.2, 0.2)
  config.data.degradations.renamed_prob = 1.5
  refused(r"renamed_prob=1.5")
  config.data.degradations.renamed_prob = 0.0
  with config.ignore_type():  # e.g. a config file that builds its own dict
    config.data.degradations.wiener_target = "yes"
  refused(r"wiener_target='yes'")
  with config.ignore_type():
    config.data.degradations.wiener_target = False
  config.data.degradations.wiener_kind = "spectral"
  refused(r"wiener_kind='spectral' needs "
          r"config.data.degradations.wiener_target=True")
  config.data.degradations.wiener_target = True
  config.data.degradations.wiener_kind = "spectal"
  refused(r"wiener_kind='spectal': one of "
          r"contrast, contrast_squared, spectral")
  config.data.degradations.wiener_kind = "contrast"
  config.data.degradations.renamed_prob = 0.5
  config.data.degradations.renamed_kinds = ("noisy", "blurry")
  refused(r"renamed_kinds=\('noisy', 'blurry'\)"
          r": give distinct kinds out of underexposed, noisy, hazy")
  config.data.degradations.renamed_kinds = ("noisy",)
  config.data.degradations.renamed_reference = "prompted_fusion"
  refused(r"config.data.degradations."
          r"renamed_reference='prompted_fusion' cannot keep.* "
          r"from config.data.degradations.renamed_kinds$")
  config.data.degradations.renamed_kinds = ("hazy",)
  config.data.degradations.renamed_reference = "prompted"
  refused(r"config.data.degradations."
          r"renamed_reference='prompted': give one of")
  config.data.degradations.renamed_reference = "prompted_fusion"
  refused(r"'prompted_fusion' changes nothing "
          r"without .*renamed_prob > 0 and config.loss.reference")
  config.data.degradations.renamed_reference = "fuse_prompted_target"
  config.data.degradations.renamed_max_kinds = 0
  refused(r"config.data.degradations."
          r"renamed_max_kinds=0: give a whole number from 1 to 1")
  config.data.degradations.renamed_max_kinds = 1


def test_degraded_training_and_fuse_through_a_saved_clip_checkpoint(
    tmp_path, monkeypatch):
  """A real-format (Hugging Face) CLIP directory, saved here, drives
  degraded training and then `fuse`, which warns once on other prompts."""
  # pylint: disable=g-import-not-at-top
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path
  from tests.test_train import _write_folder_dataset
  from textfusion_jax import inference
  from textfusion_jax import train_loop
  from textfusion_jax.text import tiny_clip
  clip_dir = tiny_clip.save_tiny_random_clip(tmp_path / "clip", seed=3)
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.train_dir = str(_write_folder_dataset(tmp_path / "train",
                                                    "abcd", 0))
  config.data.eval_dir = str(_write_folder_dataset(tmp_path / "held",
                                                   ["p"], 1))
  config.data.degradations.enabled = True
  # As configs/real_pairs_degraded.py: the head's smoothed visible copies
  # travel through checkpoints, the frozen reference and `fuse`.
  config.model.vis_smoothing_sigmas = (1.0, 2.0)
  config.text.encoder = str(clip_dir)
  config.train.num_steps = 2
  config.eval.at_end = False  # evaluation has tests of its own
  workdir = tmp_path / "run"
  train_loop.train_and_evaluate(config, str(workdir))
  # Stage 2 (configs/real_pairs_degraded_refine.py): the reference loss
  # against that run, frozen, loaded from its workdir.
  config.loss.reference = 10.0
  config.train.init_from = config.train.reference_from = str(workdir)
  config.eval.at_end = False
  train_loop.train_and_evaluate(config, str(tmp_path / "refined"))
  logged = [json.loads(line) for line in
            (tmp_path / "refined" / "metrics.jsonl").read_text().splitlines()]
  # Logged at step 1 (orbax's first checkpoint ends a log window) and 2.
  assert [l["train/loss_reference"] > 0 for l in logged
          if "train/loss_reference" in l] == [True, True]
  fuser = inference.Fuser.load(str(workdir))
  assert tuple(fuser.config.model.vis_smoothing_sigmas) == (1.0, 2.0)
  assert fuser.trained_on_condition_sentences
  assert fuser.config.text.encoder == str(clip_dir)
  emb = fuser.encoder.encode(["heavily underexposed visible image"])[0]
  vis = np.full((40, 48, 3), 0.1, np.float32)
  ir = np.full((40, 48, 1), 0.5, np.float32)
  assert fuser.fuse(vis, ir, emb).shape == (40, 48, 3)
  root = Path(__file__).resolve().parents[1]
  held = Path(config.data.eval_dir)
  common = [sys.executable, "-m", "textfusion_jax.fuse", "--checkpoint",
            str(workdir), "--ir", str(held / "ir" / "p.png"), "--vis",
            str(held / "vi" / "p.png")]
  env = {**os.environ, "PYTHONPATH": str(root)}
  run = lambda text, out: subprocess.run(
      common + ["--text", text, "--out", str(tmp_path / out)], cwd=root,
      capture_output=True, text=True, timeout=300, env=env)
  other = run("a street at night", "other.png")
  assert other.returncode == 0, other.stderr[-2000:]
  assert other.stderr.count("warning: 1 prompt(s) are not condition") == 1
  assert (tmp_path / "other.png").exists()
  # Grammar prompts fuse without the warning (checked in-process: a second
  # CLI run costs ~20 s of start-up and compilation).
  from textfusion_jax import fuse  # pylint: disable=g-import-not-at-top
  import contextlib
  import io
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    fuse._warn_if_off_grammar(fuser, ["slightly noisy visible image"])  # pylint: disable=protected-access
    assert not stderr.getvalue()
    fuse._warn_if_off_grammar(fuser, ["a street at night"])  # pylint: disable=protected-access
  assert stderr.getvalue().count("warning: 1 prompt(s)") == 1
  # The encoder folder now holds other weights: the run (which recorded
  # what its encoder computes) is not fused, exported or resumed with them.
  info = json.loads((workdir / "run_info.json").read_text())
  assert info["text_encoder"]["fingerprint"] == fuser.encoder.fingerprint
  import shutil  # pylint: disable=g-import-not-at-top
  from textfusion_jax import run_bundle  # pylint: disable=g-import-not-at-top
  # The same encoder copied to another folder resumes (its fingerprint is
  # the recorded one); another name that is not a folder does not.
  moved = config.copy_and_resolve_references()
  moved.text.encoder = str(shutil.copytree(clip_dir, tmp_path / "moved"))
  moved.loss.reference = 0.0
  moved.train.init_from = moved.train.reference_from = ""
  train_loop.setup_workdir(moved, str(workdir))
  assert train_loop.create_datasets(moved, workdir).text_dim == 64
  moved.text.encoder = "openai/clip-vit-base-patch32"
  with pytest.raises(UserError, match=r"was trained with text encoder "
                     rf"'{clip_dir}', not config.text.encoder="):
    train_loop.setup_workdir(moved, str(workdir))
  shutil.rmtree(clip_dir)
  tiny_clip.save_tiny_random_clip(clip_dir, seed=4)
  config.loss.reference = 0.0
  config.train.init_from = config.train.reference_from = ""
  # Resuming is refused before any caption is embedded with the new encoder.
  import input_pipeline  # pylint: disable=g-import-not-at-top

  def no_datasets(*args):
    raise AssertionError("datasets built before the encoder was checked")

  monkeypatch.setattr(input_pipeline, "create_datasets", no_datasets)
  for attempt in (lambda: inference.Fuser.load(str(workdir)),
                  lambda: run_bundle.export_run(str(workdir),
                                                str(tmp_path / "bundle")),
                  lambda: train_loop.train_and_evaluate(config, str(workdir))):
    with pytest.raises(UserError, match=r"now holds other weights or "
                       "another tokenizer"):
      attempt()
  assert not (tmp_path / "bundle").exists()
  # The encoder the run was trained with, moved: `fuse` and `export` take
  # its new place (--text_encoder) and refuse another one there.
  moved_dir = tmp_path / "moved"
  moved_fuser = inference.Fuser.load(str(workdir),
                                     text_encoder_dir=str(moved_dir))
  np.testing.assert_array_equal(
      moved_fuser.encoder.encode(["heavily underexposed visible image"])[0],
      emb)
  run_bundle.export_run(str(workdir), str(tmp_path / "bundle"),
                        text_encoder_dir=str(moved_dir))
  # The card names the encoder the run was trained with, not where it is now.
  card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
  assert f"- Text encoder: `{clip_dir}`" in card
  exported = inference.Fuser.load(str(tmp_path / "bundle"))
  np.testing.assert_array_equal(
      exported.encoder.encode(["heavily underexposed visible image"])[0], emb)
  with pytest.raises(UserError, match=r"--text_encoder is for training "
                     "workdirs"):
    inference.Fuser.load(str(tmp_path / "bundle"),
                         text_encoder_dir=str(moved_dir))
  other_dir = tiny_clip.save_tiny_random_clip(tmp_path / "other", seed=5)
  with pytest.raises(UserError, match=rf"but '{other_dir}' computes other "
                     "embeddings"):
    inference.Fuser.load(str(workdir), text_encoder_dir=str(other_dir))
  shutil.rmtree(clip_dir)
  with pytest.raises(UserError, match=rf"{clip_dir}: not a checkpoint "
                     rf"directory \(the text encoder {workdir} was trained "
                     "with; if it moved, `fuse` and `export` take its new "
                     r"place with --text_encoder\)"):
    inference.Fuser.load(str(workdir))
  # A run that recorded no fingerprint: the replacement is taken, with a
  # warning that it cannot be checked.
  del info["text_encoder"]
  (workdir / "run_info.json").write_text(json.dumps(info))
  from absl import logging  # pylint: disable=g-import-not-at-top
  warned = []
  monkeypatch.setattr(logging, "warning", lambda *a: warned.append(a[0] % a[1:]))
  inference.Fuser.load(str(workdir), text_encoder_dir=str(other_dir))
  assert len(warned) == 1 and "cannot check that --text_encoder" in warned[0]


@pytest.mark.parametrize("bundle", ["textfusion-small-degraded",
                                    "textfusion-small-degraded-prompted"])
def test_shipped_degraded_model_brightens_when_told_underexposed(
    shared_dir, bundle):
  """Prompt control with each shipped degraded bundle on a degraded held-out
  TNO pair: "heavily underexposed" must fuse brighter than "clean"."""
  # pylint: disable=g-import-not-at-top
  from pathlib import Path
  from textfusion_jax import inference
  bundle_dir = Path(__file__).resolve().parents[1] / "pretrained" / bundle
  tno = shared_dir / "data" / "ivf_samples" / "tno"
  fuser = inference.Fuser.load(str(bundle_dir))
  pair = inference.collect_pairs(str(tno / "ir" / "3.png"),
                                 str(tno / "vi" / "3.png"), "unused.png")[0]
  vis, ir = inference.load_pair(pair)
  bad = degradations.degrade(np.rint(vis * 255).astype(np.uint8), (2, 1, 0),
                             np.random.default_rng(0)).astype(np.float32) / 255
  under, clean = fuser.encoder.encode(["heavily underexposed visible image",
                                       degradations.CLEAN])
  grey = lambda rgb: rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
  brighter = grey(fuser.fuse(bad, ir, under)).mean()
  darker = grey(fuser.fuse(bad, ir, clean)).mean()
  # Measured +46.6 to +46.8 (textfusion-small-degraded) and +68.3
  # (-prompted) grey levels on average over 20 degraded pairs.
  assert brighter > darker + 10, (brighter, darker)
  # TNO's visible image is grey: so is its fusion under any prompt (the
  # per-channel correction tinted it by up to 26 levels, B - G).
  fused = fuser.fuse(vis, ir, under)
  assert np.array_equal(fused[..., 0], fused[..., 1])
  assert np.array_equal(fused[..., 1], fused[..., 2])
  assert fused.std() > 10  # an image, not a flat grey
  # ... and so is a grey frame whose blue is off by a level here and there
  # (sensor or conversion noise): it was tinted by 8.5 levels.
  near = vis.copy()
  near[..., 2] = np.clip(near[..., 2] + np.random.default_rng(1).integers(
      -1, 2, near.shape[:2]) / 255, 0, 1)
  fused = fuser.fuse(near, ir, under)
  assert np.array_equal(fused[..., 0], fused[..., 2])


def test_degraded_training_needs_no_captions(tmp_path):
  """Every prompt is a condition sentence: pairs without a caption line
  train, and their captions are never embedded."""
  # pylint: disable=g-import-not-at-top
  from tests.test_train import _write_folder_dataset
  from textfusion_jax.text import encoder as text_encoder
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.degradations.enabled = True
  train = _write_folder_dataset(tmp_path / "t", "ab", 0)
  (train / "captions.jsonl").unlink()
  config.data.train_dir = str(train)
  config.data.eval_dir = str(_write_folder_dataset(tmp_path / "e", "c", 1))
  embedded = []

  def make_encoder():
    encoder = text_encoder.from_config(config.text)
    real = encoder.encode

    def encode(texts, batch_size=64):
      embedded.extend(texts)
      return real(texts, batch_size=batch_size)

    encoder.encode = encode
    return encoder

  data = create_datasets(config, make_encoder)
  batch = next(data.train_iter_at(0))
  assert batch["text_emb"].shape == (config.train.batch_size,
                                     config.model.text_dim)
  assert len(embedded) == 64 and not any("scene" in t for t in embedded)
