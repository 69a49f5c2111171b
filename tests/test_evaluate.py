"""Tests of the evaluation CLI: parity on the fixtures, outputs, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textfusion_jax import errors
from textfusion_jax import score_folders
from input_pipeline import files
from input_pipeline import image_io
from input_pipeline import layouts
from textfusion_jax import metrics
from textfusion_jax import metrics_reference
from textfusion_jax import tiling

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "metrics"
SETS = ("fused_mean", "fused_max", "fused_color")


@pytest.mark.skipif(not (FIXTURES / "reference_fused_mean.json").is_file(),
                    reason=f"metric fixtures not found at {FIXTURES}")
def test_parity_with_reference_evaluator_on_fixtures():
  result = score_folders.evaluate_folders(FIXTURES / "ir", FIXTURES / "vi",
                                     [FIXTURES / s for s in SETS])
  report = []
  for fused_set in SETS:
    reference = json.loads((FIXTURES / f"reference_{fused_set}.json")
                           .read_text())
    ours = result["methods"][fused_set]
    assert sorted(ours["per_image"]) == sorted(reference["per_image"])
    worst_image, worst_mean = (0.0, ""), (0.0, "")
    for stem, expected in reference["per_image"].items():
      for name in metrics.METRIC_NAMES:
        got, want = ours["per_image"][stem][name], expected[name]
        error = abs(got - want)
        assert error <= max(1e-3 * abs(want), 1e-4), (fused_set, stem, name,
                                                      got, want)
        worst_image = max(worst_image, (error / max(abs(want), 1e-1),
                                        f"{stem} {name}"))
    for name in metrics.METRIC_NAMES:
      got, want = ours["mean"][name], reference["mean"][name]
      assert got == pytest.approx(want, rel=1e-4), (fused_set, name, got, want)
      worst_mean = max(worst_mean, (abs(got - want) / abs(want), name))
    report.append(f"{fused_set}: worst per-image rel {worst_image[0]:.1e} "
                  f"({worst_image[1]}), worst mean rel {worst_mean[0]:.1e} "
                  f"({worst_mean[1]})")
  print("\n" + "\n".join(report))


# --------------------------------------------------------------------------
# Small folders written by the tests. All images fit the (64, 64) bucket that
# tests/test_metrics.py compiles too.


def grey_image(seed: int, h: int, w: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w]
  image = 120 + 70 * np.sin(x / 6.0 + seed) * np.cos(y / 5.0) + rng.normal(
      0, 10, (h, w))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def save(path: Path, image: np.ndarray) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)
  return path


SHAPES = {"a": (48, 56), "b": (60, 50), "c": (48, 56)}


@pytest.fixture
def folders(tmp_path):
  """ir/, vis/ (colour), fused/ and fused2/ with stems a, b, c."""
  for i, (stem, (h, w)) in enumerate(SHAPES.items()):
    save(tmp_path / "ir" / f"{stem}.png", grey_image(i, h, w))
    vis = np.stack([grey_image(10 + i + k, h, w) for k in range(3)], -1)
    save(tmp_path / "vis" / f"{stem}.png", vis)
    save(tmp_path / "fused" / f"{stem}.png", grey_image(20 + i, h, w))
    save(tmp_path / "fused2" / f"{stem}.png", grey_image(30 + i, h, w))
  return tmp_path


def cli(argv: list[str]) -> None:
  """In-process stand-in for `python -m textfusion_jax.evaluate ARGV`: the
  same library call and one-line error handling, without a subprocess (the
  real CLI runs in test_all_problems_in_one_message_without_traceback)."""
  values = {"--fused": []}
  args = iter(argv)
  for flag in args:
    if flag == "--baselines":
      values[flag] = True
    elif flag == "--fused":
      values[flag].append(Path(next(args)))
    else:
      values[flag] = Path(next(args))
  with errors.one_line_errors():
    score_folders.score_and_report(
        values["--ir"], values["--vis"], values["--fused"],
        values.get("--baselines", False), values.get("--json"),
        values.get("--csv"), batch_size=8)


def args_for(root: Path, *extra: str, fused=("fused",)) -> list[str]:
  out = ["--ir", str(root / "ir"), "--vis", str(root / "vis")]
  for name in fused:
    out += ["--fused", str(root / name)]
  return out + list(extra)


def oracle(root: Path, fused: str, stem: str) -> dict[str, float]:
  # 16-bit infrared is stretched per image, as training and fuse read it.
  grey = lambda d: image_io.as_grey_u8(image_io.read_image(
      image_io.list_images(root / d)[stem],
      layouts.IR_16BIT_RULE if d == "ir" else layouts.VIS_16BIT_RULE))
  return metrics_reference.all_metrics(grey(fused), grey("ir"), grey("vis"))


def test_cli_writes_table_json_csv(folders, capsys):
  # Other formats and a 16-bit file: a colour JPG and a 16-bit grey PNG.
  jpg = np.stack([grey_image(40 + k, 60, 50) for k in range(3)], -1)
  (folders / "fused2" / "b.png").unlink()
  Image.fromarray(jpg).save(folders / "fused2" / "b.jpg", quality=95)
  deep = grey_image(50, 48, 56).astype(np.uint16) * 257 + 3
  (folders / "ir" / "c.png").unlink()
  Image.fromarray(deep).save(folders / "ir" / "c.png")
  (folders / "ir" / "a.png").rename(folders / "ir" / "a.bmp")

  cli(args_for(folders, "--json", str(folders / "out.json"),
                         "--csv", str(folders / "out.csv"),
                         fused=("fused", "fused2")))
  stdout = capsys.readouterr().out
  assert "16-bit" in stdout and str(folders / "ir" / "c.png") in stdout
  table = [line for line in stdout.splitlines() if line.startswith("|")]
  assert table[0] == ("| method | " + " | ".join(metrics.METRIC_NAMES) +
                      " | mean_rank |")
  assert [row.split(" | ")[0] for row in table[2:4]] == ["| fused", "| fused2"]
  assert table[4] == ("| method | " + " | ".join(metrics.SOURCE_PART_NAMES) +
                      " |")

  result = json.loads((folders / "out.json").read_text())
  assert result == score_folders.evaluate_folders(
      folders / "ir", folders / "vis", [folders / "fused", folders / "fused2"])
  assert set(result) == {"methods"}
  for method in ("fused", "fused2"):
    per_image = result["methods"][method]["per_image"]
    assert sorted(per_image) == ["a", "b", "c"]
    for stem, values in per_image.items():
      assert list(values) == list(metrics.ALL_METRIC_NAMES)
      expected = oracle(folders, method, stem)
      for name in metrics.METRIC_NAMES:
        assert values[name] == pytest.approx(expected[name], rel=1e-3,
                                             abs=1e-4), (method, stem, name)
    mean = result["methods"][method]["mean"]
    for name in metrics.METRIC_NAMES:
      assert mean[name] == pytest.approx(
          np.mean([v[name] for v in per_image.values()]), rel=1e-12)

  with open(folders / "out.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert len(rows) == 2 * (3 + 1)
  assert [r["image"] for r in rows[:4]] == ["a", "b", "c", "mean"]
  assert float(rows[1]["VIF"]) == result["methods"]["fused"]["per_image"][
      "b"]["VIF"]
  assert not [p for p in folders.iterdir() if ".tmp-" in p.name]


def run_bad(root: Path, capsys, *extra: str, fused=("fused",)) -> str:
  """Runs the CLI expecting bad input; returns the error line."""
  with pytest.raises(SystemExit) as exit_info:
    cli(args_for(root, "--json", str(root / "out.json"), *extra,
                           fused=fused))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: cannot evaluate")
  assert not (root / "out.json").exists()
  return err


def test_missing_stem_is_reported(folders, capsys):
  (folders / "fused" / "b.png").unlink()
  err = run_bad(folders, capsys)
  assert str(folders / "fused") in err and "missing here: b" in err


def test_size_mismatch_is_reported(folders, capsys):
  save(folders / "vis" / "a.png", grey_image(1, 50, 56))
  err = run_bad(folders, capsys)
  assert "'a' differs in size" in err
  assert str(folders / "vis" / "a.png") in err and "56x50" in err


def test_unreadable_file_is_reported(folders, capsys):
  (folders / "ir" / "c.png").write_bytes(b"not a png at all")
  err = run_bad(folders, capsys)
  assert str(folders / "ir" / "c.png") in err and "cannot decode" in err


def test_empty_and_missing_folders_are_reported(folders, capsys):
  (folders / "empty").mkdir()
  err = run_bad(folders, capsys, fused=("empty", "nowhere"))
  assert f"{folders / 'empty'}: no images" in err
  assert f"{folders / 'nowhere'}: not a directory" in err


def test_too_small_images_are_reported(folders, capsys):
  for d in ("ir", "fused"):
    save(folders / d / "a.png", grey_image(1, 40, 56))
  save(folders / "vis" / "a.png", np.zeros((40, 56, 3), np.uint8))
  err = run_bad(folders, capsys)
  assert "'a' is 56x40" in err and "at least 41x41" in err


def test_all_problems_in_one_message_without_traceback(folders):
  (folders / "fused" / "b.png").unlink()
  save(folders / "vis" / "a.png", grey_image(1, 50, 56))
  (folders / "ir" / "c.png").write_bytes(b"")
  (folders / "empty").mkdir()
  (folders / "out.json").write_text("previous results")
  proc = subprocess.run(
      [sys.executable, "-m", "textfusion_jax.evaluate",
       *args_for(folders, "--json", str(folders / "out.json"),
                 fused=("fused", "empty"))],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: cannot evaluate (4 problems)")
  for fragment in (f"{folders / 'fused'}: 1 image(s)", "'a' differs in size",
                   f"{folders / 'ir' / 'c.png'}: empty file",
                   f"{folders / 'empty'}: no images"):
    assert fragment in err
  assert (folders / "out.json").read_text() == "previous results"


def test_missing_output_folder_is_reported_with_the_rest(folders, capsys):
  (folders / "fused" / "a.png").unlink()
  err = run_bad(folders, capsys, "--csv", str(folders / "no" / "x.csv"))
  assert "(2 problems)" in err and f"--csv {folders / 'no' / 'x.csv'}" in err


def test_plan_buckets_merges_sizes_without_cropping():
  sizes = {f"r{i}": (233 + 4 * i, 496 + 3 * i) for i in range(40)}
  sizes.update({f"m{i}": (480, 640) for i in range(20)})
  sizes["huge"] = (2048, 2048)
  buckets = tiling.plan_buckets(sizes, batch_size=8,
                                  compile_cost_pixels=4e7)
  assert sorted(s for stems in buckets.values() for s in stems) == sorted(sizes)
  for (bh, bw), stems in buckets.items():
    assert all(sizes[s][0] <= bh and sizes[s][1] <= bw for s in stems)
  # 41 distinct sizes, but a compilation costs more than their padding ...
  assert len(buckets) == 2
  # ... except for the outlier (whose unused batch slots take small images).
  assert "huge" in buckets[(2048, 2048)]
  # With free compilations and no batch padding, only the rounding to 32
  # pixels groups sizes.
  rounded = {(-(-h // 32) * 32, -(-w // 32) * 32) for h, w in sizes.values()}
  assert set(tiling.plan_buckets(sizes, 1, 0.0)) == rounded


def test_baselines_rows_equal_scoring_the_trivial_images(folders, capsys):
  """--baselines rows are the trivial fusions, scored like any folder."""
  from textfusion_jax import fusion_baselines  # pylint: disable=g-import-not-at-top
  grey = lambda d, stem: image_io.as_grey_u8(image_io.read_image(
      image_io.list_images(folders / d)[stem])).astype(np.float64)
  for rule in fusion_baselines.TRIVIAL_RULES:
    for stem in SHAPES:
      image = fusion_baselines.trivial_fusion(rule, grey("ir", stem),
                                              grey("vis", stem))
      save(folders / "explicit" / rule / f"{stem}.png", image.astype(np.uint8))
  result = score_folders.evaluate_folders(folders / "ir", folders / "vis",
                                     [folders / "fused"], baselines=True)
  explicit = score_folders.evaluate_folders(
      folders / "ir", folders / "vis",
      [folders / "explicit" / r for r in fusion_baselines.TRIVIAL_RULES])
  assert list(result["methods"]) == ["fused", *fusion_baselines.TRIVIAL_RULES]
  for rule in fusion_baselines.TRIVIAL_RULES:
    assert (result["methods"][rule]["per_image"] ==
            explicit["methods"][rule]["per_image"])
  # Copies max their own half of the paired metrics.
  copy_vis = result["methods"]["copy_vis"]["mean"]
  assert copy_vis["SSIM_vis"] == pytest.approx(1.0, abs=1e-6)
  assert copy_vis["CC_vis"] == pytest.approx(1.0, abs=1e-6)
  ranks = fusion_baselines.mean_ranks(
      {m: v["mean"] for m, v in result["methods"].items()})
  assert {m: v["mean_rank"] for m, v in result["methods"].items()} == ranks
  # Without --fused, only the trivial rows.
  cli(["--ir", str(folders / "ir"), "--vis", str(folders / "vis"),
                 "--baselines"])
  rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()
          if line.startswith("| ") and "method" not in line]
  assert rows[:4] == [f"| {r}" for r in fusion_baselines.TRIVIAL_RULES]


def test_baselines_with_unmatched_folders_or_clashing_names(folders, capsys):
  (folders / "vis" / "c.png").unlink()
  err = run_bad(folders, capsys, "--baselines")
  assert f"{folders / 'vis'}: 1 image(s) present in other folders" in err
  save(folders / "vis" / "c.png", grey_image(3, 48, 56))
  (folders / "fused").rename(folders / "rule_max")
  err = run_bad(folders, capsys, "--baselines", fused=("rule_max",))
  assert "'rule_max' clashes with a --baselines row" in err


def test_mean_ranks_share_ties_and_rank_every_row():
  from textfusion_jax import fusion_baselines  # pylint: disable=g-import-not-at-top
  rows = {"a": {"x": 3.0, "y": 1.0}, "b": {"x": 2.0, "y": 1.0},
          "c": {"x": 1.0, "y": 5.0}}
  assert fusion_baselines.mean_ranks(rows, ("x", "y")) == {
      "a": (1 + 2.5) / 2, "b": (2 + 2.5) / 2, "c": (3 + 1) / 2}


def test_output_path_that_is_a_folder_is_refused_before_scoring(folders,
                                                                capsys):
  (folders / "out.json").mkdir()
  with pytest.raises(SystemExit) as exit_info:
    cli(args_for(folders, "--json", str(folders / "out.json")))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert f"--json {folders / 'out.json'} is a folder" in err


def test_infinite_psnr_is_written_as_standard_json(folders, capsys):
  # F = IR = VIS: MSE 0, so PSNR is +inf, which bare JSON cannot hold.
  same = grey_image(60, 48, 56)
  for d in ("ir", "vis", "fused"):
    for old in (folders / d).iterdir():
      old.unlink()
    save(folders / d / "a.png", same)
  cli(args_for(folders, "--json", str(folders / "out.json")))
  assert "inf" in capsys.readouterr().out

  def refuse(word):
    raise AssertionError(f"non-standard JSON constant {word}")

  text = (folders / "out.json").read_text()
  result = json.loads(text, parse_constant=refuse)
  row = result["methods"]["fused"]["per_image"]["a"]
  assert row["PSNR"] == "inf" and row["MSE"] == 0.0
  assert files.read_json_numbers(folders / "out.json")["methods"]["fused"][
      "per_image"]["a"]["PSNR"] == float("inf")


def test_table_paths_among_the_scored_images_are_refused(folders, capsys):
  before = (folders / "vis" / "a.png").read_bytes()
  for flag, path in (("--json", folders / "vis" / "a.png"),
                     ("--csv", folders / "fused" / "new.png")):
    with pytest.raises(SystemExit):
      cli(args_for(folders, flag, str(path)))
    err = capsys.readouterr().err
    assert f"{flag} {path} is an image path in the scored folder" in err
  assert (folders / "vis" / "a.png").read_bytes() == before
  assert not (folders / "fused" / "new.png").exists()


def test_ir_folder_also_scored_as_a_method_keeps_each_reading(folders,
                                                              capsys):
  """16-bit infrared given as a --fused folder too: the source is stretched
  per image (as training reads it), the method read as any fused file, and
  the 16-bit note names the file once."""
  deep = (1000 + 8 * grey_image(50, 48, 56).astype(np.uint16))  # 1000-3040
  (folders / "ir" / "c.png").unlink()
  Image.fromarray(deep).save(folders / "ir" / "c.png")
  result = score_folders.evaluate_folders(
      folders / "ir", folders / "vis", [folders / "ir"])["methods"]
  source = image_io.as_grey_u8(image_io.read_image(folders / "ir" / "c.png",
                                                   layouts.IR_16BIT_RULE))
  as_fused = image_io.as_grey_u8(image_io.read_image(
      folders / "ir" / "c.png", layouts.VIS_16BIT_RULE))
  vis = image_io.as_grey_u8(image_io.read_image(folders / "vis" / "c.png"))
  expected = metrics_reference.all_metrics(as_fused, source, vis)
  for name in ("MI", "SSIM", "CC"):
    assert result["ir"]["per_image"]["c"][name] == pytest.approx(
        expected[name], rel=1e-4, abs=1e-4), name
  cli(args_for(folders, fused=("ir",)))
  note = next(line for line in capsys.readouterr().out.splitlines()
              if line.startswith("note:"))
  assert note.count(str(folders / "ir" / "c.png")) == 1, note


def test_json_and_csv_at_one_path_are_refused(folders, capsys):
  with pytest.raises(SystemExit):
    cli(args_for(folders, "--json", str(folders / "out"), "--csv",
                 str(folders / "out")))
  assert "--json and --csv are the same file" in capsys.readouterr().err
  assert not (folders / "out").exists()


def test_the_same_folder_as_both_sources_is_refused(folders, capsys):
  """It used to print a full table: every fusion scored against the
  visible images twice."""
  with pytest.raises(SystemExit):
    cli(["--ir", str(folders / "vis"), "--vis", str(folders / "vis"),
         "--fused", str(folders / "fused")])
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [
      f"error: --ir {folders / 'vis'} and --vis {folders / 'vis'} are the "
      "same folder; every fusion would be scored against one source twice"]
