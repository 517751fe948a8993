#!/usr/bin/env python3
"""Command line of torch_sparsity.convert: builds an eager model, prunes it with
torch.ao.pruning (or takes it pruned), converts it for TorchScript and saves
the scripted model. `scripts/convert_model.py --help` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from torch_sparsity.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
