"""Tiny Shakespeare split exactly as nanoGPT splits it: first 90% of the characters train, last 10% validation.

    python benchmarks/shakespeare_split.py [--text ../shared/data/tinyshakespeare.txt] [--out runs/bench_shakespeare/data]

Writes a saved `datasets` DatasetDict (`save_to_disk`) with splits `train` and `validation`, one row
each, column `text`. The pipeline's corpus loader (pipeline/sources.load_dataset_input) reads a saved
DatasetDict as it is, so no re-split happens and the stream is nanoGPT's: one document per split
(the prepare stage adds a BOS at its start and an EOS at its end, both 0-byte and left out of bits
per byte). The text is ASCII, so characters = bytes and nanoGPT's nats/char convert to bits per byte
by dividing by ln 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = REPO / "runs" / "bench_shakespeare" / "data"


def write_split(text_path: Path = DEFAULT_TEXT, out: Path = DEFAULT_OUT) -> Path:
    """Write the 90/10 split to `out` (unless it already holds exactly that) and return `out`."""
    import datasets

    text = Path(text_path).read_text(encoding="utf-8")
    n = len(text)
    cut = int(n * 0.9)  # nanoGPT data/shakespeare_char/prepare.py: data[:int(n*0.9)], data[int(n*0.9):]
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [text[:cut]]}),
        "validation": datasets.Dataset.from_dict({"text": [text[cut:]]}),
    })
    out = Path(out)
    if _holds(out, data):  # rewriting changes the folder's fingerprint under a run already using it
        return out
    data.save_to_disk(str(out))
    return out


def _holds(folder: Path, data) -> bool:
    """Whether `folder` is a saved split with exactly `data`'s texts."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError):
        return False
    return set(saved) == set(data) and all(saved[k]["text"] == data[k]["text"] for k in data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    out = write_split(args.text, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
