"""Test-wide setup. Without a GPU, the Triton kernels are tested under the Triton interpreter,
which must be switched on before triton or peer_attention (which reads it at import) is imported.
Auto dispatch never picks the interpreter, so only tests that ask for backend="triton" use it."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
