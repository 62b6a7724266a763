import os
import sys
from pathlib import Path

# Tests never reach a hub; tiny models come from tests/tiny.py or the embedded organism.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

# pytest runs two workers (`-n 2`) on two cores: one thread each avoids oversubscription, which on a
# shared CPU made a decoding step ~6x slower with 2 threads than with 1. Subprocesses inherit the env.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
