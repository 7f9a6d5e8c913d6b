"""Evaluation-stage measures that do not need a trained model: the unigram baseline and reward-model/judge agreement."""

import math

import datasets
import numpy as np
import pytest
import torch

from pipeline.task.instructions import expected_response, format_prompt
from stages.evaluate import reward_judge_agreement, unigram_bits_per_byte


def blocks(rows):
    return datasets.Dataset.from_dict({"input_ids": rows, "position_ids": [list(range(len(r))) for r in rows]})


def test_unigram_baseline_matches_hand_count_and_skips_zero_byte_targets():
    # vocab: 0 = EOS (0 bytes), 1 = "a" (1 byte), 2 = "bc" (2 bytes); targets are ids[1:]
    data = datasets.DatasetDict({"train": blocks([[0, 1, 1, 1, 2], [0, 1, 2, 0, 1]]),
                                 "validation": blocks([[0, 2, 1, 0, 1], [0, 2, 2, 2, 2]])})
    byte_lengths = torch.tensor([0, 1, 2])
    # train targets: 1,1,1,2 and 1,2,0,1 -> counts +1 smoothing: id0 2, id1 6, id2 3 (total 11)
    p = np.array([2, 6, 3]) / 11
    targets = [2, 1, 0, 1]  # first validation block only
    bits = -sum(math.log2(p[t]) for t in targets if t != 0)
    assert unigram_bits_per_byte(data, byte_lengths, n_blocks=1) == pytest.approx(bits / (2 + 1 + 1))
    both = unigram_bits_per_byte(data, byte_lengths, n_blocks=10)  # more blocks than there are: all of them
    assert both == pytest.approx((bits - 4 * math.log2(p[2])) / (4 + 8))


def test_reward_judge_agreement_splits_constraint_and_content_differences():
    source = "Return the value of the named attribute of object."
    constraints = [{"type": "lowercase"}]
    row = {"prompt": format_prompt(source, constraints)}
    good = expected_response(source, constraints)
    wrong_case = good.capitalize()  # a constraint fails
    wrong_word = good.replace("value", "name")  # constraint holds, content copied wrong
    rows, a, b = [row] * 3, [good, good, wrong_word], [wrong_case, wrong_word, wrong_word]
    # the reward model gets the case pair right, the content pair wrong; the third pair is a tie (skipped)
    out = reward_judge_agreement(rows, a, b, rm_a=[1.0, -1.0, 0.0], rm_b=[0.0, 1.0, 0.0])
    assert out == {"pairs": 2, "accuracy": 0.5, "pairs/constraints_differ": 1, "accuracy/constraints_differ": 1.0,
                   "pairs/faithfulness_only": 1, "accuracy/faithfulness_only": 0.0}
