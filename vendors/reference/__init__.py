"""Reference vendors: real local small language models behind OpenAI-compatible HTTP APIs.

Switchyard routes customer requests to third-party vendor endpoints. To develop, test and
benchmark the gateway without any network, this package runs real models on this machine,
each as its own HTTP server that looks like any vendor's llama.cpp / vLLM endpoint:

- ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0) on llama.cpp (``xllamacpp``), a small
  but genuinely instruction-tuned chat model: chat, streaming with a usage chunk, logprobs.
- ``gemma``: Gemma 3 270M, the *pretrained base* model (Gemma Terms of Use, see
  ``NOTICE-GEMMA.md``) on llama.cpp: a deliberately weak, low-confidence vendor for
  cascade and fallback tests. It continues text rather than answering.
- ``minilm``: all-MiniLM-L6-v2 int8 ONNX (Apache-2.0) on onnxruntime, serving
  ``/v1/embeddings``; :class:`vendors.reference.embeddings.MiniLMEncoder` is also reused
  in-process for auto-routing and classification.

Every model file comes from an installed Python package (see :mod:`.models`), so nothing is
downloaded at run time. Start servers with :func:`vendors.reference.launch.start_reference_vendor`
or ``python -m vendors.reference.llm`` / ``python -m vendors.reference.embeddings``.

Nothing in this package imports Django: the servers are standalone processes.
"""
