"""hanyeong's orchestration, in six parts (each a subpackage that says what it owns and may import):

    core/      the model spec, checkpoints, optimizer settings, the open Batch, the backend protocol
               and registry, plan, HF export, the config builder; the `model` CLI
    data/      corpora -> cleaned, deduplicated, decontaminated, tokenized Parquet; the mixture loader
    pipeline/  recipes, stage kinds, one stage's loop, the Ray runner, manifest and reports
    cluster/   Ray sessions, the Jobs API, data-parallel worker groups
    eval/      benchmark tasks scored through the backend protocol, results files, generate and chat
    sampling/  the post-training data loop: generation jobs, reward scores, rejection sampling

`cli.py` is the `hanyeong` command. Dependency direction: sampling -> eval -> pipeline -> data, cluster
-> core -> tokenizer -> hanyeong (a stage's [stage.eval] calls eval, an online stage sampling, from
inside a function; eval and sampling reach cluster from inside functions to shard over Ray);
backends (cuda_model, mlx_model) -> core, and nothing here imports a backend.
"""
