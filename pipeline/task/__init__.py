"""The default task: rewrite a given sentence under constraints, judged by a program (docs/task.md).

    from pipeline.task import instructions as task
    (example,) = task.make_examples(1, seed=0, split="eval")
    grade = task.grade(example.prompt, response)   # score, passed, satisfied, faithfulness

`instructions` builds the task's SFT, preference and prompt datasets (the `instructions` stage) and
holds the judge that the evaluate stage and the labeling page's automatic annotator use.
"""

__all__ = ["instructions"]
