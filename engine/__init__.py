"""ciar.engine: collaborative decoding in one process (PyTorch). Device proposer, cloud verifier, acceptance
policy and gate are separate parts (the vLLM proposer / scorer / rejection-sampler split); one loop drives every
method. Imports ciar.models only."""
from .link import LINKS, LinkProfile
from .loop import GenerationResult, collaborative_generate
from .methods import METHODS, Method, get_method

__all__ = ["LINKS", "LinkProfile", "GenerationResult", "collaborative_generate", "METHODS", "Method", "get_method"]
