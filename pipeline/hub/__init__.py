"""Push published artifacts to a Hugging Face hub repo with a generated card (docs/hub.md).

    python -m pipeline push runs/tiny/sft/model --repo ORG/NAME [--private] [--revision BRANCH]
    # or in a recipe: stages.sft.push: {repo: ORG/NAME}

    from pipeline.hub import push_artifact
    push_artifact("runs/tiny/sft/model", "ORG/NAME", private=True)   # token: HF_TOKEN or hf auth login

Modules: `push` (resolve, upload, record the push; the token is never written anywhere), `model_card`
(README.md for models and datasets from the manifest's lineage and metrics).
"""

from pipeline.hub.push import PushError, push_artifact, push_stage_outputs

__all__ = ["PushError", "push_artifact", "push_stage_outputs"]
