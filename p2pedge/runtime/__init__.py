"""Local model runtime: onnxruntime(-genai) engines, the warm-model cache and its policy.

Synchronous and trio-free (``p2pedge.node.inference`` is the trio glue). Submodules are
imported on demand so that ``import p2pedge.runtime.reference`` stays cheap.
"""
