"""The NNX CLIP text tower against transformers' PyTorch CLIP, and its errors.

Parity tests need torch (a test-only dependency) and skip without it; the
error-path and tiny-model tests do not.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from textfusion_jax.text import clip_text, hf_checkpoint, tiny_clip, weight_map
from textfusion_jax.text.encoder import TextEncoder
from tests import xla_test_flags

CAPTIONS = [
    "Two pedestrians walk past a traffic light pole on a dark sidewalk.",
    "a car",
    "Überhitzte Motorhaube, 42°C — qu'est-ce que c'est?!",
    "A soldier hides behind a fence; the thermal image shows him clearly "
    "as a warm figure while the visible image is dark. " * 4,  # > 77 tokens
    "x",
]
TOL = 1e-5


def _perturb(model):
  """Random biases and LayerNorm parameters too, so every mapping matters."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  return model.eval()


def _save(model, directory: Path, weights: str) -> Path:
  import torch  # pylint: disable=g-import-not-at-top
  model.save_pretrained(directory)
  if weights == "bin":  # transformers 5 only writes safetensors
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
  tiny_clip.tiny_tokenizer().save_pretrained(directory)
  return directory


def _torch_embeddings(model, tokenizer, captions, get_features):
  import torch  # pylint: disable=g-import-not-at-top
  batch = tokenizer(captions, padding="longest", truncation=True,
                    max_length=77, return_tensors="pt")
  with torch.no_grad():
    if get_features:
      out = model.get_text_features(**batch)
      out = getattr(out, "pooler_output", out)
    else:
      out = model(**batch).text_embeds
  return out.numpy()


@pytest.fixture(scope="module")
def torch_module():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  return torch


@pytest.mark.parametrize("form,weights,legacy_eos,act", [
    ("text_with_projection", "safetensors", False, "quick_gelu"),
    ("text_with_projection", "bin", True, "gelu"),
    ("clip_model", "safetensors", True, "quick_gelu"),
    ("clip_model", "bin", False, "quick_gelu"),
])
def test_parity_with_transformers(torch_module, tmp_path, caplog, form,
                                  weights, legacy_eos, act):
  import transformers  # pylint: disable=g-import-not-at-top
  text_config = tiny_clip.tiny_text_config(legacy_eos=legacy_eos,
                                           hidden_act=act)
  if form == "clip_model":
    # A projection width unlike the text config's own (64): CLIPModel's
    # top-level projection_dim is the one that counts.
    config = transformers.CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=48)
    model = _perturb(transformers.CLIPModel(config))
  else:
    model = _perturb(transformers.CLIPTextModelWithProjection(text_config))
  directory = _save(model, tmp_path, weights)
  assert (directory / ("pytorch_model.bin" if weights == "bin" else
                       "model.safetensors")).is_file()

  encoder = TextEncoder.from_pretrained(directory)
  with caplog.at_level(logging.WARNING):
    ours = encoder.encode(CAPTIONS, batch_size=4)
  expected = _torch_embeddings(model, encoder.tokenizer, CAPTIONS,
                               get_features=form == "clip_model")
  assert ours.shape == expected.shape == (
      len(CAPTIONS), 48 if form == "clip_model" else 64)
  assert encoder.embed_dim == ours.shape[1]
  err = np.abs(ours - expected).max()
  print(f"{form}/{weights}/legacy_eos={legacy_eos}/{act}: "
        f"max abs err {err:.2e}")
  assert err < TOL
  truncation = [r for r in caplog.records if "truncated" in r.getMessage()]
  assert len(truncation) == 1 and "1 of 5" in truncation[0].getMessage()


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_pooling_rules_match_transformers(torch_module, tmp_path, legacy_eos):
  """Ids with an added token above end-of-text tell the two rules apart."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = tiny_clip.tiny_text_config(legacy_eos=legacy_eos)
  eos = config.pad_token_id  # the tokenizer's <|endoftext|>
  config.vocab_size += 2  # two added tokens, ids eos + 1 and eos + 2
  model = _perturb(transformers.CLIPTextModelWithProjection(config))
  encoder = TextEncoder.from_pretrained(_save(model, tmp_path, "safetensors"))
  ids = [[eos - 1, 10, eos + 2, 20, eos], [eos - 1, 30, eos, eos + 1, eos]]
  with torch_module.no_grad():
    expected = np.concatenate([
        model(input_ids=torch_module.tensor([row])).text_embeds.numpy()
        for row in ids])
  ours = encoder.encode_ids(ids, batch_size=2)
  assert np.abs(ours - expected).max() < TOL
  # The two rules pool different positions here, so each was exercised.
  pooled_at = np.asarray(encoder.model.pool_positions(np.array(ids)))
  assert pooled_at.tolist() == ([2, 3] if legacy_eos else [4, 2])


def test_saved_tiny_clip_loads_in_transformers(torch_module, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  directory = tiny_clip.save_tiny_random_clip(tmp_path / "tiny", seed=3)
  model = transformers.CLIPTextModelWithProjection.from_pretrained(
      directory).eval()
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
  encoder = TextEncoder.from_pretrained(directory)
  expected = _torch_embeddings(model, tokenizer, CAPTIONS, get_features=False)
  assert np.abs(encoder.encode(CAPTIONS) - expected).max() < TOL


# Tiny-model tests (no torch).


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tiny_clip.save_tiny_random_clip(tmp_path_factory.mktemp("tiny"))


def test_tiny_random_matches_its_saved_checkpoint(tiny_dir):
  direct = TextEncoder.tiny_random(seed=0).encode(CAPTIONS)
  loaded = TextEncoder.from_pretrained(tiny_dir).encode(CAPTIONS)
  np.testing.assert_array_equal(direct, loaded)
  assert not np.allclose(direct[0], direct[1])


def test_weight_table_covers_every_parameter():
  config = clip_text.ClipTextConfig.from_hf(tiny_clip.tiny_text_config())
  tower = clip_text.random_tower(config)
  params = {path for path, v in nnx.iter_graph(tower)
            if isinstance(v, nnx.Param)}
  table = weight_map.entries(config)
  assert params == {e.path for e in table}
  assert len({e.hf_key for e in table}) == len(table)
  # Writing then reading HF tensors is the identity.
  copy = clip_text.random_tower(config, seed=1)
  weight_map.load_hf_tensors(copy, weight_map.to_hf_tensors(tower), "test")
  for (_, a), (_, b) in zip(nnx.iter_graph(tower), nnx.iter_graph(copy)):
    if isinstance(a, nnx.Param):
      np.testing.assert_array_equal(a.get_value(), b.get_value())


def test_tiny_tokenizer_covers_any_text():
  tokenizer = tiny_clip.tiny_tokenizer()
  vocab, _ = tiny_clip.tiny_vocab_and_merges()
  for text in CAPTIONS + ["日本語のテキスト 🙂", "ALL CAPS & symbols"]:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == vocab[tiny_clip.BOS_TOKEN]
    assert ids[-1] == vocab[tiny_clip.EOS_TOKEN]
    assert vocab[tiny_clip.EOS_TOKEN] not in ids[1:-1]  # no unknowns
  # Common words are single tokens, as in CLIP's own vocabulary.
  assert len(tokenizer("a pedestrian near the car")["input_ids"]) == 7
  # The merges do not depend on hashing: a fresh process learns the same.
  script = ("from textfusion_jax.text import tiny_clip as t;"
            "print(t.tiny_vocab_and_merges()[1])")
  runs = {subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": seed}).stdout
          for seed in ("1", "2")}
  assert len(runs) == 1


def test_sorting_and_batching_do_not_change_results(tiny_dir):
  encoder = TextEncoder.from_pretrained(tiny_dir)
  together = encoder.encode(CAPTIONS, batch_size=2)
  alone = np.concatenate([encoder.encode([c], batch_size=8) for c in CAPTIONS])
  np.testing.assert_allclose(together, alone, atol=1e-6)
  assert encoder.encode([], batch_size=4).shape == (0, encoder.embed_dim)


def test_bfloat16_compute_stays_close(tiny_dir):
  f32 = TextEncoder.from_pretrained(tiny_dir).encode(CAPTIONS)
  bf16 = TextEncoder.from_pretrained(tiny_dir, dtype="bfloat16")
  out = bf16.encode(CAPTIONS)
  assert out.dtype == np.float32
  assert np.abs(out - f32).max() < 0.05 * np.abs(f32).max()
  params = [v for _, v in nnx.iter_graph(bf16.model)
            if isinstance(v, nnx.Param)]
  assert params and all(p.get_value().dtype == np.float32 for p in params)


@pytest.mark.parametrize("captions,message", [
    (["fine", ""], "caption 1 is empty"),
    (["fine", "  "], "caption 1 is empty"),
    (["fine", "ok", 7], "caption 2 is not a string: 7"),
    (["fine", None], "caption 1 is not a string: None"),
    ("a single string", "not one string"),
])
def test_encode_rejects_bad_captions(captions, message):
  with pytest.raises(ValueError, match=message):
    TextEncoder.tiny_random().encode(captions)


def test_sharded_over_a_data_mesh_matches_one_device(tiny_dir):
  """Two host CPU devices (a fresh process: XLA reads the flag at start)."""
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from textfusion_jax.text import encoder as lib
      assert len(jax.devices()) == 2
      captions = {CAPTIONS!r} * 3
      one = lib.TextEncoder.from_pretrained({str(tiny_dir)!r})
      expected = one.encode(captions, batch_size=5)
      data = lib.TextEncoder.from_pretrained({str(tiny_dir)!r},
                                             mesh=lib.data_mesh())
      kernel = data.model.layers[0].mlp.fc1.kernel.get_value()
      assert len(kernel.sharding.device_set) == 2  # replicated on both
      # Heads and MLP split over a 'model' axis, batch over 'data'.
      mesh = jax.make_mesh((1, 2), ("data", "model"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
      split = lib.TextEncoder.from_pretrained({str(tiny_dir)!r}, mesh=mesh)
      kernel = split.model.layers[0].mlp.fc1.kernel.get_value()
      assert kernel.addressable_shards[0].data.shape == (64, 64)
      for encoder in (data, split):
        got = encoder.encode(captions, batch_size=5)
        assert np.abs(got - expected).max() < 1e-6, np.abs(got - expected).max()
  """)
  env = {**os.environ, "XLA_FLAGS": xla_test_flags.host_devices(2),
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


# Loading errors.


def _error(path) -> str:
  # A CheckpointError (a UserError): the CLIs print it as one line. A plain
  # ValueError would reach the user as a traceback.
  with pytest.raises(hf_checkpoint.CheckpointError) as info:
    TextEncoder.from_pretrained(path)
  message = str(info.value)
  assert "\n" not in message
  return message


def _copy_checkpoint(src: Path, dst: Path, skip=()) -> Path:
  dst.mkdir()
  for f in src.iterdir():
    if f.name not in skip:
      (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_directory_without_tokenizer(tiny_dir, tmp_path):
  directory = _copy_checkpoint(
      tiny_dir, tmp_path / "c",
      skip=("tokenizer.json", "vocab.json", "merges.txt"))
  message = _error(directory)
  assert str(directory) in message and "no tokenizer" in message


def test_missing_weights_are_named(tiny_dir, tmp_path):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c")
  tensors = safetensors.numpy.load_file(directory / "model.safetensors")
  del tensors["text_projection.weight"]  # a CLIPTextModel, no projection
  del tensors["text_model.encoder.layers.1.mlp.fc2.bias"]
  safetensors.numpy.save_file(tensors, directory / "model.safetensors")
  message = _error(directory)
  assert "lacks 2" in message
  assert "text_projection.weight" in message
  assert "text_model.encoder.layers.1.mlp.fc2.bias" in message


def test_weights_the_config_does_not_describe(tiny_dir, tmp_path):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c")
  config = json.loads((directory / "config.json").read_text())
  config["num_hidden_layers"] = 1
  (directory / "config.json").write_text(json.dumps(config))
  assert "text_model.encoder.layers.1." in _error(directory)
  config["num_hidden_layers"], config["projection_dim"] = 2, 32
  (directory / "config.json").write_text(json.dumps(config))
  message = _error(directory)
  assert "text_projection.weight has shape (64, 64)" in message


def test_no_weights_and_wrong_model_type(tiny_dir, tmp_path):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c",
                               skip=("model.safetensors",))
  assert "no weights" in _error(directory)
  config = json.loads((directory / "config.json").read_text())
  config["model_type"] = "bert"
  (directory / "config.json").write_text(json.dumps(config))
  assert "'bert' is not a CLIP model" in _error(directory)
  (directory / "config.json").write_text("[1]")
  assert "config.json: not a config (a JSON object expected, got list)" in (
      _error(directory))


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0),
                                          ("layer_norm_eps", None),
                                          ("hidden_size", "64")])
def test_unusable_config_values_are_one_line(tiny_dir, tmp_path, field,
                                             value):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c")
  config = json.loads((directory / "config.json").read_text())
  config[field] = value
  (directory / "config.json").write_text(json.dumps(config))
  assert "config.json: unusable config values" in _error(directory)


@pytest.mark.parametrize("eos", [None, 5])
def test_an_end_of_text_id_the_tokenizer_never_writes_is_refused(
    tiny_dir, tmp_path, eos):
  """Without "eos_token_id" transformers fills in 49407, beyond this
  vocabulary: every text was pooled at its first token, so every prompt
  embedded the same and the text guided nothing, without a word."""
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c")
  config = json.loads((directory / "config.json").read_text())
  right = config.pop("eos_token_id")
  if eos is not None:
    config["eos_token_id"] = eos
  (directory / "config.json").write_text(json.dumps(config))
  message = _error(directory)
  assert f"is not the tokenizer's end-of-text id {right}" in message
  assert f'set "eos_token_id": {right} in config.json' in message


def test_fingerprint_is_what_the_encoder_computes(tiny_dir, tmp_path):
  a = TextEncoder.from_pretrained(tiny_dir)
  assert a.fingerprint == TextEncoder.from_pretrained(tiny_dir).fingerprint
  # Truncation state set by a call is not part of it.
  a.tokenizer(["a b c d e f"], truncation=True, max_length=3)
  from textfusion_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  assert encoder_lib.fingerprint(a.model, a.tokenizer) == a.fingerprint
  # Other weights, or the same weights under another activation, differ.
  for seed, act in ((1, "quick_gelu"), (0, "gelu")):
    other = tiny_clip.save_tiny_random_clip(tmp_path / f"{seed}{act}",
                                            seed=seed, hidden_act=act)
    assert TextEncoder.from_pretrained(other).fingerprint != a.fingerprint


def test_broken_tokenizer_files_are_one_line(tiny_dir, tmp_path):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c")
  for name in ("tokenizer.json", "vocab.json"):
    if (directory / name).is_file():
      text = (directory / name).read_text()
      (directory / name).write_text(text[:len(text) // 2])
  assert "unusable tokenizer files" in _error(directory)


def test_bin_that_is_not_a_pickle_is_named_for_what_it_is(
    torch_module, tiny_dir, tmp_path):
  del torch_module
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c",
                               skip=("model.safetensors",))
  weights = directory / "pytorch_model.bin"
  weights.write_text("version https://git-lfs.github.com/spec/v1\n"
                     "oid sha256:0\nsize 1\n")
  assert "a git-lfs pointer, not the weights" in _error(directory)
  weights.write_bytes(b"\x00garbage" * 10)
  assert "not a PyTorch weights file" in _error(directory)


def test_missing_local_directory():
  assert "not a checkpoint directory" in _error("/nonexistent/clip")


def test_unreachable_hub_id_says_how_to_pass_a_directory():
  # Offline this fails to connect; online the repository does not exist.
  message = _error("textfusion-jax-tests/no-such-clip-model")
  assert "pass a local directory" in message


def test_bin_checkpoint_without_torch(tiny_dir, tmp_path, monkeypatch):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c",
                               skip=("model.safetensors",))
  (directory / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  message = _error(directory)
  assert "needs torch" in message and "pytorch_model.bin" in message


def test_corrupt_safetensors_is_one_line(tiny_dir, tmp_path):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c")
  data = (directory / "model.safetensors").read_bytes()
  (directory / "model.safetensors").write_bytes(data[:len(data) // 3])
  message = _error(directory)
  assert "model.safetensors: unreadable safetensors file" in message


def _as_bin(tiny_dir: Path, directory: Path, torch) -> dict:
  tensors = safetensors.numpy.load_file(tiny_dir / "model.safetensors")
  state = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
  _copy_checkpoint(tiny_dir, directory, skip=("model.safetensors",))
  return state


def test_bin_checkpoint_loads_and_corrupt_bin_is_one_line(
    torch_module, tiny_dir, tmp_path):
  directory = tmp_path / "c"
  torch_module.save(_as_bin(tiny_dir, directory, torch_module),
                    directory / "pytorch_model.bin")
  expected = TextEncoder.from_pretrained(tiny_dir).encode(CAPTIONS[:2])
  np.testing.assert_allclose(
      TextEncoder.from_pretrained(directory).encode(CAPTIONS[:2]), expected,
      atol=1e-6)
  data = (directory / "pytorch_model.bin").read_bytes()
  (directory / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
  assert "pytorch_model.bin: unreadable PyTorch weights file" in _error(
      directory)
  # A text key holding a plain number (weights_only allows it).
  state = _as_bin(tiny_dir, tmp_path / "d", torch_module)
  directory = tmp_path / "d"
  state["text_model.final_layer_norm.weight"] = 3
  torch_module.save(state, directory / "pytorch_model.bin")
  assert ("pytorch_model.bin: text_model.final_layer_norm.weight is not a "
          "tensor (a int)") in _error(directory)


class _RunsCode:
  """A pickle payload that would create a file if it were ever executed."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return (Path.touch, (self.marker,))


def test_bin_whose_pickle_would_run_code_is_refused(torch_module, tiny_dir,
                                                    tmp_path):
  directory = tmp_path / "c"
  state = _as_bin(tiny_dir, directory, torch_module)
  marker = tmp_path / "code_ran"
  state["text_model.final_layer_norm.weight"] = _RunsCode(marker)
  torch_module.save(state, directory / "pytorch_model.bin")
  assert not marker.exists()
  message = _error(directory)
  assert "pytorch_model.bin: refused" in message
  assert not marker.exists()  # nothing in the pickle ran


def test_sharded_safetensors_index(tiny_dir, tmp_path):
  directory = _copy_checkpoint(tiny_dir, tmp_path / "c",
                               skip=("model.safetensors",))
  tensors = safetensors.numpy.load_file(tiny_dir / "model.safetensors")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for file, keys in shards.items():
    safetensors.numpy.save_file({k: tensors[k] for k in keys},
                                directory / file, metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items()
                                          for k in keys}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  expected = TextEncoder.from_pretrained(tiny_dir).encode(CAPTIONS[:2])
  np.testing.assert_array_equal(
      TextEncoder.from_pretrained(directory).encode(CAPTIONS[:2]), expected)
  (directory / "model-00002-of-00002.safetensors").unlink()
  assert "missing: model-00002-of-00002.safetensors" in _error(directory)
  (directory / "model.safetensors.index.json").write_text("{not json")
  assert "not a weight index" in _error(directory)
