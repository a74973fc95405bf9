"""The model core: what every backend and every stage agrees on.

Owns the model spec and presets, the checkpoint format, optimizer settings and schedules, the open
`Batch`, the `Backend` protocol with its declared capabilities and the registry that loads a backend
by name, the compute/memory plan, the Hugging Face export, and the one TOML/dict -> dataclass
builder (`config`). The `model` CLI sits here too (`cli`).

May import: `hanyeong`, `tokenizer`. Never `data`, `pipeline`, `cluster`, and never a backend
package (`cuda_model`, `mlx_model`): those import the core.
"""
