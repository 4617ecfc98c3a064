"""What a worker generates with, behind one small interface (`base.WorkerBackend`):

- `hf` (default, `hf.py`): a model loaded by core/models.py and core/batch.py's BatchEngine;
- `vllm` (extra, GPU, `vllm_engine.py`): vLLM's async engine, fed the same token ids;
- `openai` (`openai_proxy.py`): a proxy to an upstream OpenAI-compatible endpoint.

`open(request)` validates and queues (raising ServeError 400/429 before anything is streamed);
the returned `WorkerStream` yields event dicts (see protocol.py) and can be cancelled. The hf and
vllm backends turn a request into token ids with core/encoding.py's `encode_prompt` (through
`base.encode_request`), the same rule `vicuna chat` uses.
"""

from .base import BACKENDS, WorkerBackend, WorkerStream
from .hf import HFBackend
from .openai_proxy import OpenAIProxyBackend
from .vllm_engine import VLLMBackend

__all__ = ["BACKENDS", "HFBackend", "OpenAIProxyBackend", "VLLMBackend", "WorkerBackend", "WorkerStream"]
