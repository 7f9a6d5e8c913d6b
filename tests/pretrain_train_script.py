"""Train the nano dense model on a packed dataset folder; used by tests that need a separate process.

    python tests/pretrain_train_script.py DATA_DIR WORK_DIR --max-steps 20 --save-every 4 [--delay 0.1]

Writes WORK_DIR/summary.json at the end (and checkpoints/logs as pipeline.train.loop does).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.data import packing  # noqa: E402
from pipeline.recipe.settings import ModelSettings, TrainSettings  # noqa: E402
from pipeline.train import distributed, models  # noqa: E402
from pipeline.train import loop as training


def train_nano(data_dir, work_dir, max_steps: int, save_every: int, delay: float = 0.0) -> dict:
    """Train (or resume) the nano dense model; returns the training summary."""
    import datasets
    from accelerate.utils import set_seed

    data = datasets.load_from_disk(str(data_dir))["train"].with_format("numpy")
    settings = ModelSettings(size="nano", max_seq_len=64)
    train = TrainSettings(max_steps=max_steps, micro_batch_size=4, learning_rate=3e-3, warmup_steps=2,
                          eval_every=1000, save_every=save_every, log_every=5)
    accelerator = distributed.make_accelerator(1, None, micro_batch_size=4)
    set_seed(0)
    model = models.build_model(settings, 300, 0, 1, 2)
    def slow_loss(m, b):  # each step takes at least `delay`: a test kills the process mid-run
        time.sleep(delay)
        return models.causal_lm_loss(m, b, settings)

    _, summary = training.train(accelerator, model, data, packing.collate_blocks, slow_loss, train, Path(work_dir),
                                seed=0)
    distributed.finish(accelerator)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("work_dir")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep after each step")
    args = parser.parse_args()
    summary = train_nano(args.data, args.work_dir, args.max_steps, args.save_every, args.delay)
    Path(args.work_dir, "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
