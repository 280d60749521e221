"""Emulated fine-tuning (EFT) and LM up-scaling, with LangChain and LlamaIndex adapters.

    from eft_integrations import EFTDecoder, Behavior
    decoder = EFTDecoder.from_pretrained(
        base="meta-llama/Llama-2-70b-hf",
        behaviors={"chat": Behavior("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf")},
    )
    print(decoder.generate("Hello", temperature=0).text)

The framework adapters live in `eft_integrations.langchain` and `eft_integrations.llama_index`;
importing this package imports neither framework.
"""

from .adapters import Adapter
from .composition import compose_logprobs
from .constraints import TokenConstraint
from .decoder import EFTDecoder
from .errors import EFTRequestError, EngineUnavailableError
from .lazy import LazyDecoder
from .loading import Behavior, ModelSpec
from .options import (
    ContinuationScore,
    GenerationOptions,
    GenerationResult,
    StreamChunk,
    TokenLogprob,
    Usage,
)

__all__ = [
    "Adapter",
    "Behavior",
    "ContinuationScore",
    "EFTDecoder",
    "EFTRequestError",
    "EngineUnavailableError",
    "GenerationOptions",
    "GenerationResult",
    "LazyDecoder",
    "ModelSpec",
    "StreamChunk",
    "TokenConstraint",
    "TokenLogprob",
    "Usage",
    "compose_logprobs",
]

__version__ = "0.1.0"
