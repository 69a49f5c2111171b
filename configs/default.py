"""Default config: the `small` model on the embedded synthetic data.

Run:
  python train.py --config configs/default.py --workdir /tmp/textfusion_default

Variant configs import this one and override only what differs.
"""

import ml_collections

from textfusion_jax import model as model_lib


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, data order, crops and caption picks.

  # Fusion network: a preset from textfusion_jax.model, see its field comments.
  config.model = model_lib.model_config("small")
  config.model.text_dim = 64  # Must match the text encoder ('tiny-random': 64; CLIP ViT-B/32: 512).

  config.text = ml_collections.ConfigDict()
  config.text.encoder = "tiny-random"  # 'tiny-random', a local HF CLIP dir or a hub id.
  config.text.embeddings_dir = ""  # Precomputed caption embeddings (embed_captions output); '' embeds at startup.
  config.text.dtype = "float32"  # Compute dtype of the CLIP text tower.
  config.text.batch_size = 64  # Captions per encoder call when embedding at startup.
  config.text.standardize_at_init = True  # Fold train-caption embedding mean/std into the text MLPs at init.

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # 'synthetic', 'folder' (paired ir/ vi/ dirs), 'tfds' or 'mixture'.
  config.data.mixture = ()  # Mixture source: ((source, weight), ...); source a folder or 'tfds:<name>[@<data_dir>]'; weight 0 drops it.
  config.data.train_size = 256  # Synthetic: number of training scenes.
  config.data.eval_size = 16  # Synthetic: number of held-out eval scenes.
  config.data.image_height = 128  # Synthetic: scene height in pixels.
  config.data.image_width = 160  # Synthetic: scene width in pixels.
  config.data.train_dir = ""  # Folder source: root with ir/, vi/ and captions.jsonl (',' joins several).
  config.data.eval_dir = ""  # Folder source: held-out root with the same layout.
  config.data.tfds_name = ""  # TFDS source: builder name, e.g. 'ivf_pairs/llvip'.
  config.data.tfds_data_dir = ""  # TFDS source: data_dir the dataset was built into.
  config.data.train_split = "train"  # TFDS or splits.json split to train on; 'train[:80%]' slices folders too.
  config.data.eval_split = "test"  # TFDS or splits.json split to evaluate; 'train[80%:]' slices folders too.
  config.data.caption_sources = ()  # ((source, weight), ...): caption files to train on ('default' = captions.jsonl, NAME = captions_NAME.jsonl); empty: all.
  config.data.caption_sampling = "uniform"  # 'uniform' over a pair's captions, or 'weighted': a source by weight, then one of its captions.
  config.data.cache_in_memory = False  # Folder or mixture source: keep decoded training pairs in RAM (off: stream from disk).
  config.data.crop_size = 96  # Square training crop (Text-IF uses 96).
  config.data.shuffle_captions_across_pairs = False  # Ablation: train on another pair's captions.
  config.data.degradations = ml_collections.ConfigDict()
  config.data.degradations.enabled = False  # Degrade visible crops, prompt with their condition sentence (input_pipeline/degradations.py).
  config.data.degradations.level_probs = (0.4, 0.2, 0.2, 0.2)  # P(level 0, 1, 2, 3), drawn per kind.
  config.data.degradations.renamed_prob = 0.0  # Share of crops prompted with one redrawn level, target = what that prompt asks for.
  config.data.degradations.renamed_kinds = ("underexposed", "hazy")  # Kinds a renamed prompt may redraw; with "noisy", naming less noise keeps the rest in the target (not Wiener-shrunk).
  config.data.degradations.renamed_max_kinds = 1  # A renamed prompt redraws 1 to this many of renamed_kinds (shuffled or typed wrong sentences differ in several).
  config.data.degradations.renamed_reference = "fuse_prompted_target"  # Stage-2 reference on a renamed crop: its fusion of the prompted target, or 'prompted_fusion': of the true target, then mis-exposed/hazed as the prompt says.
  config.data.degradations.wiener_target = False  # Reduce the target to what survives the degradation, by the Wiener gain S/(S+N) (input_pipeline/degradations.py).
  config.data.degradations.wiener_kind = "contrast"  # 'contrast': the whole crop's contrast times S/(S+N); 'contrast_squared': times (S/(S+N))^2; 'spectral': S/(S+N) per spatial frequency.
  config.data.worker_count = 0  # grain worker processes (0 = in the main process).
  config.data.prefetch_buffer_size = 2  # Batches grain prefetches per worker.

  config.loss = ml_collections.ConfigDict()
  config.loss.intensity = 1.0  # L1 of fused Y to max(IR, visible Y).
  config.loss.gradient = 10.0  # L1 of Sobel magnitude to the max source gradient.
  config.loss.ssim = 1.0  # 1 - SSIM against IR and visible Y.
  config.loss.color = 12.0  # L1 of fused CbCr to visible CbCr (Text-IF: 12).
  config.loss.complementarity = 2.0  # 2 - SCD of each crop (see losses.py).
  config.loss.reference = 0.0  # L1 to train.reference_from's fusion of the crop's target under "clean visible image" (needs degradations; see data.degradations.renamed_reference).

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3  # Peak AdamW learning rate.
  config.optim.warmup_steps = 30  # Linear warmup steps.
  config.optim.final_lr_fraction = 0.05  # Cosine decays to this fraction of the peak.
  config.optim.weight_decay = 0.05  # AdamW decoupled weight decay (Text-IF: 0.05).
  config.optim.b1 = 0.9  # Adam beta1.
  config.optim.b2 = 0.999  # Adam beta2.
  config.optim.grad_clip_norm = 1.0  # Global-norm gradient clipping.

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 400  # Total optimizer steps.
  config.train.batch_size = 8  # Global batch size (split over all devices and processes).
  config.train.log_every = 20  # Steps between scalar logs.
  config.train.checkpoint_every = 100  # Steps between (async) checkpoints.
  config.train.keep_checkpoints = 3  # Checkpoints kept on disk.
  config.train.eval_every = 200  # Steps between evaluations (0 = only at the end).
  config.train.stop_after_steps = 0  # Stop this run after N steps, checkpointed (0 = run to num_steps).
  config.train.init_from = ""  # Bundle or workdir whose params start a fresh run (fine-tuning; new optimizer, step 0).
  config.train.reference_from = ""  # Frozen bundle or workdir for loss.reference (same model config and text encoder).

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8  # Eval batch size (padded to a multiple of the device count).
  config.eval.save_images = 8  # Fused eval images also written to TensorBoard.
  config.eval.max_images = 0  # Cap on eval images (0 = all).
  config.eval.pad_multiple = 1  # Pad eval images to multiples of this (fewer compiled shapes; the border convolutions see the padding, so compare scores at one value).
  config.eval.at_end = True  # Evaluate when training finishes (False: only every train.eval_every steps).

  # Mesh axes and sizes; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  # Logical parameter axis -> mesh axis. Output channels shard over fsdp;
  # names without a rule (and dims an axis does not divide) replicate.
  # (A tuple, so that --config.sharding_rules="(('channels_in', 'fsdp'),)"
  # overrides it.)
  config.sharding_rules = (("channels_out", "fsdp"), ("text_embed", None))
  return config
