"""Training: the one loop every training stage uses, and what it needs.

    from pipeline.train.distributed import make_accelerator
    from pipeline.train.loop import train
    accelerator = make_accelerator(s.grad_accum_steps, work_dir, micro_batch_size=s.micro_batch_size)
    # gloo + fp32 on CPU, NCCL + bf16 on GPU, DeepSpeed ZeRO from the accelerate config
    summary = train(accelerator, model, train_data, collate, loss_fn, s, work_dir, seed=seed, evaluate=eval_fn)

A stage with its own kind of step (PPO) calls `run_loop(accelerator, model, step, settings, work_dir, ...)`
with `step(state, indices, time_fraction) -> StepResult` and gets the same resume, NaN guard, time
budget, logs and checkpoints.

Modules: `loop` (the `run_loop` skeleton and the supervised step: schedule, clipping, accumulation, evaluation, checkpoints, exact resume, the NaN
guard, the time budget, logs), `muon` (the Muon optimizer), `models` (building the dense and MoE models,
the language-model loss, the attention choice), `distributed` (the single place for accelerate,
DeepSpeed and process-group wiring).
"""

__all__ = ["distributed", "loop", "models", "muon"]
