"""Trains and evaluates a text-guided fusion model.

  python train.py --config configs/demo.py --workdir /tmp/textfusion_demo
  python train.py --config configs/demo.py --workdir DIR --config.train.num_steps=50

The same as `textfusion-train` (`textfusion_jax/train.py`), runnable from a
checkout without installing: parses --config and --workdir and calls
`train_loop.train_and_evaluate(config, workdir)`.
"""

from textfusion_jax import train

if __name__ == "__main__":
  train.run()
