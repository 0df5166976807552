"""dlengine: a library-first LLM inference SDK.

    from dlengine import EngineBuilder, SamplingParams
    engine = EngineBuilder("tiny-qwen3").cache(block_size=16).build()
    print(engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0.0))[0].text)
"""

from dlengine.builder import EngineBuilder
from dlengine.config import ConfigError
from dlengine.engine.core import EngineCore, EngineStats
from dlengine.engine.engine import Engine
from dlengine.engine.request import RequestMetrics, RequestOutput
from dlengine.sampling_params import InvalidRequestError, SamplingParams

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "Engine",
    "EngineCore",
    "EngineBuilder",
    "EngineStats",
    "InvalidRequestError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
