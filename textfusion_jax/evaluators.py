"""Periodic evaluation: fuse eval images, score them on device, save results.

The model's fused images and the four trivial fusions of
`textfusion_jax.fusion_baselines` (copy_vis, copy_ir, rule_mean, rule_max)
are scored with the same jitted metric suite on the same images; the model
is its colour output quantised to 8 bits, i.e. the PNG it writes. Outputs
land in `<workdir>/eval/<step>/`: fused PNGs and metrics.json, whose rows
equal what `python -m textfusion_jax.evaluate --baselines` gives on those
PNGs and the sources (tests/test_train.py checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from textfusion_jax import color
from textfusion_jax import distributed
from textfusion_jax import fusion_baselines
from input_pipeline import files
from input_pipeline import image_io
from textfusion_jax import metrics as metrics_lib
from textfusion_jax import sharding as sharding_lib
from textfusion_jax import tiling

METHODS = ("model",) + fusion_baselines.TRIVIAL_RULES


def to_u8(image01: jax.Array) -> jax.Array:
  """[0, 1] float -> 8-bit levels as float (what a saved PNG holds)."""
  return jnp.round(jnp.clip(image01, 0.0, 1.0) * 255.0)


def metric_inputs(fused_rgb: jax.Array, vis: jax.Array, ir: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Grey candidates of all methods stacked on the batch axis, on device.

  Args:
    fused_rgb: (B, H, W, 3) model output in [0, 1].
    vis, ir: (B, H, W, 3) and (B, H, W, 1) sources in [0, 1].
  Returns:
    (candidates, ir_grey, vis_grey), each (len(METHODS) * B, H, W) in
    0..255 (method-major), and the model's uint8 RGB (B, H, W, 3).
  """
  fused_u8 = to_u8(fused_rgb)
  vis_grey = metrics_lib.rgb_to_grey(to_u8(vis))
  ir_grey = to_u8(ir)[..., 0]
  candidates = jnp.concatenate(
      [metrics_lib.rgb_to_grey(fused_u8)] +
      [fusion_baselines.trivial_fusion(rule, ir_grey, vis_grey)
       for rule in fusion_baselines.TRIVIAL_RULES])
  repeat = len(METHODS)
  return (candidates, jnp.tile(ir_grey, (repeat, 1, 1)),
          jnp.tile(vis_grey, (repeat, 1, 1)), fused_u8.astype(jnp.uint8))


class FusionEvaluator:
  """Scores a model on a fixed eval set and writes `eval/<step>/`."""

  def __init__(self, apply_fn: Callable[..., jax.Array],
               batches: Callable[[], Iterable[Mapping[str, Any]]],
               to_device: Callable[[Mapping[str, np.ndarray]], Any],
               workdir: str | Path, save_images: int = 16,
               pad_multiple: int = 1, row_multiple: int = 1):
    self._apply_fn = apply_fn
    # Batches are split over every device: rows are padded to a multiple of
    # the device count (padded rows are not scored).
    self._row_multiple = max(1, row_multiple)
    # Padding every image up to a multiple of `pad_multiple` (the metrics
    # score only the true region) bounds the number of compiled shapes on
    # datasets of many image sizes. The model's convolutions near the border
    # see the (mirror) padding, so its scores shift slightly with the value:
    # compare runs at one value.
    self._pad_multiple = max(1, pad_multiple)
    self._batches = batches
    self._to_device = to_device
    self._root = Path(workdir) / "eval"
    self._save_images = save_images

    def prepare(params, vis, ir, text_emb, valid_size):
      return metric_inputs(apply_fn(params, vis, ir, text_emb, valid_size),
                           vis, ir)

    self._prepare = jax.jit(prepare)
    self._compiled: dict[Any, Any] = {}  # per input shape

  def evaluate(self, params: Any, step: int) -> dict[str, Any]:
    per_image: dict[str, dict[str, dict[str, float]]] = {m: {} for m in METHODS}
    restoration: dict[str, dict[str, float]] = {}
    samples = []
    out_dir = self._root / str(step)
    for batch in self._batches():
      names = list(batch["name"])
      valid = np.asarray(batch.get("valid", np.ones(len(names), bool)))
      height, width = batch["vis"].shape[1:3]
      rows = -(-len(names) // self._row_multiple) * self._row_multiple
      device_batch = self._to_device({
          "vis": _pad_rows(_pad_images(batch["vis"], self._pad_multiple),
                           rows),
          "ir": _pad_rows(_pad_images(batch["ir"], self._pad_multiple), rows),
          "text_emb": _pad_rows(np.asarray(batch["text_emb"]), rows),
          "valid_size": np.tile([[height, width]], (rows, 1)).astype(np.int32),
          "sizes": np.tile([[height, width]], (len(METHODS) * rows, 1)
                           ).astype(np.int32)})
      args = (params, device_batch["vis"], device_batch["ir"],
              device_batch["text_emb"], device_batch["valid_size"])
      shape = tuple(np.shape(a) for a in args[1:])
      if shape not in self._compiled:
        # Compiled ahead, then all processes start it together (see
        # distributed.barrier); every process meets the same shapes.
        self._compiled[shape] = self._prepare.lower(*args).compile()
        distributed.barrier("eval_compiled")
      candidates, ir_grey, vis_grey, fused_u8 = self._compiled[shape](*args)
      # A second device program: the metric suite compiles with its own
      # XLA options; inputs never leave the device in between.
      metric_values = metrics_lib.batched_all_metrics(
          candidates, ir_grey, vis_grey, device_batch["sizes"])
      # Per-image metrics need no collectives; gathering them does.
      distributed.barrier("eval_metrics")
      stacked = sharding_lib.to_host(metric_values)
      scores = {method: {k: v[m * rows:m * rows + len(names)]
                         for k, v in stacked.items()}
                for m, method in enumerate(METHODS)}
      fused_u8 = np.asarray(sharding_lib.to_host(fused_u8))[:, :height,
                                                             :width]
      for i, name in enumerate(names):
        if not valid[i]:
          continue
        for method in METHODS:
          per_image[method][name] = {
              k: float(v[i]) for k, v in scores[method].items()}
        if "vis_clean" in batch:
          restoration[name] = _restoration_errors(
              fused_u8[i], batch["ir"][i], batch["vis_clean"][i])
        if jax.process_index() == 0:
          image = fused_u8[i]
          if color.is_grey(batch["vis"][i]):
            # As `fuse` writes it: the luma the metrics scored, untinted
            # by the text-driven per-channel correction.
            image = np.repeat(image_io.rgb_to_grey_u8(image)[..., None], 3,
                              axis=-1)
          image_io.write_png_atomic(out_dir / f"{name}.png", image)
          if len(samples) < self._save_images:
            samples.append(image)
    result = _summary(per_image)
    by_dataset = _split_by_dataset(per_image)
    if len(by_dataset) > 1:  # a mixture: each dataset's eval split apart
      result["per_dataset"] = {name: _summary(images)
                               for name, images in by_dataset.items()}
    result["per_image"] = per_image["model"]
    if restoration:
      result["restoration"] = _mean_over_images(restoration)
      result["restoration_per_image"] = restoration
    if jax.process_index() == 0:
      files.write_text_atomic(out_dir / "metrics.json",
                              files.json_text(result, indent=2,
                                              sort_keys=True))
    result["samples"] = samples
    return result


def _summary(per_image: Mapping[str, Mapping[str, Mapping[str, float]]]
             ) -> dict[str, Any]:
  """Per method, the mean of each metric; mean ranks; the image count."""
  result: dict[str, Any] = {m: _mean_over_images(per_image[m])
                            for m in METHODS}
  if per_image["model"]:
    result[fusion_baselines.MEAN_RANK] = fusion_baselines.mean_ranks(
        {m: result[m] for m in METHODS})
  result["num_images"] = len(per_image["model"])
  return result


def _split_by_dataset(per_image: Mapping[str, Mapping[str, Any]]
                      ) -> dict[str, dict[str, dict[str, Any]]]:
  """per_image regrouped by the '<dataset>/' prefix of image names."""
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for method, images in per_image.items():
    for name, values in images.items():
      dataset = name.split("/", 1)[0] if "/" in name else ""
      out.setdefault(dataset, {m: {} for m in METHODS})[method][name] = values
  return out


def _restoration_errors(fused_u8: np.ndarray, ir: np.ndarray,
                        vis_clean: np.ndarray) -> dict[str, float]:
  """Synthetic data only: distance to what the degraded visible image hid.

  target_L1: mean |grey(F) - max(IR, grey(clean VIS))| (the training target);
  clean_PSNR: PSNR of grey(F) against grey(clean VIS), in dB;
  color_L1: mean |CbCr(F) - CbCr(clean VIS)| over both channels (BT.601, in
  8-bit levels): underexposure and haze scale and shift the chroma too.
  Captions describe the degradation, so these are the numbers text should
  improve.
  """
  fused = image_io.rgb_to_grey_u8(fused_u8).astype(np.float64)
  clean_u8 = np.rint(np.clip(vis_clean, 0, 1) * 255).astype(np.uint8)
  clean = image_io.rgb_to_grey_u8(clean_u8).astype(np.float64)
  ir_levels = np.rint(np.clip(ir[..., 0], 0, 1) * 255)
  mse = float(np.mean((fused - clean) ** 2))
  # BT.601 chroma rows; the +128 offsets cancel in the difference.
  chroma = lambda rgb: rgb.astype(np.float64) @ color.RGB_TO_YCBCR[1:].T
  return {"target_L1": float(np.mean(np.abs(fused - np.maximum(ir_levels,
                                                                clean)))),
          "clean_PSNR": 10 * np.log10(255.0 ** 2 / max(mse, 1e-10)),
          "color_L1": float(np.mean(np.abs(chroma(fused_u8) -
                                           chroma(clean_u8))))}


def _pad_images(images: np.ndarray, multiple: int) -> np.ndarray:
  """(B, H, W, C) padded at the bottom/right to multiples, as fuse pads."""
  height, width = images.shape[1:3]
  return tiling.pad_bottom_right(images, height + -height % multiple,
                                 width + -width % multiple)


def _pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
  """`batch` with its last row repeated up to `rows` rows."""
  extra = rows - len(batch)
  if not extra:
    return batch
  return np.concatenate([batch, np.repeat(batch[-1:], extra, axis=0)])


def _mean_over_images(per_image: Mapping[str, Mapping[str, float]]
                      ) -> dict[str, float]:
  if not per_image:
    return {}
  names = next(iter(per_image.values())).keys()
  return {k: float(np.mean([v[k] for v in per_image.values()])) for k in names}


def comparison_table(result: Mapping[str, Any]) -> str:
  """Markdown table of every method with its mean rank, and a summary line."""
  table = fusion_baselines.markdown_table(
      {m: result.get(m, {}) for m in METHODS}, metrics_lib.METRIC_NAMES)
  model = result.get("model", {})
  mean = result.get("rule_mean", {})
  better = [n for n in ("EN", "SD", "SF", "AG", "MI", "Qabf", "VIF")
            if n in model and n in mean and model[n] > mean[n]]
  return (f"{table}\n\nmodel beats rule_mean on {len(better)}/7 of "
          f"EN, SD, SF, AG, MI, Qabf, VIF: {', '.join(better) or 'none'}")
