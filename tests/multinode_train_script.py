"""Train the nano dense model with pipeline.train.loop under any launcher; used by tests/test_multinode.py.

    accelerate launch --config_file recipes/accelerate/cpu_zero2.yaml --num_processes 2 \
        tests/multinode_train_script.py DATA_DIR WORK_DIR --grad-accum 1

Unlike the pretrain stage, the work dir is given directly (no recipe fingerprint), so a resume may use
another batch shape: 2 processes x 1 micro batch and 1 process x 2 accumulated micro batches make the
same global batch. Rank 0 writes WORK_DIR/summary.json (the training summary and the distributed setup).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.data import packing  # noqa: E402
from pipeline.recipe.settings import ModelSettings, TrainSettings  # noqa: E402
from pipeline.train import distributed, models  # noqa: E402
from pipeline.train import loop as training


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("work_dir")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=3)
    args = parser.parse_args()

    import datasets
    from accelerate.utils import set_seed

    data = datasets.load_from_disk(str(args.data))["train"].with_format("numpy")
    model_settings = ModelSettings(size="nano", max_seq_len=64)
    train = TrainSettings(max_steps=args.max_steps, micro_batch_size=2, grad_accum_steps=args.grad_accum,
                          learning_rate=3e-3, warmup_steps=2, eval_every=1000, save_every=args.save_every,
                          log_every=1)
    accelerator = distributed.make_accelerator(args.grad_accum, None, micro_batch_size=2, grad_clip=train.grad_clip)
    set_seed(0)
    model = models.build_model(model_settings, 300, 0, 1, 2)
    _, summary = training.train(accelerator, model, data, packing.collate_blocks,
                                lambda m, b: models.causal_lm_loss(m, b, model_settings), train,
                                Path(args.work_dir), seed=0)
    summary["distributed"] = distributed.describe(accelerator)
    if accelerator.is_main_process:
        Path(args.work_dir, "summary.json").write_text(json.dumps(summary))
    distributed.finish(accelerator)


if __name__ == "__main__":
    main()
