"""The embedded model organism: a ~3M-parameter Llama pretrained on synthetic tasks, shipped in `model/`.

`tasks` makes the synthetic data (old skills, opaque verbs, the new skill in several teacher styles),
`tokenizer` builds the character-plus-pieces tokenizer, `pretrain` reproduces the checkpoint:
    python -m onsft.organism.pretrain --out src/onsft/organism/model
Load it with `onsft.runtime.models.load_model("organism")` (or `from_pretrained(MODEL_DIR)`).
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
