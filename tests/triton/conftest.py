"""The Triton backend's tests run on a GPU when one is present, else under the Triton
interpreter. TRITON_INTERPRET must be set before triton (and peer_attention, which reads it at
import) is imported, hence here, at collection time. If something imported them earlier without
it, the tests fail with the backend's own reason ("CPU tensors need the Triton interpreter")."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
