"""Data preparation stage: tokenize the corpus and pack it into fixed-length training blocks.

    python -m stages.prepare recipes/tiny.yaml [stages.prepare.block_size=512]

Output `dataset/`: a `datasets` folder (`save_to_disk`) with `train` and `validation` splits of
packed blocks (`input_ids`, `position_ids` restarting per document; see pipeline/data/packing.py).
"""

from __future__ import annotations

import logging

from pipeline.data.packing import pack_documents
from pipeline.data.sources import load_dataset_input, load_tokenizer_input, require_columns
from pipeline.recipe.stages import PrepareSettings
from pipeline.runner.stage import StageContext, StageError, stage_main

log = logging.getLogger("pipeline")


def run(ctx: StageContext[PrepareSettings]) -> None:
    import datasets

    s = ctx.settings
    tokenizer = load_tokenizer_input(ctx.inputs["tokenizer"])
    corpus = load_dataset_input(ctx.inputs["corpus"], s.validation_fraction, ctx.seed)
    require_columns(corpus, ["text"], ctx.inputs["corpus"])
    packed = datasets.DatasetDict({
        split: pack_documents(corpus[split], tokenizer, s.block_size, s.num_proc) for split in ("train", "validation")
    })
    for split, part in packed.items():
        if len(part) == 0:
            raise StageError(f"input corpus: the {split} split yields no full block of {s.block_size} tokens; "
                             f"lower stages.prepare.block_size or add text")
    packed.save_to_disk(str(ctx.output_dir("dataset")))
    for split, part in packed.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in corpus[split]["text"])
        ctx.metrics[f"{split}_blocks"] = len(part)
        ctx.metrics[f"{split}_tokens"] = len(part) * s.block_size
        ctx.metrics[f"{split}_documents"] = len(corpus[split])
        ctx.metrics[f"{split}_bytes"] = n_bytes
    log.info("packed %d train and %d validation blocks of %d tokens", len(packed["train"]),
             len(packed["validation"]), s.block_size)


if __name__ == "__main__":
    stage_main("prepare", run)
